//! Cluster sync at scale, in the simulation of [`crate::cluster_sim`] (the real membership and
//! enrolment code of every member, virtual time): for 1k, 10k and 100k hot clients, what each
//! member sends per sync interval and per second, its CPU time per round, how long a demand
//! change at one member takes until the cuts and raises it causes are in force everywhere, and
//! the accuracy of the split. `cargo xtask bench` runs it.
//!
//! Usage: `cluster-bench [--clients 1000,10000,100000] [--nodes 50,50,5] [--seconds 2]
//! [--samples 200] [--write FILE]`

use std::{fmt::Write as _, time::Duration};

use anyhow::{Context as _, Result, ensure};

use super::report::{date, machine};
use crate::cluster_sim::{Accuracy, Config, Cost, Demand, Sim, Views, skewed};

/// `cluster-bench [--clients H,...] [--nodes N,...] [--seconds S] [--samples K] [--write FILE]`.
#[derive(clap::Parser)]
#[command(about = "Cluster sync at scale (simulated): bytes, entries, CPU and change latency")]
pub struct Args {
    /// Hot clients of each run.
    #[arg(long, value_delimiter = ',', default_value = "1000,10000,100000")]
    pub clients: Vec<usize>,
    /// Members of each run (one per `--clients` entry; the last repeats). What a member sends
    /// and spends per round does not depend on the member count but for heartbeats; the
    /// simulation's own cost grows with members × clients (10k clients on 50 members: about
    /// a minute per simulated second), hence fewer members for 100k.
    #[arg(long, value_delimiter = ',', default_value = "50,50,5")]
    pub nodes: Vec<usize>,
    /// Seconds of steady state measured.
    #[arg(long, default_value_t = 2)]
    pub seconds: u64,
    /// Clients whose demand changes, for the change latency.
    #[arg(long, default_value_t = 200)]
    pub samples: usize,
    /// Also write the report (markdown) to FILE.
    #[arg(long, value_name = "FILE")]
    pub write: Option<String>,
}

struct Run {
    clients: usize,
    nodes: usize,
    accuracy: Accuracy,
    cost: Cost,
    /// From a demand change at one member until in force everywhere: a member's packets up
    /// (the one with 5% gets 16×), and down (the one with 80% gets a 16th).
    up: Vec<Duration>,
    down: Vec<Duration>,
    checks: u64,
    violations: u64,
    /// Member 0's enrolment state at the end: its heap bytes (`None`: the counting allocator
    /// is not installed), and the clients it held and owned.
    heap: Option<usize>,
    held: u64,
    owned: u64,
    wall: Duration,
}

