//! Connecting the CLI to a running agent's API: its Unix socket (the default) or TCP with a
//! bearer token and/or TLS.

use std::path::{Path, PathBuf};

use anyhow::Context as _;
use hyper_util::rt::TokioIo;
use tonic::{
    Request, Status,
    service::{Interceptor, interceptor::InterceptedService},
    transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity, Uri},
};

use crate::proto::{
    cluster_client::ClusterClient, limits_client::LimitsClient,
    rate_limiter_client::RateLimiterClient, stats_client::StatsClient,
};

/// Largest `Stats` reply the CLI accepts: about a million clients' rows.
const MAX_STATS_REPLY: usize = 256 << 20;

/// Where the agent's API is and how to authenticate.
#[derive(Debug, Clone, Default)]
pub struct Target {
    /// A socket path, or an `http://` / `https://` URL; `None`: the default socket.
    pub api: Option<String>,
    /// The interface, to find the default socket `/run/limiter/IFACE.sock`.
    pub iface: Option<String>,
    pub token_file: Option<PathBuf>,
    /// For https: the CA that signed the agent's certificate, and a client certificate and key.
    pub tls_ca: Option<PathBuf>,
    pub tls_cert: Option<PathBuf>,
    pub tls_key: Option<PathBuf>,
}

/// Adds the bearer token to every request.
#[derive(Clone)]
pub struct Token(Option<tonic::metadata::MetadataValue<tonic::metadata::Ascii>>);

impl Interceptor for Token {
    fn call(&mut self, mut request: Request<()>) -> Result<Request<()>, Status> {
        if let Some(v) = &self.0 {
            request.metadata_mut().insert("authorization", v.clone());
        }
        Ok(request)
    }
}

pub type Authed = InterceptedService<Channel, Token>;

/// The three service clients over one connection.
pub struct Clients {
    pub rate_limiter: RateLimiterClient<Authed>,
    pub limits: LimitsClient<Authed>,
    pub stats: StatsClient<Authed>,
    pub cluster: ClusterClient<Authed>,
}

/// The socket to use when `--api` is not given: the interface's, or the only one there is.
fn default_socket(iface: Option<&str>) -> anyhow::Result<PathBuf> {
    if let Some(iface) = iface {
        return Ok(crate::api::default_socket(iface));
    }
    only_socket_in(Path::new("/run/limiter"))
}

/// The one agent socket in `dir` that an agent answers on. A socket no one listens on any more
/// (its agent was killed, or crashed, before it could remove it) is passed over: it would
/// otherwise make every command without `--api` fail with "several agents".
fn only_socket_in(dir: &Path) -> anyhow::Result<PathBuf> {
    let sockets: Vec<PathBuf> = std::fs::read_dir(dir)
        .map(|entries| {
            entries
                .filter_map(Result::ok)
                .map(|e| e.path())
                .filter(|p| p.extension().is_some_and(|x| x == "sock"))
                .collect()
        })
        .unwrap_or_default();
    let (live, stale): (Vec<PathBuf>, Vec<PathBuf>) = sockets
        .into_iter()
        .partition(|p| std::os::unix::net::UnixStream::connect(p).is_ok());
    let list = |paths: &[PathBuf]| {
        paths
            .iter()
            .map(|p| p.display().to_string())
            .collect::<Vec<_>>()
            .join(", ")
    };
    match live.as_slice() {
        [one] => Ok(one.clone()),
        [] if stale.is_empty() => anyhow::bail!(
            "no agent API socket in {}: is `limiter agent` running? (or pass --api)",
            dir.display()
        ),
        [] => anyhow::bail!(
            "no agent answers on the API sockets in {} ({}: left by agents that stopped without \
             removing them): is `limiter agent` running? (or pass --api)",
            dir.display(),
            list(&stale)
        ),
        _ => anyhow::bail!(
            "several agents run here ({}): pass --api with one of them",
            list(&live)
        ),
    }
}

