//! Exact behaviour of the XDP program through BPF_PROG_TEST_RUN: decisions, per-client and
//! global counters, policy reloads, map pressure and concurrency. Needs root; every test loads
//! its own private (unpinned) copy of the object.
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

#[test]
fn every_encapsulation_gets_exactly_the_limit() -> Result<()> {
    const N: usize = 12;
    in_one_window(HOUR_NS, |_| {
        let lim = Limiter::new(1024, "default: { limit: 5, window: 1h }\n")?;
        let nops = [1u8; 39];
        // Each IPv6 case in a /64 of its own: IPv6 sources share one client per /64.
        let cases: Vec<(&str, IpAddr, Builder)> = vec![
            (
                "IPv4",
                v4(198, 51, 100, 1),
                builder_from(v4(198, 51, 100, 1)),
            ),
            ("IPv6", v6("2001:db8::1"), builder_from(v6("2001:db8::1"))),
            (
                "802.1Q IPv4",
                v4(198, 51, 100, 2),
                builder_from(v4(198, 51, 100, 2)).vlan(TPID_8021Q, 10),
            ),
            (
                "802.1Q IPv6",
                v6("2001:db8:2::2"),
                builder_from(v6("2001:db8:2::2")).vlan(TPID_8021Q, 10),
            ),
            (
                "802.1ad IPv4",
                v4(198, 51, 100, 3),
                builder_from(v4(198, 51, 100, 3)).vlan(TPID_8021AD, 10),
            ),
            (
                "QinQ IPv4",
                v4(198, 51, 100, 4),
                builder_from(v4(198, 51, 100, 4)).qinq(10, 20),
            ),
            (
                "QinQ IPv6",
                v6("2001:db8:4::4"),
                builder_from(v6("2001:db8:4::4")).qinq(10, 20),
            ),
            (
                "IPv4 router alert option",
                v4(198, 51, 100, 5),
                builder_from(v4(198, 51, 100, 5)).ipv4_options(&[0x94, 0x04, 0, 0]),
            ),
            (
                "IPv4 40 bytes of options, QinQ",
                v4(198, 51, 100, 6),
                builder_from(v4(198, 51, 100, 6))
                    .ipv4_options(&nops)
                    .qinq(1, 2),
            ),
        ];
        for (name, src, builder) in &cases {
            let verdicts = lim.verdicts(&builder.build().bytes, N)?;
            expect_limit(&verdicts, 5).with_context(|| name.to_string())?;
            check_eq!(lim.client_counts(*src)?, (5, N as u64 - 5), "{name}");
        }
        let k = cases.len() as u64;
        let g = lim.global()?;
        check_eq!(g.passed, 5 * k);
        check_eq!(g.dropped, (N as u64 - 5) * k);
        check_eq!(g.new_clients, k);
        check_eq!(g.resolves, k);
        check_eq!(
            (g.malformed, g.non_ip, g.map_full, g.contended),
            (0, 0, 0, 0)
        );
        check_eq!(lim.tables.clients()?.len() as u64, k);
        Ok(())
    })
}

#[test]
fn truncated_and_malformed_frames_pass_and_are_counted() -> Result<()> {
    let lim = Limiter::new(1024, "default: { limit: 1000000, window: 1h }\n")?;
    let src = v4(198, 51, 100, 7);
    let src6 = v6("2001:db8::7");
    let bases = [
        ("IPv4", builder_from(src).build()),
        (
            "IPv4 + options",
            builder_from(src)
                .ipv4_options(&[0x94, 0x04, 0, 0, 1, 1, 1, 0])
                .build(),
        ),
        ("IPv6", builder_from(src6).build()),
        ("802.1Q IPv4", builder_from(src).vlan(TPID_8021Q, 7).build()),
        (
            "QinQ IPv4 + options",
            builder_from(src)
                .qinq(7, 8)
                .ipv4_options(&[1, 1, 1, 1])
                .build(),
        ),
        ("QinQ IPv6", builder_from(src6).qinq(7, 8).build()),
    ];
    let mut malformed = 0u64;
    let mut run_malformed = |what: &str, frame: &[u8]| -> Result<()> {
        check_eq!(lim.run(frame)?, XDP_PASS, "{what}");
        malformed += 1;
        let g = lim.global()?;
        check_eq!(g.malformed, malformed, "{what}");
        check_eq!(
            (g.passed, g.dropped, g.non_ip, g.new_clients, g.resolves),
            (0, 0, 0, 0, 0),
            "{what}"
        );
        Ok(())
    };
    let mut udp_cuts = Vec::new();
    for (name, frame) in &bases {
        // Cuts inside the Ethernet header (shorter than 14 bytes) cannot be run: see `run`.
        for cut in frame
            .truncations()
            .into_iter()
            .filter(|c| c.len >= ETH_HLEN)
        {
            if cut.header.parsed() {
                let what = format!(
                    "{name} cut at {} ({:?}, boundary: {})",
                    cut.len, cut.header, cut.at_boundary
                );
                run_malformed(&what, frame.truncated(cut.len))?;
            } else {
                udp_cuts.push((name, frame.truncated(cut.len).to_vec(), cut));
            }
        }
    }
    for ihl in 0..5 {
        run_malformed(
            &format!("IHL {ihl}"),
            &builder_from(src).ihl(ihl).build().bytes,
        )?;
    }
    // IHL 15 claims 40 bytes of options that the frame (20-byte header, 8 UDP, no payload) lacks.
    run_malformed(
        "IHL 15 beyond the frame",
        &builder_from(src).payload(b"").ihl(15).build().bytes,
    )?;
    for version in [0, 6, 15] {
        run_malformed(
            &format!("IPv4 version {version}"),
            &builder_from(src).version(version).build().bytes,
        )?;
    }
    for version in [0, 4, 15] {
        run_malformed(
            &format!("IPv6 version {version}"),
            &builder_from(src6).version(version).build().bytes,
        )?;
    }
    for total in [0, 19] {
        run_malformed(
            &format!("total length {total}"),
            &builder_from(src).total_len(total).build().bytes,
        )?;
    }
    let with_options = builder_from(src).ipv4_options(&[1, 1, 1, 1]);
    run_malformed(
        "total length 20 < IHL 6 * 4",
        &with_options.clone().total_len(20).build().bytes,
    )?;
    run_malformed(
        "total length 23 < IHL 6 * 4",
        &with_options.total_len(23).build().bytes,
    )?;
    ensure!(
        lim.tables.clients()?.is_empty(),
        "malformed frames created clients: {:?}",
        lim.tables.clients()?
    );

    // Cuts inside UDP or the payload leave a whole IP header: limited like any packet.
    for (i, (name, bytes, cut)) in udp_cuts.iter().enumerate() {
        check_eq!(
            lim.run(bytes)?,
            XDP_PASS,
            "{name} cut at {} ({:?})",
            cut.len,
            cut.header
        );
        check_eq!(lim.global()?.passed, i as u64 + 1);
    }
    check_eq!(lim.global()?.malformed, malformed);
    check_eq!(
        lim.client_counts(src)?.0 + lim.client_counts(src6)?.0,
        udp_cuts.len() as u64
    );
    Ok(())
}

#[test]
fn non_ip_frames_pass_and_are_counted() -> Result<()> {
    let lim = Limiter::new(1024, "default: { limit: 0, window: 1h }\n")?;
    let arp = Builder::arp(
        Ipv4Addr::new(198, 51, 100, 8),
        Ipv4Addr::new(198, 51, 100, 9),
    );
    let src = v4(198, 51, 100, 8);
    let frames = [
        ("ARP", arp.build()),
        ("802.1Q ARP", arp.clone().vlan(TPID_8021Q, 3).build()),
        ("QinQ ARP", arp.qinq(3, 4).build()),
        (
            "three tags, IPv4",
            builder_from(src).qinq(3, 4).vlan(TPID_8021Q, 5).build(),
        ),
        (
            "three tags, IPv6",
            builder_from(v6("2001:db8::8"))
                .vlan(TPID_8021Q, 3)
                .qinq(4, 5)
                .build(),
        ),
    ];
    for (i, (name, frame)) in frames.iter().enumerate() {
        check_eq!(lim.run(&frame.bytes)?, XDP_PASS, "{name}");
        let g = lim.global()?;
        check_eq!(g.non_ip, i as u64 + 1, "{name}");
        check_eq!(
            (g.passed, g.dropped, g.malformed, g.new_clients),
            (0, 0, 0, 0),
            "{name}"
        );
    }
    ensure!(lim.tables.clients()?.is_empty());
    // The limit of 0 does apply to IP.
    check_eq!(lim.run(&udp_from(src))?, XDP_DROP);
    Ok(())
}

#[test]
fn longest_prefix_wins_and_each_address_is_a_client() -> Result<()> {
    let yaml = "\
default: { limit: 2, window: 1h, per: address }
policies:
  - { match: 10.0.0.0/8, limit: 3, window: 1h }
  - { match: 10.1.2.0/24, limit: 4, window: 1h }
  - { match: 10.1.2.3, limit: 5, window: 1h }
  - { match: 2001:db8::/32, limit: 6, window: 1h }
  - { match: 2001:db8:1:2::/64, limit: 7, window: 1h }
";
    in_one_window(HOUR_NS, |_| {
        let lim = Limiter::new(1024, yaml)?;
        let cases = [
            (v4(10, 9, 9, 9), 3, 1),
            (v4(10, 1, 3, 1), 3, 1),
            (v4(10, 1, 2, 9), 4, 2),
            (v4(10, 1, 2, 10), 4, 2),
            (v4(10, 1, 2, 255), 4, 2),
            (v4(10, 1, 2, 3), 5, 3),
            (v4(11, 0, 0, 1), 2, 0),
            (v4(9, 255, 255, 255), 2, 0),
            (v6("2001:db8:ffff::1"), 6, 4),
            (v6("2001:db8::1"), 6, 4),
            (v6("2001:db8:1:2::5"), 7, 5),
            (v6("2001:db8:1:2:ffff:ffff:ffff:ffff"), 7, 5),
            (v6("2001:db8:1:3::5"), 6, 4),
            (v6("2001:db9::1"), 2, 0),
            // IPv6 addresses whose low 32 bits are inside 10.0.0.0/8 are not IPv4 clients.
            (v6("::a01:203"), 2, 0),
            (v6("2001:db8:1:2::a01:203"), 7, 5),
            (v6("64:ff9b::a01:203"), 2, 0),
        ];
        for (src, limit, policy) in cases {
            let verdicts = lim.verdicts(&udp_from(src), 10)?;
            expect_limit(&verdicts, limit).with_context(|| format!("{src}"))?;
            let c = lim.client(src).context("no client")?;
            check_eq!(
                (c.total_passed(), c.dropped_count(), c.limit, c.policy()),
                (limit as u64, 10 - limit as u64, limit as u32, policy),
                "{src}"
            );
            check_eq!(c.flags() & FLAG_STATIC != 0, policy == 3, "{src}");
        }
        let g = lim.global()?;
        let passed: u64 = cases.iter().map(|c| c.1 as u64).sum();
        check_eq!(
            (g.passed, g.dropped),
            (passed, 10 * cases.len() as u64 - passed)
        );
        // The exact-address client is static, not a new dynamic one.
        check_eq!(g.new_clients, cases.len() as u64 - 1);
        Ok(())
    })
}

