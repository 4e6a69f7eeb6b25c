//! The HTTP side of `GET /metrics`: a bare hyper 1 HTTP/1.1 server rather than a framework: one
//! route, no body to read, and hyper is already in the build through tonic. It is meant for a
//! scraper on a trusted network, but it bounds what a flood of connections can cost the agent: at
//! most [`Caps::total`] connections at once and [`Caps::per_source`] from one source address
//! (more are closed at once and counted), each closed when it does not send a complete request
//! head in time (also between keep-alive requests) and recycled after a maximum age.

use std::{
    convert::Infallible, future::Future, io, net::SocketAddr, pin::pin, sync::Arc, time::Duration,
};

use http_body_util::Full;
use hyper::{
    Method, Request, Response, StatusCode,
    body::{Bytes, Incoming},
    header::{ALLOW, CONTENT_TYPE, HeaderValue},
    server::conn::http1,
    service::service_fn,
};
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::{
    net::{TcpListener, TcpStream},
    sync::watch,
    task::{JoinError, JoinSet},
};

use super::{EXPOSITION_CONTENT_TYPE, Exporter, ListenerCounters, OpenConnection};
use crate::admission::{ACCEPT_BACKOFF, AcceptFailure, Admission, Caps, Slot};

/// The only path served.
pub const METRICS_PATH: &str = "/metrics";

/// `Content-Type` of the error answers (404, 405, 503): a sentence for a human.
const ERROR_CONTENT_TYPE: &str = "text/plain; charset=utf-8";

/// Default `--metrics-max-connections`: a scraper needs one; 64 leaves room for several
/// Prometheus replicas and a human with curl.
pub const DEFAULT_MAX_CONNECTIONS: usize = 64;
/// Default `--metrics-max-connections-per-address`.
pub const DEFAULT_MAX_CONNECTIONS_PER_ADDRESS: usize = 8;

/// Bounds on what the server's clients can cost the agent.
#[derive(Clone, Copy, Debug)]
struct Bounds {
    /// Connections served at once, in total and per source. Beyond them a connection is
    /// accepted and closed at once, and counted, so a flood costs a descriptor for an instant
    /// rather than a task, memory, or a place in the accept queue legitimate scrapers need.
    caps: Caps,
    /// Time a connection has to send a complete request head, counted from its opening and
    /// again from the end of each response, so idle keep-alive connections are closed too.
    /// A slow-loris holds a slot at most this long; a scraper whose interval is longer simply
    /// reconnects (one handshake per scrape, nothing lost).
    header_read_timeout: Duration,
    /// A connection this old is asked to close after the request in flight (graceful
    /// shutdown). This bounds what the header timeout does not: a client that trickles a
    /// request body hyper drains, or that keeps sending requests just within the timeout.
    max_connection_age: Duration,
    /// How long a connection asked to close (by age or by the server's shutdown) may take to
    /// finish its request in flight before it is dropped.
    shutdown_grace: Duration,
}

impl Bounds {
    /// The limits `serve` runs with, but for the caps.
    fn agent(caps: Caps) -> Bounds {
        Bounds {
            caps,
            header_read_timeout: Duration::from_secs(10),
            max_connection_age: Duration::from_secs(300),
            shutdown_grace: Duration::from_secs(5),
        }
    }
}

/// Largest buffer hyper keeps per connection. Its default (~400 KiB) is sized for large
/// requests; a scrape request is a few hundred bytes, and 16 KiB (hyper's minimum is 8 KiB)
/// keeps 64 connections under 1 MiB of buffers. A longer request head gets 431.
const MAX_CONNECTION_BUFFER: usize = 16 * 1024;

