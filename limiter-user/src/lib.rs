//! The limiter agent and CLI as a library, so that tests and benchmarks drive the same code.
//!
//! Each folder is one concept; see README.md "Architecture" for how they map onto the data flow.
//! Imports point one way only (no circles): at the bottom, importing nothing of the crate but
//! each other, `state_file` (the one atomic writer), `trusted_dir` (the directories it writes
//! in), `capped_read` (size-capped reads) and `admission` (connection caps); then `config` (its
//! overlay is stored with it) <- `datapath` <- `check`, `adaptive`,
//! `stats` <- `snapshot`, `metrics`; `metrics` and `check` <- `limits` (the policy store) <-
//! `api` <- `agent`; `cli` (the command-line client) uses `api`'s socket path, `stats` and
//! `proto`. `cluster` (the cluster's pure algorithms: shares, leases, owners) imports nothing
//! of the crate.
pub mod adaptive;
pub mod admission;
pub mod agent;
pub mod api;
pub mod capped_read;
pub mod certificate;
pub mod check;
pub mod cli;
pub mod cluster;
pub mod config;
pub mod datapath;
pub mod duration;
pub mod limits;
pub mod metrics;
pub mod proto;
pub mod rls;
pub mod snapshot;
pub mod state_file;
pub mod stats;
pub mod trusted_dir;

/// `e` and its causes (its `source` chain), `: `-joined: how an error is shown where only a
/// string goes (a gRPC status, a log line, a reason kept for later), so no cause is lost. The
/// variants of the crate's error enums name their cause through `#[source]` and leave it out of
/// their own message, so nothing is shown twice.
pub fn error_chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut text = e.to_string();
    let mut cause = e.source();
    while let Some(c) = cause {
        text.push_str(": ");
        text.push_str(&c.to_string());
        cause = c.source();
    }
    text
}
