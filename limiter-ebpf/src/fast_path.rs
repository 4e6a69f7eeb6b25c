//! Maps and XDP entry points.
//!
//! Per packet the hot path touches: `STATS` and `CONFIG` (one-entry arrays, which the verifier
//! inlines to a pointer computation and which stay cache-hot), and `CLIENTS` (the one access that
//! can miss the cache). The LPM trie `POLICIES` is walked only on a client's first packet or
//! after the agent bumps the policy generation; the resolved policy is cached in the client's
//! entry. Clients with an exact-address policy live in `STATIC_CLIENTS`, a plain hash that LRU
//! eviction never touches, so a flood of spoofed sources cannot evict them; they cost one extra
//! lookup (a miss in `CLIENTS`).
//!
//! Maps are declared unpinned: the agent pins them under `/sys/fs/bpf/limiter/IFACE/` (and adopts
//! existing pins), while tests and benchmarks load private copies.

use core::{
    intrinsics::{AtomicOrdering, atomic_cxchg, atomic_xadd},
    num::NonZeroU64,
};

use aya_ebpf::{
    bindings::{BPF_NOEXIST, xdp_action},
    helpers::generated::{bpf_jiffies64, bpf_ktime_get_coarse_ns, bpf_ktime_get_ns},
    macros::{map, xdp},
    maps::{Array, HashMap, LpmTrie, LruHashMap, PerCpuArray, lpm_trie::Key},
    programs::XdpContext,
};
use limiter_common::{
    ClientState, Config, GlobalStats, Policy,
    addr::{ClientKey, PolicyKey, policy_key, v4_mapped},
    maps::{ACTION_DROP, ACTION_PASS, MODE_DRY_RUN},
    window::{COARSE_CLOCK_MIN_WINDOW_US, Verdict, decide, slot_count},
};

use crate::parse::{Frame, parse};

/// Dynamic clients (default or prefix policies). The agent sets the real size at load time
/// (`--max-clients`); LRU eviction bounds memory.
#[map]
static CLIENTS: LruHashMap<ClientKey, ClientState> = LruHashMap::with_max_entries(1 << 20, 0);

/// Clients named by an exact-address policy, created by the agent; never evicted.
#[map]
static STATIC_CLIENTS: HashMap<ClientKey, ClientState> = HashMap::with_max_entries(1 << 16, 0);

/// Policies by prefix, keyed by family byte + address (`limiter_common::addr::PolicyKey`);
/// `default` is the bare family entry of each family.
#[map]
static POLICIES: LpmTrie<PolicyKey, Policy> = LpmTrie::with_max_entries(1 << 17, 0);

#[map]
static CONFIG: Array<Config> = Array::with_max_entries(1, 0);

#[map]
static STATS: PerCpuArray<GlobalStats> = PerCpuArray::with_max_entries(1, 0);

/// Shared budget for packets whose client entry could not be created (see `GlobalStats::map_full`).
#[map]
static OVERFLOW: Array<ClientState> = Array::with_max_entries(1, 0);

/// The layout version of these maps (`limiter_common::maps::LAYOUT_VERSION`), written by the
/// agent and pinned with them; never read here.
#[map]
static LAYOUT: Array<u32> = Array::with_max_entries(1, 0);

/// Per-CPU cache of the coarse clock: its value and the jiffy it was read in (see `coarse_now`).
#[map]
static COARSE_CLOCK: PerCpuArray<[u64; 2]> = PerCpuArray::with_max_entries(1, 0);

/// Bench-only: per-CPU sequence from which `limiter_bench_cycle` derives source addresses.
#[map]
static BENCH_SEQ: PerCpuArray<u64> = PerCpuArray::with_max_entries(1, 0);

/// Compare-and-swap attempts before a packet is denied as contended. Each failure means another
/// CPU admitted a packet of the same client in between, so this bound is only reached under
/// heavy same-client contention; denying then keeps the limit exact.
const CAS_RETRIES: usize = 8;

/// Distinct sources `limiter_bench_cycle` cycles through.
const BENCH_CLIENTS: u64 = 1_000_000;

