//! The markdown report: the measured rows and the section `cargo xtask bench` writes.

use std::fmt::Write as _;

use anyhow::Result;

use super::load::LoadReport;
use super::placement::{GENERATOR_CPU, Placement, SERVICE_CPU};
use super::run::{RLS_AGENT, RLS_REDIS};
use super::{
    BATCH, BATCH_CONCURRENCY, IdKind, LIMIT, LIMITER_ADDR, Mode, Only, REDIS_CELL_VERSION,
    RLS_ADDR, RLS_CONCURRENCY, RLS_DOMAIN, RLS_REDIS_ADDR, RunArgs, STREAMS_PER_CONNECTION,
    TARGET_BATCH_OVER_FLOOR, TARGET_BATCH_OVER_REDIS, TARGET_RLS_OVER_REDIS, TARGET_RLS_P99_US,
    TARGET_UNARY_OVER_FLOOR, UNARY_CONCURRENCY, WINDOW,
};

/// The governor floor's rows.
const FLOOR: &str = "governor floor";
use crate::bench::report::machine;

/// One measurement of one case.
#[derive(Clone, Debug)]
pub(super) struct Measurement {
    pub(super) calls_per_s: Option<f64>,
    pub(super) decisions_per_s: f64,
    pub(super) p50_us: f64,
    pub(super) p99_us: f64,
    /// Share of the decisions that were denials (gRPC only).
    pub(super) denied: Option<f64>,
    /// Failed calls (gRPC only).
    pub(super) errors: Option<u64>,
}

impl From<&LoadReport> for Measurement {
    fn from(report: &LoadReport) -> Measurement {
        Measurement {
            calls_per_s: Some(report.calls_per_s()),
            decisions_per_s: report.decisions_per_s(),
            p50_us: report.p50_us,
            p99_us: report.p99_us,
            denied: Some(report.denied as f64 / report.decisions.max(1) as f64),
            errors: Some(report.errors),
        }
    }
}

/// One row of the report: a system and a case, measured once per round.
pub(super) struct Row {
    pub(super) system: String,
    pub(super) placement: Placement,
    /// The gRPC case; `None` for redis-benchmark rows.
    pub(super) case: Option<(Mode, usize)>,
    pub(super) call: &'static str,
    pub(super) in_flight: String,
    pub(super) rounds: Vec<Measurement>,
}

impl Row {
    pub(super) fn grpc(system: &str, placement: Placement, mode: Mode, concurrency: usize) -> Row {
        Row {
            system: system.to_owned(),
            placement,
            case: Some((mode, concurrency)),
            call: match mode {
                Mode::Unary => "Check",
                Mode::Batch => "CheckBatch ×100",
                Mode::Rls => "ShouldRateLimit",
            },
            in_flight: match mode {
                Mode::Unary | Mode::Rls => concurrency.to_string(),
                Mode::Batch => format!("{concurrency} × {BATCH}"),
            },
            rounds: Vec::new(),
        }
    }

    /// The round with the median decisions/s (the lower of the two middle ones for an even
    /// count); `None` before the first round.
    pub(super) fn median(&self) -> Option<&Measurement> {
        let mut sorted: Vec<&Measurement> = self.rounds.iter().collect();
        sorted.sort_by(|a, b| a.decisions_per_s.total_cmp(&b.decisions_per_s));
        sorted.get(sorted.len().saturating_sub(1) / 2).copied()
    }

    /// Lowest and highest decisions/s over the rounds.
    pub(super) fn spread(&self) -> (f64, f64) {
        self.rounds
            .iter()
            .fold((f64::INFINITY, 0.0_f64), |(lo, hi), m| {
                (lo.min(m.decisions_per_s), hi.max(m.decisions_per_s))
            })
    }
}

/// The rows, in report order.
pub(super) struct Rows(pub(super) Vec<Row>);

impl Rows {
    pub(super) fn get_mut(
        &mut self,
        system: &str,
        placement: Placement,
        mode: Mode,
        concurrency: usize,
    ) -> Option<&mut Row> {
        self.0.iter_mut().find(|r| {
            r.system == system && r.placement == placement && r.case == Some((mode, concurrency))
        })
    }

    /// The median measurement of a gRPC case.
    pub(super) fn median(
        &self,
        system: &str,
        placement: Placement,
        mode: Mode,
        concurrency: usize,
    ) -> Option<&Measurement> {
        self.0
            .iter()
            .find(|r| {
                r.system == system
                    && r.placement == placement
                    && r.case == Some((mode, concurrency))
            })
            .and_then(Row::median)
    }
}

