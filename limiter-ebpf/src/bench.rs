//! Benchmark-only programs and their map, built only with the `bench` feature: limiter-user's
//! build.rs builds them into a second object (`limiter_user::ebpf::BENCH_OBJECT`, behind its own
//! `bench` feature) for xdp-bench, adapt-bench and the tests, so that the object the agent loads
//! carries none of them.

use aya_ebpf::{
    bindings::xdp_action, macros::map, macros::xdp, maps::PerCpuArray, programs::XdpContext,
};
use limiter_common::addr::v4_mapped;

use crate::{
    fast_path::{stats, try_limiter},
    parse::{Frame, parse},
};

/// Per-CPU sequence from which `limiter_bench_cycle` derives source addresses.
#[map]
static BENCH_SEQ: PerCpuArray<u64> = PerCpuArray::with_max_entries(1, 0);

/// Distinct sources `limiter_bench_cycle` cycles through.
const BENCH_CLIENTS: u64 = 1_000_000;

/// Benchmark baseline: the same parse and global counter as `limiter`, then XDP_PASS.
#[xdp]
pub fn limiter_baseline(ctx: XdpContext) -> u32 {
    try_baseline(&ctx).unwrap_or(xdp_action::XDP_PASS)
}

/// Benchmark variant: the real decision path, but the source address comes from a per-CPU
/// counter cycling through `BENCH_CLIENTS` addresses, so one BPF_PROG_TEST_RUN call exercises a
/// million resident clients. Never attached by the agent.
#[xdp]
pub fn limiter_bench_cycle(ctx: XdpContext) -> u32 {
    let seq = match BENCH_SEQ.get_ptr_mut(0) {
        Some(p) => p,
        None => return xdp_action::XDP_PASS,
    };
    // SAFETY: per-CPU value, valid for the program's run; XDP does not nest on a CPU.
    let n = unsafe {
        let n = *seq;
        *seq = n + 1;
        n % BENCH_CLIENTS
    };
    let key = v4_mapped([10, (n >> 16) as u8, (n >> 8) as u8, n as u8]);
    try_limiter(&ctx, Some(key)).unwrap_or(xdp_action::XDP_PASS)
}

#[inline(always)]
fn try_baseline(ctx: &XdpContext) -> Option<u32> {
    let stats = stats()?;
    match parse(ctx) {
        // Always adds 1; reading the key keeps the compiler from dropping the address parse.
        Frame::Ip(key) => stats.passed += (key[15] != 0xff) as u64 | 1,
        Frame::NonIp => stats.non_ip += 1,
        Frame::Malformed => stats.malformed += 1,
    }
    Some(xdp_action::XDP_PASS)
}
