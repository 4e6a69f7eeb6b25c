//! `limiter limits`: change, show and list a running agent's policies. Each function connects
//! to the agent at `target`, makes one call and prints its answer.

use crate::{
    cli::{
        client::{self, Target, status_error},
        render::{self, show_policy},
    },
    config::Window,
    proto,
};

/// Creates or replaces the policy for `matches`; `window`, `action` and `scope` as given to
/// `--window` (e.g. `500ms`), `--action` (`limit`, `pass` or `drop`) and `--scope` (`local` or
/// `global`: the scope the policy must have).
pub async fn set(
    matches: String,
    limit: Option<u32>,
    window: Option<String>,
    action: String,
    scope: Option<String>,
    target: Target,
) -> anyhow::Result<()> {
    let scope = match scope.as_deref() {
        None => proto::Scope::Unspecified,
        Some("local") => proto::Scope::Local,
        Some("global") => proto::Scope::Global,
        Some(other) => anyhow::bail!("--scope {other:?}: expected local or global"),
    };
    let mut c = client::connect(&target).await?;
    let action = match action.as_str() {
        "limit" => proto::Action::Limit,
        "pass" => proto::Action::Pass,
        "drop" => proto::Action::Drop,
        other => anyhow::bail!("--action {other:?}: expected limit, pass or drop"),
    };
    let window = window
        .map(|w| {
            w.parse::<Window>()
                .map_err(|e| anyhow::anyhow!("--window: {e}"))
        })
        .transpose()?
        .map(|w| prost_types::Duration {
            seconds: (w.micros / 1_000_000) as i64,
            nanos: (w.micros % 1_000_000) as i32 * 1000,
        });
    let change = c
        .limits
        .set(proto::SetLimitRequest {
            policy: Some(proto::Policy {
                r#match: matches,
                limit,
                window,
                action: action as i32,
                scope: scope as i32,
            }),
        })
        .await
        .map_err(status_error)?
        .into_inner();
    if let Some(p) = change.policy {
        println!("set {} (generation {})", show_policy(&p), change.generation);
    }
    Ok(())
}

/// Prints the policy for `matches`.
pub async fn get(matches: String, target: Target) -> anyhow::Result<()> {
    let mut c = client::connect(&target).await?;
    let p = c
        .limits
        .get(proto::GetLimitRequest { r#match: matches })
        .await
        .map_err(status_error)?
        .into_inner();
    println!("{}", show_policy(&p));
    Ok(())
}

/// Removes the policy for `matches`: the one set through the API, else the config file's.
pub async fn rm(matches: String, target: Target) -> anyhow::Result<()> {
    let mut c = client::connect(&target).await?;
    let change = c
        .limits
        .delete(proto::DeleteLimitRequest { r#match: matches })
        .await
        .map_err(status_error)?
        .into_inner();
    if let Some(p) = change.policy {
        let restored = change.kind == proto::limit_change::Kind::Set as i32;
        println!(
            "{} {} (generation {})",
            if restored {
                "removed the API's policy; in force again from the config file:"
            } else {
                "removed"
            },
            show_policy(&p),
            change.generation
        );
    }
    Ok(())
}

/// Prints the policies, each with its layer.
pub async fn ls(target: Target) -> anyhow::Result<()> {
    let mut c = client::connect(&target).await?;
    let list = c
        .limits
        .list(proto::ListLimitsRequest {})
        .await
        .map_err(status_error)?
        .into_inner();
    print!("{}", render::policy_table(&list));
    Ok(())
}

/// Prints the policies in force as a config file (YAML).
pub async fn effective(target: Target) -> anyhow::Result<()> {
    let mut c = client::connect(&target).await?;
    let effective = c
        .limits
        .effective(proto::EffectiveConfigRequest {})
        .await
        .map_err(status_error)?
        .into_inner();
    print!("{}", effective.yaml);
    Ok(())
}
