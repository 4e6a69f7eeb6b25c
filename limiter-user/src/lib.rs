//! The limiter agent and CLI as a library, so that tests and benchmarks drive the same code.
pub mod adaptive;
pub mod agent;
pub mod api;
pub mod check;
pub mod client;
pub mod config_edit;
pub mod datapath;
pub mod ebpf;
pub mod limits;
pub mod load;
pub mod metrics;
pub mod netlink;
pub mod policy;
pub mod proto;
pub mod snapshot;
pub mod stats;
pub mod syscall;
