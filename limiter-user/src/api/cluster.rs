//! `limiter.v1.Cluster`: what this agent knows of its cluster (`limiter cluster status`).

use tonic::{Request, Response, Status};

use super::ApiState;
use crate::proto::{self, cluster_server};

pub struct ClusterService(pub ApiState);

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
}
