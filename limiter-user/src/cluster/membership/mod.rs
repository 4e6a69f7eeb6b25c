//! Who the members are, which of them answer, and what that means for the shares: pure, with
//! time injected (every method takes `now`; only durations on this node's clock are compared).
//!
//! A node dials its peers' endpoints (the `peers:` entries, resolved) with heartbeats, and
//! answers theirs. A peer is **live** while some answer of its echoes a heartbeat we sent within
//! `peer_timeout` (counted from when we sent it): one-way partitions, where our heartbeats
//! arrive but the answers do not, make it silent too.
//!
//! **Members** are this node, every endpoint (one each while its id is unknown), and every node
//! heard from (an answer or a heartbeat of its own) within `forget` (much longer than
//! `peer_timeout`): a member that goes silent still counts, because its pinned program keeps
//! enforcing its share without an agent. For `peer_timeout` after it is first heard from, a
//! member that no endpoint has answered as is taken for one of the endpoints that have never
//! answered, so that a start does not count each peer twice (see
//! `Membership::heard_for_endpoints`). Joins count at once (smaller shares, safe); leaves only
//! after `forget` (the hysteresis). Each heartbeat carries the sender's member count and a hash
//! of its member list and global policies; the **agreed** count is the largest any member
//! reported within `forget`, so while views disagree this node uses the smaller cold share.
//!
//! The **phase** decides what a global policy's limit L becomes here ([`ShareView::share`]):
//! - *joining*: a node that started without pins admits nothing of global policies until every
//!   endpoint has answered a heartbeat of this run counting at least as many members as we do
//!   (a member reports no more than the count the shares its maps hold were computed with: see
//!   `reported_members`)
//!   (it has counted us, and seen this incarnation), or `join_limit` passes (a member down
//!   meanwhile may hold the share of a smaller count: see the README on adding members), and
//!   then for one stretched lease more (`hold`): raises that owners granted before they counted
//!   this node (for fewer members), or while they counted it at a cut its previous run applied,
//!   have lapsed by then, so its cold share never comes on top of them. Owners count a member
//!   that started again at the cold share at least from the first heartbeat (or answer) of it
//!   they take in, before they answer anything ([`Heard::Restarted`]); everything they grant
//!   after that already leaves room for it. This holds for owners among this node's endpoints
//!   (the gate waits for their answers), with the same lease (the same `peer_timeout`);
//! - *cut off*: endpoints exist but none is live: `partition` applies (`share` ⌊L/N⌋, `local` L,
//!   `deny` 0);
//! - otherwise the cold share ⌊L/N⌋.

use std::{
    collections::{BTreeMap, BTreeSet},
    net::SocketAddr,
    time::{Duration, Instant},
};

pub use self::forget::{ForgetRefusal, Forgotten};
use super::{
    NodeId,
    config::{MAX_MEMBERS, Partition},
    lease::{self, Ledger},
    shares::cold_share,
};

/// A hash that is the same on every build (the view hashes of members built by different
/// toolchains must compare): the first 8 bytes of SHA-256.
pub fn stable_hash(bytes: &[u8]) -> u64 {
    use sha2::Digest as _;
    let digest = sha2::Sha256::digest(bytes);
    let mut first = [0u8; 8];
    first.copy_from_slice(&digest[..8]);
    u64::from_le_bytes(first)
}

/// What a member says of itself in each heartbeat and each answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Report {
    pub node: NodeId,
    /// Incremented at each start of the node (kept in its `--state-dir`).
    pub incarnation: u64,
    /// Increments with every heartbeat the node sends (answers carry the one they answer).
    pub seq: u64,
    /// The sender's member count.
    pub members: u32,
    /// The sender's [`Membership::view_hash`].
    pub view_hash: u64,
    /// The sender's policies hash alone ([`Membership::set_policies_hash`]; 0: not sent).
    pub policies_hash: u64,
    /// The member count the cold shares the sender's maps hold were computed with
    /// ([`ShareView::share_members`]; 0: none, or not sent).
    pub share_members: u32,
}

