//! Enrolment on the wire and on the maps: each sync interval, the clients the fast path reported
//! hot are taken up, the held clients' counters read, one round of [`super::super::enrolment`]
//! run, the grant changes written to the maps, and the messages for each member left in the
//! outbox its next heartbeat carries. Heartbeats that arrive hand their reports and grants in.

use std::{collections::HashMap, sync::atomic::Ordering, time::Duration};

use limiter_common::{ClientState, Grant, addr::ClientKey};
use tonic::Status;

use super::{Shared, wire::MAX_CLIENTS_PER_MESSAGE};
use crate::{
    cluster::{
        NodeId, PolicyName,
        enrolment::{GrantMsg, Outgoing, PinnedGrant, PolicyInfo, ReportMsg, View, Write},
        lease::{self, Report, Terms, ToHolder},
    },
    proto::cluster::{ClientGrant, ClientReport, GrantValue, Heartbeat},
};

/// Slack taken off a lease's end when it is written for the kernel: the fast path reads a coarse
/// clock for windows of a second or more, up to two jiffies (20 ms at HZ=100) behind.
const COARSE_SLACK: Duration = Duration::from_millis(25);

/// Why the maps did not take a change of grants.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct GrantsError(pub String);

/// The maps, as enrolment needs them (the agent implements it over its pinned maps).
pub trait Datapath: Send {
    /// The clients the fast path (or the checker) reported hot since the last call, each with
    /// the name of the global policy it is under now. Left out: a client whose entry is gone,
    /// is under no global policy, or was resolved under policies other than those in force
    /// (a reload may renumber ids: its next packet resolves it, and reports it again if it
    /// stays hot).
    fn hot(&mut self) -> Vec<(ClientKey, PolicyName)>;
    /// The entries of `clients`, in order, wherever they live: each with the name of the
    /// global policy it is under now, where that is known (as for `hot`).
    fn entries(&mut self, clients: &[ClientKey]) -> Vec<Option<Entry>>;
    /// Applies grant changes in order, each on its own; returns the indices of those refused,
    /// with why.
    fn write(&mut self, writes: &[(ClientKey, Option<Grant>)]) -> Vec<(usize, GrantsError)>;
    /// The grants the maps hold (at start: those a previous run left).
    fn grants(&self) -> Result<Vec<PinnedGrant>, GrantsError>;
    /// The adaptive loop's caps on global clients (`crate::adaptive::global`), if they changed
    /// since the last call.
    fn caps(&mut self) -> Option<HashMap<ClientKey, u32>> {
        None
    }
}

/// A client's entry as enrolment reads it (see [`Datapath::entries`]).
#[derive(Debug, Clone, Copy)]
pub struct Entry {
    pub state: ClientState,
    pub under: Under,
}

/// The policy a client's entry is under now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Under {
    /// Not known: the entry was resolved under other policies (its next packet resolves it),
    /// or a change of the policies was under way while it was read.
    Unknown,
    /// A local policy, or the default.
    Local,
    /// A global policy, by its name on the wire.
    Global(PolicyName),
}

/// CLOCK_MONOTONIC, the clock `bpf_ktime_get_ns` reads: leases written for the kernel are on it.
pub fn monotonic() -> Duration {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `ts` is a valid timespec; CLOCK_MONOTONIC always exists on Linux.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    Duration::new(ts.tv_sec as u64, ts.tv_nsec as u32)
}

/// What enrolment needs of the node's state now: the member view and the global policies.
struct Snapshot {
    /// The phase gives a share to split (connected or alone).
    splitting: bool,
    members: Vec<NodeId>,
    live: Vec<NodeId>,
    agreed_members: u32,
    agreed: bool,
    /// By member: the count its maps hold, as last reported (see [`View::counts`]).
    counts: Vec<Option<u32>>,
    policies: HashMap<PolicyName, PolicyInfo>,
}

impl Snapshot {
    fn take(shared: &Shared) -> Snapshot {
        let now = std::time::Instant::now();
        let state = shared.lock();
        let (members, live, agreed) = state.membership.enrolment_view(now);
        let counts = state.membership.counts(now, &members, &state.view);
        let policies = state
            .named
            .iter()
            .map(|(&name, &(limit, window_us))| {
                (
                    name,
                    PolicyInfo {
                        limit,
                        window: Duration::from_micros(u64::from(window_us)),
                        cold: state.view.share(limit),
                    },
                )
            })
            .collect();
        Snapshot {
            splitting: matches!(
                state.view.phase,
                crate::cluster::membership::Phase::Connected
                    | crate::cluster::membership::Phase::Alone
            ),
            members,
            live,
            agreed_members: state.view.members,
            agreed,
            counts,
            policies,
        }
    }

