//! An operator's `limiter cluster forget`: a decommissioned member stops counting.

use std::{
    net::SocketAddr,
    time::{Duration, Instant},
};

use super::{Membership, NodeId};

/// Why an operator's `limiter cluster forget` of a member is refused (nothing changes).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ForgetRefusal {
    #[error("{0} is this node")]
    ThisNode(NodeId),
    #[error(
        "{0} answers at {1}, one of this node's `peers` endpoints: a member behind an endpoint \
         counts for as long as the endpoint is configured; remove it from `peers` first (a \
         `dns:` peer's record: once the name resolves without it)"
    )]
    Endpoint(NodeId, SocketAddr),
    #[error(
        "{0} was heard {1:?} ago, within peer_timeout: a member whose agent still sends \
         heartbeats is not decommissioned; stop its agent and detach its program first \
         (`limiter detach`: a stopped agent's program stays attached and enforces its share)"
    )]
    Live(NodeId, Duration),
    #[error("{0} is not a member this node counts")]
    Unknown(NodeId),
}

/// What `limiter cluster forget` changed ([`Membership::forget_member`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Forgotten {
    /// Whether the id was counted for the life of the process (an endpoint had answered as it);
    /// `false`: it was only heard from, and leaves on its own (`leaves_in`).
    pub was_learned: bool,
    /// How much longer it counts: 0 when it no longer does; otherwise (never 0) until it has
    /// been silent for longer than `forget` (it was heard from within that delay).
    pub leaves_in: Duration,
    /// This node's member count before and after.
    pub members_before: u32,
    pub members_after: u32,
}

impl Membership {
    /// An operator says member `id` is decommissioned (`limiter cluster forget`): an id an
    /// endpoint answered as, which counts for the life of the process, stops counting once it
    /// has been silent for `forget`, as a member only heard from does. Refused for this node,
    /// the node of a configured endpoint (it counts while the endpoint does) and a member heard
    /// within `peer_timeout`. Never sooner than the hysteresis: a member heard within `forget`
    /// keeps counting until that much silence (past its grants' silence limit).
    pub fn forget_member(&mut self, id: &NodeId, now: Instant) -> Result<Forgotten, ForgetRefusal> {
        if *id == self.me {
            return Err(ForgetRefusal::ThisNode(id.clone()));
        }
        if let Some((addr, _)) = self
            .endpoints
            .iter()
            .find(|(_, e)| !e.is_self && e.node.as_ref() == Some(id))
        {
            return Err(ForgetRefusal::Endpoint(id.clone(), *addr));
        }
        let silent = self
            .fresh(now)
            .find(|(seen, _)| *seen == id)
            .map(|(_, s)| now.saturating_duration_since(s.at));
        if let Some(silent) = silent
            && silent <= self.timing.peer_timeout
        {
            return Err(ForgetRefusal::Live(id.clone(), silent));
        }
        let was_learned = self.learned.contains(id);
        if !was_learned && silent.is_none() {
            return Err(ForgetRefusal::Unknown(id.clone()));
        }
        let members_before = self.members(now);
        self.learned.remove(id);
        Ok(Forgotten {
            was_learned,
            // Silent exactly `forget` still counts (`fresh`): never 0 then.
            leaves_in: silent.map_or(Duration::ZERO, |s| {
                self.timing
                    .forget
                    .saturating_sub(s)
                    .max(Duration::from_nanos(1))
            }),
            members_before,
            members_after: self.members(now),
        })
    }
}
