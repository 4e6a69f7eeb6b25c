//! The adaptive loop against a private copy of the real maps and programs: packets through the
//! `limiter` program (BPF_PROG_TEST_RUN), reports through the `ACTIVE` ring, changes through the
//! `limiter_adapt` program, and an injected CPU load. Needs root. The periods are driven by hand
//! (`Tuner::tick` with a stated elapsed time), so nothing here waits on the controller's clock.

#![expect(
    clippy::unwrap_used,
    reason = "test helpers outside #[test] functions; a panic there is the test failing"
)]

use std::{
    net::{IpAddr, Ipv4Addr},
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::Duration,
};

use anyhow::{Context as _, Result, ensure};
use aya::{
    Ebpf,
    programs::{TestRun, TestRunOptions, Xdp},
};
use limiter_common::{
    ClientState,
    addr::{ClientKey, v4_mapped},
    maps::FLAG_REPORTED,
};
use limiter_tests::frames::Builder;
use limiter_user::{
    adaptive::load::LoadSource,
    adaptive::tuner::{PeriodReport, Tuner},
    config::Config,
    datapath::{self, LoadOptions, Tables},
};

const XDP_PASS: u32 = 2;
const SECOND: Duration = Duration::from_secs(1);

/// A CPU load the test sets.
#[derive(Clone, Default)]
struct Injected(Arc<AtomicU64>);

impl Injected {
    fn set(&self, cpu: f64) {
        self.0.store(cpu.to_bits(), Ordering::Relaxed);
    }
}

impl LoadSource for Injected {
    fn sample(&mut self) -> f64 {
        f64::from_bits(self.0.load(Ordering::Relaxed))
    }
    fn describe(&self) -> String {
        "injected".into()
    }
}

struct Rig {
    ebpf: Ebpf,
    tables: Tables,
    tuner: Tuner,
    load: Injected,
}

/// 100 per 1 h by default, so nothing rolls over by itself during a test; adaptive with a dwell
/// of 1 and no smoothing so that each period moves one step.
const YAML: &str = "\
default: { limit: 100, window: 1h }
policies:
  - match: 198.51.100.0/24
    limit: 1000
    window: 10s
adaptive:
  enabled: true
  alpha: 1
  dwell: 1
  idle_periods: 4
";

impl Rig {
    fn new(yaml: &str) -> Result<Rig> {
        let mut ebpf = datapath::load(&LoadOptions {
            pin_dir: None,
            max_clients: 4096,
            ..LoadOptions::default()
        })
        .context("loading the object (needs root)")?;
        let mut tables = Tables::take(&mut ebpf)?;
        let config = Config::parse(yaml)?;
        let report = tables.apply(&config)?;
        let program: &mut Xdp = ebpf
            .program_mut(datapath::PROGRAM)
            .context("no limiter program")?
            .try_into()?;
        program.load()?;
        let adapt = datapath::load_adapt_program(&mut ebpf)?;
        let ring = datapath::take_active(&mut ebpf)?;
        let load = Injected::default();
        load.set(0.3);
        let tuner = Tuner::new(
            &config,
            report.generation,
            ring,
            adapt,
            tables.adaptive_handles()?,
            Box::new(load.clone()),
        )?;
        Ok(Rig {
            ebpf,
            tables,
            tuner,
            load,
        })
    }

    fn apply(&mut self, yaml: &str) -> Result<()> {
        let config = Config::parse(yaml)?;
        let report = self.tables.apply(&config)?;
        self.tuner.set_policies(&config, report.generation)?;
        Ok(())
    }

    /// Sends `n` packets from `src`; returns how many passed.
    fn send(&self, src: IpAddr, n: usize) -> Result<usize> {
        let frame = match src {
            IpAddr::V4(a) => {
                Builder::ipv4(a, Ipv4Addr::new(192, 0, 2, 254))
                    .build()
                    .bytes
            }
            IpAddr::V6(a) => Builder::ipv6(a, "2001:db8::fe".parse()?).build().bytes,
        };
        let program: &Xdp = self.ebpf.program(datapath::PROGRAM).unwrap().try_into()?;
        let mut passed = 0;
        for _ in 0..n {
            let r = program.test_run(TestRunOptions {
                data_in: Some(&frame),
                ..Default::default()
            })?;
            passed += (r.return_value == XDP_PASS) as usize;
        }
        Ok(passed)
    }

    /// The entry `src` is counted in: its own, or its group's.
    fn client(&self, src: IpAddr) -> Result<ClientState> {
        let key = key_of(src);
        self.tables
            .clients()?
            .into_iter()
            .find(|(k, _)| limiter_common::addr::covers(k, &key))
            .map(|(_, v)| v)
            .with_context(|| format!("no entry for {src}"))
    }

