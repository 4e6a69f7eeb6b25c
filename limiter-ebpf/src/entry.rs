//! A client's entry (`ClientState`) and the decisions on it, shared by the three programs
//! (`limiter`, `limiter_check`, `limiter_adapt`): finding or creating it (or charging the shared
//! overflow budget when it cannot be created), resolving and refreshing its cached policy,
//! admitting hits with a bounded compare-and-swap loop, rescaling its window, and the clocks the
//! decisions read.

use core::{
    intrinsics::{AtomicOrdering, atomic_cxchg, atomic_xadd, atomic_xchg},
    num::NonZeroU64,
};

use aya_ebpf::{
    bindings::BPF_NOEXIST,
    helpers::generated::{bpf_jiffies64, bpf_ktime_get_coarse_ns, bpf_ktime_get_ns},
    maps::lpm_trie::Key,
};
use limiter_common::{
    ClientState, GlobalStats, Grant, MapConfig, Policy,
    addr::{ClientKey, as_v4, keyed_by, set_group_key, set_policy_key_of},
    maps::{
        ACTION_DROP, ACTION_LIMIT, ACTION_PASS, CONFIG_NO_STATIC, COUNTER_BITS, COUNTER_MASK,
        META_FLAG, META_MASK, crosses_hot, generation_tag, is_global,
    },
    window::{
        COARSE_CLOCK_MIN_WINDOW_US, MIN_WINDOW_US, Verdict, decide, rescale, slot_count, slot_tag,
    },
};

use crate::{
    counter::{CAS_RETRIES, add_passed, add_up, set_meta},
    events::{self, Event},
    maps::{
        CLIENTS, COARSE_CLOCK, GLOBAL_POLICIES, GRANTS, HOT, LIMITED, LIMITED_FULL_UNTIL,
        LOOKUP_HINT, OVERFLOW, POLICIES, STATIC_CLIENTS, STATS,
    },
};

/// How long a CPU tries no move into `LIMITED` after the map refused one (see `hold_limited`).
pub(crate) const LIMITED_FULL_PAUSE_NS: u64 = 10_000_000;

/// `EEXIST` (asm-generic/errno-base.h): `BPF_NOEXIST` found the key already there.
const EEXIST: i32 = 17;
/// `E2BIG` (asm-generic/errno-base.h): a hash map is full.
const E2BIG: i32 = 7;

/// A global client over its limit in a map it never moves out of is reported on `HOT` at its
/// first dropped packet and then once per 2^8 (see `report_kept`).
const KEPT_HOT_SHIFT: u32 = 8;

/// How far the fast path's cached coarse clock can lag `bpf_ktime_get_coarse_ns`, bounded: two
/// jiffies are 8 ms at HZ=250 (see `coarse_now`).
const COARSE_LAG_NS: u64 = 10_000_000;

/// Which map a client's entry lives in.
#[derive(Clone, Copy, PartialEq, Eq)]
pub(crate) enum Home {
    /// `CLIENTS`, the LRU map of dynamic clients.
    Clients,
    /// `STATIC_CLIENTS` or `LIMITED`: never evicted.
    Kept,
    /// The shared `OVERFLOW` budget (no entry could be created).
    Overflow,
}

/// Where an address's client is, as far as a lookup can tell.
pub(crate) enum Located {
    /// Its entry, current with the policy generation, where it lives, and its key (the address's
    /// own, or its group's).
    Found(*mut ClientState, Home, ClientKey),
    /// No entry: the policy it resolves to and the key its entry would have.
    Missing(Policy, ClientKey),
}

