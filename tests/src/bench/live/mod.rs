//! Live-traffic benchmark: what dropping an abusive source costs the receiving CPU, for limiter's
//! agent and for what an admin would use today. `live-bench [--rounds N] [--seconds S]
//! [--sources LIST] [--program-time] [--write FILE]`; needs root.
//!
//! A generator (`live_gen`, run with BPF_PROG_TEST_RUN and `BPF_F_TEST_XDP_LIVE_FRAMES` on CPU 0
//! in the sender namespace of a [`TestNet`]) transmits 64-byte UDP frames (60 bytes and the FCS)
//! from N distinct IPv4 sources (10.0.0.0 + n) into the veth pair, as fast as it can. The
//! receiving veth runs its NAPI in a kernel thread (threaded NAPI) pinned to CPU 1, so everything
//! the receiver does for a frame (XDP, the stack, netfilter) is that thread's CPU time. Frames the
//! receiver cannot keep up with are dropped in the sender's veth, before costing it anything. One
//! run measures, after a warm-up that gives every source its first packet, the thread's CPU time
//! (`/proc/PID/schedstat`), the frames it processed (the veth's rx counter) and the frames the
//! case dropped (its own counter), for one case:
//!
//! - `XDP_DROP`: an XDP program that drops everything (the floor);
//! - limiter: `limiter agent` with `default: { limit: 1, window: 60s }`, on CPU 1 too (its own
//!   process's CPU time is reported apart);
//! - a minimal per-source counter in XDP (`live_counter`: hash lookup, clock, compare, update),
//!   with the same limit in a fixed window;
//! - `XDP_DROP` after reading the frame's source address: the floor for any per-source program
//!   (the frame was written on the generator's CPU, so the first read is a cache miss there);
//! - nftables: `meter { ip saddr limit rate over 1/minute burst 1 packets } drop` at the
//!   raw-priority prerouting hook (behind an `XDP_PASS` program, which veth needs to run NAPI
//!   without GRO), sized for a million sources, and at 1M sources also at its default size; its
//!   drops are the IP stack's `InReceives - InDelivers`.
//!
//! Every run starts from fresh state (a new object, agent or table); the cases run in interleaved
//! rounds, and the report gives medians and ranges.

use std::{
    fs,
    net::Ipv4Addr,
    os::fd::AsFd as _,
    path::PathBuf,
    process::Command,
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail, ensure};
use aya::{
    Ebpf, EbpfLoader,
    maps::{Array, PerCpuArray},
    programs::{Xdp, XdpMode},
};
use limiter_user::datapath;

use crate::{
    agent::Agent,
    bench::report::{pin_to_cpu, read_trimmed},
    command::{run_ok, run_ok_within},
    frames::Builder,
    netns::{RECEIVER_MAC, RECEIVER_V4, SENDER_MAC, TestNet, in_netns, link_json, link_packets},
};

mod report;

/// CPU the generator runs on.
const GENERATOR_CPU: usize = 0;
/// CPU the receiver (its NAPI thread, and the agent) runs on.
const RECEIVER_CPU: usize = 1;
/// Every case's limit: this many packets per source per [`WINDOW_S`].
const LIMIT: u64 = 1;
const WINDOW_S: u64 = 60;
/// nftables' default size for a meter's set.
const NFT_DEFAULT_SIZE: u32 = 65_535;
/// The meter size that holds a million sources.
pub const NFT_BIG_SIZE: u32 = 1 << 20;
/// Capacity of the counters' maps (limiter's `--max-clients`, `live_counter`'s hash).
const MAX_SOURCES: u32 = 1 << 20;
/// A run's warm-up lasts until the receiver has processed this many frames per source...
const WARM_UP_PASSES: u64 = 2;
/// ... or this long.
const WARM_UP_CAP: Duration = Duration::from_secs(10);
/// Frames per BPF_PROG_TEST_RUN call of the generator.
const CHUNK: u32 = 1 << 16;
/// Targets (issue 15): limiter drops at least this many times the frames per CPU-second of the
/// nftables meter at up to 100k sources, and costs at most this many times the minimal counter
/// at 100k and 1M.
const TARGET_VS_NFT: f64 = 4.0;
const TARGET_VS_COUNTER: f64 = 1.2;