    fn view(&self) -> View<'_> {
        View {
            members: &self.members,
            live: &self.live,
            agreed_members: self.agreed_members,
            agreed: self.agreed,
            counts: &self.counts,
        }
    }

    fn info(&self, policy: PolicyName) -> Option<PolicyInfo> {
        self.policies.get(&policy).copied()
    }
}

/// One enrolment round (blocking: map reads and writes). The maps are read before enrolment is
/// locked, so heartbeats that arrive meanwhile are taken in without waiting for the reads.
pub fn round(shared: &Shared) {
    let mut datapath = shared.datapath.lock().unwrap_or_else(|e| e.into_inner());
    let Some(datapath) = datapath.as_mut() else {
        return;
    };
    let snapshot = Snapshot::take(shared);
    if snapshot.policies.is_empty() {
        return;
    }
    // The fast path reports a client once, when it moves into `LIMITED` (one that stays busy
    // stays there; entries that never move report one drop in 256, and the checker notes denied global IDs): a notice
    // taken while no round can split is kept (`Enrolment::defer`), not left in the ring, which
    // would overflow during a long partition.
    let hot = datapath.hot();
    if let Some(caps) = datapath.caps() {
        shared.enrolment().set_caps(caps);
    }
    let out = if snapshot.splitting {
        let held: Vec<ClientKey> = shared.enrolment().held().copied().collect();
        let read = datapath.entries(&held);
        let entries: HashMap<ClientKey, Option<Entry>> = held.into_iter().zip(read).collect();
        let now = monotonic();
        let mut enrolment = shared.enrolment();
        split(
            &mut enrolment,
            datapath.as_mut(),
            &snapshot,
            &hot,
            &entries,
            now,
        )
    } else {
        // Cut off or joining: the owner's ledgers would count silent holders at this phase's
        // share (0 under `deny`); no round, and this node's raises end now. The fast path's hot
        // reports (at a move into LIMITED or paced, and the scan of LIMITED at start) are kept for later.
        let hot: Vec<(ClientKey, PolicyName)> = hot
            .into_iter()
            .filter(|(_, policy)| snapshot.info(*policy).is_some())
            .collect();
        let now = monotonic();
        let mut enrolment = shared.enrolment();
        for (client, policy) in hot {
            enrolment.defer(client, policy, now);
        }
        let writes = enrolment.suspend();
        let refused = write_grants(datapath.as_mut(), &writes);
        enrolment.unwritten(&refused);
        Default::default()
    };
    let mut outbox = shared.outbox.lock().unwrap_or_else(|e| e.into_inner());
    if snapshot.splitting {
        // News goes out once: what the last heartbeat could not carry (one was in flight, or
        // the list was longer than a message) waits, superseded per client by newer state.
        for (node, newer) in out {
            outbox.waiting.entry(node).or_default().merge(newer);
        }
        outbox.keep_members(&snapshot.members);
    } else {
        outbox.drop_all();
    }
}

/// The enrolment messages waiting for each member (the newest per client), sent with the next
/// heartbeats to it or answers to its heartbeats, and which of those took some last.
#[derive(Debug, Default)]
pub struct Outbox {
    waiting: std::collections::BTreeMap<NodeId, Outgoing>,
    /// Per member, the number of the last take of its messages (`takes` counts them all).
    taken: HashMap<NodeId, u64>,
    takes: u64,
}

/// Messages a heartbeat took out of the [`Outbox`] for `node` (its `number`-th take).
pub struct Taken {
    node: NodeId,
    number: u64,
    out: Outgoing,
}

impl Outbox {
    /// Nothing waits, and nothing taken before is put back. The take numbers go on: one still
    /// held by a heartbeat in flight must never match a later take's.
    fn drop_all(&mut self) {
        self.waiting.clear();
        self.taken.clear();
    }

