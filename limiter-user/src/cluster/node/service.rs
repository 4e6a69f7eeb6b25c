//! The server side of membership: the `limiter.cluster.v1.Peer` service that answers heartbeats
//! (and takes in the enrolment messages they carry), the token check on every call, and the
//! conversions between heartbeats and membership reports.

use std::{sync::Arc, time::Instant};

use prost::Message as _;
use subtle::ConstantTimeEq as _;
use tonic::{
    Request, Response, Status,
    metadata::AsciiMetadataValue,
    service::{Interceptor, interceptor::InterceptedService},
    transport::Channel,
};

use super::{NodeError, Shared, Traffic, enrolment};
use crate::{
    cluster::{
        NodeId,
        membership::{Heard, Refusal, Report},
    },
    proto::cluster::{Heartbeat, peer_client::PeerClient, peer_server::Peer},
};

pub(super) fn bearer(token: Option<&str>) -> Result<Option<AsciiMetadataValue>, NodeError> {
    token
        .map(|t| format!("Bearer {t}").parse().map_err(|_| NodeError::Token))
        .transpose()
}

pub(super) fn to_report(hb: &Heartbeat) -> Result<Report, Status> {
    let node =
        NodeId::new(&hb.node_id).map_err(|e| Status::invalid_argument(format!("node_id: {e}")))?;
    Ok(Report {
        node,
        incarnation: hb.incarnation,
        seq: hb.seq,
        members: hb.members,
        view_hash: hb.view_hash,
        policies_hash: hb.policies_hash,
        share_members: hb.share_members,
    })
}

pub(super) fn to_heartbeat(report: Report, echo: u64, shared: &Shared) -> Heartbeat {
    Heartbeat {
        node_id: report.node.to_string(),
        incarnation: shared.incarnation,
        seq: report.seq,
        echo,
        members: report.members,
        view_hash: report.view_hash,
        policies_hash: report.policies_hash,
        share_members: report.share_members,
        nonce: shared.nonce,
        reports: Vec::new(),
        grants: Vec::new(),
        to_node_id: String::new(),
    }
}

/// The peer service: answers heartbeats.
pub(super) struct PeerService(pub(super) Arc<Shared>);

#[tonic::async_trait]
impl Peer for PeerService {
    async fn heartbeat(&self, request: Request<Heartbeat>) -> Result<Response<Heartbeat>, Status> {
        // With mutual TLS a peer speaks only as its certificate's common name.
        let certified = match &self.0.tls {
            None => None,
            Some(_) => {
                let certs = request
                    .peer_certs()
                    .ok_or_else(|| Status::unauthenticated("a client certificate is required"))?;
                let der = certs
                    .first()
                    .ok_or_else(|| Status::unauthenticated("a client certificate is required"))?;
                let (subject, cn) = crate::certificate::subject(der).map_err(|e| {
                    Status::unauthenticated(format!("unreadable client certificate: {e}"))
                })?;
                Some(cn.ok_or_else(|| {
                    Status::permission_denied(format!(
                        "the client certificate {subject:?} has no common name: a peer's is its \
                         node_id"
                    ))
                })?)
            }
        };
        let hb = request.into_inner();
        Traffic::add(&self.0.traffic.bytes_received, hb.encoded_len());
        // First: a valid node_id is at most 63 bytes, so the messages below quote no more.
        let report = to_report(&hb)?;
        if let Some(cn) = certified
            && cn != hb.node_id
        {
            return Err(Status::permission_denied(format!(
                "the heartbeat says node_id {:?} but the certificate names {cn:?}: a peer speaks \
                 only as itself",
                hb.node_id
            )));
        }
        // The whole message is read before any of it is taken in: one refused for its
        // enrolment part changes no membership either.
        let incoming = enrolment::from_wire(&hb)?;
        let to = addressee(&hb.to_node_id)?;
        let now = Instant::now();
        let mut state = self.0.lock();
        let own = report.node == *state.membership.me();
        if own && hb.nonce != self.0.nonce && self.0.say("another uses this id".into(), "") {
            tracing::warn!(
                "cluster: another node uses this node's id {}: its heartbeats are refused",
                report.node
            );
        }
        let mut heard = Heard::Known;
        if !(own && hb.nonce == self.0.nonce) {
            heard = state.membership.heard(&report, now).map_err(|e| match e {
                // Bad input, not a refusal of the member.
                Refusal::NoMembers | Refusal::TooManyMembers(_) => {
                    Status::invalid_argument(format!("members: {e}"))
                }
                Refusal::OwnId(_) | Refusal::TooMany(_) => {
                    Status::failed_precondition(e.to_string())
                }
            })?;
        }
        let me = state
            .membership
            .report(self.0.incarnation, self.0.next_seq(), now, &state.view);
        if heard == Heard::Restarted {
            // Before any answer to the member: its join gate opens on one (see
            // `Heard::Restarted`). Under the state lock (state before enrolment, as everywhere),
            // so no other answer goes out while membership knows of the restart and the ledgers
            // do not yet. It waits for a round in progress (milliseconds at 10k hot clients),
            // holding up heartbeats meanwhile: only on a peer's restart.
            self.0
                .enrolment()
                .holder_restarted(&report.node, report.incarnation);
        }
        let addressed = to.as_ref().is_none_or(|to| to == state.membership.me());
        drop(state);
        let carries = !(hb.reports.is_empty() && hb.grants.is_empty());
        if carries && !addressed && self.0.say(format!("misaddressed from {}", report.node), "") {
            tracing::warn!(
                peer = %report.node,
                "cluster: a heartbeat carried enrolment messages for {}, not for this node: not \
                 taken in (the peer dialled an address that now reaches this node: reused, or \
                 shared behind a load balancer; give each member an address of its own)",
                hb.to_node_id
            );
        }
        if carries && addressed && !own {
            enrolment::take_in(&self.0, &report.node, incoming);
        }
        let mut answer = to_heartbeat(me, hb.seq, &self.0);
        if !own {
            // The answer carries this node's newest messages for the member too: one whose
            // heartbeats reach this node but that is not (or not yet) among its peers (a rolling
            // add) would otherwise never get them, and the clients it owns would stay at their
            // cold share.
            enrolment::attach_outgoing(&self.0, &report.node, &mut answer);
        }
        Traffic::add(&self.0.traffic.bytes_sent, answer.encoded_len());
        Ok(Response::new(answer))
    }
}

