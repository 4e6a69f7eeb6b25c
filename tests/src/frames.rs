//! Test frames, the one place that writes Ethernet, VLAN, IP and UDP headers: Ethernet with any
//! number of VLAN tags, IPv4 (with options) or IPv6 carrying UDP, or ARP; fields can be
//! overridden to build malformed headers, and [`Frame::truncations`] cuts a frame at and inside
//! every header. [`udp_source`] reads a received frame back. The BPF_PROG_TEST_RUN tests, the
//! benchmarks and the raw VLAN sender of the namespace tests all build their frames here.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

/// 802.1Q tag protocol identifier (customer tag).
pub const TPID_8021Q: u16 = 0x8100;
/// 802.1ad tag protocol identifier (service tag, the outer tag of QinQ).
pub const TPID_8021AD: u16 = 0x88a8;
pub const ETH_P_IP: u16 = 0x0800;
pub const ETH_P_IPV6: u16 = 0x86dd;
pub const ETH_P_ARP: u16 = 0x0806;
pub const ETH_HLEN: usize = 14;
pub const VLAN_HLEN: usize = 4;
pub const UDP_HLEN: usize = 8;

/// The MACs of a frame that no real interface sees (BPF_PROG_TEST_RUN); [`Builder::macs`]
/// overrides them.
const DST_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 0x01];
const SRC_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 0x02];
/// The UDP ports unless [`Builder::ports`] says otherwise.
const SRC_PORT: u16 = 40000;
const DST_PORT: u16 = 9;

/// A header of a built frame, for naming where a truncation cuts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Header {
    Ethernet,
    /// The n-th VLAN tag, outermost first.
    Vlan(usize),
    Ipv4,
    Ipv6,
    Arp,
    Udp,
    Payload,
}

impl Header {
    /// Whether the header is one the limiter's parser must read whole (L2 and L3).
    pub fn parsed(self) -> bool {
        !matches!(self, Header::Udp | Header::Payload)
    }
}

#[derive(Debug, Clone)]
enum L3 {
    V4 { src: Ipv4Addr, dst: Ipv4Addr },
    V6 { src: Ipv6Addr, dst: Ipv6Addr },
    Arp { sender: Ipv4Addr, target: Ipv4Addr },
}

/// Builds a frame; start with [`Builder::ipv4`], [`Builder::ipv6`] or [`Builder::arp`].
#[derive(Debug, Clone)]
pub struct Builder {
    src_mac: [u8; 6],
    dst_mac: [u8; 6],
    ports: (u16, u16),
    vlans: Vec<(u16, u16)>,
    l3: L3,
    options: Vec<u8>,
    payload: Vec<u8>,
    version: Option<u8>,
    ihl: Option<u8>,
    total_len: Option<u16>,
}

impl Builder {
    fn new(l3: L3) -> Builder {
        Builder {
            src_mac: SRC_MAC,
            dst_mac: DST_MAC,
            ports: (SRC_PORT, DST_PORT),
            vlans: Vec::new(),
            l3,
            options: Vec::new(),
            payload: b"limiter test".to_vec(),
            version: None,
            ihl: None,
            total_len: None,
        }
    }

    /// IPv4/UDP from `src` to `dst`.
    pub fn ipv4(src: Ipv4Addr, dst: Ipv4Addr) -> Builder {
        Builder::new(L3::V4 { src, dst })
    }

    /// IPv6/UDP from `src` to `dst`.
    pub fn ipv6(src: Ipv6Addr, dst: Ipv6Addr) -> Builder {
        Builder::new(L3::V6 { src, dst })
    }

    /// IPv4/UDP or IPv6/UDP from `src` to `dst`, which must be of the same family.
    pub fn ip(src: IpAddr, dst: IpAddr) -> Builder {
        match (src, dst) {
            (IpAddr::V4(src), IpAddr::V4(dst)) => Builder::ipv4(src, dst),
            (IpAddr::V6(src), IpAddr::V6(dst)) => Builder::ipv6(src, dst),
            _ => panic!("Builder::ip: {src} and {dst} are of different families"),
        }
    }

    /// An ARP request (not IP).
    pub fn arp(sender: Ipv4Addr, target: Ipv4Addr) -> Builder {
        Builder::new(L3::Arp { sender, target })
    }

