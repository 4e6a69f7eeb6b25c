//! The `RateLimiter` service: checks, single and batched, through the check program.

use tonic::{Request, Response, Status};

use super::{ApiState, convert::*};
use crate::{
    check::{ClientId, Decision},
    proto::{
        self,
        rate_limiter_server::{self},
    },
};

pub struct RateLimiterService(pub ApiState);

#[tonic::async_trait]
impl rate_limiter_server::RateLimiter for RateLimiterService {
    async fn check(
        &self,
        request: Request<proto::CheckRequest>,
    ) -> Result<Response<proto::CheckResponse>, Status> {
        async {
            let (id, hits) = parse_check(request.get_ref(), None)?;
            let d = self.0.checker.check(&id, hits).map_err(check_status)?;
            self.count(&d);
            Ok(Response::new(decision_proto(&d)))
        }
        .await
    }

    async fn check_batch(
        &self,
        request: Request<proto::CheckBatchRequest>,
    ) -> Result<Response<proto::CheckBatchResponse>, Status> {
        async {
            let checks = &request.get_ref().checks;
            if checks.len() > self.0.max_batch {
                return Err(Status::invalid_argument(format!(
                    "checks: {} checks in one batch, at most {}",
                    checks.len(),
                    self.0.max_batch
                )));
            }
            // Validate all first: a bad check rejects the batch before anything is spent.
            let parsed = checks
                .iter()
                .enumerate()
                .map(|(i, c)| parse_check(c, Some(i)))
                .collect::<Result<Vec<_>, _>>()?;
            let refs: Vec<(&ClientId, u32)> = parsed.iter().map(|(id, h)| (id, *h)).collect();
            let decisions = self.0.checker.check_all(&refs).map_err(check_status)?;
            let results = decisions
                .iter()
                .map(|d| {
                    self.count(d);
                    decision_proto(d)
                })
                .collect();
            Ok(Response::new(proto::CheckBatchResponse { results }))
        }
        .await
    }
}

impl RateLimiterService {
    fn count(&self, d: &Decision) {
        self.0.counters.check(d.allowed && !d.dry_run_denied);
    }
}
