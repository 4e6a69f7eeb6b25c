//! The `RateLimiter` service: checks, single and batched, through the check program: a single
//! check or a batch of up to [`INLINE_CHECKS`] on the runtime's worker, a larger batch in the
//! caller's check lane (off the async runtime, see `check_lanes`). A TCP caller's checks that
//! would create client entries in the packet path's map are counted against its new-client cap:
//! spent at once when all of its addresses could be new and still fit, else read first and
//! counted exactly.

use std::sync::Arc;

use limiter_common::maps::CHECK_BATCH;
use tonic::{Request, Response, Status};

use super::{
    ApiState,
    callers::{Caller, CallerLimits},
    check_lanes::CheckLanes,
    convert::*,
};
use crate::{
    check::{ClientId, Decision},
    proto::{
        self,
        rate_limiter_server::{self},
    },
};

/// Checks decided on the runtime's worker rather than in a check lane: up to four program runs
/// of a full frame (`CHECK_BATCH` checks each; eight when a TCP caller's new-client cap is
/// nearly spent and the addresses are read first). A whole CheckBatch call of 124 costs about
/// 150 µs of CPU on this machine (1.2 µs a check on one CPU, tonic included), of which the
/// blocking part is less: about what a task may take between awaits. Meanwhile the runtime's
/// other worker serves, unless it is deciding such a batch too. The hop to a blocking thread
/// and back is two context switches: it took a single Check from 49 to 70-125 µs (p50) at one
/// call in flight and halved its calls per second, and CheckBatches of 100 made 26-29% fewer
/// decisions per second with the agent on one CPU, 7-28% fewer on two (BENCHMARKS.md, Measured
/// by hand). Larger batches, which block for longer (one of 1,000 about a millisecond), go to
/// the lanes, which bound how many wait.
pub const INLINE_CHECKS: usize = 4 * CHECK_BATCH;

pub struct RateLimiterService {
    pub state: ApiState,
    pub lanes: Arc<CheckLanes>,
    pub callers: Arc<CallerLimits>,
}

#[tonic::async_trait]
impl rate_limiter_server::RateLimiter for RateLimiterService {
    async fn check(
        &self,
        request: Request<proto::CheckRequest>,
    ) -> Result<Response<proto::CheckResponse>, Status> {
        async {
            let caller = Caller::of(&request)?;
            let check = parse_check(request.get_ref(), None)?;
            let d = self
                .decide(caller, vec![check])
                .await?
                .pop()
                .ok_or_else(|| Status::internal("a check without a decision"))?;
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
            let caller = Caller::of(&request)?;
            let checks = &request.get_ref().checks;
            if checks.len() > self.state.max_batch {
                return Err(Status::invalid_argument(format!(
                    "checks: {} checks in one batch, at most {}",
                    checks.len(),
                    self.state.max_batch
                )));
            }
            // The access layer charged the call as one; a batch counts one call per check.
            if let Caller::Tcp(key) = &caller {
                self.callers
                    .charge_calls(key, (checks.len() as u32).saturating_sub(1))?;
            }
            // Validate all first: a bad check rejects the batch before anything is spent.
            let parsed = checks
                .iter()
                .enumerate()
                .map(|(i, c)| parse_check(c, Some(i)))
                .collect::<Result<Vec<_>, _>>()?;
            let decisions = self.decide(caller, parsed).await?;
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
    /// Decides `checks` in order, on the worker or on a thread of `caller`'s lane (see
    /// [`INLINE_CHECKS`]). For a TCP caller with the new-client cap on, the checks that would
    /// create client entries are counted, and a call over the cap is refused whole before
    /// anything is spent.
    async fn decide(
        &self,
        caller: Caller,
        checks: Vec<(ClientId, u32)>,
    ) -> Result<Vec<Decision>, Status> {
        let checker = Arc::clone(&self.state.checker);
        let callers = Arc::clone(&self.callers);
        let lane = caller.clone();
        let small = checks.len() <= INLINE_CHECKS;
        let work = move || {
            let refs: Vec<(&ClientId, u32)> = checks.iter().map(|(id, h)| (id, *h)).collect();
            if let Caller::Tcp(key) = &caller
                && callers.caps_new_clients()
            {
                return callers.check_capped(&checker, key, &refs);
            }
            checker.check_all(&refs).map_err(check_status)
        };
        if small {
            return work();
        }
        self.lanes.run(&lane, work).await
    }

    fn count(&self, d: &Decision) {
        self.state.counters.check(d.allowed && !d.dry_run_denied);
    }
}
