//! The gRPC API (`proto/limiter.proto`): each method validates its request, calls [`Checker`],
//! [`Limits`] or the maps, and maps a typed error to a `Status` naming the field.
//!
//! Served on a Unix socket (mode 0600) and, when configured, on TCP behind a bearer token and/or
//! mutual TLS; both beside gRPC health and reflection. Requests are bounded in size, in batch
//! length, and in concurrency per connection.

use std::{
    collections::HashMap,
    net::SocketAddr,
    os::unix::fs::PermissionsExt as _,
    path::{Path, PathBuf},
    pin::Pin,
    sync::{Arc, atomic::Ordering},
    time::Duration,
};

use anyhow::Context as _;
use limiter_common::{
    ClientState,
    addr::ClientKey,
    maps::{ACTION_DROP, ACTION_PASS, MODE_DRY_RUN},
    window::{MAX_WINDOW_US, MIN_WINDOW_US, estimate_at},
};
use tokio_stream::{Stream, StreamExt as _, wrappers::BroadcastStream};
use tonic::{Request, Response, Status, service::Interceptor, transport::Server};

use crate::{
    check::{CheckError, Checker, ClientId, Decision},
    datapath::{LINK_PIN, pin_dir},
    limits::{Change, ChangeKind, Limits, LimitsError, Selector},
    metrics::Counters,
    policy::{Action, Resolved, Window},
    proto::{
        self,
        limits_server::{self, LimitsServer},
        rate_limiter_server::{self, RateLimiterServer},
        stats_server::{self, StatsServer},
    },
    stats::monotonic_ns,
};

/// Default `--api-max-batch`.
pub const DEFAULT_MAX_BATCH: usize = 1000;
/// Largest request accepted: a full batch of the longest IDs (1000 x ~270 bytes) fits 4x over.
const MAX_MESSAGE_BYTES: usize = 1 << 20;
/// Requests in flight per connection; more wait (HTTP/2 flow control pushes back on clients).
const CONCURRENCY_PER_CONNECTION: usize = 256;
/// Concurrent streams one HTTP/2 connection may open.
const MAX_STREAMS: u32 = 512;
/// A request that takes longer is cancelled with DEADLINE_EXCEEDED (checks take microseconds;
/// this guards against a stuck map walk, not normal work).
const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);

/// Where and how the API listens.
#[derive(Debug, Clone)]
pub struct ApiOptions {
    /// The Unix socket (default `/run/limiter/IFACE.sock`).
    pub socket: PathBuf,
    /// TCP address, if any; requires `token` or `tls`.
    pub listen: Option<SocketAddr>,
    /// Bearer token TCP clients must send (`authorization: Bearer TOKEN`).
    pub token: Option<String>,
    pub tls: Option<TlsFiles>,
    pub max_batch: usize,
}

/// Server certificate and key, and optionally the CA that client certificates must chain to
/// (mutual TLS; without it clients authenticate with the bearer token).
#[derive(Debug, Clone)]
pub struct TlsFiles {
    pub cert: PathBuf,
    pub key: PathBuf,
    pub client_ca: Option<PathBuf>,
}

/// The default socket of an interface's agent.
pub fn default_socket(iface: &str) -> PathBuf {
    PathBuf::from(format!("/run/limiter/{iface}.sock"))
}

/// Everything the services share.
#[derive(Clone)]
pub struct ApiState {
    pub iface: String,
    pub checker: Arc<Checker>,
    pub limits: Arc<Limits>,
    pub counters: Arc<Counters>,
    pub max_batch: usize,
}

/// Runs `f` on the blocking pool (map walks, file writes); a panic in it becomes INTERNAL.
async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, Status> + Send + 'static,
) -> Result<T, Status> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| Status::internal(e.to_string()))?
}

/// Counts a failed call by its code (`limiter_api_errors_total`).
fn counted<T>(counters: &Counters, r: Result<T, Status>) -> Result<T, Status> {
    if let Err(status) = &r {
        counters.api_error(status.code());
    }
    r
}