/// Serves `GET /metrics` on `listener` until `shutdown` resolves.
///
/// Each scrape runs [`Exporter::scrape`], which reads BPF maps (blocking system calls, a few ms
/// at most), on tokio's blocking pool (`spawn_blocking`), never on a runtime worker that also
/// serves the agent's API. If reading fails the scrape gets 503 with the error text, and nothing
/// partial: a scrape with half its series missing would read as counter resets.
///
/// Answers: 200 with the exposition on `GET /metrics` (any query string ignored), 404 on any
/// other path, 405 (with `Allow: GET`) on another method to `/metrics`.
///
/// HTTP/1.1 via hyper, each connection in its own task: at most `caps` connections at once
/// (more are closed at once and counted in `counters`), 10 s to send a request head,
/// connections recycled after 5 minutes. When `shutdown` resolves the listener is closed at once, connections finish the
/// request in flight (up to 5 s) and are closed, and `serve` returns `Ok(())`.
///
/// Failures of `accept` that concern one connection, or a shortage of descriptors or memory,
/// are logged and the server carries on; an error that means the listening socket itself is
/// unusable is returned.
pub async fn serve(
    listener: TcpListener,
    exporter: Arc<Exporter>,
    caps: Caps,
    counters: ListenerCounters,
    shutdown: impl Future<Output = ()>,
) -> io::Result<()> {
    serve_with(
        Bounds::agent(caps),
        listener,
        Arc::new(Endpoint { exporter }),
        counters,
        shutdown,
    )
    .await
}

/// What a request needs: the exporter that writes the document.
struct Endpoint {
    exporter: Arc<Exporter>,
}

impl Endpoint {
    /// Answers one request. Never fails: every outcome is an HTTP response.
    async fn respond(self: Arc<Self>, request: Request<Incoming>) -> Response<Full<Bytes>> {
        if request.uri().path() != METRICS_PATH {
            return plain(
                StatusCode::NOT_FOUND,
                "not found: metrics are at /metrics\n",
            );
        }
        if request.method() != Method::GET {
            let mut response = plain(
                StatusCode::METHOD_NOT_ALLOWED,
                "method not allowed: /metrics answers GET\n",
            );
            response
                .headers_mut()
                .insert(ALLOW, HeaderValue::from_static("GET"));
            return response;
        }
        let exporter = Arc::clone(&self.exporter);
        match tokio::task::spawn_blocking(move || exporter.scrape()).await {
            Ok(Ok(body)) => respond_with(StatusCode::OK, EXPOSITION_CONTENT_TYPE, body),
            Ok(Err(err)) => {
                tracing::warn!("metrics scrape: reading the maps failed: {err:#}");
                plain(
                    StatusCode::SERVICE_UNAVAILABLE,
                    format!("reading the limiter's maps failed: {err:#}\n"),
                )
            }
            // A panic in the kernel source: the task cannot have been cancelled, nothing
            // aborts it.
            Err(err) => {
                tracing::error!("metrics scrape: reading the maps panicked: {err}");
                plain(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    "reading the limiter's maps panicked; see the agent's log\n",
                )
            }
        }
    }
}

/// A `text/plain` answer for a human.
fn plain(status: StatusCode, body: impl Into<Bytes>) -> Response<Full<Bytes>> {
    respond_with(status, ERROR_CONTENT_TYPE, body)
}

fn respond_with(
    status: StatusCode,
    content_type: &'static str,
    body: impl Into<Bytes>,
) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(body.into()));
    *response.status_mut() = status;
    response
        .headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static(content_type));
    response
}

