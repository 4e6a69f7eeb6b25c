//! Adaptive windows end to end: a real `limiter agent` on the test veth, real UDP traffic, and a
//! CPU load that is either injected (`--load-file`) or real (busy threads in this process). The
//! assertions read the effective windows and allowances the agent wrote into the maps
//! (`limiter stats --json`) and count what reached the receiver. Root only.
//!
//! The tests in this file never run concurrently with each other (one of them measures the
//! machine's real CPU load, and the others would disturb it): each holds [`SERIAL`].
//!
//! Exact where the datapath is exact (every datagram a client sent is either received or counted
//! as dropped by the agent), approximate where the controller is (it measures offered rates over
//! periods whose length jitters, so fair shares come with a stated tolerance).

use std::{
    collections::HashMap,
    fs,
    net::{IpAddr, Ipv4Addr},
    sync::{
        Arc, Mutex, MutexGuard,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    thread::{self, JoinHandle},
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, anyhow, bail, ensure};
use limiter_tests::{
    agent::{Agent, find_client},
    fixture::TempDir,
    netns::{TestNet, sender_v4},
    require_root,
    traffic::{PacketCounter, UDP_PORT, receiver_for},
};
use limiter_user::adaptive::effective;
use serde_json::Value;

/// Held by every test of this file for its whole run.
static SERIAL: Mutex<()> = Mutex::new(());

fn serial() -> MutexGuard<'static, ()> {
    SERIAL.lock().unwrap_or_else(|e| e.into_inner())
}

// ---------------------------------------------------------------------------------------------
// Reading `limiter stats`
// ---------------------------------------------------------------------------------------------

/// One client's row of `limiter stats --json`.
#[derive(Debug, Clone, Copy, PartialEq)]
struct Row {
    window_ms: f64,
    allowance: u64,
    scale: f64,
    passed: u64,
    dropped: u64,
}

fn row(stats: &Value, addr: Ipv4Addr) -> Option<Row> {
    let c = find_client(stats, addr)?;
    let f = |k: &str| c[k].as_f64();
    let u = |k: &str| c[k].as_u64();
    Some(Row {
        window_ms: f("window_ms")?,
        allowance: u("allowance")?,
        scale: f("scale")?,
        passed: u("passed")?,
        dropped: u("dropped")?,
    })
}

/// The row of `addr`, or an error showing what stats held.
fn row_of(stats: &Value, addr: Ipv4Addr) -> Result<Row> {
    row(stats, addr).ok_or_else(|| anyhow!("client {addr} is not in `limiter stats`: {stats}"))
}

/// The global `adaptive` object of `limiter stats --json`.
#[derive(Debug, Clone, Copy, PartialEq)]
struct Adaptive {
    enabled: bool,
    period_ms: f64,
    cpu: f64,
    load_factor: f64,
    tracked: u64,
    periods: u64,
}

fn adaptive(stats: &Value) -> Result<Adaptive> {
    let a = &stats["adaptive"];
    let f = |k: &str| {
        a[k].as_f64()
            .ok_or_else(|| anyhow!("adaptive.{k} is not a number in {a}"))
    };
    let u = |k: &str| {
        a[k].as_u64()
            .ok_or_else(|| anyhow!("adaptive.{k} is not an unsigned number in {a}"))
    };
    Ok(Adaptive {
        enabled: a["enabled"]
            .as_bool()
            .ok_or_else(|| anyhow!("adaptive.enabled is not a bool in {a}"))?,
        period_ms: f("period_ms")?,
        cpu: f("cpu")?,
        load_factor: f("load_factor")?,
        tracked: u("tracked")?,
        periods: u("periods")?,
    })
}

/// Polls `limiter stats` every 100 ms until `check` returns `Some`, for at most `timeout`;
/// returns the value and how long it took. On timeout the error shows the last stats and the
/// agent's log.
fn poll<T>(
    agent: &Agent,
    what: &str,
    timeout: Duration,
    mut check: impl FnMut(&Value) -> Result<Option<T>>,
) -> Result<(T, Duration)> {
    let start = Instant::now();
    loop {
        if let Some(status) = agent.exited()? {
            bail!(
                "{what}: the agent exited ({status}); its log:\n{}",
                agent.stderr()
            );
        }
        let stats = agent.stats()?;
        if let Some(value) = check(&stats)? {
            return Ok((value, start.elapsed()));
        }
        if start.elapsed() >= timeout {
            bail!(
                "{what}: not within {timeout:?}; last stats: adaptive {} clients {}",
                stats["adaptive"],
                stats["clients"]
            );
        }
        thread::sleep(Duration::from_millis(100));
    }
}

/// The load file the agent reads each period (`--load-file`).
struct LoadFile {
    _dir: TempDir,
    path: String,
}

impl LoadFile {
    fn new(initial: &str) -> Result<LoadFile> {
        let dir = TempDir::new("load")?;
        let path = dir.write("load", initial)?;
        Ok(LoadFile { _dir: dir, path })
    }

    /// Replaces the value atomically (the agent never reads a half-written file).
    fn set(&self, value: &str) -> Result<()> {
        let tmp = format!("{}.tmp", self.path);
        fs::write(&tmp, value)?;
        fs::rename(&tmp, &self.path).with_context(|| format!("replacing {}", self.path))
    }
}

// ---------------------------------------------------------------------------------------------
// Traffic
// ---------------------------------------------------------------------------------------------

#[derive(Debug, Clone, Copy)]
enum Pattern {
    /// `size` datagrams back to back every `every`, the first burst at the start.
    Bursts { size: u32, every: Duration },
    /// One datagram every `1 / rate` seconds, the first at `offset` after the start.
    Paced { rate: f64, offset: Duration },
}

/// Background senders, one thread per source, all on one schedule that started at `start`. Each
/// stops at `stop`, or once `limit` has passed since the start, so the traffic is bounded in
/// time and count whatever the test does; dropping the guard stops and joins them.
struct Traffic {
    start: Instant,
    stop: Arc<AtomicBool>,
    sent: HashMap<IpAddr, Arc<AtomicU64>>,
    threads: Vec<JoinHandle<Result<()>>>,
}

