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
//! `limiter_check` is never attached: the agent runs it with BPF_PROG_TEST_RUN on a crafted
//! check frame to decide an API check with the same maps and the same code as the packets, so an
//! address has one budget on the wire and in the API. API IDs that are not addresses live in
//! `NAMED` and `NAMED_STATIC`, the counterparts of `CLIENTS` and `STATIC_CLIENTS`.
//!
//! Maps are declared unpinned: the agent pins them under `/sys/fs/bpf/limiter/IFACE/` (and adopts
//! existing pins), while tests and benchmarks load private copies.

use core::{
    intrinsics::{AtomicOrdering, atomic_and, atomic_cxchg, atomic_or, atomic_xadd, atomic_xchg},
    num::NonZeroU64,
};

use aya_ebpf::{
    bindings::{BPF_NOEXIST, xdp_action},
    helpers::generated::{bpf_jiffies64, bpf_ktime_get_coarse_ns, bpf_ktime_get_ns},
    macros::{map, xdp},
    maps::{Array, HashMap, LpmTrie, LruHashMap, PerCpuArray, RingBuf, lpm_trie::Key},
    programs::XdpContext,
};
use limiter_common::{
    AdaptSlot, AdaptiveStatus, CheckReply, CheckRequest, ClientState, GlobalStats, MapConfig,
    Policy,
    addr::{ClientKey, PolicyKey, policy_key},
    maps::{
        ACTION_DROP, ACTION_LIMIT, ACTION_PASS, ACTIVE_RING_BYTES, ADAPT_APPLIED, ADAPT_BATCH,
        ADAPT_ETHERTYPE, ADAPT_INVALID, ADAPT_NOT_RESIDENT, ADAPT_OFFSET, ADAPT_REFRESH,
        ADAPT_RELEASE, ADAPT_SKIPPED, ADAPT_SLOT_LEN, ADAPT_STALE, ADAPT_UNCHANGED, CHECK_BATCH,
        CHECK_ETHERTYPE, CHECK_NAMED, CHECK_REPLY_OFFSET, CHECK_REQUEST_OFFSET, CHECK_SLOT_LEN,
        CHECK_STATIC, CONFIG_ADAPTIVE, COUNTER_MASK, META_FLAG, MODE_DRY_RUN, VERDICT_ALLOWED,
        VERDICT_NOT_RESIDENT, VERDICT_OVERFLOW, VERDICT_WRITTEN, generation_tag, with_meta,
    },
    window::{
        COARSE_CLOCK_MIN_WINDOW_US, MAX_WINDOW_US, MIN_WINDOW_US, Verdict, decide, rescale,
        slot_count, slot_tag,
    },
};

use crate::{
    events::{self, Event},
    parse::{Frame, parse, ptr_at, read},
};

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

/// API clients named by an ID rather than an address, keyed by the first 16 bytes of the ID's
/// SHA-256 (a collision needs ~2^64 IDs). Sized by the agent (`--max-ids`); LRU like `CLIENTS`.
#[map]
static NAMED: LruHashMap<ClientKey, ClientState> = LruHashMap::with_max_entries(1 << 20, 0);

/// Named clients with an exact-ID policy; never evicted (the counterpart of `STATIC_CLIENTS`).
#[map]
static NAMED_STATIC: HashMap<ClientKey, ClientState> = HashMap::with_max_entries(1 << 16, 0);

#[map]
static CONFIG: Array<MapConfig> = Array::with_max_entries(1, 0);

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

/// Keys of newly active clients, for the agent's adaptive controller (see `FLAG_REPORTED`).
#[map]
static ACTIVE: RingBuf = RingBuf::with_byte_size(ACTIVE_RING_BYTES, 0);

/// The adaptive controller's status for `limiter stats`, written by the agent; never read here.
#[map]
static ADAPTIVE: Array<AdaptiveStatus> = Array::with_max_entries(1, 0);

/// Compare-and-swap attempts before a packet is denied as contended. Each failure means another
/// CPU admitted a packet of the same client in between, so this bound is only reached under
/// heavy same-client contention; denying then keeps the limit exact.
const CAS_RETRIES: usize = 8;