/// `live-bench [--rounds N] [--seconds S] [--sources LIST] [--write FILE]`.
#[derive(clap::Parser)]
#[command(about = "Live-traffic benchmark: receiver CPU per dropped packet, against nftables")]
pub struct Args {
    /// Interleaved rounds of every case.
    #[arg(long, default_value = "3")]
    pub rounds: usize,
    /// Measured seconds per run (after the warm-up).
    #[arg(long, default_value = "1.0")]
    pub seconds: f64,
    /// Distinct source counts, comma-separated.
    #[arg(long, value_delimiter = ',', default_value = "1,1000,100000,1000000")]
    pub sources: Vec<u32>,
    /// Also measure the time spent in the attached XDP program (BPF_ENABLE_STATS, which itself
    /// adds two clock reads to every run of a program) and report it as a column.
    #[arg(long)]
    pub program_time: bool,
    /// Also write the report (markdown) to FILE.
    #[arg(long, value_name = "FILE")]
    pub write: Option<String>,
}

/// What receives the traffic.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum Case {
    /// `live_drop`: XDP_DROP for every frame.
    XdpDrop,
    /// `live_touch`: reads the source address, then XDP_DROP.
    XdpTouch,
    /// `limiter agent`.
    Limiter,
    /// `live_counter`.
    Counter,
    /// An nftables meter of this size.
    Nft(u32),
}

impl Case {
    fn name(self) -> String {
        match self {
            Case::XdpDrop => "XDP_DROP (floor)".into(),
            Case::XdpTouch => "XDP_DROP after reading the source".into(),
            Case::Limiter => "limiter agent".into(),
            Case::Counter => "minimal XDP counter".into(),
            Case::Nft(NFT_DEFAULT_SIZE) => "nftables meter, default size 65535".into(),
            Case::Nft(size) => format!("nftables meter, size {size}"),
        }
    }
}

/// What one run measured.
#[derive(Clone, Copy, Debug)]
pub struct Run {
    /// Frames the receiver processed while measured.
    pub processed: u64,
    /// Of those, frames the case dropped.
    pub dropped: u64,
    /// CPU time of the receiver's NAPI thread while measured.
    pub cpu_ns: u64,
    /// CPU time of the agent's process while measured (limiter only), from clock ticks.
    pub agent_cpu_ns: u64,
    /// With program time on: time in the attached XDP program, and its runs, while measured.
    pub program: Option<(u64, u64)>,
}

impl Run {
    /// Receiver CPU per processed frame.
    pub fn ns_per_packet(&self) -> f64 {
        self.cpu_ns as f64 / self.processed.max(1) as f64
    }

    /// Frames dropped per second of receiver CPU.
    pub fn drops_per_cpu_second(&self) -> f64 {
        self.dropped as f64 / (self.cpu_ns.max(1) as f64 / 1e9)
    }
}

/// The test network and the generator; runs one case at a time.
pub struct LiveBench {
    net: TestNet,
    generator: Ebpf,
    frame: Vec<u8>,
    sender_ifindex: u32,
    dir: PathBuf,
    /// Keeps BPF_ENABLE_STATS on while held.
    stats: Option<std::os::fd::OwnedFd>,
}

/// The benchmark object (limiter-ebpf's `bench` feature) with `live_windows` entries in
/// `live_counter`'s hash; small limiter maps, which these programs do not use.
fn load_bench_object(live_windows: u32) -> Result<Ebpf> {
    let mut loader = EbpfLoader::new();
    loader.map_max_entries("CLIENTS", 1024);
    loader.map_max_entries("NAMED", 1024);
    loader.map_max_entries("LIVE_WINDOWS", live_windows);
    loader
        .load(datapath::ebpf::BENCH_OBJECT)
        .context("loading the benchmark object (needs root)")
}

