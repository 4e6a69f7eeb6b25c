//! XDP benchmark: per-packet cost of the limiter measured with BPF_PROG_TEST_RUN, and the map
//! memory per client. `xdp-bench [--repeat N] [--write FILE]`; needs root.

use std::{
    fmt::Write as _,
    net::{Ipv4Addr, Ipv6Addr},
    os::fd::{AsFd as _, AsRawFd as _},
    time::Instant,
};

use anyhow::{Context as _, Result, ensure};
use aya::{
    Ebpf,
    maps::{IterableMap as _, MapInfo},
    programs::{TestRun, TestRunOptions, Xdp},
};
use limiter_common::ClientState;
use limiter_user::{
    config::Config,
    datapath::{self, LoadOptions, Tables},
};

use crate::{
    bench::report::{date, machine, pin_to_cpu},
    frames::Builder,
};

const XDP_DROP: u32 = 1;
const XDP_PASS: u32 = 2;
/// Capacity of the client map for every case.
const MAX_CLIENTS: u32 = 1 << 20;
/// Distinct sources `limiter_bench_cycle` cycles through (its `BENCH_CLIENTS`).
const CYCLE_CLIENTS: u32 = 1_000_000;
/// Target: cost of the single hot client over the baseline.
const TARGET_NS_OVER_BASELINE: f64 = 40.0;
/// Target: map memory per client at 1M clients.
const TARGET_BYTES_PER_CLIENT: f64 = 128.0;

const POLICY: &str = "\
default: { limit: 4294967295, window: 1h }
policies:
  - { match: 198.51.100.0/24, limit: 1, window: 1h }
  - { match: 203.0.113.0/24, action: pass }
  - { match: \"2001:db8:1::/48\", limit: 4294967295, window: 1h, per: address }
  - { match: \"2001:db8:2::1\", limit: 4294967295, window: 1h }
";
const HOT_PASS: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 1);
const HOT_DROP: Ipv4Addr = Ipv4Addr::new(198, 51, 100, 1);
const ALLOWED: Ipv4Addr = Ipv4Addr::new(203, 0, 113, 1);
/// Under `default`: IPv6 counts per /64, found under the fast key.
const HOT_V6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, 1);
/// Under a per-address policy, off the family's usual grouping: a trie lookup per packet.
const HOT_V6_OWN: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 1, 0, 0, 0, 0, 1);
/// With an exact-address policy: in `STATIC_CLIENTS`, found without a trie lookup.
const HOT_V6_STATIC: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 2, 0, 0, 0, 0, 1);

/// `xdp-bench [--repeat N] [--write FILE]`.
#[derive(clap::Parser)]
#[command(
    about = "XDP benchmark: per-packet cost with BPF_PROG_TEST_RUN and map memory per client"
)]
pub struct Args {
    /// BPF_PROG_TEST_RUN repetitions per case (`_` separators allowed).
    #[arg(long, default_value = "10000000", value_parser = parse_repeat)]
    pub repeat: u32,
    /// Also write the report (markdown) to FILE.
    #[arg(long, value_name = "FILE")]
    pub write: Option<String>,
}

/// A positive count, `_` separators allowed: `10_000_000`.
fn parse_repeat(text: &str) -> Result<u32, String> {
    match text.replace('_', "").parse::<u32>() {
        Ok(0) => Err("--repeat must be positive".to_owned()),
        Ok(n) => Ok(n),
        Err(e) => Err(format!("{text:?}: {e}")),
    }
}

/// Interleaved rounds of the hot-client cases, each round with its own baseline call.
const ROUNDS: usize = 5;

/// One measured case.
struct Row {
    case: String,
    /// Kernel-reported average per run (BPF_PROG_TEST_RUN `duration`, whole ns); the median over
    /// the rounds for the hot-client cases.
    ns: f64,
    /// Cost over the baseline: the median of the per-round differences, and their range.
    over: Option<(f64, f64, f64)>,
    /// Wall-clock time of the whole call divided by the repeat count (includes the call's fixed
    /// overhead).
    wall_ns: f64,
    repeat: u32,
    /// Whether this case is judged against the hot-client target.
    hot: bool,
}