/// Compare-and-swap attempts to set a counter word's metadata (a policy id or generation tag).
/// Only counter updates of the same entry contend; when every attempt fails the entry keeps its
/// stale generation, so the next packet resolves and tries again: nothing is lost.
const META_RETRIES: usize = 4;

/// How far below 2^48 a counter must stay for `add_up` to use a plain atomic add: more than
/// any adds racing with one (2^40 packets within nanoseconds) could cover.
const COUNT_SLACK: u64 = 1 << 40;

/// How far the fast path's cached coarse clock can lag `bpf_ktime_get_coarse_ns`, bounded: two
/// jiffies are 8 ms at HZ=250 (see `coarse_now`).
const COARSE_LAG_NS: u64 = 10_000_000;

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

/// The client's entry, created on its first packet. Returns `None` only if the policy table has
/// no match (the agent always installs a default for each family).
#[inline(always)]
fn client_entry(
    key: &ClientKey,
    config: &MapConfig,
    stats: &mut GlobalStats,
    run: Run,
) -> Option<*mut ClientState> {
    if let Some(p) = CLIENTS.get_ptr_mut(key) {
        return Some(p);
    }
    if let Some(p) = STATIC_CLIENTS.get_ptr_mut(key) {
        return Some(p);
    }
    let policy = resolve(key, stats)?;
    let fresh = ClientState::fresh(&policy, config.generation);
    // EEXIST: another CPU created it first, which is fine. Any other error: the map could not
    // take the entry; charge the shared overflow budget rather than letting the client through.
    let created = CLIENTS.insert(key, &fresh, BPF_NOEXIST as u64).is_ok();
    if let Some(p) = CLIENTS.get_ptr_mut(key) {
        if created {
            stats.new_clients += 1;
        }
        return Some(p);
    }
    overflow_entry(&policy, config.generation, stats, run)
}

/// The shared budget for a client whose entry could not be created.
#[inline(always)]
fn overflow_entry(
    policy: &Policy,
    generation: u32,
    stats: &mut GlobalStats,
    run: Run,
) -> Option<*mut ClientState> {
    stats.map_full += 1;
    if run == Run::Packet && events::sampled(stats.map_full) {
        events::log(Event::MapFull, stats.map_full);
    }
    let overflow = OVERFLOW.get_ptr_mut(0)?;
    let (limit, window_us) = policy.entry_limits();
    // SAFETY: array value, valid for the program's run. Racy plain stores of the same policy
    // values from several CPUs are benign; the slots and counter words are only changed by
    // atomics.
    unsafe {
        if (*overflow).window_us != window_us {
            clear_slots(overflow);
        }
        (*overflow).limit = limit;
        (*overflow).window_us = window_us;
        set_meta(&raw mut (*overflow).dropped, policy.id);
        set_meta(&raw mut (*overflow).passed, generation_tag(generation));
    }
    Some(overflow)
}

/// Runs one API check (see the module docs). The frame carries a `CheckRequest` at
/// `CHECK_REQUEST_OFFSET`; the program writes a `CheckReply` at `CHECK_REPLY_OFFSET` and returns
/// `XDP_PASS`, or `XDP_ABORTED` for a frame that is not a check frame.
#[xdp]
pub fn limiter_check(ctx: XdpContext) -> u32 {
    try_check(&ctx).unwrap_or(xdp_action::XDP_ABORTED)
}