fn load_program<'a>(ebpf: &'a mut Ebpf, name: &str) -> Result<&'a mut Xdp> {
    let prog: &mut Xdp = ebpf
        .program_mut(name)
        .with_context(|| format!("no program {name} in the benchmark object"))?
        .try_into()?;
    prog.load().with_context(|| format!("loading {name}"))?;
    Ok(prog)
}

impl LiveBench {
    /// Creates the test network and loads the generator; with `program_time`, turns on the
    /// kernel's run-time statistics of BPF programs until dropped.
    pub fn new(program_time: bool) -> Result<LiveBench> {
        let net = TestNet::new()?;
        let mut generator = load_bench_object(1024)?;
        load_program(&mut generator, "live_gen")?;
        let frame = Builder::ipv4(Ipv4Addr::new(10, 0, 0, 0), RECEIVER_V4)
            .macs(SENDER_MAC, RECEIVER_MAC)
            .payload(&[0; 18])
            .build()
            .bytes;
        ensure!(
            frame.len() == 60,
            "the frame is {} bytes, not 60",
            frame.len()
        );
        let iface = std::ffi::CString::new(net.sender_if.clone())?;
        // SAFETY: a valid NUL-terminated name.
        let sender_ifindex = in_netns(&net.sender_ns, || unsafe {
            libc::if_nametoindex(iface.as_ptr())
        })?;
        ensure!(sender_ifindex != 0, "no interface {}", net.sender_if);
        let dir = std::env::temp_dir().join(format!("limiter-live-bench-{}", std::process::id()));
        fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
        Ok(LiveBench {
            net,
            generator,
            frame,
            sender_ifindex,
            dir,
            stats: program_time
                .then(|| aya::sys::enable_stats(aya::sys::Stats::RunTime))
                .transpose()
                .context("BPF_ENABLE_STATS")?,
        })
    }

    /// One run of `case` with `sources` distinct sources: `warm_up` of traffic, then `measure`
    /// of it measured; the receiver is torn down afterwards.
    pub fn run(
        &mut self,
        case: Case,
        sources: u32,
        warm_up: Duration,
        measure: Duration,
    ) -> Result<Run> {
        let mut sources_map: Array<_, u32> = Array::try_from(
            self.generator
                .map_mut("LIVE_GEN_SOURCES")
                .context("no map LIVE_GEN_SOURCES")?,
        )?;
        sources_map.set(0, sources, 0)?;
        match case {
            Case::XdpDrop | Case::XdpTouch => {
                let mut ebpf = load_bench_object(1024)?;
                let prog = if case == Case::XdpDrop {
                    "live_drop"
                } else {
                    "live_touch"
                };
                self.attach(&mut ebpf, prog)?;
                self.measure(warm_up, sources, measure, None, || Ok(0))
                    .map(|mut run| {
                        run.dropped = run.processed;
                        run
                    })
            }
            Case::Counter => {
                let mut ebpf = load_bench_object(MAX_SOURCES)?;
                let mut limit: Array<_, [u64; 2]> =
                    Array::try_from(ebpf.map_mut("LIVE_LIMIT").context("no map LIVE_LIMIT")?)?;
                limit.set(0, [LIMIT, WINDOW_S * 1_000_000_000], 0)?;
                self.attach(&mut ebpf, "live_counter")?;
                let drops: PerCpuArray<_, u64> =
                    PerCpuArray::try_from(ebpf.map("LIVE_DROPS").context("no map LIVE_DROPS")?)?;
                self.measure(warm_up, sources, measure, None, || {
                    Ok(drops.get(&0, 0)?.iter().sum::<u64>())
                })
            }
            Case::Limiter => {
                let config = format!("default: {{ limit: {LIMIT}, window: {WINDOW_S}s }}\n");
                let max = MAX_SOURCES.to_string();
                let cpu = RECEIVER_CPU.to_string();
                let agent = Agent::spawn_on_wrapped(
                    &self.net.agent_target(),
                    &config,
                    &["--max-clients", &max],
                    &["taskset", "-c", &cpu],
                )?;
                agent.wait_ready(Duration::from_secs(30))?;
                let pid = agent.pid().context("the agent exited")?;
                self.measure(warm_up, sources, measure, Some(pid), || {
                    let stats = agent.stats()?;
                    stats["global"]["dropped"]
                        .as_u64()
                        .with_context(|| format!("no global.dropped in `limiter stats`: {stats}"))
                })
            }
            Case::Nft(size) => {
                let mut ebpf = load_bench_object(1024)?;
                self.attach(&mut ebpf, "live_pass")?;
                let rules = self.dir.join("live.nft");
                fs::write(
                    &rules,
                    format!(
                        "table ip live_bench\ndelete table ip live_bench\n\
                         table ip live_bench {{\n  chain pre {{\n    \
                         type filter hook prerouting priority raw; policy accept;\n    meter \
                         sources size {size} {{ ip saddr limit rate over {LIMIT}/minute burst \
                         {LIMIT} packets }} drop\n  }}\n}}\n"
                    ),
                )
                .with_context(|| format!("writing {}", rules.display()))?;
                run_ok(
                    Command::new("nsenter")
                        .arg(format!("--net=/run/netns/{}", self.net.receiver_ns))
                        .args(["nft", "-f"])
                        .arg(&rules),
                )
                .context(
                    "loading the nftables meter (is nftables installed? `cargo xtask setup`)",
                )?;
                let ns = self.net.receiver_ns.clone();
                let run = self.measure(warm_up, sources, measure, None, || nft_dropped(&ns));
                // A million elements take a while to free.
                run_ok_within(
                    Command::new("nsenter")
                        .arg(format!("--net=/run/netns/{}", self.net.receiver_ns))
                        .args(["nft", "delete", "table", "ip", "live_bench"]),
                    Duration::from_secs(60),
                )
                .context("deleting the nftables table")?;
                run
            }
        }
        .with_context(|| format!("{} at {sources} sources", case.name()))
    }

