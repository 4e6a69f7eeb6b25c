//! The maps as typed tables: writing a policy set (and the generation that invalidates cached
//! policies), restoring entries, the in-place refresh of every entry, and reading counters,
//! status and clients.

use std::{
    collections::HashSet,
    io,
    os::fd::{AsFd as _, BorrowedFd, OwnedFd},
    sync::Arc,
};

use aya::{
    Ebpf,
    maps::{
        Array, HashMap, IterableMap as _, LpmTrie, Map, MapData, MapError, PerCpuArray,
        lpm_trie::Key,
    },
};
use limiter_common::{
    AdaptSlot, AdaptiveStatus, ClientState, GlobalStats, MapConfig, Policy,
    addr::{ClientKey, PolicyKey},
    maps::{
        ACTION_LIMIT, ADAPT_BATCH, ADAPT_REFRESH, ADAPT_UNCHANGED, CONFIG_ADAPTIVE, CONFIG_CLUSTER,
        FLAG_REPORTED, FLAG_STATIC, GENERATION_SWEEP, GLOBAL_POLICY_WORDS, GlobalPolicies,
        MODE_DRY_RUN, MODE_ENFORCE, generation_tag, set_global,
    },
    window::{slot_count, slot_tag},
};

use super::{
    ADAPT_FRAME, ADAPT_PROGRAM, DatapathError, TestRunFrame, XDP_PASS, lifecycle::pin_dir, map_err,
};
use crate::config::{Config, Mode, TrieEntries};

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
}

/// The trie writes that turn what [`Tables::trie_written`] returned into the desired entries,
/// worked out beforehand (outside any lock the caller holds around the maps), so that
/// [`Tables::apply_diff`] only writes them: a change of one policy among tens of thousands
/// then costs the maps' lock one write instead of a comparison of every entry.
#[derive(Default)]
pub struct TrieDiff {
    /// What the diff was made against (`None`: nothing; `apply_diff` compares itself).
    base: Option<Arc<TrieEntries>>,
    writes: Vec<(Key<PolicyKey>, Policy)>,
    removes: Vec<Key<PolicyKey>>,
}

impl TrieDiff {
    /// The writes from `base` (from [`Tables::trie_written`]) to `desired`.
    pub fn between(base: Option<Arc<TrieEntries>>, desired: &TrieEntries) -> TrieDiff {
        match base {
            Some(base) => TrieDiff {
                base: Some(base.clone()),
                ..trie_writes(&base, desired)
            },
            None => TrieDiff::default(),
        }
    }
}

/// The entries of `desired` that `trie` lacks or holds otherwise, and the keys of `trie` that
/// `desired` lacks (no base: made where they are written).
fn trie_writes(trie: &TrieEntries, desired: &TrieEntries) -> TrieDiff {
    let writes = desired
        .iter()
        .filter(|(key, policy)| trie.get(*key) != Some(*policy))
        .map(|(&(prefix, addr), policy)| (Key::new(prefix, addr), *policy))
        .collect();
    let removes = trie
        .keys()
        .filter(|k| !desired.contains_key(*k))
        .map(|&(prefix, addr)| Key::new(prefix, addr))
        .collect();
    TrieDiff {
        base: None,
        writes,
        removes,
    }
}

