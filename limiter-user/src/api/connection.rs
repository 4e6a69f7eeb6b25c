//! The API's connections: the accept loops, the caps on TCP connections (in total and per source,
//! see [`crate::admission`]), and the deadlines that close a TCP connection that does not
//! authenticate in time or stays idle.
//!
//! tonic's server takes a stream of connections and serves each on its own, with no hook per
//! connection. So the accept loop is ours ([`TcpIncoming`]: it admits or refuses, and backs off
//! when descriptors run out instead of spinning), each admitted connection's stream carries its
//! own deadline ([`AdmittedStream`]: its reads and writes fail once the deadline has passed,
//! which makes hyper drop the connection), and the calls on it are seen by a layer
//! ([`ActivityLayer`]) that sits inside authentication, so that only authenticated calls count.
//! The layer finds its connection by the peer address tonic puts in every request's extensions
//! (unique among the listener's open connections).
//!
//! A connection's deadline: `auth_timeout` after it was accepted while it has made no
//! authenticated call (this covers the TLS handshake, the HTTP/2 preface and the credentials);
//! once it has, `idle_timeout` after its last authenticated call ended, and never while one is
//! in flight (a `Watch` stream is in flight as long as it runs).

use std::{
    collections::{HashMap, VecDeque},
    future::Future,
    io,
    net::SocketAddr,
    pin::Pin,
    sync::{
        Arc, Mutex, PoisonError, Weak,
        atomic::{AtomicU8, AtomicU64, AtomicUsize, Ordering},
    },
    task::{Context, Poll, Waker, ready},
    time::Duration,
};

use http::{Request, Response};
use http_body::{Body, Frame, SizeHint};
use tokio::{
    io::{AsyncRead, AsyncWrite, ReadBuf},
    net::{TcpListener, TcpStream, UnixListener, UnixStream},
    time::{Instant, Sleep},
};
use tokio_stream::Stream;
use tonic::transport::server::{Connected, TcpConnectInfo, TlsConnectInfo};
use tower::{Layer, Service};

use crate::{
    admission::{ACCEPT_BACKOFF, AcceptFailure, Admission, Caps, Refusal, Slot},
    metrics::{ListenerCounters, OpenConnection},
};

/// Default `--api-max-connections`.
pub const DEFAULT_MAX_CONNECTIONS: usize = 256;
/// Default `--api-max-connections-per-address`.
pub const DEFAULT_MAX_CONNECTIONS_PER_ADDRESS: usize = 32;
/// Default `--api-auth-timeout`: a client connects and calls at once; ten seconds cover a slow
/// TLS handshake across the world.
pub const DEFAULT_AUTH_TIMEOUT: Duration = Duration::from_secs(10);
/// Default `--api-idle-timeout`. A closed idle connection costs its client one reconnection.
pub const DEFAULT_IDLE_TIMEOUT: Duration = Duration::from_secs(300);
/// HTTP/2 PING interval on TCP connections: finds peers that vanished (a reset NAT entry, a
/// dead host) even while a `Watch` stream keeps their connection busy.
pub const KEEPALIVE_INTERVAL: Duration = Duration::from_secs(30);
/// A PING not acknowledged within this closes the connection.
pub const KEEPALIVE_TIMEOUT: Duration = Duration::from_secs(10);
/// Connections accepted and refused in one poll of the accept loop before it yields, so a flood
/// of refusals cannot hold a runtime worker.
const REFUSALS_PER_POLL: usize = 64;

/// What TCP connections the API serves, and for how long.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ConnectionLimits {
    pub caps: Caps,
    /// Time from accepting a connection to its first authenticated call.
    pub auth_timeout: Duration,
    /// Time a connection that has authenticated may stay without a call in flight.
    pub idle_timeout: Duration,
}

impl Default for ConnectionLimits {
    fn default() -> Self {
        ConnectionLimits {
            caps: Caps {
                total: DEFAULT_MAX_CONNECTIONS,
                per_source: DEFAULT_MAX_CONNECTIONS_PER_ADDRESS,
            },
            auth_timeout: DEFAULT_AUTH_TIMEOUT,
            idle_timeout: DEFAULT_IDLE_TIMEOUT,
        }
    }
}

/// Why a connection's deadline closed it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Expiry {
    /// No authenticated call within the auth timeout.
    Unauthenticated,
    /// No call in flight for the idle timeout.
    Idle,
    /// Closed to make room: the listener was full and this was the oldest connection that had
    /// made no authenticated call.
    Displaced,
}