#[test]
fn pass_and_drop_actions() -> Result<()> {
    let yaml = "\
default: { limit: 3, window: 1h }
policies:
  - { match: 192.0.2.0/24, action: pass }
  - { match: 198.51.100.0/24, action: drop }
  - { match: 203.0.113.0/24, limit: 0, window: 1h }
  - { match: 2001:db8:a::/48, action: pass }
  - { match: 2001:db8:d::/48, action: drop }
  - { match: 2001:db8:e::7, action: drop, limit: 0 }
";
    in_one_window(HOUR_NS, |_| {
        let lim = Limiter::new(1024, yaml)?;
        const N: usize = 50;
        let cases = [
            (v4(192, 0, 2, 1), N, Some(ACTION_PASS)),
            (v6("2001:db8:a::1"), N, Some(ACTION_PASS)),
            (v4(198, 51, 100, 1), 0, Some(ACTION_DROP)),
            (v6("2001:db8:d::1"), 0, Some(ACTION_DROP)),
            (v6("2001:db8:e::7"), 0, Some(ACTION_DROP)),
            (v4(203, 0, 113, 1), 0, None),
            (v4(203, 0, 114, 1), 3, None),
        ];
        for (src, passes, action) in cases {
            let verdicts = lim.verdicts(&udp_from(src), N)?;
            expect_limit(&verdicts, passes).with_context(|| format!("{src}"))?;
            let c = lim.client(src).context("no client")?;
            check_eq!(
                (c.total_passed(), c.dropped_count()),
                (passes as u64, (N - passes) as u64),
                "{src}"
            );
            if let Some(action) = action {
                check_eq!(c.action(), action, "{src}");
            }
        }
        let g = lim.global()?;
        check_eq!((g.passed, g.dropped), (2 * N as u64 + 3, 5 * N as u64 - 3));
        Ok(())
    })
}

#[test]
fn dry_run_passes_everything_and_counts_would_be_drops() -> Result<()> {
    let yaml = "\
mode: dry-run
default: { limit: 5, window: 1h }
policies:
  - { match: 198.51.100.0/24, action: drop }
";
    in_one_window(HOUR_NS, |_| {
        let lim = Limiter::new(1024, yaml)?;
        let (a, b) = (v4(192, 0, 2, 1), v4(198, 51, 100, 1));
        check_eq!(lim.verdicts(&udp_from(a), 12)?, vec![XDP_PASS; 12]);
        check_eq!(lim.verdicts(&udp_from(b), 4)?, vec![XDP_PASS; 4]);
        check_eq!(lim.client_counts(a)?, (5, 7));
        check_eq!(lim.client_counts(b)?, (0, 4));
        let g = lim.global()?;
        check_eq!((g.passed, g.dropped), (5, 11));
        Ok(())
    })
}

#[test]
fn reload_keeps_window_state_unless_the_window_changes() -> Result<()> {
    let before = "\
default: { limit: 7, window: 1h }
policies:
  - { match: 10.0.0.0/8, limit: 5, window: 1h }
  - { match: 172.16.0.0/16, limit: 5, window: 1h }
  - { match: 172.17.0.0/16, limit: 5, window: 1h }
";
    let after = "\
default: { limit: 7, window: 1h }
policies:
  - { match: 10.0.0.0/8, limit: 8, window: 1h }
  - { match: 172.16.0.0/16, limit: 5, window: 30m }
";
    // The 30-minute window's boundaries include the hour's.
    in_one_window(HOUR_NS / 2, |_| {
        let mut lim = Limiter::new(1024, before)?;
        let raised = v4(10, 0, 0, 1);
        let other = v4(11, 0, 0, 1);
        let rewindowed = v4(172, 16, 0, 1);
        let removed = v4(172, 17, 0, 1);
        expect_limit(&lim.verdicts(&udp_from(raised), 7)?, 5)?;
        expect_limit(&lim.verdicts(&udp_from(other), 9)?, 7)?;
        expect_limit(&lim.verdicts(&udp_from(rewindowed), 6)?, 5)?;
        expect_limit(&lim.verdicts(&udp_from(removed), 5)?, 5)?;
        let other_before = lim.client(other).context("other")?;

        lim.apply(after)?;
        // Raised from 5 to 8 inside the same window: exactly 3 more.
        expect_limit(&lim.verdicts(&udp_from(raised), 10)?, 3)?;
        check_eq!(lim.client_counts(raised)?, (8, 2 + 7));
        // Another client's entry is untouched by the reload itself.
        let other_after = lim.client(other).context("other")?;
        check_eq!(
            (other_after.total_passed(), other_after.dropped_count()),
            (other_before.total_passed(), other_before.dropped_count())
        );
        check_eq!(other_after.slots, other_before.slots);
        check_eq!(lim.send(other, 1)?, 0);
        // A new window length starts the window afresh: the full 5 again.
        expect_limit(&lim.verdicts(&udp_from(rewindowed), 8)?, 5)?;
        let c = lim.client(rewindowed).context("rewindowed")?;
        check_eq!(
            (c.total_passed(), c.dropped_count(), c.window_us),
            (10, 1 + 3, 1_800_000_000)
        );
        // Its policy removed, the client falls back to the default (same window: 5 of 7 used).
        expect_limit(&lim.verdicts(&udp_from(removed), 5)?, 2)?;
        let c = lim.client(removed).context("removed")?;
        check_eq!(
            (c.total_passed(), c.dropped_count(), c.limit, c.policy()),
            (7, 3, 7, 0)
        );

        // Lowering a limit below what was already admitted admits nothing more.
        lim.apply("default: { limit: 7, window: 1h }\npolicies:\n  - { match: 10.0.0.0/8, limit: 2, window: 1h }\n")?;
        check_eq!(lim.send(raised, 3)?, 0);
        Ok(())
    })
}

/// The check program honours `CONFIG_NO_STATIC` as the packet path does: with the flag clear it
/// reads a static client's window, set it looks past `STATIC_CLIENTS` (so the agent must never
/// set it over a static entry; see `a_new_exact_address_policy_moves_the_client_with_its_count`).
#[test]
fn checks_look_in_static_clients_unless_the_agent_says_it_is_empty() -> Result<()> {
    let yaml = "default: { limit: 7, window: 1h }\npolicies:\n  - { match: 10.0.0.5, limit: 8, window: 1h }\n";
    in_one_window(HOUR_NS, |_| {
        let mut lim = Limiter::new(1024, yaml)?;
        let checker = lim.checker(yaml)?;
        let src = v4(10, 0, 0, 5);
        check_eq!(lim.send(src, 5)?, 5);
        let id = limiter_user::check::ClientId::Addr(src);
        check_eq!(checker.check(&id, 0)?.remaining, 3);
        let config = lim.tables.map_config()?;
        ensure!(
            config.flags & CONFIG_NO_STATIC == 0,
            "an exact-address policy is in force"
        );
        lim.tables.config.set(
            0,
            limiter_common::MapConfig {
                flags: config.flags | CONFIG_NO_STATIC,
                ..config
            },
            0,
        )?;
        check_eq!(
            checker.check(&id, 0)?.remaining,
            8,
            "the static entry skipped"
        );
        lim.tables.config.set(0, config, 0)?;
        check_eq!(checker.check(&id, 0)?.remaining, 3);
        Ok(())
    })
}

/// A check that makes a client's entry says so (`VERDICT_NEW`, `Decision::new`, what the
/// new-client cap charges): an address's first check with hits, and an ID's, but not a read, not
/// a later check, and not a second check of the same new address in one frame.
#[test]
fn a_check_that_creates_an_entry_says_so() -> Result<()> {
    use limiter_user::check::ClientId;
    let yaml = "default: { limit: 7, window: 1h }\n";
    in_one_window(HOUR_NS, |_| {
        let mut lim = Limiter::new(1024, yaml)?;
        let checker = lim.checker(yaml)?;
        let a = ClientId::Addr(v4(10, 0, 0, 5));
        let b = ClientId::Addr(v4(10, 0, 0, 6));
        let sent = ClientId::Addr(v4(10, 0, 0, 7));
        let named: ClientId = "tenant-1".parse()?;
        check_eq!(lim.send(v4(10, 0, 0, 7), 1)?, 1);
        let new = |checks: &[(&ClientId, u32)]| -> Result<Vec<bool>> {
            Ok(checker.check_all(checks)?.iter().map(|d| d.new).collect())
        };
        // A read creates nothing; a packet's entry is not the check's.
        check_eq!(new(&[(&a, 0), (&sent, 1)])?, vec![false, false]);
        check_eq!(lim.global()?.new_clients, 1);
        check_eq!(
            new(&[(&a, 1), (&a, 1), (&b, 2), (&named, 1)])?,
            vec![true, false, true, true]
        );
        check_eq!(new(&[(&a, 1), (&b, 1), (&named, 1)])?, vec![false; 3]);
        check_eq!(
            lim.global()?.new_clients,
            4,
            "the packet's, a's, b's and tenant-1's"
        );
        Ok(())
    })
}