fn status_of(e: &LimitsError) -> Status {
    match e {
        LimitsError::NotFound(_) => Status::not_found(e.to_string()),
        LimitsError::DeleteDefault => Status::failed_precondition(e.to_string()),
        LimitsError::Invalid(_) => Status::invalid_argument(e.to_string()),
        LimitsError::OverlayUnusable { .. } => Status::failed_precondition(e.to_string()),
        LimitsError::Overlay(_) | LimitsError::Apply(_) => Status::internal(e.to_string()),
    }
}

fn check_status(e: CheckError) -> Status {
    match e {
        CheckError::InvalidId(_) => Status::invalid_argument(e.to_string()),
        CheckError::Run(_) | CheckError::Rejected(_) | CheckError::Unanswered => {
            Status::internal(e.to_string())
        }
    }
}

fn duration(d: Duration) -> prost_types::Duration {
    prost_types::Duration {
        seconds: d.as_secs() as i64,
        nanos: d.subsec_nanos() as i32,
    }
}

fn action_proto(a: Action) -> proto::Action {
    match a {
        Action::Limit => proto::Action::Limit,
        Action::Pass => proto::Action::Pass,
        Action::Drop => proto::Action::Drop,
    }
}

fn decision_proto(d: &Decision) -> proto::CheckResponse {
    proto::CheckResponse {
        allowed: d.allowed,
        limit: d.limit,
        remaining: d.remaining,
        reset_after: Some(duration(d.reset_after)),
        retry_after: d.retry_after.map(duration),
        window: Some(duration(d.window)),
        action: action_proto(d.action) as i32,
        policy: d.policy.to_string(),
        dry_run_denied: d.dry_run_denied,
    }
}

/// Validates one check; `index` (in a batch) prefixes error messages with `checks[i].`.
fn parse_check(req: &proto::CheckRequest, index: Option<usize>) -> Result<(ClientId, u32), Status> {
    let id = req.client_id.parse::<ClientId>().map_err(|e| {
        Status::invalid_argument(match index {
            Some(i) => format!("checks[{i}].{e}"),
            None => e.to_string(),
        })
    })?;
    Ok((id, req.hits.unwrap_or(1)))
}

/// The `match` of a Get or Delete request.
fn parse_selector(s: &str) -> Result<Selector, Status> {
    s.parse()
        .map_err(|e| Status::invalid_argument(format!("match: {e}")))
}

/// A policy from the API, validated field by field.
pub fn parse_policy(p: &proto::Policy) -> Result<(Selector, Resolved), Status> {
    let invalid =
        |field: &str, msg: String| Status::invalid_argument(format!("policy.{field}: {msg}"));
    let selector: Selector = p.r#match.parse().map_err(|e| invalid("match", e))?;
    let action = proto::Action::try_from(p.action)
        .map_err(|_| invalid("action", format!("unknown action {}", p.action)))?;
    let window = match &p.window {
        None => None,
        Some(d) => {
            if d.seconds < 0 || d.nanos < 0 {
                return Err(invalid("window", "must be positive".into()));
            }
            let ns = d.seconds as u128 * 1_000_000_000 + d.nanos as u128;
            if !ns.is_multiple_of(1000) {
                return Err(invalid(
                    "window",
                    "must be a whole number of microseconds".into(),
                ));
            }
            let us = ns / 1000;
            if !(MIN_WINDOW_US as u128..=MAX_WINDOW_US as u128).contains(&us) {
                return Err(invalid("window", "must be between 10ms and 1h".into()));
            }
            Some(Window { micros: us as u32 })
        }
    };
    let resolved = match action {
        proto::Action::Unspecified | proto::Action::Limit => Resolved {
            action: Action::Limit,
            limit: p
                .limit
                .ok_or_else(|| invalid("limit", "required (hits per window; 0 blocks)".into()))?,
            window: window.ok_or_else(|| invalid("window", "required, 10ms to 1h".into()))?,
        },
        proto::Action::Pass | proto::Action::Drop => {
            if window.is_some() {
                return Err(invalid("window", "only ACTION_LIMIT has a window".into()));
            }
            let drop = action == proto::Action::Drop;
            if p.limit.is_some_and(|l| !drop || l != 0) {
                return Err(invalid(
                    "limit",
                    "only ACTION_LIMIT has a limit (ACTION_DROP allows 0)".into(),
                ));
            }
            Resolved {
                action: if drop { Action::Drop } else { Action::Pass },
                limit: 0,
                window: Window { micros: 1_000_000 },
            }
        }
    };
    Ok((selector, resolved))
}