    /// Attaches program `name` of `ebpf` (loading it) to the receiver's veth; it stays attached
    /// until `ebpf` is dropped.
    fn attach(&self, ebpf: &mut Ebpf, name: &str) -> Result<()> {
        let prog = load_program(ebpf, name)?;
        let iface = self.net.receiver_if.clone();
        in_netns(&self.net.receiver_ns, || {
            prog.attach(&iface, XdpMode::Driver)
        })?
        .with_context(|| format!("attaching {name} to {iface}"))?;
        Ok(())
    }

    /// Threads NAPI of the receiver's veth, pins its thread to [`RECEIVER_CPU`] and returns its
    /// pid. Its NAPI exists only while an XDP program is attached (veth without GRO), and is
    /// created anew with each attachment.
    fn napi_thread(&self) -> Result<u32> {
        let (ns, iface) = (&self.net.receiver_ns, &self.net.receiver_if);
        run_ok(
            Command::new("ip")
                .args(["netns", "exec", ns, "sh", "-c"])
                .arg(format!("echo 1 > /sys/class/net/{iface}/threaded")),
        )
        .with_context(|| format!("enabling threaded NAPI on {iface}"))?;
        // The thread is `napi/IFACE-ID`, cut to the 15 bytes of a task name.
        let name = format!("napi/{iface}-");
        let prefix = &name[..name.len().min(15)];
        let mut found = Vec::new();
        for entry in fs::read_dir("/proc")? {
            let entry = entry?;
            let Ok(pid) = entry.file_name().to_string_lossy().parse::<u32>() else {
                continue;
            };
            if read_trimmed(&format!("/proc/{pid}/comm")).starts_with(prefix) {
                found.push(pid);
            }
        }
        let [pid] = found[..] else {
            bail!("expected one NAPI thread {prefix}*, found {found:?}");
        };
        let cpu = RECEIVER_CPU.to_string();
        run_ok(Command::new("taskset").args(["-p", "-c", &cpu, &pid.to_string()]))
            .with_context(|| format!("pinning NAPI thread {pid} to CPU {cpu}"))?;
        Ok(pid)
    }