/// Under a TCP caller's new-client cap, a call whose addresses could all be new and still fit
/// takes one program run and is charged the entries it created; one that might not fit reads
/// its addresses first (two runs), and is refused whole, nothing spent, when they do not fit.
#[test]
fn a_capped_call_that_fits_takes_one_run() -> Result<()> {
    use std::num::NonZeroU32;

    use limiter_user::{
        api::{CallerKey, CallerLimits, Rate, Role, Who},
        check::ClientId,
    };
    let yaml = "default: { limit: 7, window: 1h }\n";
    in_one_window(HOUR_NS, |_| {
        let mut lim = Limiter::new(1024, yaml)?;
        let checker = lim.checker(yaml)?;
        // 10 a second: refills one per 100 ms, far slower than this test's calls.
        let ten = NonZeroU32::new(10).context("10")?;
        let limits = CallerLimits::new(
            None,
            Some(Rate {
                per_second: ten,
                burst: ten,
            }),
        );
        let caller = CallerKey {
            role: Role::Check,
            who: Who::Addr(v4(192, 0, 2, 1)),
        };
        let ids: Vec<ClientId> = (0..8).map(|i| ClientId::Addr(v4(10, 0, 0, i))).collect();
        let call = |ids: &[ClientId]| {
            let checks: Vec<(&ClientId, u32)> = ids.iter().map(|id| (id, 1)).collect();
            let runs = checker.runs();
            let answer = limits.check_capped(&checker, &caller, &checks);
            (answer, checker.runs() - runs)
        };
        // 6 new of 10: one run, 6 spent (4 left).
        let (answer, runs) = call(&ids[..6]);
        check_eq!((answer?.len(), runs), (6, 1));
        // 6 known: 6 do not fit in the 4 left, so they are read first: two runs, none spent.
        let (answer, runs) = call(&ids[..6]);
        check_eq!((answer?.len(), runs), (6, 2));
        // 4 of them: held, given back; one run.
        let (answer, runs) = call(&ids[..4]);
        check_eq!((answer?.len(), runs), (4, 1));
        // 2 known and 2 new: one run; 2 left.
        let (answer, runs) = call(&ids[4..8]);
        check_eq!((answer?.len(), runs), (4, 1));
        check_eq!(lim.global()?.new_clients, 8);
        // 3 new do not fit in 2: read (one run), refused, nothing spent or created.
        let more: Vec<ClientId> = (8..11).map(|i| ClientId::Addr(v4(10, 0, 0, i))).collect();
        let (answer, runs) = call(&more);
        let refused = answer.expect_err("over the cap");
        ensure!(
            refused.message().contains("would create 3 client entries"),
            "{}",
            refused.message()
        );
        check_eq!(runs, 1);
        check_eq!(lim.global()?.new_clients, 8);
        // 2 do.
        let (answer, runs) = call(&more[..2]);
        check_eq!((answer?.len(), runs), (2, 1));
        check_eq!(lim.global()?.new_clients, 10);
        Ok(())
    })
}

/// A frame of probes and `CHECK_UNLESS_VETOED` checks spends all or none in one run: every
/// check when each client has what the request needs of it, none (and the program says which
/// probe did not fit) otherwise, also for two checks of one client; a request too big for one
/// frame takes a read and a spend, with the same answer.
#[test]
fn a_probed_frame_spends_all_or_none() -> Result<()> {
    use limiter_user::check::{AllOrNone, address_request, named_request};
    let yaml = "default: { limit: 7, window: 1h }\npolicies:\n  - { match: 10.0.0.0/8, limit: 5, window: 1h }\n";
    in_one_window(HOUR_NS, |_| {
        let mut lim = Limiter::new(1024, yaml)?;
        let checker = lim.checker(yaml)?;
        let policy = limiter_common::Policy {
            limit: 3,
            window_us: 3_600_000_000,
            id: 9,
            action: limiter_common::maps::ACTION_LIMIT,
            group: 0,
        };
        let addr = address_request(v4(10, 0, 0, 5), 2);
        let named = |i: u8, hits| named_request([i; 16], hits, policy);
        // Each client read (nothing spent).
        let read = |requests: &[limiter_common::CheckRequest]| {
            let reads: Vec<_> = requests
                .iter()
                .map(|r| limiter_common::CheckRequest { hits: 0, ..*r })
                .collect();
            checker.check_requests(&reads)
        };
        let remaining = |requests: &[limiter_common::CheckRequest]| -> Result<Vec<u32>> {
            Ok(read(requests)?.iter().map(|d| d.remaining).collect())
        };
        let dropped = |requests: &[limiter_common::CheckRequest]| -> Result<Vec<u64>> {
            Ok(read(requests)?.iter().map(|d| d.dropped).collect())
        };
        let needing = |requests: &[limiter_common::CheckRequest], needed: &[u32]| {
            requests
                .iter()
                .copied()
                .zip(needed.iter().copied())
                .collect::<Vec<_>>()
        };
        let both = [addr, named(1, 2)];
        let runs = checker.runs();
        let AllOrNone::Spent(spent) = checker.check_all_or_none(&needing(&both, &[2, 2]))? else {
            bail!("both fit, but the frame was vetoed");
        };
        check_eq!(checker.runs() - runs, 1, "probes and checks in one run");
        ensure!(spent.iter().all(|d| d.allowed), "{spent:?}");
        check_eq!(remaining(&both)?, vec![3, 1]);
        // The ID has 1 left of the 2 asked: neither is spent.
        let AllOrNone::Refused(read) = checker.check_all_or_none(&needing(&both, &[2, 2]))? else {
            bail!("the ID has 1 left, yet both were spent");
        };
        check_eq!(
            read.iter()
                .map(|(d, fits)| (d.remaining, *fits))
                .collect::<Vec<_>>(),
            vec![(3, true), (1, false)]
        );
        check_eq!(remaining(&both)?, vec![3, 1], "nothing spent");
        // The probe that did not fit counted the hits it asked as dropped (a denied check's
        // way: demand is passed + dropped); the one that fit counted nothing.
        check_eq!(dropped(&both)?, vec![0, 2]);
        // Two checks of one client must fit together (3 left).
        let twice = [addr, addr];
        let AllOrNone::Refused(read) = checker.check_all_or_none(&needing(&twice, &[4, 4]))? else {
            bail!("4 asked of a client with 3 left, yet spent");
        };
        check_eq!(
            read.iter().map(|(_, fits)| *fits).collect::<Vec<_>>(),
            vec![false, false],
            "both checks of the client answer as its probe"
        );
        check_eq!(remaining(&twice)?, vec![3, 3]);
        // One client probed once for both checks: its 4 refused hits counted once.
        check_eq!(dropped(&twice)?, vec![4, 4]);
        // One ID under two policies (a rate limit service descriptor with its own `limit`
        // beside one without): each is probed against its own, so the tighter refuses and
        // nothing is spent.
        let loose = named_request(
            [7; 16],
            2,
            limiter_common::Policy {
                limit: 100,
                ..policy
            },
        );
        let tight = named_request([7; 16], 2, limiter_common::Policy { limit: 1, ..policy });
        ensure!(matches!(
            checker.check_all_or_none(&needing(&[loose, tight], &[4, 4]))?,
            AllOrNone::Refused(_)
        ));
        check_eq!(remaining(&[loose])?, vec![100], "nothing spent");
        let twice = [address_request(v4(10, 0, 0, 5), 1), addr];
        ensure!(matches!(
            checker.check_all_or_none(&needing(&twice, &[3, 3]))?,
            AllOrNone::Spent(_)
        ));
        check_eq!(remaining(&twice)?, vec![0, 0]);
        // 16 checks (more than a frame holds twice over), the last over its limit: a read, no
        // spend. Then with room: every one spent.
        let mut many: Vec<_> = (10..25).map(|i| named(i, 1)).collect();
        many.push(named(1, 2));
        let mut needed = [1u32; 16];
        needed[15] = 2;
        let runs = checker.runs();
        ensure!(matches!(
            checker.check_all_or_none(&needing(&many, &needed))?,
            AllOrNone::Refused(_)
        ));
        check_eq!(checker.runs() - runs, 1, "a read, and no spend after it");
        check_eq!(remaining(&many[..1])?, vec![3], "nothing spent");
        // The read that refused counted the 2 hits it asked of the short client as dropped, as
        // the probe above did (2 then, 4 now), and nothing of the clients that had room.
        check_eq!(dropped(&many[14..])?, vec![0, 4]);
        // A read that decides nothing (a request a blocked descriptor refuses) counts nothing;
        // one that decides counts again.
        checker.read_needing(&needing(&many[15..], &[2]), false)?;
        check_eq!(dropped(&many[15..])?, vec![4]);
        checker.read_needing(&needing(&many[15..], &[2]), true)?;
        check_eq!(dropped(&many[15..])?, vec![6]);
        many[15] = named(1, 1);
        let runs = checker.runs();
        ensure!(matches!(
            checker.check_all_or_none(&needing(&many, &[1; 16]))?,
            AllOrNone::Spent(_)
        ));
        check_eq!(checker.runs() - runs, 2, "a read, then the spend");
        check_eq!(remaining(&many[..1])?, vec![2]);
        check_eq!(remaining(&many[15..])?, vec![0]);
        // 40 checks of distinct clients (two frames of reads, the second partial), each with
        // its own limit: every read answers its own check, and the last, short, refuses all.
        let distinct = |i: u8, hits| {
            named_request(
                [100 + i; 16],
                hits,
                limiter_common::Policy {
                    limit: 50 + u32::from(i),
                    ..policy
                },
            )
        };
        let mut wide: Vec<_> = (0..40).map(|i| (distinct(i, 1), 1)).collect();
        wide[39].1 = 90;
        let runs = checker.runs();
        let AllOrNone::Refused(read) = checker.check_all_or_none(&wide)? else {
            bail!("the 40th client has 89 left of the 90 asked, yet all were spent");
        };
        check_eq!(checker.runs() - runs, 2, "two frames of reads, no spend");
        // The short client had no entry yet, and a read creates none: nothing to count in.
        check_eq!(dropped(&[wide[38].0, wide[39].0])?, vec![0, 0]);
        check_eq!(
            read.iter()
                .map(|(d, fits)| (d.remaining, *fits))
                .collect::<Vec<_>>(),
            (0..40u32).map(|i| (50 + i, i != 39)).collect::<Vec<_>>()
        );
        wide[39].1 = 1;
        let runs = checker.runs();
        let AllOrNone::Spent(spent) = checker.check_all_or_none(&wide)? else {
            bail!("every client has room, yet the request was refused");
        };
        check_eq!(
            checker.runs() - runs,
            4,
            "two frames of reads, two of spends"
        );
        check_eq!(
            spent.iter().map(|d| d.remaining).collect::<Vec<_>>(),
            (0..40u32).map(|i| 50 + i - 1).collect::<Vec<_>>()
        );
        // A check of 0 hits fits a client over its limit (its limit lowered to 1, 3 counted),
        // as it fits what a read reports left.
        let lowered = named_request([1; 16], 0, limiter_common::Policy { limit: 1, ..policy });
        let with_zero = [lowered, address_request(v4(10, 0, 0, 6), 1)];
        ensure!(matches!(
            checker.check_all_or_none(&needing(&with_zero, &[0, 1]))?,
            AllOrNone::Spent(_)
        ));
        check_eq!(remaining(&with_zero)?, vec![0, 4]);
        Ok(())
    })
}