/// A policy as the API shows it.
pub fn policy_proto(selector: &Selector, r: &Resolved) -> proto::Policy {
    let limited = r.action == Action::Limit;
    proto::Policy {
        r#match: selector.to_string(),
        limit: limited.then_some(r.limit),
        window: limited.then(|| duration(Duration::from_micros(r.window.micros as u64))),
        action: action_proto(r.action) as i32,
    }
}

fn change_proto(c: &Change) -> proto::LimitChange {
    proto::LimitChange {
        kind: match c.kind {
            ChangeKind::Set => proto::limit_change::Kind::Set,
            ChangeKind::Deleted => proto::limit_change::Kind::Deleted,
        } as i32,
        policy: Some(policy_proto(&c.selector, &c.limit)),
        generation: c.generation as u64,
        source: c.source.as_str().into(),
    }
}

pub struct RateLimiterService(pub ApiState);

#[tonic::async_trait]
impl rate_limiter_server::RateLimiter for RateLimiterService {
    async fn check(
        &self,
        request: Request<proto::CheckRequest>,
    ) -> Result<Response<proto::CheckResponse>, Status> {
        let r = async {
            let (id, hits) = parse_check(request.get_ref(), None)?;
            let d = self.0.checker.check(&id, hits).map_err(check_status)?;
            self.count(&d);
            Ok(Response::new(decision_proto(&d)))
        }
        .await;
        counted(&self.counters(), r)
    }

    async fn check_batch(
        &self,
        request: Request<proto::CheckBatchRequest>,
    ) -> Result<Response<proto::CheckBatchResponse>, Status> {
        let r = async {
            let checks = &request.get_ref().checks;
            if checks.len() > self.0.max_batch {
                return Err(Status::invalid_argument(format!(
                    "checks: {} checks in one batch, at most {}",
                    checks.len(),
                    self.0.max_batch
                )));
            }
            // Validate all first: a bad check rejects the batch before anything is spent.
            let parsed = checks
                .iter()
                .enumerate()
                .map(|(i, c)| parse_check(c, Some(i)))
                .collect::<Result<Vec<_>, _>>()?;
            let refs: Vec<(&ClientId, u32)> = parsed.iter().map(|(id, h)| (id, *h)).collect();
            let decisions = self.0.checker.check_all(&refs).map_err(check_status)?;
            let results = decisions
                .iter()
                .map(|d| {
                    self.count(d);
                    decision_proto(d)
                })
                .collect();
            Ok(Response::new(proto::CheckBatchResponse { results }))
        }
        .await;
        counted(&self.counters(), r)
    }
}

impl RateLimiterService {
    fn counters(&self) -> Arc<Counters> {
        self.0.counters.clone()
    }

    fn count(&self, d: &Decision) {
        let counter = if d.allowed && !d.dry_run_denied {
            &self.0.counters.checks_allowed
        } else {
            &self.0.counters.checks_denied
        };
        counter.fetch_add(1, Ordering::Relaxed);
    }
}

pub struct LimitsService {
    pub state: ApiState,
    /// Flips to true at shutdown: `Watch` streams end then, so graceful shutdown can finish.
    pub stop: tokio::sync::watch::Receiver<bool>,
}

/// Changes a `Watch` stream buffers for a slow client before the broadcast reports it lagged.
const WATCH_BUFFER: usize = 64;

type ChangeStream = Pin<Box<dyn Stream<Item = Result<proto::LimitChange, Status>> + Send>>;

#[tonic::async_trait]
impl limits_server::Limits for LimitsService {
    async fn set(
        &self,
        request: Request<proto::SetLimitRequest>,
    ) -> Result<Response<proto::LimitChange>, Status> {
        let r = async {
            let policy = request
                .get_ref()
                .policy
                .as_ref()
                .ok_or_else(|| Status::invalid_argument("policy: required"))?;
            let (selector, resolved) = parse_policy(policy)?;
            let limits = self.state.limits.clone();
            let change =
                blocking(move || limits.set(&selector, resolved).map_err(|e| status_of(&e)))
                    .await?;
            Ok(Response::new(change_proto(&change)))
        }
        .await;
        counted(&self.counters(), r)
    }

