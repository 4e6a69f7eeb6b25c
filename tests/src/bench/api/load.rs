//! The closed-loop gRPC load generator (`api-bench load`): calls, decisions and latency.

use std::{sync::Arc, time::Instant};

use anyhow::{Context as _, Result, ensure};
use envoy_types::pb::envoy::{
    extensions::common::ratelimit::v3::{RateLimitDescriptor, rate_limit_descriptor::Entry},
    service::ratelimit::v3::{
        RateLimitRequest, rate_limit_response::Code,
        rate_limit_service_client::RateLimitServiceClient,
    },
};
use hdrhistogram::Histogram;
use limiter_user::proto::{
    CheckBatchRequest, CheckRequest, rate_limiter_client::RateLimiterClient,
};
use serde::{Deserialize, Serialize};
use tonic::{
    Request, Status,
    metadata::{Ascii, MetadataValue},
    transport::{Channel, Endpoint},
};

use super::{IdKind, LoadArgs, MAX_BATCH, Mode, RLS_DOMAIN, STREAMS_PER_CONNECTION, rls_path};

/// The clients of one connection: limiter.v1's and Envoy's rate limit service's.
pub(super) struct Clients {
    pub(super) v1: RateLimiterClient<Channel>,
    pub(super) rls: RateLimitServiceClient<Channel>,
}

impl Clients {
    pub(super) fn new(channel: Channel) -> Clients {
        Clients {
            v1: RateLimiterClient::new(channel.clone()),
            rls: RateLimitServiceClient::new(channel),
        }
    }
}

/// What one `load` run measured; printed as JSON.
#[derive(Serialize, Deserialize, Debug, Clone)]
pub(super) struct LoadReport {
    /// Calls completed within the measured window.
    pub(super) calls: u64,
    /// Checks decided by those calls.
    pub(super) decisions: u64,
    /// Of which denied.
    pub(super) denied: u64,
    /// Failed calls (warm-up included).
    pub(super) errors: u64,
    pub(super) first_error: Option<String>,
    /// Length of the measured window.
    pub(super) seconds: f64,
    /// Per-call latency of the measured calls.
    pub(super) p50_us: f64,
    pub(super) p99_us: f64,
}

impl LoadReport {
    pub(super) fn calls_per_s(&self) -> f64 {
        self.calls as f64 / self.seconds
    }
    pub(super) fn decisions_per_s(&self) -> f64 {
        self.decisions as f64 / self.seconds
    }
}

/// `count` distinct client IDs. Addresses: a bijection of 0..2^24 (multiplying by an odd
/// constant modulo 2^24) spreads them pseudo-randomly over 10.0.0.0/8.
pub(super) fn client_ids(kind: IdKind, count: usize) -> Vec<String> {
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
pub(super) struct Rng(pub(super) u64);

impl Rng {
    pub(super) fn new(seed: u64) -> Rng {
        // splitmix64 of the seed: never zero for distinct small seeds.
        let mut z = seed.wrapping_add(0x9E37_79B9_7F4A_7C15);
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        Rng((z ^ (z >> 31)) | 1)
    }

    pub(super) fn below(&mut self, n: usize) -> usize {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        let x = self.0.wrapping_mul(0x2545_F491_4F6C_DD1D);
        (((x >> 32) * n as u64) >> 32) as usize
    }
}

/// One worker's counts.
pub(super) struct Tally {
    pub(super) latency_ns: Histogram<u64>,
    pub(super) calls: u64,
    pub(super) decisions: u64,
    pub(super) denied: u64,
    pub(super) errors: u64,
    pub(super) first_error: Option<String>,
}

impl Tally {
    pub(super) fn new() -> Result<Tally> {
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

    pub(super) fn merge(&mut self, other: Tally) -> Result<()> {
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
pub(super) struct Plan {
    pub(super) ids: Vec<String>,
    /// The rate limit service's paths (`--mode rls`), one per ID.
    pub(super) paths: Vec<String>,
    pub(super) auth: Option<MetadataValue<Ascii>>,
    pub(super) mode: Mode,
    pub(super) batch: usize,
    pub(super) measure_from: Instant,
    pub(super) end: Instant,
}

impl Plan {
    pub(super) fn request<T>(&self, message: T) -> Request<T> {
        let mut request = Request::new(message);
        if let Some(auth) = &self.auth {
            request.metadata_mut().insert("authorization", auth.clone());
        }
        request
    }

    pub(super) fn check(&self, rng: &mut Rng) -> CheckRequest {
        CheckRequest {
            client_id: self.ids[rng.below(self.ids.len())].clone(),
            hits: None,
        }
    }

    /// The rate limit service's request: an address descriptor and a nested path descriptor,
    /// the address and the path drawn independently.
    pub(super) fn rls_request(&self, rng: &mut Rng) -> RateLimitRequest {
        let entry = |key: &str, value: &str| Entry {
            key: key.into(),
            value: value.into(),
        };
        let address = &self.ids[rng.below(self.ids.len())];
        let path = &self.paths[rng.below(self.paths.len())];
        RateLimitRequest {
            domain: RLS_DOMAIN.into(),
            descriptors: vec![
                RateLimitDescriptor {
                    entries: vec![entry("remote_address", address)],
                    ..RateLimitDescriptor::default()
                },
                RateLimitDescriptor {
                    entries: vec![entry("generic_key", "api"), entry("path", path)],
                    ..RateLimitDescriptor::default()
                },
            ],
            hits_addend: 0,
        }
    }

    /// One call: `(decisions, denied)`.
    pub(super) async fn call(
        &self,
        clients: &mut Clients,
        rng: &mut Rng,
    ) -> Result<(u64, u64), Status> {
        let client = &mut clients.v1;
        match self.mode {
            Mode::Rls => {
                let response = clients.rls.should_rate_limit(self.rls_request(rng)).await?;
                let response = response.get_ref();
                if response.statuses.len() != 2 {
                    return Err(Status::internal(format!(
                        "ShouldRateLimit of 2 descriptors returned {} statuses",
                        response.statuses.len()
                    )));
                }
                let over = response.overall_code == Code::OverLimit as i32;
                Ok((1, u64::from(over)))
            }
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
pub(super) async fn worker(plan: Arc<Plan>, mut client: Clients, seed: u64) -> Result<Tally> {
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

pub(super) async fn load(args: &LoadArgs) -> Result<LoadReport> {
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
        paths: match args.mode {
            Mode::Rls => (0..args.ids).map(|i| rls_path(i, args.free_half)).collect(),
            Mode::Unary | Mode::Batch => Vec::new(),
        },
        auth,
        mode: args.mode,
        batch: args.batch,
        measure_from: Instant::now(),
        end: Instant::now(),
    };
    // One call first, so a wrong token or address fails here with the server's reason.
    plan.call(
        &mut Clients::new(channels[0].clone()),
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
        let client = Clients::new(channels[i % channels.len()].clone());
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
