//! The adaptive write program. `limiter_adapt` is never attached either: the agent's adaptive
//! controller runs it with BPF_PROG_TEST_RUN on a crafted adapt frame to change resident clients'
//! windows and allowances in place (or release them back to their policy), in the entries the
//! packets decide on.

use core::{
    ffi::c_void,
    intrinsics::{AtomicOrdering, atomic_and},
};

use aya_ebpf::{
    bindings::{xdp_action, xdp_md},
    helpers::generated::bpf_loop,
    macros::xdp,
    programs::XdpContext,
};
use limiter_common::{
    AdaptRead, AdaptSlot, ClientState, GlobalStats, MapConfig,
    maps::{
        ACTION_LIMIT, ADAPT_APPLIED, ADAPT_BATCH, ADAPT_ETHERTYPE, ADAPT_INVALID, ADAPT_KIND_READ,
        ADAPT_KIND_WRITE, ADAPT_NOT_RESIDENT, ADAPT_OFFSET, ADAPT_READ_BATCH, ADAPT_READ_LEN,
        ADAPT_READ_MASK, ADAPT_REFRESH, ADAPT_RELEASE, ADAPT_SKIPPED, ADAPT_SLOT_LEN,
        ADAPT_SLOT_MASK, ADAPT_STALE, ADAPT_UNCHANGED, HOME_CLIENTS, HOME_LIMITED, HOME_NAMED,
        HOME_NAMED_STATIC, HOME_STATIC, META_FLAG,
    },
    window::{MAX_WINDOW_US, MIN_WINDOW_US},
};

use crate::{
    check::stop_or_continue,
    entry::{count_check, refresh_keyed, rescale_entry, resident_entry, resolve_key},
    maps::{CLIENTS, CONFIG, LIMITED, NAMED, NAMED_STATIC, STATIC_CLIENTS},
    parse::{ptr_at, read},
};

/// Applies the adaptive controller's decisions (see the module docs): the frame carries up to
/// `ADAPT_BATCH` [`AdaptSlot`]s from `ADAPT_OFFSET`, each one's `result` written in place; or,
/// marked `ADAPT_KIND_READ`, up to `ADAPT_READ_BATCH` [`AdaptRead`]s, each filled with a copy of
/// its entry. Returns `XDP_PASS`, or `XDP_ABORTED` for a frame that is not an adapt frame.
#[xdp]
pub fn limiter_adapt(ctx: XdpContext) -> u32 {
    try_adapt(&ctx).unwrap_or(xdp_action::XDP_ABORTED)
}

/// The state `bpf_loop` hands each iteration: the program's context (the frame).
#[repr(C)]
struct Slots {
    ctx: *mut xdp_md,
}

#[inline(always)]
fn try_adapt(ctx: &XdpContext) -> Option<u32> {
    if read::<u16>(ctx, 12).map(u16::from_be) != Some(ADAPT_ETHERTYPE) {
        return None;
    }
    let kind = read::<u16>(ctx, 14)?;
    let len = ctx.data_end().saturating_sub(ctx.data());
    let (slots, callback) = match kind {
        ADAPT_KIND_WRITE => {
            ptr_at::<AdaptSlot>(ctx, ADAPT_OFFSET)?;
            let n = (len.saturating_sub(ADAPT_OFFSET) / ADAPT_SLOT_LEN).min(ADAPT_BATCH);
            (n, adapt_slot as *mut c_void)
        }
        ADAPT_KIND_READ => {
            ptr_at::<AdaptRead>(ctx, ADAPT_OFFSET)?;
            let n = (len.saturating_sub(ADAPT_OFFSET) / ADAPT_READ_LEN).min(ADAPT_READ_BATCH);
            (n, read_slot as *mut c_void)
        }
        _ => return None,
    };
    let mut state = Slots { ctx: ctx.ctx };
    // SAFETY: both callbacks have the signature bpf_loop (Linux 5.17, commit e6f2dd0f8067)
    // calls, and `state` outlives the call.
    unsafe { bpf_loop(slots as u32, callback, (&raw mut state).cast(), 0) };
    Some(xdp_action::XDP_PASS)
}

/// One slot of a write frame: `bpf_loop`'s callback, verified once however many slots a frame
/// has. Returns 1 to stop (a slot outside the frame). The work is in the global function
/// [`limiter_adapt_slot`].
#[inline(never)]
extern "C" fn adapt_slot(index: u32, state: *mut c_void) -> i64 {
    // SAFETY: `state` is the `Slots` `try_adapt` passed.
    let ctx = unsafe { (*state.cast::<Slots>()).ctx };
    stop_or_continue(limiter_adapt_slot(ctx, index))
}