/// [`serve`] with explicit limits (tests use small ones).
async fn serve_with(
    limits: Bounds,
    listener: TcpListener,
    endpoint: Arc<Endpoint>,
    counters: ListenerCounters,
    shutdown: impl Future<Output = ()>,
) -> io::Result<()> {
    let admission = Admission::new(limits.caps);
    let mut http = http1::Builder::new();
    http.timer(TokioTimer::new())
        .header_read_timeout(limits.header_read_timeout)
        .max_buf_size(MAX_CONNECTION_BUFFER);
    // Tells every connection task the server is stopping; `true` once stopping.
    let (stop_tx, stop_rx) = watch::channel(false);
    let mut connections = JoinSet::new();
    let mut shutdown = pin!(shutdown);

    let result = loop {
        // `biased`: shutdown first, then reaping finished connections before accepting.
        let accepted = tokio::select! {
            biased;
            () = &mut shutdown => break Ok(()),
            Some(done) = connections.join_next() => {
                report_connection_task(done);
                continue;
            }
            accepted = listener.accept() => accepted,
        };
        match accepted {
            Ok((stream, peer)) => match admission.admit(peer.ip()) {
                Ok(slot) => {
                    let held = Held {
                        _slot: slot,
                        _open: counters.opened(),
                    };
                    connections.spawn(connection(
                        http.clone(),
                        stream,
                        peer,
                        Arc::clone(&endpoint),
                        stop_rx.clone(),
                        limits,
                        held,
                    ));
                }
                Err(why) => {
                    counters.refused(why);
                    tracing::debug!(%peer, reason = why.label(), "metrics: connection refused");
                    // Dropping the stream closes it.
                    drop(stream);
                }
            },
            Err(err) => match AcceptFailure::of(&err) {
                AcceptFailure::Connection => {
                    tracing::debug!("metrics: accept failed for one connection: {err}");
                }
                AcceptFailure::Resources => {
                    tracing::warn!(
                        "metrics: accept failed: {err}; retrying in {} ms",
                        ACCEPT_BACKOFF.as_millis()
                    );
                    tokio::select! {
                        biased;
                        () = &mut shutdown => break Ok(()),
                        () = tokio::time::sleep(ACCEPT_BACKOFF) => {}
                    }
                }
                AcceptFailure::Listener => break Err(err),
            },
        }
    };

    // Stop accepting (connections still queued in the kernel are reset), then let the open
    // ones finish what they are doing.
    drop(listener);
    stop_tx.send_replace(true);
    let drained = tokio::time::timeout(limits.shutdown_grace, async {
        while let Some(done) = connections.join_next().await {
            report_connection_task(done);
        }
    })
    .await;
    if drained.is_err() {
        tracing::debug!(
            "metrics: dropping {} connections still open after shutdown",
            connections.len()
        );
    }
    // Aborts whatever is left and waits for the tasks to end.
    connections.shutdown().await;
    result
}

/// Logs a connection task that ended abnormally (a panic in hyper or in `respond`).
fn report_connection_task(done: Result<(), JoinError>) {
    if let Err(err) = done
        && err.is_panic()
    {
        tracing::error!("metrics: a connection task panicked: {err}");
    }
}

/// What an admitted connection holds until it ends: its place under the caps, and its count
/// in `limiter_connections_open`.
struct Held {
    _slot: Slot,
    _open: OpenConnection,
}

/// Serves one connection until it closes, fails, outlives `limits.max_connection_age`, or the
/// server stops; in the last two cases it gets `limits.shutdown_grace` to finish the request in
/// flight. Errors are the client's business (a reset, a timeout, garbage) and only logged at
/// debug level.
async fn connection(
    http: http1::Builder,
    stream: TcpStream,
    peer: SocketAddr,
    endpoint: Arc<Endpoint>,
    mut stop: watch::Receiver<bool>,
    limits: Bounds,
    _held: Held,
) {
    let service = service_fn(move |request| {
        let endpoint = Arc::clone(&endpoint);
        async move { Ok::<_, Infallible>(endpoint.respond(request).await) }
    });
    let mut conn = pin!(http.serve_connection(TokioIo::new(stream), service));
    let finished = tokio::select! {
        result = conn.as_mut() => Some(result),
        // An error means the sender is gone, which also means the server is stopping.
        _ = stop.wait_for(|&stopping| stopping) => None,
        () = tokio::time::sleep(limits.max_connection_age) => None,
    };
    let result = match finished {
        Some(result) => result,
        None => {
            conn.as_mut().graceful_shutdown();
            match tokio::time::timeout(limits.shutdown_grace, conn).await {
                Ok(result) => result,
                Err(_) => {
                    tracing::debug!(%peer, "metrics: connection did not close in time; dropped");
                    return;
                }
            }
        }
    };
    if let Err(err) = result {
        tracing::debug!(%peer, "metrics: connection ended: {err}");
    }
}

#[cfg(test)]
mod tests {
    use std::sync::{
        Mutex,
        atomic::{AtomicUsize, Ordering},
        mpsc,
    };

    use anyhow::anyhow;
    use tokio::{
        io::{AsyncReadExt, AsyncWriteExt},
        sync::oneshot,
        task::JoinHandle,
    };