    /// Only the members' messages wait.
    fn keep_members(&mut self, members: &[NodeId]) {
        self.waiting
            .retain(|node, o| !o.is_empty() && members.contains(node));
        self.taken.retain(|node, _| members.contains(node));
    }

    /// Takes out the `most` reports and grant messages for `node` that waited longest.
    fn take(&mut self, node: &NodeId, most: usize) -> Option<Taken> {
        let waiting = self.waiting.get_mut(node)?;
        let out = waiting.take(most);
        if waiting.is_empty() {
            self.waiting.remove(node);
        }
        self.takes += 1;
        self.taken.insert(node.clone(), self.takes);
        Some(Taken {
            node: node.clone(),
            number: self.takes,
            out,
        })
    }

    /// Puts back what a take that got no answer carried ([`Outgoing::put_back`]), unless a
    /// later take sent the member newer messages meanwhile (an answer to its heartbeat), which
    /// the older ones must not follow, or the member's messages were dropped since (it left,
    /// or the node stopped splitting): then they are dropped too.
    fn put_back(&mut self, unsent: Taken) {
        if self.taken.get(&unsent.node) == Some(&unsent.number) {
            self.waiting
                .entry(unsent.node)
                .or_default()
                .put_back(unsent.out);
        }
    }
}

/// Writes grant changes to the maps; returns those refused (and logs why).
fn write_grants(datapath: &mut dyn Datapath, writes: &[Write]) -> Vec<Write> {
    let changes: Vec<(ClientKey, Option<Grant>)> = writes
        .iter()
        .map(|w| match *w {
            Write::Set {
                client,
                value,
                until,
                silence,
            } => (
                client,
                Some(Grant {
                    value,
                    silence_ms: u32::try_from(silence.as_millis()).unwrap_or(u32::MAX),
                    until_ns: until.map_or(0, |u| {
                        u64::try_from(u.saturating_sub(COARSE_SLACK).as_nanos()).unwrap_or(0)
                    }),
                }),
            ),
            Write::Clear(client) => (client, None),
        })
        .collect();
    let refused = datapath.write(&changes);
    if let Some((_, e)) = refused.first() {
        tracing::warn!(
            "cluster: the maps refused {} of {} grant changes (offered again next round): {e}",
            refused.len(),
            changes.len()
        );
    }
    refused
        .iter()
        .filter_map(|&(i, _)| writes.get(i).copied())
        .collect()
}

/// The hot clients taken up, the held clients' counters read, and one round run.
fn split(
    enrolment: &mut crate::cluster::enrolment::Enrolment,
    datapath: &mut dyn Datapath,
    snapshot: &Snapshot,
    hot: &[(ClientKey, PolicyName)],
    entries: &HashMap<ClientKey, Option<Entry>>,
    now: Duration,
) -> std::collections::BTreeMap<NodeId, Outgoing> {
    let view = snapshot.view();
    // A held client whose entry is now under another global policy (a reload gave its address
    // a longer policy, or made its own local) is let go, and held afresh under that one if it
    // is global here: its grants are not its policy's any more.
    for (client, entry) in entries {
        let Some(Entry { under, .. }) = entry else {
            continue;
        };
        let Some(held) = enrolment.held_under(client) else {
            continue;
        };
        match *under {
            Under::Global(policy) if policy != held => {
                enrolment.let_go(client, now);
                if snapshot.info(policy).is_some() {
                    enrolment.hot(now, &view, *client, policy);
                }
            }
            Under::Local => enrolment.let_go(client, now),
            _ => {}
        }
    }
    for &(client, policy) in hot {
        if snapshot.info(policy).is_some() {
            enrolment.hot(now, &view, client, policy);
        }
    }
    let held: Vec<ClientKey> = enrolment.held().copied().collect();
    for client in &held {
        // A client a grant attached while the maps were read gets its first sample next round.
        if let Some(entry) = entries.get(client) {
            let state = entry.map(|e| e.state);
            let count = state.map(|e| e.total_passed() + e.dropped_count());
            enrolment.observe(now, client, count, state.map_or(0, |e| used(&e, now)));
        }
    }
    enrolment.round_writing(now, &view, &|id| snapshot.info(id), &mut |writes| {
        write_grants(datapath, writes)
    })
}

