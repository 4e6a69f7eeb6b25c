//! Callers of the API and the metrics endpoint who mean harm, against a real `limiter agent`:
//! a flood of TCP connections that never authenticate, at the descriptor limit systemd gives
//! services (1024), must leave the Unix socket, config reloads and snapshots working; connections
//! over the caps are refused and counted; idle and unauthenticated connections are closed, calls
//! in flight are not; `Top` is bounded; a resident count copies no map.
//!
//! Root only; run one at a time (`cargo xtask test` passes `--test-threads=1`). The TCP API and
//! the metrics endpoint listen on 127.0.0.1 of the receiver namespace, which only that namespace
//! can reach; the flood comes from other 127.0.0.0/8 addresses of the same namespace.

use std::{
    fs,
    io::{ErrorKind, Read as _, Write as _},
    net::{Ipv4Addr, SocketAddr, TcpStream},
    os::unix::{fs::PermissionsExt as _, process::CommandExt as _},
    path::Path,
    time::{Duration, Instant, SystemTime},
};

use anyhow::{Context as _, Result, ensure};
use limiter_common::{ClientState, addr::v4_mapped, window::slot};
use limiter_tests::{
    agent::{Agent, run_limiter},
    fixture::{TempDir, wait_until},
    heap::{Counting, peak_heap},
    netns::TestNet,
    require_root,
};
use limiter_user::{
    cli::client::{self, Target},
    datapath::{self, LoadOptions, Tables, syscall},
    proto,
};
use tonic::Code;

/// The TCP API port, on 127.0.0.1 of the receiver namespace.
const API_PORT: u16 = 7443;
/// The metrics port, on 127.0.0.1 of the receiver namespace.
const METRICS_PORT: u16 = 9464;
/// A token the agent accepts (written to a mode 0600 file).
const TOKEN: &str = "hostile-callers-test-token-0123456789";

const CONFIG: &str = "\
default: { limit: 1000, window: 1h }
policies:
  - match: 10.0.0.0/8
    limit: 20
    window: 1h
";

// ---------------------------------------------------------------------------------------------
// Peak heap use, for the measurement of a map walk
// ---------------------------------------------------------------------------------------------

#[global_allocator]
static ALLOCATOR: Counting = Counting;

// ---------------------------------------------------------------------------------------------
// Helpers
// ---------------------------------------------------------------------------------------------

/// Writes `content` to `dir/name` with `mode`; returns the path.
fn write_mode(dir: &TempDir, name: &str, content: &str, mode: u32) -> Result<String> {
    let path = dir.join(name);
    fs::write(&path, content)?;
    fs::set_permissions(&path, fs::Permissions::from_mode(mode))?;
    Ok(path.to_string_lossy().into_owned())
}

/// Starts the agent with its Unix socket in `dir`, the TCP API (token) and the metrics endpoint
/// on 127.0.0.1 of the receiver namespace, `extra` arguments, and, with `nofile`, that soft and
/// hard limit on open descriptors (as a service manager would set it).
fn start_agent(
    net: &TestNet,
    dir: &TempDir,
    extra: &[&str],
    nofile: Option<u64>,
) -> Result<(Agent, String, String)> {
    let socket = dir.join("api.sock").to_string_lossy().into_owned();
    let token = write_mode(dir, "token", &format!("{TOKEN}\n"), 0o600)?;
    let listen = format!("127.0.0.1:{API_PORT}");
    let metrics = format!("127.0.0.1:{METRICS_PORT}");
    let mut args = vec![
        "--api-socket",
        &socket,
        "--api-listen",
        &listen,
        "--api-token-file",
        &token,
        "--metrics",
        &metrics,
    ];
    args.extend_from_slice(extra);
    let agent = Agent::spawn_adjusted(net, CONFIG, &args, |command| {
        if let Some(limit) = nofile {
            // SAFETY: setrlimit is async-signal-safe, and the closure touches nothing else.
            unsafe {
                command.pre_exec(move || {
                    let rlimit = libc::rlimit {
                        rlim_cur: limit,
                        rlim_max: limit,
                    };
                    if libc::setrlimit(libc::RLIMIT_NOFILE, &rlimit) != 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                    Ok(())
                });
            }
        }
    })?;
    agent.wait_ready(Duration::from_secs(15))?;
    Ok((agent, socket, token))
}

