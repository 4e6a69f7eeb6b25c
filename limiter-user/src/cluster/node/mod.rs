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
    collections::{HashMap, HashSet},
    net::SocketAddr,
    sync::{
        Arc, Mutex, MutexGuard, RwLock,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use prost::Message as _;
use subtle::ConstantTimeEq as _;
use tokio::{sync::watch, task::JoinHandle};
use tonic::{
    Request, Response, Status,
    metadata::AsciiMetadataValue,
    service::{Interceptor, interceptor::InterceptedService},
    transport::{Channel, Endpoint},
};

use limiter_common::addr::ClientKey;

use super::{
    ClusterPolicies, NodeId,
    config::{ClusterConfig, PeerAddr},
    membership::{Heard, Membership, Phase, Refusal, Report, ShareView, Timing},
};
use crate::proto::{
    self,
    cluster::{
        Heartbeat,
        peer_client::PeerClient,
        peer_server::{Peer, PeerServer},
    },
};

mod enrolment;

pub use self::enrolment::{Datapath, GrantsError};

/// Largest message a peer may send: a heartbeat is under 100 bytes, and each client it carries
/// for enrolment about 60 (so 60k clients between two members in one sync interval).
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

    fn client(&self) -> tonic::transport::ClientTlsConfig {
        tonic::transport::ClientTlsConfig::new()
            .identity(tonic::transport::Identity::from_pem(&self.cert, &self.key))
            .ca_certificate(tonic::transport::Certificate::from_pem(&self.ca))
            .domain_name(self.server_name.clone())
    }
}

/// What the sink is told when the shares change; it says whether the maps took them (if not,
/// the view is offered again at the next sync interval).
pub type ShareSink = Arc<dyn Fn(ShareView) -> bool + Send + Sync>;

