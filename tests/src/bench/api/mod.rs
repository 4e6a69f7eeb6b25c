//! gRPC API benchmark: the agent's `limiter.v1.RateLimiter` (Check, CheckBatch) side by side with
//! two baselines measured in the same run, all over one network namespace's loopback:
//!
//! - the gRPC floor: a minimal tonic server answering the same service from the `governor`
//!   crate's keyed limiter (`api-bench floor-server`);
//! - Redis (Debian's `redis-server`) with the redis-cell module (`CL.THROTTLE`, built from its
//!   crates.io source under `target/bench/redis-cell/`), driven by `redis-benchmark`, pipelined.
//!
//! Subcommands:
//!
//! - `api-bench run [--write FILE]`: the whole benchmark as `cargo xtask bench` runs it (root:
//!   it creates network namespaces and starts the agent). Writes a markdown section.
//! - `api-bench floor-server --listen ADDR`: the governor floor server.
//! - `api-bench load --target http://ADDR [--token T] --concurrency N --duration D --mode
//!   unary|batch ...`: a closed-loop gRPC load generator; prints one JSON line.

use std::{
    fmt::Write as _,
    fs,
    io::{Read as _, Seek as _, SeekFrom, Write as _},
    net::{SocketAddr, TcpStream},
    num::NonZeroU32,
    os::unix::{fs::OpenOptionsExt as _, process::CommandExt as _},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail, ensure};
use clap::{Parser, Subcommand, ValueEnum};
use governor::{
    Quota,
    clock::{Clock as _, DefaultClock},
    middleware::StateInformationMiddleware,
    state::keyed::DefaultKeyedStateStore,
};
use hdrhistogram::Histogram;
use limiter_tests::{
    netns::{Agent, TestNet, agent_has_option, in_netns, limiter_bin},
    report::{date, machine, read_trimmed},
};
use limiter_user::proto::{
    Action, CheckBatchRequest, CheckBatchResponse, CheckRequest, CheckResponse,
    rate_limiter_client::RateLimiterClient,
    rate_limiter_server::{RateLimiter, RateLimiterServer},
};
use serde::{Deserialize, Serialize};
use tonic::{
    Request, Response, Status,
    metadata::{Ascii, MetadataValue},
    transport::{Channel, Endpoint, Server},
};

// ---------------------------------------------------------------------------------------------
// The benchmark's parameters
// ---------------------------------------------------------------------------------------------

/// Concurrencies (calls in flight) of the unary Check cases.
const UNARY_CONCURRENCY: [usize; 3] = [1, 16, 64];
/// Checks per CheckBatch call, and redis-benchmark's pipeline depth.
const BATCH: usize = 100;
/// CheckBatch calls in flight, and redis-benchmark's connections: 1,600 decisions in flight.
const BATCH_CONCURRENCY: usize = 16;
/// The load generator opens one HTTP/2 connection per this many calls in flight.
const STREAMS_PER_CONNECTION: usize = 16;
/// Most checks per CheckBatch the floor server accepts (the agent's default `--api-max-batch`).
const MAX_BATCH: usize = 1000;
/// Every system's limit per client: `LIMIT` per `WINDOW`, far above what one client is sent.
const LIMIT: u32 = 1_000_000;
const WINDOW: Duration = Duration::from_secs(1);
/// Where each server listens, on the namespace's loopback.
const LIMITER_ADDR: &str = "127.0.0.1:50051";
const FLOOR_ADDR: &str = "127.0.0.1:50061";
const REDIS_PORT: u16 = 6390;
/// redis-cell's only release on crates.io (0.3 and 0.4 were published on GitHub only).
const REDIS_CELL_VERSION: &str = "0.2.2";
/// Targets: CheckBatch decisions/s over redis-cell's pipelined decisions/s; unary Check calls/s
/// over the governor floor's, at every concurrency.
const TARGET_BATCH_OVER_REDIS: f64 = 2.0;
const TARGET_UNARY_OVER_FLOOR: f64 = 0.8;

/// The agent's config: every check allowed.
fn limiter_config() -> String {
    format!(
        "default: {{ limit: {LIMIT}, window: {}s }}\n",
        WINDOW.as_secs()
    )
}

/// The agent's config for the denial cases: the upper half of 10.0.0.0/8 may send one check
/// per hour, so once warmed up about half of the (uniformly spread) address IDs are denied.
fn limiter_deny_config() -> String {
    format!(
        "{}policies:\n  - {{ match: 10.128.0.0/9, limit: 1, window: 1h }}\n",
        limiter_config()
    )
}

// ---------------------------------------------------------------------------------------------
// Command line
// ---------------------------------------------------------------------------------------------

#[derive(Parser)]
#[command(about = "gRPC API benchmark: limiter vs a governor floor server vs redis-cell")]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// A minimal tonic server of limiter.v1.RateLimiter on governor's keyed limiter.
    FloorServer(FloorArgs),
    /// A closed-loop gRPC load generator; prints one JSON line.
    Load(LoadArgs),
    /// The whole benchmark (root): every system and case, a markdown report.
    Run(RunArgs),
}

#[derive(clap::Args)]
struct FloorArgs {
    /// Address to listen on.
    #[arg(long)]
    listen: SocketAddr,
    /// Checks each client may make per window.
    #[arg(long, default_value_t = LIMIT)]
    limit: u32,
    /// The window (`1s`, `500ms`).
    #[arg(long, default_value = "1s", value_parser = parse_duration)]
    window: Duration,
}

#[derive(clap::Args, Clone)]
struct LoadArgs {
    /// `http://HOST:PORT` of the RateLimiter service.
    #[arg(long)]
    target: String,
    /// Sent as `authorization: Bearer TOKEN`.
    #[arg(long)]
    token: Option<String>,
    /// Calls in flight.
    #[arg(long, default_value_t = 16)]
    concurrency: usize,
    /// How long to measure, after the warm-up (`3s`, `500ms`).
    #[arg(long, default_value = "3s", value_parser = parse_duration)]
    duration: Duration,
    /// How long to run before measuring.
    #[arg(long, default_value = "1s", value_parser = parse_duration)]
    warmup: Duration,
    #[arg(long, value_enum, default_value_t = Mode::Unary)]
    mode: Mode,
    /// Checks per CheckBatch call.
    #[arg(long, default_value_t = BATCH)]
    batch: usize,
    /// Distinct client IDs, each check picks one uniformly at random.
    #[arg(long, default_value_t = 10_000)]
    ids: usize,
    #[arg(long, value_enum, default_value_t = IdKind::Address)]
    id_kind: IdKind,
    /// Seed of the ID choices.
    #[arg(long, default_value_t = 1)]
    seed: u64,
}

#[derive(clap::Args)]
struct RunArgs {
    /// Also write the markdown section to this file.
    #[arg(long)]
    write: Option<PathBuf>,
    /// Measured time per case and round.
    #[arg(long, default_value = "2s", value_parser = parse_duration)]
    duration: Duration,
    /// Warm-up per case and round.
    #[arg(long, default_value = "500ms", value_parser = parse_duration)]
    warmup: Duration,
    /// Rounds: every case is measured once per round, the rounds interleaved, and reported by
    /// its median round.
    #[arg(long, default_value_t = 3)]
    rounds: usize,
    /// Distinct client IDs.
    #[arg(long, default_value_t = 10_000)]
    ids: usize,
}

