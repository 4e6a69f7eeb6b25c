//! The rate limit service's own listener (`--rls-listen`), beside `grpc.health.v1`.
//!
//! Plaintext (h2c, what Envoy's cluster speaks without a transport socket) only on a loopback
//! address: Envoy on the same host. Anywhere else the service needs TLS (`--rls-tls-cert`,
//! `--rls-tls-key`, and `--rls-tls-client-ca` for mutual TLS, which is how Envoy should
//! authenticate itself: the protocol has no token), and the agent refuses to start without it.

use std::{net::SocketAddr, path::PathBuf, sync::Arc};

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
}

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
    let store = RlsStore::load(options.config.clone(), hits)
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

/// Serves the service until `shutdown` flips to true.
pub async fn serve(
    bound: RlsListener,
    checker: Arc<Checker>,
    mut shutdown: tokio::sync::watch::Receiver<bool>,
) -> anyhow::Result<tokio::task::JoinHandle<()>> {
    let (reporter, health) = tonic_health::server::health_reporter();
    reporter
        .set_serving::<RateLimitServiceServer<RlsService>>()
        .await;
    let service =
        RlsService::new(checker, Arc::clone(&bound.store), bound.options.service).server();
    let local = bound.listener.local_addr()?;
    let mut builder = Server::builder()
        .concurrency_limit_per_connection(CONCURRENCY_PER_CONNECTION)
        .http2_keepalive_interval(Some(std::time::Duration::from_secs(30)))
        .http2_keepalive_timeout(Some(std::time::Duration::from_secs(10)));
    let tls = bound.tls.is_some();
    if let Some(config) = bound.tls {
        builder = builder
            .tls_config(config)
            .context("configuring TLS for the rate limit service")?;
    }
    // Without Nagle's delay: an answer is one small frame, and Envoy waits for it.
    let incoming = tokio_stream::StreamExt::map(
        tokio_stream::wrappers::TcpListenerStream::new(bound.listener),
        |stream| {
            stream.inspect(|s| {
                let _ = s.set_nodelay(true);
            })
        },
    );
    let task = tokio::spawn(async move {
        let result = builder
            .add_service(service)
            .add_service(health)
            .serve_with_incoming_shutdown(incoming, async move {
                let _ = shutdown.wait_for(|s| *s).await;
            })
            .await;
        if let Err(e) = result {
            tracing::error!("rate limit service on {local}: {}", crate::error_chain(&e));
        }
    });
    tracing::info!(%local, tls, "rate limit service (envoy.service.ratelimit.v3) listening");
    Ok(task)
}
