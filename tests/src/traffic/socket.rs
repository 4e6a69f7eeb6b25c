//! The sockets the harness sends and counts with: UDP sockets bound in a namespace, a dual-stack
//! receiver, and `AF_PACKET` sockets on the veth for raw (VLAN-tagged) frames.

use std::{
    ffi::CString,
    io, mem,
    net::{IpAddr, SocketAddr, UdpSocket},
    os::fd::{AsRawFd, FromRawFd as _, OwnedFd},
    time::Duration,
};

use anyhow::{Context as _, Result};

use super::{PacketCounter, RawSender};
use crate::{
    frames::udp_source,
    netns::{TestNet, in_netns},
};

impl TestNet {
    /// A UDP socket in the sender namespace bound to `src` (port chosen by the kernel).
    pub fn udp_sender(&self, src: IpAddr) -> Result<UdpSocket> {
        udp_sender_in(&self.sender_ns, src)
    }

    /// A dual-stack UDP socket in the receiver namespace bound to `[::]:port` with a 32 MiB
    /// receive buffer, counting datagrams per source address on a background thread.
    pub fn udp_counter(&self, port: u16) -> Result<PacketCounter> {
        udp_counter_in(&self.receiver_ns, port)
    }

    /// An `AF_PACKET` socket on the receiver's veth counting UDP frames to `port` per source
    /// address, whatever VLAN tags they carry: every frame that the XDP program passed.
    pub fn frame_counter(&self, port: u16) -> Result<PacketCounter> {
        let ifname = self.receiver_if.clone();
        let socket = self.in_receiver(|| packet_socket(&ifname, libc::ETH_P_ALL as u16))??;
        set_timeout(&socket, Duration::from_millis(50))?;
        set_int_opt(&socket, libc::SOL_SOCKET, libc::SO_RCVBUFFORCE, 32 << 20)?;
        let mut buf = vec![0u8; 4096];
        Ok(PacketCounter::spawn(move || {
            // SAFETY: an all-zero sockaddr_ll is valid; recvfrom writes at most `len` bytes.
            let mut from: libc::sockaddr_ll = unsafe { mem::zeroed() };
            let mut len = size_of::<libc::sockaddr_ll>() as libc::socklen_t;
            // SAFETY: `buf` and `from` are live for the call and their lengths are passed.
            let n = unsafe {
                libc::recvfrom(
                    socket.as_raw_fd(),
                    buf.as_mut_ptr().cast(),
                    buf.len(),
                    0,
                    (&raw mut from).cast(),
                    &mut len,
                )
            };
            if n < 0 {
                let e = io::Error::last_os_error();
                return if is_timeout(&e) { Ok(None) } else { Err(e) };
            }
            if from.sll_pkttype == libc::PACKET_OUTGOING {
                return Ok(None);
            }
            Ok(udp_source(&buf[..n as usize], port))
        }))
    }

    /// An `AF_PACKET` socket on the sender's veth for raw (e.g. VLAN-tagged) frames.
    pub fn raw_sender(&self) -> Result<RawSender> {
        let ifname = self.sender_if.clone();
        let (socket, ifindex) = self.in_sender(|| -> Result<(OwnedFd, i32)> {
            // Protocol 0: this socket only sends.
            let socket = packet_socket(&ifname, 0)?;
            Ok((socket, if_index(&ifname)?))
        })??;
        set_int_opt(&socket, libc::SOL_SOCKET, libc::SO_SNDBUFFORCE, 4 << 20)?;
        Ok(RawSender { socket, ifindex })
    }
}

/// A UDP socket in namespace `ns` bound to `src` (port chosen by the kernel), with a 4 MiB send
/// buffer.
pub(super) fn udp_sender_in(ns: &str, src: IpAddr) -> Result<UdpSocket> {
    in_netns(ns, || -> Result<UdpSocket> {
        let socket = UdpSocket::bind(SocketAddr::new(src, 0))
            .with_context(|| format!("binding a UDP socket to {src} in namespace {ns}"))?;
        set_int_opt(&socket, libc::SOL_SOCKET, libc::SO_SNDBUFFORCE, 4 << 20)?;
        Ok(socket)
    })?
}

/// A dual-stack UDP socket in namespace `ns` bound to `[::]:port` (so every IPv4 and IPv6
/// address of the namespace, on any interface), counting datagrams per source address on a
/// background thread.
pub(super) fn udp_counter_in(ns: &str, port: u16) -> Result<PacketCounter> {
    let socket = in_netns(ns, || dual_stack_udp(port))??;
    socket.set_read_timeout(Some(Duration::from_millis(50)))?;
    let mut buf = vec![0u8; 2048];
    Ok(PacketCounter::spawn(move || {
        match socket.recv_from(&mut buf) {
            Ok((_, from)) => Ok(Some(from.ip().to_canonical())),
            Err(e) if is_timeout(&e) => Ok(None),
            Err(e) => Err(e),
        }
    }))
}