#[derive(ValueEnum, Clone, Copy, PartialEq, Eq, Debug)]
enum Mode {
    /// One Check per call.
    Unary,
    /// `--batch` checks per CheckBatch call.
    Batch,
}

#[derive(ValueEnum, Clone, Copy, PartialEq, Eq, Debug)]
enum IdKind {
    /// IPv4 addresses in 10.0.0.0/8 ("10.1.2.3").
    Address,
    /// Names ("tenant-123").
    Name,
}

impl IdKind {
    fn as_str(self) -> &'static str {
        match self {
            IdKind::Address => "address",
            IdKind::Name => "name",
        }
    }
}

/// `250ms`, `3s`, `1.5s`, `100us`, or plain seconds.
fn parse_duration(text: &str) -> Result<Duration, String> {
    let (number, unit) = match text.find(|c: char| c.is_ascii_alphabetic()) {
        Some(at) => text.split_at(at),
        None => (text, "s"),
    };
    let value: f64 = number
        .trim()
        .parse()
        .map_err(|_| format!("{text:?} is not a duration like 3s or 500ms"))?;
    let seconds = match unit {
        "us" => value / 1e6,
        "ms" => value / 1e3,
        "s" => value,
        "m" => value * 60.0,
        _ => return Err(format!("{text:?}: unknown unit {unit:?} (us, ms, s, m)")),
    };
    Duration::try_from_secs_f64(seconds).map_err(|e| format!("{text:?}: {e}"))
}

fn main() -> Result<()> {
    match Cli::parse().command {
        Cmd::FloorServer(args) => runtime()?.block_on(floor_server(args)),
        Cmd::Load(args) => {
            let report = runtime()?.block_on(load(&args))?;
            println!(
                "{}",
                serde_json::to_string(&report).context("encoding the report")?
            );
            Ok(())
        }
        Cmd::Run(args) => run(&args),
    }
}

fn runtime() -> Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the tokio runtime")
}

// ---------------------------------------------------------------------------------------------
// The governor floor server
// ---------------------------------------------------------------------------------------------

type Governor = governor::RateLimiter<
    String,
    DefaultKeyedStateStore<String>,
    DefaultClock,
    StateInformationMiddleware,
>;

/// limiter.v1.RateLimiter on governor's keyed GCRA limiter (DashMap state, default clock): what
/// a gRPC rate limiter costs when the decision itself is nearly free.
struct Floor {
    limiter: Governor,
    quota: Quota,
    window: prost_types::Duration,
}

impl Floor {
    fn new(limit: u32, window: Duration) -> Result<Floor> {
        let burst = NonZeroU32::new(limit).context("--limit must be positive")?;
        let quota = Quota::with_period(window / limit)
            .with_context(|| format!("--window {window:?} / --limit {limit} is zero"))?
            .allow_burst(burst);
        Ok(Floor {
            limiter: governor::RateLimiter::dashmap(quota)
                .with_middleware::<StateInformationMiddleware>(),
            quota,
            window: proto_duration(window),
        })
    }

    /// One decision, with every CheckResponse field governor can give.
    fn decide(&self, check: &CheckRequest) -> Result<CheckResponse, Status> {
        let id = &check.client_id;
        if id.is_empty() || id.len() > 256 {
            return Err(Status::invalid_argument(format!(
                "client_id must be 1 to 256 bytes, got {}",
                id.len()
            )));
        }
        let Some(hits) = NonZeroU32::new(check.hits.unwrap_or(1)) else {
            return Err(Status::invalid_argument(
                "hits = 0 is not supported: governor cannot read a key's state without spending",
            ));
        };
        let limit = self.quota.burst_size().get();
        let interval = self.quota.replenish_interval();
        let mut response = CheckResponse {
            limit,
            window: Some(self.window),
            action: Action::Limit as i32,
            policy: "default".to_owned(),
            ..CheckResponse::default()
        };
        match self.limiter.check_key_n(id, hits) {
            Ok(Ok(state)) => {
                let remaining = state.remaining_burst_capacity();
                response.allowed = true;
                response.remaining = remaining;
                // GCRA: the bucket is full again (limit - remaining) emission intervals from now,
                // to within one interval.
                response.reset_after = Some(proto_duration(interval * (limit - remaining)));
            }
            Ok(Err(not_until)) => {
                let retry = not_until.wait_time_from(self.limiter.clock().now());
                response.retry_after = Some(proto_duration(retry));
                // One cell fits at `retry`; the rest of the burst refills after that.
                response.reset_after = Some(proto_duration(retry + interval * (limit - 1)));
            }
            // More hits than the burst: waiting cannot help, so no retry_after.
            Err(_insufficient) => {
                response.reset_after = Some(proto_duration(interval * limit));
            }
        }
        Ok(response)
    }
}

fn proto_duration(d: Duration) -> prost_types::Duration {
    prost_types::Duration {
        seconds: d.as_secs() as i64,
        nanos: d.subsec_nanos() as i32,
    }
}

#[tonic::async_trait]
impl RateLimiter for Floor {
    async fn check(
        &self,
        request: Request<CheckRequest>,
    ) -> Result<Response<CheckResponse>, Status> {
        self.decide(request.get_ref()).map(Response::new)
    }

    async fn check_batch(
        &self,
        request: Request<CheckBatchRequest>,
    ) -> Result<Response<CheckBatchResponse>, Status> {
        let checks = &request.get_ref().checks;
        if checks.len() > MAX_BATCH {
            return Err(Status::invalid_argument(format!(
                "{} checks in one batch; at most {MAX_BATCH}",
                checks.len()
            )));
        }
        let results = checks
            .iter()
            .map(|check| self.decide(check))
            .collect::<Result<_, _>>()?;
        Ok(Response::new(CheckBatchResponse { results }))
    }
}

async fn floor_server(args: FloorArgs) -> Result<()> {
    let floor = Floor::new(args.limit, args.window)?;
    eprintln!(
        "floor server: limiter.v1.RateLimiter on governor, {} per {:?}, listening on {}",
        args.limit, args.window, args.listen
    );
    Server::builder()
        .add_service(RateLimiterServer::new(floor))
        .serve(args.listen)
        .await
        .with_context(|| format!("floor server on {}", args.listen))
}

// ---------------------------------------------------------------------------------------------
// The load generator
// ---------------------------------------------------------------------------------------------

/// What one `load` run measured; printed as JSON.
#[derive(Serialize, Deserialize, Debug, Clone)]
struct LoadReport {
    /// Calls completed within the measured window.
    calls: u64,
    /// Checks decided by those calls.
    decisions: u64,
    /// Of which denied.
    denied: u64,
    /// Failed calls (warm-up included).
    errors: u64,
    first_error: Option<String>,
    /// Length of the measured window.
    seconds: f64,
    /// Per-call latency of the measured calls.
    p50_us: f64,
    p99_us: f64,
}

impl LoadReport {
    fn calls_per_s(&self) -> f64 {
        self.calls as f64 / self.seconds
    }
    fn decisions_per_s(&self) -> f64 {
        self.decisions as f64 / self.seconds
    }
}