/// Why a peer's message is refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    #[error("the peer claims this node's own id {0}")]
    OwnId(NodeId),
    #[error("{MAX_MEMBERS} members are known already; {0} is not taken in")]
    TooMany(NodeId),
    #[error("a member count of 0 is not possible (a node counts itself)")]
    NoMembers,
    #[error(
        "a member count of {0} is more than any node's view holds (at most {MAX_REPORTED_MEMBERS})"
    )]
    TooManyMembers(u32),
}

/// The largest member count a peer may report, and the most this node counts itself: far over
/// what any view holds ([`MAX_MEMBERS`] heard members, as many endpoints, the `peers` entries
/// not yet resolved, and the addresses DNS gave beyond [`MAX_MEMBERS`]). A larger count (a
/// peer's bug, or a hostile one with the cluster's credentials) would take every global
/// policy's cold share to nothing, and stay the agreed count until `forget`.
pub const MAX_REPORTED_MEMBERS: u32 = 1 << 16;

/// What a peer's report told membership.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Heard {
    /// A member already known in this incarnation, or one not heard of before.
    Known,
    /// A member known in an earlier incarnation: its agent started again, and whatever grant it
    /// enforced may be gone (a start without pins enforces the cold share once it has joined).
    /// Owners must count it at the cold share at least before this node answers it.
    Restarted,
}

/// The phase a node is in (see the module docs).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    /// No peers configured or resolved: the node is the whole cluster.
    Alone,
    /// Started without pins, not yet counted by its peers: admits nothing of global policies.
    Joining,
    /// At least one peer is live.
    Connected,
    /// Peers exist, none is live.
    CutOff,
}

impl Phase {
    pub fn as_str(self) -> &'static str {
        match self {
            Phase::Alone => "alone",
            Phase::Joining => "joining",
            Phase::Connected => "connected",
            Phase::CutOff => "cut-off",
        }
    }
}

/// What the shares in force derive from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ShareView {
    /// The agreed member count N.
    pub members: u32,
    pub phase: Phase,
    pub partition: Partition,
}

impl ShareView {
    /// A node outside any cluster: every global limit whole (never used for global policies,
    /// which need a cluster; the identity for the rest).
    pub const ALONE: ShareView = ShareView {
        members: 1,
        phase: Phase::Alone,
        partition: Partition::Share,
    };

    /// A node whose `cluster:` section was just added by a reload: global policies admit
    /// nothing until its node has started and been counted.
    pub const JOINING: ShareView = ShareView {
        members: 1,
        phase: Phase::Joining,
        partition: Partition::Share,
    };

    /// The member count whose cold share is what this view enforces of a global limit (its
    /// [`ShareView::share`]), as an owner is to count it: 0 for none (joining, or cut off under
    /// `deny`). Cut off under `local` a member admits the whole limit, but says its count: that
    /// partition policy is fail-open by choice (at most L on each side of a cut), and an owner
    /// that heard it (a one-way cut) would otherwise cut every other holder to 0.
    pub fn share_members(&self) -> u32 {
        match (self.phase, self.partition) {
            (Phase::Joining, _) | (Phase::CutOff, Partition::Deny) => 0,
            _ => self.members,
        }
    }

    /// What this node enforces of a global limit `limit`.
    pub fn share(&self, limit: u32) -> u32 {
        match (self.phase, self.partition) {
            (Phase::Joining, _) | (Phase::CutOff, Partition::Deny) => 0,
            (Phase::CutOff, Partition::Local) => limit,
            _ => cold_share(limit, self.members),
        }
    }
}

/// The timings membership runs on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Timing {
    pub peer_timeout: Duration,
    /// How long a silent member still counts (and its reported count with it).
    pub forget: Duration,
    /// How long a node without pins waits to be counted before it admits its share anyway.
    pub join_limit: Duration,
    /// How long a node without pins still admits nothing after the join gate opened: the lease
    /// of a raise as its owner counts it (stretched by clock drift).
    pub hold: Duration,
}