    use super::*;
    use crate::metrics::{
        Counters, Figures,
        tests::{FnSource, populated, render},
    };

    /// Bound on any one network step in these tests, so that a bug shows as a failure rather
    /// than a hung test run. Never reached when things work; nothing is timed against it.
    const HANG_GUARD: Duration = Duration::from_secs(30);

    async fn guarded<T>(what: &str, future: impl Future<Output = T>) -> T {
        tokio::time::timeout(HANG_GUARD, future)
            .await
            .unwrap_or_else(|_| panic!("{what}: no progress in {HANG_GUARD:?}"))
    }

    /// A server under test: its address, the handle of `serve`, and the trigger of its
    /// shutdown.
    struct Server {
        addr: SocketAddr,
        task: JoinHandle<io::Result<()>>,
        stop: oneshot::Sender<()>,
    }

    impl Server {
        async fn start<F>(limits: Bounds, counters: Arc<Counters>, figures: F) -> Server
        where
            F: Fn() -> anyhow::Result<Figures> + Send + Sync + 'static,
        {
            let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
            let addr = listener.local_addr().unwrap();
            let (stop, stopped) = oneshot::channel::<()>();
            let exporter = Arc::new(Exporter::new("eth0", &counters, FnSource(figures)));
            let endpoint = Arc::new(Endpoint { exporter });
            let task = tokio::spawn(serve_with(
                limits,
                listener,
                endpoint,
                counters.metrics_connections.clone(),
                async {
                    // A dropped sender stops the server too.
                    let _ = stopped.await;
                },
            ));
            Server { addr, task, stop }
        }

        async fn stop(self) {
            self.stop.send(()).unwrap();
            guarded("serve returns after shutdown", self.task)
                .await
                .unwrap()
                .unwrap();
        }
    }

    /// One parsed HTTP/1.1 response.
    #[derive(Debug)]
    struct Reply {
        status: u16,
        headers: Vec<(String, String)>,
        body: String,
    }

    impl Reply {
        fn header(&self, name: &str) -> Option<&str> {
            self.headers
                .iter()
                .find(|(key, _)| key.eq_ignore_ascii_case(name))
                .map(|(_, value)| value.as_str())
        }
    }

    /// Parses the head of a response and takes `Content-Length` bytes of body from `raw` (none
    /// for the answer to `HEAD`, whose `Content-Length` is that of the body a `GET` would get);
    /// `None` while `raw` does not hold all of it yet.
    fn parse_reply(raw: &[u8], head_request: bool) -> Option<(Reply, usize)> {
        let head_end = raw.windows(4).position(|window| window == b"\r\n\r\n")?;
        let head = std::str::from_utf8(&raw[..head_end]).expect("response head is text");
        let mut lines = head.split("\r\n");
        let status_line = lines.next().unwrap();
        let mut parts = status_line.splitn(3, ' ');
        assert_eq!(parts.next(), Some("HTTP/1.1"), "{status_line}");
        let status = parts.next().unwrap().parse().unwrap();
        let headers: Vec<(String, String)> = lines
            .map(|line| {
                let (name, value) = line.split_once(':').expect("header line");
                (name.trim().to_owned(), value.trim().to_owned())
            })
            .collect();
        let length: usize = if head_request {
            0
        } else {
            headers
                .iter()
                .find(|(name, _)| name.eq_ignore_ascii_case("content-length"))
                .expect("content-length")
                .1
                .parse()
                .unwrap()
        };
        let body_start = head_end + 4;
        let body = raw.get(body_start..body_start + length)?;
        let body = String::from_utf8(body.to_vec()).expect("body is UTF-8");
        Some((
            Reply {
                status,
                headers,
                body,
            },
            body_start + length,
        ))
    }

    /// Reads one response from a connection kept open.
    async fn read_reply(stream: &mut TcpStream) -> Reply {
        let mut raw = Vec::new();
        let mut buf = [0u8; 4096];
        loop {
            if let Some((reply, used)) = parse_reply(&raw, false) {
                assert_eq!(used, raw.len(), "nothing after the response");
                return reply;
            }
            let read = stream.read(&mut buf).await.unwrap();
            assert_ne!(read, 0, "connection closed mid-response: {raw:?}");
            raw.extend_from_slice(&buf[..read]);
        }
    }

