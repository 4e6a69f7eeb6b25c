//! The rate limit service's own listener (`--rls-listen`), beside `grpc.health.v1`.
//!
//! Plaintext (h2c, what Envoy's cluster speaks without a transport socket) only on a loopback
//! address: Envoy on the same host. Anywhere else the service needs TLS (`--rls-tls-cert`,
//! `--rls-tls-key`, and `--rls-tls-client-ca` for mutual TLS, which is how Envoy should
//! authenticate itself: the protocol has no token), and the agent refuses to start without it.
//!
//! **Threads.** The service is served by threads of its own (`--rls-threads`, default half the
//! CPUs), each a single-threaded runtime with the connections the agent's accept loop hands it
//! in turn. A call is a few microseconds of decoding, a check program run and encoding: on
//! the agent's shared two-worker runtime the workers spent as much again parking, waking each
//! other and stealing the calls' tasks, each answer was written on its own, and the agent's
//! other work (API calls, the metrics, the reload poll) shared the workers with Envoy's calls.
//! On its own thread a connection's calls run where its frames are read, and the answers of
//! the calls decided together leave in one write. `limiter_rls_calls_total{thread}` counts the
//! calls each thread answered: Envoy opens a connection per worker, so a thread can only be as
//! busy as the connections it was handed.

use std::{net::SocketAddr, path::PathBuf, sync::Arc, time::Duration};

use anyhow::Context as _;
use envoy_types::pb::envoy::service::ratelimit::v3::rate_limit_service_server::RateLimitServiceServer;
use tonic::transport::{Server, ServerTlsConfig};

use super::{
    RlsStore,
    hits::RlsHits,
    service::{RlsOptions, RlsService},
};
use crate::{
    api::{TlsFiles, tls_config},
    check::Checker,
};

/// Requests in flight per connection (Envoy multiplexes its calls over a few connections).
const CONCURRENCY_PER_CONNECTION: usize = 1024;

/// Everything `--rls-*` says.
#[derive(Debug, Clone)]
pub struct RlsAgentOptions {
    pub listen: SocketAddr,
    /// `--rls-config`: a file or a directory of files.
    pub config: PathBuf,
    pub tls: Option<TlsFiles>,
    pub service: RlsOptions,
    /// `--rls-metrics-max-detailed`: the cap on the metrics' detailed series (see `hits`).
    pub max_detailed_series: usize,
    /// `--rls-threads`: threads serving the connections (see the module docs).
    pub threads: usize,
}

/// The default `--rls-threads`: half the CPUs, at least one (Envoy, on the same host, needs
/// the others).
pub fn default_threads() -> usize {
    std::thread::available_parallelism().map_or(1, |n| (n.get() / 2).max(1))
}

/// How long the accept loop pauses after a failed accept that would fail again at once (out of
/// descriptors: retrying at once would spin).
const ACCEPT_BACKOFF: Duration = Duration::from_millis(50);

/// The listener, bound (and its config and TLS files read) before the agent touches the kernel.
pub struct RlsListener {
    listener: tokio::net::TcpListener,
    tls: Option<ServerTlsConfig>,
    pub store: Arc<RlsStore>,
    options: RlsAgentOptions,
}

impl RlsListener {
    /// The bound address (useful with port 0).
    pub fn local_addr(&self) -> std::io::Result<SocketAddr> {
        self.listener.local_addr()
    }
}

/// Loads the config and binds the listener; refuses plaintext off loopback.
pub async fn bind(options: &RlsAgentOptions) -> anyhow::Result<RlsListener> {
    let addr = options.listen;
    if options.tls.is_none() && !addr.ip().is_loopback() {
        anyhow::bail!(
            "--rls-listen {addr}: without TLS the rate limit service is served on a loopback \
             address only (plaintext h2c for an Envoy on this host); give --rls-tls-cert and \
             --rls-tls-key (and --rls-tls-client-ca for mutual TLS) to serve it on {}",
            addr.ip()
        );
    }
    let hits = Arc::new(RlsHits::new(options.max_detailed_series));
    let store = RlsStore::load(options.config.clone(), hits, options.service.global)
        .with_context(|| format!("--rls-config {}", options.config.display()))?;
    let tls = match &options.tls {
        None => None,
        Some(files) => Some(tls_config(files).context("--rls-tls-*")?),
    };
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .with_context(|| format!("binding the rate limit service to {addr}"))?;
    Ok(RlsListener {
        listener,
        tls,
        store: Arc::new(store),
        options: options.clone(),
    })
}