/// What one `Tables::apply` changed.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ApplyReport {
    pub generation: u32,
    pub policies_written: usize,
    pub policies_removed: usize,
    pub statics_added: usize,
    pub statics_removed: usize,
    /// Entries refreshed in place, a refresh being due `GENERATION_SWEEP` generations after the
    /// last one or on adopted maps (`None`: none was due).
    pub refreshed: Option<usize>,
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
        })
    }

    /// Gives these tables the `limiter_adapt` program (from [`load_adapt_program`]), with which
    /// `apply` refreshes every entry in place when one is due. The agent always does; without
    /// it (tests, benchmarks) nothing is refreshed and a client idle across 2^15 policy changes
    /// could keep a stale policy until its next change.
    pub fn set_refresher(&mut self, program: OwnedFd) {
        self.refresher = Some(program);
    }

    /// Runs the refresh an `apply` made before [`Tables::set_refresher`] could not: on adopted
    /// maps (whose previous agent may have died owing one) the first apply is due one, and
    /// without a refresher it leaves it owed. Returns the entries refreshed, `None` if none was
    /// owed (or there is no refresher).
    pub fn refresh_if_owed(&mut self) -> Result<Option<usize>, DatapathError> {
        if self.refresher.is_none() || self.last_refresh.is_some() {
            return Ok(None);
        }
        let generation = self.map_config()?.generation;
        if generation == 0 {
            return Ok(None);
        }
        let refreshed = self.refresh_all()?;
        tracing::info!(
            generation,
            refreshed,
            "refreshed every client's policy in place (due on adopted maps)"
        );
        self.last_refresh = Some(generation);
        Ok(Some(refreshed))
    }

    /// Brings the cached policy of every resident address client up to the current generation,
    /// in place (`ADAPT_REFRESH`, with the same atomics as the fast path, so no concurrent count
    /// is lost). Entries store only a 15-bit generation tag; `apply` runs this
    /// `GENERATION_SWEEP` (2^14) generations after the last refresh, so no resident entry's tag
    /// is ever 2^15 generations old, where it would alias the current one. Returns the entries
    /// refreshed (0 without a refresher; a busy entry that stays contended is left to its own
    /// packets): a million take 0.9 s (BENCHMARKS.md).
    pub fn refresh_all(&self) -> Result<usize, DatapathError> {
        let Some(program) = &self.refresher else {
            return Ok(0);
        };
        let mut frame = TestRunFrame::new(ADAPT_FRAME);
        let mut refreshed = 0;
        for (map, name) in [
            (&self.clients, "CLIENTS"),
            (&self.static_clients, "STATIC_CLIENTS"),
            (&self.limited, "LIMITED"),
        ] {
            // A batched walk: its cursor is a bucket, so evictions during the walk (a flood of
            // new sources) cannot restart it, as they can a walk by `get_next_key`.
            let slots: Vec<AdaptSlot> =
                super::syscall::lookup_all::<ClientKey, ClientState>(map.map().fd().as_fd())
                    .map_err(|error| DatapathError::Io {
                        what: "reading",
                        path: name.into(),
                        error,
                    })?
                    .into_iter()
                    .map(|(key, _)| AdaptSlot {
                        key,
                        flags: ADAPT_REFRESH,
                        ..AdaptSlot::default()
                    })
                    .collect();
            for chunk in slots.chunks(ADAPT_BATCH) {
                let io_err = |error| DatapathError::Io {
                    what: "refreshing the policies of",
                    path: name.into(),
                    error,
                };
                let run = frame
                    .run::<AdaptSlot, AdaptSlot>(program.as_fd(), chunk, 0)
                    .map_err(io_err)?;
                if run.ret != XDP_PASS {
                    return Err(io_err(io::Error::other(format!(
                        "{ADAPT_PROGRAM} returned {}",
                        run.ret
                    ))));
                }
                refreshed += run
                    .answers
                    .iter()
                    .filter(|slot| slot.result == ADAPT_UNCHANGED)
                    .count();
            }
        }
        Ok(refreshed)
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

    /// A handle of its own on `LIMITED`, for the agent's periodic [`LimitedSweep`].
    pub fn limited_sweep(&self) -> Result<LimitedSweep, DatapathError> {
        Ok(LimitedSweep {
            limited: HashMap::try_from(dup_map(self.limited.map(), "LIMITED")?)
                .map_err(map_err("LIMITED"))?,
            clients: HashMap::try_from(dup_map(self.clients.map(), "CLIENTS")?)
                .map_err(map_err("CLIENTS"))?,
        })
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
        super::syscall::update_all(self.clients.map().fd().as_fd(), &entries).map_err(|source| {
            DatapathError::Io {
                what: "restoring clients into",
                path: "CLIENTS".into(),
                error: source,
            }
        })
    }

    /// The adaptive controller's status as last written.
    pub fn adaptive_status(&self) -> Result<AdaptiveStatus, DatapathError> {
        self.adaptive.get(&0, 0).map_err(map_err("ADAPTIVE"))
    }

    /// Writes the adaptive controller's status for `limiter stats`.
    pub fn set_adaptive_status(&mut self, status: AdaptiveStatus) -> Result<(), DatapathError> {
        self.adaptive.set(0, status, 0).map_err(map_err("ADAPTIVE"))
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

    /// Every client entry, static ones flagged `FLAG_STATIC`, read in batches (a million
    /// clients in about 0.4 s). Entries added or evicted during the read may or may not appear.
    pub fn clients(&self) -> Result<Vec<(ClientKey, ClientState)>, DatapathError> {
        self.client_maps()?.addresses()
    }

    /// Writes a validated policy set into the maps and bumps the generation, which makes every
    /// client re-resolve its policy on its next packet. Counters are kept: a client whose policy
    /// window is unchanged keeps its window state; a changed window starts afresh.
    pub fn apply(&mut self, config: &Config) -> Result<ApplyReport, DatapathError> {
        self.apply_entries(config, config.lpm_entries())
    }

    /// [`Tables::apply`] with `desired`, `config.lpm_entries()`, made beforehand (outside any
    /// lock the caller holds around the maps).
    pub fn apply_entries(
        &mut self,
        config: &Config,
        desired: TrieEntries,
    ) -> Result<ApplyReport, DatapathError> {
        self.apply_diff(config, desired, &TrieDiff::default())
    }

    /// What the policy trie holds, as these tables last wrote it (`None`: not known), for a
    /// [`TrieDiff`] made outside the lock around these tables.
    pub fn trie_written(&self) -> Option<Arc<TrieEntries>> {
        self.trie.clone()
    }

    /// [`Tables::apply_entries`] writing only `diff`'s entries, if it was made against what
    /// the trie holds (else the differences are worked out here, as `apply_entries` does).
    pub fn apply_diff(
        &mut self,
        config: &Config,
        desired: TrieEntries,
        diff: &TrieDiff,
    ) -> Result<ApplyReport, DatapathError> {
        let mut report = ApplyReport::default();
        // Only the entries that differ from what the trie holds are written: the trie as last
        // written, read once when not known. Forgotten until the writes succeed.
        let current = self.trie.take();
        let computed;
        let (writes, removes) = match (&diff.base, current) {
            (Some(base), Some(current)) if Arc::ptr_eq(base, &current) => {
                (&diff.writes, &diff.removes)
            }
            (_, current) => {
                let trie = match current {
                    Some(trie) => trie,
                    // A read that stops early would leave entries out of the cache for good
                    // (never removed as stale): an error instead, and the next apply reads
                    // again.
                    None => Arc::new(
                        self.policies
                            .iter()
                            .map(|entry| entry.map(|(k, v)| ((k.prefix_len(), k.data()), v)))
                            .collect::<Result<TrieEntries, _>>()
                            .map_err(map_err("POLICIES"))?,
                    ),
                };
                computed = trie_writes(&trie, &desired);
                (&computed.writes, &computed.removes)
            }
        };
        for (key, policy) in writes {
            self.policies
                .insert(key, policy, 0)
                .map_err(map_err("POLICIES"))?;
            report.policies_written += 1;
        }
        for key in removes {
            self.policies.remove(key).map_err(map_err("POLICIES"))?;
            report.policies_removed += 1;
        }
        self.trie = Some(Arc::new(desired));
        self.sync_static_clients(&config.static_clients(), &mut report)?;
        let named: Vec<ClientKey> = config.named_policies().keys().map(|n| n.key()).collect();
        sync_static(
            &mut self.named,
            "NAMED",
            &mut self.named_static,
            "NAMED_STATIC",
            None,
            &named,
            &mut report,
        )?;

        let previous = self.map_config()?;
        let generation = next_generation(previous.generation);
        let mode = match config.mode {
            Mode::Enforce => MODE_ENFORCE,
            Mode::DryRun => MODE_DRY_RUN,
        };
        let mut flags = if config.adaptive.enabled {
            CONFIG_ADAPTIVE
        } else {
            0
        };
        // Global policies in force (a cluster member): report hot clients, apply grants. Which
        // policies are global goes in first, so the programs never see the flag with the
        // previous set.
        if let Some(map) = &mut self.global_policies {
            let mut bits = [0u64; GLOBAL_POLICY_WORDS];
            for &id in config.global_limits.keys() {
                set_global(&mut bits, id);
            }
            map.set(0, bits, 0).map_err(map_err("GLOBAL_POLICIES"))?;
        }
        if !config.global_limits.is_empty() {
            flags |= CONFIG_CLUSTER;
        }
        let map_config = MapConfig {
            generation,
            mode,
            flags,
            fast_group: config.fast_groups(),
            _pad: 0,
        };
        self.config
            .set(0, map_config, 0)
            .map_err(map_err("CONFIG"))?;
        report.generation = generation;
        // A refresh is due every GENERATION_SWEEP generations after the last complete one,
        // and first thing on maps a previous agent left (generation not 0), which may have died
        // owing one. A failed refresh is due again at the next apply.
        let due = match self.last_refresh {
            Some(last) => generation.wrapping_sub(last) >= GENERATION_SWEEP,
            None => previous.generation != 0,
        };
        if self.refresher.is_some() && due {
            let refreshed = self.refresh_all()?;
            tracing::info!(
                generation,
                refreshed,
                "refreshed every client's policy in place (due every {GENERATION_SWEEP} changes)"
            );
            report.refreshed = Some(refreshed);
            self.last_refresh = Some(generation);
        } else if self.last_refresh.is_none() && previous.generation == 0 {
            // Fresh maps: nothing older than this generation.
            self.last_refresh = Some(generation);
        }
        Ok(report)
    }

    /// Moves clients between the LRU map and the never-evicted static map so that exactly the
    /// addresses with exact-address policies are static, carrying their counters across.
    fn sync_static_clients(
        &mut self,
        wanted: &[ClientKey],
        report: &mut ApplyReport,
    ) -> Result<(), DatapathError> {
        sync_static(
            &mut self.clients,
            "CLIENTS",
            &mut self.static_clients,
            "STATIC_CLIENTS",
            Some(&mut self.limited),
            wanted,
            report,
        )
    }

    /// Resident entries of the address maps and of the ID maps, counted by a batched walk.
    pub fn resident(&self) -> Result<(u64, u64), DatapathError> {
        self.client_maps()?.resident()
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

/// The policy generation after `generation`: never one whose tag (its low 15 bits, which is all
/// an entry stores) is 0, since a tag of 0 marks an entry to re-resolve.
pub fn next_generation(generation: u32) -> u32 {
    let next = generation.wrapping_add(1);
    if generation_tag(next) == 0 {
        next.wrapping_add(1)
    } else {
        next
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
            let entries =
                super::syscall::lookup_all::<ClientKey, ClientState>(map.map().fd().as_fd())
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
        super::syscall::lookup_all::<ClientKey, ClientState>(fd.as_fd()).map_err(|error| {
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
    pub fn addresses(&self) -> Result<Vec<(ClientKey, ClientState)>, DatapathError> {
        let mut entries = ClientMaps::pair(
            (&self.clients, "CLIENTS"),
            (&self.static_clients, "STATIC_CLIENTS"),
        )?;
        entries.extend(ClientMaps::read(&self.limited, "LIMITED")?);
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
        super::syscall::lookup_each::<ClientKey, ClientState>(fd.as_fd(), visit).map_err(|error| {
            DatapathError::Io {
                what: "reading",
                path: name.into(),
                error,
            }
        })
    }

    /// Visits every entry of a map pair, those of the static map flagged `FLAG_STATIC`.
    fn each_of_pair(
        dynamic: (&OwnedFd, &'static str),
        statics: (&OwnedFd, &'static str),
        mut visit: impl FnMut(&ClientKey, &ClientState),
    ) -> Result<(), DatapathError> {
        ClientMaps::each(dynamic.0, dynamic.1, &mut visit)?;
        ClientMaps::each(statics.0, statics.1, |k: &ClientKey, v: &ClientState| {
            let mut v = *v;
            v.set_flags(v.flags() | FLAG_STATIC);
            visit(k, &v);
        })
    }

    /// Visits every address client without copying the maps (see [`Self::each_of_pair`]),
    /// the clients held in `LIMITED` included.
    pub fn each_address(
        &self,
        mut visit: impl FnMut(&ClientKey, &ClientState),
    ) -> Result<(), DatapathError> {
        ClientMaps::each_of_pair(
            (&self.clients, "CLIENTS"),
            (&self.static_clients, "STATIC_CLIENTS"),
            &mut visit,
        )?;
        ClientMaps::each(&self.limited, "LIMITED", visit)
    }

    /// Visits every named (ID) client without copying the maps.
    pub fn each_id(
        &self,
        visit: impl FnMut(&ClientKey, &ClientState),
    ) -> Result<(), DatapathError> {
        ClientMaps::each_of_pair(
            (&self.named, "NAMED"),
            (&self.named_static, "NAMED_STATIC"),
            visit,
        )
    }

    /// Resident `(addresses, IDs)`, counted by a walk that keeps one batch in memory.
    pub fn resident(&self) -> Result<(u64, u64), DatapathError> {
        let (mut addresses, mut ids) = (0u64, 0u64);
        self.each_address(|_, _| addresses += 1)?;
        self.each_id(|_, _| ids += 1)?;
        Ok((addresses, ids))
    }
}

/// Moves entries between an LRU map and its never-evicted static map so that exactly the keys in
/// `wanted` are static, carrying their counters across; moved entries re-resolve their policy.
/// A key that becomes static takes its state from `held` (`LIMITED`) if it is held there: a
/// limited client keeps its window wherever it lives.
fn sync_static(
    dynamic: &mut HashMap<MapData, ClientKey, ClientState>,
    dynamic_name: &'static str,
    statics: &mut HashMap<MapData, ClientKey, ClientState>,
    static_name: &'static str,
    mut held: Option<&mut HashMap<MapData, ClientKey, ClientState>>,
    wanted: &[ClientKey],
    report: &mut ApplyReport,
) -> Result<(), DatapathError> {
    let wanted: HashSet<ClientKey> = wanted.iter().copied().collect();
    let current: HashSet<ClientKey> = statics.keys().filter_map(Result::ok).collect();
    // Removals first, so that replacing a full set of statics never needs room for both.
    for key in current.difference(&wanted) {
        if let Ok(mut state) = statics.get(key, 0) {
            state.set_generation_tag(0);
            state.set_flags(state.flags() & !FLAG_STATIC);
            dynamic
                .insert(key, state, 0)
                .map_err(map_err(dynamic_name))?;
        }
        statics.remove(key).map_err(map_err(static_name))?;
        report.statics_removed += 1;
    }
    for key in wanted.difference(&current) {
        let from_held = held.as_deref().and_then(|h| h.get(key, 0).ok());
        let mut state = from_held.unwrap_or_else(|| dynamic.get(key, 0).unwrap_or_default());
        state.set_generation_tag(0); // re-resolve on the next packet
        state.set_flags(state.flags() | FLAG_STATIC);
        statics
            .insert(key, state, 0)
            .map_err(map_err(static_name))?;
        let _ = dynamic.remove(key);
        if from_held.is_some()
            && let Some(h) = held.as_deref_mut()
        {
            let _ = h.remove(key);
        }
        report.statics_added += 1;
    }
    Ok(())
}

/// `BPF_NOEXIST` (include/uapi/linux/bpf.h): create only, fail with EEXIST if the key is there.
const BPF_NOEXIST: u64 = 1;

/// The agent's periodic sweep of `LIMITED`: releases the entries whose window state has aged
/// out back into `CLIENTS`.
///
/// The program moves a client into `LIMITED` on its first dropped packet and never takes it out;
/// once neither window slot counts anything the current or the previous window could weigh, the
/// client would be admitted in full anyway, so it goes back to `CLIENTS` with its counters
/// (where it is evictable again until it next goes over its limit). Entries whose policy no
/// longer limits them (`pass`, `drop` after a reload) go at once.
pub struct LimitedSweep {
    limited: HashMap<MapData, ClientKey, ClientState>,
    clients: HashMap<MapData, ClientKey, ClientState>,
}

/// How far behind CLOCK_MONOTONIC the program's coarse clock may be (two jiffies at HZ=250 are
/// 8 ms; see `entry::coarse_now` in limiter-ebpf): the sweep judges a window over only once the
/// program's clock is past it too.
const PROGRAM_CLOCK_LAG_NS: u64 = 20_000_000;

impl LimitedSweep {
    /// Releases the aged-out entries at `now_ns` (CLOCK_MONOTONIC) back into `CLIENTS`, with
    /// their lifetime counters (a client's `passed` and `dropped` never go back because it was
    /// held); returns how many went. Each is read again just before it moves, so a client that
    /// resumed since the walk stays held. The copy goes into `CLIENTS` (`BPF_NOEXIST`) before the
    /// entry leaves `LIMITED`, so a packet always finds it in one or the other (the program
    /// creates an entry only when all three maps miss). One batched walk of at most
    /// `--max-limited` entries (65,536 by default: about 25 ms).
    pub fn sweep(&mut self, now_ns: u64) -> Result<usize, DatapathError> {
        let entries =
            super::syscall::lookup_all::<ClientKey, ClientState>(self.limited.map().fd().as_fd())
                .map_err(|error| DatapathError::Io {
                what: "reading",
                path: "LIMITED".into(),
                error,
            })?;
        let mut removed = 0;
        for (key, state) in entries {
            let now = now_ns.saturating_sub(PROGRAM_CLOCK_LAG_NS);
            if !aged_out(&state, now) {
                continue;
            }
            let state = match self.limited.get(&key, 0) {
                Ok(state) if aged_out(&state, now) => state,
                // Resumed since the walk, or gone meanwhile.
                Ok(_) => continue,
                Err(MapError::KeyNotFound) => continue,
                Err(e) => return Err(map_err("LIMITED")(e)),
            };
            match self.clients.insert(key, state, BPF_NOEXIST) {
                Ok(()) => {}
                // Already there (cannot happen while LIMITED holds the key, but harmless).
                Err(MapError::SyscallError(e))
                    if e.io_error.raw_os_error() == Some(libc::EEXIST) => {}
                // CLIENTS is full and would not take it (an LRU map evicts instead, so this is a
                // preallocation failure): the client starts afresh, as before it was held.
                Err(_) => {}
            }
            match self.limited.remove(&key) {
                Ok(()) => removed += 1,
                // Gone meanwhile (an `apply` moved it into the static map).
                Err(MapError::SyscallError(e))
                    if e.io_error.raw_os_error() == Some(libc::ENOENT) => {}
                Err(e) => return Err(map_err("LIMITED")(e)),
            }
        }
        Ok(removed)
    }
}

/// Whether a `LIMITED` entry has nothing left to protect at `now_ns` (at least as late as the
/// program's clock can be): it is not a `limit` entry any more, or no slot with a count is of
/// the current or the previous window (tags are window numbers modulo 2^32; a slot ahead of
/// `now_ns` counts as live).
pub fn aged_out(state: &ClientState, now_ns: u64) -> bool {
    if state.action() != ACTION_LIMIT {
        return true;
    }
    let Some(window) = std::num::NonZeroU64::new(state.window_us as u64 * 1000) else {
        return true;
    };
    let index = (now_ns / window) as u32;
    state.slots.iter().all(|&slot| {
        let behind = index.wrapping_sub(slot_tag(slot));
        slot_count(slot) == 0 || (2..1 << 31).contains(&behind)
    })
}

/// The policies in the trie, `(prefix, key) -> Policy` (stats names policies from these).
pub fn policy_entries(tables: &Tables) -> TrieEntries {
    tables
        .policies
        .iter()
        .filter_map(Result::ok)
        .map(|(k, v)| ((k.prefix_len(), k.data()), v))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn limited_entries_age_out_after_two_windows() {
        use limiter_common::window::slot;
        let entry = |slots: [u64; 2]| ClientState {
            slots,
            limit: 10,
            window_us: 1_000_000,
            ..ClientState::default()
        };
        let at = |window: u64, ms: u64| window * 1_000_000_000 + ms * 1_000_000;
        // Counted in window 7: live through window 8 (the previous window weighs in), over in 9.
        let s = entry([slot(7, 10), 0]);
        assert!(!aged_out(&s, at(7, 999)));
        assert!(!aged_out(&s, at(8, 999)));
        assert!(aged_out(&s, at(9, 0)));
        // The other slot counts too; empty slots never do.
        let s = entry([slot(2, 3), slot(9, 1)]);
        assert!(!aged_out(&s, at(10, 500)));
        assert!(aged_out(&s, at(11, 0)));
        assert!(aged_out(&entry([slot(9, 0), slot(10, 0)]), at(10, 0)));
        // A slot ahead of the sweep's clock (the program's clock is later) is live.
        assert!(!aged_out(&entry([slot(12, 4), 0]), at(11, 999)));
        // Entries whose policy no longer limits them go at once.
        let mut pass = entry([slot(10, 3), 0]);
        pass.window_us = 0;
        assert!(aged_out(&pass, at(10, 0)));
        let mut drop = entry([slot(10, 3), 0]);
        drop.limit = 0;
        assert!(aged_out(&drop, at(10, 0)));
    }

    #[test]
    fn a_trie_diff_writes_what_differs_and_removes_what_is_gone() {
        let entries = |policies: &str| {
            Config::parse(&format!(
                "default: {{ limit: 10, window: 1s }}\npolicies:\n{policies}"
            ))
            .expect("valid config")
            .lpm_entries()
        };
        let before = Arc::new(entries(
            "  - { match: 10.0.0.0/8, limit: 5, window: 1s }\n  - { match: 10.1.0.0/16, limit: 6, window: 1s }\n",
        ));
        let after = entries(
            "  - { match: 10.0.0.0/8, limit: 7, window: 1s }\n  - { match: 10.2.0.0/16, limit: 6, window: 1s }\n",
        );
        let key = |s: &str| s.parse::<crate::config::Cidr>().expect("prefix").lpm_key();
        let diff = TrieDiff::between(Some(before.clone()), &after);
        assert!(Arc::ptr_eq(diff.base.as_ref().expect("a base"), &before));
        let mut written: Vec<(u32, PolicyKey)> = diff
            .writes
            .iter()
            .map(|(k, policy)| {
                let k = (k.prefix_len(), k.data());
                assert_eq!(after.get(&k), Some(policy));
                k
            })
            .collect();
        written.sort();
        let mut wanted = vec![key("10.0.0.0/8"), key("10.2.0.0/16")];
        wanted.sort();
        assert_eq!(
            written, wanted,
            "the changed and the new policy, nothing else"
        );
        let removed: Vec<(u32, PolicyKey)> = diff
            .removes
            .iter()
            .map(|k| (k.prefix_len(), k.data()))
            .collect();
        assert_eq!(removed, vec![key("10.1.0.0/16")]);
        // Against the same entries: nothing to write.
        let same = TrieDiff::between(Some(Arc::new(after.clone())), &after);
        assert!(same.writes.is_empty() && same.removes.is_empty());
        // Without a base, nothing is worked out beforehand (`apply_diff` compares itself).
        let none = TrieDiff::between(None, &after);
        assert!(none.base.is_none() && none.writes.is_empty() && none.removes.is_empty());
    }

    #[test]
    fn generations_never_have_tag_zero() {
        assert_eq!(next_generation(1), 2);
        assert_eq!(next_generation(0x7ffe), 0x7fff);
        assert_eq!(next_generation(0x7fff), 0x8001);
        assert_eq!(next_generation(u32::MAX), 1);
        let mut g = 0;
        for _ in 0..100_000 {
            g = next_generation(g);
            assert_ne!(generation_tag(g), 0, "{g}");
        }
    }
}