    /// Sends one request with `Connection: close` and reads the answer to the end.
    async fn request(addr: SocketAddr, method: &str, path: &str) -> Reply {
        guarded("request", async {
            let mut stream = TcpStream::connect(addr).await.unwrap();
            let request =
                format!("{method} {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n");
            stream.write_all(request.as_bytes()).await.unwrap();
            let mut raw = Vec::new();
            stream.read_to_end(&mut raw).await.unwrap();
            let (reply, used) = parse_reply(&raw, method == "HEAD").expect("a complete response");
            assert_eq!(used, raw.len(), "nothing after the response");
            reply
        })
        .await
    }

    /// Reads until the server closes the connection; returns what came before.
    async fn read_until_closed(stream: &mut TcpStream) -> Vec<u8> {
        let mut raw = Vec::new();
        guarded("the server closes the connection", async {
            // A reset is also a close.
            let _ = stream.read_to_end(&mut raw).await;
        })
        .await;
        raw
    }

    fn test_limits() -> Bounds {
        Bounds {
            caps: Caps {
                total: 8,
                per_source: 8,
            },
            // Far longer than the hang guard: a test that means neither to happen fails on the
            // guard rather than passing late through the other.
            header_read_timeout: HANG_GUARD * 10,
            max_connection_age: HANG_GUARD * 10,
            shutdown_grace: Duration::from_secs(5),
        }
    }

    #[tokio::test]
    async fn serves_metrics_404_and_405() {
        let (counters, figures) = populated();
        let counters = Arc::new(counters);
        let scrapes = Arc::new(AtomicUsize::new(0));
        let calls = Arc::clone(&scrapes);
        let server = Server::start(test_limits(), Arc::clone(&counters), move || {
            calls.fetch_add(1, Ordering::Relaxed);
            Ok(figures)
        })
        .await;

        let ok = request(server.addr, "GET", "/metrics").await;
        assert_eq!(ok.status, 200);
        assert_eq!(ok.header("content-type"), Some(EXPOSITION_CONTENT_TYPE));
        // The scrape's own connection is open while it is answered: one more than `populated`.
        let open = "\nlimiter_connections_open{iface=\"eth0\",listener=\"metrics\"} ";
        assert_eq!(
            ok.body,
            render(&counters, &figures, "eth0")
                .replace(&format!("{open}1\n"), &format!("{open}2\n"))
        );
        assert!(
            ok.body
                .contains("\nlimiter_packets_passed_total{iface=\"eth0\"} 1000000\n")
        );

        // A query string does not change the route (Prometheus may add parameters).
        let query = request(server.addr, "GET", "/metrics?name[]=x").await;
        assert_eq!(query.status, 200);

        // Counters are read at each scrape.
        counters.check(false);
        let later = request(server.addr, "GET", "/metrics").await;
        assert!(
            later
                .body
                .contains("\nlimiter_checks_total{iface=\"eth0\",result=\"denied\"} 2\n")
        );

        for path in ["/", "/metrics/", "/metricsx", "/other"] {
            let missing = request(server.addr, "GET", path).await;
            assert_eq!(missing.status, 404, "{path}");
            assert_eq!(missing.header("content-type"), Some(ERROR_CONTENT_TYPE));
        }
        for method in ["POST", "PUT", "DELETE", "HEAD"] {
            let wrong = request(server.addr, method, "/metrics").await;
            assert_eq!(wrong.status, 405, "{method}");
            assert_eq!(wrong.header("allow"), Some("GET"), "{method}");
        }
        // Only the three GETs of /metrics read the maps.
        assert_eq!(scrapes.load(Ordering::Relaxed), 3);

        // Keep-alive: several scrapes on one connection.
        let mut stream = TcpStream::connect(server.addr).await.unwrap();
        for _ in 0..3 {
            stream
                .write_all(b"GET /metrics HTTP/1.1\r\nHost: localhost\r\n\r\n")
                .await
                .unwrap();
            let reply = guarded("keep-alive scrape", read_reply(&mut stream)).await;
            assert_eq!(reply.status, 200);
        }
        drop(stream);

        server.stop().await;
    }