struct State {
    membership: Membership,
    config: ClusterConfig,
    policies: ClusterPolicies,
    /// The view last handed to the sink.
    view: ShareView,
    /// The addresses `peers` resolved to at the last resolution (kept on a failed one).
    resolved: HashMap<PeerAddr, Vec<SocketAddr>>,
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
    /// The latest enrolment messages for each member, sent with the next heartbeat to it.
    outbox: Mutex<std::collections::BTreeMap<NodeId, super::enrolment::Outgoing>>,
    /// Heartbeats with enrolment messages sent to each member: which part of a list longer
    /// than one message carries goes next.
    turns: Mutex<HashMap<NodeId, u64>>,
    traffic: Traffic,
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

fn bearer(token: Option<&str>) -> Result<Option<AsciiMetadataValue>, NodeError> {
    token
        .map(|t| format!("Bearer {t}").parse().map_err(|_| NodeError::Token))
        .transpose()
}

fn to_report(hb: &Heartbeat) -> Result<Report, Status> {
    let node =
        NodeId::new(&hb.node_id).map_err(|e| Status::invalid_argument(format!("node_id: {e}")))?;
    Ok(Report {
        node,
        incarnation: hb.incarnation,
        seq: hb.seq,
        members: hb.members,
        view_hash: hb.view_hash,
    })
}

fn to_heartbeat(report: Report, echo: u64, shared: &Shared) -> Heartbeat {
    Heartbeat {
        node_id: report.node.to_string(),
        incarnation: shared.incarnation,
        seq: report.seq,
        echo,
        members: report.members,
        view_hash: report.view_hash,
        nonce: shared.nonce,
        reports: Vec::new(),
        grants: Vec::new(),
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

/// The peer service: answers heartbeats.
struct PeerService(Arc<Shared>);

#[tonic::async_trait]
impl Peer for PeerService {
    async fn heartbeat(&self, request: Request<Heartbeat>) -> Result<Response<Heartbeat>, Status> {
        // With mutual TLS a peer speaks only as its certificate's common name.
        let certified = match &self.0.tls {
            None => None,
            Some(_) => {
                let certs = request
                    .peer_certs()
                    .ok_or_else(|| Status::unauthenticated("a client certificate is required"))?;
                let der = certs
                    .first()
                    .ok_or_else(|| Status::unauthenticated("a client certificate is required"))?;
                let (subject, cn) = crate::certificate::subject(der).map_err(|e| {
                    Status::unauthenticated(format!("unreadable client certificate: {e}"))
                })?;
                Some(cn.ok_or_else(|| {
                    Status::permission_denied(format!(
                        "the client certificate {subject:?} has no common name: a peer's is its \
                         node_id"
                    ))
                })?)
            }
        };
        let hb = request.into_inner();
        Traffic::add(&self.0.traffic.bytes_received, hb.encoded_len());
        if let Some(cn) = certified
            && cn != hb.node_id
        {
            return Err(Status::permission_denied(format!(
                "the heartbeat says node_id {:?} but the certificate names {cn:?}: a peer speaks \
                 only as itself",
                hb.node_id
            )));
        }
        let report = to_report(&hb)?;
        let now = Instant::now();
        let mut state = self.0.lock();
        let own = report.node == *state.membership.me();
        if own && hb.nonce != self.0.nonce {
            tracing::warn!(
                "cluster: another node uses this node's id {}: its heartbeats are refused",
                report.node
            );
        }
        let mut heard = Heard::Known;
        if !(own && hb.nonce == self.0.nonce) {
            heard = state
                .membership
                .heard(&report, now)
                .map_err(|e| Status::failed_precondition(e.to_string()))?;
        }
        let me = state
            .membership
            .report(self.0.incarnation, self.0.next_seq(), now);
        drop(state);
        if heard == Heard::Restarted {
            // Before the answer: the member's join gate opens on it (see `Heard::Restarted`).
            self.0
                .enrolment()
                .holder_restarted(&report.node, report.incarnation);
        }
        if !(own || hb.reports.is_empty() && hb.grants.is_empty()) {
            enrolment::take_in(&self.0, &report.node, &hb)?;
        }
        let answer = to_heartbeat(me, hb.seq, &self.0);
        Traffic::add(&self.0.traffic.bytes_sent, answer.encoded_len());
        Ok(Response::new(answer))
    }
}

/// Checks the bearer token on the server side, and adds it on the client side.
#[derive(Clone)]
struct TokenCheck(Arc<Shared>);

impl Interceptor for TokenCheck {
    fn call(&mut self, request: Request<()>) -> Result<Request<()>, Status> {
        let Some(expected) = self.0.token() else {
            if self.0.tls.is_some() {
                // Mutual TLS alone: the handshake authenticated the peer.
                return Ok(request);
            }
            return Err(Status::unauthenticated(
                "no cluster credentials are configured",
            ));
        };
        match request.metadata().get("authorization") {
            // Constant time: no early exit on the first differing byte.
            Some(given) if bool::from(given.as_bytes().ct_eq(expected.as_bytes())) => Ok(request),
            Some(_) => Err(Status::unauthenticated("wrong cluster token")),
            None => Err(Status::unauthenticated(
                "the cluster token is required (authorization: Bearer TOKEN)",
            )),
        }
    }
}

#[derive(Clone)]
struct TokenAdd(Arc<Shared>);

impl Interceptor for TokenAdd {
    fn call(&mut self, mut request: Request<()>) -> Result<Request<()>, Status> {
        if let Some(token) = self.0.token() {
            request.metadata_mut().insert("authorization", token);
        }
        Ok(request)
    }
}

type Client = PeerClient<InterceptedService<Channel, TokenAdd>>;

/// This agent's membership of its cluster (see the module docs).
#[derive(Clone)]
pub struct Node {
    shared: Arc<Shared>,
}

impl Node {
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
        if let Some(tls) = &credentials.tls {
            // A bad certificate or key stops the start, not the first connection.
            tonic::transport::Server::builder()
                .tls_config(tls.server())
                .map_err(NodeError::Tls)?;
            Endpoint::from_static("https://peer")
                .tls_config(tls.client())
                .map_err(NodeError::Tls)?;
        }
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
                    policies,
                    view,
                    resolved,
                }),
                enrolment: Mutex::new(enrolment),
                datapath: Mutex::new(None),
                enrolling: AtomicBool::new(false),
                outbox: Mutex::default(),
                turns: Mutex::default(),
                traffic: Traffic::default(),
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
        self.shared
            .enrolment()
            .set_timing(super::lease::Timing::from_peer_timeout(config.peer_timeout));
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

    pub fn status(&self) -> proto::ClusterStatus {
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
        drop(state);
        let counts = self.shared.enrolment().counts(enrolment::monotonic());
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
                unwritten: counts.unwritten,
                learning: counts.learning,
                raises_lapsed: counts.raises_lapsed,
            }),
            traffic: Some(self.shared.traffic.to_proto()),
        }
    }
}

