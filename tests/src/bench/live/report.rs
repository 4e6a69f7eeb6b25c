//! The live benchmark's report: its section of BENCHMARKS.md.

use std::fmt::Write as _;

use anyhow::Result;

use super::{
    Args, Case, GENERATOR_CPU, LIMIT, NFT_BIG_SIZE, NFT_DEFAULT_SIZE, RECEIVER_CPU, Run,
    TARGET_VS_COUNTER, TARGET_VS_NFT, WARM_UP, WARM_UP_CAP, WARM_UP_PASSES, WINDOW_S, cases,
    median, spread,
};
use crate::bench::report::{date, machine};

/// The section's heading, date and machine.
fn heading() -> Result<String> {
    let mut md = String::new();
    writeln!(md, "## Live traffic against nftables\n")?;
    writeln!(md, "- Date: {}", date())?;
    writeln!(md, "- Machine: {}", machine())?;
    Ok(md)
}

/// The section on a machine whose kernel cannot generate the traffic (`why`).
pub(super) fn not_measured(why: &str) -> Result<String> {
    let mut md = heading()?;
    writeln!(md, "\nNot measured on this machine: {why}.")?;
    Ok(md)
}

/// The report of the measured rounds.
pub(super) fn report(
    args: &Args,
    runs: &[Vec<Vec<Run>>],
    load_before: &str,
    load_after: &str,
) -> Result<String> {
    let mut md = heading()?;
    writeln!(
        md,
        "- Load average (/proc/loadavg) before: {load_before}; after: {load_after}"
    )?;
    writeln!(
        md,
        "- `live-bench --rounds {} --seconds {}`: 60-byte UDP frames (64 on the wire) from N \
         distinct IPv4 sources, generated with BPF_PROG_TEST_RUN's live frames on CPU {GENERATOR_CPU} \
         into a veth pair as fast as the generator can; the receiving veth's threaded NAPI (XDP, \
         the stack, netfilter) pinned to CPU {RECEIVER_CPU}, with the agent. Every case limits \
         each source to {LIMIT} packet per {WINDOW_S} s, so nearly every frame is over the \
         limit; each run starts from fresh state, warms up (at least {:.1} s, at most {} s) until \
         the receiver has processed {WARM_UP_PASSES} frames per source, so that nearly every \
         source has sent before, then measures for {} s. Medians (ranges) of the interleaved rounds.",
        args.rounds,
        args.seconds,
        WARM_UP.as_secs_f64(),
        WARM_UP_CAP.as_secs(),
        args.seconds
    )?;
    writeln!(
        md,
        "- ns/packet: the NAPI thread's CPU time over the frames it processed; drops/CPU-s: \
         frames the case dropped per second of that CPU time; dropped: the share of processed \
         frames dropped. The agent's own process CPU (its loops, from clock ticks) is listed \
         apart.\n"
    )?;
    let (program_head, program_rule) = if args.program_time {
        (" in the XDP program, ns/run |", "---:|")
    } else {
        ("", "")
    };
    writeln!(
        md,
        "| Sources | Receiver | ns/packet | M drops per CPU-second | dropped | processed (M) | \
         agent process ns/packet |{program_head}"
    )?;
    writeln!(md, "|---:|---|---:|---:|---:|---:|---:|{program_rule}")?;
    for (si, &sources) in args.sources.iter().enumerate() {
        for (ci, case) in cases(sources).into_iter().enumerate() {
            let r = &runs[si][ci];
            let ns: Vec<f64> = r.iter().map(Run::ns_per_packet).collect();
            let dps: Vec<f64> = r.iter().map(|r| r.drops_per_cpu_second() / 1e6).collect();
            let frac: Vec<f64> = r
                .iter()
                .map(|r| 100.0 * r.dropped as f64 / r.processed.max(1) as f64)
                .collect();
            let processed: Vec<f64> = r.iter().map(|r| r.processed as f64 / 1e6).collect();
            let agent = if case == Case::Limiter {
                let v: Vec<f64> = r
                    .iter()
                    .map(|r| r.agent_cpu_ns as f64 / r.processed.max(1) as f64)
                    .collect();
                spread(&v, 1)
            } else {
                "–".into()
            };
            let program = if args.program_time {
                let v: Vec<f64> = r
                    .iter()
                    .map(|r| r.program.map_or(0.0, |(ns, n)| ns as f64 / n.max(1) as f64))
                    .collect();
                format!(" {} |", spread(&v, 0))
            } else {
                String::new()
            };
            writeln!(
                md,
                "| {sources} | {} | {} | {} | {}% | {} | {agent} |{program}",
                case.name(),
                spread(&ns, 0),
                spread(&dps, 2),
                spread(&frac, 1),
                spread(&processed, 2)
            )?;
        }
    }
    let index = |sources: u32, case: Case| -> Option<(usize, usize)> {
        let si = args.sources.iter().position(|&s| s == sources)?;
        let ci = cases(sources).iter().position(|&c| c == case)?;
        Some((si, ci))
    };
    let rounds = |sources: u32, case: Case| -> Option<&Vec<Run>> {
        index(sources, case).map(|(si, ci)| &runs[si][ci])
    };
    writeln!(md, "\n### Targets\n")?;
    // Per-round ratios: the cases of a round ran back to back.
    let ratios = |a: &[Run], b: &[Run], f: fn(&Run) -> f64| -> Vec<f64> {
        a.iter().zip(b).map(|(a, b)| f(a) / f(b)).collect()
    };
    for &sources in &args.sources {
        let (Some(lim), Some(nft), Some(counter), Some(floor)) = (
            rounds(sources, Case::Limiter),
            rounds(sources, Case::Nft(NFT_BIG_SIZE)),
            rounds(sources, Case::Counter),
            rounds(sources, Case::XdpDrop),
        ) else {
            continue;
        };
        let vs_nft = ratios(lim, nft, Run::drops_per_cpu_second);
        let vs_counter = ratios(lim, counter, Run::ns_per_packet);
        let over_floor: Vec<f64> = lim
            .iter()
            .zip(floor)
            .map(|(l, f)| l.ns_per_packet() - f.ns_per_packet())
            .collect();
        let mut line = format!(
            "- {sources} sources: limiter drops {}× the frames per CPU-second of the nftables \
             meter",
            spread(&vs_nft, 2)
        );
        if sources <= 100_000 {
            let met = median(&vs_nft) >= TARGET_VS_NFT;
            write!(
                line,
                " (target ≥ {TARGET_VS_NFT}×: {})",
                if met { "met" } else { "MISSED" }
            )?;
        }
        write!(
            line,
            "; costs {}× the minimal counter",
            spread(&vs_counter, 2)
        )?;
        if sources >= 100_000 {
            let met = median(&vs_counter) <= TARGET_VS_COUNTER;
            write!(
                line,
                " (target ≤ {TARGET_VS_COUNTER}×: {})",
                if met { "met" } else { "MISSED" }
            )?;
        }
        write!(
            line,
            "; {} ns/packet over the XDP_DROP floor",
            spread(&over_floor, 0)
        )?;
        if let Some(touch) = rounds(sources, Case::XdpTouch) {
            let over: Vec<f64> = lim
                .iter()
                .zip(touch)
                .map(|(l, t)| l.ns_per_packet() - t.ns_per_packet())
                .collect();
            write!(
                line,
                " and {} over the floor that reads the source",
                spread(&over, 0)
            )?;
        }
        writeln!(md, "{line}.")?;
    }
    for &sources in &args.sources {
        for case in [Case::Nft(NFT_BIG_SIZE), Case::Nft(NFT_DEFAULT_SIZE)] {
            let (Some(nft), Some(counter)) =
                (rounds(sources, case), rounds(sources, Case::Counter))
            else {
                continue;
            };
            if sources <= NFT_DEFAULT_SIZE && case == Case::Nft(NFT_DEFAULT_SIZE) {
                continue;
            }
            let share: Vec<f64> = nft
                .iter()
                .zip(counter)
                .map(|(n, c)| {
                    let frac = |r: &Run| r.dropped as f64 / r.processed.max(1) as f64;
                    100.0 * frac(n) / frac(c).max(f64::MIN_POSITIVE)
                })
                .collect();
            if sources > NFT_DEFAULT_SIZE {
                writeln!(
                    md,
                    "- {sources} sources, {}: drops {}% of the share the minimal counter drops.",
                    case.name(),
                    spread(&share, 0)
                )?;
            }
        }
    }
    Ok(md)
}