fn program<'a>(ebpf: &'a Ebpf, name: &str) -> Result<&'a Xdp> {
    Ok(ebpf
        .program(name)
        .with_context(|| format!("no program {name}"))?
        .try_into()?)
}

/// One BPF_PROG_TEST_RUN call; checks the verdict of the last run.
fn measure(ebpf: &Ebpf, prog: &str, frame: &[u8], repeat: u32, verdict: u32) -> Result<(f64, f64)> {
    let p = program(ebpf, prog)?;
    let start = Instant::now();
    let r = p
        .test_run(TestRunOptions {
            data_in: Some(frame),
            repeat,
            ..Default::default()
        })
        .with_context(|| format!("test run of {prog}"))?;
    let wall = start.elapsed();
    ensure!(
        r.return_value == verdict,
        "{prog} returned {} instead of {verdict}",
        r.return_value
    );
    Ok((
        r.duration.as_nanos() as f64,
        wall.as_nanos() as f64 / repeat as f64,
    ))
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

/// One hot-client case: name, program, frame, verdict, judged against the target.
type Case<'a> = (&'a str, &'a str, &'a [u8], u32, bool);

/// Runs the baseline and then `cases` in `ROUNDS` interleaved rounds of one call each (so slow
/// drifts of the machine hit every case alike); each case's cost over the baseline is the median
/// of its per-round differences.
fn rounds(ebpf: &Ebpf, baseline: &[u8], cases: &[Case<'_>], n: u32) -> Result<Vec<Row>> {
    let mut base = Vec::new();
    let mut runs = vec![Vec::new(); cases.len()];
    for _ in 0..ROUNDS {
        base.push(measure(ebpf, "limiter_baseline", baseline, n, XDP_PASS)?);
        for (i, (_, prog, frame, verdict, _)) in cases.iter().enumerate() {
            runs[i].push(measure(ebpf, prog, frame, n, *verdict)?);
        }
    }
    let mut rows = vec![Row {
        case: "baseline: parse + per-CPU counter, XDP_PASS".into(),
        ns: median(base.iter().map(|b| b.0).collect()),
        over: None,
        wall_ns: median(base.iter().map(|b| b.1).collect()),
        repeat: n,
        hot: false,
    }];
    for ((case, _, _, _, hot), runs) in cases.iter().zip(runs) {
        let over: Vec<f64> = runs.iter().zip(&base).map(|(r, b)| r.0 - b.0).collect();
        let (lo, hi) = over
            .iter()
            .fold((f64::MAX, f64::MIN), |(lo, hi), &d| (lo.min(d), hi.max(d)));
        rows.push(Row {
            case: case.to_string(),
            ns: median(runs.iter().map(|r| r.0).collect()),
            over: Some((median(over), lo, hi)),
            wall_ns: median(runs.iter().map(|r| r.1).collect()),
            repeat: n,
            hot: *hot,
        });
    }
    for r in &rows {
        eprintln!("{}: {} ns/packet (wall {:.1})", r.case, r.ns, r.wall_ns);
    }
    Ok(rows)
}

fn frame_from(src: Ipv4Addr) -> Vec<u8> {
    Builder::ipv4(src, Ipv4Addr::new(192, 0, 2, 254))
        .build()
        .bytes
}

fn frame_from_v6(src: Ipv6Addr) -> Vec<u8> {
    Builder::ipv6(src, Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, 0xfe))
        .build()
        .bytes
}

/// `key: value` fields of /proc/self/fdinfo/FD.
fn fdinfo(fd: i32) -> Result<Vec<(String, String)>> {
    let text = std::fs::read_to_string(format!("/proc/self/fdinfo/{fd}"))?;
    Ok(text
        .lines()
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_string(), v.trim().to_string()))
        .collect())
}