impl Traffic {
    fn start(net: &TestNet, flows: &[(Ipv4Addr, Pattern)], limit: Duration) -> Result<Traffic> {
        let sockets = flows
            .iter()
            .map(|(src, _)| net.udp_sender((*src).into()))
            .collect::<Result<Vec<_>>>()?;
        let start = Instant::now() + Duration::from_millis(50);
        let stop = Arc::new(AtomicBool::new(false));
        let mut traffic = Traffic {
            start,
            stop: Arc::clone(&stop),
            sent: HashMap::new(),
            threads: Vec::new(),
        };
        for ((src, pattern), socket) in flows.iter().copied().zip(sockets) {
            let sent = Arc::new(AtomicU64::new(0));
            traffic.sent.insert(src.into(), Arc::clone(&sent));
            let stop = Arc::clone(&stop);
            let dst = receiver_for(src.into());
            traffic.threads.push(thread::spawn(move || -> Result<()> {
                let end = start + limit;
                let (first, every, size) = match pattern {
                    Pattern::Bursts { size, every } => (Duration::ZERO, every, size),
                    Pattern::Paced { rate, offset } => {
                        (offset, Duration::from_secs_f64(1.0 / rate), 1)
                    }
                };
                for k in 0u32.. {
                    let due = start + first + every * k;
                    if due >= end {
                        break;
                    }
                    // Sleep in short steps so that a stop is noticed quickly.
                    loop {
                        if stop.load(Ordering::Relaxed) {
                            return Ok(());
                        }
                        let now = Instant::now();
                        if now >= due {
                            break;
                        }
                        thread::sleep((due - now).min(Duration::from_millis(20)));
                    }
                    for _ in 0..size {
                        send_one(&socket, dst)?;
                        sent.fetch_add(1, Ordering::Relaxed);
                    }
                }
                Ok(())
            }));
        }
        Ok(traffic)
    }

    fn sent(&self, src: Ipv4Addr) -> u64 {
        self.sent[&IpAddr::from(src)].load(Ordering::Relaxed)
    }

    /// Sleeps until the middle of a gap between two bursts sent every `every`, so that a reading
    /// of the counters taken now sees whole bursts only.
    fn between_bursts(&self, every: Duration) {
        let now = Instant::now();
        let since = now.saturating_duration_since(self.start);
        let phase = since.as_secs_f64() % every.as_secs_f64() / every.as_secs_f64();
        if (0.25..0.65).contains(&phase) {
            return;
        }
        let k = (since.as_secs_f64() / every.as_secs_f64()).floor() + 1.0;
        let target = self.start + every.mul_f64(if phase < 0.25 { k - 0.55 } else { k + 0.45 });
        thread::sleep(target.saturating_duration_since(now));
    }

    /// Stops every sender and returns what each sent; fails if one of them failed.
    fn finish(mut self) -> Result<HashMap<IpAddr, u64>> {
        self.stop.store(true, Ordering::Relaxed);
        for handle in self.threads.drain(..) {
            handle
                .join()
                .map_err(|_| anyhow!("a sender thread panicked"))??;
        }
        Ok(self
            .sent
            .iter()
            .map(|(src, n)| (*src, n.load(Ordering::Relaxed)))
            .collect())
    }
}

impl Drop for Traffic {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        for handle in self.threads.drain(..) {
            let _ = handle.join();
        }
    }
}

/// Sends one datagram, retrying briefly while the socket buffer is full.
fn send_one(socket: &std::net::UdpSocket, dst: std::net::SocketAddr) -> Result<()> {
    for attempt in 0.. {
        match socket.send_to(b"limiter-adaptive-test", dst) {
            Ok(_) => return Ok(()),
            Err(e) if attempt < 100 && e.raw_os_error() == Some(libc::ENOBUFS) => {
                thread::sleep(Duration::from_millis(1));
            }
            Err(e) => return Err(e).with_context(|| format!("sending to {dst}")),
        }
    }
    unreachable!()
}

/// After the traffic stopped: every datagram a client sent was either received or dropped by
/// the limiter, and the limiter counts as passed exactly what was received.
fn assert_exact_accounting(
    agent: &Agent,
    counter: &PacketCounter,
    sent: &HashMap<IpAddr, u64>,
) -> Result<()> {
    let received = counter.settle()?;
    let stats = agent.stats()?;
    for (src, sent) in sent {
        let IpAddr::V4(v4) = src else { unreachable!() };
        let r = row_of(&stats, *v4)?;
        let got = received.get(src).copied().unwrap_or(0);
        assert_eq!(
            got,
            sent - r.dropped,
            "{src}: received {got}, sent {sent}, dropped {} (stats {r:?})",
            r.dropped
        );
        assert_eq!(
            r.passed, got,
            "{src}: stats passed {} but received {got}",
            r.passed
        );
    }
    Ok(())
}

/// Counters of one client at one moment: sent by the test, received, and the agent's view.
#[derive(Debug, Clone, Copy)]
struct Reading {
    sent: u64,
    received: u64,
    row: Row,
}

/// A reading between two bursts (sent every `every`) that saw no datagram leave while it was
/// taken, so that the test's, the receiver's and the agent's counts cover the same bursts.
fn reading(
    agent: &Agent,
    traffic: &Traffic,
    counter: &PacketCounter,
    src: Ipv4Addr,
    every: Duration,
) -> Result<Reading> {
    for _ in 0..5 {
        traffic.between_bursts(every);
        let sent = traffic.sent(src);
        let stats = agent.stats()?;
        // Packets sent before the reading have long reached the receiver's socket (the last
        // burst left at least a quarter of `every` ago).
        let received = counter.count(src);
        if traffic.sent(src) == sent {
            return Ok(Reading {
                sent,
                received,
                row: row_of(&stats, src)?,
            });
        }
    }
    bail!("could not read the counters of {src} between two bursts")
}