/// A packet running while an apply makes its held client exact-address may copy it back into
/// `LIMITED` (it found the client in `CLIENTS` before the move, and holds it after): the sweep
/// takes such copies out, once running programs have ended, of a key still static, and the
/// static entry keeps counting. Copies of a key an apply made dynamic again stay.
#[test]
fn the_sweep_takes_out_copies_left_by_a_move_into_the_static_map() -> Result<()> {
    let base = "default: { limit: 7, window: 1h }\npolicies:\n  - { match: 10.0.0.0/8, limit: 2, window: 1h }\n";
    let host = format!("{base}  - {{ match: 10.0.0.5, limit: 8, window: 1h }}\n");
    in_one_window(HOUR_NS, |_| {
        let mut lim = Limiter::new(1024, base)?;
        let src = v4(10, 0, 0, 5);
        check_eq!(lim.send(src, 3)?, 2);
        let held = lim.tables.limited.get(&key_of(src), 0)?;
        let mut sweep = lim.tables.limited_sweep()?;
        lim.apply(&host)?;
        ensure!(lim.tables.limited.get(&key_of(src), 0).is_err(), "moved");
        // The racing packet's copy, and the sweep's own that came back.
        lim.tables.limited.insert(key_of(src), held, 0)?;
        lim.tables.clients.insert(key_of(src), held, 0)?;
        std::thread::sleep(std::time::Duration::from_millis(20));
        sweep.sweep(monotonic_ns())?;
        ensure!(
            lim.tables.limited.get(&key_of(src), 0).is_err(),
            "copy in LIMITED left"
        );
        ensure!(
            lim.tables.clients.get(&key_of(src), 0).is_err(),
            "copy in CLIENTS left"
        );
        let before = lim
            .tables
            .static_clients
            .get(&key_of(src), 0)?
            .total_passed();
        check_eq!(lim.send(src, 1)?, 1);
        check_eq!(
            lim.tables
                .static_clients
                .get(&key_of(src), 0)?
                .total_passed(),
            before + 1
        );
        // Made dynamic again before the sweep: what it holds in LIMITED is the client's.
        let other = v4(10, 0, 0, 6);
        lim.apply(&format!(
            "{base}  - {{ match: 10.0.0.6, limit: 8, window: 1h }}\n"
        ))?;
        lim.apply(base)?;
        check_eq!(lim.send(other, 3)?, 2);
        std::thread::sleep(std::time::Duration::from_millis(20));
        sweep.sweep(monotonic_ns())?;
        ensure!(
            lim.tables.limited.get(&key_of(other), 0).is_ok(),
            "a held client taken out"
        );
        Ok(())
    })
}

#[test]
fn a_new_exact_address_policy_moves_the_client_with_its_count() -> Result<()> {
    let base = "default: { limit: 7, window: 1h }\npolicies:\n  - { match: 10.0.0.0/8, limit: 5, window: 1h }\n";
    let host = format!("{base}  - {{ match: 10.0.0.5, limit: 8, window: 1h }}\n");
    in_one_window(HOUR_NS, |_| {
        let mut lim = Limiter::new(1024, base)?;
        let no_static = |lim: &Limiter| -> Result<bool> {
            Ok(lim.tables.map_config()?.flags & CONFIG_NO_STATIC != 0)
        };
        // No exact-address policy: the programs skip the empty `STATIC_CLIENTS`.
        ensure!(
            no_static(&lim)?,
            "CONFIG_NO_STATIC without exact-address policies"
        );
        let src = v4(10, 0, 0, 5);
        check_eq!(lim.send(src, 6)?, 5);
        lim.apply(&host)?;
        ensure!(
            !no_static(&lim)?,
            "CONFIG_NO_STATIC with an exact-address policy"
        );
        // Now static, with the same window: 5 of 8 used.
        check_eq!(lim.send(src, 5)?, 3);
        let c = lim.client(src).context("no client")?;
        check_eq!(
            (
                c.total_passed(),
                c.dropped_count(),
                c.limit,
                c.flags() & FLAG_STATIC
            ),
            (8, 3, 8, FLAG_STATIC)
        );
        let entries_of = |lim: &Limiter| -> Result<usize> {
            Ok(lim
                .tables
                .clients()?
                .iter()
                .filter(|(k, _)| *k == key_of(src))
                .count())
        };
        check_eq!(entries_of(&lim)?, 1);
        // The programs honour the flag: set while the client is static, its packets miss its
        // entry and make a second one (which is why the agent clears the flag before the
        // first static entry goes in).
        let config = lim.tables.map_config()?;
        lim.tables.config.set(
            0,
            limiter_common::MapConfig {
                flags: config.flags | CONFIG_NO_STATIC,
                ..config
            },
            0,
        )?;
        check_eq!(lim.send(src, 1)?, 1);
        check_eq!(entries_of(&lim)?, 2);
        lim.tables.config.set(0, config, 0)?;
        lim.tables.clients.remove(&key_of(src))?;
        // The policy removed, it is dynamic again under 10.0.0.0/8, count and counters kept.
        lim.apply(base)?;
        ensure!(
            no_static(&lim)?,
            "CONFIG_NO_STATIC once the exact-address policy is gone"
        );
        check_eq!(lim.send(src, 2)?, 0);
        let c = lim.client(src).context("no client")?;
        check_eq!(
            (
                c.total_passed(),
                c.dropped_count(),
                c.limit,
                c.flags() & FLAG_STATIC
            ),
            (8, 5, 5, 0)
        );
        check_eq!(lim.tables.clients()?.len(), 1);
        Ok(())
    })
}

#[test]
fn exact_address_clients_are_static_and_survive_a_flood() -> Result<()> {
    let yaml = "\
default: { limit: 100, window: 1h }
policies:
  - { match: 192.0.2.7, limit: 10, window: 1h }
";
    in_one_window(HOUR_NS, |_| {
        let lim = Limiter::new(256, yaml)?;
        let vip = v4(192, 0, 2, 7);
        let dynamic = v4(198, 51, 100, 1);
        check_eq!(lim.send(vip, 4)?, 4);
        check_eq!(lim.send(dynamic, 1)?, 1);
        let c = lim.client(vip).context("static client")?;
        ensure!(
            c.flags() & FLAG_STATIC != 0,
            "192.0.2.7 is not in STATIC_CLIENTS: {c:?}"
        );
        for src in spoofed(0, 5000) {
            check_eq!(lim.send(src, 1)?, 1, "{src}");
        }
        // Its window state is intact: 4 of 10 used.
        check_eq!(lim.send(vip, 10)?, 6);
        let c = lim.client(vip).context("static client after the flood")?;
        check_eq!(
            (c.total_passed(), c.dropped_count(), c.flags() & FLAG_STATIC),
            (10, 4, FLAG_STATIC)
        );
        ensure!(
            lim.client(dynamic).is_none(),
            "the dynamic client was not evicted"
        );
        let g = lim.global()?;
        check_eq!(g.new_clients, 5001);
        check_eq!(g.map_full, 0);
        let dynamic_entries = lim
            .tables
            .clients()?
            .iter()
            .filter(|(_, c)| c.flags() & FLAG_STATIC == 0)
            .count();
        ensure!(
            dynamic_entries <= 256,
            "{dynamic_entries} dynamic entries in a 256-entry map"
        );
        Ok(())
    })
}

#[test]
fn a_full_map_never_bypasses_limiting() -> Result<()> {
    in_one_window(HOUR_NS, |_| {
        let lim = Limiter::new(64, "default: { limit: 1, window: 1h }\n")?;
        for src in spoofed(0, 2000) {
            let frame = udp_from(src);
            check_eq!(lim.verdicts(&frame, 2)?, vec![XDP_PASS, XDP_DROP], "{src}");
        }
        let g = lim.global()?;
        check_eq!((g.passed, g.dropped), (2000, 2000));
        eprintln!("new_clients {} map_full {}", g.new_clients, g.map_full);
        check_eq!((g.new_clients, g.map_full), (2000, 0));
        Ok(())
    })
}

/// A client over its limit moves into the never-evicted `LIMITED` map on its first dropped
/// packet: a flood of new sources many times `--max-clients` evicts everyone else, but the limited
/// client keeps its window (before `LIMITED`, it came back with a fresh allowance).
#[test]
fn a_limited_client_is_held_through_a_flood_of_new_sources() -> Result<()> {
    in_one_window(HOUR_NS, |_| {
        let lim = Limiter::new(128, "default: { limit: 5, window: 1h }\n")?;
        let limited = v4(198, 51, 100, 1);
        let polite = v4(198, 51, 100, 2);
        check_eq!(lim.send(limited, 10)?, 5);
        check_eq!(lim.send(polite, 3)?, 3);
        ensure!(
            lim.tables.limited.get(&key_of(limited), 0).is_ok(),
            "the limited client is not in LIMITED"
        );
        ensure!(
            lim.tables.clients.get(&key_of(limited), 0).is_err(),
            "the limited client is still in CLIENTS too"
        );
        check_eq!(lim.global()?.limited_moves, 1);
        // 8x --max-clients new sources, each within its limit: none of them moves.
        for src in spoofed(0, 1024) {
            check_eq!(lim.send(src, 2)?, 2, "{src}");
        }
        check_eq!(
            lim.send(limited, 5)?,
            0,
            "the flood reset the limited client"
        );
        check_eq!(lim.client_counts(limited)?, (5, 10));
        // The polite client was evicted (it was within its limit): it starts afresh.
        ensure!(
            lim.client(polite).is_none(),
            "the polite client was not evicted"
        );
        let g = lim.global()?;
        check_eq!((g.limited_moves, g.limited_full), (1, 0));
        check_eq!(g.new_clients, 2 + 1024);
        Ok(())
    })
}

/// A full `LIMITED` refuses the move: the client stays in `CLIENTS` (limited as before, only
/// evictable again), and `limited_full` counts each refused attempt.
#[test]
fn a_full_limited_map_leaves_clients_evictable_and_says_so() -> Result<()> {
    in_one_window(HOUR_NS, |_| {
        let lim = Limiter::with_options(
            &LoadOptions {
                pin_dir: None,
                max_clients: 1024,
                max_limited: 2,
                ..LoadOptions::default()
            },
            "default: { limit: 1, window: 1h }\n",
        )?;
        let sources: Vec<IpAddr> = spoofed(0, 4).collect();
        for src in &sources {
            check_eq!(lim.send(*src, 3)?, 1, "{src}");
        }
        let held = sources
            .iter()
            .filter(|s| lim.tables.limited.get(&key_of(**s), 0).is_ok())
            .count();
        let kept = sources
            .iter()
            .filter(|s| lim.tables.clients.get(&key_of(**s), 0).is_ok())
            .count();
        check_eq!((held, kept), (2, 2));
        let g = lim.global()?;
        // The first two moved on their first drop; the other two tried on each of their 2 drops.
        check_eq!((g.limited_moves, g.limited_full), (2, 4));
        check_eq!((g.passed, g.dropped), (4, 8));
        Ok(())
    })
}