impl Timing {
    /// `forget` = max(10 × `peer_timeout`, 10 s); `join_limit` = 3 × `peer_timeout`; `hold` =
    /// the learning time of a ledger on the lease timing the agent derives from `peer_timeout`.
    pub fn new(peer_timeout: Duration) -> Timing {
        Timing {
            peer_timeout,
            forget: (peer_timeout * 10).max(Duration::from_secs(10)),
            join_limit: peer_timeout * 3,
            hold: Ledger::learning(&lease::Timing::from_peer_timeout(peer_timeout)),
        }
    }
}

#[derive(Debug, Clone, Default)]
struct Endpoint {
    /// Learned from its answers.
    node: Option<NodeId>,
    /// When we sent the newest heartbeat it answered.
    echoed: Option<Instant>,
    /// That heartbeat's round trip.
    rtt: Option<Duration>,
    /// The endpoint answered as this node itself (a `peers` entry pointing back here).
    is_self: bool,
    /// It answered a heartbeat of this run, as whatever node.
    answered: bool,
}

#[derive(Debug, Clone)]
struct Seen {
    /// When it was first heard from (kept while it stays in the table).
    first: Instant,
    at: Instant,
    incarnation: u64,
    seq: u64,
    members: u32,
    view_hash: u64,
    policies_hash: u64,
    share_members: u32,
}

/// What of a peer's view differs from this node's (see [`PeerStatus::differs`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Differs {
    /// The global policies (match, limit, window, grouping), the policies nested inside them, or
    /// `peer_timeout`.
    Policies,
    /// The member list (the ids counted, and endpoints whose node is not known yet).
    Members,
}

impl Differs {
    pub fn as_str(self) -> &'static str {
        match self {
            Differs::Policies => "policies",
            Differs::Members => "members",
        }
    }
}

/// One endpoint or member, for `limiter cluster status`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeerStatus {
    /// The endpoint dialled (`None` for a member only heard from).
    pub addr: Option<SocketAddr>,
    pub node: Option<NodeId>,
    pub live: bool,
    /// Since the newest echoed heartbeat was sent (dialled endpoints) or since it was last heard.
    pub since: Option<Duration>,
    pub incarnation: u64,
    pub members: u32,
    /// Its view hash equals ours.
    pub agrees: bool,
    /// With a view that differs: what differs, as far as its heartbeats tell (empty for a
    /// peer that sends no policies hash, an older agent).
    pub differs: Vec<Differs>,
    /// The round trip of the newest answered heartbeat (dialled endpoints).
    pub rtt: Option<Duration>,
}

/// The membership state (see the module docs).
#[derive(Debug, Clone)]
pub struct Membership {
    me: NodeId,
    timing: Timing,
    partition: Partition,
    started: Instant,
    /// The join gate is passed (latched).
    joined: bool,
    /// When the join gate opened, for a node that started without pins (`hold` runs from here).
    joined_at: Option<Instant>,
    endpoints: BTreeMap<SocketAddr, Endpoint>,
    /// Endpoints past [`MAX_MEMBERS`], not dialled but counted.
    overflow: u32,
    /// `peers` entries that have resolved to no address yet (a name not looked up, or a failed
    /// lookup): each counts as one unknown member, and keeps the node from being alone.
    unresolved: u32,
    /// Every id an endpoint answered as, for the life of the process: a member found through
    /// its endpoint keeps counting after the endpoint goes (a `dns:` record of a pod that is not
    /// ready), since its pinned program may still enforce its share.
    learned: BTreeSet<NodeId>,
    seen: BTreeMap<NodeId, Seen>,
    /// The agreed count the previous run of this agent left (kept in its state directory), and
    /// until when it still counts: a restart must not count fewer members than it did just
    /// before (a member added in a rolling change it has not been told of yet).
    floor: Option<(u32, Instant)>,
    /// Hash of the global policies in force here.
    policies_hash: u64,
}

