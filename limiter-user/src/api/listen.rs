//! Binding and serving: the Unix socket, TCP with the bearer token and/or TLS, and the routes
//! (the three services beside gRPC health and reflection).

use std::{net::SocketAddr, path::Path, sync::Arc, time::Duration};

use anyhow::Context as _;
use tonic::transport::Server;
use tower::layer::util::{Identity, Stack};

use super::{
    AccessLayer, ApiOptions, ApiState, CONCURRENCY_PER_CONNECTION, CallerLimits, CheckLanes,
    ErrorCountLayer, MAX_MESSAGE_BYTES, MAX_STREAMS, REQUEST_TIMEOUT, TlsFiles,
    cluster::ClusterService, connection::*, limits::*, rate_limiter::*, stats::*,
};
use crate::metrics::Counters;
use crate::proto::{
    self, cluster_server::ClusterServer, limits_server::LimitsServer,
    rate_limiter_server::RateLimiterServer, stats_server::StatsServer,
};

/// The routes served on every listener: the three services, health and reflection.
fn routes(
    state: &ApiState,
    checks: &Checks,
    stop: &tokio::sync::watch::Receiver<bool>,
    health: tonic_health::pb::health_server::HealthServer<
        impl tonic_health::pb::health_server::Health,
    >,
) -> anyhow::Result<tonic::service::Routes> {
    // Both reflection versions: grpcurl and grpc-go speak v1, while grpcio's reflection client
    // (Python) and older tools speak only v1alpha. The messages are the same.
    let reflection = || {
        tonic_reflection::server::Builder::configure()
            .register_encoded_file_descriptor_set(proto::FILE_DESCRIPTOR_SET)
            .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
    };
    let reflection_v1 = reflection()
        .build_v1()
        .context("building the reflection service (v1)")?;
    let reflection_v1alpha = reflection()
        .build_v1alpha()
        .context("building the reflection service (v1alpha)")?;
    let mut routes = tonic::service::RoutesBuilder::default();
    routes
        .add_service(
            RateLimiterServer::new(RateLimiterService {
                state: state.clone(),
                lanes: Arc::clone(&checks.lanes),
                callers: Arc::clone(&checks.callers),
            })
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
        .add_service(
            ClusterServer::new(ClusterService(state.clone()))
                .max_decoding_message_size(MAX_MESSAGE_BYTES),
        )
        .add_service(health)
        .add_service(reflection_v1)
        .add_service(reflection_v1alpha);
    Ok(routes.routes())
}

/// What the check methods share across listeners: the lanes checks run in, and the per-caller
/// limits.
struct Checks {
    lanes: Arc<CheckLanes>,
    callers: Arc<CallerLimits>,
}

/// The server every listener runs: bounded, counting errors outermost (so that the access
/// layer's refusals are counted too), then authenticating and limiting callers.
fn server(
    counters: &Arc<Counters>,
    access: AccessLayer,
) -> Server<Stack<AccessLayer, Stack<ErrorCountLayer, Identity>>> {
    Server::builder()
        .concurrency_limit_per_connection(CONCURRENCY_PER_CONNECTION)
        .max_concurrent_streams(MAX_STREAMS)
        .timeout(REQUEST_TIMEOUT)
        .layer(ErrorCountLayer::new(Arc::clone(counters)))
        .layer(access)
}

/// Binds the Unix socket (see `unix_socket`): its directory is created (0755) and must be one
/// only the agent's user or root can change, a stale socket from a dead agent is replaced, a live
/// one (another agent) is an error, and the socket is 0600 from its creation.
pub fn bind_unix(path: &Path) -> anyhow::Result<tokio::net::UnixListener> {
    super::unix_socket::bind(path)
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
                if !opts.credentials()?.any() {
                    anyhow::bail!(
                        "--api-listen {addr} needs --api-token-file, --api-check-token-file or --api-tls-client-ca (mutual TLS): the TCP API is never served without authentication"
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

/// The server's TLS setup: its certificate, and with a client CA, mutual TLS (also the rate
/// limit service's, `rls::listen`).
pub fn tls_config(tls: &TlsFiles) -> anyhow::Result<tonic::transport::ServerTlsConfig> {
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
    let checks = Checks {
        lanes: Arc::new(CheckLanes::new(
            opts.access.check_threads,
            opts.access.check_queue,
        )),
        callers: Arc::new(CallerLimits::new(
            opts.access.caller_rate,
            opts.access.new_clients,
        )),
    };

    let unix = listeners.unix;
    let socket = opts.socket.clone();
    let routes_unix = routes(&state, &checks, &shutdown, health.clone())?;
    let mut unix_server = server(&state.counters, AccessLayer::unix());
    let mut stop = shutdown.clone();
    tasks.push(tokio::spawn(async move {
        let incoming = UnixIncoming::new(unix);
        let result = unix_server
            .add_routes(routes_unix)
            .serve_with_incoming_shutdown(incoming, async move {
                let _ = stop.wait_for(|s| *s).await;
            })
            .await;
        if let Err(e) = result {
            tracing::error!("API on {}: {}", socket.display(), crate::error_chain(&e));
        }
        let _ = std::fs::remove_file(&socket);
    }));
    tracing::info!(socket = %opts.socket.display(), "API listening on the Unix socket");

    if let Some((listener, tls)) = listeners.tcp {
        let limits = opts.connections;
        let access = AccessLayer::tcp(opts.credentials()?, Arc::clone(&checks.callers));
        let mut builder = server(&state.counters, access)
            .http2_keepalive_interval(Some(KEEPALIVE_INTERVAL))
            .http2_keepalive_timeout(Some(KEEPALIVE_TIMEOUT));
        if let Some(tls) = tls {
            // The connection's own deadline (the auth timeout) ends a handshake first, and
            // counts it; tonic's handshake timeout is the backstop.
            builder = builder
                .tls_config(tls.timeout(limits.auth_timeout + Duration::from_secs(1)))
                .context("configuring TLS for the API")?;
        }
        let local = listener.local_addr()?;
        tcp = Some(local);
        let routes_tcp = routes(&state, &checks, &shutdown, health)?;
        let connections = Connections::new(limits, state.counters.api_connections.clone());
        tasks.push(tokio::spawn(async move {
            let incoming = connections.incoming(listener);
            let stop = async move {
                let _ = shutdown.wait_for(|s| *s).await;
            };
            // The activity layer inside authentication (`server` put the access layer outside
            // it): only authenticated calls keep a connection open.
            let activity = ActivityLayer::new(connections);
            let result = builder
                .layer(activity)
                .add_routes(routes_tcp)
                .serve_with_incoming_shutdown(incoming, stop)
                .await;
            if let Err(e) = result {
                tracing::error!("API on {local}: {}", crate::error_chain(&e));
            }
        }));
        tracing::info!(
            %local,
            tls = opts.tls.is_some(),
            admin_token = opts.token.is_some(),
            check_token = opts.access.check_token.is_some(),
            max_connections = limits.caps.total,
            max_per_address = limits.caps.per_source,
            auth_timeout = ?limits.auth_timeout,
            idle_timeout = ?limits.idle_timeout,
            "API listening on TCP"
        );
    }
    Ok(Served { tasks, tcp })
}
