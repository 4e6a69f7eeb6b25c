//! Grants and leases for one global client: what a member (the holder) enforces, and what the
//! client's owner may count as in force on each member, so that **the shares in force on all
//! members never sum above L**, with message loss, delay and reordering, and clocks that are
//! offset and drift (no clock is ever compared with another node's; only durations are).
//!
//! The rules, and why they hold:
//! - A holder enforces the newest grant it received (grants carry a sequence number; an older
//!   one arriving late is ignored). Before any grant, and after a release, it enforces the cold
//!   share.
//! - Every grant answers one report of the holder and is valid for the lease `T` counted on the
//!   holder's clock from when it *sent* that report. After that the holder enforces
//!   `min(value, cold)`: a raise (above the cold share) lapses back to the cold share on its own,
//!   so the raises of a dead owner end; a cut (below it) stays.
//! - A holder that has heard nothing from the owner for the silence limit `D` (its own clock)
//!   drops the grant and goes back to the cold share, until a newer grant or a copy of the one
//!   it dropped comes (a cut is not renewed, so its copies are all that come). Its reports say
//!   it applies none meanwhile, and the owner then counts it at the cold share at least.
//! - The owner keeps, per holder, every grant the holder may be enforcing: the newest one the
//!   holder acknowledged and all issued after it. It counts a grant at its value until the
//!   lease may have lapsed on the holder (the owner received the report it answers at `r`, so the
//!   holder sent it before `r` in real time; with both clocks drifting at most `ρ` the lease is
//!   over by `r + T·(1+ρ)/(1−ρ)` on the owner's clock: a small margin is added), and at
//!   `min(value, cold)` after. It counts the cold share too when the holder may have dropped the
//!   grant for silence: from `s + D·(1−ρ)/(1+ρ)` on, where `s` is when the owner sent the newest
//!   message the holder has echoed back.
//! - A grant is issued only if, over the whole horizon of the new grant's lease, the largest
//!   share each holder may be enforcing plus the cold shares of the members not enrolled stays
//!   ≤ L. A cut never raises a holder's bound, so cuts go out at once; raises get only the room
//!   the bounds leave, so a raise that a cut makes room for waits until the cut is acknowledged.
//!   This is cut-before-raise, and it is what keeps the sum ≤ L while messages are in flight.
//!
//! A holder's reports merge by the newest: the owner takes one only if its `seq` is above the
//! last it took from that holder (the agent numbers reports from `incarnation << 48`, see
//! `super::enrolment`, so the newest (incarnation, seq) wins) and, once it knows the holder
//! started again ([`Ledger::holder_restarted`]), none of the earlier run. A copy, or a report
//! older than one taken, changes nothing, whenever it arrives. The newest decides the holder's
//! demand, its `used`, when it last reported and whether it applies a grant of this ledger; an
//! older one taken before it leaves only what stays true after it: the grant it applied (the
//! holder never goes back to an older one, so older grants stop counting) and the lease left on
//! its kernel (learning mode lasts that long). So the order reports arrive in can make the
//! owner's count tighter, or hold raises back longer, but never unsafe (`tests::merge`).
//!
//! Times are [`Duration`]s since the node's own monotonic origin (injected; never a wall clock).
//!
//! Preconditions the sync loop built on this must keep, and what is not covered yet (an
//! independent review listed them): the cold share a holder uses is never above the one its
//! owner counts with, and a larger member count (a smaller budget) may be used by the owner only
//! a stretched lease after it was announced; a holder that restarts is counted at the cold share at
//! least from the owner's first news of its new incarnation ([`Ledger::holder_restarted`]), and
//! must enforce nothing above what the owner counted before that until a stretched lease after
//! the owner had that news (`super::membership`'s join gate holds it at 0); a new owner (after the old one left) must be told apart
//! by an owner epoch in its messages, and issue no raise for one lease (learning mode); releasing
//! a client is cut-before-raise too (every grant brought to at most the cold share and
//! acknowledged before the ledger is dropped). `super::enrolment` provides the numbering across
//! incarnations, learning mode and release; the README lists what is still open.

use std::{collections::BTreeMap, time::Duration};

use self::sent::Sent;
use super::{NodeId, config::MAX_PEER_TIMEOUT, shares};

mod sent;

