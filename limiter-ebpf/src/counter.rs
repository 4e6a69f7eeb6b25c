//! Lock-free updates of an entry's counter words (`passed` and `dropped`: a 48-bit counter below
//! a metadata field, see `ClientState`), by atomic add or compare-and-swap, so that no CPU's
//! count is ever lost to another's.

use core::intrinsics::{AtomicOrdering, atomic_cxchg, atomic_xadd};

use limiter_common::maps::{COUNTER_MASK, with_meta};

/// Compare-and-swap attempts before a packet is denied as contended. Each failure means another
/// CPU admitted a packet of the same client in between, so this bound is only reached under
/// heavy same-client contention; denying then keeps the limit exact.
pub(crate) const CAS_RETRIES: usize = 8;

/// Compare-and-swap attempts to set a counter word's metadata (a policy id or generation tag).
/// Only counter updates of the same entry contend; when every attempt fails the entry keeps its
/// stale generation, so the next packet resolves and tries again: nothing is lost.
const META_RETRIES: usize = 4;

/// How far below 2^48 a counter must stay for `add_up` to use a plain atomic add: more than
/// any adds racing with one (2^40 packets within nanoseconds) could cover.
const COUNT_SLACK: u64 = 1 << 40;

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
pub(crate) unsafe fn add_up(word: *mut u64, n: u64) {
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
pub(crate) unsafe fn add_passed(word: *mut u64, delta: u64) {
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
pub(crate) unsafe fn set_meta(word: *mut u64, value: u16) -> bool {
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
