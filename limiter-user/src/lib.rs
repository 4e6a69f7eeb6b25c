//! The limiter agent and CLI as a library, so that tests and benchmarks drive the same code.
pub mod ebpf;
pub mod agent;
pub mod datapath;
pub mod policy;
pub mod stats;
pub mod syscall;