    /// Adds a VLAN tag inside those already added (call outermost first).
    pub fn vlan(mut self, tpid: u16, vid: u16) -> Builder {
        self.vlans.push((tpid, vid & 0x0fff));
        self
    }

    /// Adds VLAN `tags`, `(tpid, vid)`, outermost first.
    pub fn vlans(self, tags: &[(u16, u16)]) -> Builder {
        tags.iter()
            .fold(self, |builder, &(tpid, vid)| builder.vlan(tpid, vid))
    }

    /// The source and destination MAC addresses.
    pub fn macs(mut self, src: [u8; 6], dst: [u8; 6]) -> Builder {
        self.src_mac = src;
        self.dst_mac = dst;
        self
    }

    /// The UDP source and destination ports.
    pub fn ports(mut self, src: u16, dst: u16) -> Builder {
        self.ports = (src, dst);
        self
    }

    /// 802.1ad outer tag + 802.1Q inner tag.
    pub fn qinq(self, outer: u16, inner: u16) -> Builder {
        self.vlan(TPID_8021AD, outer).vlan(TPID_8021Q, inner)
    }

    /// IPv4 options, padded with End-of-Options to a multiple of 4 bytes (at most 40).
    pub fn ipv4_options(mut self, options: &[u8]) -> Builder {
        assert!(options.len() <= 40, "IPv4 options are at most 40 bytes");
        self.options = options.to_vec();
        while !self.options.len().is_multiple_of(4) {
            self.options.push(0);
        }
        self
    }

    /// The UDP payload.
    pub fn payload(mut self, payload: &[u8]) -> Builder {
        self.payload = payload.to_vec();
        self
    }

    /// Overrides the IP version nibble (IPv4 or IPv6).
    pub fn version(mut self, version: u8) -> Builder {
        self.version = Some(version);
        self
    }

    /// Overrides the IPv4 header length field (in 32-bit words).
    pub fn ihl(mut self, words: u8) -> Builder {
        self.ihl = Some(words);
        self
    }

    /// Overrides the IPv4 total length field.
    pub fn total_len(mut self, len: u16) -> Builder {
        self.total_len = Some(len);
        self
    }

    pub fn build(&self) -> Frame {
        let mut bytes = Vec::with_capacity(128);
        let mut headers = Vec::new();
        bytes.extend_from_slice(&self.dst_mac);
        bytes.extend_from_slice(&self.src_mac);
        let inner_type = match self.l3 {
            L3::V4 { .. } => ETH_P_IP,
            L3::V6 { .. } => ETH_P_IPV6,
            L3::Arp { .. } => ETH_P_ARP,
        };
        // Each tag's TPID sits in the field before it: the Ethernet type or the previous tag.
        let mut types: Vec<u16> = self.vlans.iter().map(|&(tpid, _)| tpid).collect();
        types.push(inner_type);
        bytes.extend_from_slice(&types[0].to_be_bytes());
        headers.push((Header::Ethernet, 0..bytes.len()));
        for (i, &(_, vid)) in self.vlans.iter().enumerate() {
            let start = bytes.len();
            bytes.extend_from_slice(&vid.to_be_bytes());
            bytes.extend_from_slice(&types[i + 1].to_be_bytes());
            headers.push((Header::Vlan(i), start..bytes.len()));
        }
        let l3_offset = bytes.len();
        match self.l3 {
            L3::V4 { src, dst } => {
                let hlen = 20 + self.options.len();
                let total = hlen + UDP_HLEN + self.payload.len();
                let version = self.version.unwrap_or(4);
                let ihl = self.ihl.unwrap_or((hlen / 4) as u8);
                let mut ip = vec![(version << 4) | (ihl & 0x0f), 0];
                ip.extend_from_slice(&self.total_len.unwrap_or(total as u16).to_be_bytes());
                ip.extend_from_slice(&[0x12, 0x34, 0x40, 0, 64, 17, 0, 0]);
                ip.extend_from_slice(&src.octets());
                ip.extend_from_slice(&dst.octets());
                ip.extend_from_slice(&self.options);
                let sum = checksum(&ip, 0);
                ip[10..12].copy_from_slice(&sum.to_be_bytes());
                bytes.extend_from_slice(&ip);
                headers.push((Header::Ipv4, l3_offset..bytes.len()));
                let mut pseudo = Vec::new();
                pseudo.extend_from_slice(&src.octets());
                pseudo.extend_from_slice(&dst.octets());
                pseudo.extend_from_slice(&[0, 17]);
                pseudo.extend_from_slice(&((UDP_HLEN + self.payload.len()) as u16).to_be_bytes());
                self.udp(&mut bytes, &mut headers, &pseudo);
            }
            L3::V6 { src, dst } => {
                let version = self.version.unwrap_or(6);
                let udp_len = (UDP_HLEN + self.payload.len()) as u16;
                bytes.extend_from_slice(&[version << 4, 0, 0, 0]);
                bytes.extend_from_slice(&udp_len.to_be_bytes());
                bytes.extend_from_slice(&[17, 64]);
                bytes.extend_from_slice(&src.octets());
                bytes.extend_from_slice(&dst.octets());
                headers.push((Header::Ipv6, l3_offset..bytes.len()));
                let mut pseudo = Vec::new();
                pseudo.extend_from_slice(&src.octets());
                pseudo.extend_from_slice(&dst.octets());
                pseudo.extend_from_slice(&(udp_len as u32).to_be_bytes());
                pseudo.extend_from_slice(&[0, 0, 0, 17]);
                self.udp(&mut bytes, &mut headers, &pseudo);
            }
            L3::Arp { sender, target } => {
                bytes.extend_from_slice(&[0, 1, 0x08, 0, 6, 4, 0, 1]);
                bytes.extend_from_slice(&self.src_mac);
                bytes.extend_from_slice(&sender.octets());
                bytes.extend_from_slice(&[0; 6]);
                bytes.extend_from_slice(&target.octets());
                headers.push((Header::Arp, l3_offset..bytes.len()));
            }
        }
        Frame {
            bytes,
            headers,
            l3_offset,
        }
    }

