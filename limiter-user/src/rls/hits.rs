//! Per-rule hit counters of the rate limit service, the counterpart of envoyproxy/ratelimit's
//! per-rule stats (`total_hits`, `over_limit`, `near_limit`, `within_limit`, `shadow_mode`),
//! exposed by `metrics` as `limiter_rls_*`.
//!
//! **Keys.** A series is named by its domain and a descriptor key in envoyproxy/ratelimit's
//! spelling: each entry `key_value` (or `key` alone), joined by `.`. A rule's series carries the
//! rule's own path in the config (`key_value.key`, a wildcard rule's value with its `*`): the
//! rules come from the config, so these series are bounded by it. A rule with
//! `detailed_metric: true`, and a descriptor carrying its own `limit` override, is counted
//! under the request's actual entries instead, and a rule under `value_to_metric` under a key
//! with some of the request's values (see `matching`): those come from requests, so they are
//! *detailed* series, capped in number by [`DetailedCap`] (`--rls-metrics-max-detailed`) and
//! in length by [`MAX_DETAILED_KEY_BYTES`]; hits of a detailed series that does not fit are
//! counted in [`DetailedCap::unrecorded`], and memory never grows past the cap whatever the
//! requests say.
//!
//! **Counting.** Every hit of a descriptor a rule (or an override) limits is counted once, as
//! its status says: `within_limit` (its descriptor fitted) or `over_limit` (over the limit:
//! refused, or let through by `shadow_mode` or the agent's dry-run mode). The service spends a
//! request's hits all or none, so in a refused request the descriptors that fitted count
//! `within_limit` (and maybe `near_limit`) although nothing was spent. `near_limit` counts the
//! fitting hits that landed above 80% of the limit in force (floor, as envoyproxy/ratelimit's default
//! `NEAR_LIMIT_RATIO`); `shadow_mode` the `over_limit` hits a `shadow_mode` rule let through.
//! An `unlimited` rule's hits are not counted (as in envoyproxy/ratelimit, which never checks
//! them).
//!
//! **Reloads.** [`RlsHits::install`] attaches the series to a config about to come into force:
//! a rule whose (domain, key) was already counted keeps its series (its counts go on), a rule
//! new to the config gets a new one, and the series of rules no longer in the config are
//! dropped, with their detailed series (whose room under the cap is freed). A rule that turns
//! `detailed_metric` on or off starts afresh.
//!
//! **Cost.** A rule's series is reached from the matched rule itself (no lookup); counting is a
//! few relaxed atomic adds. A detailed series costs a key built from the request and a lookup
//! in one of [`SHARDS`] read-locked maps (a write lock only to add a new series).

use std::{
    collections::{BTreeMap, HashMap},
    fmt,
    hash::BuildHasher,
    sync::{
        Arc, Mutex, PoisonError, RwLock,
        atomic::{AtomicU64, AtomicUsize, Ordering},
    },
};

use super::config::{RlsConfig, Rule};

/// Default cap on the detailed series (`--rls-metrics-max-detailed`).
pub const DEFAULT_MAX_DETAILED_SERIES: usize = 10_000;

/// Longest detailed key counted (domain excluded); a longer one is counted as unrecorded, so
/// the cap bounds memory to about `cap × (this + ~100)` bytes.
pub const MAX_DETAILED_KEY_BYTES: usize = 256;

/// Maps a detailed series is kept in, by hash of its key: calls with different keys rarely
/// take the same lock.
pub const SHARDS: usize = 16;

/// What one descriptor's hits did, as the service decided it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Outcome {
    pub hits: u32,
    /// The limit in force (`None`: unlimited or an allow-listed address, never near).
    pub limit: Option<u32>,
    /// What the client had used of `limit` before these hits.
    pub used_before: u32,
    /// The hits did not fit.
    pub over: bool,
    /// The rule is in `shadow_mode` (over-limit hits were let through).
    pub shadow: bool,
}

/// The counts of one series (or what one outcome adds to them).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Counts {
    pub within_limit: u64,
    pub over_limit: u64,
    pub near_limit: u64,
    pub shadow_mode: u64,
}

impl Counts {
    /// `within_limit + over_limit`: every hit (envoyproxy/ratelimit's `total_hits`).
    pub fn total_hits(&self) -> u64 {
        self.within_limit + self.over_limit
    }
}

