//! The adaptive controller's handles and status.

use std::os::fd::AsFd as _;

use aya::maps::{Array, HashMap, IterableMap as _, MapData, MapError};
use limiter_common::{AdaptiveStatus, ClientState, addr::ClientKey, maps::FLAG_REPORTED};

use super::{Tables, dup_map};
use crate::datapath::{DatapathError, map_err, syscall};

impl Tables {
    /// The adaptive controller's status as last written.
    pub fn adaptive_status(&self) -> Result<AdaptiveStatus, DatapathError> {
        self.adaptive.get(&0, 0).map_err(map_err("ADAPTIVE"))
    }

    /// Writes the adaptive controller's status for `limiter stats`.
    pub fn set_adaptive_status(&mut self, status: AdaptiveStatus) -> Result<(), DatapathError> {
        self.adaptive.set(0, status, 0).map_err(map_err("ADAPTIVE"))
    }

    /// Handles of their own on the address maps and the adaptive status, for the adaptive loop
    /// (which then runs without the guards of these `Tables`).
    pub fn adaptive_handles(&self) -> Result<AdaptiveHandles, DatapathError> {
        Ok(AdaptiveHandles {
            clients: HashMap::try_from(dup_map(self.clients.map(), "CLIENTS")?)
                .map_err(map_err("CLIENTS"))?,
            static_clients: HashMap::try_from(dup_map(
                self.static_clients.map(),
                "STATIC_CLIENTS",
            )?)
            .map_err(map_err("STATIC_CLIENTS"))?,
            limited: HashMap::try_from(dup_map(self.limited.map(), "LIMITED")?)
                .map_err(map_err("LIMITED"))?,
            status: Array::try_from(dup_map(self.adaptive.map(), "ADAPTIVE")?)
                .map_err(map_err("ADAPTIVE"))?,
        })
    }
}

/// What the adaptive loop reads and writes besides its ring and program (see
/// [`Tables::adaptive_handles`]).
pub struct AdaptiveHandles {
    clients: HashMap<MapData, ClientKey, ClientState>,
    static_clients: HashMap<MapData, ClientKey, ClientState>,
    limited: HashMap<MapData, ClientKey, ClientState>,
    status: Array<MapData, AdaptiveStatus>,
}

impl AdaptiveHandles {
    /// An address client's entry and whether it is in the static map; one lookup per map tried,
    /// the static one first when `static_hint`, `LIMITED` last. `None` if it has none
    /// (evicted).
    pub fn address(
        &self,
        key: &ClientKey,
        static_hint: bool,
    ) -> Result<Option<(ClientState, bool)>, DatapathError> {
        let get = |map: &HashMap<MapData, ClientKey, ClientState>, name| match map.get(key, 0) {
            Ok(state) => Ok(Some(state)),
            Err(MapError::KeyNotFound) => Ok(None),
            Err(e) => Err(map_err(name)(e)),
        };
        let order = if static_hint {
            [
                (&self.static_clients, "STATIC_CLIENTS", true),
                (&self.clients, "CLIENTS", false),
            ]
        } else {
            [
                (&self.clients, "CLIENTS", false),
                (&self.static_clients, "STATIC_CLIENTS", true),
            ]
        };
        for (map, name, is_static) in order {
            if let Some(state) = get(map, name)? {
                return Ok(Some((state, is_static)));
            }
        }
        Ok(get(&self.limited, "LIMITED")?.map(|state| (state, false)))
    }

    /// Every resident address client flagged `FLAG_REPORTED`: the clients a previous agent
    /// tracked, which the fast path will not report again. One walk of both maps, at start.
    pub fn reported(&self) -> Result<Vec<(ClientKey, bool)>, DatapathError> {
        let mut out = Vec::new();
        for (map, name, is_static) in [
            (&self.clients, "CLIENTS", false),
            (&self.static_clients, "STATIC_CLIENTS", true),
            (&self.limited, "LIMITED", false),
        ] {
            let entries = syscall::lookup_all::<ClientKey, ClientState>(map.map().fd().as_fd())
                .map_err(|error| DatapathError::Io {
                    what: "reading",
                    path: name.into(),
                    error,
                })?;
            out.extend(
                entries
                    .into_iter()
                    .filter(|(_, s)| s.flags() & FLAG_REPORTED != 0)
                    .map(|(k, _)| (k, is_static)),
            );
        }
        Ok(out)
    }

    pub fn set_status(&mut self, status: AdaptiveStatus) -> Result<(), DatapathError> {
        self.status.set(0, status, 0).map_err(map_err("ADAPTIVE"))
    }
}