    fn udp(
        &self,
        bytes: &mut Vec<u8>,
        headers: &mut Vec<(Header, std::ops::Range<usize>)>,
        pseudo: &[u8],
    ) {
        let start = bytes.len();
        let len = (UDP_HLEN + self.payload.len()) as u16;
        let mut udp = Vec::with_capacity(len as usize);
        udp.extend_from_slice(&self.ports.0.to_be_bytes());
        udp.extend_from_slice(&self.ports.1.to_be_bytes());
        udp.extend_from_slice(&len.to_be_bytes());
        udp.extend_from_slice(&[0, 0]);
        udp.extend_from_slice(&self.payload);
        let sum = match checksum(&udp, sum_words(pseudo)) {
            0 => 0xffff,
            s => s,
        };
        udp[6..8].copy_from_slice(&sum.to_be_bytes());
        bytes.extend_from_slice(&udp);
        headers.push((Header::Udp, start..start + UDP_HLEN));
        if !self.payload.is_empty() {
            headers.push((Header::Payload, start + UDP_HLEN..bytes.len()));
        }
    }
}

fn sum_words(data: &[u8]) -> u32 {
    data.chunks(2)
        .map(|c| u16::from_be_bytes([c[0], *c.get(1).unwrap_or(&0)]) as u32)
        .sum()
}

/// The Internet checksum of `data`, starting from a partial sum.
fn checksum(data: &[u8], initial: u32) -> u16 {
    let mut sum = initial as u64 + sum_words(data) as u64;
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

/// A built frame and where its headers lie.
#[derive(Debug, Clone)]
pub struct Frame {
    pub bytes: Vec<u8>,
    /// Every header with its byte range, in order.
    pub headers: Vec<(Header, std::ops::Range<usize>)>,
    /// Where the IPv4, IPv6 or ARP header starts.
    pub l3_offset: usize,
}

/// One truncation of a frame: its first `len` bytes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Cut {
    pub len: usize,
    /// The header the cut falls in (at its start, for a cut on a boundary).
    pub header: Header,
    /// Whether `len` is exactly where `header` starts.
    pub at_boundary: bool,
}

impl Frame {
    /// The end of the L3 header (where UDP starts).
    pub fn l3_end(&self) -> usize {
        self.headers
            .iter()
            .find(|(h, _)| matches!(h, Header::Ipv4 | Header::Ipv6 | Header::Arp))
            .map_or(self.l3_offset, |(_, r)| r.end)
    }

