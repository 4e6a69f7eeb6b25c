//! The maps of the cluster's enrolment: `GRANTS` (what the owners of global clients granted this
//! node; the fast path enforces the leases itself), `HOT` (the clients the fast path reported
//! over their limit while `CONFIG_CLUSTER` is set: moved into `LIMITED`, or, paced, dropped in
//! a map they never leave) and the client maps, addresses' and IDs', read for the held
//! clients' counters in read frames of the adapt program.

use std::os::fd::{AsFd as _, OwnedFd};

use aya::{
    Ebpf,
    maps::{HashMap, Map, MapData, MapError, RingBuf},
};
use limiter_common::{
    ClientState, Grant,
    addr::ClientKey,
    maps::{ADAPT_APPLIED, ADAPT_NOT_RESIDENT, HOME_NAMED, HOME_NAMED_STATIC},
};

use super::{DatapathError, EntryReads, Tables, map_err};

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
    /// The adapt program, whose read frames copy many entries out per run (see
    /// [`ClusterMaps::entries`]).
    adapt: OwnedFd,
    reads: EntryReads,
    /// A failed read of frames was logged (once: a round whose frames fail reads key by key).
    read_failed: bool,
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
    /// maps `tables` hold; `adapt`: the loaded adapt program (`load_adapt_program`).
    pub fn take(
        ebpf: &mut Ebpf,
        tables: &Tables,
        adapt: OwnedFd,
    ) -> Result<ClusterMaps, DatapathError> {
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
            adapt,
            reads: EntryReads::default(),
            read_failed: false,
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

    /// [`ClusterMaps::entry`] of each of `clients`, in order, read in read frames of the adapt
    /// program (see [`ClusterMaps::read_frames`]); if that fails, key by key (logged once).
    pub fn entries(&mut self, clients: &[ClientKey]) -> Vec<Option<(ClientState, bool)>> {
        match self.read_frames(clients) {
            Ok(entries) => entries,
            Err(e) => {
                if !std::mem::replace(&mut self.read_failed, true) {
                    tracing::warn!(
                        "cluster: reading the held clients in the adapt program's read frames \
                         failed ({e}); reading them key by key this round (and in any later \
                         round where it fails again)"
                    );
                }
                clients.iter().map(|key| self.entry(key)).collect()
            }
        }
    }

    /// [`ClusterMaps::entry`] of each of `clients`, in order, read in read frames of the adapt
    /// program: one program run per `ADAPT_READ_BATCH` clients instead of a lookup syscall per
    /// map tried per client (five for a held client that sends nothing to this node, most of
    /// them in a large cluster). Unlike a lookup syscall, the program's lookup marks an LRU
    /// entry (`CLIENTS`, `NAMED`) used, as a packet or a check would: a held client's entry is
    /// not the first evicted while it is held. An error if a run fails, or leaves a slot
    /// unanswered.
    pub fn read_frames(
        &mut self,
        clients: &[ClientKey],
    ) -> std::io::Result<Vec<Option<(ClientState, bool)>>> {
        let answers = self
            .reads
            .read(self.adapt.as_fd(), clients)
            .map_err(std::io::Error::other)?;
        // One answer per key, in order; each about the key it was asked.
        clients
            .iter()
            .zip(&answers)
            .map(|(key, read)| match (read.result, read.key == *key) {
                (ADAPT_APPLIED, true) => Ok(Some((
                    read.state,
                    matches!(read.home, HOME_NAMED | HOME_NAMED_STATIC),
                ))),
                (ADAPT_NOT_RESIDENT, true) => Ok(None),
                (result, asked) => Err(std::io::Error::other(format!(
                    "a read slot came back with result {result} (key {})",
                    if asked { "as asked" } else { "changed" }
                ))),
            })
            .collect()
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
