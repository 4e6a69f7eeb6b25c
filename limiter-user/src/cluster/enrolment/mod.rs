//! Enrolment: how this member takes part in the split of a hot global client's limit, as a
//! holder (it enforces what the client's owner grants it) and as the owner of the clients that
//! rendezvous hashing gives it. Pure: time is injected (the node's CLOCK_MONOTONIC), the maps
//! and the wire are the caller's.
//!
//! The protocol, over the rules of [`super::lease`]:
//! - A client grows hot on a member when its count in a window reaches 0.8 of the share in force
//!   there (`limiter_common::maps::hot_count`: the programs report it once a window, packets and
//!   API checks alike), when the fast path drops one of its packets (the move into `LIMITED`
//!   reports it; an entry that does not move reports its first denial and one in 256), or when
//!   an API check of a global ID is denied (the checker notes it): the member starts holding it,
//!   attached to the client's owner, and reports its demand to the owner.
//! - An owner that receives a report of hot demand (at least 0.8 of the cold share) for a client
//!   it owns and has no ledger for opens one and enrols every live member, so that a client
//!   whose rate creeps up is enrolled, and out of learning mode, before it reaches its cold
//!   share; each enrolled member attaches to the owner on its first message
//!   and reports too. The owner water-fills the reported demand into grants every round (cuts at
//!   once, raises in the room acknowledged cuts and lapsed leases leave) and opens in learning
//!   mode: no raise for a stretched lease, so any raise an earlier owner issued has lapsed.
//! - Enrolment is sticky: a holder takes grants only from the owner it is attached to, until it
//!   is released or the owner goes silent (the silence limit, after which the holder is back at
//!   the cold share). New ledgers and attachments happen only while every member reports the
//!   same view: with views that differ, two members could take themselves for the owner.
//! - A client whose demand stays under half of what the cold shares give, and under 0.8 of the
//!   cold share on every member, for [`QUIET_BEFORE_RELEASE`] is released: no more raises;
//!   once no raise can be in force the owner tells the holders, which go back to the cold share
//!   (Σ ≤ L), and drops the ledger.
//! - Every holder's reports and every ledger's grants and messages are numbered from
//!   `incarnation << 48 | now in µs`, so numbers only grow across ledgers, holders and restarts.
//! - Rounds send news, not every held client every round: a holder reports while the client
//!   sends to it (or its window holds some), when it stopped, applied another grant, holds a
//!   raise, or heard the owner since its last report; an owner messages a holder with a new or
//!   unacknowledged grant, or one that never reported. Both sides send a keepalive after half a
//!   lease without ([`Timing::keepalive`]). A member a hot client sends nothing to (most of
//!   them, in a large cluster) so costs two entries a half lease instead of two a round; what
//!   either side counts is unchanged (see [`Ledger::round_due`]). The node keeps what a
//!   heartbeat could not carry (see [`Outgoing::merge`]): news is sent once, so it must wait,
//!   never be dropped.
//!
//! The parts: the state, hot notices and observations here; `intake.rs` takes in peers'
//! messages (within a heartbeat's budget of hashes), `round.rs` runs a round (reports, grants,
//! and the datapath's changes), `written.rs` keeps what the datapath holds.

use std::{
    collections::{HashMap, VecDeque},
    time::Duration,
};

use limiter_common::{addr::ClientKey, maps::hot_count};

use super::{
    NodeId, PolicyName,
    demand::SHORT_SPANS,
    lease::{Holder, Ledger, Report, Timing, ToHolder},
    owner,
};

/// Whether one member's `demand` (packets per window) makes a client hot there: at least
/// [`hot_count`] of the `cold` share, as the programs report it, and not nothing.
fn is_hot(demand: u32, cold: u32) -> bool {
    demand > 0 && demand >= hot_count(cold)
}

/// A client quiet for this long (demand under half of what the cold shares give) is released.
pub const QUIET_BEFORE_RELEASE: Duration = Duration::from_secs(5);

