//! The cluster: its config section (`config`); its algorithms, pure and with time injected: who
//! the members are and what share of a global limit each enforces (`membership`, `shares`),
//! how a hot client's limit is split so that the shares in force never sum above L, and how the
//! owner merges each holder's reports (`lease`), which member owns a client (`owner`), and how a
//! holder estimates its demand (`demand`); and this agent as a member, over the wire (`node`),
//! the one part that does I/O.
//!
//! The model (issue 12): each member enforces its own share of L exactly in its maps. A client
//! no one has enrolled gets the cold share ⌊L/N⌋ everywhere, with no sync. A client that grows hot
//! is enrolled by its owner, which water-fills the members' reported demand into grants; cuts
//! take effect at once, raises only in the room that acknowledged cuts and lapsed leases leave.

pub mod config;
mod demand;
pub mod enrolment;
pub mod lease;
pub mod membership;
pub mod node;
pub mod owner;
pub mod shares;

use std::{collections::HashMap, fmt, sync::Arc};

use self::config::ClusterConfig;

/// What the cluster's node needs of the policies in force: the `cluster:` section, the global
/// policies and the policies nested inside them.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct ClusterPolicies {
    pub config: Option<ClusterConfig>,
    pub global: Vec<GlobalPolicy>,
    /// The policies that may admit what the global policy would deny (`limit` and `pass`, not
    /// `drop`) whose prefix lies inside a global policy's, each as `GLOBAL > NESTED` (both in
    /// canonical form: `2001:DB8:0::/48` is `2001:db8::/48`), sorted: the most specific match
    /// wins, so each takes its addresses out of the global policy. Hashed with the global
    /// policies (a member that admits more of them than its share breaks the global bound), but
    /// not part of a policy's wire name. A `drop` policy only ever admits less, so a blocklist
    /// kept on one member alone is not a difference.
    pub nested: Vec<String>,
}

/// A global `limit` policy in force: its `match` as written, limit and window (µs).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct GlobalPolicy {
    /// The policy's id here (its index in the config, 1-based; the rate limit service's limits
    /// have theirs above every config's): how the maps and the checker name it. Members name it
    /// to each other by its content instead ([`GlobalPolicy::wire_name`]).
    pub id: u16,
    pub matches: String,
    pub limit: u32,
    pub window_us: u32,
    /// How the addresses it matches group into clients: `per address`, or `per /N` for the
    /// prefix the programs key them by (its `per` as resolved for the maps); empty where that
    /// does not apply (API IDs, the rate limit service's limits). Part of what members compare: members that group one policy's addresses
    /// differently would key the same traffic as different clients, and each owner would
    /// split L for its own.
    pub grouping: String,
}

impl GlobalPolicy {
    /// What this policy is, as members compare it: its match, limit, window and grouping.
    fn content(&self) -> String {
        format!(
            "{} {} {} {}",
            self.matches, self.limit, self.window_us, self.grouping
        )
    }

    /// How members name the policy to each other in reports and grants: a hash of its content,
    /// never its position, so that members whose configs order their policies differently (a
    /// local policy added before it on one host) still agree. Two policies with the same content
    /// cannot both be in force (a config refuses a duplicate match; the rate limit service has
    /// one per limit).
    pub fn wire_name(&self) -> PolicyName {
        membership::stable_hash(self.content().as_bytes())
    }
}

/// How members name a global policy to each other: [`GlobalPolicy::wire_name`].
pub type PolicyName = u64;

/// The names of the global policies in force, by their ids here.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct WireNames {
    names: HashMap<u16, PolicyName>,
}

impl WireNames {
    pub fn new(global: &[GlobalPolicy]) -> WireNames {
        WireNames {
            names: global.iter().map(|g| (g.id, g.wire_name())).collect(),
        }
    }

    /// The name of policy `id`, if it is a global policy in force.
    pub fn name(&self, id: u16) -> Option<PolicyName> {
        self.names.get(&id).copied()
    }
}

impl ClusterPolicies {
    /// A hash of the global policies, the policies nested inside them and the lease timing
    /// (`peer_timeout`), carried in heartbeats so that members notice they disagree: members
    /// whose leases differ enrol no client together (a new owner's learning mode lasts its own
    /// lease, which must cover the raises an earlier owner granted). The policies are hashed by
    /// content, in sorted order: where they sit in each member's config does not matter.
    pub fn hash(&self) -> u64 {
        let mut text = String::new();
        if let Some(config) = &self.config {
            text.push_str(&format!("peer_timeout {:?}\n", config.peer_timeout));
        }
        let mut global: Vec<String> = self.global.iter().map(GlobalPolicy::content).collect();
        global.sort_unstable();
        for g in global {
            text.push_str(&g);
            text.push('\n');
        }
        for n in &self.nested {
            text.push_str("nested ");
            text.push_str(n);
            text.push('\n');
        }
        membership::stable_hash(text.as_bytes())
    }
}

/// A member's id: unique and stable (peers are identified by it, never by address). 1 to 63
/// bytes of ASCII letters, digits, `.`, `_` and `-`, so it is safe in logs, metrics labels and
/// file names. Shared, not copied: an owner's ledgers and messages name the same members for
/// every hot client.
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

    fn global(id: u16, matches: &str, limit: u32) -> GlobalPolicy {
        GlobalPolicy {
            id,
            matches: matches.into(),
            limit,
            window_us: 1_000_000,
            grouping: String::new(),
        }
    }

    /// The view hash covers the global policies' content, not their ids or order.
    #[test]
    fn the_view_hash_is_free_of_positions() {
        let policies = |global| ClusterPolicies {
            config: None,
            global,
            nested: Vec::new(),
        };
        let a = policies(vec![global(1, "10.0.0.0/8", 40), global(2, "api", 10)]);
        let b = policies(vec![global(2, "api", 10), global(5, "10.0.0.0/8", 40)]);
        assert_eq!(a.hash(), b.hash());
        let c = policies(vec![global(1, "10.0.0.0/8", 41), global(2, "api", 10)]);
        assert_ne!(a.hash(), c.hash(), "a different limit is another view");
        let names = WireNames::new(&b.global);
        assert_eq!(names.name(5), Some(global(1, "10.0.0.0/8", 40).wire_name()));
        assert_eq!(names.name(2), Some(global(7, "api", 10).wire_name()));
        assert_ne!(
            global(1, "10.0.0.0/8", 41).wire_name(),
            global(1, "10.0.0.0/8", 40).wire_name()
        );
        assert_eq!(names.name(1), None);
        let mut d = a.clone();
        d.nested = vec!["10.0.0.0/8 > 10.1.0.0/16".into()];
        assert_ne!(
            a.hash(),
            d.hash(),
            "a policy nested in a global one is another view"
        );
    }

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
