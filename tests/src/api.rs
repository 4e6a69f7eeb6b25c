//! A blocking client of the agent's gRPC API for the privileged tests: the Rust client
//! (`limiter_user::cli::client`) on its own single-threaded runtime, every call bounded in time.
//!
//! Use it on the thread (and so in the network namespace) that created it, and drop it before
//! the agent stops: its runtime runs only during a call, so between calls its connection does
//! not answer the server's shutdown handshake, and the agent's graceful stop would wait its 5 s
//! for it (a test declares its `Api` after its `Agent`, so it is dropped first).

use std::{
    future::Future,
    thread,
    time::{Duration, Instant},
};

use anyhow::{Result, anyhow};
use limiter_user::{
    cli::client::{self, Clients, Target},
    proto,
};
use tonic::Status;

/// Awaits an API call for at most `timeout`.
pub async fn bounded<T>(
    timeout: Duration,
    call: impl Future<Output = Result<tonic::Response<T>, Status>>,
) -> Result<T, Status> {
    match tokio::time::timeout(timeout, call).await {
        Ok(result) => result.map(tonic::Response::into_inner),
        Err(_) => Err(Status::deadline_exceeded(format!(
            "the test gave up on the call after {timeout:?}"
        ))),
    }
}

pub struct Api {
    pub rt: tokio::runtime::Runtime,
    pub clients: Clients,
    /// How long a call (and each connection attempt) may take before the test gives up on it.
    pub call_timeout: Duration,
}

impl Api {
    /// Connects to `target`, retrying for up to 10 s: the agent binds its API listeners just
    /// after attaching, so a ready agent may not be listening yet.
    pub fn connect(target: &Target, call_timeout: Duration) -> Result<Api> {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let attempt = rt.block_on(async {
                tokio::time::timeout(call_timeout, client::connect(target)).await
            });
            let error = match attempt {
                Ok(Ok(clients)) => {
                    return Ok(Api {
                        rt,
                        clients,
                        call_timeout,
                    });
                }
                Ok(Err(e)) => e,
                Err(_) => anyhow!("connect did not finish within {call_timeout:?}"),
            };
            if Instant::now() >= deadline {
                return Err(error.context(format!("connecting to the agent API at {target:?}")));
            }
            thread::sleep(Duration::from_millis(20));
        }
    }

    /// Connects to the agent's Unix socket.
    pub fn unix(socket: &str, call_timeout: Duration) -> Result<Api> {
        Api::connect(
            &Target {
                api: Some(socket.to_owned()),
                ..Target::default()
            },
            call_timeout,
        )
    }

    /// Runs `call` on the client's runtime, bounded by its call timeout.
    pub fn call<T>(
        &self,
        call: impl Future<Output = Result<tonic::Response<T>, Status>>,
    ) -> Result<T, Status> {
        self.rt.block_on(bounded(self.call_timeout, call))
    }

    pub fn check(&mut self, id: &str, hits: u32) -> Result<proto::CheckResponse, Status> {
        let request = proto::CheckRequest {
            client_id: id.to_owned(),
            hits: Some(hits),
        };
        let call = self.clients.rate_limiter.check(request);
        self.rt.block_on(bounded(self.call_timeout, call))
    }

    /// One CheckBatch of one hit for each of `ids`.
    pub fn batch(&mut self, ids: &[String]) -> Result<proto::CheckBatchResponse, Status> {
        let checks = ids
            .iter()
            .map(|id| proto::CheckRequest {
                client_id: id.clone(),
                hits: Some(1),
            })
            .collect();
        let call = self
            .clients
            .rate_limiter
            .check_batch(proto::CheckBatchRequest { checks });
        self.rt.block_on(bounded(self.call_timeout, call))
    }

    pub fn set(&mut self, policy: proto::Policy) -> Result<proto::LimitChange, Status> {
        let request = proto::SetLimitRequest {
            policy: Some(policy),
        };
        let call = self.clients.limits.set(request);
        self.rt.block_on(bounded(self.call_timeout, call))
    }

    pub fn delete(&mut self, matches: &str) -> Result<proto::LimitChange, Status> {
        let request = proto::DeleteLimitRequest {
            r#match: matches.to_owned(),
        };
        let call = self.clients.limits.delete(request);
        self.rt.block_on(bounded(self.call_timeout, call))
    }

    pub fn list(&mut self) -> Result<Vec<proto::Policy>, Status> {
        let call = self.clients.limits.list(proto::ListLimitsRequest {});
        self.rt
            .block_on(bounded(self.call_timeout, call))
            .map(|l| l.policies)
    }

    pub fn global(&mut self) -> Result<proto::GlobalStats, Status> {
        let call = self.clients.stats.global(proto::GlobalStatsRequest {});
        self.rt.block_on(bounded(self.call_timeout, call))
    }

    pub fn client_stats(&mut self, id: &str) -> Result<proto::ClientStats, Status> {
        let request = proto::ClientStatsRequest {
            client_id: id.to_owned(),
        };
        let call = self.clients.stats.client(request);
        self.rt.block_on(bounded(self.call_timeout, call))
    }
}