/// `count` distinct client IDs. Addresses: a bijection of 0..2^24 (multiplying by an odd
/// constant modulo 2^24) spreads them pseudo-randomly over 10.0.0.0/8.
fn client_ids(kind: IdKind, count: usize) -> Vec<String> {
    (0..count as u32)
        .map(|i| match kind {
            IdKind::Address => {
                let x = i.wrapping_mul(0x9E37_79B1).wrapping_add(0x5A_5A5A) & 0xFF_FFFF;
                format!("10.{}.{}.{}", x >> 16, (x >> 8) & 0xFF, x & 0xFF)
            }
            IdKind::Name => format!("tenant-{i}"),
        })
        .collect()
}

/// xorshift64*: each worker's ID choices.
struct Rng(u64);

impl Rng {
    fn new(seed: u64) -> Rng {
        // splitmix64 of the seed: never zero for distinct small seeds.
        let mut z = seed.wrapping_add(0x9E37_79B9_7F4A_7C15);
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        Rng((z ^ (z >> 31)) | 1)
    }

    fn below(&mut self, n: usize) -> usize {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        let x = self.0.wrapping_mul(0x2545_F491_4F6C_DD1D);
        (((x >> 32) * n as u64) >> 32) as usize
    }
}

/// One worker's counts.
struct Tally {
    latency_ns: Histogram<u64>,
    calls: u64,
    decisions: u64,
    denied: u64,
    errors: u64,
    first_error: Option<String>,
}

impl Tally {
    fn new() -> Result<Tally> {
        Ok(Tally {
            // 1 µs to 60 s, 3 significant digits.
            latency_ns: Histogram::new_with_bounds(1_000, 60_000_000_000, 3)
                .context("creating a latency histogram")?,
            calls: 0,
            decisions: 0,
            denied: 0,
            errors: 0,
            first_error: None,
        })
    }

    fn merge(&mut self, other: Tally) -> Result<()> {
        self.latency_ns
            .add(&other.latency_ns)
            .context("merging latency histograms")?;
        self.calls += other.calls;
        self.decisions += other.decisions;
        self.denied += other.denied;
        self.errors += other.errors;
        if self.first_error.is_none() {
            self.first_error = other.first_error;
        }
        Ok(())
    }
}

/// Everything a worker needs, shared.
struct Plan {
    ids: Vec<String>,
    auth: Option<MetadataValue<Ascii>>,
    mode: Mode,
    batch: usize,
    measure_from: Instant,
    end: Instant,
}

impl Plan {
    fn request<T>(&self, message: T) -> Request<T> {
        let mut request = Request::new(message);
        if let Some(auth) = &self.auth {
            request.metadata_mut().insert("authorization", auth.clone());
        }
        request
    }

    fn check(&self, rng: &mut Rng) -> CheckRequest {
        CheckRequest {
            client_id: self.ids[rng.below(self.ids.len())].clone(),
            hits: None,
        }
    }

    /// One call: `(decisions, denied)`.
    async fn call(
        &self,
        client: &mut RateLimiterClient<Channel>,
        rng: &mut Rng,
    ) -> Result<(u64, u64), Status> {
        match self.mode {
            Mode::Unary => {
                let response = client.check(self.request(self.check(rng))).await?;
                Ok((1, u64::from(!response.get_ref().allowed)))
            }
            Mode::Batch => {
                let checks = (0..self.batch).map(|_| self.check(rng)).collect();
                let response = client
                    .check_batch(self.request(CheckBatchRequest { checks }))
                    .await?;
                let results = &response.get_ref().results;
                if results.len() != self.batch {
                    return Err(Status::internal(format!(
                        "CheckBatch of {} checks returned {} results",
                        self.batch,
                        results.len()
                    )));
                }
                let denied = results.iter().filter(|r| !r.allowed).count();
                Ok((self.batch as u64, denied as u64))
            }
        }
    }
}

/// Calls back to back until `plan.end`; counts the calls that complete inside the measured
/// window (completion time decides, which keeps the throughput unbiased).
async fn worker(
    plan: Arc<Plan>,
    mut client: RateLimiterClient<Channel>,
    seed: u64,
) -> Result<Tally> {
    let mut rng = Rng::new(seed);
    let mut tally = Tally::new()?;
    loop {
        let start = Instant::now();
        if start >= plan.end {
            return Ok(tally);
        }
        let outcome = plan.call(&mut client, &mut rng).await;
        let done = Instant::now();
        match outcome {
            Ok((decisions, denied)) => {
                if done >= plan.measure_from && done <= plan.end {
                    tally
                        .latency_ns
                        .saturating_record((done - start).as_nanos() as u64);
                    tally.calls += 1;
                    tally.decisions += decisions;
                    tally.denied += denied;
                }
            }
            Err(status) => {
                tally.errors += 1;
                tally
                    .first_error
                    .get_or_insert_with(|| format!("{:?}: {}", status.code(), status.message()));
            }
        }
    }
}

async fn load(args: &LoadArgs) -> Result<LoadReport> {
    ensure!(args.concurrency > 0, "--concurrency must be positive");
    ensure!(args.ids > 0, "--ids must be positive");
    ensure!(
        args.mode == Mode::Unary || (1..=MAX_BATCH).contains(&args.batch),
        "--batch must be 1 to {MAX_BATCH}"
    );
    let auth = args
        .token
        .as_ref()
        .map(|token| format!("Bearer {token}").parse::<MetadataValue<Ascii>>())
        .transpose()
        .context("--token is not a valid header value")?;
    let endpoint = Endpoint::from_shared(args.target.clone())
        .with_context(|| format!("--target {:?}", args.target))?;
    let mut channels = Vec::new();
    for _ in 0..args.concurrency.div_ceil(STREAMS_PER_CONNECTION) {
        channels.push(
            endpoint
                .connect()
                .await
                .with_context(|| format!("connecting to {}", args.target))?,
        );
    }
    let mut plan = Plan {
        ids: client_ids(args.id_kind, args.ids),
        auth,
        mode: args.mode,
        batch: args.batch,
        measure_from: Instant::now(),
        end: Instant::now(),
    };
    // One call first, so a wrong token or address fails here with the server's reason.
    plan.call(
        &mut RateLimiterClient::new(channels[0].clone()),
        &mut Rng::new(args.seed),
    )
    .await
    .map_err(|status| {
        anyhow::anyhow!(
            "the first {:?} call to {} failed: {:?}: {}",
            args.mode,
            args.target,
            status.code(),
            status.message()
        )
    })?;
    let start = Instant::now();
    plan.measure_from = start + args.warmup;
    plan.end = plan.measure_from + args.duration;
    let plan = Arc::new(plan);
    let mut workers = tokio::task::JoinSet::new();
    for i in 0..args.concurrency {
        let client = RateLimiterClient::new(channels[i % channels.len()].clone());
        workers.spawn(worker(
            Arc::clone(&plan),
            client,
            args.seed.wrapping_mul(1_000_003).wrapping_add(i as u64),
        ));
    }
    let mut total = Tally::new()?;
    while let Some(result) = workers.join_next().await {
        total.merge(result.context("a load worker panicked")??)?;
    }
    let quantile = |q: f64| total.latency_ns.value_at_quantile(q) as f64 / 1e3;
    Ok(LoadReport {
        calls: total.calls,
        decisions: total.decisions,
        denied: total.denied,
        errors: total.errors,
        first_error: total.first_error.clone(),
        seconds: args.duration.as_secs_f64(),
        p50_us: quantile(0.5),
        p99_us: quantile(0.99),
    })
}