    async fn get(
        &self,
        request: Request<proto::GetLimitRequest>,
    ) -> Result<Response<proto::Policy>, Status> {
        let r = async {
            let selector = parse_selector(&request.get_ref().r#match)?;
            let r = self
                .state
                .limits
                .get(&selector)
                .ok_or_else(|| Status::not_found(format!("no policy matches {selector}")))?;
            Ok(Response::new(policy_proto(&selector, &r)))
        }
        .await;
        counted(&self.counters(), r)
    }

    async fn delete(
        &self,
        request: Request<proto::DeleteLimitRequest>,
    ) -> Result<Response<proto::LimitChange>, Status> {
        let r = async {
            let selector = parse_selector(&request.get_ref().r#match)?;
            let limits = self.state.limits.clone();
            let change =
                blocking(move || limits.delete(&selector).map_err(|e| status_of(&e))).await?;
            Ok(Response::new(change_proto(&change)))
        }
        .await;
        counted(&self.counters(), r)
    }

    async fn list(
        &self,
        _request: Request<proto::ListLimitsRequest>,
    ) -> Result<Response<proto::ListLimitsResponse>, Status> {
        let r = async {
            let list = self.state.limits.list();
            Ok(Response::new(proto::ListLimitsResponse {
                policies: list.iter().map(|(s, r, _)| policy_proto(s, r)).collect(),
                layers: list.iter().map(|(_, _, l)| l.as_str().into()).collect(),
            }))
        }
        .await;
        counted(&self.counters(), r)
    }

    async fn effective(
        &self,
        _request: Request<proto::EffectiveConfigRequest>,
    ) -> Result<Response<proto::EffectiveConfig>, Status> {
        let r = async {
            Ok(Response::new(proto::EffectiveConfig {
                yaml: self.state.limits.effective_yaml(),
            }))
        }
        .await;
        counted(&self.counters(), r)
    }

    type WatchStream = ChangeStream;

    async fn watch(
        &self,
        request: Request<proto::WatchLimitsRequest>,
    ) -> Result<Response<Self::WatchStream>, Status> {
        let r = async {
            // Subscribe before listing, so nothing falls between the list and the changes.
            let changes = self.state.limits.subscribe();
            let initial: Vec<Result<proto::LimitChange, Status>> = if request.get_ref().initial {
                let generation = self
                    .state
                    .limits
                    .with_tables(|t| t.map_config().map(|c| c.generation).unwrap_or(0));
                self.state
                    .limits
                    .list()
                    .iter()
                    .map(|(s, r, _)| {
                        Ok(proto::LimitChange {
                            kind: proto::limit_change::Kind::Set as i32,
                            policy: Some(policy_proto(s, r)),
                            generation: generation as u64,
                            source: "initial".into(),
                        })
                    })
                    .collect()
            } else {
                Vec::new()
            };
            let mut live = BroadcastStream::new(changes).map(|c| match c {
                Ok(c) => Ok(change_proto(&c)),
                Err(tokio_stream::wrappers::errors::BroadcastStreamRecvError::Lagged(n)) => {
                    Err(Status::data_loss(format!(
                        "this watcher fell {n} changes behind; watch again with initial = true"
                    )))
                }
            });
            // Forward until the client goes away or the agent stops.
            let (tx, rx) = tokio::sync::mpsc::channel(WATCH_BUFFER);
            let mut stop = self.stop.clone();
            tokio::spawn(async move {
                // A client that stops reading blocks `send`: wait for it only until shutdown.
                // (`is_ok` drops the borrow the wait returns, keeping the task `Send`.)
                let closed = tx.clone();
                let forward = async move {
                    for item in initial {
                        if tx.send(item).await.is_err() {
                            return;
                        }
                    }
                    while let Some(item) = live.next().await {
                        let lagged = item.is_err();
                        if tx.send(item).await.is_err() || lagged {
                            return;
                        }
                    }
                };
                tokio::select! {
                    _ = async { stop.wait_for(|s| *s).await.is_ok() } => {}
                    _ = closed.closed() => {}
                    _ = forward => {}
                }
            });
            let stream: Self::WatchStream =
                Box::pin(tokio_stream::wrappers::ReceiverStream::new(rx));
            Ok(Response::new(stream))
        }
        .await;
        counted(&self.counters(), r)
    }
}

pub struct StatsService(pub ApiState);

impl StatsService {
    fn counters(&self) -> Arc<Counters> {
        self.0.counters.clone()
    }
}

impl LimitsService {
    fn counters(&self) -> Arc<Counters> {
        self.state.counters.clone()
    }
}

#[tonic::async_trait]
impl stats_server::Stats for StatsService {
    async fn global(
        &self,
        _request: Request<proto::GlobalStatsRequest>,
    ) -> Result<Response<proto::GlobalStats>, Status> {
        let r = async {
            let state = self.0.clone();
            let out = blocking(move || global(&state)).await?;
            Ok(Response::new(out))
        }
        .await;
        counted(&self.counters(), r)
    }

    async fn client(
        &self,
        request: Request<proto::ClientStatsRequest>,
    ) -> Result<Response<proto::ClientStats>, Status> {
        let r = async {
            let id: ClientId = request.get_ref().client_id.parse().map_err(check_status)?;
            let d = self.0.checker.check(&id, 0).map_err(check_status)?;
            Ok(Response::new(proto::ClientStats {
                client_id: id.to_string(),
                policy: d.policy.to_string(),
                action: action_proto(d.action) as i32,
                limit: d.limit,
                window: Some(duration(d.window)),
                estimate: d.estimate,
                passed: d.passed,
                dropped: d.dropped,
                resident: d.resident,
                scale: 1.0,
                utilisation: 0.0,
            }))
        }
        .await;
        counted(&self.counters(), r)
    }

    async fn top(
        &self,
        request: Request<proto::TopRequest>,
    ) -> Result<Response<proto::TopResponse>, Status> {
        let r = async {
            let n = request.get_ref().n as usize;
            let state = self.0.clone();
            let clients = blocking(move || top(&state, n)).await?;
            Ok(Response::new(proto::TopResponse { clients }))
        }
        .await;
        counted(&self.counters(), r)
    }
}

fn global(state: &ApiState) -> Result<proto::GlobalStats, Status> {
    let internal = |e: crate::datapath::DatapathError| Status::internal(e.to_string());
    // Under the policy lock only what is cheap; the walks run on duplicated descriptors.
    let (g, config, adaptive, maps) = state.limits.with_tables(|t| {
        Ok::<_, Status>((
            t.global().map_err(internal)?,
            t.map_config().map_err(internal)?,
            t.adaptive_status().map_err(internal)?,
            t.client_maps().map_err(internal)?,
        ))
    })?;
    let (clients, ids) = maps.resident().map_err(internal)?;
    let c = &state.counters;
    Ok(proto::GlobalStats {
        packets_passed: g.passed,
        packets_dropped: g.dropped,
        packets_non_ip: g.non_ip,
        packets_malformed: g.malformed,
        clients_created: g.new_clients,
        map_full: g.map_full,
        policy_resolves: g.resolves,
        contended: g.contended,
        clients_resident: clients,
        ids_resident: ids,
        checks_allowed: c.checks_allowed.load(Ordering::Relaxed),
        checks_denied: c.checks_denied.load(Ordering::Relaxed),
        policy_generation: config.generation as u64,
        dry_run: config.mode == MODE_DRY_RUN,
        attached: pin_dir(&state.iface).join(LINK_PIN).exists(),
        config_reloads: c.config_reloads.load(Ordering::Relaxed),
        config_rejects: c.config_rejects.load(Ordering::Relaxed),
        adaptive: adaptive.enabled(),
        cpu: adaptive.cpu(),
        load_factor: adaptive.load_factor(),
        adaptive_tracked: adaptive.tracked,
    })
}

/// The busiest clients (addresses and IDs) by current rate. IDs are stored by hash; those named
/// by a policy are shown by name, others as `id:` and the first 8 bytes of the hash in hex.
fn top(state: &ApiState, n: usize) -> Result<Vec<proto::ClientStats>, Status> {
    let internal = |e: crate::datapath::DatapathError| Status::internal(e.to_string());
    let view = state.checker.view();
    let config = state.limits.config();
    let id_names: HashMap<ClientKey, String> = config
        .named_policies()
        .keys()
        .map(|n| (n.key(), n.to_string()))
        .collect();
    let maps = state
        .limits
        .with_tables(|t| t.client_maps())
        .map_err(internal)?;
    let addresses = maps.addresses().map_err(internal)?;
    let named = maps.ids().map_err(internal)?;
    let now = monotonic_ns();
    let row = |id: String, s: &ClientState| {
        let window_ns = s.window_us as u64 * 1000;
        let estimate = std::num::NonZeroU64::new(window_ns)
            .filter(|_| s.action() != ACTION_PASS && s.action() != ACTION_DROP)
            .map_or(0, |w| estimate_at(&s.slots, now, w));
        let action = match s.action() {
            ACTION_PASS => Action::Pass,
            ACTION_DROP => Action::Drop,
            _ => Action::Limit,
        };
        let rate = if window_ns > 0 {
            estimate as f64 / window_ns as f64
        } else {
            0.0
        };
        let base = config
            .policy_base(s.policy())
            .map(|r| r.to_policy(s.policy()));
        let (scale, utilisation) = crate::stats::adaptation(s, base.as_ref(), rate * 1e9);
        (
            rate,
            proto::ClientStats {
                client_id: id,
                policy: view.name(s.policy()).to_string(),
                action: action_proto(action) as i32,
                limit: s.limit,
                window: Some(duration(Duration::from_nanos(window_ns))),
                estimate,
                passed: s.total_passed(),
                dropped: s.dropped_count(),
                resident: true,
                scale,
                utilisation,
            },
        )
    };
    let mut rows: Vec<(f64, proto::ClientStats)> = addresses
        .iter()
        .map(|(k, s)| (crate::stats::addr_of(k).to_string(), s))
        .chain(named.iter().map(|(k, s)| {
            let name = id_names.get(k).cloned().unwrap_or_else(|| {
                let hex: String = k[..8].iter().map(|b| format!("{b:02x}")).collect();
                format!("id:{hex}")
            });
            (name, s)
        }))
        .map(|(id, s)| row(id, s))
        .collect();
    rows.sort_by(|a, b| {
        b.0.total_cmp(&a.0)
            .then((b.1.passed + b.1.dropped).cmp(&(a.1.passed + a.1.dropped)))
            .then(a.1.client_id.cmp(&b.1.client_id))
    });
    if n > 0 {
        rows.truncate(n);
    }
    Ok(rows.into_iter().map(|(_, r)| r).collect())
}

/// Checks `authorization: Bearer TOKEN` on every request (TCP only), in constant time.
#[derive(Clone)]
pub struct BearerAuth {
    token: Arc<Vec<u8>>,
}

impl BearerAuth {
    pub fn new(token: &str) -> BearerAuth {
        BearerAuth {
            token: Arc::new(token.as_bytes().to_vec()),
        }
    }
}

impl Interceptor for BearerAuth {
    fn call(&mut self, request: Request<()>) -> Result<Request<()>, Status> {
        let given = request
            .metadata()
            .get("authorization")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
            .map(str::as_bytes);
        match given {
            Some(given) if constant_time_eq(given, &self.token) => Ok(request),
            Some(_) => Err(Status::unauthenticated("invalid bearer token")),
            None => Err(Status::unauthenticated(
                "missing credentials: send `authorization: Bearer <token>`",
            )),
        }
    }
}

/// Compares without an early exit on the first differing byte (the length is not secret).
fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// Reads a token file: the token is its content without surrounding whitespace; it must not be
/// empty and the file must not be readable by others.
pub fn read_token(path: &Path) -> anyhow::Result<String> {
    let meta = std::fs::metadata(path).with_context(|| format!("token file {}", path.display()))?;
    if meta.permissions().mode() & 0o077 != 0 {
        anyhow::bail!(
            "token file {} is readable by group or others (mode {:o}): chmod 600 it",
            path.display(),
            meta.permissions().mode() & 0o777
        );
    }
    let token = std::fs::read_to_string(path)
        .with_context(|| format!("reading token file {}", path.display()))?;
    let token = token.trim();
    if token.len() < 16 {
        anyhow::bail!(
            "token file {}: the token must be at least 16 characters",
            path.display()
        );
    }
    Ok(token.to_string())
}

/// The routes served on every listener: the three services, health and reflection.
fn routes(
    state: &ApiState,
    stop: &tokio::sync::watch::Receiver<bool>,
    health: tonic_health::pb::health_server::HealthServer<
        impl tonic_health::pb::health_server::Health,
    >,
) -> anyhow::Result<tonic::service::Routes> {
    let reflection = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(proto::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .build_v1()
        .context("building the reflection service")?;
    let mut routes = tonic::service::RoutesBuilder::default();
    routes
        .add_service(
            RateLimiterServer::new(RateLimiterService(state.clone()))
                .max_decoding_message_size(MAX_MESSAGE_BYTES),
        )
        .add_service(
            LimitsServer::new(LimitsService {
                state: state.clone(),
                stop: stop.clone(),
            })
            .max_decoding_message_size(MAX_MESSAGE_BYTES),
        )
        .add_service(
            StatsServer::new(StatsService(state.clone()))
                .max_decoding_message_size(MAX_MESSAGE_BYTES),
        )
        .add_service(health)
        .add_service(reflection);
    Ok(routes.routes())
}

fn server() -> Server {
    Server::builder()
        .concurrency_limit_per_connection(CONCURRENCY_PER_CONNECTION)
        .max_concurrent_streams(MAX_STREAMS)
        .timeout(REQUEST_TIMEOUT)
}

/// Binds the Unix socket: its directory is created (0755), a stale socket from a dead agent is
/// replaced, a live one (another agent) is an error, and the socket is made 0600.
pub fn bind_unix(path: &Path) -> anyhow::Result<tokio::net::UnixListener> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)
            .with_context(|| format!("creating the API socket directory {}", dir.display()))?;
    }
    if let Ok(meta) = std::fs::symlink_metadata(path) {
        use std::os::unix::fs::FileTypeExt as _;
        if !meta.file_type().is_socket() {
            anyhow::bail!(
                "API socket path {} exists and is not a socket; refusing to replace it",
                path.display()
            );
        }
        if std::os::unix::net::UnixStream::connect(path).is_ok() {
            anyhow::bail!(
                "API socket {} is in use by another process (another agent on this interface?)",
                path.display()
            );
        }
        std::fs::remove_file(path)
            .with_context(|| format!("removing the stale API socket {}", path.display()))?;
    }
    // Bind with a restrictive umask so the socket is never briefly open to others.
    // SAFETY: umask only changes this process's file-creation mask.
    let old = unsafe { libc::umask(0o177) };
    let bound = tokio::net::UnixListener::bind(path);
    // SAFETY: as above.
    unsafe { libc::umask(old) };
    let listener = bound.with_context(|| format!("binding the API socket {}", path.display()))?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))
        .with_context(|| format!("setting the mode of {}", path.display()))?;
    Ok(listener)
}

