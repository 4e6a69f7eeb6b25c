//! Raw bpf(2) commands that aya 0.14 does not expose: batched map reads and writes (a snapshot
//! of a million clients in well under a second instead of two syscalls per entry) and forced
//! link detach.
//!
//! Attribute layouts are the kernel's `union bpf_attr` members
//! (https://github.com/torvalds/linux/blob/v6.18/include/uapi/linux/bpf.h).

use std::{
    ffi::CString,
    io,
    os::{
        fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd},
        unix::ffi::OsStrExt,
    },
    path::Path,
};

use aya::Pod;

const BPF_OBJ_GET: libc::c_long = 7;
const BPF_OBJ_GET_INFO_BY_FD: libc::c_long = 15;
const BPF_PROG_TEST_RUN: libc::c_long = 10;
const BPF_MAP_LOOKUP_BATCH: libc::c_long = 24;
const BPF_MAP_UPDATE_BATCH: libc::c_long = 26;
const BPF_LINK_DETACH: libc::c_long = 34;

/// Entries read or written per batch syscall.
const BATCH: usize = 4096;

/// `bpf_attr.batch`.
#[repr(C)]
#[derive(Default)]
struct BatchAttr {
    in_batch: u64,
    out_batch: u64,
    keys: u64,
    values: u64,
    count: u32,
    map_fd: u32,
    elem_flags: u64,
    flags: u64,
}

/// `bpf_attr.link_detach`.
#[repr(C)]
struct LinkDetachAttr {
    link_fd: u32,
}

/// `bpf_attr.info`.
#[repr(C)]
struct InfoAttr {
    bpf_fd: u32,
    info_len: u32,
    info: u64,
}

/// `bpf_attr` for BPF_OBJ_GET.
#[repr(C)]
struct ObjGetAttr {
    pathname: u64,
    bpf_fd: u32,
    file_flags: u32,
}

/// `bpf_attr.test`.
#[repr(C)]
#[derive(Default)]
struct TestRunAttr {
    prog_fd: u32,
    retval: u32,
    data_size_in: u32,
    data_size_out: u32,
    data_in: u64,
    data_out: u64,
    repeat: u32,
    duration: u32,
    ctx_size_in: u32,
    ctx_size_out: u32,
    ctx_in: u64,
    ctx_out: u64,
    flags: u32,
    cpu: u32,
    batch_size: u32,
    _pad: u32,
}

/// Runs a program once on `frame` with BPF_PROG_TEST_RUN, in place: the frame as the program
/// left it is copied back over `frame`. Returns the program's return value. (aya's `TestRun`
/// needs the `Xdp` handle; this takes a plain descriptor, which any number of threads may use
/// at once.)
pub fn prog_test_run(prog: BorrowedFd<'_>, frame: &mut [u8]) -> io::Result<u32> {
    let len =
        u32::try_from(frame.len()).map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
    let mut attr = TestRunAttr {
        prog_fd: prog.as_raw_fd() as u32,
        data_size_in: len,
        data_size_out: len,
        data_in: frame.as_ptr() as u64,
        data_out: frame.as_mut_ptr() as u64,
        repeat: 1,
        ..TestRunAttr::default()
    };
    bpf(BPF_PROG_TEST_RUN, &mut attr)?;
    Ok(attr.retval)
}

/// `BPF_F_TEST_XDP_LIVE_FRAMES`: BPF_PROG_TEST_RUN runs an XDP program on real frames that its
/// verdict sends on (XDP_TX out of the context's interface, XDP_REDIRECT), Linux 5.18 (commit
/// b530e9e1063e, "bpf: Add "live packet" mode for XDP in BPF_PROG_RUN").
const BPF_F_TEST_XDP_LIVE_FRAMES: u32 = 1 << 1;

/// Runs XDP program `prog` `repeat` times in live-frames mode on `frame`, as if received on
/// interface `ifindex` of the calling thread's namespace: an XDP_TX verdict transmits the frame
/// out of that interface. A traffic generator for benchmarks (aya 0.14's test run has no flags).
pub fn prog_test_run_live(
    prog: BorrowedFd<'_>,
    frame: &[u8],
    ifindex: u32,
    repeat: u32,
) -> io::Result<()> {
    let len =
        u32::try_from(frame.len()).map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
    // struct xdp_md: data, data_end, data_meta, ingress_ifindex, rx_queue_index, egress_ifindex.
    let md: [u32; 6] = [0, len, 0, ifindex, 0, 0];
    let mut attr = TestRunAttr {
        prog_fd: prog.as_raw_fd() as u32,
        data_size_in: len,
        data_in: frame.as_ptr() as u64,
        repeat,
        ctx_size_in: size_of_val(&md) as u32,
        ctx_in: md.as_ptr() as u64,
        flags: BPF_F_TEST_XDP_LIVE_FRAMES,
        ..TestRunAttr::default()
    };
    bpf(BPF_PROG_TEST_RUN, &mut attr)
}

fn bpf<T>(cmd: libc::c_long, attr: &mut T) -> io::Result<()> {
    // SAFETY: `attr` is a valid, initialised attribute struct of the size passed.
    let ret = unsafe { libc::syscall(libc::SYS_bpf, cmd, attr as *mut T, size_of::<T>() as u32) };
    if ret < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(())
    }
}

