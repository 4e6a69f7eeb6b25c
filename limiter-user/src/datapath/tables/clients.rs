//! The client maps: descriptors, batched reads and walks, and restored entries.

use std::{
    collections::HashSet,
    io,
    os::fd::{AsFd as _, OwnedFd},
};

use aya::maps::{HashMap, IterableMap as _, MapData, MapError};
use limiter_common::{ClientState, addr::ClientKey, maps::FLAG_STATIC};

use super::{Tables, dup_fd};
use crate::datapath::{DatapathError, map_err, syscall};

impl Tables {
    /// Deletes every entry keyed in ff00::/8 (`limiter_common::addr::GROUP_KEY_MARK`) from the
    /// address client maps; returns how many. For maps of an older layout only, where such keys
    /// were multicast sources (see `lifecycle::complete_upgrade`).
    pub fn remove_group_marked_keys(&mut self) -> Result<usize, DatapathError> {
        let mut removed = 0;
        for (name, map) in [
            ("CLIENTS", &mut self.clients),
            ("STATIC_CLIENTS", &mut self.static_clients),
            ("LIMITED", &mut self.limited),
        ] {
            let doomed: Vec<ClientKey> = map
                .keys()
                .filter_map(Result::ok)
                .filter(|k| k[0] == limiter_common::addr::GROUP_KEY_MARK)
                .collect();
            for key in &doomed {
                match map.remove(key) {
                    // Gone meanwhile (evicted) is fine.
                    Ok(()) | Err(MapError::KeyNotFound) => removed += 1,
                    Err(e) => return Err(map_err(name)(e)),
                }
            }
        }
        Ok(removed)
    }

    /// Owned descriptors of the three address-client maps (dynamic, static, limited), for a
    /// snapshot taken on another thread.
    pub fn client_fds(&self) -> io::Result<[OwnedFd; 3]> {
        Ok([
            self.clients.map().fd().as_fd().try_clone_to_owned()?,
            self.static_clients
                .map()
                .fd()
                .as_fd()
                .try_clone_to_owned()?,
            self.limited.map().fd().as_fd().try_clone_to_owned()?,
        ])
    }

    /// Owned descriptors of the two ID-client maps (`NAMED`, `NAMED_STATIC`), for the cluster's
    /// reads of global API IDs (never for snapshots, which hold address clients only).
    pub fn named_fds(&self) -> io::Result<[OwnedFd; 2]> {
        Ok([
            self.named.map().fd().as_fd().try_clone_to_owned()?,
            self.named_static.map().fd().as_fd().try_clone_to_owned()?,
        ])
    }

    /// Writes restored client entries into the dynamic map (a later `apply` moves the ones with
    /// exact-address policies into the static map, carrying their state; a limited client moves
    /// into `LIMITED` again on its first dropped packet).
    pub fn restore_clients(
        &mut self,
        entries: &[(ClientKey, ClientState)],
    ) -> Result<(), DatapathError> {
        let entries: Vec<(ClientKey, ClientState)> = entries
            .iter()
            .map(|(k, s)| {
                (*k, {
                    let mut s = *s;
                    s.set_flags(s.flags() & !FLAG_STATIC);
                    s
                })
            })
            .collect();
        syscall::update_all(self.clients.map().fd().as_fd(), &entries).map_err(|source| {
            DatapathError::Io {
                what: "restoring clients into",
                path: "CLIENTS".into(),
                error: source,
            }
        })
    }

    /// Every client entry, static ones flagged `FLAG_STATIC`, read in batches (a million
    /// clients in about 0.4 s). Entries added or evicted during the read may or may not appear.
    pub fn clients(&self) -> Result<Vec<(ClientKey, ClientState)>, DatapathError> {
        self.client_maps()?.addresses()
    }

    /// Resident entries of the address maps, of the ID maps, and of `LIMITED` (counted among
    /// the addresses too), counted by a batched walk.
    pub fn resident(&self) -> Result<(u64, u64, u64), DatapathError> {
        self.client_maps()?.resident()
    }

