//! The gRPC API (`proto/limiter.proto`): each method validates its request, calls [`Checker`],
//! [`PolicyStore`] or the maps, and maps a typed error to a `Status` naming the field.
//!
//! Every answer other than OK is counted by code in one tower layer ([`ErrorCountLayer`]), not
//! by the methods.
//!
//! Served on a Unix socket (mode 0600) and, when configured, on TCP behind a bearer token and/or
//! mutual TLS; both beside gRPC health and reflection. Requests are bounded in size, in batch
//! length, and in concurrency per connection; TCP connections in number (in total and per
//! source) and in time (to authenticate, and idle), see [`connection`].

mod auth;
mod connection;
mod convert;
mod count;
mod limits;
mod listen;
mod rate_limiter;
mod stats;
mod unix_socket;

use std::{net::SocketAddr, path::PathBuf, sync::Arc, time::Duration};

use tonic::Status;

use crate::{check::Checker, limits::PolicyStore, metrics::Counters, stats::Walks};

pub use self::{
    auth::{BearerAuth, read_token},
    connection::{
        ConnectionLimits, DEFAULT_AUTH_TIMEOUT, DEFAULT_IDLE_TIMEOUT, DEFAULT_MAX_CONNECTIONS,
        DEFAULT_MAX_CONNECTIONS_PER_ADDRESS,
    },
    convert::{parse_policy, policy_proto},
    count::ErrorCountLayer,
    limits::LimitsService,
    listen::{Listeners, Served, bind, bind_unix, serve},
    rate_limiter::RateLimiterService,
    stats::{MAX_TOP, StatsService},
    unix_socket::SocketFile,
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
    /// Caps and timeouts of TCP connections.
    pub connections: ConnectionLimits,
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
    pub limits: Arc<PolicyStore>,
    pub counters: Arc<Counters>,
    pub max_batch: usize,
    /// The walks of the client maps, shared with the metrics endpoint.
    pub walks: Arc<Walks>,
}

/// Runs `f` on the blocking pool (map walks, file writes); a panic in it becomes INTERNAL.
async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, Status> + Send + 'static,
) -> Result<T, Status> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| Status::internal(e.to_string()))?
}