fn field(info: &[(String, String)], key: &str) -> Option<u64> {
    info.iter()
        .find(|(k, _)| k == key)
        .and_then(|(_, v)| v.parse().ok())
}

/// Every BPF map this process holds: `(name, max_entries, memlock)`.
fn maps_memlock() -> Result<Vec<(String, u64, u64)>> {
    let mut maps = Vec::new();
    let mut seen = std::collections::HashSet::new();
    for entry in std::fs::read_dir("/proc/self/fdinfo")? {
        let Ok(fd) = entry?.file_name().to_string_lossy().parse::<i32>() else {
            continue;
        };
        let Ok(info) = fdinfo(fd) else { continue };
        let (Some(id), Some(memlock)) = (field(&info, "map_id"), field(&info, "memlock")) else {
            continue;
        };
        if !seen.insert(id) {
            continue;
        }
        let name = MapInfo::from_id(id as u32)
            .ok()
            .and_then(|i| i.name_as_str().map(str::to_string))
            .unwrap_or_else(|| format!("map {id}"));
        maps.push((name, field(&info, "max_entries").unwrap_or(0), memlock));
    }
    maps.sort_by_key(|m| std::cmp::Reverse(m.2));
    Ok(maps)
}

fn mib(bytes: u64) -> String {
    format!("{:.1} MiB", bytes as f64 / (1 << 20) as f64)
}