/// What happened between two readings taken between bursts.
#[derive(Debug, Clone, Copy)]
struct Phase {
    sent: u64,
    received: u64,
    passed: u64,
    dropped: u64,
}

fn phase(a: &Reading, b: &Reading) -> Phase {
    Phase {
        sent: b.sent - a.sent,
        received: b.received - a.received,
        passed: b.row.passed - a.row.passed,
        dropped: b.row.dropped - a.row.dropped,
    }
}

// ---------------------------------------------------------------------------------------------
// 1. Injected load: windows shrink, drops rise, and both come back
// ---------------------------------------------------------------------------------------------

/// A client bursting 30 datagrams every second, well inside its `100 per 2s`, loses nothing at
/// low load; when the injected load goes to 95 % its window shrinks to `min_scale · 2s = 500ms`
/// and its allowance to 13 (so it loses 17 of each burst); when the load falls back to 10 % the
/// window and the allowance return to the policy's and the losses stop.
#[test]
fn injected_load_shrinks_windows_and_relief_restores_them() -> Result<()> {
    require_root!();
    let _serial = serial();
    const BURST: u64 = 30;
    const EVERY: Duration = Duration::from_secs(1);
    // step 1.5 and dwell 1: the client is observed only in the periods of its bursts (once a
    // second), and every move of s, g and gᵢ happens at such an observation; the default
    // step (1.25, 7 steps from 1 to 0.25) and dwell (3) would take ~10 s per direction.
    let config = "\
default: { limit: 100, window: 2s }
adaptive:
  enabled: true
  period: 200ms
  alpha: 0.5
  step: 1.5
  dwell: 1
";
    let load = LoadFile::new("0.2")?;
    let net = TestNet::new()?;
    let counter = net.udp_counter(UDP_PORT)?;
    let agent = Agent::start_with(&net, config, &["--load-file", &load.path])?;
    let src = sender_v4(0);
    let traffic = Traffic::start(
        &net,
        &[(
            src,
            Pattern::Bursts {
                size: BURST as u32,
                every: EVERY,
            },
        )],
        Duration::from_secs(40),
    )?;

    // Phase A, 20 % load. The sliding estimate at a burst is at most 30·⌊e⌋ + 60·(2 − e)/2 + 30
    // ≤ 90 for a burst e seconds into the 2 s window: nothing is dropped.
    let (a, took) = poll(
        &agent,
        "the client tracked at low load",
        Duration::from_secs(10),
        |s| {
            let g = adaptive(s)?;
            Ok((g.tracked == 1 && g.periods >= 5).then_some(g))
        },
    )?;
    eprintln!("phase A: tracked after {took:?}: {a:?}");
    assert!(a.enabled && a.period_ms == 200.0, "{a:?}");
    let a0 = reading(&agent, &traffic, &counter, src, EVERY)?;
    thread::sleep(EVERY * 3);
    let a1 = reading(&agent, &traffic, &counter, src, EVERY)?;
    let pa = phase(&a0, &a1);
    let ga = adaptive(&agent.stats()?)?;
    eprintln!("phase A: {pa:?}, {:?} -> {:?}, {ga:?}", a0.row, a1.row);
    for r in [a0.row, a1.row] {
        assert_eq!(
            (r.window_ms, r.allowance, r.scale),
            (2000.0, 100, 1.0),
            "{r:?}"
        );
    }
    assert!(ga.cpu < 0.6 && ga.load_factor == 1.0, "{ga:?}");
    assert!(pa.sent >= 2 * BURST, "{pa:?}");
    assert_eq!(pa.dropped, 0, "drops at low load: {pa:?}");
    assert_eq!(pa.received, pa.sent - pa.dropped, "{pa:?}");

    // Phase B, 95 % load. g → min_load_factor = 0.5; the one observed client's demand,
    // min(û·r, r) with r = 50/s (û is measured over the periods it sends in, ~3), exceeds the
    // capacity C = 0.5·50 = 25/s, so gᵢ → 25/50 = 0.5; s → min_scale = 0.25. Hence
    // (W, A) = effective(100, 2s, 0.25, 0.5) = (500 ms, round(12.5) = 13).
    let (w_b, a_b) = effective(100, 2_000_000, 0.25, 0.5);
    assert_eq!((w_b, a_b), (500_000, 13));
    load.set("0.95")?;
    let (gb, took) = poll(
        &agent,
        "the window shrunk to 500ms",
        Duration::from_secs(15),
        |s| {
            let r = row_of(s, src)?;
            (r.window_ms == w_b as f64 / 1e3 && r.allowance == a_b as u64)
                .then(|| adaptive(s))
                .transpose()
        },
    )?;
    eprintln!("phase B: converged after {took:?}: {gb:?}");
    assert!(gb.cpu > 0.85, "{gb:?}");
    assert!(gb.load_factor < 1.0, "{gb:?}");
    assert_eq!(gb.load_factor, 0.5, "{gb:?}");
    let b0 = reading(&agent, &traffic, &counter, src, EVERY)?;
    thread::sleep(EVERY * 4);
    let b1 = reading(&agent, &traffic, &counter, src, EVERY)?;
    let pb = phase(&b0, &b1);
    eprintln!("phase B: {pb:?}, {:?} -> {:?}", b0.row, b1.row);
    for r in [b0.row, b1.row] {
        assert_eq!(r.window_ms, 500.0, "{r:?}");
        assert_eq!(r.scale, 0.25, "{r:?}");
        assert!((13..=25).contains(&r.allowance), "{r:?}");
    }
    // Each burst sits in one 500 ms window whose predecessor is empty (bursts are 1 s apart).
    // The allowance is A = 100 · 0.25 · gᵢ with gᵢ between g = 0.5 and 1: silent periods count
    // as rate 0, so this client's smoothed demand falls between bursts and, with `dwell: 1`
    // here, its fairness factor climbs back toward 1 before the next burst. So a burst passes
    // 13 to 25 and drops 5 to 17 (one fewer where a burst straddles a window boundary, the
    // previous window's weight being truncated), against none at the policy's (2 s, 100).
    let bursts = pb.sent / BURST;
    assert_eq!(pb.sent % BURST, 0, "a reading inside a burst: {pb:?}");
    assert!(bursts >= 3, "{pb:?}");
    assert!(
        (4 * bursts..=17 * bursts).contains(&pb.dropped),
        "{bursts} bursts under (500ms, 13..=25): expected 5 to 17 drops each: {pb:?}"
    );
    assert_eq!(pb.received, pb.sent - pb.dropped, "{pb:?}");
    assert_eq!(pb.passed, pb.received, "{pb:?}");

    // Phase C, 10 % load: everything relaxes back to the policy (s, g, gᵢ → 1; p stays 1
    // since û > shrink_above).
    load.set("0.1")?;
    let (gc, took) = poll(
        &agent,
        "the window back at 2s",
        Duration::from_secs(15),
        |s| {
            let r = row_of(s, src)?;
            let g = adaptive(s)?;
            Ok((r.window_ms == 2000.0 && r.allowance == 100 && g.load_factor == 1.0).then_some(g))
        },
    )?;
    eprintln!("phase C: relaxed after {took:?}: {gc:?}");
    assert!(gc.cpu < 0.6, "{gc:?}");
    // The windows of phase B carried their used fraction into the larger window (rescale): let
    // one policy window pass before counting.
    thread::sleep(Duration::from_secs(2));
    let c0 = reading(&agent, &traffic, &counter, src, EVERY)?;
    thread::sleep(EVERY * 3);
    let c1 = reading(&agent, &traffic, &counter, src, EVERY)?;
    let pc = phase(&c0, &c1);
    eprintln!("phase C: {pc:?}, {:?} -> {:?}", c0.row, c1.row);
    for r in [c0.row, c1.row] {
        assert_eq!(
            (r.window_ms, r.allowance, r.scale),
            (2000.0, 100, 1.0),
            "{r:?}"
        );
    }
    assert!(pc.sent >= 2 * BURST, "{pc:?}");
    assert_eq!(pc.dropped, 0, "drops after relief: {pc:?}");

    let sent = traffic.finish()?;
    assert!(sent[&IpAddr::from(src)] <= 40 * BURST, "{sent:?}");
    assert_exact_accounting(&agent, &counter, &sent)
}

