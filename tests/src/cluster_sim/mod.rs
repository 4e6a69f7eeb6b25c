//! A simulated cluster at scale, shared by its tests (`tests/tests/cluster_sim.rs`) and the
//! cluster benchmark (`cluster-bench`): N members, each running the real
//! [`Membership`] and [`Enrolment`] of `limiter_user::cluster` on its own clock, with virtual
//! time, a network that delays and loses messages per link, clocks offset and drifting
//! (±`drift_ppm`), random phases of sync rounds and policy windows, members that fail (their
//! agent stops; their datapath keeps enforcing what it was last told) and come back, partitions,
//! joins (which move owners), and demand that moves between members.
//!
//! Each member does what the agent does every sync interval (`cluster/node`): takes up the share
//! view, runs one enrolment round (the hot clients of its datapath, their counters, the writes
//! to its grants) or suspends it when cut off or joining, and sends each peer without a
//! heartbeat in flight a heartbeat carrying its latest reports and grants for that peer; a peer
//! takes the messages in and answers. What is on the wire is measured with the real prost
//! messages of `proto/cluster.proto`.
//!
//! The datapath is modelled as the XDP program enforces it: a client with a grant written gets
//! [`Grant::limit_at`] on the member's own clock (the lease written `COARSE_SLACK` early, as the
//! agent writes it), any other the cold share of the member's share view; packets are counted in
//! fixed windows with a random phase per member, as the sliding-window counter of
//! `limiter_common::window` sees them: the current window's count plus the previous one's,
//! weighted by how much of it is still within the last window (fluid: fractions of packets).
//! The fast path flags a client hot once a window when an admission takes the window's count
//! to 0.8 of its limit in force, or it drops; an agent restarted with its pins takes up, in its first round, every client
//! flagged in the current or the last window (the agent primes its first round with the
//! clients in `LIMITED`).
//!
//! **The invariant**, checked at every event that can raise a limit in force (every round of
//! every member, every change of a cold share): for every client, the limits in force on all
//! members sum to at most L. The sums are kept incrementally (a lease that ends lowers them at
//! its instant) and recounted from scratch every `recount_every` rounds to check the
//! bookkeeping.
//!
//! Simplifications, for speed, where they change what the agent does by no more than a sync
//! interval's delay: a member's view for enrolment messages is computed afresh only when a
//! message needs it (a report for a client it does not own, a grant for one it does not hold);
//! the agent takes a snapshot for every heartbeat, but no other message reads it. What a member
//! says of itself (its member count and view hash) is computed once a round, for its heartbeats
//! and for the answers it gives until its next round (the agent computes it for each, O(N log N)
//! each). Packets arrive evenly within a sync interval. Loss drops a whole heartbeat or answer.

use std::{
    cmp::Reverse,
    collections::{BinaryHeap, HashMap},
    net::SocketAddr,
    rc::Rc,
    time::{Duration, Instant},
};

pub use limiter_common::{
    Grant,
    addr::{ClientKey, v4_mapped},
};
pub use limiter_user::cluster::{
    NodeId,
    config::Partition,
    enrolment::{
        Enrolment, GrantMsg, Outgoing, OwnedView, PinnedGrant, PolicyInfo, ReportMsg, View, Write,
    },
    lease::{Terms, Timing},
    membership::{self, Heard, Membership, Phase, ShareView},
};
use limiter_user::proto::cluster::{ClientGrant, ClientReport};

use datapath::Flow;
use measure::{Measure, Track};
use member::{Node, node_addr};
use network::Message;

mod clock;
mod datapath;
mod demand;
mod invariant;
mod measure;
mod member;
mod network;
mod rng;

pub use demand::{Demand, even, reversed, skewed};
pub use invariant::Violation;
pub use measure::{Accuracy, Cost, SLICES};
pub use member::node_id;
pub use rng::Rng;

/// The one global policy's name on the wire (a hash in the agent: 8 bytes whatever its value,
/// as this one).
pub const POLICY: u64 = 0x9e37_79b9_7f4a_7c15;
/// The agent writes a lease's end this much early for the kernel's coarse clock
/// (`cluster/node/enrolment.rs`).
pub const COARSE_SLACK: Duration = Duration::from_millis(25);
/// Most clients one heartbeat carries reports or grants for (`cluster/node/enrolment.rs`).
pub const MAX_CLIENTS_PER_MESSAGE: usize = 30_000;

