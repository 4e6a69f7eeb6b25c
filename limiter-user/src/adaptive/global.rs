//! What adaptation admits of each global client on this node (issue 12, "Adaptive windows"):
//! the seam between the adaptive loop, which computes it, and the cluster's enrolment, which
//! enforces it through the client's grant and reports it as the most the node wants.
//!
//! A global client's window stays its policy's (every member counts the same window, and the
//! owner's shares are packets per that window), so the loop does not rewrite its entry as it
//! does a local client's. It observes the client like a local one whose policy is its cold share
//! `⌊L/N⌋` per window `w` (the node's own allowance before any coordination, which does not move
//! with the owner's grants) and, when the client's fairness factor `gᵢ` is below 1, publishes
//! the cap `cᵢ = max(1, round(⌊L/N⌋ · gᵢ))` packets per `w` here. Enrolment then
//!
//! * enforces `min(share, cᵢ)`, where `share` is what the owner granted (or the cold share when
//!   the client is not enrolled): never above the share, so the shares in force still sum to at
//!   most L whatever adaptation does;
//! * reports the client's demand as at most `cᵢ`, so that the owner gives the rest of L to the
//!   members that have room instead of to a node that would drop it.
//!
//! Capping the demand at `share · gᵢ` instead would feed on itself under contention: the owner
//! grants about the demand, the node admits `gᵢ` of it and reports that, and the share shrinks by
//! `gᵢ` (plus headroom) every round, to nothing. A base that does not follow the grants (the cold
//! share) has a fixed point: the node admits `gᵢ` of its cold share, as a local client is held to
//! `gᵢ` of its policy. What it gives up: a member holding a raise above its cold share goes down
//! to `gᵢ ·` its cold share once it is overloaded enough to cut the client at all.

use std::{
    collections::HashMap,
    sync::{
        Mutex,
        atomic::{AtomicU64, Ordering},
    },
};

use limiter_common::addr::ClientKey;

/// The caps the adaptive loop wants enforced on global clients (see the module docs), as the
/// loop last published them. Only clients whose `gᵢ` is below 1 have one.
#[derive(Debug, Default)]
pub struct GlobalCaps {
    caps: Mutex<HashMap<ClientKey, u32>>,
    /// Bumped on every publication, so that a reader copies the map only when it changed.
    version: AtomicU64,
}

impl GlobalCaps {
    /// Replaces the caps with `caps` (the loop publishes only when they changed).
    pub fn publish(&self, caps: HashMap<ClientKey, u32>) {
        *self.caps.lock().unwrap_or_else(|e| e.into_inner()) = caps;
        self.version.fetch_add(1, Ordering::Release);
    }

    /// The caps, if they changed since `seen` (a version this returned before; start at 0),
    /// with the version they are at.
    pub fn changed_since(&self, seen: u64) -> Option<(u64, HashMap<ClientKey, u32>)> {
        if self.version.load(Ordering::Acquire) == seen {
            return None;
        }
        let caps = self.caps.lock().unwrap_or_else(|e| e.into_inner());
        Some((self.version.load(Ordering::Acquire), caps.clone()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn readers_copy_only_what_changed() {
        let caps = GlobalCaps::default();
        assert!(caps.changed_since(0).is_none());
        caps.publish(HashMap::from([([1; 16], 7), ([2; 16], 3)]));
        let (v1, all) = caps.changed_since(0).expect("changed");
        assert_eq!(all.len(), 2);
        assert!(caps.changed_since(v1).is_none());
        caps.publish(HashMap::from([([1; 16], 7)]));
        let (v2, all) = caps.changed_since(v1).expect("changed");
        assert!(v2 > v1);
        assert_eq!(all, HashMap::from([([1; 16], 7)]));
        assert!(caps.changed_since(v2).is_none());
    }
}
