//! The config file's `cluster:` section: who this node is, where it listens for its peers, who
//! its peers are, how it authenticates them, and what it does when cut off. Validated here; the
//! config module checks the global policies against it.

use std::{fmt, net::SocketAddr, path::PathBuf, str::FromStr, time::Duration};

use serde::{Deserialize, Deserializer, de};

use super::NodeId;
use crate::duration::parse_duration_us;

/// Most peer entries one `cluster:` section may list (a `dns:` entry counts once, whatever it
/// resolves to; see [`MAX_MEMBERS`]).
pub const MAX_PEERS: usize = 64;
/// Most members a node counts: configured, resolved and heard-from peers and itself. Bounds the
/// state a peer (or a DNS answer) can make a node keep.
pub const MAX_MEMBERS: usize = 256;
/// `sync_interval` when not written.
pub const DEFAULT_SYNC_INTERVAL: Duration = Duration::from_millis(50);
/// `peer_timeout` when not written.
pub const DEFAULT_PEER_TIMEOUT: Duration = Duration::from_secs(1);

/// The longest `peer_timeout` a config takes: the longest lease any member of this version runs
/// with (see `lease::Timing::MAX_LEASE`).
pub const MAX_PEER_TIMEOUT: Duration = Duration::from_secs(60);

/// What an isolated node (one that hears none of its peers) admits of a global policy's limit L.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Partition {
    /// Keep the cold share ⌊L/N⌋: the cluster's total stays ≤ L.
    #[default]
    Share,
    /// Fail open: admit up to L alone; k isolated nodes make the total ≤ L·(1 + k).
    Local,
    /// Fail closed: admit nothing of global policies until a peer is heard again.
    Deny,
}

impl fmt::Display for Partition {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Partition::Share => "share",
            Partition::Local => "local",
            Partition::Deny => "deny",
        })
    }
}

/// A peer as written in `peers`.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum PeerAddr {
    /// `192.0.2.7:7201`, `[2001:db8::7]:7201`.
    Socket(SocketAddr),
    /// `peer.example:7201`: one peer, the name's first address (re-resolved each round).
    Host { name: String, port: u16 },
    /// `dns:NAME:PORT`: every A/AAAA record of NAME is a peer (re-resolved each round; a
    /// Kubernetes headless Service).
    Dns { name: String, port: u16 },
}

impl FromStr for PeerAddr {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        if let Ok(addr) = s.parse::<SocketAddr>() {
            return Ok(PeerAddr::Socket(addr));
        }
        let (dns, rest) = match s.strip_prefix("dns:") {
            Some(rest) => (true, rest),
            None => (false, s),
        };
        let Some((name, port)) = rest.rsplit_once(':') else {
            return Err(format!(
                "peer {s:?} has no port: write host:port, [v6-address]:port or dns:NAME:PORT"
            ));
        };
        let port: u16 = match port.parse() {
            Ok(p) if p != 0 => p,
            _ => return Err(format!("peer {s:?}: {port:?} is not a port (1 to 65535)")),
        };
        let valid_name = !name.is_empty()
            && name.len() <= 253
            && name.split('.').all(|l| {
                !l.is_empty()
                    && l.len() <= 63
                    && l.chars().all(|c| c.is_ascii_alphanumeric() || c == '-')
            });
        if !valid_name {
            return Err(format!(
                "peer {s:?}: {name:?} is neither an IP address nor a DNS name (IPv6 addresses \
                 go in brackets: [2001:db8::7]:7201)"
            ));
        }
        let name = name.to_ascii_lowercase();
        Ok(if dns {
            PeerAddr::Dns { name, port }
        } else {
            PeerAddr::Host { name, port }
        })
    }
}

impl fmt::Display for PeerAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            PeerAddr::Socket(a) => a.fmt(f),
            PeerAddr::Host { name, port } => write!(f, "{name}:{port}"),
            PeerAddr::Dns { name, port } => write!(f, "dns:{name}:{port}"),
        }
    }
}

impl<'de> Deserialize<'de> for PeerAddr {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(de::Error::custom)
    }
}

/// The section as written.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawCluster {
    pub node_id: String,
    pub listen: String,
    #[serde(default)]
    pub peers: Vec<PeerAddr>,
    pub token_file: Option<PathBuf>,
    pub tls: Option<PeerTls>,
    pub sync_interval: Option<String>,
    pub peer_timeout: Option<String>,
    #[serde(default)]
    pub partition: Partition,
}

/// Mutual TLS between peers: every node's certificate is signed by `client_ca`, names the
/// node's `node_id` as its common name, and carries `server_name` (default
/// [`DEFAULT_SERVER_NAME`]) as a DNS name, which each node checks of the peers it dials (they are
/// dialled by address, so their own names cannot be checked before they answer).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PeerTls {
    pub cert: PathBuf,
    pub key: PathBuf,
    pub client_ca: PathBuf,
    #[serde(default = "default_server_name")]
    pub server_name: String,
}

