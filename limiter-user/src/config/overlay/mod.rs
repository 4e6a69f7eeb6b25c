//! The policy overlay: the policy changes made through the API (`limiter limits set/rm`, the
//! gRPC `Limits` service), kept in a file the agent owns under `--state-dir`, merged over the
//! operator's config file, which the agent then never writes (it may be read-only: a Kubernetes
//! ConfigMap, a file Ansible or Puppet rewrites).
//!
//! # Precedence
//! - `default`: the overlay's if the API set one, else the file's.
//! - A policy (by `match`): the overlay's entry if it has one; else none if the overlay removed
//!   it (a tombstone); else the file's.
//! - An overlay entry replaces `limit`, `window` and `action`; its `weight` is the overlay's if it
//!   has one, else the file's policy's (as an API edit of the file kept the keys it does not
//!   manage), else 1. `per` (how addresses group into clients; `default.per` for the default) is
//!   the file's as written: the API does not set it, so a policy only the overlay has groups as
//!   `default` does.
//! - Order (policy ids): the file's policies in file order, each overridden one in its place,
//!   then the overlay's new policies in the order they were first set.
//! - `mode` and `adaptive` come from the file only.
//!
//! # Changes
//! - `set` of a policy or of the default records it in the overlay (and drops a tombstone of it).
//! - `rm` of a policy the overlay sets drops that entry: the file's policy, if it has one, is in
//!   force again (so `rm` after `set` undoes the `set`); a second `rm` then removes the file's.
//! - `rm` of a policy only the file has is allowed and records a tombstone, so it works with a
//!   read-only file as it did when the agent edited the file. A tombstone whose policy the file
//!   no longer has is dropped ([`Overlay::prune`]), so a policy the operator later writes again
//!   is not hidden by an old removal.
//! - `rm` of the default drops the overlay's default (the file's is in force again); with none
//!   it is refused, as there is always a default.
//!
//! # Format (`STATE_DIR/IFACE.overlay.yaml`, YAML)
//! ```yaml
//! version: 1                      # required; a newer version is refused, never overwritten
//! default: { limit: 500, window: 1s }
//! policies:                       # as in the config file (limit/window/action/weight; no per)
//!   - { match: 10.0.0.0/8, limit: 50, window: 1s }
//!   - { match: tenant-gold, action: pass }
//! removed:                        # file policies the API removed
//!   - 198.51.100.0/24
//! ```
//! Entries are validated with the config file's own rules (`Limit::resolve`, `config::weight`).
//! It is written whole through [`state_file::write_atomic`], the writer the snapshot uses.

use std::{
    collections::HashSet,
    fmt,
    path::{Path, PathBuf},
    sync::Arc,
};

use serde::Deserialize;
use serde_yaml::{Mapping, Value};

use crate::{
    capped_read::{self, CappedReadError},
    config::{
        self, Action, Cidr, Config, Grouping, Limit, Match, PolicyError, Resolved, Rule, Scope,
    },
    state_file::{self, StateFileError},
};

/// Maps keyed by the operator's matches: a fast hasher (the keys are not the network's).
type HashMap<K, V> = std::collections::HashMap<K, V, foldhash::fast::RandomState>;
type FastSet<T> = HashSet<T, foldhash::fast::RandomState>;

/// The overlay format this binary reads and writes.
pub const VERSION: u64 = 1;

/// Largest overlay read (`crate::capped_read`): twice the config file's cap, since an overlay
/// may list up to `MAX_POLICIES` policies of its own plus as many removals of the file's, so
/// the agent never refuses an overlay it wrote itself.
pub const MAX_OVERLAY_BYTES: u64 = 2 * config::MAX_CONFIG_BYTES;