/// A holder's report for one client, to the client's owner.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ReportMsg {
    pub client: ClientKey,
    /// The global policy, by its name on the wire ([`crate::cluster::GlobalPolicy::wire_name`]):
    /// what it is, never where it sits in a member's config.
    pub policy: PolicyName,
    pub report: Report,
}

/// An owner's message for one client, to one holder.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GrantMsg {
    pub client: ClientKey,
    pub policy: PolicyName,
    pub message: ToHolder,
    /// The owner released the client: back to the cold share.
    pub release: bool,
}

/// What one round sends to one member.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Outgoing {
    pub reports: Vec<ReportMsg>,
    pub grants: Vec<GrantMsg>,
}

impl Outgoing {
    /// Adds a newer round's messages for the same member to those not sent yet: the newest
    /// report and the newest grant message per client, never a queue (a report or message
    /// supersedes an older one of its client: it says all the older said, and the other side
    /// ignores an older one that arrives after it). An entry keeps its place, so what waits
    /// longest goes first. A round sends news only once (see [`Enrolment::round_writing`]), so
    /// what a heartbeat could not carry must wait here, not be dropped.
    pub fn merge(&mut self, newer: Outgoing) {
        fn merge_by<T>(old: &mut Vec<T>, newer: Vec<T>, client: impl Fn(&T) -> ClientKey) {
            if old.is_empty() {
                *old = newer;
                return;
            }
            let mut at: HashMap<ClientKey, usize> = old
                .iter()
                .enumerate()
                .map(|(i, m)| (client(m), i))
                .collect();
            for m in newer {
                match at.get(&client(&m)) {
                    Some(&i) => old[i] = m,
                    None => {
                        at.insert(client(&m), old.len());
                        old.push(m);
                    }
                }
            }
        }
        merge_by(&mut self.reports, newer.reports, |r| r.client);
        merge_by(&mut self.grants, newer.grants, |g| g.client);
    }

    /// Puts back messages [`Outgoing::take`] took out that did not go through (the heartbeat
    /// that carried them got no answer): in front of those waiting, as they waited longer,
    /// except for a client whose newer message waits already (it says all the older said).
    /// Sending one twice is harmless: the other side takes a report or grant message only if
    /// it is newer than its client's last.
    pub fn put_back(&mut self, unsent: Outgoing) {
        fn put_back_by<T>(waiting: &mut Vec<T>, unsent: Vec<T>, client: impl Fn(&T) -> ClientKey) {
            if unsent.is_empty() {
                return;
            }
            let newer: std::collections::HashSet<ClientKey> = waiting.iter().map(&client).collect();
            let mut all: Vec<T> = unsent
                .into_iter()
                .filter(|m| !newer.contains(&client(m)))
                .collect();
            all.append(waiting);
            *waiting = all;
        }
        put_back_by(&mut self.reports, unsent.reports, |r| r.client);
        put_back_by(&mut self.grants, unsent.grants, |g| g.client);
    }

    /// Takes out the `most` reports and `most` grant messages that waited longest.
    pub fn take(&mut self, most: usize) -> Outgoing {
        let reports = self.reports.len().min(most);
        let grants = self.grants.len().min(most);
        Outgoing {
            reports: self.reports.drain(..reports).collect(),
            grants: self.grants.drain(..grants).collect(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.reports.is_empty() && self.grants.is_empty()
    }
}

/// The cluster as enrolment sees it at one instant.
#[derive(Debug, Clone, Copy)]
pub struct View<'a> {
    /// Every member's id, this node's included (the set rendezvous hashing picks owners from),
    /// in order.
    pub members: &'a [NodeId],
    /// The members that are live now, this node included.
    pub live: &'a [NodeId],
    /// The agreed member count N (members without a known id included).
    pub agreed_members: u32,
    /// Every member reports this node's view hash.
    pub agreed: bool,
    /// By member (as `members`; empty: none known), the member count whose cold share an owner
    /// counts it at (`Membership::counts`: what its maps hold, as it reported last, at most this
    /// node's count): one that has not taken up a join yet enforces the larger share of fewer
    /// members. A member without one is counted at this node's share, as is one whose count
    /// gives a smaller share.
    pub counts: &'a [Option<u32>],
}

/// A global policy as enrolment needs it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PolicyInfo {
    /// L, packets per window across the cluster.
    pub limit: u32,
    pub window: Duration,
    /// The cold share in force on this node.
    pub cold: u32,
}

