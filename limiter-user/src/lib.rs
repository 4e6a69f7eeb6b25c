//! The limiter agent and CLI as a library, so that tests and benchmarks drive the same code.
//!
//! Each folder is one concept; see README.md "Architecture" for how they map onto the data flow.
//! Imports point one way only (no circles): `state_file` (the one atomic writer, no crate
//! imports) <- `config` (its overlay is stored with it) <- `datapath` <- `check`, `adaptive`,
//! `stats` <- `snapshot`, `metrics`; `metrics` and `check` <- `limits` (the policy store) <-
//! `api` <- `agent`; `cli` (the command-line client) uses `api`'s socket path, `stats` and
//! `proto`.
pub mod adaptive;
pub mod agent;
pub mod api;
pub mod check;
pub mod cli;
pub mod config;
pub mod datapath;
pub mod limits;
pub mod metrics;
pub mod proto;
pub mod snapshot;
pub mod state_file;
pub mod stats;
