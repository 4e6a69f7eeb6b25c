//! Which member owns a global client: rendezvous (highest-random-weight) hashing over the
//! members' node ids. Every member computes the same owner from the same member list without
//! talking, and when a member leaves only the clients it owned move (about 1/N of them); when one
//! joins, only the clients it now wins move to it. Ownership is sticky once a client is enrolled
//! (see `lease`): this only chooses the owner of new enrolments.
//!
//! The weight is the first 8 bytes of SHA-256 over the node id, a separator and the client key:
//! specified bytes, so agents of different builds, versions and architectures agree (std's
//! `DefaultHasher` promises no such thing).

use limiter_common::addr::ClientKey;
use sha2::{Digest, Sha256};

use super::NodeId;

/// The weight of `node` for `client`; the member with the highest weight owns the client.
pub fn weight(node: &NodeId, client: &ClientKey) -> u64 {
    let mut hash = Sha256::new();
    hash.update(node.as_str().as_bytes());
    // Node ids never contain NUL, so (id, key) pairs never run into each other.
    hash.update([0u8]);
    hash.update(client);
    let digest = hash.finalize();
    let mut first = [0u8; 8];
    first.copy_from_slice(&digest[..8]);
    u64::from_be_bytes(first)
}

/// The owner of `client` among `members` (ties, which need a SHA-256 prefix collision, go to the
/// smaller id); `None` when there are no members.
pub fn owner<'a>(client: &ClientKey, members: &'a [NodeId]) -> Option<&'a NodeId> {
    // Each weight once (a comparison-based max would hash every member twice).
    members
        .iter()
        .map(|m| (weight(m, client), m))
        .max_by(|(wa, a), (wb, b)| wa.cmp(wb).then(b.cmp(a)))
        .map(|(_, m)| m)
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    fn ids(n: usize) -> Vec<NodeId> {
        (0..n)
            .map(|i| NodeId::new(&format!("n{i}")).expect("a valid id"))
            .collect()
    }

    fn key(i: u32) -> ClientKey {
        let mut k = [0u8; 16];
        k[12..].copy_from_slice(&i.to_be_bytes());
        k
    }

    #[test]
    fn owners_spread_evenly() {
        let members = ids(5);
        let mut counts = [0u32; 5];
        for i in 0..10_000 {
            let o = owner(&key(i), &members).expect("members");
            let at = members.iter().position(|m| m == o).expect("a member");
            counts[at] += 1;
        }
        for c in counts {
            assert!((1_700..=2_300).contains(&c), "{counts:?}");
        }
    }

    #[test]
    fn no_members_no_owner() {
        assert_eq!(owner(&key(1), &[]), None);
    }

    proptest! {
        #[test]
        fn the_order_of_the_member_list_does_not_matter(
            n in 1usize..12, client in any::<u32>(), seed in any::<u64>(),
        ) {
            let members = ids(n);
            let mut shuffled = members.clone();
            // A deterministic shuffle from the seed.
            let mut s = seed;
            for i in (1..shuffled.len()).rev() {
                s = s.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
                shuffled.swap(i, (s >> 33) as usize % (i + 1));
            }
            prop_assert_eq!(owner(&key(client), &members), owner(&key(client), &shuffled));
        }

        #[test]
        fn only_the_clients_of_a_leaving_member_move(
            n in 2usize..10, leaving in any::<prop::sample::Index>(), client in any::<u32>(),
        ) {
            let members = ids(n);
            let gone = leaving.index(n);
            let rest: Vec<NodeId> =
                members.iter().enumerate().filter(|(i, _)| *i != gone).map(|(_, m)| m.clone()).collect();
            let before = owner(&key(client), &members).cloned();
            let after = owner(&key(client), &rest).cloned();
            if before.as_ref() != Some(&members[gone]) {
                prop_assert_eq!(before, after);
            }
        }
    }
}