/// What to simulate.
#[derive(Debug, Clone)]
pub struct Config {
    pub nodes: usize,
    /// Hot clients, numbered `0..clients` (keys from [`key`]).
    pub clients: usize,
    /// L, packets per window across the cluster.
    pub limit: u32,
    pub window: Duration,
    pub sync: Duration,
    /// `peer_timeout`: the lease is one, the silence limit three (as `Timing::from_peer_timeout`).
    pub peer_timeout: Duration,
    /// Each directed link's one-way delay is drawn once from this range...
    pub delay: (Duration, Duration),
    /// ...and each message adds up to this much.
    pub jitter: Duration,
    /// Probability that a heartbeat or an answer is lost.
    pub loss: f64,
    /// Clocks run off by up to this much (parts per million, either way).
    pub drift_ppm: u32,
    pub seed: u64,
    /// Every how many rounds (of all members together) the sums are recounted from scratch.
    pub recount_every: u64,
    /// `--max-global-clients`.
    pub capacity: usize,
    /// Where members' views come from.
    pub views: Views,
}

/// Where the members' views (members, live, agreed; the share view) come from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Views {
    /// Each member runs the real [`Membership`] over the heartbeats and their answers: failures,
    /// partitions and joins change views as they do in the agent. Costs O(N³) a round of all
    /// members (each heartbeat's membership work is O(N)).
    Membership,
    /// Every member is a member, live and agreeing, and stays so: for steady state at scale,
    /// where membership changes nothing. Heartbeats still carry the enrolment messages (and
    /// their bytes and their answers' bytes are counted), but no answer is simulated: with no
    /// loss every answer comes back well within the sync interval.
    Fixed,
}

impl Config {
    /// `nodes` members and `clients` hot clients at L = 100 per member, 1 s windows, the default
    /// 50 ms sync interval and 1 s peer timeout, 0.2–2 ms links, no loss, ±1000 ppm clocks.
    pub fn new(nodes: usize, clients: usize) -> Config {
        Config {
            nodes,
            clients,
            limit: 100 * nodes as u32,
            window: Duration::from_secs(1),
            sync: Duration::from_millis(50),
            peer_timeout: Duration::from_secs(1),
            delay: (Duration::from_micros(200), Duration::from_millis(2)),
            jitter: Duration::from_micros(500),
            loss: 0.0,
            drift_ppm: 1000,
            seed: 1,
            recount_every: 2_000,
            capacity: 2 * clients + 16,
            views: Views::Membership,
        }
    }

    /// The lease timing enrolment runs on (as the agent).
    pub fn timing(&self) -> Timing {
        Timing::from_peer_timeout(self.peer_timeout)
    }
}

