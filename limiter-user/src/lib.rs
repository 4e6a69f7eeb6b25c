//! The limiter agent and CLI as a library, so that tests and benchmarks drive the same code.
pub mod ebpf;
pub mod datapath;
pub mod policy;