/// The hits above which a limit is near: ⌊limit × 0.8⌋.
pub fn near_threshold(limit: u32) -> u64 {
    u64::from(limit) * 4 / 5
}

impl Outcome {
    /// What this outcome adds to its series (see the module docs).
    pub fn counts(&self) -> Counts {
        let hits = u64::from(self.hits);
        if self.over {
            return Counts {
                over_limit: hits,
                shadow_mode: if self.shadow { hits } else { 0 },
                ..Counts::default()
            };
        }
        let near_limit = match self.limit {
            None => 0,
            Some(limit) => {
                let near = near_threshold(limit);
                let before = u64::from(self.used_before);
                let after = before + hits;
                after.saturating_sub(near.max(before))
            }
        };
        Counts {
            within_limit: hits,
            near_limit,
            ..Counts::default()
        }
    }
}

/// A series' counters: relaxed atomics (each an independent tally, as the agent's other
/// counters).
#[derive(Debug, Default)]
pub struct Tally {
    within_limit: AtomicU64,
    over_limit: AtomicU64,
    near_limit: AtomicU64,
    shadow_mode: AtomicU64,
}

impl Tally {
    fn add(&self, c: Counts) {
        for (counter, n) in [
            (&self.within_limit, c.within_limit),
            (&self.over_limit, c.over_limit),
            (&self.near_limit, c.near_limit),
            (&self.shadow_mode, c.shadow_mode),
        ] {
            if n > 0 {
                counter.fetch_add(n, Ordering::Relaxed);
            }
        }
    }

    pub fn get(&self) -> Counts {
        Counts {
            within_limit: self.within_limit.load(Ordering::Relaxed),
            over_limit: self.over_limit.load(Ordering::Relaxed),
            near_limit: self.near_limit.load(Ordering::Relaxed),
            shadow_mode: self.shadow_mode.load(Ordering::Relaxed),
        }
    }
}

/// The room for detailed series, shared by every rule and domain.
#[derive(Debug)]
pub struct DetailedCap {
    max: usize,
    used: AtomicUsize,
    /// Hits of detailed series that did not fit (the cap was reached, or the key was longer
    /// than [`MAX_DETAILED_KEY_BYTES`]).
    unrecorded: AtomicU64,
}

impl DetailedCap {
    /// Takes room for one more series, if any is left.
    fn take(&self) -> bool {
        self.used
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |used| {
                (used < self.max).then_some(used + 1)
            })
            .is_ok()
    }
}

/// The detailed series of one rule (or of one domain's overrides), by key.
struct Detailed {
    hasher: std::hash::RandomState,
    shards: [RwLock<HashMap<Box<str>, Tally>>; SHARDS],
    cap: Arc<DetailedCap>,
}

impl fmt::Debug for Detailed {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Detailed").finish_non_exhaustive()
    }
}

impl Detailed {
    fn new(cap: Arc<DetailedCap>) -> Detailed {
        Detailed {
            hasher: std::hash::RandomState::new(),
            shards: Default::default(),
            cap,
        }
    }

    fn record(&self, key: &str, counts: Counts) {
        if key.len() > MAX_DETAILED_KEY_BYTES {
            self.cap
                .unrecorded
                .fetch_add(counts.total_hits(), Ordering::Relaxed);
            return;
        }
        let shard = &self.shards[(self.hasher.hash_one(key) % SHARDS as u64) as usize];
        if let Some(tally) = shard
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .get(key)
        {
            tally.add(counts);
            return;
        }
        let mut map = shard.write().unwrap_or_else(PoisonError::into_inner);
        if let Some(tally) = map.get(key) {
            tally.add(counts);
            return;
        }
        if !self.cap.take() {
            self.cap
                .unrecorded
                .fetch_add(counts.total_hits(), Ordering::Relaxed);
            return;
        }
        let tally = Tally::default();
        tally.add(counts);
        map.insert(key.into(), tally);
    }

    fn counts(&self) -> Vec<(String, Counts)> {
        let mut out: Vec<(String, Counts)> = self
            .shards
            .iter()
            .flat_map(|shard| {
                shard
                    .read()
                    .unwrap_or_else(PoisonError::into_inner)
                    .iter()
                    .map(|(k, t)| (k.to_string(), t.get()))
                    .collect::<Vec<_>>()
            })
            .collect();
        out.sort_unstable_by(|a, b| a.0.cmp(&b.0));
        out
    }
}