#[derive(Debug, thiserror::Error)]
pub enum OverlayError {
    /// Not readable, not a regular file, or over [`MAX_OVERLAY_BYTES`]; the cause names the file.
    #[error(transparent)]
    Read(CappedReadError),
    #[error("the policy overlay {path} is corrupt: {problem}")]
    Corrupt { path: PathBuf, problem: String },
    #[error(
        "the policy overlay {path} has version {found}, written by a newer limiter; this one reads \
         version {VERSION}: run the newer limiter, or move the file aside to start again from the \
         config file's policies"
    )]
    FutureVersion { path: PathBuf, found: u64 },
    #[error("writing the policy overlay {path}")]
    Write {
        path: PathBuf,
        #[source]
        error: StateFileError,
    },
    #[error("no policy matches {0}")]
    NotFound(String),
}

#[derive(Debug, thiserror::Error)]
pub enum MergeError {
    #[error("the config file is invalid")]
    File(#[source] PolicyError),
    #[error("the config file with the policy overlay merged over it is invalid")]
    Effective(#[source] PolicyError),
}

/// A policy as the API set it.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Entry {
    pub limit: Resolved,
    /// `None`: the file's policy's weight (if it has the policy), else 1.
    pub weight: Option<f64>,
}

impl From<Resolved> for Entry {
    fn from(limit: Resolved) -> Entry {
        Entry {
            limit,
            weight: None,
        }
    }
}

/// The API's policy changes (see the module docs).
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Overlay {
    pub default: Option<Entry>,
    /// In the order first set; one entry per match.
    pub policies: Vec<(Match, Entry)>,
    /// Tombstones: file policies removed through the API. Never also in `policies`.
    pub removed: Vec<Match>,
}

/// What [`Overlay::remove_policy`] did.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Removal {
    /// The overlay's entry went, and the file's policy (this one) is in force again.
    RestoredFile(Resolved),
    /// The overlay's entry (this one) went; the file has no such policy.
    Removed(Resolved),
    /// The file's policy (this one) is now removed by a tombstone.
    Tombstoned(Resolved),
}

/// The overlay of the agent on `iface` (one agent per interface, as for the snapshot).
pub fn overlay_path(state_dir: &Path, iface: &str) -> PathBuf {
    state_dir.join(format!("{iface}.overlay.yaml"))
}

/// The overlay as written (`deny_unknown_fields`: a misspelt key is an error, not ignored).
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct OnDisk {
    #[expect(
        dead_code,
        reason = "checked through `VersionProbe` first; a field so that `deny_unknown_fields` accepts it"
    )]
    version: u64,
    #[serde(default)]
    default: Option<Limit>,
    #[serde(default)]
    policies: Vec<Rule>,
    #[serde(default)]
    removed: Vec<Match>,
}

/// Only `version`, read before anything else so that a newer format is refused as such rather
/// than as whatever field it added.
#[derive(Deserialize)]
struct VersionProbe {
    version: Option<Value>,
}

impl Overlay {
    pub fn is_empty(&self) -> bool {
        *self == Overlay::default()
    }

    /// Reads the overlay at `path`; none there is an empty overlay.
    pub fn load(path: &Path) -> Result<Overlay, OverlayError> {
        match capped_read::read_to_string(path, MAX_OVERLAY_BYTES, "the policy overlay") {
            Ok(text) => Overlay::parse(&text, path),
            Err(error) if error.is_not_found() => Ok(Overlay::default()),
            Err(CappedReadError::NotUtf8 { .. }) => Err(OverlayError::Corrupt {
                path: path.to_path_buf(),
                problem: "not UTF-8 text".into(),
            }),
            Err(error) => Err(OverlayError::Read(error)),
        }
    }

    /// Writes the overlay to `path` atomically ([`state_file::write_atomic`]).
    pub fn store(&self, path: &Path) -> Result<(), OverlayError> {
        state_file::write_atomic(path, self.to_yaml().as_bytes()).map_err(|error| {
            OverlayError::Write {
                path: path.to_path_buf(),
                error,
            }
        })
    }