#[inline(always)]
fn try_check(ctx: &XdpContext) -> Option<u32> {
    if read::<u16>(ctx, 12).map(u16::from_be) != Some(CHECK_ETHERTYPE) {
        return None;
    }
    let config = CONFIG.get(0)?;
    // At least one whole slot; then as many as the frame holds, up to CHECK_BATCH, in order.
    ptr_at::<CheckReply>(ctx, CHECK_REPLY_OFFSET)?;
    for i in 0..CHECK_BATCH {
        let offset = CHECK_REQUEST_OFFSET + i * CHECK_SLOT_LEN;
        let Some(request) = read::<CheckRequest>(ctx, offset) else {
            break;
        };
        let Some(reply) = ptr_at::<CheckReply>(ctx, offset + size_of::<CheckRequest>()) else {
            break;
        };
        // Counters go to STATS after each check, so that nothing but the slot index carries
        // from one iteration to the next and the verifier's states stay prunable.
        let mut counted = GlobalStats::default();
        let done = check_one(&request, reply.cast_mut(), config, &mut counted);
        count_check(&counted);
        if done.is_none() {
            break;
        }
    }
    Some(xdp_action::XDP_PASS)
}

/// Decides one check and writes its reply.
#[inline(always)]
fn check_one(
    request: &CheckRequest,
    reply: *mut CheckReply,
    config: &MapConfig,
    counted: &mut GlobalStats,
) -> Option<()> {
    let mut verdict = 0;
    let mut state_ptr = None;
    let mut fresh = None;
    if request.flags & CHECK_NAMED != 0 {
        let static_id = request.flags & CHECK_STATIC != 0;
        // The other map too: while the agent moves an ID between the two (its exact-ID policy
        // was just added or removed) a check may still carry the old flag, and must find the
        // ID's state rather than start it afresh.
        let found = if static_id {
            NAMED_STATIC
                .get_ptr_mut(&request.key)
                .or_else(|| NAMED.get_ptr_mut(&request.key))
        } else {
            NAMED
                .get_ptr_mut(&request.key)
                .or_else(|| NAMED_STATIC.get_ptr_mut(&request.key))
        };
        if let Some(p) = found {
            // SAFETY: live map value; the agent passes the ID's current policy. Should the id not
            // be stored (contended), the next check of the ID stores it.
            unsafe { set_policy(p, &request.policy) };
            state_ptr = Some(p);
        } else if request.hits == 0 {
            fresh = Some(ClientState::fresh(&request.policy, 0));
        } else {
            let mut entry = ClientState::fresh(&request.policy, 0);
            let created = if static_id {
                entry.passed |= META_FLAG; // FLAG_STATIC
                NAMED_STATIC.insert(&request.key, &entry, BPF_NOEXIST as u64)
            } else {
                NAMED.insert(&request.key, &entry, BPF_NOEXIST as u64)
            }
            .is_ok();
            let again = if static_id {
                NAMED_STATIC.get_ptr_mut(&request.key)
            } else {
                NAMED.get_ptr_mut(&request.key)
            };
            if let Some(p) = again {
                counted.new_clients += created as u64;
                state_ptr = Some(p);
            } else {
                verdict |= VERDICT_OVERFLOW;
                state_ptr = overflow_entry(&request.policy, 0, counted, Run::Agent);
            }
        }
    } else if request.hits == 0 {
        match CLIENTS
            .get_ptr_mut(&request.key)
            .or_else(|| STATIC_CLIENTS.get_ptr_mut(&request.key))
        {
            Some(p) => {
                // SAFETY: live map value.
                unsafe { refresh_policy(p, &request.key, config, counted) };
                state_ptr = Some(p);
            }
            None => {
                let policy = resolve(&request.key, counted)?;
                fresh = Some(ClientState::fresh(&policy, config.generation));
            }
        }
    } else {
        let full_before = counted.map_full;
        let p = client_entry(&request.key, config, counted, Run::Agent)?;
        // SAFETY: live map value.
        unsafe { refresh_policy(p, &request.key, config, counted) };
        state_ptr = Some(p);
        if counted.map_full != full_before {
            verdict |= VERDICT_OVERFLOW;
        }
    }
    let mut now = 0;
    let state = match state_ptr {
        Some(p) => {
            if request.hits != 0 {
                // SAFETY: live map value.
                let outcome = unsafe { decide_hits(p, request.hits, Run::Agent, counted) };
                if outcome.admitted {
                    verdict |= VERDICT_ALLOWED;
                }
                now = outcome.now;
            }
            // SAFETY: live map value; a torn read of a slot another CPU is changing is not
            // possible (aligned 8-byte loads), and the copy is only reported.
            unsafe { core::ptr::read_volatile(p) }
        }
        None => {
            verdict |= VERDICT_NOT_RESIDENT;
            fresh?
        }
    };
    if now == 0 {
        now = now_for(state.window_us, Run::Agent);
    }
    // SAFETY: `ptr_at` checked that the reply area lies inside the frame.
    unsafe {
        reply.write_unaligned(CheckReply {
            state,
            now_ns: now,
            verdict: verdict | VERDICT_WRITTEN,
            _pad: 0,
        })
    };
    Some(())
}

