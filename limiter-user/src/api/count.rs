//! Error counting as one tower layer: every call the API answers with a gRPC status other than
//! OK is counted by its code (`limiter_api_errors_total`), whichever part of the stack answered:
//! a method (a typed error mapped to a `Status`), the bearer-token check, the codec (an
//! oversized or undecodable message), the router (an unknown method), or a `Watch` stream that
//! ends with an error. The methods themselves count nothing.
//!
//! A gRPC status travels either in the response headers ("trailers-only", how tonic answers an
//! error raised before the first message) or in the trailers after the body; the layer reads the
//! headers, and otherwise wraps the body to read its trailers as they pass. Calls cut short by
//! the server's request timeout are answered outside the layer (tonic's own timeout wraps it)
//! and are not counted.

use std::{
    future::Future,
    pin::Pin,
    sync::Arc,
    task::{Context, Poll, ready},
};

use http::{HeaderMap, Request, Response};
use http_body::{Body, Frame, SizeHint};
use tonic::{Code, Status};
use tower::{Layer, Service};

use crate::metrics::Counters;

/// Counts API errors by code (see the module docs).
#[derive(Clone)]
pub struct ErrorCountLayer(Arc<Counters>);

impl ErrorCountLayer {
    pub fn new(counters: Arc<Counters>) -> ErrorCountLayer {
        ErrorCountLayer(counters)
    }
}

impl<S> Layer<S> for ErrorCountLayer {
    type Service = ErrorCount<S>;

    fn layer(&self, inner: S) -> ErrorCount<S> {
        ErrorCount {
            inner,
            counters: Arc::clone(&self.0),
        }
    }
}

/// The service [`ErrorCountLayer`] wraps around the routes.
#[derive(Clone)]
pub struct ErrorCount<S> {
    inner: S,
    counters: Arc<Counters>,
}

/// The code of a `grpc-status` header, if there is one.
fn status_code(headers: &HeaderMap) -> Option<Code> {
    headers
        .get(Status::GRPC_STATUS)
        .map(|v| Code::from_bytes(v.as_bytes()))
}

impl<S, ReqBody, ResBody> Service<Request<ReqBody>> for ErrorCount<S>
where
    S: Service<Request<ReqBody>, Response = Response<ResBody>>,
{
    type Response = Response<CountedBody<ResBody>>;
    type Error = S::Error;
    type Future = ResponseFuture<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: Request<ReqBody>) -> Self::Future {
        ResponseFuture {
            call: self.inner.call(request),
            counters: Arc::clone(&self.counters),
        }
    }
}

pin_project_lite::pin_project! {
    /// The inner service's answer, counted once it arrives. A future of its own rather than a
    /// boxed `async` block: the routes' future is large, and moving it into a fresh allocation on
    /// every call cost the API a few per cent of its calls per second.
    pub struct ResponseFuture<F> {
        #[pin]
        call: F,
        counters: Arc<Counters>,
    }
}

impl<F, B, E> Future for ResponseFuture<F>
where
    F: Future<Output = Result<Response<B>, E>>,
{
    type Output = Result<Response<CountedBody<B>>, E>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        let response = ready!(this.call.poll(cx))?;
        // Trailers-only: the status is in the headers, and the body carries nothing more.
        let counters = match status_code(response.headers()) {
            Some(code) => {
                count(this.counters, code);
                None
            }
            None => Some(Arc::clone(this.counters)),
        };
        Poll::Ready(Ok(response.map(|inner| CountedBody { inner, counters })))
    }
}

fn count(counters: &Counters, code: Code) {
    if code != Code::Ok {
        counters.api_error(code);
    }
}

/// A response body that counts the status in its trailers. `counters` is taken once the status
/// is counted.
pub struct CountedBody<B> {
    inner: B,
    counters: Option<Arc<Counters>>,
}

impl<B: Body + Unpin> Body for CountedBody<B> {
    type Data = B::Data;
    type Error = B::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<B::Data>, B::Error>>> {
        let frame = Pin::new(&mut self.inner).poll_frame(cx);
        if let Poll::Ready(Some(Ok(frame))) = &frame
            && let Some(code) = frame.trailers_ref().and_then(status_code)
            && let Some(counters) = self.counters.take()
        {
            count(&counters, code);
        }
        frame
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use std::convert::Infallible;

    use http_body_util::{BodyExt as _, Full, StreamBody};
    use tower::ServiceExt as _;

    use super::*;

    type Frames = StreamBody<
        tokio_stream::Iter<std::vec::IntoIter<Result<Frame<&'static [u8]>, Infallible>>>,
    >;

    fn trailers(code: Code) -> HeaderMap {
        let mut map = HeaderMap::new();
        map.insert(Status::GRPC_STATUS, http::HeaderValue::from(code as i32));
        map
    }

    /// Counts the errors of one call to a service answering with a data frame, `headers` as a
    /// trailers-only status and `trailer` as the status in the trailers.
    async fn answer(headers: Option<Code>, trailer: Option<Code>) -> u64 {
        let counters = Arc::new(Counters::default());
        let service = tower::service_fn(move |_: Request<()>| async move {
            let mut frames = vec![Ok(Frame::data(&b"message"[..]))];
            if let Some(code) = trailer {
                frames.push(Ok(Frame::trailers(trailers(code))));
            }
            let mut response = Response::new(StreamBody::new(tokio_stream::iter(frames)));
            if let Some(code) = headers {
                response.headers_mut().extend(trailers(code));
            }
            Ok::<_, Infallible>(response)
        });
        let response: Response<CountedBody<Frames>> = ErrorCountLayer::new(Arc::clone(&counters))
            .layer(service)
            .oneshot(Request::new(()))
            .await
            .unwrap();
        // The trailers are read as the body is, to the end.
        response.into_body().collect().await.unwrap();
        [
            Code::InvalidArgument,
            Code::Unauthenticated,
            Code::DataLoss,
            Code::Ok,
        ]
        .iter()
        .map(|&c| counters.api_errors(c))
        .sum()
    }

    #[tokio::test]
    async fn counts_the_status_in_the_headers_or_in_the_trailers_once() {
        // Trailers-only: a method's error, the token check, the router.
        assert_eq!(answer(Some(Code::InvalidArgument), None).await, 1);
        // A stream that ends with an error.
        assert_eq!(answer(None, Some(Code::DataLoss)).await, 1);
        // Success, either way, counts nothing.
        assert_eq!(answer(None, Some(Code::Ok)).await, 0);
        assert_eq!(answer(Some(Code::Ok), None).await, 0);
        // No status at all (not gRPC): nothing.
        assert_eq!(answer(None, None).await, 0);
    }

    #[tokio::test]
    async fn counts_by_code() {
        let counters = Arc::new(Counters::default());
        for code in [Code::Unauthenticated, Code::Unauthenticated, Code::NotFound] {
            let service = tower::service_fn(move |_: Request<()>| async move {
                let mut response = Response::new(Full::new(&b""[..]));
                response.headers_mut().extend(trailers(code));
                Ok::<_, Infallible>(response)
            });
            ErrorCountLayer::new(Arc::clone(&counters))
                .layer(service)
                .oneshot(Request::new(()))
                .await
                .unwrap();
        }
        assert_eq!(counters.api_errors(Code::Unauthenticated), 2);
        assert_eq!(counters.api_errors(Code::NotFound), 1);
        assert_eq!(counters.api_errors(Code::Ok), 0);
    }
}
