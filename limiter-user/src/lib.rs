//! The limiter agent and CLI as a library, so that tests and benchmarks drive the same code.
pub mod adaptive;
pub mod agent;
pub mod datapath;
pub mod ebpf;
pub mod netlink;
pub mod policy;
pub mod proto;
pub mod snapshot;
pub mod stats;
pub mod syscall;
