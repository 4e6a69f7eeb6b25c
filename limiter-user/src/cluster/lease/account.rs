//! What an owner counts for one holder: the grants it may be enforcing, its reports and echoes.

use std::time::Duration;

use super::{Timing, sent::Sent};

#[derive(Debug, Clone, Default)]
pub(super) struct Account {
    /// Grants the holder may be enforcing: the newest acknowledged and all issued after it,
    /// except those whose lease is over, which are merged into `lapsed`.
    pub(super) live: Vec<Counted>,
    /// Grants whose lease is over but which the holder may still be enforcing, as
    /// `min(value, cold)`: the newest seq and the largest value among them. Keeps `live` bounded
    /// (a holder whose grants never arrive would otherwise add one every half lease).
    pub(super) lapsed: Option<(u64, u32)>,
    /// Whether the holder may still be enforcing the cold share (nothing applied yet, or it
    /// started again since).
    pub(super) cold_possible: bool,
    /// Reports numbered below this are from an earlier run of the holder's agent: ignored.
    pub(super) reports_from: u64,
    pub(super) demand: u32,
    /// The newest report's `used`, and until when (owner clock) it may still be in the holder's
    /// sliding window.
    pub(super) used: Option<(u32, Duration)>,
    /// The newest report: its seq and when it arrived (owner clock).
    pub(super) last_report: Option<(u64, Duration)>,
    /// The newest grant of this ledger the holder reported applied.
    pub(super) acked: Option<u64>,
    /// The newest grant of this ledger the holder ever reported applied, kept through its
    /// restarts (unlike `acked`): a grant older than it is no longer counted (see
    /// [`Ledger::take_report`](super::Ledger::take_report)), so a later report applying one is not taken as ours.
    pub(super) acked_ever: u64,
    /// Grants numbered below this went to an earlier account of the holder, dropped by
    /// [`Ledger::forget_gone`](super::Ledger::forget_gone): one it reports applied is another ledger's to this account.
    pub(super) first_grant: u64,
    pub(super) next_message: u64,
    /// Send times of recent messages, for echoes.
    pub(super) sent: Sent,
    /// When the owner sent the newest message the holder echoed.
    pub(super) echoed_sent_at: Option<Duration>,
}

#[derive(Debug, Clone, Copy)]
pub(super) struct Counted {
    pub(super) seq: u64,
    pub(super) value: u32,
    /// The report it answers: a copy sent again must answer the same one, or the holder that
    /// missed the first copy would count the lease from a later report than the owner does.
    pub(super) answers: u64,
    /// Owner-clock time after which the holder enforces at most `min(value, cold)`.
    pub(super) lapses_at: Duration,
}

impl Account {
    /// A holder just enrolled: counted at the cold share until a report says otherwise, its
    /// messages numbered from `first_message`, and the grants it may apply from `first_grant`.
    pub(super) fn enrolled(first_message: u64, first_grant: u64) -> Account {
        Account {
            cold_possible: true,
            next_message: first_message,
            first_grant,
            ..Account::default()
        }
    }

    /// The holder's demand at `now`: the newest report's, or 0 when no report arrived for a
    /// lease (holders report at least every keepalive, half a lease; one that stopped is dead
    /// or cut off, and its
    /// last demand must neither hold room the others could use nor keep the client from going
    /// quiet).
    pub(super) fn demand_at(&self, now: Duration, timing: &Timing) -> u32 {
        match self.last_report {
            Some((_, at)) if now.saturating_sub(at) < timing.lease => self.demand,
            _ => 0,
        }
    }

    /// The largest share the holder may be enforcing at `at` (owner clock, `at` ≥ now): a step
    /// function of time that changes only at the instants `changes` lists.
    pub(super) fn bound_at(&self, at: Duration, cold: u32, timing: &Timing) -> u32 {
        self.bound_with(self.cold_possible, at, cold, timing)
    }

    /// [`Account::bound_at`], taking `cold_possible` for whether the holder may be at the cold
    /// share for want of a grant of this ledger.
    pub(super) fn bound_with(
        &self,
        cold_possible: bool,
        at: Duration,
        cold: u32,
        timing: &Timing,
    ) -> u32 {
        let mut bound = if cold_possible || self.silent_from(timing).is_none_or(|s| s <= at) {
            cold
        } else {
            0
        };
        if let Some((_, value)) = self.lapsed {
            bound = bound.max(value.min(cold));
        }
        for g in &self.live {
            bound = bound.max(if at < g.lapses_at {
                g.value
            } else {
                g.value.min(cold)
            });
        }
        bound
    }

    /// What the owner counts the holder at, at `at`, when it sizes grants: its bound, or what
    /// its sliding window still holds of what it admitted, if more. A holder cut below what it
    /// has admitted in its window admits nothing until its estimate decays below the cut; a raise
    /// of another holder into the cut's room before then would admit more than L over a window
    /// (a cut cannot take back what was admitted). The estimate only decays, and the holder
    /// admits only while it is below what it is granted, so `used` bounds it from above until
    /// the next report.
    pub(super) fn counted_at(&self, at: Duration, cold: u32, timing: &Timing) -> u32 {
        let bound = self.bound_at(at, cold, timing);
        match self.used {
            Some((used, until)) if at < until => bound.max(used),
            _ => bound,
        }
    }

    /// From when the holder may have dropped its grant for silence (`None`: it never heard the
    /// owner, or the owner cannot tell that it did).
    pub(super) fn silent_from(&self, timing: &Timing) -> Option<Duration> {
        self.echoed_sent_at
            .map(|s| s + timing.shrunk(timing.silence))
    }

    /// Merges the grants whose lease is over at `now` into `lapsed`, but for the newest, which
    /// a round may send again (a cut is not renewed: see [`Ledger::round`](super::Ledger::round)); it counts the same
    /// in `live` (at `min(value, cold)` once its lease is over).
    pub(super) fn compact(&mut self, now: Duration) {
        let mut lapsed = self.lapsed;
        let newest = self.live.last().map(|g| g.seq);
        self.live.retain(|g| {
            if g.lapses_at > now || Some(g.seq) == newest {
                return true;
            }
            lapsed = Some(lapsed.map_or((g.seq, g.value), |(seq, value)| {
                (seq.max(g.seq), value.max(g.value))
            }));
            false
        });
        self.lapsed = lapsed;
    }

    /// The instants at which `counted_at` (and `bound_at`) may change.
    pub(super) fn changes<'a>(&'a self, timing: &Timing) -> impl Iterator<Item = Duration> + 'a {
        self.live
            .iter()
            .map(|g| g.lapses_at)
            .chain(self.silent_from(timing))
            .chain(self.used.map(|(_, until)| until))
    }

    /// The instants after `now` at which `counted_at` may change, and `also` if it is after `now`,
    /// in order and each once.
    pub(super) fn steps(
        &self,
        now: Duration,
        timing: &Timing,
        also: Option<Duration>,
    ) -> Vec<Duration> {
        let mut steps: Vec<Duration> = self
            .changes(timing)
            .chain(also)
            .filter(|&t| t > now)
            .collect();
        steps.sort_unstable();
        steps.dedup();
        steps
    }
}