    /// Frames the receiver's veth has processed (its rx counter, which counts XDP drops too).
    fn rx_packets(&self) -> Result<u64> {
        link_packets(&self.net.receiver_ns, &self.net.receiver_if, "rx")
    }

    /// Sends for `warm_up`, then measures while sending for `measure`: CPU of the NAPI thread
    /// (and of `agent`), frames processed, and `dropped`'s difference.
    fn measure(
        &self,
        warm_up: Duration,
        sources: u32,
        measure: Duration,
        agent: Option<u32>,
        dropped: impl Fn() -> Result<u64>,
    ) -> Result<Run> {
        let napi = self.napi_thread()?;
        // Until every source has (nearly surely) sent: the frames the receiver cannot take are
        // dropped at random, so WARM_UP_PASSES times the sources.
        let (start, rx) = (Instant::now(), self.rx_packets()?);
        loop {
            self.generate(Duration::from_millis(100))?;
            let elapsed = start.elapsed();
            let enough = self.rx_packets()? - rx >= WARM_UP_PASSES * u64::from(sources);
            if elapsed >= warm_up && enough || elapsed >= WARM_UP_CAP {
                break;
            }
        }
        let prog = if self.stats.is_some() {
            Some(self.xdp_program_id()?)
        } else {
            None
        };
        let (cpu0, rx0, drop0) = (thread_cpu_ns(napi)?, self.rx_packets()?, dropped()?);
        let agent0 = agent.map(process_cpu_ns).transpose()?;
        let prog0 = prog.map(program_stats).transpose()?;
        self.generate(measure)?;
        // The receiver drains what is still queued (the veth ring, a poll batch): read once its
        // count stands still, drops first, so that no frame counts as dropped but not received.
        let mut rx = self.rx_packets()?;
        for _ in 0..50 {
            std::thread::sleep(Duration::from_millis(20));
            let now = self.rx_packets()?;
            if now == rx {
                break;
            }
            rx = now;
        }
        let drop1 = dropped()?;
        let (cpu1, rx1) = (thread_cpu_ns(napi)?, self.rx_packets()?);
        let agent1 = agent.map(process_cpu_ns).transpose()?;
        let prog1 = prog.map(program_stats).transpose()?;
        Ok(Run {
            processed: rx1.saturating_sub(rx0),
            dropped: drop1.saturating_sub(drop0),
            cpu_ns: cpu1.saturating_sub(cpu0),
            agent_cpu_ns: agent1.unwrap_or(0).saturating_sub(agent0.unwrap_or(0)),
            program: prog0
                .zip(prog1)
                .map(|(a, b)| (b.0.saturating_sub(a.0), b.1.saturating_sub(a.1))),
        })
    }

    /// The id of the XDP program attached to the receiver's veth (`ip -j link`).
    fn xdp_program_id(&self) -> Result<u32> {
        let link = link_json(&self.net.receiver_ns, &self.net.receiver_if)?;
        link["xdp"]["prog"]["id"]
            .as_u64()
            .map(|id| id as u32)
            .with_context(|| format!("no XDP program in `ip -j link`: {link}"))
    }

    /// Why this kernel cannot generate the benchmark's traffic, if it cannot: it refuses
    /// BPF_PROG_TEST_RUN with `BPF_F_TEST_XDP_LIVE_FRAMES` (Linux 5.18) with EPERM, even to root,
    /// while it runs the same program without the flag. Some kernel builds do: 6.18.44-fc-v1300
    /// did on 2026-12-07, where 6.18.44-fc-v1147 took it. The probe sends nothing: the
    /// generator has no sources to send from yet, and aborts. Any other failure is an error.
    pub fn live_frames_refused(&self) -> Result<Option<String>> {
        let fd = self.generator_fd()?;
        let (frame, ifindex) = (&self.frame, self.sender_ifindex);
        let sent = in_netns(&self.net.sender_ns, || {
            datapath::syscall::prog_test_run_live(fd, frame, ifindex, 1)
        })?;
        let runs_without_the_flag =
            || datapath::syscall::prog_test_run(fd, &mut frame.clone()).is_ok();
        match sent {
            Ok(()) => Ok(None),
            Err(e) if e.raw_os_error() == Some(libc::EPERM) && runs_without_the_flag() => {
                Ok(Some(format!(
                    "this kernel ({}) refuses BPF_PROG_TEST_RUN with BPF_F_TEST_XDP_LIVE_FRAMES ({e}), \
                 even to root, so the generator cannot send live frames",
                    read_trimmed("/proc/sys/kernel/osrelease")
                )))
            }
            Err(e) => {
                Err(e).context("BPF_PROG_TEST_RUN with BPF_F_TEST_XDP_LIVE_FRAMES, one frame")
            }
        }
    }

