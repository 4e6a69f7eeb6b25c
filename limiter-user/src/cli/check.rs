//! `limiter check`: ask a running agent whether a client may spend hits now.

use crate::{
    cli::{
        client::{self, Target, status_error},
        render::{action_name, show_duration},
    },
    proto,
};

/// Asks the agent at `target` whether client `id` may spend `hits`, and prints its answer:
/// `Ok(false)` if denied, for the caller's distinct exit status.
pub async fn check(id: String, hits: u32, target: Target) -> anyhow::Result<bool> {
    let mut c = client::connect(&target).await?;
    let r = c
        .rate_limiter
        .check(proto::CheckRequest {
            client_id: id.clone(),
            hits: Some(hits),
        })
        .await
        .map_err(status_error)?
        .into_inner();
    println!(
        "{id}: {}{}  limit {}{} per {}  remaining {}  reset in {}  retry in {}  (policy {}, {})",
        if r.allowed { "allowed" } else { "denied" },
        if r.dry_run_denied {
            " (dry-run: would be denied)"
        } else {
            ""
        },
        r.limit,
        r.global_limit
            .map(|g| format!(" (this node's share of {g} across the cluster)"))
            .unwrap_or_default(),
        show_duration(r.window.as_ref()),
        r.remaining,
        show_duration(r.reset_after.as_ref()),
        show_duration(r.retry_after.as_ref()),
        r.policy,
        action_name(r.action),
    );
    Ok(r.allowed)
}