    /// Owned descriptors of the five client maps, for walks that should not hold whatever
    /// guards these `Tables` (a walk of a million entries takes about 0.4 s).
    pub fn client_maps(&self) -> Result<ClientMaps, DatapathError> {
        let dup = |map: &HashMap<MapData, ClientKey, ClientState>, name| {
            dup_fd(map.map().fd().as_fd(), name)
        };
        Ok(ClientMaps {
            clients: dup(&self.clients, "CLIENTS")?,
            static_clients: dup(&self.static_clients, "STATIC_CLIENTS")?,
            limited: dup(&self.limited, "LIMITED")?,
            named: dup(&self.named, "NAMED")?,
            named_static: dup(&self.named_static, "NAMED_STATIC")?,
        })
    }
}

/// The client maps by descriptor (see [`Tables::client_maps`]).
pub struct ClientMaps {
    clients: OwnedFd,
    static_clients: OwnedFd,
    limited: OwnedFd,
    named: OwnedFd,
    named_static: OwnedFd,
}

impl ClientMaps {
    fn read(
        fd: &OwnedFd,
        name: &'static str,
    ) -> Result<Vec<(ClientKey, ClientState)>, DatapathError> {
        syscall::lookup_all::<ClientKey, ClientState>(fd.as_fd()).map_err(|error| {
            DatapathError::Io {
                what: "reading",
                path: name.into(),
                error,
            }
        })
    }