/// The DNS name every peer certificate carries unless `tls.server_name` says otherwise.
pub const DEFAULT_SERVER_NAME: &str = "limiter-cluster";

fn default_server_name() -> String {
    DEFAULT_SERVER_NAME.to_owned()
}

/// The validated section.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClusterConfig {
    pub node_id: NodeId,
    pub listen: SocketAddr,
    pub peers: Vec<PeerAddr>,
    /// The shared secret peers present (`authorization: Bearer ...`); read by the agent with the
    /// rules of `--api-token-file`. At least one of this and `tls` is set.
    pub token_file: Option<PathBuf>,
    /// Mutual TLS between peers; a peer may then speak only as its certificate's common name.
    pub tls: Option<PeerTls>,
    pub sync_interval: Duration,
    pub peer_timeout: Duration,
    pub partition: Partition,
}

/// A field of the section that breaks a rule: the field (`cluster.listen`) and why.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{message}")]
pub struct ClusterConfigError {
    pub field: &'static str,
    pub message: String,
}

fn duration(
    written: Option<&str>,
    field: &'static str,
    default: Duration,
    range: (Duration, Duration),
) -> Result<Duration, ClusterConfigError> {
    let Some(s) = written else {
        return Ok(default);
    };
    let err = |message| ClusterConfigError { field, message };
    let us = parse_duration_us(s, field).map_err(err)?;
    let d = Duration::from_micros(us as u64);
    if d < range.0 || d > range.1 {
        return Err(err(format!(
            "{field} {s:?} is out of range: it must be between {:?} and {:?}",
            range.0, range.1
        )));
    }
    Ok(d)
}

impl RawCluster {
    /// Checks every field; the first error names its field.
    pub fn validate(&self) -> Result<ClusterConfig, ClusterConfigError> {
        let node_id = NodeId::new(&self.node_id).map_err(|e| ClusterConfigError {
            field: "node_id",
            message: e.to_string(),
        })?;
        let listen: SocketAddr = self.listen.parse().map_err(|_| ClusterConfigError {
            field: "listen",
            message: format!(
                "{:?} is not an address and port (write 127.0.0.1:7201, 0.0.0.0:7201 or \
                 [::]:7201)",
                self.listen
            ),
        })?;
        if listen.port() == 0 {
            return Err(ClusterConfigError {
                field: "listen",
                message: "the port must be set: peers dial it".into(),
            });
        }
        if self.token_file.is_none() && self.tls.is_none() {
            return Err(ClusterConfigError {
                field: "token_file",
                message: "peers must authenticate each other: set token_file to a file holding \
                          a shared secret of at least 16 characters (mode 600), the same on \
                          every node, or tls: { cert, key, client_ca } for mutual TLS"
                    .into(),
            });
        }
        if let Some(tls) = &self.tls {
            let valid_name = !tls.server_name.is_empty()
                && tls.server_name.len() <= 253
                && tls
                    .server_name
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '.'));
            if !valid_name {
                return Err(ClusterConfigError {
                    field: "tls.server_name",
                    message: format!("{:?} is not a DNS name", tls.server_name),
                });
            }
        }
        if self.peers.len() > MAX_PEERS {
            return Err(ClusterConfigError {
                field: "peers",
                message: format!("at most {MAX_PEERS} peers, not {}", self.peers.len()),
            });
        }
        for (i, p) in self.peers.iter().enumerate() {
            if self.peers[..i].contains(p) {
                return Err(ClusterConfigError {
                    field: "peers",
                    message: format!("{p} is listed twice"),
                });
            }
            if *p == PeerAddr::Socket(listen) {
                return Err(ClusterConfigError {
                    field: "peers",
                    message: format!("{p} is this node's own listen address"),
                });
            }
        }
        let sync_interval = duration(
            self.sync_interval.as_deref(),
            "sync_interval",
            DEFAULT_SYNC_INTERVAL,
            (Duration::from_millis(10), Duration::from_secs(10)),
        )?;
        let peer_timeout = duration(
            self.peer_timeout.as_deref(),
            "peer_timeout",
            DEFAULT_PEER_TIMEOUT,
            (Duration::from_millis(50), MAX_PEER_TIMEOUT),
        )?;
        if peer_timeout < sync_interval * 3 {
            return Err(ClusterConfigError {
                field: "peer_timeout",
                message: format!(
                    "peer_timeout ({peer_timeout:?}) must be at least 3 sync intervals \
                     ({:?}), or a peer is taken for silent after one late heartbeat",
                    sync_interval * 3
                ),
            });
        }
        Ok(ClusterConfig {
            node_id,
            listen,
            peers: self.peers.clone(),
            token_file: self.token_file.clone(),
            tls: self.tls.clone(),
            sync_interval,
            peer_timeout,
            partition: self.partition,
        })
    }
}

