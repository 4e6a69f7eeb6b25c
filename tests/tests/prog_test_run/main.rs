//! Exact behaviour of the XDP programs through BPF_PROG_TEST_RUN: decisions, per-client and
//! global counters, policy reloads, map pressure and concurrency. Needs root; every test loads
//! its own private (unpinned) copy of the object. One test binary; the tests are grouped by what
//! they cover (`frames`, `policies`, `checks`, `maps`, `grouping`, `cluster`), the shared
//! fixture ([`Limiter`]) and helpers are here.
//!
//! Windows of one hour or more are timed by the kernel's real clock, so a test whose counts
//! depend on staying inside one fixed window runs inside [`in_one_window`], which repeats it
//! (with a fresh object) if a window boundary passed while it ran.

#![expect(
    clippy::unwrap_used,
    clippy::expect_used,
    reason = "test helpers outside #[test] functions; a panic there is the test failing"
)]

use std::{
    net::{IpAddr, Ipv4Addr},
    sync::Barrier,
};

use anyhow::{Context as _, Result, bail, ensure};
use aya::{
    Ebpf,
    maps::{PerCpuArray, PerCpuValues},
    programs::{TestRun, TestRunOptions, Xdp},
};
use limiter_common::{
    ClientState, GlobalStats,
    addr::{ClientKey, covers, v4_mapped},
    maps::{
        ACTION_DROP, ACTION_PASS, CONFIG_NO_STATIC, FLAG_REPORTED, FLAG_STATIC, GENERATION_SWEEP,
        hot_count,
    },
};
use limiter_tests::frames::{Builder, ETH_HLEN, TPID_8021AD, TPID_8021Q};
use limiter_user::{
    config::Config,
    datapath::{self, LoadOptions, Tables},
};

const XDP_DROP: u32 = 1;
const XDP_PASS: u32 = 2;

const HOUR_NS: u64 = 3_600_000_000_000;
/// `bpf_ktime_get_coarse_ns` lags CLOCK_MONOTONIC by up to one jiffy (10 ms at HZ=100).
const COARSE_SLACK_NS: u64 = 20_000_000;

/// Fails the surrounding `Result` function (rather than panicking) when `left != right`.
macro_rules! check_eq {
    ($left:expr, $right:expr $(,)?) => {
        check_eq!($left, $right, "")
    };
    ($left:expr, $right:expr, $($ctx:tt)+) => {{
        let (left, right) = (&$left, &$right);
        if left != right {
            anyhow::bail!(
                "`{}` == `{}` failed: {:?} != {:?} {}",
                stringify!($left),
                stringify!($right),
                left,
                right,
                format!($($ctx)+)
            );
        }
    }};
}

fn monotonic_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `ts` is a valid timespec to write to.
    let rc = unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    assert_eq!(rc, 0, "clock_gettime");
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

/// Runs `test` (given the attempt number) and returns its result if no boundary of windows of
/// `window_ns` passed while it ran; otherwise runs it again, up to three times.
fn in_one_window<T>(window_ns: u64, mut test: impl FnMut(u32) -> Result<T>) -> Result<T> {
    for attempt in 0..3 {
        let before = monotonic_ns().saturating_sub(COARSE_SLACK_NS);
        let result = test(attempt);
        let after = monotonic_ns();
        if before / window_ns == after / window_ns {
            return result;
        }
        eprintln!("attempt {attempt} crossed a window boundary; repeating it");
    }
    bail!("crossed a window boundary three times in a row")
}

/// A private copy of the object with its policy tables and the `limiter` program loaded.
struct Limiter {
    ebpf: Ebpf,
    tables: Tables,
}

impl Limiter {
    /// The check program on these maps, with the policies of `yaml` (the config they were
    /// loaded with) for naming them.
    fn checker(&mut self, yaml: &str) -> Result<limiter_user::check::Checker> {
        Ok(limiter_user::check::Checker::new(
            datapath::load_check_program(&mut self.ebpf)?,
            &Config::parse(yaml)?,
        ))
    }

    fn new(max_clients: u32, yaml: &str) -> Result<Limiter> {
        Limiter::with_options(
            &LoadOptions {
                pin_dir: None,
                max_clients,
                ..LoadOptions::default()
            },
            yaml,
        )
    }