impl Membership {
    /// A node starting at `now`; `adopted`: it took over pinned maps, whose shares are in force,
    /// so it continues at once instead of joining.
    pub fn new(
        me: NodeId,
        timing: Timing,
        partition: Partition,
        adopted: bool,
        now: Instant,
    ) -> Membership {
        Membership {
            me,
            timing,
            partition,
            started: now,
            joined: adopted,
            joined_at: None,
            endpoints: BTreeMap::new(),
            overflow: 0,
            unresolved: 0,
            learned: BTreeSet::new(),
            seen: BTreeMap::new(),
            floor: None,
            policies_hash: 0,
        }
    }

    /// The node starts talking to its peers now: the join limit and the grace before a node
    /// can be cut off count from here.
    pub fn begin(&mut self, now: Instant) {
        self.started = now;
    }

    pub fn me(&self) -> &NodeId {
        &self.me
    }

    /// Takes up a reloaded `cluster:` section's timing and partition policy.
    pub fn reconfigure(&mut self, timing: Timing, partition: Partition) {
        self.timing = timing;
        self.partition = partition;
    }

    /// The global policies in force changed (their hash goes into the view hash).
    pub fn set_policies_hash(&mut self, hash: u64) {
        self.policies_hash = hash;
    }

    /// The endpoints to dial now (the `peers` entries resolved); state is kept for those that
    /// stay. The first [`MAX_MEMBERS`] in address order are dialled; the rest are counted as
    /// unknown members (a smaller count than the truth would be unsafe).
    pub fn set_endpoints(&mut self, addrs: impl IntoIterator<Item = SocketAddr>) {
        let all: BTreeSet<SocketAddr> = addrs.into_iter().collect();
        self.overflow = all.len().saturating_sub(MAX_MEMBERS) as u32;
        let wanted: BTreeSet<SocketAddr> = all.into_iter().take(MAX_MEMBERS).collect();
        self.endpoints.retain(|a, _| wanted.contains(a));
        for addr in wanted {
            self.endpoints.entry(addr).or_default();
        }
    }

    /// The agreed count the previous run left, counted until `forget` from `now` has passed.
    pub fn set_floor(&mut self, members: u32, now: Instant) {
        // A file an older agent wrote may hold a count taken in before it was capped.
        let members = members.min(MAX_REPORTED_MEMBERS);
        self.floor = Some((members, now + self.timing.forget));
    }

    /// How many `peers` entries have resolved to no address yet (see `unresolved`).
    pub fn set_unresolved(&mut self, entries: u32) {
        self.unresolved = entries;
    }

