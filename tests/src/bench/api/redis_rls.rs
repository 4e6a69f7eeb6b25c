//! The Redis-backed rate limit service (`api-bench rls-redis-server`): Envoy's
//! `ShouldRateLimit` answered as envoyproxy/ratelimit answers it with its default fixed-window
//! Redis cache (`src/redis/fixed_cache_impl.go`), so that the benchmark compares the agent with
//! "a rate limit service in front of Redis" through the same gRPC load:
//!
//! - each descriptor with a limit has the key `DOMAIN_KEY1_VALUE1_..._WINDOWSTART` (the window
//!   aligned to the epoch, one key per window);
//! - a request of more than one such descriptor first reads all of its keys in one pipelined
//!   round trip (`GET` each): if one would go over its limit, the others are incremented by 0 so
//!   that a denial does not eat their budget;
//! - then, in one pipelined round trip, `INCRBY key hits` and `EXPIRE key UNIT_SECONDS` per
//!   descriptor; a descriptor whose count after the increment is above its limit is
//!   `OVER_LIMIT` (reported, not enforced, in `shadow_mode`);
//! - each request takes a connection of its own from a pool (radix's pool without implicit
//!   pipelining, envoyproxy/ratelimit's default), which grows to the calls in flight.
//!
//! The rules are the agent's own parser and matcher (`limiter_user::rls`), which follow
//! envoyproxy/ratelimit's. Left out: its local over-limit cache (off by default), stats,
//! response headers and the per-second Redis split.

use std::{
    sync::{Arc, Mutex},
    time::{SystemTime, UNIX_EPOCH},
};

use anyhow::{Context as _, Result};
use envoy_types::pb::{
    envoy::service::ratelimit::v3::{
        RateLimitRequest, RateLimitResponse,
        rate_limit_response::{Code, DescriptorStatus, RateLimit as PbLimit, rate_limit::Unit},
        rate_limit_service_server::{RateLimitService, RateLimitServiceServer},
    },
    google::protobuf::Duration as PbDuration,
};
use limiter_user::rls::{
    RlsConfig,
    config::Unit as RlsUnit,
    matching::{Applies, Descriptor, Limit, limits_for},
};
use redis::aio::MultiplexedConnection;
use tonic::{Request, Response, Status, transport::Server};

use super::RlsRedisArgs;

/// One descriptor's part of a request: its Redis key and limit, or nothing to count.
#[derive(Debug, PartialEq)]
pub(super) struct Counted {
    pub(super) key: String,
    pub(super) limit: Limit,
    /// Seconds until the window ends.
    pub(super) reset: u64,
}

/// The key of `entries`' window under `limit` at `now` (seconds since the epoch), as
/// envoyproxy/ratelimit's cache key generator writes it; and the seconds left in the window.
pub(super) fn window_key(
    domain: &str,
    entries: &[(&str, &str)],
    unit: RlsUnit,
    now: u64,
) -> (String, u64) {
    let divider = unit.seconds();
    let start = now / divider * divider;
    let mut key = String::with_capacity(64);
    key.push_str(domain);
    key.push('_');
    for (k, v) in entries {
        key.push_str(k);
        key.push('_');
        key.push_str(v);
        key.push('_');
    }
    key.push_str(&start.to_string());
    (key, start + divider - now)
}

/// How much each counted descriptor's INCRBY adds, given the counts read before (`None`: not
/// read, a request of one descriptor): `hits` for all, unless one would go over its limit, in
/// which case that one gets `hits` and the others 0 (envoyproxy/ratelimit's near-limit rule).
pub(super) fn addends(counted: &[Counted], before: Option<&[u32]>, hits: u32) -> Vec<u32> {
    let over = before.and_then(|before| {
        counted
            .iter()
            .zip(before)
            .position(|(c, &n)| n.saturating_add(hits) > c.limit.requests_per_unit)
    });
    match over {
        None => vec![hits; counted.len()],
        Some(at) => (0..counted.len())
            .map(|i| if i == at { hits } else { 0 })
            .collect(),
    }
}

/// Status of one counted descriptor whose count is `after` once incremented.
pub(super) fn status(counted: &Counted, after: u32) -> DescriptorStatus {
    let limit = &counted.limit;
    let over = after > limit.requests_per_unit && !limit.shadow_mode;
    DescriptorStatus {
        code: if over { Code::OverLimit } else { Code::Ok } as i32,
        current_limit: Some(PbLimit {
            name: limit.name.clone().unwrap_or_default(),
            requests_per_unit: limit.requests_per_unit,
            unit: pb_unit(limit.unit) as i32,
        }),
        limit_remaining: limit.requests_per_unit.saturating_sub(after),
        duration_until_reset: Some(PbDuration {
            seconds: counted.reset as i64,
            nanos: 0,
        }),
        ..DescriptorStatus::default()
    }
}

fn pb_unit(unit: RlsUnit) -> Unit {
    match unit {
        RlsUnit::Second => Unit::Second,
        RlsUnit::Minute => Unit::Minute,
        RlsUnit::Hour => Unit::Hour,
        RlsUnit::Day => Unit::Day,
        RlsUnit::Week => Unit::Week,
        RlsUnit::Month => Unit::Month,
        RlsUnit::Year => Unit::Year,
    }
}