#[xdp]
pub fn limiter(ctx: XdpContext) -> u32 {
    try_limiter(&ctx, None).unwrap_or(xdp_action::XDP_PASS)
}

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
fn stats() -> Option<&'static mut GlobalStats> {
    // SAFETY: per-CPU value; XDP runs in softirq context and does not nest on a CPU, so this
    // CPU's copy has no concurrent writer.
    STATS.get_ptr_mut(0).map(|p| unsafe { &mut *p })
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

#[inline(always)]
fn try_limiter(ctx: &XdpContext, bench_key: Option<ClientKey>) -> Option<u32> {
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

/// The client's entry, created on its first packet. Returns `None` only if the policy table has
/// no match (the agent always installs a default for each family).
#[inline(always)]
fn client_entry(
    key: &ClientKey,
    config: &Config,
    stats: &mut GlobalStats,
) -> Option<*mut ClientState> {
    if let Some(p) = CLIENTS.get_ptr_mut(key) {
        return Some(p);
    }
    if let Some(p) = STATIC_CLIENTS.get_ptr_mut(key) {
        return Some(p);
    }
    let policy = resolve(key, stats)?;
    let fresh = ClientState {
        limit: policy.limit,
        window_us: policy.window_us,
        generation: config.generation,
        policy: policy.id,
        action: policy.action,
        ..ClientState::default()
    };
    // EEXIST: another CPU created it first, which is fine. Any other error: the map could not
    // take the entry; charge the shared overflow budget rather than letting the client through.
    let created = CLIENTS.insert(key, &fresh, BPF_NOEXIST as u64).is_ok();
    if let Some(p) = CLIENTS.get_ptr_mut(key) {
        if created {
            stats.new_clients += 1;
        }
        return Some(p);
    }
    stats.map_full += 1;
    let overflow = OVERFLOW.get_ptr_mut(0)?;
    // SAFETY: array value, valid for the program's run. Racy plain stores of the same policy
    // values from several CPUs are benign; the slots themselves are only changed by CAS.
    unsafe {
        if (*overflow).window_us != policy.window_us {
            clear_slots(overflow);
        }
        (*overflow).limit = policy.limit;
        (*overflow).window_us = policy.window_us;
        (*overflow).action = policy.action;
        (*overflow).generation = config.generation;
    }
    Some(overflow)
}

#[inline(always)]
fn resolve(key: &ClientKey, stats: &mut GlobalStats) -> Option<Policy> {
    stats.resolves += 1;
    let (prefix_len, data) = policy_key(key);
    POLICIES.get(Key::new(prefix_len, data)).copied()
}

/// Admits or denies one packet for `key`, counting it in the client's entry.
#[inline(always)]
fn decide_client(key: &ClientKey, config: &Config, stats: &mut GlobalStats) -> bool {
    let Some(state) = client_entry(key, config, stats) else {
        return true;
    };
    // SAFETY: `state` points at a live map value for the duration of this program run (map
    // values are RCU-protected while the program runs). Shared fields are changed only through
    // atomics; the cached policy fields are rewritten in place with the same values by any CPU
    // that sees a stale generation, which is benign.
    unsafe {
        if (*state).generation != config.generation {
            if let Some(policy) = resolve(key, stats) {
                if policy.window_us != (*state).window_us {
                    // Window tags of another window length mean nothing: start afresh.
                    clear_slots(state);
                }
                (*state).limit = policy.limit;
                (*state).window_us = policy.window_us;
                (*state).policy = policy.id;
                (*state).action = policy.action;
            }
            (*state).generation = config.generation;
        }
        let admitted = match (*state).action {
            ACTION_PASS => {
                atomic_xadd::<u64, u64, { AtomicOrdering::Relaxed }>(&raw mut (*state).passed, 1);
                true
            }
            ACTION_DROP => false,
            // Admitted packets are counted by the window slots (see `ClientState::passed`).
            _ => admit(state, stats),
        };
        if !admitted {
            atomic_xadd::<u64, u64, { AtomicOrdering::Relaxed }>(&raw mut (*state).dropped, 1);
        }
        admitted
    }
}

/// The sliding-window decision with a bounded CAS loop.
///
/// # Safety
/// `state` points at a live map value.
#[inline(always)]
unsafe fn admit(state: *mut ClientState, stats: &mut GlobalStats) -> bool {
    let window_us = unsafe { (*state).window_us };
    let limit = unsafe { (*state).limit };
    // Policies always have a window of at least 10 ms; a zero here would be a corrupt entry.
    let Some(window_ns) = NonZeroU64::new(window_us as u64 * 1000) else {
        return false;
    };
    // SAFETY: plain helper calls.
    let now = unsafe {
        if window_us >= COARSE_CLOCK_MIN_WINDOW_US {
            coarse_now()
        } else {
            bpf_ktime_get_ns()
        }
    };
    let slots = unsafe { &raw mut (*state).slots };
    for _ in 0..CAS_RETRIES {
        // SAFETY: volatile reads of the live slots; another CPU may change them at any time,
        // which the CAS below detects.
        let current = unsafe {
            [
                core::ptr::read_volatile(&raw const (*slots)[0]),
                core::ptr::read_volatile(&raw const (*slots)[1]),
            ]
        };
        match decide(&current, now, window_ns, limit, 1) {
            Verdict::Deny => return false,
            Verdict::Admit {
                slot,
                old,
                new,
                fold,
            } => {
                // SAFETY: `slot` is 0 or 1, inside the live slots array.
                let (_, swapped) = unsafe {
                    atomic_cxchg::<u64, { AtomicOrdering::SeqCst }, { AtomicOrdering::SeqCst }>(
                        (&raw mut (*slots)[slot & 1]).cast(),
                        old,
                        new,
                    )
                };
                if swapped {
                    if fold != 0 {
                        // SAFETY: live map value; only the CAS winner folds this slot's count.
                        unsafe {
                            atomic_xadd::<u64, u64, { AtomicOrdering::Relaxed }>(
                                &raw mut (*state).passed,
                                fold as u64,
                            )
                        };
                    }
                    return true;
                }
            }
        }
    }
    stats.contended += 1;
    false
}

/// Empties both window slots, folding their counts into `passed` (each slot by CAS, so a packet
/// admitted concurrently is either folded or kept, never lost).
///
/// # Safety
/// `state` points at a live map value.
#[inline(always)]
unsafe fn clear_slots(state: *mut ClientState) {
    for i in 0..2 {
        for _ in 0..CAS_RETRIES {
            // SAFETY: live map value, `i < 2`.
            let (old, swapped) = unsafe {
                let slot = &raw mut (*state).slots[i];
                let old = core::ptr::read_volatile(slot);
                atomic_cxchg::<u64, { AtomicOrdering::SeqCst }, { AtomicOrdering::SeqCst }>(
                    slot, old, 0,
                )
            };
            if swapped {
                let count = slot_count(old) as u64;
                if count != 0 {
                    // SAFETY: live map value.
                    unsafe {
                        atomic_xadd::<u64, u64, { AtomicOrdering::Relaxed }>(
                            &raw mut (*state).passed,
                            count,
                        )
                    };
                }
                break;
            }
        }
    }
}

/// CLOCK_MONOTONIC_COARSE, read once per jiffy per CPU.
///
/// The coarse clock only moves on the timer tick, so within one jiffy every read returns the
/// same value; the verifier inlines `bpf_jiffies64` to a load, while `bpf_ktime_get_coarse_ns`
/// is a real call (~15 ns in this VM). At a tick the cached value can be one jiffy older than a
/// fresh read would be, so the result is at most two jiffies behind real time, against one for
/// the helper itself.
#[inline(always)]
fn coarse_now() -> u64 {
    // SAFETY: helper calls; the per-CPU value has no concurrent writer (XDP does not nest).
    unsafe {
        let jiffies = bpf_jiffies64();
        let Some(cache) = COARSE_CLOCK.get_ptr_mut(0) else {
            return bpf_ktime_get_coarse_ns();
        };
        if (*cache)[0] == jiffies {
            return (*cache)[1];
        }
        let now = bpf_ktime_get_coarse_ns();
        *cache = [jiffies, now];
        now
    }
}
