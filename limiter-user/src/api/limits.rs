//! The `Limits` service: listing, setting and removing policies, and watching changes.

use std::pin::Pin;

use tokio_stream::{Stream, StreamExt as _, wrappers::BroadcastStream};
use tonic::{Request, Response, Status};

use super::{ApiState, blocking, convert::*};
use crate::proto::{
    self,
    limits_server::{self},
};

pub struct LimitsService {
    pub state: ApiState,
    /// Flips to true at shutdown: `Watch` streams end then, so graceful shutdown can finish.
    pub stop: tokio::sync::watch::Receiver<bool>,
}

/// Changes a `Watch` stream buffers for a slow client before the broadcast reports it lagged.
const WATCH_BUFFER: usize = 64;

type ChangeStream = Pin<Box<dyn Stream<Item = Result<proto::LimitChange, Status>> + Send>>;

#[tonic::async_trait]
impl limits_server::Limits for LimitsService {
    async fn set(
        &self,
        request: Request<proto::SetLimitRequest>,
    ) -> Result<Response<proto::LimitChange>, Status> {
        async {
            let policy = request
                .get_ref()
                .policy
                .as_ref()
                .ok_or_else(|| Status::invalid_argument("policy: required"))?;
            let (selector, resolved) = parse_policy(policy)?;
            let scope = requested_scope(policy)?;
            let limits = self.state.limits.clone();
            let change = blocking(move || {
                limits
                    .set(&selector, resolved, scope)
                    .map_err(|e| status_of(&e))
            })
            .await?;
            Ok(Response::new(change_proto(&change)))
        }
        .await
    }

    async fn get(
        &self,
        request: Request<proto::GetLimitRequest>,
    ) -> Result<Response<proto::Policy>, Status> {
        async {
            let selector = parse_selector(&request.get_ref().r#match)?;
            let r = self
                .state
                .limits
                .get(&selector)
                .ok_or_else(|| Status::not_found(format!("no policy matches {selector}")))?;
            Ok(Response::new(policy_proto(&selector, &r.0, r.1)))
        }
        .await
    }

    async fn delete(
        &self,
        request: Request<proto::DeleteLimitRequest>,
    ) -> Result<Response<proto::LimitChange>, Status> {
        async {
            let selector = parse_selector(&request.get_ref().r#match)?;
            let limits = self.state.limits.clone();
            let change =
                blocking(move || limits.delete(&selector).map_err(|e| status_of(&e))).await?;
            Ok(Response::new(change_proto(&change)))
        }
        .await
    }

    async fn list(
        &self,
        _request: Request<proto::ListLimitsRequest>,
    ) -> Result<Response<proto::ListLimitsResponse>, Status> {
        async {
            let list = self.state.limits.list();
            Ok(Response::new(proto::ListLimitsResponse {
                policies: list
                    .iter()
                    .map(|(s, r, _, scope)| policy_proto(s, r, *scope))
                    .collect(),
                layers: list.iter().map(|(_, _, l, _)| l.as_str().into()).collect(),
            }))
        }
        .await
    }

    async fn effective(
        &self,
        _request: Request<proto::EffectiveConfigRequest>,
    ) -> Result<Response<proto::EffectiveConfig>, Status> {
        async {
            Ok(Response::new(proto::EffectiveConfig {
                yaml: self.state.limits.effective_yaml(),
            }))
        }
        .await
    }

    type WatchStream = ChangeStream;

    async fn watch(
        &self,
        request: Request<proto::WatchLimitsRequest>,
    ) -> Result<Response<Self::WatchStream>, Status> {
        async {
            // Subscribe before listing, so nothing falls between the list and the changes.
            let changes = self.state.limits.subscribe();
            let initial: Vec<Result<proto::LimitChange, Status>> = if request.get_ref().initial {
                let generation = self
                    .state
                    .limits
                    .with_tables(|t| t.map_config().map(|c| c.generation).unwrap_or(0));
                self.state
                    .limits
                    .list()
                    .iter()
                    .map(|(s, r, _, scope)| {
                        Ok(proto::LimitChange {
                            kind: proto::limit_change::Kind::Set as i32,
                            policy: Some(policy_proto(s, r, *scope)),
                            generation: generation as u64,
                            source: "initial".into(),
                        })
                    })
                    .collect()
            } else {
                Vec::new()
            };
            let mut live = BroadcastStream::new(changes).map(|c| match c {
                Ok(c) => Ok(change_proto(&c)),
                Err(tokio_stream::wrappers::errors::BroadcastStreamRecvError::Lagged(n)) => {
                    Err(Status::data_loss(format!(
                        "this watcher fell {n} changes behind; watch again with initial = true"
                    )))
                }
            });
            // Forward until the client goes away or the agent stops.
            let (tx, rx) = tokio::sync::mpsc::channel(WATCH_BUFFER);
            let mut stop = self.stop.clone();
            tokio::spawn(async move {
                // A client that stops reading blocks `send`: wait for it only until shutdown.
                // (`is_ok` drops the borrow the wait returns, keeping the task `Send`.)
                let closed = tx.clone();
                let forward = async move {
                    for item in initial {
                        if tx.send(item).await.is_err() {
                            return;
                        }
                    }
                    while let Some(item) = live.next().await {
                        let lagged = item.is_err();
                        if tx.send(item).await.is_err() || lagged {
                            return;
                        }
                    }
                };
                tokio::select! {
                    _ = async { stop.wait_for(|s| *s).await.is_ok() } => {}
                    _ = closed.closed() => {}
                    _ = forward => {}
                }
            });
            let stream: Self::WatchStream =
                Box::pin(tokio_stream::wrappers::ReceiverStream::new(rx));
            Ok(Response::new(stream))
        }
        .await
    }
}