/// `GET /metrics` in the receiver namespace.
fn scrape(net: &TestNet) -> Result<String> {
    net.in_receiver(|| -> Result<String> {
        let mut stream = TcpStream::connect(("127.0.0.1", METRICS_PORT))?;
        stream.set_read_timeout(Some(Duration::from_secs(10)))?;
        stream.write_all(b"GET /metrics HTTP/1.0\r\nHost: localhost\r\n\r\n")?;
        let mut text = String::new();
        stream.read_to_string(&mut text)?;
        ensure!(text.starts_with("HTTP/1.0 200"), "{text}");
        Ok(text)
    })?
}

/// The value of the sample of `name` whose labels include every one of `labels`.
fn sample(text: &str, name: &str, labels: &[(&str, &str)]) -> Option<u64> {
    text.lines()
        .filter(|line| line.starts_with(&format!("{name}{{")))
        .find(|line| {
            labels
                .iter()
                .all(|(k, v)| line.contains(&format!("{k}=\"{v}\"")))
        })
        .and_then(|line| line.rsplit_once(' '))
        .and_then(|(_, value)| value.parse().ok())
}

/// The API's connection figures: (open, refused over the total cap, refused per address,
/// closed unauthenticated, closed idle, displaced).
fn api_connections(net: &TestNet) -> Result<(u64, u64, u64, u64, u64, u64)> {
    let text = scrape(net)?;
    let get = |name: &str, reason: Option<&str>| {
        let mut labels = vec![("listener", "api")];
        labels.extend(reason.map(|r| ("reason", r)));
        sample(&text, name, &labels).with_context(|| format!("{name} {reason:?} in:\n{text}"))
    };
    Ok((
        get("limiter_connections_open", None)?,
        get("limiter_connections_refused_total", Some("total"))?,
        get("limiter_connections_refused_total", Some("per_address"))?,
        get(
            "limiter_connections_timed_out_total",
            Some("unauthenticated"),
        )?,
        get("limiter_connections_timed_out_total", Some("idle"))?,
        sample(
            &text,
            "limiter_connections_displaced_total",
            &[("listener", "api")],
        )
        .with_context(|| format!("limiter_connections_displaced_total in:\n{text}"))?,
    ))
}

/// Raises this process's soft descriptor limit to its hard limit (the flood needs 1500).
fn raise_own_nofile() {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: plain syscalls on valid rlimit structs.
    unsafe {
        libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit);
        limit.rlim_cur = limit.rlim_max;
        libc::setrlimit(libc::RLIMIT_NOFILE, &limit);
    }
}

/// Opens `count` TCP connections to the API from `source` in the receiver namespace; none sends
/// anything.
fn connect_from(net: &TestNet, source: Ipv4Addr, count: usize) -> Result<Vec<TcpStream>> {
    net.in_receiver(|| -> Result<Vec<TcpStream>> {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        (0..count)
            .map(|_| {
                runtime.block_on(async {
                    let socket = tokio::net::TcpSocket::new_v4()?;
                    socket.bind(SocketAddr::from((source, 0)))?;
                    let stream = tokio::time::timeout(
                        Duration::from_secs(10),
                        socket.connect(SocketAddr::from(([127, 0, 0, 1], API_PORT))),
                    )
                    .await
                    .context("connect timed out")??;
                    Ok::<_, anyhow::Error>(stream.into_std()?)
                })
            })
            .collect()
    })?
}

/// Whether the server has closed `stream` (EOF or reset) within `timeout`. What it sends first
/// is read and dropped: over plain TCP the HTTP/2 server opens with its SETTINGS frame.
fn closed_by_server(stream: &mut TcpStream, timeout: Duration) -> Result<bool> {
    let deadline = Instant::now() + timeout;
    stream.set_nonblocking(false)?;
    let mut buf = [0u8; 256];
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Ok(false);
        }
        stream.set_read_timeout(Some(left))?;
        match stream.read(&mut buf) {
            Ok(0) => return Ok(true),
            Ok(_) => {}
            Err(e) if e.kind() == ErrorKind::ConnectionReset => return Ok(true),
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {
                return Ok(false);
            }
            Err(e) => return Err(e.into()),
        }
    }
}