    fn tick(&mut self) -> Result<PeriodReport> {
        Ok(self.tuner.tick(SECOND)?)
    }
}

fn v4(a: u8, b: u8, c: u8, d: u8) -> IpAddr {
    IpAddr::V4(Ipv4Addr::new(a, b, c, d))
}

fn key_of(src: IpAddr) -> ClientKey {
    match src {
        IpAddr::V4(a) => v4_mapped(a.octets()),
        IpAddr::V6(a) => a.octets(),
    }
}

#[test]
fn overload_shrinks_windows_in_the_map_and_relief_restores_them() -> Result<()> {
    limiter_tests::require_root!();
    let mut rig = Rig::new(YAML)?;
    let busy = v4(198, 51, 100, 7);
    let calm = v4(203, 0, 113, 9);
    rig.send(busy, 50)?;
    rig.send(calm, 5)?;
    let first = rig.tick()?;
    check(first.reported == 2 && first.tracked == 2, &first)?;
    // Reported once: the flag keeps later windows out of the ring.
    ensure!(rig.client(busy)?.flags() & FLAG_REPORTED != 0);
    rig.load.set(0.95);
    let mut windows = Vec::new();
    for _ in 0..8 {
        rig.send(busy, 50)?;
        rig.send(calm, 5)?;
        let r = rig.tick()?;
        check(r.reported == 0 && r.reads == 2 && r.observed == 2, &r)?;
        windows.push(rig.client(busy)?.window_us);
    }
    // 10 s shrinks one step (÷1.25) per period to the 0.25 floor: 8, 6.4, 5.12, 4.096, 3.277,
    // 2.621, 2.5 s, and holds; the allowance follows W·r·g with g stepping to its 0.5 floor.
    let expected = [
        8_000_000, 6_400_000, 5_120_000, 4_096_000, 3_276_800, 2_621_440, 2_500_000, 2_500_000,
    ];
    ensure!(windows == expected, "windows {windows:?}");
    let busy_state = rig.client(busy)?;
    ensure!(busy_state.limit == 125, "allowance {}", busy_state.limit);
    let calm_state = rig.client(calm)?;
    ensure!(
        calm_state.window_us == 900_000_000,
        "calm window {}",
        calm_state.window_us
    );
    // Relief: back to the policy, one step per period.
    rig.load.set(0.1);
    for _ in 0..12 {
        rig.send(busy, 50)?;
        rig.send(calm, 5)?;
        rig.tick()?;
    }
    let busy_state = rig.client(busy)?;
    ensure!(
        (busy_state.window_us, busy_state.limit) == (10_000_000, 1000),
        "after relief {busy_state:?}"
    );
    Ok(())
}

/// An IPv6 /64 is one client to the controller too: the ring reports its group once, however
/// many of its addresses send, and the window the controller sets is the group's, for each of
/// its addresses.
#[test]
fn an_ipv6_64_is_tracked_and_adapted_as_one_client() -> Result<()> {
    limiter_tests::require_root!();
    let yaml = YAML.replace(
        "policies:\n",
        "policies:\n  - match: \"2001:db8:5::/48\"\n    limit: 1000\n    window: 10s\n",
    );
    let mut rig = Rig::new(&yaml)?;
    let a: IpAddr = "2001:db8:5:1::a".parse()?;
    let b: IpAddr = "2001:db8:5:1:ffff::b".parse()?;
    rig.send(a, 25)?;
    rig.send(b, 25)?;
    let first = rig.tick()?;
    check(first.reported == 1 && first.tracked == 1, &first)?;
    rig.load.set(0.95);
    for _ in 0..3 {
        rig.send(a, 25)?;
        rig.send(b, 25)?;
        let r = rig.tick()?;
        check(r.reads == 1 && r.observed == 1, &r)?;
    }
    // 10 s shrinks one step per period: 8, 6.4, 5.12 s, for both addresses.
    let (sa, sb) = (rig.client(a)?, rig.client(b)?);
    ensure!(sa == sb, "one entry for the /64: {sa:?} {sb:?}");
    ensure!(sa.window_us == 5_120_000, "window {}", sa.window_us);
    ensure!(sa.total_passed() == 200, "passed {}", sa.total_passed());
    Ok(())
}