/// After `LIMITED` refused a move for being full, the CPU tries none for 10 ms (a refused
/// insert costs a bucket lock and a search of the free lists on every denied packet): the
/// refusal sets this CPU's pause to 10 ms of the coarse clock ahead; a client denied within a
/// pause stays in `CLIENTS` although the map has room again, and moves at its first denial after
/// it. Every denial that did not move counts in `limited_full`. The pause is per CPU, so the test
/// runs on one, and it sets the pause itself (far ahead, then over) rather than race the clock.
#[test]
fn after_a_refused_move_no_move_is_tried_for_a_pause() -> Result<()> {
    limiter_tests::bench::report::pin_to_cpu(0)?;
    in_one_window(HOUR_NS, |_| {
        let mut lim = Limiter::with_options(
            &LoadOptions {
                pin_dir: None,
                max_clients: 1024,
                max_limited: 1,
                ..LoadOptions::default()
            },
            "default: { limit: 1, window: 1h }\n",
        )?;
        let (held, refused) = (v4(198, 51, 100, 1), v4(198, 51, 100, 2));
        check_eq!(lim.send(held, 2)?, 1);
        let coarse = || limiter_user::stats::clock_ns(libc::CLOCK_MONOTONIC_COARSE);
        let before = coarse();
        check_eq!(lim.send(refused, 2)?, 1);
        let after = coarse();
        let g = lim.global()?;
        check_eq!((g.limited_moves, g.limited_full), (1, 1));
        // 10 ms from the program's coarse clock, which is up to two jiffies (20 ms at HZ 100)
        // behind.
        const PAUSE_NS: u64 = 10_000_000;
        let until = pause_until(&mut lim, None)?;
        ensure!(
            until + 20_000_000 >= before + PAUSE_NS && until <= after + PAUSE_NS,
            "the pause ends at {until}, not 10 ms after the refusal ({before}..{after})"
        );
        // Room again, but within the pause: the next denial does not move.
        lim.tables.limited.remove(&key_of(held))?;
        pause_until(&mut lim, Some(u64::MAX))?;
        check_eq!(lim.send(refused, 1)?, 0);
        ensure!(
            lim.tables.limited.get(&key_of(refused), 0).is_err(),
            "moved within the pause"
        );
        let g = lim.global()?;
        check_eq!((g.limited_moves, g.limited_full), (1, 2));
        // The pause over, the first denial moves.
        pause_until(&mut lim, Some(0))?;
        check_eq!(lim.send(refused, 1)?, 0);
        ensure!(
            lim.tables.limited.get(&key_of(refused), 0).is_ok(),
            "not moved after the pause"
        );
        let g = lim.global()?;
        check_eq!((g.limited_moves, g.limited_full), (2, 2));
        Ok(())
    })
}

/// A packet's first lookup follows its CPU's hint (`LOOKUP_HINT`): `LIMITED` first after a
/// packet whose client was there, else `CLIENTS` first. In either order a dynamic, a held and
/// an exact-address client are each found and counted in their own map (no second entry is
/// created for any), and the hint then says whether the last packet's client was in `LIMITED`.
#[test]
fn the_lookup_hint_orders_the_maps_and_every_client_is_found() -> Result<()> {
    let yaml = "default: { limit: 9, window: 1h }\npolicies:\n  - { match: 10.0.0.5, limit: 9, window: 1h }\n  - { match: 198.51.100.0/24, limit: 2, window: 1h }\n";
    // The hint read back is CPU 0's: this thread's runs are on CPU 0.
    pin_to_cpu(0)?;
    in_one_window(HOUR_NS, |_| {
        let mut lim = Limiter::new(1024, yaml)?;
        let (dynamic, held, exact) = (v4(192, 0, 2, 1), v4(198, 51, 100, 2), v4(10, 0, 0, 5));
        check_eq!(lim.send(held, 3)?, 2, "held over its limit");
        ensure!(
            lim.tables.limited.get(&key_of(held), 0).is_ok(),
            "held in LIMITED"
        );
        // The packet that moved it found it in CLIENTS; the next finds it in LIMITED.
        check_eq!(lookup_hint(&mut lim, None)?, 0);
        check_eq!(lim.send(held, 1)?, 0);
        check_eq!(
            lookup_hint(&mut lim, None)?,
            1,
            "the last packet's client was held"
        );
        check_eq!(lim.send(exact, 1)?, 1);
        check_eq!(
            lookup_hint(&mut lim, None)?,
            0,
            "the last packet's client was not held"
        );
        let count = |map: &aya::maps::HashMap<_, ClientKey, ClientState>, src| {
            map.get(&key_of(src), 0)
                .map(|c| (c.total_passed(), c.dropped_count()))
                .ok()
        };
        for (round, first) in [0u64, 1, 1, 0].into_iter().enumerate() {
            let round = round as u64 + 1;
            // The dynamic client: new in the first round (all three maps miss), then in CLIENTS.
            lookup_hint(&mut lim, Some(first))?;
            check_eq!(lim.send(dynamic, 1)?, 1, "round {round}");
            check_eq!(lookup_hint(&mut lim, None)?, 0);
            lookup_hint(&mut lim, Some(first))?;
            check_eq!(lim.send(held, 1)?, 0, "round {round}");
            check_eq!(lookup_hint(&mut lim, None)?, 1);
            lookup_hint(&mut lim, Some(first))?;
            check_eq!(lim.send(exact, 1)?, 1, "round {round}");
            check_eq!(lookup_hint(&mut lim, None)?, 0);
            check_eq!(
                count(&lim.tables.clients, dynamic),
                Some((round, 0)),
                "round {round}"
            );
            check_eq!(
                count(&lim.tables.limited, held),
                Some((2, 2 + round)),
                "round {round}"
            );
            check_eq!(
                count(&lim.tables.static_clients, exact),
                Some((1 + round, 0))
            );
            for (map, srcs) in [
                (&lim.tables.clients, [held, exact]),
                (&lim.tables.limited, [dynamic, exact]),
                (&lim.tables.static_clients, [dynamic, held]),
            ] {
                for src in srcs {
                    ensure!(
                        count(map, src).is_none(),
                        "round {round}: a second entry of {src}"
                    );
                }
            }
        }
        // A new client with the hint at 1: every map misses (`LIMITED` twice), its entry is
        // created in `CLIENTS`, and the hint goes back to 0.
        let new = v4(192, 0, 2, 9);
        lookup_hint(&mut lim, Some(1))?;
        check_eq!(lim.send(new, 1)?, 1);
        check_eq!(lookup_hint(&mut lim, None)?, 0);
        check_eq!(count(&lim.tables.clients, new), Some((1, 0)));
        check_eq!(count(&lim.tables.limited, new), None);
        // The order is the hint's: with a second, current copy of the held client in `CLIENTS`
        // that would admit (the dynamic client's entry), `LIMITED` first drops the packet and
        // `CLIENTS` first passes it.
        let stray = lim.tables.clients.get(&key_of(dynamic), 0)?;
        lim.tables.clients.insert(key_of(held), stray, 0)?;
        lookup_hint(&mut lim, Some(1))?;
        check_eq!(lim.send(held, 1)?, 0, "LIMITED first");
        lookup_hint(&mut lim, Some(0))?;
        check_eq!(lim.send(held, 1)?, 1, "CLIENTS first");
        lim.tables.clients.remove(&key_of(held))?;
        Ok(())
    })
}

/// CPU 0's lookup hint (the map `LOOKUP_HINT`), set to `set` on every CPU first if given.
fn lookup_hint(lim: &mut Limiter, set: Option<u64>) -> Result<u64> {
    cpu0_value(lim, "LOOKUP_HINT", set)
}

/// CPU 0's end of the pause on moves into `LIMITED` (the map `LIMITED_FULL_UNTIL`), set to
/// `set` on every CPU first if given.
fn pause_until(lim: &mut Limiter, set: Option<u64>) -> Result<u64> {
    cpu0_value(lim, "LIMITED_FULL_UNTIL", set)
}

/// CPU 0's value of the one-entry per-CPU map `name`, set to `set` on every CPU first if given.
fn cpu0_value(lim: &mut Limiter, name: &str, set: Option<u64>) -> Result<u64> {
    let mut map: PerCpuArray<_, u64> = PerCpuArray::try_from(
        lim.ebpf
            .map_mut(name)
            .with_context(|| format!("no map {name}"))?,
    )?;
    if let Some(value) = set {
        let cpus = aya::util::nr_cpus().map_err(|(what, e)| anyhow::anyhow!("{what}: {e}"))?;
        map.set(0, PerCpuValues::try_from(vec![value; cpus])?, 0)?;
    }
    Ok(map.get(&0, 0)?[0])
}

/// The agent's sweep deletes a `LIMITED` entry once its window state has aged out; the client's
/// next packet starts it afresh in `CLIENTS`. Entries still in their window stay.
#[test]
fn the_sweep_releases_limited_clients_whose_windows_are_over() -> Result<()> {
    let yaml = "\
default: { limit: 2, window: 10ms }
policies:
  - { match: 10.0.0.0/8, limit: 2, window: 1h }
";
    in_one_window(HOUR_NS, |_| {
        let lim = Limiter::new(1024, yaml)?;
        let short = v4(198, 51, 100, 1);
        let long = v4(10, 0, 0, 1);
        check_eq!(lim.send(long, 3)?, 2);
        check_eq!(lim.send(short, 3)?, 2);
        let mut sweep = lim.tables.limited_sweep()?;
        check_eq!(sweep.sweep(monotonic_ns())?, 0, "nothing is over yet");
        // Two 10 ms windows and the sweep's allowance for the program's clock later.
        std::thread::sleep(std::time::Duration::from_millis(60));
        check_eq!(sweep.sweep(monotonic_ns())?, 1);
        ensure!(lim.tables.limited.get(&key_of(short), 0).is_err());
        // Released back into CLIENTS with its lifetime counters: 2 passed, 1 dropped.
        let released = lim.tables.clients.get(&key_of(short), 0)?;
        check_eq!(released.dropped_count(), 1);
        check_eq!(released.total_passed(), 2);
        ensure!(lim.tables.limited.get(&key_of(long), 0).is_ok());
        check_eq!(lim.send(long, 1)?, 0);
        check_eq!(lim.send(short, 1)?, 1);
        ensure!(lim.tables.clients.get(&key_of(short), 0).is_ok());
        Ok(())
    })
}

fn pin_to_cpu(cpu: usize) -> Result<()> {
    // SAFETY: a zeroed cpu_set_t is valid; sched_setaffinity(0) applies to the calling thread.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_SET(cpu, &mut set);
        if libc::sched_setaffinity(0, size_of::<libc::cpu_set_t>(), &set) != 0 {
            bail!(
                "sched_setaffinity({cpu}): {}",
                std::io::Error::last_os_error()
            );
        }
    }
    Ok(())
}