    /// Every truncation at a header boundary or inside a header, shortest first: all lengths
    /// from 0 up to the end of the UDP header (exclusive), and one inside the payload.
    pub fn truncations(&self) -> Vec<Cut> {
        let mut cuts = Vec::new();
        for (header, range) in &self.headers {
            let range = if *header == Header::Payload {
                range.start..range.start + 1
            } else {
                range.clone()
            };
            for len in range.clone() {
                cuts.push(Cut {
                    len,
                    header: *header,
                    at_boundary: len == range.start,
                });
            }
        }
        cuts
    }

    /// The first `len` bytes.
    pub fn truncated(&self, len: usize) -> &[u8] {
        &self.bytes[..len]
    }
}

/// The source address of a UDP datagram to `port` in an Ethernet frame with any number of VLAN
/// tags (the kernel may already have moved the outermost one into metadata).
pub fn udp_source(frame: &[u8], port: u16) -> Option<IpAddr> {
    let be16 = |at: usize| -> Option<u16> {
        Some(u16::from_be_bytes(frame.get(at..at + 2)?.try_into().ok()?))
    };
    let mut ethertype = be16(12)?;
    let mut off = 14;
    while ethertype == TPID_8021Q || ethertype == TPID_8021AD {
        ethertype = be16(off + 2)?;
        off += 4;
    }
    let (src, udp): (IpAddr, usize) = match ethertype {
        ETH_P_IP => {
            let ihl = (*frame.get(off)? & 0x0f) as usize * 4;
            if *frame.get(off + 9)? != libc::IPPROTO_UDP as u8 {
                return None;
            }
            let b: [u8; 4] = frame.get(off + 12..off + 16)?.try_into().ok()?;
            (IpAddr::from(b), off + ihl)
        }
        ETH_P_IPV6 => {
            if *frame.get(off + 6)? != libc::IPPROTO_UDP as u8 {
                return None;
            }
            let b: [u8; 16] = frame.get(off + 8..off + 24)?.try_into().ok()?;
            (IpAddr::from(b), off + 40)
        }
        _ => return None,
    };
    (be16(udp + 2)? == port).then_some(src)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layouts() {
        let v4 = Builder::ipv4([10, 0, 0, 1].into(), [10, 0, 0, 2].into())
            .payload(b"")
            .build();
        assert_eq!(v4.bytes.len(), 14 + 20 + 8);
        assert_eq!(&v4.bytes[12..14], &[0x08, 0x00]);
        assert_eq!(v4.bytes[14], 0x45);
        assert_eq!(checksum(&v4.bytes[14..34], 0), 0);
        assert_eq!(&v4.bytes[14 + 12..14 + 16], &[10, 0, 0, 1]);

        let q = Builder::ipv4([10, 0, 0, 1].into(), [10, 0, 0, 2].into())
            .qinq(100, 200)
            .ipv4_options(&[1, 1, 1])
            .build();
        assert_eq!(&q.bytes[12..14], &[0x88, 0xa8]);
        assert_eq!(&q.bytes[16..18], &[0x81, 0x00]);
        assert_eq!(&q.bytes[20..22], &[0x08, 0x00]);
        assert_eq!(q.l3_offset, 22);
        assert_eq!(q.bytes[22], 0x46);
        assert_eq!(q.l3_end(), 22 + 24);
        assert_eq!(
            u16::from_be_bytes([q.bytes[24], q.bytes[25]]) as usize,
            q.bytes.len() - 22
        );

        let v6 = Builder::ipv6(
            "2001:db8::1".parse().unwrap(),
            "2001:db8::2".parse().unwrap(),
        )
        .build();
        assert_eq!(v6.l3_end(), 54);
        assert_eq!(v6.bytes[14] >> 4, 6);

        let cuts = v6.truncations();
        assert_eq!(cuts.first().map(|c| c.len), Some(0));
        assert_eq!(cuts.iter().filter(|c| c.at_boundary).count(), 4);
        assert!(cuts.iter().all(|c| c.len < v6.bytes.len()));
        assert_eq!(cuts.iter().filter(|c| c.header.parsed()).count(), 54);
    }
}
