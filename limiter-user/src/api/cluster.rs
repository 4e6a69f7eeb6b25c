//! `limiter.v1.Cluster`: what this agent knows of its cluster (`limiter cluster status`), and
//! the operator's `limiter cluster forget` of a decommissioned member.

use tonic::{Request, Response, Status};

use super::ApiState;
use crate::cluster::{NodeId, membership::ForgetRefusal};
use crate::proto::{self, cluster_server};

pub struct ClusterService(pub ApiState);

/// The status a refused `Forget` is answered with.
fn forget_status(refusal: ForgetRefusal) -> Status {
    let message = format!("cluster forget: {refusal}");
    match refusal {
        ForgetRefusal::ThisNode(_) => Status::invalid_argument(message),
        ForgetRefusal::Endpoint(..) | ForgetRefusal::Live(..) => {
            Status::failed_precondition(message)
        }
        ForgetRefusal::Unknown(_) => Status::not_found(message),
    }
}

#[tonic::async_trait]
impl cluster_server::Cluster for ClusterService {
    async fn status(
        &self,
        _request: Request<proto::ClusterStatusRequest>,
    ) -> Result<Response<proto::ClusterStatus>, Status> {
        let node = self.0.cluster.borrow().clone();
        let mut status = match node {
            Some(node) => node.status(),
            None => proto::ClusterStatus::default(),
        };
        status.not_taken_up = self.0.cluster_error.borrow().clone().unwrap_or_default();
        Ok(Response::new(status))
    }

    async fn forget(
        &self,
        request: Request<proto::ClusterForgetRequest>,
    ) -> Result<Response<proto::ClusterForgetResponse>, Status> {
        let id = request.into_inner().node_id;
        let id = NodeId::new(&id).map_err(|e| {
            // Echoed only when short: the field may hold up to a message's size.
            let shown = if id.len() <= NodeId::MAX_LEN {
                format!(" {id:?}")
            } else {
                String::new()
            };
            Status::invalid_argument(format!("cluster forget: node_id{shown}: {e}"))
        })?;
        let node = self.0.cluster.borrow().clone();
        let node = node.ok_or_else(|| {
            Status::failed_precondition(
                "cluster forget: this agent is not a cluster member (no `cluster:` section \
                 taken up)",
            )
        })?;
        node.forget(&id).map(Response::new).map_err(forget_status)
    }
}