/// Applies the adaptive controller's decisions (see the module docs): the frame carries up to
/// `ADAPT_BATCH` [`AdaptSlot`]s from `ADAPT_OFFSET`; each one's `result` is written in place.
/// Returns `XDP_PASS`, or `XDP_ABORTED` for a frame that is not an adapt frame.
#[xdp]
pub fn limiter_adapt(ctx: XdpContext) -> u32 {
    try_adapt(&ctx).unwrap_or(xdp_action::XDP_ABORTED)
}

#[inline(always)]
fn try_adapt(ctx: &XdpContext) -> Option<u32> {
    if read::<u16>(ctx, 12).map(u16::from_be) != Some(ADAPT_ETHERTYPE) {
        return None;
    }
    let config = CONFIG.get(0)?;
    ptr_at::<AdaptSlot>(ctx, ADAPT_OFFSET)?;
    for i in 0..ADAPT_BATCH {
        let Some(slot) = ptr_at::<AdaptSlot>(ctx, ADAPT_OFFSET + i * ADAPT_SLOT_LEN) else {
            break;
        };
        // SAFETY: `ptr_at` checked that the slot lies inside the frame.
        let request = unsafe { slot.read_unaligned() };
        let mut counted = GlobalStats::default();
        let result = adapt_one(&request, config, &mut counted);
        count_check(&counted);
        // SAFETY: as above.
        unsafe { (&raw mut (*slot.cast_mut()).result).write_unaligned(result) };
    }
    Some(xdp_action::XDP_PASS)
}

/// Changes one client's effective window and allowance, keeping the used fraction of its
/// allowance (`window::rescale`).
///
/// Ordering against packets deciding concurrently on other CPUs: the new window and allowance
/// are stored first, then both slots are exchanged atomically for the rescaled ones. A packet in
/// between decides on the new window with the old grid's slots, which read as empty, and counts
/// itself in a fresh slot that the exchange then replaces; a packet between the snapshot and the
/// exchange is likewise left out of the carried estimate. Such packets (a few nanoseconds' worth
/// per change) are forgiven by the estimate, but never lost from the counters: every count the
/// exchange replaces is folded into `passed`. A packet never decides on the new slots with the
/// old window: `admit` reads the window after the slots, on every attempt.
#[inline(always)]
fn adapt_one(request: &AdaptSlot, config: &MapConfig, counted: &mut GlobalStats) -> u32 {
    let Some(state) = CLIENTS
        .get_ptr_mut(&request.key)
        .or_else(|| STATIC_CLIENTS.get_ptr_mut(&request.key))
    else {
        return ADAPT_NOT_RESIDENT;
    };
    // SAFETY: live map value for the duration of this run.
    unsafe {
        refresh_policy(state, &request.key, config, counted);
        if request.flags & ADAPT_REFRESH != 0 {
            // Contended past the retries: the client is busy, and its own packets refresh it.
            return if (*state).is_current(config.generation) {
                ADAPT_UNCHANGED
            } else {
                ADAPT_STALE
            };
        }
        // A release returns the client to the policy it resolves to now, whatever the agent
        // last knew of it (a silent client's cached policy can predate a reload), and always
        // clears the flag, so that the next window reports the client again.
        let (limit, window_us) = if request.flags & ADAPT_RELEASE != 0 {
            atomic_and::<u64, u64, { AtomicOrdering::SeqCst }>(
                &raw mut (*state).dropped,
                !META_FLAG, // FLAG_REPORTED
            );
            let Some(policy) = resolve(&request.key, counted) else {
                return ADAPT_SKIPPED;
            };
            policy.entry_limits()
        } else if request.generation != config.generation {
            return ADAPT_STALE;
        } else {
            (request.limit, request.window_us)
        };
        if (*state).action() != ACTION_LIMIT || limit == 0 || window_us == 0 {
            return ADAPT_SKIPPED;
        }
        if ((*state).limit, (*state).window_us) == (limit, window_us) {
            return ADAPT_UNCHANGED;
        }
        if !(MIN_WINDOW_US..=MAX_WINDOW_US).contains(&window_us) {
            return ADAPT_INVALID;
        }
        rescale_entry(state, limit, window_us);
    }
    ADAPT_APPLIED
}

