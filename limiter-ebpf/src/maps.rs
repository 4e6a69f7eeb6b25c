//! The maps the programs share (see `fast_path` for which of them a packet touches).
//!
//! Maps are declared unpinned: the agent pins them under `/sys/fs/bpf/limiter/IFACE/` (and adopts
//! existing pins), while tests and benchmarks load private copies.

use aya_ebpf::{
    macros::map,
    maps::{Array, HashMap, LpmTrie, LruHashMap, PerCpuArray, RingBuf},
};
use limiter_common::{
    AdaptiveStatus, ClientState, GlobalStats, Grant, MapConfig, Policy,
    addr::{ClientKey, PolicyKey},
    maps::{ACTIVE_RING_BYTES, GlobalPolicies, HOT_RING_BYTES},
};

/// Dynamic clients (default or prefix policies). The agent sets the real size at load time
/// (`--max-clients`); LRU eviction bounds memory.
#[map]
pub(crate) static CLIENTS: LruHashMap<ClientKey, ClientState> =
    LruHashMap::with_max_entries(1 << 20, 0);

/// Clients named by an exact-address policy, created by the agent; never evicted.
#[map]
pub(crate) static STATIC_CLIENTS: HashMap<ClientKey, ClientState> =
    HashMap::with_max_entries(1 << 16, 0);

/// Clients over their limit, moved out of `CLIENTS` on their first dropped packet (see
/// `entry::hold_limited`); never evicted, so a flood of new sources cannot evict a limited client
/// and hand it a fresh window. Sized by the agent (`--max-limited`); the agent deletes an entry
/// once its window state has aged out (the client then starts afresh in `CLIENTS`, as it would
/// anyway).
#[map]
pub(crate) static LIMITED: HashMap<ClientKey, ClientState> = HashMap::with_max_entries(1 << 16, 0);

/// Policies by prefix, keyed by family byte + address (`limiter_common::addr::PolicyKey`);
/// `default` is the bare family entry of each family.
#[map]
pub(crate) static POLICIES: LpmTrie<PolicyKey, Policy> = LpmTrie::with_max_entries(1 << 17, 0);

/// API clients named by an ID rather than an address, keyed by the first 16 bytes of the ID's
/// SHA-256 (a collision needs ~2^64 IDs). Sized by the agent (`--max-ids`); LRU like `CLIENTS`.
#[map]
pub(crate) static NAMED: LruHashMap<ClientKey, ClientState> =
    LruHashMap::with_max_entries(1 << 20, 0);

/// Named clients with an exact-ID policy; never evicted (the counterpart of `STATIC_CLIENTS`).
#[map]
pub(crate) static NAMED_STATIC: HashMap<ClientKey, ClientState> =
    HashMap::with_max_entries(1 << 16, 0);

#[map]
pub(crate) static CONFIG: Array<MapConfig> = Array::with_max_entries(1, 0);

#[map]
pub(crate) static STATS: PerCpuArray<GlobalStats> = PerCpuArray::with_max_entries(1, 0);

/// Shared budget for packets whose client entry could not be created (see `GlobalStats::map_full`).
#[map]
pub(crate) static OVERFLOW: Array<ClientState> = Array::with_max_entries(1, 0);

/// The layout version of these maps (`limiter_common::maps::LAYOUT_VERSION`), written by the
/// agent and pinned with them; never read here.
#[map]
static LAYOUT: Array<u32> = Array::with_max_entries(1, 0);

/// Per-CPU cache of the coarse clock: its value and the jiffy it was read in (see `entry::coarse_now`).
#[map]
pub(crate) static COARSE_CLOCK: PerCpuArray<[u64; 2]> = PerCpuArray::with_max_entries(1, 0);

/// Per-CPU: the coarse-clock time (ns) until which a denied client is not moved into `LIMITED`,
/// after the map refused a move for being full (see `entry::hold_limited`). Not pinned: a new
/// program starts without a pause.
#[map]
pub(crate) static LIMITED_FULL_UNTIL: PerCpuArray<u64> = PerCpuArray::with_max_entries(1, 0);

/// Per-CPU: 1 if the last packet this CPU looked up found its client in `LIMITED` under its
/// family's usual key (the first lookup), so the next one looks there first (see
/// `entry::find_packet`). Not pinned: a hint, which a new program starts without.
#[map]
pub(crate) static LOOKUP_HINT: PerCpuArray<u64> = PerCpuArray::with_max_entries(1, 0);

/// Keys of newly active clients, for the agent's adaptive controller (see `FLAG_REPORTED`).
#[map]
pub(crate) static ACTIVE: RingBuf = RingBuf::with_byte_size(ACTIVE_RING_BYTES, 0);

/// The adaptive controller's status for `limiter stats`, written by the agent; never read here.
#[map]
static ADAPTIVE: Array<AdaptiveStatus> = Array::with_max_entries(1, 0);

/// Grants of the cluster's owners to this node for global clients, keyed like the clients'
/// entries; written by the agent, read by the fast path while `CONFIG_CLUSTER` is set. Never
/// evicted; sized by the agent (`--max-global-clients`).
#[map]
pub(crate) static GRANTS: HashMap<ClientKey, Grant> = HashMap::with_max_entries(1 << 16, 0);

/// Keys of global clients grown hot while `CONFIG_CLUSTER` is set, for the agent's cluster
/// enrolment (see `HOT_RING_BYTES` and `entry::report_hot`).
#[map]
pub(crate) static HOT: RingBuf = RingBuf::with_byte_size(HOT_RING_BYTES, 0);

/// Which policies are global (`limiter_common::maps::GlobalPolicies`), written by the agent with
/// the policies; read only when a client grows hot, to report global clients alone.
#[map]
pub(crate) static GLOBAL_POLICIES: Array<GlobalPolicies> = Array::with_max_entries(1, 0);
