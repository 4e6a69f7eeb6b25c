//! The maps of the cluster's enrolment: `GRANTS` (what the owners of global clients granted this
//! node; the fast path enforces the leases itself), `HOT` (the clients the fast path reported
//! over their limit while `CONFIG_CLUSTER` is set: moved into `LIMITED`, or, paced, dropped in
//! a map they never leave) and the client maps, addresses' and IDs', read one client at a time
//! for the held clients' counters.

use std::os::fd::OwnedFd;

use aya::{
    Ebpf,
    maps::{HashMap, Map, MapData, MapError, RingBuf},
};
use limiter_common::{ClientState, Grant, addr::ClientKey};

use super::{DatapathError, Tables, map_err};

/// Default capacity of `GRANTS` (`--max-global-clients`): 65,536 entries of ~100 bytes.
pub const DEFAULT_MAX_GLOBAL_CLIENTS: u32 = 1 << 16;

/// Enrolment's handles on the maps.
pub struct ClusterMaps {
    grants: HashMap<MapData, ClientKey, Grant>,
    hot: RingBuf<MapData>,
    /// `LIMITED`, `CLIENTS`, `STATIC_CLIENTS`, `NAMED_STATIC`, `NAMED`: where a client's entry
    /// may be, likeliest first for a hot client (an address's before an API ID's: address keys
    /// and ID keys, SHA-256 prefixes, do not meet).
    clients: [HashMap<MapData, ClientKey, ClientState>; 5],
}

fn taken(ebpf: &mut Ebpf, name: &'static str) -> Result<Map, DatapathError> {
    ebpf.take_map(name).ok_or(DatapathError::Map {
        name,
        error: MapError::InvalidName { name: name.into() },
    })
}

fn from_fd(
    fd: OwnedFd,
    name: &'static str,
) -> Result<HashMap<MapData, ClientKey, ClientState>, DatapathError> {
    let data = MapData::from_fd(fd).map_err(map_err(name))?;
    HashMap::try_from(Map::from_map_data(data).map_err(map_err(name))?).map_err(map_err(name))
}

impl ClusterMaps {
    /// Takes `GRANTS` and `HOT` out of a loaded object, and handles of its own on the client
    /// maps `tables` hold.
    pub fn take(ebpf: &mut Ebpf, tables: &Tables) -> Result<ClusterMaps, DatapathError> {
        let grants = HashMap::try_from(taken(ebpf, "GRANTS")?).map_err(map_err("GRANTS"))?;
        let hot = RingBuf::try_from(taken(ebpf, "HOT")?).map_err(map_err("HOT"))?;
        let dup_error = |error| DatapathError::Io {
            what: "duplicating the descriptors of",
            path: "the client maps".into(),
            error,
        };
        let [clients, statics, limited] = tables.client_fds().map_err(dup_error)?;
        let [named, named_static] = tables.named_fds().map_err(dup_error)?;
        Ok(ClusterMaps {
            grants,
            hot,
            clients: [
                from_fd(limited, "LIMITED")?,
                from_fd(clients, "CLIENTS")?,
                from_fd(statics, "STATIC_CLIENTS")?,
                from_fd(named_static, "NAMED_STATIC")?,
                from_fd(named, "NAMED")?,
            ],
        })
    }

    /// The clients reported hot since the last call.
    pub fn hot(&mut self) -> Vec<ClientKey> {
        let mut keys = Vec::new();
        while let Some(item) = self.hot.next() {
            if let Ok(key) = <ClientKey>::try_from(&item[..item.len().min(16)]) {
                keys.push(key);
            }
        }
        keys
    }

    /// The clients in `LIMITED` (at start: those a previous run's fast path moved there).
    pub fn limited(&self) -> Vec<ClientKey> {
        self.clients[0].keys().filter_map(Result::ok).collect()
    }

    /// The client's entry, wherever it lives, and whether it is an API ID's (`NAMED`,
    /// `NAMED_STATIC`: the checker resolves those entries, and stamps them with no generation).
    pub fn entry(&self, client: &ClientKey) -> Option<(ClientState, bool)> {
        self.clients
            .iter()
            .enumerate()
            .find_map(|(i, m)| Some((m.get(client, 0).ok()?, i >= 3)))
    }

    /// Sets (`Some`) or deletes (`None`) grants, each on its own (a full map refuses a new
    /// client, not the changes after it); returns the indices of the changes refused, with why.
    pub fn write(&mut self, changes: &[(ClientKey, Option<Grant>)]) -> Vec<(usize, DatapathError)> {
        changes
            .iter()
            .enumerate()
            .filter_map(|(i, (client, grant))| {
                match grant {
                    Some(g) => self.grants.insert(client, g, 0),
                    None => match self.grants.remove(client) {
                        Err(MapError::KeyNotFound) => Ok(()),
                        other => other,
                    },
                }
                .map_err(map_err("GRANTS"))
                .err()
                .map(|e| (i, e))
            })
            .collect()
    }

    /// Every grant the map holds.
    pub fn grants(&self) -> Result<Vec<(ClientKey, Grant)>, DatapathError> {
        self.grants
            .iter()
            .map(|r| r.map_err(map_err("GRANTS")))
            .collect()
    }
}