// ---------------------------------------------------------------------------------------------
// 2. Real CPU load
// ---------------------------------------------------------------------------------------------

/// The machine's CPU utilisation from `/proc/stat` (all CPUs): busy / total jiffies between two
/// readings.
#[derive(Debug, Clone, Copy)]
struct CpuTimes {
    busy: u64,
    total: u64,
}

fn cpu_times() -> Result<CpuTimes> {
    let text = fs::read_to_string("/proc/stat")?;
    let line = text
        .lines()
        .find(|l| l.starts_with("cpu "))
        .ok_or_else(|| anyhow!("no cpu line in /proc/stat"))?;
    let v: Vec<u64> = line
        .split_whitespace()
        .skip(1)
        .take(8)
        .map(|x| x.parse().unwrap_or(0))
        .collect();
    ensure!(v.len() == 8, "short cpu line in /proc/stat: {line}");
    let total: u64 = v.iter().sum();
    // user nice system idle iowait irq softirq steal
    Ok(CpuTimes {
        busy: total - v[3] - v[4],
        total,
    })
}

fn utilisation(a: CpuTimes, b: CpuTimes) -> f64 {
    (b.busy - a.busy) as f64 / (b.total - a.total).max(1) as f64
}

/// Busy-loop threads, one per CPU, for at most `limit`; stopped when dropped.
struct Burners {
    stop: Arc<AtomicBool>,
    threads: Vec<JoinHandle<()>>,
}

impl Burners {
    fn start(n: usize, limit: Duration) -> Burners {
        let stop = Arc::new(AtomicBool::new(false));
        let end = Instant::now() + limit;
        let threads = (0..n)
            .map(|_| {
                let stop = Arc::clone(&stop);
                thread::spawn(move || {
                    let mut x = 0u64;
                    while !stop.load(Ordering::Relaxed) && Instant::now() < end {
                        for i in 0..10_000u64 {
                            x = std::hint::black_box(
                                x.wrapping_mul(6364136223846793005).wrapping_add(i),
                            );
                        }
                    }
                })
            })
            .collect();
        Burners { stop, threads }
    }

