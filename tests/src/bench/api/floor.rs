//! The gRPC floor: a minimal tonic server of limiter.v1.RateLimiter on governor's keyed limiter.

use std::{num::NonZeroU32, time::Duration};

use anyhow::{Context as _, Result};
use governor::{
    Quota,
    clock::{Clock as _, DefaultClock},
    middleware::StateInformationMiddleware,
    state::keyed::DefaultKeyedStateStore,
};
use limiter_user::proto::{
    Action, CheckBatchRequest, CheckBatchResponse, CheckRequest, CheckResponse,
    rate_limiter_server::{RateLimiter, RateLimiterServer},
};
use tonic::{Request, Response, Status, transport::Server};

use super::{FloorArgs, MAX_BATCH};

pub(super) type Governor = governor::RateLimiter<
    String,
    DefaultKeyedStateStore<String>,
    DefaultClock,
    StateInformationMiddleware,
>;

/// limiter.v1.RateLimiter on governor's keyed GCRA limiter (DashMap state, default clock): what
/// a gRPC rate limiter costs when the decision itself is nearly free.
pub(super) struct Floor {
    pub(super) limiter: Governor,
    pub(super) quota: Quota,
    pub(super) window: prost_types::Duration,
}

impl Floor {
    pub(super) fn new(limit: u32, window: Duration) -> Result<Floor> {
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
    pub(super) fn decide(&self, check: &CheckRequest) -> Result<CheckResponse, Status> {
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

pub(super) fn proto_duration(d: Duration) -> prost_types::Duration {
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

pub(super) async fn floor_server(args: FloorArgs) -> Result<()> {
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