// ---------------------------------------------------------------------------------------------
// Processes
// ---------------------------------------------------------------------------------------------

static INTERRUPTED: AtomicBool = AtomicBool::new(false);

extern "C" fn on_signal(_: libc::c_int) {
    INTERRUPTED.store(true, Ordering::Relaxed);
}

fn check_interrupted() -> Result<()> {
    if INTERRUPTED.load(Ordering::Relaxed) {
        bail!("interrupted");
    }
    Ok(())
}

fn describe(command: &Command) -> String {
    std::iter::once(command.get_program())
        .chain(command.get_args())
        .map(|a| a.to_string_lossy().into_owned())
        .collect::<Vec<_>>()
        .join(" ")
}

/// `nsenter --net=/run/netns/NS PROGRAM`: the program runs in the namespace (nsenter execs it,
/// so the child's pid is the program's).
fn in_ns(ns: &str, program: impl AsRef<std::ffi::OsStr>) -> Command {
    let mut command = Command::new("nsenter");
    command.arg(format!("--net=/run/netns/{ns}")).arg(program);
    command
}

/// The last `max` bytes of a file, for error messages.
fn tail(path: &Path, max: u64) -> String {
    let Ok(mut file) = fs::File::open(path) else {
        return String::new();
    };
    let len = file.metadata().map(|m| m.len()).unwrap_or(0);
    let _ = file.seek(SeekFrom::Start(len.saturating_sub(max)));
    let mut text = String::new();
    let _ = file.read_to_string(&mut text);
    text.trim().to_owned()
}

/// A background server, stopped when dropped (SIGTERM, SIGKILL after 3 s). Its output goes to
/// `log`. It runs in its own process group, so a Ctrl-C reaches only this program, which then
/// stops it.
struct Daemon {
    name: &'static str,
    child: Child,
    log: PathBuf,
}

impl Daemon {
    fn spawn(name: &'static str, mut command: Command, log: PathBuf) -> Result<Daemon> {
        let file = fs::File::create(&log).with_context(|| format!("creating {}", log.display()))?;
        command
            .stdin(Stdio::null())
            .stdout(
                file.try_clone()
                    .with_context(|| format!("duplicating {}", log.display()))?,
            )
            .stderr(file)
            .process_group(0);
        let child = command
            .spawn()
            .with_context(|| format!("starting the {name}: `{}`", describe(&command)))?;
        Ok(Daemon { name, child, log })
    }

    /// Fails, with its output, if it has exited.
    fn ensure_running(&mut self) -> Result<()> {
        if let Some(status) = self
            .child
            .try_wait()
            .with_context(|| format!("waiting for the {}", self.name))?
        {
            bail!(
                "the {} exited ({status}); its output:\n{}",
                self.name,
                tail(&self.log, 4000)
            );
        }
        Ok(())
    }

    /// Waits until `addr` accepts TCP connections inside namespace `ns`.
    fn wait_listening(&mut self, ns: &str, addr: SocketAddr, timeout: Duration) -> Result<()> {
        let deadline = Instant::now() + timeout;
        loop {
            self.ensure_running()
                .with_context(|| format!("before listening on {addr}"))?;
            if listening(ns, addr)? {
                return Ok(());
            }
            if Instant::now() >= deadline {
                bail!(
                    "the {} did not listen on {addr} within {timeout:?}; its output:\n{}",
                    self.name,
                    tail(&self.log, 4000)
                );
            }
            thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if let Ok(Some(_)) = self.child.try_wait() {
            return;
        }
        // SAFETY: signalling our own child, not yet reaped.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        let deadline = Instant::now() + Duration::from_secs(3);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            thread::sleep(Duration::from_millis(10));
        }
        eprintln!(
            "warning: the {} ignored SIGTERM for 3 s; killing it",
            self.name
        );
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn listening(ns: &str, addr: SocketAddr) -> Result<bool> {
    in_netns(ns, || {
        TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_ok()
    })
}

/// A directory removed when dropped.
struct TempDir(PathBuf);

impl TempDir {
    fn new(tag: &str) -> Result<TempDir> {
        let path = std::env::temp_dir().join(format!("{tag}-{}", std::process::id()));
        let _ = fs::remove_dir_all(&path);
        fs::create_dir_all(&path).with_context(|| format!("creating {}", path.display()))?;
        Ok(TempDir(path))
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.0);
    }
}

/// Runs `command` to completion within `timeout`; its stdout, or an error with its stderr.
fn output_of(command: &mut Command, timeout: Duration) -> Result<String> {
    let line = describe(command);
    let output = limiter_tests::netns::run_with_timeout(command, timeout)?;
    if !output.status.success() {
        bail!(
            "`{line}` failed ({}): {}",
            output.status,
            String::from_utf8_lossy(&output.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&output.stdout).into_owned())
}

/// 32 hex digits from /dev/urandom: the agent's API token for this run.
fn random_token() -> Result<String> {
    let mut bytes = [0u8; 16];
    fs::File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(&mut bytes))
        .context("reading /dev/urandom")?;
    Ok(bytes.iter().map(|b| format!("{b:02x}")).collect())
}

fn find_executable(name: &str) -> Option<PathBuf> {
    std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|dir| dir.join(name))
            .find(|path| path.is_file())
    })
}

// ---------------------------------------------------------------------------------------------
// redis-cell
// ---------------------------------------------------------------------------------------------

/// The workspace's target directory (`$CARGO_TARGET_DIR`, else `target/`).
fn target_dir() -> PathBuf {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap_or(Path::new("."))
        .to_path_buf();
    match std::env::var_os("CARGO_TARGET_DIR") {
        Some(dir) => root.join(dir),
        None => root.join("target"),
    }
}

fn cargo() -> Command {
    let mut command = Command::new(std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into()));
    // Whatever `cargo run` set for this binary is not for the builds below.
    for var in [
        "CARGO_TARGET_DIR",
        "CARGO_MANIFEST_DIR",
        "CARGO_PRIMARY_PACKAGE",
    ] {
        command.env_remove(var);
    }
    command
}