/// Gives a limited entry a new window and allowance, carrying the used fraction of its
/// allowance over (`window::rescale`); see `adapt_one` for the ordering against packets.
///
/// # Safety
/// `state` points at a live map value with a window of at least 10 ms; `window_us` is one too.
#[inline(always)]
unsafe fn rescale_entry(state: *mut ClientState, limit: u32, window_us: u32) {
    // SAFETY: `state` points at a live map value (the function's contract), valid for the whole
    // run; the slots are only changed by atomics and `add_passed` gets a counter word of it.
    unsafe {
        let (old_limit, old_window_us) = ((*state).limit, (*state).window_us);
        let (Some(old_window), Some(new_window)) = (
            NonZeroU64::new(old_window_us as u64 * 1000),
            NonZeroU64::new(window_us as u64 * 1000),
        ) else {
            return;
        };
        // Packets decide with the clock their window calls for; the coarse one (1 s windows and
        // up) may lag the helper by up to two jiffies (see `coarse_now`): 10 ms covers HZ=250.
        let now = now_for(window_us, Run::Agent);
        let lag_ns = if window_us >= COARSE_CLOCK_MIN_WINDOW_US {
            COARSE_LAG_NS
        } else {
            0
        };
        let slots = &raw mut (*state).slots;
        let snapshot = [
            core::ptr::read_volatile(&raw const (*slots)[0]),
            core::ptr::read_volatile(&raw const (*slots)[1]),
        ];
        let rescaled = rescale(
            &snapshot, now, old_window, old_limit, new_window, limit, lag_ns,
        );
        (*state).limit = limit;
        (*state).window_us = window_us;
        let mut replaced = 0u64;
        for i in 0..2 {
            let old = atomic_xchg::<u64, { AtomicOrdering::SeqCst }>(
                &raw mut (*slots)[i],
                rescaled.slots[i],
            );
            replaced += slot_count(old) as u64;
        }
        // `passed + slots` stays exact: the replaced counts join `passed`, the carried count
        // leaves it (wrapping: see `ClientState::total_passed`).
        add_passed(
            &raw mut (*state).passed,
            replaced.wrapping_sub(rescaled.carried),
        );
    }
}

/// Adds `n` to the 48-bit counter of a counter word (see `ClientState`) that only ever grows:
/// `dropped`, and the `passed` of a `pass` entry, which is never rescaled (a window change to
/// or from `pass` folds the slots back in first, so its `passed` is never below zero).
///
/// A plain atomic add when the counter is at least `COUNT_SLACK` below 2^48: no add racing with
/// it can carry it into the metadata. Otherwise (once per 2^48 packets) the modular add of
/// `add_passed`. The BPF ISA this is built for (v1, aya-build's) has no fetch-and-add, so an add
/// cannot see the value it changed.
///
/// # Safety
/// `word` points at a counter word of a live map value.
#[inline(always)]
unsafe fn add_up(word: *mut u64, n: u64) {
    // SAFETY: `word` points at a counter word of a live map value (the function's contract):
    // aligned, valid for the run, and changed by other CPUs only through atomics.
    unsafe {
        let seen = core::ptr::read_volatile(word) & COUNTER_MASK;
        if seen + n <= COUNTER_MASK - COUNT_SLACK {
            atomic_xadd::<u64, u64, { AtomicOrdering::Relaxed }>(word, n);
        } else {
            add_passed(word, n);
        }
    }
}

