//! Rare kernel-side events, logged through aya-log: the agent forwards the records into its own
//! `tracing` log (`limiter_user::datapath::kernel_log`).
//!
//! Only the fast path (`limiter`) logs: each call sits in a branch that only a full client map
//! or a client contended past its compare-and-swap retries reaches, and these counted events are
//! logged at their 1st, 2nd, 4th, 8th... occurrence on a CPU ([`sampled`]), so a flood of them
//! costs a few dozen records, not one per packet. The agent sets the level global
//! (`AYA_LOG_LEVEL`, a frozen read-only map) from its own log filter before it loads the
//! programs, so with warnings filtered out the verifier sees the level and removes the logging
//! branches altogether.
//!
//! `limiter_check` and `limiter_adapt` do not log: their decisions run in a loop over a batch,
//! and a call to the logging code in that loop multiplies the states the verifier explores
//! until it rejects the program (`E2BIG`). The agent learns of their overflows from the replies
//! and the `STATS` counters anyway.

use aya_log_ebpf::warn;

/// What happened.
#[derive(Clone, Copy)]
pub(crate) enum Event {
    /// A new client's entry could not be created (`GlobalStats::map_full`); it was charged to
    /// the shared overflow budget.
    MapFull,
    /// A decision lost all its compare-and-swap retries and denied (`GlobalStats::contended`).
    Contended,
}

/// Whether the `n`th occurrence of a counted event (on this CPU) is logged: powers of two.
#[inline(always)]
pub(crate) fn sampled(n: u64) -> bool {
    n != 0 && n & (n - 1) == 0
}

/// Logs one event; `count` is its count on this CPU. Not inlined: one copy of each record's
/// encoding, called from the cold branches only.
#[inline(never)]
pub(crate) fn log(event: Event, count: u64) {
    match event {
        Event::MapFull => warn!(
            &(),
            "client map full: {} packets on this CPU used the overflow budget (--max-clients)",
            count
        ),
        Event::Contended => warn!(
            &(),
            "client contended past its CAS retries: {} decisions denied on this CPU", count
        ),
    }
}