#[test]
fn a_shrinking_window_keeps_the_used_fraction_and_every_count() -> Result<()> {
    limiter_tests::require_root!();
    let mut rig = Rig::new(YAML)?;
    let client = v4(198, 51, 100, 20);
    // 1000 per 10 s: use it all up.
    ensure!(rig.send(client, 1200)? == 1000);
    rig.tick()?;
    rig.load.set(0.95);
    rig.send(client, 10)?;
    let r = rig.tick()?;
    check(r.written == 1, &r)?;
    let state = rig.client(client)?;
    // W = 8 s and A = 800: the full allowance is carried over as used, so nothing more passes
    // (a fresh window would have let 800 through).
    ensure!(
        (state.window_us, state.limit) == (8_000_000, 800),
        "{state:?}"
    );
    ensure!(
        rig.send(client, 100)? == 0,
        "the shrunken window admitted a used-up client"
    );
    // Every packet is still counted exactly once.
    ensure!(
        state.total_passed() == 1000,
        "passed {}",
        state.total_passed()
    );
    let state = rig.client(client)?;
    ensure!(
        state.total_passed() + state.dropped_count() == 1310,
        "{state:?}"
    );
    // A reload (any change: a new generation) returns the entry to its policy's 10 s / 1000
    // at its next packet, still used up: no fresh allowance either.
    rig.apply(&YAML.replace("limit: 100,", "limit: 101,"))?;
    ensure!(
        rig.send(client, 100)? == 0,
        "the reload handed out a fresh allowance"
    );
    let state = rig.client(client)?;
    ensure!(
        (state.window_us, state.limit) == (10_000_000, 1000),
        "{state:?}"
    );
    ensure!(
        state.total_passed() == 1000 && state.dropped_count() == 410,
        "{state:?}"
    );
    Ok(())
}

#[test]
fn work_per_period_follows_the_active_clients_not_the_resident_ones() -> Result<()> {
    limiter_tests::require_root!();
    let mut rig = Rig::new(YAML)?;
    // Load in the hysteresis band: nothing loosens or tightens, so the steady clients' entries
    // need no rewriting.
    rig.load.set(0.7);
    let idle: Vec<IpAddr> = (0..400)
        .map(|i| v4(10, 1, (i >> 8) as u8, i as u8))
        .collect();
    let active: Vec<IpAddr> = (1..=3).map(|i| v4(198, 51, 100, i)).collect();
    for &c in idle.iter().chain(&active) {
        rig.send(c, 1)?;
    }
    let first = rig.tick()?;
    check(first.reported == 403 && first.tracked == 403, &first)?;
    // idle_periods is 4: the idle ones are released after that, active ones stay.
    let mut last = first;
    for _ in 0..6 {
        for &c in &active {
            rig.send(c, 5)?;
        }
        last = rig.tick()?;
    }
    check(
        last.tracked == 3 && last.reads == 3 && last.observed == 3,
        &last,
    )?;
    // Released entries are back to their policy with the report flag cleared.
    let state = rig.client(idle[0])?;
    ensure!(state.flags() & FLAG_REPORTED == 0, "{state:?}");
    ensure!(rig.tables.clients()?.len() >= 403);
    // Steady load, steady clients: nothing is rewritten.
    let r = rig.tick()?;
    check(r.written == 0, &r)?;
    Ok(())
}

#[test]
fn a_released_client_is_reported_again_at_its_next_window() -> Result<()> {
    limiter_tests::require_root!();
    let yaml = YAML.replace("window: 10s", "window: 20ms");
    let mut rig = Rig::new(&yaml)?;
    let client = v4(198, 51, 100, 30);
    rig.send(client, 1)?;
    check(rig.tick()?.reported == 1, &PeriodReport::default())?;
    // Silent for longer than idle_periods: released.
    let mut released = 0;
    for _ in 0..6 {
        released += rig.tick()?.released;
    }
    ensure!(released == 1 && rig.client(client)?.flags() & FLAG_REPORTED == 0);
    // Its next window (20 ms later) reports it again, exactly once.
    std::thread::sleep(Duration::from_millis(25));
    rig.send(client, 3)?;
    let r = rig.tick()?;
    check(r.reported == 1 && r.tracked == 1, &r)?;
    Ok(())
}

#[test]
fn adapted_windows_survive_a_reload_and_disabling_restores_the_policy() -> Result<()> {
    limiter_tests::require_root!();
    let mut rig = Rig::new(YAML)?;
    let client = v4(198, 51, 100, 40);
    rig.send(client, 10)?;
    rig.tick()?;
    rig.load.set(0.95);
    for _ in 0..3 {
        rig.send(client, 10)?;
        rig.tick()?;
    }
    let adapted = rig.client(client)?;
    ensure!(adapted.window_us == 5_120_000, "{adapted:?}");
    // A reload (new generation) resets entries to their policy as packets re-resolve them;
    // the next period writes the adapted values back.
    rig.apply(&YAML.replace("limit: 100,", "limit: 101,"))?;
    rig.send(client, 10)?;
    ensure!(rig.client(client)?.window_us == 10_000_000);
    rig.tick()?;
    let state = rig.client(client)?;
    ensure!(
        state.window_us < 10_000_000,
        "not re-adapted after the reload: {state:?}"
    );
    // `enabled: false` returns every tracked client to its policy at the next period.
    rig.apply(&YAML.replace("enabled: true", "enabled: false"))?;
    let r = rig.tick()?;
    check(r.released == 1 && r.tracked == 0, &r)?;
    let state = rig.client(client)?;
    ensure!(
        (state.window_us, state.limit) == (10_000_000, 1000),
        "{state:?}"
    );
    ensure!(state.flags() & FLAG_REPORTED == 0);
    Ok(())
}