#[test]
fn concurrent_cpus_lose_no_counts() -> Result<()> {
    const LIMIT: u64 = 150_000;
    const REPEAT: u32 = 200_000;
    ensure!(
        std::thread::available_parallelism()?.get() >= 2,
        "needs two CPUs"
    );
    in_one_window(HOUR_NS, |_| {
        let lim = Limiter::new(
            1024,
            &format!("default: {{ limit: {LIMIT}, window: 1h }}\n"),
        )?;
        let src = v4(192, 0, 2, 77);
        let frame = udp_from(src);
        let barrier = Barrier::new(2);
        let runs: Vec<Result<(u32, u64, u64)>> = std::thread::scope(|s| {
            let threads: Vec<_> = (0..2)
                .map(|cpu| {
                    let (lim, frame, barrier) = (&lim, &frame, &barrier);
                    s.spawn(move || -> Result<(u32, u64, u64)> {
                        pin_to_cpu(cpu)?;
                        barrier.wait();
                        let start = monotonic_ns();
                        let r = lim.program().test_run(TestRunOptions {
                            data_in: Some(frame),
                            repeat: REPEAT,
                            ..Default::default()
                        })?;
                        Ok((r.return_value, start, monotonic_ns()))
                    })
                })
                .collect();
            threads
                .into_iter()
                .map(|t| t.join().expect("thread panicked"))
                .collect()
        });
        let runs: Vec<(u32, u64, u64)> = runs.into_iter().collect::<Result<_>>()?;
        let c = lim.client(src).context("no client")?;
        let per_cpu = lim.tables.stats.get(&0, 0)?;
        let per_cpu: Vec<(u64, u64, u64)> = per_cpu
            .iter()
            .map(|s| (s.passed, s.dropped, s.contended))
            .collect();
        eprintln!(
            "runs (retval, start, end): {runs:?}; per CPU (passed, dropped, contended): {per_cpu:?}"
        );
        let g = lim.global()?;
        eprintln!(
            "CLIENTS {:?} LIMITED {:?} global {g:?}",
            lim.tables.clients.get(&key_of(src), 0),
            lim.tables.limited.get(&key_of(src), 0)
        );
        check_eq!(
            c.total_passed() + c.dropped_count(),
            2 * REPEAT as u64,
            "client {c:?}"
        );
        check_eq!(
            c.total_passed(),
            LIMIT,
            "client {c:?}, contended {}",
            g.contended
        );
        check_eq!((g.passed, g.dropped), (LIMIT, 2 * REPEAT as u64 - LIMIT));
        check_eq!(g.new_clients, 1);
        // Had the runs not overlapped, the first would have taken all 150000 and the second none.
        ensure!(
            per_cpu.iter().filter(|c| c.0 > 0).count() >= 2,
            "the two runs did not overlap, so nothing concurrent was tested: {per_cpu:?}"
        );
        Ok(())
    })
}

/// An IPv6 packet whose source is an IPv4-mapped address (`::ffff:a.b.c.d`, which the kernel's
/// IPv6 input drops anyway) is malformed: it must not be charged to the IPv4 client a.b.c.d.
#[test]
fn ipv4_mapped_ipv6_sources_are_not_ipv4_clients() -> Result<()> {
    in_one_window(HOUR_NS, |_| {
        let lim = Limiter::new(1024, "default: { limit: 5, window: 1h }\n")?;
        check_eq!(lim.send(v6("::ffff:192.0.2.7"), 5)?, 5);
        check_eq!(lim.global()?.malformed, 5);
        check_eq!(
            lim.send(v4(192, 0, 2, 7), 5)?,
            5,
            "IPv4 192.0.2.7 lost its budget to IPv6 packets"
        );
        Ok(())
    })
}

/// An IPv6 policy whose prefix covers `::ffff:0:0/96` must not apply to IPv4 clients (the policy
/// trie keeps the families apart).
#[test]
fn ipv6_policies_do_not_apply_to_ipv4() -> Result<()> {
    let yaml =
        "default: { limit: 5, window: 1h }\npolicies:\n  - { match: \"::/8\", action: drop }\n";
    in_one_window(HOUR_NS, |_| {
        let lim = Limiter::new(1024, yaml)?;
        check_eq!(lim.send(v6("::1"), 1)?, 0);
        check_eq!(
            lim.send(v4(192, 0, 2, 7), 1)?,
            1,
            "IPv4 matched the IPv6 policy ::/8"
        );
        Ok(())
    })
}

/// `match: ::/0` replaces `default` for IPv6 clients only; IPv4 clients keep the default.
#[test]
fn ipv6_catch_all_does_not_replace_the_default() -> Result<()> {
    let yaml = "default: { limit: 5, window: 1h }\npolicies:\n  - { match: \"::/0\", limit: 1, window: 1h }\n";
    if Config::parse(yaml).is_err() {
        return Ok(()); // Rejecting the duplicate is also a fix.
    }
    in_one_window(HOUR_NS, |_| {
        let lim = Limiter::new(1024, yaml)?;
        check_eq!(lim.send(v6("2001:db8::1"), 5)?, 1);
        check_eq!(
            lim.send(v4(192, 0, 2, 7), 5)?,
            5,
            "the IPv4 client lost the default"
        );
        Ok(())
    })
}

/// The lifetime counters share their words with the policy metadata (map layout 4): a counter
/// passing 2^48 wraps to 0 without carrying into the generation tag, the policy id or the flags.
#[test]
fn counters_wrap_at_48_bits_and_leave_the_metadata_alone() -> Result<()> {
    let yaml = "default: { limit: 3, window: 1h }\npolicies:\n  - { match: 10.0.0.0/8, limit: 2, window: 1h }\n  - { match: 203.0.113.0/24, action: pass }\n";
    in_one_window(HOUR_NS, |_| {
        let mut lim = Limiter::new(64, yaml)?;
        let (limited, allowed) = (v4(10, 1, 1, 1), v4(203, 0, 113, 1));
        check_eq!(lim.send(limited, 1)?, 1);
        check_eq!(lim.send(allowed, 1)?, 1);
        let generation = lim.tables.map_config()?.generation;
        let near = (1u64 << 48) - 2;
        let mut state = lim.client(limited).context("no entry")?;
        state.set_dropped_count(near);
        state.set_flags(FLAG_REPORTED);
        lim.tables.clients.insert(key_of(limited), state, 0)?;
        let mut state = lim.client(allowed).context("no entry")?;
        state.set_passed_count(near);
        lim.tables.clients.insert(key_of(allowed), state, 0)?;

        // 1 more passes, 4 are dropped: 2^48 - 2 + 4 wraps to 2.
        check_eq!(lim.send(limited, 5)?, 1);
        check_eq!(lim.send(allowed, 5)?, 5);
        let c = lim.client(limited).context("no entry")?;
        check_eq!(
            (c.dropped_count(), c.total_passed(), c.policy(), c.flags()),
            (2, 2, 1, FLAG_REPORTED)
        );
        ensure!(c.is_current(generation), "{c:?}");
        let c = lim.client(allowed).context("no entry")?;
        check_eq!(
            (
                c.total_passed(),
                c.dropped_count(),
                c.policy(),
                c.flags(),
                c.action()
            ),
            (3, 0, 2, 0, ACTION_PASS)
        );
        ensure!(c.is_current(generation), "{c:?}");
        Ok(())
    })
}

/// Entries keep a 15-bit generation tag, so the agent refreshes every entry in place 2^14
/// generations after the last refresh. Without that an entry idle for 2^15 policy changes would
/// alias the current generation and keep a stale policy; with it every refresh keeps the counts.
#[test]
fn the_periodic_refresh_keeps_an_idle_client_from_aliasing_an_old_policy() -> Result<()> {
    let yaml = |limit: u32| format!("default: {{ limit: {limit}, window: 1h }}\n");
    // Jumps the generation to just before `next`, as that many reloads that did not touch the
    // client would (no refresh is due before `next`).
    let jump = |lim: &mut Limiter, next: u32| -> Result<()> {
        let config = limiter_common::MapConfig {
            generation: next - 1,
            ..lim.tables.map_config()?
        };
        lim.tables.config.set(0, config, 0)?;
        Ok(())
    };
    for refresh in [true, false] {
        in_one_window(HOUR_NS, |_| {
            let mut lim = Limiter::new(64, &yaml(5))?;
            if refresh {
                let program = datapath::load_adapt_program(&mut lim.ebpf)?;
                lim.tables.set_refresher(program);
            }
            let client = v4(10, 0, 0, 1);
            check_eq!(lim.send(client, 3)?, 3);
            check_eq!(lim.client(client).context("no entry")?.generation_tag(), 1);

            // Generation 16385, 2^14 after the client's: a refresh is due.
            jump(&mut lim, GENERATION_SWEEP + 1)?;
            lim.apply(&yaml(7))?;
            let c = lim.client(client).context("no entry")?;
            if refresh {
                check_eq!(
                    (c.limit, c.generation_tag(), c.total_passed()),
                    (7, 16385, 3)
                );
            } else {
                check_eq!((c.limit, c.generation_tag(), c.total_passed()), (5, 1, 3));
            }
            // Generation 32769 (32768 has tag 0, which is never used), 2^14 after the refresh:
            // its tag is 1 again.
            jump(&mut lim, 2 * GENERATION_SWEEP + 1)?;
            lim.apply(&yaml(9))?;
            check_eq!(
                lim.tables.map_config()?.generation,
                2 * GENERATION_SWEEP + 1
            );
            if refresh {
                // Refreshed again in place, so its next packets are decided under 9.
                check_eq!(lim.send(client, 10)?, 6);
            } else {
                // Tag 1 from generation 1 reads as current: the stale limit of 5 still holds.
                check_eq!(lim.send(client, 10)?, 2);
            }
            Ok(())
        })?;
    }
    Ok(())
}

/// The `i`-th address of the /64 `2001:db8:ROT::/64`, spread over the interface ID the way
/// privacy addresses are (RFC 8981): every packet a new source.
fn rotating_v6(net: u16, i: u64) -> IpAddr {
    let iid = i.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    let a = (0x2001_0db8_u128 << 96) | ((net as u128) << 64) | iid as u128;
    IpAddr::V6(a.into())
}

/// Sends one packet from each of `n` sources; returns how many passed.
fn send_each(lim: &Limiter, sources: impl Iterator<Item = IpAddr>) -> Result<usize> {
    let mut passed = 0;
    for src in sources {
        passed += lim.send(src, 1)?;
    }
    Ok(passed)
}