pub(super) struct ReportInput<'a> {
    pub(super) args: &'a RunArgs,
    /// The placements measured, the one the targets are read from first.
    pub(super) placements: &'a [Placement],
    pub(super) date: String,
    pub(super) load_before: String,
    pub(super) rows: &'a Rows,
    /// Why the limiter was not measured.
    pub(super) limiter: Option<&'a str>,
    /// Why redis-cell was not measured.
    pub(super) redis: Option<&'a str>,
    /// redis-cell's pipelined decisions/s by placement.
    pub(super) redis_pipelined: Vec<(Placement, f64)>,
    pub(super) denied_case: bool,
    /// The rate limit services' ~50% denied rows were measured.
    pub(super) rls_denied_case: bool,
}

pub(super) fn thousands(value: f64) -> String {
    let digits = format!("{:.0}", value.max(0.0));
    let mut out = String::new();
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i) % 3 == 0 {
            out.push(',');
        }
        out.push(c);
    }
    out
}

pub(super) fn latency(us: f64) -> String {
    if us < 1000.0 {
        format!("{us:.0} µs")
    } else {
        format!("{:.2} ms", us / 1e3)
    }
}

pub(super) fn mark(ok: bool) -> &'static str {
    if ok { "PASS" } else { "**MISS**" }
}