impl Drop for Detailed {
    /// Frees the room its series took under the cap.
    fn drop(&mut self) {
        let held: usize = self
            .shards
            .iter_mut()
            .map(|s| s.get_mut().unwrap_or_else(PoisonError::into_inner).len())
            .sum();
        self.cap.used.fetch_sub(held, Ordering::Relaxed);
    }
}

/// The series of one rule: its own counts, or (`detailed_metric`, overrides) one per request
/// key.
#[derive(Debug)]
pub struct Series {
    tally: Tally,
    detailed: Option<Detailed>,
}

impl Series {
    /// Counts one descriptor's outcome; `entries` name a detailed series.
    pub fn record(&self, entries: &[(&str, &str)], outcome: &Outcome) {
        let counts = outcome.counts();
        match &self.detailed {
            None => self.tally.add(counts),
            Some(detailed) => detailed.record(&descriptor_key(entries), counts),
        }
    }

    /// Counts one descriptor's outcome under `key` (a series named by request values, see
    /// `matching`): in the rule's detailed series, or its own if it has none.
    pub fn record_as(&self, key: &str, outcome: &Outcome) {
        let counts = outcome.counts();
        match &self.detailed {
            None => self.tally.add(counts),
            Some(detailed) => detailed.record(key, counts),
        }
    }

    fn is_detailed(&self) -> bool {
        self.detailed.is_some()
    }
}

/// A rule's (or a domain's overrides') series, as the config carries it; equal when it is the
/// same series.
#[derive(Clone)]
pub struct SeriesRef(pub Arc<Series>);

impl fmt::Debug for SeriesRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("SeriesRef")
    }
}

impl PartialEq for SeriesRef {
    fn eq(&self, other: &SeriesRef) -> bool {
        Arc::ptr_eq(&self.0, &other.0)
    }
}

impl Eq for SeriesRef {}

/// A descriptor's key in envoyproxy/ratelimit's spelling: `key_value` per entry (`key` when
/// the value is empty), joined by `.`.
pub fn descriptor_key(entries: &[(&str, &str)]) -> String {
    let mut key = String::with_capacity(entries.iter().map(|(k, v)| k.len() + v.len() + 2).sum());
    for (i, (k, v)) in entries.iter().enumerate() {
        if i > 0 {
            key.push('.');
        }
        key.push_str(k);
        if !v.is_empty() {
            key.push('_');
            key.push_str(v);
        }
    }
    key
}

/// One series as a scrape reads it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Sample {
    pub domain: String,
    pub descriptor: String,
    pub counts: Counts,
}

/// Everything a scrape writes.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Snapshot {
    /// By domain, then descriptor.
    pub series: Vec<Sample>,
    /// Detailed series held now.
    pub detailed_series: usize,
    /// The cap on them.
    pub max_detailed_series: usize,
    /// Hits of detailed series that did not fit.
    pub unrecorded: u64,
    /// Calls answered by each serving thread, in thread order.
    pub calls: Vec<u64>,
}

/// Every series of the config in force (see the module docs).
#[derive(Debug)]
pub struct RlsHits {
    cap: Arc<DetailedCap>,
    installed: Mutex<Installed>,
    /// Calls answered, one counter per serving thread (see [`RlsHits::thread_calls`]).
    calls: Mutex<Vec<Arc<AtomicU64>>>,
}

#[derive(Debug, Default)]
struct Installed {
    /// A rule's series by (domain, the rule's key).
    rules: BTreeMap<(String, String), Arc<Series>>,
    /// The series of a domain's overrides, by domain.
    overrides: BTreeMap<String, Arc<Series>>,
}

impl RlsHits {
    /// No series yet; at most `max_detailed` detailed series.
    pub fn new(max_detailed: usize) -> RlsHits {
        RlsHits {
            cap: Arc::new(DetailedCap {
                max: max_detailed,
                used: AtomicUsize::new(0),
                unrecorded: AtomicU64::new(0),
            }),
            installed: Mutex::new(Installed::default()),
            calls: Mutex::new(Vec::new()),
        }
    }