    /// The generator program's descriptor.
    fn generator_fd(&self) -> Result<std::os::fd::BorrowedFd<'_>> {
        let prog: &Xdp = self
            .generator
            .program("live_gen")
            .context("no program live_gen")?
            .try_into()?;
        Ok(prog.fd()?.as_fd())
    }

    /// Runs the generator on [`GENERATOR_CPU`] in the sender namespace for `time`.
    fn generate(&self, time: Duration) -> Result<()> {
        let fd = self.generator_fd()?;
        let (frame, ifindex) = (&self.frame, self.sender_ifindex);
        in_netns(&self.net.sender_ns, || -> Result<()> {
            pin_to_cpu(GENERATOR_CPU)?;
            let start = Instant::now();
            while start.elapsed() < time {
                datapath::syscall::prog_test_run_live(fd, frame, ifindex, CHUNK).context(
                    "BPF_PROG_TEST_RUN with BPF_F_TEST_XDP_LIVE_FRAMES (Linux 5.18 or later)",
                )?;
            }
            Ok(())
        })?
    }
}

impl Drop for LiveBench {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.dir);
    }
}

/// Run time (ns) and run count of BPF program `id` (with BPF_ENABLE_STATS on).
fn program_stats(id: u32) -> Result<(u64, u64)> {
    for info in aya::programs::loaded_programs() {
        let info = info?;
        if info.id() == id {
            return Ok((info.run_time().as_nanos() as u64, info.run_count()));
        }
    }
    bail!("no BPF program {id}")
}

/// CPU time of thread `pid` (`/proc/PID/schedstat`, nanoseconds).
fn thread_cpu_ns(pid: u32) -> Result<u64> {
    let path = format!("/proc/{pid}/schedstat");
    let text = fs::read_to_string(&path).with_context(|| format!("reading {path}"))?;
    text.split_whitespace()
        .next()
        .and_then(|t| t.parse().ok())
        .with_context(|| format!("{path}: {text:?}"))
}

/// User and system CPU time of process `pid` and its threads (`/proc/PID/stat`, clock ticks).
fn process_cpu_ns(pid: u32) -> Result<u64> {
    let path = format!("/proc/{pid}/stat");
    let text = fs::read_to_string(&path).with_context(|| format!("reading {path}"))?;
    // Fields after the parenthesised name: state is field 3; utime and stime are 14 and 15.
    let rest = text.rsplit_once(')').map(|(_, r)| r).unwrap_or_default();
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let ticks: u64 = fields
        .get(11..13)
        .with_context(|| format!("{path}: {text:?}"))?
        .iter()
        .map(|f| f.parse::<u64>().unwrap_or(0))
        .sum();
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as u64;
    Ok(ticks * 1_000_000_000 / hz)
}

/// Packets dropped between the IP stack's entry and its delivery in namespace `ns`: the
/// nftables case's drops (`Ip: InReceives - InDelivers` of its /proc/net/snmp; the frames are
/// addressed to the receiver, so every frame the meter passes is delivered). Asking `nft` for a
/// counter takes more than 10 s once the meter holds a million elements.
fn nft_dropped(ns: &str) -> Result<u64> {
    let snmp = in_netns(ns, || fs::read_to_string("/proc/thread-self/net/snmp"))?
        .context("reading /proc/thread-self/net/snmp")?;
    let mut ip = snmp.lines().filter(|l| l.starts_with("Ip:"));
    let (Some(names), Some(values)) = (ip.next(), ip.next()) else {
        bail!("no Ip: lines in /proc/net/snmp: {snmp}");
    };
    let field = |name: &str| -> Result<u64> {
        names
            .split_whitespace()
            .zip(values.split_whitespace())
            .find(|(n, _)| *n == name)
            .and_then(|(_, v)| v.parse().ok())
            .with_context(|| format!("no {name} in /proc/net/snmp: {snmp}"))
    };
    // Read one after the other: a frame in flight between them must not underflow.
    Ok(field("InReceives")?.saturating_sub(field("InDelivers")?))
}

