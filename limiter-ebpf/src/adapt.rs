//! The adaptive write program. `limiter_adapt` is never attached either: the agent's adaptive
//! controller runs it with BPF_PROG_TEST_RUN on a crafted adapt frame to change resident clients'
//! windows and allowances in place (or release them back to their policy), in the entries the
//! packets decide on.

use core::intrinsics::{AtomicOrdering, atomic_and};

use aya_ebpf::{bindings::xdp_action, macros::xdp, programs::XdpContext};
use limiter_common::{
    AdaptSlot, GlobalStats, MapConfig,
    maps::{
        ACTION_LIMIT, ADAPT_APPLIED, ADAPT_BATCH, ADAPT_ETHERTYPE, ADAPT_INVALID,
        ADAPT_NOT_RESIDENT, ADAPT_OFFSET, ADAPT_REFRESH, ADAPT_RELEASE, ADAPT_SKIPPED,
        ADAPT_SLOT_LEN, ADAPT_STALE, ADAPT_UNCHANGED, META_FLAG,
    },
    window::{MAX_WINDOW_US, MIN_WINDOW_US},
};

use crate::{
    entry::{count_check, refresh_keyed, rescale_entry, resident_entry, resolve_key},
    maps::CONFIG,
    parse::{ptr_at, read},
};

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