    /// Parses and validates an overlay's text; `path` names it in errors.
    pub fn parse(text: &str, path: &Path) -> Result<Overlay, OverlayError> {
        let corrupt = |problem: String| OverlayError::Corrupt {
            path: path.to_path_buf(),
            problem,
        };
        if text.trim().is_empty() {
            return Err(corrupt("the file is empty".into()));
        }
        let probe: VersionProbe = serde_yaml::from_str(text).map_err(|e| corrupt(e.to_string()))?;
        match probe.version {
            None => return Err(corrupt("no `version` field".into())),
            Some(Value::Number(n)) if n.as_u64() == Some(VERSION) => {}
            Some(Value::Number(n)) if n.as_u64().is_some_and(|v| v > VERSION) => {
                return Err(OverlayError::FutureVersion {
                    path: path.to_path_buf(),
                    found: n.as_u64().unwrap_or_default(),
                });
            }
            Some(v) => {
                return Err(corrupt(format!(
                    "`version` must be {VERSION}, got {}",
                    serde_yaml::to_string(&v).unwrap_or_default().trim()
                )));
            }
        }
        let mut doc: Value = serde_yaml::from_str(text).map_err(|e| corrupt(e.to_string()))?;
        for what in drop_unmatchable(&mut doc) {
            tracing::warn!(
                overlay = %path.display(),
                "dropping the overlay's {what}: it names addresses no packet comes from, which \
                 this version refuses as a policy (the next API change rewrites the overlay \
                 without it)"
            );
        }
        let disk: OnDisk = serde_yaml::from_value(doc).map_err(|e| corrupt(e.to_string()))?;
        // The agent never writes `per` here (it is the file's); one written by hand would be
        // ignored, so it is refused as any other unknown key is.
        let no_per = "`per` is not an overlay key: how addresses group into clients is set in \
                      the config file";
        if disk.default.as_ref().is_some_and(|d| d.per.is_some()) {
            return Err(corrupt(format!("default: {no_per}")));
        }
        if let Some((i, rule)) = disk
            .policies
            .iter()
            .enumerate()
            .find(|(_, r)| r.per.is_some())
        {
            return Err(corrupt(format!(
                "policies[{i}] (match {}): {no_per}",
                rule.matches
            )));
        }
        let default = disk
            .default
            .as_ref()
            .map(entry)
            .transpose()
            .map_err(|m| corrupt(format!("default: {m}")))?;
        let mut policies: Vec<(Match, Entry)> = Vec::with_capacity(disk.policies.len());
        let mut set = HashSet::with_capacity(disk.policies.len());
        for (i, rule) in disk.policies.iter().enumerate() {
            let invalid =
                |m: String| corrupt(format!("policies[{i}] (match {}): {m}", rule.matches));
            if !set.insert(&rule.matches) {
                return Err(invalid("duplicate match".into()));
            }
            policies.push((rule.matches.clone(), entry(&rule.limit()).map_err(invalid)?));
        }
        let mut removed = HashSet::with_capacity(disk.removed.len());
        for (i, m) in disk.removed.iter().enumerate() {
            let invalid = |what: &str| corrupt(format!("removed[{i}] ({m}): {what}"));
            if !removed.insert(m) {
                return Err(invalid("listed twice"));
            }
            if set.contains(m) {
                return Err(invalid("also set under `policies`"));
            }
        }
        Ok(Overlay {
            default,
            policies,
            removed: disk.removed,
        })
    }

