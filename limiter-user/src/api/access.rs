//! Access to the API as one tower layer around the routes: on TCP it authenticates every call
//! ([`Credentials`]), refuses a method the caller's role may not call (PERMISSION_DENIED), and
//! charges the call to the caller's rate limit (RESOURCE_EXHAUSTED); on the Unix socket every
//! call is admin. Either way the request carries its [`Caller`] on to the methods, which use it
//! for the check lanes and the new-client cap. A refused call never reaches a method.
//!
//! A layer rather than a tonic interceptor: an interceptor does not see the method's path.

use std::{
    future::Future,
    pin::Pin,
    sync::Arc,
    task::{Context, Poll},
};

use http::{Request, Response, header::AUTHORIZATION};
use tonic::{
    Status,
    transport::server::{TcpConnectInfo, TlsConnectInfo},
};
use tower::{Layer, Service};

use super::{
    auth::Credentials,
    callers::{Caller, CallerKey, CallerLimits, Who},
};

/// Where calls come from.
#[derive(Clone)]
enum Listener {
    Unix,
    Tcp(Credentials, Arc<CallerLimits>),
}

/// See the module docs.
#[derive(Clone)]
pub struct AccessLayer(Listener);

impl AccessLayer {
    /// The Unix socket's: every caller is admin, not limited.
    pub fn unix() -> AccessLayer {
        AccessLayer(Listener::Unix)
    }

    pub fn tcp(credentials: Credentials, limits: Arc<CallerLimits>) -> AccessLayer {
        AccessLayer(Listener::Tcp(credentials, limits))
    }

    /// The caller of `request`, or the status refusing it.
    fn admit<B>(&self, request: &Request<B>) -> Result<Caller, Status> {
        let Listener::Tcp(credentials, limits) = &self.0 else {
            return Ok(Caller::Unix);
        };
        let extensions = request.extensions();
        let tls = extensions.get::<TlsConnectInfo<TcpConnectInfo>>();
        let certificates = tls.and_then(TlsConnectInfo::peer_certs);
        let certificate = certificates
            .as_ref()
            .and_then(|c| c.first())
            .map(|c| c.as_ref());
        let identity = credentials.authenticate(
            request.headers().get(AUTHORIZATION).map(|v| v.as_bytes()),
            certificate,
        )?;
        let path = request.uri().path();
        if !identity.role.allows(path) {
            tracing::debug!(role = %identity.role, path, "API call refused: permission denied");
            return Err(identity.role.denied(path));
        }
        let peer = extensions
            .get::<TcpConnectInfo>()
            .or_else(|| tls.map(TlsConnectInfo::get_ref))
            .and_then(TcpConnectInfo::remote_addr);
        let key = CallerKey {
            role: identity.role,
            who: match (identity.subject, peer) {
                (Some(subject), _) => Who::Subject(subject),
                (None, Some(peer)) => Who::peer(peer.ip()),
                (None, None) => Who::Unknown,
            },
        };
        limits.charge_calls(&key, 1)?;
        Ok(Caller::Tcp(key))
    }
}

impl<S> Layer<S> for AccessLayer {
    type Service = Access<S>;

    fn layer(&self, inner: S) -> Access<S> {
        Access {
            inner,
            layer: self.clone(),
        }
    }
}

/// The service [`AccessLayer`] wraps around the routes.
#[derive(Clone)]
pub struct Access<S> {
    inner: S,
    layer: AccessLayer,
}

impl<S, ReqBody, ResBody> Service<Request<ReqBody>> for Access<S>
where
    S: Service<Request<ReqBody>, Response = Response<ResBody>>,
    ResBody: Default,
{
    type Response = Response<ResBody>;
    type Error = S::Error;
    type Future = AccessFuture<S::Future, ResBody>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut request: Request<ReqBody>) -> Self::Future {
        match self.layer.admit(&request) {
            Ok(caller) => {
                request.extensions_mut().insert(caller);
                AccessFuture::Admitted {
                    call: self.inner.call(request),
                }
            }
            Err(status) => AccessFuture::Refused {
                response: Some(status.into_http()),
            },
        }
    }
}

pin_project_lite::pin_project! {
    /// The routes' answer, or the refusal.
    #[project = AccessProj]
    pub enum AccessFuture<F, B> {
        Admitted { #[pin] call: F },
        Refused { response: Option<Response<B>> },
    }
}

impl<F, B, E> Future for AccessFuture<F, B>
where
    F: Future<Output = Result<Response<B>, E>>,
{
    type Output = Result<Response<B>, E>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        match self.project() {
            AccessProj::Admitted { call } => call.poll(cx),
            AccessProj::Refused { response } => match response.take() {
                Some(r) => Poll::Ready(Ok(r)),
                // Polled again after it finished: a caller bug; never ready again.
                None => Poll::Pending,
            },
        }
    }
}
