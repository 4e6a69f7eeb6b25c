//! The maps as typed tables: writing a policy set (and the generation that invalidates cached
//! policies), restoring entries, the in-place refresh of every entry, and reading counters,
//! status and clients.

use std::{
    os::fd::{AsFd as _, BorrowedFd, OwnedFd},
    sync::{Arc, Mutex},
};

use aya::{
    Ebpf,
    maps::{Array, HashMap, LpmTrie, Map, MapData, MapError, PerCpuArray},
};
use limiter_common::{
    AdaptiveStatus, ClientState, GlobalStats, MapConfig, Policy,
    addr::{ClientKey, PolicyKey},
    maps::GlobalPolicies,
};

use super::{DatapathError, lifecycle::pin_dir, map_err};
use crate::config::TrieEntries;

mod adaptive;
mod clients;
mod limited;
mod policies;
mod refresh;

pub use adaptive::AdaptiveHandles;
pub use clients::ClientMaps;
pub use limited::{LimitedSweep, aged_out};
pub use policies::{ApplyReport, TrieDiff, next_generation, policy_entries};

/// Typed handles on the maps, from a freshly loaded object or from the pins of a running agent.
pub struct Tables {
    pub clients: HashMap<MapData, ClientKey, ClientState>,
    pub static_clients: HashMap<MapData, ClientKey, ClientState>,
    /// Address clients over their limit, moved out of `clients` by the program; never evicted
    /// (see [`LimitedSweep`]).
    pub limited: HashMap<MapData, ClientKey, ClientState>,
    /// API IDs that are not addresses, by `ClientName::key`.
    pub named: HashMap<MapData, ClientKey, ClientState>,
    /// IDs with an exact-ID policy; never evicted.
    pub named_static: HashMap<MapData, ClientKey, ClientState>,
    pub policies: LpmTrie<MapData, PolicyKey, Policy>,
    pub config: Array<MapData, MapConfig>,
    pub stats: PerCpuArray<MapData, GlobalStats>,
    /// The adaptive controller's status (written by the agent each period).
    pub adaptive: Array<MapData, AdaptiveStatus>,
    /// Which policies are global, for the programs' hot notices (`None`: pins of an agent that
    /// predates the map; only an agent's own loaded maps are applied to).
    global_policies: Option<Array<MapData, GlobalPolicies>>,
    /// The `limiter_adapt` program, for the in-place refresh of every entry (see
    /// [`Tables::refresh_all`]).
    refresher: Option<OwnedFd>,
    /// The generation of the last complete refresh (`None`: none yet by these tables).
    last_refresh: Option<u32>,
    /// What the policy trie holds, as these tables last wrote it (`None`: not known, as on
    /// maps just opened or after a failed write; the next `apply` reads the trie). Shared with
    /// the [`TrieDiff`]s made against it.
    trie: Option<Arc<TrieEntries>>,
    /// Address keys an apply moved into `static_clients`, and when: the [`LimitedSweep`] takes
    /// out of `limited` and `clients` what a packet running during the move copied back there.
    made_static: Arc<Mutex<Vec<(ClientKey, std::time::Instant)>>>,
}

impl Tables {
    /// Takes the maps out of a loaded object (its programs keep their references).
    pub fn take(ebpf: &mut Ebpf) -> Result<Tables, DatapathError> {
        let mut get = |name: &'static str| {
            ebpf.take_map(name).ok_or(DatapathError::Map {
                name,
                error: MapError::InvalidName { name: name.into() },
            })
        };
        let mut tables = Tables::from_maps(&mut get)?;
        tables.global_policies =
            Some(Array::try_from(get("GLOBAL_POLICIES")?).map_err(map_err("GLOBAL_POLICIES"))?);
        Ok(tables)
    }

    /// Opens the maps a running (or crashed) agent pinned for `iface`.
    pub fn open_pinned(iface: &str) -> Result<Tables, DatapathError> {
        let dir = pin_dir(iface);
        Tables::from_maps(|name| {
            let path = dir.join(name);
            if !path.exists() {
                return Err(DatapathError::NotPinned {
                    iface: iface.into(),
                    dir: dir.clone(),
                });
            }
            let data = MapData::from_pin(&path).map_err(map_err(name))?;
            Map::from_map_data(data).map_err(map_err(name))
        })
    }

    /// Typed handles on the maps `get` provides by name.
    fn from_maps(
        mut get: impl FnMut(&'static str) -> Result<Map, DatapathError>,
    ) -> Result<Tables, DatapathError> {
        Ok(Tables {
            clients: HashMap::try_from(get("CLIENTS")?).map_err(map_err("CLIENTS"))?,
            static_clients: HashMap::try_from(get("STATIC_CLIENTS")?)
                .map_err(map_err("STATIC_CLIENTS"))?,
            limited: HashMap::try_from(get("LIMITED")?).map_err(map_err("LIMITED"))?,
            named: HashMap::try_from(get("NAMED")?).map_err(map_err("NAMED"))?,
            named_static: HashMap::try_from(get("NAMED_STATIC")?)
                .map_err(map_err("NAMED_STATIC"))?,
            policies: LpmTrie::try_from(get("POLICIES")?).map_err(map_err("POLICIES"))?,
            config: Array::try_from(get("CONFIG")?).map_err(map_err("CONFIG"))?,
            stats: PerCpuArray::try_from(get("STATS")?).map_err(map_err("STATS"))?,
            adaptive: Array::try_from(get("ADAPTIVE")?).map_err(map_err("ADAPTIVE"))?,
            global_policies: None,
            refresher: None,
            last_refresh: None,
            trie: None,
            made_static: Arc::default(),
        })
    }

    pub fn map_config(&self) -> Result<MapConfig, DatapathError> {
        self.config.get(&0, 0).map_err(map_err("CONFIG"))
    }

    /// Global counters summed over CPUs.
    pub fn global(&self) -> Result<GlobalStats, DatapathError> {
        let per_cpu = self.stats.get(&0, 0).map_err(map_err("STATS"))?;
        let mut sum = GlobalStats::default();
        for s in per_cpu.iter() {
            sum.add(s);
        }
        Ok(sum)
    }
}

/// A duplicate of a map's or program's descriptor; `name` says whose in the error.
pub(super) fn dup_fd(fd: BorrowedFd<'_>, name: &'static str) -> Result<OwnedFd, DatapathError> {
    fd.try_clone_to_owned().map_err(|error| DatapathError::Io {
        what: "duplicating the descriptor of",
        path: name.into(),
        error,
    })
}

/// A second handle on a map, through a duplicated descriptor.
fn dup_map(map: &MapData, name: &'static str) -> Result<Map, DatapathError> {
    let fd = dup_fd(map.fd().as_fd(), name)?;
    Map::from_map_data(MapData::from_fd(fd).map_err(map_err(name))?).map_err(map_err(name))
}
