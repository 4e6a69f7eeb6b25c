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

/// The caps the adaptive loop wants enforced on global clients (see the module docs). Only
/// clients whose `gᵢ` is below 1 have one.
#[derive(Debug, Default)]
pub struct GlobalCaps {
    caps: Mutex<HashMap<ClientKey, u32>>,
    /// Bumped on every change, so that a reader copies the map only when it changed.
    version: AtomicU64,
}

impl GlobalCaps {
    /// Sets the caps in `set` and removes those of `clear` (in that order); a call that changes
    /// nothing leaves the version as it was.
    pub fn update(
        &self,
        set: impl IntoIterator<Item = (ClientKey, u32)>,
        clear: impl IntoIterator<Item = ClientKey>,
    ) {
        let mut caps = self.caps.lock().unwrap_or_else(|e| e.into_inner());
        let mut changed = false;
        for (client, cap) in set {
            changed |= caps.insert(client, cap) != Some(cap);
        }
        for client in clear {
            changed |= caps.remove(&client).is_some();
        }
        if changed {
            self.version.fetch_add(1, Ordering::Release);
        }
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

    /// The cap on `client`, if any.
    pub fn get(&self, client: &ClientKey) -> Option<u32> {
        self.caps
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(client)
            .copied()
    }

    /// Clients with a cap.
    pub fn len(&self) -> usize {
        self.caps.lock().unwrap_or_else(|e| e.into_inner()).len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(n: u8) -> ClientKey {
        [n; 16]
    }

    #[test]
    fn readers_copy_only_what_changed() {
        let caps = GlobalCaps::default();
        assert!(caps.changed_since(0).is_none());
        caps.update([(key(1), 7), (key(2), 3)], []);
        let (v1, all) = caps.changed_since(0).expect("changed");
        assert_eq!(all.len(), 2);
        assert!(caps.changed_since(v1).is_none());
        // The same caps again: no new version.
        caps.update([(key(1), 7)], [key(9)]);
        assert!(caps.changed_since(v1).is_none());
        caps.update([], [key(2)]);
        let (v2, all) = caps.changed_since(v1).expect("changed");
        assert!(v2 > v1);
        assert_eq!(all.get(&key(1)), Some(&7));
        assert_eq!(caps.get(&key(2)), None);
        assert_eq!(caps.len(), 1);
    }
}
