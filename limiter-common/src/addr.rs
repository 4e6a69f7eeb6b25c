//! Client addresses as map keys.
//!
//! One map serves both families: an IPv4 source is stored IPv4-mapped (`::ffff:a.b.c.d`,
//! RFC 4291 §2.5.5.2) in the same 16 bytes as an IPv6 source.

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
    use super::*;

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