/// The running API servers.
pub struct Served {
    /// One task per listener; each ends after shutdown, once its requests are done.
    pub tasks: Vec<tokio::task::JoinHandle<()>>,
    /// The bound TCP address (useful with port 0).
    pub tcp: Option<SocketAddr>,
}

/// The API's listeners, bound (and its TLS files read) before the agent touches the kernel, so
/// that a port in use, a bad certificate or a second agent on the same socket stops the start
/// before anything is attached or written.
pub struct Listeners {
    unix: tokio::net::UnixListener,
    tcp: Option<(
        tokio::net::TcpListener,
        Option<tonic::transport::ServerTlsConfig>,
    )>,
}

/// Binds the Unix socket and, if configured, the TCP listener with its TLS setup.
pub async fn bind(opts: &ApiOptions) -> anyhow::Result<Listeners> {
    let unix = bind_unix(&opts.socket)?;
    let tcp = match opts.listen {
        None => None,
        Some(addr) => {
            let bound = async {
                let mutual_tls = opts.tls.as_ref().is_some_and(|t| t.client_ca.is_some());
                if opts.token.is_none() && !mutual_tls {
                    anyhow::bail!(
                        "--api-listen {addr} needs --api-token-file or --api-tls-client-ca (mutual TLS): the TCP API is never served without authentication"
                    );
                }
                let tls = match &opts.tls {
                    None => None,
                    Some(tls) => Some(tls_config(tls)?),
                };
                if tls.is_none() && !addr.ip().is_loopback() {
                    tracing::warn!(
                        %addr,
                        "the API's bearer token travels in clear text over TCP without TLS; add --api-tls-cert/--api-tls-key"
                    );
                }
                let listener = tokio::net::TcpListener::bind(addr)
                    .await
                    .with_context(|| format!("binding the API to {addr}"))?;
                Ok((listener, tls))
            }
            .await;
            match bound {
                Ok(bound) => Some(bound),
                Err(e) => {
                    let _ = std::fs::remove_file(&opts.socket);
                    return Err(e);
                }
            }
        }
    };
    Ok(Listeners { unix, tcp })
}

