//! The gRPC API (`proto/limiter.proto`): each method validates its request, calls [`Checker`],
//! [`PolicyStore`] or the maps, and maps a typed error to a `Status` naming the field.
//!
//! Every answer other than OK is counted by code in one tower layer ([`ErrorCountLayer`]), not
//! by the methods.
//!
//! Served on a Unix socket (mode 0600) and, when configured, on TCP behind bearer tokens and/or
//! mutual TLS; both beside gRPC health and reflection. TCP callers have a role (admin, or check
//! only) and per-caller limits ([`access`], [`callers`]); large batches of checks run off the
//! async runtime ([`check_lanes`]). Requests are bounded in size, in batch length, and in
//! concurrency per connection; TCP connections in number (in total and per source) and in time
//! (to authenticate, and idle), see [`connection`].

mod access;
pub mod auth;
mod callers;
mod check_lanes;
mod cluster;
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
    access::AccessLayer,
    auth::{Credentials, CredentialsError, Role, read_token, read_tokens},
    callers::{
        Caller, CallerKey, CallerLimits, DEFAULT_CALLER_RATE, DEFAULT_NEW_CLIENTS_PER_SECOND, Rate,
        Who,
    },
    check_lanes::{CheckLanes, DEFAULT_CHECK_QUEUE, default_check_threads},
    connection::{
        ConnectionLimits, DEFAULT_AUTH_TIMEOUT, DEFAULT_IDLE_TIMEOUT, DEFAULT_MAX_CONNECTIONS,
        DEFAULT_MAX_CONNECTIONS_PER_ADDRESS,
    },
    convert::{parse_policy, policy_proto},
    count::ErrorCountLayer,
    limits::LimitsService,
    listen::{Listeners, Served, bind, bind_unix, serve, tls_config},
    rate_limiter::{INLINE_CHECKS, RateLimiterService},
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
    /// The admin bearer token TCP clients may send (`authorization: Bearer TOKEN`).
    pub token: Option<String>,
    pub tls: Option<TlsFiles>,
    pub max_batch: usize,
    /// Caps and timeouts of TCP connections.
    pub connections: ConnectionLimits,
    /// Roles beyond the admin token, per-caller limits, check threads.
    pub access: AccessOptions,
}

/// The API's roles and per-caller limits (see `access`, `callers`, `check_lanes`).
#[derive(Debug, Clone)]
pub struct AccessOptions {
    /// The check role's bearer token (`--api-check-token-file`).
    pub check_token: Option<String>,
    /// With mutual TLS: certificate common names with the admin or the check role. Both empty:
    /// every certificate of the client CA is admin.
    pub admin_subjects: Vec<String>,
    pub check_subjects: Vec<String>,
    /// Calls per second per TCP caller (a CheckBatch counts its checks); `None`: no limit.
    pub caller_rate: Option<Rate>,
    /// Client entries one TCP caller's checks may create per second; `None`: no cap.
    pub new_clients: Option<Rate>,
    /// Check threads per lane, and calls that may wait for them.
    pub check_threads: usize,
    pub check_queue: usize,
}

impl Default for AccessOptions {
    fn default() -> AccessOptions {
        let rate = |n: u32| {
            std::num::NonZeroU32::new(n).map(|n| Rate {
                per_second: n,
                burst: n,
            })
        };
        AccessOptions {
            check_token: None,
            admin_subjects: Vec::new(),
            check_subjects: Vec::new(),
            caller_rate: rate(DEFAULT_CALLER_RATE),
            new_clients: rate(DEFAULT_NEW_CLIENTS_PER_SECOND),
            check_threads: default_check_threads(),
            check_queue: DEFAULT_CHECK_QUEUE,
        }
    }
}

impl ApiOptions {
    /// The TCP listener's credentials, from the tokens and the TLS setup.
    pub fn credentials(&self) -> Result<Credentials, CredentialsError> {
        Credentials::new(
            self.token.as_deref(),
            self.access.check_token.as_deref(),
            self.tls.as_ref().is_some_and(|t| t.client_ca.is_some()),
            &self.access.admin_subjects,
            &self.access.check_subjects,
        )
    }
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
    /// The cluster node, while the config has a `cluster:` section.
    pub cluster: tokio::sync::watch::Receiver<Option<crate::cluster::node::Node>>,
    /// Why the config's `cluster:` section is not taken up, while it is not.
    pub cluster_error: tokio::sync::watch::Receiver<Option<String>>,
}

/// Runs `f` on the blocking pool (map walks, file writes); a panic in it becomes INTERNAL.
async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, Status> + Send + 'static,
) -> Result<T, Status> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| Status::internal(e.to_string()))?
}
