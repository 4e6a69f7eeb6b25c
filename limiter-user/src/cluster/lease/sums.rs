//! The Σ of the holders' counts over a round's instants (a segment tree), for the owner's
//! feasibility checks.

use std::time::Duration;

use super::{
    Timing,
    account::{Account, Counted},
};

/// The Σ of all holders' counts ([`Account::counted_at`]: their bounds, or more while a window
/// holds more) at each instant one round must check, kept up to date as the
/// round issues grants, so that a round costs O(n log n) for n holders rather than the O(n³) of
/// summing every other holder's bound at every instant for every holder.
///
/// The instants are now, every instant at which some holder's bound may change, and the lapse
/// of every grant the round may issue (a report's arrival plus the stretched lease): every bound
/// is constant between two of them. The sums live in a segment tree over the instants with range
/// add (a grant only ever raises its holder's count, never lowers it) and range max.
pub(super) struct Sums {
    pub(super) instants: Vec<Duration>,
    /// Per tree node: the largest sum in its range, with its own `add` and none of its
    /// ancestors'.
    pub(super) max: Vec<u64>,
    /// Per tree node: what was added to its whole range.
    pub(super) add: Vec<u64>,
}

impl Sums {
    /// The sums for `accounts` at `now`, each counted with its cold share in `colds` (in order),
    /// with grants issued this round lapsing a stretched `lease` after their reports.
    pub(super) fn new(
        accounts: &[&mut Account],
        now: Duration,
        lease: Duration,
        colds: &[u32],
        timing: &Timing,
    ) -> Sums {
        let mut instants = vec![now];
        for a in accounts {
            instants.extend(a.changes(timing).filter(|&t| t > now));
            if let Some((_, received)) = a.last_report {
                instants.push((received + lease).max(now));
            }
        }
        instants.sort_unstable();
        instants.dedup();
        let len = instants.len();
        let mut sums = Sums {
            instants,
            max: vec![0; 4 * len],
            add: vec![0; 4 * len],
        };
        // Each bound as steps: its value at now, then what it changes by at each of its
        // instants; the running total is the sum at each instant.
        let mut steps = vec![0i64; len + 1];
        for (a, &cold) in accounts.iter().zip(colds) {
            let mut before = a.counted_at(now, cold, timing);
            steps[0] += i64::from(before);
            for at in a.steps(now, timing, None) {
                let after = a.counted_at(at, cold, timing);
                steps[sums.index(at)] += i64::from(after) - i64::from(before);
                before = after;
            }
        }
        let mut total = 0i64;
        let leaves: Vec<u64> = steps[..len]
            .iter()
            .map(|s| {
                total += s;
                u64::try_from(total).unwrap_or(0)
            })
            .collect();
        sums.build(1, 0, len, &leaves);
        sums
    }

    /// The position of `at`, one of the instants.
    pub(super) fn index(&self, at: Duration) -> usize {
        self.instants.partition_point(|&t| t < at)
    }

    pub(super) fn build(&mut self, node: usize, lo: usize, hi: usize, leaves: &[u64]) {
        if hi - lo == 1 {
            self.max[node] = leaves[lo];
            return;
        }
        let mid = (lo + hi) / 2;
        self.build(2 * node, lo, mid, leaves);
        self.build(2 * node + 1, mid, hi, leaves);
        self.max[node] = self.max[2 * node].max(self.max[2 * node + 1]);
    }

    /// Adds `v` to the sums at the instants `from..to`.
    pub(super) fn raise(&mut self, from: usize, to: usize, v: u64) {
        self.raise_in(1, 0, self.instants.len(), from, to, v);
    }

    pub(super) fn raise_in(
        &mut self,
        node: usize,
        lo: usize,
        hi: usize,
        from: usize,
        to: usize,
        v: u64,
    ) {
        if to <= lo || hi <= from {
            return;
        }
        if from <= lo && hi <= to {
            self.max[node] += v;
            self.add[node] += v;
            return;
        }
        let mid = (lo + hi) / 2;
        self.raise_in(2 * node, lo, mid, from, to, v);
        self.raise_in(2 * node + 1, mid, hi, from, to, v);
        self.max[node] = self.max[2 * node].max(self.max[2 * node + 1]) + self.add[node];
    }

    /// The largest sum at the instants `from..to` (0 for none: sums are never negative).
    pub(super) fn most(&self, from: usize, to: usize) -> u64 {
        self.most_in(1, 0, self.instants.len(), from, to)
    }