/// Clock parameters shared by owner and holders (build with [`Timing::new`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Timing {
    /// Lease of a grant, on the holder's clock, from the report it answers.
    lease: Duration,
    /// A holder that heard nothing from the owner for this long (its clock) drops the grant.
    silence: Duration,
    /// Largest clock rate error of any member, in parts per million (1000: ±0.1%).
    drift_ppm: u32,
}

/// Why clock parameters are refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TimingError {
    #[error("the lease must be between 10 ms and 60 s, not {0:?}")]
    Lease(Duration),
    #[error(
        "the silence limit ({silence:?}) must exceed the lease stretched by clock drift \
         ({lease:?}), or no raise could ever be granted, and be at most 180 s"
    )]
    Silence { silence: Duration, lease: Duration },
    #[error("clock drift is at most 100000 ppm (10%), not {0}")]
    Drift(u32),
}

impl Timing {
    /// Longest lease: the longest `peer_timeout` a config takes. A peer's terms or
    /// `raise_left` past it are refused: no member of this version sends them, and a hostile
    /// owner's would keep a cut in force long after it left.
    pub const MAX_LEASE: Duration = MAX_PEER_TIMEOUT;

    /// The silence limit the agent runs with, in leases ([`Timing::from_peer_timeout`]).
    const SILENCE_LEASES: u32 = 3;

    /// Longest silence limit: the one the agent runs with at the longest lease.
    pub const MAX_SILENCE: Duration = Self::MAX_LEASE.saturating_mul(Self::SILENCE_LEASES);

    pub fn new(lease: Duration, silence: Duration, drift_ppm: u32) -> Result<Timing, TimingError> {
        if drift_ppm > 100_000 {
            return Err(TimingError::Drift(drift_ppm));
        }
        if lease < Duration::from_millis(10) || lease > Self::MAX_LEASE {
            return Err(TimingError::Lease(lease));
        }
        let timing = Timing {
            lease,
            silence,
            drift_ppm,
        };
        let stretched = timing.stretched(lease);
        if silence <= stretched || silence > Self::MAX_SILENCE {
            return Err(TimingError::Silence {
                silence,
                lease: stretched,
            });
        }
        Ok(timing)
    }

    /// The timing the agent runs on, from `peer_timeout`: a raise lives one `peer_timeout` past
    /// the report it answers (a dead node's raises end as soon as its peers notice it is gone),
    /// a holder that hears nothing of the owner for three drops its grant; clocks drift at most
    /// ±1000 ppm.
    pub fn from_peer_timeout(peer_timeout: Duration) -> Timing {
        let lease = peer_timeout.clamp(Duration::from_millis(10), Self::MAX_LEASE);
        Timing::new(lease, lease * Self::SILENCE_LEASES, 1_000).unwrap_or_else(|_| {
            // Unreachable for leases in range (3× exceeds the stretched lease); the defaults
            // are valid.
            Timing::new(Duration::from_secs(1), Duration::from_secs(3), 1_000)
                .unwrap_or_else(|e| panic!("default lease timing: {e}"))
        })
    }

    pub fn lease(&self) -> Duration {
        self.lease
    }

    /// The silence limit: a holder that heard nothing from the owner for this long drops the grant.
    pub fn silence(&self) -> Duration {
        self.silence
    }

    /// How long an owner and a holder with nothing new for each other go without a message:
    /// half the lease, a sixth of the silence limit the agent runs with, so that a lost
    /// message or two does not make either side count the other as silent. Only a holder at
    /// or below the cold share is ever that quiet: a raise is renewed when less than half its
    /// lease is left, answering the holder's newest report, and a holder with a raise in force
    /// reports every round.
    pub fn keepalive(&self) -> Duration {
        self.lease / 2
    }

    /// `d` measured on a clock running up to `drift_ppm` slow, seen on one up to as fast: the
    /// most real-and-other-clock time `d` can take (`d·(1+ρ)/(1−ρ)`, rounded up, plus 1 ms).
    fn stretched(&self, d: Duration) -> Duration {
        let rho = u128::from(self.drift_ppm);
        let ns = d.as_nanos() * (1_000_000 + rho);
        let ns = ns.div_ceil(1_000_000 - rho);
        Duration::from_nanos(u64::try_from(ns).unwrap_or(u64::MAX)) + Duration::from_millis(1)
    }