impl Expiry {
    fn error(self) -> io::Error {
        io::Error::new(
            io::ErrorKind::TimedOut,
            match self {
                Expiry::Unauthenticated => "no authenticated call within --api-auth-timeout",
                Expiry::Idle => "idle for --api-idle-timeout",
                Expiry::Displaced => {
                    "closed to make room: the listener was full and this connection had made no authenticated call"
                }
            },
        )
    }
}

/// A TCP connection: its local address (a listener on a wildcard address serves several) and its
/// peer's.
type ConnKey = (Option<SocketAddr>, SocketAddr);

/// Locks `m`; its holders only store or take a value, so a poisoned lock is still consistent.
fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

/// What a connection's deadline depends on: when it opened, its calls in flight and when the
/// last one started or ended.
#[derive(Debug)]
struct Activity {
    opened: Instant,
    in_flight: AtomicUsize,
    /// Milliseconds from `opened` to the last start or end of an authenticated call, plus one;
    /// 0 while there has been none.
    last: AtomicU64,
    /// The connection's place under the caps; taken early when it is displaced.
    slot: Mutex<Option<Slot>>,
    /// `UNAUTHENTICATED` until its first authenticated call (`AUTHENTICATED`) or its
    /// displacement (`DISPLACED`, see [`Connections::displace`]), whichever comes first: one
    /// compare-and-swap decides, so an authenticated connection is never displaced.
    state: AtomicU8,
    /// The connection's task while it has made no authenticated call, to wake it if displaced.
    waker: Mutex<Option<Waker>>,
}

/// `Activity::state` values.
const UNAUTHENTICATED: u8 = 0;
const AUTHENTICATED: u8 = 1;
const DISPLACED: u8 = 2;

impl Activity {
    fn new(opened: Instant, slot: Slot) -> Activity {
        Activity {
            opened,
            in_flight: AtomicUsize::new(0),
            last: AtomicU64::new(0),
            slot: Mutex::new(Some(slot)),
            state: AtomicU8::new(UNAUTHENTICATED),
            waker: Mutex::new(None),
        }
    }

    fn state(&self) -> u8 {
        self.state.load(Ordering::Acquire)
    }

    /// Marks it displaced unless it has authenticated (or was displaced) already.
    fn displace(&self) -> bool {
        self.state
            .compare_exchange(
                UNAUTHENTICATED,
                DISPLACED,
                Ordering::AcqRel,
                Ordering::Acquire,
            )
            .is_ok()
    }

    fn touch(&self, now: Instant) {
        let ms = now.saturating_duration_since(self.opened).as_millis() as u64 + 1;
        self.last.fetch_max(ms, Ordering::AcqRel);
    }

    /// An authenticated call starts; it ends when the returned guard is dropped.
    fn begin(self: &Arc<Self>, now: Instant) -> InFlight {
        // From now on never displaced (a connection displaced first is closing anyway).
        let _ = self.state.compare_exchange(
            UNAUTHENTICATED,
            AUTHENTICATED,
            Ordering::AcqRel,
            Ordering::Acquire,
        );
        self.in_flight.fetch_add(1, Ordering::AcqRel);
        self.touch(now);
        InFlight(Arc::clone(self))
    }

    /// Whether the connection may stay open at `now`, and until when it certainly may (when it
    /// is checked again), or why it must close.
    fn check(&self, now: Instant, limits: &ConnectionLimits) -> Result<Instant, Expiry> {
        if self.in_flight.load(Ordering::Acquire) > 0 {
            return Ok(now + limits.idle_timeout);
        }
        let (deadline, expiry) = match self.last.load(Ordering::Acquire) {
            0 => (self.opened + limits.auth_timeout, Expiry::Unauthenticated),
            ms => (
                self.opened + Duration::from_millis(ms - 1) + limits.idle_timeout,
                Expiry::Idle,
            ),
        };
        if now >= deadline {
            Err(expiry)
        } else {
            Ok(deadline)
        }
    }
}

/// One authenticated call in flight on a connection.
#[derive(Debug)]
struct InFlight(Arc<Activity>);

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.touch(Instant::now());
        self.0.in_flight.fetch_sub(1, Ordering::AcqRel);
    }
}

