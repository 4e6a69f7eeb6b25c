//! The agent's gRPC API (`proto/limiter.proto`) end to end: a real `limiter agent` on the test
//! network's receiver veth, driven through the `limiter` CLI and the Rust client while the
//! sender's packets cross the XDP path. Root only; run one at a time (`cargo xtask test` passes
//! `--test-threads=1`).
//!
//! Counts at the receiver are exact, as in `agent.rs`: every limited policy uses `window: 1h`
//! and each test checks that no hour boundary of CLOCK_MONOTONIC passed ([`ExactWindow`]).
//!
//! Every agent gets its own Unix socket in a [`TempDir`] (`--api-socket`), so tests never share
//! `/run/limiter`. The TCP API and the metrics endpoint listen on 127.0.0.1 of the receiver
//! namespace, which only that namespace can reach: fixed ports cannot collide with anything.

#![expect(
    clippy::expect_used,
    reason = "test helpers outside #[test] functions; a panic there is the test failing"
)]

use std::{
    fs,
    io::{Read as _, Write as _},
    net::{IpAddr, SocketAddr, TcpStream},
    os::unix::fs::PermissionsExt as _,
    path::Path,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    thread::{self, JoinHandle},
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, anyhow, ensure};
use limiter_tests::{
    agent::{Agent, link_has_xdp, run_limiter},
    api::Api,
    fixture::{ExactWindow, TempDir, wait_until},
    netns::{TestNet, pin_dir, sender_v4, sender_v6},
    require_root,
    traffic::{PacketCounter, UDP_PORT, receiver_for, send_and_count},
};
use limiter_user::{cli::client::Target, proto};
use serde_json::Value;
use tonic::Code;

/// Longest any one test's traffic phase may take; the hour window must not end inside it.
const TEST_SPAN: Duration = Duration::from_secs(40);
/// Longest one API call may take before the test gives up on it.
const CALL_TIMEOUT: Duration = Duration::from_secs(10);
/// How the CLI shows a 1 h window (`Duration`'s `Debug`).
const HOUR: &str = "3600s";
/// The TCP API port, on 127.0.0.1 of the receiver namespace.
const API_PORT: u16 = 7443;
/// The metrics port, on 127.0.0.1 of the receiver namespace.
const METRICS_PORT: u16 = 9464;
/// A token the agent accepts (written to a mode 0600 file).
const TOKEN: &str = "agent-api-test-token-0123456789";

// ---------------------------------------------------------------------------------------------
// Helpers
// ---------------------------------------------------------------------------------------------

/// A finished `limiter` command.
#[derive(Debug)]
struct Run {
    /// The exit code (`None`: killed by a signal).
    code: Option<i32>,
    stdout: String,
    stderr: String,
}

impl Run {
    /// Fails unless the command exited 0; returns its stdout.
    fn success(self, what: &str) -> String {
        assert_eq!(
            self.code,
            Some(0),
            "`{what}` failed: stdout {:?}, stderr {:?}",
            self.stdout,
            self.stderr
        );
        self.stdout
    }

    /// Asserts that the command failed with exit status 1 and a one-line error on stderr that
    /// contains every one of `needles`; returns that line.
    fn failure(self, what: &str, needles: &[&str]) -> String {
        assert_eq!(
            self.code,
            Some(1),
            "`{what}` should fail with status 1: stdout {:?}, stderr {:?}",
            self.stdout,
            self.stderr
        );
        let line = self.stderr.trim();
        assert_eq!(
            line.lines().count(),
            1,
            "`{what}`: a one-line error: {line:?}"
        );
        for needle in needles {
            assert!(
                line.contains(needle),
                "`{what}`: {needle:?} not in {line:?}"
            );
        }
        line.to_owned()
    }
}

/// Runs `limiter ARGS...` in namespace `ns` (20 s timeout).
fn limiter(ns: &str, args: &[&str]) -> Result<Run> {
    let out = run_limiter(ns, args)?;
    Ok(Run {
        code: out.status.code(),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    })
}

fn hour() -> Option<prost_types::Duration> {
    Some(prost_types::Duration {
        seconds: 3600,
        nanos: 0,
    })
}

/// A `limit` policy with a 1 h window.
fn hourly(matches: &str, limit: u32) -> proto::Policy {
    proto::Policy {
        r#match: matches.to_owned(),
        limit: Some(limit),
        window: hour(),
        action: proto::Action::Limit as i32,
        scope: proto::Scope::Unspecified as i32,
    }
}

/// A fresh directory with the agent's API socket path in it (`--api-socket`).
fn socket_dir() -> Result<(TempDir, String)> {
    let dir = TempDir::new("api")?;
    let socket = dir.join("api.sock").to_string_lossy().into_owned();
    Ok((dir, socket))
}

/// Writes `text` to `name` in `dir` with file mode `mode`; returns the path.
fn write_mode(dir: &TempDir, name: &str, text: &str, mode: u32) -> Result<String> {
    let path = dir.write(name, text)?;
    fs::set_permissions(&path, fs::Permissions::from_mode(mode))?;
    Ok(path)
}

/// Datagrams received from `src` while `f` runs (the receiver is settled before and after).
fn received_during<T>(
    counter: &PacketCounter,
    src: IpAddr,
    f: impl FnOnce() -> Result<T>,
) -> Result<(u64, T)> {
    let before = counter.settle()?.get(&src).copied().unwrap_or(0);
    let value = f()?;
    let after = counter.settle()?.get(&src).copied().unwrap_or(0);
    Ok((after - before, value))
}

/// Sends one datagram from `src` to the receiver every `interval` on a background thread (for at
/// most 5 s), recording when each one left.
struct Prober {
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<Result<Vec<Instant>>>>,
}

impl Prober {
    fn start(net: &TestNet, src: IpAddr, interval: Duration) -> Result<Prober> {
        let socket = net.udp_sender(src)?;
        let dst = receiver_for(src);
        let stop = Arc::new(AtomicBool::new(false));
        let stopping = Arc::clone(&stop);
        let thread = thread::spawn(move || -> Result<Vec<Instant>> {
            let start = Instant::now();
            let mut sent = Vec::new();
            while !stopping.load(Ordering::Relaxed) && start.elapsed() < Duration::from_secs(5) {
                let at = Instant::now();
                socket
                    .send_to(b"limiter-api-probe", dst)
                    .with_context(|| format!("probing from {src}"))?;
                sent.push(at);
                thread::sleep(interval);
            }
            Ok(sent)
        });
        Ok(Prober {
            stop,
            thread: Some(thread),
        })
    }

    /// Stops probing; returns when each probe was sent.
    fn finish(mut self) -> Result<Vec<Instant>> {
        self.stop.store(true, Ordering::Relaxed);
        self.thread
            .take()
            .expect("joined once")
            .join()
            .map_err(|_| anyhow!("the prober panicked"))?
    }
}