/// Runs the benchmark and prints (and with `--write` writes) the report.
pub fn run(args: &Args) -> Result<()> {
    let n = args.repeat;
    // One CPU throughout: the per-CPU sequence of `limiter_bench_cycle` must continue across calls.
    pin_to_cpu(0)?;

    let mut ebpf = datapath::load_object(
        datapath::ebpf::BENCH_OBJECT,
        &LoadOptions {
            pin_dir: None,
            max_clients: MAX_CLIENTS,
            ..LoadOptions::default()
        },
    )
    .context("loading the object (needs root)")?;
    let mut tables = Tables::take(&mut ebpf)?;
    tables.apply(&Config::parse(POLICY)?)?;
    for name in ["limiter", "limiter_baseline", "limiter_bench_cycle"] {
        let p: &mut Xdp = ebpf
            .program_mut(name)
            .with_context(|| format!("no program {name}"))?
            .try_into()?;
        p.load().with_context(|| format!("loading {name}"))?;
    }

    let hot = frame_from(HOT_PASS);
    let hot_drop = frame_from(HOT_DROP);
    let allowed = frame_from(ALLOWED);
    let hot_v6 = frame_from_v6(HOT_V6);
    let hot_v6_own = frame_from_v6(HOT_V6_OWN);
    let hot_v6_static = frame_from_v6(HOT_V6_STATIC);
    let mut rows = Vec::new();
    let mut row = |case: &str, (ns, wall_ns): (f64, f64), repeat: u32| {
        eprintln!("{case}: {ns} ns/packet (wall {wall_ns:.1})");
        rows.push(Row {
            case: case.into(),
            ns,
            over: None,
            wall_ns,
            repeat,
            hot: false,
        });
    };

    // Warm-up: instruction and data caches, and the hot clients' entries.
    measure(&ebpf, "limiter_baseline", &hot, 1000, XDP_PASS)?;
    measure(&ebpf, "limiter", &hot, 1000, XDP_PASS)?;
    measure(&ebpf, "limiter", &hot_drop, 1000, XDP_DROP)?;
    measure(&ebpf, "limiter", &allowed, 1000, XDP_PASS)?;
    measure(&ebpf, "limiter", &hot_v6, 1000, XDP_PASS)?;
    measure(&ebpf, "limiter", &hot_v6_own, 1000, XDP_PASS)?;
    measure(&ebpf, "limiter", &hot_v6_static, 1000, XDP_PASS)?;

    let mut hot_rows = rounds(
        &ebpf,
        &hot,
        &[
            ("1 hot client, passing", "limiter", &hot, XDP_PASS, true),
            (
                "1 hot client, over its limit (dropping)",
                "limiter",
                &hot_drop,
                XDP_DROP,
                true,
            ),
            // No clock or window arithmetic: the difference to the rows above is the sliding
            // window's cost.
            (
                "1 hot allow-listed client (`action: pass`)",
                "limiter",
                &allowed,
                XDP_PASS,
                false,
            ),
            // IPv6 parses 40 bytes of header where the baseline's IPv4 frame has 20.
            (
                "1 hot IPv6 client, passing (its /64, the usual key)",
                "limiter",
                &hot_v6,
                XDP_PASS,
                false,
            ),
            (
                "1 hot IPv6 client, passing (`per: address` policy: a trie lookup per packet)",
                "limiter",
                &hot_v6_own,
                XDP_PASS,
                false,
            ),
            (
                "1 hot IPv6 client, passing (exact-address policy, `STATIC_CLIENTS`)",
                "limiter",
                &hot_v6_static,
                XDP_PASS,
                false,
            ),
        ],
        n,
    )?;

    let before = tables.global()?.new_clients;
    row(
        "1M new clients (cycling, each inserted)",
        measure(&ebpf, "limiter_bench_cycle", &hot, CYCLE_CLIENTS, XDP_PASS)?,
        CYCLE_CLIENTS,
    );
    let inserted = tables.global()?.new_clients - before;
    row(
        "1M resident, cycling",
        measure(&ebpf, "limiter_bench_cycle", &hot, CYCLE_CLIENTS, XDP_PASS)?,
        CYCLE_CLIENTS,
    );
    let reinserted = tables.global()?.new_clients - before - inserted;
    let resident_rows = rounds(
        &ebpf,
        &hot,
        &[(
            "1 hot client, passing, 1M resident",
            "limiter",
            &hot,
            XDP_PASS,
            true,
        )],
        n,
    )?;
    // The cycling rows are judged against the first rounds' baseline.
    let baseline = hot_rows[0].ns;
    for r in &mut rows {
        r.over = Some((r.ns - baseline, r.ns - baseline, r.ns - baseline));
    }
    hot_rows.append(&mut rows);
    hot_rows.extend(resident_rows.into_iter().skip(1));
    let rows = hot_rows;
    let global = tables.global()?;
    let resident = tables.clients.keys().filter_map(Result::ok).count();

    let clients_fd = tables.clients.map().fd().as_fd().as_raw_fd();
    let info = fdinfo(clients_fd)?;
    let clients_memlock = field(&info, "memlock").context("no memlock in the CLIENTS fdinfo")?;
    let clients_max =
        field(&info, "max_entries").context("no max_entries in the CLIENTS fdinfo")?;
    let per_client = clients_memlock as f64 / clients_max as f64;
    // htab_map_mem_usage (kernel/bpf/hashtab.c): a bucket per entry (the entries are a power of
    // two) and a preallocated element: header, key and value, each rounded up to 8 bytes.
    let per_entry = 16 + 48 + 16 + size_of::<ClientState>().next_multiple_of(8);
    let maps = maps_memlock()?;
    let total: u64 = maps.iter().map(|m| m.2).sum();

    let mut md = String::new();
    writeln!(md, "# XDP benchmark\n")?;
    writeln!(md, "- Date: {}", date())?;
    writeln!(md, "- Machine: {}", machine())?;
    writeln!(
        md,
        "- Repeat: {n} runs per call ({CYCLE_CLIENTS} for the cycling cases), hot-client cases in {ROUNDS} interleaved rounds; client map capacity {MAX_CLIENTS}\n"
    )?;
    writeln!(
        md,
        "| Case | ns/packet | over baseline (ns): median (range) | ratio | wall ns/packet | runs |"
    )?;
    writeln!(md, "|---|---:|---:|---:|---:|---:|")?;
    for r in &rows {
        let over = match r.over {
            None => "—".to_string(),
            Some((median, lo, hi)) if lo < hi => format!("{median:+.0} ({lo:+.0}..{hi:+.0})"),
            Some((median, _, _)) => format!("{median:+.0}"),
        };
        let ratio = if baseline > 0.0 {
            format!("{:.2}×", r.ns / baseline)
        } else {
            "—".into()
        };
        writeln!(
            md,
            "| {} | {:.0} | {over} | {ratio} | {:.1} | {} |",
            r.case, r.ns, r.wall_ns, r.repeat
        )?;
    }
    let worst_hot = rows
        .iter()
        .filter(|r| r.hot)
        .filter_map(|r| r.over.map(|o| o.0))
        .fold(f64::MIN, f64::max);
    let verdict = |ok: bool| if ok { "met" } else { "**not met**" };
    writeln!(md)?;
    writeln!(
        md,
        "Target ≤ {TARGET_NS_OVER_BASELINE:.0} ns/packet over baseline for a single hot client: worst hot case (median of {ROUNDS} rounds) {worst_hot:+.0} ns, {}.",
        verdict(worst_hot <= TARGET_NS_OVER_BASELINE)
    )?;
    writeln!(
        md,
        "Cycling: the first pass inserted {inserted} clients, the second {reinserted} (0 means all 1M stayed resident); {resident} entries resident at the end; map_full {}, contended {}.\n",
        global.map_full, global.contended
    )?;
    writeln!(md, "## Map memory\n")?;
    writeln!(
        md,
        "CLIENTS: memlock {clients_memlock} bytes ({}) for {clients_max} entries = **{per_client:.3} bytes per client**; target ≤ {TARGET_BYTES_PER_CLIENT:.0}, {}. Per entry {per_entry} bytes (the {}-byte value, the 16-byte key, the kernel's 48-byte element header and 16-byte hash bucket); the map's fixed part is {} bytes.\n",
        mib(clients_memlock),
        verdict(per_client <= TARGET_BYTES_PER_CLIENT),
        size_of::<ClientState>(),
        clients_memlock as i64 - (per_entry as i64 * clients_max as i64)
    )?;
    writeln!(md, "| Map | max entries | memlock | bytes/entry |")?;
    writeln!(md, "|---|---:|---:|---:|")?;
    for (name, max, memlock) in &maps {
        writeln!(
            md,
            "| {name} | {max} | {memlock} | {:.1} |",
            *memlock as f64 / (*max).max(1) as f64
        )?;
    }
    writeln!(md, "| **all maps** | | {total} ({}) | |", mib(total))?;
    writeln!(md, "\n## How measured\n")?;
    writeln!(
        md,
        "Each case is one BPF_PROG_TEST_RUN call on a {}-byte IPv4/UDP frame with the given repeat count, \
         on CPU 0, with private (unpinned) maps and `default: {{ limit: 4294967295, window: 1h }}` \
         (the dropping client has `limit: 1`, the allow-listed one `action: pass`). ns/packet is the kernel's own per-run average (whole \
         nanoseconds, so ±1 ns); the hot-client cases run in {ROUNDS} interleaved rounds, each with its own \
         baseline call, and report their medians (cost over the baseline: the median of the per-round \
         differences, with their range); wall ns/packet divides the whole call's wall-clock time, which adds the \
         call's fixed overhead, by the runs. The baseline (`limiter_baseline`) parses the frame and bumps a \
         per-CPU counter; the hot-client cases run `limiter` on one source; the cycling cases run \
         `limiter_bench_cycle`, the real decision path with the source taken from a per-CPU counter over \
         1,000,000 addresses, so the first call inserts 1M clients and the second finds each resident \
         (their working set is far beyond the CPU caches). Memory is the kernel's `memlock` accounting \
         from /proc/self/fdinfo. Run with `cargo xtask bench [-- --repeat N --write FILE]`.",
        hot.len()
    )?;

    print!("{md}");
    if let Some(path) = &args.write {
        std::fs::write(path, &md).with_context(|| format!("writing {path}"))?;
        eprintln!("wrote {path}");
    }
    Ok(())
}
