//! Client addresses as map keys.
//!
//! One map serves both families: an IPv4 source is stored IPv4-mapped (`::ffff:a.b.c.d`,
//! RFC 4291 §2.5.5.2) in the same 16 bytes as an IPv6 source.

/// A client key: the source address, IPv4 stored IPv4-mapped.
pub type ClientKey = [u8; 16];

/// Bits an IPv4 prefix length is shifted by when it is stored IPv4-mapped (96 = 80 zero bits +
/// 16 one bits).
pub const V4_MAPPED_PREFIX_BITS: u32 = 96;

/// The IPv4-mapped form of an IPv4 address.
#[inline(always)]
pub const fn v4_mapped(octets: [u8; 4]) -> ClientKey {
    [
        0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff, octets[0], octets[1], octets[2], octets[3],
    ]
}

/// The IPv4 address inside an IPv4-mapped key, if it is one.
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
}