    /// The least time `d` on one clock can take seen on another (`d·(1−ρ)/(1+ρ)`, less 1 ms).
    fn shrunk(&self, d: Duration) -> Duration {
        let rho = u128::from(self.drift_ppm);
        let ns = d.as_nanos() * (1_000_000 - rho) / (1_000_000 + rho);
        Duration::from_nanos(u64::try_from(ns).unwrap_or(u64::MAX))
            .saturating_sub(Duration::from_millis(1))
    }
}

/// A grant from the owner to one holder.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Grant {
    /// Increases with every grant the owner issues for this client (to any holder).
    pub seq: u64,
    /// Packets per policy window the holder may admit.
    pub value: u32,
    /// The holder's report this grant answers (its lease starts when that report was sent).
    pub answers: u64,
}

/// An owner's message to a holder: the grant in force for it (sent again until acknowledged,
/// and at least every keepalive, so it also shows the owner alive), numbered per holder so the
/// holder can echo it back.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ToHolder {
    pub message: u64,
    pub grant: Option<Grant>,
    /// The lease and silence limit the owner's ledger counts with (`None`: not sent, the holder
    /// uses its own). Members configure them alike, but a reload or a mistake can make them
    /// differ, and the owner's count is what the sum ≤ L rests on.
    pub terms: Option<Terms>,
}

/// The lease and silence limit an owner counts a holder's grants with. A holder keeps a raise
/// for at most the shorter of the owner's lease and its own, and keeps a grant through silence
/// for at least the longer of the two silence limits: an owner never counts a grant as lapsed,
/// or a cut as dropped, before the holder is done with it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Terms {
    pub lease: Duration,
    pub silence: Duration,
}

/// A holder's report to the owner.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Report {
    /// Increases with every report of this holder.
    pub seq: u64,
    /// Packets per window the client asked of this holder (passed + dropped).
    pub demand: u32,
    /// What the holder's sliding window counts as admitted when it read the counters: until
    /// those packets leave its window (two windows at most) it admits no more than it has
    /// admitted, whatever it is granted, so a cut cannot hand their room to another holder
    /// before then.
    pub used: u32,
    /// The newest grant the holder applied (it never goes back to an older one).
    pub applied: Option<u64>,
    /// The newest owner message the holder received.
    pub echo: Option<u64>,
    /// How long the lease of the grant the holder's kernel enforces still runs (`None`: none
    /// runs). A ledger that did not issue that grant (an earlier owner's, one the holder kept
    /// across a restart) stays in learning mode until it has run out: the earlier owner's lease
    /// may have been longer than this one's.
    pub raise_left: Option<Duration>,
}

/// The member's side: what it enforces for the client.
#[derive(Debug, Clone)]
pub struct Holder {
    timing: Timing,
    /// The silence limit in force: the longest of this holder's and its owner's.
    silence: Duration,
    grant: Option<Applied>,
    /// The newest grant ever applied, kept across a drop for silence so that a late copy of an
    /// older grant (one the owner may have stopped counting) is never applied again.
    newest_grant: u64,
    last_heard: Option<Duration>,
    echo: Option<u64>,
    next_report: u64,
    sent: Sent,
}