    /// The overlay's text: what [`Overlay::parse`] reads back into the same overlay.
    pub fn to_yaml(&self) -> String {
        let mut doc = Mapping::new();
        doc.insert("version".into(), VERSION.into());
        if let Some(e) = &self.default {
            doc.insert("default".into(), entry_value(None, e, None));
        }
        if !self.policies.is_empty() {
            let seq = self
                .policies
                .iter()
                .map(|(m, e)| entry_value(Some(m), e, None))
                .collect();
            doc.insert("policies".into(), Value::Sequence(seq));
        }
        if !self.removed.is_empty() {
            let seq = self
                .removed
                .iter()
                .map(|m| Value::String(m.to_string()))
                .collect();
            doc.insert("removed".into(), Value::Sequence(seq));
        }
        // Serialising a mapping of strings, numbers and sequences cannot fail.
        let body = serde_yaml::to_string(&Value::Mapping(doc)).unwrap_or_default();
        format!(
            "# Policy changes made through the limiter API, merged over the config file.\n\
             # Written by the agent: edit the config file instead (see `limiter limits effective`).\n\
             {body}"
        )
    }

    /// Sets the default (`limiter limits set default ...`).
    pub fn set_default(&mut self, limit: Resolved) {
        let weight = self.default.and_then(|e| e.weight);
        self.default = Some(Entry { limit, weight });
    }

    /// Drops the overlay's default; false if it had none (the default cannot be removed).
    pub fn unset_default(&mut self) -> bool {
        self.default.take().is_some()
    }

    /// Sets the policy for `m`, replacing the overlay's entry (keeping its weight) or adding one
    /// after the others, and dropping a tombstone of it.
    pub fn set_policy(&mut self, m: &Match, limit: Resolved) {
        self.removed.retain(|r| r != m);
        match self.policies.iter_mut().find(|(p, _)| p == m) {
            Some((_, e)) => e.limit = limit,
            None => self.policies.push((m.clone(), limit.into())),
        }
    }

    /// Removes the policy for `m` from the effective config (see the module docs), given the
    /// config file's policies.
    pub fn remove_policy(&mut self, m: &Match, file: &Config) -> Result<Removal, OverlayError> {
        let in_file = file.policies.iter().find(|(p, _)| p == m).map(|(_, r)| *r);
        if let Some(i) = self.policies.iter().position(|(p, _)| p == m) {
            let (_, entry) = self.policies.remove(i);
            return Ok(match in_file {
                Some(r) => Removal::RestoredFile(r),
                None => Removal::Removed(entry.limit),
            });
        }
        match in_file {
            Some(r) if !self.removed.contains(m) => {
                self.removed.push(m.clone());
                Ok(Removal::Tombstoned(r))
            }
            _ => Err(OverlayError::NotFound(m.to_string())),
        }
    }

    /// Drops the tombstones of policies `file` no longer has (see the module docs); returns
    /// them.
    pub fn prune(&mut self, file: &Config) -> Vec<Match> {
        let in_file: HashSet<&Match> = file.policies.iter().map(|(p, _)| p).collect();
        let (keep, stale) = self.removed.drain(..).partition(|m| in_file.contains(m));
        self.removed = keep;
        stale
    }
}

/// A limit as written, checked by the config file's rules.
fn entry(limit: &Limit) -> Result<Entry, String> {
    let resolved = limit.resolve().map_err(|e| e.to_string())?;
    let weight = match &limit.weight {
        None => None,
        Some(w) => Some(config::weight(Some(w))?),
    };
    Ok(Entry {
        limit: resolved,
        weight,
    })
}

/// Removes from an overlay document the entries (under `policies` or `removed`) whose `match`
/// is an address range no packet comes from: IPv4-mapped IPv6 (`::ffff:0:0/96`) or IPv6
/// multicast (`ff00::/8`). Earlier versions accepted them as policies that never matched
/// anything; refusing the whole overlay for them would take every other API policy out of
/// force. Returns a description of each entry dropped.
fn drop_unmatchable(doc: &mut Value) -> Vec<String> {
    let unmatchable = |m: &Value| {
        m.as_str()
            .and_then(|m| m.parse::<Cidr>().err())
            .is_some_and(|e| e.contains("IPv4-mapped") || e.contains("multicast"))
    };
    let mut dropped = Vec::new();
    let Some(map) = doc.as_mapping_mut() else {
        return dropped;
    };
    if let Some(Value::Sequence(items)) = map.get_mut("policies") {
        items.retain(|item| {
            let m = item.get("match");
            let keep = !m.is_some_and(unmatchable);
            if !keep {
                dropped.push(format!(
                    "policy for {}",
                    m.and_then(Value::as_str).unwrap_or("?")
                ));
            }
            keep
        });
    }
    if let Some(Value::Sequence(items)) = map.get_mut("removed") {
        items.retain(|m| {
            let keep = !unmatchable(m);
            if !keep {
                dropped.push(format!("removal of {}", m.as_str().unwrap_or("?")));
            }
            keep
        });
    }
    dropped
}

