//! Client addresses and groups of addresses as map keys.
//!
//! One map serves both families: an IPv4 source is stored IPv4-mapped (`::ffff:a.b.c.d`,
//! RFC 4291 §2.5.5.2) in the same 16 bytes as an IPv6 source.
//!
//! A policy can count a whole prefix of sources as one client (`per: /64`, `per: policy`): every
//! address in the group shares one entry, keyed by a *group key*. Group keys live in the
//! multicast range `ff00::/8`, which is never a source address (RFC 4291 §2.7; the parser counts
//! such packets as malformed), so a group key never equals an address key:
//!
//! | byte | 0 | 1..14 | 14 | 15 |
//! |---|---|---|---|---|
//! | group key | `0xff` | the prefix's first 13 bytes (IPv4: 4), host bits zero | `GROUP_KEY_V4` \| `GROUP_KEY_SPLIT` | prefix length |
//!
//! 13 bytes hold IPv6 prefixes up to /104 ([`MAX_V6_GROUP_BITS`]). The family and the length are
//! part of the key, so groups of different lengths never share an entry.

/// A client key: the source address, IPv4 stored IPv4-mapped.
pub type ClientKey = [u8; 16];

/// The data part of a policy-trie key: a family byte, then the address (IPv4 in the first four
/// bytes). Keeping the families apart in the trie means no IPv6 prefix, not even `::/0`, can
/// match an IPv4 client through its IPv4-mapped form.
pub type PolicyKey = [u8; 17];
/// `PolicyKey[0]` of an IPv4 prefix.
pub const FAMILY_V4: u8 = 4;
/// `PolicyKey[0]` of an IPv6 prefix.
pub const FAMILY_V6: u8 = 6;
/// Prefix bits the family byte adds to every policy-trie prefix length.
pub const FAMILY_BITS: u32 = 8;

/// The policy-trie key of an IPv4 prefix.
pub const fn policy_key_v4(octets: [u8; 4], prefix: u32) -> (u32, PolicyKey) {
    let mut key = [0u8; 17];
    key[0] = FAMILY_V4;
    key[1] = octets[0];
    key[2] = octets[1];
    key[3] = octets[2];
    key[4] = octets[3];
    (FAMILY_BITS + prefix, key)
}

/// The policy-trie key of an IPv6 prefix.
#[inline(always)]
pub fn policy_key_v6(octets: &[u8; 16], prefix: u32) -> (u32, PolicyKey) {
    let mut key = [0u8; 17];
    key[0] = FAMILY_V6;
    key[1..].copy_from_slice(octets);
    (FAMILY_BITS + prefix, key)
}

/// The full-length policy-trie lookup key for a client.
#[inline(always)]
pub fn policy_key(client: &ClientKey) -> (u32, PolicyKey) {
    match as_v4(client) {
        Some(v4) => policy_key_v4(v4, 32),
        None => policy_key_v6(client, 128),
    }
}

/// Longest IPv6 group prefix a group key holds.
pub const MAX_V6_GROUP_BITS: u8 = 104;

/// `Policy::group` and `MapConfig::fast_group` bit: the policy's group prefix is in bits 0..7 as
/// length + 1; 0 means every address is its own client.
pub const GROUP_BITS_MASK: u8 = 0x7f;
/// `Policy::group` bit: the policy-trie entry covers a `/k` group that a longer policy splits
/// (see [`group_key`]); its groups take a key of their own.
pub const GROUP_SPLIT: u8 = 0x80;

/// First byte of a group key (the multicast range, never a source).
pub const GROUP_KEY_MARK: u8 = 0xff;
/// Byte 14 of a group key: an IPv4 prefix.
pub const GROUP_KEY_V4: u8 = 1;
/// Byte 14 of a group key: the group of a split `/k` (see [`GROUP_SPLIT`]).
pub const GROUP_KEY_SPLIT: u8 = 2;

