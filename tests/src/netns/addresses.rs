//! The test network's addresses: the receiver's, the senders', the VLAN subnets' and the
//! MACs at both ends of the veth.

use std::net::{Ipv4Addr, Ipv6Addr};

use crate::frames::{TPID_8021AD, TPID_8021Q};

/// The receiver's IPv4 address (on its veth, /24).
pub const RECEIVER_V4: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 1);
/// The receiver's IPv6 address (on its veth, /64).
pub const RECEIVER_V6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x77, 0, 0, 0, 0, 0, 1);
/// MAC address of the receiver's veth.
pub const RECEIVER_MAC: [u8; 6] = [0x02, 0x6c, 0x74, 0, 0, 0x01];
/// MAC address of the sender's veth.
pub const SENDER_MAC: [u8; 6] = [0x02, 0x6c, 0x74, 0, 0, 0x02];
/// How many IPv4 and how many IPv6 addresses the sender has: [`sender_v4`]`(0..SENDERS)`,
/// [`sender_v6`]`(0..SENDERS)`.
pub const SENDERS: u8 = 48;
/// 802.1Q id of the single-tagged subnet 198.18.10.0/24.
pub const VLAN_ID: u16 = 10;
/// 802.1ad (outer) id of the double-tagged subnet 198.18.20.0/24.
pub const QINQ_OUTER: u16 = 20;
/// 802.1Q (inner) id of the double-tagged subnet 198.18.20.0/24.
pub const QINQ_INNER: u16 = 30;

/// The `i`-th sender IPv4 address: 198.18.0.(10 + i).
pub fn sender_v4(i: u8) -> Ipv4Addr {
    assert!(
        i < SENDERS,
        "sender_v4({i}): the sender has {SENDERS} addresses"
    );
    Ipv4Addr::new(198, 18, 0, 10 + i)
}

/// The `i`-th sender IPv6 address: fd00:77::(0x10 + i).
pub fn sender_v6(i: u8) -> Ipv6Addr {
    assert!(
        i < SENDERS,
        "sender_v6({i}): the sender has {SENDERS} addresses"
    );
    Ipv6Addr::new(0xfd00, 0x77, 0, 0, 0, 0, 0, 0x10 + i as u16)
}

/// A source address in the 802.1Q subnet: 198.18.10.`host`.
pub fn vlan_v4(host: u8) -> Ipv4Addr {
    Ipv4Addr::new(198, 18, 10, host)
}

/// A source address in the QinQ subnet: 198.18.20.`host`.
pub fn qinq_v4(host: u8) -> Ipv4Addr {
    Ipv4Addr::new(198, 18, 20, host)
}

/// The 802.1Q tag stack of the 198.18.10.0/24 subnet.
pub const VLAN_TAGS: &[(u16, u16)] = &[(TPID_8021Q, VLAN_ID)];
/// The QinQ tag stack of the 198.18.20.0/24 subnet, outermost first.
pub const QINQ_TAGS: &[(u16, u16)] = &[(TPID_8021AD, QINQ_OUTER), (TPID_8021Q, QINQ_INNER)];