/// Builds redis-cell's Redis module from its crates.io source into `dir` (once; later runs
/// reuse it) and returns the module's path. The source comes through cargo itself: a
/// throwaway package depending on `redis-cell` is fetched and `cargo metadata` names where the
/// source was unpacked; a copy of it is built as its own workspace.
fn build_redis_cell(dir: &Path) -> Result<PathBuf> {
    let module = dir.join(format!("libredis_cell-{REDIS_CELL_VERSION}.so"));
    if module.is_file() {
        return Ok(module);
    }
    let fetch = dir.join("fetch");
    fs::create_dir_all(fetch.join("src"))
        .with_context(|| format!("creating {}", fetch.display()))?;
    let manifest = fetch.join("Cargo.toml");
    fs::write(
        &manifest,
        format!(
            "[package]\nname = \"redis-cell-fetch\"\nversion = \"0.0.0\"\nedition = \"2021\"\n\
             publish = false\n\n[dependencies]\nredis-cell = \"={REDIS_CELL_VERSION}\"\n\n\
             # Not part of the limiter workspace.\n[workspace]\n"
        ),
    )
    .with_context(|| format!("writing {}", manifest.display()))?;
    fs::write(fetch.join("src/lib.rs"), "")
        .with_context(|| format!("writing {}", fetch.join("src/lib.rs").display()))?;
    let minutes = Duration::from_secs(300);
    output_of(
        cargo().args(["fetch", "--manifest-path"]).arg(&manifest),
        minutes,
    )
    .context("downloading redis-cell")?;
    let metadata = output_of(
        cargo()
            .args(["metadata", "--format-version", "1", "--manifest-path"])
            .arg(&manifest),
        minutes,
    )
    .context("locating redis-cell's source")?;
    let metadata: serde_json::Value =
        serde_json::from_str(&metadata).context("parsing `cargo metadata` output")?;
    let source = metadata["packages"]
        .as_array()
        .and_then(|packages| {
            packages
                .iter()
                .find(|p| p["name"] == "redis-cell" && p["version"] == REDIS_CELL_VERSION)
        })
        .and_then(|p| p["manifest_path"].as_str())
        .and_then(|path| Path::new(path).parent())
        .map(Path::to_path_buf)
        .context("`cargo metadata` lists no redis-cell package")?;

    let build = dir.join(format!("redis-cell-{REDIS_CELL_VERSION}"));
    let _ = fs::remove_dir_all(&build);
    copy_dir(&source, &build)?;
    // The copy lives under this workspace's target/: make it a workspace of its own.
    let build_manifest = build.join("Cargo.toml");
    let mut text = fs::read_to_string(&build_manifest)
        .with_context(|| format!("reading {}", build_manifest.display()))?;
    text.push_str("\n[workspace]\n");
    fs::write(&build_manifest, text)
        .with_context(|| format!("writing {}", build_manifest.display()))?;
    let log = dir.join("build.log");
    let output = limiter_tests::netns::run_with_timeout(
        cargo()
            .args(["build", "--release", "--manifest-path"])
            .arg(&build_manifest)
            .arg("--target-dir")
            .arg(dir.join("target")),
        minutes,
    )
    .context("building redis-cell")?;
    fs::write(&log, &output.stderr).with_context(|| format!("writing {}", log.display()))?;
    if !output.status.success() {
        let stderr = String::from_utf8_lossy(&output.stderr);
        let errors: Vec<&str> = stderr
            .lines()
            .filter(|l| l.starts_with("error"))
            .take(5)
            .collect();
        bail!(
            "`cargo build --release` of redis-cell {REDIS_CELL_VERSION} failed ({}): {} (full log: {})",
            output.status,
            errors.join("; "),
            log.display()
        );
    }
    let built = dir.join("target/release/libredis_cell.so");
    fs::copy(&built, &module)
        .with_context(|| format!("copying {} to {}", built.display(), module.display()))?;
    Ok(module)
}

fn copy_dir(from: &Path, to: &Path) -> Result<()> {
    fs::create_dir_all(to).with_context(|| format!("creating {}", to.display()))?;
    for entry in fs::read_dir(from).with_context(|| format!("reading {}", from.display()))? {
        let entry = entry.with_context(|| format!("reading {}", from.display()))?;
        let target = to.join(entry.file_name());
        if entry.file_type()?.is_dir() {
            copy_dir(&entry.path(), &target)?;
        } else {
            fs::copy(entry.path(), &target).with_context(|| {
                format!("copying {} to {}", entry.path().display(), target.display())
            })?;
        }
    }
    Ok(())
}

/// One redis-benchmark run: `(requests/s, p50 ms, p99 ms)`.
fn redis_benchmark(
    ns: &str,
    pipeline: usize,
    connections: usize,
    requests: u64,
    keys: usize,
) -> Result<(f64, f64, f64)> {
    // CL.THROTTLE key max_burst count_per_period period quantity: LIMIT per WINDOW.
    let mut command = in_ns(ns, "redis-benchmark");
    command.args([
        "-h".to_owned(),
        "127.0.0.1".to_owned(),
        "-p".to_owned(),
        REDIS_PORT.to_string(),
        "-c".to_owned(),
        connections.to_string(),
        "-P".to_owned(),
        pipeline.to_string(),
        "-n".to_owned(),
        requests.to_string(),
        "-r".to_owned(),
        keys.to_string(),
        "--csv".to_owned(),
        "CL.THROTTLE".to_owned(),
        "key:__rand_int__".to_owned(),
        (LIMIT - 1).to_string(),
        LIMIT.to_string(),
        WINDOW.as_secs().to_string(),
        "1".to_owned(),
    ]);
    let csv = output_of(&mut command, Duration::from_secs(120))?;
    parse_redis_csv(&csv).with_context(|| format!("parsing redis-benchmark's output {csv:?}"))
}

/// redis-benchmark `--csv`: a header line naming the columns, then one line per test.
fn parse_redis_csv(csv: &str) -> Result<(f64, f64, f64)> {
    let mut lines = csv.lines().map(|line| {
        line.split(',')
            .map(|f| f.trim_matches('"'))
            .collect::<Vec<_>>()
    });
    let header = lines.next().context("no header line")?;
    let row = lines.next().context("no result line")?;
    let column = |name: &str| -> Result<f64> {
        let at = header
            .iter()
            .position(|h| *h == name)
            .with_context(|| format!("no column {name:?}"))?;
        let value = row
            .get(at)
            .with_context(|| format!("no value for {name:?}"))?;
        value
            .parse()
            .with_context(|| format!("{name} {value:?} is not a number"))
    };
    Ok((
        column("rps")?,
        column("p50_latency_ms")?,
        column("p99_latency_ms")?,
    ))
}

// ---------------------------------------------------------------------------------------------
// The benchmark
// ---------------------------------------------------------------------------------------------

/// One measurement of one case.
#[derive(Clone, Debug)]
struct Measurement {
    calls_per_s: Option<f64>,
    decisions_per_s: f64,
    p50_us: f64,
    p99_us: f64,
    /// Share of the decisions that were denials (gRPC only).
    denied: Option<f64>,
    /// Failed calls (gRPC only).
    errors: Option<u64>,
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
struct Row {
    system: String,
    /// The gRPC case; `None` for redis-benchmark rows.
    case: Option<(Mode, usize)>,
    call: &'static str,
    in_flight: String,
    rounds: Vec<Measurement>,
}

impl Row {
    fn grpc(system: &str, mode: Mode, concurrency: usize) -> Row {
        Row {
            system: system.to_owned(),
            case: Some((mode, concurrency)),
            call: match mode {
                Mode::Unary => "Check",
                Mode::Batch => "CheckBatch ×100",
            },
            in_flight: match mode {
                Mode::Unary => concurrency.to_string(),
                Mode::Batch => format!("{concurrency} × {BATCH}"),
            },
            rounds: Vec::new(),
        }
    }

    /// The round with the median decisions/s (the lower of the two middle ones for an even
    /// count); `None` before the first round.
    fn median(&self) -> Option<&Measurement> {
        let mut sorted: Vec<&Measurement> = self.rounds.iter().collect();
        sorted.sort_by(|a, b| a.decisions_per_s.total_cmp(&b.decisions_per_s));
        sorted.get(sorted.len().saturating_sub(1) / 2).copied()
    }