/// Resolves the `peers` names every [`RESOLVE_INTERVAL`]; a failed lookup keeps the addresses
/// it last gave (a DNS hiccup must not shrink the member count).
async fn resolve_loop(shared: Arc<Shared>, mut stop: watch::Receiver<bool>) {
    let mut tick = tokio::time::interval(RESOLVE_INTERVAL);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = stop.wait_for(|s| *s) => return,
        }
        let (names, timeout) = {
            let state = shared.lock();
            let names: Vec<PeerAddr> = state
                .config
                .peers
                .iter()
                .filter(|p| !matches!(p, PeerAddr::Socket(_)))
                .cloned()
                .collect();
            (names, state.config.peer_timeout)
        };
        for peer in names {
            let (name, port, all) = match &peer {
                PeerAddr::Host { name, port } => (name.clone(), *port, false),
                PeerAddr::Dns { name, port } => (name.clone(), *port, true),
                PeerAddr::Socket(_) => continue,
            };
            let lookup = tokio::time::timeout(timeout, tokio::net::lookup_host((name, port)));
            let addrs: Vec<SocketAddr> = match lookup.await {
                Ok(Ok(addrs)) => {
                    let mut addrs: Vec<SocketAddr> = addrs.collect();
                    addrs.sort();
                    addrs.dedup();
                    if !all {
                        addrs.truncate(1);
                    }
                    addrs
                }
                Ok(Err(e)) => {
                    tracing::debug!("resolving cluster peer {peer}: {e}");
                    continue;
                }
                Err(_) => {
                    tracing::debug!("resolving cluster peer {peer}: timed out");
                    continue;
                }
            };
            let mut state = shared.lock();
            if !state.config.peers.contains(&peer) {
                continue;
            }
            state.resolved.insert(peer, addrs);
            state.refresh_endpoints();
        }
    }
}

/// Every `sync_interval`: a heartbeat to each endpoint that has none in flight, and the share
/// view handed to the sink when it changed.
async fn heartbeat_loop(shared: Arc<Shared>, sink: ShareSink, mut stop: watch::Receiver<bool>) {
    let mut clients: HashMap<SocketAddr, Client> = HashMap::new();
    let in_flight: Arc<Mutex<HashSet<SocketAddr>>> = Arc::default();
    let mut interval = shared.lock().config.sync_interval;
    let mut tick = tokio::time::interval(interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = stop.wait_for(|s| *s) => return,
        }
        let now = Instant::now();
        let (endpoints, timeout, sync_interval, view, previous) = {
            let mut state = shared.lock();
            let view = state.membership.share_view(now);
            let previous = state.view;
            let endpoints: Vec<SocketAddr> = state.membership.endpoints().collect();
            (
                endpoints,
                state.config.peer_timeout,
                state.config.sync_interval,
                view,
                previous,
            )
        };
        if view != previous {
            say_view(&previous, &view);
            let sink = sink.clone();
            // Map writes: off the runtime's workers. The view is in force (and in the status)
            // once they are done.
            let applied = tokio::task::spawn_blocking(move || sink(view))
                .await
                .unwrap_or(false);
            if applied {
                shared.lock().view = view;
            }
        }
        {
            let shared = shared.clone();
            let _ = tokio::task::spawn_blocking(move || {
                let started = Instant::now();
                enrolment::round(&shared);
                let took = u64::try_from(started.elapsed().as_nanos()).unwrap_or(u64::MAX);
                shared.traffic.rounds.fetch_add(1, Ordering::Relaxed);
                shared.traffic.round_ns.fetch_add(took, Ordering::Relaxed);
            })
            .await;
        }
        if sync_interval != interval {
            interval = sync_interval;
            tick = tokio::time::interval(interval);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        }
        clients.retain(|a, _| endpoints.contains(a));
        for addr in endpoints {
            if !in_flight
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .insert(addr)
            {
                continue;
            }
            let client = match clients.get(&addr) {
                Some(c) => c.clone(),
                None => match client(addr, timeout, &shared) {
                    Ok(c) => clients.entry(addr).or_insert(c).clone(),
                    Err(e) => {
                        tracing::warn!(%addr, "cluster peer: {}", crate::error_chain(&e));
                        in_flight
                            .lock()
                            .unwrap_or_else(|e| e.into_inner())
                            .remove(&addr);
                        continue;
                    }
                },
            };
            let (shared, in_flight) = (shared.clone(), in_flight.clone());
            tokio::spawn(async move {
                heartbeat(&shared, addr, client, timeout).await;
                in_flight
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .remove(&addr);
            });
        }
    }
}