/// [`udp_counter_in`] that also keeps when each datagram arrived, by CLOCK_MONOTONIC: the
/// kernel's receive timestamp (`SO_TIMESTAMPNS`, taken when the packet entered the receiver's
/// stack, right after the XDP program passed it, not when the counting thread got to it), moved
/// from CLOCK_REALTIME onto CLOCK_MONOTONIC by the offset between the two when the counter
/// starts. A datagram without a timestamp gets the time it was read.
pub(super) fn udp_timed_counter_in(ns: &str, port: u16) -> Result<PacketCounter> {
    let socket = in_netns(ns, || dual_stack_udp(port))??;
    socket.set_read_timeout(Some(Duration::from_millis(50)))?;
    set_int_opt(&socket, libc::SOL_SOCKET, libc::SO_TIMESTAMPNS, 1)?;
    let offset = realtime_minus_monotonic();
    let mut buf = vec![0u8; 2048];
    // Room for one cmsg with a timespec, aligned as cmsghdr needs.
    let mut control = [0u64; 16];
    Ok(PacketCounter::spawn_timed(move || {
        // SAFETY: all-zero sockaddr_in6 and msghdr are valid; the pointers set below are live
        // for the call and their lengths are passed.
        let mut from: libc::sockaddr_in6 = unsafe { mem::zeroed() };
        let mut iov = libc::iovec {
            iov_base: buf.as_mut_ptr().cast(),
            iov_len: buf.len(),
        };
        // SAFETY: as above.
        let mut msg: libc::msghdr = unsafe { mem::zeroed() };
        msg.msg_name = (&raw mut from).cast();
        msg.msg_namelen = size_of::<libc::sockaddr_in6>() as libc::socklen_t;
        msg.msg_iov = &raw mut iov;
        msg.msg_iovlen = 1;
        msg.msg_control = control.as_mut_ptr().cast();
        msg.msg_controllen = size_of_val(&control);
        // SAFETY: `msg` points at live buffers of the lengths it gives.
        let n = unsafe { libc::recvmsg(socket.as_raw_fd(), &raw mut msg, 0) };
        if n < 0 {
            let e = io::Error::last_os_error();
            return if is_timeout(&e) { Ok(None) } else { Err(e) };
        }
        let mut at = None;
        // SAFETY: the CMSG_* walk stays within `msg.msg_control`/`msg_controllen` as the kernel
        // filled them; an SCM_TIMESTAMPNS payload is a timespec.
        unsafe {
            let mut cmsg = libc::CMSG_FIRSTHDR(&raw const msg);
            while !cmsg.is_null() {
                if (*cmsg).cmsg_level == libc::SOL_SOCKET
                    && (*cmsg).cmsg_type == libc::SCM_TIMESTAMPNS
                {
                    let ts: libc::timespec = std::ptr::read_unaligned(libc::CMSG_DATA(cmsg).cast());
                    let real = ts.tv_sec as i128 * 1_000_000_000 + ts.tv_nsec as i128;
                    at = u64::try_from(real - offset).ok().map(Duration::from_nanos);
                }
                cmsg = libc::CMSG_NXTHDR(&raw const msg, cmsg);
            }
        }
        let ip = std::net::SocketAddrV6::new(
            from.sin6_addr.s6_addr.into(),
            u16::from_be(from.sin6_port),
            0,
            0,
        )
        .ip()
        .to_canonical();
        Ok(Some((ip, at.unwrap_or_else(crate::clock::monotonic))))
    }))
}

/// CLOCK_REALTIME − CLOCK_MONOTONIC in nanoseconds, from the closest of a few readings of one
/// between two of the other.
fn realtime_minus_monotonic() -> i128 {
    let read = |clock| {
        // SAFETY: an all-zero timespec is valid; clock_gettime fills it.
        let mut ts: libc::timespec = unsafe { mem::zeroed() };
        // SAFETY: `ts` is a live timespec; both clocks exist.
        unsafe { libc::clock_gettime(clock, &mut ts) };
        ts.tv_sec as i128 * 1_000_000_000 + ts.tv_nsec as i128
    };
    (0..10)
        .map(|_| {
            let before = read(libc::CLOCK_MONOTONIC);
            let real = read(libc::CLOCK_REALTIME);
            let after = read(libc::CLOCK_MONOTONIC);
            (after - before, real - (before + after) / 2)
        })
        .min_by_key(|&(spread, _)| spread)
        .map_or(0, |(_, offset)| offset)
}

