//! Fault tolerance of `limiter agent` (README, "Fault tolerance"): a crash in the middle of a
//! flood, crashes while a snapshot is being written, a simulated reboot, bad snapshot files, a
//! pinned map layout of another version, another tool's XDP program, and `limiter detach` under
//! a running agent. Root only; run one at a time (`--test-threads=1`).
//!
//! Every policy uses `window: 1h`, so a fresh client is admitted exactly `limit` packets as long
//! as no hour boundary of CLOCK_MONOTONIC falls inside the test ([`ExactWindow`]).
//!
//! Tests that need to control the agent's `--state-dir` (the harness's [`Agent`] gives each agent
//! a private one) run the agent through [`Daemon`], a small guard of this file: it logs to a file
//! in a [`TempDir`] and stops the agent when dropped, before the [`TestNet`] (declared earlier)
//! removes the namespaces and the pins.

#![expect(
    clippy::expect_used,
    reason = "test helpers outside #[test] functions; a panic there is the test failing"
)]

use std::{
    fs,
    net::{IpAddr, Ipv6Addr, UdpSocket},
    os::unix::process::CommandExt as _,
    path::{Path, PathBuf},
    process::{Child, Command, ExitStatus, Stdio},
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail, ensure};
use aya::{
    maps::{Array, Map, MapData},
    programs::Xdp,
};
use limiter_common::{
    ClientState,
    addr::{ClientKey, v4_mapped},
    maps::LAYOUT_VERSION,
    window::{slot, slot_of},
};
use limiter_tests::{
    agent::{Agent, client_counts, limiter_command, link_has_xdp, run_limiter, stats_json},
    clock::monotonic,
    fixture::{ExactWindow, TempDir, emulated},
    netns::{RECEIVER_V4, TestNet, pin_dir, sender_v4},
    require_root,
    traffic::{UDP_PORT, receiver_for, send_and_count},
};
use limiter_user::{
    datapath::{self, LoadOptions},
    snapshot::{Clocks, Snapshot, SnapshotError},
};

/// UDP port the receiver listens on.
/// Longest any one test's exact-count phase may take; the hour window must not end inside it.
const TEST_SPAN: Duration = Duration::from_secs(60);
const HOUR: Duration = Duration::from_secs(3600);
const HOUR_US: u32 = 3_600_000_000;

/// A file (a bpffs pin) removed on drop.
struct RemoveOnDrop(PathBuf);

impl Drop for RemoveOnDrop {
    fn drop(&mut self) {
        let _ = fs::remove_file(&self.0);
    }
}

// ---------------------------------------------------------------------------------------------
// Traffic
// ---------------------------------------------------------------------------------------------

/// Sends up to `count` datagrams at `rate` per second on a fixed schedule (so a late wake-up
/// catches up), adding each one to `sent`, until `stop` is set.
fn flood(
    socket: &UdpSocket,
    count: u64,
    rate: f64,
    sent: &AtomicU64,
    stop: &AtomicBool,
) -> Result<()> {
    let start = Instant::now();
    let mut payload = *b"limiter-ft-flood--------";
    for seq in 0..count {
        if stop.load(Ordering::Relaxed) {
            break;
        }
        let due = start + Duration::from_secs_f64(seq as f64 / rate);
        if let Some(wait) = due.checked_duration_since(Instant::now()) {
            thread::sleep(wait);
        }
        payload[16..24].copy_from_slice(&seq.to_be_bytes());
        let mut attempts = 0;
        loop {
            match socket.send_to(&payload, receiver_for(RECEIVER_V4.into())) {
                Ok(_) => break,
                Err(e) if attempts < 100 && e.raw_os_error() == Some(libc::ENOBUFS) => {
                    attempts += 1;
                    thread::sleep(Duration::from_millis(1));
                }
                Err(e) => return Err(e).context("flooding"),
            }
        }
        sent.fetch_add(1, Ordering::Relaxed);
    }
    Ok(())
}