/// One slot of a write frame (see [`adapt_slot`]), in a global function, which the verifier
/// checks once on its own rather than as the body of the `bpf_loop` (see
/// `check::limiter_check_slot` for why).
#[unsafe(no_mangle)]
#[inline(never)]
pub extern "C" fn limiter_adapt_slot(ctx: *mut xdp_md, index: u32) -> i64 {
    let ctx = XdpContext::new(ctx);
    // The mask bounds the offset for the verifier; the frame bounds check keeps it inside.
    let offset = ADAPT_OFFSET + (index as usize & ADAPT_SLOT_MASK) * ADAPT_SLOT_LEN;
    let Some(config) = CONFIG.get(0) else {
        return 1;
    };
    let Some(slot) = ptr_at::<AdaptSlot>(&ctx, offset) else {
        return 1;
    };
    // SAFETY: `ptr_at` checked that the slot lies inside the frame.
    let request = unsafe { slot.read_unaligned() };
    let mut counted = GlobalStats::default();
    let result = adapt_one(&request, config, &mut counted);
    count_check(&counted);
    // SAFETY: as above.
    unsafe { (&raw mut (*slot.cast_mut()).result).write_unaligned(result) };
    0
}

/// One slot of a read frame: copies the entry of the slot's key (`CLIENTS`, then
/// `STATIC_CLIENTS`, then `LIMITED`, as the packets find it; then `NAMED_STATIC` and `NAMED`,
/// where API IDs' entries live) into the slot. A lookup here marks an LRU entry used, as a packet
/// or a check would: the clients read are the active ones the adaptive loop tracks and the
/// global ones the cluster's enrolment holds.
#[inline(never)]
extern "C" fn read_slot(index: u32, state: *mut c_void) -> i64 {
    // SAFETY: `state` is the `Slots` `try_adapt` passed.
    let ctx = XdpContext::new(unsafe { (*state.cast::<Slots>()).ctx });
    let offset = ADAPT_OFFSET + (index as usize & ADAPT_READ_MASK) * ADAPT_READ_LEN;
    let Some(slot) = ptr_at::<AdaptRead>(&ctx, offset) else {
        return 1;
    };
    let slot = slot.cast_mut();
    // SAFETY: `ptr_at` checked that the slot lies inside the frame.
    let key = unsafe { (*slot).key };
    let found = CLIENTS
        .get_ptr(&key)
        .map(|p| (p, HOME_CLIENTS))
        .or_else(|| STATIC_CLIENTS.get_ptr(&key).map(|p| (p, HOME_STATIC)))
        .or_else(|| LIMITED.get_ptr(&key).map(|p| (p, HOME_LIMITED)))
        .or_else(|| NAMED_STATIC.get_ptr(&key).map(|p| (p, HOME_NAMED_STATIC)))
        .or_else(|| NAMED.get_ptr(&key).map(|p| (p, HOME_NAMED)));
    // SAFETY: the slot lies inside the frame (above); `p` is a live map value for this run, and
    // each of its words is read once (another CPU may be changing the counters).
    unsafe {
        match found {
            Some((p, home)) => {
                let copy: ClientState = core::ptr::read_volatile(p);
                (&raw mut (*slot).state).write_unaligned(copy);
                (&raw mut (*slot).home).write_unaligned(home);
                (&raw mut (*slot).result).write_unaligned(ADAPT_APPLIED);
            }
            None => (&raw mut (*slot).result).write_unaligned(ADAPT_NOT_RESIDENT),
        }
    }
    0
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
    let Some(state) = resident_entry(&request.key) else {
        return ADAPT_NOT_RESIDENT;
    };
    // SAFETY: live map value for the duration of this run.
    unsafe {
        // One trie lookup serves both the refresh of a stale entry and a release.
        let release = request.flags & ADAPT_RELEASE != 0;
        let policy = if release || !(*state).is_current(config.generation) {
            resolve_key(&request.key, counted)
        } else {
            None
        };
        if let Some(policy) = &policy {
            refresh_keyed(state, &request.key, policy, config);
        }
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
        let (limit, window_us) = if release {
            atomic_and::<u64, u64, { AtomicOrdering::SeqCst }>(
                &raw mut (*state).dropped,
                !META_FLAG, // FLAG_REPORTED
            );
            let Some(policy) = policy else {
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