    #[tokio::test]
    async fn failing_figures_answer_503_with_the_error() {
        let server = Server::start(test_limits(), Arc::new(Counters::default()), || {
            Err(anyhow!("map STATS: permission denied").context("reading pinned maps"))
        })
        .await;
        let reply = request(server.addr, "GET", "/metrics").await;
        assert_eq!(reply.status, 503);
        assert_eq!(reply.header("content-type"), Some(ERROR_CONTENT_TYPE));
        assert!(
            reply
                .body
                .contains("reading pinned maps: map STATS: permission denied"),
            "{}",
            reply.body
        );
        assert!(!reply.body.contains("limiter_"), "nothing partial");
        server.stop().await;
    }

    #[tokio::test]
    async fn panicking_figures_answer_500_and_the_server_carries_on() {
        let calls = AtomicUsize::new(0);
        let server = Server::start(test_limits(), Arc::new(Counters::default()), move || {
            if calls.fetch_add(1, Ordering::Relaxed) == 0 {
                panic!("first scrape panics");
            }
            Ok(Figures::default())
        })
        .await;
        let first = request(server.addr, "GET", "/metrics").await;
        assert_eq!(first.status, 500);
        assert!(!first.body.contains("limiter_"));
        let second = request(server.addr, "GET", "/metrics").await;
        assert_eq!(second.status, 200);
        server.stop().await;
    }

    #[tokio::test]
    async fn shutdown_stops_accepting_and_closes_idle_connections() {
        let server = Server::start(test_limits(), Arc::new(Counters::default()), || {
            Ok(Figures::default())
        })
        .await;
        let addr = server.addr;
        // One connection idle before its first request, one idle after a keep-alive request.
        let mut fresh = TcpStream::connect(addr).await.unwrap();
        let mut used = TcpStream::connect(addr).await.unwrap();
        used.write_all(b"GET /metrics HTTP/1.1\r\nHost: localhost\r\n\r\n")
            .await
            .unwrap();
        assert_eq!(guarded("scrape", read_reply(&mut used)).await.status, 200);

        server.stop().await;
        assert!(read_until_closed(&mut fresh).await.is_empty());
        assert!(read_until_closed(&mut used).await.is_empty());
        let refused = TcpStream::connect(addr).await;
        assert_eq!(
            refused.unwrap_err().kind(),
            io::ErrorKind::ConnectionRefused
        );
    }

    #[tokio::test]
    async fn shutdown_lets_the_request_in_flight_finish() {
        let (entered_tx, mut entered) = tokio::sync::mpsc::unbounded_channel();
        let (release, released) = mpsc::channel::<()>();
        let released = Mutex::new(released);
        let server = Server::start(test_limits(), Arc::new(Counters::default()), move || {
            entered_tx.send(()).unwrap();
            released.lock().unwrap().recv().unwrap();
            Ok(Figures::default())
        })
        .await;
        let Server { addr, task, stop } = server;
        let scrape = tokio::spawn(request(addr, "GET", "/metrics"));
        guarded("scrape reaches figures", entered.recv())
            .await
            .unwrap();
        stop.send(()).unwrap();
        // The listener closes first thing on shutdown: once a connection is refused, the
        // server is stopping while the scrape is still blocked in `figures`. (A probe accepted
        // before that is an idle connection, closed by the shutdown.)
        guarded("the listener closes", async {
            while TcpStream::connect(addr).await.is_ok() {
                tokio::task::yield_now().await;
            }
        })
        .await;
        release.send(()).unwrap();
        assert_eq!(scrape.await.unwrap().status, 200);
        guarded("serve returns after shutdown", task)
            .await
            .unwrap()
            .unwrap();
    }