/// Reads every entry of a hash map (plain or LRU) with BPF_MAP_LOOKUP_BATCH. Entries that are
/// added or removed concurrently may or may not be seen, as with any walk of a live map.
pub fn lookup_all<K: Pod + Default, V: Pod + Default>(
    map: BorrowedFd<'_>,
) -> io::Result<Vec<(K, V)>> {
    let mut out = Vec::new();
    lookup_each(map, |k: &K, v: &V| out.push((*k, *v)))?;
    Ok(out)
}

/// Visits every entry of a hash map (plain or LRU) with BPF_MAP_LOOKUP_BATCH, one batch of
/// [`BATCH`] entries in memory at a time (for 56-byte entries, 224 KiB however big the map), as
/// [`lookup_all`] sees them.
pub fn lookup_each<K: Pod + Default, V: Pod + Default>(
    map: BorrowedFd<'_>,
    mut visit: impl FnMut(&K, &V),
) -> io::Result<()> {
    let mut keys = vec![K::default(); BATCH];
    let mut values = vec![V::default(); BATCH];
    // The batch token: for hash maps a bucket index (u32); sized generously.
    let mut token_in = [0u8; 16];
    let mut token_out = [0u8; 16];
    let mut first = true;
    loop {
        let mut attr = BatchAttr {
            in_batch: if first {
                0
            } else {
                token_in.as_mut_ptr() as u64
            },
            out_batch: token_out.as_mut_ptr() as u64,
            keys: keys.as_mut_ptr() as u64,
            values: values.as_mut_ptr() as u64,
            count: BATCH as u32,
            map_fd: map.as_raw_fd() as u32,
            ..Default::default()
        };
        let result = bpf(BPF_MAP_LOOKUP_BATCH, &mut attr);
        let n = (attr.count as usize).min(BATCH);
        for (key, value) in keys[..n].iter().zip(&values[..n]) {
            visit(key, value);
        }
        match result {
            Ok(()) => {}
            Err(e) if e.raw_os_error() == Some(libc::ENOENT) => return Ok(()),
            Err(e) => return Err(e),
        }
        token_in = token_out;
        first = false;
    }
}

/// Writes entries with BPF_MAP_UPDATE_BATCH (`BPF_ANY`).
pub fn update_all<K: Pod, V: Pod>(map: BorrowedFd<'_>, entries: &[(K, V)]) -> io::Result<()> {
    for chunk in entries.chunks(BATCH) {
        let keys: Vec<K> = chunk.iter().map(|(k, _)| *k).collect();
        let values: Vec<V> = chunk.iter().map(|(_, v)| *v).collect();
        let mut attr = BatchAttr {
            keys: keys.as_ptr() as u64,
            values: values.as_ptr() as u64,
            count: chunk.len() as u32,
            map_fd: map.as_raw_fd() as u32,
            ..Default::default()
        };
        bpf(BPF_MAP_UPDATE_BATCH, &mut attr)?;
        if attr.count as usize != chunk.len() {
            return Err(io::Error::other(format!(
                "batch update wrote {} of {} entries",
                attr.count,
                chunk.len()
            )));
        }
    }
    Ok(())
}

/// Detaches a BPF link from its hook now, whoever else holds it (BPF_LINK_DETACH, Linux 5.9).
pub fn link_detach(link: BorrowedFd<'_>) -> io::Result<()> {
    let mut attr = LinkDetachAttr {
        link_fd: link.as_raw_fd() as u32,
    };
    bpf(BPF_LINK_DETACH, &mut attr)
}

/// The interface an XDP link is attached to: `struct bpf_link_info`'s `xdp.ifindex`, 0 once the
/// link is detached (the interface was deleted, or `BPF_LINK_DETACH`). aya 0.14's `LinkInfo`
/// does not expose it.
pub fn xdp_link_ifindex(link: BorrowedFd<'_>) -> io::Result<u32> {
    // type, id, prog_id, then the union (8-byte aligned, at byte 16); the kernel copies no more
    // than asked for.
    let mut info = [0u32; 8];
    let mut attr = InfoAttr {
        bpf_fd: link.as_raw_fd() as u32,
        info_len: size_of_val(&info) as u32,
        info: info.as_mut_ptr() as u64,
    };
    bpf(BPF_OBJ_GET_INFO_BY_FD, &mut attr)?;
    Ok(info[4])
}

/// Opens a pinned BPF object (BPF_OBJ_GET).
pub fn obj_get(path: &Path) -> io::Result<OwnedFd> {
    let c_path = CString::new(path.as_os_str().as_bytes()).map_err(io::Error::other)?;
    let mut attr = ObjGetAttr {
        pathname: c_path.as_ptr() as u64,
        bpf_fd: 0,
        file_flags: 0,
    };
    // SAFETY: `attr` is a valid BPF_OBJ_GET attribute; `c_path` outlives the call.
    let fd = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            BPF_OBJ_GET,
            &mut attr as *mut ObjGetAttr,
            size_of::<ObjGetAttr>() as u32,
        )
    };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: the kernel returned a new file descriptor that nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as i32) })
}