/// The member a heartbeat's enrolment messages are for: `None` when the field is empty (the
/// sender did not know who answers at the address yet, or predates the field), and the
/// messages are taken in as this node's. One that is not a node id is refused, as any malformed
/// field, before anything of the heartbeat is taken in.
fn addressee(to: &str) -> Result<Option<NodeId>, Status> {
    if to.is_empty() {
        return Ok(None);
    }
    NodeId::new(to)
        .map(Some)
        .map_err(|e| Status::invalid_argument(format!("to_node_id: {e}")))
}

/// Checks the bearer token on the server side, and adds it on the client side.
#[derive(Clone)]
pub(super) struct TokenCheck(pub(super) Arc<Shared>);

impl Interceptor for TokenCheck {
    fn call(&mut self, request: Request<()>) -> Result<Request<()>, Status> {
        let Some(expected) = self.0.token() else {
            if self.0.tls.is_some() {
                // Mutual TLS alone: the handshake authenticated the peer.
                return Ok(request);
            }
            return Err(Status::unauthenticated(
                "no cluster credentials are configured",
            ));
        };
        match request.metadata().get("authorization") {
            // Constant time: no early exit on the first differing byte.
            Some(given) if bool::from(given.as_bytes().ct_eq(expected.as_bytes())) => Ok(request),
            Some(_) => Err(Status::unauthenticated("wrong cluster token")),
            None => Err(Status::unauthenticated(
                "the cluster token is required (authorization: Bearer TOKEN)",
            )),
        }
    }
}

#[derive(Clone)]
pub(super) struct TokenAdd(pub(super) Arc<Shared>);

impl Interceptor for TokenAdd {
    fn call(&mut self, mut request: Request<()>) -> Result<Request<()>, Status> {
        if let Some(token) = self.0.token() {
            request.metadata_mut().insert("authorization", token);
        }
        Ok(request)
    }
}

pub(super) type Client = PeerClient<InterceptedService<Channel, TokenAdd>>;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_heartbeat_names_the_member_its_messages_are_for() {
        assert_eq!(
            addressee("n3").expect("valid"),
            Some(NodeId::new("n3").expect("id"))
        );
        assert_eq!(
            addressee("").expect("valid"),
            None,
            "a sender that does not know yet, or predates the field"
        );
        let e = addressee("n 3").expect_err("not an id");
        assert_eq!(e.code(), tonic::Code::InvalidArgument);
        assert!(e.message().starts_with("to_node_id: "), "{e:?}");
    }
}