/// The TCP listener's connections: their caps, their deadlines' limits, and the activity of
/// each open one by peer address.
#[derive(Debug)]
pub struct Connections {
    limits: ConnectionLimits,
    admission: Arc<Admission>,
    by_conn: Mutex<HashMap<ConnKey, Arc<Activity>>>,
    /// Connections admitted and not yet authenticated, oldest first (with stale entries of ones
    /// that authenticated or closed since, dropped as they are met): who [`Connections::displace`]
    /// closes.
    unauthenticated: Mutex<VecDeque<Weak<Activity>>>,
    counters: ListenerCounters,
}

impl Connections {
    pub fn new(limits: ConnectionLimits, counters: ListenerCounters) -> Arc<Connections> {
        Arc::new(Connections {
            limits,
            admission: Admission::new(limits.caps),
            by_conn: Mutex::new(HashMap::new()),
            unauthenticated: Mutex::new(VecDeque::new()),
            counters,
        })
    }

    fn by_conn(&self) -> std::sync::MutexGuard<'_, HashMap<ConnKey, Arc<Activity>>> {
        // Inserts and removes only: a panic cannot leave the map half-updated.
        lock(&self.by_conn)
    }

    /// Admits `stream` from `peer`, or closes it and counts the refusal.
    fn admit(self: &Arc<Self>, stream: TcpStream, peer: SocketAddr) -> Option<AdmittedStream> {
        let admitted = match self.admission.admit(peer.ip()) {
            Err(Refusal::Total) if self.displace() => self.admission.admit(peer.ip()),
            admitted => admitted,
        };
        let slot = match admitted {
            Ok(slot) => slot,
            Err(why) => {
                self.counters.refused(why);
                tracing::debug!(%peer, reason = why.label(), "API: connection refused");
                return None;
            }
        };
        // Without it Nagle holds the last part of a multi-frame response (a CheckBatch reply)
        // until the client's delayed ACK, ~40 ms per call.
        let _ = stream.set_nodelay(true);
        let opened = Instant::now();
        let activity = Arc::new(Activity::new(opened, slot));
        let local = stream.local_addr().ok();
        self.by_conn().insert((local, peer), Arc::clone(&activity));
        {
            let mut queue = lock(&self.unauthenticated);
            // Entries of connections that authenticated or closed are dropped when they reach
            // the front; a listener that never fills never pops, so prune them here too, once
            // they outnumber the cap (amortised O(1) per connection).
            if queue.len() >= 2 * self.limits.caps.total {
                queue.retain(|a| a.upgrade().is_some_and(|a| a.state() == UNAUTHENTICATED));
            }
            queue.push_back(Arc::downgrade(&activity));
        }
        Some(AdmittedStream {
            local,
            stream,
            peer,
            deadline: Box::pin(tokio::time::sleep_until(opened + self.limits.auth_timeout)),
            activity,
            expired: None,
            connections: Arc::clone(self),
            _open: self.counters.opened(),
        })
    }

    /// Makes room under the total cap by closing the oldest connection that has made no
    /// authenticated call, if there is one: connections without credentials cannot hold the
    /// listener against callers with them (who authenticate within their first round trips,
    /// while a flood's connections wait out the auth timeout), and a connection that has
    /// authenticated is never displaced. Its place is given back at once; its task is woken to
    /// close it.
    fn displace(&self) -> bool {
        let victim = {
            let mut queue = lock(&self.unauthenticated);
            loop {
                let Some(front) = queue.pop_front() else {
                    return false;
                };
                if let Some(activity) = front.upgrade()
                    && activity.displace()
                {
                    break activity;
                }
            }
        };
        drop(lock(&victim.slot).take());
        if let Some(waker) = lock(&victim.waker).take() {
            waker.wake();
        }
        self.counters.displaced.inc();
        true
    }

    /// The activity of the open connection `conn`.
    fn activity(&self, conn: ConnKey) -> Option<Arc<Activity>> {
        self.by_conn().get(&conn).cloned()
    }

    /// The accept loop over `listener`, as the stream of connections tonic serves.
    pub fn incoming(self: &Arc<Self>, listener: TcpListener) -> TcpIncoming {
        TcpIncoming {
            listener,
            connections: Arc::clone(self),
            backoff: Backoff::new("API (TCP)"),
        }
    }
}