pub(super) fn is_timeout(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut | io::ErrorKind::Interrupted
    )
}

fn cvt(ret: libc::c_int, what: &str) -> Result<libc::c_int> {
    if ret < 0 {
        return Err(io::Error::last_os_error()).context(what.to_owned());
    }
    Ok(ret)
}

pub(super) fn set_int_opt(fd: &impl AsRawFd, level: i32, name: i32, value: i32) -> Result<()> {
    // SAFETY: `value` is a live c_int of the given size.
    let ret = unsafe {
        libc::setsockopt(
            fd.as_raw_fd(),
            level,
            name,
            (&raw const value).cast(),
            size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    cvt(ret, "setsockopt").map(drop)
}

fn set_timeout(fd: &impl AsRawFd, timeout: Duration) -> Result<()> {
    let tv = libc::timeval {
        tv_sec: timeout.as_secs() as libc::time_t,
        tv_usec: timeout.subsec_micros() as libc::suseconds_t,
    };
    // SAFETY: `tv` is a live timeval.
    let ret = unsafe {
        libc::setsockopt(
            fd.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_RCVTIMEO,
            (&raw const tv).cast(),
            size_of::<libc::timeval>() as libc::socklen_t,
        )
    };
    cvt(ret, "setsockopt(SO_RCVTIMEO)").map(drop)
}

/// An `AF_INET6` UDP socket with `IPV6_V6ONLY` off (IPv4 arrives as `::ffff:a.b.c.d`), bound to
/// `[::]:port`, with a 32 MiB receive buffer. Call inside the receiver namespace.
fn dual_stack_udp(port: u16) -> Result<UdpSocket> {
    // SAFETY: plain socket(2).
    let fd = cvt(
        unsafe { libc::socket(libc::AF_INET6, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) },
        "socket(AF_INET6)",
    )?;
    // SAFETY: a fresh fd we own.
    let socket = unsafe { OwnedFd::from_raw_fd(fd) };
    set_int_opt(&socket, libc::IPPROTO_IPV6, libc::IPV6_V6ONLY, 0)?;
    set_int_opt(&socket, libc::SOL_SOCKET, libc::SO_RCVBUFFORCE, 32 << 20)?;
    // SAFETY: an all-zero sockaddr_in6 is the unspecified address.
    let mut addr: libc::sockaddr_in6 = unsafe { mem::zeroed() };
    addr.sin6_family = libc::AF_INET6 as libc::sa_family_t;
    addr.sin6_port = port.to_be();
    // SAFETY: `addr` is a live sockaddr_in6 of the given length.
    let ret = unsafe {
        libc::bind(
            socket.as_raw_fd(),
            (&raw const addr).cast(),
            size_of::<libc::sockaddr_in6>() as libc::socklen_t,
        )
    };
    cvt(ret, &format!("binding [::]:{port}"))?;
    Ok(UdpSocket::from(socket))
}

fn if_index(ifname: &str) -> Result<i32> {
    let name = CString::new(ifname)?;
    // SAFETY: a valid NUL-terminated string.
    match unsafe { libc::if_nametoindex(name.as_ptr()) } {
        0 => Err(io::Error::last_os_error()).with_context(|| format!("interface {ifname}")),
        i => Ok(i as i32),
    }
}

/// An `AF_PACKET`/`SOCK_RAW` socket bound to `ifname` (call inside its namespace); `protocol`
/// 0 receives nothing.
fn packet_socket(ifname: &str, protocol: u16) -> Result<OwnedFd> {
    let ifindex = if_index(ifname)?;
    // SAFETY: plain socket(2).
    let fd = cvt(
        unsafe {
            libc::socket(
                libc::AF_PACKET,
                libc::SOCK_RAW | libc::SOCK_CLOEXEC,
                protocol.to_be() as i32,
            )
        },
        "socket(AF_PACKET)",
    )?;
    // SAFETY: a fresh fd we own.
    let socket = unsafe { OwnedFd::from_raw_fd(fd) };
    // SAFETY: an all-zero sockaddr_ll is valid.
    let mut addr: libc::sockaddr_ll = unsafe { mem::zeroed() };
    addr.sll_family = libc::AF_PACKET as u16;
    addr.sll_protocol = protocol.to_be();
    addr.sll_ifindex = ifindex;
    // SAFETY: `addr` is a live sockaddr_ll of the given length.
    let ret = unsafe {
        libc::bind(
            socket.as_raw_fd(),
            (&raw const addr).cast(),
            size_of::<libc::sockaddr_ll>() as libc::socklen_t,
        )
    };
    cvt(ret, &format!("binding a packet socket to {ifname}"))?;
    Ok(socket)
}