    fn with_options(options: &LoadOptions, yaml: &str) -> Result<Limiter> {
        let mut ebpf = datapath::load(options).context("loading the object (needs root)")?;
        let mut tables = Tables::take(&mut ebpf)?;
        tables.apply(&Config::parse(yaml)?)?;
        let program: &mut Xdp = ebpf
            .program_mut(datapath::PROGRAM)
            .context("no limiter program")?
            .try_into()?;
        program.load()?;
        Ok(Limiter { ebpf, tables })
    }

    fn apply(&mut self, yaml: &str) -> Result<()> {
        self.tables.apply(&Config::parse(yaml)?)?;
        Ok(())
    }

    fn program(&self) -> &Xdp {
        self.ebpf
            .program(datapath::PROGRAM)
            .unwrap()
            .try_into()
            .unwrap()
    }

    /// One run on `frame` (at least an Ethernet header long: BPF_PROG_TEST_RUN rejects shorter
    /// packets with EINVAL, also when they sit behind XDP metadata).
    fn run(&self, frame: &[u8]) -> Result<u32> {
        let result = self.program().test_run(TestRunOptions {
            data_in: Some(frame),
            ..Default::default()
        })?;
        Ok(result.return_value)
    }

    /// The verdicts of `n` runs on `frame`.
    fn verdicts(&self, frame: &[u8], n: usize) -> Result<Vec<u32>> {
        (0..n).map(|_| self.run(frame)).collect()
    }

    /// Sends `n` UDP packets from `src`; returns how many passed.
    fn send(&self, src: IpAddr, n: usize) -> Result<usize> {
        let frame = udp_from(src);
        let verdicts = self.verdicts(&frame, n)?;
        ensure!(
            verdicts.iter().all(|&v| v == XDP_PASS || v == XDP_DROP),
            "unexpected verdicts {verdicts:?}"
        );
        Ok(verdicts.iter().filter(|&&v| v == XDP_PASS).count())
    }

    fn global(&self) -> Result<GlobalStats> {
        Ok(self.tables.global()?)
    }

    /// The entry `src` is counted in: its own, or its group's (IPv6 sources share one per /64
    /// unless the policy says otherwise).
    fn client(&self, src: IpAddr) -> Option<ClientState> {
        self.tables
            .clients()
            .expect("reading the client maps")
            .into_iter()
            .find(|(k, _)| covers(k, &key_of(src)))
            .map(|(_, v)| v)
    }

    fn client_counts(&self, src: IpAddr) -> Result<(u64, u64)> {
        let c = self
            .client(src)
            .with_context(|| format!("no client entry for {src}"))?;
        Ok((c.total_passed(), c.dropped_count()))
    }
}

fn v4(a: u8, b: u8, c: u8, d: u8) -> IpAddr {
    IpAddr::V4(Ipv4Addr::new(a, b, c, d))
}

fn v6(s: &str) -> IpAddr {
    IpAddr::V6(s.parse().unwrap())
}

fn key_of(src: IpAddr) -> ClientKey {
    match src {
        IpAddr::V4(a) => v4_mapped(a.octets()),
        IpAddr::V6(a) => a.octets(),
    }
}

fn builder_from(src: IpAddr) -> Builder {
    match src {
        IpAddr::V4(a) => Builder::ipv4(a, Ipv4Addr::new(192, 0, 2, 254)),
        IpAddr::V6(a) => Builder::ipv6(a, "2001:db8::fe".parse().unwrap()),
    }
}

fn udp_from(src: IpAddr) -> Vec<u8> {
    builder_from(src).build().bytes
}

/// `n` distinct IPv4 sources 10.a.b.c, starting after `first`.
fn spoofed(first: u32, n: u32) -> impl Iterator<Item = IpAddr> {
    (first + 1..=first + n).map(|i| v4(10, (i >> 16) as u8, (i >> 8) as u8, i as u8))
}

fn expect_limit(verdicts: &[u32], limit: usize) -> Result<()> {
    let mut want = vec![XDP_PASS; limit.min(verdicts.len())];
    want.resize(verdicts.len(), XDP_DROP);
    check_eq!(verdicts, want);
    Ok(())
}

// Declared last: a `macro_rules!` macro (`check_eq!`) is visible only to modules declared after it.
mod checks;
mod cluster;
mod frames;
mod grouping;
mod maps;
mod policies;