/// One run: every client turns hot at 3·L spread 80/15/5 over three members, enrolment
/// settles, `seconds` are measured; then `samples` clients see a demand change at one member,
/// spread over one second (every other one up: the member with 5% gets 16× its packets; the
/// others down: the member with 80% gets a 16th), and each is followed until every member's
/// limit is within 5% of where it ends.
fn run_one(clients: usize, nodes: usize, seconds: u64, samples: usize) -> Run {
    let started = std::time::Instant::now();
    let mut cfg = Config::new(nodes, clients);
    // Steady state: membership changes nothing (and its O(N) per heartbeat is not enrolment's).
    cfg.views = Views::Fixed;
    let mut sim = Sim::new(cfg);
    let limit = sim.config().limit;
    sim.run_for(Duration::from_millis(200));
    for c in 0..clients {
        let demand = skewed(sim.rng(), nodes, limit);
        sim.set_demand(c, demand);
    }
    // Hot at once, enrolled, a learning lease (1 s), a window for the demand estimates.
    sim.run_for(Duration::from_secs(3));
    sim.start_measuring();
    sim.run_for(Duration::from_secs(seconds));
    let (accuracy, cost) = sim.stop_measuring();
    eprintln!(
        "cluster-bench: {clients} clients on {nodes} members measured ({:.0} s wall)",
        started.elapsed().as_secs_f64()
    );
    let picked: Vec<usize> = {
        let rng = sim.rng();
        (0..samples.min(clients))
            .map(|_| rng.below(clients as u64) as usize)
            .collect()
    };
    let mut changed: Vec<(usize, bool)> = Vec::new();
    let step = Duration::from_secs(1) / samples.max(1) as u32;
    for c in picked {
        if changed.iter().any(|&(d, _)| d == c) {
            continue;
        }
        sim.run_for(step);
        let before = sim.demand(c).clone();
        let mut at = before.at.clone();
        let up = changed.len().is_multiple_of(2);
        if up {
            at[2].1 *= 16.0;
        } else {
            at[0].1 /= 16.0;
        }
        let demand = Demand {
            rate: before.rate,
            at,
        };
        sim.track(c);
        sim.set_demand(c, demand);
        changed.push((c, up));
    }
    // The demand estimate takes a window to follow; then a few sync intervals.
    sim.run_for(Duration::from_secs(3));
    let (mut up, mut down) = (Vec::new(), Vec::new());
    for &(c, increase) in &changed {
        if let Some(settled) = sim.settled_after(c, 0.05) {
            if increase { &mut up } else { &mut down }.push(settled);
        }
    }
    up.sort();
    down.sort();
    let (checks, _) = sim.checks();
    let (_, violations) = sim.violations();
    // What member 0's enrolment state holds on the heap: the bytes freed when it is dropped.
    let counts = sim.counts(0);
    let enrolment = sim.take_enrolment(0);
    let before = crate::heap::in_use();
    drop(enrolment);
    let heap = (before > 0).then(|| before.saturating_sub(crate::heap::in_use()));
    Run {
        clients,
        nodes,
        accuracy,
        cost,
        up,
        down,
        checks,
        violations,
        heap,
        held: counts.held,
        owned: counts.owned,
        wall: started.elapsed(),
    }
}

fn quantile(sorted: &[Duration], q: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    sorted[((sorted.len() - 1) as f64 * q).round() as usize]
}

fn kib(bytes: f64) -> String {
    if bytes >= 1024.0 * 1024.0 {
        format!("{:.1} MiB", bytes / (1024.0 * 1024.0))
    } else {
        format!("{:.1} KiB", bytes / 1024.0)
    }
}