/// A policy as the config file writes it: `match` (if any), then `limit` and `window`, or
/// `action`, then `weight`: the entry's, else the file's policy's as written, then `per`: the
/// file's policy's as written. `file` is the file's policy (or `default`) this entry overrides.
fn entry_value(m: Option<&Match>, e: &Entry, file: Option<&Value>) -> Value {
    let file_key = |key: &str| file.and_then(|f| f.get(key)).filter(|v| !v.is_null());
    let mut out = Mapping::new();
    if let Some(m) = m {
        out.insert("match".into(), Value::String(m.to_string()));
    }
    match e.limit.action {
        Action::Limit => {
            out.insert("limit".into(), e.limit.limit.into());
            out.insert("window".into(), Value::String(e.limit.window.to_string()));
        }
        Action::Pass => {
            out.insert("action".into(), "pass".into());
        }
        Action::Drop => {
            out.insert("action".into(), "drop".into());
        }
    }
    match (e.weight, file_key("weight")) {
        (Some(w), _) => {
            out.insert("weight".into(), w.into());
        }
        (None, Some(w)) => {
            out.insert("weight".into(), w.clone());
        }
        (None, None) => {}
    }
    for key in ["per", "scope"] {
        if let Some(value) = file_key(key) {
            out.insert(key.into(), value.clone());
        }
    }
    Value::Mapping(out)
}

/// Where an effective policy comes from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Layer {
    /// The config file.
    File,
    /// The overlay: a policy the file does not have.
    Overlay,
    /// The overlay, in place of the file's policy for the same match.
    OverlayOverridesFile,
}

impl Layer {
    pub fn as_str(self) -> &'static str {
        match self {
            Layer::File => "file",
            Layer::Overlay => "overlay",
            Layer::OverlayOverridesFile => "overlay (overrides file)",
        }
    }
}

impl fmt::Display for Layer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The config file with the overlay merged over it.
#[derive(Debug, Clone, PartialEq)]
pub struct Effective {
    /// What the maps get.
    pub config: Config,
    /// The layer of each policy, by policy id: `layers[0]` is the default's, `layers[i + 1]`
    /// is `config.policies[i]`'s.
    pub layers: Vec<Layer>,
    /// The file's policies the overlay removes.
    pub removed: Vec<(Match, Resolved)>,
    /// Tombstones of policies the file does not have (inert; see [`Overlay::prune`]).
    pub stale_removals: Vec<Match>,
    /// What [`Effective::yaml`] writes out when asked (`limiter limits effective`): the file's text
    /// and the overlay merged.
    source: Arc<(Arc<str>, Overlay)>,
}

impl Effective {
    /// `config` as a config file: [`Config::parse`] reads it back into `config` (its warnings
    /// aside, whose lines are the file's). Comments of the file are not kept. Written on demand:
    /// a large config takes a while.
    pub fn yaml(&self) -> String {
        let (file_text, overlay) = &*self.source;
        // The text was parsed and merged when `self` was made, so this cannot fail.
        merged_yaml(file_text, overlay).unwrap_or_default()
    }

    /// The layer of policy `id` (0 is the default).
    pub fn layer(&self, id: usize) -> Layer {
        self.layers.get(id).copied().unwrap_or(Layer::File)
    }