/// Serves the service until `shutdown` flips to true: the returned task ends when every
/// serving thread has drained its connections.
pub async fn serve(
    bound: RlsListener,
    checker: Arc<Checker>,
    shutdown: tokio::sync::watch::Receiver<bool>,
) -> anyhow::Result<tokio::task::JoinHandle<()>> {
    let (reporter, health) = tonic_health::server::health_reporter();
    reporter
        .set_serving::<RateLimitServiceServer<RlsService>>()
        .await;
    let service = RlsService::new(checker, Arc::clone(&bound.store), bound.options.service);
    let local = bound.listener.local_addr()?;
    let tls = bound.tls.is_some();
    let threads = bound.options.threads.max(1);
    let mut connections = Vec::with_capacity(threads);
    let mut drained = Vec::with_capacity(threads);
    for i in 0..threads {
        let mut builder = Server::builder()
            .concurrency_limit_per_connection(CONCURRENCY_PER_CONNECTION)
            .http2_keepalive_interval(Some(Duration::from_secs(30)))
            .http2_keepalive_timeout(Some(Duration::from_secs(10)));
        if let Some(config) = bound.tls.clone() {
            builder = builder
                .tls_config(config)
                .context("configuring TLS for the rate limit service")?;
        }
        let calls = bound.store.hits().thread_calls();
        let router = builder
            .add_service(service.counting_calls(calls).server())
            .add_service(health.clone());
        let (give, taken) = tokio::sync::mpsc::unbounded_channel::<std::net::TcpStream>();
        let (done, finished) = tokio::sync::oneshot::channel::<()>();
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .context("starting a runtime for the rate limit service")?;
        let mut stop = shutdown.clone();
        std::thread::Builder::new()
            .name(format!("rls-{i}"))
            .spawn(move || {
                runtime.block_on(async move {
                    // Registered with this thread's runtime as they arrive.
                    let incoming = tokio_stream::StreamExt::map(
                        tokio_stream::wrappers::UnboundedReceiverStream::new(taken),
                        tokio::net::TcpStream::from_std,
                    );
                    let result = router
                        .serve_with_incoming_shutdown(incoming, async move {
                            let _ = stop.wait_for(|s| *s).await;
                        })
                        .await;
                    if let Err(e) = result {
                        tracing::error!(
                            "rate limit service on {local}: {}",
                            crate::error_chain(&e)
                        );
                    }
                });
                let _ = done.send(());
            })
            .context("starting a thread for the rate limit service")?;
        connections.push(give);
        drained.push(finished);
    }
    let listener = bound.listener;
    let mut stop = shutdown;
    let task = tokio::spawn(async move {
        // Each connection to the next thread in turn.
        let mut next = 0usize;
        loop {
            let accepted = tokio::select! {
                _ = stop.wait_for(|s| *s) => break,
                accepted = listener.accept() => accepted,
            };
            let stream = match accepted.and_then(|(stream, _)| {
                // Without Nagle's delay: an answer is one small frame, and Envoy waits for it.
                let _ = stream.set_nodelay(true);
                stream.into_std()
            }) {
                Ok(stream) => stream,
                Err(e) => {
                    tracing::warn!("rate limit service on {local}: accepting: {e}");
                    // One connection's failure (reset or aborted before it was taken) says
                    // nothing of the next; anything else (out of descriptors or memory) would
                    // come back at once.
                    if !matches!(
                        e.kind(),
                        std::io::ErrorKind::ConnectionAborted
                            | std::io::ErrorKind::ConnectionReset
                            | std::io::ErrorKind::Interrupted
                    ) {
                        tokio::time::sleep(ACCEPT_BACKOFF).await;
                    }
                    continue;
                }
            };
            // A thread that stopped (its server failed, and said why) gets no more.
            let mut left = Some(stream);
            for _ in 0..connections.len() {
                let Some(stream) = left.take() else { break };
                let thread = &connections[next % connections.len()];
                next = next.wrapping_add(1);
                if let Err(returned) = thread.send(stream) {
                    left = Some(returned.0);
                }
            }
            if left.is_some() {
                // Every serving thread has stopped: refuse connections (Envoy's
                // `failure_mode_deny` then decides) rather than take and drop them.
                tracing::error!(
                    "rate limit service on {local}: every serving thread has stopped; \
                     no longer accepting connections"
                );
                reporter
                    .set_not_serving::<RateLimitServiceServer<RlsService>>()
                    .await;
                break;
            }
        }
        drop(connections);
        for finished in drained {
            let _ = finished.await;
        }
    });
    tracing::info!(%local, tls, threads, "rate limit service (envoy.service.ratelimit.v3) listening");
    Ok(task)
}