/// Runs the benchmark and prints (and with `--write` writes) the report.
pub fn run(args: &Args) -> Result<()> {
    let mut runs = Vec::new();
    for (k, &clients) in args.clients.iter().enumerate() {
        let nodes = *args
            .nodes
            .get(k)
            .or(args.nodes.last())
            .context("--nodes is empty")?;
        runs.push(run_one(clients, nodes, args.seconds, args.samples));
    }
    let cfg = Config::new(1, 1);
    let sync_ms = cfg.sync.as_secs_f64() * 1e3;
    let mut out = String::new();
    writeln!(out, "## Cluster sync (simulated)\n")?;
    writeln!(
        out,
        "`cluster-bench`: the cluster simulation (`limiter_tests::cluster_sim`): every member \
         runs the agent's membership and enrolment code (`limiter_user::cluster`) on its own \
         clock (±{} ppm, random offsets and phases), over links of {:?}–{:?} one way (+ up to \
         {:?}), sync interval {:?}, peer timeout (= lease) {:?}, windows of {:?}, L = 100 per \
         member. Each hot client gets 3·L spread 80/15/5 over three members. Bytes are the \
         prost encodings of `proto/cluster.proto` (heartbeats, their answers, and the reports \
         and grants they carry), without gRPC, HTTP/2, TLS and TCP framing. CPU is the \
         simulating thread's time (CLOCK_THREAD_CPUTIME_ID) in one member's enrolment round \
         plus taking in the messages that came since its last round. The enrolment state is \
         the heap one member's `Enrolment` (what it holds and owns, with their histories) \
         frees when dropped at the end of the run, counted by a counting allocator. The change latency is \
         from a demand change at one member (up: its 5% share of a client's packets grows 16×; \
         down: its 80% share shrinks to a 16th) until every member's limit in force is within \
         5% of where it ends, for {} clients changed one after the other over a second.\n",
        cfg.drift_ppm,
        cfg.delay.0,
        cfg.delay.1,
        cfg.jitter,
        cfg.sync,
        cfg.peer_timeout,
        cfg.window,
        args.samples
    )?;
    writeln!(out, "Machine: {}. Date: {}.\n", machine(), date())?;
    writeln!(
        out,
        "| hot clients | members | entries / round / member | bytes / s / member (of which enrolment) | bytes / round / member | CPU / round / member, mean (p99) | enrolment state / member (per held client) | in force everywhere after a change up, p50 / p99 | after a change down, p50 / p99 | accuracy median (min) | Σ > L |"
    )?;
    writeln!(
        out,
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"
    )?;
    let latency = |sorted: &[Duration]| {
        let (p50, p99) = (quantile(sorted, 0.5), quantile(sorted, 0.99));
        format!(
            "{:.0} / {:.0} ms ({:.1} / {:.1} intervals)",
            p50.as_secs_f64() * 1e3,
            p99.as_secs_f64() * 1e3,
            p50.as_secs_f64() * 1e3 / sync_ms,
            p99.as_secs_f64() * 1e3 / sync_ms,
        )
    };
    for r in &runs {
        let heap = match r.heap {
            Some(bytes) => format!(
                "{} ({:.0} bytes; {} held, {} owned)",
                kib(bytes as f64),
                bytes as f64 / r.held.max(1) as f64,
                r.held,
                r.owned
            ),
            None => "—".to_string(),
        };
        writeln!(
            out,
            "| {} | {} | {:.0} | {}/s ({}/s) | {} | {:.2} ms ({:.2} ms) | {heap} | {} | {} | {:.3} ({:.3}) | {} of {} checks |",
            r.clients,
            r.nodes,
            r.cost.entries_per_round,
            kib(r.cost.bytes_per_second),
            kib(r.cost.enrolment_bytes_per_second),
            kib(r.cost.bytes_per_round),
            r.cost.cpu_mean.as_secs_f64() * 1e3,
            r.cost.cpu_p99.as_secs_f64() * 1e3,
            latency(&r.up),
            latency(&r.down),
            r.accuracy.median,
            r.accuracy.min,
            r.violations,
            r.checks,
        )?;
    }
    let heartbeat = runs
        .iter()
        .map(|r| {
            format!(
                "{:.0} bytes at {} members",
                r.cost.heartbeat_bytes_per_round, r.nodes
            )
        })
        .collect::<Vec<_>>()
        .join(", ");
    writeln!(
        out,
        "\nEvery live member is enrolled for every hot client, but rounds carry news: the \
         three members a client sends to report every round and get the grants that change; \
         the others exchange a keepalive each way per half lease (10 rounds here), so a member \
         sends about 0.2 entries per hot client per round, less as the member count grows \
         (sending every entry every round was 2); heartbeats and their answers add O(members) \
         per round ({heartbeat}). \
         A member's demand is its packets over the last policy window, sampled each round: a \
         rise past the fair level shows within a fraction of a window, then the owner's next \
         round cuts the others and raises the member once the cuts are acknowledged; a fall \
         shows only as the window slides past, so a cut takes up to a window. The simulation \
         does not charge the CPU time to the members: a member whose round takes longer than \
         the sync interval would fall behind. Simulation wall time: {}.\n",
        runs.iter()
            .map(|r| format!("{:.0} s", r.wall.as_secs_f64()))
            .collect::<Vec<_>>()
            .join(", ")
    )?;
    print!("{out}");
    if let Some(path) = &args.write {
        std::fs::write(path, &out).with_context(|| format!("writing {path}"))?;
    }
    for r in &runs {
        ensure!(
            r.violations == 0,
            "{} clients on {} members: the limits in force summed above L {} times",
            r.clients,
            r.nodes,
            r.violations
        );
    }
    Ok(())
}