    fn stop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

impl Drop for Burners {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Without `--load-file` the agent measures the machine: busy threads on every CPU shrink a
/// steady client's window below its policy's; once they stop the window returns to it.
#[test]
fn real_cpu_load_shrinks_windows_and_idleness_restores_them() -> Result<()> {
    require_root!();
    let _serial = serial();
    // Defaults except a short period (sysinfo measures over at least 200 ms) and a low band
    // edge a little higher than the default 0.6: busy threads on every CPU read as 98-100 %,
    // clearly above 0.85, and a shared machine with other work going on (builds) still gets a
    // chance to read as relaxed.
    let config = "\
default: { limit: 100, window: 2s }
adaptive:
  enabled: true
  period: 250ms
  alpha: 0.5
  load: { high: 0.85, low: 0.65 }
";
    let net = TestNet::new()?;
    let counter = net.udp_counter(UDP_PORT)?;
    let agent = Agent::start_with(&net, config, &[])?;
    let src = sender_v4(3);
    // 45/s against r = 50/s: û ≈ 0.9 > shrink_above, so its pattern scale stays 1 and the
    // relaxed window is exactly the policy's; observed every period.
    let traffic = Traffic::start(
        &net,
        &[(
            src,
            Pattern::Paced {
                rate: 45.0,
                offset: Duration::ZERO,
            },
        )],
        Duration::from_secs(40),
    )?;
    // Start from a relaxed machine if there is one: other work on a shared machine may keep it
    // busy, in which case the window may already be smaller (the burners then only make sure
    // of the overload).
    let quiet = poll(&agent, "a relaxed machine", Duration::from_secs(10), |s| {
        let g = adaptive(s)?;
        let r = row(s, src);
        let at_policy = r.is_some_and(|r| r.window_ms == 2000.0 && r.allowance == 100);
        Ok((g.tracked == 1 && g.periods >= 4 && g.cpu < 0.65 && at_policy).then_some(g))
    });
    match &quiet {
        Ok((g, took)) => eprintln!("before: relaxed at the policy window after {took:?}: {g:?}"),
        Err(e) => eprintln!("WARNING: the machine is busy before the burners start: {e:#}"),
    }

    let cpus = thread::available_parallelism().map_or(2, |n| n.get());
    let before = cpu_times()?;
    let mut burners = Burners::start(cpus, Duration::from_secs(20));
    let (shrunk, took) = poll(
        &agent,
        "the window shrunk under real load",
        Duration::from_secs(10),
        |s| {
            let r = row_of(s, src)?;
            Ok((r.window_ms < 2000.0).then_some(r))
        },
    )?;
    eprintln!("shrunk after {took:?}: {shrunk:?}");
    // It keeps going down to min_scale (500 ms, 7 steps of 1.25) while the load lasts.
    let (deep, took_min) = poll(
        &agent,
        "the window at min_scale under real load",
        Duration::from_secs(10),
        |s| {
            let r = row_of(s, src)?;
            Ok((r.window_ms == 500.0).then_some(r))
        },
    )?;
    let measured = utilisation(before, cpu_times()?);
    let g2 = adaptive(&agent.stats()?)?;
    eprintln!("at min_scale after another {took_min:?}: {deep:?} {g2:?}; /proc/stat {measured:.3}");
    burners.stop();
    assert!(
        g2.cpu > 0.85,
        "the agent's smoothed load under busy threads: {g2:?}"
    );
    assert!(measured > 0.8, "the machine under busy threads: {measured}");
    assert_eq!(g2.load_factor, 0.5, "{g2:?}");
    assert_eq!((deep.scale, deep.allowance), (0.25, 13), "{deep:?}");

    // Relief. Other work on a shared machine can keep it busy: wait generously, and if the
    // window stays small, tell a machine that is genuinely busy (the agent is right not to
    // relax) from a controller that does not relax. Either way the load the agent acts on must
    // be the machine's: its mean over the wait matches /proc/stat's.
    // (The agent's smoothed load lags the machine's by about a period: compare them from a
    // second after the burners stopped, long before the window can have relaxed, which takes
    // the EWMA's crossing, a dwell of 3 and 7 steps of 250 ms.)
    thread::sleep(Duration::from_secs(1));
    let idle_from = cpu_times()?;
    let mut seen = Vec::new();
    let relaxed = poll(
        &agent,
        "the window back at 2s",
        Duration::from_secs(20),
        |s| {
            let g = adaptive(s)?;
            seen.push(g.cpu);
            let r = row_of(s, src)?;
            Ok((r.window_ms == 2000.0 && r.allowance == 100).then_some(g))
        },
    );
    let idle = utilisation(idle_from, cpu_times()?);
    let agent_mean = seen.iter().sum::<f64>() / seen.len().max(1) as f64;
    eprintln!(
        "relief: agent's load {agent_mean:.3} on average ({} readings), /proc/stat {idle:.3}",
        seen.len()
    );
    assert!(
        (agent_mean - idle).abs() < 0.2,
        "the agent's load ({agent_mean:.3} on average) is not the machine's ({idle:.3})"
    );
    match relaxed {
        Ok((g3, took)) => {
            eprintln!("relaxed after {took:?}: {g3:?}");
            assert!(g3.cpu < 0.85, "{g3:?}");
            assert_eq!(g3.load_factor, 1.0, "{g3:?}");
        }
        Err(e) => {
            let g3 = adaptive(&agent.stats()?)?;
            // Clearly below the band's low edge (0.65) on average: it should have relaxed.
            ensure!(
                idle >= 0.5 && g3.cpu >= 0.5,
                "not relaxed although the machine was idle enough (/proc/stat {idle:.3}, agent \
                 {g3:?}): {e:#}"
            );
            eprintln!(
                "WARNING: relief not checked: the machine stayed busy after the burners stopped \
                 (/proc/stat {idle:.3}, agent {g3:?})"
            );
        }
    }
    let sent = traffic.finish()?;
    assert!(sent[&IpAddr::from(src)] <= 45 * 41, "{sent:?}");
    assert_exact_accounting(&agent, &counter, &sent)
}

// ---------------------------------------------------------------------------------------------
// 3. Fairness under overload
// ---------------------------------------------------------------------------------------------

/// Under an injected overload one aggressive client (policy 200/s, sending 400/s) and twenty
/// modest ones (policy 20/s, sending 12/s) share the capacity by max-min fairness: the modest
/// ones keep all their traffic, the aggressive one gets what is left.
#[test]
fn overload_cuts_the_aggressive_client_and_spares_the_modest_ones() -> Result<()> {
    require_root!();
    let _serial = serial();
    let aggressive = sender_v4(0);
    let modest: Vec<Ipv4Addr> = (1..=20).map(sender_v4).collect();
    let config = format!(
        "\
default: {{ limit: 20, window: 1s }}
policies:
  - match: {aggressive}/32
    limit: 200
    window: 1s
adaptive:
  enabled: true
  period: 200ms
"
    );
    let load = LoadFile::new("0.95")?;
    let net = TestNet::new()?;
    let counter = net.udp_counter(UDP_PORT)?;
    let agent = Agent::start_with(&net, &config, &["--load-file", &load.path])?;
    // The modest clients' phases are spread over one interval, so that every 200 ms period
    // sees about the same number of their packets (48) and their summed demand hardly moves.
    const MODEST_RATE: f64 = 12.0;
    const AGGRESSIVE_RATE: f64 = 400.0;
    let mut flows = vec![(
        aggressive,
        Pattern::Paced {
            rate: AGGRESSIVE_RATE,
            offset: Duration::ZERO,
        },
    )];
    for (i, m) in modest.iter().enumerate() {
        let offset = Duration::from_secs_f64(i as f64 / (modest.len() as f64 * MODEST_RATE));
        flows.push((
            *m,
            Pattern::Paced {
                rate: MODEST_RATE,
                offset,
            },
        ));
    }
    let traffic = Traffic::start(&net, &flows, Duration::from_secs(35))?;

    // The formulas. g → 0.5; C = 0.5·(20·20 + 200) = 300/s; the modest demands, 12/s each
    // (240/s), are under the water level, so their gᵢ = 1; the aggressive one's demand
    // min(2·200, 200) = 200/s is above it and gets C − 240 = 60/s: gᵢ = 60/200 = 0.3. s → 0.25.
    let (w, a_modest) = effective(20, 1_000_000, 0.25, 1.0);
    let (w_aggr, a_aggr) = effective(200, 1_000_000, 0.25, 0.3);
    assert_eq!((w, a_modest, w_aggr, a_aggr), (250_000, 5, 250_000, 15));
    let share = 0.5 * (20.0 * 20.0 + 200.0) - 20.0 * MODEST_RATE;
    assert_eq!(share, 60.0);

    // Converged: every window at 250 ms, the modest allowances at 5, and the aggressive
    // allowance unchanged over the last four readings (at least 1.2 s, 6 periods).
    let mut last: Vec<u64> = Vec::new();
    let (g, took) = poll(&agent, "convergence", Duration::from_secs(20), |s| {
        let g = adaptive(s)?;
        let (Some(a), Some(all)) = (
            row(s, aggressive),
            modest
                .iter()
                .map(|m| row(s, *m))
                .collect::<Option<Vec<_>>>(),
        ) else {
            return Ok(None);
        };
        let settled = g.tracked == 21
            && g.load_factor == 0.5
            && a.window_ms == 250.0
            && all
                .iter()
                .all(|r| r.window_ms == 250.0 && r.allowance == a_modest as u64);
        if !settled {
            last.clear();
            return Ok(None);
        }
        last.push(a.allowance);
        thread::sleep(Duration::from_millis(200));
        let n = last.len();
        Ok((n >= 4 && last[n - 4..].iter().all(|x| *x == last[n - 1])).then_some(g))
    })?;
    eprintln!("converged after {took:?}: {g:?}, aggressive allowances {last:?}");
    assert!(g.cpu > 0.85, "{g:?}");

    // Measure ~5 s.
    let ids: Vec<Ipv4Addr> = std::iter::once(aggressive)
        .chain(modest.iter().copied())
        .collect();
    let snap = |agent: &Agent| -> Result<Snap> {
        let stats = agent.stats()?;
        let at = Instant::now();
        let counts = counter.counts();
        let m = ids
            .iter()
            .map(|src| {
                let got = counts.get(&IpAddr::from(*src)).copied().unwrap_or(0);
                (*src, (traffic.sent(*src), got))
            })
            .collect();
        Ok((at, m, stats))
    };
    let (t0, m0, _) = snap(&agent)?;
    let mut allowances = Vec::new();
    while t0.elapsed() < Duration::from_secs(5) {
        let s = agent.stats()?;
        let a = row_of(&s, aggressive)?;
        assert_eq!(a.window_ms, 250.0, "{a:?}");
        allowances.push(a.allowance);
        for m in &modest {
            let r = row_of(&s, *m)?;
            assert_eq!(
                (r.window_ms, r.allowance),
                (250.0, a_modest as u64),
                "{m}: {r:?}"
            );
        }
        thread::sleep(Duration::from_millis(250));
    }
    let (t1, m1, s1) = snap(&agent)?;
    let secs = (t1 - t0).as_secs_f64();
    let delta = |src: Ipv4Addr| {
        let (s0, r0) = m0[&src];
        let (s1, r1) = m1[&src];
        (s1 - s0, r1 - r0)
    };
    let mut worst = 1.0f64;
    for m in &modest {
        let (sent, got) = delta(*m);
        let kept = got as f64 / sent.max(1) as f64;
        worst = worst.min(kept);
        assert!(
            sent as f64 >= 0.8 * MODEST_RATE * secs,
            "{m}: sent {sent} in {secs:.2} s"
        );
        assert!(kept >= 0.95, "{m}: kept {got} of {sent}");
    }
    let (sent_a, got_a) = delta(aggressive);
    let rate_a = got_a as f64 / secs;
    let mean_allowance = allowances.iter().sum::<u64>() as f64 / allowances.len() as f64;
    eprintln!(
        "over {secs:.2} s: modest keep >= {:.1}%; aggressive sent {sent_a} ({:.0}/s), received \
         {got_a} ({rate_a:.1}/s), allowances {allowances:?}; {}",
        worst * 100.0,
        sent_a as f64 / secs,
        s1["adaptive"]
    );
    assert!(
        (0.75 * share..=1.25 * share).contains(&rate_a),
        "aggressive received {rate_a:.1}/s, expected its share {share}/s ± 25%"
    );
    assert!(
        (got_a as f64) < 0.25 * sent_a as f64,
        "aggressive received {got_a} of {sent_a}"
    );
    // The allowance is the share's, up to the noise of the measured rates (the share moves by
    // 4/s per packet of allowance; the modest clients' summed demand moves far less, their
    // phases being spread).
    let converged = *last.last().expect("converged");
    assert!(
        converged.abs_diff(a_aggr as u64) <= 1,
        "aggressive allowance converged to {converged}, expected {a_aggr}"
    );
    assert!(
        (mean_allowance - a_aggr as f64).abs() <= 0.5,
        "aggressive allowance {allowances:?}, expected {a_aggr}"
    );
    assert!(
        allowances.iter().all(|a| a.abs_diff(a_aggr as u64) <= 1),
        "aggressive allowance {allowances:?}, expected {a_aggr}"
    );

    let sent = traffic.finish()?;
    assert!(sent[&IpAddr::from(aggressive)] <= 400 * 36, "{sent:?}");
    assert_exact_accounting(&agent, &counter, &sent)
}

// ---------------------------------------------------------------------------------------------
// 4. Reload without restart
// ---------------------------------------------------------------------------------------------

fn reload_config(knobs: &str) -> String {
    format!(
        "\
default: {{ limit: 100, window: 2s }}
adaptive:
  period: 200ms
  alpha: 0.5
{knobs}"
    )
}

/// The `adaptive` knobs change with the config file, without a restart: an invalid value is
/// refused and leaves the adapted windows alone, a new `min_scale` applies, `enabled: false`
/// returns every window to its policy, and enabling again adapts the same clients again.
#[test]
fn adaptive_knobs_reload_without_a_restart() -> Result<()> {
    require_root!();
    let _serial = serial();
    let load = LoadFile::new("0.95")?;
    let net = TestNet::new()?;
    let counter = net.udp_counter(UDP_PORT)?;
    let agent = Agent::start_with(
        &net,
        &reload_config("  enabled: true\n"),
        &["--load-file", &load.path],
    )?;
    let src = sender_v4(5);
    // 60/s against r = 50/s: observed every period, demand r, cut to gᵢ = g = 0.5.
    let traffic = Traffic::start(
        &net,
        &[(
            src,
            Pattern::Paced {
                rate: 60.0,
                offset: Duration::ZERO,
            },
        )],
        Duration::from_secs(40),
    )?;
    let adapted = effective(100, 2_000_000, 0.25, 0.5);
    assert_eq!(adapted, (500_000, 13));
    let has = |want: (u32, u32)| {
        move |s: &Value| -> Result<Option<Row>> {
            let Some(r) = row(s, src) else {
                return Ok(None);
            };
            Ok((r.window_ms == want.0 as f64 / 1e3 && r.allowance == want.1 as u64).then_some(r))
        }
    };
    let (_, took) = poll(&agent, "adapted", Duration::from_secs(15), has(adapted))?;
    eprintln!("adapted to {adapted:?} after {took:?}");

    // A reload that changes nothing for this client (a policy for other addresses) resets its
    // entry to the policy as its packets re-resolve it (clearing its window slots), and the
    // next period writes the adapted values back.
    let with_policy = |knobs: &str| {
        reload_config(knobs).replace(
            "adaptive:",
            "policies:\n  - match: 203.0.113.0/24\n    limit: 5\n    window: 1s\nadaptive:",
        )
    };
    let before = row_of(&agent.stats()?, src)?;
    let (_, took_gen) = agent.reload(&with_policy("  enabled: true\n"), Duration::from_secs(3))?;
    let (_, took) = poll(
        &agent,
        "adapted again after a reload",
        Duration::from_secs(2),
        has(adapted),
    )?;
    thread::sleep(Duration::from_secs(1));
    let after = row_of(&agent.stats()?, src)?;
    eprintln!(
        "unrelated reload: applied after {took_gen:?}, adapted again {took:?} later; passed \
         {} and dropped {} in the {:?} around it",
        after.passed - before.passed,
        after.dropped - before.dropped,
        took_gen + took + Duration::from_secs(1),
    );
    let generation = agent.generation()?;

    // An invalid knob: refused, named, nothing changes.
    let log_from = agent.stderr().len();
    agent.write_config(&with_policy("  enabled: true\n  min_scale: 0\n"))?;
    let deadline = Instant::now() + Duration::from_secs(5);
    let log = loop {
        let log = agent
            .stderr()
            .get(log_from..)
            .unwrap_or_default()
            .to_owned();
        if log.contains("adaptive.min_scale") || Instant::now() >= deadline {
            break log;
        }
        thread::sleep(Duration::from_millis(20));
    };
    assert!(
        log.contains("adaptive.min_scale"),
        "the rejection does not name the knob: {log}"
    );
    for _ in 0..8 {
        let s = agent.stats()?;
        let r = row_of(&s, src)?;
        assert_eq!(
            (r.window_ms, r.allowance),
            (500.0, 13),
            "an invalid config changed the adapted entry"
        );
        assert_eq!(s["generation"].as_u64(), Some(generation));
        assert!(adaptive(&s)?.enabled);
        thread::sleep(Duration::from_millis(150));
    }

    // A new floor: s is clamped to 0.5 at once, W = 1 s and A = 100·0.5·0.5 = 25.
    let floor = effective(100, 2_000_000, 0.5, 0.5);
    assert_eq!(floor, (1_000_000, 25));
    agent.reload(
        &reload_config("  enabled: true\n  min_scale: 0.5\n"),
        Duration::from_secs(3),
    )?;
    let (_, took) = poll(
        &agent,
        "min_scale 0.5 applied",
        Duration::from_secs(3),
        has(floor),
    )?;
    eprintln!("min_scale 0.5 applied after {took:?}");

    // Off: every window back to its policy, and it stays there although the load is high.
    agent.reload(&reload_config("  enabled: false\n"), Duration::from_secs(3))?;
    // The loop takes the new section at its next period; until then a reload's re-resolved
    // entry can show the policy while the loop is still on (and about to adapt it again).
    let back = has((2_000_000, 100));
    let (_, took) = poll(
        &agent,
        "back to the policy",
        Duration::from_secs(3),
        move |s: &Value| -> Result<Option<Row>> {
            let off = adaptive(s).is_ok_and(|g| !g.enabled);
            Ok(back(s)?.filter(|_| off))
        },
    )?;
    eprintln!("disabled: back to the policy after {took:?}");
    for _ in 0..8 {
        let s = agent.stats()?;
        let r = row_of(&s, src)?;
        assert_eq!(
            (r.window_ms, r.allowance, r.scale),
            (2000.0, 100, 1.0),
            "{r:?}"
        );
        let g = adaptive(&s)?;
        assert!(!g.enabled && g.load_factor == 1.0, "{g:?}");
        thread::sleep(Duration::from_millis(150));
    }

    // On again: the released client is reported again at its next window and adapted again.
    agent.reload(&reload_config("  enabled: true\n"), Duration::from_secs(3))?;
    let (_, took) = poll(
        &agent,
        "adapted again",
        Duration::from_secs(15),
        has(adapted),
    )?;
    eprintln!("re-enabled: adapted again after {took:?}");

    let sent = traffic.finish()?;
    assert!(sent[&IpAddr::from(src)] <= 60 * 41, "{sent:?}");
    assert_exact_accounting(&agent, &counter, &sent)
}

// ---------------------------------------------------------------------------------------------
// 5. Weighted shares
// ---------------------------------------------------------------------------------------------

/// Two clients with the same policy size but weights 1 and 3, both sending far above it under
/// an injected overload, share the capacity 1 : 3.
#[test]
fn overload_shares_capacity_by_weight() -> Result<()> {
    require_root!();
    let _serial = serial();
    let (light, heavy) = (sender_v4(0), sender_v4(1));
    let config = format!(
        "\
default: {{ limit: 10, window: 1s }}
policies:
  - match: {light}/32
    limit: 100
    window: 1s
  - match: {heavy}/32
    limit: 100
    window: 1s
    weight: 3
adaptive:
  enabled: true
  period: 200ms
"
    );
    let load = LoadFile::new("0.95")?;
    let net = TestNet::new()?;
    let counter = net.udp_counter(UDP_PORT)?;
    let agent = Agent::start_with(&net, &config, &["--load-file", &load.path])?;
    const RATE: f64 = 300.0;
    let traffic = Traffic::start(
        &net,
        &[
            (
                light,
                Pattern::Paced {
                    rate: RATE,
                    offset: Duration::ZERO,
                },
            ),
            (
                heavy,
                Pattern::Paced {
                    rate: RATE,
                    offset: Duration::from_micros(1666),
                },
            ),
        ],
        Duration::from_secs(30),
    )?;
    // g → 0.5: C = 0.5·(100 + 100) = 100/s. Both demand their whole rate (100/s) and are cut:
    // weighted water-filling gives 25/s and 75/s, gᵢ = 0.25 and 0.75; s → 0.25.
    let light_want = effective(100, 1_000_000, 0.25, 0.25);
    let heavy_want = effective(100, 1_000_000, 0.25, 0.75);
    assert_eq!((light_want, heavy_want), ((250_000, 6), (250_000, 19)));
    let (_, took) = poll(&agent, "weighted shares", Duration::from_secs(15), |s| {
        let (Some(l), Some(h)) = (row(s, light), row(s, heavy)) else {
            return Ok(None);
        };
        Ok((l.window_ms == 250.0
            && h.window_ms == 250.0
            && l.allowance == light_want.1 as u64
            && h.allowance == heavy_want.1 as u64)
            .then_some(()))
    })?;
    let t0 = Instant::now();
    let (l0, h0) = (counter.count(light), counter.count(heavy));
    thread::sleep(Duration::from_secs(4));
    let secs = t0.elapsed().as_secs_f64();
    let (l1, h1) = (counter.count(light), counter.count(heavy));
    let (rate_l, rate_h) = ((l1 - l0) as f64 / secs, (h1 - h0) as f64 / secs);
    let s = agent.stats()?;
    let (l, h) = (row_of(&s, light)?, row_of(&s, heavy)?);
    eprintln!(
        "weighted: converged after {took:?}; received {rate_l:.1}/s and {rate_h:.1}/s; {l:?} \
         {h:?} {}",
        s["adaptive"]
    );
    assert_eq!((l.allowance, h.allowance), (6, 19), "{l:?} {h:?}");
    // A / W: 24/s and 76/s.
    assert!(
        (18.0..=30.0).contains(&rate_l),
        "light: {rate_l:.1}/s, expected 24/s"
    );
    assert!(
        (64.0..=88.0).contains(&rate_h),
        "heavy: {rate_h:.1}/s, expected 76/s"
    );
    let sent = traffic.finish()?;
    assert_exact_accounting(&agent, &counter, &sent)
}

/// A reading during the fairness test: when, what the receiver counted per client (and what was
/// sent), and the agent's stats.
type Snap = (Instant, HashMap<Ipv4Addr, (u64, u64)>, Value);

// ---------------------------------------------------------------------------------------------
// Client patterns
// ---------------------------------------------------------------------------------------------

/// A calm client grows its window (pattern scale p up to max_scale) whether it sends its few
/// packets evenly or in bursts: silent periods count as rate 0, so a client bursting 10
/// datagrams every 2 s (5/s on average, û ≈ 0.1) is as calm as one sending 5/s evenly. (Before
/// silent periods were observed, the bursty one was measured at û = 10 / 0.2 s / 50/s = 1 and
/// never grew.)
#[test]
fn a_calm_bursty_client_grows_its_window_like_a_paced_one() -> Result<()> {
    require_root!();
    let _serial = serial();
    let config = "\
default: { limit: 100, window: 2s }
adaptive:
  enabled: true
  period: 200ms
  alpha: 0.5
";
    let load = LoadFile::new("0.2")?;
    let net = TestNet::new()?;
    let _counter = net.udp_counter(UDP_PORT)?;
    let agent = Agent::start_with(&net, config, &["--load-file", &load.path])?;
    let (bursty, paced) = (sender_v4(0), sender_v4(1));
    let _traffic = Traffic::start(
        &net,
        &[
            (
                bursty,
                Pattern::Bursts {
                    size: 10,
                    every: Duration::from_secs(2),
                },
            ),
            (
                paced,
                Pattern::Paced {
                    rate: 5.0,
                    offset: Duration::ZERO,
                },
            ),
        ],
        Duration::from_secs(20),
    )?;
    poll(
        &agent,
        "the paced client's window grown",
        Duration::from_secs(10),
        |s| {
            Ok(row(s, paced)
                .is_some_and(|r| r.window_ms > 2000.0)
                .then_some(()))
        },
    )?;
    poll(
        &agent,
        "the bursty client's window grown",
        Duration::from_secs(15),
        |s| {
            Ok(row(s, bursty)
                .is_some_and(|r| r.window_ms > 2000.0)
                .then_some(()))
        },
    )?;
    Ok(())
}