/// Waiting after `accept` failed for want of descriptors or memory, logged once per shortage.
struct Backoff {
    what: &'static str,
    sleep: Option<Pin<Box<Sleep>>>,
    starved: bool,
}

/// What to do after a failed `accept`.
enum AfterFailure {
    /// Accept again now.
    Retry,
    /// The listener cannot be used any more.
    Stop,
}

impl Backoff {
    fn new(what: &'static str) -> Backoff {
        Backoff {
            what,
            sleep: None,
            starved: false,
        }
    }

    /// Ready when accepting may go on.
    fn poll_wait(&mut self, cx: &mut Context<'_>) -> Poll<()> {
        if let Some(sleep) = &mut self.sleep {
            ready!(sleep.as_mut().poll(cx));
            self.sleep = None;
        }
        Poll::Ready(())
    }

    fn accepted(&mut self) {
        if self.starved {
            self.starved = false;
            tracing::info!("{}: accepting connections again", self.what);
        }
    }

    fn failed(&mut self, err: &io::Error) -> AfterFailure {
        match AcceptFailure::of(err) {
            AcceptFailure::Connection => {
                tracing::debug!("{}: accept failed for one connection: {err}", self.what);
            }
            AcceptFailure::Resources => {
                if !self.starved {
                    self.starved = true;
                    tracing::warn!(
                        "{}: accept failed: {err}; retrying every {} ms",
                        self.what,
                        ACCEPT_BACKOFF.as_millis()
                    );
                }
                self.sleep = Some(Box::pin(tokio::time::sleep(ACCEPT_BACKOFF)));
            }
            AcceptFailure::Listener => {
                tracing::error!(
                    "{}: the listener failed: {err}; no longer accepting",
                    self.what
                );
                return AfterFailure::Stop;
            }
        }
        AfterFailure::Retry
    }
}

/// The TCP API's accept loop: admitted connections come out, refused ones are closed and
/// counted.
pub struct TcpIncoming {
    listener: TcpListener,
    connections: Arc<Connections>,
    backoff: Backoff,
}

impl Stream for TcpIncoming {
    type Item = io::Result<AdmittedStream>;

    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let this = self.get_mut();
        for _ in 0..REFUSALS_PER_POLL {
            ready!(this.backoff.poll_wait(cx));
            match ready!(this.listener.poll_accept(cx)) {
                Ok((stream, peer)) => {
                    this.backoff.accepted();
                    if let Some(admitted) = this.connections.admit(stream, peer) {
                        return Poll::Ready(Some(Ok(admitted)));
                    }
                }
                Err(err) => match this.backoff.failed(&err) {
                    AfterFailure::Retry => {}
                    AfterFailure::Stop => return Poll::Ready(None),
                },
            }
        }
        // Many refusals in a row: let the runtime's other tasks run, then carry on.
        cx.waker().wake_by_ref();
        Poll::Pending
    }
}

/// The Unix socket's accept loop: every connection is admitted (the socket is root's), but a
/// shortage of descriptors makes it wait instead of spinning.
pub struct UnixIncoming {
    listener: UnixListener,
    backoff: Backoff,
}

impl UnixIncoming {
    pub fn new(listener: UnixListener) -> UnixIncoming {
        UnixIncoming {
            listener,
            backoff: Backoff::new("API (Unix socket)"),
        }
    }
}

impl Stream for UnixIncoming {
    type Item = io::Result<UnixStream>;

    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let this = self.get_mut();
        loop {
            ready!(this.backoff.poll_wait(cx));
            match ready!(this.listener.poll_accept(cx)) {
                Ok((stream, _)) => {
                    this.backoff.accepted();
                    return Poll::Ready(Some(Ok(stream)));
                }
                Err(err) => match this.backoff.failed(&err) {
                    AfterFailure::Retry => {}
                    AfterFailure::Stop => return Poll::Ready(None),
                },
            }
        }
    }
}

/// An admitted TCP connection: its place under the caps, and its deadline, checked whenever
/// hyper reads or writes (hyper always has a read pending on a connection, so the deadline's
/// timer wakes it).
pub struct AdmittedStream {
    stream: TcpStream,
    peer: SocketAddr,
    local: Option<SocketAddr>,
    activity: Arc<Activity>,
    deadline: Pin<Box<Sleep>>,
    /// Set once the deadline closed the connection: every read and write fails from then on.
    expired: Option<Expiry>,
    connections: Arc<Connections>,
    _open: OpenConnection,
}