pub(super) fn report(input: &ReportInput<'_>) -> Result<String> {
    let args = input.args;
    let mut md = String::new();
    writeln!(md, "## gRPC API\n")?;
    writeln!(md, "- Date: {}", input.date)?;
    writeln!(md, "- Machine: {}", machine())?;
    writeln!(
        md,
        "- Load average before the run: {}",
        input
            .load_before
            .split_whitespace()
            .take(3)
            .collect::<Vec<_>>()
            .join(" ")
    )?;
    writeln!(
        md,
        "- Each case: {} interleaved rounds of {:.1} s warm-up and {:.1} s measured, reported by \
         its median round (spread: the lowest and highest round); {} distinct client IDs, one \
         drawn uniformly at random per check; every system limits each client to {} per {:?}, \
         so every check is allowed unless the row says otherwise\n",
        args.rounds,
        args.warmup.as_secs_f64(),
        args.duration.as_secs_f64(),
        args.ids,
        thousands(LIMIT as f64),
        WINDOW
    )?;
    if args.only == Some(Only::Rls) {
        writeln!(
            md,
            "Partial run (`api-bench run --only rls`): the rate limit service rows, and the \
             governor floor's Check at {RLS_CONCURRENCY} in flight for scale; no redis-cell and \
             no limiter.v1 rows.\n"
        )?;
    }
    writeln!(
        md,
        "| System | CPUs | Call | In flight | calls/s | decisions/s | spread | p50 | p99 | denied | errors |"
    )?;
    writeln!(md, "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|")?;
    for row in &input.rows.0 {
        let Some(m) = row.median() else { continue };
        let (lo, hi) = row.spread();
        let errors: Option<u64> = row.rounds.iter().map(|m| m.errors).sum();
        writeln!(
            md,
            "| {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} |",
            row.system,
            row.placement.as_str(),
            row.call,
            row.in_flight,
            m.calls_per_s.map_or("—".into(), thousands),
            thousands(m.decisions_per_s),
            if row.rounds.len() > 1 {
                format!("{}–{}", thousands(lo), thousands(hi))
            } else {
                "one round".into()
            },
            latency(m.p50_us),
            latency(m.p99_us),
            m.denied
                .map_or("—".into(), |d| format!("{:.1}%", 100.0 * d)),
            errors.map_or("—".into(), |e| e.to_string()),
        )?;
    }
    if let Some(reason) = input.limiter {
        writeln!(md, "\nThe limiter was not measured: {reason}.")?;
    }
    if let Some(reason) = input.redis {
        writeln!(md, "\nredis-cell was not measured: {reason}.")?;
    }

    writeln!(
        md,
        "\nTargets (medians, every ratio from this run{}):\n",
        if input.placements.len() > 1 {
            "; each with the processes isolated, then sharing the CPUs"
        } else {
            ""
        }
    )?;
    writeln!(md, "| Target | CPUs | limiter | baseline | ratio | |")?;
    writeln!(md, "|---|---|---:|---:|---:|---|")?;
    for &placement in input.placements {
        targets(&mut md, input, placement)?;
    }
    for &placement in input.placements {
        // How far any service could go here: the governor floor answers limiter.v1 with a
        // decision that costs nearly nothing, through the same tonic stack and load generator.
        if let (Some(floor), Some(redis)) = (
            input
                .rows
                .median(FLOOR, placement, Mode::Unary, RLS_CONCURRENCY),
            input
                .rows
                .median(RLS_REDIS, placement, Mode::Rls, RLS_CONCURRENCY),
        ) {
            writeln!(
                md,
                "\nFor scale ({} CPUs): the governor floor's Check at {RLS_CONCURRENCY} in flight, \
                 a decision costing next to nothing behind tonic's default multi-threaded \
                 runtime, makes {} calls/s, {:.2}× the Redis-backed service's, with a p99 of {}.",
                placement.as_str(),
                thousands(floor.decisions_per_s),
                floor.decisions_per_s / redis.decisions_per_s,
                latency(floor.p99_us),
            )?;
        }
    }
    for &placement in input.placements {
        rls_side_by_side(&mut md, input.rows, placement)?;
    }

    writeln!(md, "\n### How measured\n")?;
    let denied_rows = if input.denied_case {
        "The ~50% denied rows reload the agent with `10.128.0.0/9` limited to 1 per hour, so \
         once warmed up the upper half of the addresses is over its limit. "
    } else {
        ""
    };
    writeln!(
        md,
        "Everything runs on one machine inside one fresh network namespace, over its loopback: \
         the agent (`limiter agent --api-listen {LIMITER_ADDR} --api-token-file FILE`, attached \
         to a veth in the namespace, `default: {{ limit: {LIMIT}, window: {window}s }}`), the \
         gRPC floor (`api-bench floor-server`: the same `limiter.v1.RateLimiter` service in \
         tonic with default settings, deciding with the `governor` crate's keyed GCRA limiter — \
         DashMap state, default clock, the same limit — and filling allowed, limit, remaining, \
         reset_after, retry_after, window; no authentication) and Debian's `redis-server` with \
         the redis-cell {REDIS_CELL_VERSION} module (built from its crates.io source, the only \
         release there), persistence off. gRPC load comes from `api-bench load` in the same \
         namespace: a closed loop with a fixed number of calls in flight over one HTTP/2 \
         connection per {STREAMS_PER_CONNECTION} of them (tokio, one worker thread per CPU); \
         calls to the agent carry `authorization: Bearer TOKEN`. A call counts if it completes \
         inside the measured window; its latency runs from sending the request to decoding the \
         response (hdrhistogram, 3 significant digits). Address IDs are IPv4 addresses spread \
         over 10.0.0.0/8, name IDs are `tenant-N`; the floor is measured with address IDs (to \
         governor both are opaque strings). {denied_rows}redis-cell is driven by \
         `redis-benchmark -c {BATCH_CONCURRENCY} -P {BATCH} -r {ids} CL.THROTTLE \
         key:__rand_int__ {burst} {LIMIT} {window} 1` (and `-P 1` for reference) after a \
         100,000-request warm-up that sizes each measured run to about {seconds:.0} s; its \
         latency is per command as redis-benchmark reports it, which for a pipeline is the \
         pipeline's round trip. {placements}Run with `cargo xtask bench`, or as root `api-bench run [--rounds 3 \
         --duration 2s --warmup 500ms --ids N --only rls --write FILE]` (`--only rls`: the \
         rate limit service rows alone).",
        window = WINDOW.as_secs(),
        placements = placements_text(input.placements),
        ids = args.ids,
        burst = LIMIT - 1,
        seconds = args.duration.as_secs_f64(),
    )?;
    let rls_denied = if input.rls_denied_case {
        " The ~50% denied rows send `/free/N` paths for odd N (limited to 1 per hour), so once \
         warmed up about half of the requests are over the limit; the agent then spends from \
         neither descriptor, the Redis-backed service increments the path's key and adds 0 to \
         the address's."
    } else {
        ""
    };
    writeln!(
        md,
        "\nThe rate limit service rows call `envoy.service.ratelimit.v3.RateLimitService/\
         ShouldRateLimit` (plaintext on loopback, as an Envoy on the same host calls it) in \
         domain `{RLS_DOMAIN}` with two descriptors per request, as Envoy's `remote_address` \
         and `generic_key` + `request_headers` actions send them: `(remote_address, ADDRESS)` \
         and `(generic_key, api), (path, /paid/N)`, ADDRESS and N drawn independently from \
         {ids} each; the config (envoyproxy/ratelimit's YAML) allows {limit} per second to \
         each address and each path. On the agent (`--rls-listen {RLS_ADDR} --rls-config \
         FILE`, served by `--rls-threads`' default, one thread per 2 CPUs) the address \
         descriptor is the address's client of the XDP path and the path \
         descriptor a named client: both are probed, then both spent, in one run of the \
         check program (two runs, a read and a spend, before 2026-12-05). envoyproxy/ratelimit \
         itself is written in Go and cannot be built here, so its algorithm runs as \
         `api-bench rls-redis-server` on {RLS_REDIS_ADDR}: the same service in tonic, the \
         agent's rule matcher, and its default Redis cache as in its `fixed_cache_impl.go`: \
         per request one pipelined round trip of `GET` of each descriptor's window key \
         (`DOMAIN_KEY_VALUE_..._WINDOWSTART`; a request of two or more descriptors reads them \
         first so that one over its limit leaves the others unspent), then one of `INCRBY` \
         and `EXPIRE` per descriptor, each request on a pooled connection of its own (the \
         `redis` crate, no implicit pipelining across requests, as its default), against the \
         same `redis-server`. What it leaves out of the Go service: the Go runtime and its gRPC \
         stack (here tonic's, as the agent's), stats, the local over-limit cache (off by \
         default) and the response headers.{rls_denied} The limiter.v1 Check rows above are \
         the same agent's other API, one check per call, for scale.",
        limit = thousands(LIMIT as f64),
        ids = thousands(args.ids as f64),
    )?;
    Ok(md)
}