/// The `Policy::group` value for groups of `bits` prefix bits (`None`: per address).
#[inline(always)]
pub const fn group_of(bits: Option<u8>) -> u8 {
    match bits {
        Some(b) => (b & GROUP_BITS_MASK) + 1,
        None => 0,
    }
}

/// The prefix length of a `Policy::group` value (`None`: per address).
#[inline(always)]
pub const fn group_bits(group: u8) -> Option<u8> {
    match group & GROUP_BITS_MASK {
        0 => None,
        g => Some(g - 1),
    }
}

/// The key of the client `addr` (an address key) belongs to under a policy whose
/// `Policy::group` is `group`: `addr` itself per address, else the group key of its prefix.
/// An IPv6 group longer than [`MAX_V6_GROUP_BITS`], or an IPv4 one longer than 31 bits, is per
/// address (the agent never writes one).
///
/// A `GROUP_SPLIT` group gets a key of its own: the fast path looks a packet up first under the
/// family's usual group length (`MapConfig::fast_group`) without knowing its policy, which is
/// only right where every address of that group resolves to the same policy. Where a longer
/// policy splits such a group, the agent marks the policy-trie entry covering the rest of it,
/// whose addresses then key their group apart from the fast path's key.
#[inline(always)]
pub fn group_key(addr: &ClientKey, group: u8) -> ClientKey {
    let mut key = [0u8; 16];
    set_group_key(addr, group, &mut key);
    key
}

/// [`group_key`] written into `key` in place, byte by byte: the eBPF side builds keys on its
/// stack, where a whole-array copy would be a `memcpy` loop the verifier walks byte by byte.
#[inline(always)]
pub fn set_group_key(addr: &ClientKey, group: u8, key: &mut ClientKey) {
    let bits = match group_bits(group) {
        Some(bits) if bits <= MAX_V6_GROUP_BITS => bits,
        _ => {
            copy_key(addr, key);
            return;
        }
    };
    let split = if group & GROUP_SPLIT != 0 {
        GROUP_KEY_SPLIT
    } else {
        0
    };
    key[0] = GROUP_KEY_MARK;
    key[15] = bits;
    if let Some(v4) = as_v4(addr) {
        if bits >= 32 {
            copy_key(addr, key);
            return;
        }
        let b = (u32::from_be_bytes(v4) & prefix_mask_u32(bits)).to_be_bytes();
        key[1] = b[0];
        key[2] = b[1];
        key[3] = b[2];
        key[4] = b[3];
        key[5] = 0;
        key[6] = 0;
        key[7] = 0;
        key[8] = 0;
        key[9] = 0;
        key[10] = 0;
        key[11] = 0;
        key[12] = 0;
        key[13] = 0;
        key[14] = GROUP_KEY_V4 | split;
        return;
    }
    let h = (u64::from_be_bytes([
        addr[0], addr[1], addr[2], addr[3], addr[4], addr[5], addr[6], addr[7],
    ]) & prefix_mask_u64(bits))
    .to_be_bytes();
    let l = (u64::from_be_bytes([
        addr[8], addr[9], addr[10], addr[11], addr[12], addr[13], addr[14], addr[15],
    ]) & prefix_mask_u64(bits.saturating_sub(64)))
    .to_be_bytes();
    key[1] = h[0];
    key[2] = h[1];
    key[3] = h[2];
    key[4] = h[3];
    key[5] = h[4];
    key[6] = h[5];
    key[7] = h[6];
    key[8] = h[7];
    key[9] = l[0];
    key[10] = l[1];
    key[11] = l[2];
    key[12] = l[3];
    key[13] = l[4];
    key[14] = split;
}

/// Copies a key as two 8-byte words (see [`set_group_key`]).
#[inline(always)]
fn copy_key(from: &ClientKey, to: &mut ClientKey) {
    let (a, b) = from.split_at(8);
    let (c, d) = to.split_at_mut(8);
    c.copy_from_slice(a);
    d.copy_from_slice(b);
}

/// The first `bits` (at most 64) bits set.
#[inline(always)]
const fn prefix_mask_u64(bits: u8) -> u64 {
    if bits == 0 {
        0
    } else if bits >= 64 {
        u64::MAX
    } else {
        u64::MAX << (64 - bits as u32)
    }
}