fn block_on<T>(f: impl Future<Output = T>) -> Result<T> {
    Ok(tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?
        .block_on(f))
}

/// The snapshot file's modification time.
fn modified(path: &Path) -> Option<SystemTime> {
    fs::metadata(path).and_then(|m| m.modified()).ok()
}

// ---------------------------------------------------------------------------------------------
// Tests
// ---------------------------------------------------------------------------------------------

/// 1500 TCP connections that never authenticate, at 1024 descriptors: 25 from one address, the
/// rest spread 20 per address. The agent (caps 200 in total, 20 per address) holds exactly 200:
/// past the per-address cap a connection is refused; past the total cap each new one displaces
/// the oldest that has not authenticated; all counted. A caller with credentials connected
/// before the flood keeps its connection through it; a new one is served during it (it
/// displaces one of the flood's); the agent answers on its Unix socket, applies a config edit
/// and writes snapshots, with no descriptor shortage in its log. After the auth timeout every
/// connection it held is closed, and counted.
#[test]
fn an_unauthenticated_connection_flood_leaves_the_agent_working() -> Result<()> {
    require_root!();
    let net = TestNet::new()?;
    let dir = TempDir::new("hostile-flood")?;
    let auth_timeout = Duration::from_secs(8);
    let (agent, socket, token) = start_agent(
        &net,
        &dir,
        &[
            "--api-max-connections",
            "200",
            "--api-max-connections-per-address",
            "20",
            "--api-auth-timeout",
            "8s",
            "--snapshot-interval",
            "200ms",
        ],
        Some(1024),
    )?;
    let text = scrape(&net)?;
    assert_eq!(
        sample(&text, "limiter_open_files_limit", &[]),
        Some(1024),
        "the hard limit is 1024: nothing to raise"
    );
    assert!(
        agent.stderr().contains("open files: limit 1024"),
        "{}",
        agent.stderr()
    );
    raise_own_nofile();

    // A caller with credentials, connected before the flood: its connection must survive it.
    let url = format!("http://127.0.0.1:{API_PORT}");
    let (runtime, mut authed) = net.in_receiver(|| -> Result<_> {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        let clients = runtime.block_on(client::connect(&Target {
            api: Some(url.clone()),
            token_file: Some(token.clone().into()),
            ..Target::default()
        }))?;
        Ok((runtime, clients))
    })??;
    let list = || proto::ListLimitsRequest {};
    runtime.block_on(authed.limits.list(list()))?;

    let started = Instant::now();
    let mut streams = connect_from(&net, Ipv4Addr::new(127, 0, 0, 2), 25)?;
    let mut source = 3u8;
    while streams.len() < 1500 {
        let count = (1500 - streams.len()).min(20);
        streams.extend(connect_from(&net, Ipv4Addr::new(127, 0, 1, source), count)?);
        source += 1;
    }
    let (open, refused_total, refused_per_address, _, _, displaced) = wait_until(
        "the agent has accepted every connection",
        Duration::from_secs(10),
        || {
            let f = api_connections(&net)?;
            Ok((f.0 == 200 && f.0 + f.1 + f.2 + f.5 == 1501).then_some(f))
        },
    )?;
    eprintln!(
        "1500 connections in {:?}: {open} open, {refused_total} refused (total), \
         {refused_per_address} refused (per address), {displaced} displaced",
        started.elapsed()
    );
    assert_eq!(refused_per_address, 5, "the 21st to 25th from 127.0.0.2");
    // 199 of the flood's held beside the authenticated connection; each later one displaced
    // the oldest unauthenticated one.
    assert_eq!((refused_total, displaced), (0, 1500 - 5 - 199));
    // The authenticated connection was never displaced: a call on it works (a reconnect would
    // come from outside the namespace and fail) and displaces nothing.
    runtime.block_on(authed.limits.list(list()))?;
    assert_eq!(
        api_connections(&net)?.5,
        displaced,
        "nothing displaced by the call"
    );

    // A new TCP caller with credentials gets in while the flood holds the cap.
    let out = run_limiter(
        &agent.ns,
        &["limits", "--api", &url, "--token-file", &token, "ls"],
    )?;
    assert!(out.status.success(), "served under the flood: {out:?}");
    let (open, .., displaced) = api_connections(&net)?;
    assert_eq!(
        displaced,
        1500 - 5 - 199 + 1,
        "it displaced one of the flood's"
    );
    ensure!(open <= 200, "{open} open");
    ensure!(
        started.elapsed() < auth_timeout,
        "the flood took longer than the auth timeout: the checks below would see it closed"
    );

    // The Unix socket answers at once.
    let check_started = Instant::now();
    let out = run_limiter(&agent.ns, &["check", "10.1.2.3", "--api", &socket])?;
    let took = check_started.elapsed();
    assert!(out.status.success(), "{out:?}");
    assert!(
        took < Duration::from_secs(2),
        "`limiter check` on the Unix socket took {took:?}"
    );

    // A config edit is applied.
    let (generation, took) = agent.reload(
        &CONFIG.replace("limit: 20", "limit: 21"),
        Duration::from_secs(5),
    )?;
    eprintln!("reload applied (generation {generation}) in {took:?} under the flood");
    let out = run_limiter(
        &agent.ns,
        &["limits", "get", "10.0.0.0/8", "--api", &socket],
    )?;
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("limit 21"),
        "{out:?}"
    );

    // Snapshots are written.
    let snapshot = agent
        .state_dir()
        .join(format!("{}.snapshot", net.receiver_if));
    let before = modified(&snapshot);
    wait_until("a snapshot is written", Duration::from_secs(3), || {
        Ok(modified(&snapshot)
            .filter(|m| Some(*m) != before)
            .map(|_| ()))
    })?;
    let (open, ..) = api_connections(&net)?;
    assert_eq!(
        open, 199,
        "still held while the checks above ran: the authenticated one and 198 of the flood's"
    );
    // The caller with credentials closes its connection (not a timeout).
    drop(authed);
    drop(runtime);

    // The auth timeout closes every connection the agent held; the refused ones were closed at
    // once.
    let (open, _, _, unauthenticated, idle, _) = wait_until(
        "the unauthenticated connections are closed",
        auth_timeout + Duration::from_secs(5),
        || {
            let figures = api_connections(&net)?;
            Ok((figures.0 == 0).then_some(figures))
        },
    )?;
    assert_eq!((open, unauthenticated, idle), (0, 198, 0));
    for (index, stream) in streams.iter_mut().enumerate() {
        assert!(
            closed_by_server(stream, Duration::from_secs(2))?,
            "connection {index} is still open"
        );
    }

    // With the flood gone, an authenticated TCP caller is served.
    let out = run_limiter(
        &agent.ns,
        &["limits", "--api", &url, "--token-file", &token, "ls"],
    )?;
    assert!(out.status.success(), "{out:?}");
    let log = agent.stderr();
    assert!(
        !log.contains("Too many open files") && !log.contains("accept failed"),
        "{log}"
    );
    Ok(())
}

