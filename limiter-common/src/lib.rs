//! Types shared by the XDP program (`limiter-ebpf`) and the agent (`limiter-user`), and the
//! rate-limit algorithm as pure functions that both sides call.
//!
//! Everything here is `no_std` and allocation-free so that the eBPF program can use it as is;
//! the host side enables the `user` feature for `aya::Pod` impls.
#![no_std]

pub mod addr;
pub mod maps;
pub mod window;

pub use maps::{
    AdaptRead, AdaptSlot, AdaptiveStatus, CheckReply, CheckRequest, ClientState, GlobalStats,
    Grant, MapConfig, Policy,
};