/// What `entry`'s sliding window counts as admitted at `now` (CLOCK_MONOTONIC, the clock its
/// window numbers count): the owner raises no other holder into room these packets still hold.
fn used(entry: &ClientState, now: Duration) -> u32 {
    let Some(window) = std::num::NonZeroU64::new(u64::from(entry.window_us) * 1_000) else {
        return 0;
    };
    let now_ns = u64::try_from(now.as_nanos()).unwrap_or(u64::MAX);
    let estimate = limiter_common::window::estimate_at(&entry.slots, now_ns, window);
    u32::try_from(estimate).unwrap_or(u32::MAX)
}

/// Puts the enrolment messages waiting for `node` into a heartbeat to it (or an answer): at
/// most [`MAX_CLIENTS_PER_MESSAGE`] reports and as many grants, those that waited longest; the
/// rest wait for the next heartbeat (newer state replacing theirs meanwhile). Returns those put
/// in, for [`put_back_outgoing`] if the heartbeat gets no answer.
pub fn attach_outgoing(shared: &Shared, node: &NodeId, heartbeat: &mut Heartbeat) -> Option<Taken> {
    let taken = shared
        .outbox
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .take(node, MAX_CLIENTS_PER_MESSAGE)?;
    (heartbeat.reports, heartbeat.grants) = to_wire(&taken.out);
    Some(taken)
}

/// Puts the messages of a heartbeat that got no answer (a timeout, a broken connection) back
/// in its member's outbox, to wait for the next one (see [`Outbox::put_back`]): a round sends
/// news only once, so they would otherwise be lost until the next recount. Not for a heartbeat
/// the peer refused: it would refuse them again.
pub fn put_back_outgoing(shared: &Shared, unsent: Taken) {
    shared
        .outbox
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .put_back(unsent);
}

/// Outbox entries as heartbeat fields.
fn to_wire(out: &Outgoing) -> (Vec<ClientReport>, Vec<ClientGrant>) {
    let reports = out
        .reports
        .iter()
        .map(|r| ClientReport {
            client: r.client.to_vec(),
            policy: r.policy,
            seq: r.report.seq,
            demand: r.report.demand,
            used: r.report.used,
            applied: r.report.applied,
            echo: r.report.echo,
            // Rounded up: an owner may wait longer, never shorter.
            raise_left_ms: r
                .report
                .raise_left
                .map(|d| u32::try_from(d.as_nanos().div_ceil(1_000_000)).unwrap_or(u32::MAX)),
        })
        .collect();
    let grants = out
        .grants
        .iter()
        .map(|g| ClientGrant {
            client: g.client.to_vec(),
            policy: g.policy,
            message: g.message.message,
            grant: g.message.grant.map(|v| GrantValue {
                seq: v.seq,
                value: v.value,
                answers: v.answers,
            }),
            release: g.release,
            lease_ms: g.message.terms.map_or(0, |t| {
                // Rounded down: a holder may keep a raise for less, never for more.
                u32::try_from(t.lease.as_millis()).unwrap_or(u32::MAX)
            }),
            silence_ms: g.message.terms.map_or(0, |t| {
                // Rounded up: a holder may keep a grant through silence for longer, not shorter.
                u32::try_from(t.silence.as_nanos().div_ceil(1_000_000)).unwrap_or(u32::MAX)
            }),
        })
        .collect();
    (reports, grants)
}

/// The owner's terms of a grant message: both 0 (not sent), or a lease within the lease bounds
/// and a silence limit past it, within the silence bounds (a holder keeps a grant through the
/// longest silence limit it was sent, for as long as it holds the client).
fn terms(lease_ms: u32, silence_ms: u32) -> Result<Option<Terms>, Status> {
    if lease_ms == 0 && silence_ms == 0 {
        return Ok(None);
    }
    let lease = Duration::from_millis(u64::from(lease_ms));
    let silence = Duration::from_millis(u64::from(silence_ms));
    if lease.is_zero()
        || lease > lease::Timing::MAX_LEASE
        || silence <= lease
        || silence > lease::Timing::MAX_SILENCE
    {
        return Err(Status::invalid_argument(format!(
            "a grant's lease_ms ({lease_ms}) must be 1 to {} and below its silence_ms \
             ({silence_ms}), at most {}",
            lease::Timing::MAX_LEASE.as_millis(),
            lease::Timing::MAX_SILENCE.as_millis()
        )));
    }
    Ok(Some(Terms { lease, silence }))
}

