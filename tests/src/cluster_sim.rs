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
    collections::{BTreeMap, BinaryHeap, HashMap},
    net::{Ipv4Addr, SocketAddr},
    rc::Rc,
    time::{Duration, Instant},
};

use limiter_common::maps::hot_count;
pub use limiter_common::{
    Grant,
    addr::{ClientKey, v4_mapped},
};
pub use limiter_user::cluster::{
    NodeId,
    config::Partition,
    enrolment::{Enrolment, GrantMsg, Outgoing, PinnedGrant, PolicyInfo, ReportMsg, View, Write},
    lease::{Terms, Timing},
    membership::{self, Heard, Membership, Phase, ShareView},
};
use limiter_user::proto::cluster::{ClientGrant, ClientReport, GrantValue, Heartbeat};
use prost::Message as _;

/// The one global policy's id.
pub const POLICY: u16 = 1;
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

/// Where a client's packets arrive: `rate` packets per window in all, a fraction at each
/// member.
#[derive(Debug, Clone, PartialEq)]
pub struct Demand {
    pub rate: f64,
    pub at: Vec<(usize, f64)>,
}

/// A simple deterministic generator (SplitMix64): no dependency, the same run every time.
#[derive(Debug, Clone)]
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Rng {
        Rng(seed)
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in `0..n` (n > 0).
    pub fn below(&mut self, n: u64) -> u64 {
        self.next_u64() % n
    }

    /// Uniform in [0, 1).
    pub fn unit(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }

    pub fn duration(&mut self, from: Duration, to: Duration) -> Duration {
        let span = to.saturating_sub(from).as_nanos() as u64;
        from + Duration::from_nanos(if span == 0 { 0 } else { self.below(span) })
    }

    /// `k` distinct members of `0..n`.
    pub fn distinct(&mut self, n: usize, k: usize) -> Vec<usize> {
        let mut picked: Vec<usize> = Vec::with_capacity(k);
        while picked.len() < k.min(n) {
            let i = self.below(n as u64) as usize;
            if !picked.contains(&i) {
                picked.push(i);
            }
        }
        picked
    }
}

/// A member's clock: `offset + real·(1 + ppm/10⁶)`.
#[derive(Debug, Clone, Copy)]
struct Clock {
    offset: Duration,
    ppm: i64,
}

impl Clock {
    fn at(&self, real: Duration) -> Duration {
        let ns = real.as_nanos() as i128;
        let skewed = ns + ns * i128::from(self.ppm) / 1_000_000;
        self.offset + Duration::from_nanos(u64::try_from(skewed.max(0)).unwrap_or(u64::MAX))
    }

    /// The earliest real time at which this clock reads `clock` or more (0 if it already did at
    /// real time 0).
    fn real_at(&self, clock: Duration) -> Duration {
        let Some(since) = clock.checked_sub(self.offset) else {
            return Duration::ZERO;
        };
        let real = since.as_nanos() as i128 * 1_000_000 / (1_000_000 + i128::from(self.ppm));
        let mut real = Duration::from_nanos(u64::try_from(real.max(0)).unwrap_or(u64::MAX));
        while real > Duration::ZERO && self.at(real - Duration::from_nanos(1)) >= clock {
            real -= Duration::from_nanos(1);
        }
        while self.at(real) < clock {
            real += Duration::from_nanos(1);
        }
        real
    }
}

/// A grant in a member's datapath, and the limit it was last counted at.
#[derive(Debug, Clone, Copy)]
struct Entry {
    grant: Grant,
    counted: u32,
}

/// A client's packets at one member.
#[derive(Debug, Clone)]
struct Flow {
    /// Packets per window arriving here.
    rate: f64,
    /// passed + dropped since the flow began (what the agent reads from the client's entry).
    count: f64,
    /// The datapath's window (index on the member's window grid), what it passed in it and in
    /// the window before (the sliding-window counter's two slots).
    window: i64,
    passed: f64,
    previous: f64,
    /// The window in which the fast path last flagged the client.
    flagged: i64,
    /// Member clock up to which packets were counted.
    last: Duration,
}

impl Flow {
    /// Moves the counter to window `index`: the current window's count becomes the previous
    /// one's (or nothing, after a window without packets).
    fn roll(&mut self, index: i64) {
        if self.window != index {
            self.previous = if self.window == index - 1 {
                self.passed
            } else {
                0.0
            };
            self.passed = 0.0;
            self.window = index;
        }
    }

    /// The sliding-window estimate at `now` (member clock): the current window's count plus the
    /// previous one's, weighted by how much of it is still within the last window.
    fn estimate(&self, phase: Duration, window: Duration, now: Duration) -> f64 {
        let since = now.saturating_sub(phase);
        let index = (since.as_nanos() / window.as_nanos()) as i64;
        let x = (since.as_secs_f64() / window.as_secs_f64()) - index as f64;
        // `window` starts at i64::MIN (never counted): no difference to take.
        match index.checked_sub(self.window) {
            Some(0) => self.passed + self.previous * (1.0 - x),
            Some(1) => self.passed * (1.0 - x),
            _ => 0.0,
        }
    }
}

/// What a sliding-window counter (`limiter_common::window`) admits of a fluid flow of `rate`
/// packets per window over `(x0, x1)` of one fixed window (in windows since its start), with
/// `current` already counted in this window, `previous` in the last one, and `limit` in force:
/// everything while the estimate `current + previous · (1 − x)` is below the limit; once it is
/// there, what the previous window's fading weight frees (`previous` per window); nothing while
/// it is above (a cut), until that weight has brought it down to the limit.
fn sliding_admit(current: f64, previous: f64, (x0, x1): (f64, f64), rate: f64, limit: f64) -> f64 {
    let estimate = current + previous * (1.0 - x0);
    let (before, at_limit_from) = if estimate < limit {
        if rate <= previous {
            // The estimate does not rise: all of it passes.
            return rate * (x1 - x0);
        }
        let reached = x0 + (limit - estimate) / (rate - previous);
        if reached >= x1 {
            return rate * (x1 - x0);
        }
        (rate * (reached - x0), reached)
    } else if previous > 0.0 {
        let reached = x0 + (estimate - limit) / previous;
        if reached >= x1 {
            return 0.0;
        }
        (0.0, reached)
    } else {
        return 0.0;
    };
    before + rate.min(previous) * (x1 - at_limit_from)
}