/// Adds `delta` (two's complement: it may subtract) to the counter of a limited entry's `passed`
/// word modulo 2^48, by compare-and-swap, keeping the metadata. A rescale can leave that counter
/// "below zero" (see `ClientState::total_passed`) while a fold adds to it, so no plain add is
/// safe there; both are once-per-window events, off the per-packet path.
///
/// # Safety
/// `word` points at a counter word of a live map value.
#[inline(always)]
unsafe fn add_passed(word: *mut u64, delta: u64) {
    // SAFETY: `word` points at a counter word of a live map value (the function's contract):
    // aligned, valid for the run, and changed by other CPUs only through atomics.
    unsafe {
        for _ in 0..CAS_RETRIES {
            let old = core::ptr::read_volatile(word);
            let new = (old & !COUNTER_MASK) | (old.wrapping_add(delta) & COUNTER_MASK);
            let (_, swapped) =
                atomic_cxchg::<u64, { AtomicOrdering::SeqCst }, { AtomicOrdering::SeqCst }>(
                    word, old, new,
                );
            if swapped {
                return;
            }
        }
        // Lost eight races in a row to other writers of this word (folds, rescales and policy
        // refreshes of the same client, a few per window): count it regardless. A carry or
        // borrow can then reach the generation tag, and a tag one ahead would hold the entry's
        // policy until the next refresh (see `GENERATION_SWEEP`); none of this is reachable
        // without such contention.
        atomic_xadd::<u64, u64, { AtomicOrdering::Relaxed }>(word, delta);
    }
}

/// Sets the 15-bit field of a counter word (a policy id or generation tag) by compare-and-swap,
/// so that no concurrent count is lost. Returns whether it now holds `value`.
///
/// # Safety
/// `word` points at a counter word of a live map value.
#[inline(always)]
unsafe fn set_meta(word: *mut u64, value: u16) -> bool {
    for _ in 0..META_RETRIES {
        // SAFETY: see the function's contract.
        let (_, swapped) = unsafe {
            let old = core::ptr::read_volatile(word);
            let new = with_meta(old, value);
            if new == old {
                return true;
            }
            atomic_cxchg::<u64, { AtomicOrdering::SeqCst }, { AtomicOrdering::SeqCst }>(
                word, old, new,
            )
        };
        if swapped {
            return true;
        }
    }
    false
}

/// Adds a check's entry counters to this CPU's `STATS` with atomics: `limiter_check` runs in
/// process context, where a packet's softirq may interrupt it on the same CPU.
#[inline(always)]
fn count_check(counted: &GlobalStats) {
    let Some(stats) = STATS.get_ptr_mut(0) else {
        return;
    };
    // SAFETY: per-CPU value of a live map; only atomic adds, so an interrupting fast-path update
    // of the same copy cannot lose either count.
    unsafe {
        for (field, n) in [
            (&raw mut (*stats).new_clients, counted.new_clients),
            (&raw mut (*stats).map_full, counted.map_full),
            (&raw mut (*stats).resolves, counted.resolves),
            (&raw mut (*stats).contended, counted.contended),
        ] {
            if n != 0 {
                atomic_xadd::<u64, u64, { AtomicOrdering::Relaxed }>(field, n);
            }
        }
    }
}

#[inline(always)]
fn resolve(key: &ClientKey, stats: &mut GlobalStats) -> Option<Policy> {
    stats.resolves += 1;
    let (prefix_len, data) = policy_key(key);
    POLICIES.get(Key::new(prefix_len, data)).copied()
}

