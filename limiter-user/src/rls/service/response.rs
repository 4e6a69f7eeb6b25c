//! The answer to a request, from its plans and their outcomes: the statuses, the overall code
//! (quota descriptors deny together), the RateLimit headers, the deny body and the dynamic
//! metadata (see the module docs of `service`).

use std::time::Duration;

use envoy_types::pb::{
    envoy::{
        config::core::v3::HeaderValue,
        service::ratelimit::v3::{
            RateLimitRequest, RateLimitResponse,
            rate_limit_response::{
                Code, DescriptorStatus, RateLimit as PbLimit, rate_limit::Unit as PbUnit,
            },
        },
    },
    google::protobuf::Duration as PbDuration,
};

use super::{Outcome, Plan, Quotas, RlsService, Role};
use crate::{
    check::Decision,
    config::Action,
    rls::{Unit, budget::Budget, matching::Limit, metadata},
};

impl<B: Budget> RlsService<B> {
    pub(super) fn response(
        &self,
        request: &RateLimitRequest,
        plans: &[Plan],
        quotas: Quotas,
        outcomes: &[Option<Outcome>],
    ) -> RateLimitResponse {
        let dry_run = self.budget.dry_run();
        let mut statuses = Vec::with_capacity(plans.len());
        let mut over_limit = false;
        // Quota descriptors deny together: the request is over when every one is. Their
        // denial's wait is the shortest of theirs (one quota with room admits the request), and
        // says when to retry only if that one can admit at all (as for `Retry-After` below).
        // The checked quota descriptors that are out (the blocked ones are in `quotas`).
        let mut quotas_out = 0usize;
        let mut quota_wait: Option<(u32, u32, Duration)> = None;
        let mut quota_retry_helps = false;
        // For the headers: the status with the least left; of a denied request, the denied
        // status with the longest wait (the one that caused the denial, as envoyproxy/ratelimit
        // reports it). `Retry-After` is the longest wait of the denied, but only when it is
        // known to help: not when a descriptor that never admits denied the request (a
        // `requests_per_unit: 0` rule, an address under a `drop` policy, or a global share of
        // none), and not when one denied asked more than one hit of its client (the waits are
        // for one hit, which says nothing of when several fit).
        let mut tightest: Option<(u32, u32, Duration)> = None;
        let mut denied: Option<(u32, u32, Duration)> = None;
        let mut retry: Option<Duration> = None;
        let mut no_retry = false;
        for (plan, outcome) in plans.iter().zip(outcomes) {
            let status = match (plan, outcome) {
                (Plan::NoLimit, _) => DescriptorStatus {
                    code: Code::Ok as i32,
                    ..DescriptorStatus::default()
                },
                (Plan::Unlimited, _) => DescriptorStatus {
                    code: Code::Ok as i32,
                    limit_remaining: u32::MAX,
                    ..DescriptorStatus::default()
                },
                (Plan::Blocked(limit), _) => {
                    let role = Role::of(limit);
                    let enforced = role != Role::Shadow && !dry_run;
                    // Its quota (none) comes back whole at the end of its unit, as
                    // envoyproxy/ratelimit reports it; no Retry-After (see above).
                    let unit = Duration::from_secs(limit.unit.seconds());
                    if role == Role::Quota {
                        // Out for good (`Quotas::blocked`): it waits for its unit.
                        if enforced {
                            quota_wait = quota_wait.or(Some((0, 0, unit)));
                        }
                    } else {
                        over_limit |= enforced;
                        if enforced {
                            denied = longer_wait(denied, (0, 0, unit));
                            no_retry = true;
                        }
                        tightest = tighter(tightest, (0, 0, unit));
                    }
                    DescriptorStatus {
                        code: if enforced { Code::OverLimit } else { Code::Ok } as i32,
                        current_limit: Some(pb_limit(limit.requests_per_unit, limit.unit, limit)),
                        duration_until_reset: Some(pb_duration(unit)),
                        ..DescriptorStatus::default()
                    }
                }
                (Plan::Check { limit, address, .. }, Some(outcome)) => {
                    let d = &outcome.decision;
                    let role = Role::of(limit);
                    let enforced = outcome.over && role != Role::Shadow && !dry_run;
                    let current = if *address {
                        address_limit(d, limit)
                    } else {
                        pb_limit(limit.requests_per_unit, limit.unit, limit)
                    };
                    let next = d.next_after.unwrap_or(Duration::ZERO);
                    let helps = d.next_after.is_some() && outcome.needed <= 1;
                    if role == Role::Quota {
                        if enforced {
                            quotas_out += 1;
                            // The headers of a denial say none left (the status says what
                            // fewer hits would still find).
                            let wait = (current.requests_per_unit, 0, next);
                            let sooner = match (quota_retry_helps, helps) {
                                (false, true) => true,
                                (true, false) => false,
                                _ => quota_wait.is_none_or(|q| next < q.2),
                            };
                            if sooner {
                                quota_wait = Some(wait);
                                quota_retry_helps = helps;
                            }
                        }
                    } else if enforced {
                        over_limit = true;
                        retry = retry.max(Some(next));
                        no_retry |= !helps;
                        denied = longer_wait(denied, (current.requests_per_unit, 0, next));
                    }
                    // A quota descriptor over its limit is not what limits an admitted request.
                    if (d.action == Action::Limit || d.action == Action::Drop)
                        && !(role == Role::Quota && enforced)
                    {
                        tightest =
                            tighter(tightest, (current.requests_per_unit, d.remaining, next));
                    }
                    DescriptorStatus {
                        code: if enforced { Code::OverLimit } else { Code::Ok } as i32,
                        current_limit: Some(current),
                        limit_remaining: d.remaining,
                        duration_until_reset: Some(pb_duration(next)),
                        ..DescriptorStatus::default()
                    }
                }
                // Every check has an outcome (`run`); should one not, it is not limited.
                (Plan::Check { .. }, None) => DescriptorStatus {
                    code: Code::Ok as i32,
                    ..DescriptorStatus::default()
                },
            };
            statuses.push(status);
        }
        if !dry_run
            && quotas.all_out(quotas_out)
            && let Some(wait) = quota_wait
        {
            over_limit = true;
            denied = longer_wait(denied, wait);
            retry = retry.max(Some(wait.2));
            no_retry |= !quota_retry_helps;
        }
        let mut response = RateLimitResponse {
            overall_code: if over_limit {
                Code::OverLimit
            } else {
                Code::Ok
            } as i32,
            statuses,
            ..RateLimitResponse::default()
        };
        if self.options.headers
            && let Some((limit, remaining, reset)) = denied.or(tightest)
        {
            let mut headers = vec![
                header("RateLimit-Limit", limit.to_string()),
                header("RateLimit-Remaining", remaining.to_string()),
                header("RateLimit-Reset", ceil_seconds(reset).to_string()),
            ];
            if over_limit
                && !no_retry
                && let Some(retry) = retry.filter(|r| !r.is_zero())
            {
                headers.push(header("Retry-After", ceil_seconds(retry).to_string()));
            }
            response.response_headers_to_add = headers;
        }
        if over_limit && let Some(body) = &self.options.deny_body {
            response.raw_body = body.clone();
        }
        if self.options.dynamic_metadata {
            // The rules' `metadata` of the descriptors that passed (reported OK).
            let passed = plans
                .iter()
                .zip(&response.statuses)
                .filter(|(_, status)| status.code == Code::Ok as i32)
                .filter_map(|(plan, _)| match plan {
                    Plan::Blocked(limit) | Plan::Check { limit, .. } => limit.metadata.as_deref(),
                    Plan::NoLimit | Plan::Unlimited => None,
                });
            response.dynamic_metadata = Some(metadata::response(request, passed));
        }
        response
    }
}