/// The entry of the client `addr` belongs to, brought up to the current policy generation;
/// `None` only if the policy table has no match (the agent always installs a default for each
/// family).
///
/// A client is keyed by its address or by its group's key (`addr::group_key`), which depends on
/// its policy. The first lookup uses the family's usual grouping (`MapConfig::fast_group`):
/// `CLIENTS` (a passing client's one lookup), then `STATIC_CLIENTS` unless the agent says it is
/// empty (`CONFIG_NO_STATIC`), then `LIMITED`; or `LIMITED` first on a CPU whose last packet's
/// client was there (see [`find_packet`]: a flood's dropped packets pay one lookup, not two
/// misses before it). An entry found there
/// that is current is this address's: the agent marks every group a longer policy splits, so
/// the fast key names exactly one policy's group. Otherwise the policy trie decides the key,
/// and a stale entry under it takes the policy just resolved.
#[inline(always)]
pub(crate) fn locate(
    addr: &ClientKey,
    config: &MapConfig,
    stats: &mut GlobalStats,
) -> Option<Located> {
    let mut fast = [0u8; 16];
    set_group_key(addr, fast_group(addr, config), &mut fast);
    let found = find_packet(&fast, config);
    if let Some((p, home)) = found {
        // SAFETY: a live map value.
        if unsafe { (*p).is_current(config.generation) } {
            return Some(Located::Found(p, home, fast));
        }
    }
    // An exact-address policy's client is keyed by its address in `STATIC_CLIENTS`, whatever
    // the family groups by: found there, and current, it needs no trie lookup (an IPv6
    // allow-listed host is the common case).
    if fast != *addr
        && has_statics(config)
        && let Some(p) = STATIC_CLIENTS.get_ptr_mut(addr)
        // SAFETY: a live map value.
        && unsafe { (*p).is_current(config.generation) }
    {
        return Some(Located::Found(p, Home::Kept, *addr));
    }
    let policy = resolve(addr, stats)?;
    let mut key = [0u8; 16];
    set_group_key(addr, policy.group, &mut key);
    if key == fast {
        // The fast lookup was this key's: no second one.
        return Some(match found {
            Some((p, home)) => {
                // SAFETY: a live map value.
                unsafe { refresh_with(p, &policy, config) };
                Located::Found(p, home, key)
            }
            None => Located::Missing(policy, key),
        });
    }
    if let Some((p, home)) = found {
        // A stale entry under the fast key that this address's policy does not key it by: a
        // reload changed the grouping there, and no address resolves to it any more.
        // SAFETY: a live map value.
        unsafe { orphan(p, home, &fast) };
    }
    found_or_missing(key, policy, config)
}

/// [`locate`] without the first lookup under the fast key: the policy trie decides the key.
/// The agent's checks take this path: one lookup path instead of two keeps the check program's
/// callback small for the verifier (an API check pays a trie lookup, which a packet avoids).
#[inline(always)]
pub(crate) fn locate_resolved(
    addr: &ClientKey,
    config: &MapConfig,
    stats: &mut GlobalStats,
) -> Option<Located> {
    let policy = resolve(addr, stats)?;
    let mut key = [0u8; 16];
    set_group_key(addr, policy.group, &mut key);
    found_or_missing(key, policy, config)
}

#[inline(always)]
fn found_or_missing(key: ClientKey, policy: Policy, config: &MapConfig) -> Option<Located> {
    match find(&key, config) {
        Some((p, home)) => {
            // SAFETY: a live map value.
            unsafe { refresh_with(p, &policy, config) };
            Some(Located::Found(p, home, key))
        }
        None => Some(Located::Missing(policy, key)),
    }
}

/// Retires an entry no address resolves to any more (see [`refresh_keyed`]): deleted from
/// `CLIENTS` or `LIMITED`, so packets stop finding it and it stops taking room. Its generation
/// tag is also set to 0, which no generation uses, so that an entry that stays (in
/// `STATIC_CLIENTS`, which the agent manages) never reads as current again (a tag would alias
/// the current one 2^15 generations later).
///
/// # Safety
/// `state` points at the live map value of `key` in `home`.
#[inline(always)]
unsafe fn orphan(state: *mut ClientState, home: Home, key: &ClientKey) {
    if home == Home::Clients {
        let _ = CLIENTS.remove(key);
    } else if LIMITED.remove(key).is_err() {
        // Not in `LIMITED`, so in `STATIC_CLIENTS`: it stays. (A deleted value is not written:
        // the preallocated map may already have given its slot to another client.)
        // SAFETY: the function's contract.
        unsafe { set_meta(&raw mut (*state).passed, 0) };
    }
}

