//! Writing a policy set: the trie (and the diff worked out beforehand), the static maps, and
//! the generation that invalidates cached policies.

use std::{collections::HashSet, sync::Arc};

use aya::maps::{HashMap, MapData, lpm_trie::Key};
use limiter_common::{
    ClientState, MapConfig, Policy,
    addr::{ClientKey, PolicyKey},
    maps::{
        CONFIG_ADAPTIVE, CONFIG_CLUSTER, CONFIG_NO_STATIC, FLAG_STATIC, GENERATION_SWEEP,
        GLOBAL_POLICY_WORDS, MODE_DRY_RUN, MODE_ENFORCE, generation_tag, set_global,
    },
};

use super::Tables;
use crate::{
    config::{Config, Mode, TrieEntries},
    datapath::{DatapathError, map_err},
};

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
        let statics = config.static_clients();
        let previous = self.map_config()?;
        if !statics.is_empty() && previous.flags & CONFIG_NO_STATIC != 0 {
            // The programs must look in `STATIC_CLIENTS` before its first entry goes in: one
            // that skipped it would give a client moved there a second entry in `CLIENTS`.
            self.config
                .set(
                    0,
                    MapConfig {
                        flags: previous.flags & !CONFIG_NO_STATIC,
                        ..previous
                    },
                    0,
                )
                .map_err(map_err("CONFIG"))?;
            // A program already running may have read the flag before the write: let every
            // such run end (a run takes microseconds) before an entry goes in.
            std::thread::sleep(PROGRAM_RUNS_END);
        }
        {
            // The moves, and the keys made static, under the lock the sweep's clean-up of strays
            // holds from its check that a key is still static to its removal of the key's copies
            // (`LimitedSweep::strays`): a key made dynamic again meanwhile would lose the state
            // its move just put into `CLIENTS`.
            let mut strays = self
                .made_static
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            let made_static = sync_static(
                &mut self.clients,
                "CLIENTS",
                &mut self.static_clients,
                "STATIC_CLIENTS",
                Some(&mut self.limited),
                &statics,
                &mut report,
            )?;
            // A packet that found one of these clients in `CLIENTS` before it moved may still
            // copy it into `LIMITED` after the move took it out of there: the sweep removes such
            // a copy once those runs have ended (a CPU that looks in `LIMITED` first would count
            // in it). Not here: an apply holds the lock the API's reads wait on.
            let now = std::time::Instant::now();
            strays.extend(made_static.into_iter().map(|key| (key, now)));
        }
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
        // `STATIC_CLIENTS` was emptied above when no exact-address policy is left.
        if statics.is_empty() {
            flags |= CONFIG_NO_STATIC;
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

/// Longer than any run of the programs (microseconds, in softirq or a test run): after a
/// `CONFIG` write, runs that read the value before it have ended once this has passed.
pub(super) const PROGRAM_RUNS_END: std::time::Duration = std::time::Duration::from_millis(10);

/// Moves entries between an LRU map and its never-evicted static map so that exactly the keys in
/// `wanted` are static, carrying their counters across; moved entries re-resolve their policy.
/// A key that becomes static takes its state from `held` (`LIMITED`) if it is held there: a
/// limited client keeps its window wherever it lives. Returns the keys made static, with `held`.
fn sync_static(
    dynamic: &mut HashMap<MapData, ClientKey, ClientState>,
    dynamic_name: &'static str,
    statics: &mut HashMap<MapData, ClientKey, ClientState>,
    static_name: &'static str,
    mut held: Option<&mut HashMap<MapData, ClientKey, ClientState>>,
    wanted: &[ClientKey],
    report: &mut ApplyReport,
) -> Result<Vec<ClientKey>, DatapathError> {
    let mut added = Vec::new();
    let wanted: HashSet<ClientKey> = wanted.iter().copied().collect();
    // Every key, or an error: a walk cut short would leave keys nobody removes (and, with no
    // exact-address policy left, entries the programs skip under `CONFIG_NO_STATIC`).
    let current: HashSet<ClientKey> = statics
        .keys()
        .collect::<Result<_, _>>()
        .map_err(map_err(static_name))?;
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
        // Whether or not the state came from `LIMITED`: a packet may have held the client (a
        // copy into `LIMITED`) since `from_held` was read, and a copy left there would come
        // back into `CLIENTS` with the sweep, a second entry that packets find first. Out of
        // `LIMITED` first: a CPU that looks there first counts in that copy until it goes.
        if let Some(h) = held.as_deref_mut() {
            let _ = h.remove(key);
            added.push(*key);
        }
        let _ = dynamic.remove(key);
        report.statics_added += 1;
    }
    Ok(added)
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
