//! Conversions between the proto messages and the crate's types, and the `Status` each typed
//! error becomes.

use std::time::Duration;

use tonic::Status;

use crate::{
    check::{CheckError, ClientId, Decision},
    config::{Action, Limit, Resolved, Scope, Window},
    limits::{Change, ChangeKind, LimitsError, Selector},
    proto::{self},
};

/// The status of a failed policy change; its message carries the whole cause chain (an overlay
/// that cannot be written names the I/O error).
pub(super) fn status_of(e: &LimitsError) -> Status {
    let message = crate::error_chain(e);
    match e {
        LimitsError::NotFound(_) => Status::not_found(message),
        LimitsError::DeleteDefault => Status::failed_precondition(message),
        LimitsError::Invalid(_) | LimitsError::Scope { .. } => Status::invalid_argument(message),
        LimitsError::OverlayUnusable { .. } => Status::failed_precondition(message),
        LimitsError::Overlay(_) | LimitsError::Apply(_) => Status::internal(message),
    }
}

pub(super) fn check_status(e: CheckError) -> Status {
    match e {
        CheckError::InvalidId(_) => Status::invalid_argument(e.to_string()),
        CheckError::Run(_) | CheckError::Rejected(_) | CheckError::Unanswered => {
            Status::internal(crate::error_chain(&e))
        }
    }
}

pub(super) fn duration(d: Duration) -> prost_types::Duration {
    prost_types::Duration {
        seconds: d.as_secs() as i64,
        nanos: d.subsec_nanos() as i32,
    }
}

pub(super) fn action_proto(a: Action) -> proto::Action {
    match a {
        Action::Limit => proto::Action::Limit,
        Action::Pass => proto::Action::Pass,
        Action::Drop => proto::Action::Drop,
    }
}

pub(super) fn decision_proto(d: &Decision) -> proto::CheckResponse {
    proto::CheckResponse {
        allowed: d.allowed,
        limit: d.limit,
        remaining: d.remaining,
        reset_after: Some(duration(d.reset_after)),
        retry_after: d.retry_after.map(duration),
        window: Some(duration(d.window)),
        action: action_proto(d.action) as i32,
        policy: d.policy.to_string(),
        dry_run_denied: d.dry_run_denied,
        global_limit: d.global_limit,
    }
}

/// Validates one check; `index` (in a batch) prefixes error messages with `checks[i].`.
pub(super) fn parse_check(
    req: &proto::CheckRequest,
    index: Option<usize>,
) -> Result<(ClientId, u32), Status> {
    let id = req.client_id.parse::<ClientId>().map_err(|e| {
        Status::invalid_argument(match index {
            Some(i) => format!("checks[{i}].{e}"),
            None => e.to_string(),
        })
    })?;
    Ok((id, req.hits.unwrap_or(1)))
}

/// The `match` of a Get or Delete request.
pub(super) fn parse_selector(s: &str) -> Result<Selector, Status> {
    s.parse()
        .map_err(|e| Status::invalid_argument(format!("match: {e}")))
}

/// A policy from the API, validated field by field.
pub fn parse_policy(p: &proto::Policy) -> Result<(Selector, Resolved), Status> {
    let invalid =
        |field: &str, msg: String| Status::invalid_argument(format!("policy.{field}: {msg}"));
    let selector: Selector = p.r#match.parse().map_err(|e| invalid("match", e))?;
    let action = proto::Action::try_from(p.action)
        .map_err(|_| invalid("action", format!("unknown action {}", p.action)))?;
    let window = match &p.window {
        None => None,
        Some(d) => {
            if d.seconds < 0 || d.nanos < 0 {
                return Err(invalid("window", "must be positive".into()));
            }
            let ns = d.seconds as u128 * 1_000_000_000 + d.nanos as u128;
            if !ns.is_multiple_of(1000) {
                return Err(invalid(
                    "window",
                    "must be a whole number of microseconds".into(),
                ));
            }
            let us = u64::try_from(ns / 1000).unwrap_or(u64::MAX);
            Some(Window::from_micros(us).map_err(|e| invalid("window", e))?)
        }
    };
    let limit = Limit {
        limit: p.limit,
        window,
        action: match action {
            proto::Action::Unspecified | proto::Action::Limit => Action::Limit,
            proto::Action::Pass => Action::Pass,
            proto::Action::Drop => Action::Drop,
        },
        weight: None,
        per: None,
    };
    let resolved = limit.resolve().map_err(|e| invalid(e.field, e.message))?;
    Ok((selector, resolved))
}

/// A policy as the API shows it.
pub fn policy_proto(selector: &Selector, r: &Resolved, scope: Scope) -> proto::Policy {
    let limited = r.action == Action::Limit;
    proto::Policy {
        r#match: selector.to_string(),
        limit: limited.then_some(r.limit),
        window: limited.then(|| duration(Duration::from_micros(r.window.micros as u64))),
        action: action_proto(r.action) as i32,
        scope: match scope {
            Scope::Local => proto::Scope::Local,
            Scope::Global => proto::Scope::Global,
        } as i32,
    }
}