/// The key of hot client `i`: 10.x.y.z.
pub fn key(i: usize) -> ClientKey {
    v4_mapped([10, (i >> 16) as u8, (i >> 8) as u8, i as u8])
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Event {
    Round(usize),
    Deliver(u32),
    /// A lease written on `node` for `client` ends (member clock, ns).
    Lapse {
        node: usize,
        client: u32,
        until_ns: u64,
    },
    /// Real window `k` of the measurement is over (every member has counted its packets).
    Window(u64),
}

struct ClientState {
    key: ClientKey,
    demand: Demand,
    /// Σ over members with a grant of (limit in force − cold share).
    excess: i64,
    /// Admitted in each slice of the measurement still needed (slice k at `k % len`).
    slices: Vec<f64>,
    total: f64,
}

/// The simulated cluster.
pub struct Sim {
    cfg: Config,
    timing: Timing,
    t0: Instant,
    real: Duration,
    rng: Rng,
    nodes: Vec<Node>,
    addrs: HashMap<SocketAddr, usize>,
    /// (up, one-way delay) of the link from member i to member j.
    links: Vec<Vec<(bool, Duration)>>,
    queue: BinaryHeap<Reverse<(Duration, u64, Event)>>,
    next_event: u64,
    slab: Vec<Option<Message>>,
    free: Vec<u32>,
    clients: Vec<ClientState>,
    keys: HashMap<ClientKey, u32>,
    /// Σ of every member's cold share.
    cold_sum: i64,
    checks: u64,
    violations: Vec<Violation>,
    violation_count: u64,
    /// When a sum was last above L, and the largest excess.
    last_violation: Option<Duration>,
    worst_excess: i64,
    recounts: u64,
    measure: Option<Measure>,
    tracked: HashMap<u32, Track>,
    rounds: u64,
    /// Every member's id, for [`Views::Fixed`].
    everyone: Rc<Vec<NodeId>>,
    scratch_report: ClientReport,
    scratch_grant: ClientGrant,
}

impl Sim {
    /// A cluster of `cfg.nodes` members that have run before (they continue at once, as with
    /// their pins), every link up, and no packets yet.
    pub fn new(cfg: Config) -> Sim {
        let mut rng = Rng::new(cfg.seed);
        let timing = cfg.timing();
        let t0 = Instant::now();
        let clients = (0..cfg.clients)
            .map(|i| ClientState {
                key: key(i),
                demand: Demand {
                    rate: 0.0,
                    at: Vec::new(),
                },
                excess: 0,
                slices: Vec::new(),
                total: 0.0,
            })
            .collect::<Vec<_>>();
        let keys = clients
            .iter()
            .enumerate()
            .map(|(i, c)| (c.key, i as u32))
            .collect();
        let mut sim = Sim {
            timing,
            t0,
            real: Duration::ZERO,
            nodes: Vec::new(),
            addrs: HashMap::new(),
            links: Vec::new(),
            queue: BinaryHeap::new(),
            next_event: 0,
            slab: Vec::new(),
            free: Vec::new(),
            clients,
            keys,
            cold_sum: 0,
            checks: 0,
            violations: Vec::new(),
            violation_count: 0,
            last_violation: None,
            worst_excess: 0,
            recounts: 0,
            measure: None,
            tracked: HashMap::new(),
            rounds: 0,
            everyone: Rc::new(Vec::new()),
            scratch_report: ClientReport::default(),
            scratch_grant: ClientGrant::default(),
            rng: Rng::new(rng.next_u64()),
            cfg,
        };
        for _ in 0..sim.cfg.nodes {
            sim.add_node(true);
        }
        let everyone: Vec<SocketAddr> = (0..sim.nodes.len()).map(node_addr).collect();
        for (i, node) in sim.nodes.iter_mut().enumerate() {
            node.membership
                .set_endpoints(everyone.iter().copied().filter(|a| *a != node_addr(i)));
        }
        for i in 0..sim.nodes.len() {
            sim.refresh_share(i);
        }
        sim
    }

    fn schedule(&mut self, at: Duration, event: Event) {
        self.next_event += 1;
        self.queue
            .push(Reverse((at.max(self.real), self.next_event, event)));
    }

    // -----------------------------------------------------------------------------------------
    // Scenario controls.

    pub fn config(&self) -> &Config {
        &self.cfg
    }

    pub fn now(&self) -> Duration {
        self.real
    }

    pub fn nodes(&self) -> usize {
        self.nodes.len()
    }

    pub fn rng(&mut self) -> &mut Rng {
        &mut self.rng
    }

    /// Client `c`'s packets from now on.
    pub fn set_demand(&mut self, c: usize, demand: Demand) {
        let now_real = self.real;
        // Count what came at the old rates first.
        let at: Vec<usize> = self.clients[c]
            .demand
            .at
            .iter()
            .map(|(n, _)| *n)
            .chain(demand.at.iter().map(|(n, _)| *n))
            .collect();
        for n in at {
            self.flow_until(n, c as u32, now_real);
        }
        for &(n, _) in &self.clients[c].demand.at {
            if let Some(flow) = self.nodes[n].flows.get_mut(&(c as u32)) {
                flow.rate = 0.0;
            }
        }
        for &(n, fraction) in &demand.at {
            let node = &mut self.nodes[n];
            let now = node.clock.at(now_real);
            let flow = node.flows.entry(c as u32).or_insert(Flow {
                rate: 0.0,
                count: 0.0,
                window: i64::MIN,
                passed: 0.0,
                previous: 0.0,
                flagged: i64::MIN,
                last: now,
            });
            flow.rate += demand.rate * fraction;
        }
        self.clients[c].demand = demand;
    }

    /// Client `c`'s demand.
    pub fn demand(&self, c: usize) -> &Demand {
        &self.clients[c].demand
    }

    /// Member `i`'s agent stops (`kill -9`): it sends, answers and takes in nothing; its
    /// datapath keeps enforcing what it was last told.
    pub fn fail(&mut self, i: usize) {
        self.nodes[i].alive = false;
    }

    /// Member `i`'s agent starts again (a new incarnation); `pins`: it adopts its maps
    /// (continues at once), else its datapath starts empty (it admits nothing of global
    /// policies until its peers count it).
    pub fn restart(&mut self, i: usize, pins: bool) {
        let real = self.real;
        let floor = self.nodes[i].share.members;
        let endpoints: Vec<SocketAddr> = self.nodes[i].membership.endpoints().collect();
        let node = &mut self.nodes[i];
        let now = node.clock.at(real);
        node.incarnation += 1;
        node.alive = true;
        node.in_flight.clear();
        node.outbox.clear();
        node.report = None;
        node.hot.clear();
        let mut membership = Membership::new(
            node.id.clone(),
            membership::Timing::new(self.cfg.peer_timeout),
            Partition::Share,
            pins,
            self.t0 + now,
        );
        membership.set_endpoints(endpoints);
        membership.set_floor(floor, self.t0 + now);
        membership.begin(self.t0 + now);
        node.membership = membership;
        node.enrolment = Enrolment::new(
            node.id.clone(),
            self.timing,
            node.incarnation,
            self.cfg.capacity,
        );
        if pins {
            let adopted: Vec<PinnedGrant> = node
                .grants
                .iter()
                .map(|(c, e)| PinnedGrant {
                    client: self.clients[*c as usize].key,
                    value: e.grant.value,
                    until: (e.grant.until_ns != 0).then(|| Duration::from_nanos(e.grant.until_ns)),
                    silence: (e.grant.silence_ms != 0)
                        .then(|| Duration::from_millis(u64::from(e.grant.silence_ms))),
                })
                .collect();
            node.enrolment.adopt(now, adopted);
            // The agent's first round takes up every client in `LIMITED` (its datapath's
            // `hot` is primed with them): here, those flagged in this window or the last.
            let window = self.cfg.window;
            let since = now.saturating_sub(node.window_phase);
            let index = (since.as_nanos() / window.as_nanos()) as i64;
            node.hot = node
                .flows
                .iter()
                .filter(|(_, f)| f.flagged >= index - 1)
                .map(|(c, _)| *c)
                .collect();
        } else {
            // A new program: no grants, and the share of a joining member.
            let cleared: Vec<u32> = node.grants.keys().copied().collect();
            for c in cleared {
                self.clear_grant(i, c);
            }
            self.refresh_share(i);
        }
    }

    /// Messages from `from` to `to` are lost (`up`: they pass again).
    pub fn link(&mut self, from: usize, to: usize, up: bool) {
        self.links[from][to].0 = up;
    }

    /// Every link between the groups goes down (links within a group stay as they are).
    pub fn partition(&mut self, groups: &[Vec<usize>]) {
        for (a, ga) in groups.iter().enumerate() {
            for (b, gb) in groups.iter().enumerate() {
                if a != b {
                    for &i in ga {
                        for &j in gb {
                            self.links[i][j].0 = false;
                        }
                    }
                }
            }
        }
    }

    /// Every link up again.
    pub fn heal(&mut self) {
        for row in &mut self.links {
            for link in row {
                link.0 = true;
            }
        }
    }

    /// A new member joins: it starts without pins (the join gate), and every member's config
    /// lists it from now on (a reload everywhere at once). Returns its index.
    pub fn join(&mut self) -> usize {
        let i = self.add_node(false);
        let everyone: Vec<SocketAddr> = (0..self.nodes.len()).map(node_addr).collect();
        for (k, node) in self.nodes.iter_mut().enumerate() {
            node.membership
                .set_endpoints(everyone.iter().copied().filter(|a| *a != node_addr(k)));
        }
        self.refresh_share(i);
        i
    }

    /// Member `i`'s map writes stall for `d` from now (a reload holds the store, or they fail
    /// and are retried): the share view in force stays the one last written while its
    /// membership moves on.
    pub fn stall(&mut self, i: usize, d: Duration) {
        self.nodes[i].stalled_until = self.real + d;
    }

    /// Runs until real time `until`.
    pub fn run_until(&mut self, until: Duration) {
        while let Some(Reverse((at, _, event))) = self.queue.peek().copied() {
            if at > until {
                break;
            }
            self.queue.pop();
            self.real = at;
            match event {
                Event::Round(i) => self.round(i),
                Event::Deliver(slot) => self.deliver(slot),
                Event::Lapse {
                    node,
                    client,
                    until_ns,
                } => self.lapse(node, client, until_ns),
                Event::Window(k) => self.close_window(k),
            }
        }
        self.real = until;
    }

    /// Runs for `d` more.
    pub fn run_for(&mut self, d: Duration) {
        self.run_until(self.real + d);
    }

    // -----------------------------------------------------------------------------------------
    // What the tests and the benchmark read.

    /// Every sum above L seen (the first 20), and how many there were.
    pub fn violations(&self) -> (&[Violation], u64) {
        (&self.violations, self.violation_count)
    }

    /// When a sum was last above L, and by how much at most (`None`: never).
    pub fn excess(&self) -> Option<(Duration, i64)> {
        self.last_violation.map(|at| (at, self.worst_excess))
    }

    /// How many sums were checked, and how many times the sums were recounted from scratch.
    pub fn checks(&self) -> (u64, u64) {
        (self.checks, self.recounts)
    }

    /// Rounds run, all members together.
    pub fn rounds(&self) -> u64 {
        self.rounds
    }

    /// What `limiter cluster status` on member `i` lists of the clients it owns (at most
    /// `most`, those with the most demand first), each as its client number.
    pub fn owned_views(&self, i: usize, most: usize) -> Vec<(usize, OwnedView)> {
        let node = &self.nodes[i];
        node.enrolment
            .owned_views(node.clock.at(self.real), most, &|_| Some(node.cold))
            .into_iter()
            .map(|v| (self.keys[&v.client] as usize, v))
            .collect()
    }

    /// What member `i` enforces for client `c` now.
    pub fn in_force(&self, i: usize, c: usize) -> u32 {
        let node = &self.nodes[i];
        match node.grants.get(&(c as u32)) {
            Some(e) => e.counted,
            None => node.cold,
        }
    }

    /// Σ over members of what they enforce for client `c` now (from the incremental sums).
    pub fn sum_in_force(&self, c: usize) -> i64 {
        self.cold_sum + self.clients[c].excess
    }

    /// Member `i`'s enrolment state.
    pub fn enrolment(&self, i: usize) -> &Enrolment {
        &self.nodes[i].enrolment
    }

    /// Takes member `i`'s enrolment state out, leaving it a fresh one of a new start (for the
    /// benchmark's measure of its memory, at the end of a run: the member is not the same
    /// after).
    pub fn take_enrolment(&mut self, i: usize) -> Enrolment {
        let node = &mut self.nodes[i];
        let fresh = Enrolment::new(
            node.id.clone(),
            self.timing,
            node.incarnation + 1,
            self.cfg.capacity,
        );
        std::mem::replace(&mut node.enrolment, fresh)
    }

    /// Member `i`'s view for enrolment now: (members, live, agreed).
    pub fn view(&self, i: usize) -> (Vec<NodeId>, Vec<NodeId>, bool) {
        let node = &self.nodes[i];
        match self.cfg.views {
            Views::Membership => node
                .membership
                .enrolment_view(self.t0 + node.clock.at(self.real)),
            Views::Fixed => (self.everyone.to_vec(), self.everyone.to_vec(), true),
        }
    }

    /// Member `i`'s share view in force.
    pub fn share(&self, i: usize) -> ShareView {
        self.nodes[i].share
    }

    /// Clients owned, held and granted on member `i`.
    pub fn counts(&self, i: usize) -> limiter_user::cluster::enrolment::Counts {
        let node = &self.nodes[i];
        node.enrolment.counts(node.clock.at(self.real))
    }

    /// The member that owns client `c`, by rendezvous over member `i`'s view.
    pub fn owner(&self, i: usize, c: usize) -> Option<usize> {
        let node = &self.nodes[i];
        let (members, _, _) = node
            .membership
            .enrolment_view(self.t0 + node.clock.at(self.real));
        limiter_user::cluster::owner::owner(&self.clients[c].key, &members)
            .and_then(|id| self.nodes.iter().position(|n| n.id == *id))
    }
}