impl Drop for Prober {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// `limiter stats --api SOCKET --json --top 0`, parsed.
fn api_stats(ns: &str, socket: &str) -> Result<Value> {
    limiter_tests::agent::api_stats_json(ns, socket)
}

/// The row of `client` in the `clients` of `limiter stats --api --json`.
fn api_row<'a>(stats: &'a Value, client: &str) -> &'a Value {
    limiter_tests::agent::api_row(stats, client)
        .unwrap_or_else(|| panic!("no row for {client} in {stats:#}"))
}

/// `(passed, dropped)` of the unspecified IPv6 source `::` in `limiter stats --api --json`:
/// the sender's MLD reports as its addresses come up (it has no link-local address), the only
/// packets that reach the limiter without the test sending them.
fn unspecified_counts(stats: &Value) -> (u64, u64) {
    stats["clients"]
        .as_array()
        // `::` is counted in its /64 (IPv6's default grouping), shown as `::/64`.
        .and_then(|rows| {
            rows.iter()
                .find(|r| r["client"] == "::" || r["client"] == "::/64")
        })
        .map_or((0, 0), |r| (u64_at(r, "passed"), u64_at(r, "dropped")))
}

fn u64_at(v: &Value, field: &str) -> u64 {
    v[field]
        .as_u64()
        .unwrap_or_else(|| panic!("{field} is not an unsigned number in {v}"))
}

/// An HTTP/1.1 answer.
struct Http {
    status: u16,
    head: String,
    body: String,
}

/// `GET /metrics` on 127.0.0.1:`port` of the receiver namespace, by hand (`Connection: close`,
/// the body up to the end of the stream).
fn get_metrics(net: &TestNet, port: u16) -> Result<Http> {
    let raw = net.in_receiver(|| -> Result<Vec<u8>> {
        let addr = SocketAddr::from(([127, 0, 0, 1], port));
        let mut stream = TcpStream::connect_timeout(&addr, Duration::from_secs(2))
            .with_context(|| format!("connecting to {addr}"))?;
        stream.set_read_timeout(Some(Duration::from_secs(5)))?;
        stream.set_write_timeout(Some(Duration::from_secs(5)))?;
        stream
            .write_all(b"GET /metrics HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n")?;
        let mut raw = Vec::new();
        stream.read_to_end(&mut raw)?;
        Ok(raw)
    })??;
    let text = String::from_utf8(raw).context("the answer is not UTF-8")?;
    let (head, body) = text
        .split_once("\r\n\r\n")
        .ok_or_else(|| anyhow!("no end of the head in {text:?}"))?;
    let status = head
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| anyhow!("no status in {head:?}"))?;
    Ok(Http {
        status,
        head: head.to_owned(),
        body: body.to_owned(),
    })
}

/// A scrape of the agent's metrics, waiting (up to 10 s) for the endpoint to come up.
fn scrape(net: &TestNet, iface: &str) -> Result<Metrics> {
    let http = wait_until(
        "the metrics endpoint answers",
        Duration::from_secs(10),
        || Ok(get_metrics(net, METRICS_PORT).ok()),
    )?;
    ensure!(
        http.status == 200,
        "GET /metrics: {}\n{}",
        http.head,
        http.body
    );
    Ok(Metrics {
        body: http.body,
        iface: iface.to_owned(),
    })
}

/// One scrape's text.
struct Metrics {
    body: String,
    iface: String,
}

impl Metrics {
    /// The value of `name{iface="IFACE"LABELS}`, e.g. `labels` = `,result="allowed"`; `None` if
    /// there is no such sample.
    fn get(&self, name: &str, labels: &str) -> Option<u64> {
        let series = format!("{name}{{iface=\"{}\"{labels}}} ", self.iface);
        self.body
            .lines()
            .find_map(|l| l.strip_prefix(&series))
            .map(|v| {
                v.trim()
                    .parse()
                    .unwrap_or_else(|_| panic!("{series}: not a number: {v}"))
            })
    }

    fn value(&self, name: &str, labels: &str) -> u64 {
        self.get(name, labels).unwrap_or_else(|| {
            panic!(
                "no sample {name}{{iface=\"{}\"{labels}}} in\n{}",
                self.iface, self.body
            )
        })
    }
}

/// A scrape, and its `limiter_packets_{passed,dropped}_total` less the packets from `::` (see
/// [`unspecified_counts`]): what the test sent. The stray count is read before and after the
/// scrape, and the scrape taken again if one of the sender's stray packets arrived in between
/// (the scrape and the count would not belong together).
fn scrape_counts(net: &TestNet, iface: &str, api: &mut Api) -> Result<(Metrics, (u64, u64))> {
    for _ in 0..20 {
        let before = api.client_stats("::")?;
        let m = scrape(net, iface)?;
        let after = api.client_stats("::")?;
        if (before.passed, before.dropped) == (after.passed, after.dropped) {
            let counts = (
                m.value("limiter_packets_passed_total", "") - before.passed,
                m.value("limiter_packets_dropped_total", "") - before.dropped,
            );
            return Ok((m, counts));
        }
        thread::sleep(Duration::from_millis(100));
    }
    anyhow::bail!("the sender's stray packets kept arriving during the scrapes")
}

// ---------------------------------------------------------------------------------------------
// 1. A limit set through the API reaches the XDP path at once and survives a restart
// ---------------------------------------------------------------------------------------------

const RESTART_CONFIG: &str = "\
# Policies of the API restart test. This comment must survive every API edit.
mode: enforce
default: {limit: 100000, window: 1h}   # everyone else
policies:
  # the test senders 198.18.0.16 - 198.18.0.31
  - match: 198.18.0.16/28
    limit: 100000    # changed through the API
    window: 1h
  # allow-listed
  - match: 198.18.0.40
    action: pass
";