    /// Every entry of a map pair, those of the static map flagged `FLAG_STATIC`.
    fn pair(
        dynamic: (&OwnedFd, &'static str),
        statics: (&OwnedFd, &'static str),
    ) -> Result<Vec<(ClientKey, ClientState)>, DatapathError> {
        let mut entries = ClientMaps::read(dynamic.0, dynamic.1)?;
        entries.extend(
            ClientMaps::read(statics.0, statics.1)?
                .into_iter()
                .map(|(k, mut v)| {
                    v.set_flags(v.flags() | FLAG_STATIC);
                    (k, v)
                }),
        );
        Ok(entries)
    }

    /// Every address client: dynamic, static (flagged `FLAG_STATIC`) and limited.
    ///
    /// A client that moves once between `CLIENTS` and `LIMITED` during the walk is found all
    /// the same. The packet path copies a client into `LIMITED` before it deletes it from
    /// `CLIENTS`, and the agent's sweep copies it back before it deletes it from `LIMITED`; so
    /// `LIMITED` is read both before and after `CLIENTS`. With one read after, a client the
    /// sweep released between the two reads was in neither (`limiter stats` lost it for a
    /// moment); with one read before, one the packet path held between them. (A client held
    /// and released again inside one walk can still be missed.) A key seen in more than one
    /// map is listed once, from the latest read that found it: the read of `LIMITED` after,
    /// else `CLIENTS` or `STATIC_CLIENTS`, else the read before (keys moving between `CLIENTS`
    /// and `STATIC_CLIENTS` may still be listed twice).
    pub fn addresses(&self) -> Result<Vec<(ClientKey, ClientState)>, DatapathError> {
        let before = ClientMaps::read(&self.limited, "LIMITED")?;
        let mut entries = ClientMaps::pair(
            (&self.clients, "CLIENTS"),
            (&self.static_clients, "STATIC_CLIENTS"),
        )?;
        let after = ClientMaps::read(&self.limited, "LIMITED")?;
        if before.is_empty() && after.is_empty() {
            return Ok(entries);
        }
        let after_keys: HashSet<ClientKey> = after.iter().map(|(k, _)| *k).collect();
        let mut before_only: std::collections::HashMap<ClientKey, ClientState> = before
            .into_iter()
            .filter(|(k, _)| !after_keys.contains(k))
            .collect();
        entries.retain(|(k, _)| {
            before_only.remove(k);
            !after_keys.contains(k)
        });
        entries.extend(after);
        entries.extend(before_only);
        Ok(entries)
    }

    /// The address clients held in `LIMITED` (over their limit, never evicted).
    pub fn limited_keys(&self) -> Result<HashSet<ClientKey>, DatapathError> {
        Ok(ClientMaps::read(&self.limited, "LIMITED")?
            .into_iter()
            .map(|(key, _)| key)
            .collect())
    }

    /// Every named (ID) client, by key.
    pub fn ids(&self) -> Result<Vec<(ClientKey, ClientState)>, DatapathError> {
        ClientMaps::pair((&self.named, "NAMED"), (&self.named_static, "NAMED_STATIC"))
    }

    /// Visits every entry of a map, one batch in memory at a time.
    fn each(
        fd: &OwnedFd,
        name: &'static str,
        visit: impl FnMut(&ClientKey, &ClientState),
    ) -> Result<(), DatapathError> {
        syscall::lookup_each::<ClientKey, ClientState>(fd.as_fd(), visit).map_err(|error| {
            DatapathError::Io {
                what: "reading",
                path: name.into(),
                error,
            }
        })
    }

    /// Visits every entry of a map pair, those of the static map flagged `FLAG_STATIC`; `visit`'s
    /// last argument says which map the entry came from (true: the static one).
    fn each_of_pair(
        dynamic: (&OwnedFd, &'static str),
        statics: (&OwnedFd, &'static str),
        mut visit: impl FnMut(&ClientKey, &ClientState, bool),
    ) -> Result<(), DatapathError> {
        ClientMaps::each(dynamic.0, dynamic.1, |k, v| visit(k, v, false))?;
        ClientMaps::each(statics.0, statics.1, |k: &ClientKey, v: &ClientState| {
            let mut v = *v;
            v.set_flags(v.flags() | FLAG_STATIC);
            visit(k, &v, true);
        })
    }

    /// Visits every address client without copying the maps (see [`Self::each_of_pair`]), the
    /// clients held in `LIMITED` included (only that map is read into memory).
    ///
    /// Like [`Self::addresses`], the walk reads `LIMITED` before and after the others, so a
    /// client that moves once between `CLIENTS` and `LIMITED` during it is never missed; but it
    /// may be visited twice, once from each map (the walk does not keep the keys it visited),
    /// and so may a key a config change moves between `CLIENTS` and `STATIC_CLIENTS` (one
    /// moving back from the static map can also be missed). `visit`'s last argument is true
    /// for every visit that may be such a second one (every client of `LIMITED` and of
    /// `STATIC_CLIENTS`): whoever lists clients keeps one copy of those; a count of the visits
    /// may count such a client twice. Its fourth is true for the visits of `LIMITED`'s clients
    /// (held there when the walk started or when it read the map).
    pub fn each_address(
        &self,
        mut visit: impl FnMut(&ClientKey, &ClientState, bool, bool),
    ) -> Result<(), DatapathError> {
        let before = ClientMaps::read(&self.limited, "LIMITED")?;
        ClientMaps::each_of_pair(
            (&self.clients, "CLIENTS"),
            (&self.static_clients, "STATIC_CLIENTS"),
            |k, s, again| visit(k, s, again, false),
        )?;
        let mut after = HashSet::with_capacity(before.len());
        ClientMaps::each(&self.limited, "LIMITED", |k, s| {
            after.insert(*k);
            visit(k, s, true, true);
        })?;
        // Released during the walk: in `CLIENTS` now, where the walk may have passed it.
        for (k, s) in &before {
            if !after.contains(k) {
                visit(k, s, true, true);
            }
        }
        Ok(())
    }

    /// Visits every named (ID) client without copying the maps; `visit`'s last argument is
    /// true for the clients of `NAMED_STATIC`, which a config change moving a key between the
    /// two maps during the walk may show twice (see [`Self::each_address`]).
    pub fn each_id(
        &self,
        visit: impl FnMut(&ClientKey, &ClientState, bool),
    ) -> Result<(), DatapathError> {
        ClientMaps::each_of_pair(
            (&self.named, "NAMED"),
            (&self.named_static, "NAMED_STATIC"),
            visit,
        )
    }

    /// Resident `(addresses, IDs, of the addresses those in LIMITED)`: the entries of each map,
    /// counted by a walk that keeps one batch in memory (a client moving between two maps during
    /// it may be counted twice, or not at all).
    pub fn resident(&self) -> Result<(u64, u64, u64), DatapathError> {
        let (mut addresses, mut ids, mut limited) = (0u64, 0u64, 0u64);
        ClientMaps::each_of_pair(
            (&self.clients, "CLIENTS"),
            (&self.static_clients, "STATIC_CLIENTS"),
            |_, _, _| addresses += 1,
        )?;
        ClientMaps::each(&self.limited, "LIMITED", |_, _| limited += 1)?;
        self.each_id(|_, _, _| ids += 1)?;
        Ok((addresses + limited, ids, limited))
    }
}
