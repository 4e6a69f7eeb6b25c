//! The send times of a holder's recent reports, or of an owner's recent messages to one
//! holder: what a grant's lease is counted from, and an echo's age.

use std::time::Duration;

/// How many recent report send times a holder remembers; a grant answering an older report is
/// applied as already lapsed (`min(value, cold)`), which is always safe.
pub(super) const SENT_REPORTS: usize = 16;

/// The send times of the newest [`SENT_REPORTS`] reports of a holder, or messages of an owner to
/// one holder, which are numbered one after the other: the time of one is found by its offset
/// from the newest. Inline, 8 bytes a time: a member holds every hot client of the cluster, so
/// this is kept for each of them, and for each member in each ledger it owns.
#[derive(Debug, Clone, Copy, Default)]
pub(super) struct Sent {
    /// The number of the newest, when `len > 0`.
    newest: u64,
    len: u8,
    /// Where the newest is in `at`.
    head: u8,
    /// Send times, as nanoseconds of the injected clock (exact for 584 years).
    at: [u64; SENT_REPORTS],
}

impl Sent {
    /// Records that `number` was sent at `at`. Numbers follow one another; one that does not
    /// (never, by construction) starts the record afresh rather than misplace a time.
    pub(super) fn push(&mut self, number: u64, at: Duration) {
        if self.len == 0 || Some(number) != self.newest.checked_add(1) {
            self.len = 0;
            self.head = 0;
        } else {
            self.head = (self.head + 1) % SENT_REPORTS as u8;
        }
        self.at[usize::from(self.head)] = u64::try_from(at.as_nanos()).unwrap_or(u64::MAX);
        self.newest = number;
        self.len = (self.len + 1).min(SENT_REPORTS as u8);
    }

    /// When `number` was sent, if it is among the recent ones.
    pub(super) fn at(&self, number: u64) -> Option<Duration> {
        let back = self.newest.checked_sub(number)?;
        if self.len == 0 || back >= u64::from(self.len) {
            return None;
        }
        let i = (usize::from(self.head) + SENT_REPORTS - back as usize) % SENT_REPORTS;
        Some(Duration::from_nanos(self.at[i]))
    }

    /// When the newest was sent.
    pub(super) fn newest_at(&self) -> Option<Duration> {
        self.at(self.newest)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    /// The newest 16 are found by their number, across the ring's wrap; older ones, newer
    /// ones and an empty record give none; a number out of order starts afresh.
    #[test]
    fn the_newest_send_times_are_found_by_number() {
        let mut sent = Sent::default();
        assert_eq!((sent.at(0), sent.newest_at()), (None, None));
        for n in 100..140 {
            sent.push(n, ms(n));
        }
        for n in 124..140 {
            assert_eq!(sent.at(n), Some(ms(n)), "{n}");
        }
        assert_eq!(sent.at(123), None, "older than the newest 16");
        assert_eq!(sent.at(140), None, "not sent yet");
        assert_eq!(sent.newest_at(), Some(ms(139)));
        sent.push(500, ms(1));
        assert_eq!((sent.at(139), sent.at(500)), (None, Some(ms(1))));
    }
}
