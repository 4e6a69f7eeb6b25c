//! gRPC API benchmark: the agent's `limiter.v1.RateLimiter` (Check, CheckBatch) side by side with
//! two baselines measured in the same run, all over one network namespace's loopback:
//!
//! - the gRPC floor: a minimal tonic server answering the same service from the `governor`
//!   crate's keyed limiter (`api-bench floor-server`);
//! - Redis (Debian's `redis-server`) with the redis-cell module (`CL.THROTTLE`, built from its
//!   crates.io source under `target/bench/redis-cell/`), driven by `redis-benchmark`, pipelined.
//!
//! And Envoy's rate limit service (`ShouldRateLimit` on the agent's `--rls-listen`) beside
//! envoyproxy/ratelimit's algorithm as it runs today, which cannot be built here (Go): the same
//! service in tonic counting fixed windows in the same Redis as it does (per request a pipelined
//! GET of its descriptors' keys, then a pipelined INCRBY and EXPIRE of each;
//! `api-bench rls-redis-server`), driven by the same gRPC load.
//!
//! Subcommands:
//!
//! - `api-bench run [--write FILE]`: the whole benchmark as `cargo xtask bench` runs it (root:
//!   it creates network namespaces and starts the agent). Writes a markdown section.
//! - `api-bench floor-server --listen ADDR`: the governor floor server.
//! - `api-bench rls-redis-server --listen ADDR --redis ADDR --config FILE`: the Redis-backed
//!   rate limit service.
//! - `api-bench load --target http://ADDR [--token T] --concurrency N --duration D --mode
//!   unary|batch|rls ...`: a closed-loop gRPC load generator; prints one JSON line.

mod floor;
mod load;
mod placement;
mod process;
mod redis;
mod redis_rls;
mod report;
mod run;

use std::{net::SocketAddr, path::PathBuf, time::Duration};

use anyhow::{Context as _, Result};
use clap::{Parser, Subcommand, ValueEnum};

use self::{floor::floor_server, load::load, redis_rls::rls_redis_server, run::run};

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
/// The agent's rate limit service (`--rls-listen`).
const RLS_ADDR: &str = "127.0.0.1:50081";
/// The Redis-backed rate limit service (`api-bench rls-redis-server`).
const RLS_REDIS_ADDR: &str = "127.0.0.1:50091";
/// The rate limit service's domain in the benchmark.
const RLS_DOMAIN: &str = "bench";
/// Targets of the rate limit service at 16 in flight: calls/s over the Redis-backed service's
/// with as many requests in flight, and p99.
const RLS_CONCURRENCY: usize = 16;
const TARGET_RLS_OVER_REDIS: f64 = 2.0;
const TARGET_RLS_P99_US: f64 = 1000.0;
const FLOOR_ADDR: &str = "127.0.0.1:50061";
const REDIS_PORT: u16 = 6390;
/// redis-cell's only release on crates.io (0.3 and 0.4 were published on GitHub only).
const REDIS_CELL_VERSION: &str = "0.2.2";
/// Targets: CheckBatch decisions/s over redis-cell's pipelined decisions/s and over the governor
/// floor's; unary Check calls/s over the governor floor's, at every concurrency (the floor
/// ratios are the performance issue's, 2026-12-02).
const TARGET_BATCH_OVER_REDIS: f64 = 2.0;
const TARGET_BATCH_OVER_FLOOR: f64 = 1.0;
const TARGET_UNARY_OVER_FLOOR: f64 = 0.95;

/// The agent's config: every check allowed.
fn limiter_config() -> String {
    format!(
        "default: {{ limit: {LIMIT}, window: {}s }}\n",
        WINDOW.as_secs()
    )
}