#[test]
fn a_release_restores_the_policy_in_force_not_the_one_last_seen() -> Result<()> {
    limiter_tests::require_root!();
    let mut rig = Rig::new(YAML)?;
    let client = v4(203, 0, 113, 50);
    rig.send(client, 5)?;
    rig.tick()?;
    rig.load.set(0.95);
    for _ in 0..3 {
        rig.send(client, 5)?;
        rig.tick()?;
    }
    ensure!(rig.client(client)?.window_us < 3_600_000_000);
    // A new, tighter policy for its prefix, while the client is silent: its entry still caches
    // the default (generation and policy id of before) when the loop releases it.
    rig.apply(&YAML.replace(
        "policies:\n",
        "policies:\n  - match: 203.0.113.0/24\n    limit: 7\n    window: 30s\n",
    ))?;
    let mut released = 0;
    for _ in 0..8 {
        released += rig.tick()?.released;
    }
    ensure!(released == 1, "released {released}");
    let state = rig.client(client)?;
    ensure!(
        (state.limit, state.window_us, state.flags() & FLAG_REPORTED) == (7, 30_000_000, 0),
        "released to {state:?}"
    );
    Ok(())
}

#[test]
fn the_clients_a_previous_agent_tracked_are_found_for_adoption() -> Result<()> {
    limiter_tests::require_root!();
    let mut rig = Rig::new(YAML)?;
    let tracked: Vec<IpAddr> = (1..=5).map(|i| v4(198, 51, 100, i)).collect();
    for &c in &tracked {
        rig.send(c, 3)?;
    }
    check(rig.tick()?.tracked == 5, &PeriodReport::default())?;
    // What a restarted agent walks once: the flagged entries, which the fast path will not
    // report again.
    let mut found: Vec<ClientKey> = rig
        .tables
        .adaptive_handles()?
        .reported()?
        .into_iter()
        .map(|(k, _)| k)
        .collect();
    found.sort();
    let mut want: Vec<ClientKey> = tracked.iter().map(|&c| key_of(c)).collect();
    want.sort();
    ensure!(found == want, "found {found:?}");
    Ok(())
}

fn check(ok: bool, report: &PeriodReport) -> Result<()> {
    ensure!(ok, "unexpected period: {report:?}");
    Ok(())
}

/// The loop reads its tracked clients in read frames of the adapt program (dozens per run, from
/// whichever map holds each: `CLIENTS`, `STATIC_CLIENTS`, `LIMITED`) and writes changes dozens
/// per run: 200 busy clients under overload take ⌈200 / 47⌉ read runs and ⌈200 / 64⌉ write runs
/// a period, and every one of them, the limited and the exact-address ones too, is adapted.
#[test]
fn many_clients_are_read_and_written_dozens_per_run() -> Result<()> {
    use limiter_common::maps::{ADAPT_BATCH, ADAPT_READ_BATCH};
    limiter_tests::require_root!();
    // The /24 of YAML, and an exact-address policy (its client lives in STATIC_CLIENTS).
    let yaml = YAML.replacen(
        "adaptive:",
        "  - match: 198.51.100.200\n    limit: 1000\n    window: 10s\nadaptive:",
        1,
    );
    let mut rig = Rig::new(&yaml)?;
    let clients: Vec<IpAddr> = (0..200u32)
        .map(|i| v4(198, 51, 100, if i == 199 { 200 } else { i as u8 }))
        .collect();
    // One client far over its limit: it moves into LIMITED.
    let limited = clients[5];
    rig.send(limited, 1100)?;
    ensure!(
        rig.tables
            .client_maps()?
            .limited_keys()?
            .contains(&key_of(limited))
    );
    for &c in &clients {
        rig.send(c, 3)?;
    }
    let first = rig.tick()?;
    check(first.tracked == 200, &first)?;
    rig.load.set(0.95);
    for _ in 0..3 {
        for &c in &clients {
            rig.send(c, 3)?;
        }
        let r = rig.tick()?;
        check(
            r.reads == 200
                && r.read_runs == 200usize.div_ceil(ADAPT_READ_BATCH)
                && r.observed == 200
                && r.written == 200
                && r.runs == 200usize.div_ceil(ADAPT_BATCH),
            &r,
        )?;
    }
    for &c in &clients {
        let state = rig.client(c)?;
        ensure!(state.window_us == 5_120_000, "{c}: {state:?}");
    }
    Ok(())
}