/// The `Policy::group` the fast path tries first for `addr`'s family.
#[inline(always)]
fn fast_group(addr: &ClientKey, config: &MapConfig) -> u8 {
    if as_v4(addr).is_some() {
        config.fast_group[0]
    } else {
        config.fast_group[1]
    }
}

/// Whether `STATIC_CLIENTS` may hold entries (see `CONFIG_NO_STATIC`).
#[inline(always)]
fn has_statics(config: &MapConfig) -> bool {
    config.flags & CONFIG_NO_STATIC == 0
}

/// The entry under `key` in whichever map holds it (`STATIC_CLIENTS` only while `config` says
/// it may hold any).
#[inline(always)]
fn find(key: &ClientKey, config: &MapConfig) -> Option<(*mut ClientState, Home)> {
    if let Some(p) = CLIENTS.get_ptr_mut(key) {
        return Some((p, Home::Clients));
    }
    if has_statics(config)
        && let Some(p) = STATIC_CLIENTS.get_ptr_mut(key)
    {
        return Some((p, Home::Kept));
    }
    LIMITED.get_ptr_mut(key).map(|p| (p, Home::Kept))
}

/// [`find`] for a packet's first lookup, in the order this CPU's last packet suggests
/// (`LOOKUP_HINT`): after a packet whose client was in `LIMITED`, `LIMITED` first. A CPU busy
/// dropping a flood's packets then pays one lookup per held client instead of a miss in
/// `CLIENTS` (a cache miss in its bucket array once the flood has many sources), and one in
/// `STATIC_CLIENTS` unless it is empty, before it; a CPU passing packets keeps the order in which
/// a passing client costs one lookup. A wrong hint costs what the order without the hint costs,
/// except for a client outside `LIMITED` after a held one: one lookup more (a miss in `LIMITED`).
///
/// Moves between the maps copy before they delete: the program copies a client into `LIMITED`
/// before it deletes it from `CLIENTS` ([`hold_limited`]), the agent's sweep copies a released
/// one back into `CLIENTS` before it deletes it from `LIMITED`, and a config apply copies a newly
/// exact-address client into `STATIC_CLIENTS` before it deletes it from `LIMITED` and `CLIENTS`.
/// - `LIMITED` first, a move into it could fall between the first lookup and the one in
///   `CLIENTS`, and both miss: a complete miss looks in `LIMITED` once more before the packet
///   creates an entry (a sweep between those two lookups put the client back into `CLIENTS`,
///   where `create_entry`'s `BPF_NOEXIST` insert finds it).
/// - `LIMITED` first, a packet between the sweep's (or the apply's) copy and its delete from
///   `LIMITED` counts in the copy the delete drops. The sweep releases only entries with nothing
///   to protect (a `limit` client whose windows count nothing, or a client whose policy no longer
///   limits it), and both orders already lose a hit that lands between the agent's read of the
///   entry and its copy: this stretches that window to the delete, a few microseconds.
/// - `CLIENTS` first, the mirror cases: a hit on the `CLIENTS` entry between the program's copy
///   into `LIMITED` and its delete is not carried over ([`hold_limited`]); a packet that misses
///   `CLIENTS` before the sweep's copy and `LIMITED` after its delete creates an entry, which
///   finds the sweep's copy instead.
#[inline(always)]
fn find_packet(key: &ClientKey, config: &MapConfig) -> Option<(*mut ClientState, Home)> {
    let hint = LOOKUP_HINT.get_ptr_mut(0);
    // SAFETY: this CPU's value of a live map, used by packets only (XDP does not nest on a CPU).
    let limited_first = hint.is_some_and(|h| unsafe { *h } != 0);
    let limited = || LIMITED.get_ptr_mut(key).map(|p| (p, Home::Kept, true));
    // `find`'s order; after `LIMITED` first, its last lookup is the re-check.
    let in_order = || {
        CLIENTS
            .get_ptr_mut(key)
            .map(|p| (p, Home::Clients, false))
            .or_else(|| {
                has_statics(config)
                    .then(|| STATIC_CLIENTS.get_ptr_mut(key))
                    .flatten()
                    .map(|p| (p, Home::Kept, false))
            })
            .or_else(limited)
    };
    let found = if limited_first {
        limited().or_else(in_order)
    } else {
        in_order()
    };
    let in_limited = found.is_some_and(|(_, _, l)| l);
    if let Some(h) = hint
        && limited_first != in_limited
    {
        // SAFETY: as above.
        unsafe { *h = u64::from(in_limited) };
    }
    found.map(|(p, home, _)| (p, home))
}