/// The rate limit service's config (envoyproxy/ratelimit's format), as a site limiting per
/// client address and per API path writes it: each address `LIMIT` per second; under
/// `generic_key: api`, each path `LIMIT` per second, except paths under `/free/`, once per hour
/// (only the ~50% denied case sends such paths).
fn rls_config() -> String {
    format!(
        "domain: {RLS_DOMAIN}
descriptors:
  - key: remote_address
    rate_limit: {{ unit: second, requests_per_unit: {LIMIT} }}
  - key: generic_key
    value: api
    descriptors:
      - key: path
        rate_limit: {{ unit: second, requests_per_unit: {LIMIT} }}
      - key: path
        value: \"/free/*\"
        rate_limit: {{ unit: hour, requests_per_unit: 1 }}
"
    )
}

/// The path of client ID number `i` in the rate limit service's requests: `/paid/i`, or with
/// `free_half` for odd `i` `/free/i` (denied once warmed up).
fn rls_path(i: usize, free_half: bool) -> String {
    if free_half && i % 2 == 1 {
        format!("/free/{i}")
    } else {
        format!("/paid/{i}")
    }
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
pub struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// A minimal tonic server of limiter.v1.RateLimiter on governor's keyed limiter.
    FloorServer(FloorArgs),
    /// Envoy's rate limit service counting fixed windows in Redis, as envoyproxy/ratelimit does.
    RlsRedisServer(RlsRedisArgs),
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

#[derive(clap::Args)]
struct RlsRedisArgs {
    /// Address to listen on.
    #[arg(long)]
    listen: SocketAddr,
    /// The Redis server's `HOST:PORT`.
    #[arg(long)]
    redis: String,
    /// envoyproxy/ratelimit's YAML config (one file).
    #[arg(long)]
    config: PathBuf,
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
    /// `--mode rls`: half of the paths under `/free/` (limited to 1 per hour by the benchmark's
    /// config), so that about half of the requests are denied once warmed up.
    #[arg(long)]
    free_half: bool,
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
    /// Measure only these rows (a partial run; the report says so).
    #[arg(long, value_enum)]
    only: Option<Only>,
}

/// The partial runs `api-bench run --only` makes.
#[derive(ValueEnum, Clone, Copy, PartialEq, Eq, Debug)]
enum Only {
    /// The rate limit service rows (the agent's and the Redis-backed, every concurrency, and
    /// their ~50% denied rows), with the governor floor's Check at as many in flight as the
    /// service's targets, for scale; no redis-cell and no limiter.v1 rows.
    Rls,
}

#[derive(ValueEnum, Clone, Copy, PartialEq, Eq, Debug)]
enum Mode {
    /// One Check per call.
    Unary,
    /// `--batch` checks per CheckBatch call.
    Batch,
    /// One `envoy.service.ratelimit.v3` ShouldRateLimit per call in domain `bench`, two
    /// descriptors: `(remote_address, ADDRESS)` and `(generic_key, api), (path, /paid/N)`, the
    /// address and N drawn independently from `--ids` (address IDs).
    Rls,
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

/// Runs the subcommand `cli` names.
pub fn execute(cli: Cli) -> Result<()> {
    match cli.command {
        Cmd::FloorServer(args) => runtime()?.block_on(floor_server(args)),
        Cmd::RlsRedisServer(args) => runtime()?.block_on(rls_redis_server(args)),
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

#[cfg(test)]
mod tests {
    use limiter_user::proto::CheckRequest;

    use super::*;
    use super::{floor::*, load::*, redis::*, redis_rls::*, report::*};
    use envoy_types::pb::envoy::service::ratelimit::v3::rate_limit_response::Code;
    use limiter_user::rls::{
        RlsConfig, Unit,
        matching::{Applies, Descriptor, Limit, limits_for},
    };

    fn limit_of(config: &RlsConfig, entries: &[(&str, &str)]) -> Option<(u32, Unit)> {
        let descriptor = Descriptor {
            entries: entries.to_vec(),
            limit_override: None,
        };
        match &limits_for(config, RLS_DOMAIN, &[descriptor])[..] {
            [Applies::Limited(l)] => Some((l.requests_per_unit, l.unit)),
            _ => None,
        }
    }

    #[test]
    fn rls_config_limits_addresses_and_paths_and_free_paths_hourly() {
        let config = RlsConfig::parse(&rls_config()).unwrap();
        let second = Some((LIMIT, Unit::Second));
        assert_eq!(limit_of(&config, &[("remote_address", "10.1.2.3")]), second);
        assert_eq!(
            limit_of(
                &config,
                &[("generic_key", "api"), ("path", &rls_path(6, true))]
            ),
            second
        );
        assert_eq!(
            limit_of(
                &config,
                &[("generic_key", "api"), ("path", &rls_path(7, true))]
            ),
            Some((1, Unit::Hour))
        );
        assert_eq!(
            limit_of(
                &config,
                &[("generic_key", "api"), ("path", &rls_path(7, false))]
            ),
            second
        );
        assert_eq!(limit_of(&config, &[("generic_key", "api")]), None);
        assert_eq!(
            (rls_path(7, true), rls_path(7, false)),
            ("/free/7".to_owned(), "/paid/7".to_owned())
        );
    }

    fn counted(requests_per_unit: u32, shadow_mode: bool) -> Counted {
        Counted {
            key: "k".into(),
            limit: Limit {
                requests_per_unit,
                unit: Unit::Minute,
                name: None,
                shadow_mode,
                quota_mode: false,
                shared: Vec::new(),
                metric_key: None,
                metadata: None,
                overridden: false,
                series: None,
            },
            reset: 5,
        }
    }

    #[test]
    fn redis_keys_are_envoy_ratelimit_window_keys() {
        let entries = [("generic_key", "api"), ("path", "/paid/1")];
        assert_eq!(
            window_key("bench", &entries, Unit::Minute, 125),
            ("bench_generic_key_api_path_/paid/1_120".to_owned(), 55)
        );
        assert_eq!(
            window_key("bench", &[("remote_address", "10.0.0.1")], Unit::Second, 7),
            ("bench_remote_address_10.0.0.1_7".to_owned(), 1)
        );
    }

    #[test]
    fn a_descriptor_going_over_leaves_the_others_unspent() {
        let both = [counted(10, false), counted(3, false)];
        // One descriptor: nothing read, the hits added.
        assert_eq!(addends(&both[..1], None, 2), [2]);
        assert_eq!(addends(&both, Some(&[0, 0]), 2), [2, 2]);
        assert_eq!(addends(&both, Some(&[8, 1]), 2), [2, 2]);
        // The second would reach 4 > 3: only it is incremented.
        assert_eq!(addends(&both, Some(&[8, 2]), 2), [0, 2]);
        assert_eq!(addends(&both, Some(&[9, 9]), 2), [2, 0]);
    }

    #[test]
    fn redis_status_is_over_above_the_limit_unless_shadow() {
        let at = status(&counted(3, false), 3);
        assert_eq!((at.code, at.limit_remaining), (Code::Ok as i32, 0));
        let over = status(&counted(3, false), 4);
        assert_eq!(over.code, Code::OverLimit as i32);
        assert_eq!(over.duration_until_reset.unwrap().seconds, 5);
        assert_eq!(over.current_limit.unwrap().requests_per_unit, 3);
        assert_eq!(status(&counted(3, true), 4).code, Code::Ok as i32);
    }

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
        // A script's commas inside the quoted test name.
        let eval = "\"test\",\"rps\",\"p50_latency_ms\",\"p99_latency_ms\"\n\
                    \"EVAL local n = redis.call('INCRBY', KEYS[1], 1) return n 1 k\",\"83194.67\",\
                    \"0.127\",\"0.383\"\n";
        assert_eq!(parse_redis_csv(eval).unwrap(), (83194.67, 0.127, 0.383));
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
