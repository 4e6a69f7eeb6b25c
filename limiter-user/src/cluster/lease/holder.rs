//! The holder's side of a lease: what a member enforces for one global client.

use std::time::Duration;

use super::{Report, Timing, ToHolder, sent::Sent};

/// The member's side: what it enforces for the client.
#[derive(Debug, Clone)]
pub struct Holder {
    pub(super) timing: Timing,
    /// The silence limit in force: the longest of this holder's and its owner's.
    pub(super) silence: Duration,
    pub(super) grant: Option<Applied>,
    /// The newest grant ever applied, kept across a drop for silence so that a late copy of an
    /// older grant (one the owner may have stopped counting) is never applied again.
    newest_grant: u64,
    pub(super) last_heard: Option<Duration>,
    echo: Option<u64>,
    next_report: u64,
    sent: Sent,
}

#[derive(Debug, Clone, Copy)]
pub(super) struct Applied {
    pub(super) seq: u64,
    pub(super) value: u32,
    /// End of the lease on this holder's clock; `None`: lapsed on arrival.
    pub(super) until: Option<Duration>,
}

impl Holder {
    pub fn new(timing: Timing) -> Holder {
        Holder::numbered_from(timing, 1)
    }

    /// A holder whose reports are numbered from `first`: the agent numbers every holder's
    /// reports from one increasing counter (and its incarnation), so a late grant answering a
    /// report of an earlier holder of the same client never matches a report of this one.
    pub fn numbered_from(timing: Timing, first: u64) -> Holder {
        Holder {
            timing,
            silence: timing.silence,
            grant: None,
            newest_grant: 0,
            last_heard: None,
            echo: None,
            next_report: first.max(1),
            sent: Sent::default(),
        }
    }

    /// The silence limit in force: the longest of this holder's and its owner's.
    pub fn silence_limit(&self) -> Duration {
        self.silence
    }

    /// How long this holder goes without reporting when it has no news ([`Timing::keepalive`]).
    pub fn keepalive(&self) -> Duration {
        self.timing.keepalive()
    }

    /// The newest owner message received, as the next report echoes it.
    pub fn echo(&self) -> Option<u64> {
        self.echo
    }

    /// The number of the grant [`Holder::in_force`] gives at `now`.
    pub fn in_force_seq(&self, now: Duration) -> Option<u64> {
        self.in_force(now).and(self.grant.map(|g| g.seq))
    }

    /// The grant in force at `now`, for the datapath: its value and the end of its lease on this
    /// holder's clock (`None`: lapsed, it counts as `min(value, cold)`); `None` when the cold
    /// share is in force (no grant, or dropped for the owner's silence).
    pub fn in_force(&self, now: Duration) -> Option<(u32, Option<Duration>)> {
        let grant = self.grant?;
        if self
            .last_heard
            .is_some_and(|heard| now.saturating_sub(heard) >= self.silence)
        {
            return None;
        }
        Some((grant.value, grant.until))
    }

    /// When the owner's silence begins to count (the silence limit after it was last heard);
    /// `None`: never heard.
    pub fn silent_from(&self) -> Option<Duration> {
        self.last_heard.map(|heard| heard + self.silence)
    }

    /// The owner has been silent for the silence limit: the holder is back at the cold share.
    pub fn owner_silent(&self, now: Duration) -> bool {
        self.last_heard
            .is_none_or(|heard| now.saturating_sub(heard) >= self.silence)
    }

    /// The share enforced at `now` when the cold share is `cold`.
    pub fn enforced(&self, now: Duration, cold: u32) -> u32 {
        let Some(grant) = self.grant else {
            return cold;
        };
        if self
            .last_heard
            .is_some_and(|heard| now.saturating_sub(heard) >= self.silence)
        {
            return cold;
        }
        match grant.until {
            Some(until) if now < until => grant.value,
            _ => grant.value.min(cold),
        }
    }

    /// A report of `demand`, with `used` admitted in the holder's sliding window, sent at `now`.
    pub fn report(&mut self, now: Duration, demand: u32, used: u32) -> Report {
        let seq = self.next_report;
        self.next_report += 1;
        self.sent.push(seq, now);
        Report {
            seq,
            demand,
            used,
            applied: self.grant.map(|g| g.seq),
            echo: self.echo,
            raise_left: None,
        }
    }

    /// Takes in a message from the owner received at `now`.
    pub fn receive(&mut self, now: Duration, message: ToHolder) {
        // Silence is over only if the grant in force is still valid: a dropped grant stays
        // dropped until a newer one, or a copy of itself (see below).
        if let Some(heard) = self.last_heard
            && now.saturating_sub(heard) >= self.silence
        {
            self.grant = None;
        }
        self.last_heard = Some(now);
        let lease = match message.terms {
            Some(terms) => {
                self.silence = self.silence.max(terms.silence);
                self.timing.lease.min(terms.lease)
            }
            None => self.timing.lease,
        };
        self.echo = Some(
            self.echo
                .map_or(message.message, |e| e.max(message.message)),
        );
        let Some(grant) = message.grant else {
            return;
        };
        // An older grant never again: the owner may have stopped counting it. The newest one
        // again only when none is in force (it was dropped for the owner's silence, or
        // released): the owner counts it still, as no newer one was acknowledged, and a grant
        // that is not renewed (a cut, see `Ledger::round`) comes only as copies of itself.
        if grant.seq < self.newest_grant || (grant.seq == self.newest_grant && self.grant.is_some())
        {
            return;
        }
        self.newest_grant = grant.seq;
        let until = self.sent.at(grant.answers).map(|sent| sent + lease);
        self.grant = Some(Applied {
            seq: grant.seq,
            value: grant.value,
            until,
        });
    }

    /// Drops the grant (the owner released the client): back to the cold share.
    pub fn release(&mut self) {
        self.grant = None;
    }
}