/// Admits or denies one packet for `key`, counting it in the client's entry.
#[inline(always)]
fn decide_client(key: &ClientKey, config: &MapConfig, stats: &mut GlobalStats) -> bool {
    let Some(state) = client_entry(key, config, stats, Run::Packet) else {
        return true;
    };
    // SAFETY: `state` points at a live map value for the duration of this program run (map
    // values are RCU-protected while the program runs).
    unsafe {
        refresh_policy(state, key, config, stats);
        let outcome = decide_hits(state, 1, Run::Packet, stats);
        if outcome.rolled && config.flags & CONFIG_ADAPTIVE != 0 {
            report(key, state);
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

/// Re-resolves the cached policy of an entry whose generation is stale.
///
/// # Safety
/// `state` points at a live map value. The cached policy fields are rewritten in place with the
/// same values by any CPU that sees a stale generation, which is benign; the slots and counter
/// words are only changed through atomics. The generation tag is written last, and only once
/// the policy is in place, so an entry never looks current with a stale policy.
#[inline(always)]
unsafe fn refresh_policy(
    state: *mut ClientState,
    key: &ClientKey,
    config: &MapConfig,
    stats: &mut GlobalStats,
) {
    // SAFETY: `state` points at a live map value (the function's contract), which `set_policy`
    // and `set_meta` are given in turn.
    unsafe {
        if !(*state).is_current(config.generation) {
            // No policy at all (the agent always installs a default per family): stay stale, so
            // that the entry takes the first policy that appears.
            let set = match resolve(key, stats) {
                Some(policy) => set_policy(state, &policy),
                None => false,
            };
            if set {
                set_meta(&raw mut (*state).passed, generation_tag(config.generation));
            }
        }
    }
}

/// Makes `policy` the entry's policy (a no-op when it already is). Returns whether the policy id
/// could be stored (see `set_meta`).
///
/// # Safety
/// `state` points at a live map value.
#[inline(always)]
unsafe fn set_policy(state: *mut ClientState, policy: &Policy) -> bool {
    // SAFETY: `state` points at a live map value (the function's contract). The plain stores of
    // the policy's limit and window race only with stores of the same values (see
    // `refresh_policy`); the slots and counter words change only through atomics.
    unsafe {
        let (limit, window_us) = policy.entry_limits();
        let adapted = (*state).dropped & META_FLAG != 0 // FLAG_REPORTED
            && (*state).action() == ACTION_LIMIT
            && limit != 0
            && (*state).window_us >= MIN_WINDOW_US
            && window_us >= MIN_WINDOW_US;
        if adapted {
            // A client the adaptive loop tracks: its entry holds an adapted window and
            // allowance, which a reload returns to the policy's until the loop's next period.
            // Carry the used fraction over, or every reload would hand it a fresh allowance.
            if ((*state).limit, (*state).window_us) != (limit, window_us) {
                rescale_entry(state, limit, window_us);
            }
        } else {
            if window_us != (*state).window_us {
                // Window tags of another window length mean nothing: start afresh.
                clear_slots(state);
            }
            (*state).limit = limit;
            (*state).window_us = window_us;
        }
        set_meta(&raw mut (*state).dropped, policy.id)
    }
}

/// Which kind of run a decision is taken in: where its time comes from, and who logs its rare
/// events (see `events`).
#[derive(Clone, Copy, PartialEq, Eq)]
enum Run {
    /// The fast path (`limiter`): time from the per-CPU coarse-clock cache (see `coarse_now`);
    /// its `stats` are this CPU's `STATS`, so it logs rare events, sampled by their count.
    Packet,
    /// `limiter_check` and `limiter_adapt`, which the agent runs in process context where a
    /// packet's softirq could interrupt them halfway through updating the per-CPU cache: the
    /// clock helpers directly, no cache. Their `stats` are a local tally that `count_check` adds
    /// to `STATS`; they log nothing (see `events`).
    Agent,
}

/// What [`decide_hits`] decided.
#[derive(Clone, Copy)]
struct Outcome {
    admitted: bool,
    /// The time the decision was taken at (0 for `pass` and `drop` clients, which need none).
    now: u64,
    /// The admitted hits started a new window for the client.
    rolled: bool,
}

/// Admits or denies `hits` for the entry and counts them.
///
/// # Safety
/// `state` points at a live map value.
#[inline(always)]
unsafe fn decide_hits(
    state: *mut ClientState,
    hits: u32,
    run: Run,
    stats: &mut GlobalStats,
) -> Outcome {
    // SAFETY: `state` points at a live map value (the function's contract), whose counter words
    // `add_up` and slots `admit` are given.
    unsafe {
        let outcome = match (*state).action() {
            ACTION_PASS => {
                add_up(&raw mut (*state).passed, hits as u64);
                Outcome {
                    admitted: true,
                    now: 0,
                    rolled: false,
                }
            }
            ACTION_DROP => Outcome {
                admitted: false,
                now: 0,
                rolled: false,
            },
            // Admitted packets are counted by the window slots (see `ClientState::passed`).
            _ => {
                let now = now_for((*state).window_us, run);
                let (admitted, rolled) = admit(state, stats, hits, now, run);
                Outcome {
                    admitted,
                    now,
                    rolled,
                }
            }
        };
        if !outcome.admitted {
            add_up(&raw mut (*state).dropped, hits as u64);
        }
        outcome
    }
}

/// CLOCK_MONOTONIC for a window of `window_us`: coarse for windows of a second or more.
#[inline(always)]
fn now_for(window_us: u32, run: Run) -> u64 {
    // SAFETY: plain helper calls.
    unsafe {
        if window_us < COARSE_CLOCK_MIN_WINDOW_US {
            bpf_ktime_get_ns()
        } else if run == Run::Packet {
            coarse_now()
        } else {
            bpf_ktime_get_coarse_ns()
        }
    }
}

/// The sliding-window decision for `hits` at `now` with a bounded CAS loop: whether they were
/// admitted, and whether admitting them started a new window (the slot changed tag).
///
/// # Safety
/// `state` points at a live map value.
#[inline(always)]
unsafe fn admit(
    state: *mut ClientState,
    stats: &mut GlobalStats,
    hits: u32,
    now: u64,
    run: Run,
) -> (bool, bool) {
    // SAFETY: `state` points at a live map value (the function's contract); this only computes
    // the address of its slots.
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
        // Window and allowance after the slots, on every attempt: `limiter_adapt` stores them
        // before it exchanges the slots, so slots on a new window's grid are never decided
        // with the old window (whose grid would read them as empty and start a fresh
        // allowance). Loads keep their order on x86; the exchange is a full barrier.
        // SAFETY: volatile reads of the live entry.
        let (window_us, limit) = unsafe {
            (
                core::ptr::read_volatile(&raw const (*state).window_us),
                core::ptr::read_volatile(&raw const (*state).limit),
            )
        };
        // A zero window is `pass`: the entry's policy changed to it in the meantime. Count the
        // hits as a `pass` entry does.
        let Some(window_ns) = NonZeroU64::new(window_us as u64 * 1000) else {
            // SAFETY: live map value.
            unsafe { add_up(&raw mut (*state).passed, hits as u64) };
            return (true, false);
        };
        match decide(&current, now, window_ns, limit, hits) {
            Verdict::Deny => return (false, false),
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
                        unsafe { add_passed(&raw mut (*state).passed, fold as u64) };
                    }
                    // A new window: the slot changes tag, or was empty (a fresh entry's slots
                    // are zero, tag 0, which is also the current tag while the monotonic
                    // clock is below one window, e.g. a 1 h window in the first hour of boot).
                    return (true, slot_tag(old) != slot_tag(new) || slot_count(old) == 0);
                }
            }
        }
    }
    stats.contended += 1;
    if run == Run::Packet && events::sampled(stats.contended) {
        events::log(Event::Contended, stats.contended);
    }
    (false, false)
}

/// Empties both window slots, folding their counts into `passed` (each slot by CAS, so a packet
/// admitted concurrently is either folded or kept, never lost).
///
/// # Safety
/// `state` points at a live map value.
#[inline(always)]
unsafe fn clear_slots(state: *mut ClientState) {
    let mut folded = 0u64;
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
                folded += slot_count(old) as u64;
                break;
            }
        }
    }
    if folded != 0 {
        // SAFETY: live map value.
        unsafe { add_passed(&raw mut (*state).passed, folded) };
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