/// A change of the grants the datapath enforces.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Write {
    /// The client's grant: its value, the end of its lease (`None`: lapsed, a raise no more)
    /// and the silence limit it is held under (kept with it, for a restart).
    Set {
        client: ClientKey,
        value: u32,
        until: Option<Duration>,
        silence: Duration,
    },
    /// Back to the cold share.
    Clear(ClientKey),
}

impl Write {
    /// The client it changes.
    pub fn client(&self) -> ClientKey {
        match *self {
            Write::Set { client, .. } | Write::Clear(client) => client,
        }
    }
}

/// Counts for `limiter cluster status` and the metrics.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Counts {
    /// Clients this node owns (a ledger open).
    pub owned: u64,
    /// Clients this node holds (reports on, enforces grants for).
    pub held: u64,
    /// Of those, with a grant in force.
    pub granted: u64,
    /// Clients refused for want of room (`--max-global-clients`): they keep the cold share.
    pub refused: u64,
    /// Owner messages ignored: from a member that is not the client's owner here, or under a
    /// policy that is not the client's global policy here.
    pub foreign: u64,
    /// Grant changes the datapath refused (offered again next round; until then the reports
    /// say the older grant is applied).
    pub unwritten: u64,
    /// Peers' messages about clients this node neither owns nor holds that were ignored, past
    /// a heartbeat's [`MAX_HASHES_PER_HEARTBEAT`] (counted when sent again).
    pub over_budget: u64,
    /// Owned clients whose ledger is in learning mode.
    pub learning: u64,
    /// Raises held here that ran out before a newer grant came: the kernel went back to the
    /// cold share on its own.
    pub raises_lapsed: u64,
    /// Global clients the adaptive loop caps here (`crate::adaptive::global`).
    pub capped: u64,
}

/// One global client as a member sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClientView {
    /// The member that splits its limit, while this one holds it.
    pub owner: Option<NodeId>,
    /// The allowance the datapath enforces now: the grant's while its lease runs, else at most
    /// the cold share.
    pub share: u32,
    /// The grant the datapath holds.
    pub grant: Option<u32>,
    /// Packets per window this member reports (while it holds the client).
    pub demand: Option<u32>,
    /// On the owner: Σ of the members' reported demand.
    pub cluster_demand: Option<u64>,
}

/// A client this node owns, as [`Enrolment::owned_views`] shows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OwnedView {
    pub client: ClientKey,
    pub policy: PolicyName,
    /// The policy's limit across the cluster.
    pub limit: u32,
    /// Σ of the holders' reported demand.
    pub demand: u64,
    /// The ledger grants nothing above the cold share yet (a new owner's learning mode).
    pub learning: bool,
    /// Each enrolled holder, in id order: its demand, and the newest grant sent to it (at most
    /// the cold share once its lease is over).
    pub holders: Vec<(NodeId, u32, Option<u32>)>,
}

/// The datapath's side of a round: applies grant changes in order and returns those it refused.
pub type WriteGrants<'a> = dyn FnMut(&[Write]) -> Vec<Write> + 'a;

struct Held {
    owner: NodeId,
    policy: PolicyName,
    holder: Holder,
    /// (time, passed + dropped) of the client's entry, newest last: those [`demand`] can still
    /// use (see [`Enrolment::observe`]).
    samples: VecDeque<(Duration, u64)>,
    /// The policy's window as of the last round (`None`: no round yet).
    window: Option<Duration>,
    /// The policy's cold share here as of the last round (`None`: no round yet).
    cold: Option<u32>,
    demand: u32,
    /// What the client's sliding window here counted as admitted at the newest sample.
    used: u32,
    /// When this node started holding it.
    attached_at: Duration,
    /// The newest grant counted as a lapsed raise.
    lapsed: Option<u64>,
    /// The last report sent (see [`Enrolment::round_writing`]).
    reported: Option<Reported>,
    /// Set when a round found nothing to tell the owner and nothing that could change but by
    /// an event: until then (a keepalive, the owner's silence, a raise's lapse) rounds and
    /// writes pass it by (its grant, if any, is stamped [`written::QUIET`]), unless a sample, a
    /// message, a write or a cap wakes it ([`written::wake`]). Most held clients of a large
    /// cluster send nothing to this member: this keeps a round's cost with its news.
    quiet_until: Option<Duration>,
}