/// How the cases were placed on the CPUs (see `placement`).
fn placements_text(placements: &[Placement]) -> String {
    // SAFETY: sysconf has no preconditions.
    let cpus = unsafe { libc::sysconf(libc::_SC_NPROCESSORS_ONLN) };
    if placements.len() < 2 {
        return format!(
            "Every server shares the machine's {cpus} CPUs with its load generator (CPUs \
             {GENERATOR_CPU} and {SERVICE_CPU}, which the isolated cases need, are not both \
             available here). "
        );
    }
    format!(
        "Every case is measured both ways in each round. Isolated: the load generator \
         (`api-bench load` or `redis-benchmark`) on CPU {GENERATOR_CPU}, the servers on CPU \
         {SERVICE_CPU} (the service under test, and the others, idle meanwhile), except the \
         Redis behind the Redis-backed rate limit service, which runs beside the generator (of \
         the two placements measured by hand, the one that gave that service more calls/s; a \
         Redis on another host would also cost it no CPU, but add a network round trip), while \
         for the redis-cell rows Redis is the service. Shared: every process may run on any of \
         the machine's {cpus} CPUs, and the scheduler places each service and its generator \
         together, so their turns on the same CPUs show in each other's figures. Each server is \
         started once, its threads sized for the whole machine (the floor and the Redis-backed \
         service run tonic's default runtime, a worker per CPU; the agent its own runtime, its \
         check lanes and `--rls-threads`' one thread per 2 CPUs), and moved between the \
         placements while it runs. The denial rows are measured once, isolated where the \
         machine has the CPUs for it. "
    )
}

/// One target's row: the limiter's rate and its baseline's (`None`: not measured), passed when
/// their ratio reaches `goal`.
fn ratio_row(
    md: &mut String,
    target: &str,
    cpus: &str,
    (limiter, baseline): (Option<f64>, Option<f64>),
    goal: f64,
) -> Result<()> {
    match (limiter, baseline) {
        (Some(limiter), Some(baseline)) => {
            let ratio = limiter / baseline;
            writeln!(
                md,
                "| {target} | {cpus} | {} | {} | {ratio:.2}× | {} |",
                thousands(limiter),
                thousands(baseline),
                mark(ratio >= goal)
            )?;
        }
        _ => writeln!(md, "| {target} | {cpus} | — | — | — | not measured |")?,
    }
    Ok(())
}

