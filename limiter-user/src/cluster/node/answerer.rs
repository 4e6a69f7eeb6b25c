//! Who answers when this node dials a peer over mutual TLS.
//!
//! An answer to a heartbeat says what the answering member is (its id, incarnation and view)
//! and carries its enrolment messages for this node: reports, and grants that this node
//! enforces. The listening side takes a heartbeat only from the node its caller's certificate
//! names (`service.rs`); this is the same rule for the dialling side. The connection to a peer
//! address is this module's own (TCP, then rustls with the cluster's CA, this node's
//! certificate and `server_name`, as tonic's would be), so that once its handshake is complete
//! the common name of the certificate the peer proved it holds is known, and the heartbeat
//! takes an answer in only if the answer names that node. Without it, any holder of a cluster
//! certificate listening at a peer's address could answer, and grant, as another member.
//!
//! The name is read from the finished connection, never from inside the certificate check
//! (which runs before the peer has proved it holds the key, and not at all when a session is
//! resumed); sessions are not resumed anyway (a peer reconnects rarely). A channel may be
//! dialling a new connection while an old one finishes its calls (after a GOAWAY); heartbeats
//! to one address run one at a time and a call that times out is dropped, so the answer a
//! heartbeat reads came over the newest connection.

use std::{
    net::{IpAddr, SocketAddr},
    sync::{Arc, Mutex, PoisonError},
    time::Duration,
};

use hyper_util::rt::TokioIo;
use rustls::{
    ClientConfig, RootCertStore,
    client::Resumption,
    crypto::CryptoProvider,
    pki_types::{CertificateDer, PrivateKeyDer, ServerName, pem::PemObject},
};
use tokio_rustls::{TlsConnector, client::TlsStream};

/// Why the dialling side's TLS could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum AnswererError {
    #[error("the cluster's TLS client_ca holds no certificate rustls can use")]
    NoCertificate,
    #[error("the cluster's TLS {what}: {source}")]
    Pem {
        what: &'static str,
        #[source]
        source: rustls::pki_types::pem::Error,
    },
    #[error("the cluster's TLS server_name {0:?} is not a DNS name")]
    ServerName(String),
    #[error("the cluster's TLS certificate and key")]
    Config(#[source] rustls::Error),
}

/// How this node dials its peers over mutual TLS: one for all peer addresses.
#[derive(Clone)]
pub struct Dialler {
    config: Arc<ClientConfig>,
    server_name: ServerName<'static>,
}

impl Dialler {
    /// From PEM: this node's certificate chain and key, the CA its peers' certificates chain
    /// to, and the DNS name they carry.
    pub fn new(
        cert: &[u8],
        key: &[u8],
        ca: &[u8],
        server_name: &str,
    ) -> Result<Dialler, AnswererError> {
        let pem = |what| move |source| AnswererError::Pem { what, source };
        let mut roots = RootCertStore::empty();
        let cas = CertificateDer::pem_slice_iter(ca)
            .collect::<Result<Vec<_>, _>>()
            .map_err(pem("client_ca"))?;
        // As tonic's listener reads it: certificates rustls cannot use are skipped.
        roots.add_parsable_certificates(cas);
        if roots.is_empty() {
            return Err(AnswererError::NoCertificate);
        }
        let chain = CertificateDer::pem_slice_iter(cert)
            .collect::<Result<Vec<_>, _>>()
            .map_err(pem("cert"))?;
        let key = PrivateKeyDer::from_pem_slice(key).map_err(pem("key"))?;
        // The provider tonic uses: the process default if one is installed, else ring.
        let provider = CryptoProvider::get_default()
            .cloned()
            .unwrap_or_else(|| Arc::new(rustls::crypto::ring::default_provider()));
        let mut config = ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(AnswererError::Config)?
            .with_root_certificates(roots)
            .with_client_auth_cert(chain, key)
            .map_err(AnswererError::Config)?;
        config.alpn_protocols = vec![b"h2".to_vec()];
        config.resumption = Resumption::disabled();
        let server_name = ServerName::try_from(server_name.to_owned())
            .map_err(|_| AnswererError::ServerName(server_name.to_owned()))?;
        Ok(Dialler {
            config: Arc::new(config),
            server_name,
        })
    }

    /// Dials `addr` (from `local` when set) within `timeout`, completes the TLS handshake, and
    /// records in `answerer` who the peer proved to be.
    pub async fn connect(
        &self,
        addr: SocketAddr,
        local: Option<IpAddr>,
        timeout: Duration,
        answerer: &Answerer,
    ) -> std::io::Result<TokioIo<TlsStream<tokio::net::TcpStream>>> {
        let dial = async {
            let socket = if addr.is_ipv4() {
                tokio::net::TcpSocket::new_v4()?
            } else {
                tokio::net::TcpSocket::new_v6()?
            };
            if let Some(local) = local {
                socket.bind(SocketAddr::new(local, 0))?;
            }
            let tcp = socket.connect(addr).await?;
            tcp.set_nodelay(true)?;
            TlsConnector::from(self.config.clone())
                .connect(self.server_name.clone(), tcp)
                .await
        };
        let tls = tokio::time::timeout(timeout, dial)
            .await
            .map_err(|_| std::io::Error::from(std::io::ErrorKind::TimedOut))??;
        let name = tls
            .get_ref()
            .1
            .peer_certificates()
            .and_then(|chain| chain.first())
            .and_then(|der| crate::certificate::subject(der.as_ref()).ok())
            .and_then(|(_, cn)| cn);
        answerer.set(name);
        Ok(TokioIo::new(tls))
    }
}

/// Who answers at one peer address: the common name (node id) of the certificate the peer
/// presented and proved on the newest connection.
#[derive(Debug, Default)]
pub struct Answerer {
    name: Mutex<Option<String>>,
}

impl Answerer {
    fn set(&self, name: Option<String>) {
        *self.name.lock().unwrap_or_else(PoisonError::into_inner) = name;
    }

    /// The node id the newest connection's certificate gives (`None`: no connection yet, or
    /// its certificate has no common name).
    pub fn name(&self) -> Option<String> {
        self.name
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }
}
