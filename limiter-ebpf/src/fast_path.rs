//! The packet program `limiter`: parse the frame to its source address, find (or create) the
//! client's entry with one hash lookup, and admit or drop the packet with the sliding-window
//! counter of `limiter-common` (the decision itself, shared with the agent's programs, is in
//! `entry`).
//!
//! Per packet the hot path touches: `STATS`, `CONFIG` and `LOOKUP_HINT` (one-entry arrays, which
//! the verifier inlines to a pointer computation and which stay cache-hot), and `CLIENTS` (the one
//! access that can miss the cache; `LIMITED` instead on a CPU whose last packet's client was
//! held there). The LPM trie `POLICIES` is walked only on a client's first packet or
//! after the agent bumps the policy generation; the resolved policy is cached in the client's
//! entry. Clients with an exact-address policy live in `STATIC_CLIENTS`, a plain hash that LRU
//! eviction never touches, so a flood of spoofed sources cannot evict them; they cost one extra
//! lookup (a miss in `CLIENTS`). A client's first dropped packet moves its entry from `CLIENTS`
//! into `LIMITED`, another never-evicted hash (see `entry::hold_limited`), so a flood of spoofed
//! sources cannot evict a limited client either; its later packets find it there, first on a CPU
//! whose last packet's client was there too (`entry::find_packet`: a flood's dropped packets pay
//! one lookup), else after two misses. The maps are declared in `maps`.

use core::intrinsics::{AtomicOrdering, atomic_or};

use aya_ebpf::{bindings::xdp_action, macros::xdp, programs::XdpContext};
use limiter_common::{
    ClientState, GlobalStats, MapConfig,
    addr::ClientKey,
    maps::{CONFIG_ADAPTIVE, CONFIG_CLUSTER, META_FLAG, MODE_DRY_RUN},
};

use crate::{
    entry::{Run, client_entry, decide_hits},
    maps::{ACTIVE, CONFIG, STATS},
    parse::{Frame, parse},
};

#[xdp]
pub fn limiter(ctx: XdpContext) -> u32 {
    try_limiter(&ctx, None).unwrap_or(xdp_action::XDP_PASS)
}

#[inline(always)]
pub(crate) fn stats() -> Option<&'static mut GlobalStats> {
    // SAFETY: per-CPU value; XDP runs in softirq context and does not nest on a CPU, so this
    // CPU's copy has no concurrent writer.
    STATS.get_ptr_mut(0).map(|p| unsafe { &mut *p })
}

/// The fast path's decision; `bench_key` replaces the frame's source (the benchmark programs, see
/// `bench`).
#[inline(always)]
pub(crate) fn try_limiter(ctx: &XdpContext, bench_key: Option<ClientKey>) -> Option<u32> {
    let stats = stats()?;
    let key = match parse(ctx) {
        Frame::Ip(key) => bench_key.unwrap_or(key),
        Frame::NonIp => {
            stats.non_ip += 1;
            return Some(xdp_action::XDP_PASS);
        }
        Frame::Malformed => {
            stats.malformed += 1;
            return Some(xdp_action::XDP_PASS);
        }
    };
    let config = CONFIG.get(0)?;
    // No policy table loaded yet (the agent writes the generation after the policies): pass.
    if config.generation == 0 {
        stats.passed += 1;
        return Some(xdp_action::XDP_PASS);
    }
    let admitted = decide_client(&key, config, stats);
    if admitted {
        stats.passed += 1;
        Some(xdp_action::XDP_PASS)
    } else {
        stats.dropped += 1;
        if config.mode == MODE_DRY_RUN {
            Some(xdp_action::XDP_PASS)
        } else {
            Some(xdp_action::XDP_DROP)
        }
    }
}

/// Admits or denies one packet from `key`, counting it in its client's entry (its own, or its
/// group's).
#[inline(always)]
fn decide_client(key: &ClientKey, config: &MapConfig, stats: &mut GlobalStats) -> bool {
    let Some((state, home, key)) = client_entry(key, config, stats, Run::Packet) else {
        return true;
    };
    // SAFETY: `state` points at a live map value for the duration of this program run (map
    // values are RCU-protected while the program runs).
    unsafe {
        let cluster = config.flags & CONFIG_CLUSTER != 0;
        let outcome = decide_hits(&key, state, home, 1, Run::Packet, cluster, stats);
        if outcome.rolled && config.flags & CONFIG_ADAPTIVE != 0 {
            report(&key, outcome.entry);
        }
        outcome.admitted
    }
}

/// Offers a client that just started a new window to the agent's adaptive controller, unless it
/// is already tracked. Runs once per window per client at most, off the per-packet path.
///
/// # Safety
/// `state` points at a live map value. The flag is set with an atomic OR after the push: two
/// CPUs may both report the same client (the agent de-duplicates), and a push racing with the
/// agent's release of the same client can at worst leave it unreported until the agent's next
/// start, which adopts every reported entry.
#[inline(always)]
unsafe fn report(key: &ClientKey, state: *mut ClientState) {
    // SAFETY: `state` points at a live map value (the function's contract); the flag is read
    // once and set with an atomic OR, so a concurrent writer of `dropped` loses nothing.
    unsafe {
        if (*state).dropped & META_FLAG == 0 && ACTIVE.output::<ClientKey>(key, 0).is_ok() {
            // FLAG_REPORTED
            atomic_or::<u64, u64, { AtomicOrdering::SeqCst }>(&raw mut (*state).dropped, META_FLAG);
        }
    }
}