    /// The layer of the policy for `m`, if there is one.
    pub fn layer_of(&self, m: &Match) -> Option<Layer> {
        let i = self.config.policies.iter().position(|(p, _)| p == m)?;
        Some(self.layer(i + 1))
    }

    /// The effective config for `limiter limits effective`: a comment saying where each part comes
    /// from, then [`Effective::yaml`], which an operator can put in place of the config file
    /// (and then delete the overlay) to fold the API's changes in.
    pub fn render(&self, file: &Path, overlay: &Path) -> String {
        let mut out = format!(
            "# The effective limiter config: {} with the policy overlay {} merged over it.\n",
            file.display(),
            overlay.display()
        );
        let from_overlay: Vec<String> = std::iter::once("default".to_string())
            .chain(self.config.policies.iter().map(|(m, _)| m.to_string()))
            .zip(&self.layers)
            .filter(|(_, l)| **l != Layer::File)
            .map(|(name, l)| format!("{name} ({l})"))
            .collect();
        if from_overlay.is_empty() && self.removed.is_empty() {
            out.push_str("# The overlay changes nothing: this is the config file's policies.\n");
        } else {
            if !from_overlay.is_empty() {
                out.push_str(&format!(
                    "# Set through the API: {}.\n",
                    from_overlay.join(", ")
                ));
            }
            if !self.removed.is_empty() {
                let names: Vec<String> = self.removed.iter().map(|(m, _)| m.to_string()).collect();
                out.push_str(&format!(
                    "# Removed through the API (not below): {}.\n",
                    names.join(", ")
                ));
            }
            out.push_str(
                "# To fold them into the config file: replace it with this text (its comments are\n\
                 # not kept), then delete the overlay file and reload the agent (SIGHUP).\n",
            );
        }
        out.push_str(&self.yaml());
        out
    }
}

/// Merges `overlay` over the config file's text (see the module docs for the precedence). Pure:
/// reads and writes nothing.
pub fn merge(file_text: &str, overlay: &Overlay) -> Result<Effective, MergeError> {
    let file = Config::parse(file_text).map_err(MergeError::File)?;
    merge_parsed(Arc::from(file_text), &file, overlay)
}

