//! This agent as a member of its cluster: the `limiter.cluster.v1.Peer` service on
//! `cluster.listen`, the heartbeats it sends its peers every `sync_interval`, and the share view
//! it hands the policy store whenever membership changes what the shares are.
//!
//! Nothing here is on the fast path: a peer that is slow, silent or hostile changes at most when
//! this node's shares change, and every share view is safe on its own (see
//! [`super::membership`]). Heartbeats run one at a time per endpoint, each bounded by
//! `peer_timeout`; messages are capped at [`MAX_MESSAGE_BYTES`] and authenticated by the shared
//! token.

use std::{
    collections::HashMap,
    net::SocketAddr,
    sync::{
        Arc, Mutex, MutexGuard, RwLock,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use tokio::{sync::watch, task::JoinHandle};
use tonic::{metadata::AsciiMetadataValue, service::interceptor::InterceptedService};

use limiter_common::addr::ClientKey;

use super::{
    ClusterPolicies, NodeId, PolicyName,
    config::{ClusterConfig, PeerAddr},
    membership::{ForgetRefusal, Membership, ShareView, Timing},
};
use crate::proto::{self, cluster::peer_server::PeerServer};

mod answerer;
mod enrolment;
mod heartbeat;
mod service;
pub mod wire;

use self::{
    answerer::{AnswererError, Dialler},
    heartbeat::{heartbeat_loop, resolve_loop},
    service::{PeerService, TokenCheck, bearer},
};

pub use self::enrolment::{Datapath, Entry, GrantsError, Under};

/// Largest message a peer may send: a heartbeat is under 100 bytes, and each client it carries
/// for enrolment about 60, at most 84 (so `wire::MAX_CLIENTS_PER_MESSAGE` reports and as many
/// grants always fit).
pub const MAX_MESSAGE_BYTES: usize = 4 * 1024 * 1024;
/// How often `peers` names (`host:port`, `dns:NAME:PORT`) are resolved again.
const RESOLVE_INTERVAL: Duration = Duration::from_secs(1);
/// Most calls one peer connection may have in flight.
const MAX_STREAMS: u32 = 16;

/// Why the node could not start.
#[derive(Debug, thiserror::Error)]
pub enum NodeError {
    #[error("binding the cluster listener to {addr}")]
    Bind {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error("the cluster token is not valid in an HTTP header")]
    Token,
    #[error("the cluster's TLS certificate, key or CA")]
    Tls(#[source] tonic::transport::Error),
    #[error(transparent)]
    PeerTls(#[from] AnswererError),
    #[error("the peer address {addr} as a URI")]
    Uri {
        addr: SocketAddr,
        #[source]
        source: tonic::transport::Error,
    },
    #[error(
        "this agent started without cluster.tls, so its listener needs the token: a reload \
         cannot drop token_file (restart to switch to TLS alone)"
    )]
    AuthChange,
}

/// What a node authenticates itself and its peers with (the agent reads the files the section
/// names).
#[derive(Clone, Default)]
pub struct Credentials {
    /// The shared token.
    pub token: Option<String>,
    pub tls: Option<TlsMaterial>,
}

/// Mutual TLS between peers, as PEM.
#[derive(Clone)]
pub struct TlsMaterial {
    pub cert: Vec<u8>,
    pub key: Vec<u8>,
    pub ca: Vec<u8>,
    /// The DNS name every peer's certificate carries (checked of the peers this node dials).
    pub server_name: String,
}

impl TlsMaterial {
    fn server(&self) -> tonic::transport::ServerTlsConfig {
        tonic::transport::ServerTlsConfig::new()
            .identity(tonic::transport::Identity::from_pem(&self.cert, &self.key))
            .client_ca_root(tonic::transport::Certificate::from_pem(&self.ca))
    }

    /// How this node dials its peers (see `answerer.rs`).
    fn dialler(&self) -> Result<Dialler, AnswererError> {
        Dialler::new(&self.cert, &self.key, &self.ca, &self.server_name)
    }
}

/// What the sink is told when the shares change; it says whether the maps took them (if not,
/// the view is offered again at the next sync interval).
pub type ShareSink = Arc<dyn Fn(ShareView) -> bool + Send + Sync>;

struct State {
    membership: Membership,
    config: ClusterConfig,
    policies: ClusterPolicies,
    /// `policies`' global policies by their names on the wire: (limit, window in µs).
    named: Arc<HashMap<PolicyName, (u32, u32)>>,
    /// The view last handed to the sink.
    view: ShareView,
    /// The addresses `peers` resolved to at the last resolution (kept on a failed one).
    resolved: HashMap<PeerAddr, Vec<SocketAddr>>,
}

/// The global policies of `policies` by their names on the wire: (limit, window in µs).
fn named(policies: &ClusterPolicies) -> Arc<HashMap<PolicyName, (u32, u32)>> {
    Arc::new(
        policies
            .global
            .iter()
            .map(|g| (g.wire_name(), (g.limit, g.window_us)))
            .collect(),
    )
}

struct Shared {
    incarnation: u64,
    /// Random, drawn at start: tells this node's own heartbeats from another node's that uses
    /// its id.
    nonce: u64,
    seq: AtomicU64,
    token: RwLock<Option<AsciiMetadataValue>>,
    /// Mutual TLS, fixed at start (new files take effect at the next start).
    tls: Option<TlsMaterial>,
    state: Mutex<State>,
    /// Enrolment (`super::enrolment`); locked after `state`, never while holding it.
    enrolment: Mutex<super::enrolment::Enrolment>,
    /// The maps enrolment reads and writes (set by the agent before `run`); only the round
    /// locks it.
    datapath: Mutex<Option<Box<dyn Datapath>>>,
    /// `datapath` is set: heartbeats' enrolment messages are taken in (without waiting for a
    /// round that holds the maps).
    enrolling: AtomicBool,
    /// The enrolment messages waiting for each member (the newest per client), sent with the
    /// next heartbeats to it.
    outbox: Mutex<enrolment::Outbox>,
    traffic: Traffic,
    /// Warnings said, by what they are about: each is said again only when it changes, or after
    /// [`SAY_AGAIN`] (a refusal repeats at every heartbeat).
    said: Mutex<HashMap<String, (String, Instant)>>,
}

/// How long a warning that keeps repeating stays unsaid (see `Shared::said`).
const SAY_AGAIN: Duration = Duration::from_secs(60);

impl Shared {
    /// Whether to say `message` about `about` now: it differs from the last said about it, or
    /// that was [`SAY_AGAIN`] ago. Bounded: about peers' addresses and ids, of which there are a
    /// few (and it forgets everything past 1,024).
    fn say(&self, about: String, message: &str) -> bool {
        let now = Instant::now();
        let mut said = self.said.lock().unwrap_or_else(|e| e.into_inner());
        if said.len() >= 1024 {
            said.clear();
        }
        match said.get(&about) {
            Some((last, at)) if last == message && now.duration_since(*at) < SAY_AGAIN => false,
            _ => {
                said.insert(about, (message.to_owned(), now));
                true
            }
        }
    }
}

/// The sync's work since start (status and metrics).
#[derive(Debug, Default)]
struct Traffic {
    rounds: AtomicU64,
    round_ns: AtomicU64,
    bytes_sent: AtomicU64,
    bytes_received: AtomicU64,
    heartbeats_failed: AtomicU64,
}

impl Traffic {
    fn add(counter: &AtomicU64, n: usize) {
        counter.fetch_add(n as u64, Ordering::Relaxed);
    }

    fn to_proto(&self) -> proto::ClusterTraffic {
        let get = |c: &AtomicU64| c.load(Ordering::Relaxed);
        proto::ClusterTraffic {
            rounds: get(&self.rounds),
            round_time: prost_types::Duration::try_from(Duration::from_nanos(get(&self.round_ns)))
                .ok(),
            bytes_sent: get(&self.bytes_sent),
            bytes_received: get(&self.bytes_received),
            heartbeats_failed: get(&self.heartbeats_failed),
        }
    }
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn enrolment(&self) -> MutexGuard<'_, super::enrolment::Enrolment> {
        self.enrolment.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn next_seq(&self) -> u64 {
        self.seq.fetch_add(1, Ordering::Relaxed) + 1
    }

    fn token(&self) -> Option<AsciiMetadataValue> {
        self.token.read().unwrap_or_else(|e| e.into_inner()).clone()
    }
}

impl State {
    /// Hands membership the endpoints `peers` resolved to, and how many entries resolved to
    /// none yet (each counts as a member until it does).
    fn refresh_endpoints(&mut self) {
        let unresolved = self
            .config
            .peers
            .iter()
            .filter(|p| self.resolved.get(*p).is_none_or(Vec::is_empty))
            .count() as u32;
        let endpoints: Vec<SocketAddr> = self.resolved.values().flatten().copied().collect();
        self.membership.set_endpoints(endpoints);
        self.membership.set_unresolved(unresolved);
    }
}

/// This agent's membership of its cluster (see the module docs).
#[derive(Clone)]
pub struct Node {
    shared: Arc<Shared>,
}

impl Node {
    /// Checks what [`Node::new`] would refuse of `credentials` (a certificate or key that does
    /// not parse, a token that is not a header value), before anything is spent on a start
    /// (the incarnation).
    pub fn check(credentials: &Credentials) -> Result<(), NodeError> {
        if let Some(tls) = &credentials.tls {
            // A bad certificate or key stops the start, not the first connection.
            tonic::transport::Server::builder()
                .tls_config(tls.server())
                .map_err(NodeError::Tls)?;
            tls.dialler()?;
        }
        bearer(credentials.token.as_deref())?;
        Ok(())
    }

    /// A node starting now, before anything is served or sent: its first share view is what the
    /// maps get at start. `adopted`: the agent took over pinned maps (see
    /// [`Membership::new`]).
    pub fn new(
        config: &ClusterConfig,
        credentials: &Credentials,
        incarnation: u64,
        adopted: bool,
        policies: ClusterPolicies,
        max_global_clients: usize,
    ) -> Result<Node, NodeError> {
        Node::check(credentials)?;
        let now = Instant::now();
        let mut membership = Membership::new(
            config.node_id.clone(),
            Timing::new(config.peer_timeout),
            config.partition,
            adopted,
            now,
        );
        membership.set_policies_hash(policies.hash());
        let resolved: HashMap<PeerAddr, Vec<SocketAddr>> = config
            .peers
            .iter()
            .filter_map(|p| match p {
                PeerAddr::Socket(a) => Some((p.clone(), vec![*a])),
                _ => None,
            })
            .collect();
        let unresolved = config
            .peers
            .iter()
            .filter(|p| !resolved.contains_key(*p))
            .count() as u32;
        membership.set_endpoints(resolved.values().flatten().copied());
        membership.set_unresolved(unresolved);
        let view = membership.share_view(now);
        let enrolment = super::enrolment::Enrolment::new(
            config.node_id.clone(),
            super::lease::Timing::from_peer_timeout(config.peer_timeout),
            incarnation,
            max_global_clients,
        );
        Ok(Node {
            shared: Arc::new(Shared {
                incarnation,
                nonce: std::hash::BuildHasher::hash_one(
                    &std::hash::RandomState::new(),
                    (std::process::id(), incarnation),
                ),
                seq: AtomicU64::new(0),
                token: RwLock::new(bearer(credentials.token.as_deref())?),
                tls: credentials.tls.clone(),
                state: Mutex::new(State {
                    membership,
                    config: config.clone(),
                    named: named(&policies),
                    policies,
                    view,
                    resolved,
                }),
                enrolment: Mutex::new(enrolment),
                datapath: Mutex::new(None),
                enrolling: AtomicBool::new(false),
                outbox: Mutex::default(),
                traffic: Traffic::default(),
                said: Mutex::default(),
            }),
        })
    }

    /// Gives enrolment the maps: the hot clients, their counters and the grants (the agent's
    /// [`Datapath`]); grants pinned by a previous run are adopted. Without it (tests of
    /// membership alone) the node enrols nothing.
    pub fn set_datapath(&self, datapath: Box<dyn Datapath>) {
        match datapath.grants() {
            Ok(grants) => self
                .shared
                .enrolment()
                .adopt(enrolment::monotonic(), grants),
            Err(e) => tracing::warn!("cluster: reading pinned grants: {e}"),
        }
        *self
            .shared
            .datapath
            .lock()
            .unwrap_or_else(|e| e.into_inner()) = Some(datapath);
        self.shared.enrolling.store(true, Ordering::Release);
    }

    /// The share view in force.
    pub fn share_view(&self) -> ShareView {
        self.shared.lock().view
    }

    /// The maps hold `view`, not `was`, the view in force the caller read before it read the
    /// maps' (another writer changed them: a reload that added the `cluster:` section wrote a
    /// joining view): the next heartbeat round hands the sink membership's view if it differs
    /// from that. Nothing changes if the view in force is no longer `was` (a round wrote
    /// another meanwhile, which the maps may hold by now).
    pub fn maps_hold(&self, was: ShareView, view: ShareView) {
        let mut state = self.shared.lock();
        if state.view == was {
            state.view = view;
        }
    }

    /// The agreed member count the previous run of this agent left: counted for a while (see
    /// [`Membership::set_floor`]), and the view in force recomputed with it.
    pub fn set_floor(&self, members: u32) {
        let now = Instant::now();
        let mut state = self.shared.lock();
        state.membership.set_floor(members, now);
        state.view = state.membership.share_view(now);
    }

    /// Binds `cluster.listen` (before anything else starts, so that a port in use stops the
    /// agent's start).
    pub async fn bind(config: &ClusterConfig) -> Result<tokio::net::TcpListener, NodeError> {
        tokio::net::TcpListener::bind(config.listen)
            .await
            .map_err(|source| NodeError::Bind {
                addr: config.listen,
                source,
            })
    }

    /// Takes up a reloaded `cluster:` section (a changed `node_id` or `listen` needs a restart:
    /// said and ignored), token and global policies.
    pub fn reconfigure(
        &self,
        config: &ClusterConfig,
        token: Option<&str>,
        policies: ClusterPolicies,
    ) -> Result<(), NodeError> {
        if token.is_none() && self.shared.tls.is_none() {
            // TLS is set up at start: dropping the token now would leave the listener open.
            return Err(NodeError::AuthChange);
        }
        if config.tls.is_some() != self.shared.tls.is_some() {
            tracing::warn!(
                "cluster.tls takes effect at the next start; peers authenticate as before \
                 meanwhile"
            );
        }
        let token = bearer(token)?;
        *self.shared.token.write().unwrap_or_else(|e| e.into_inner()) = token;
        let mut state = self.shared.lock();
        if config.node_id != state.config.node_id || config.listen != state.config.listen {
            tracing::warn!(
                "cluster.node_id and cluster.listen take effect at the next start; this agent \
                 stays {} on {}",
                state.config.node_id,
                state.config.listen
            );
        }
        state
            .membership
            .reconfigure(Timing::new(config.peer_timeout), config.partition);
        // Only a new peer_timeout: setting the timing wakes every quiet holder.
        let timing = super::lease::Timing::from_peer_timeout(config.peer_timeout);
        let mut enrolment = self.shared.enrolment();
        if enrolment.timing() != timing {
            enrolment.set_timing(timing);
        }
        drop(enrolment);
        state.membership.set_policies_hash(policies.hash());
        state.resolved.retain(|p, _| config.peers.contains(p));
        for p in &config.peers {
            if let PeerAddr::Socket(a) = p {
                state.resolved.insert(p.clone(), vec![*a]);
            }
        }
        let (node_id, listen) = (state.config.node_id.clone(), state.config.listen);
        state.config = ClusterConfig {
            node_id,
            listen,
            ..config.clone()
        };
        state.refresh_endpoints();
        state.named = named(&policies);
        state.policies = policies;
        Ok(())
    }

    /// Serves the peer service on `listener` and heartbeats the peers until `stop` turns true;
    /// `sink` is called (off the runtime's workers) with every new share view.
    pub fn run(
        &self,
        listener: tokio::net::TcpListener,
        sink: ShareSink,
        stop: watch::Receiver<bool>,
    ) -> Vec<JoinHandle<()>> {
        let server = {
            let shared = self.shared.clone();
            let mut stop = stop.clone();
            let peer_timeout = shared.lock().config.peer_timeout;
            tokio::spawn(async move {
                let mut builder = tonic::transport::Server::builder();
                if let Some(tls) = &shared.tls {
                    // Checked in `Node::new`.
                    builder = match builder.tls_config(tls.server()) {
                        Ok(b) => b,
                        Err(e) => {
                            tracing::error!("cluster listener TLS: {}", crate::error_chain(&e));
                            return;
                        }
                    };
                }
                let service = InterceptedService::new(
                    PeerServer::new(PeerService(shared.clone()))
                        .max_decoding_message_size(MAX_MESSAGE_BYTES)
                        .max_encoding_message_size(MAX_MESSAGE_BYTES),
                    TokenCheck(shared.clone()),
                );
                let served = builder
                    .timeout(peer_timeout)
                    .max_concurrent_streams(MAX_STREAMS)
                    .http2_keepalive_interval(Some(peer_timeout))
                    .http2_keepalive_timeout(Some(peer_timeout))
                    .add_service(service)
                    .serve_with_incoming_shutdown(
                        tokio_stream::wrappers::TcpListenerStream::new(listener),
                        async move {
                            let _ = stop.wait_for(|s| *s).await;
                        },
                    )
                    .await;
                if let Err(e) = served {
                    tracing::error!("cluster listener: {}", crate::error_chain(&e));
                }
            })
        };
        // Silence is counted from now, not from when the node was made (the maps were written
        // and the program attached in between).
        self.shared.lock().membership.begin(Instant::now());
        let resolver = tokio::spawn(resolve_loop(self.shared.clone(), stop.clone()));
        let heartbeats = tokio::spawn(heartbeat_loop(self.shared.clone(), sink, stop));
        vec![server, resolver, heartbeats]
    }

    /// For `limiter cluster status`.
    /// How this member sees each global client of `clients` (key and cold share): for
    /// `limiter stats`.
    pub fn client_views(&self, clients: &[(ClientKey, u32)]) -> Vec<proto::ClientCluster> {
        let now = enrolment::monotonic();
        let enrolment = self.shared.enrolment();
        clients
            .iter()
            .map(|(client, cold)| {
                let v = enrolment.client_view(now, client, *cold);
                proto::ClientCluster {
                    global_limit: 0,
                    share: v.share,
                    grant: v.grant,
                    owner: v.owner.map(|o| o.to_string()).unwrap_or_default(),
                    demand: v.demand,
                    cluster_demand: v.cluster_demand,
                }
            })
            .collect()
    }

    /// An operator's `limiter cluster forget` of member `id` (see
    /// [`Membership::forget_member`]); the shares follow at the next heartbeat round, once the
    /// agreed count falls.
    pub fn forget(&self, id: &NodeId) -> Result<proto::ClusterForgetResponse, ForgetRefusal> {
        let now = Instant::now();
        let mut state = self.shared.lock();
        let forgotten = state.membership.forget_member(id, now)?;
        let agreed_members = state.membership.agreed_members(now);
        drop(state);
        tracing::info!(
            "cluster: {id} forgotten at an operator's request (it counted for the life of the \
             agent: {}); members {} → {}{}",
            forgotten.was_learned,
            forgotten.members_before,
            forgotten.members_after,
            if forgotten.leaves_in.is_zero() {
                String::new()
            } else {
                format!(
                    "; heard from within the forget delay, it counts {:.1} s more",
                    forgotten.leaves_in.as_secs_f64()
                )
            }
        );
        Ok(proto::ClusterForgetResponse {
            was_learned: forgotten.was_learned,
            leaves_in: prost_types::Duration::try_from(forgotten.leaves_in).ok(),
            members_before: forgotten.members_before,
            members_after: forgotten.members_after,
            agreed_members,
        })
    }

    /// For `limiter cluster status`: with the [`MAX_OWNED_SHOWN`] owned clients of the most
    /// demand.
    pub fn status(&self) -> proto::ClusterStatus {
        self.status_listing(MAX_OWNED_SHOWN)
    }

    /// [`Node::status`] without the owned clients: for metrics, at every scrape (listing them
    /// takes a pass over every owned client's holders, under the enrolment lock).
    pub fn figures(&self) -> proto::ClusterStatus {
        self.status_listing(0)
    }

    /// The status, with at most `owned` owned clients.
    fn status_listing(&self, owned: usize) -> proto::ClusterStatus {
        let now = Instant::now();
        let state = self.shared.lock();
        // The view in force: the one the maps hold.
        let view = state.view;
        let peers = state
            .membership
            .peers(now)
            .into_iter()
            .map(|p| proto::ClusterPeer {
                address: p.addr.map(|a| a.to_string()).unwrap_or_default(),
                node_id: p.node.map(|n| n.to_string()).unwrap_or_default(),
                live: p.live,
                since: p
                    .since
                    .and_then(|d| prost_types::Duration::try_from(d).ok()),
                incarnation: p.incarnation,
                members: p.members,
                agrees: p.agrees,
                differs: p.differs.iter().map(|d| d.as_str().to_owned()).collect(),
                rtt: p.rtt.and_then(|d| prost_types::Duration::try_from(d).ok()),
            })
            .collect();
        let policies = state
            .policies
            .global
            .iter()
            .map(|g| proto::GlobalPolicyShare {
                r#match: g.matches.clone(),
                limit: g.limit,
                share: state.view.share(g.limit),
                window: prost_types::Duration::try_from(Duration::from_micros(g.window_us.into()))
                    .ok(),
            })
            .collect();
        let members = state.membership.members(now);
        let views_agree = state.membership.agreed(now);
        let (node_id, listen) = (state.config.node_id.to_string(), state.config.listen);
        let partition = state.config.partition.to_string();
        let timing = |d: Duration| prost_types::Duration::try_from(d).ok();
        let (sync_interval, peer_timeout) = (
            timing(state.config.sync_interval),
            timing(state.config.peer_timeout),
        );
        // The owned clients' policies by their names on the wire: their `match` here (the
        // status names them by it) and their cold share. Not for metrics (`owned` 0), which
        // would hash every global policy at every scrape for nothing.
        let matches: HashMap<PolicyName, (String, u32)> = if owned == 0 {
            HashMap::new()
        } else {
            state
                .policies
                .global
                .iter()
                .map(|g| {
                    let cold = super::shares::cold_share(g.limit, view.members);
                    (g.wire_name(), (g.matches.clone(), cold))
                })
                .collect()
        };
        drop(state);
        let (counts, owned) = {
            let enrolment = self.shared.enrolment();
            let now = enrolment::monotonic();
            (
                enrolment.counts(now),
                enrolment.owned_views(now, owned, &|name| matches.get(&name).map(|m| m.1)),
            )
        };
        let owned_clients = owned
            .into_iter()
            .map(|o| proto::OwnedClient {
                client: crate::stats::client_label(&o.client),
                policy: matches
                    .get(&o.policy)
                    .map(|m| m.0.clone())
                    .unwrap_or_default(),
                global_limit: o.limit,
                cluster_demand: o.demand,
                learning: o.learning,
                holders: o
                    .holders
                    .into_iter()
                    .map(|(node, demand, grant)| proto::OwnedClientHolder {
                        node_id: node.to_string(),
                        demand,
                        grant,
                    })
                    .collect(),
            })
            .collect();
        proto::ClusterStatus {
            configured: true,
            node_id,
            incarnation: self.shared.incarnation,
            listen: listen.to_string(),
            phase: view.phase.as_str().into(),
            partition,
            members,
            agreed_members: view.members,
            views_agree,
            peers,
            policies,
            enrolment: Some(proto::ClusterEnrolment {
                owned: counts.owned,
                held: counts.held,
                granted: counts.granted,
                refused: counts.refused,
                foreign: counts.foreign,
                over_budget: counts.over_budget,
                unwritten: counts.unwritten,
                learning: counts.learning,
                raises_lapsed: counts.raises_lapsed,
                capped: counts.capped,
            }),
            traffic: Some(self.shared.traffic.to_proto()),
            // The agent's to say (see `agent::cluster`).
            not_taken_up: String::new(),
            sync_interval,
            peer_timeout,
            owned_clients,
        }
    }
}

/// Most owned clients `limiter cluster status` shows (those with the most demand).
const MAX_OWNED_SHOWN: usize = 20;

#[cfg(test)]
mod tests;