fn client(
    addr: SocketAddr,
    timeout: Duration,
    shared: &Arc<Shared>,
) -> Result<Client, tonic::transport::Error> {
    // From the listen address when it is a specific one of the same family: the peer then
    // sees this node's heartbeats come from where it answers (and a firewall rule on that
    // address cuts both ways).
    let listen = shared.lock().config.listen.ip();
    let local = (!listen.is_unspecified() && listen.is_ipv4() == addr.is_ipv4()).then_some(listen);
    let scheme = if shared.tls.is_some() {
        "https"
    } else {
        "http"
    };
    let mut endpoint = Endpoint::from_shared(format!("{scheme}://{addr}"))?;
    if let Some(tls) = &shared.tls {
        endpoint = endpoint.tls_config(tls.client())?;
    }
    let channel = endpoint
        .local_address(local)
        .connect_timeout(timeout)
        .timeout(timeout)
        .tcp_nodelay(true)
        .connect_lazy();
    Ok(
        PeerClient::with_interceptor(channel, TokenAdd(shared.clone()))
            .max_decoding_message_size(MAX_MESSAGE_BYTES)
            .max_encoding_message_size(MAX_MESSAGE_BYTES),
    )
}

async fn heartbeat(shared: &Shared, addr: SocketAddr, mut client: Client, timeout: Duration) {
    let sent = Instant::now();
    let seq = shared.next_seq();
    let (mut request, node) = {
        let state = shared.lock();
        (
            to_heartbeat(
                state.membership.report(shared.incarnation, seq, sent),
                0,
                shared,
            ),
            state.membership.endpoint_node(addr).cloned(),
        )
    };
    if let Some(node) = node {
        enrolment::attach_outgoing(shared, &node, &mut request);
    }
    let traffic = &shared.traffic;
    Traffic::add(&traffic.bytes_sent, request.encoded_len());
    // Half of peer_timeout: one stalled call (a lost SYN) leaves room for another within it.
    let answer = match tokio::time::timeout(timeout / 2, client.heartbeat(request)).await {
        Ok(Ok(answer)) => answer.into_inner(),
        Ok(Err(status)) if status.code() == tonic::Code::FailedPrecondition => {
            // Refused as a member (say another node uses this id): worth an operator's eye.
            tracing::warn!(%addr, "cluster heartbeat refused: {}", status.message());
            Traffic::add(&traffic.heartbeats_failed, 1);
            return;
        }
        Ok(Err(status)) => {
            tracing::debug!(%addr, "cluster heartbeat: {}", status.message());
            Traffic::add(&traffic.heartbeats_failed, 1);
            return;
        }
        Err(_) => {
            Traffic::add(&traffic.heartbeats_failed, 1);
            return;
        }
    };
    Traffic::add(&traffic.bytes_received, answer.encoded_len());
    if answer.echo != seq {
        tracing::debug!(%addr, "cluster heartbeat: the answer echoes {} not {seq}", answer.echo);
        return;
    }
    let report = match to_report(&answer) {
        Ok(report) => report,
        Err(status) => {
            tracing::warn!(%addr, "cluster peer answered with {}", status.message());
            return;
        }
    };
    let mut state = shared.lock();
    match state
        .membership
        .answered(addr, sent, &report, Instant::now())
    {
        Ok(Heard::Known) => {}
        Ok(Heard::Restarted) => {
            drop(state);
            shared
                .enrolment()
                .holder_restarted(&report.node, report.incarnation);
        }
        // This node itself (its own heartbeat came back): not counted.
        Err(Refusal::OwnId(_)) if answer.nonce == shared.nonce => {
            tracing::debug!(%addr, "cluster: this endpoint is this node")
        }
        Err(refusal) => tracing::warn!(%addr, "cluster peer refused: {refusal}"),
    }
}