/// Lowers a prefix's limit with `limiter limits set` while a sender of the prefix that already
/// spent the new limit probes every 2 ms: the probes pass until the change reaches the XDP path
/// and are all dropped after. Then a fresh sender of the prefix gets exactly the new limit, a
/// raise through the Rust client applies to the very next packets, all with the config file
/// read-only (a bind mount), which is never written; after a restart (fresh maps, the same state
/// dir) the policy overlay still holds the new limit, and `limits rm` puts the file's back.
#[test]
fn api_limit_reaches_the_xdp_path_at_once_and_survives_a_restart() -> Result<()> {
    require_root!();
    let net = TestNet::new()?;
    let (_dir, socket) = socket_dir()?;
    let agent = Agent::start_with(&net, RESTART_CONFIG, &["--api-socket", &socket])?;
    // The config file read-only, as a ConfigMap is: API changes must not need to write it.
    let read_only = ReadOnly::mount(&agent.config_path, &net.receiver_ns)?;
    let counter = net.udp_counter(UDP_PORT)?;
    let window = ExactWindow::start(TEST_SPAN);
    let mut api = Api::unix(&socket, CALL_TIMEOUT)?;
    let (spent, fresh, third, listed): (IpAddr, IpAddr, IpAddr, IpAddr) = (
        sender_v4(7).into(),  // 198.18.0.17, in the prefix
        sender_v4(8).into(),  // 198.18.0.18, in the prefix, first seen after the change
        sender_v4(9).into(),  // 198.18.0.19, in the prefix, first seen after the restart
        sender_v4(30).into(), // 198.18.0.40, allow-listed
    );

    let got = send_and_count(&net, &counter, &[(spent, 30)])?;
    assert_eq!(got[&spent], 30, "nothing is limited at 100000 per hour");
    let generation = api.global()?.policy_generation;

    // The CLI lowers the prefix to 30, exactly what `spent` has used: from the moment the XDP
    // path sees the change, every probe from `spent` is dropped.
    let interval = Duration::from_millis(2);
    let (passed, (sent, t0, returned)) = received_during(&counter, spent, || {
        let prober = Prober::start(&net, spent, interval)?;
        let t0 = Instant::now();
        let out = limiter(
            &net.receiver_ns,
            &[
                "limits",
                "--api",
                &socket,
                "set",
                "198.18.0.16/28",
                "--limit",
                "30",
                "--window",
                "1h",
            ],
        )?;
        let returned = Instant::now();
        // Keep probing a while after the call returned.
        thread::sleep(Duration::from_millis(100));
        let sent = prober.finish()?;
        let stdout = out.success("limiter limits set");
        assert_eq!(
            stdout.trim(),
            format!(
                "set 198.18.0.16/28: limit 30 per {HOUR} (generation {})",
                generation + 1
            )
        );
        Ok((sent, t0, returned))
    })?;
    let passed = passed as usize;
    ensure!(
        passed < sent.len(),
        "all {} probes passed: the lowered limit never reached the XDP path",
        sent.len()
    );
    let enforced = sent[passed].duration_since(t0);
    let sent_before_return = sent.iter().filter(|t| **t < returned).count();
    eprintln!(
        "`limiter limits set` took {:?} (process start included); the XDP path dropped from \
         {enforced:?} after the call started ({passed} of {} probes passed, one every \
         {interval:?})",
        returned - t0,
        sent.len()
    );
    assert!(
        passed <= sent_before_return,
        "{passed} probes passed but only {sent_before_return} were sent before the API call \
         returned: the change was not in force when the call returned"
    );
    assert!(
        enforced < Duration::from_secs(1),
        "the lowered limit took {enforced:?} to reach the XDP path"
    );

    // N of M: a fresh client of the prefix gets exactly the new limit; `spent` gets nothing.
    let got = send_and_count(&net, &counter, &[(fresh, 100), (spent, 20)])?;
    assert_eq!(got[&fresh], 30, "a fresh client under the lowered limit");
    assert_eq!(got[&spent], 0, "a client past the lowered limit");

    // A raise through the Rust client applies to the packets sent right after the call returns:
    // `fresh` (30 used) gets exactly 10 more at 40.
    let t0 = Instant::now();
    let change = api.set(hourly("198.18.0.16/28", 40))?;
    let rpc = t0.elapsed();
    let got = send_and_count(&net, &counter, &[(fresh, 50)])?;
    eprintln!("Limits.Set over the Unix socket took {rpc:?}");
    assert_eq!(change.generation, generation + 2);
    assert_eq!(change.source, "api");
    assert_eq!(change.kind, proto::limit_change::Kind::Set as i32);
    assert_eq!(
        got[&fresh], 10,
        "the raise from 30 to 40, right after the call"
    );
    assert!(rpc < Duration::from_secs(1), "Limits.Set took {rpc:?}");
    let policies_before = api.list()?;
    // A connection whose client does not answer holds up the agent's graceful shutdown: close it.
    drop(api);

    // The config file is never written: the change is in the policy overlay under the state
    // dir, which a restart with that state dir takes up again.
    let status = agent.terminate()?;
    assert!(
        status.success(),
        "the agent exited with {status} on SIGTERM"
    );
    assert_eq!(
        fs::read_to_string(&agent.config_path)?,
        RESTART_CONFIG,
        "the config file after the API edits"
    );
    drop(read_only);
    let overlay_name = format!("{}.overlay.yaml", net.receiver_if);
    let overlay = fs::read_to_string(agent.state_dir().join(&overlay_name))?;
    assert!(
        overlay.contains("version: 1") && overlay.contains("limit: 40"),
        "{overlay}"
    );
    // Fresh maps (the pins and the snapshot go with the guard): the overlay alone carries the
    // limit.
    let kept = TempDir::new("overlay-restart")?;
    let state = kept.join("state");
    fs::create_dir_all(&state)?;
    fs::write(state.join(&overlay_name), &overlay)?;
    drop(agent);
    assert!(
        !pin_dir(&net.receiver_if).exists(),
        "the guard removes the pins"
    );

    let state_arg = state.to_string_lossy().into_owned();
    let agent = Agent::start_with(
        &net,
        RESTART_CONFIG,
        &["--api-socket", &socket, "--state-dir", &state_arg],
    )?;
    let mut api = Api::unix(&socket, CALL_TIMEOUT)?;
    assert_eq!(
        api.list()?,
        policies_before,
        "the policies after the restart"
    );
    let out = limiter(
        &net.receiver_ns,
        &["limits", "--api", &socket, "get", "198.18.0.16/28"],
    )?;
    assert_eq!(
        out.success("limiter limits get").trim(),
        format!("198.18.0.16/28: limit 40 per {HOUR}")
    );
    let got = send_and_count(&net, &counter, &[(third, 100), (listed, 50)])?;
    let stats = api_stats(&net.receiver_ns, &socket)?;
    window.check();
    assert_eq!(got[&third], 40, "the API's limit after the restart");
    assert_eq!(
        got[&listed], 50,
        "the allow-listed address after the restart"
    );
    let row = api_row(&stats, "198.18.0.19");
    assert_eq!(
        (
            u64_at(row, "passed"),
            u64_at(row, "dropped"),
            u64_at(row, "limit")
        ),
        (40, 60, 40),
        "{row}"
    );
    // Held in `LIMITED` since its first dropped packet: the row says so, and the global count
    // is the rows that do (all of them are listed).
    assert_eq!(row["limited"], true, "{row}");
    let held = stats["clients"].as_array().map_or(0, |rows| {
        rows.iter().filter(|r| r["limited"] == true).count()
    });
    assert_eq!(
        u64_at(&stats["global"], "limited"),
        held as u64,
        "{stats:#}"
    );
    // Removing the API's policy puts the config file's back.
    let out = limiter(
        &net.receiver_ns,
        &["limits", "--api", &socket, "rm", "198.18.0.16/28"],
    )?;
    assert!(
        out.success("limiter limits rm")
            .contains("in force again from the config file: 198.18.0.16/28: limit 100000"),
    );
    let got = send_and_count(&net, &counter, &[(third, 20)])?;
    assert_eq!(got[&third], 20, "the file's limit again");
    assert!(agent.exited()?.is_none(), "{}", agent.stderr());
    Ok(())
}