/// [`merge`] of a file already parsed: `file` is `Config::parse(&file_text)`. The effective
/// config is made from `file` and the overlay's entries directly, in time linear in the
/// policies, and checked by the rules [`Config::parse`] applies to the whole (the count of
/// policies, of exact addresses, the global limits); its text is written only on demand
/// ([`Effective::yaml`]).
pub fn merge_parsed(
    file_text: Arc<str>,
    file: &Config,
    overlay: &Overlay,
) -> Result<Effective, MergeError> {
    let entries: HashMap<&Match, &Entry> = overlay.policies.iter().map(|(m, e)| (m, e)).collect();
    let tombstones: FastSet<&Match> = overlay.removed.iter().collect();
    let n = file.policies.len() + overlay.policies.len();
    let mut layers = Vec::with_capacity(n + 1);
    let mut policies = Vec::with_capacity(n);
    let mut weights = Vec::with_capacity(n + 1);
    let mut pers = Vec::with_capacity(n);
    let mut scopes = Vec::with_capacity(n + 1);
    // An entry's weight is its own, else the file's policy's as written (1 if none).
    let default = match &overlay.default {
        Some(e) => {
            layers.push(Layer::OverlayOverridesFile);
            weights.push(e.weight.unwrap_or(file.weight(0)));
            e.limit
        }
        None => {
            layers.push(Layer::File);
            weights.push(file.weight(0));
            file.default
        }
    };
    scopes.push(Scope::Local);
    let mut removed = Vec::new();
    let mut in_file = FastSet::with_capacity_and_hasher(file.policies.len(), Default::default());
    for (i, (m, r)) in file.policies.iter().enumerate() {
        in_file.insert(m);
        let id = i + 1;
        let file_weight = file
            .weights
            .get(id)
            .copied()
            .unwrap_or(config::DEFAULT_WEIGHT);
        let (resolved, weight, layer) = match entries.get(m) {
            Some(e) => (
                e.limit,
                e.weight.unwrap_or(file_weight),
                Layer::OverlayOverridesFile,
            ),
            None if tombstones.contains(m) => {
                removed.push((m.clone(), *r));
                continue;
            }
            None => (*r, file_weight, Layer::File),
        };
        policies.push((m.clone(), resolved));
        weights.push(weight);
        pers.push(file.grouping.policies.get(i).copied().flatten());
        scopes.push(file.scopes.get(id).copied().unwrap_or_default());
        layers.push(layer);
    }
    for (m, e) in &overlay.policies {
        if !in_file.contains(m) {
            policies.push((m.clone(), e.limit));
            weights.push(e.weight.unwrap_or(config::DEFAULT_WEIGHT));
            pers.push(None);
            scopes.push(Scope::Local);
            layers.push(Layer::Overlay);
        }
    }
    let stale_removals = overlay
        .removed
        .iter()
        .filter(|m| !in_file.contains(m))
        .cloned()
        .collect();
    let warnings = config::check_merged(&policies, &scopes, file.cluster.as_ref())
        .map_err(MergeError::Effective)?;
    let config = Config {
        mode: file.mode,
        default,
        policies,
        weights,
        adaptive: file.adaptive.clone(),
        grouping: Grouping {
            default_v4: file.grouping.default_v4,
            default_v6: file.grouping.default_v6,
            policies: pers,
        },
        scopes,
        cluster: file.cluster.clone(),
        warnings,
        global_limits: Default::default(),
    };
    Ok(Effective {
        config,
        layers,
        removed,
        stale_removals,
        source: Arc::new((file_text, overlay.clone())),
    })
}

/// The text of `overlay` merged over the config file's text: the file's document with each
/// overridden policy rewritten in its place ([`entry_value`]), the removed ones left out and
/// the overlay's new ones appended; what [`Effective::yaml`] returns.
fn merged_yaml(file_text: &str, overlay: &Overlay) -> Result<String, MergeError> {
    let file = Config::parse(file_text).map_err(MergeError::File)?;
    // `Config::parse` accepted it, so it is a mapping with a valid `policies` sequence whose
    // entries are `file.policies`, in order.
    let mut doc: Mapping =
        serde_yaml::from_str(file_text).map_err(|e| MergeError::File(PolicyError::Yaml(e)))?;
    if let Some(e) = &overlay.default {
        let value = entry_value(None, e, doc.get("default"));
        doc.insert("default".into(), value);
    }
    let items = match doc.remove("policies") {
        Some(Value::Sequence(items)) => items,
        _ => Vec::new(),
    };
    let entries: HashMap<&Match, &Entry> = overlay.policies.iter().map(|(m, e)| (m, e)).collect();
    let tombstones: HashSet<&Match> = overlay.removed.iter().collect();
    let in_file: HashSet<&Match> = file.policies.iter().map(|(m, _)| m).collect();
    let mut policies = Vec::with_capacity(items.len() + overlay.policies.len());
    for (item, (m, _)) in items.into_iter().zip(&file.policies) {
        if let Some(e) = entries.get(m) {
            policies.push(entry_value(Some(m), e, Some(&item)));
        } else if !tombstones.contains(m) {
            policies.push(item);
        }
    }
    for (m, e) in &overlay.policies {
        if !in_file.contains(m) {
            policies.push(entry_value(Some(m), e, None));
        }
    }
    if !policies.is_empty() {
        doc.insert("policies".into(), Value::Sequence(policies));
    }
    // Serialising a mapping parsed from YAML, plus strings and numbers, cannot fail.
    Ok(serde_yaml::to_string(&Value::Mapping(doc)).unwrap_or_default())
}

#[cfg(test)]
mod tests;