/// The first `bits` (at most 32) bits set.
#[inline(always)]
const fn prefix_mask_u32(bits: u8) -> u32 {
    if bits == 0 {
        0
    } else if bits >= 32 {
        u32::MAX
    } else {
        u32::MAX << (32 - bits as u32)
    }
}

/// What a client key names.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Client {
    /// One IPv4 address.
    V4([u8; 4]),
    /// One IPv6 address.
    V6([u8; 16]),
    /// The IPv4 prefix `/bits`; `split`: the part of it a longer policy does not match.
    GroupV4 {
        prefix: [u8; 4],
        bits: u8,
        split: bool,
    },
    /// The IPv6 prefix `/bits`; `split` as for `GroupV4`.
    GroupV6 {
        prefix: [u8; 16],
        bits: u8,
        split: bool,
    },
}

/// What `key` names. Every key decodes: an address key is any 16 bytes outside `ff00::/8`
/// (IPv4-mapped or not), a group key is one inside it.
#[inline(always)]
pub fn client_of(key: &ClientKey) -> Client {
    if key[0] != GROUP_KEY_MARK {
        return match as_v4(key) {
            Some(v4) => Client::V4(v4),
            None => Client::V6(*key),
        };
    }
    let split = key[14] & GROUP_KEY_SPLIT != 0;
    if key[14] & GROUP_KEY_V4 != 0 {
        Client::GroupV4 {
            prefix: [key[1], key[2], key[3], key[4]],
            bits: key[15],
            split,
        }
    } else {
        let mut prefix = [0u8; 16];
        let mut i = 0;
        while i < 13 {
            prefix[i] = key[i + 1];
            i += 1;
        }
        Client::GroupV6 {
            prefix,
            bits: key[15],
            split,
        }
    }
}

/// The policy-trie lookup for a client key: an address's full length, or a group's prefix, whose
/// longest match is the policy every address of the group resolves to (a group never spans two
/// policies, and a split group's trie entry sits at its own prefix).
#[inline(always)]
pub fn policy_key_of(key: &ClientKey) -> (u32, PolicyKey) {
    let (mut len, mut data) = (0, [0u8; 17]);
    set_policy_key_of(key, &mut len, &mut data);
    (len, data)
}

/// [`policy_key_of`] written in place, byte by byte (see [`set_group_key`]); `data` starts
/// zeroed.
#[inline(always)]
pub fn set_policy_key_of(key: &ClientKey, len: &mut u32, data: &mut PolicyKey) {
    let group = key[0] == GROUP_KEY_MARK;
    let v4 = if group {
        key[14] & GROUP_KEY_V4 != 0
    } else {
        as_v4(key).is_some()
    };
    if v4 {
        data[0] = FAMILY_V4;
        if group {
            data[1] = key[1];
            data[2] = key[2];
            data[3] = key[3];
            data[4] = key[4];
            *len = FAMILY_BITS + (key[15].min(32) as u32);
        } else {
            data[1] = key[12];
            data[2] = key[13];
            data[3] = key[14];
            data[4] = key[15];
            *len = FAMILY_BITS + 32;
        }
        return;
    }
    data[0] = FAMILY_V6;
    if group {
        data[1] = key[1];
        data[2] = key[2];
        data[3] = key[3];
        data[4] = key[4];
        data[5] = key[5];
        data[6] = key[6];
        data[7] = key[7];
        data[8] = key[8];
        data[9] = key[9];
        data[10] = key[10];
        data[11] = key[11];
        data[12] = key[12];
        data[13] = key[13];
        *len = FAMILY_BITS + (key[15].min(MAX_V6_GROUP_BITS) as u32);
    } else {
        let (_, rest) = data.split_at_mut(1);
        let (a, b) = rest.split_at_mut(8);
        a.copy_from_slice(&key[..8]);
        b.copy_from_slice(&key[8..]);
        *len = FAMILY_BITS + 128;
    }
}