/// `path` bind-mounted read-only onto itself until dropped: even root cannot write it.
struct ReadOnly(std::path::PathBuf);

impl ReadOnly {
    /// Checks from inside `ns` (where the agent runs, in a mount namespace of its own that
    /// `ip netns exec` made) that the file is read-only there too.
    fn mount(path: &Path, ns: &str) -> Result<ReadOnly> {
        let run = |args: &[&str]| -> Result<std::process::Output> {
            std::process::Command::new(args[0])
                .args(&args[1..])
                .output()
                .with_context(|| format!("running {args:?}"))
        };
        let p = path.to_str().context("a UTF-8 path")?;
        let out = run(&["mount", "--bind", p, p])?;
        ensure!(out.status.success(), "mount --bind {p}: {out:?}");
        let guard = ReadOnly(path.to_path_buf());
        let out = run(&["mount", "-o", "remount,bind,ro", p])?;
        ensure!(out.status.success(), "remounting {p} read-only: {out:?}");
        let out = run(&[
            "ip",
            "netns",
            "exec",
            ns,
            "sh",
            "-c",
            &format!("echo >> '{p}'"),
        ])?;
        ensure!(
            !out.status.success() && String::from_utf8_lossy(&out.stderr).contains("Read-only"),
            "{p} should be read-only in {ns}: {out:?}"
        );
        Ok(guard)
    }
}

impl Drop for ReadOnly {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount").arg(&self.0).status();
    }
}

// ---------------------------------------------------------------------------------------------
// 2. Check on an address and that address's packets share one budget
// ---------------------------------------------------------------------------------------------

const SHARED_CONFIG: &str = "\
mode: enforce
default: {limit: 12, window: 1h}
policies:
  - match: 198.18.0.16/28
    limit: 20
    window: 1h
  - match: 198.18.0.12
    limit: 8
    window: 1h
";