/// With `--api-auth-timeout 1s --api-idle-timeout 2s`: a connection that sends nothing is closed
/// after about a second; an authenticated one after its calls end and two idle seconds; a
/// `Watch` stream, a call in flight, keeps its connection past the idle timeout and receives
/// what happens later. `Top` beyond its maximum is INVALID_ARGUMENT naming `n`; `n` = 0 asks for
/// the maximum.
#[test]
fn idle_connections_are_closed_and_calls_in_flight_are_not() -> Result<()> {
    require_root!();
    let net = TestNet::new()?;
    let dir = TempDir::new("hostile-idle")?;
    let (agent, socket, token) = start_agent(
        &net,
        &dir,
        &["--api-auth-timeout", "1s", "--api-idle-timeout", "2s"],
        None,
    )?;
    let url = format!("http://127.0.0.1:{API_PORT}");

    // Silent: closed by the auth timeout, not before.
    let mut silent = connect_from(&net, Ipv4Addr::new(127, 0, 0, 2), 1)?;
    let opened = Instant::now();
    assert!(closed_by_server(&mut silent[0], Duration::from_secs(4))?);
    let lived = opened.elapsed();
    assert!(
        lived >= Duration::from_millis(900) && lived < Duration::from_secs(3),
        "closed after {lived:?}"
    );

    let tcp = Target {
        api: Some(url.clone()),
        token_file: Some(token.clone().into()),
        ..Target::default()
    };
    let unix = Target {
        api: Some(socket.clone()),
        ..Target::default()
    };
    net.in_receiver(|| -> Result<()> {
        block_on(async {
            // Authenticated, then idle: closed two seconds after its call.
            let mut clients = client::connect(&tcp).await?;
            clients
                .limits
                .list(proto::ListLimitsRequest {})
                .await
                .context("list over TCP")?;
            let called = Instant::now();
            tokio::time::sleep(Duration::from_millis(1500)).await;
            // Past the auth timeout, inside the idle one: still open.
            let (open, _, _, unauthenticated, idle, _) = api_connections(&net)?;
            assert_eq!((open, unauthenticated, idle), (1, 1, 0));
            loop {
                let (open, _, _, _, idle, _) = api_connections(&net)?;
                if open == 0 {
                    assert_eq!(idle, 1);
                    break;
                }
                ensure!(
                    called.elapsed() < Duration::from_secs(5),
                    "the idle connection is still open"
                );
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            let lived = called.elapsed();
            assert!(
                lived >= Duration::from_millis(1900),
                "closed after {lived:?}"
            );
            drop(clients);

            // A Watch stream outlives the idle timeout and still gets the change made later.
            let mut watcher = client::connect(&tcp).await?;
            let mut stream = watcher
                .limits
                .watch(proto::WatchLimitsRequest::default())
                .await?
                .into_inner();
            tokio::time::sleep(Duration::from_secs(4)).await;
            let (open, ..) = api_connections(&net)?;
            assert_eq!(open, 1, "the watching connection is open after 4 s");
            let mut admin = client::connect(&unix).await?;
            admin
                .limits
                .set(proto::SetLimitRequest {
                    policy: Some(proto::Policy {
                        r#match: "10.9.0.0/16".into(),
                        limit: Some(5),
                        window: Some(prost_types::Duration {
                            seconds: 3600,
                            nanos: 0,
                        }),
                        action: proto::Action::Limit as i32,
                        scope: proto::Scope::Unspecified as i32,
                    }),
                })
                .await?;
            let change = tokio::time::timeout(Duration::from_secs(5), stream.message())
                .await
                .context("no change on the watch stream")??
                .context("the watch stream ended")?;
            assert!(format!("{change:?}").contains("10.9.0.0/16"), "{change:?}");

            // Top: bounded.
            let status = admin
                .stats
                .top(proto::TopRequest { n: 1001 })
                .await
                .expect_err("n = 1001 is over the maximum");
            assert_eq!(status.code(), Code::InvalidArgument);
            assert!(
                status.message().starts_with("n: at most 1000"),
                "{status:?}"
            );
            let all = admin
                .stats
                .top(proto::TopRequest { n: 0 })
                .await?
                .into_inner();
            assert!(all.clients.len() <= 1000);
            assert_eq!(all.resident, all.clients.len() as u64, "{all:?}");
            Ok::<_, anyhow::Error>(())
        })?
    })??;
    drop(agent);
    Ok(())
}

/// With TLS and `--api-auth-timeout 1s`: a caller that starts a handshake and never finishes it
/// (a TLS record header promising more than it sends) is closed after about a second, and
/// counted; a real TLS client with the token is served.
#[test]
fn a_stalled_tls_handshake_is_closed_after_the_auth_timeout() -> Result<()> {
    use rcgen::{BasicConstraints, CertificateParams, CertifiedIssuer, IsCa, KeyPair};

    require_root!();
    let net = TestNet::new()?;
    let dir = TempDir::new("hostile-tls")?;
    let mut ca_params = CertificateParams::new(Vec::<String>::new())?;
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    let ca = CertifiedIssuer::self_signed(ca_params, KeyPair::generate()?)?;
    let key = KeyPair::generate()?;
    let cert = CertificateParams::new(vec!["127.0.0.1".to_owned()])?.signed_by(&key, &ca)?;
    let ca_path = write_mode(&dir, "ca.pem", &ca.pem(), 0o644)?;
    let cert_path = write_mode(&dir, "server.pem", &cert.pem(), 0o644)?;
    let key_path = write_mode(&dir, "server.key", &key.serialize_pem(), 0o600)?;
    let (_agent, _socket, token) = start_agent(
        &net,
        &dir,
        &[
            "--api-tls-cert",
            &cert_path,
            "--api-tls-key",
            &key_path,
            "--api-auth-timeout",
            "1s",
        ],
        None,
    )?;

    let mut stalled = connect_from(&net, Ipv4Addr::new(127, 0, 0, 2), 1)?;
    // A handshake record of 512 bytes, of which only the first 4 come.
    stalled[0].write_all(&[0x16, 0x03, 0x01, 0x02, 0x00, 0x01, 0x00, 0x01, 0xfc])?;
    let opened = Instant::now();
    assert!(closed_by_server(&mut stalled[0], Duration::from_secs(4))?);
    let lived = opened.elapsed();
    assert!(lived < Duration::from_secs(3), "closed after {lived:?}");
    let (open, _, _, unauthenticated, _, _) = api_connections(&net)?;
    assert_eq!((open, unauthenticated), (0, 1));

    let target = Target {
        api: Some(format!("https://127.0.0.1:{API_PORT}")),
        token_file: Some(token.into()),
        tls_ca: Some(ca_path.into()),
        ..Target::default()
    };
    let listed = net.in_receiver(|| {
        block_on(async {
            let mut clients = client::connect(&target).await?;
            let listed = clients.limits.list(proto::ListLimitsRequest {}).await?;
            Ok::<_, anyhow::Error>(listed.into_inner())
        })
    })???;
    assert!(!listed.policies.is_empty(), "{listed:?}");
    Ok(())
}

/// Counting resident clients no longer copies the maps: at a million address clients the walk
/// `Stats.Global` and the metrics endpoint now run holds one batch (a few hundred KiB), where
/// reading the entries out (what they did before) holds them all. Prints both, with times.
#[test]
fn a_resident_count_holds_one_batch_not_the_map() -> Result<()> {
    require_root!();
    const CLIENTS: u32 = 1_000_000;
    let mut ebpf = datapath::load(&LoadOptions {
        pin_dir: None,
        max_clients: CLIENTS.next_power_of_two(),
        max_ids: 1024,
        max_limited: 1024,
        ..LoadOptions::default()
    })?;
    let tables = Tables::take(&mut ebpf)?;
    let [dynamic, ..] = tables.client_fds()?;
    let entries: Vec<_> = (0..CLIENTS)
        .map(|i| {
            let key = v4_mapped([10, (i >> 16) as u8, (i >> 8) as u8, i as u8]);
            let state = ClientState {
                slots: [slot(1000, i % 100), slot(999, 7)],
                limit: 100,
                window_us: 1_000_000,
                ..Default::default()
            };
            (key, state)
        })
        .collect();
    {
        use std::os::fd::AsFd as _;
        syscall::update_all(dynamic.as_fd(), &entries)?;
    }
    drop(entries);
    let maps = tables.client_maps()?;

    let started = Instant::now();
    let (copied, copy_peak) = peak_heap(|| maps.addresses().map(|a| a.len()));
    let copy_time = started.elapsed();
    let started = Instant::now();
    let (counted, walk_peak) = peak_heap(|| maps.resident());
    let walk_time = started.elapsed();
    eprintln!(
        "{CLIENTS} address clients: copying the entries out: {copy_peak} bytes peak, \
         {copy_time:?}; counting walk: {walk_peak} bytes peak, {walk_time:?}"
    );
    assert_eq!(copied?, CLIENTS as usize);
    assert_eq!(counted?, (u64::from(CLIENTS), 0, 0));
    assert!(copy_peak >= CLIENTS as usize * 56, "{copy_peak}");
    assert!(walk_peak < 1 << 20, "the walk held {walk_peak} bytes");
    Ok(())
}
