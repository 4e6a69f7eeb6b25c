//! A member: its agent's state and datapath, and its sync round.

use std::{
    collections::{BTreeMap, HashMap},
    net::{Ipv4Addr, SocketAddr},
    rc::Rc,
    time::Duration,
};

use super::{
    ClientKey, Enrolment, Event, Membership, NodeId, Outgoing, POLICY, Partition, Phase,
    PolicyInfo, ShareView, Sim, View, Views, Write,
    clock::Clock,
    datapath::{Entry, Flow},
    measure::{NodeStats, cpu_now},
    membership,
};

pub(super) struct Node {
    pub(super) id: NodeId,
    pub(super) clock: Clock,
    pub(super) window_phase: Duration,
    /// The agent runs (the datapath always does).
    pub(super) alive: bool,
    pub(super) incarnation: u64,
    pub(super) seq: u64,
    pub(super) membership: Membership,
    pub(super) enrolment: Enrolment,
    /// The share view in force, and the cold share it gives.
    pub(super) share: ShareView,
    pub(super) cold: u32,
    pub(super) outbox: BTreeMap<NodeId, Outgoing>,
    /// Per endpoint: the heartbeat in flight (seq, sent at on this clock).
    pub(super) in_flight: HashMap<SocketAddr, (u64, Duration)>,
    pub(super) grants: HashMap<u32, Entry>,
    pub(super) flows: HashMap<u32, Flow>,
    /// Clients the fast path flagged since the last round.
    pub(super) hot: Vec<u32>,
    /// Member clock of the next round.
    next_round: Duration,
    /// What it says of itself in heartbeats and answers, as of its last round.
    pub(super) report: Option<membership::Report>,
    pub(super) stats: NodeStats,
    /// Until then (real time) its map writes stall: the share view in force stays.
    pub(super) stalled_until: Duration,
}

/// Member `i`'s id: `n000`, `n001`, ...
pub fn node_id(i: usize) -> NodeId {
    NodeId::new(&format!("n{i:03}")).unwrap_or_else(|e| panic!("node id n{i:03}: {e}"))
}

pub(super) fn node_addr(i: usize) -> SocketAddr {
    SocketAddr::from((Ipv4Addr::new(10, 0, (i >> 8) as u8, i as u8), 7201))
}

impl Sim {
    /// Member `i`'s share view and cold share from its membership now (as the agent's
    /// heartbeat loop takes them up on each tick).
    pub(super) fn refresh_share(&mut self, i: usize) -> ShareView {
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
        if self.real < node.stalled_until {
            return node.share;
        }
        node.share = share;
        self.set_cold(i, share.share(self.cfg.limit));
        share
    }

    /// A new member (numbered after the others) starting now; `continuing`: as with its pins
    /// (no join gate). Its endpoints are set by the caller.
    pub(super) fn add_node(&mut self, continuing: bool) -> usize {
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
            stalled_until: Duration::ZERO,
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

    pub(super) fn round(&mut self, i: usize) {
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
        let splitting = matches!(share.phase, Phase::Connected | Phase::Alone);
        let (out, writes, members) = if splitting {
            let (members, live, agreed) = match self.cfg.views {
                Views::Membership => {
                    let (members, live, agreed) = node.membership.enrolment_view(instant);
                    (Rc::new(members), Rc::new(live), agreed)
                }
                Views::Fixed => (self.everyone.clone(), self.everyone.clone(), true),
            };
            // What each member's maps hold, as the agent's node takes it for its rounds.
            let counts = match self.cfg.views {
                Views::Membership => node.membership.counts(instant, &members, &share),
                Views::Fixed => Vec::new(),
            };
            let view = View {
                members: &members,
                live: &live,
                agreed_members: share.members,
                agreed,
                counts: &counts,
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
            let (out, writes) = node.enrolment.round(now, &view, &|_| Some(info));
            (out, writes, members)
        } else {
            node.hot.clear();
            (BTreeMap::new(), node.enrolment.suspend(), Rc::default())
        };
        // As the agent's outbox: news waits (the newest per client) until a heartbeat takes it,
        // and only for members (one forgotten is never sent to).
        if splitting {
            for (peer, newer) in out {
                node.outbox.entry(peer).or_default().merge(newer);
            }
            node.outbox
                .retain(|peer, o| !o.is_empty() && members.contains(peer));
        } else {
            node.outbox.clear();
        }
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
}