impl ClusterConfig {
    /// The member count the config alone implies: this node and one per peer entry (a `dns:`
    /// entry counts once here; what it resolves to counts at run time).
    pub fn configured_members(&self) -> u32 {
        1 + self.peers.len() as u32
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn raw(yaml: &str) -> RawCluster {
        serde_yaml::from_str(yaml).expect("yaml")
    }

    #[test]
    fn a_full_section_is_read() {
        let c = raw(
            "node_id: n1\nlisten: 127.0.0.1:7201\npeers: [\"127.0.0.1:7202\", \
             \"peer.example:7203\", \"dns:limiter.svc:7201\", \"[::1]:7204\"]\n\
             token_file: /etc/limiter/cluster.token\nsync_interval: 20ms\npeer_timeout: 500ms\n\
             partition: deny\n",
        )
        .validate()
        .expect("valid");
        assert_eq!(c.node_id.as_str(), "n1");
        assert_eq!(c.peers.len(), 4);
        assert_eq!(
            c.peers[1],
            PeerAddr::Host {
                name: "peer.example".into(),
                port: 7203
            }
        );
        assert_eq!(
            c.peers[2].to_string(),
            "dns:limiter.svc:7201",
            "dns entries keep their form"
        );
        assert_eq!(c.sync_interval, Duration::from_millis(20));
        assert_eq!(c.peer_timeout, Duration::from_millis(500));
        assert_eq!(c.partition, Partition::Deny);
        assert_eq!(c.configured_members(), 5);
    }

    #[test]
    fn mutual_tls_may_replace_the_token() {
        let c =
            raw("node_id: n1\nlisten: 127.0.0.1:7201\ntls: {cert: /c, key: /k, client_ca: /a}\n")
                .validate()
                .expect("valid");
        assert_eq!(c.token_file, None);
        let tls = c.tls.expect("tls");
        assert_eq!(tls.server_name, DEFAULT_SERVER_NAME);
        let e = serde_yaml::from_str::<RawCluster>(
            "node_id: n1\nlisten: 127.0.0.1:7201\ntls: {cert: /c}\n",
        )
        .expect_err("key and client_ca are required");
        assert!(e.to_string().contains("missing field `key`"), "{e}");
    }

    #[test]
    fn defaults_apply() {
        let c = raw("node_id: n1\nlisten: 127.0.0.1:7201\ntoken_file: /t\n")
            .validate()
            .expect("valid");
        assert_eq!(c.sync_interval, DEFAULT_SYNC_INTERVAL);
        assert_eq!(c.peer_timeout, DEFAULT_PEER_TIMEOUT);
        assert_eq!(c.partition, Partition::Share);
        assert_eq!(c.configured_members(), 1);
    }

    #[test]
    fn bad_fields_are_named() {
        let cases = [
            (
                "node_id: 'n 1'\nlisten: 127.0.0.1:1\ntoken_file: /t\n",
                "node_id",
            ),
            ("node_id: n1\nlisten: localhost\ntoken_file: /t\n", "listen"),
            (
                "node_id: n1\nlisten: 127.0.0.1:0\ntoken_file: /t\n",
                "listen",
            ),
            ("node_id: n1\nlisten: 127.0.0.1:1\n", "token_file"),
            (
                "node_id: n1\nlisten: 127.0.0.1:1\ntls: {cert: /c, key: /k, client_ca: /a, \
                 server_name: 'a b'}\n",
                "tls.server_name",
            ),
            (
                "node_id: n1\nlisten: 127.0.0.1:1\ntoken_file: /t\npeers: [127.0.0.1:2, 127.0.0.1:2]\n",
                "peers",
            ),
            (
                "node_id: n1\nlisten: 127.0.0.1:1\ntoken_file: /t\npeers: [127.0.0.1:1]\n",
                "peers",
            ),
            (
                "node_id: n1\nlisten: 127.0.0.1:1\ntoken_file: /t\nsync_interval: 1ms\n",
                "sync_interval",
            ),
            (
                "node_id: n1\nlisten: 127.0.0.1:1\ntoken_file: /t\nsync_interval: 1s\npeer_timeout: 2s\n",
                "peer_timeout",
            ),
        ];
        for (yaml, field) in cases {
            let e = raw(yaml).validate().expect_err(yaml);
            assert_eq!(e.field, field, "{yaml}: {e}");
        }
    }

    #[test]
    fn peers_are_parsed_or_refused_with_the_reason() {
        assert!(matches!("10.0.0.1:7201".parse(), Ok(PeerAddr::Socket(_))));
        for (bad, says) in [
            ("10.0.0.1", "no port"),
            ("host:0", "not a port"),
            ("host:99999", "not a port"),
            ("2001:db8::1:7201", "brackets"),
            ("bad_name:1", "neither"),
            ("dns::1", "neither"),
        ] {
            let e = bad.parse::<PeerAddr>().expect_err(bad);
            assert!(e.contains(says), "{bad}: {e}");
        }
    }
}