impl AdmittedStream {
    /// Fails once the connection's deadline has passed; else arms the timer for the next check.
    fn poll_deadline(&mut self, cx: &mut Context<'_>) -> io::Result<()> {
        if let Some(expiry) = self.expired {
            return Err(expiry.error());
        }
        // The waker first, then the state: a displacement after the check finds the waker.
        if self.activity.state() == UNAUTHENTICATED {
            let mut waker = lock(&self.activity.waker);
            if !waker.as_ref().is_some_and(|w| w.will_wake(cx.waker())) {
                *waker = Some(cx.waker().clone());
            }
        }
        if self.activity.state() == DISPLACED {
            self.expired = Some(Expiry::Displaced);
            tracing::debug!(peer = %self.peer, "API: connection displaced");
            return Err(Expiry::Displaced.error());
        }
        while self.deadline.as_mut().poll(cx).is_ready() {
            match self
                .activity
                .check(Instant::now(), &self.connections.limits)
            {
                // Strictly later than now, so the next poll of the timer registers it.
                Ok(next) => self.deadline.as_mut().reset(next),
                Err(expiry) => {
                    self.expired = Some(expiry);
                    let counters = &self.connections.counters;
                    match expiry {
                        Expiry::Unauthenticated => {
                            counters.timed_out_unauthenticated.inc();
                        }
                        Expiry::Idle => {
                            counters.timed_out_idle.inc();
                        }
                        // Set above, never by the deadline.
                        Expiry::Displaced => {}
                    }
                    tracing::debug!(peer = %self.peer, ?expiry, "API: connection closed");
                    return Err(expiry.error());
                }
            }
        }
        Ok(())
    }
}

impl Drop for AdmittedStream {
    fn drop(&mut self) {
        let key = (self.local, self.peer);
        let mut by_conn = self.connections.by_conn();
        if by_conn
            .get(&key)
            .is_some_and(|a| Arc::ptr_eq(a, &self.activity))
        {
            by_conn.remove(&key);
        }
    }
}

impl AsyncRead for AdmittedStream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        this.poll_deadline(cx)?;
        Pin::new(&mut this.stream).poll_read(cx, buf)
    }
}

impl AsyncWrite for AdmittedStream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        this.poll_deadline(cx)?;
        Pin::new(&mut this.stream).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        this.poll_deadline(cx)?;
        Pin::new(&mut this.stream).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.stream.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().stream).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().stream).poll_shutdown(cx)
    }
}

impl Connected for AdmittedStream {
    /// tonic's own TCP type, so that `Request::remote_addr` and, over TLS, `peer_certs` work
    /// as with tonic's listener.
    type ConnectInfo = TcpConnectInfo;

    fn connect_info(&self) -> TcpConnectInfo {
        TcpConnectInfo {
            local_addr: self.local,
            remote_addr: Some(self.peer),
        }
    }
}

/// Marks the calls that reach it as activity of their connection (see the module docs). Place it
/// inside authentication: calls it sees keep a connection open.
#[derive(Clone)]
pub struct ActivityLayer(Arc<Connections>);

impl ActivityLayer {
    pub fn new(connections: Arc<Connections>) -> ActivityLayer {
        ActivityLayer(connections)
    }
}

impl<S> Layer<S> for ActivityLayer {
    type Service = Active<S>;

    fn layer(&self, inner: S) -> Active<S> {
        Active {
            inner,
            connections: Arc::clone(&self.0),
        }
    }
}

/// The service [`ActivityLayer`] wraps around the routes.
#[derive(Clone)]
pub struct Active<S> {
    inner: S,
    connections: Arc<Connections>,
}

/// The connection a request came on (local and peer address), as tonic records it.
fn conn<B>(request: &Request<B>) -> Option<ConnKey> {
    let extensions = request.extensions();
    let info = extensions.get::<TcpConnectInfo>().or_else(|| {
        extensions
            .get::<TlsConnectInfo<TcpConnectInfo>>()
            .map(TlsConnectInfo::get_ref)
    })?;
    Some((info.local_addr(), info.remote_addr()?))
}