    #[tokio::test]
    async fn header_read_timeout_closes_slow_and_idle_connections() {
        let limits = Bounds {
            header_read_timeout: Duration::from_millis(200),
            ..test_limits()
        };
        let server = Server::start(limits, Arc::new(Counters::default()), || {
            Ok(Figures::default())
        })
        .await;

        // Part of a request head, never finished.
        let mut slow = TcpStream::connect(server.addr).await.unwrap();
        slow.write_all(b"GET /metrics HTTP/1.1\r\nHost: local")
            .await
            .unwrap();
        let raw = read_until_closed(&mut slow).await;
        assert!(!raw.starts_with(b"HTTP/1.1 200"), "{raw:?}");

        // A keep-alive connection left idle after its request.
        let mut idle = TcpStream::connect(server.addr).await.unwrap();
        idle.write_all(b"GET /metrics HTTP/1.1\r\nHost: localhost\r\n\r\n")
            .await
            .unwrap();
        assert_eq!(guarded("scrape", read_reply(&mut idle)).await.status, 200);
        assert!(read_until_closed(&mut idle).await.is_empty());

        server.stop().await;
    }

    #[tokio::test]
    async fn max_connection_age_closes_keep_alive_connections() {
        let limits = Bounds {
            max_connection_age: Duration::from_millis(200),
            ..test_limits()
        };
        let server = Server::start(limits, Arc::new(Counters::default()), || {
            Ok(Figures::default())
        })
        .await;
        let mut stream = TcpStream::connect(server.addr).await.unwrap();
        stream
            .write_all(b"GET /metrics HTTP/1.1\r\nHost: localhost\r\n\r\n")
            .await
            .unwrap();
        assert_eq!(guarded("scrape", read_reply(&mut stream)).await.status, 200);
        // The header timeout is far away: only the age can close it.
        assert!(read_until_closed(&mut stream).await.is_empty());
        server.stop().await;
    }

    /// Connects from `source` (any 127.0.0.0/8 address reaches the server on loopback).
    async fn connect_from(source: [u8; 4], server: SocketAddr) -> TcpStream {
        let socket = tokio::net::TcpSocket::new_v4().unwrap();
        socket.bind(SocketAddr::from((source, 0))).unwrap();
        guarded("connect", socket.connect(server)).await.unwrap()
    }

    /// Connections over the per-address cap, then over the total cap, are closed at once without
    /// an answer and counted by reason; those admitted are served, and a closed one's place is
    /// taken by the next.
    #[tokio::test]
    async fn connections_over_the_caps_are_refused_and_counted() {
        let limits = Bounds {
            caps: Caps {
                total: 3,
                per_source: 2,
            },
            ..test_limits()
        };
        let counters = Arc::new(Counters::default());
        let server = Server::start(limits, Arc::clone(&counters), || Ok(Figures::default())).await;
        let (a, b) = ([127, 0, 0, 2], [127, 0, 0, 3]);
        let refusals = |c: &Counters| {
            (
                c.metrics_connections.refused_per_address.get(),
                c.metrics_connections.refused_total.get(),
            )
        };

        let mut held = vec![
            connect_from(a, server.addr).await,
            connect_from(a, server.addr).await,
        ];
        let mut third_from_a = connect_from(a, server.addr).await;
        assert!(read_until_closed(&mut third_from_a).await.is_empty());
        assert_eq!(refusals(&counters), (1, 0));
        held.push(connect_from(b, server.addr).await);
        let mut over_total = connect_from(b, server.addr).await;
        assert!(read_until_closed(&mut over_total).await.is_empty());
        assert_eq!(refusals(&counters), (1, 1));

        // The admitted ones are served.
        for stream in &mut held {
            stream
                .write_all(b"GET /metrics HTTP/1.1\r\nHost: localhost\r\n\r\n")
                .await
                .unwrap();
            assert_eq!(guarded("scrape", read_reply(stream)).await.status, 200);
        }
        assert_eq!(counters.metrics_connections.open.get(), 3);

        // One closes: its place is free again (once the server has seen the close).
        drop(held.pop());
        guarded("the server sees the close", async {
            while counters.metrics_connections.open.get() != 2 {
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        })
        .await;
        let reply = request(server.addr, "GET", "/metrics").await;
        assert_eq!(reply.status, 200);
        assert_eq!(refusals(&counters), (1, 1));
        drop(held);
        server.stop().await;
    }
}