    pub fn endpoints(&self) -> impl Iterator<Item = SocketAddr> + '_ {
        self.endpoints.keys().copied()
    }

    fn take_report(&mut self, report: &Report, now: Instant) -> Result<Heard, Refusal> {
        if report.node == self.me {
            return Err(Refusal::OwnId(report.node.clone()));
        }
        if report.members == 0 {
            return Err(Refusal::NoMembers);
        }
        if report.members > MAX_REPORTED_MEMBERS {
            return Err(Refusal::TooManyMembers(report.members));
        }
        if report.share_members > MAX_REPORTED_MEMBERS {
            return Err(Refusal::TooManyMembers(report.share_members));
        }
        self.forget_silent(now);
        let newer = |s: &Seen| (report.incarnation, report.seq) >= (s.incarnation, s.seq);
        let mut heard = Heard::Known;
        match self.seen.get_mut(&report.node) {
            Some(s) if newer(s) => {
                if report.incarnation > s.incarnation {
                    heard = Heard::Restarted;
                }
                *s = Seen {
                    first: s.first,
                    at: now,
                    incarnation: report.incarnation,
                    seq: report.seq,
                    members: report.members,
                    view_hash: report.view_hash,
                    policies_hash: report.policies_hash,
                    share_members: report.share_members,
                };
            }
            // Older than what we have (reordered, or from an earlier incarnation): ignored, and
            // it does not keep the stale view alive either.
            Some(_) => {}
            None => {
                if self.seen.len() >= MAX_MEMBERS {
                    return Err(Refusal::TooMany(report.node.clone()));
                }
                self.seen.insert(
                    report.node.clone(),
                    Seen {
                        first: now,
                        at: now,
                        incarnation: report.incarnation,
                        seq: report.seq,
                        members: report.members,
                        view_hash: report.view_hash,
                        policies_hash: report.policies_hash,
                        share_members: report.share_members,
                    },
                );
            }
        }
        Ok(heard)
    }

    /// A heartbeat from a peer (dialled by it). Its sender is counted by its id until one of
    /// our endpoints answers as that id: an endpoint is never taken to be a node on the
    /// sender's word (a false claim would hide a member, and a smaller count is unsafe), except
    /// for `peer_timeout` after the sender is first heard, as one of the endpoints that have
    /// never answered (see [`Membership::heard_for_endpoints`]; the sender's id counts, so this
    /// never counts fewer than without its heartbeat).
    pub fn heard(&mut self, report: &Report, now: Instant) -> Result<Heard, Refusal> {
        self.take_report(report, now)
    }

    /// `addr` answered our heartbeat sent at `sent`, with `report`. An answer with this node's
    /// own id is refused (`Refusal::OwnId`) and changes nothing: only
    /// [`Membership::answered_as_this_node`] takes an endpoint for this node.
    pub fn answered(
        &mut self,
        addr: SocketAddr,
        sent: Instant,
        report: &Report,
        now: Instant,
    ) -> Result<Heard, Refusal> {
        if report.node == self.me {
            return Err(Refusal::OwnId(report.node.clone()));
        }
        let heard = self.take_report(report, now)?;
        if let Some(e) = self.endpoints.get_mut(&addr) {
            if self.learned.len() < MAX_MEMBERS {
                self.learned.insert(report.node.clone());
            }
            e.node = Some(report.node.clone());
            e.is_self = false;
            e.answered = true;
            if e.echoed.is_none_or(|t| sent >= t) {
                e.echoed = Some(sent);
                e.rtt = Some(now.saturating_duration_since(sent));
            }
        }
        Ok(heard)
    }

    /// `addr` answered with this node's own id: `itself` when the answer also carries this
    /// run's nonce (a `peers` entry, or a `dns:` record, that points back here), and the endpoint
    /// is then not counted; otherwise another node uses this node's id, and its endpoint counts
    /// as a member whose id is not known (never fewer members: a smaller count is unsafe).
    pub fn answered_as_this_node(&mut self, addr: SocketAddr, itself: bool) {
        if let Some(e) = self.endpoints.get_mut(&addr) {
            e.is_self = itself;
            e.answered = true;
            if !itself {
                e.node = None;
            }
        }
    }

    fn forget_silent(&mut self, now: Instant) {
        let forget = self.timing.forget;
        self.seen
            .retain(|_, s| now.saturating_duration_since(s.at) <= forget);
    }

    fn fresh(&self, now: Instant) -> impl Iterator<Item = (&NodeId, &Seen)> {
        self.seen
            .iter()
            .filter(move |(_, s)| now.saturating_duration_since(s.at) <= self.timing.forget)
    }

    fn is_live(&self, e: &Endpoint, now: Instant) -> bool {
        !e.is_self
            && e.echoed
                .is_some_and(|t| now.saturating_duration_since(t) <= self.timing.peer_timeout)
    }

    /// The member ids known, with this node, and the endpoints whose id is not known yet.
    fn member_set(&self, now: Instant) -> (BTreeSet<&NodeId>, u32) {
        let mut ids: BTreeSet<&NodeId> = self.fresh(now).map(|(id, _)| id).collect();
        ids.extend(&self.learned);
        ids.insert(&self.me);
        let mut unknown = self.unresolved + self.overflow;
        for e in self.endpoints.values() {
            match &e.node {
                _ if e.is_self => {}
                Some(id) => {
                    ids.insert(id);
                }
                None => unknown += 1,
            }
        }
        (ids, unknown)
    }

    /// This node's member count (see the module docs).
    pub fn members(&self, now: Instant) -> u32 {
        let (ids, unknown) = self.member_set(now);
        (ids.len() as u32)
            .saturating_add(unknown.saturating_sub(self.heard_for_endpoints(now)))
            .min(MAX_REPORTED_MEMBERS)
    }

    /// How many endpoints that have never answered are taken for members heard from (by
    /// heartbeats of theirs) that no endpoint has answered as: those first heard within the
    /// last `peer_timeout`, as many as there are of either. A member that starts (or joins)
    /// hears its peers' heartbeats before the answers to its own: counting both, it counted
    /// each peer twice for a sync interval, reported that count, and took every member's shares
    /// down to those of almost twice the members (three members: five; found by restarting an
    /// agent of a running cluster). With every member listing every other (the cluster's
    /// precondition), a member heard from that no endpoint has answered as is one of the
    /// endpoints that have not answered yet, so each is counted once. For `peer_timeout` at
    /// most: an endpoint that has not answered by then counts on its own again (a member down,
    /// its pinned program still enforcing), and a claim in a heartbeat never hides an endpoint
    /// for longer.
    fn heard_for_endpoints(&self, now: Instant) -> u32 {
        // With the table of ids endpoints answered as full, a member heard from whose endpoint
        // answered and then went (a `dns:` record) would be in neither, and could be taken for
        // another endpoint: none is, then.
        if self.learned.len() >= MAX_MEMBERS {
            return 0;
        }
        let unanswered = self
            .endpoints
            .values()
            .filter(|e| !e.answered && e.node.is_none())
            .count();
        if unanswered == 0 {
            return 0;
        }
        let at_endpoints: BTreeSet<&NodeId> = self
            .endpoints
            .values()
            .filter_map(|e| e.node.as_ref())
            .collect();
        let heard = self
            .fresh(now)
            .filter(|(id, s)| {
                now.saturating_duration_since(s.first) < self.timing.peer_timeout
                    && !self.learned.contains(*id)
                    && !at_endpoints.contains(id)
            })
            .count();
        unanswered.min(heard) as u32
    }

    /// The hash of this node's member list and global policies.
    pub fn view_hash(&self, now: Instant) -> u64 {
        self.view_hash_with(now, self.policies_hash)
    }

    /// The hash of this node's member list with `policies_hash` for the policies.
    fn view_hash_with(&self, now: Instant, policies_hash: u64) -> u64 {
        let (ids, unknown) = self.member_set(now);
        let mut text = String::new();
        for id in ids {
            text.push_str(id.as_str());
            text.push('\n');
        }
        stable_hash(format!("{text}{unknown}\n{policies_hash}").as_bytes())
    }

    /// The agreed member count: the largest of ours and those members reported.
    pub fn agreed_members(&self, now: Instant) -> u32 {
        let floor = match self.floor {
            Some((members, until)) if now <= until => members,
            _ => 0,
        };
        self.fresh(now)
            .map(|(_, s)| s.members)
            .fold(self.members(now).max(floor), u32::max)
    }

    /// By member of `members` (ids in order, as [`Membership::enrolment_view`] gives them): the
    /// member count whose cold share an owner here counts it at. This node's is `in_force`'s.
    /// Another member's is what it reported last within `forget` ([`Report::share_members`]):
    /// one that has not written a join yet enforces the larger share of fewer members, and is
    /// counted at it; a member silent since goes on enforcing what its maps held, and is
    /// counted so until it is forgotten. One whose maps admit nothing now (joining, or cut off
    /// under `deny`), or whose agent predates the field, is counted at the count it reports (the
    /// share it will write is of its agreed count, which is at least that).
    ///
    /// Each at most the count this node reports, and a member not heard within `forget` at
    /// that: at a leave, a member writes the larger share of one member less as soon as every
    /// member it hears reports one less, this node included, and its heartbeat saying so comes
    /// later. Its agreed count is at least the report of this node it holds, so while this
    /// node's count only falls, every member is counted at the larger share from the moment
    /// this node counts one less. (If this node's count rises meanwhile, a join here, a member
    /// that took up the leave is counted at the smaller share until its next heartbeat.)
    pub fn counts(
        &self,
        now: Instant,
        members: &[NodeId],
        in_force: &ShareView,
    ) -> Vec<Option<u32>> {
        let reported = self.reported_members(now, in_force);
        members
            .iter()
            .map(|id| {
                let n = if *id == self.me {
                    in_force.share_members()
                } else {
                    let fresh = self
                        .seen
                        .get(id)
                        .filter(|s| now.saturating_duration_since(s.at) <= self.timing.forget);
                    match fresh {
                        Some(s) if s.share_members > 0 => s.share_members.min(reported),
                        Some(s) => s.members.min(reported),
                        None => reported,
                    }
                };
                (n > 0).then_some(n)
            })
            .collect()
    }

    /// Every member heard within `forget` reported our view hash.
    pub fn agreed(&self, now: Instant) -> bool {
        let mine = self.view_hash(now);
        self.fresh(now).all(|(_, s)| s.view_hash == mine)
    }

    /// The phase (see the module docs); passing the join gate is remembered.
    pub fn phase(&mut self, now: Instant) -> Phase {
        let dialled = self.endpoints.values().filter(|e| !e.is_self).count();
        if dialled == 0 && self.unresolved == 0 && self.members(now) == 1 {
            self.joined = true;
            return Phase::Alone;
        }
        if !self.joined {
            let members = self.members(now);
            // An endpoint's id is learned only from an answer to a heartbeat of this run: the
            // peer has seen this incarnation (a heartbeat of its own may count us from before
            // the restart, and is not taken for its endpoint's).
            let counted = self.unresolved == 0
                && self.endpoints.values().all(|e| {
                    e.is_self
                        || e.node
                            .as_ref()
                            .and_then(|id| self.seen.get(id))
                            .is_some_and(|s| s.members >= members)
                });
            let waited = now.saturating_duration_since(self.started) >= self.timing.join_limit;
            if counted || waited {
                self.joined = true;
                self.joined_at = Some(now);
            } else {
                return Phase::Joining;
            }
        }
        if self
            .joined_at
            .is_some_and(|at| now.saturating_duration_since(at) < self.timing.hold)
        {
            return Phase::Joining;
        }
        let live = self.endpoints.values().any(|e| self.is_live(e, now));
        let settled = now.saturating_duration_since(self.started) >= self.timing.peer_timeout;
        // Peers configured (dialled, or named but not resolved) and none live: cut off.
        if (dialled > 0 || self.unresolved > 0) && !live && settled {
            Phase::CutOff
        } else {
            Phase::Connected
        }
    }

    /// What the shares derive from now.
    pub fn share_view(&mut self, now: Instant) -> ShareView {
        ShareView {
            phase: self.phase(now),
            members: self.agreed_members(now),
            partition: self.partition,
        }
    }

    /// For enrolment: every member id (this node's included: the set owners are chosen from,
    /// the same on every member whose view hash agrees), the live ones, and whether every
    /// member agrees on the view. Agreement also needs every member's id known (no endpoint
    /// unanswered or unresolved, no fewer ids than the agreed count): a node that restarted and
    /// has heard no peer yet disagrees with nobody, but would pick itself as every client's owner.
    pub fn enrolment_view(&self, now: Instant) -> (Vec<NodeId>, Vec<NodeId>, bool) {
        let (ids, unknown) = self.member_set(now);
        let complete = unknown == 0 && ids.len() as u32 >= self.agreed_members(now);
        let members: Vec<NodeId> = ids.into_iter().cloned().collect();
        let mut live: BTreeSet<NodeId> = self
            .endpoints
            .values()
            .filter(|e| self.is_live(e, now))
            .filter_map(|e| e.node.clone())
            .collect();
        live.extend(
            self.fresh(now)
                .filter(|(_, s)| now.saturating_duration_since(s.at) <= self.timing.peer_timeout)
                .map(|(id, _)| id.clone()),
        );
        live.insert(self.me.clone());
        (
            members,
            live.into_iter().collect(),
            complete && self.agreed(now),
        )
    }

    /// The id an endpoint answered as (`None`: not answered yet, or it is this node).
    pub fn endpoint_node(&self, addr: SocketAddr) -> Option<&NodeId> {
        self.endpoints
            .get(&addr)
            .filter(|e| !e.is_self)
            .and_then(|e| e.node.as_ref())
    }

    /// What this node says of itself in a heartbeat or answer numbered `seq`, with `in_force`
    /// the view its maps hold.
    pub fn report(&self, incarnation: u64, seq: u64, now: Instant, in_force: &ShareView) -> Report {
        Report {
            node: self.me.clone(),
            incarnation,
            seq,
            members: self.reported_members(now, in_force),
            view_hash: self.view_hash(now),
            policies_hash: self.policies_hash,
            share_members: in_force.share_members(),
        }
    }

    /// The member count this node reports: its own, but no more than the count the shares its
    /// maps hold were computed with. A member that starts without pins admits its share once
    /// every peer it dials reports counting it (the join gate), and that holds only once each
    /// peer's maps have the smaller share: a peer counts the newcomer at once, but writes its
    /// share at the next sync interval, later when a reload holds the store or the write fails
    /// and is retried. Not capped while the maps hold a joining view (nothing global admitted
    /// here, whatever the count).
    fn reported_members(&self, now: Instant, in_force: &ShareView) -> u32 {
        let members = self.members(now);
        match in_force.phase {
            Phase::Joining => members,
            Phase::Alone | Phase::Connected | Phase::CutOff => members.min(in_force.members),
        }
    }

    /// What of `seen`'s view differs from this node's (whose view hash is `mine`).
    fn differs(&self, seen: &Seen, mine: u64, now: Instant) -> Vec<Differs> {
        if seen.view_hash == mine || seen.policies_hash == 0 {
            return Vec::new();
        }
        let mut differs = Vec::new();
        if seen.policies_hash != self.policies_hash {
            differs.push(Differs::Policies);
        }
        // Its view hash is of its member list and its policies hash: with our list and its
        // policies hash, another hash means another list.
        if self.view_hash_with(now, seen.policies_hash) != seen.view_hash {
            differs.push(Differs::Members);
        }
        differs
    }

    /// Every endpoint, then every member heard from that is not an endpoint.
    pub fn peers(&self, now: Instant) -> Vec<PeerStatus> {
        let mine = self.view_hash(now);
        let mut out = Vec::new();
        let mut listed = BTreeSet::new();
        for (addr, e) in &self.endpoints {
            let seen = e.node.as_ref().and_then(|id| self.seen.get(id));
            if let Some(id) = &e.node {
                listed.insert(id.clone());
            }
            out.push(PeerStatus {
                addr: Some(*addr),
                node: if e.is_self {
                    Some(self.me.clone())
                } else {
                    e.node.clone()
                },
                live: self.is_live(e, now),
                since: e.echoed.map(|t| now.saturating_duration_since(t)),
                incarnation: seen.map_or(0, |s| s.incarnation),
                members: seen.map_or(0, |s| s.members),
                agrees: seen.is_some_and(|s| s.view_hash == mine),
                differs: seen.map_or_else(Vec::new, |s| self.differs(s, mine, now)),
                rtt: e.rtt,
            });
        }
        for (id, s) in self.fresh(now) {
            if listed.contains(id) {
                continue;
            }
            let since = now.saturating_duration_since(s.at);
            out.push(PeerStatus {
                addr: None,
                node: Some(id.clone()),
                live: since <= self.timing.peer_timeout,
                since: Some(since),
                incarnation: s.incarnation,
                members: s.members,
                agrees: s.view_hash == mine,
                differs: self.differs(s, mine, now),
                rtt: None,
            });
        }
        out
    }
}

mod forget;
#[cfg(test)]
mod sim;
#[cfg(test)]
mod tests;