impl Held {
    /// The client sends nothing here, and its samples say so at any later time: every count
    /// kept is the same (they never decrease), so [`demand`] is 0 whatever the window holds.
    fn is_idle(&self) -> bool {
        self.used == 0
            && self
                .samples
                .front()
                .zip(self.samples.back())
                .is_none_or(|(first, last)| first.1 == last.1)
    }

    /// For a holder with nothing to tell its owner at `now` (with `in_force` its grant in
    /// force then, and `silence` the node's silence limit): the first instant at which time
    /// alone could change that, its keepalive, its owner's silence (the grant in force ends;
    /// or, silent already, the let-go), or the lapse of a raise not yet counted.
    fn quiet_deadline(
        &self,
        now: Duration,
        silence: Duration,
        in_force: Option<(u32, Option<Duration>)>,
    ) -> Duration {
        let holder = &self.holder;
        let mut until = self.reported.map_or(now, |r| r.at + holder.keepalive());
        until = until.min(match holder.silent_from() {
            Some(at) if at > now => at,
            _ => self.attached_at + silence,
        });
        if let Some((_, Some(lapse))) = in_force
            && lapse > now
        {
            until = until.min(lapse);
        }
        until
    }
}

/// What a holder's last report said, to tell whether the next one has news.
#[derive(Debug, Clone, Copy)]
struct Reported {
    at: Duration,
    /// Reports in a row, up to this one, that said the client neither sends here (demand) nor
    /// has any of it in the window (used): 0 for a busy one.
    idle: u8,
    applied: Option<u64>,
    echo: Option<u64>,
}

impl Reported {
    /// Whether this report has news for the owner after `last`: the client sends here
    /// (`idle` 0), or stopped since (said twice, so that one lost report does not leave the
    /// owner holding room for it until the keepalive); another grant applied; a raise in force
    /// (`raise`); a message of the owner came since (answered at once, so that a grant whose
    /// acknowledgement was lost is acknowledged again when the owner sends it again); or none
    /// sent for `keepalive`. A holder with none of these has told the owner all it knows.
    fn has_news(self, last: Option<Reported>, raise: bool, keepalive: Duration) -> bool {
        let Some(last) = last else {
            return true;
        };
        self.idle == 0
            || last.idle < 2
            || self.applied != last.applied
            || self.echo != last.echo
            || raise
            || self.at.saturating_sub(last.at) >= keepalive
    }
}

/// The smallest number a member's reports, grants and messages carry in incarnation
/// `incarnation` (see the module docs).
fn first_number(incarnation: u64) -> u64 {
    incarnation << 48
}

struct Owned {
    policy: PolicyName,
    ledger: Ledger,
    quiet_since: Option<Duration>,
    /// Its ledger has enrolled the live members, and its owner was checked, under the view of
    /// the last round (see `round_writing`).
    checked: bool,
    /// Holders of its ledger that may not be members any more, not dropped yet (see
    /// `Ledger::forget_gone`; a holder enrolled by its report counts until a round looks): looked
    /// at again each round whose view agrees until none is left.
    gone: usize,
}