/// For a prefix client (LRU map), an exact-address client (static map) and an IPv6 default
/// client: packets spend part of the budget, `Check(hits: 0)` sees exactly that, checks spend
/// the rest, and then every packet is dropped. The other way round, checks first, the packets
/// get exactly what the checks left.
#[test]
fn check_on_an_address_shares_the_budget_of_its_packets() -> Result<()> {
    require_root!();
    let net = TestNet::new()?;
    let (_dir, socket) = socket_dir()?;
    let _agent = Agent::start_with(&net, SHARED_CONFIG, &["--api-socket", &socket])?;
    let counter = net.udp_counter(UDP_PORT)?;
    let window = ExactWindow::start(TEST_SPAN);
    let mut api = Api::unix(&socket, CALL_TIMEOUT)?;

    // (source, its limit, its policy, packets sent first)
    let cases: [(IpAddr, u32, &str, u64); 3] = [
        (sender_v4(7).into(), 20, "198.18.0.16/28", 7), // 198.18.0.17
        (sender_v4(2).into(), 8, "198.18.0.12", 3),     // exact address
        (sender_v6(0).into(), 12, "default", 5),        // fd00:77::10
    ];
    for (src, limit, policy, first) in cases {
        let id = src.to_string();
        let got = send_and_count(&net, &counter, &[(src, first)])?;
        assert_eq!(got[&src], first, "{src}: under its limit");

        let read = api.check(&id, 0)?;
        assert!(read.allowed, "{src}: {read:?}");
        assert_eq!(read.limit, limit, "{src}: {read:?}");
        assert_eq!(
            read.remaining as u64,
            limit as u64 - first,
            "{src}: the packets spent part of the budget Check sees: {read:?}"
        );
        assert_eq!(read.policy.trim_end_matches("/32"), policy, "{read:?}");
        assert_eq!(read.window, hour(), "{read:?}");

        let rest = limit - first as u32;
        let spend = api.check(&id, rest)?;
        assert!(spend.allowed, "{src}: spending the rest: {spend:?}");
        assert_eq!(spend.remaining, 0, "{src}: {spend:?}");
        let over = api.check(&id, 1)?;
        assert!(!over.allowed, "{src}: one hit past the limit: {over:?}");
        assert_eq!(over.remaining, 0, "{src}: {over:?}");
        assert!(
            over.retry_after.is_some(),
            "{src}: waiting helps under a 1 h window: {over:?}"
        );

        let got = send_and_count(&net, &counter, &[(src, 10)])?;
        assert_eq!(
            got[&src], 0,
            "{src}: the checks spent what the packets had left"
        );

        // Hits are counted in the client's passed/dropped like packets.
        let stats = api.client_stats(&id)?;
        assert!(stats.resident, "{stats:?}");
        assert_eq!(
            (stats.passed, stats.dropped, stats.estimate),
            (limit as u64, 1 + 10, limit as u64),
            "{src}: passed = packets + admitted hits, dropped = the denied hit + packets"
        );
    }

    // The IPv4-mapped form of an address names the same client.
    let mapped = api.check("::ffff:198.18.0.17", 0)?;
    assert_eq!((mapped.allowed, mapped.remaining), (false, 0), "{mapped:?}");

    // Checks first: a fresh client of the prefix spends 15 of its 20 through the API; of its
    // packets exactly 5 pass.
    let src: IpAddr = sender_v4(8).into(); // 198.18.0.18
    let spend = api.check("198.18.0.18", 15)?;
    assert!(spend.allowed && spend.remaining == 5, "{spend:?}");
    let got = send_and_count(&net, &counter, &[(src, 20)])?;
    let after = api.check("198.18.0.18", 0)?;
    window.check();
    assert_eq!(got[&src], 5, "the packets get what the checks left");
    assert_eq!((after.allowed, after.remaining), (false, 0), "{after:?}");
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// 3. The TCP API: authentication
// ---------------------------------------------------------------------------------------------

const AUTH_CONFIG: &str = "\
# TCP API test
mode: enforce
default: {limit: 1000, window: 1h}
policies:
  - match: 198.18.0.16/28
    limit: 20
    window: 1h
";

/// Without the token, or with a wrong one, every call over TCP fails with UNAUTHENTICATED (CLI:
/// exit status 1, not the 3 of a denied check) and changes nothing: not the file, not the
/// policies, not a client's budget. With the token the same calls work.
#[test]
fn tcp_api_calls_without_the_token_fail_and_change_nothing() -> Result<()> {
    require_root!();
    let net = TestNet::new()?;
    let dir = TempDir::new("auth")?;
    let socket = dir.join("api.sock").to_string_lossy().into_owned();
    let token = write_mode(&dir, "token", &format!("{TOKEN}\n"), 0o600)?;
    let wrong = write_mode(&dir, "wrong", "not-the-agent-api-test-token\n", 0o600)?;
    let listen = format!("127.0.0.1:{API_PORT}");
    let url = format!("http://{listen}");
    let agent = Agent::start_with(
        &net,
        AUTH_CONFIG,
        &[
            "--api-socket",
            &socket,
            "--api-listen",
            &listen,
            "--api-token-file",
            &token,
        ],
    )?;
    let counter = net.udp_counter(UDP_PORT)?;
    let window = ExactWindow::start(TEST_SPAN);
    let ns = net.receiver_ns.clone();
    let mut unix = Api::unix(&socket, CALL_TIMEOUT)?;
    let generation = unix.global()?.policy_generation;
    let src: IpAddr = sender_v4(7).into(); // 198.18.0.17
    let got = send_and_count(&net, &counter, &[(src, 4)])?;
    assert_eq!(got[&src], 4);

    // The agent may still be binding the TCP listener: wait for it with the token.
    wait_until("the TCP API answers", Duration::from_secs(10), || {
        let out = limiter(
            &ns,
            &["limits", "--api", &url, "--token-file", &token, "ls"],
        )?;
        Ok((out.code == Some(0)).then_some(()))
    })?;

    let missing = "Unauthenticated: missing credentials";
    let invalid = "Unauthenticated: invalid bearer token";
    let set_args = ["set", "198.18.0.16/28", "--limit", "1", "--window", "1h"];
    let cases: [(&str, Vec<&str>, &str); 8] = [
        ("ls", vec!["limits", "--api", &url, "ls"], missing),
        (
            "ls, wrong token",
            vec!["limits", "--api", &url, "--token-file", &wrong, "ls"],
            invalid,
        ),
        (
            "set",
            [&["limits", "--api", &url][..], &set_args].concat(),
            missing,
        ),
        (
            "set, wrong token",
            [
                &["limits", "--api", &url, "--token-file", &wrong][..],
                &set_args,
            ]
            .concat(),
            invalid,
        ),
        (
            "rm",
            vec!["limits", "--api", &url, "rm", "198.18.0.16/28"],
            missing,
        ),
        (
            "check",
            vec!["check", "198.18.0.17", "--hits", "10", "--api", &url],
            missing,
        ),
        (
            "check, wrong token",
            vec![
                "check",
                "198.18.0.17",
                "--hits",
                "10",
                "--api",
                &url,
                "--token-file",
                &wrong,
            ],
            invalid,
        ),
        ("stats", vec!["stats", "--api", &url, "--json"], missing),
    ];
    for (what, args, message) in cases {
        limiter(&ns, &args)?.failure(what, &[message]);
    }

    // The same over the Rust client, for the status code itself (the client lives in the
    // receiver namespace, where 127.0.0.1:API_PORT is).
    let target = |token_file: Option<&str>| Target {
        api: Some(url.clone()),
        token_file: token_file.map(Into::into),
        ..Target::default()
    };
    let (no_token, bad_token, good) = net.in_receiver(|| -> Result<_> {
        let mut bare = Api::connect(&target(None), CALL_TIMEOUT)?;
        let mut bad = Api::connect(&target(Some(&wrong)), CALL_TIMEOUT)?;
        let mut good = Api::connect(&target(Some(&token)), CALL_TIMEOUT)?;
        Ok((
            bare.set(hourly("198.18.0.16/28", 1)).map(|_| ()),
            bad.check("198.18.0.17", 10).map(|_| ()),
            good.check("198.18.0.17", 0)?,
        ))
    })??;
    assert_eq!(no_token.unwrap_err().code(), Code::Unauthenticated);
    assert_eq!(bad_token.unwrap_err().code(), Code::Unauthenticated);

    // Nothing changed: the file, the generation, the policies, the client's budget.
    assert_eq!(fs::read_to_string(&agent.config_path)?, AUTH_CONFIG);
    assert_eq!(unix.global()?.policy_generation, generation);
    let listed = limiter(
        &ns,
        &["limits", "--api", &url, "--token-file", &token, "ls"],
    )?
    .success("limits ls with the token");
    assert_eq!(
        listed,
        format!(
            "LAYER                     POLICY\n\
             file                      default: limit 1000 per {HOUR}\n\
             file                      198.18.0.16/28: limit 20 per {HOUR}\n"
        )
    );
    assert_eq!((good.allowed, good.remaining), (true, 16), "{good:?}");
    let got = send_and_count(&net, &counter, &[(src, 30)])?;
    assert_eq!(
        got[&src], 16,
        "the packets still get the old limit, less the 4 sent"
    );

    // With the token: a check is answered (denied: exit 3) and a change is made.
    let out = limiter(
        &ns,
        &[
            "check",
            "198.18.0.17",
            "--api",
            &url,
            "--token-file",
            &token,
        ],
    )?;
    assert_eq!(out.code, Some(3), "{out:?}");
    assert!(out.stdout.contains("denied"), "{out:?}");
    let out = limiter(
        &ns,
        &[
            &["limits", "--api", &url, "--token-file", &token][..],
            &set_args,
        ]
        .concat(),
    )?;
    out.success("limits set with the token");
    let overlay = agent
        .state_dir()
        .join(format!("{}.overlay.yaml", net.receiver_if));
    assert!(
        fs::read_to_string(&overlay)?.contains("limit: 1\n"),
        "the authenticated change was kept in the overlay"
    );
    assert_eq!(fs::read_to_string(&agent.config_path)?, AUTH_CONFIG);
    assert_eq!(unix.global()?.policy_generation, generation + 1);
    window.check();
    Ok(())
}

/// `limiter agent ARGS...` with the test config and `extra` arguments; expected to refuse to
/// start. Returns its one-line error, and checks it attached nothing.
fn agent_refuses(net: &TestNet, dir: &TempDir, extra: &[&str], needles: &[&str]) -> Result<String> {
    let config = dir.write("limiter.yaml", AUTH_CONFIG)?;
    let socket = dir.join("api.sock").to_string_lossy().into_owned();
    let state = dir.join("state").to_string_lossy().into_owned();
    let mut args = vec![
        "agent",
        "--iface",
        &net.receiver_if,
        "--config",
        &config,
        "--xdp-mode",
        "native",
        "--state-dir",
        &state,
        "--api-socket",
        &socket,
    ];
    args.extend_from_slice(extra);
    // An agent that starts instead runs until the 20 s timeout: an error, and the test fails.
    let line = limiter(&net.receiver_ns, &args)?.failure(&format!("agent {extra:?}"), needles);
    assert!(
        !link_has_xdp(&net.receiver_link()?),
        "a refused agent attached XDP: {}",
        net.receiver_link()?
    );
    assert!(
        !pin_dir(&net.receiver_if).exists(),
        "a refused agent pinned maps"
    );
    assert!(
        !Path::new(&socket).exists(),
        "a refused agent bound its socket"
    );
    Ok(line)
}

/// The agent never serves TCP without authentication, and never takes a token from a file that
/// others can read, or a short one.
#[test]
fn agent_refuses_an_unauthenticated_or_exposed_tcp_api() -> Result<()> {
    require_root!();
    let net = TestNet::new()?;
    let dir = TempDir::new("refuse")?;
    let listen = format!("127.0.0.1:{API_PORT}");

    let line = agent_refuses(
        &net,
        &dir,
        &["--api-listen", &listen],
        &[
            "--api-listen",
            "--api-token-file",
            "never served without authentication",
        ],
    )?;
    eprintln!("no credentials: {line}");

    for mode in [0o644, 0o640, 0o604] {
        let token = write_mode(&dir, "token", TOKEN, mode)?;
        let line = agent_refuses(
            &net,
            &dir,
            &["--api-listen", &listen, "--api-token-file", &token],
            &[&token, "readable by group or others", "chmod 600"],
        )?;
        eprintln!("token file mode {mode:o}: {line}");
    }
    let short = write_mode(&dir, "short", "short-token", 0o600)?;
    agent_refuses(
        &net,
        &dir,
        &["--api-listen", &listen, "--api-token-file", &short],
        &[&short, "at least 16 characters"],
    )?;

    // Listeners are bound before anything is loaded: a metrics port in use, or a missing TLS
    // file, stops the start with nothing attached, pinned or bound.
    let busy = net.in_receiver(|| std::net::TcpListener::bind("127.0.0.1:0"))??;
    let busy_addr = busy.local_addr()?.to_string();
    agent_refuses(
        &net,
        &dir,
        &["--metrics", &busy_addr],
        &["binding the metrics listener", &busy_addr],
    )?;
    let token = write_mode(&dir, "token", TOKEN, 0o600)?;
    let missing = dir.join("missing.pem").to_string_lossy().into_owned();
    agent_refuses(
        &net,
        &dir,
        &[
            "--api-listen",
            &listen,
            "--api-token-file",
            &token,
            "--api-tls-cert",
            &missing,
            "--api-tls-key",
            &missing,
        ],
        &["reading TLS file", &missing],
    )?;
    drop(busy);
    Ok(())
}

/// A socket path that names a regular file is refused, and the file is left alone.
#[test]
fn agent_never_replaces_a_file_at_its_socket_path() -> Result<()> {
    require_root!();
    let net = TestNet::new()?;
    let dir = TempDir::new("sockfile")?;
    let config = dir.write("limiter.yaml", AUTH_CONFIG)?;
    let state = dir.join("state").to_string_lossy().into_owned();
    let victim = dir.write("precious.txt", "do not delete")?;
    let out = limiter(
        &net.receiver_ns,
        &[
            "agent",
            "--iface",
            &net.receiver_if,
            "--config",
            &config,
            "--state-dir",
            &state,
            "--api-socket",
            &victim,
        ],
    )?;
    let line = out.failure("agent on a file", &["is not a socket"]);
    eprintln!("{line}");
    assert_eq!(fs::read_to_string(&victim)?, "do not delete");
    assert!(!link_has_xdp(&net.receiver_link()?));
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// 4. The CLI end to end
// ---------------------------------------------------------------------------------------------

const CLI_CONFIG: &str = "\
# CLI test
mode: enforce
default: {limit: 1000, window: 1h}
policies:
  - match: 198.18.0.16/28
    limit: 20
    window: 1h
  - match: tenant-acme   # an exact ID
    limit: 3
    window: 1h
";

/// `limiter check` (exit 0 allowed, 3 denied), `limits ls|get|set|rm`, `stats --api --json`,
/// `top --iterations 1` and errors, against a running agent with traffic on the XDP path.
#[test]
fn cli_commands_against_a_running_agent() -> Result<()> {
    require_root!();
    let net = TestNet::new()?;
    let (_dir, socket) = socket_dir()?;
    let agent = Agent::start_with(&net, CLI_CONFIG, &["--api-socket", &socket])?;
    let counter = net.udp_counter(UDP_PORT)?;
    let window = ExactWindow::start(TEST_SPAN);
    let ns = net.receiver_ns.clone();
    let run = |args: &[&str]| limiter(&ns, args);
    let limits = |args: &[&str]| run(&[&["limits", "--api", &socket][..], args].concat());
    // Waits for the socket.
    let generation = Api::unix(&socket, CALL_TIMEOUT)?
        .global()?
        .policy_generation;

    let busy: IpAddr = sender_v4(7).into(); // 198.18.0.17
    let got = send_and_count(&net, &counter, &[(busy, 50)])?;
    assert_eq!(got[&busy], 20);

    // check: exit 0 allowed, 3 denied; the line names the decision, limit and remaining.
    let (mut allowed, mut denied) = (0, 0);
    for remaining in [2, 1, 0] {
        let out = run(&["check", "tenant-acme", "--api", &socket])?;
        let line = out.success("check tenant-acme");
        allowed += 1;
        assert!(
            line.starts_with("tenant-acme: allowed  limit 3 per 3600s  ")
                && line.contains(&format!("  remaining {remaining}  "))
                && line.trim_end().ends_with("(policy tenant-acme, limit)"),
            "{line:?}"
        );
    }
    let out = run(&["check", "tenant-acme", "--api", &socket])?;
    denied += 1;
    assert_eq!(out.code, Some(3), "a denied check exits 3: {out:?}");
    assert!(
        out.stdout
            .starts_with("tenant-acme: denied  limit 3 per 3600s  remaining 0  ")
            && !out.stdout.contains("retry in -"),
        "{out:?}"
    );
    // An address: the packets spent it all (hits 0 reads: denied because one more would be).
    let out = run(&["check", "198.18.0.17", "--hits", "0", "--api", &socket])?;
    denied += 1;
    assert_eq!(out.code, Some(3), "{out:?}");
    assert!(
        out.stdout
            .starts_with("198.18.0.17: denied  limit 20 per 3600s  remaining 0  ")
            && out.stdout.contains("(policy 198.18.0.16/28, limit)"),
        "{out:?}"
    );
    let out = run(&["check", "198.18.0.20", "--hits", "5", "--api", &socket])?;
    allowed += 1;
    let line = out.success("check 198.18.0.20 --hits 5");
    assert!(
        line.contains("allowed") && line.contains("  remaining 15  "),
        "{line:?}"
    );

    // limits ls / get.
    assert_eq!(
        limits(&["ls"])?.success("limits ls"),
        format!(
            "LAYER                     POLICY\n\
             file                      default: limit 1000 per {HOUR}\n\
             file                      198.18.0.16/28: limit 20 per {HOUR}\n\
             file                      tenant-acme: limit 3 per {HOUR}\n"
        )
    );
    assert_eq!(
        limits(&["get", "tenant-acme"])?.success("limits get"),
        format!("tenant-acme: limit 3 per {HOUR}\n")
    );
    limits(&["get", "tenant-other"])?.failure("limits get tenant-other", &["NotFound"]);

    // limits set: same window, so the 3 spent stay spent and 2 more are left at 5.
    let out = limits(&["set", "tenant-acme", "--limit", "5", "--window", "1h"])?;
    assert_eq!(
        out.success("limits set"),
        format!(
            "set tenant-acme: limit 5 per {HOUR} (generation {})\n",
            generation + 1
        )
    );
    let line = run(&["check", "tenant-acme", "--api", &socket])?.success("check after set");
    allowed += 1;
    assert!(
        line.contains("allowed  limit 5 per 3600s  remaining 1  "),
        "{line:?}"
    );
    assert_eq!(
        fs::read_to_string(&agent.config_path)?,
        CLI_CONFIG,
        "the config file is never written"
    );
    let effective = limits(&["effective"])?.success("limits effective");
    assert!(
        effective.contains("# Set through the API: tenant-acme (overlay (overrides file)).")
            && effective.contains("limit: 5"),
        "{effective}"
    );

    // limits rm: the API's policy goes and the file's is back; a second rm removes the file's
    // from the maps and the list (not from the file); the default cannot go.
    let out = limits(&["rm", "tenant-acme"])?;
    assert_eq!(
        out.success("limits rm"),
        format!(
            "removed the API's policy; in force again from the config file: tenant-acme: limit 3 per {HOUR} (generation {})\n",
            generation + 2
        )
    );
    let out = limits(&["rm", "tenant-acme"])?;
    assert_eq!(
        out.success("limits rm"),
        format!(
            "removed tenant-acme: limit 3 per {HOUR} (generation {})\n",
            generation + 3
        )
    );
    limits(&["get", "tenant-acme"])?.failure("get after rm", &["NotFound", "tenant-acme"]);
    assert_eq!(
        limits(&["ls"])?.success("limits ls after rm"),
        format!(
            "LAYER                     POLICY\n\
             file                      default: limit 1000 per {HOUR}\n\
             file                      198.18.0.16/28: limit 20 per {HOUR}\n"
        )
    );
    assert_eq!(fs::read_to_string(&agent.config_path)?, CLI_CONFIG);
    let line = run(&["check", "tenant-acme", "--api", &socket])?.success("check after rm");
    allowed += 1;
    assert!(line.contains("limit 1000 per 3600s") && line.contains("(policy default, limit)"));
    limits(&["rm", "default"])?.failure("rm default", &["FailedPrecondition", "default"]);

    // A bad request: INVALID_ARGUMENT naming the field; nothing changes.
    let before = fs::read_to_string(&agent.config_path)?;
    limits(&["set", "10.0.0.0/33", "--limit", "1", "--window", "1s"])?.failure(
        "set 10.0.0.0/33",
        &["InvalidArgument", "policy.match", "10.0.0.0/33"],
    );
    run(&["check", "10.0.0.0/33", "--api", &socket])?
        .failure("check 10.0.0.0/33", &["InvalidArgument", "client_id"]);
    assert_eq!(fs::read_to_string(&agent.config_path)?, before);

    // stats --api --json: the packets, the checks, the busy client.
    let stats = api_stats(&ns, &socket)?;
    let global = &stats["global"];
    let (stray_passed, stray_dropped) = unspecified_counts(&stats);
    assert_eq!(
        (u64_at(global, "passed"), u64_at(global, "dropped")),
        (20 + stray_passed, 30 + stray_dropped),
        "the test's packets and those from `::`: {stats:#}"
    );
    assert_eq!(
        (
            u64_at(global, "checks_allowed"),
            u64_at(global, "checks_denied")
        ),
        (allowed, denied),
        "{global}"
    );
    assert_eq!(u64_at(&stats, "generation"), generation + 3, "{stats}");
    assert_eq!(stats["attached"], true, "{stats}");
    assert_eq!(stats["dry_run"], false, "{stats}");
    let row = api_row(&stats, "198.18.0.17");
    assert_eq!(row["policy"], "198.18.0.16/28", "{row}");
    assert_eq!(row["action"], "limit", "{row}");
    assert_eq!(row["window_ms"].as_f64(), Some(3_600_000.0), "{row}");
    assert_eq!(
        (
            u64_at(row, "limit"),
            u64_at(row, "passed"),
            u64_at(row, "dropped")
        ),
        (20, 20, 30),
        "{row}"
    );
    assert_eq!(u64_at(row, "estimate"), 20, "{row}");

    // top: one refresh, with the header and the busy client first.
    let out = run(&["top", "--iterations", "1", "-n", "5", "--api", &socket])?;
    let text = out.success("top --iterations 1");
    let mut lines = text.lines();
    let title = lines.next().unwrap_or_default();
    assert!(
        title.starts_with(&format!(
            "limiter top  packets passed {}  dropped {}  ",
            global["passed"], global["dropped"]
        )),
        "{text}"
    );
    // The one client held in `LIMITED` (198.18.0.17, below).
    assert!(title.contains("  held 1  "), "{text}");
    let header = lines.find(|l| !l.is_empty()).unwrap_or_default();
    let columns: Vec<&str> = header.split_whitespace().collect();
    assert_eq!(
        columns,
        [
            "CLIENT",
            "POLICY",
            "ACTION",
            "ALLOWANCE",
            "WINDOW",
            "SCALE",
            "UTIL",
            "RATE/S",
            "REMAINING",
            "PASSED",
            "DROPPED"
        ],
        "{text}"
    );
    let first: Vec<&str> = lines
        .next()
        .unwrap_or_default()
        .split_whitespace()
        .collect();
    assert_eq!(
        first,
        [
            "198.18.0.17",
            "198.18.0.16/28",
            // Held in `LIMITED` since its first dropped packet.
            "(held)",
            "limit",
            "20",
            "3600s",
            "1.00",
            "1.00",
            "0.0",
            "0",
            "20",
            "30"
        ],
        "the busy client first: {text}"
    );

    // `--action pass|drop`: the busy client is allow-listed, another address blocked.
    let blocked: IpAddr = sender_v4(11).into(); // 198.18.0.21
    let line = limits(&["set", "198.18.0.17", "--action", "pass"])?.success("set --action pass");
    assert!(
        line.starts_with("set 198.18.0.17: pass (generation "),
        "{line}"
    );
    let line = limits(&["set", "198.18.0.21", "--action", "drop"])?.success("set --action drop");
    assert!(
        line.starts_with("set 198.18.0.21: drop (generation "),
        "{line}"
    );
    limits(&["set", "198.18.0.22", "--action", "pass", "--limit", "5"])?
        .failure("pass with a limit", &["InvalidArgument", "policy.limit"]);
    let listed = limits(&["ls"])?.success("limits ls after pass/drop");
    assert!(
        listed.ends_with(
            "overlay                   198.18.0.17: pass\n\
             overlay                   198.18.0.21: drop\n"
        ),
        "{listed}"
    );
    let got = send_and_count(&net, &counter, &[(busy, 30), (blocked, 10)])?;
    window.check();
    assert_eq!(got[&busy], 30, "allow-listed through the API");
    assert_eq!(got[&blocked], 0, "blocked through the API");
    Ok(())
}

/// The client commands take `--api` after the subcommand, as the README writes them
/// (`limiter limits set 10.0.0.0/8 --limit 100 --window 1s`, plus `--api`).
#[test]
fn limits_takes_api_options_after_the_subcommand() -> Result<()> {
    require_root!();
    let net = TestNet::new()?;
    let (_dir, socket) = socket_dir()?;
    let _agent = Agent::start_with(&net, CLI_CONFIG, &["--api-socket", &socket])?;
    Api::unix(&socket, CALL_TIMEOUT)?;
    let ns = &net.receiver_ns;
    limiter(
        ns,
        &[
            "limits",
            "set",
            "198.18.0.16/28",
            "--limit",
            "25",
            "--window",
            "1h",
            "--api",
            &socket,
        ],
    )?
    .success("limits set ... --api SOCKET");
    let out = limiter(ns, &["limits", "get", "198.18.0.16/28", "--api", &socket])?;
    assert_eq!(
        out.success("limits get ... --api SOCKET"),
        format!("198.18.0.16/28: limit 25 per {HOUR}\n")
    );
    limiter(ns, &["limits", "ls", "--api", &socket])?.success("limits ls --api SOCKET");
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// 5. Metrics
// ---------------------------------------------------------------------------------------------

const METRICS_CONFIG: &str = "\
mode: enforce
default: {limit: 1000, window: 1h}
policies:
  - match: 198.18.0.16/28
    limit: 20
    window: 1h
";

/// `--metrics`: the packet counters match what the receiver saw, checks are counted by result,
/// reloads of the file and API changes each in their own counter (an API change, written back
/// to the file, is not also counted as a reload), and rejected configs and API errors counted.
#[test]
fn metrics_count_packets_checks_reloads_and_errors() -> Result<()> {
    require_root!();
    let net = TestNet::new()?;
    let (_dir, socket) = socket_dir()?;
    let metrics_addr = format!("127.0.0.1:{METRICS_PORT}");
    let agent = Agent::start_with(
        &net,
        METRICS_CONFIG,
        &["--api-socket", &socket, "--metrics", &metrics_addr],
    )?;
    let counter = net.udp_counter(UDP_PORT)?;
    let window = ExactWindow::start(TEST_SPAN);
    let iface = net.receiver_if.clone();
    let mut api = Api::unix(&socket, CALL_TIMEOUT)?;

    let http = wait_until(
        "the metrics endpoint answers",
        Duration::from_secs(10),
        || Ok(get_metrics(&net, METRICS_PORT).ok()),
    )?;
    assert_eq!(http.status, 200, "{}", http.head);
    assert!(
        http.head
            .to_ascii_lowercase()
            .contains("content-type: text/plain; version=0.0.4"),
        "{}",
        http.head
    );
    let (start, start_counts) = scrape_counts(&net, &iface, &mut api)?;
    assert_eq!(start.value("limiter_attached", ""), 1);
    assert_eq!(start.value("limiter_dry_run", ""), 0);
    assert_eq!(start.value("limiter_config_reloads_total", ""), 0);
    // The resident counts come from the agent's walk of the client maps (taken at most every
    // 30 s): both kinds are there, the API's ID clients none yet.
    assert!(
        start
            .get("limiter_clients_active", ",kind=\"address\"")
            .is_some()
    );
    assert_eq!(start.value("limiter_clients_active", ",kind=\"id\""), 0);
    let generation = start.value("limiter_policy_generation", "");
    assert_eq!(generation, api.global()?.policy_generation);
    assert_eq!(start_counts, (0, 0), "no test packet yet");

    // Packets: 20 of 50 pass.
    let src: IpAddr = sender_v4(7).into();
    let got = send_and_count(&net, &counter, &[(src, 50)])?;
    let (_after, after_counts) = scrape_counts(&net, &iface, &mut api)?;
    assert_eq!(got[&src], 20);
    assert_eq!(
        after_counts,
        (got[&src], 50 - got[&src]),
        "the packet counters against the receiver"
    );

    // Checks, by result.
    for _ in 0..3 {
        assert!(api.check("tenant-metrics", 1)?.allowed);
    }
    assert!(!api.check("198.18.0.17", 1)?.allowed);
    let (checked, checked_counts) = scrape_counts(&net, &iface, &mut api)?;
    assert_eq!(
        checked.value("limiter_checks_total", ",result=\"allowed\""),
        3
    );
    assert_eq!(
        checked.value("limiter_checks_total", ",result=\"denied\""),
        1
    );
    assert_eq!(checked_counts, (20, 30), "checks are not packets");

    // A reload of the file: counted, generation bumped, and the raise reaches the packets.
    let (new_generation, took) = agent.reload(
        &METRICS_CONFIG.replace("limit: 20", "limit: 25"),
        Duration::from_secs(5),
    )?;
    eprintln!("file reload applied in {took:?}");
    let reloaded = scrape(&net, &iface)?;
    assert_eq!(reloaded.value("limiter_config_reloads_total", ""), 1);
    assert_eq!(
        reloaded.value("limiter_policy_generation", ""),
        new_generation
    );
    assert_eq!(new_generation, generation + 1);
    // The denied check took nothing: 5 more at 25.
    let got = send_and_count(&net, &counter, &[(src, 10)])?;
    assert_eq!(got[&src], 5);
    let (_raised, raised_counts) = scrape_counts(&net, &iface, &mut api)?;
    assert_eq!(raised_counts, (25, 35));

    // A rejected config: counted, nothing applied.
    agent.write_config("default: {limit: 7, window: 5x}\n")?;
    let rejected = wait_until(
        "the rejected config is counted",
        Duration::from_secs(3),
        || {
            let m = scrape(&net, &iface)?;
            Ok((m.value("limiter_config_rejects_total", "") == 1).then_some(m))
        },
    )?;
    assert_eq!(rejected.value("limiter_config_reloads_total", ""), 1);
    assert_eq!(
        rejected.value("limiter_policy_generation", ""),
        new_generation
    );

    // Put a valid file back (a reload), then change a limit through the API: an API change, not
    // a reload, even after the watcher has seen the file it wrote.
    agent.reload(METRICS_CONFIG, Duration::from_secs(5))?;
    api.set(hourly("198.18.0.16/28", 30))?;
    thread::sleep(Duration::from_millis(600)); // three polls of the file
    let changed = scrape(&net, &iface)?;
    assert_eq!(changed.value("limiter_api_limit_changes_total", ""), 1);
    assert_eq!(changed.value("limiter_config_reloads_total", ""), 2);
    assert_eq!(
        changed.value("limiter_policy_generation", ""),
        generation + 3
    );

    // API errors, by code.
    let bad = api.set(hourly("10.0.0.0/33", 1)).unwrap_err();
    assert_eq!(bad.code(), Code::InvalidArgument, "{bad:?}");
    let missing = api.check("", 1).unwrap_err();
    assert_eq!(missing.code(), Code::InvalidArgument, "{missing:?}");
    let errors = scrape(&net, &iface)?;
    window.check();
    assert_eq!(
        errors.get("limiter_api_errors_total", ",code=\"InvalidArgument\""),
        Some(2),
        "two INVALID_ARGUMENT answers; the API error counter:\n{}",
        errors
            .body
            .lines()
            .filter(|l| l.contains("limiter_api_errors_total"))
            .collect::<Vec<_>>()
            .join("\n")
    );
    Ok(())
}