/// The service: the rules and a pool of Redis connections.
pub(super) struct RedisRls {
    config: RlsConfig,
    client: redis::Client,
    /// Idle connections; a request takes one (or opens one) and puts it back.
    pool: Mutex<Vec<MultiplexedConnection>>,
}

impl RedisRls {
    async fn connection(&self) -> Result<MultiplexedConnection, Status> {
        let idle = self.pool.lock().unwrap_or_else(|e| e.into_inner()).pop();
        match idle {
            Some(connection) => Ok(connection),
            None => self
                .client
                .get_multiplexed_async_connection()
                .await
                .map_err(unavailable),
        }
    }

    async fn answer(&self, request: &RateLimitRequest) -> Result<RateLimitResponse, Status> {
        if request.domain.is_empty() {
            return Err(Status::invalid_argument("domain: must not be empty"));
        }
        if request.descriptors.is_empty() {
            return Err(Status::invalid_argument(
                "descriptors: at least one descriptor is needed",
            ));
        }
        let hits = request.hits_addend.max(1);
        let descriptors: Vec<Descriptor<'_>> = request
            .descriptors
            .iter()
            .map(|d| Descriptor {
                entries: d
                    .entries
                    .iter()
                    .map(|e| (e.key.as_str(), e.value.as_str()))
                    .collect(),
                limit_override: None,
            })
            .collect();
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_err(|e| Status::internal(format!("the clock is before 1970: {e}")))?
            .as_secs();
        // Per descriptor: its index among the counted ones, if it has a limit.
        let mut counted = Vec::new();
        let mut index = Vec::with_capacity(descriptors.len());
        for (d, applies) in
            descriptors
                .iter()
                .zip(limits_for(&self.config, &request.domain, &descriptors))
        {
            match applies {
                Applies::Limited(limit) => {
                    let (key, reset) = window_key(&request.domain, &d.entries, limit.unit, now);
                    index.push(Some(counted.len()));
                    counted.push(Counted { key, limit, reset });
                }
                Applies::Nothing | Applies::Unlimited => index.push(None),
            }
        }
        let mut after = Vec::new();
        if !counted.is_empty() {
            let mut connection = self.connection().await?;
            let before: Option<Vec<Option<u32>>> = if counted.len() > 1 {
                let mut pipe = redis::pipe();
                for c in &counted {
                    pipe.get(&c.key);
                }
                Some(
                    pipe.query_async(&mut connection)
                        .await
                        .map_err(unavailable)?,
                )
            } else {
                None
            };
            let before: Option<Vec<u32>> =
                before.map(|b| b.into_iter().map(Option::unwrap_or_default).collect());
            let mut pipe = redis::pipe();
            for (c, addend) in counted
                .iter()
                .zip(addends(&counted, before.as_deref(), hits))
            {
                pipe.incr(&c.key, addend)
                    .expire(&c.key, c.limit.unit.seconds() as i64)
                    .ignore();
            }
            after = pipe
                .query_async(&mut connection)
                .await
                .map_err(unavailable)?;
            if after.len() != counted.len() {
                return Err(Status::unavailable(format!(
                    "redis answered {} counts to {} INCRBY",
                    after.len(),
                    counted.len()
                )));
            }
            self.pool
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .push(connection);
        }
        let statuses: Vec<DescriptorStatus> = index
            .iter()
            .map(|at| match at {
                Some(at) => status(&counted[*at], after[*at]),
                None => DescriptorStatus {
                    code: Code::Ok as i32,
                    ..DescriptorStatus::default()
                },
            })
            .collect();
        let over = statuses.iter().any(|s| s.code == Code::OverLimit as i32);
        Ok(RateLimitResponse {
            overall_code: if over { Code::OverLimit } else { Code::Ok } as i32,
            statuses,
            ..RateLimitResponse::default()
        })
    }
}

fn unavailable(e: redis::RedisError) -> Status {
    Status::unavailable(format!("redis: {e}"))
}

#[tonic::async_trait]
impl RateLimitService for RedisRls {
    async fn should_rate_limit(
        &self,
        request: Request<RateLimitRequest>,
    ) -> Result<Response<RateLimitResponse>, Status> {
        self.answer(request.get_ref()).await.map(Response::new)
    }
}

/// Serves `ShouldRateLimit` on `args.listen` from `args.config`, counting in the Redis at
/// `args.redis`.
pub(super) async fn rls_redis_server(args: RlsRedisArgs) -> Result<()> {
    let (config, _) = RlsConfig::load(&args.config)
        .with_context(|| format!("loading {}", args.config.display()))?;
    // TCP_NODELAY as Go's net package sets it on every connection (radix's included).
    let info = redis::IntoConnectionInfo::into_connection_info(format!("redis://{}/", args.redis))
        .with_context(|| format!("--redis {}", args.redis))?
        .set_tcp_settings(redis::io::tcp::TcpSettings::default().set_nodelay(true));
    let client = redis::Client::open(info).with_context(|| format!("--redis {}", args.redis))?;
    // Fails here, not at the first request, if Redis does not answer.
    let connection = client
        .get_multiplexed_async_connection()
        .await
        .with_context(|| format!("connecting to Redis at {}", args.redis))?;
    let service = RedisRls {
        config,
        client,
        pool: Mutex::new(vec![connection]),
    };
    Server::builder()
        .add_service(RateLimitServiceServer::from_arc(Arc::new(service)))
        .serve(args.listen)
        .await
        .with_context(|| format!("serving on {}", args.listen))
}