    pub(super) fn most_in(&self, node: usize, lo: usize, hi: usize, from: usize, to: usize) -> u64 {
        if to <= lo || hi <= from {
            return 0;
        }
        if from <= lo && hi <= to {
            return self.max[node];
        }
        let mid = (lo + hi) / 2;
        self.most_in(2 * node, lo, mid, from, to)
            .max(self.most_in(2 * node + 1, mid, hi, from, to))
            + self.add[node]
    }

    /// The instants from `now` at which `account`'s bound may change, and `lapses_at` (a grant
    /// about to be issued to it) if later than now; as runs of instants (`start`, `from..to`)
    /// over which the count is constant.
    pub(super) fn runs(
        &self,
        account: &Account,
        now: Duration,
        lapses_at: Duration,
        timing: &Timing,
    ) -> Vec<(Duration, usize, usize)> {
        let cuts = account.steps(now, timing, Some(lapses_at));
        let mut runs = Vec::with_capacity(cuts.len() + 1);
        let (mut start, mut from) = (now, 0);
        for cut in cuts {
            let to = self.index(cut);
            runs.push((start, from, to));
            (start, from) = (cut, to);
        }
        runs.push((start, from, self.instants.len()));
        runs
    }

    /// The largest grant up to `target` for `account` (lapsing at `lapses_at`) that keeps the
    /// sum of all bounds ≤ `budget` at every instant from `now` on (and raises it only within
    /// the room the counts leave).
    ///
    /// At an instant where the holder's own bound is `b`, its count `c` (`b`, or more while its
    /// window holds more: [`Account::counted_at`]) and the sum of all counts is `s`, the others
    /// leave room for `budget − (s − c)`, and whatever the holder may already enforce stays
    /// possible whatever is sent: the cap there is `max(b, budget + c ∸ s)` (with `c = b`, the
    /// `b + (budget ∸ s)` of bounds alone). Over a run where `b` and `c` are constant, the least
    /// cap is at the largest sum.
    #[expect(clippy::too_many_arguments, reason = "one round's context, private")]
    pub(super) fn feasible(
        &self,
        account: &Account,
        target: u32,
        now: Duration,
        lapses_at: Duration,
        cold: u32,
        budget: u64,
        timing: &Timing,
    ) -> u32 {
        // A grant answering a report older than a lease is lapsed on arrival: from now on it
        // counts as min(value, cold).
        let lapses_at = lapses_at.max(now);
        let mut value = target;
        for (start, from, to) in self.runs(account, now, lapses_at, timing) {
            if from >= to {
                continue;
            }
            // What the holder may enforce stays possible (its bound); more only into what the
            // others' counts leave (its own count, which its window may hold above its bound,
            // is replaced by the grant's). The bound leaves out the cold share the holder is
            // counted at for want of a grant it applied (`cold_possible`): restarted with its
            // pins, it enforces the pinned grant, maybe below the cold share, until it applies
            // one of ours, and raises granted while it was counted at that grant may still run.
            // Granted the cold share on the strength of the count alone, it would be raised into
            // their room (found by the lease proptest's restarts: 1,605 of L = 1,604).
            let bound = u64::from(account.bound_with(false, start, cold, timing));
            let mine = u64::from(account.counted_at(start, cold, timing));
            let cap = bound.max((budget + mine).saturating_sub(self.most(from, to)));
            let cap = u32::try_from(cap).unwrap_or(u32::MAX);
            // After its lease the grant counts as min(value, cold): only a cap below the cold
            // share limits it there.
            if start < lapses_at || cap < cold {
                value = value.min(cap);
            }
        }
        value
    }

    /// Issues `grant` to `account`: its count goes up by what the grant adds, instant by
    /// instant.
    pub(super) fn issue(
        &mut self,
        account: &mut Account,
        grant: Counted,
        now: Duration,
        cold: u32,
        timing: &Timing,
    ) {
        let runs = self.runs(account, now, grant.lapses_at, timing);
        let before: Vec<u32> = runs
            .iter()
            .map(|&(start, _, _)| account.counted_at(start, cold, timing))
            .collect();
        account.live.push(grant);
        for (&(start, from, to), before) in runs.iter().zip(before) {
            let after = account.counted_at(start, cold, timing);
            if after > before && from < to {
                self.raise(from, to, u64::from(after - before));
            }
        }
    }
}
