//! Frame parsing: Ethernet, up to two VLAN tags (802.1Q, 802.1ad), IPv4 (with options), IPv6.

use aya_ebpf::programs::XdpContext;
use limiter_common::addr::{ClientKey, GROUP_KEY_MARK, as_v4, v4_mapped};

const ETH_HLEN: usize = 14;
const VLAN_HLEN: usize = 4;
const ETH_P_IP: u16 = 0x0800;
const ETH_P_IPV6: u16 = 0x86dd;
const ETH_P_8021Q: u16 = 0x8100;
const ETH_P_8021AD: u16 = 0x88a8;
const IPV4_MIN_HLEN: usize = 20;
const IPV6_HLEN: usize = 40;
/// VLAN tags the parser looks through; a third is treated as a non-IP frame.
const MAX_VLAN_TAGS: usize = 2;

/// What a frame is, as far as the limiter cares.
pub enum Frame {
    /// An IP packet from this source.
    Ip(ClientKey),
    /// Not IPv4 or IPv6 (ARP, LLDP, three or more VLAN tags, ...).
    NonIp,
    /// Truncated at some header, a header that contradicts itself, or an IPv4-mapped or
    /// multicast IPv6 source.
    Malformed,
}

/// A bounds-checked pointer to a `T` at `offset` bytes into the frame.
#[inline(always)]
pub(crate) fn ptr_at<T>(ctx: &XdpContext, offset: usize) -> Option<*const T> {
    let start = ctx.data();
    let end = ctx.data_end();
    if start + offset + size_of::<T>() > end {
        return None;
    }
    Some((start + offset) as *const T)
}

#[inline(always)]
pub(crate) fn read<T: Copy>(ctx: &XdpContext, offset: usize) -> Option<T> {
    // SAFETY: `ptr_at` checked that the whole `T` lies inside the frame; unaligned because
    // headers sit at any offset.
    ptr_at::<T>(ctx, offset).map(|p| unsafe { p.read_unaligned() })
}

#[inline(always)]
pub fn parse(ctx: &XdpContext) -> Frame {
    let Some(mut proto) = read::<u16>(ctx, 12).map(u16::from_be) else {
        return Frame::Malformed;
    };
    let mut off = ETH_HLEN;
    for _ in 0..MAX_VLAN_TAGS {
        if proto != ETH_P_8021Q && proto != ETH_P_8021AD {
            break;
        }
        // The tag's inner ethertype sits in its last two bytes.
        let Some(inner) = read::<u16>(ctx, off + 2).map(u16::from_be) else {
            return Frame::Malformed;
        };
        proto = inner;
        off += VLAN_HLEN;
    }
    match proto {
        ETH_P_IP => ipv4(ctx, off),
        ETH_P_IPV6 => ipv6(ctx, off),
        _ => Frame::NonIp,
    }
}

#[inline(always)]
fn ipv4(ctx: &XdpContext, off: usize) -> Frame {
    let Some(hdr) = read::<[u8; IPV4_MIN_HLEN]>(ctx, off) else {
        return Frame::Malformed;
    };
    let version = hdr[0] >> 4;
    let hlen = ((hdr[0] & 0x0f) as usize) * 4;
    let total_len = u16::from_be_bytes([hdr[2], hdr[3]]) as usize;
    if version != 4 || hlen < IPV4_MIN_HLEN || total_len < hlen {
        return Frame::Malformed;
    }
    // Options: the whole header, up to 60 bytes, must be inside the frame.
    if ctx.data() + off + hlen > ctx.data_end() {
        return Frame::Malformed;
    }
    Frame::Ip(v4_mapped([hdr[12], hdr[13], hdr[14], hdr[15]]))
}

#[inline(always)]
fn ipv6(ctx: &XdpContext, off: usize) -> Frame {
    let Some(first) = read::<u8>(ctx, off) else {
        return Frame::Malformed;
    };
    if ptr_at::<[u8; IPV6_HLEN]>(ctx, off).is_none() {
        return Frame::Malformed;
    }
    if first >> 4 != 6 {
        return Frame::Malformed;
    }
    match read::<ClientKey>(ctx, off + 8) {
        // An IPv4-mapped IPv6 source would alias the IPv4 client of the same address; such
        // packets are invalid on the wire (RFC 4291 §2.5.5.2) and Linux drops them.
        Some(src) if as_v4(&src).is_some() => Frame::Malformed,
        // A multicast source is invalid too (RFC 4291 §2.7; Linux drops it in `ipv6_rcv`), and
        // `ff00::/8` is where group keys live (`limiter_common::addr`).
        Some(src) if src[0] == GROUP_KEY_MARK => Frame::Malformed,
        Some(src) => Frame::Ip(src),
        None => Frame::Malformed,
    }
}
