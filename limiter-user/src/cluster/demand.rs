//! What a member reports about a global client, and how reports are merged and turned into
//! demand without comparing clocks.
//!
//! A report carries the member's cumulative counters for the client (they never reset while the
//! agent runs), the time on the member's own monotonic clock, a sequence number and the member's
//! incarnation (a counter kept in `--state-dir` and bumped at each start). Merging keeps the
//! newest (incarnation, seq), so it is idempotent, commutative and associative: duplicates,
//! reordering and resends change nothing. Demand is the increase of passed + dropped between two
//! reports of the same incarnation, over the time between them on the same clock: a member whose
//! wall clock is off by an hour, or steps, reports the same demand.

use std::time::Duration;

/// Orders a member's reports: later incarnations (restarts) win, then later sequence numbers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Stamp {
    pub incarnation: u64,
    pub seq: u64,
}

/// One member's report for one client.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Observation {
    pub stamp: Stamp,
    /// The member's monotonic clock when it read the counters.
    pub at: Duration,
    /// Packets (and checks) passed for the client on the member since its start, cumulative.
    pub passed: u64,
    /// Dropped (or denied), cumulative.
    pub dropped: u64,
}

/// The newest observation from one member, and the one before it of the same incarnation, from
/// which demand is measured.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Latest {
    newest: Option<Observation>,
    previous: Option<Observation>,
}

impl Latest {
    /// Takes in `o`; returns whether it was newer than what was known (an older or duplicate
    /// observation changes nothing).
    pub fn merge(&mut self, o: Observation) -> bool {
        match self.newest {
            Some(n) if n.stamp >= o.stamp => {
                // Older than the newest, but maybe a better "previous" for the rate: the newest
                // older one of the same incarnation.
                if n.stamp.incarnation == o.stamp.incarnation
                    && n.stamp != o.stamp
                    && self.previous.is_none_or(|p| p.stamp < o.stamp)
                {
                    self.previous = Some(o);
                }
                false
            }
            Some(n) => {
                self.previous = (n.stamp.incarnation == o.stamp.incarnation)
                    .then_some(n)
                    .or(self
                        .previous
                        .filter(|p| p.stamp.incarnation == o.stamp.incarnation));
                self.newest = Some(o);
                true
            }
            None => {
                self.newest = Some(o);
                true
            }
        }
    }

    pub fn newest(&self) -> Option<&Observation> {
        self.newest.as_ref()
    }

    /// Packets per `window` that reached the member (passed + dropped) between the two newest
    /// observations of its current incarnation; `None` until there are two, or when no time
    /// passed between them. Counters that went backwards (a member that lost its state without a
    /// new incarnation: a bug or a hostile peer) give `None`, never a huge demand.
    pub fn demand(&self, window: Duration) -> Option<u32> {
        let (newest, previous) = (self.newest?, self.previous?);
        let elapsed = newest.at.checked_sub(previous.at)?;
        if elapsed.is_zero() {
            return None;
        }
        let seen = newest.passed.checked_add(newest.dropped)?;
        let before = previous.passed.checked_add(previous.dropped)?;
        let packets = u128::from(seen.checked_sub(before)?);
        let per_window = packets * window.as_nanos() / elapsed.as_nanos();
        Some(u32::try_from(per_window).unwrap_or(u32::MAX))
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    fn obs(incarnation: u64, seq: u64, at_ms: u64, passed: u64, dropped: u64) -> Observation {
        Observation {
            stamp: Stamp { incarnation, seq },
            at: Duration::from_millis(at_ms),
            passed,
            dropped,
        }
    }

    #[test]
    fn demand_is_the_increase_over_the_members_own_clock() {
        let mut l = Latest::default();
        assert!(l.merge(obs(1, 1, 10_000, 100, 0)));
        assert_eq!(l.demand(Duration::from_secs(1)), None);
        assert!(l.merge(obs(1, 2, 10_500, 130, 20)));
        // 50 packets in 500 ms: 100 per second.
        assert_eq!(l.demand(Duration::from_secs(1)), Some(100));
        // A duplicate or an old report changes nothing.
        assert!(!l.merge(obs(1, 1, 10_000, 100, 0)));
        assert_eq!(l.demand(Duration::from_secs(1)), Some(100));
    }

    #[test]
    fn a_restart_starts_the_rate_afresh() {
        let mut l = Latest::default();
        l.merge(obs(1, 7, 10_000, 1_000, 0));
        l.merge(obs(1, 8, 11_000, 2_000, 0));
        // The member restarted: its counters and clock start again.
        assert!(l.merge(obs(2, 1, 5, 3, 0)));
        assert_eq!(l.demand(Duration::from_secs(1)), None);
        // A late report of the old incarnation changes nothing.
        assert!(!l.merge(obs(1, 9, 12_000, 3_000, 0)));
        assert_eq!(l.demand(Duration::from_secs(1)), None);
        l.merge(obs(2, 2, 1_005, 13, 0));
        assert_eq!(l.demand(Duration::from_secs(1)), Some(10));
    }

    #[test]
    fn counters_going_backwards_give_no_demand() {
        let mut l = Latest::default();
        l.merge(obs(1, 1, 0, 1_000, 0));
        l.merge(obs(1, 2, 1_000, 10, 0));
        assert_eq!(l.demand(Duration::from_secs(1)), None);
    }

    fn observation() -> impl Strategy<Value = Observation> {
        (0u64..3, 0u64..6).prop_map(|(incarnation, seq)| {
            // Consistent with a real member: counters and clock grow with seq.
            obs(
                incarnation,
                seq,
                1_000 * seq + 7,
                100 * seq * (incarnation + 1),
                3 * seq,
            )
        })
    }

    proptest! {
        #[test]
        fn merging_is_order_free_and_idempotent(
            set in prop::collection::vec(observation(), 1..12),
            seed in any::<u64>(),
        ) {
            let mut forward = Latest::default();
            for o in &set {
                forward.merge(*o);
            }
            // Another order, with every observation twice.
            let mut shuffled: Vec<Observation> = set.iter().chain(&set).copied().collect();
            let mut s = seed;
            for i in (1..shuffled.len()).rev() {
                s = s.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
                shuffled.swap(i, (s >> 33) as usize % (i + 1));
            }
            let mut other = Latest::default();
            for o in &shuffled {
                other.merge(*o);
            }
            prop_assert_eq!(forward.newest(), other.newest());
            let window = Duration::from_secs(1);
            prop_assert_eq!(forward.demand(window), other.demand(window));
            let max = set.iter().map(|o| o.stamp).max();
            prop_assert_eq!(forward.newest().map(|o| o.stamp), max);
        }
    }
}