/// This member's enrolment state (see the module docs).
pub struct Enrolment {
    me: NodeId,
    timing: Timing,
    incarnation: u64,
    capacity: usize,
    last_number: u64,
    held: HashMap<ClientKey, Held>,
    owned: HashMap<ClientKey, Owned>,
    /// The members and live members of the last round whose view agreed: while they stay the
    /// same, a ledger checked under them needs no enrolling or owner check again.
    checked_view: (Vec<NodeId>, Vec<NodeId>),
    /// Hot notices that came while views differed: (policy, when), at most `capacity`.
    pending: HashMap<ClientKey, (PolicyName, Duration)>,
    /// What the datapath holds, as last written.
    written: HashMap<ClientKey, Written>,
    /// The policies as the holders' last round saw them: another value (a reload) has every
    /// quiet holder looked at again.
    seen_policies: HashMap<PolicyName, Option<PolicyInfo>>,
    /// Grants adopted from a previous run are kept until then, unless a holder takes over.
    adopted_until: Option<Duration>,
    /// Adopted raises whose lease ran past the longest this version grants, to be written
    /// shortened to it while they stay as adopted: (client, the lease pinned, the lease
    /// shortened). See [`Enrolment::adopt`].
    shorten: Vec<(ClientKey, Duration, Duration)>,
    /// What `written` held, before the writes in flight, of each client they change (`None`:
    /// nothing): the datapath's update of one client is atomic, so a refused write leaves it
    /// holding exactly that, and [`Enrolment::unwritten`] records it again.
    before: HashMap<ClientKey, Option<Written>>,
    /// The adaptive loop's caps on global clients (`crate::adaptive::global`): what is written
    /// for a client is at most its cap (a client held or not), and a held client's demand is
    /// reported as at most its cap.
    caps: HashMap<ClientKey, u32>,
    refused: u64,
    foreign: u64,
    /// Messages [`Enrolment::take_in`] ignored for want of rendezvous hashes.
    over_budget: u64,
    unwritten: u64,
    raises_lapsed: u64,
    /// Calls of `Enrolment::writes` so far: the stamp of what the last one wanted written.
    writes_made: u64,
    /// Where [`Enrolment::take_in`] starts in a heartbeat's messages (a different place each
    /// time, so that a sender whose messages are cut short each heartbeat is not cut at the
    /// same ones each time).
    rotation: u64,
}

impl Enrolment {
    /// `capacity`: most clients held, and most owned (`--max-global-clients`).
    pub fn new(me: NodeId, timing: Timing, incarnation: u64, capacity: usize) -> Enrolment {
        Enrolment {
            me,
            timing,
            incarnation,
            capacity,
            last_number: 0,
            held: HashMap::new(),
            owned: HashMap::new(),
            checked_view: (Vec::new(), Vec::new()),
            pending: HashMap::new(),
            written: HashMap::new(),
            seen_policies: HashMap::new(),
            adopted_until: None,
            shorten: Vec::new(),
            before: HashMap::new(),
            caps: HashMap::new(),
            refused: 0,
            foreign: 0,
            over_budget: 0,
            unwritten: 0,
            raises_lapsed: 0,
            writes_made: 0,
            rotation: 0x9e37_79b9_7f4a_7c15,
        }
    }

    pub fn timing(&self) -> Timing {
        self.timing
    }

    /// New lease timing (a reload changed `peer_timeout`): for ledgers and holders opened from now.
    pub fn set_timing(&mut self, timing: Timing) {
        self.timing = timing;
        // A quiet holder's deadline counts the old silence limit (the let-go of one whose
        // owner is silent): every holder is looked at again.
        for (client, held) in &mut self.held {
            written::wake(held, &mut self.written, client);
        }
    }

    fn number(&mut self, now: Duration) -> u64 {
        let micros = u64::try_from(now.as_micros()).unwrap_or(u64::MAX) & ((1 << 48) - 1);
        let n = (first_number(self.incarnation) | micros).max(self.last_number + 1);
        self.last_number = n;
        n
    }

    fn attach(
        &mut self,
        client: ClientKey,
        owner: NodeId,
        policy: PolicyName,
        now: Duration,
    ) -> bool {
        if self.held.len() >= self.capacity {
            self.refused += 1;
            return false;
        }
        let first = self.number(now);
        self.held.insert(
            client,
            Held {
                owner,
                policy,
                holder: Holder::numbered_from(self.timing, first),
                samples: VecDeque::new(),
                window: None,
                cold: None,
                demand: 0,
                used: 0,
                attached_at: now,
                lapsed: None,
                reported: None,
                quiet_until: None,
            },
        );
        true
    }