    /// A counter of the calls the next serving thread answers: the threads take theirs in
    /// order, so the n-th counter taken is thread n's.
    pub fn thread_calls(&self) -> Arc<AtomicU64> {
        let counter = Arc::new(AtomicU64::new(0));
        self.calls
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .push(Arc::clone(&counter));
        counter
    }

    /// Attaches the series to `config`, about to come into force (see the module docs).
    pub fn install(&self, config: &mut RlsConfig) {
        let mut installed = self
            .installed
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        let mut next = Installed::default();
        for domain in config.domains.values_mut() {
            let name = domain.name.clone();
            let overrides = installed
                .overrides
                .remove(&name)
                .unwrap_or_else(|| self.series(true));
            domain.overrides = Some(SeriesRef(Arc::clone(&overrides)));
            next.overrides.insert(name.clone(), overrides);
            let prefix_len = name.len() + 1;
            domain
                .descriptors
                .for_each_rule_mut(&mut |rule: &mut Rule| {
                    // Limits only: not a rule without one, nor an `unlimited` one.
                    if rule.rate_limit.as_ref().is_none_or(|l| l.limit.is_none()) {
                        rule.series = None;
                        return;
                    }
                    let key = (name.clone(), rule.path[prefix_len..].to_string());
                    // Two rules can have one stat key (`key: a_b`, and `key: a` with `value:
                    // b`): like envoyproxy/ratelimit's equal stat keys, they count in one series
                    // (the first rule's kind of series wins).
                    if let Some(shared) = next.rules.get(&key) {
                        rule.series = Some(SeriesRef(Arc::clone(shared)));
                        return;
                    }
                    // Request values name its series: `detailed_metric`, or `value_to_metric`
                    // on it or on a rule it is nested in.
                    let detailed = rule.detailed_metric || rule.metric_values;
                    let series = match installed.rules.remove(&key) {
                        Some(s) if s.is_detailed() == detailed => s,
                        _ => self.series(detailed),
                    };
                    rule.series = Some(SeriesRef(Arc::clone(&series)));
                    next.rules.insert(key, series);
                });
        }
        // What is left of the old series is dropped here (with the room its detailed series
        // held), but for calls still holding the previous config.
        *installed = next;
    }

    fn series(&self, detailed: bool) -> Arc<Series> {
        Arc::new(Series {
            tally: Tally::default(),
            detailed: detailed.then(|| Detailed::new(Arc::clone(&self.cap))),
        })
    }

    /// Every series' counts now, in order.
    pub fn snapshot(&self) -> Snapshot {
        let installed = self
            .installed
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        let mut series = Vec::new();
        let mut push = |domain: &str, descriptor: String, counts: Counts| {
            series.push(Sample {
                domain: domain.to_string(),
                descriptor,
                counts,
            })
        };
        for ((domain, key), s) in &installed.rules {
            match &s.detailed {
                None => push(domain, key.clone(), s.tally.get()),
                Some(d) => {
                    for (key, counts) in d.counts() {
                        push(domain, key, counts);
                    }
                }
            }
        }
        for (domain, s) in &installed.overrides {
            if let Some(d) = &s.detailed {
                for (key, counts) in d.counts() {
                    push(domain, key, counts);
                }
            }
        }
        // A detailed key can equal a rule's key (or another rule's detailed key): their
        // counts are one series.
        series.sort_by(|a, b| (&a.domain, &a.descriptor).cmp(&(&b.domain, &b.descriptor)));
        series.dedup_by(|later, kept| {
            if later.domain != kept.domain || later.descriptor != kept.descriptor {
                return false;
            }
            kept.counts.within_limit += later.counts.within_limit;
            kept.counts.over_limit += later.counts.over_limit;
            kept.counts.near_limit += later.counts.near_limit;
            kept.counts.shadow_mode += later.counts.shadow_mode;
            true
        });
        Snapshot {
            series,
            detailed_series: self.cap.used.load(Ordering::Relaxed),
            max_detailed_series: self.cap.max,
            unrecorded: self.cap.unrecorded.load(Ordering::Relaxed),
            calls: self
                .calls
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .iter()
                .map(|c| c.load(Ordering::Relaxed))
                .collect(),
        }
    }
}

#[cfg(test)]
mod tests;