/// The client's entry (see [`locate`]), created on its first packet, where it lives, and its
/// key.
#[inline(always)]
pub(crate) fn client_entry(
    addr: &ClientKey,
    config: &MapConfig,
    stats: &mut GlobalStats,
    run: Run,
) -> Option<(*mut ClientState, Home, ClientKey)> {
    match locate(addr, config, stats)? {
        Located::Found(p, home, key) => Some((p, home, key)),
        Located::Missing(policy, key) => {
            let (p, home) = create_entry(&policy, &key, config, stats, run)?;
            Some((p, home, key))
        }
    }
}

/// Creates the entry `key` of a client under `policy` in `CLIENTS`, or, if the map cannot take
/// it, returns the shared overflow budget.
#[inline(always)]
pub(crate) fn create_entry(
    policy: &Policy,
    key: &ClientKey,
    config: &MapConfig,
    stats: &mut GlobalStats,
    run: Run,
) -> Option<(*mut ClientState, Home)> {
    let fresh = ClientState::fresh(policy, config.generation);
    // EEXIST: another CPU created it first, which is fine. Any other error: the map could not
    // take the entry; charge the shared overflow budget rather than letting the client through.
    let created = CLIENTS.insert(key, &fresh, BPF_NOEXIST as u64).is_ok();
    if let Some(p) = CLIENTS.get_ptr_mut(key) {
        if created {
            stats.new_clients += 1;
        }
        return Some((p, Home::Clients));
    }
    overflow_entry(policy, config.generation, stats, run).map(|p| (p, Home::Overflow))
}

/// An entry by its key (an address's or a group's), in whichever map; `None` if there is none.
#[inline(always)]
pub(crate) fn resident_entry(key: &ClientKey) -> Option<*mut ClientState> {
    if let Some(p) = CLIENTS.get_ptr_mut(key) {
        return Some(p);
    }
    STATIC_CLIENTS
        .get_ptr_mut(key)
        .or_else(|| LIMITED.get_ptr_mut(key))
}