    /// Lowest and highest decisions/s over the rounds.
    fn spread(&self) -> (f64, f64) {
        self.rounds
            .iter()
            .fold((f64::INFINITY, 0.0_f64), |(lo, hi), m| {
                (lo.min(m.decisions_per_s), hi.max(m.decisions_per_s))
            })
    }
}

/// The rows, in report order.
struct Rows(Vec<Row>);

impl Rows {
    fn get_mut(&mut self, system: &str, mode: Mode, concurrency: usize) -> Option<&mut Row> {
        self.0
            .iter_mut()
            .find(|r| r.system == system && r.case == Some((mode, concurrency)))
    }

    /// The median measurement of a gRPC case.
    fn median(&self, system: &str, mode: Mode, concurrency: usize) -> Option<&Measurement> {
        self.0
            .iter()
            .find(|r| r.system == system && r.case == Some((mode, concurrency)))
            .and_then(Row::median)
    }
}

/// The gRPC services under test.
struct Target {
    system: String,
    addr: &'static str,
    token: Option<String>,
    id_kind: IdKind,
}

struct Bench<'a> {
    args: &'a RunArgs,
    ns: String,
    exe: PathBuf,
}

impl Bench<'_> {
    /// Runs one `load` in the namespace.
    fn load(&self, target: &Target, mode: Mode, concurrency: usize) -> Result<LoadReport> {
        check_interrupted()?;
        let mut command = in_ns(&self.ns, &self.exe);
        command.args([
            "load".to_owned(),
            "--target".to_owned(),
            format!("http://{}", target.addr),
            "--concurrency".to_owned(),
            concurrency.to_string(),
            "--duration".to_owned(),
            format!("{}ms", self.args.duration.as_millis()),
            "--warmup".to_owned(),
            format!("{}ms", self.args.warmup.as_millis()),
            "--mode".to_owned(),
            format!("{mode:?}").to_lowercase(),
            "--batch".to_owned(),
            BATCH.to_string(),
            "--ids".to_owned(),
            self.args.ids.to_string(),
            "--id-kind".to_owned(),
            target.id_kind.as_str().to_owned(),
        ]);
        if let Some(token) = &target.token {
            command.args(["--token", token]);
        }
        let what = format!("{} {mode:?} at concurrency {concurrency}", target.system);
        let timeout = self.args.warmup + self.args.duration + Duration::from_secs(30);
        let stdout = output_of(&mut command, timeout).with_context(|| format!("load: {what}"));
        // A Ctrl-C also stops the load generator: report the interruption, not its failure.
        check_interrupted()?;
        let stdout = stdout?;
        let report: LoadReport = serde_json::from_str(stdout.trim())
            .with_context(|| format!("load: {what}: parsing its report {stdout:?}"))?;
        ensure!(
            report.calls > 0,
            "load: {what}: no call succeeded ({} errors, first: {})",
            report.errors,
            report.first_error.as_deref().unwrap_or("none")
        );
        eprintln!(
            "{what}: {:.0} calls/s, {:.0} decisions/s, p50 {:.0} µs, p99 {:.0} µs, {:.1}% denied, {} errors",
            report.calls_per_s(),
            report.decisions_per_s(),
            report.p50_us,
            report.p99_us,
            100.0 * report.denied as f64 / report.decisions.max(1) as f64,
            report.errors
        );
        Ok(report)
    }
}

/// What the limiter rows could not be measured for, when they were not.
enum Limiter {
    Running { agent: Agent, token: String },
    Missing(String),
}

/// The redis-cell rows: measured, or why not.
enum Redis {
    Running(Daemon),
    Missing(String),
}

