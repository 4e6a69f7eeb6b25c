//! The limiter agent and CLI as a library, so that tests and benchmarks drive the same code.
//!
//! Each folder is one concept; see README.md "Architecture" for how they map onto the data flow.
//! Dependencies only point down this list (no import circles):
//! `config` < `datapath` < `check`, `adaptive`, `stats`, `snapshot` < `metrics` < `limits` <
//! `api` < `agent`; `cli` (the command-line client) sits beside `api` and needs only `proto`.
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
pub mod stats;