/// Moves a `CLIENTS` entry that was just denied into `LIMITED`, which LRU eviction never
/// touches: a limited client keeps its window state however many new sources arrive after it.
/// Called on denied hits only, so a passing client never pays for it; once moved, the client's
/// later packets find it in `LIMITED`. Only `limit` entries move: a `drop` policy's clients have
/// no window to protect, and must not fill the map. Returns the entry the denied hits are to be
/// counted in: the `LIMITED` one once the client is there, else `state`.
///
/// The entry is copied with `BPF_NOEXIST` before it is deleted from `CLIENTS`, so a packet on
/// another CPU finds it in one map or the other throughout. A denial on the `CLIENTS` entry is
/// counted only after this move (the copy's `EEXIST` tells another CPU that the client moved),
/// so no dropped packet is lost. Only a client denied by its window moves, i.e. one at its
/// limit, so another CPU can admit a hit on the `CLIENTS` entry in the instant between the copy
/// and the delete only as the previous window's weight decays (or for a smaller check than the
/// one denied); such a hit is not carried over. When `LIMITED` is full the client stays in
/// `CLIENTS` and `limited_full` counts the attempt; this CPU then tries no move for
/// [`LIMITED_FULL_PAUSE_NS`] (each denial in the pause counts in `limited_full` too). A refused
/// insert costs a bucket lock and a search of the free lists, on every denied packet of every
/// client that could not be held: under a flood of more sources than `LIMITED` holds, that was
/// most packets (live-bench, 1M sources). Room comes back only when the agent deletes entries
/// (its sweep, once a second, and a reload's orphans), so a client denied in the pause moves at
/// one of its next denials. Packets only: the check program reaches no `CLIENTS` entry here.
///
/// # Safety
/// `state` points at the live `CLIENTS` value of `key`.
#[inline(always)]
unsafe fn hold_limited(
    key: &ClientKey,
    state: *mut ClientState,
    cluster: bool,
    stats: &mut GlobalStats,
) -> *mut ClientState {
    // SAFETY: live map value (the function's contract).
    if unsafe { (*state).action() } != ACTION_LIMIT {
        return state;
    }
    let now = coarse_now();
    let pause = LIMITED_FULL_UNTIL.get_ptr_mut(0);
    // SAFETY: this CPU's value of a live map, used by packets only (XDP does not nest on a CPU).
    if pause.is_some_and(|until| now < unsafe { *until }) {
        stats.limited_full += 1;
        return state;
    }
    // SAFETY: live map value (the function's contract); the copy is read with volatile loads
    // (another CPU may be updating it, which the doc comment above accounts for).
    let copy = unsafe { core::ptr::read_volatile(state) };
    match LIMITED.insert(key, &copy, BPF_NOEXIST as u64) {
        Ok(()) => {
            let _ = CLIENTS.remove(key);
            stats.limited_moves += 1;
            if cluster {
                // Once per move (only the CPU whose copy landed gets here): the agent's cluster
                // enrolment learns of the client.
                report_hot(key, copy.dropped);
            }
        }
        // Another CPU moved it first: its copy is the client's state.
        Err(e) if e == -EEXIST => {
            let _ = CLIENTS.remove(key);
        }
        Err(e) => {
            stats.limited_full += 1;
            // Full (a preallocated hash map refuses with E2BIG, kernel/bpf/hashtab.c
            // `alloc_htab_elem`): pause. Another failure is not a reason to stop trying.
            if e == -E2BIG
                && let Some(until) = pause
            {
                // SAFETY: as above.
                unsafe { *until = now + LIMITED_FULL_PAUSE_NS };
            }
            return state;
        }
    }
    // Gone again only if the agent's sweep deleted it meanwhile: count on the old entry then.
    LIMITED.get_ptr_mut(key).unwrap_or(state)
}