/// Issue 13's attack: a host sends from a new address of its /64 with every packet. Counted per
/// address each packet had a fresh budget; counted per /64 (IPv6's default) the /64 gets its
/// limit, in one entry.
#[test]
fn a_rotating_ipv6_source_gets_its_64s_limit_once() -> Result<()> {
    const LIMIT: usize = 10;
    in_one_window(HOUR_NS, |_| {
        let per_address =
            format!("default: {{ limit: {LIMIT}, window: 1h, per: {{ ipv6: address }} }}\n");
        let lim = Limiter::new(4096, &per_address)?;
        let before = send_each(&lim, (0..10 * LIMIT as u64).map(|i| rotating_v6(1, i)))?;
        check_eq!(
            before,
            10 * LIMIT,
            "per address: every packet a fresh budget"
        );
        check_eq!(lim.global()?.new_clients, 10 * LIMIT as u64);

        let lim = Limiter::new(
            4096,
            &format!("default: {{ limit: {LIMIT}, window: 1h }}\n"),
        )?;
        let after = send_each(&lim, (0..10 * LIMIT as u64).map(|i| rotating_v6(1, i)))?;
        check_eq!(after, LIMIT, "per /64: the limit, once");
        let g = lim.global()?;
        check_eq!((g.new_clients, g.passed, g.dropped), (1, 10, 90));
        let clients = lim.tables.clients()?;
        check_eq!(clients.len(), 1);
        let (key, state) = clients[0];
        check_eq!(
            limiter_user::stats::client_label(&key),
            "2001:db8:0:1::/64".to_string()
        );
        check_eq!((state.total_passed(), state.dropped_count()), (10, 90));
        // Another /64 is another client.
        check_eq!(send_each(&lim, (0..20).map(|i| rotating_v6(2, i)))?, LIMIT);
        Ok(())
    })
}

/// `per: policy` gives the whole prefix one budget; `per: /24` one per /24 inside a /16; a
/// group never spans two policies, and a longer policy inside a group takes its own addresses.
#[test]
fn per_policy_and_per_prefix_share_one_budget() -> Result<()> {
    let yaml = "\
default: { limit: 100, window: 1h }
policies:
  - { match: 10.1.0.0/24, limit: 5, window: 1h, per: policy }
  - { match: 10.1.0.7, limit: 2, window: 1h }
  - { match: 10.2.0.0/16, limit: 3, window: 1h, per: /24 }
  - { match: 10.2.9.0/24, limit: 4, window: 1h, per: /16 }
";
    in_one_window(HOUR_NS, |_| {
        let lim = Limiter::new(1024, yaml)?;
        // 40 sources of 10.1.0.0/24, two packets each: 5 in all.
        let shared = send_each(
            &lim,
            (0..40u8).flat_map(|i| [v4(10, 1, 0, 100 + i), v4(10, 1, 0, 100 + i)]),
        )?;
        check_eq!(shared, 5);
        // The exact-address policy inside it is its own client.
        check_eq!(lim.send(v4(10, 1, 0, 7), 5)?, 2);
        // Per /24 inside 10.2/16: 3 for each /24.
        check_eq!(
            send_each(&lim, (0..10u8).map(|i| v4(10, 2, 1, i)))?,
            3,
            "10.2.1.0/24"
        );
        check_eq!(
            send_each(&lim, (0..10u8).map(|i| v4(10, 2, 2, i)))?,
            3,
            "10.2.2.0/24"
        );
        // `per: /16` on a /24 groups the /24 only, apart from the /16 policy's groups.
        check_eq!(
            send_each(&lim, (0..10u8).map(|i| v4(10, 2, 9, i)))?,
            4,
            "10.2.9.0/24"
        );
        // Elsewhere IPv4 counts per address.
        check_eq!(lim.send(v4(10, 3, 0, 1), 3)?, 3);
        check_eq!(lim.send(v4(10, 3, 0, 2), 3)?, 3);
        let labels: Vec<String> = lim
            .tables
            .clients()?
            .iter()
            .map(|(k, _)| limiter_user::stats::client_label(k))
            .collect();
        for want in [
            "10.1.0.0/24",
            "10.1.0.7",
            "10.2.1.0/24",
            "10.2.2.0/24",
            "10.2.9.0/24",
        ] {
            ensure!(labels.iter().any(|l| l == want), "no {want} in {labels:?}");
        }
        Ok(())
    })
}

/// A host policy inside an IPv6 /64 splits it: the host keeps its own budget, the rest of the /64
/// shares one, and neither finds the other's entry under the /64's usual key. A reload that
/// removes the host policy joins the host to the /64's group.
#[test]
fn a_longer_policy_splits_a_64_without_sharing_its_budget() -> Result<()> {
    let split = "\
default: { limit: 3, window: 1h }
policies:
  - { match: 2001:db8::1, limit: 10, window: 1h }
  - { match: 2001:db8:0:1::/64, limit: 4, window: 1h }
  - { match: 2001:db8:0:1::8/126, limit: 6, window: 1h, per: address }
";
    in_one_window(HOUR_NS, |_| {
        let mut lim = Limiter::new(1024, split)?;
        // The rest of 2001:db8::/64 first, so that its group entry exists when the host sends.
        check_eq!(
            send_each(&lim, (2..12u16).map(|i| v6(&format!("2001:db8::{i:x}"))))?,
            3
        );
        check_eq!(lim.send(v6("2001:db8::1"), 20)?, 10);
        check_eq!(
            lim.send(v6("2001:db8::c"), 2)?,
            0,
            "the /64's rest is spent"
        );
        // A /64 policy holding a per-address /126: its own /64 group, split; each address of
        // the /126 its own 6.
        check_eq!(
            send_each(&lim, (1..7u16).map(|i| v6(&format!("2001:db8:0:1::{i:x}"))))?,
            4
        );
        check_eq!(lim.send(v6("2001:db8:0:1::8"), 10)?, 6);
        check_eq!(lim.send(v6("2001:db8:0:1::9"), 10)?, 6);
        // An unsplit /64 next to them: its own 3.
        check_eq!(
            send_each(&lim, (1..9u16).map(|i| v6(&format!("2001:db8:0:2::{i:x}"))))?,
            3
        );
        // Without the host policy, the host is one more address of its /64, whose group starts
        // afresh under the usual key (the split group's entry is left to age out).
        lim.apply("default: { limit: 3, window: 1h }\n")?;
        check_eq!(lim.send(v6("2001:db8::1"), 2)?, 2);
        check_eq!(lim.send(v6("2001:db8::5"), 2)?, 1);
        Ok(())
    })
}

/// A reload that changes how a prefix groups leaves the old group's entry to no one: the first
/// packet that finds it stale under the fast key deletes it, so it neither takes room nor, kept
/// warm by lookups, outlives the 15-bit generation tag and reads as current again.
#[test]
fn an_entry_a_reload_regroups_is_retired_by_the_next_packet() -> Result<()> {
    in_one_window(HOUR_NS, |_| {
        let mut lim = Limiter::new(1024, "default: { limit: 3, window: 1h }\n")?;
        check_eq!(lim.send(v6("2001:db8::2"), 5)?, 3);
        let labels = |lim: &Limiter| -> Result<Vec<String>> {
            Ok(lim
                .tables
                .clients()?
                .iter()
                .map(|(k, _)| limiter_user::stats::client_label(k))
                .collect())
        };
        check_eq!(labels(&lim)?, vec!["2001:db8::/64".to_string()]);
        // A host policy splits the /64: the group's entry under the fast key is no one's.
        lim.apply(
            "default: { limit: 3, window: 1h }\npolicies:\n  - { match: 2001:db8::1, action: pass }\n",
        )?;
        check_eq!(
            lim.send(v6("2001:db8::2"), 5)?,
            3,
            "the split rest starts afresh"
        );
        let held: Vec<_> = lim
            .tables
            .clients()?
            .into_iter()
            .filter(|(_, s)| s.flags() & FLAG_STATIC == 0)
            .collect();
        let decoded: Vec<_> = held
            .iter()
            .map(|(k, s)| (limiter_common::addr::client_of(k), s.total_passed()))
            .collect();
        check_eq!(held.len(), 1, "{decoded:?}");
        check_eq!(
            limiter_common::addr::client_of(&held[0].0),
            limiter_common::addr::Client::GroupV6 {
                prefix: "2001:db8::".parse::<std::net::Ipv6Addr>()?.octets(),
                bits: 64,
                split: true
            }
        );
        check_eq!(lim.send(v6("2001:db8::1"), 5)?, 5);
        Ok(())
    })
}

const GLOBAL: &str = "\
default: { limit: 1000, window: 1h }
policies:
  - match: 10.230.0.0/24
    limit: 30
    window: 1h
    scope: global
  - match: 10.230.1.7
    limit: 30
    window: 1h
    scope: global
  - match: tenant-gold
    limit: 30
    window: 1h
    scope: global
