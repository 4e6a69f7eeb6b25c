//! Removing another program's XDP attachment (`limiter agent --replace`): one RTM_SETLINK with
//! `IFLA_XDP_FD = -1`, what `ip link set dev IFACE xdp off` sends. aya 0.14 keeps its netlink
//! code private.

use std::{io, mem::size_of};

const IFLA_XDP: u16 = 43;
const IFLA_XDP_FD: u16 = 1;
const IFLA_XDP_FLAGS: u16 = 3;
const NLA_F_NESTED: u16 = 1 << 15;
const XDP_FLAGS_SKB_MODE: u32 = 1 << 1;
const XDP_FLAGS_DRV_MODE: u32 = 1 << 2;

#[repr(C)]
struct Request {
    // struct nlmsghdr
    len: u32,
    kind: u16,
    flags: u16,
    seq: u32,
    pid: u32,
    // struct ifinfomsg
    family: u8,
    _pad: u8,
    if_type: u16,
    index: i32,
    if_flags: u32,
    change: u32,
    // IFLA_XDP, nested: IFLA_XDP_FD, IFLA_XDP_FLAGS
    xdp_len: u16,
    xdp_type: u16,
    fd_len: u16,
    fd_type: u16,
    fd: i32,
    flags_len: u16,
    flags_type: u16,
    xdp_flags: u32,
}

/// Detaches whatever netlink-attached XDP program `if_index` has, in both generic and native
/// mode. Fails with `EBUSY` when the program is held by a bpf_link of another process, which
/// only that process (or its pin's owner) can release.
pub fn detach_xdp(if_index: u32) -> io::Result<()> {
    for mode in [XDP_FLAGS_SKB_MODE, XDP_FLAGS_DRV_MODE] {
        set_xdp_fd(if_index, mode)?;
    }
    Ok(())
}

fn set_xdp_fd(if_index: u32, mode: u32) -> io::Result<()> {
    // SAFETY: plain socket creation; the fd is closed below on every path.
    let sock = unsafe {
        libc::socket(
            libc::AF_NETLINK,
            libc::SOCK_RAW | libc::SOCK_CLOEXEC,
            libc::NETLINK_ROUTE,
        )
    };
    if sock < 0 {
        return Err(io::Error::last_os_error());
    }
    let result = exchange(sock, if_index, mode);
    // SAFETY: `sock` is ours.
    unsafe { libc::close(sock) };
    result
}

fn exchange(sock: i32, if_index: u32, mode: u32) -> io::Result<()> {
    let req = Request {
        len: size_of::<Request>() as u32,
        kind: libc::RTM_SETLINK,
        flags: (libc::NLM_F_REQUEST | libc::NLM_F_ACK) as u16,
        seq: 1,
        pid: 0,
        family: libc::AF_UNSPEC as u8,
        _pad: 0,
        if_type: 0,
        index: if_index as i32,
        if_flags: 0,
        change: 0,
        xdp_len: 4 + 8 + 8,
        xdp_type: IFLA_XDP | NLA_F_NESTED,
        fd_len: 8,
        fd_type: IFLA_XDP_FD,
        fd: -1,
        flags_len: 8,
        flags_type: IFLA_XDP_FLAGS,
        xdp_flags: mode,
    };
    // SAFETY: `req` is a plain repr(C) struct sent as bytes.
    let sent = unsafe {
        libc::send(
            sock,
            (&req as *const Request).cast(),
            size_of::<Request>(),
            0,
        )
    };
    if sent < 0 {
        return Err(io::Error::last_os_error());
    }
    let mut buf = [0u8; 1024];
    // SAFETY: `buf` is writable for its length.
    let n = unsafe { libc::recv(sock, buf.as_mut_ptr().cast(), buf.len(), 0) };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    // struct nlmsghdr (16 bytes) then, for NLMSG_ERROR, an i32 errno (0 is the ACK).
    if n < 20 || u16::from_ne_bytes([buf[4], buf[5]]) != libc::NLMSG_ERROR as u16 {
        return Err(io::Error::other("unexpected netlink reply"));
    }
    match i32::from_ne_bytes([buf[16], buf[17], buf[18], buf[19]]) {
        0 => Ok(()),
        e => Err(io::Error::from_raw_os_error(-e)),
    }
}