/// The shared budget for a client whose entry could not be created.
#[inline(always)]
pub(crate) fn overflow_entry(
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

/// The policy of an address (its full-length match).
#[inline(always)]
pub(crate) fn resolve(addr: &ClientKey, stats: &mut GlobalStats) -> Option<Policy> {
    // An address key is its own trie lookup.
    resolve_key(addr, stats)
}

/// The policy of an entry's key: an address's, or a group's prefix's (the policy every address
/// of the group resolves to).
#[inline(always)]
pub(crate) fn resolve_key(key: &ClientKey, stats: &mut GlobalStats) -> Option<Policy> {
    stats.resolves += 1;
    // Built in place: `Key` is packed, so its length goes in through a local.
    let mut lookup = Key::new(0, [0u8; 17]);
    let mut len = 0;
    set_policy_key_of(key, &mut len, &mut lookup.data);
    lookup.prefix_len = len;
    POLICIES.get(&lookup).copied()
}

/// Brings a stale entry up to `policy`, resolved at the current generation.
///
/// # Safety
/// `state` points at a live map value. The cached policy fields are rewritten in place with the
/// same values by any CPU that sees a stale generation, which is benign; the slots and counter
/// words are only changed through atomics. The generation tag is written last, and only once
/// the policy is in place, so an entry never looks current with a stale policy.
#[inline(always)]
pub(crate) unsafe fn refresh_with(state: *mut ClientState, policy: &Policy, config: &MapConfig) {
    // SAFETY: `state` points at a live map value (the function's contract), which `set_policy`
    // and `set_meta` are given in turn.
    unsafe {
        if !(*state).is_current(config.generation) && set_policy(state, policy) {
            set_meta(&raw mut (*state).passed, generation_tag(config.generation));
        }
    }
}

/// Brings a stale entry up to `policy`, the trie's match for its key (`resolve_key`), unless
/// that policy would not key it so: a reload changed how its addresses group, no address finds
/// it current any more, and LRU eviction or the `LIMITED` sweep removes it. The agent's adapt
/// requests carry keys, not addresses.
///
/// # Safety
/// `state` points at the live map value of `key`.
#[inline(always)]
pub(crate) unsafe fn refresh_keyed(
    state: *mut ClientState,
    key: &ClientKey,
    policy: &Policy,
    config: &MapConfig,
) {
    // SAFETY: the function's contract.
    unsafe {
        if keyed_by(key, policy.group) {
            refresh_with(state, policy, config);
        } else if !(*state).is_current(config.generation) {
            // Never aliases the current generation (see `orphan`); the LRU or the sweep takes
            // it.
            set_meta(&raw mut (*state).passed, 0);
        }
    }
}

/// Makes `policy` the entry's policy (a no-op when it already is). Returns whether the policy id
/// could be stored (see `set_meta`).
///
/// # Safety
/// `state` points at a live map value.
#[inline(always)]
pub(crate) unsafe fn set_policy(state: *mut ClientState, policy: &Policy) -> bool {
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
        if adapted
            && ((*state).limit, (*state).window_us) != (limit, window_us)
            && limiter_policy_is_global(u64::from(policy.id)) == 0
        {
            // A client the adaptive loop tracks: its entry holds an adapted window and
            // allowance, which a reload returns to the policy's until the loop's next period.
            // Carry the used fraction over, or every reload would hand it a fresh allowance.
            // Not a global client's (the loop tracks those too, for their caps): its window
            // keeps the policy's length, its count is packets its owner counted against a
            // grant, and its limit is the cold share, which a member joining or leaving
            // changes; scaled with it, the count would let the same packets through again.
            rescale_entry(state, limit, window_us);
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

/// Gives a limited entry a new window and allowance, carrying the used fraction of its
/// allowance over (`window::rescale`); see `adapt_one` for the ordering against packets.
///
/// # Safety
/// `state` points at a live map value with a window of at least 10 ms; `window_us` is one too.
#[inline(always)]
pub(crate) unsafe fn rescale_entry(state: *mut ClientState, limit: u32, window_us: u32) {
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

/// Which kind of run a decision is taken in: where its time comes from, and who logs its rare
/// events (see `events`).
#[derive(Clone, Copy, PartialEq, Eq)]
pub(crate) enum Run {
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
pub(crate) struct Outcome {
    pub(crate) admitted: bool,
    /// The time the decision was taken at (0 for `pass` and `drop` clients, which need none).
    pub(crate) now: u64,
    /// The admitted hits started a new window for the client.
    pub(crate) rolled: bool,
    /// The entry the hits were counted in: the one decided on, or for a denial of a `CLIENTS`
    /// entry the `LIMITED` entry the client moved to (see `hold_limited`).
    pub(crate) entry: *mut ClientState,
}

/// Admits or denies `hits` for the entry of `key` found in `home` and counts them; a denied
/// `CLIENTS` entry first moves to `LIMITED` (see `hold_limited`). With `cluster` (the agent set
/// `CONFIG_CLUSTER`) a client with a grant in `GRANTS` is decided with the grant's allowance,
/// and a global client is reported on `HOT` (`report_hot`) when it grows hot: the admission
/// that takes its count in a window to `hot_count` of the share in force (once per window), a
/// move to `LIMITED`, and, paced, the denials of entries that do not move (`report_kept`). API
/// checks are not reported here: `limiter_check` writes the entry's key back into its slot and
/// the agent notes a check that crossed or was denied, so an address or ID only ever checked
/// through the API is enrolled as its packets would be.
///
/// # Safety
/// `state` points at a live map value, the entry of `key` in `home`.
#[inline(always)]
pub(crate) unsafe fn decide_hits(
    key: &ClientKey,
    state: *mut ClientState,
    home: Home,
    hits: u32,
    run: Run,
    cluster: bool,
    stats: &mut GlobalStats,
) -> Outcome {
    // SAFETY: `state` points at a live map value (the function's contract), whose counter words
    // `add_up` and slots `admit` are given.
    unsafe {
        // Denied by the window (not a `drop` policy, not contention): the client is over its
        // limit. Only such a client moves to `LIMITED`: one denied by contention may be well
        // within its limit, and hits other CPUs admit on the old entry while it moves would be
        // lost (see `hold_limited`).
        let mut over_limit = false;
        let mut outcome = match (*state).action() {
            ACTION_PASS => {
                add_up(&raw mut (*state).passed, hits as u64);
                Outcome {
                    admitted: true,
                    now: 0,
                    rolled: false,
                    entry: state,
                }
            }
            ACTION_DROP => Outcome {
                admitted: false,
                now: 0,
                rolled: false,
                entry: state,
            },
            // Admitted packets are counted by the window slots (see `ClientState::passed`).
            _ => {
                let now = now_for((*state).window_us, run);
                // One hash lookup, only on a cluster member: the grants of global clients.
                // The agent replaces an entry whole (a hash map update swaps in a new element),
                // and the value is copied at once.
                let grant = if cluster {
                    GRANTS.get(key).copied()
                } else {
                    None
                };
                // The shared overflow budget is no client's: nothing to report. A check is not
                // watched here: the agent notes it from the reply and the key `limiter_check`
                // writes back (inside a check's many ways to an entry, the verifier would
                // explore the test once for each, past its budget).
                let watch = cluster && home != Home::Overflow && run == Run::Packet;
                let admission = admit(state, stats, hits, now, run, grant, watch);
                if admission.hot {
                    // SAFETY: live map value (the function's contract).
                    report_hot(key, core::ptr::read_volatile(&raw const (*state).dropped));
                }
                over_limit = !admission.admitted && !admission.contended;
                Outcome {
                    admitted: admission.admitted,
                    now,
                    rolled: admission.rolled,
                    entry: state,
                }
            }
        };
        if !outcome.admitted {
            if over_limit && home == Home::Clients {
                outcome.entry = hold_limited(key, state, cluster, stats);
            } else if over_limit && home == Home::Kept && cluster && run == Run::Packet {
                report_kept(key, outcome.entry, hits);
            }
            add_up(&raw mut (*outcome.entry).dropped, hits as u64);
        }
        outcome
    }
}

/// Reports a global client whose packet its window dropped and whose entry does not move into
/// `LIMITED` (the move is what reports a `CLIENTS` entry): an exact-address client
/// (`STATIC_CLIENTS`), and one already in `LIMITED`. Without a flag to spare in the entry, the
/// dropped counter paces it: the first dropped packet, then one report per 2^8, so a notice the
/// ring lost, or a client the agent let go, comes again while the client stays over its limit,
/// and a flood of drops costs the ring one record per 256. Packets only: the agent notes API
/// checks that cross 0.8 or are denied, from the reply and the key `limiter_check` writes
/// back. Called before the hits are added to the counter.
///
/// # Safety
/// `entry` points at a live map value.
#[inline(always)]
unsafe fn report_kept(key: &ClientKey, entry: *mut ClientState, hits: u32) {
    // SAFETY: live map value (the function's contract); a racing add only shifts which denied
    // hit reports.
    let dropped = unsafe { core::ptr::read_volatile(&raw const (*entry).dropped) };
    let before = dropped & COUNTER_MASK;
    let after = before + hits as u64;
    if before == 0 || before >> KEPT_HOT_SHIFT != after >> KEPT_HOT_SHIFT {
        report_hot(key, dropped);
    }
}

/// Reports `key` on `HOT` if its entry, whose `dropped` word (which carries the policy id) is
/// `dropped`, is under a global policy (see [`limiter_report_hot`]). Called only when the client
/// grows hot (see `decide_hits`), never per packet.
#[inline(always)]
pub(crate) fn report_hot(key: &ClientKey, dropped: u64) {
    // SAFETY: 16 bytes of a key, read as two words wherever it lies.
    let words = unsafe {
        let at = key.as_ptr().cast::<u64>();
        [at.read_unaligned(), at.add(1).read_unaligned()]
    };
    limiter_report_hot(words[0], words[1], dropped);
}

/// Whether policy `id` is global (`GLOBAL_POLICIES`): 1 or 0. A global function, as
/// [`limiter_report_hot`] is, so that the map lookup is verified once and not on every path
/// through `set_policy`; called only when a tracked client's entry changes policy limits.
#[unsafe(no_mangle)]
#[inline(never)]
pub extern "C" fn limiter_policy_is_global(id: u64) -> i64 {
    i64::from(
        GLOBAL_POLICIES
            .get(0)
            .is_some_and(|bits| is_global(bits, id as u16)),
    )
}

/// [`report_hot`]'s work, in a global function (`#[no_mangle]`: BTF linkage global), which the
/// verifier checks once, on its own, and at each call only against its signature (scalars: the
/// key's two words and the entry's `dropped` word). Inlined, its map lookup, policy test and
/// ring push were walked again on every path that reaches a report: 802,817 instructions
/// processed for `limiter` on 6.18.44-fc-v1272, against 563,660 with this function (511,724
/// without the 0.8 trigger). Returns 0.
#[unsafe(no_mangle)]
#[inline(never)]
pub extern "C" fn limiter_report_hot(key_lo: u64, key_hi: u64, dropped: u64) -> i64 {
    let policy = ((dropped & META_MASK) >> COUNTER_BITS) as u16;
    if GLOBAL_POLICIES
        .get(0)
        .is_some_and(|bits| is_global(bits, policy))
    {
        // SAFETY: two words are 16 bytes, a key's.
        let key: ClientKey = unsafe { core::mem::transmute([key_lo, key_hi]) };
        // A full ring loses the notice, not the limit: the next window's crossing brings it.
        let _ = HOT.output::<ClientKey>(&key, 0);
    }
    0
}

/// CLOCK_MONOTONIC for a window of `window_us`: coarse for windows of a second or more.
#[inline(always)]
pub(crate) fn now_for(window_us: u32, run: Run) -> u64 {
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

/// What [`admit`] decided.
#[derive(Clone, Copy)]
struct Admission {
    admitted: bool,
    /// Admitting the hits started a new window (the slot changed tag).
    rolled: bool,
    /// Denied only because the slots stayed contended past the retries.
    contended: bool,
    /// Asked for (`watch`): the admission took the window's count from below `hot_count` of the
    /// allowance in force to at or above it. Only the CAS winner that crosses sees it, so it is
    /// true at most once per window per client.
    hot: bool,
}

/// The sliding-window decision for `hits` at `now` with a bounded CAS loop (see [`Admission`]).
/// With `watch` (a cluster member's client) it also says whether the client just grew hot: its
/// count in the current window reached 0.8 of the share in force. The count, not the sliding
/// estimate: it is exact and known here without the previous window's weight, and a client
/// that sends at a steady rate r per window crosses 0.8 in every window where r ≥ 0.8 · share.
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
    grant: Option<Grant>,
    watch: bool,
) -> Admission {
    let done = |admitted, rolled, contended, hot| Admission {
        admitted,
        rolled,
        contended,
        hot,
    };
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
            return done(true, false, false, false);
        };
        // The owner's grant replaces the cold share while its lease runs (a cut for good).
        let limit = match grant {
            Some(g) => g.limit_at(now, limit),
            None => limit,
        };
        match decide(&current, now, window_ns, limit, hits) {
            Verdict::Deny => return done(false, false, false, false),
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
                    let fresh = slot_tag(old) != slot_tag(new);
                    // Only on a cluster member, and without a division: see `crosses_hot`.
                    let hot = watch
                        && crosses_hot(
                            if fresh { 0 } else { slot_count(old) },
                            slot_count(new),
                            limit,
                        );
                    return done(true, fresh || slot_count(old) == 0, false, hot);
                }
            }
        }
    }
    stats.contended += 1;
    if run == Run::Packet && events::sampled(stats.contended) {
        events::log(Event::Contended, stats.contended);
    }
    done(false, false, true, false)
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

/// Adds a check's entry counters to this CPU's `STATS` with atomics: `limiter_check` runs in
/// process context, where a packet's softirq may interrupt it on the same CPU.
#[inline(always)]
pub(crate) fn count_check(counted: &GlobalStats) {
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
            (&raw mut (*stats).limited_moves, counted.limited_moves),
            (&raw mut (*stats).limited_full, counted.limited_full),
        ] {
            if n != 0 {
                atomic_xadd::<u64, u64, { AtomicOrdering::Relaxed }>(field, n);
            }
        }
    }
}