fn say_view(previous: &ShareView, view: &ShareView) {
    if previous.phase != view.phase {
        match view.phase {
            Phase::CutOff => tracing::warn!(
                partition = %view.partition,
                "cluster: no peer answers within peer_timeout: cut off; global policies now \
                 follow `partition: {}`",
                view.partition
            ),
            phase => tracing::info!(
                phase = phase.as_str(),
                members = view.members,
                "cluster: {}",
                phase.as_str()
            ),
        }
    }
    if previous.members != view.members {
        tracing::info!(
            members = view.members,
            before = previous.members,
            "cluster: the agreed member count changed; global policies' shares follow"
        );
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::AtomicU32;

    use super::*;
    use crate::cluster::{GlobalPolicy, config::Partition};

    const TOKEN: &str = "a-cluster-token-of-some-length";

    fn section(id: &str, listen: SocketAddr, peers: Vec<SocketAddr>) -> ClusterConfig {
        ClusterConfig {
            node_id: NodeId::new(id).expect("id"),
            listen,
            peers: peers.into_iter().map(PeerAddr::Socket).collect(),
            token_file: Some("/unused".into()),
            tls: None,
            sync_interval: Duration::from_millis(20),
            peer_timeout: Duration::from_millis(200),
            partition: Partition::Local,
        }
    }

    fn token() -> Credentials {
        Credentials {
            token: Some(TOKEN.into()),
            tls: None,
        }
    }

    fn policies() -> ClusterPolicies {
        ClusterPolicies {
            config: None,
            global: vec![GlobalPolicy {
                id: 1,
                matches: "10.0.0.0/8".into(),
                limit: 40,
                window_us: 1_000_000,
            }],
        }
    }

    async fn listener() -> (tokio::net::TcpListener, SocketAddr) {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let a = l.local_addr().expect("addr");
        (l, a)
    }

    /// Records the share views a node hands over.
    fn recorder() -> (ShareSink, Arc<AtomicU32>) {
        let last = Arc::new(AtomicU32::new(u32::MAX));
        let seen = last.clone();
        (
            Arc::new(move |v: ShareView| {
                seen.store(v.share(40), Ordering::SeqCst);
                true
            }),
            last,
        )
    }

    async fn wait_for(what: &str, mut f: impl FnMut() -> bool) {
        let deadline = Instant::now() + Duration::from_secs(5);
        while !f() {
            assert!(Instant::now() < deadline, "timed out waiting for {what}");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn two_nodes_agree_split_and_fall_back_when_one_stops() {
        let (l1, a1) = listener().await;
        let (l2, a2) = listener().await;
        let n1 = Node::new(
            &section("n1", a1, vec![a2]),
            &token(),
            1,
            true,
            policies(),
            1024,
        )
        .expect("n1");
        let n2 = Node::new(
            &section("n2", a2, vec![a1]),
            &token(),
            1,
            true,
            policies(),
            1024,
        )
        .expect("n2");
        let (stop1, rx1) = watch::channel(false);
        let (stop2, rx2) = watch::channel(false);
        let (sink1, share1) = recorder();
        let (sink2, _) = recorder();
        let _t1 = n1.run(l1, sink1, rx1);
        let _t2 = n2.run(l2, sink2, rx2);
        // (Before n2 hears n1 answer, it counts n1 twice, by id and by endpoint: safe, and
        // gone at n2's next heartbeat.)
        wait_for("both live, two members agreed", || {
            let s = n1.status();
            s.phase == "connected"
                && s.agreed_members == 2
                && s.views_agree
                && s.peers.iter().all(|p| p.live && p.node_id == "n2")
        })
        .await;
        let s = n1.status();
        assert_eq!((s.members, s.agreed_members), (2, 2));
        assert!(s.views_agree, "{s:?}");
        assert_eq!(s.policies[0].share, 20);
        // The status (and the metrics, which read it) show the sync's work.
        let peer = &s.peers[0];
        let rtt = peer.rtt.expect("an answered heartbeat has a round trip");
        assert!(rtt.seconds == 0 && rtt.nanos > 0, "{rtt:?}");
        let traffic = s.traffic.expect("traffic");
        assert!(traffic.rounds >= 1 && traffic.bytes_sent > 0 && traffic.bytes_received > 0);
        assert_eq!(traffic.heartbeats_failed, 0);
        // n2 stops: n1 is cut off, and `partition: local` gives it the whole limit.
        stop2.send_replace(true);
        wait_for("n1 cut off", || n1.status().phase == "cut-off").await;
        assert!(n1.status().traffic.expect("traffic").heartbeats_failed > 0);
        assert_eq!(
            share1.load(Ordering::SeqCst),
            40,
            "the maps got the whole limit"
        );
        assert_eq!(n1.status().members, 2, "a silent member still counts");
        stop1.send_replace(true);
    }

    #[tokio::test]
    async fn peers_without_the_token_or_as_this_node_are_refused() {
        let (l1, a1) = listener().await;
        let n1 = Node::new(
            &section("n1", a1, vec![]),
            &token(),
            1,
            true,
            policies(),
            1024,
        )
        .expect("n1");
        let (stop, rx) = watch::channel(false);
        let (sink, _) = recorder();
        let _t = n1.run(l1, sink, rx);
        let channel = Endpoint::from_shared(format!("http://{a1}"))
            .expect("uri")
            .connect()
            .await
            .expect("connect");
        let heartbeat = |id: &str| Heartbeat {
            nonce: 0,
            node_id: id.into(),
            incarnation: 1,
            seq: 1,
            echo: 0,
            members: 2,
            view_hash: 0,
            ..Heartbeat::default()
        };
        let mut bare = PeerClient::new(channel.clone());
        let e = bare.heartbeat(heartbeat("n2")).await.expect_err("no token");
        assert_eq!(e.code(), tonic::Code::Unauthenticated, "{e:?}");
        let with = |token: &'static str| {
            move |mut r: Request<()>| {
                r.metadata_mut().insert(
                    "authorization",
                    format!("Bearer {token}").parse().expect("value"),
                );
                Ok(r)
            }
        };
        let mut wrong =
            PeerClient::with_interceptor(channel.clone(), with("not-the-cluster-token"));
        let e = wrong
            .heartbeat(heartbeat("n2"))
            .await
            .expect_err("wrong token");
        assert_eq!(e.code(), tonic::Code::Unauthenticated, "{e:?}");
        let mut good = PeerClient::with_interceptor(channel, with(TOKEN));
        let e = good.heartbeat(heartbeat("n1")).await.expect_err("own id");
        assert!(e.message().contains("this node's own id"), "{e:?}");
        let e = good.heartbeat(heartbeat("n 2")).await.expect_err("bad id");
        assert_eq!(e.code(), tonic::Code::InvalidArgument, "{e:?}");
        let e = good
            .heartbeat(Heartbeat {
                node_id: "x".repeat(MAX_MESSAGE_BYTES),
                ..heartbeat("n2")
            })
            .await
            .expect_err("oversized");
        assert_eq!(e.code(), tonic::Code::OutOfRange, "{e:?}");
        let answer = good
            .heartbeat(heartbeat("n2"))
            .await
            .expect("valid")
            .into_inner();
        assert_eq!((answer.node_id.as_str(), answer.echo), ("n1", 1));
        assert_eq!(answer.members, 2, "n2 heard: n1 counts it");
        stop.send_replace(true);
    }

    /// A CA, and PEM credentials for `cn` (DNS name `limiter-cluster`) signed by it.
    struct Pki(rcgen::CertifiedIssuer<'static, rcgen::KeyPair>);

    impl Pki {
        fn new() -> Pki {
            let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).expect("params");
            params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
            params
                .distinguished_name
                .push(rcgen::DnType::CommonName, "cluster test CA");
            let key = rcgen::KeyPair::generate().expect("key");
            Pki(rcgen::CertifiedIssuer::self_signed(params, key).expect("CA"))
        }

        fn credentials(&self, cn: &str) -> Credentials {
            let key = rcgen::KeyPair::generate().expect("key");
            let mut params =
                rcgen::CertificateParams::new(vec!["limiter-cluster".to_owned()]).expect("params");
            params
                .distinguished_name
                .push(rcgen::DnType::CommonName, cn);
            let cert = params.signed_by(&key, &self.0).expect("cert");
            Credentials {
                token: None,
                tls: Some(TlsMaterial {
                    cert: cert.pem().into_bytes(),
                    key: key.serialize_pem().into_bytes(),
                    ca: self.0.pem().into_bytes(),
                    server_name: "limiter-cluster".into(),
                }),
            }
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn with_mutual_tls_peers_speak_only_as_their_certificate() {
        let pki = Pki::new();
        let (l1, a1) = listener().await;
        let (l2, a2) = listener().await;
        let (l3, a3) = listener().await;
        let tls_section = |id, a, peers| ClusterConfig {
            token_file: None,
            ..section(id, a, peers)
        };
        let n1 = Node::new(
            &tls_section("n1", a1, vec![a2]),
            &pki.credentials("n1"),
            1,
            true,
            policies(),
            1024,
        )
        .expect("n1");
        let n2 = Node::new(
            &tls_section("n2", a2, vec![a1]),
            &pki.credentials("n2"),
            1,
            true,
            policies(),
            1024,
        )
        .expect("n2");
        // n3's certificate is the CA's, but its heartbeats say n4.
        let n3 = Node::new(
            &tls_section("n4", a3, vec![a1]),
            &pki.credentials("n3"),
            1,
            true,
            policies(),
            1024,
        )
        .expect("n3");
        let (stop, rx) = watch::channel(false);
        let mut tasks = Vec::new();
        for (node, l) in [(&n1, l1), (&n2, l2), (&n3, l3)] {
            let (sink, _) = recorder();
            tasks.extend(node.run(l, sink, rx.clone()));
        }
        wait_for("n1 and n2 live over TLS", || {
            let s = n1.status();
            s.phase == "connected" && s.peers.iter().all(|p| p.live && p.node_id == "n2")
        })
        .await;
        // n3's heartbeats are refused (it is never counted), and it hears no answer.
        tokio::time::sleep(Duration::from_millis(300)).await;
        let s = n1.status();
        assert_eq!(s.members, 2, "the impostor is not counted: {s:?}");
        assert!(
            n3.status().peers.iter().all(|p| !p.live),
            "{:?}",
            n3.status()
        );
        // Without a client certificate, nothing gets through the handshake.
        let plain = Endpoint::from_shared(format!("https://{a1}"))
            .expect("uri")
            .tls_config(
                tonic::transport::ClientTlsConfig::new()
                    .ca_certificate(tonic::transport::Certificate::from_pem(pki.0.pem()))
                    .domain_name("limiter-cluster"),
            )
            .expect("tls")
            .connect()
            .await;
        if let Ok(channel) = plain {
            let e = PeerClient::new(channel)
                .heartbeat(Heartbeat {
                    node_id: "n9".into(),
                    members: 1,
                    ..Heartbeat::default()
                })
                .await
                .expect_err("no client certificate");
            assert_ne!(e.code(), tonic::Code::Ok);
        }
        assert_eq!(n1.status().members, 2);
        stop.send_replace(true);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn peers_named_by_dns_are_resolved_and_dialled() {
        let (l1, a1) = listener().await;
        let (l2, a2) = listener().await;
        let mut c1 = section("n1", a1, vec![]);
        c1.peers = vec![PeerAddr::Host {
            name: "localhost".into(),
            port: a2.port(),
        }];
        let n1 = Node::new(&c1, &token(), 1, true, policies(), 1024).expect("n1");
        let n2 = Node::new(
            &section("n2", a2, vec![a1]),
            &token(),
            1,
            true,
            policies(),
            1024,
        )
        .expect("n2");
        // Not resolved yet: the name counts as a member, and the node is not alone.
        assert_eq!(n1.status().members, 2);
        assert_eq!(n1.share_view().phase, Phase::Connected);
        let (stop, rx) = watch::channel(false);
        let mut tasks = Vec::new();
        for (node, l) in [(&n1, l1), (&n2, l2)] {
            let (sink, _) = recorder();
            tasks.extend(node.run(l, sink, rx.clone()));
        }
        wait_for("localhost resolved and n2 live", || {
            n1.status()
                .peers
                .iter()
                .any(|p| p.live && p.node_id == "n2" && p.address == a2.to_string())
        })
        .await;
        // A reload that drops the name: the endpoint goes, the member stays counted a while.
        let mut c1 = section("n1", a1, vec![]);
        c1.peers.clear();
        n1.reconfigure(&c1, Some(TOKEN), policies())
            .expect("reconfigure");
        let s = n1.status();
        assert!(s.peers.iter().all(|p| p.address.is_empty()), "{s:?}");
        assert_eq!(s.members, 2, "n2 is still counted: {s:?}");
        stop.send_replace(true);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn an_endpoint_that_is_this_node_is_not_counted() {
        let (l1, a1) = listener().await;
        let n1 = Node::new(
            &section("n1", a1, vec![a1]),
            &token(),
            1,
            true,
            policies(),
            1024,
        )
        .expect("n1");
        let (stop, rx) = watch::channel(false);
        let (sink, share) = recorder();
        let _t = n1.run(l1, sink, rx);
        wait_for("n1 alone", || n1.status().phase == "alone").await;
        let s = n1.status();
        assert_eq!((s.members, s.agreed_members), (1, 1), "{s:?}");
        assert_eq!(
            share.load(Ordering::SeqCst),
            40,
            "the maps got the whole limit"
        );
        stop.send_replace(true);
    }

    #[test]
    fn a_reload_cannot_drop_the_token_of_a_listener_without_tls() {
        let a: SocketAddr = "127.0.0.1:7201".parse().expect("addr");
        let n1 = Node::new(
            &section("n1", a, vec![]),
            &token(),
            1,
            true,
            policies(),
            1024,
        )
        .expect("n1");
        let e = n1
            .reconfigure(&section("n1", a, vec![]), None, policies())
            .expect_err("no credentials left");
        assert!(matches!(e, NodeError::AuthChange), "{e}");
        assert!(n1.shared.token().is_some(), "the token in force stays");
    }

    /// Maps whose fast path reported `hot` (once, as the `HOT` ring does) and whose every entry
    /// is a client of global policy 1.
    struct HotOnce(Vec<ClientKey>);

    impl Datapath for HotOnce {
        fn hot(&mut self) -> Vec<ClientKey> {
            std::mem::take(&mut self.0)
        }

        fn entry(&self, _: &ClientKey) -> Option<limiter_common::ClientState> {
            let policy = limiter_common::Policy {
                limit: 20,
                window_us: 1_000_000,
                id: 1,
                ..limiter_common::Policy::default()
            };
            Some(limiter_common::ClientState::fresh(&policy, 0))
        }

        fn write(
            &mut self,
            _: &[(ClientKey, Option<limiter_common::Grant>)],
        ) -> Vec<(usize, GrantsError)> {
            Vec::new()
        }

        fn grants(&self) -> Result<Vec<crate::cluster::enrolment::PinnedGrant>, GrantsError> {
            Ok(Vec::new())
        }
    }

    /// A client the fast path reports hot while the node runs no rounds (joining after a start
    /// without pins, where the share is 0 and every busy global client is dropped; or cut off)
    /// is taken up once it splits again: the fast path reports a client once, when it moves into
    /// `LIMITED`, and one that stays busy gets no second notice.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_hot_notice_while_joining_is_taken_up_once_connected() {
        let (l1, a1) = listener().await;
        let (l2, a2) = listener().await;
        // n1 starts without pins: joining until n2 counts it.
        let n1 = Node::new(
            &section("n1", a1, vec![a2]),
            &token(),
            1,
            false,
            policies(),
            1024,
        )
        .expect("n1");
        let n2 = Node::new(
            &section("n2", a2, vec![a1]),
            &token(),
            1,
            true,
            policies(),
            1024,
        )
        .expect("n2");
        n1.set_datapath(Box::new(HotOnce(vec![[7; 16]])));
        assert_eq!(n1.status().phase, "joining");
        enrolment::round(&n1.shared);
        let (_stop1, rx1) = watch::channel(false);
        let (_stop2, rx2) = watch::channel(false);
        let (sink1, _) = recorder();
        let (sink2, _) = recorder();
        let _t1 = n1.run(l1, sink1, rx1);
        let _t2 = n2.run(l2, sink2, rx2);
        wait_for("n1 connected, views agreed", || {
            let s = n1.status();
            s.phase == "connected" && s.views_agree
        })
        .await;
        wait_for(
            "n1 holds the client reported hot while it was joining",
            || n1.shared.enrolment().counts(enrolment::monotonic()).held == 1,
        )
        .await;
    }
}