pub async fn connect(target: &Target) -> anyhow::Result<Clients> {
    let token = match &target.token_file {
        Some(path) => {
            let token = std::fs::read_to_string(path)
                .with_context(|| format!("reading token file {}", path.display()))?;
            Some(
                format!("Bearer {}", token.trim())
                    .parse()
                    .context("the token is not valid in an HTTP header")?,
            )
        }
        None => None,
    };
    let channel = match target.api.as_deref() {
        Some(url) if url.starts_with("http://") || url.starts_with("https://") => {
            let mut endpoint = Endpoint::from_shared(url.to_string())
                .with_context(|| format!("--api {url}: not a valid URL"))?;
            if url.starts_with("https://") {
                let mut tls = ClientTlsConfig::new();
                if let Some(ca) = &target.tls_ca {
                    let pem = std::fs::read(ca)
                        .with_context(|| format!("reading CA {}", ca.display()))?;
                    tls = tls.ca_certificate(Certificate::from_pem(pem));
                }
                if let (Some(cert), Some(key)) = (&target.tls_cert, &target.tls_key) {
                    let cert = std::fs::read(cert)
                        .with_context(|| format!("reading {}", cert.display()))?;
                    let key =
                        std::fs::read(key).with_context(|| format!("reading {}", key.display()))?;
                    tls = tls.identity(Identity::from_pem(cert, key));
                }
                endpoint = endpoint.tls_config(tls).context("configuring TLS")?;
            }
            endpoint.connect().await.map_err(|e| {
                anyhow::anyhow!("connecting to the agent API at {url}: {}", root_cause(&e))
            })?
        }
        other => {
            let path = match other {
                Some(p) => PathBuf::from(p),
                None => default_socket(target.iface.as_deref())?,
            };
            let shown = path.display().to_string();
            // The URI is required by the API but unused: the connector dials the socket.
            Endpoint::from_static("http://localhost")
                .connect_with_connector(tower::service_fn(move |_: Uri| {
                    let path = path.clone();
                    async move {
                        tokio::net::UnixStream::connect(path)
                            .await
                            .map(TokioIo::new)
                    }
                }))
                .await
                .map_err(|e| {
                    anyhow::anyhow!(
                        "connecting to the agent API socket {shown}: {} (is `limiter agent` running? are you root?)",
                        root_cause(&e)
                    )
                })?
        }
    };
    let token = Token(token);
    Ok(Clients {
        rate_limiter: RateLimiterClient::with_interceptor(channel.clone(), token.clone()),
        limits: LimitsClient::with_interceptor(channel.clone(), token.clone()),
        // `Top` with n = 0 lists every client: allow replies far beyond tonic's 4 MiB default.
        stats: StatsClient::with_interceptor(channel.clone(), token.clone())
            .max_decoding_message_size(MAX_STATS_REPLY),
        cluster: ClusterClient::with_interceptor(channel, token),
    })
}

/// The innermost cause of a transport error (tonic's own layers repeat it).
fn root_cause(e: &(dyn std::error::Error + 'static)) -> String {
    let mut cause = e;
    while let Some(next) = cause.source() {
        cause = next;
    }
    cause.to_string()
}

/// A `Status` as a one-line error: the code and the server's message.
pub fn status_error(s: Status) -> anyhow::Error {
    anyhow::anyhow!("{:?}: {}", s.code(), s.message())
}

#[cfg(test)]
mod tests {
    use std::os::unix::net::UnixListener;

    use super::*;

    /// A socket file an agent left behind when it was killed: bound, then its listener closed.
    fn stale(path: &Path) {
        drop(UnixListener::bind(path).expect("bind"));
        assert!(path.exists());
    }

    #[test]
    fn the_only_socket_an_agent_answers_on_is_chosen() {
        let dir = tempfile::tempdir().expect("tempdir");
        let message = |r: anyhow::Result<PathBuf>| r.expect_err("no socket").to_string();
        assert!(message(only_socket_in(dir.path())).starts_with("no agent API socket in"));
        stale(&dir.path().join("old.sock"));
        let e = message(only_socket_in(dir.path()));
        assert!(
            e.contains("no agent answers") && e.contains("old.sock"),
            "{e}"
        );
        let live = dir.path().join("veth0.sock");
        let _agent = UnixListener::bind(&live).expect("bind");
        stale(&dir.path().join("older.sock"));
        assert_eq!(only_socket_in(dir.path()).expect("one live"), live);
        let _other = UnixListener::bind(dir.path().join("veth1.sock")).expect("bind");
        let e = message(only_socket_in(dir.path()));
        assert!(
            e.starts_with("several agents run here") && !e.contains("old"),
            "{e}"
        );
    }
}
