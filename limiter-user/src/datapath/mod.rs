//! The kernel side as seen from userspace: the XDP program's lifecycle (load, pin, attach,
//! [`lifecycle`]), its maps as typed tables (policy writes, restore, refresh, readers,
//! [`tables`]), and the one primitive that writes client entries without racing packets, the
//! BPF_PROG_TEST_RUN frame runner ([`frame`]). The raw `bpf(2)` and netlink calls aya does not
//! offer are in [`syscall`] and `netlink`; the kernel version and feature check run at start is
//! [`kernel`], and the program's rare-event log is forwarded to `tracing` by `kernel_log`.

pub mod ebpf;
pub mod frame;
pub mod grants;
pub mod kernel;
mod kernel_log;
pub mod lifecycle;
mod netlink;
pub mod privileges;
pub mod syscall;
pub mod tables;

pub use self::{
    frame::{
        ADAPT_FRAME, ADAPT_PROGRAM, ADAPT_READ_FRAME, CHECK_FRAME, CHECK_PROGRAM, EntryReads,
        FrameLayout, ReadFrameError, RunResult, TestRunFrame, XDP_PASS,
    },
    grants::{ClusterMaps, DEFAULT_MAX_GLOBAL_CLIENTS},
    lifecycle::*,
    tables::*,
};

use std::{io, path::PathBuf};

use aya::{
    maps::{MapError, MapType},
    programs::ProgramError,
};
use limiter_common::{
    AdaptiveStatus, ClientState, GlobalStats, MapConfig, Policy, addr::PolicyKey,
};
/// Where each interface's maps are pinned: `/sys/fs/bpf/limiter/IFACE/`.
pub const PIN_ROOT: &str = "/sys/fs/bpf/limiter";
/// The XDP entry point the agent attaches.
pub const PROGRAM: &str = "limiter";
/// Default capacity of the dynamic-client LRU map. Each client costs ~112 bytes of kernel memory
/// (48-byte value, 16-byte key, 48-byte `htab_elem`) plus its bucket, ~128 MiB at this size.
pub const DEFAULT_MAX_CLIENTS: u32 = 1 << 20;
/// Default capacity of `LIMITED`, the never-evicted map of clients over their limit: 65,536
/// entries of 120 bytes, 7.5 MiB.
pub const DEFAULT_MAX_LIMITED: u32 = 1 << 16;
/// Default capacity of the LRU map of API IDs that are not addresses (same cost per entry).
pub const DEFAULT_MAX_IDS: u32 = 1 << 20;

/// The maps the agent pins, with their kernel layout: a pinned map of another layout (an older
/// build, another `--max-clients`) is not adopted.
const PINNED: [(&str, MapType, usize, usize); 15] = [
    ("LAYOUT", MapType::Array, 4, 4),
    ("CLIENTS", MapType::LruHash, 16, size_of::<ClientState>()),
    (
        "STATIC_CLIENTS",
        MapType::Hash,
        16,
        size_of::<ClientState>(),
    ),
    ("LIMITED", MapType::Hash, 16, size_of::<ClientState>()),
    ("NAMED", MapType::LruHash, 16, size_of::<ClientState>()),
    ("NAMED_STATIC", MapType::Hash, 16, size_of::<ClientState>()),
    (
        "POLICIES",
        MapType::LpmTrie,
        4 + size_of::<PolicyKey>(),
        size_of::<Policy>(),
    ),
    ("CONFIG", MapType::Array, 4, size_of::<MapConfig>()),
    ("STATS", MapType::PerCpuArray, 4, size_of::<GlobalStats>()),
    ("OVERFLOW", MapType::Array, 4, size_of::<ClientState>()),
    // A ring buffer has neither keys nor values.
    ("ACTIVE", MapType::RingBuf, 0, 0),
    ("ADAPTIVE", MapType::Array, 4, size_of::<AdaptiveStatus>()),
    (
        "GRANTS",
        MapType::Hash,
        16,
        size_of::<limiter_common::Grant>(),
    ),
    ("HOT", MapType::RingBuf, 0, 0),
    // Added within layout 7: pins without it get it created (and written at the first apply).
    (
        "GLOBAL_POLICIES",
        MapType::Array,
        4,
        size_of::<limiter_common::maps::GlobalPolicies>(),
    ),
];

#[derive(Debug, thiserror::Error)]
pub enum DatapathError {
    #[error(
        "limiter lacks {0}: run it as root, or grant it CAP_BPF, CAP_NET_ADMIN and CAP_PERFMON \
         (systemd: AmbientCapabilities=; by hand: setpriv --inh-caps=+bpf,+net_admin,+perfmon \
         --ambient-caps=+bpf,+net_admin,+perfmon ...)"
    )]
    MissingCapabilities(privileges::Missing),
    #[error("reading the process's capabilities")]
    Capabilities(#[source] io::Error),
    #[error(
        "the pin directory {dir} cannot be created or written by this user: an agent that is not \
         root needs it made for it, owned by its user (`install -d -m 0700 -o USER {dir}`; the \
         systemd unit packaging/limiter@.service does this)"
    )]
    PinDirDenied { dir: PathBuf },
    #[error(
        "bpffs is not mounted at /sys/fs/bpf: run `mount -t bpf bpf /sys/fs/bpf` (in a network \
         namespace, start the agent with `nsenter --net=/run/netns/NAME`, not `ip netns exec`, \
         which mounts a /sys of its own where pins would vanish with the agent)"
    )]
    BpffsNotMounted,
    #[error(transparent)]
    Kernel(#[from] kernel::KernelError),
    #[error("interface {0:?} does not exist: check the name with `ip link`")]
    NoInterface(String),
    #[error(
        "the driver of {iface} does not support XDP in {mode} mode: use `--xdp-mode skb` (generic XDP) or `--xdp-mode auto`"
    )]
    ModeUnsupported { iface: String, mode: &'static str },
    #[error(
        "{iface} already has another XDP program attached: rerun with `--replace` to replace it, or remove it with `ip link set dev {iface} xdp off`"
    )]
    Busy { iface: String },
    #[error(
        "{iface}: the XDP program attached there is held by a bpf_link of another process; stop that process (or remove its pinned link) first"
    )]
    ForeignLink { iface: String },
    #[error(
        "no limiter maps are pinned for {iface} under {dir}: is `limiter agent --iface {iface}` running?"
    )]
    NotPinned { iface: String, dir: PathBuf },
    #[error("loading the XDP program")]
    Load(#[from] aya::EbpfError),
    #[error("XDP program")]
    Program(#[from] ProgramError),
    #[error("map {name}")]
    Map {
        name: &'static str,
        #[source]
        error: MapError,
    },
    #[error("{what} {path}")]
    Io {
        what: &'static str,
        path: PathBuf,
        #[source]
        error: io::Error,
    },
}

fn map_err(name: &'static str) -> impl FnOnce(MapError) -> DatapathError {
    move |source| DatapathError::Map {
        name,
        error: source,
    }
}