#[derive(Debug, Clone, Default)]
struct NodeStats {
    rounds: u64,
    /// Heartbeats without their enrolment entries, and answers.
    heartbeat_bytes: u64,
    /// The reports and grants carried in heartbeats.
    enrolment_bytes: u64,
    reports: u64,
    grants: u64,
    /// Thread CPU time of enrolment work (rounds, taking messages in) since the last round.
    cpu_pending: Duration,
    cpu: Duration,
    cpu_rounds: Vec<Duration>,
}

struct Node {
    id: NodeId,
    clock: Clock,
    window_phase: Duration,
    /// The agent runs (the datapath always does).
    alive: bool,
    incarnation: u64,
    seq: u64,
    membership: Membership,
    enrolment: Enrolment,
    /// The share view in force, and the cold share it gives.
    share: ShareView,
    cold: u32,
    outbox: BTreeMap<NodeId, Outgoing>,
    /// Per endpoint: the heartbeat in flight (seq, sent at on this clock).
    in_flight: HashMap<SocketAddr, (u64, Duration)>,
    grants: HashMap<u32, Entry>,
    flows: HashMap<u32, Flow>,
    /// Clients the fast path flagged since the last round.
    hot: Vec<u32>,
    /// Member clock of the next round.
    next_round: Duration,
    /// What it says of itself in heartbeats and answers, as of its last round.
    report: Option<membership::Report>,
    stats: NodeStats,
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

enum Message {
    Heartbeat {
        from: usize,
        to: usize,
        report: membership::Report,
        outgoing: Option<Outgoing>,
    },
    Answer {
        from: usize,
        to: usize,
        report: membership::Report,
        echo: u64,
    },
}

/// A sum above L: when, for which client, and what each member enforced.
#[derive(Debug, Clone)]
pub struct Violation {
    pub real: Duration,
    pub client: usize,
    pub sum: i64,
    pub limit: u32,
    /// (member, limit in force, cold share, phase, alive) for each member whose limit is not
    /// its cold share, then the cold shares.
    pub detail: String,
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

/// A window is measured in this many slices: sliding windows move a slice at a time.
pub const SLICES: u32 = 10;

/// What the measurement collects.
#[derive(Debug, Clone, Default)]
struct Measure {
    from: Duration,
    until: Option<Duration>,
    slice: Duration,
    /// Slices of a client kept: [`SLICES`] closed ones and those still open.
    kept: usize,
    /// Slices closed, and whole windows among them.
    closed: u64,
    windows: u64,
    /// admitted / min(rate, L) of each client in each window (back to back from the start).
    window_ratios: Vec<f64>,
    /// The largest admitted / L of any client in any window of a policy window's length that
    /// starts at a slice boundary, and which.
    worst_window: f64,
    worst_window_client: usize,
    node_stats: Vec<NodeStats>,
}

/// The limits in force of a tracked client on each member over time, for the time from a
/// demand change until it is in force everywhere.
#[derive(Debug, Clone)]
struct Track {
    since: Duration,
    initial: Vec<u32>,
    changes: Vec<(Duration, usize, u32)>,
    /// (end, admitted) of every sliding window of the measurement since.
    sliding: Vec<(Duration, f64)>,
}

/// Accuracy over the measurement.
#[derive(Debug, Clone, Copy, Default)]
pub struct Accuracy {
    /// Windows measured.
    pub windows: u64,
    /// Per client, admitted / (M·min(rate, L)) over the M windows: quantiles across clients.
    pub median: f64,
    pub p01: f64,
    pub p99: f64,
    pub min: f64,
    pub max: f64,
    /// Per client and real window, admitted / min(rate, L): median and 1st percentile.
    pub window_median: f64,
    pub window_p01: f64,
    /// The largest admitted / L in any window of the policy window's length (sliding by a
    /// tenth of it), and of which client.
    pub worst_window: f64,
    pub worst_window_client: usize,
    /// The clients with the largest and the smallest admitted / (M·min(rate, L)).
    pub most_client: usize,
    pub least_client: usize,
}

/// Wire and CPU cost per member over the measurement.
#[derive(Debug, Clone, Copy, Default)]
pub struct Cost {
    /// Members that ran throughout (averaged over).
    pub nodes: usize,
    pub seconds: f64,
    /// Bytes sent per member per second: all, and the enrolment entries alone.
    pub bytes_per_second: f64,
    pub enrolment_bytes_per_second: f64,
    /// Per member per round: bytes sent, enrolment bytes, heartbeat (and answer) bytes.
    pub bytes_per_round: f64,
    pub enrolment_bytes_per_round: f64,
    pub heartbeat_bytes_per_round: f64,
    /// Reports and grants sent per member per round.
    pub entries_per_round: f64,
    /// Thread CPU time of a member's enrolment work per round (the round itself and taking in
    /// the messages that came since the last): mean and 99th percentile.
    pub cpu_mean: Duration,
    pub cpu_p99: Duration,
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

/// Member `i`'s id: `n000`, `n001`, ...
pub fn node_id(i: usize) -> NodeId {
    NodeId::new(&format!("n{i:03}")).unwrap_or_else(|e| panic!("node id n{i:03}: {e}"))
}

fn node_addr(i: usize) -> SocketAddr {
    SocketAddr::from((Ipv4Addr::new(10, 0, (i >> 8) as u8, i as u8), 7201))
}

/// Thread CPU time.
fn cpu_now() -> Duration {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `ts` is a valid timespec; CLOCK_THREAD_CPUTIME_ID always exists on Linux.
    unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) };
    Duration::new(ts.tv_sec as u64, ts.tv_nsec as u32)
}

fn quantile(sorted: &[f64], q: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let at = ((sorted.len() - 1) as f64 * q).round() as usize;
    sorted[at.min(sorted.len() - 1)]
}

/// Bytes a length-delimited field of `len` bytes takes with its key (field numbers < 16).
fn field_len(len: usize) -> usize {
    1 + prost::encoding::encoded_len_varint(len as u64) + len
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

    /// Member `i`'s share view and cold share from its membership now (as the agent's
    /// heartbeat loop takes them up on each tick).
    fn refresh_share(&mut self, i: usize) -> ShareView {
        let members = self.nodes.len() as u32;
        let node = &mut self.nodes[i];
        let share = match self.cfg.views {
            Views::Membership => node
                .membership
                .share_view(self.t0 + node.clock.at(self.real)),
            Views::Fixed => ShareView {
                members,
                phase: Phase::Connected,
                partition: Partition::Share,
            },
        };
        node.share = share;
        self.set_cold(i, share.share(self.cfg.limit));
        share
    }

    /// A new member (numbered after the others) starting now; `continuing`: as with its pins
    /// (no join gate). Its endpoints are set by the caller.
    fn add_node(&mut self, continuing: bool) -> usize {
        let i = self.nodes.len();
        let ppm = if self.cfg.drift_ppm == 0 {
            0
        } else {
            self.rng.below(2 * u64::from(self.cfg.drift_ppm) + 1) as i64
                - i64::from(self.cfg.drift_ppm)
        };
        let clock = Clock {
            offset: Duration::from_millis(self.rng.below(1_000_000)),
            ppm,
        };
        let now = clock.at(self.real);
        let mut membership = Membership::new(
            node_id(i),
            membership::Timing::new(self.cfg.peer_timeout),
            Partition::Share,
            continuing,
            self.t0 + now,
        );
        membership.begin(self.t0 + now);
        // The share view and cold share come once its endpoints are set (`refresh_share`).
        let share = ShareView::JOINING;
        let cold = 0;
        let window_phase = self.rng.duration(Duration::ZERO, self.cfg.window);
        let first = now + self.rng.duration(Duration::ZERO, self.cfg.sync);
        self.nodes.push(Node {
            id: node_id(i),
            clock,
            window_phase,
            alive: true,
            incarnation: 1,
            seq: 0,
            membership,
            enrolment: Enrolment::new(node_id(i), self.timing, 1, self.cfg.capacity),
            share,
            cold,
            outbox: BTreeMap::new(),
            in_flight: HashMap::new(),
            grants: HashMap::new(),
            flows: HashMap::new(),
            hot: Vec::new(),
            next_round: first,
            report: None,
            stats: NodeStats::default(),
        });
        self.addrs.insert(node_addr(i), i);
        self.everyone = Rc::new((0..self.nodes.len()).map(node_id).collect());
        for row in &mut self.links {
            row.push((true, Duration::ZERO));
        }
        self.links.push(vec![(true, Duration::ZERO); i + 1]);
        for j in 0..=i {
            let there = self.rng.duration(self.cfg.delay.0, self.cfg.delay.1);
            let back = self.rng.duration(self.cfg.delay.0, self.cfg.delay.1);
            self.links[i][j].1 = there;
            self.links[j][i].1 = back;
        }
        let at = clock.real_at(first);
        self.schedule(at, Event::Round(i));
        if let Some(m) = &mut self.measure {
            m.node_stats.push(NodeStats::default());
        }
        i
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

    /// Starts measuring accuracy, bytes and CPU time now.
    pub fn start_measuring(&mut self) {
        let slice = self.cfg.window / SLICES;
        // A slice is closed once every member counted its packets: two sync intervals later.
        let open = (2 * self.cfg.sync).as_nanos().div_ceil(slice.as_nanos()) as usize + 1;
        let kept = SLICES as usize + open;
        for c in &mut self.clients {
            c.slices = vec![0.0; kept];
            c.total = 0.0;
        }
        self.measure = Some(Measure {
            from: self.real,
            slice,
            kept,
            node_stats: self.nodes.iter().map(|n| n.stats.clone()).collect(),
            ..Measure::default()
        });
        let first = self.real + slice + 2 * self.cfg.sync;
        self.schedule(first, Event::Window(0));
    }

    /// Stops the measurement at the end of the last whole window (runs on to count it) and
    /// returns accuracy and cost.
    pub fn stop_measuring(&mut self) -> (Accuracy, Cost) {
        let Some(m) = &self.measure else {
            return (Accuracy::default(), Cost::default());
        };
        let elapsed = self.real.saturating_sub(m.from);
        let whole = (elapsed.as_nanos() / self.cfg.window.as_nanos()) as u64;
        let end = m.from + self.cfg.window * whole as u32;
        if let Some(m) = &mut self.measure {
            m.until = Some(end);
        }
        // Let every member count its packets up to the end.
        self.run_for(2 * self.cfg.sync + Duration::from_millis(1));
        let Some(m) = self.measure.take() else {
            return (Accuracy::default(), Cost::default());
        };
        let windows = m.windows.max(1);
        let mut totals: Vec<(f64, usize)> = self
            .clients
            .iter()
            .enumerate()
            .filter(|(_, c)| c.demand.rate > 0.0)
            .map(|(i, c)| {
                let most = windows as f64 * c.demand.rate.min(f64::from(self.cfg.limit));
                (c.total / most, i)
            })
            .collect();
        totals.sort_by(|a, b| a.0.total_cmp(&b.0));
        let most_client = totals.last().map_or(0, |t| t.1);
        let least_client = totals.first().map_or(0, |t| t.1);
        let totals: Vec<f64> = totals.into_iter().map(|t| t.0).collect();
        let mut per_window = m.window_ratios.clone();
        per_window.sort_by(f64::total_cmp);
        let accuracy = Accuracy {
            windows: m.windows,
            median: quantile(&totals, 0.5),
            p01: quantile(&totals, 0.01),
            p99: quantile(&totals, 0.99),
            min: totals.first().copied().unwrap_or(f64::NAN),
            max: totals.last().copied().unwrap_or(f64::NAN),
            window_median: quantile(&per_window, 0.5),
            window_p01: quantile(&per_window, 0.01),
            worst_window: m.worst_window,
            worst_window_client: m.worst_window_client,
            most_client,
            least_client,
        };
        let seconds = (end - m.from).as_secs_f64();
        let mut cost = Cost {
            seconds,
            ..Cost::default()
        };
        let mut cpu: Vec<Duration> = Vec::new();
        let (mut bytes, mut enrol, mut heartbeat, mut entries, mut rounds) = (0, 0, 0, 0, 0);
        for (node, before) in self.nodes.iter().zip(&m.node_stats) {
            // Members that joined during the measurement count from when they joined.
            let s = &node.stats;
            bytes += s.heartbeat_bytes + s.enrolment_bytes
                - before.heartbeat_bytes
                - before.enrolment_bytes;
            enrol += s.enrolment_bytes - before.enrolment_bytes;
            heartbeat += s.heartbeat_bytes - before.heartbeat_bytes;
            entries += s.reports + s.grants - before.reports - before.grants;
            rounds += s.rounds - before.rounds;
            cpu.extend(&s.cpu_rounds[before.cpu_rounds.len()..]);
            cost.nodes += 1;
        }
        let per_node_second = (cost.nodes as f64 * seconds).max(f64::MIN_POSITIVE);
        let rounds = (rounds as f64).max(1.0);
        cost.bytes_per_second = bytes as f64 / per_node_second;
        cost.enrolment_bytes_per_second = enrol as f64 / per_node_second;
        cost.bytes_per_round = bytes as f64 / rounds;
        cost.enrolment_bytes_per_round = enrol as f64 / rounds;
        cost.heartbeat_bytes_per_round = heartbeat as f64 / rounds;
        cost.entries_per_round = entries as f64 / rounds;
        cpu.sort();
        if !cpu.is_empty() {
            cost.cpu_mean = cpu.iter().sum::<Duration>() / cpu.len() as u32;
            cost.cpu_p99 = cpu[((cpu.len() - 1) as f64 * 0.99).round() as usize];
        }
        (accuracy, cost)
    }

    /// Records, from now on, what each member enforces for client `c`: see
    /// [`Sim::settled_after`].
    pub fn track(&mut self, c: usize) {
        let initial = (0..self.nodes.len()).map(|i| self.in_force(i, c)).collect();
        self.tracked.insert(
            c as u32,
            Track {
                since: self.real,
                initial,
                changes: Vec::new(),
                sliding: Vec::new(),
            },
        );
    }

    /// For a tracked client: what it was admitted in each window of the policy window's length
    /// (ending at each slice boundary of the measurement) since it is tracked.
    pub fn sliding(&self, c: usize) -> &[(Duration, f64)] {
        self.tracked
            .get(&(c as u32))
            .map_or(&[], |t| t.sliding.as_slice())
    }

    /// For a client tracked since a change of its demand: how long after it every member's
    /// limit in force came within `tolerance` (a fraction of the value, at least one packet) of
    /// what it enforces now, for good. `None` if it is not tracked. Stops tracking it.
    pub fn settled_after(&mut self, c: usize, tolerance: f64) -> Option<Duration> {
        let track = self.tracked.remove(&(c as u32))?;
        let mut settled = Duration::ZERO;
        for i in 0..track.initial.len() {
            let end = self.in_force(i, c);
            let near = |v: u32| {
                (f64::from(v) - f64::from(end)).abs() <= (f64::from(end) * tolerance).max(1.0)
            };
            let mut at = if near(track.initial[i]) {
                None
            } else {
                Some(track.since)
            };
            let mut was_near = near(track.initial[i]);
            for &(t, node, v) in &track.changes {
                if node != i {
                    continue;
                }
                let now_near = near(v);
                if now_near && !was_near {
                    at = Some(t);
                }
                was_near = now_near;
            }
            if let Some(t) = at {
                settled = settled.max(t - track.since);
            }
        }
        Some(settled)
    }

    // -----------------------------------------------------------------------------------------
    // The invariant: every client's limits in force sum to at most L.

    fn record_change(&mut self, i: usize, c: u32, limit: u32) {
        if let Some(track) = self.tracked.get_mut(&c) {
            track.changes.push((self.real, i, limit));
        }
    }

    fn check(&mut self, c: u32) {
        self.checks += 1;
        let sum = self.cold_sum + self.clients[c as usize].excess;
        if sum > i64::from(self.cfg.limit) {
            self.violation(c, sum);
        }
    }

    fn check_all(&mut self) {
        let limit = i64::from(self.cfg.limit);
        for c in 0..self.clients.len() {
            self.checks += 1;
            let sum = self.cold_sum + self.clients[c].excess;
            if sum > limit {
                self.violation(c as u32, sum);
            }
        }
    }

    fn violation(&mut self, c: u32, sum: i64) {
        self.violation_count += 1;
        self.last_violation = Some(self.real);
        self.worst_excess = self.worst_excess.max(sum - i64::from(self.cfg.limit));
        if self.violations.len() >= 20 {
            return;
        }
        let mut detail = String::new();
        for node in &self.nodes {
            if let Some(e) = node.grants.get(&c)
                && e.counted != node.cold
            {
                detail.push_str(&format!(
                    "{}: {} (grant {} until {:?} on its clock {:?}; cold {}, {}, {}) ",
                    node.id,
                    e.counted,
                    e.grant.value,
                    Duration::from_nanos(e.grant.until_ns),
                    node.clock.at(self.real),
                    node.cold,
                    node.share.phase.as_str(),
                    if node.alive { "alive" } else { "dead" },
                ));
            }
        }
        let colds: Vec<u32> = self.nodes.iter().map(|n| n.cold).collect();
        detail.push_str(&format!("; cold shares {colds:?}"));
        self.violations.push(Violation {
            real: self.real,
            client: c as usize,
            sum,
            limit: self.cfg.limit,
            detail,
        });
    }

    /// Member `i`'s cold share becomes `cold` (its share view changed).
    fn set_cold(&mut self, i: usize, cold: u32) {
        let real = self.real;
        let node = &mut self.nodes[i];
        let old = node.cold;
        if old == cold {
            return;
        }
        node.cold = cold;
        self.cold_sum += i64::from(cold) - i64::from(old);
        let now_ns = node.clock.at(real).as_nanos() as u64;
        let mut changed = Vec::new();
        for (c, e) in node.grants.iter_mut() {
            let before = i64::from(e.counted) - i64::from(old);
            e.counted = e.grant.limit_at(now_ns, cold);
            let after = i64::from(e.counted) - i64::from(cold);
            self.clients[*c as usize].excess += after - before;
            changed.push((*c, e.counted));
        }
        for (c, limit) in changed {
            self.record_change(i, c, limit);
        }
        let ungranted: Vec<u32> = self
            .tracked
            .keys()
            .copied()
            .filter(|c| !self.nodes[i].grants.contains_key(c))
            .collect();
        for c in ungranted {
            self.record_change(i, c, cold);
        }
        self.check_all();
    }

    fn set_grant(
        &mut self,
        i: usize,
        c: u32,
        value: u32,
        until: Option<Duration>,
        silence: Duration,
    ) {
        let real = self.real;
        let node = &mut self.nodes[i];
        let now = node.clock.at(real);
        let until_ns = until.map_or(0, |u| u.saturating_sub(COARSE_SLACK).as_nanos() as u64);
        let grant = Grant {
            value,
            silence_ms: u32::try_from(silence.as_millis()).unwrap_or(u32::MAX),
            until_ns,
        };
        let counted = grant.limit_at(now.as_nanos() as u64, node.cold);
        let before = node
            .grants
            .insert(c, Entry { grant, counted })
            .map_or(0, |e| i64::from(e.counted) - i64::from(node.cold));
        self.clients[c as usize].excess += i64::from(counted) - i64::from(node.cold) - before;
        // Also for a grant at most the cold share now: the cold share may fall below it before
        // the lease ends.
        if until_ns > now.as_nanos() as u64 {
            let at = node.clock.real_at(Duration::from_nanos(until_ns));
            self.schedule(
                at,
                Event::Lapse {
                    node: i,
                    client: c,
                    until_ns,
                },
            );
        }
        self.record_change(i, c, counted);
        self.check(c);
    }

    fn clear_grant(&mut self, i: usize, c: u32) {
        let node = &mut self.nodes[i];
        if let Some(e) = node.grants.remove(&c) {
            self.clients[c as usize].excess -= i64::from(e.counted) - i64::from(node.cold);
            let cold = node.cold;
            self.record_change(i, c, cold);
        }
    }

    fn lapse(&mut self, i: usize, c: u32, until_ns: u64) {
        let real = self.real;
        let node = &mut self.nodes[i];
        let now_ns = node.clock.at(real).as_nanos() as u64;
        let cold = node.cold;
        let Some(e) = node.grants.get_mut(&c) else {
            return;
        };
        if e.grant.until_ns != until_ns {
            return;
        }
        let after = e.grant.limit_at(now_ns, cold);
        assert!(
            after <= e.counted,
            "a lease that ends never raises the limit ({} -> {after})",
            e.counted
        );
        self.clients[c as usize].excess -= i64::from(e.counted) - i64::from(after);
        e.counted = after;
        self.record_change(i, c, after);
    }

    /// Recounts every client's sum from the grants and cold shares, and checks it against the
    /// incremental one.
    fn recount(&mut self) {
        self.recounts += 1;
        let mut excess = vec![0i64; self.clients.len()];
        for node in &self.nodes {
            let now_ns = node.clock.at(self.real).as_nanos() as u64;
            for (c, e) in &node.grants {
                let mut limit = e.grant.limit_at(now_ns, node.cold);
                // A lease that ends at this very instant: its event may come after this one.
                if limit != e.counted
                    && node.clock.real_at(Duration::from_nanos(e.grant.until_ns)) == self.real
                {
                    limit = e.counted;
                }
                assert_eq!(
                    limit, e.counted,
                    "client {c} on {}: counted at {} but in force {limit}",
                    node.id, e.counted
                );
                excess[*c as usize] += i64::from(limit) - i64::from(node.cold);
            }
        }
        let cold_sum: i64 = self.nodes.iter().map(|n| i64::from(n.cold)).sum();
        assert_eq!(cold_sum, self.cold_sum, "the cold shares' sum drifted");
        for (c, (client, counted)) in self.clients.iter().zip(excess).enumerate() {
            assert_eq!(
                client.excess, counted,
                "client {c}: the incremental sum drifted from the recount at {:?}",
                self.real
            );
        }
    }

    // -----------------------------------------------------------------------------------------
    // Packets.

    /// Counts client `c`'s packets at member `i` up to real time `real` through its datapath.
    fn flow_until(&mut self, i: usize, c: u32, real: Duration) {
        let window = self.cfg.window;
        let node = &mut self.nodes[i];
        let now = node.clock.at(real);
        let Some(flow) = node.flows.get_mut(&c) else {
            return;
        };
        let mut from = flow.last;
        flow.last = now;
        if flow.rate <= 0.0 || now <= from {
            return;
        }
        let entry = node.grants.get(&c).copied();
        let mut admitted_parts: Vec<(Duration, Duration, f64)> = Vec::new();
        while from < now {
            let since = from.saturating_sub(node.window_phase);
            let index = (since.as_nanos() / window.as_nanos()) as i64;
            let window_end = node.window_phase + window * (index as u32 + 1);
            let mut to = window_end.min(now);
            // The limit in force changes where a lease ends.
            let mut in_force = node.cold;
            if let Some(e) = entry {
                let from_ns = from.as_nanos() as u64;
                in_force = e.grant.limit_at(from_ns, node.cold);
                if e.grant.until_ns > from_ns && e.grant.until_ns < to.as_nanos() as u64 {
                    to = Duration::from_nanos(e.grant.until_ns);
                }
            }
            flow.roll(index);
            let start = node.window_phase + window * index as u32;
            let at = |t: Duration| t.saturating_sub(start).as_secs_f64() / window.as_secs_f64();
            let (x0, x1) = (at(from), at(to));
            let arrived = flow.rate * (x1 - x0);
            let admitted = sliding_admit(
                flow.passed,
                flow.previous,
                (x0, x1),
                flow.rate,
                f64::from(in_force),
            );
            // As the fast path flags it (`limiter_common::maps::crosses_hot`): the admission
            // that takes the window's count to ⌈0.8 · limit⌉, or a drop.
            let hot = f64::from(hot_count(in_force));
            let crossed = flow.passed < hot && flow.passed + admitted >= hot;
            flow.passed += admitted;
            flow.count += arrived;
            if (crossed || arrived - admitted > 1e-9) && flow.flagged != index {
                flow.flagged = index;
                node.hot.push(c);
            }
            admitted_parts.push((from, to, admitted));
            from = to;
        }
        if self.measure.is_some() {
            let clock = self.nodes[i].clock;
            for (from, to, admitted) in admitted_parts {
                let (a, b) = (clock.real_at(from), clock.real_at(to));
                self.admit(c, a, b, admitted);
            }
        }
    }

    /// `admitted` packets of client `c` between real times `a` and `b`, spread evenly.
    fn admit(&mut self, c: u32, a: Duration, b: Duration, admitted: f64) {
        let Some(m) = &self.measure else {
            return;
        };
        let (w, kept) = (m.slice, m.kept as u64);
        let (from, until) = (m.from, m.until);
        // Spread over the whole span, counted only within the measurement.
        let full = b.saturating_sub(a).as_secs_f64().max(f64::MIN_POSITIVE);
        let (a, b) = (a.max(from), until.map_or(b, |u| b.min(u)).max(a.max(from)));
        if b <= a {
            return;
        }
        let client = &mut self.clients[c as usize];
        let mut t = a;
        while t < b {
            let k = ((t - from).as_nanos() / w.as_nanos()) as u64;
            let end = (from + w * (k as u32 + 1)).min(b);
            let part = admitted * (end - t).as_secs_f64() / full;
            client.slices[(k % kept) as usize] += part;
            client.total += part;
            t = end;
        }
    }

    /// Slice `k` of the measurement is over and counted: the window of the last [`SLICES`]
    /// slices ends with it.
    fn close_window(&mut self, k: u64) {
        let limit = f64::from(self.cfg.limit);
        let sync = self.cfg.sync;
        let Some(m) = &mut self.measure else {
            return;
        };
        let end = m.from + m.slice * (k as u32 + 1);
        if m.until.is_some_and(|u| end > u) {
            return;
        }
        m.closed += 1;
        let (kept, slices) = (m.kept as u64, u64::from(SLICES));
        let whole = (k + 1).is_multiple_of(slices);
        if k + 1 >= slices {
            for (c, client) in self.clients.iter_mut().enumerate() {
                let admitted: f64 = (k + 1 - slices..=k)
                    .map(|j| client.slices[(j % kept) as usize])
                    .sum();
                if let Some(track) = self.tracked.get_mut(&(c as u32)) {
                    track.sliding.push((end, admitted));
                }
                if client.demand.rate > 0.0 {
                    if whole {
                        m.window_ratios
                            .push(admitted / client.demand.rate.min(limit));
                    }
                    if admitted / limit > m.worst_window {
                        m.worst_window = admitted / limit;
                        m.worst_window_client = c;
                    }
                }
                // The oldest slice leaves every later window.
                client.slices[((k + 1 - slices) % kept) as usize] = 0.0;
            }
        }
        if whole {
            m.windows += 1;
        }
        let next = m.from + m.slice * (k as u32 + 2) + 2 * sync;
        self.schedule(next, Event::Window(k + 1));
    }

    // -----------------------------------------------------------------------------------------
    // A member's round and its messages.

    fn round(&mut self, i: usize) {
        let real = self.real;
        self.rounds += 1;
        if self.cfg.recount_every > 0 && self.rounds.is_multiple_of(self.cfg.recount_every) {
            self.recount();
        }
        // The datapath counts packets whether the agent runs or not.
        let flows: Vec<u32> = self.nodes[i].flows.keys().copied().collect();
        for c in flows {
            self.flow_until(i, c, real);
        }
        let node = &mut self.nodes[i];
        let now = node.clock.at(real);
        node.next_round += self.cfg.sync;
        let next = node.clock.real_at(node.next_round);
        self.schedule(next, Event::Round(i));
        let node = &mut self.nodes[i];
        if !node.alive {
            node.hot.clear();
            return;
        }
        let instant = self.t0 + now;
        let share = self.refresh_share(i);
        let cold = share.share(self.cfg.limit);
        let started = cpu_now();
        let node = &mut self.nodes[i];
        let info = PolicyInfo {
            limit: self.cfg.limit,
            window: self.cfg.window,
            cold,
        };
        let (out, writes) = if matches!(share.phase, Phase::Connected | Phase::Alone) {
            let (members, live, agreed) = match self.cfg.views {
                Views::Membership => {
                    let (members, live, agreed) = node.membership.enrolment_view(instant);
                    (Rc::new(members), Rc::new(live), agreed)
                }
                Views::Fixed => (self.everyone.clone(), self.everyone.clone(), true),
            };
            let view = View {
                members: &members,
                live: &live,
                agreed_members: share.members,
                agreed,
            };
            for c in std::mem::take(&mut node.hot) {
                node.enrolment
                    .hot(now, &view, self.clients[c as usize].key, POLICY);
            }
            let held: Vec<ClientKey> = node.enrolment.held().copied().collect();
            for k in &held {
                let flow = self.keys.get(k).and_then(|c| node.flows.get(c));
                let count = flow.map(|f| f.count as u64);
                // What the node's window holds as admitted: its sliding estimate now.
                let used = flow.map_or(0, |f| {
                    f.estimate(node.window_phase, self.cfg.window, now).floor() as u32
                });
                node.enrolment.observe(now, k, count, used);
            }
            node.enrolment.round(now, &view, &|_| Some(info))
        } else {
            node.hot.clear();
            (BTreeMap::new(), node.enrolment.suspend())
        };
        node.outbox = out;
        let cpu = (cpu_now() - started) + node.stats.cpu_pending;
        node.stats.cpu_pending = Duration::ZERO;
        node.stats.cpu += cpu;
        node.stats.cpu_rounds.push(cpu);
        node.stats.rounds += 1;
        for w in writes {
            match w {
                Write::Set {
                    client,
                    value,
                    until,
                    silence,
                } => {
                    if let Some(&c) = self.keys.get(&client) {
                        self.set_grant(i, c, value, until, silence);
                    }
                }
                Write::Clear(client) => {
                    if let Some(&c) = self.keys.get(&client) {
                        self.clear_grant(i, c);
                    }
                }
            }
        }
        self.send_heartbeats(i, now);
    }

    fn send_heartbeats(&mut self, i: usize, now: Duration) {
        let instant = self.t0 + now;
        let fixed = self.cfg.views == Views::Fixed;
        let members = self.nodes.len() as u32;
        let node = &mut self.nodes[i];
        let me = if fixed {
            membership::Report {
                node: node.id.clone(),
                incarnation: node.incarnation,
                seq: node.seq,
                members,
                view_hash: 0x7e57_7e57_7e57_7e57,
            }
        } else {
            node.membership.report(node.incarnation, node.seq, instant)
        };
        node.report = Some(me.clone());
        let endpoints: Vec<SocketAddr> = if fixed {
            (0..self.nodes.len())
                .filter(|&j| j != i)
                .map(node_addr)
                .collect()
        } else {
            self.nodes[i].membership.endpoints().collect()
        };
        let half_timeout = self.cfg.peer_timeout / 2;
        for addr in endpoints {
            let Some(&j) = self.addrs.get(&addr) else {
                continue;
            };
            let node = &mut self.nodes[i];
            if node
                .in_flight
                .get(&addr)
                .is_some_and(|&(_, sent)| now.saturating_sub(sent) < half_timeout)
            {
                continue;
            }
            node.seq += 1;
            let report = membership::Report {
                seq: node.seq,
                ..me.clone()
            };
            let peer = if fixed {
                Some(node_id(j))
            } else {
                node.membership.endpoint_node(addr).cloned()
            };
            let outgoing = peer.and_then(|id| node.outbox.remove(&id)).map(|mut out| {
                out.reports.truncate(MAX_CLIENTS_PER_MESSAGE);
                out.grants.truncate(MAX_CLIENTS_PER_MESSAGE);
                out
            });
            if !fixed {
                node.in_flight.insert(addr, (node.seq, now));
            }
            let base = heartbeat_len(&report, 0);
            let entries = outgoing.as_ref().map_or(0, |o| self.outgoing_len(o));
            let node = &mut self.nodes[i];
            node.stats.heartbeat_bytes += base as u64;
            node.stats.enrolment_bytes += entries as u64;
            if let Some(o) = &outgoing {
                node.stats.reports += o.reports.len() as u64;
                node.stats.grants += o.grants.len() as u64;
            }
            if fixed {
                // The answer, as `take_heartbeat` would count it (none is simulated).
                self.nodes[j].stats.heartbeat_bytes += heartbeat_len(&report, report.seq) as u64;
                if outgoing.is_none() {
                    continue;
                }
            }
            self.send(
                i,
                j,
                Message::Heartbeat {
                    from: i,
                    to: j,
                    report,
                    outgoing,
                },
            );
        }
    }

    /// Bytes the enrolment entries of `out` add to a heartbeat.
    fn outgoing_len(&mut self, out: &Outgoing) -> usize {
        let mut len = 0;
        for r in &out.reports {
            let m = &mut self.scratch_report;
            m.client.clear();
            m.client.extend_from_slice(&r.client);
            m.policy = u32::from(r.policy);
            m.seq = r.report.seq;
            m.demand = r.report.demand;
            m.applied = r.report.applied;
            m.echo = r.report.echo;
            len += field_len(m.encoded_len());
        }
        for g in &out.grants {
            let m = &mut self.scratch_grant;
            m.client.clear();
            m.client.extend_from_slice(&g.client);
            m.policy = u32::from(g.policy);
            m.message = g.message.message;
            m.grant = g.message.grant.map(|v| GrantValue {
                seq: v.seq,
                value: v.value,
                answers: v.answers,
            });
            m.release = g.release;
            (m.lease_ms, m.silence_ms) = wire_terms(g.message.terms);
            len += field_len(m.encoded_len());
        }
        len
    }

    fn send(&mut self, from: usize, to: usize, message: Message) {
        let (up, delay) = self.links[from][to];
        if !up || (self.cfg.loss > 0.0 && self.rng.unit() < self.cfg.loss) {
            return;
        }
        let jitter = self.rng.duration(Duration::ZERO, self.cfg.jitter);
        let slot = match self.free.pop() {
            Some(s) => {
                self.slab[s as usize] = Some(message);
                s
            }
            None => {
                self.slab.push(Some(message));
                (self.slab.len() - 1) as u32
            }
        };
        self.schedule(self.real + delay + jitter, Event::Deliver(slot));
    }

    fn deliver(&mut self, slot: u32) {
        let Some(message) = self.slab[slot as usize].take() else {
            return;
        };
        self.free.push(slot);
        match message {
            Message::Heartbeat {
                from,
                to,
                report,
                outgoing,
            } => self.take_heartbeat(from, to, &report, outgoing),
            Message::Answer {
                from,
                to,
                report,
                echo,
            } => {
                let node = &mut self.nodes[to];
                if !node.alive {
                    return;
                }
                let now = node.clock.at(self.real);
                let addr = node_addr(from);
                let half_timeout = self.cfg.peer_timeout / 2;
                match node.in_flight.get(&addr) {
                    Some(&(seq, sent)) if seq == echo && now - sent < half_timeout => {
                        node.in_flight.remove(&addr);
                        // A refusal (a peer claiming this member's id) cannot happen here.
                        let heard =
                            node.membership
                                .answered(addr, self.t0 + sent, &report, self.t0 + now);
                        if heard == Ok(Heard::Restarted) {
                            node.enrolment
                                .holder_restarted(&report.node, report.incarnation);
                        }
                    }
                    _ => {}
                }
            }
        }
    }

    /// Member `to` takes in a heartbeat (its membership part, then its enrolment messages,
    /// as the agent's `heartbeat` handler) and answers.
    fn take_heartbeat(
        &mut self,
        from: usize,
        to: usize,
        report: &membership::Report,
        outgoing: Option<Outgoing>,
    ) {
        let real = self.real;
        let node = &mut self.nodes[to];
        if !node.alive {
            return;
        }
        let now = node.clock.at(real);
        let instant = self.t0 + now;
        let fixed = self.cfg.views == Views::Fixed;
        if !fixed {
            match node.membership.heard(report, instant) {
                Ok(Heard::Known) => {}
                // Before the answer, as the agent does.
                Ok(Heard::Restarted) => node
                    .enrolment
                    .holder_restarted(&report.node, report.incarnation),
                Err(_) => return,
            }
        }
        node.seq += 1;
        let answer = match &node.report {
            Some(me) => membership::Report {
                seq: node.seq,
                ..me.clone()
            },
            None => node.membership.report(node.incarnation, node.seq, instant),
        };
        if let Some(out) = outgoing
            && !(out.reports.is_empty() && out.grants.is_empty())
        {
            let started = cpu_now();
            let info = PolicyInfo {
                limit: self.cfg.limit,
                window: self.cfg.window,
                cold: node.cold,
            };
            let share = node.share;
            let sender = node_id(from);
            // The view is read only for a client this member neither owns nor holds.
            let needs_view = out.reports.iter().any(|r| !node.enrolment.owns(&r.client))
                || out.grants.iter().any(|g| !node.enrolment.holds(&g.client));
            let (members, live, agreed) = match (needs_view, fixed) {
                (true, false) => node.membership.enrolment_view(instant),
                (true, true) => (self.everyone.to_vec(), self.everyone.to_vec(), true),
                (false, _) => (Vec::new(), Vec::new(), false),
            };
            let view = View {
                members: &members,
                live: &live,
                agreed_members: share.members,
                agreed,
            };
            for msg in out.reports {
                node.enrolment
                    .receive_report(now, &view, &sender, msg, Some(info));
            }
            for mut msg in out.grants {
                // Through the wire: the lease in whole ms down, the silence limit up.
                let (lease_ms, silence_ms) = wire_terms(msg.message.terms);
                msg.message.terms = msg.message.terms.map(|_| Terms {
                    lease: Duration::from_millis(u64::from(lease_ms)),
                    silence: Duration::from_millis(u64::from(silence_ms)),
                });
                node.enrolment.receive_grant(now, &view, &sender, msg);
            }
            node.stats.cpu_pending += cpu_now() - started;
        }
        if fixed {
            return;
        }
        let echo = report.seq;
        let len = heartbeat_len(&answer, echo);
        self.nodes[to].stats.heartbeat_bytes += len as u64;
        self.send(
            to,
            from,
            Message::Answer {
                from: to,
                to: from,
                report: answer,
                echo,
            },
        );
    }
}

/// A grant's terms as the wire carries them: the lease in ms rounded down, the silence limit
/// rounded up (0, 0: none).
fn wire_terms(terms: Option<Terms>) -> (u32, u32) {
    terms.map_or((0, 0), |t| {
        (
            u32::try_from(t.lease.as_millis()).unwrap_or(u32::MAX),
            u32::try_from(t.silence.as_nanos().div_ceil(1_000_000)).unwrap_or(u32::MAX),
        )
    })
}

/// Bytes of a heartbeat (or answer) without enrolment entries.
fn heartbeat_len(report: &membership::Report, echo: u64) -> usize {
    Heartbeat {
        node_id: report.node.to_string(),
        incarnation: report.incarnation,
        seq: report.seq,
        echo,
        members: report.members,
        view_hash: report.view_hash,
        nonce: 0x5eed_5eed_5eed_5eed,
        reports: Vec::new(),
        grants: Vec::new(),
    }
    .encoded_len()
}

// ---------------------------------------------------------------------------------------------
// Demand models.

/// 3·L spread 80/15/5 over three distinct members.
pub fn skewed(rng: &mut Rng, nodes: usize, limit: u32) -> Demand {
    let at = rng.distinct(nodes, 3);
    Demand {
        rate: 3.0 * f64::from(limit),
        at: vec![(at[0], 0.80), (at[1], 0.15), (at[2], 0.05)],
    }
}

/// `rate` spread evenly over every one of `nodes` members.
pub fn even(nodes: usize, rate: f64) -> Demand {
    Demand {
        rate,
        at: (0..nodes).map(|n| (n, 1.0 / nodes as f64)).collect(),
    }
}

/// The spread reversed (80/15/5 becomes 5/15/80 on the same members).
pub fn reversed(demand: &Demand) -> Demand {
    let fractions: Vec<f64> = demand.at.iter().rev().map(|(_, f)| *f).collect();
    Demand {
        rate: demand.rate,
        at: demand
            .at
            .iter()
            .zip(fractions)
            .map(|((n, _), f)| (*n, f))
            .collect(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Runs a flow of `rate` per window through the model's counter for `windows` windows in
    /// `steps` steps each, the limit given per window; returns what each window admitted.
    fn run(rate: f64, limits: &[f64], steps: u32) -> Vec<f64> {
        let mut current = 0.0;
        let mut admitted = Vec::new();
        for &limit in limits {
            let previous = std::mem::replace(&mut current, 0.0);
            for s in 0..steps {
                let x = (
                    f64::from(s) / f64::from(steps),
                    f64::from(s + 1) / f64::from(steps),
                );
                current += sliding_admit(current, previous, x, rate, limit);
            }
            admitted.push(current);
        }
        admitted
    }

    /// A flow above its limit gets the limit in every window, however finely it is stepped; one
    /// under it passes whole.
    #[test]
    fn the_counter_admits_the_limit_per_window_and_all_of_a_flow_under_it() {
        for steps in [1, 7, 50] {
            let over = run(300.0, &[100.0; 6], steps);
            assert!(
                over.iter().all(|a| (a - 100.0).abs() < 1e-9),
                "{steps}: {over:?}"
            );
            let under = run(60.0, &[100.0; 6], steps);
            assert!(
                under.iter().all(|a| (a - 60.0).abs() < 1e-9),
                "{steps}: {under:?}"
            );
        }
    }

    /// Cut from 100 to 20 at a window's start: nothing passes until the previous window's
    /// weight has faded to the cut (at 80% of the window), then what the fading frees: 20 in
    /// the last fifth, and 20 in each window after.
    #[test]
    fn a_cut_passes_nothing_until_the_previous_window_fades_to_it() {
        let early = sliding_admit(0.0, 100.0, (0.0, 0.8), 300.0, 20.0);
        assert!(early.abs() < 1e-9, "{early}");
        let admitted = run(300.0, &[100.0, 100.0, 20.0, 20.0], 50);
        assert!((admitted[2] - 20.0).abs() < 1e-9, "{admitted:?}");
        assert!((admitted[3] - 20.0).abs() < 1e-9, "{admitted:?}");
    }
}