    /// The fast path (or the checker) reported `client` (of global policy `policy`) over its
    /// limit here. A client already held is not attached again (notices repeat while a client
    /// stays over its limit); while the members' views differ (no attachment then) the notice is
    /// kept, and taken up at the first round they agree.
    pub fn hot(&mut self, now: Duration, view: &View<'_>, client: ClientKey, policy: PolicyName) {
        if self.held.contains_key(&client) {
            return;
        }
        if !view.agreed {
            self.defer(client, policy, now);
            return;
        }
        self.pending.remove(&client);
        if let Some(owner) = owner::owner(&client, view.members) {
            let owner = owner.clone();
            self.attach(client, owner, policy, now);
        }
    }

    /// Keeps a hot notice for the first round whose view agrees (at most `capacity` of them):
    /// one that came while views differed, or while the node ran no rounds (cut off, joining).
    pub fn defer(&mut self, client: ClientKey, policy: PolicyName, now: Duration) {
        if self.pending.len() < self.capacity || self.pending.contains_key(&client) {
            self.pending.insert(client, (policy, now));
        }
    }

    /// Takes up the hot notices kept while views differed, once they agree. A notice that is no
    /// longer hot costs one silence limit of reports (see `round`'s let-go rule).
    fn take_pending(&mut self, now: Duration, view: &View<'_>) {
        if !view.agreed || self.pending.is_empty() {
            return;
        }
        for (client, (policy, _)) in std::mem::take(&mut self.pending) {
            self.hot(now, view, client, policy);
        }
    }

    /// Member `node` started again (a new incarnation, [`super::membership::Heard::Restarted`]):
    /// every ledger here counts it at the cold share at least from now on (see
    /// [`Ledger::holder_restarted`]). Called before this node answers the member's heartbeat:
    /// the member's join gate waits for that answer, then one lease more, so that every raise
    /// granted while it was counted lower has lapsed when it takes its cold share.
    pub fn holder_restarted(&mut self, node: &NodeId, incarnation: u64) {
        let first_report = first_number(incarnation);
        for owned in self.owned.values_mut() {
            owned.ledger.holder_restarted(node, first_report);
        }
    }

    /// The clients held, whose counters the caller reads for [`Enrolment::observe`].
    pub fn held(&self) -> impl Iterator<Item = &ClientKey> {
        self.held.keys()
    }

    /// The global policy `client` is held under, if it is held.
    pub fn held_under(&self, client: &ClientKey) -> Option<PolicyName> {
        self.held.get(client).map(|h| h.policy)
    }

    /// Stops holding `client` (its entry is under another policy now, after a reload): a raise
    /// is cleared at the next write, and it is back to the share its entry's policy gives; a
    /// cut stays for its silence limit from `now` (see [`written::keep_cut`]).
    pub fn let_go(&mut self, client: &ClientKey, now: Duration) {
        if let Some(mut held) = self.held.remove(client) {
            written::wake(&mut held, &mut self.written, client);
            written::keep_cut(&mut self.written, client, held.cold, now);
        }
    }

    /// `count`: the client's passed + dropped now (`None`: it has no entry, so nothing came);
    /// `used`: what its sliding window counts as admitted now (reported to the owner, which
    /// raises no other holder into room this node's window still holds).
    pub fn observe(&mut self, now: Duration, client: &ClientKey, count: Option<u64>, used: u32) {
        let Some(held) = self.held.get_mut(client) else {
            return;
        };
        held.used = if count.is_some() { used } else { 0 };
        match count {
            // Counters that went back: a new entry (the old one aged out); start afresh.
            Some(c) if held.samples.back().is_some_and(|&(_, last)| c < last) => {
                held.samples.clear();
                held.samples.push_back((now, c));
            }
            Some(c) => held.samples.push_back((now, c)),
            None => held.samples.clear(),
        }
        // Only what `demand` may still use, at `now` or later: the newest samples the longest
        // short span (`SHORT_SPANS`) needs, and those since the window's start (an older one is
        // older than every later start too). Without this a member would keep 64 samples
        // (1.5 KiB) of every hot client of the cluster. A reload that lengthens the window
        // measures over what is kept.
        let from = held
            .window
            .map_or(Duration::ZERO, |w| now.saturating_sub(w));
        while held.samples.len() > MAX_SAMPLES
            || (held.samples.len() > SHORT_SPANS[SHORT_SPANS.len() - 1] + 1
                && held.samples.front().is_some_and(|&(at, _)| at < from))
        {
            held.samples.pop_front();
        }
        if !held.is_idle() {
            written::wake(held, &mut self.written, client);
        }
    }

