//! Benchmark-only programs and their map, built only with the `bench` feature: limiter-user's
//! build.rs builds them into a second object (`limiter_user::ebpf::BENCH_OBJECT`, behind its own
//! `bench` feature) for xdp-bench, adapt-bench and the tests, so that the object the agent loads
//! carries none of them.
//!
//! The `live_*` programs serve the live-traffic benchmark (tests/src/bench/live.rs): a generator
//! run with BPF_PROG_TEST_RUN's live frames, and receivers to compare limiter's agent with.

use aya_ebpf::{
    bindings::xdp_action,
    helpers::generated::bpf_ktime_get_ns,
    macros::map,
    macros::xdp,
    maps::{Array, HashMap, PerCpuArray},
    programs::XdpContext,
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

/// Live generator settings: index 0 is the number of distinct sources (10.0.0.0 + n).
#[map]
static LIVE_GEN_SOURCES: Array<u32> = Array::with_max_entries(1, 0);

/// Per-CPU sequence of the live generator.
#[map]
static LIVE_GEN_SEQ: PerCpuArray<u64> = PerCpuArray::with_max_entries(1, 0);

/// Live generator, run with BPF_PROG_TEST_RUN and `BPF_F_TEST_XDP_LIVE_FRAMES`: rewrites the
/// IPv4 source of the frame to the next of `LIVE_GEN_SOURCES[0]` addresses from 10.0.0.0 (with a
/// correct header checksum, which the IP stack checks before netfilter) and transmits it.
#[xdp]
pub fn live_gen(ctx: XdpContext) -> u32 {
    try_live_gen(&ctx).unwrap_or(xdp_action::XDP_ABORTED)
}

#[inline(always)]
fn try_live_gen(ctx: &XdpContext) -> Option<u32> {
    let sources = u64::from(*LIVE_GEN_SOURCES.get(0)?);
    if sources == 0 {
        return None;
    }
    let seq = LIVE_GEN_SEQ.get_ptr_mut(0)?;
    // SAFETY: per-CPU value, valid for the program's run; XDP does not nest on a CPU.
    let n = unsafe {
        let n = *seq;
        *seq = n + 1;
        (n % sources) as u32
    };
    let (start, end) = (ctx.data(), ctx.data_end());
    if start + IPV4_AT + 20 > end {
        return None;
    }
    let ip = (start + IPV4_AT) as *mut [u8; 20];
    // SAFETY: the 20 header bytes are inside the frame (checked above).
    let header = unsafe { &mut *ip };
    let src = (0x0a00_0000 | n).to_be_bytes();
    header[12..16].copy_from_slice(&src);
    header[10] = 0;
    header[11] = 0;
    let mut sum = 0u32;
    let mut i = 0;
    while i < 20 {
        sum += u32::from(u16::from_be_bytes([header[i], header[i + 1]]));
        i += 2;
    }
    sum = (sum & 0xffff) + (sum >> 16);
    sum = (sum & 0xffff) + (sum >> 16);
    let check = (!(sum as u16)).to_be_bytes();
    header[10] = check[0];
    header[11] = check[1];
    Some(xdp_action::XDP_TX)
}

/// Where the IPv4 header starts in the live benchmark's untagged Ethernet frames.
const IPV4_AT: usize = 14;

/// The live benchmark's floor: drops every frame.
#[xdp]
pub fn live_drop(_ctx: XdpContext) -> u32 {
    xdp_action::XDP_DROP
}

/// The floor for any per-source program: reads the IPv4 source address (the first touch of the
/// frame's data, which `live_drop` never makes) and drops the frame.
#[xdp]
pub fn live_touch(ctx: XdpContext) -> u32 {
    let (start, end) = (ctx.data(), ctx.data_end());
    if start + IPV4_AT + 20 > end {
        return xdp_action::XDP_PASS;
    }
    // SAFETY: the IPv4 header is inside the frame (checked above); volatile, so the read stays.
    unsafe { core::ptr::read_volatile((start + IPV4_AT + 12) as *const u32) };
    xdp_action::XDP_DROP
}

/// Passes every frame: keeps the receiving veth's NAPI (which needs an XDP program or GRO) for
/// the nftables case.
#[xdp]
pub fn live_pass(_ctx: XdpContext) -> u32 {
    xdp_action::XDP_PASS
}

/// A source's fixed window in `live_counter`.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct LiveWindow {
    start_ns: u64,
    count: u64,
}

/// `live_counter`'s settings: `[limit, window in ns]`.
#[map]
static LIVE_LIMIT: Array<[u64; 2]> = Array::with_max_entries(1, 0);

/// `live_counter`'s windows by IPv4 source; the benchmark sizes it when it loads the object (so
/// that other users of the object do not preallocate a million entries).
#[map]
static LIVE_WINDOWS: HashMap<u32, LiveWindow> = HashMap::with_max_entries(1 << 10, 0);

/// Frames `live_counter` dropped.
#[map]
static LIVE_DROPS: PerCpuArray<u64> = PerCpuArray::with_max_entries(1, 0);

/// The minimal per-source limiter the live benchmark compares limiter with: one hash lookup by
/// IPv4 source, the clock, a compare and an update of a fixed window; everything that is not
/// IPv4 passes.
#[xdp]
pub fn live_counter(ctx: XdpContext) -> u32 {
    try_live_counter(&ctx).unwrap_or(xdp_action::XDP_PASS)
}

#[inline(always)]
fn try_live_counter(ctx: &XdpContext) -> Option<u32> {
    let (start, end) = (ctx.data(), ctx.data_end());
    if start + IPV4_AT + 20 > end {
        return None;
    }
    // SAFETY: the Ethernet and IPv4 headers are inside the frame (checked above).
    let (ethertype, src) = unsafe {
        (
            *((start + 12) as *const [u8; 2]),
            *((start + IPV4_AT + 12) as *const [u8; 4]),
        )
    };
    if ethertype != [0x08, 0x00] {
        return None;
    }
    let [limit, window] = *LIVE_LIMIT.get(0)?;
    let key = u32::from_ne_bytes(src);
    // SAFETY: bpf_ktime_get_ns has no preconditions.
    let now = unsafe { bpf_ktime_get_ns() };
    match LIVE_WINDOWS.get_ptr_mut(&key) {
        Some(w) => {
            // SAFETY: a value of the map, valid for the program's run; races between CPUs only
            // miscount, as in any plain per-source counter.
            let w = unsafe { &mut *w };
            if now.wrapping_sub(w.start_ns) >= window {
                w.start_ns = now;
                w.count = 1;
            } else if w.count >= limit {
                let drops = LIVE_DROPS.get_ptr_mut(0)?;
                // SAFETY: per-CPU value, valid for the program's run.
                unsafe { *drops += 1 };
                return Some(xdp_action::XDP_DROP);
            } else {
                w.count += 1;
            }
        }
        None => {
            let w = LiveWindow {
                start_ns: now,
                count: 1,
            };
            LIVE_WINDOWS.insert(&key, &w, 0).ok()?;
        }
    }
    Some(xdp_action::XDP_PASS)
}