/// Waits (at most `timeout`) until `cond` holds.
fn wait_until(timeout: Duration, what: &str, mut cond: impl FnMut() -> bool) -> Result<()> {
    let deadline = Instant::now() + timeout;
    while !cond() {
        ensure!(
            Instant::now() < deadline,
            "timed out after {timeout:?}: {what}"
        );
        thread::sleep(Duration::from_millis(5));
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// Inspecting the interface, the pins and the agent
// ---------------------------------------------------------------------------------------------

/// `ip -n NS link show DEV`.
fn ip_link(ns: &str, dev: &str) -> Result<String> {
    let out = Command::new("ip")
        .args(["-n", ns, "link", "show", dev])
        .output()
        .context("running `ip link show`")?;
    ensure!(
        out.status.success(),
        "`ip -n {ns} link show {dev}` failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// `(id, name)` of the XDP program `ip link show` lists (`prog/xdp id N name NAME ...`).
fn xdp_prog(link: &str) -> Option<(u64, String)> {
    let mut words = link.split_whitespace().skip_while(|w| *w != "prog/xdp");
    words.next()?;
    let mut id = None;
    let mut name = String::new();
    while let Some(w) = words.next() {
        match w {
            "id" => id = words.next().and_then(|v| v.parse().ok()),
            "name" => name = words.next().unwrap_or_default().to_owned(),
            "tag" => break,
            _ => {}
        }
    }
    Some((id?, name))
}

/// `limiter detach --iface IFACE` in `ns`; fails unless it succeeds.
fn limiter_detach(ns: &str, iface: &str) -> Result<String> {
    let out = run_limiter(ns, &["detach", "--iface", iface])?;
    ensure!(
        out.status.success(),
        "`limiter detach --iface {iface}` failed ({}): {}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// The lines of `log` that contain `needle`.
fn lines_with<'a>(log: &'a str, needle: &str) -> Vec<&'a str> {
    log.lines().filter(|l| l.contains(needle)).collect()
}

/// Names in `dir` that start with `prefix`.
fn files_starting_with(dir: &Path, prefix: &str) -> Vec<String> {
    fs::read_dir(dir)
        .map(|entries| {
            entries
                .filter_map(Result::ok)
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .filter(|n| n.starts_with(prefix))
                .collect()
        })
        .unwrap_or_default()
}

/// The value at index 0 of the pinned `LAYOUT` map of `iface`.
fn pinned_layout(iface: &str) -> Result<u32> {
    let path = pin_dir(iface).join("LAYOUT");
    let data = MapData::from_pin(&path).with_context(|| format!("opening {}", path.display()))?;
    let layout: Array<MapData, u32> = Array::try_from(Map::from_map_data(data)?)?;
    Ok(layout.get(&0, 0)?)
}

// ---------------------------------------------------------------------------------------------
// An agent with a state directory of the test's choosing
// ---------------------------------------------------------------------------------------------

/// `limiter agent --iface RECEIVER_IF --config CONFIG --xdp-mode native --max-clients N
/// --state-dir DIR [EXTRA...]` in the receiver namespace, logging to a file. Dropping it stops
/// the agent (SIGTERM, SIGKILL after 10 s).
struct Daemon {
    child: Option<Child>,
    log: PathBuf,
    ns: String,
    iface: String,
    exit: Option<ExitStatus>,
}

impl Daemon {
    fn spawn(
        net: &TestNet,
        config: &Path,
        state_dir: &Path,
        max_clients: u32,
        log: PathBuf,
        extra: &[&str],
    ) -> Result<Daemon> {
        let file = fs::File::create(&log).with_context(|| format!("creating {}", log.display()))?;
        let (config, state_dir, max_clients) = (
            config.to_string_lossy().into_owned(),
            state_dir.to_string_lossy().into_owned(),
            max_clients.to_string(),
        );
        let mut args = vec![
            "agent",
            "--iface",
            &net.receiver_if,
            "--config",
            &config,
            "--xdp-mode",
            "native",
            "--max-clients",
            &max_clients,
            "--state-dir",
            &state_dir,
        ];
        args.extend_from_slice(extra);
        let mut command = limiter_command(&net.receiver_ns, &args);
        command
            .stdin(Stdio::null())
            .stdout(file.try_clone()?)
            .stderr(file)
            .process_group(0);
        let child = command.spawn().context("starting the agent")?;
        Ok(Daemon {
            child: Some(child),
            log,
            ns: net.receiver_ns.clone(),
            iface: net.receiver_if.clone(),
            exit: None,
        })
    }

    fn log(&self) -> String {
        fs::read_to_string(&self.log).unwrap_or_default()
    }

    fn exited(&mut self) -> Result<Option<ExitStatus>> {
        if self.exit.is_none()
            && let Some(child) = self.child.as_mut()
            && let Some(status) = child.try_wait()?
        {
            self.exit = Some(status);
            self.child = None;
        }
        Ok(self.exit)
    }

    /// Waits until the agent logged "ready:" and `ip link` shows an XDP program.
    fn wait_ready(&mut self, timeout: Duration) -> Result<Duration> {
        let start = Instant::now();
        loop {
            if let Some(status) = self.exited()? {
                bail!(
                    "the agent exited ({status}) before it was ready; its log:\n{}",
                    self.log()
                );
            }
            if self.log().contains("ready:") && link_has_xdp(&ip_link(&self.ns, &self.iface)?) {
                return Ok(start.elapsed());
            }
            if start.elapsed() >= timeout {
                bail!(
                    "the agent was not ready within {timeout:?}; its log:\n{}",
                    self.log()
                );
            }
            thread::sleep(Duration::from_millis(10));
        }
    }

    /// SIGKILL (a crash), then reap.
    fn kill(&mut self) -> Result<ExitStatus> {
        if let Some(status) = self.exited()? {
            bail!(
                "the agent had already exited ({status}); its log:\n{}",
                self.log()
            );
        }
        let mut child = self.child.take().expect("a running agent");
        let killed = child.kill();
        let status = child.wait()?;
        killed?;
        self.exit = Some(status);
        Ok(status)
    }

    /// SIGTERM, then wait (SIGKILL after 10 s).
    fn terminate(&mut self) -> Result<ExitStatus> {
        if let Some(status) = self.exited()? {
            return Ok(status);
        }
        let mut child = self.child.take().expect("a running agent");
        let status = limiter_tests::command::terminate(&mut child, Duration::from_secs(10))?;
        self.exit = Some(status);
        Ok(status)
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if let Err(e) = self.terminate() {
            eprintln!("warning: stopping the agent: {e:#}");
        }
        if thread::panicking() {
            eprintln!(
                "---- agent log ({}) ----\n{}----",
                self.log.display(),
                self.log()
            );
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Snapshots built by the test
// ---------------------------------------------------------------------------------------------

/// The current index of the hour window (the tag the XDP program writes into a slot).
fn hour_index() -> u64 {
    monotonic().as_nanos() as u64 / HOUR.as_nanos() as u64
}

/// A client of a `limit`/1h policy that has used `used` packets in the current hour, with
/// `dropped` lifetime drops.
fn hour_client(limit: u32, used: u32, passed: u64, dropped: u64) -> ClientState {
    let index = hour_index();
    let mut slots = [0u64; 2];
    slots[slot_of(index)] = slot(index as u32, used);
    ClientState {
        slots,
        passed,
        dropped,
        limit,
        window_us: HOUR_US,
    }
}

/// A snapshot of `entries` taken now, on this boot.
fn snapshot_now(entries: Vec<(ClientKey, ClientState)>) -> Snapshot {
    let clocks = Clocks::now();
    Snapshot {
        wall_ns: clocks.wall_ns,
        mono_ns: clocks.mono_ns,
        boot_id: clocks.boot_id,
        entries,
    }
}

/// Client key `i` in 2001:db8::/64 (documentation space; no test traffic comes from there).
fn doc_key(i: u64) -> ClientKey {
    Ipv6Addr::new(
        0x2001,
        0xdb8,
        0,
        0,
        0,
        (i >> 32) as u16,
        (i >> 16) as u16,
        i as u16,
    )
    .octets()
}

/// xorshift64*: a deterministic PRNG for kill moments (no dependency).
struct XorShift(u64);

impl XorShift {
    fn next(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.0 = x;
        x.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

// ---------------------------------------------------------------------------------------------
// 1. kill -9 in the middle of a flood
// ---------------------------------------------------------------------------------------------

/// A crash mid-flood: while the agent is dead the pinned link keeps the program attached and
/// dropping, and the next agent swaps its program into that link and adopts the counters, so
/// the flooding client never gets a fresh allowance.
#[test]
fn kill_9_mid_flood_neither_pauses_enforcement_nor_resets_the_flooder() -> Result<()> {
    require_root!();
    const LIMIT: u64 = 100;
    // An upper bound: the flood runs until the restarted agent has seen 300 more packets
    // (however long the restart takes on a slow, e.g. emulated, machine), at most 30 s.
    const FLOOD: u64 = 30_000;
    const RATE: f64 = 1000.0;
    let started = Instant::now();
    let config = format!("default: {{limit: {LIMIT}, window: 1h}}\n");
    let net = TestNet::new()?;
    let counter = net.udp_counter(UDP_PORT)?;
    let window = ExactWindow::start(TEST_SPAN);
    let flooder: IpAddr = sender_v4(3).into();
    let bystander: IpAddr = sender_v4(4).into();

    let mut first = Agent::start(&net, &config)?;
    // Its guard must not remove the pins the next agent adopts.
    first.keep_pins();
    let generation = first.generation()?;
    let (prog_before, name) = xdp_prog(&net.receiver_link()?).context("no XDP program")?;
    assert_eq!(name, "limiter");

    let sent = Arc::new(AtomicU64::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let socket = net.udp_sender(flooder)?;
    let sender = {
        let (sent, stop) = (Arc::clone(&sent), Arc::clone(&stop));
        thread::spawn(move || flood(&socket, FLOOD, RATE, &sent, &stop))
    };

    // Mid-flood: the limit is long used up, the program drops.
    wait_until(Duration::from_secs(10), "600 packets sent", || {
        sent.load(Ordering::Relaxed) >= 600
    })?;
    let status = first.kill()?;
    let sent_at_kill = sent.load(Ordering::Relaxed);
    assert!(!status.success(), "SIGKILL exit status {status}");
    let dead_since = Instant::now();
    let link = net.receiver_link()?;
    assert!(
        link_has_xdp(&link),
        "the program should stay attached after kill -9: {link}"
    );
    assert!(pin_dir(&net.receiver_if).join("link").exists());
    let dropped_at_kill =
        client_counts(&stats_json(&net.receiver_ns, &net.receiver_if)?, flooder).1;

    // While the agent is dead: nothing more gets through, and the drops go on (the pinned
    // counters keep counting, so the packets reach the program and are dropped there).
    let mut samples = 0;
    while dead_since.elapsed() < Duration::from_millis(700) {
        let got = counter.count(flooder);
        assert!(
            got <= LIMIT,
            "{got} received from the flooder while the agent was dead (limit {LIMIT})"
        );
        assert!(link_has_xdp(&net.receiver_link()?), "program detached");
        samples += 1;
        thread::sleep(Duration::from_millis(50));
    }
    let stats = stats_json(&net.receiver_ns, &net.receiver_if)?;
    let (passed_dead, dropped_dead) = client_counts(&stats, flooder);
    let sent_dead = sent.load(Ordering::Relaxed);
    eprintln!(
        "agent dead for {:?} ({samples} samples): sent {sent_at_kill} -> {sent_dead}, \
         dropped {dropped_at_kill} -> {dropped_dead}, passed {passed_dead}",
        dead_since.elapsed()
    );
    assert_eq!(passed_dead, LIMIT, "passed while the agent was dead");
    assert!(
        dropped_dead >= dropped_at_kill + (sent_dead - sent_at_kill) / 2,
        "drops did not continue while the agent was dead: {dropped_at_kill} -> {dropped_dead} \
         while {} more packets were sent",
        sent_dead - sent_at_kill
    );
    assert_eq!(counter.count(flooder), LIMIT);

    // Restart on the same interface while the flood goes on.
    let restart = Instant::now();
    let second = Agent::start(&net, &config)?;
    second.wait_generation(generation + 1, Duration::from_secs(15))?;
    ensure!(
        second.wait_for_stderr("ready:", Duration::from_secs(15)),
        "the second agent never logged ready; its stderr:\n{}",
        second.stderr()
    );
    let sent_at_ready = sent.load(Ordering::Relaxed);
    eprintln!(
        "second agent ready after {:?}, with {sent_at_ready} of {FLOOD} sent",
        restart.elapsed()
    );
    assert!(
        second
            .stderr()
            .contains("replaced the program in the pinned XDP link"),
        "the second agent should take over the pinned link; its stderr:\n{}",
        second.stderr()
    );
    let (prog_after, name) = xdp_prog(&net.receiver_link()?).context("no XDP program")?;
    assert_eq!(name, "limiter");
    assert_ne!(
        prog_after, prog_before,
        "the second agent's program should be the one attached"
    );
    assert!(
        sent_at_ready < FLOOD,
        "the flood ended before the second agent was ready: not a mid-flood restart"
    );

    wait_until(
        Duration::from_secs(10),
        "300 packets after the restart",
        || sent.load(Ordering::Relaxed) >= (sent_at_ready + 300).min(FLOOD),
    )?;
    stop.store(true, Ordering::Relaxed);
    sender.join().expect("flood thread panicked")?;
    let total = sent.load(Ordering::Relaxed);
    // A bystander after the restart: the new program enforces with the same policy.
    let got = send_and_count(&net, &counter, &[(bystander, 3 * LIMIT)])?;
    let stats = second.stats()?;
    window.check();
    assert_eq!(
        counter.count(flooder),
        LIMIT,
        "the flooder got more than its limit over the whole test (kill and restart included)"
    );
    assert_eq!(got[&bystander], LIMIT);
    assert_eq!(
        client_counts(&stats, flooder),
        (LIMIT, total - LIMIT),
        "every flood packet reached the program, before, during and after the crash"
    );
    eprintln!("took {:?}", started.elapsed());
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// 2. kill -9 at random moments while snapshots are being written
// ---------------------------------------------------------------------------------------------

/// 200k restored clients make every periodic snapshot (every 100 ms) big; 20 crashes at random
/// moments, each followed by a loss of the pins (`limiter detach`) and a restart from the
/// snapshot, never leave a partial or corrupt snapshot.
#[test]
fn kill_9_while_snapshotting_always_leaves_a_whole_snapshot() -> Result<()> {
    require_root!();
    const CLIENTS: u64 = 200_000;
    // Under emulation each round (a start that verifies the programs and restores 200k
    // clients) takes several times as long; there the kernel's side is what is new, and eight
    // rounds (four kills forced into a write) try it. The host's run tries twenty.
    let rounds: u32 = if emulated() { 8 } else { 20 };
    const MAX_CLIENTS: u32 = 262_144;
    let started = Instant::now();
    let seed = std::env::var("LIMITER_FT_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(0x9e37_79b9_7f4a_7c15 ^ u64::from(std::process::id()))
        | 1;
    eprintln!("PRNG seed {seed} (rerun with LIMITER_FT_SEED={seed})");
    let mut rng = XorShift(seed);

    let net = TestNet::new()?;
    let dir = TempDir::new("snapkill")?;
    let config = dir.join("limiter.yaml");
    fs::write(&config, "default: {limit: 100, window: 1h}\n")?;
    let state = dir.join("state");
    let path = state.join(format!("{}.snapshot", net.receiver_if));
    // The writer's temporary files: `.IFACE.snapshot.<random>.tmp` (limiter_user::state_file).
    let tmp_prefix = format!(".{}.snapshot.", net.receiver_if);
    let temps = || -> Vec<PathBuf> {
        fs::read_dir(&state)
            .map(|d| {
                d.filter_map(Result::ok)
                    .filter(|e| {
                        let name = e.file_name().to_string_lossy().into_owned();
                        name.starts_with(&tmp_prefix) && name.ends_with(".tmp")
                    })
                    .map(|e| e.path())
                    .collect()
            })
            .unwrap_or_default()
    };
    let corrupt_prefix = format!("{}.snapshot.corrupt-", net.receiver_if);

    let mut expected: Vec<(ClientKey, ClientState)> = (0..CLIENTS)
        .map(|i| {
            let mut state = hour_client(100, (i % 100) as u32, i, i % 13);
            state.set_policy((i % 3) as u16);
            (doc_key(i), state)
        })
        .collect();
    let t = Instant::now();
    let initial = snapshot_now(expected.clone());
    initial.write(&path)?;
    expected.sort_unstable_by_key(|e| e.0);
    eprintln!(
        "wrote a {CLIENTS}-client snapshot ({} bytes) in {:?}",
        fs::metadata(&path)?.len(),
        t.elapsed()
    );

    let spawn = |round: u32| {
        Daemon::spawn(
            &net,
            &config,
            &state,
            MAX_CLIENTS,
            dir.join(format!("agent-{round}.log")),
            &["--snapshot-interval", "100ms", "-v"],
        )
    };
    let mut agent = spawn(0)?;
    let mut ready_times = Vec::new();
    let (mut mid_write, mut advanced) = (0, 0);
    let mut last_wall = initial.wall_ns;
    for round in 1..=rounds {
        ready_times.push(agent.wait_ready(Duration::from_secs(30))?);
        let log = agent.log();
        let restored = lines_with(&log, "restored client state");
        let count = restored.first().and_then(|l| {
            l.split_whitespace()
                .find_map(|w| w.strip_prefix("clients="))
                .and_then(|n| n.parse::<u64>().ok())
        });
        // At least the test's clients (plus whatever else the limiter saw on the veth).
        assert!(
            restored.len() == 1 && count.is_some_and(|n| n >= CLIENTS),
            "round {round}: the agent should restore {CLIENTS} clients; its log:\n{log}"
        );

        // Odd rounds kill at a random moment 100-400 ms after ready (the first periodic
        // snapshot starts one interval, 100 ms, after ready and takes ~200 ms with a debug
        // build): in a write, between writes or in the next. Even rounds wait for a write to
        // begin (its temporary file appears) and kill 0-20 ms into it, so some kills land in
        // a write however fast or slow (emulated) the machine is.
        let pause = if round % 2 == 0 {
            wait_until(Duration::from_secs(60), "a snapshot write to begin", || {
                !temps().is_empty()
            })?;
            Duration::from_millis(rng.below(21))
        } else {
            Duration::from_millis(100 + rng.below(301))
        };
        thread::sleep(pause);
        let status = agent.kill()?;
        assert!(!status.success());
        let interrupted = !temps().is_empty();
        mid_write += u32::from(interrupted);
        let log = agent.log();
        assert!(
            !log.contains("snapshot unusable") && !log.contains("ERROR"),
            "round {round}: {log}"
        );

        let t = Instant::now();
        let snapshot = Snapshot::load(&path, u64::MAX)
            .with_context(|| format!("round {round}: loading the snapshot"))?
            .with_context(|| {
                format!("round {round}: no usable snapshot left after kill -9 (moved aside?)")
            })?;
        let load_time = t.elapsed();
        let corrupt = files_starting_with(&state, &corrupt_prefix);
        assert!(corrupt.is_empty(), "round {round}: {corrupt:?}");
        // Only the test's clients: anything else is traffic the limiter saw on the veth.
        let (mut entries, others): (Vec<_>, Vec<_>) = snapshot
            .entries
            .into_iter()
            .partition(|(key, _)| key[..8] == doc_key(0)[..8]);
        if !others.is_empty() {
            eprintln!(
                "round {round}: other clients in the snapshot: {:?}",
                others
                    .iter()
                    .map(|(k, s)| (Ipv6Addr::from(*k), s.total_passed(), s.dropped_count()))
                    .collect::<Vec<_>>()
            );
        }
        assert_eq!(entries.len() as u64, CLIENTS, "round {round}");
        entries.sort_unstable_by_key(|e| e.0);
        let differing = entries
            .iter()
            .zip(&expected)
            .filter(|(a, b)| a != b)
            .count();
        assert_eq!(
            differing,
            0,
            "round {round}: {differing} entries differ, first: {:?}",
            entries.iter().zip(&expected).find(|(a, b)| a != b)
        );
        if snapshot.wall_ns > last_wall {
            advanced += 1;
            last_wall = snapshot.wall_ns;
        }
        // `-v` makes the agent log each snapshot it completed, with how long it took.
        let writes: Vec<&str> = lines_with(&log, "snapshot written")
            .iter()
            .filter_map(|l| l.split_whitespace().find(|w| w.starts_with("took=")))
            .collect();
        eprintln!(
            "round {round:2}: killed after {pause:>5?}{}; snapshot taken at {} ms, \
             loaded in {load_time:?}; writes completed by this agent: {writes:?}",
            if interrupted { " (mid-write)" } else { "" },
            snapshot.mono_ns / 1_000_000,
        );
        // The agent is dead: the temporary file it may have left says nothing about the next
        // round, so it goes (the next agent's first write would remove it too).
        for tmp in temps() {
            let _ = fs::remove_file(tmp);
        }

        // Lose the pins (as a reboot would), then start again from the snapshot.
        limiter_detach(&net.receiver_ns, &net.receiver_if)?;
        assert!(!pin_dir(&net.receiver_if).exists());
        assert!(!link_has_xdp(&net.receiver_link()?));
        agent = spawn(round)?;
    }
    agent.wait_ready(Duration::from_secs(30))?;
    let status = agent.terminate()?;
    assert!(status.success(), "final SIGTERM: {status}\n{}", agent.log());
    let last = Snapshot::load(&path, u64::MAX)?.context("no snapshot after SIGTERM")?;
    let ours = last
        .entries
        .iter()
        .filter(|(key, _)| key[..8] == doc_key(0)[..8]);
    assert_eq!(ours.count() as u64, CLIENTS);
    assert!(files_starting_with(&state, &corrupt_prefix).is_empty());

    ready_times.sort();
    eprintln!(
        "{rounds} kills: {mid_write} interrupted a snapshot write, after {advanced} the snapshot \
         was newer than before (a write the agent completed); agent ready in {:?}..{:?}; \
         total {:?}",
        ready_times[0],
        ready_times[ready_times.len() - 1],
        started.elapsed()
    );
    assert!(
        mid_write > 0,
        "no kill landed while a snapshot was being written; the test proved nothing"
    );
    Ok(())
}

/// Periodic snapshots take at most 1/20 of a CPU (`limiter_user::snapshot::periodic_gap`):
/// with 200k clients and `--snapshot-interval 100ms`, where each snapshot takes tens of
/// milliseconds of CPU or more, the agent says once that it stretched the interval, and no more
/// snapshots are written than fit at 20 times the least CPU time apart in the agent's whole
/// life before the log is read (unpaced, they run back to back: about 18 in the run).
#[test]
fn periodic_snapshots_keep_to_their_cpu_share() -> Result<()> {
    require_root!();
    const CLIENTS: u64 = 200_000;
    const RUN: Duration = Duration::from_secs(4);
    let net = TestNet::new()?;
    let dir = TempDir::new("snappace")?;
    let config = dir.join("limiter.yaml");
    fs::write(&config, "default: {limit: 100, window: 1h}\n")?;
    let state = dir.join("state");
    let path = state.join(format!("{}.snapshot", net.receiver_if));
    snapshot_now(
        (0..CLIENTS)
            .map(|i| (doc_key(i), hour_client(100, (i % 100) as u32, i, i % 13)))
            .collect(),
    )
    .write(&path)?;
    let spawned = Instant::now();
    let mut agent = Daemon::spawn(
        &net,
        &config,
        &state,
        262_144,
        dir.join("agent.log"),
        &["--snapshot-interval", "100ms", "-v"],
    )?;
    agent.wait_ready(Duration::from_secs(30))?;
    thread::sleep(RUN);
    let log = agent.log();
    // Every snapshot in the log started after the spawn and before this.
    let life = spawned.elapsed();
    let status = agent.terminate()?;
    assert!(status.success(), "SIGTERM: {status}\n{}", agent.log());
    // The periodic snapshots of the run, with the CPU time each took.
    let cpus: Vec<Duration> = lines_with(&log, "snapshot written")
        .iter()
        .filter_map(|l| l.split_whitespace().find_map(|w| w.strip_prefix("cpu=")))
        .map(|d| parse_debug_duration(d).with_context(|| format!("cpu={d}")))
        .collect::<Result<_>>()?;
    eprintln!(
        "{} periodic snapshots in {RUN:?} after ready, CPU each: {cpus:?}",
        cpus.len()
    );
    let least = *cpus
        .iter()
        .min()
        .context("no periodic snapshot in the run")?;
    assert!(
        least >= Duration::from_millis(5),
        "a snapshot of {CLIENTS} clients took only {least:?} of CPU: the pacing was not exercised"
    );
    assert_eq!(
        lines_with(&log, "instead of --snapshot-interval").len(),
        1,
        "the stretched interval is logged once:\n{log}"
    );
    // Every start at least 20 x the CPU time of the one before after it: at most this many
    // fit in the agent's life.
    let most = 1 + (life.as_secs_f64() / (20.0 * least.as_secs_f64())).floor() as usize;
    assert!(
        cpus.len() <= most,
        "{} periodic snapshots in {life:?}, at most {most} fit at 20 x {least:?} apart",
        cpus.len()
    );
    Ok(())
}

/// A `Duration`'s `Debug` form as the agent logs it (`152.3ms`, `1.2s`, `950µs`, `12ns`).
fn parse_debug_duration(s: &str) -> Result<Duration> {
    let (number, unit) = s
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .map(|i| s.split_at(i))
        .context("no unit")?;
    let scale = match unit {
        "s" => 1.0,
        "ms" => 1e-3,
        "µs" => 1e-6,
        "ns" => 1e-9,
        other => anyhow::bail!("unit {other:?}"),
    };
    Ok(Duration::from_secs_f64(number.parse::<f64>()? * scale))
}

// ---------------------------------------------------------------------------------------------
// 3. Simulated reboot
// ---------------------------------------------------------------------------------------------

/// SIGTERM (final snapshot), the pins gone (`limiter detach`, as after a reboot), a new agent on
/// the same state directory: on the same boot every client's window state comes back exactly,
/// and so do its lifetime counters.
#[test]
fn restart_without_pins_restores_exact_state_from_the_snapshot() -> Result<()> {
    require_root!();
    let started = Instant::now();
    let net = TestNet::new()?;
    let dir = TempDir::new("reboot")?;
    let config = dir.join("limiter.yaml");
    fs::write(&config, "default: {limit: 10, window: 1h}\n")?;
    let state = dir.join("state");
    let path = state.join(format!("{}.snapshot", net.receiver_if));
    let counter = net.udp_counter(UDP_PORT)?;
    let window = ExactWindow::start(TEST_SPAN);
    let (a, b): (IpAddr, IpAddr) = (sender_v4(5).into(), sender_v4(6).into());

    // Only the shutdown snapshot: no periodic one within the test.
    let extra = ["--snapshot-interval", "1h"];
    let mut first = Daemon::spawn(&net, &config, &state, 65536, dir.join("first.log"), &extra)?;
    first.wait_ready(Duration::from_secs(15))?;
    let got = send_and_count(&net, &counter, &[(a, 15), (b, 5)])?;
    assert_eq!((got[&a], got[&b]), (10, 5), "before the restart");
    let before = stats_json(&net.receiver_ns, &net.receiver_if)?;
    assert_eq!(client_counts(&before, a), (10, 5));
    assert_eq!(client_counts(&before, b), (5, 0));

    let status = first.terminate()?;
    assert!(status.success(), "SIGTERM: {status}\n{}", first.log());
    let snapshot = Snapshot::load(&path, u64::MAX)?.context("no snapshot after SIGTERM")?;
    // A and B, as the maps held them (and possibly `::`: the sender's MLD reports, sent from
    // the unspecified address while its IPv6 addresses are set up, may reach the limiter).
    for (client, counts) in [(a, (10, 5)), (b, (5, 0))] {
        let IpAddr::V4(v4) = client else {
            unreachable!()
        };
        let state = snapshot
            .entries
            .iter()
            .find(|(key, _)| *key == v4_mapped(v4.octets()))
            .map(|(_, state)| state)
            .with_context(|| format!("{client} is not in the snapshot: {snapshot:?}"))?;
        assert_eq!(
            (state.total_passed(), state.dropped_count()),
            counts,
            "{client}"
        );
    }
    let clients = snapshot.entries.len();
    let out = limiter_detach(&net.receiver_ns, &net.receiver_if)?;
    assert!(
        !pin_dir(&net.receiver_if).exists(),
        "pins after detach: {out}"
    );

    let mut second = Daemon::spawn(&net, &config, &state, 65536, dir.join("second.log"), &extra)?;
    second.wait_ready(Duration::from_secs(15))?;
    let log = second.log();
    let restored = lines_with(&log, "restored client state from");
    assert!(
        restored.len() == 1
            && restored[0].contains(&format!("clients={clients} "))
            && restored[0].contains("same_boot=true")
            && restored[0].contains(&path.display().to_string()),
        "the agent should log that it restored {clients} clients from {}; its log:\n{log}",
        path.display()
    );
    let got = send_and_count(&net, &counter, &[(a, 5), (b, 10)])?;
    let after = stats_json(&net.receiver_ns, &net.receiver_if)?;
    window.check();
    assert_eq!(got[&a], 0, "A was at its limit before the restart");
    assert_eq!(got[&b], 5, "B had used 5 of 10 before the restart");
    assert_eq!(
        client_counts(&after, a),
        (10, 10),
        "A's lifetime counters carried over"
    );
    assert_eq!(
        client_counts(&after, b),
        (10, 5),
        "B's lifetime counters carried over"
    );
    eprintln!(
        "global counters before the restart {}, after {} (the snapshot holds client state only)",
        before["global"], after["global"]
    );
    eprintln!("took {:?}", started.elapsed());
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// 4. Bad snapshot files
// ---------------------------------------------------------------------------------------------

/// Each kind of bad snapshot is moved aside with a log line naming the problem, and the agent
/// enforces the config from scratch. The snapshot the bad files are made from holds the probe
/// client with its allowance used up, so restoring any of them would show as 0 received.
#[test]
fn a_bad_snapshot_is_moved_aside_and_the_agent_starts_from_the_config() -> Result<()> {
    require_root!();
    const LIMIT: u64 = 10;
    let started = Instant::now();
    let net = TestNet::new()?;
    let dir = TempDir::new("badsnap")?;
    let config = dir.join("limiter.yaml");
    fs::write(
        &config,
        format!("default: {{limit: {LIMIT}, window: 1h}}\n"),
    )?;
    let counter = net.udp_counter(UDP_PORT)?;
    let window = ExactWindow::start(TEST_SPAN);
    let probe: IpAddr = sender_v4(7).into();
    let IpAddr::V4(probe_v4) = probe else {
        unreachable!()
    };

    let mut entries: Vec<(ClientKey, ClientState)> = (0..50)
        .map(|i| (doc_key(i), hour_client(LIMIT as u32, 3, 0, 0)))
        .collect();
    entries.push((
        v4_mapped(probe_v4.octets()),
        hour_client(LIMIT as u32, LIMIT as u32, 0, 7),
    ));
    let good = snapshot_now(entries).encode();
    // A header field changed, with the checksum made to match again: a whole file of another
    // format (or layout), not a damaged one.
    let with_field = |offset: usize, value: u32| {
        let mut bytes = good.clone();
        bytes[offset..offset + 4].copy_from_slice(&value.to_le_bytes());
        let body = bytes.len() - 4;
        let crc = crc32(&bytes[..body]);
        bytes[body..].copy_from_slice(&crc.to_le_bytes());
        bytes
    };
    let mut flipped = good.clone();
    for at in [64 + 20, good.len() / 2, good.len() - 10] {
        flipped[at] ^= 0x5a;
    }
    let cases: Vec<(&str, Vec<u8>, &str)> = vec![
        ("flipped bytes", flipped, "checksum mismatch"),
        (
            "truncated",
            good[..good.len() / 2 + 7].to_vec(),
            "truncated",
        ),
        ("empty", Vec::new(), "empty file"),
        (
            "a YAML file",
            b"mode: enforce\ndefault: {limit: 5, window: 1s}\n".to_vec(),
            "bad magic",
        ),
        ("format 2", with_field(8, 2), "snapshot format 2"),
        ("layout v99", with_field(12, 99), "layout v99"),
    ];
    // Check the test's own files first: each is one the reader rejects, for the expected reason.
    for (what, bytes, reason) in &cases {
        let err = Snapshot::decode(bytes).expect_err(what);
        assert!(err.to_string().contains(reason), "{what}: {err}");
    }
    assert!(matches!(
        Snapshot::decode(&cases[0].1),
        Err(SnapshotError::Checksum { .. })
    ));

    // Control: the intact file is restored, and the probe then gets nothing.
    let run = |what: &str, bytes: &[u8]| -> Result<(String, u64, PathBuf)> {
        let state = dir.join(what.replace(' ', "-"));
        fs::create_dir_all(&state)?;
        fs::write(state.join(format!("{}.snapshot", net.receiver_if)), bytes)?;
        let log = dir.join(format!("{}.log", what.replace(' ', "-")));
        let mut agent = Daemon::spawn(
            &net,
            &config,
            &state,
            65536,
            log,
            &["--snapshot-interval", "1h"],
        )?;
        agent.wait_ready(Duration::from_secs(15))?;
        let got = send_and_count(&net, &counter, &[(probe, 3 * LIMIT)])?;
        let log = agent.log();
        let status = agent.terminate()?;
        ensure!(status.success(), "{what}: SIGTERM: {status}\n{log}");
        limiter_detach(&net.receiver_ns, &net.receiver_if)?;
        Ok((log, got[&probe], state))
    };
    let (log, got, _) = run("intact", &good)?;
    assert_eq!(
        got, 0,
        "control: the intact snapshot should be restored with the probe at its limit; log:\n{log}"
    );
    assert!(lines_with(&log, "snapshot unusable").is_empty(), "{log}");

    for (what, bytes, reason) in &cases {
        let (log, got, state) = run(what, bytes)?;
        let complaints = lines_with(&log, "snapshot unusable");
        assert!(
            complaints.len() == 1 && complaints[0].contains(reason),
            "{what}: expected one \"snapshot unusable ({reason}...)\" line; the log:\n{log}"
        );
        assert!(
            lines_with(&log, "restored client state").is_empty(),
            "{what}: restored from a bad snapshot:\n{log}"
        );
        let aside = files_starting_with(&state, &format!("{}.snapshot.corrupt-", net.receiver_if));
        assert_eq!(aside.len(), 1, "{what}: moved aside as {aside:?}");
        assert_eq!(
            &fs::read(state.join(&aside[0]))?,
            bytes,
            "{what}: the file moved aside should be the bad file, unchanged"
        );
        assert!(
            aside[0]
                .rsplit('-')
                .next()
                .is_some_and(|t| t.parse::<u64>().is_ok()),
            "{what}: {aside:?} should end in a UNIX time"
        );
        assert_eq!(
            got, LIMIT,
            "{what}: a fresh client gets exactly its limit from the config"
        );
        eprintln!("{what}: {}", complaints[0].trim());
    }
    window.check();
    eprintln!("took {:?}", started.elapsed());
    Ok(())
}

/// CRC-32 (IEEE), bit by bit: the snapshot's checksum, without a dependency.
fn crc32(bytes: &[u8]) -> u32 {
    let mut crc = !0u32;
    for &b in bytes {
        crc ^= u32::from(b);
        for _ in 0..8 {
            crc = if crc & 1 != 0 {
                (crc >> 1) ^ 0xedb8_8320
            } else {
                crc >> 1
            };
        }
    }
    !crc
}

// ---------------------------------------------------------------------------------------------
// 5. Pinned maps of another layout version
// ---------------------------------------------------------------------------------------------

/// Pins stamped with another layout version are not adopted: one log line, fresh maps, the
/// current version stamped.
#[test]
fn pins_of_another_layout_version_are_discarded_with_one_log_line() -> Result<()> {
    require_root!();
    const LIMIT: u64 = 10;
    let started = Instant::now();
    let config = format!("default: {{limit: {LIMIT}, window: 1h}}\n");
    let net = TestNet::new()?;
    let counter = net.udp_counter(UDP_PORT)?;
    let window = ExactWindow::start(TEST_SPAN);
    let client: IpAddr = sender_v4(8).into();

    let mut first = Agent::start(&net, &config)?;
    first.keep_pins();
    let got = send_and_count(&net, &counter, &[(client, 15)])?;
    assert_eq!(got[&client], LIMIT);
    let status = first.terminate()?;
    assert!(status.success(), "SIGTERM: {status}\n{}", first.stderr());
    assert_eq!(pinned_layout(&net.receiver_if)?, LAYOUT_VERSION);

    {
        let path = pin_dir(&net.receiver_if).join("LAYOUT");
        let data = MapData::from_pin(&path)?;
        let mut layout: Array<MapData, u32> = Array::try_from(Map::from_map_data(data)?)?;
        layout.set(0, 99, 0)?;
    }
    assert_eq!(pinned_layout(&net.receiver_if)?, 99);

    // The harness gives this agent its own state directory: no snapshot to restore, so what
    // it starts with is what it made of the pins.
    let second = Agent::start(&net, &config)?;
    ensure!(
        second.wait_for_stderr("ready:", Duration::from_secs(15)),
        "the second agent never logged ready:\n{}",
        second.stderr()
    );
    let log = second.stderr();
    let mentions = lines_with(&log, "layout v99");
    assert_eq!(
        mentions.len(),
        1,
        "one log line about the layout v99 pins; the log:\n{log}"
    );
    eprintln!("{}", mentions[0].trim());
    assert_eq!(pinned_layout(&net.receiver_if)?, LAYOUT_VERSION);
    let aside = pin_dir(&net.receiver_if).join("discarded");
    assert!(
        !aside.exists(),
        "the old pins are set aside only until the program is attached"
    );

    let got = send_and_count(&net, &counter, &[(client, 15)])?;
    let stats = second.stats()?;
    window.check();
    assert_eq!(
        got[&client], LIMIT,
        "fresh counters: the client's full limit again"
    );
    assert_eq!(client_counts(&stats, client), (LIMIT, 5));
    assert_eq!(pinned_layout(&net.receiver_if)?, LAYOUT_VERSION);
    eprintln!("took {:?}", started.elapsed());
    Ok(())
}

/// Removes a test's pin directory and the one its pins were set aside in.
struct PinDirs(PathBuf);

impl Drop for PinDirs {
    fn drop(&mut self) {
        let _ = datapath::remove_pins(&self.0.join("discarded"));
        let _ = datapath::remove_pins(&self.0);
    }
}

/// The id and size of the `CLIENTS` map pinned in `dir`.
fn pinned_clients(dir: &Path) -> Result<(u32, u32)> {
    let info = aya::maps::MapInfo::from_pin(dir.join("CLIENTS"))
        .with_context(|| format!("opening {}/CLIENTS", dir.display()))?;
    Ok((info.id(), info.max_entries()))
}

/// Pins of another size are set aside, not removed, until the start that found them has
/// attached: a load that fails puts them back (a crashed agent's maps outlive a restart with a
/// wrong `--max-clients` that fails), and one that attaches drops them.
#[test]
fn pins_of_another_size_come_back_when_the_load_fails() -> Result<()> {
    require_root!();
    let dir = PathBuf::from(format!(
        "/sys/fs/bpf/limiter-test-aside-{}",
        std::process::id()
    ));
    let aside = dir.join("discarded");
    let _cleanup = PinDirs(dir.clone());
    let small = LoadOptions {
        pin_dir: Some(dir.clone()),
        max_clients: 1024,
        ..LoadOptions::default()
    };
    drop(datapath::load(&small).context("loading the object (needs root)")?);
    let (id, size) = pinned_clients(&dir)?;
    assert_eq!(size, 1024);

    let bigger = LoadOptions {
        max_clients: 2048,
        ..small
    };
    let failed = datapath::lifecycle::load_object(b"not an object", &bigger);
    assert!(failed.is_err(), "a load of no object fails");
    assert_eq!(
        pinned_clients(&dir)?,
        (id, 1024),
        "the pins a failed load would have discarded are back"
    );
    assert!(!aside.exists(), "nothing is left set aside");

    drop(datapath::load(&bigger)?);
    let (new_id, size) = pinned_clients(&dir)?;
    assert_eq!(size, 2048);
    assert_ne!(new_id, id);
    assert_eq!(
        pinned_clients(&aside)?,
        (id, 1024),
        "set aside until attached"
    );
    datapath::lifecycle::drop_set_aside(&dir)?;
    assert!(!aside.exists(), "dropped once attached");

    // A failed load of pins it would adopt leaves them as they are.
    let failed = datapath::lifecycle::load_object(b"not an object", &bigger);
    assert!(failed.is_err(), "a load of no object fails");
    assert_eq!(
        pinned_clients(&dir)?,
        (new_id, 2048),
        "adopted pins are kept"
    );
    Ok(())
}

/// An agent's pins restamped as `layout` and changed by `leave_behind` (what an agent of that
/// layout leaves), with `client` 6 packets into its 10 per hour; then an agent of this layout
/// starts on them. Asserts one log line about the old layout, the stamp brought up to date and
/// the client's window kept (4 more of 10 delivered); returns the second agent's log and stats.
fn adopt_pins_of_layout(
    layout: u32,
    client: IpAddr,
    leave_behind: impl FnOnce(&Path) -> Result<()>,
) -> Result<(String, serde_json::Value)> {
    const LIMIT: u64 = 10;
    let config = format!("default: {{limit: {LIMIT}, window: 1h}}\n");
    let net = TestNet::new()?;
    let counter = net.udp_counter(UDP_PORT)?;
    let window = ExactWindow::start(TEST_SPAN);

    let mut first = Agent::start(&net, &config)?;
    first.keep_pins();
    let got = send_and_count(&net, &counter, &[(client, 6)])?;
    assert_eq!(got[&client], 6);
    let status = first.terminate()?;
    assert!(status.success(), "SIGTERM: {status}\n{}", first.stderr());
    let pins = pin_dir(&net.receiver_if);
    {
        let data = MapData::from_pin(pins.join("LAYOUT"))?;
        let mut stamp: Array<MapData, u32> = Array::try_from(Map::from_map_data(data)?)?;
        stamp.set(0, layout, 0)?;
    }
    leave_behind(&pins)?;

    let second = Agent::start(&net, &config)?;
    let log = second.stderr();
    let mentions = lines_with(&log, &format!("layout v{layout}"));
    assert_eq!(
        mentions.len(),
        1,
        "one log line about the v{layout} pins:\n{log}"
    );
    eprintln!("{}", mentions[0].trim());
    assert_eq!(pinned_layout(&net.receiver_if)?, LAYOUT_VERSION);
    let got = send_and_count(&net, &counter, &[(client, LIMIT)])?;
    let stats = second.stats()?;
    window.check();
    assert_eq!(
        got[&client],
        LIMIT - 6,
        "the client kept its window: 6 of {LIMIT} used"
    );
    assert_eq!(client_counts(&stats, client), (LIMIT, 6));
    Ok((log, stats))
}

/// Pins of layout 4 (the one before `LIMITED`) are adopted, not discarded: a client keeps its
/// window and counters across the upgrade; only the global counters (whose map grew) start again.
#[test]
fn pins_of_layout_4_are_adopted_with_their_clients() -> Result<()> {
    require_root!();
    // What a layout-4 agent leaves behind: its stamp, and no `LIMITED`.
    let (_, stats) = adopt_pins_of_layout(4, sender_v4(9).into(), |pins| {
        Ok(fs::remove_file(pins.join("LIMITED"))?)
    })?;
    let passed = stats["global"]["passed"].as_u64().unwrap_or(u64::MAX);
    assert!(
        passed < 10,
        "the global counters start again: passed {passed}"
    );
    Ok(())
}

/// Pins of layout 5 (before groups of addresses) are adopted with their clients; entries a
/// layout-5 agent keyed in ff00::/8 (multicast sources, which it did not refuse, and which read
/// as group keys now) are dropped.
#[test]
fn pins_of_layout_5_are_adopted_without_their_multicast_keys() -> Result<()> {
    require_root!();
    // What a layout-5 agent could leave behind: an entry of a multicast source whose bytes read
    // as the group key of 2001:db8::/64 now.
    let (log, stats) = adopt_pins_of_layout(5, sender_v4(10).into(), |pins| {
        let data = MapData::from_pin(pins.join("CLIENTS"))?;
        let mut clients: aya::maps::HashMap<MapData, ClientKey, ClientState> =
            aya::maps::HashMap::try_from(Map::from_map_data(data)?)?;
        let planted = limiter_common::addr::group_key(
            &"2001:db8::1".parse::<Ipv6Addr>()?.octets(),
            limiter_common::addr::group_of(Some(64)),
        );
        clients.insert(planted, ClientState::default(), 0)?;
        Ok(())
    })?;
    assert_eq!(
        lines_with(&log, "dropped entries of multicast sources").len(),
        1,
        "{log}"
    );
    let rows = stats["clients"].as_array().context("no clients in stats")?;
    ensure!(
        !rows.iter().any(|r| r["addr"] == "2001:db8::/64"),
        "the planted entry survived: {stats}"
    );
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// 6. Another tool's XDP program
// ---------------------------------------------------------------------------------------------

/// A netlink-attached XDP program of "another tool" (ours, `limiter_baseline`, loaded privately
/// and attached by `ip link ... pinned`): without `--replace` the agent refuses and leaves no
/// pins; with it the agent takes the interface over and enforces exactly.
#[test]
fn a_foreign_xdp_program_is_replaced_only_with_replace() -> Result<()> {
    require_root!();
    const LIMIT: u64 = 10;
    let started = Instant::now();
    let config = format!("default: {{limit: {LIMIT}, window: 1h}}\n");
    let net = TestNet::new()?;
    let dir = TempDir::new("foreign")?;
    let config_path = dir.join("limiter.yaml");
    fs::write(&config_path, &config)?;

    let pin = PathBuf::from(format!(
        "/sys/fs/bpf/limiter-ft-{}-foreign",
        std::process::id()
    ));
    let _ = fs::remove_file(&pin);
    let mut foreign = datapath::load_object(
        datapath::ebpf::BENCH_OBJECT,
        &LoadOptions {
            pin_dir: None,
            max_clients: 1024,
            ..LoadOptions::default()
        },
    )?;
    let program: &mut Xdp = foreign
        .program_mut("limiter_baseline")
        .context("no limiter_baseline program in the object")?
        .try_into()?;
    program.load()?;
    program.pin(&pin)?;
    let pin_guard = RemoveOnDrop(pin.clone());
    // Through nsenter, not `ip -n`: `ip -n` mounts a fresh /sys for the namespace, where
    // bpffs (and so the pin) is not mounted.
    let out = Command::new("nsenter")
        .arg(format!("--net=/run/netns/{}", net.receiver_ns))
        .args(["ip", "link", "set", "dev", &net.receiver_if])
        .args(["xdpgeneric", "pinned"])
        .arg(&pin)
        .output()?;
    ensure!(
        out.status.success(),
        "attaching the foreign program: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let link = net.receiver_link()?;
    let (foreign_id, foreign_name) = xdp_prog(&link).context("foreign program not attached")?;
    assert!(foreign_name.starts_with("limiter_basel"), "{link}");
    assert!(link.contains("xdpgeneric"), "{link}");

    let state = dir.join("state").to_string_lossy().into_owned();
    let config_arg = config_path.to_string_lossy().into_owned();
    let out = run_limiter(
        &net.receiver_ns,
        &[
            "agent",
            "--iface",
            &net.receiver_if,
            "--config",
            &config_arg,
            "--xdp-mode",
            "native",
            "--max-clients",
            "65536",
            "--state-dir",
            &state,
        ],
    )?;
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "exit {}: {stderr}", out.status);
    assert!(stderr.contains("--replace"), "stderr: {stderr}");
    eprintln!("without --replace: {}", stderr.trim());
    assert!(
        !pin_dir(&net.receiver_if).exists(),
        "a refused start left pins: {:?}",
        fs::read_dir(pin_dir(&net.receiver_if)).map(|d| d
            .filter_map(Result::ok)
            .map(|e| e.file_name())
            .collect::<Vec<_>>())
    );
    let link = net.receiver_link()?;
    assert_eq!(
        xdp_prog(&link).map(|p| p.0),
        Some(foreign_id),
        "the foreign program should be left alone: {link}"
    );

    let counter = net.udp_counter(UDP_PORT)?;
    let window = ExactWindow::start(TEST_SPAN);
    let agent = Agent::start_with(&net, &config, &["--replace"])?;
    // The foreign program counts as "an XDP program attached" for the harness: wait for the
    // agent's own word.
    ensure!(
        agent.wait_for_stderr("ready:", Duration::from_secs(15)),
        "the agent never logged ready:\n{}",
        agent.stderr()
    );
    let link = net.receiver_link()?;
    let (id, name) = xdp_prog(&link).context("no XDP program after --replace")?;
    assert_eq!(name, "limiter", "{link}");
    assert_ne!(id, foreign_id);
    assert!(!link.contains("xdpgeneric"), "{link}");
    let client: IpAddr = sender_v4(9).into();
    let got = send_and_count(&net, &counter, &[(client, 3 * LIMIT)])?;
    let stats = agent.stats()?;
    window.check();
    assert_eq!(got[&client], LIMIT);
    assert_eq!(client_counts(&stats, client), (LIMIT, 2 * LIMIT));
    drop(agent);
    drop(foreign);
    drop(pin_guard);
    assert!(!pin.exists());
    eprintln!("took {:?}", started.elapsed());
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// 7. limiter detach under a running agent
// ---------------------------------------------------------------------------------------------

/// `limiter detach` while the agent runs: the program and the pins are gone at once and traffic
/// is no longer limited.
#[test]
fn detach_under_a_running_agent_stops_enforcement_at_once() -> Result<()> {
    require_root!();
    const LIMIT: u64 = 10;
    let started = Instant::now();
    let net = TestNet::new()?;
    let agent = Agent::start(&net, &format!("default: {{limit: {LIMIT}, window: 1h}}\n"))?;
    let counter = net.udp_counter(UDP_PORT)?;
    let window = ExactWindow::start(TEST_SPAN);
    let (limited, fresh): (IpAddr, IpAddr) = (sender_v4(10).into(), sender_v4(11).into());
    let got = send_and_count(&net, &counter, &[(limited, 3 * LIMIT)])?;
    assert_eq!(got[&limited], LIMIT);

    let out = limiter_detach(&net.receiver_ns, &net.receiver_if)?;
    let link = net.receiver_link()?;
    assert!(!link_has_xdp(&link), "still attached after detach: {link}");
    let pins = pin_dir(&net.receiver_if);
    assert!(!pins.exists(), "{} still there: {out}", pins.display());
    assert!(
        agent.exited()?.is_none(),
        "the agent died of the detach:\n{}",
        agent.stderr()
    );

    let got = send_and_count(&net, &counter, &[(limited, 3 * LIMIT), (fresh, 3 * LIMIT)])?;
    window.check();
    assert_eq!(got[&limited], 3 * LIMIT, "no longer limited after detach");
    assert_eq!(got[&fresh], 3 * LIMIT, "no longer limited after detach");
    // Well past the agent's config poll: it does not put the program back by itself.
    thread::sleep(Duration::from_millis(500));
    assert!(!link_has_xdp(&net.receiver_link()?));
    assert!(!pins.exists());

    let from = agent.stderr().len();
    let status = agent.terminate()?;
    // An orderly stop after someone else detached is still orderly: exit 0, final snapshot.
    assert!(
        status.success(),
        "SIGTERM after the detach: the agent exited {status}; it logged:\n{}",
        agent.stderr().get(from..).unwrap_or_default()
    );
    eprintln!("took {:?}", started.elapsed());
    Ok(())
}

/// Sanity of this file's helpers that need no root.
#[test]
fn helpers() {
    // The IEEE CRC-32 check value.
    assert_eq!(crc32(b"123456789"), 0xcbf4_3926);
    let link = "3: a0@b0: <UP> mtu 1500 xdp qdisc noqueue\n    link/ether 76:43:23:e0:02:77\n    \
                prog/xdp id 984 name limiter tag f679e37e83303322 jited \n";
    assert_eq!(xdp_prog(link), Some((984, "limiter".to_owned())));
    assert_eq!(xdp_prog("3: a0: <UP> mtu 1500 qdisc noqueue"), None);
    let mut rng = XorShift(1);
    assert!((0..1000).all(|_| rng.below(301) <= 300));
}