fn client_key(bytes: &[u8]) -> Result<ClientKey, Status> {
    ClientKey::try_from(bytes).map_err(|_| {
        Status::invalid_argument(format!("a client key is 16 bytes, not {}", bytes.len()))
    })
}

/// Checks and converts a heartbeat's enrolment messages (all or nothing). A policy not global
/// here (a peer may be a reload ahead or behind) is counted as foreign when taken in.
pub fn from_wire(hb: &Heartbeat) -> Result<Outgoing, Status> {
    if hb.reports.len() > MAX_CLIENTS_PER_MESSAGE || hb.grants.len() > MAX_CLIENTS_PER_MESSAGE {
        return Err(Status::invalid_argument(format!(
            "at most {MAX_CLIENTS_PER_MESSAGE} clients per heartbeat"
        )));
    }
    let reports = hb
        .reports
        .iter()
        .map(|r| {
            Ok(ReportMsg {
                client: client_key(&r.client)?,
                policy: r.policy,
                report: Report {
                    seq: r.seq,
                    demand: r.demand,
                    used: r.used,
                    applied: r.applied,
                    echo: r.echo,
                    raise_left: r
                        .raise_left_ms
                        .map(|ms| {
                            let left = Duration::from_millis(u64::from(ms));
                            if left > lease::Timing::MAX_LEASE {
                                return Err(Status::invalid_argument(format!(
                                    "a report's raise_left_ms ({ms}) is past the longest lease, \
                                     {} ms",
                                    lease::Timing::MAX_LEASE.as_millis()
                                )));
                            }
                            Ok(left)
                        })
                        .transpose()?,
                },
            })
        })
        .collect::<Result<_, Status>>()?;
    let grants = hb
        .grants
        .iter()
        .map(|g| {
            Ok(GrantMsg {
                client: client_key(&g.client)?,
                policy: g.policy,
                message: ToHolder {
                    message: g.message,
                    grant: g.grant.as_ref().map(|v| lease::Grant {
                        seq: v.seq,
                        value: v.value,
                        answers: v.answers,
                    }),
                    terms: terms(g.lease_ms, g.silence_ms)?,
                },
                release: g.release,
            })
        })
        .collect::<Result<_, Status>>()?;
    Ok(Outgoing { reports, grants })
}