/// The targets' rows for the measurements of one placement.
fn targets(md: &mut String, input: &ReportInput<'_>, placement: Placement) -> Result<()> {
    let cpus = placement.as_str();
    let median =
        |system: &str, mode, concurrency| input.rows.median(system, placement, mode, concurrency);
    let v1_kinds: &[IdKind] = match input.args.only {
        Some(Only::Rls) => &[],
        None => &[IdKind::Address, IdKind::Name],
    };
    let redis_pipelined = input
        .redis_pipelined
        .iter()
        .find(|(p, _)| *p == placement)
        .map(|&(_, d)| d);
    let rate = |m: Option<&Measurement>| m.map(|m| m.decisions_per_s);
    for &id_kind in v1_kinds {
        let system = format!("limiter, {} IDs", id_kind.as_str());
        let ids = id_kind.as_str();
        let batch = rate(median(&system, Mode::Batch, BATCH_CONCURRENCY));
        ratio_row(
            md,
            &format!(
                "CheckBatch ≥ {TARGET_BATCH_OVER_REDIS}× redis-cell pipelined decisions/s, {ids} IDs"
            ),
            cpus,
            (batch, redis_pipelined),
            TARGET_BATCH_OVER_REDIS,
        )?;
        ratio_row(
            md,
            &format!(
                "CheckBatch ≥ {TARGET_BATCH_OVER_FLOOR}× the governor floor's decisions/s, {ids} IDs"
            ),
            cpus,
            (batch, rate(median(FLOOR, Mode::Batch, BATCH_CONCURRENCY))),
            TARGET_BATCH_OVER_FLOOR,
        )?;
        for concurrency in UNARY_CONCURRENCY {
            ratio_row(
                md,
                &format!(
                    "Check ≥ {TARGET_UNARY_OVER_FLOOR}× the governor floor's calls/s, {concurrency} in flight, {ids} IDs"
                ),
                cpus,
                (
                    rate(median(&system, Mode::Unary, concurrency)),
                    rate(median(FLOOR, Mode::Unary, concurrency)),
                ),
                TARGET_UNARY_OVER_FLOOR,
            )?;
        }
    }
    let rls = median(RLS_AGENT, Mode::Rls, RLS_CONCURRENCY);
    ratio_row(
        md,
        &format!(
            "ShouldRateLimit ≥ {TARGET_RLS_OVER_REDIS}× the Redis-backed service's calls/s, {RLS_CONCURRENCY} in flight"
        ),
        cpus,
        (
            rate(rls),
            rate(median(RLS_REDIS, Mode::Rls, RLS_CONCURRENCY)),
        ),
        TARGET_RLS_OVER_REDIS,
    )?;
    let target = format!(
        "ShouldRateLimit p99 < {} at {RLS_CONCURRENCY} in flight",
        latency(TARGET_RLS_P99_US)
    );
    match rls {
        Some(rls) => writeln!(
            md,
            "| {target} | {cpus} | {} | {} | | {} |",
            latency(rls.p99_us),
            latency(TARGET_RLS_P99_US),
            mark(rls.p99_us < TARGET_RLS_P99_US)
        )?,
        None => writeln!(md, "| {target} | {cpus} | — | — | — | not measured |")?,
    }
    Ok(())
}

/// ShouldRateLimit on the agent, on the Redis-backed service, and limiter.v1 Check, side by side
/// at each concurrency (calls/s, p50, p99), as measured in `placement`.
fn rls_side_by_side(md: &mut String, rows: &Rows, placement: Placement) -> Result<()> {
    let check = format!("limiter, {} IDs", IdKind::Address.as_str());
    let columns = [
        (RLS_AGENT, Mode::Rls, "limiter ShouldRateLimit"),
        (RLS_REDIS, Mode::Rls, "Redis-backed ShouldRateLimit"),
        (check.as_str(), Mode::Unary, "limiter.v1 Check"),
    ];
    if rows
        .0
        .iter()
        .all(|r| r.placement != placement || r.case.is_none_or(|(mode, _)| mode != Mode::Rls))
    {
        return Ok(());
    }
    writeln!(
        md,
        "\nShouldRateLimit side by side, {} CPUs (medians; calls/s, p50 / p99):\n",
        placement.as_str()
    )?;
    write!(md, "| In flight |")?;
    for (_, _, name) in columns {
        write!(md, " {name} |")?;
    }
    writeln!(md, " limiter / Redis-backed |")?;
    writeln!(md, "|---:|---:|---:|---:|---:|")?;
    for concurrency in UNARY_CONCURRENCY {
        write!(md, "| {concurrency} |")?;
        for (system, mode, _) in columns {
            match rows.median(system, placement, mode, concurrency) {
                Some(m) => write!(
                    md,
                    " {}, {} / {} |",
                    thousands(m.decisions_per_s),
                    latency(m.p50_us),
                    latency(m.p99_us)
                )?,
                None => write!(md, " — |")?,
            }
        }
        match (
            rows.median(RLS_AGENT, placement, Mode::Rls, concurrency),
            rows.median(RLS_REDIS, placement, Mode::Rls, concurrency),
        ) {
            (Some(a), Some(r)) => writeln!(md, " {:.2}× |", a.decisions_per_s / r.decisions_per_s)?,
            _ => writeln!(md, " — |")?,
        }
    }
    Ok(())
}