/// Whether a policy whose `Policy::group` is `group` keys its clients as `key` is keyed: an
/// address key under a per-address policy, a group key under a policy of the group's length and
/// split mark. For `key`'s own policy (the trie's match for [`policy_key_of`]), this is
/// `group_key(&representative(key), group) == *key`, without building the key.
#[inline(always)]
pub fn keyed_by(key: &ClientKey, group: u8) -> bool {
    if key[0] != GROUP_KEY_MARK {
        return group_bits(group).is_none();
    }
    group_bits(group) == Some(key[15])
        && (group & GROUP_SPLIT != 0) == (key[14] & GROUP_KEY_SPLIT != 0)
}

/// Whether the address `addr` (an address key) is counted under `key`: `key` is `addr`, or the
/// group key of `addr`'s prefix.
pub fn covers(key: &ClientKey, addr: &ClientKey) -> bool {
    if key[0] != GROUP_KEY_MARK {
        return key == addr;
    }
    let split = if key[14] & GROUP_KEY_SPLIT != 0 {
        GROUP_SPLIT
    } else {
        0
    };
    group_key(addr, group_of(Some(key[15])) | split) == *key
}

/// An address the client `key` names: the address itself, or a group's first address (whose
/// `group_key` under the group's policy is `key` again).
#[inline(always)]
pub fn representative(key: &ClientKey) -> ClientKey {
    match client_of(key) {
        Client::V4(_) | Client::V6(_) => *key,
        Client::GroupV4 { prefix, .. } => v4_mapped(prefix),
        Client::GroupV6 { prefix, .. } => prefix,
    }
}

/// The IPv4-mapped form of an IPv4 address.
#[inline(always)]
pub const fn v4_mapped(octets: [u8; 4]) -> ClientKey {
    [
        0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff, octets[0], octets[1], octets[2], octets[3],
    ]
}