impl<S, ReqBody, ResBody> Service<Request<ReqBody>> for Active<S>
where
    S: Service<Request<ReqBody>, Response = Response<ResBody>>,
{
    type Response = Response<ActiveBody<ResBody>>;
    type Error = S::Error;
    type Future = ActiveFuture<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: Request<ReqBody>) -> Self::Future {
        let in_flight = conn(&request)
            .and_then(|conn| self.connections.activity(conn))
            .map(|activity| activity.begin(Instant::now()));
        ActiveFuture {
            call: self.inner.call(request),
            in_flight,
        }
    }
}

pin_project_lite::pin_project! {
    /// The inner service's answer; the call stays in flight in its body.
    pub struct ActiveFuture<F> {
        #[pin]
        call: F,
        in_flight: Option<InFlight>,
    }
}

impl<F, B, E> Future for ActiveFuture<F>
where
    F: Future<Output = Result<Response<B>, E>>,
{
    type Output = Result<Response<ActiveBody<B>>, E>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        let response = ready!(this.call.poll(cx))?;
        let in_flight = this.in_flight.take();
        Poll::Ready(Ok(response.map(|inner| ActiveBody {
            inner,
            _in_flight: in_flight,
        })))
    }
}

/// A response body that keeps its call in flight until it is done or dropped.
pub struct ActiveBody<B> {
    inner: B,
    _in_flight: Option<InFlight>,
}

/// An empty body with no call in flight (what the access layer answers a refused call with).
impl<B: Default> Default for ActiveBody<B> {
    fn default() -> Self {
        ActiveBody {
            inner: B::default(),
            _in_flight: None,
        }
    }
}

impl<B: Body + Unpin> Body for ActiveBody<B> {
    type Data = B::Data;
    type Error = B::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<B::Data>, B::Error>>> {
        Pin::new(&mut self.inner).poll_frame(cx)
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
    use super::*;

    fn limits() -> ConnectionLimits {
        ConnectionLimits {
            caps: Caps {
                total: 4,
                per_source: 2,
            },
            auth_timeout: Duration::from_secs(10),
            idle_timeout: Duration::from_secs(60),
        }
    }

    /// A connection's activity, opened at `opened`, holding a place of its own.
    fn activity_at(opened: Instant) -> Activity {
        let slot = Admission::new(limits().caps)
            .admit("192.0.2.1".parse().unwrap())
            .unwrap();
        Activity::new(opened, slot)
    }

    #[test]
    fn a_connection_without_a_call_expires_after_the_auth_timeout() {
        let opened = Instant::now();
        let activity = activity_at(opened);
        let limits = limits();
        assert_eq!(
            activity.check(opened, &limits),
            Ok(opened + limits.auth_timeout)
        );
        assert_eq!(
            activity.check(opened + Duration::from_millis(9_999), &limits),
            Ok(opened + limits.auth_timeout)
        );
        assert_eq!(
            activity.check(opened + limits.auth_timeout, &limits),
            Err(Expiry::Unauthenticated)
        );
    }

    #[test]
    fn a_call_in_flight_keeps_the_connection_and_its_end_starts_the_idle_timeout() {
        let opened = Instant::now();
        let activity = Arc::new(activity_at(opened));
        let limits = limits();
        let call = activity.begin(opened);
        // Long past both timeouts, the call is still in flight: checked again an idle timeout on.
        let late = opened + Duration::from_secs(1000);
        assert_eq!(
            activity.check(late, &limits),
            Ok(late + limits.idle_timeout)
        );
        drop(call);
        // The end was touched now (real time), not at `late`: the idle timeout runs from it.
        let ended = Instant::now();
        match activity.check(ended, &limits) {
            Ok(deadline) => assert!(
                deadline >= ended + limits.idle_timeout - Duration::from_millis(5)
                    && deadline <= ended + limits.idle_timeout + Duration::from_millis(1),
                "{:?}",
                deadline - ended
            ),
            Err(e) => panic!("{e:?}"),
        }
        assert_eq!(
            activity.check(
                ended + limits.idle_timeout + Duration::from_secs(1),
                &limits
            ),
            Err(Expiry::Idle)
        );
    }

    #[test]
    fn an_authenticated_connection_is_not_held_to_the_auth_timeout() {
        let opened = Instant::now();
        let activity = Arc::new(activity_at(opened));
        let limits = limits();
        drop(activity.begin(opened + Duration::from_secs(1)));
        // 11 s after opening: past the auth timeout, inside the idle one.
        assert!(
            activity
                .check(opened + Duration::from_secs(11), &limits)
                .is_ok()
        );
    }
}