fn run(args: &RunArgs) -> Result<()> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        bail!("api-bench run creates network namespaces and attaches XDP: run it as root");
    }
    // SAFETY: the handler only stores to an atomic, which is async-signal-safe.
    unsafe {
        for signal in [libc::SIGINT, libc::SIGTERM] {
            libc::signal(
                signal,
                on_signal as extern "C" fn(libc::c_int) as libc::sighandler_t,
            );
        }
    }
    let load_before = read_trimmed("/proc/loadavg");
    let date = date();
    let exe = std::env::current_exe().context("locating this executable")?;
    let bench_dir = target_dir().join("bench");
    let tmp = TempDir::new("limiter-api-bench")?;

    let redis_cell_dir = bench_dir.join("redis-cell");
    eprintln!(
        "building redis-cell {REDIS_CELL_VERSION} into {}",
        redis_cell_dir.display()
    );
    let module = build_redis_cell(&redis_cell_dir);

    let net = TestNet::new().context("creating the benchmark's network namespaces")?;
    let ns = net.receiver_ns.clone();

    let floor_addr: SocketAddr = FLOOR_ADDR.parse().context("FLOOR_ADDR")?;
    let mut floor = Daemon::spawn(
        "governor floor server",
        {
            let mut command = in_ns(&ns, &exe);
            command.args(["floor-server", "--listen", FLOOR_ADDR]);
            command
        },
        tmp.0.join("floor.log"),
    )?;
    floor.wait_listening(&ns, floor_addr, Duration::from_secs(10))?;

    let mut redis = match (&module, find_executable("redis-server")) {
        (Err(e), _) => Redis::Missing(format!("redis-cell did not build: {e:#}")),
        (Ok(_), None) => Redis::Missing(
            "`redis-server` is not installed (`cargo xtask setup` installs it)".into(),
        ),
        (Ok(module), Some(server)) => {
            let mut command = in_ns(&ns, server);
            command
                .args(["--bind", "127.0.0.1", "--port", &REDIS_PORT.to_string()])
                .args(["--save", "", "--appendonly", "no", "--daemonize", "no"])
                .arg("--dir")
                .arg(&tmp.0)
                .arg("--loadmodule")
                .arg(module);
            let mut daemon = Daemon::spawn("redis-server", command, tmp.0.join("redis.log"))?;
            daemon.wait_listening(
                &ns,
                SocketAddr::from(([127, 0, 0, 1], REDIS_PORT)),
                Duration::from_secs(10),
            )?;
            // The module answers: `CL.THROTTLE` gives 5 integers, the first 0 (allowed).
            let reply = output_of(
                in_ns(&ns, "redis-cli")
                    .args(["-p", &REDIS_PORT.to_string(), "CL.THROTTLE", "bench-check"])
                    .args([
                        (LIMIT - 1).to_string(),
                        LIMIT.to_string(),
                        "1".into(),
                        "1".into(),
                    ]),
                Duration::from_secs(10),
            )
            .context("redis-cli CL.THROTTLE")?;
            ensure!(
                reply.lines().count() == 5 && reply.lines().next() == Some("0"),
                "CL.THROTTLE answered {reply:?}; redis-server's log:\n{}",
                tail(&daemon.log, 4000)
            );
            Redis::Running(daemon)
        }
    };

    let limiter = if !limiter_bin().is_file() {
        Limiter::Missing(format!(
            "no limiter binary at {} (set LIMITER_BIN or run `cargo xtask bench`)",
            limiter_bin().display()
        ))
    } else if !agent_has_option("--api-listen") {
        Limiter::Missing(format!(
            "`{} agent` has no `--api-listen` (no gRPC API in this build)",
            limiter_bin().display()
        ))
    } else {
        let token = random_token()?;
        let token_file = tmp.0.join("api-token");
        // The agent refuses a token file others can read.
        fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&token_file)
            .and_then(|mut file| file.write_all(token.as_bytes()))
            .with_context(|| format!("writing {}", token_file.display()))?;
        let socket = tmp.0.join("api.sock");
        let agent = Agent::start_with(
            &net,
            &limiter_config(),
            &[
                "--api-socket",
                &socket.to_string_lossy(),
                "--api-listen",
                LIMITER_ADDR,
                "--api-token-file",
                &token_file.to_string_lossy(),
            ],
        )
        .context("starting the agent")?;
        let limiter_addr: SocketAddr = LIMITER_ADDR.parse().context("LIMITER_ADDR")?;
        let deadline = Instant::now() + Duration::from_secs(10);
        while !listening(&ns, limiter_addr)? {
            if let Some(status) = agent.exited()? {
                bail!(
                    "the agent exited ({status}) before serving {LIMITER_ADDR}:\n{}",
                    agent.stderr()
                );
            }
            ensure!(
                Instant::now() < deadline,
                "the agent did not listen on {LIMITER_ADDR} within 10 s; its stderr:\n{}",
                agent.stderr()
            );
            thread::sleep(Duration::from_millis(20));
        }
        Limiter::Running { agent, token }
    };

    let bench = Bench {
        args,
        ns: ns.clone(),
        exe,
    };
    let floor_target = Target {
        system: "governor floor".into(),
        addr: FLOOR_ADDR,
        token: None,
        id_kind: IdKind::Address,
    };
    let mut targets = vec![floor_target];
    if let Limiter::Running { token, .. } = &limiter {
        for id_kind in [IdKind::Address, IdKind::Name] {
            targets.push(Target {
                system: format!("limiter, {} IDs", id_kind.as_str()),
                addr: LIMITER_ADDR,
                token: Some(token.clone()),
                id_kind,
            });
        }
    }

    // Round by round, case by case, every system in turn: a drift in the machine's speed
    // touches all alike, and the median round of each case drops the outliers.
    ensure!(args.rounds > 0, "--rounds must be positive");
    let cases: Vec<(Mode, usize)> = UNARY_CONCURRENCY
        .iter()
        .map(|&c| (Mode::Unary, c))
        .chain([(Mode::Batch, BATCH_CONCURRENCY)])
        .collect();
    let mut rows = Rows(
        cases
            .iter()
            .flat_map(|&(mode, concurrency)| {
                targets
                    .iter()
                    .map(move |target| Row::grpc(&target.system, mode, concurrency))
            })
            .collect(),
    );
    let redis_rows = [
        (BATCH, "redis-cell, pipelined (-P 100)"),
        (1, "redis-cell, unpipelined (-P 1)"),
    ];
    let mut redis_requests = Vec::new();
    if let Redis::Running(_) = &redis {
        for (pipeline, label) in redis_rows {
            check_interrupted()?;
            // Warm-up, which also sizes the measured runs to about `duration`.
            let (warm_rps, ..) =
                redis_benchmark(&ns, pipeline, BATCH_CONCURRENCY, 100_000, args.ids)
                    .with_context(|| format!("redis-benchmark warm-up: {label}"))?;
            redis_requests
                .push(((warm_rps * args.duration.as_secs_f64()) as u64).clamp(50_000, 50_000_000));
            rows.0.push(Row {
                system: label.to_owned(),
                case: None,
                call: "CL.THROTTLE",
                in_flight: if pipeline == 1 {
                    BATCH_CONCURRENCY.to_string()
                } else {
                    format!("{BATCH_CONCURRENCY} × {pipeline}")
                },
                rounds: Vec::new(),
            });
        }
    }
    let redis_first_row = rows.0.len() - redis_requests.len();
    for round in 1..=args.rounds {
        eprintln!("round {round} of {}", args.rounds);
        for &(mode, concurrency) in &cases {
            for target in &targets {
                let report = bench.load(target, mode, concurrency)?;
                rows.get_mut(&target.system, mode, concurrency)
                    .context("a row for every case")?
                    .rounds
                    .push((&report).into());
            }
        }
        if let Redis::Running(daemon) = &mut redis {
            for (i, ((pipeline, label), requests)) in
                redis_rows.iter().zip(&redis_requests).enumerate()
            {
                check_interrupted()?;
                let (rps, p50_ms, p99_ms) =
                    redis_benchmark(&ns, *pipeline, BATCH_CONCURRENCY, *requests, args.ids)
                        .with_context(|| format!("redis-benchmark: {label}"))?;
                daemon.ensure_running()?;
                eprintln!("{label}: {rps:.0} decisions/s, p50 {p50_ms} ms, p99 {p99_ms} ms");
                rows.0[redis_first_row + i].rounds.push(Measurement {
                    calls_per_s: (*pipeline == 1).then_some(rps),
                    decisions_per_s: rps,
                    p50_us: p50_ms * 1e3,
                    p99_us: p99_ms * 1e3,
                    denied: None,
                    errors: None,
                });
            }
        }
    }
    if let Redis::Missing(reason) = &redis {
        eprintln!("redis-cell not measured: {reason}");
    }
    let redis_pipelined = rows
        .0
        .get(redis_first_row)
        .filter(|_| !redis_requests.is_empty())
        .and_then(Row::median)
        .map(|m| m.decisions_per_s);

    // Denials, after the comparison (the reload changes the agent's policies): one round.
    let mut denied_case = false;
    if let Limiter::Running { agent, token } = &limiter {
        agent
            .reload(&limiter_deny_config(), Duration::from_secs(10))
            .context("reloading the agent with the denial config")?;
        let target = Target {
            system: "limiter, address IDs, ~50% denied".into(),
            addr: LIMITER_ADDR,
            token: Some(token.clone()),
            id_kind: IdKind::Address,
        };
        for (mode, concurrency) in [(Mode::Unary, 16), (Mode::Batch, BATCH_CONCURRENCY)] {
            let report = bench.load(&target, mode, concurrency)?;
            let mut row = Row::grpc(&target.system, mode, concurrency);
            row.rounds.push((&report).into());
            rows.0.push(row);
        }
        denied_case = true;
    }

    let md = report(&ReportInput {
        args,
        date,
        load_before,
        rows: &rows,
        limiter: match &limiter {
            Limiter::Running { .. } => None,
            Limiter::Missing(reason) => Some(reason.as_str()),
        },
        redis: match &redis {
            Redis::Running(_) => None,
            Redis::Missing(reason) => Some(reason.as_str()),
        },
        redis_pipelined,
        denied_case,
    })?;
    print!("{md}");
    if let Some(path) = &args.write {
        fs::write(path, &md).with_context(|| format!("writing {}", path.display()))?;
        eprintln!("wrote {}", path.display());
    }
    // Stopped in this order: the load is done; the servers, then the namespaces.
    drop(limiter);
    drop(redis);
    drop(floor);
    drop(net);
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// The report
// ---------------------------------------------------------------------------------------------

struct ReportInput<'a> {
    args: &'a RunArgs,
    date: String,
    load_before: String,
    rows: &'a Rows,
    /// Why the limiter was not measured.
    limiter: Option<&'a str>,
    /// Why redis-cell was not measured.
    redis: Option<&'a str>,
    redis_pipelined: Option<f64>,
    denied_case: bool,
}