/// The scope a Set asks for (`None`: keep the policy's).
pub fn requested_scope(p: &proto::Policy) -> Result<Option<Scope>, Status> {
    match proto::Scope::try_from(p.scope) {
        Ok(proto::Scope::Unspecified) => Ok(None),
        Ok(proto::Scope::Local) => Ok(Some(Scope::Local)),
        Ok(proto::Scope::Global) => Ok(Some(Scope::Global)),
        Err(_) => Err(Status::invalid_argument(format!(
            "policy.scope: unknown scope {}",
            p.scope
        ))),
    }
}

pub(super) fn change_proto(c: &Change) -> proto::LimitChange {
    proto::LimitChange {
        kind: match c.kind {
            ChangeKind::Set => proto::limit_change::Kind::Set,
            ChangeKind::Deleted => proto::limit_change::Kind::Deleted,
        } as i32,
        policy: Some(policy_proto(&c.selector, &c.limit, c.scope)),
        generation: c.generation as u64,
        source: c.source.as_str().into(),
    }
}

#[cfg(test)]
mod tests {
    use tonic::Code;

    use crate::config::Config;

    use super::*;

    #[test]
    fn an_overlay_that_cannot_be_written_answers_internal_naming_the_os_error() {
        let blocker = std::env::temp_dir().join(format!("limiter-convert-{}", std::process::id()));
        std::fs::write(&blocker, "a file where the state directory should be").unwrap();
        let error = crate::config::overlay::Overlay::default()
            .store(&blocker.join("lo.overlay.yaml"))
            .unwrap_err();
        let status = status_of(&LimitsError::Overlay(error));
        std::fs::remove_file(&blocker).unwrap();
        assert_eq!(status.code(), Code::Internal);
        let message = status.message();
        assert!(
            message.starts_with("the change was not applied: "),
            "{message}"
        );
        assert!(message.contains("lo.overlay.yaml"), "{message}");
        assert!(
            message.contains("(os error "),
            "the cause is named: {message}"
        );
    }

    fn policy(
        m: &str,
        limit: Option<u32>,
        window_ms: Option<i64>,
        action: proto::Action,
    ) -> proto::Policy {
        proto::Policy {
            r#match: m.into(),
            limit,
            window: window_ms.map(|ms| prost_types::Duration {
                seconds: ms / 1000,
                nanos: ((ms % 1000) * 1_000_000) as i32,
            }),
            action: action as i32,
            scope: proto::Scope::Unspecified as i32,
        }
    }

    /// The message of an INVALID_ARGUMENT.
    fn rejected(p: &proto::Policy) -> String {
        let status = parse_policy(p).expect_err("must be rejected");
        assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
        status.message().to_string()
    }

    #[test]
    fn an_api_policy_resolves_as_the_same_policy_in_the_file_would() {
        use proto::Action::*;
        let (selector, r) =
            parse_policy(&policy("10.0.0.0/8", Some(5), Some(1500), Limit)).unwrap();
        assert_eq!(selector.to_string(), "10.0.0.0/8");
        let file = Config::parse("default: { limit: 5, window: 1500ms }").unwrap();
        assert_eq!(r, file.default);
        // ACTION_UNSPECIFIED is a limit; `default` selects the default.
        let (selector, _) =
            parse_policy(&policy("default", Some(1), Some(10), Unspecified)).unwrap();
        assert_eq!(selector, Selector::Default);
        let (_, pass) = parse_policy(&policy("tenant-a", None, None, Pass)).unwrap();
        assert_eq!(
            pass,
            Config::parse("default: { action: pass }").unwrap().default
        );
        let (_, drop) = parse_policy(&policy("tenant-a", Some(0), None, Drop)).unwrap();
        assert_eq!(drop.action, Action::Drop);
    }

    #[test]
    fn bad_api_policies_name_the_field_at_fault() {
        use proto::Action::*;
        for (p, field) in [
            (
                policy("10.0.0.0/33", Some(1), Some(1000), Limit),
                "policy.match: ",
            ),
            (policy("", Some(1), Some(1000), Limit), "policy.match: "),
            (
                policy("10.0.0.0/24", None, Some(1000), Limit),
                "policy.limit: ",
            ),
            (
                policy("10.0.0.0/24", Some(1), None, Limit),
                "policy.window: ",
            ),
            (
                policy("10.0.0.0/24", Some(1), Some(5), Limit),
                "policy.window: ",
            ),
            (
                policy("10.0.0.0/24", Some(1), Some(7_200_000), Limit),
                "policy.window: ",
            ),
            (policy("10.0.0.0/24", Some(1), None, Pass), "policy.limit: "),
            (
                policy("10.0.0.0/24", None, Some(1000), Drop),
                "policy.window: ",
            ),
            (policy("10.0.0.0/24", Some(3), None, Drop), "policy.limit: "),
        ] {
            let message = rejected(&p);
            assert!(message.starts_with(field), "{p:?}: {message}");
        }
        let mut unknown = policy("10.0.0.0/24", Some(1), Some(1000), Limit);
        unknown.action = 42;
        assert!(rejected(&unknown).starts_with("policy.action: "));
        let mut sub_micro = policy("10.0.0.0/24", Some(1), Some(1000), Limit);
        sub_micro.window.as_mut().unwrap().nanos = 1;
        assert!(rejected(&sub_micro).contains("whole number of microseconds"));
    }
}
