//! Who answers when this node dials a peer over mutual TLS.
//!
//! An answer to a heartbeat says what the answering member is (its id, incarnation and view)
//! and carries its enrolment messages for this node: reports, and grants that this node
//! enforces. The listening side takes a heartbeat only from the node its caller's certificate
//! names (`service.rs`); this is the same rule for the dialling side. rustls verifies the
//! dialled peer's certificate as before (it chains to `client_ca` and carries `server_name`),
//! and the wrapper records the certificate's common name, the node id it gives, so that the
//! heartbeat takes an answer in only if the answer names that node. Without it, any holder of a
//! cluster certificate listening at a peer's address could answer, and grant, as another member.

use std::sync::{Arc, Mutex, PoisonError};

use rustls::{
    DigitallySignedStruct, RootCertStore, SignatureScheme,
    client::{
        WebPkiServerVerifier,
        danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier},
    },
    pki_types::{CertificateDer, ServerName, UnixTime},
};

/// Why the verifier could not be built.
#[derive(Debug, thiserror::Error)]
pub enum AnswererError {
    #[error("the cluster's TLS client_ca holds no PEM certificate")]
    NoCertificate,
    #[error("the cluster's TLS client_ca: {0}")]
    Pem(String),
    #[error("the cluster's TLS client_ca")]
    Roots(#[source] rustls::Error),
    #[error("the cluster's TLS client_ca")]
    Verifier(#[source] rustls::client::VerifierBuilderError),
}

/// A server certificate verifier for one peer address: rustls' own, which also remembers the
/// common name of the newest certificate it accepted.
#[derive(Debug)]
pub struct Answerer {
    verifier: Arc<WebPkiServerVerifier>,
    /// The common name of the certificate the newest verified handshake presented (`None`: no
    /// handshake yet, or the certificate has none).
    name: Mutex<Option<String>>,
}

impl Answerer {
    /// A verifier that trusts the CA certificates of `ca_pem` (the cluster's `client_ca`).
    pub fn new(ca_pem: &[u8]) -> Result<Answerer, AnswererError> {
        let mut roots = RootCertStore::empty();
        for pem in x509_parser::pem::Pem::iter_from_buffer(ca_pem) {
            let pem = pem.map_err(|e| AnswererError::Pem(e.to_string()))?;
            roots
                .add(CertificateDer::from(pem.contents))
                .map_err(AnswererError::Roots)?;
        }
        if roots.is_empty() {
            return Err(AnswererError::NoCertificate);
        }
        let verifier = WebPkiServerVerifier::builder_with_provider(
            Arc::new(roots),
            Arc::new(rustls::crypto::ring::default_provider()),
        )
        .build()
        .map_err(AnswererError::Verifier)?;
        Ok(Answerer {
            verifier,
            name: Mutex::new(None),
        })
    }

    /// The node id (common name) the newest verified certificate of this peer address gives.
    /// A channel holds one connection at a time, so an answer read on it came over the newest
    /// handshake's connection.
    pub fn name(&self) -> Option<String> {
        self.name
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }
}

impl ServerCertVerifier for Answerer {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let verified = self.verifier.verify_server_cert(
            end_entity,
            intermediates,
            server_name,
            ocsp_response,
            now,
        )?;
        let name = crate::certificate::subject(end_entity.as_ref())
            .ok()
            .and_then(|(_, cn)| cn);
        *self.name.lock().unwrap_or_else(PoisonError::into_inner) = name;
        Ok(verified)
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.verifier.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.verifier.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.verifier.supported_verify_schemes()
    }
}