fn thousands(value: f64) -> String {
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

fn latency(us: f64) -> String {
    if us < 1000.0 {
        format!("{us:.0} µs")
    } else {
        format!("{:.2} ms", us / 1e3)
    }
}

fn mark(ok: bool) -> &'static str {
    if ok { "PASS" } else { "**MISS**" }
}

fn report(input: &ReportInput) -> Result<String> {
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
    writeln!(
        md,
        "| System | Call | In flight | calls/s | decisions/s | spread | p50 | p99 | denied | errors |"
    )?;
    writeln!(md, "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|")?;
    for row in &input.rows.0 {
        let Some(m) = row.median() else { continue };
        let (lo, hi) = row.spread();
        let errors: Option<u64> = row.rounds.iter().map(|m| m.errors).sum();
        writeln!(
            md,
            "| {} | {} | {} | {} | {} | {} | {} | {} | {} | {} |",
            row.system,
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

    writeln!(md, "\nTargets (medians, every ratio from this run):\n")?;
    writeln!(md, "| Target | limiter | baseline | ratio | |")?;
    writeln!(md, "|---|---:|---:|---:|---|")?;
    let floor = "governor floor";
    for id_kind in [IdKind::Address, IdKind::Name] {
        let system = format!("limiter, {} IDs", id_kind.as_str());
        let target = format!(
            "CheckBatch ≥ {TARGET_BATCH_OVER_REDIS}× redis-cell pipelined decisions/s, {} IDs",
            id_kind.as_str()
        );
        let batch = input.rows.median(&system, Mode::Batch, BATCH_CONCURRENCY);
        match (batch, input.redis_pipelined) {
            (Some(batch), Some(redis)) => {
                let ratio = batch.decisions_per_s / redis;
                writeln!(
                    md,
                    "| {target} | {} | {} | {ratio:.2}× | {} |",
                    thousands(batch.decisions_per_s),
                    thousands(redis),
                    mark(ratio >= TARGET_BATCH_OVER_REDIS)
                )?;
            }
            _ => writeln!(md, "| {target} | — | — | — | not measured |")?,
        }
        for concurrency in UNARY_CONCURRENCY {
            let target = format!(
                "Check ≥ {TARGET_UNARY_OVER_FLOOR}× the governor floor's calls/s, {concurrency} in flight, {} IDs",
                id_kind.as_str()
            );
            match (
                input.rows.median(&system, Mode::Unary, concurrency),
                input.rows.median(floor, Mode::Unary, concurrency),
            ) {
                (Some(limiter), Some(floor)) => {
                    let ratio = limiter.decisions_per_s / floor.decisions_per_s;
                    writeln!(
                        md,
                        "| {target} | {} | {} | {ratio:.2}× | {} |",
                        thousands(limiter.decisions_per_s),
                        thousands(floor.decisions_per_s),
                        mark(ratio >= TARGET_UNARY_OVER_FLOOR)
                    )?;
                }
                _ => writeln!(md, "| {target} | — | — | — | not measured |")?,
            }
        }
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
         pipeline's round trip. Every server shares the machine's {cpus} CPUs with its load \
         generator. Run with `cargo xtask bench`, or as root `api-bench run [--rounds 3 \
         --duration 2s --warmup 500ms --ids N --write FILE]`.",
        window = WINDOW.as_secs(),
        ids = args.ids,
        burst = LIMIT - 1,
        seconds = args.duration.as_secs_f64(),
        // SAFETY: sysconf has no preconditions.
        cpus = unsafe { libc::sysconf(libc::_SC_NPROCESSORS_ONLN) },
    )?;
    Ok(md)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_durations() {
        assert_eq!(parse_duration("3s"), Ok(Duration::from_secs(3)));
        assert_eq!(parse_duration("250ms"), Ok(Duration::from_millis(250)));
        assert_eq!(parse_duration("1.5"), Ok(Duration::from_millis(1500)));
        assert_eq!(parse_duration("100us"), Ok(Duration::from_micros(100)));
        assert!(parse_duration("3 parsecs").is_err());
        assert!(parse_duration("-1s").is_err());
    }

    #[test]
    fn address_ids_are_distinct_and_in_10_8() {
        let ids = client_ids(IdKind::Address, 100_000);
        let set: std::collections::HashSet<_> = ids.iter().collect();
        assert_eq!(set.len(), ids.len());
        for id in &ids {
            let addr: std::net::Ipv4Addr = id.parse().unwrap();
            assert_eq!(addr.octets()[0], 10);
        }
        let upper = ids
            .iter()
            .filter(|id| id.parse::<std::net::Ipv4Addr>().unwrap().octets()[1] >= 128)
            .count();
        assert!((45_000..55_000).contains(&upper), "{upper} in 10.128/9");
        assert_eq!(client_ids(IdKind::Name, 2), ["tenant-0", "tenant-1"]);
    }

    #[test]
    fn rng_stays_below_its_bound() {
        let mut rng = Rng::new(7);
        let mut seen = [0u32; 10];
        for _ in 0..10_000 {
            seen[rng.below(10)] += 1;
        }
        assert!(seen.iter().all(|&n| (800..1200).contains(&n)), "{seen:?}");
    }

    #[test]
    fn parses_redis_benchmark_csv() {
        let csv = "\"test\",\"rps\",\"avg_latency_ms\",\"min_latency_ms\",\"p50_latency_ms\",\
                   \"p95_latency_ms\",\"p99_latency_ms\",\"max_latency_ms\"\n\
                   \"CL.THROTTLE key:__rand_int__ 1 2 1 1\",\"290275.78\",\"5.268\",\"0.368\",\
                   \"4.551\",\"8.831\",\"11.583\",\"13.735\"\n";
        assert_eq!(parse_redis_csv(csv).unwrap(), (290275.78, 4.551, 11.583));
        assert!(parse_redis_csv("\"test\",\"rps\"\n").is_err());
    }

    #[test]
    fn formats_numbers() {
        assert_eq!(thousands(1234567.4), "1,234,567");
        assert_eq!(thousands(999.0), "999");
        assert_eq!(latency(87.4), "87 µs");
        assert_eq!(latency(4551.0), "4.55 ms");
    }

    #[test]
    fn floor_decides_and_fills_the_response() {
        let floor = Floor::new(2, Duration::from_secs(3600)).unwrap();
        let check = CheckRequest {
            client_id: "tenant-1".into(),
            hits: None,
        };
        let first = floor.decide(&check).unwrap();
        assert!(first.allowed);
        assert_eq!((first.limit, first.remaining), (2, 1));
        assert!(floor.decide(&check).unwrap().allowed);
        let denied = floor.decide(&check).unwrap();
        assert!(!denied.allowed);
        let retry = denied.retry_after.expect("retry_after when denied");
        assert!(retry.seconds > 0 && retry.seconds <= 1800, "{retry:?}");
        let too_many = CheckRequest {
            client_id: "tenant-2".into(),
            hits: Some(3),
        };
        let response = floor.decide(&too_many).unwrap();
        assert!(!response.allowed && response.retry_after.is_none());
        assert!(
            floor
                .decide(&CheckRequest {
                    client_id: String::new(),
                    hits: None
                })
                .is_err()
        );
    }
}