fn median(v: &[f64]) -> f64 {
    let mut v = v.to_vec();
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn range(v: &[f64]) -> (f64, f64) {
    v.iter()
        .fold((f64::MAX, f64::MIN), |(lo, hi), &x| (lo.min(x), hi.max(x)))
}

/// `median (lo–hi)` with `digits` decimals.
fn spread(v: &[f64], digits: usize) -> String {
    let (lo, hi) = range(v);
    format!("{:.digits$} ({lo:.digits$}–{hi:.digits$})", median(v))
}

/// The cases at `sources` sources.
fn cases(sources: u32) -> Vec<Case> {
    let mut cases = vec![
        Case::XdpDrop,
        Case::XdpTouch,
        Case::Limiter,
        Case::Counter,
        Case::Nft(NFT_BIG_SIZE),
    ];
    if sources > 4 * NFT_DEFAULT_SIZE {
        cases.push(Case::Nft(NFT_DEFAULT_SIZE));
    }
    cases
}

/// The shortest warm-up before a measured run (see [`WARM_UP_PASSES`]).
const WARM_UP: Duration = Duration::from_millis(300);

/// Runs the benchmark and prints (and with `--write` writes) the report.
pub fn run(args: &Args) -> Result<()> {
    ensure!(args.rounds > 0, "--rounds must be positive");
    ensure!(args.seconds > 0.0, "--seconds must be positive");
    let measure = Duration::from_secs_f64(args.seconds);
    let load_before = read_trimmed("/proc/loadavg");
    let mut bench = LiveBench::new(args.program_time)?;
    let md = match bench.live_frames_refused()? {
        // Said in the report, which `cargo xtask bench` puts in BENCHMARKS.md, not failed: the
        // other benchmarks still measure.
        Some(why) => {
            eprintln!("live-bench: not measured: {why}");
            report::not_measured(&why)?
        }
        None => {
            let runs = measure_rounds(args, &mut bench, measure)?;
            drop(bench);
            let load_after = read_trimmed("/proc/loadavg");
            report::report(args, &runs, &load_before, &load_after)?
        }
    };
    print!("{md}");
    if let Some(path) = &args.write {
        fs::write(path, &md).with_context(|| format!("writing {path}"))?;
    }
    Ok(())
}

/// Every case at every source count, `args.rounds` times, interleaved: `[sources index][case
/// index]`, one [`Run`] per round.
fn measure_rounds(
    args: &Args,
    bench: &mut LiveBench,
    measure: Duration,
) -> Result<Vec<Vec<Vec<Run>>>> {
    // runs[sources index][case index] = one Run per round.
    let mut runs: Vec<Vec<Vec<Run>>> = args
        .sources
        .iter()
        .map(|&s| vec![Vec::new(); cases(s).len()])
        .collect();
    for round in 0..args.rounds {
        for (si, &sources) in args.sources.iter().enumerate() {
            for (ci, case) in cases(sources).into_iter().enumerate() {
                let run = bench.run(case, sources, WARM_UP, measure)?;
                eprintln!(
                    "round {round}, {sources} sources, {}: {:.0} ns/packet, {:.2} M drops/CPU-s, \
                     {} processed, {} dropped",
                    case.name(),
                    run.ns_per_packet(),
                    run.drops_per_cpu_second() / 1e6,
                    run.processed,
                    run.dropped
                );
                runs[si][ci].push(run);
            }
        }
    }
    Ok(runs)
}