/// Takes in the enrolment messages of a heartbeat from `from` (already authenticated as it),
/// as [`from_wire`] read them.
pub fn take_in(shared: &Shared, from: &NodeId, incoming: Outgoing) {
    if !shared.enrolling.load(Ordering::Acquire) {
        return;
    }
    let snapshot = Snapshot::take(shared);
    let view = snapshot.view();
    let now = monotonic();
    let ignored = shared
        .enrolment()
        .take_in(now, &view, from, &incoming, &|policy| snapshot.info(policy));
    if ignored > 0
        && shared.say(
            format!("ignored from {from}"),
            "messages about clients neither owned nor held here",
        )
    {
        tracing::warn!(
            peer = %from,
            ignored,
            "cluster: a heartbeat carried more messages about clients this node neither owns \
             nor holds than one heartbeat may check ({} rendezvous hashes, one per member \
             each); the others were ignored, and count when the sender sends them again",
            crate::cluster::enrolment::MAX_HASHES_PER_HEARTBEAT
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn grant(terms: Option<Terms>) -> Outgoing {
        Outgoing {
            reports: vec![ReportMsg {
                client: [7; 16],
                policy: 3,
                report: Report {
                    seq: 9,
                    demand: 120,
                    used: 37,
                    applied: Some(4),
                    echo: None,
                    raise_left: Some(Duration::from_millis(1_500)),
                },
            }],
            grants: vec![GrantMsg {
                client: [7; 16],
                policy: 3,
                message: ToHolder {
                    message: 11,
                    grant: Some(lease::Grant {
                        seq: 5,
                        value: 17,
                        answers: 9,
                    }),
                    terms,
                },
                release: false,
            }],
        }
    }

    fn heartbeat(out: &Outgoing) -> Heartbeat {
        let (reports, grants) = to_wire(out);
        Heartbeat {
            reports,
            grants,
            ..Heartbeat::default()
        }
    }

    /// What a heartbeat without an answer took goes back into the outbox, unless a later take
    /// sent the member newer messages meanwhile, or its messages were dropped since.
    #[test]
    fn the_outbox_takes_back_what_got_no_answer_unless_newer_went_out() {
        let n2 = NodeId::new("n2").expect("id");
        let mut outbox = Outbox::default();
        let fill = |outbox: &mut Outbox| {
            outbox
                .waiting
                .entry(n2.clone())
                .or_default()
                .merge(grant(None));
        };
        let waiting = |outbox: &Outbox| outbox.waiting.get(&n2).cloned().unwrap_or_default();
        assert!(outbox.take(&n2, 10).is_none(), "nothing waits");
        fill(&mut outbox);
        let taken = outbox.take(&n2, 10).expect("taken");
        assert!(waiting(&outbox).is_empty());
        outbox.put_back(taken);
        assert_eq!(waiting(&outbox), grant(None), "put back");
        // An answer to the member's heartbeat took what waited after the heartbeat took its
        // messages: those are not put back behind it.
        let first = outbox.take(&n2, 10).expect("taken");
        fill(&mut outbox);
        let answer = outbox.take(&n2, 10).expect("taken by an answer");
        outbox.put_back(first);
        assert!(waiting(&outbox).is_empty(), "older than what went out");
        outbox.put_back(answer);
        assert_eq!(waiting(&outbox), grant(None), "the newest take is put back");
        // Dropped with the member's messages: it left, or the node stopped splitting.
        let taken = outbox.take(&n2, 10).expect("taken");
        outbox.keep_members(&[]);
        outbox.put_back(taken);
        assert!(waiting(&outbox).is_empty(), "not a member");
        fill(&mut outbox);
        let taken = outbox.take(&n2, 10).expect("taken");
        outbox.drop_all();
        // Splitting again: an answer takes newer messages, then the old heartbeat fails.
        fill(&mut outbox);
        let answer = outbox.take(&n2, 10).expect("taken by an answer");
        outbox.put_back(taken);
        assert!(
            waiting(&outbox).is_empty(),
            "not splitting when it was taken"
        );
        outbox.put_back(answer);
        assert_eq!(waiting(&outbox), grant(None));
    }

    #[test]
    fn messages_survive_the_wire() {
        let terms = Terms {
            lease: Duration::from_millis(2_000),
            silence: Duration::from_millis(6_000),
        };
        for out in [grant(Some(terms)), grant(None)] {
            assert_eq!(from_wire(&heartbeat(&out)).expect("valid"), out);
        }
    }

    #[test]
    fn terms_are_rounded_to_the_safe_side() {
        let out = grant(Some(Terms {
            lease: Duration::from_micros(1_999_999),
            silence: Duration::from_micros(6_000_001),
        }));
        let got = from_wire(&heartbeat(&out)).expect("valid");
        let terms = got.grants[0].message.terms.expect("terms");
        assert_eq!(
            terms.lease,
            Duration::from_millis(1_999),
            "a lease only shorter"
        );
        assert_eq!(
            terms.silence,
            Duration::from_millis(6_001),
            "silence only longer"
        );
    }

    #[test]
    fn bad_terms_and_keys_are_refused_naming_the_field() {
        for (lease_ms, silence_ms) in [
            (0, 3_000),
            (2_000, 0),
            (2_000, 2_000),
            (3_600_001, 9_000_000),
            (2_000, u32::MAX),
            // Past what any member of this version sends (`peer_timeout` is at most 60 s, the
            // silence limit three of them): a hostile owner's cut that outlasts it by hours.
            (60_001, 180_000),
            (1_000, 180_001),
            (3_600_000, 360_000_000),
        ] {
            let mut hb = heartbeat(&grant(None));
            hb.grants[0].lease_ms = lease_ms;
            hb.grants[0].silence_ms = silence_ms;
            let e = from_wire(&hb).expect_err("refused");
            assert!(e.message().contains("lease_ms"), "{}", e.message());
        }
        let mut hb = heartbeat(&grant(None));
        hb.reports[0].client = vec![1; 4];
        let e = from_wire(&hb).expect_err("refused");
        assert!(e.message().contains("16 bytes"), "{}", e.message());
        let mut hb = heartbeat(&grant(None));
        hb.reports[0].raise_left_ms = Some(60_001);
        let e = from_wire(&hb).expect_err("refused");
        assert!(e.message().contains("raise_left_ms"), "{}", e.message());
    }
}