cluster:
  node_id: n1
  listen: 127.0.0.1:7201
  peers: [\"127.0.0.1:7202\", \"127.0.0.1:7203\"]
  token_file: /unused
";

/// The program loaded with [`GLOBAL`] applied as one of 3 connected members (each global limit
/// at its cold share, `CONFIG_CLUSTER` set), the cluster's handles on its maps, and a checker.
fn cluster_member() -> Result<(
    Limiter,
    datapath::grants::ClusterMaps,
    limiter_user::check::Checker,
)> {
    use limiter_user::{
        check::Checker,
        cluster::{
            config::Partition,
            membership::{Phase, ShareView},
        },
        datapath::grants::ClusterMaps,
        limits::with_shares,
    };
    let mut ebpf = datapath::load(&LoadOptions {
        pin_dir: None,
        max_clients: 1024,
        ..LoadOptions::default()
    })
    .context("loading the object (needs root)")?;
    let mut tables = Tables::take(&mut ebpf)?;
    let view = ShareView {
        members: 3,
        phase: Phase::Connected,
        partition: Partition::Share,
    };
    let config = with_shares(&Config::parse(GLOBAL)?, &[], &view);
    tables.apply(&config)?;
    let check_program = datapath::load_check_program(&mut ebpf)?;
    let program: &mut Xdp = ebpf
        .program_mut(datapath::PROGRAM)
        .context("no limiter program")?
        .try_into()?;
    program.load()?;
    let adapt = datapath::load_adapt_program(&mut ebpf)?;
    let maps = ClusterMaps::take(&mut ebpf, &tables, adapt)?;
    let checker = Checker::new(check_program, &config);
    Ok((Limiter { ebpf, tables }, maps, checker))
}

/// A cluster member's fast path (global policies in force, so `CONFIG_CLUSTER` is set): a
/// client with a grant in `GRANTS` is decided with the grant while its lease runs and with
/// `min(grant, cold share)` after (a raise lapses in the kernel, a cut stays); a client without
/// one gets the cold share; each client is reported on `HOT` by the packet that takes its count
/// to 0.8 of that allowance (not one before it), and once more as it moves into `LIMITED`; and
/// the check program decides and reports with the same allowance.
#[test]
fn grants_replace_the_cold_share_while_their_lease_runs() -> Result<()> {
    use limiter_common::Grant;
    use limiter_user::check::ClientId;
    limiter_tests::require_root!();
    in_one_window(HOUR_NS, |_| {
        let (lim, mut grants, checker) = cluster_member()?;
        let src = |last: u8| IpAddr::V4(Ipv4Addr::new(10, 230, 0, last));
        let key = |last: u8| v4_mapped([10, 230, 0, last]);
        let now = monotonic_ns();
        let grant = |value: u32, until_ns: u64| Grant {
            value,
            silence_ms: 0,
            until_ns,
        };
        let refused = grants.write(&[
            // A raise whose lease runs for the hour.
            (key(1), Some(grant(25, now + HOUR_NS))),
            // A raise whose lease is over: the cold share.
            (key(2), Some(grant(25, now - 1_000_000_000))),
            // A cut (no lease): for good.
            (key(3), Some(grant(4, 0))),
            // A cut whose lease is over: still a cut.
            (key(4), Some(grant(6, now - 1_000_000_000))),
        ]);
        ensure!(
            refused.is_empty(),
            "grant writes refused: {}",
            refused.len()
        );
        // The check program reads with the grant's allowance too.
        let read = checker.check(&ClientId::Addr(src(1)), 0)?;
        check_eq!(
            (read.limit, read.remaining, read.global_limit),
            (25, 25, Some(30))
        );
        check_eq!(checker.check(&ClientId::Addr(src(3)), 0)?.limit, 4);
        for (last, expected) in [(1, 25), (2, 10), (3, 4), (4, 6), (5, 10)] {
            // 0.8 of the allowance in force, rounded up: 20, 8, 4, 5, 8.
            let at = hot_count(expected as u32) as usize;
            check_eq!(
                lim.send(src(last), at - 1)?,
                at - 1,
                "client 10.230.0.{last}"
            );
            check_eq!(
                grants.hot(),
                Vec::<ClientKey>::new(),
                "client 10.230.0.{last} below 0.8 of its allowance"
            );
            check_eq!(lim.send(src(last), 1)?, 1);
            check_eq!(
                grants.hot(),
                vec![key(last)],
                "client 10.230.0.{last} at 0.8 of its allowance: hot before any drop"
            );
            check_eq!(
                lim.send(src(last), 40)?,
                expected - at,
                "client 10.230.0.{last}"
            );
            check_eq!(
                grants.hot(),
                vec![key(last)],
                "client 10.230.0.{last} over its limit: reported again as it moves"
            );
        }
        // A check spends from the same budget: the raised client has none left.
        let spent = checker.check(&ClientId::Addr(src(1)), 1)?;
        check_eq!((spent.allowed, spent.limit), (false, 25));
        // The grant withdrawn: the cold share again, already spent.
        ensure!(grants.write(&[(key(1), None)]).is_empty());
        check_eq!(lim.send(src(1), 5)?, 0);
        check_eq!(checker.check(&ClientId::Addr(src(1)), 0)?.limit, 10);
        Ok(())
    })
}

/// Clients whose entries never move into `LIMITED` are reported hot all the same: an
/// exact-address client (`STATIC_CLIENTS`) on `HOT` at 0.8 of its share and by its dropped
/// packets (the first, then one per 256), and an API ID under a global policy by the checker
/// (`HotIds`), which sees the denials, and the probes and reads that refuse an all-or-none
/// request (the check program reports nothing on the ring: a check-role caller could fill it).
/// Otherwise a global client that only the API sees, or one with an exact-address policy, would
/// never be enrolled and stay at the cold share wherever its demand is. The agent's cluster maps
/// find the entries wherever they live.
#[test]
fn kept_clients_are_reported_hot_by_their_denials() -> Result<()> {
    use limiter_user::check::ClientId;
    limiter_tests::require_root!();
    in_one_window(HOUR_NS, |_| {
        let (lim, mut maps, checker) = cluster_member()?;
        let hot_ids = checker.hot_ids();
        let exact = IpAddr::V4(Ipv4Addr::new(10, 230, 1, 7));
        let gold: ClientId = "tenant-gold".parse()?;
        let local: ClientId = "some-local-id".parse()?;
        let checked = IpAddr::V4(Ipv4Addr::new(10, 230, 0, 9));
        // The exact address's packets: its cold share of 10, reported at the 8th, and again at
        // the first dropped.
        check_eq!(lim.send(exact, 8)?, 8);
        check_eq!(
            maps.hot(),
            vec![ClientId::Addr(exact).key()],
            "the exact address at 0.8 of its share"
        );
        check_eq!(lim.send(exact, 32)?, 2);
        check_eq!(
            maps.hot(),
            vec![ClientId::Addr(exact).key()],
            "the exact address's first drop"
        );
        // The ID's checks, one hit each: 10 allowed, 5 denied, noted once; nothing on the ring.
        let allowed = (0..15)
            .map(|_| checker.check(&gold, 1).map(|d| d.allowed))
            .collect::<Result<Vec<_>, _>>()?;
        check_eq!(allowed.iter().filter(|a| **a).count(), 10);
        check_eq!(hot_ids.take(), vec![gold.key()], "the API ID");
        check_eq!(hot_ids.take(), Vec::<ClientKey>::new(), "taken");
        // An ID under a local policy (the default) is not the cluster's.
        checker.check(&local, 2_000)?;
        check_eq!(hot_ids.take(), Vec::<ClientKey>::new(), "a local ID");
        // An address only checked through the API: a denied check notes it, under the key of
        // its entry, which the check program writes back (it has no packets to report it)...
        let spent = checker.check(&ClientId::Addr(checked), 12)?;
        check_eq!(spent.allowed, false);
        check_eq!(
            maps.hot(),
            Vec::<ClientKey>::new(),
            "checks never report on the ring"
        );
        check_eq!(
            hot_ids.take(),
            vec![ClientId::Addr(checked).key()],
            "a denied address"
        );
        // ...and so do admitted hits that take its count to 0.8 of its share (8 of 10).
        check_eq!(checker.check(&ClientId::Addr(checked), 7)?.allowed, true);
        check_eq!(hot_ids.take(), Vec::<ClientKey>::new(), "7 of 10");
        check_eq!(checker.check(&ClientId::Addr(checked), 1)?.allowed, true);
        check_eq!(
            hot_ids.take(),
            vec![ClientId::Addr(checked).key()],
            "the checked address at 0.8 of its share"
        );
        check_eq!(maps.hot(), Vec::<ClientKey>::new(), "still not on the ring");
        // A request refused all or none notes the address as a denied check would.
        let refused_noting = |checks: &[(limiter_common::CheckRequest, u32)], what: &str| {
            let refused = checker.check_all_or_none(checks)?;
            ensure!(
                matches!(refused, limiter_user::check::AllOrNone::Refused(_)),
                "{what}: {refused:?}"
            );
            check_eq!(
                hot_ids.take(),
                vec![ClientId::Addr(checked).key()],
                "{what}"
            );
            Ok(())
        };
        // Refused by the address's probe (3 needed, 2 left); the local ID with room beside it
        // is not the cluster's.
        refused_noting(
            &[
                (limiter_user::check::address_request(checked, 3), 3),
                (
                    limiter_user::check::address_request(
                        IpAddr::V4(Ipv4Addr::new(192, 0, 2, 1)),
                        1,
                    ),
                    1,
                ),
            ],
            "refused by its probe",
        )?;
        // By the read of a request too big for one run (16 checks: a read, then the spend only
        // if all fit).
        let mut many = vec![(limiter_user::check::address_request(checked, 3), 3)];
        many.extend((1..16).map(|i| {
            let other = IpAddr::V4(Ipv4Addr::new(192, 0, 2, i));
            (limiter_user::check::address_request(other, 1), 1)
        }));
        refused_noting(&many, "refused by its read")?;
        // The rate limit service reads through its budget (shadow descriptors, dry-run mode):
        // the checker's read notes the client, though such a read refuses nothing.
        let read = limiter_user::rls::budget::Budget::read_needing(
            &checker,
            &[(limiter_user::check::address_request(checked, 3), 3)],
            true,
        )?;
        check_eq!(
            read.iter().map(|(_, fits)| *fits).collect::<Vec<_>>(),
            vec![false]
        );
        check_eq!(
            hot_ids.take(),
            vec![ClientId::Addr(checked).key()],
            "a short read through the service's budget"
        );
        // Each has an entry the agent's enrolment reads (its counters are its demand), and the
        // read frames of the adapt program find what the lookups key by key find: in
        // `STATIC_CLIENTS`, `LIMITED` (the address checked over its share, moved there by its
        // first dropped packet: 2 of its 10 are left), `CLIENTS` (one that passed),
        // `NAMED_STATIC` and `NAMED` (the local ID), and nothing for one without an entry.
        let moves = lim.global()?.limited_moves;
        check_eq!(lim.send(checked, 3)?, 2);
        check_eq!(
            lim.global()?.limited_moves,
            moves + 1,
            "the checked address moved"
        );
        check_eq!(
            maps.hot(),
            vec![ClientId::Addr(checked).key()],
            "the checked address reported hot again as it moves"
        );
        let passing = IpAddr::V4(Ipv4Addr::new(10, 230, 0, 77));
        check_eq!(lim.send(passing, 2)?, 2);
        let keys: Vec<ClientKey> = [
            exact,
            checked,
            passing,
            IpAddr::V4(Ipv4Addr::new(10, 230, 0, 78)),
        ]
        .into_iter()
        .map(|a| ClientId::Addr(a).key())
        .chain([gold.key(), local.key()])
        .collect();
        // Not `entries`, which falls back to the lookups if the frames fail.
        let framed = maps.read_frames(&keys)?;
        let one_by_one: Vec<_> = keys.iter().map(|k| maps.entry(k)).collect();
        check_eq!(
            framed,
            one_by_one,
            "read frames against lookups, key by key"
        );
        check_eq!(
            framed.iter().map(Option::is_some).collect::<Vec<_>>(),
            vec![true, true, true, false, true, true]
        );
        for (what, key) in [("exact", ClientId::Addr(exact).key()), ("ID", gold.key())] {
            let (entry, id) = maps
                .entry(&key)
                .with_context(|| format!("no entry for the {what}"))?;
            ensure!(
                id == (what == "ID"),
                "the {what} client's entry is in the wrong map"
            );
            ensure!(
                entry.dropped_count() > 0,
                "the {what} client's entry counts no drop"
            );
        }
        // Paced: 30 dropped so far; the 256th reports again, the next 100 do not.
        check_eq!(lim.send(exact, 225)?, 0);
        check_eq!(
            maps.hot(),
            Vec::<ClientKey>::new(),
            "255 dropped: no second report"
        );
        check_eq!(lim.send(exact, 1)?, 0);
        check_eq!(
            maps.hot(),
            vec![ClientId::Addr(exact).key()],
            "the 256th dropped"
        );
        check_eq!(lim.send(exact, 100)?, 0);
        check_eq!(maps.hot(), Vec::<ClientKey>::new());
        Ok(())
    })
}