#[derive(Debug, Clone, Copy)]
struct Applied {
    seq: u64,
    value: u32,
    /// End of the lease on this holder's clock; `None`: lapsed on arrival.
    until: Option<Duration>,
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

/// The owner's side for one client: the enrolled holders and what each may be enforcing.
#[derive(Debug, Clone)]
pub struct Ledger {
    limit: u32,
    timing: Timing,
    /// The policy window: a holder's reported `used` counts for two of them (stretched) after
    /// the report arrives, or until the next report (see [`Account::counted_at`]).
    window: Duration,
    next_grant: u64,
    /// Until then (owner clock) no grant goes above the cold share: a new owner's learning
    /// mode, during which raises another ledger of the client issued lapse.
    no_raise_until: Duration,
    /// Releasing: no grant above the cold share any more (see [`Ledger::releasable`]).
    releasing: bool,
    /// The first message number of a new holder's account.
    first_message: u64,
    /// The first grant number of this ledger: a holder that reports applying an older one
    /// applied another ledger's grant (an earlier owner's), which this one does not account for.
    first_grant: u64,
    holders: BTreeMap<NodeId, Account>,
}

#[derive(Debug, Clone, Default)]
struct Account {
    /// Grants the holder may be enforcing: the newest acknowledged and all issued after it,
    /// except those whose lease is over, which are merged into `lapsed`.
    live: Vec<Counted>,
    /// Grants whose lease is over but which the holder may still be enforcing, as
    /// `min(value, cold)`: the newest seq and the largest value among them. Keeps `live` bounded
    /// (a holder whose grants never arrive would otherwise add one every half lease).
    lapsed: Option<(u64, u32)>,
    /// Whether the holder may still be enforcing the cold share (nothing applied yet, or it
    /// started again since).
    cold_possible: bool,
    /// Reports numbered below this are from an earlier run of the holder's agent: ignored.
    reports_from: u64,
    demand: u32,
    /// The newest report's `used`, and until when (owner clock) it may still be in the holder's
    /// sliding window.
    used: Option<(u32, Duration)>,
    /// The newest report: its seq and when it arrived (owner clock).
    last_report: Option<(u64, Duration)>,
    /// The newest grant of this ledger the holder reported applied.
    acked: Option<u64>,
    /// The newest grant of this ledger the holder ever reported applied, kept through its
    /// restarts (unlike `acked`): a grant older than it is no longer counted (see
    /// [`Ledger::take_report`]), so a later report applying one is not taken as ours.
    acked_ever: u64,
    /// Grants numbered below this went to an earlier account of the holder, dropped by
    /// [`Ledger::forget_gone`]: one it reports applied is another ledger's to this account.
    first_grant: u64,
    next_message: u64,
    /// Send times of recent messages, for echoes.
    sent: Sent,
    /// When the owner sent the newest message the holder echoed.
    echoed_sent_at: Option<Duration>,
}

#[derive(Debug, Clone, Copy)]
struct Counted {
    seq: u64,
    value: u32,
    /// The report it answers: a copy sent again must answer the same one, or the holder that
    /// missed the first copy would count the lease from a later report than the owner does.
    answers: u64,
    /// Owner-clock time after which the holder enforces at most `min(value, cold)`.
    lapses_at: Duration,
}

impl Account {
    /// A holder just enrolled: counted at the cold share until a report says otherwise, its
    /// messages numbered from `first_message`, and the grants it may apply from `first_grant`.
    fn enrolled(first_message: u64, first_grant: u64) -> Account {
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
    fn demand_at(&self, now: Duration, timing: &Timing) -> u32 {
        match self.last_report {
            Some((_, at)) if now.saturating_sub(at) < timing.lease => self.demand,
            _ => 0,
        }
    }

    /// The largest share the holder may be enforcing at `at` (owner clock, `at` ≥ now): a step
    /// function of time that changes only at the instants `changes` lists.
    fn bound_at(&self, at: Duration, cold: u32, timing: &Timing) -> u32 {
        self.bound_with(self.cold_possible, at, cold, timing)
    }

    /// [`Account::bound_at`], taking `cold_possible` for whether the holder may be at the cold
    /// share for want of a grant of this ledger.
    fn bound_with(&self, cold_possible: bool, at: Duration, cold: u32, timing: &Timing) -> u32 {
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
    fn counted_at(&self, at: Duration, cold: u32, timing: &Timing) -> u32 {
        let bound = self.bound_at(at, cold, timing);
        match self.used {
            Some((used, until)) if at < until => bound.max(used),
            _ => bound,
        }
    }

    /// From when the holder may have dropped its grant for silence (`None`: it never heard the
    /// owner, or the owner cannot tell that it did).
    fn silent_from(&self, timing: &Timing) -> Option<Duration> {
        self.echoed_sent_at
            .map(|s| s + timing.shrunk(timing.silence))
    }

    /// Merges the grants whose lease is over at `now` into `lapsed`, but for the newest, which
    /// a round may send again (a cut is not renewed: see [`Ledger::round`]); it counts the same
    /// in `live` (at `min(value, cold)` once its lease is over).
    fn compact(&mut self, now: Duration) {
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
    fn changes<'a>(&'a self, timing: &Timing) -> impl Iterator<Item = Duration> + 'a {
        self.live
            .iter()
            .map(|g| g.lapses_at)
            .chain(self.silent_from(timing))
            .chain(self.used.map(|(_, until)| until))
    }

    /// The instants after `now` at which `counted_at` may change, and `also` if it is after `now`,
    /// in order and each once.
    fn steps(&self, now: Duration, timing: &Timing, also: Option<Duration>) -> Vec<Duration> {
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

impl Ledger {
    pub fn new(limit: u32, timing: Timing) -> Ledger {
        Ledger::numbered_from(limit, timing, 1, Duration::ZERO)
    }

    /// A ledger whose grants and messages are numbered from `first` (the agent takes it from an
    /// increasing counter and its incarnation, so a holder never mistakes an earlier ledger's
    /// grant for a newer one of this), issuing no raise before `no_raise_until` (learning mode:
    /// a stretched lease after it is created, any raise of an earlier owner has lapsed).
    pub fn numbered_from(
        limit: u32,
        timing: Timing,
        first: u64,
        no_raise_until: Duration,
    ) -> Ledger {
        Ledger {
            limit,
            timing,
            window: Duration::ZERO,
            next_grant: first.max(1),
            no_raise_until,
            releasing: false,
            first_message: first.max(1),
            first_grant: first.max(1),
            holders: BTreeMap::new(),
        }
    }

    /// Counts each holder's reported `used` for two `window`s (stretched) after its report (see
    /// [`Account::counted_at`]). A ledger without a window ignores `used`.
    pub fn with_window(mut self, window: Duration) -> Ledger {
        self.window = window;
        self
    }

    /// How long a new owner stays in learning mode: a lease on a holder's clock, seen on the
    /// owner's.
    pub fn learning(timing: &Timing) -> Duration {
        timing.stretched(timing.lease)
    }

    /// The limit L this ledger splits.
    pub fn limit(&self) -> u32 {
        self.limit
    }

    /// Enrols `node` (nothing changes if it is enrolled): it enforces the cold share until it
    /// applies a grant.
    pub fn enrol(&mut self, node: &NodeId) {
        if self.holders.contains_key(node) {
            return;
        }
        self.holders.insert(
            node.clone(),
            Account::enrolled(self.first_message, self.next_grant),
        );
    }

    /// `node`'s agent started again and numbers its reports from `first_report` on: it may have
    /// lost the grant it applied (a start without pins enforces the cold share once it has
    /// joined), so it is counted at the cold share at least until a report of the new run says
    /// it applied a grant of this ledger, no older than one it applied before (the new run
    /// takes whatever grant reaches it first, a late copy of an older one included). Its grants
    /// stay counted too (a start with pins keeps enforcing them). A late report of the earlier
    /// run is ignored: what it says was applied may be gone.
    pub fn holder_restarted(&mut self, node: &NodeId, first_report: u64) {
        if let Some(account) = self.holders.get_mut(node) {
            account.cold_possible = true;
            account.reports_from = account.reports_from.max(first_report);
            // Its grant goes out again at once, not at the next keepalive.
            account.acked = None;
        }
    }

    /// Whether `node` is enrolled.
    pub fn is_enrolled(&self, node: &NodeId) -> bool {
        self.holders.contains_key(node)
    }

    /// Σ of the enrolled holders' reported demand at `now`, packets per window (see
    /// [`Account::demand_at`]).
    pub fn demand(&self, now: Duration) -> u64 {
        self.holders
            .values()
            .map(|a| u64::from(a.demand_at(now, &self.timing)))
            .sum()
    }

    /// The largest demand one holder reports (as [`Ledger::demand`] counts it).
    pub fn peak_demand(&self, now: Duration) -> u32 {
        self.holders
            .values()
            .map(|a| a.demand_at(now, &self.timing))
            .max()
            .unwrap_or(0)
    }

    /// Starts releasing the client: from now on no grant goes above the cold share.
    pub fn release(&mut self) {
        self.releasing = true;
    }

    pub fn is_releasing(&self) -> bool {
        self.releasing
    }

    /// In learning mode at `now`: no grant yet (see [`Ledger::numbered_from`]).
    pub fn is_learning(&self, now: Duration) -> bool {
        now < self.no_raise_until
    }

    /// Releasing, and no holder can be enforcing more than the cold share any more (every raise
    /// was superseded or its lease is over on the owner's clock): the holders may go back to the
    /// cold share, which sums to at most L, and the ledger may be dropped.
    pub fn releasable(&self, now: Duration, cold: u32) -> bool {
        self.releasing
            && self
                .holders
                .values()
                .all(|a| a.live.iter().all(|g| g.value <= cold || g.lapses_at <= now))
    }

    /// Drops the accounts of holders that are not among `members` (in order) any more:
    /// forgotten by the view (`super::membership`). The view counts no share for them, so
    /// an account kept would be counted at a cold share (or what it last admitted) for a node
    /// that is not there. An account goes only once none of its raises can be in force (each
    /// past its lease on the owner's clock) and what it reported admitted has left its window;
    /// until then it is counted as before. A node that comes back is enrolled afresh, counted at
    /// the cold share, its messages numbered above those the dropped account sent. Returns how
    /// many holders that are not members are left.
    pub fn forget_gone(&mut self, members: &[NodeId], now: Duration, cold: u32) -> usize {
        debug_assert!(members.is_sorted(), "members in order");
        let mut left = 0;
        let mut first_message = self.first_message;
        self.holders.retain(|node, account| {
            if members.binary_search(node).is_ok() {
                return true;
            }
            let raised = account
                .live
                .iter()
                .any(|g| g.value > cold && g.lapses_at > now);
            let admitted = account.used.is_some_and(|(_, until)| until > now);
            if raised || admitted {
                left += 1;
                return true;
            }
            first_message = first_message.max(account.next_message);
            false
        });
        self.first_message = first_message;
        left
    }

    /// The enrolled holders.
    pub fn enrolled(&self) -> impl Iterator<Item = &NodeId> {
        self.holders.keys()
    }

    /// Takes in `report` from `node`, received at `now` (owner clock). Reports from members not
    /// enrolled are ignored (see [`Ledger::enrol_and_receive`]).
    pub fn receive(&mut self, node: &NodeId, now: Duration, report: Report) {
        self.take_report(node, now, report, false);
    }

    /// [`Ledger::enrol`] then [`Ledger::receive`], with one search of the holders: a member
    /// that reports is live, and one that restarted enrols again.
    pub fn enrol_and_receive(&mut self, node: &NodeId, now: Duration, report: Report) {
        self.take_report(node, now, report, true);
    }

    fn take_report(&mut self, node: &NodeId, now: Duration, report: Report, enrol: bool) {
        let account = if enrol {
            let (first_message, first_grant) = (self.first_message, self.next_grant);
            self.holders
                .entry(node.clone())
                .or_insert_with(|| Account::enrolled(first_message, first_grant))
        } else {
            let Some(account) = self.holders.get_mut(node) else {
                return;
            };
            account
        };
        if report.seq < account.reports_from
            || account
                .last_report
                .is_some_and(|(seq, _)| seq >= report.seq)
        {
            return; // old or duplicate: the newer one already counted
        }
        account.last_report = Some((report.seq, now));
        account.demand = report.demand;
        // At most L: more is a bug or a hostile peer, and would only hold raises back.
        account.used = (!self.window.is_zero() && report.used > 0).then(|| {
            (
                report.used.min(self.limit),
                now + self.timing.stretched(self.window * 2),
            )
        });
        // This ledger's grants to this account (not an earlier, dropped account's), and none
        // older than one it applied: those stopped counting when it did (`live` keeps only
        // newer ones), so a holder that goes back to one (a new run of its agent, which takes
        // whatever grant arrives first, a late copy of an older one included) is not counted by
        // them but at the cold share at least, as it may enforce a lapsed grant's
        // `min(value, cold)`.
        let first = self
            .first_grant
            .max(account.first_grant)
            .max(account.acked_ever);
        let ours = report
            .applied
            .is_some_and(|a| a >= first && a < self.next_grant);
        if !ours && let Some(left) = report.raise_left {
            // Received after the holder sent it: the lease ends before `now + left` stretched.
            let until = now + self.timing.stretched(left);
            self.no_raise_until = self.no_raise_until.max(until);
        }
        // Another ledger's grant (an earlier owner's, or another node's, whose numbers may be
        // larger than ours, or one this ledger sent an account of the holder it dropped): not
        // ours to account for; the holder stays counted at the cold
        // share at least (its raises lapse during learning mode).
        if let Some(applied) = report
            .applied
            .filter(|&a| a >= first && a < self.next_grant)
        {
            // It never goes back to an older grant, nor to the cold share (until silence or a
            // release, which the bound covers).
            account.live.retain(|g| g.seq >= applied);
            account.lapsed = account.lapsed.filter(|&(seq, _)| seq >= applied);
            account.cold_possible = false;
            account.acked = account.acked.max(Some(applied));
            account.acked_ever = account.acked_ever.max(applied);
        } else {
            // A newer report that applies no grant of this ledger: whatever the holder applied
            // before, it enforces none of it now (it dropped it for the owner's silence, was
            // released or let go, or started again, and a message without a grant, as in
            // learning mode, does not bring it back). It may enforce the cold share: counted
            // so, even as its echo ends the silence on this side, until it reports applying
            // one of this ledger's grants again; its newest grant goes out again each round.
            account.cold_possible = true;
            account.acked = None;
        }
        if let Some(echo) = report.echo
            && let Some(at) = account.sent.at(echo)
        {
            account.echoed_sent_at = Some(account.echoed_sent_at.map_or(at, |a| a.max(at)));
        }
    }

    /// One round at `now` (owner clock) with `cold` the cold share and `others` the members not
    /// enrolled: the grants to send, one message per holder (holders whose grant is unchanged get
    /// it again, as a heartbeat; holders that never reported get none, as a grant needs a report
    /// to count its lease from).
    ///
    /// The targets are the water-filled demand. Each holder's grant is then the largest value up
    /// to its target that keeps, at every instant from now on, the bounds of all holders plus the
    /// cold shares of the others ≤ L. The bounds are step functions of time, so checking the
    /// instants where one of them changes covers all instants. Holders are taken cuts first, then
    /// raises from the smallest target up (max-min: the room goes to the small first).
    ///
    /// The sum of the bounds at those instants is computed once and kept up to date as grants
    /// are issued ([`Sums`]): a round costs O(n log n) for n holders (each has a few grants in
    /// flight), and an idle holder whose grant stays as it is costs no check at all.
    pub fn round(&mut self, now: Duration, cold: u32, others: u32) -> Vec<(NodeId, ToHolder)> {
        self.round_with(now, cold, others, Duration::ZERO)
    }

    /// [`Ledger::round`], but a holder gets a message only when it is due one: a grant issued
    /// this round, or one it has not acknowledged yet (sent again every round until it does:
    /// the copy may have been lost), its first message, or none for [`Timing::keepalive`]. What
    /// the ledger counts is the same: a message withheld would only have carried a grant the
    /// holder already has. A holder that hears the owner less often counts as silent sooner on
    /// both sides, never later on the owner's: the owner counts from the newest message the
    /// holder echoed, which the holder received no later than its newest.
    pub fn round_due(&mut self, now: Duration, cold: u32, others: u32) -> Vec<(NodeId, ToHolder)> {
        self.round_with(now, cold, others, self.timing.keepalive())
    }

    fn round_with(
        &mut self,
        now: Duration,
        cold: u32,
        others: u32,
        keepalive: Duration,
    ) -> Vec<(NodeId, ToHolder)> {
        let timing = self.timing;
        let budget = u64::from(self.limit).saturating_sub(u64::from(cold) * u64::from(others));
        let lease = timing.stretched(timing.lease);
        let wants: Vec<u32> = self
            .holders
            .values()
            .map(|a| a.demand_at(now, &timing))
            .collect();
        let mut targets = shares::targets(budget, &wants);
        if self.releasing || now < self.no_raise_until {
            for t in &mut targets {
                *t = (*t).min(cold);
            }
        }
        for account in self.holders.values_mut() {
            account.compact(now);
        }
        let mut grants: Vec<Option<Grant>> = vec![None; self.holders.len()];
        // Learning mode sends no grant at all: capping at the cold share would *raise* a holder
        // an earlier ledger had cut while others still enforce its raises.
        if now >= self.no_raise_until {
            let mut accounts: Vec<&mut Account> = self.holders.values_mut().collect();
            let now_bounds: Vec<u32> = accounts
                .iter()
                .map(|a| a.bound_at(now, cold, &timing))
                .collect();
            let mut order: Vec<usize> = (0..accounts.len()).collect();
            order.sort_by_key(|&i| (targets[i] > now_bounds[i], targets[i]));
            let mut sums = Sums::new(&accounts, now, lease, cold, &timing);
            for i in order {
                let account = &mut *accounts[i];
                let Some((answers, received)) = account.last_report else {
                    continue;
                };
                let lapses_at = received + lease;
                let target = targets[i];
                // An idle holder's grant, re-sent: its target is the value of its newest grant,
                // at most the cold share (so the same before and after its lease). The holder's
                // bound is at least that value at every instant from now on, so the check
                // below would allow all of it; it is skipped.
                let idle = account
                    .live
                    .last()
                    .is_some_and(|g| g.value == target && target <= cold);
                let value = if idle {
                    target
                } else {
                    sums.feasible(account, target, now, lapses_at, cold, budget, &timing)
                };
                // The same value, at most the cold share or with more than half its lease to go:
                // send it again (the holder ignores a grant it has, and takes it back if it
                // dropped it for silence; the message still shows the owner alive). A cut is
                // not renewed: its lease changes nothing of what either side counts.
                let unchanged = account.live.last().filter(|g| {
                    g.value == value && (value <= cold || g.lapses_at >= now + timing.lease / 2)
                });
                grants[i] = Some(match unchanged {
                    Some(g) => Grant {
                        seq: g.seq,
                        value,
                        answers: g.answers,
                    },
                    None => {
                        let seq = self.next_grant;
                        self.next_grant += 1;
                        sums.issue(
                            account,
                            Counted {
                                seq,
                                value,
                                answers,
                                lapses_at,
                            },
                            now,
                            cold,
                            &timing,
                        );
                        Grant {
                            seq,
                            value,
                            answers,
                        }
                    }
                });
            }
        }
        let mut out = Vec::with_capacity(self.holders.len());
        for ((id, account), grant) in self.holders.iter_mut().zip(grants) {
            // A grant issued this round is above every acknowledged one, so unacknowledged too.
            let due = grant.is_some_and(|g| account.acked.is_none_or(|a| a < g.seq))
                || account.last_report.is_none()
                || account
                    .sent
                    .newest_at()
                    .is_none_or(|at| now.saturating_sub(at) >= keepalive);
            if !due {
                continue;
            }
            let message = account.next_message;
            account.next_message += 1;
            account.sent.push(message, now);
            out.push((
                id.clone(),
                ToHolder {
                    message,
                    grant,
                    terms: Some(Terms {
                        lease: timing.lease,
                        silence: timing.silence,
                    }),
                },
            ));
        }
        out
    }

    /// The most that all members may be enforcing at `now`: the bounds of the enrolled plus the
    /// cold shares of the `others`. Never above L (the tests assert it; `round` keeps it).
    pub fn in_force_bound(&self, now: Duration, cold: u32, others: u32) -> u64 {
        let fixed = u64::from(cold) * u64::from(others);
        fixed
            + self
                .holders
                .values()
                .map(|a| u64::from(a.bound_at(now, cold, &self.timing)))
                .sum::<u64>()
    }
}

/// The Σ of all holders' counts ([`Account::counted_at`]: their bounds, or more while a window
/// holds more) at each instant one round must check, kept up to date as the
/// round issues grants, so that a round costs O(n log n) for n holders rather than the O(n³) of
/// summing every other holder's bound at every instant for every holder.
///
/// The instants are now, every instant at which some holder's bound may change, and the lapse
/// of every grant the round may issue (a report's arrival plus the stretched lease): every bound
/// is constant between two of them. The sums live in a segment tree over the instants with range
/// add (a grant only ever raises its holder's count, never lowers it) and range max.
struct Sums {
    instants: Vec<Duration>,
    /// Per tree node: the largest sum in its range, with its own `add` and none of its
    /// ancestors'.
    max: Vec<u64>,
    /// Per tree node: what was added to its whole range.
    add: Vec<u64>,
}

impl Sums {
    fn new(
        accounts: &[&mut Account],
        now: Duration,
        lease: Duration,
        cold: u32,
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
        for a in accounts {
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
    fn index(&self, at: Duration) -> usize {
        self.instants.partition_point(|&t| t < at)
    }

    fn build(&mut self, node: usize, lo: usize, hi: usize, leaves: &[u64]) {
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
    fn raise(&mut self, from: usize, to: usize, v: u64) {
        self.raise_in(1, 0, self.instants.len(), from, to, v);
    }

    fn raise_in(&mut self, node: usize, lo: usize, hi: usize, from: usize, to: usize, v: u64) {
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
    fn most(&self, from: usize, to: usize) -> u64 {
        self.most_in(1, 0, self.instants.len(), from, to)
    }

    fn most_in(&self, node: usize, lo: usize, hi: usize, from: usize, to: usize) -> u64 {
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
    fn runs(
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
    fn feasible(
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
    fn issue(
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

#[cfg(test)]
mod tests;
