//! The cluster: its config section (`config`); its algorithms, pure and with time injected: who
//! the members are and what share of a global limit each enforces (`membership`, `shares`),
//! how a hot client's limit is split so that the shares in force never sum above L (`lease`),
//! which member owns a client (`owner`), and how members' reports merge into demand
//! (`demand`); and this agent as a member, over the wire (`node`), the one part that does I/O.
//!
//! The model (issue 12): each member enforces its own share of L exactly in its maps. A client
//! no one has enrolled gets the cold share ⌊L/N⌋ everywhere, with no sync. A client that grows hot
//! is enrolled by its owner, which water-fills the members' reported demand into grants; cuts
//! take effect at once, raises only in the room that acknowledged cuts and lapsed leases leave.

pub mod config;
pub mod demand;
pub mod enrolment;
pub mod lease;
pub mod membership;
pub mod node;
pub mod owner;
pub mod shares;

use std::{fmt, sync::Arc};

use self::config::ClusterConfig;

/// What the cluster's node needs of the policies in force: the `cluster:` section and the
/// global policies.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct ClusterPolicies {
    pub config: Option<ClusterConfig>,
    pub global: Vec<GlobalPolicy>,
}

/// A global `limit` policy in force: its `match` as written, limit and window (µs).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct GlobalPolicy {
    /// The policy's id (its index in the config, 1-based): how reports name it.
    pub id: u16,
    pub matches: String,
    pub limit: u32,
    pub window_us: u32,
}

impl ClusterPolicies {
    /// A hash of the global policies and the lease timing (`peer_timeout`), carried in
    /// heartbeats so that members notice they disagree: members whose leases differ enrol no
    /// client together (a new owner's learning mode lasts its own lease, which must cover the
    /// raises an earlier owner granted).
    pub fn hash(&self) -> u64 {
        let mut text = String::new();
        if let Some(config) = &self.config {
            text.push_str(&format!("peer_timeout {:?}\n", config.peer_timeout));
        }
        for g in &self.global {
            text.push_str(&format!(
                "{} {} {} {}\n",
                g.id, g.matches, g.limit, g.window_us
            ));
        }
        membership::stable_hash(text.as_bytes())
    }
}

/// A member's id: unique and stable (peers are identified by it, never by address). 1 to 63
/// bytes of ASCII letters, digits, `.`, `_` and `-`, so it is safe in logs, metrics labels and
/// file names. Shared, not copied: an owner's ledgers and messages name the same members for
/// every hot client, every round.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct NodeId(Arc<str>);

/// Why a node id is not valid.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum NodeIdError {
    #[error("a node id is 1 to {max} bytes, not {0}", max = NodeId::MAX_LEN)]
    Length(usize),
    #[error("a node id has only ASCII letters, digits, '.', '_' and '-', not {0:?}")]
    Character(char),
}

impl NodeId {
    /// Longest id, in bytes.
    pub const MAX_LEN: usize = 63;

    pub fn new(id: &str) -> Result<NodeId, NodeIdError> {
        if id.is_empty() || id.len() > Self::MAX_LEN {
            return Err(NodeIdError::Length(id.len()));
        }
        if let Some(c) = id
            .chars()
            .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-')))
        {
            return Err(NodeIdError::Character(c));
        }
        Ok(NodeId(Arc::from(id)))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for NodeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn node_ids_are_checked() {
        assert_eq!(
            NodeId::new("n1").map(|n| n.to_string()),
            Ok("n1".to_owned())
        );
        assert_eq!(NodeId::new(""), Err(NodeIdError::Length(0)));
        assert_eq!(NodeId::new(&"a".repeat(64)), Err(NodeIdError::Length(64)));
        assert_eq!(NodeId::new("n 1"), Err(NodeIdError::Character(' ')));
        assert_eq!(
            NodeId::new("n1\0").map_err(|e| e.to_string()),
            Err("a node id has only ASCII letters, digits, '.', '_' and '-', not '\\0'".to_owned())
        );
    }
}