/// The server's TLS setup: its certificate, and with a client CA, mutual TLS.
fn tls_config(tls: &TlsFiles) -> anyhow::Result<tonic::transport::ServerTlsConfig> {
    let read =
        |p: &Path| std::fs::read(p).with_context(|| format!("reading TLS file {}", p.display()));
    let identity = tonic::transport::Identity::from_pem(read(&tls.cert)?, read(&tls.key)?);
    let mut config = tonic::transport::ServerTlsConfig::new().identity(identity);
    if let Some(ca) = &tls.client_ca {
        config = config.client_ca_root(tonic::transport::Certificate::from_pem(read(ca)?));
    }
    // Fail now on a bad certificate or key, not at the first connection.
    Server::builder()
        .tls_config(config.clone())
        .context("configuring TLS for the API")?;
    Ok(config)
}

/// Serves the API on `listeners` until `shutdown` flips to true.
pub async fn serve(
    state: ApiState,
    opts: ApiOptions,
    listeners: Listeners,
    mut shutdown: tokio::sync::watch::Receiver<bool>,
) -> anyhow::Result<Served> {
    let (reporter, health) = tonic_health::server::health_reporter();
    reporter
        .set_serving::<RateLimiterServer<RateLimiterService>>()
        .await;
    reporter.set_serving::<LimitsServer<LimitsService>>().await;
    reporter.set_serving::<StatsServer<StatsService>>().await;
    let mut tasks = Vec::new();
    let mut tcp = None;

    let unix = listeners.unix;
    let socket = opts.socket.clone();
    let routes_unix = routes(&state, &shutdown, health.clone())?;
    let mut stop = shutdown.clone();
    tasks.push(tokio::spawn(async move {
        let incoming = tokio_stream::wrappers::UnixListenerStream::new(unix);
        let result = server()
            .add_routes(routes_unix)
            .serve_with_incoming_shutdown(incoming, async move {
                let _ = stop.wait_for(|s| *s).await;
            })
            .await;
        if let Err(e) = result {
            tracing::error!("API on {}: {e}", socket.display());
        }
        let _ = std::fs::remove_file(&socket);
    }));
    tracing::info!(socket = %opts.socket.display(), "API listening on the Unix socket");

    if let Some((listener, tls)) = listeners.tcp {
        let mut builder = server();
        if let Some(tls) = tls {
            builder = builder
                .tls_config(tls)
                .context("configuring TLS for the API")?;
        }
        let local = listener.local_addr()?;
        tcp = Some(local);
        let routes_tcp = routes(&state, &shutdown, health)?;
        let token = opts.token.clone();
        tasks.push(tokio::spawn(async move {
            // TCP_NODELAY: without it Nagle holds the last part of a multi-frame response (a
            // CheckBatch reply) until the client's delayed ACK, ~40 ms per call.
            let incoming =
                tonic::transport::server::TcpIncoming::from(listener).with_nodelay(Some(true));
            let stop = async move {
                let _ = shutdown.wait_for(|s| *s).await;
            };
            let result = match token {
                Some(token) => {
                    builder
                        .layer(tonic::service::InterceptorLayer::new(BearerAuth::new(
                            &token,
                        )))
                        .add_routes(routes_tcp)
                        .serve_with_incoming_shutdown(incoming, stop)
                        .await
                }
                None => {
                    builder
                        .add_routes(routes_tcp)
                        .serve_with_incoming_shutdown(incoming, stop)
                        .await
                }
            };
            if let Err(e) = result {
                tracing::error!("API on {local}: {e}");
            }
        }));
        tracing::info!(%local, tls = opts.tls.is_some(), token = opts.token.is_some(), "API listening on TCP");
    }
    Ok(Served { tasks, tcp })
}