/// The IPv4 address inside an IPv4-mapped key, if it is one.
#[inline(always)]
pub fn as_v4(key: &ClientKey) -> Option<[u8; 4]> {
    if key[..10].iter().all(|&b| b == 0) && key[10] == 0xff && key[11] == 0xff {
        Some([key[12], key[13], key[14], key[15]])
    } else {
        None
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    fn v6(a: u128) -> ClientKey {
        a.to_be_bytes()
    }

    #[test]
    fn group_keys_mask_the_host_bits_and_name_the_prefix() {
        let a = v6(0x2001_0db8_0001_0002_aaaa_bbbb_cccc_dddd);
        let k = group_key(&a, group_of(Some(64)));
        assert_eq!(k[0], GROUP_KEY_MARK);
        assert_eq!(
            client_of(&k),
            Client::GroupV6 {
                prefix: v6(0x2001_0db8_0001_0002 << 64),
                bits: 64,
                split: false
            }
        );
        let (len, lpm) = policy_key_of(&k);
        assert_eq!((len, lpm[0]), (FAMILY_BITS + 64, FAMILY_V6));
        assert_eq!(&lpm[1..9], &a[..8]);
        assert!(lpm[9..].iter().all(|&b| b == 0));
        let v4 = v4_mapped([198, 51, 100, 77]);
        let k = group_key(&v4, group_of(Some(24)) | GROUP_SPLIT);
        assert_eq!(
            client_of(&k),
            Client::GroupV4 {
                prefix: [198, 51, 100, 0],
                bits: 24,
                split: true
            }
        );
        assert_eq!(policy_key_of(&k), policy_key_v4([198, 51, 100, 0], 24));
        // Per address: the address itself.
        assert_eq!(group_key(&a, 0), a);
        assert_eq!(
            client_of(&group_key(&v4, 0)),
            Client::V4([198, 51, 100, 77])
        );
        // /0: every address of the family in one group.
        assert_eq!(
            group_key(&v4_mapped([1, 2, 3, 4]), group_of(Some(0))),
            group_key(&v4_mapped([250, 2, 3, 4]), group_of(Some(0)))
        );
    }

    proptest! {
        #[test]
        fn addresses_share_a_group_key_exactly_when_they_share_the_prefix(
            a in any::<u128>(), b in any::<u128>(), bits in 0u8..=MAX_V6_GROUP_BITS,
            split in any::<bool>(),
        ) {
            // Sources are never multicast or IPv4-mapped (the parser drops both).
            let (a, b) = (a & !(0xff << 120), b & !(0xff << 120));
            prop_assume!(as_v4(&v6(a)).is_none() && as_v4(&v6(b)).is_none());
            let g = group_of(Some(bits)) | if split { GROUP_SPLIT } else { 0 };
            let same = bits == 0 || (a ^ b) >> (128 - bits as u32) == 0;
            prop_assert_eq!(group_key(&v6(a), g) == group_key(&v6(b), g), same);
            // A group key is never an address key, and never another length's or family's key.
            prop_assert_ne!(group_key(&v6(a), g), v6(b));
            if bits > 0 {
                prop_assert_ne!(group_key(&v6(a), g), group_key(&v6(a), group_of(Some(bits - 1))));
            }
            prop_assert_ne!(group_key(&v6(a), g), group_key(&v6(a), g ^ GROUP_SPLIT));
            let v4 = v4_mapped((b as u32).to_be_bytes());
            prop_assert_ne!(group_key(&v6(a), g), group_key(&v4, group_of(Some(bits.min(31)))));
            // The trie lookup of the group key is the group's prefix, and its representative
            // groups back to it.
            let k = group_key(&v6(a), g);
            prop_assert_eq!(group_key(&representative(&k), g), k);
            prop_assert!(keyed_by(&k, g) && !keyed_by(&k, g ^ GROUP_SPLIT) && !keyed_by(&k, 0));
            prop_assert!(keyed_by(&v6(a), 0) && !keyed_by(&v6(a), g));
            prop_assert_eq!(covers(&k, &v6(b)), same);
            prop_assert!(covers(&v6(b), &v6(b)) && !covers(&v6(b), &v6(b ^ 1)));
            let (len, lpm) = policy_key_of(&group_key(&v6(a), g));
            let masked = if bits == 0 { 0 } else { a & (u128::MAX << (128 - bits as u32)) };
            prop_assert_eq!((len, lpm), policy_key_v6(&v6(masked), bits as u32));
        }

        #[test]
        fn ipv4_groups_follow_the_prefix(a in any::<u32>(), b in any::<u32>(), bits in 0u8..32) {
            let g = group_of(Some(bits));
            let (ka, kb) = (v4_mapped(a.to_be_bytes()), v4_mapped(b.to_be_bytes()));
            let same = bits == 0 || (a ^ b) >> (32 - bits as u32) == 0;
            prop_assert_eq!(group_key(&ka, g) == group_key(&kb, g), same);
            prop_assert_ne!(group_key(&ka, g), kb);
            let masked = if bits == 0 { 0 } else { a & (u32::MAX << (32 - bits as u32)) };
            prop_assert_eq!(policy_key_of(&group_key(&ka, g)), policy_key_v4(masked.to_be_bytes(), bits as u32));
        }
    }

    #[test]
    fn v4_round_trip() {
        let k = v4_mapped([192, 0, 2, 7]);
        assert_eq!(as_v4(&k), Some([192, 0, 2, 7]));
        let mut v6 = k;
        v6[0] = 0x20;
        assert_eq!(as_v4(&v6), None);
    }

    #[test]
    fn policy_keys_keep_families_apart() {
        let (len, key) = policy_key(&v4_mapped([192, 0, 2, 7]));
        assert_eq!((len, &key[..5]), (40, &[FAMILY_V4, 192, 0, 2, 7][..]));
        let v6 = [0x20, 1, 0x0d, 0xb8, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1];
        let (len, key) = policy_key(&v6);
        assert_eq!((len, key[0], &key[1..]), (136, FAMILY_V6, &v6[..]));
    }
}
