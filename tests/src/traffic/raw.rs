//! Raw Ethernet frames (VLAN-tagged UDP) sent from an `AF_PACKET` socket on the sender's veth.

use std::{
    io, mem,
    net::IpAddr,
    os::fd::{AsRawFd as _, OwnedFd},
    thread,
    time::Instant,
};

use anyhow::{Context as _, Result, ensure};

use super::{Pacing, SEND_TIME_LIMIT, payload, send_retrying};
use crate::{
    frames::Builder,
    netns::{RECEIVER_MAC, RECEIVER_V4, RECEIVER_V6, SENDER_MAC},
};

/// Sends raw Ethernet frames out of the sender's veth.
pub struct RawSender {
    pub(super) socket: OwnedFd,
    pub(super) ifindex: i32,
}

impl RawSender {
    /// Sends one frame as is.
    pub fn send(&self, frame: &[u8]) -> Result<()> {
        // SAFETY: an all-zero sockaddr_ll is valid.
        let mut addr: libc::sockaddr_ll = unsafe { mem::zeroed() };
        addr.sll_family = libc::AF_PACKET as u16;
        addr.sll_ifindex = self.ifindex;
        addr.sll_protocol = u16::from_be_bytes([frame[12], frame[13]]).to_be();
        addr.sll_halen = 6;
        addr.sll_addr[..6].copy_from_slice(&frame[..6]);
        send_retrying(|| {
            // SAFETY: `frame` and `addr` are live for the call.
            let n = unsafe {
                libc::sendto(
                    self.socket.as_raw_fd(),
                    frame.as_ptr().cast(),
                    frame.len(),
                    0,
                    (&raw const addr).cast(),
                    size_of::<libc::sockaddr_ll>() as libc::socklen_t,
                )
            };
            if n < 0 {
                Err(io::Error::last_os_error())
            } else {
                Ok(n as usize)
            }
        })
        .context("sending a raw frame")
    }

    /// Sends `count` UDP frames from `src` to the receiver's address of the same family on
    /// `port`, with the VLAN `tags` (outermost first), paced like [`send_udp`].
    pub fn send_udp(
        &self,
        tags: &[(u16, u16)],
        src: IpAddr,
        port: u16,
        count: u64,
        pacing: Pacing,
    ) -> Result<u64> {
        let dst = match src {
            IpAddr::V4(_) => IpAddr::V4(RECEIVER_V4),
            IpAddr::V6(_) => IpAddr::V6(RECEIVER_V6),
        };
        let start = Instant::now();
        for seq in 0..count {
            let frame = Builder::ip(src, dst)
                .macs(SENDER_MAC, RECEIVER_MAC)
                .vlans(tags)
                .ports(40000, port)
                .payload(&payload(seq))
                .build();
            self.send(&frame.bytes)?;
            if pacing.burst > 0 && (seq + 1) % pacing.burst as u64 == 0 {
                thread::sleep(pacing.pause);
            }
            ensure!(
                start.elapsed() < SEND_TIME_LIMIT,
                "sending {count} frames took over {SEND_TIME_LIMIT:?}"
            );
        }
        Ok(count)
    }
}