/// Of two denied statuses (limit, remaining, wait), the one with the longer wait; the first
/// on a tie.
fn longer_wait(
    current: Option<(u32, u32, Duration)>,
    candidate: (u32, u32, Duration),
) -> Option<(u32, u32, Duration)> {
    match current {
        Some(c) if c.2 >= candidate.2 => Some(c),
        _ => Some(candidate),
    }
}

fn tighter(
    current: Option<(u32, u32, Duration)>,
    candidate: (u32, u32, Duration),
) -> Option<(u32, u32, Duration)> {
    match current {
        Some(c) if c.1 <= candidate.1 => Some(c),
        _ => Some(candidate),
    }
}

fn pb_unit(unit: Unit) -> PbUnit {
    match unit {
        Unit::Second => PbUnit::Second,
        Unit::Minute => PbUnit::Minute,
        Unit::Hour => PbUnit::Hour,
        Unit::Day => PbUnit::Day,
        Unit::Week => PbUnit::Week,
        Unit::Month => PbUnit::Month,
        Unit::Year => PbUnit::Year,
    }
}

fn pb_limit(requests_per_unit: u32, unit: Unit, limit: &Limit) -> PbLimit {
    PbLimit {
        name: limit.name.clone().unwrap_or_default(),
        requests_per_unit,
        unit: pb_unit(unit) as i32,
    }
}

/// The `current_limit` of an address client: the agent's policy for the address, as
/// `requests_per_unit` per the unit its window is (1 s, 1 min, 1 h); a window of another
/// length is reported per second, rounded to the nearest request (at least 1 while the policy
/// admits any). An allow-listed address reports `u32::MAX` per second.
pub(super) fn address_limit(d: &Decision, limit: &Limit) -> PbLimit {
    let (rpu, unit) = match d.action {
        Action::Pass => (u32::MAX, Unit::Second),
        _ => {
            let window_ns = d.window.as_nanos().max(1);
            match [Unit::Second, Unit::Minute, Unit::Hour]
                .into_iter()
                .find(|u| u128::from(u.seconds()) * 1_000_000_000 == window_ns)
            {
                Some(unit) => (d.limit, unit),
                None => {
                    let per_second =
                        (u128::from(d.limit) * 1_000_000_000 + window_ns / 2) / window_ns;
                    let per_second = u32::try_from(per_second).unwrap_or(u32::MAX);
                    let per_second = if d.limit > 0 { per_second.max(1) } else { 0 };
                    (per_second, Unit::Second)
                }
            }
        }
    };
    pb_limit(rpu, unit, limit)
}

fn pb_duration(d: Duration) -> PbDuration {
    PbDuration {
        seconds: i64::try_from(d.as_secs()).unwrap_or(i64::MAX),
        nanos: d.subsec_nanos() as i32,
    }
}

fn ceil_seconds(d: Duration) -> u64 {
    d.as_secs() + u64::from(d.subsec_nanos() > 0)
}

fn header(key: &str, value: String) -> HeaderValue {
    HeaderValue {
        key: key.to_string(),
        value,
        ..HeaderValue::default()
    }
}