    pub fn counts(&self, now: Duration) -> Counts {
        Counts {
            owned: self.owned.len() as u64,
            held: self.held.len() as u64,
            granted: self
                .held
                .values()
                .filter(|h| h.holder.in_force(now).is_some())
                .count() as u64,
            refused: self.refused,
            foreign: self.foreign,
            over_budget: self.over_budget,
            unwritten: self.unwritten,
            learning: self
                .owned
                .values()
                .filter(|o| o.ledger.is_learning(now))
                .count() as u64,
            raises_lapsed: self.raises_lapsed,
            capped: self.caps.len() as u64,
        }
    }

    /// One global client as this member sees it at `now`, when its cold share is `cold`
    /// (`limiter stats`).
    pub fn client_view(&self, now: Duration, client: &ClientKey, cold: u32) -> ClientView {
        let held = self.held.get(client);
        let grant = self.written.get(client).filter(|w| w.value != u32::MAX);
        ClientView {
            owner: held.map(|h| h.owner.clone()),
            share: grant.map_or(cold, |w| match w.until {
                Some(until) if now < until => w.value,
                _ => w.value.min(cold),
            }),
            grant: grant.map(|w| w.value),
            demand: held.map(|h| h.demand),
            cluster_demand: self.owned.get(client).map(|o| o.ledger.demand(now)),
        }
    }

    /// The clients this node owns, at most `most`, those with the most demand first (ties in
    /// key order), each with its ledger's split (`cold`: the cold share here of a global
    /// policy): for `limiter cluster status`. One pass over the owned clients, and a sort of
    /// the `most` kept.
    pub fn owned_views(
        &self,
        now: Duration,
        most: usize,
        cold: &dyn Fn(PolicyName) -> Option<u32>,
    ) -> Vec<OwnedView> {
        if most == 0 {
            return Vec::new();
        }
        let mut demands: Vec<(u64, &ClientKey, &Owned)> = self
            .owned
            .iter()
            .map(|(client, o)| (o.ledger.demand(now), client, o))
            .collect();
        let busiest_first = |a: &(u64, &ClientKey, &Owned), b: &(u64, &ClientKey, &Owned)| {
            b.0.cmp(&a.0).then_with(|| a.1.cmp(b.1))
        };
        if demands.len() > most {
            demands.select_nth_unstable_by(most - 1, busiest_first);
        }
        demands.truncate(most);
        demands.sort_unstable_by(busiest_first);
        demands
            .into_iter()
            .map(|(demand, client, o)| OwnedView {
                client: *client,
                policy: o.policy,
                limit: o.ledger.limit(),
                demand,
                learning: o.ledger.is_learning(now),
                holders: o
                    .ledger
                    .holders_view(now, cold(o.policy).unwrap_or(o.ledger.limit())),
            })
            .collect()
    }

    /// Whether this node owns `client` (a ledger is open for it).
    pub fn owns(&self, client: &ClientKey) -> bool {
        self.owned.contains_key(client)
    }

    /// Whether this node holds `client` (reports on it, enforces its owner's grants).
    pub fn holds(&self, client: &ClientKey) -> bool {
        self.held.contains_key(client)
    }
}

/// Most samples kept of a held client (a window of more rounds is measured over the newest).
const MAX_SAMPLES: usize = 64;

mod intake;
mod round;
mod written;

pub use intake::MAX_HASHES_PER_HEARTBEAT;
pub use written::PinnedGrant;
use written::Written;

#[cfg(test)]
mod tests;
