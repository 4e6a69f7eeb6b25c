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
//!   manage), else 1.
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
//! policies:                       # as in the config file (limit/window/action/weight)
//!   - { match: 10.0.0.0/8, limit: 50, window: 1s }
//!   - { match: tenant-gold, action: pass }
//! removed:                        # file policies the API removed
//!   - 198.51.100.0/24
//! ```
//! Entries are validated with the config file's own rules (`Limit::resolve`, `config::weight`).
//! It is written whole through [`state_file::write_atomic`], the writer the snapshot uses.

use std::{
    fmt, io,
    path::{Path, PathBuf},
};

use serde::Deserialize;
use serde_yaml::{Mapping, Value};

use crate::{
    config::{self, Action, Config, Limit, Match, PolicyError, Resolved, Rule},
    state_file::{self, StateFileError},
};

/// The overlay format this binary reads and writes.
pub const VERSION: u64 = 1;

#[derive(Debug, thiserror::Error)]
pub enum OverlayError {
    #[error("reading the policy overlay {path}")]
    Read {
        path: PathBuf,
        #[source]
        error: io::Error,
    },
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
        match std::fs::read_to_string(path) {
            Ok(text) => Overlay::parse(&text, path),
            Err(error) if error.kind() == io::ErrorKind::NotFound => Ok(Overlay::default()),
            Err(error) if error.kind() == io::ErrorKind::InvalidData => {
                Err(OverlayError::Corrupt {
                    path: path.to_path_buf(),
                    problem: "not UTF-8 text".into(),
                })
            }
            Err(error) => Err(OverlayError::Read {
                path: path.to_path_buf(),
                error,
            }),
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
        let disk: OnDisk = serde_yaml::from_str(text).map_err(|e| corrupt(e.to_string()))?;
        let default = disk
            .default
            .as_ref()
            .map(entry)
            .transpose()
            .map_err(|m| corrupt(format!("default: {m}")))?;
        let mut policies: Vec<(Match, Entry)> = Vec::with_capacity(disk.policies.len());
        for (i, rule) in disk.policies.iter().enumerate() {
            let invalid =
                |m: String| corrupt(format!("policies[{i}] (match {}): {m}", rule.matches));
            if policies.iter().any(|(m, _)| *m == rule.matches) {
                return Err(invalid("duplicate match".into()));
            }
            policies.push((rule.matches.clone(), entry(&rule.limit()).map_err(invalid)?));
        }
        for (i, m) in disk.removed.iter().enumerate() {
            let invalid = |what: &str| corrupt(format!("removed[{i}] ({m}): {what}"));
            if disk.removed[..i].contains(m) {
                return Err(invalid("listed twice"));
            }
            if policies.iter().any(|(p, _)| p == m) {
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
             # Written by the agent: edit the config file instead (see `limiter config show`).\n\
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
        let (keep, stale) = self
            .removed
            .drain(..)
            .partition(|m| file.policies.iter().any(|(p, _)| p == m));
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

/// A policy as the config file writes it: `match` (if any), then `limit` and `window`, or
/// `action`, then `weight`: the entry's, else `file_weight` (the file's policy's, as written).
fn entry_value(m: Option<&Match>, e: &Entry, file_weight: Option<&Value>) -> Value {
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
    match (e.weight, file_weight) {
        (Some(w), _) => {
            out.insert("weight".into(), w.into());
        }
        (None, Some(w)) if !w.is_null() => {
            out.insert("weight".into(), w.clone());
        }
        _ => {}
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
    /// `config` as a config file: [`Config::parse`] reads it back into `config`. Comments of
    /// the file are not kept.
    pub yaml: String,
}

impl Effective {
    /// The layer of policy `id` (0 is the default).
    pub fn layer(&self, id: usize) -> Layer {
        self.layers.get(id).copied().unwrap_or(Layer::File)
    }

    /// The layer of the policy for `m`, if there is one.
    pub fn layer_of(&self, m: &Match) -> Option<Layer> {
        let i = self.config.policies.iter().position(|(p, _)| p == m)?;
        Some(self.layer(i + 1))
    }

    /// The effective config for `limiter config show`: a comment saying where each part comes
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
        out.push_str(&self.yaml);
        out
    }
}

/// Merges `overlay` over the config file's text (see the module docs for the precedence). Pure:
/// reads and writes nothing.
pub fn merge(file_text: &str, overlay: &Overlay) -> Result<Effective, MergeError> {
    let file = Config::parse(file_text).map_err(MergeError::File)?;
    // `Config::parse` accepted it, so it is a mapping with a valid `policies` sequence whose
    // entries are `file.policies`, in order.
    let mut doc: Mapping =
        serde_yaml::from_str(file_text).map_err(|e| MergeError::File(PolicyError::Yaml(e)))?;
    let mut layers = Vec::with_capacity(file.policies.len() + overlay.policies.len() + 1);
    match &overlay.default {
        Some(e) => {
            let file_weight = doc.get("default").and_then(|d| d.get("weight")).cloned();
            doc.insert("default".into(), entry_value(None, e, file_weight.as_ref()));
            layers.push(Layer::OverlayOverridesFile);
        }
        None => layers.push(Layer::File),
    }
    let items = match doc.remove("policies") {
        Some(Value::Sequence(items)) => items,
        _ => Vec::new(),
    };
    let mut policies = Vec::with_capacity(items.len() + overlay.policies.len());
    let mut removed = Vec::new();
    for (item, (m, r)) in items.into_iter().zip(&file.policies) {
        if let Some((_, e)) = overlay.policies.iter().find(|(p, _)| p == m) {
            policies.push(entry_value(Some(m), e, item.get("weight")));
            layers.push(Layer::OverlayOverridesFile);
        } else if overlay.removed.contains(m) {
            removed.push((m.clone(), *r));
        } else {
            policies.push(item);
            layers.push(Layer::File);
        }
    }
    for (m, e) in &overlay.policies {
        if !file.policies.iter().any(|(p, _)| p == m) {
            policies.push(entry_value(Some(m), e, None));
            layers.push(Layer::Overlay);
        }
    }
    let stale_removals = overlay
        .removed
        .iter()
        .filter(|m| !file.policies.iter().any(|(p, _)| p == *m))
        .cloned()
        .collect();
    if !policies.is_empty() {
        doc.insert("policies".into(), Value::Sequence(policies));
    }
    // Serialising a mapping parsed from YAML, plus strings and numbers, cannot fail.
    let yaml = serde_yaml::to_string(&Value::Mapping(doc)).unwrap_or_default();
    let config = Config::parse(&yaml).map_err(MergeError::Effective)?;
    Ok(Effective {
        config,
        layers,
        removed,
        stale_removals,
        yaml,
    })
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::PermissionsExt as _;

    use proptest::prelude::*;

    use super::*;
    use crate::config::Window;

    const FILE: &str = "\
mode: dry-run
default: { limit: 1000, window: 1s, weight: 2 }   # the operator's
policies:
  - match: 10.0.0.0/8
    limit: 100
    window: 500ms
    weight: 3
  - { match: 192.0.2.7, action: pass }
  - { match: tenant-gold, limit: 9, window: 2s }
adaptive: { enabled: true, period: 250ms }
";

    fn m(s: &str) -> Match {
        s.parse().unwrap()
    }

    fn limit(count: u32, window: &str) -> Resolved {
        Resolved {
            action: Action::Limit,
            limit: count,
            window: window.parse().unwrap(),
        }
    }

    fn pass() -> Resolved {
        Config::parse("default: { action: pass }\n")
            .unwrap()
            .default
    }

    fn file() -> Config {
        Config::parse(FILE).unwrap()
    }

    fn path() -> PathBuf {
        PathBuf::from("/var/lib/limiter/eth0.overlay.yaml")
    }

    fn policy(c: &Config, s: &str) -> Option<Resolved> {
        c.policies.iter().find(|(p, _)| *p == m(s)).map(|(_, r)| *r)
    }

    #[test]
    fn an_empty_overlay_is_the_file() {
        let e = merge(FILE, &Overlay::default()).unwrap();
        assert_eq!(e.config, file());
        assert_eq!(e.layers, [Layer::File; 4]);
        assert!(e.removed.is_empty() && e.stale_removals.is_empty());
    }

    #[test]
    fn the_overlay_takes_precedence_and_new_policies_come_after_the_file() {
        let mut o = Overlay::default();
        o.set_default(limit(50, "1m"));
        o.set_policy(&m("10.0.0.0/8"), limit(7, "10ms"));
        o.set_policy(&m("2001:db8::/32"), limit(1, "1h"));
        o.set_policy(&m("tenant-new"), pass());
        o.remove_policy(&m("192.0.2.7"), &file()).unwrap();
        let e = merge(FILE, &o).unwrap();
        let c = &e.config;
        assert_eq!(c.default, limit(50, "1m"));
        let order: Vec<String> = c.policies.iter().map(|(p, _)| p.to_string()).collect();
        assert_eq!(
            order,
            ["10.0.0.0/8", "tenant-gold", "2001:db8::/32", "tenant-new"]
        );
        assert_eq!(policy(c, "10.0.0.0/8"), Some(limit(7, "10ms")));
        assert_eq!(policy(c, "tenant-gold"), Some(limit(9, "2s")));
        assert_eq!(policy(c, "tenant-new"), Some(pass()));
        assert_eq!(policy(c, "192.0.2.7"), None);
        assert_eq!(
            e.layers,
            [
                Layer::OverlayOverridesFile,
                Layer::OverlayOverridesFile,
                Layer::File,
                Layer::Overlay,
                Layer::Overlay
            ]
        );
        assert_eq!(e.layer_of(&m("tenant-gold")), Some(Layer::File));
        assert_eq!(e.layer_of(&m("192.0.2.7")), None);
        assert_eq!(e.removed, [(m("192.0.2.7"), pass())]);
        // The file's weights stay with an overridden policy (an API edit of the file kept them);
        // a new policy has the default weight.
        assert_eq!(c.weights, [2.0, 3.0, 1.0, 1.0, 1.0]);
        // `mode` and `adaptive` are the file's.
        assert_eq!(c.mode, file().mode);
        assert_eq!(c.adaptive, file().adaptive);
        assert!(c.adaptive.enabled);
        // The rendered config reads back into the same config.
        assert_eq!(Config::parse(&e.yaml).unwrap(), e.config);
    }

    #[test]
    fn an_overlay_weight_replaces_the_files() {
        let text = "version: 1\ndefault: { limit: 5, window: 1s, weight: 0.5 }\npolicies:\n  - { match: 10.0.0.0/8, limit: 1, window: 1s, weight: 4 }\n";
        let o = Overlay::parse(text, &path()).unwrap();
        let e = merge(FILE, &o).unwrap();
        assert_eq!(e.config.weights, [0.5, 4.0, 1.0, 1.0]);
        // Setting through the API keeps the entry's weight.
        let mut o = o;
        o.set_policy(&m("10.0.0.0/8"), pass());
        o.set_default(limit(6, "1s"));
        assert_eq!(
            merge(FILE, &o).unwrap().config.weights,
            [0.5, 4.0, 1.0, 1.0]
        );
    }

    #[test]
    fn rm_of_an_overlay_entry_restores_the_files_policy_then_removes_it() {
        let f = file();
        let mut o = Overlay::default();
        let gold = m("tenant-gold");
        o.set_policy(&gold, limit(1, "1s"));
        assert_eq!(
            policy(&merge(FILE, &o).unwrap().config, "tenant-gold"),
            Some(limit(1, "1s"))
        );
        // First rm: the API's entry goes, the file's policy is back, from the file.
        assert_eq!(
            o.remove_policy(&gold, &f).unwrap(),
            Removal::RestoredFile(limit(9, "2s"))
        );
        assert!(o.is_empty());
        let e = merge(FILE, &o).unwrap();
        assert_eq!(policy(&e.config, "tenant-gold"), Some(limit(9, "2s")));
        assert_eq!(e.layer_of(&gold), Some(Layer::File));
        // Second rm: a tombstone removes the file's policy without touching the file.
        assert_eq!(
            o.remove_policy(&gold, &f).unwrap(),
            Removal::Tombstoned(limit(9, "2s"))
        );
        let e = merge(FILE, &o).unwrap();
        assert_eq!(policy(&e.config, "tenant-gold"), None);
        assert_eq!(e.removed, [(gold.clone(), limit(9, "2s"))]);
        // Third: nothing left to remove.
        let err = o.remove_policy(&gold, &f).unwrap_err();
        assert_eq!(err.to_string(), "no policy matches tenant-gold");
        // `set` after a removal drops the tombstone.
        o.set_policy(&gold, limit(3, "1s"));
        assert!(o.removed.is_empty());
        let e = merge(FILE, &o).unwrap();
        assert_eq!(policy(&e.config, "tenant-gold"), Some(limit(3, "1s")));
        assert_eq!(e.layer_of(&gold), Some(Layer::OverlayOverridesFile));
        // An overlay-only policy: rm removes it, a second rm finds nothing.
        let new = m("198.51.100.0/24");
        o.set_policy(&new, limit(2, "1s"));
        assert_eq!(
            o.remove_policy(&new, &f).unwrap(),
            Removal::Removed(limit(2, "1s"))
        );
        assert!(matches!(
            o.remove_policy(&new, &f),
            Err(OverlayError::NotFound(_))
        ));
        assert!(matches!(
            o.remove_policy(&m("203.0.113.0/24"), &f),
            Err(OverlayError::NotFound(_))
        ));
    }

    #[test]
    fn unsetting_the_default_restores_the_files() {
        let mut o = Overlay::default();
        assert!(!o.unset_default());
        o.set_default(pass());
        assert_eq!(merge(FILE, &o).unwrap().config.default, pass());
        assert!(o.unset_default());
        let e = merge(FILE, &o).unwrap();
        assert_eq!(e.config.default, limit(1000, "1s"));
        assert_eq!(e.layer(0), Layer::File);
    }

    #[test]
    fn tombstones_of_policies_the_file_dropped_are_inert_and_pruned() {
        let mut o = Overlay::default();
        o.remove_policy(&m("192.0.2.7"), &file()).unwrap();
        o.remove_policy(&m("tenant-gold"), &file()).unwrap();
        // The operator drops 192.0.2.7 from the file.
        let edited = FILE.replace("  - { match: 192.0.2.7, action: pass }\n", "");
        let e = merge(&edited, &o).unwrap();
        assert_eq!(e.stale_removals, [m("192.0.2.7")]);
        assert_eq!(e.removed.len(), 1);
        let stale = o.prune(&Config::parse(&edited).unwrap());
        assert_eq!(stale, [m("192.0.2.7")]);
        assert_eq!(o.removed, [m("tenant-gold")]);
        // Written again later, it is in force.
        let e = merge(FILE, &o).unwrap();
        assert_eq!(policy(&e.config, "192.0.2.7"), Some(pass()));
    }

    #[test]
    fn the_overlay_round_trips_through_its_text() {
        let mut o = Overlay::default();
        o.set_default(limit(4_294_967_295, "1h"));
        o.set_policy(&m("10.0.0.0/8"), limit(0, "10ms"));
        o.set_policy(&m("2001:db8::1"), pass());
        o.set_policy(&m("12345"), limit(1, "1500ms"));
        o.set_policy(
            &m("api key #7: \"x\""),
            Config::parse("default: { action: drop }\n")
                .unwrap()
                .default,
        );
        o.policies[0].1.weight = Some(2.5);
        o.removed.push(m("192.0.2.7"));
        let text = o.to_yaml();
        assert!(text.contains("version: 1"), "{text}");
        assert_eq!(Overlay::parse(&text, &path()).unwrap(), o);
        assert_eq!(
            Overlay::parse(&Overlay::default().to_yaml(), &path()).unwrap(),
            Overlay::default()
        );
    }

    fn corrupt(text: &str) -> String {
        let e = Overlay::parse(text, &path()).unwrap_err();
        assert!(matches!(e, OverlayError::Corrupt { .. }), "{e:?}");
        let e = e.to_string();
        assert!(
            e.starts_with("the policy overlay /var/lib/limiter/eth0.overlay.yaml is corrupt: "),
            "{e}"
        );
        e
    }

    #[test]
    fn a_newer_version_is_refused_as_such() {
        let e = Overlay::parse("version: 2\nsomething_new: [1]\n", &path()).unwrap_err();
        assert!(
            matches!(e, OverlayError::FutureVersion { found: 2, .. }),
            "{e:?}"
        );
        let e = e.to_string();
        assert!(
            e.contains("/var/lib/limiter/eth0.overlay.yaml has version 2")
                && e.contains("reads version 1"),
            "{e}"
        );
        assert!(corrupt("version: 0\n").contains("`version` must be 1, got 0"));
        assert!(corrupt("version: one\n").contains("`version` must be 1, got one"));
        assert!(corrupt("version: -3\n").contains("`version` must be 1"));
        assert!(corrupt("policies: []\n").contains("no `version` field"));
    }

    #[test]
    fn a_corrupt_overlay_is_refused_with_the_problem() {
        let cases = [
            ("", "the file is empty"),
            ("  \n", "the file is empty"),
            ("version: 1\npolicies: [\n", "line"),
            ("[1, 2]\n", "invalid type"),
            ("version: 1\npolices: []\n", "unknown field `polices`"),
            (
                "version: 1\npolicies:\n  - { match: 10.0.0.0/8, limit: 1, window: 2h }\n",
                "out of range",
            ),
            (
                "version: 1\npolicies:\n  - { match: 10.0.0.1/8, limit: 1, window: 1s }\n",
                "did you mean 10.0.0.0/8",
            ),
            (
                "version: 1\npolicies:\n  - { match: 10.0.0.0/8, action: pass, limit: 3 }\n",
                "policies[0] (match 10.0.0.0/8): `action: pass` is never limited",
            ),
            (
                "version: 1\npolicies:\n  - { match: t, limit: 1, window: 1s }\n  - { match: t, action: drop }\n",
                "policies[1] (match t): duplicate match",
            ),
            (
                "version: 1\npolicies:\n  - { match: t, limit: 1, window: 1s, weight: 0 }\n",
                "policies[0] (match t): `weight` must be a positive finite number",
            ),
            (
                "version: 1\ndefault: { limit: 1 }\n",
                "default: `window` is required",
            ),
            (
                "version: 1\npolicies:\n  - { match: t, action: pass }\nremoved: [t]\n",
                "removed[0] (t): also set under `policies`",
            ),
            (
                "version: 1\nremoved: [t, t]\n",
                "removed[1] (t): listed twice",
            ),
        ];
        for (text, want) in cases {
            let e = corrupt(text);
            assert!(e.contains(want), "{text:?}: {want:?} not in {e}");
        }
    }

    fn scratch(name: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!(
            "limiter-overlay-{name}-{}-{:?}",
            std::process::id(),
            std::thread::current().id()
        ));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }

    #[test]
    fn load_and_store_under_the_state_dir() {
        let dir = scratch("store");
        let path = overlay_path(&dir.join("state"), "eth0");
        assert!(path.ends_with("state/eth0.overlay.yaml"));
        // None yet: empty.
        assert_eq!(Overlay::load(&path).unwrap(), Overlay::default());
        let mut o = Overlay::default();
        o.set_policy(&m("10.0.0.0/8"), limit(1, "1s"));
        o.removed.push(m("tenant-gold"));
        o.store(&path).unwrap();
        assert_eq!(Overlay::load(&path).unwrap(), o);
        let mode = std::fs::metadata(&path).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
        // Replaced whole, nothing else left in the directory.
        o.set_default(pass());
        o.store(&path).unwrap();
        assert_eq!(Overlay::load(&path).unwrap(), o);
        let names: Vec<_> = std::fs::read_dir(path.parent().unwrap())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names, ["eth0.overlay.yaml"]);
        // Not text, and not readable as a file: errors naming the file.
        std::fs::write(&path, b"version: 1\n\xff\n").unwrap();
        let e = Overlay::load(&path).unwrap_err().to_string();
        assert!(e.contains("eth0.overlay.yaml is corrupt: not UTF-8"), "{e}");
        std::fs::remove_file(&path).unwrap();
        std::fs::create_dir(&path).unwrap();
        let e = Overlay::load(&path).unwrap_err();
        assert!(matches!(e, OverlayError::Read { .. }), "{e:?}");
        assert!(e.to_string().contains("eth0.overlay.yaml"), "{e}");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn an_invalid_file_or_merge_is_an_error() {
        let e = merge("default: { limit: 1 }\n", &Overlay::default()).unwrap_err();
        assert!(matches!(e, MergeError::File(_)), "{e:?}");
        let shown = crate::error_chain(&e);
        assert!(shown.contains("`window` is required"), "{shown}");
        // The file at the most policies there may be, and the overlay adds one.
        let mut text = String::from("default: { limit: 1, window: 1s }\npolicies:\n");
        for i in 0..config::MAX_POLICIES {
            text.push_str(&format!("  - {{ match: id-{i}, action: pass }}\n"));
        }
        let mut o = Overlay::default();
        assert!(merge(&text, &o).is_ok());
        o.set_policy(&m("one-more"), pass());
        let e = merge(&text, &o).unwrap_err();
        assert!(
            matches!(e, MergeError::Effective(PolicyError::TooMany { .. })),
            "{e:?}"
        );
        // Replacing one of them is fine.
        let mut o = Overlay::default();
        o.set_policy(&m("id-7"), limit(1, "1s"));
        assert_eq!(
            merge(&text, &o).unwrap().layer(8),
            Layer::OverlayOverridesFile
        );
    }

    #[test]
    fn the_rendered_config_says_where_things_come_from_and_parses_back() {
        let paths = (Path::new("/etc/limiter.yaml"), path());
        let e = merge(FILE, &Overlay::default()).unwrap();
        let text = e.render(paths.0, &paths.1);
        assert!(text.contains("The overlay changes nothing"), "{text}");
        assert_eq!(Config::parse(&text).unwrap(), file());
        let mut o = Overlay::default();
        o.set_policy(&m("tenant-gold"), pass());
        o.set_policy(&m("tenant-new"), pass());
        o.remove_policy(&m("192.0.2.7"), &file()).unwrap();
        let e = merge(FILE, &o).unwrap();
        let text = e.render(paths.0, &paths.1);
        assert!(
            text.contains("/etc/limiter.yaml with the policy overlay /var/lib/limiter/eth0.overlay.yaml")
                && text.contains(
                    "# Set through the API: tenant-gold (overlay (overrides file)), tenant-new (overlay)."
                )
                && text.contains("# Removed through the API (not below): 192.0.2.7."),
            "{text}"
        );
        assert_eq!(Config::parse(&text).unwrap(), e.config);
        // Folding: the rendered config as the file, and an empty overlay, is the same config.
        assert_eq!(merge(&text, &Overlay::default()).unwrap().config, e.config);
    }

    // Property: for any file and any sequence of API changes, the merge follows the precedence,
    // its YAML parses back into the same config, and the overlay's text into the same overlay.

    fn resolved() -> impl Strategy<Value = Resolved> {
        prop_oneof![
            (any::<u32>(), MIN_WINDOW..=MAX_WINDOW).prop_map(|(limit, micros)| Resolved {
                action: Action::Limit,
                limit,
                window: Window { micros },
            }),
            Just(pass()),
            Just(
                Config::parse("default: { action: drop }\n")
                    .unwrap()
                    .default
            ),
        ]
    }

    const MIN_WINDOW: u32 = limiter_common::window::MIN_WINDOW_US;
    const MAX_WINDOW: u32 = limiter_common::window::MAX_WINDOW_US;

    /// Matches: a few addresses and prefixes, and IDs of any printable text (quoting).
    fn matches() -> impl Strategy<Value = Vec<Match>> {
        let fixed = [
            "10.0.0.0/8",
            "10.1.0.0/16",
            "192.0.2.7",
            "2001:db8::/32",
            "::1",
        ];
        prop::collection::vec("[ -~]{1,12}", 0..6).prop_map(move |ids| {
            let mut all: Vec<Match> = fixed.iter().map(|s| m(s)).collect();
            for id in ids {
                if let Ok(id @ Match::Id(_)) = id.parse::<Match>()
                    && !all.contains(&id)
                {
                    all.push(id);
                }
            }
            all
        })
    }

    #[derive(Debug, Clone)]
    enum Op {
        Set(usize, Resolved),
        SetDefault(Resolved),
        Remove(usize),
        UnsetDefault,
    }

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            (any::<usize>(), resolved()).prop_map(|(i, r)| Op::Set(i, r)),
            resolved().prop_map(Op::SetDefault),
            any::<usize>().prop_map(Op::Remove),
            Just(Op::UnsetDefault),
        ]
    }

    proptest! {
        #[test]
        fn merge_follows_the_precedence_and_round_trips(
            pool in matches(),
            in_file in prop::collection::vec(any::<bool>(), 16),
            file_limits in prop::collection::vec(resolved(), 17),
            weights in prop::collection::vec(prop::option::of(1u32..100), 17),
            ops in prop::collection::vec(op(), 0..24),
            dry_run in any::<bool>(),
        ) {
            // The file: a default, and some of the pool.
            let mut file = Mapping::new();
            if dry_run {
                file.insert("mode".into(), "dry-run".into());
            }
            let w = |i: usize| weights[i].map(|w| Value::from(f64::from(w) / 4.0));
            file.insert("default".into(), entry_value(None, &file_limits[16].into(), w(16).as_ref()));
            let file_policies: Vec<Value> = pool
                .iter()
                .enumerate()
                .filter(|(i, _)| in_file[*i])
                .map(|(i, p)| entry_value(Some(p), &file_limits[i].into(), w(i).as_ref()))
                .collect();
            file.insert("policies".into(), Value::Sequence(file_policies));
            let text = format!("# a comment\n{}", serde_yaml::to_string(&file).unwrap());
            let file_config = Config::parse(&text).unwrap();

            let mut o = Overlay::default();
            for op in &ops {
                match op {
                    Op::Set(i, r) => o.set_policy(&pool[i % pool.len()], *r),
                    Op::SetDefault(r) => o.set_default(*r),
                    Op::Remove(i) => {
                        let _ = o.remove_policy(&pool[i % pool.len()], &file_config);
                    }
                    Op::UnsetDefault => {
                        o.unset_default();
                    }
                }
            }
            prop_assert_eq!(Overlay::parse(&o.to_yaml(), &path()).unwrap(), o.clone());

            let e = merge(&text, &o).unwrap();
            prop_assert_eq!(Config::parse(&e.yaml).unwrap(), e.config.clone());
            prop_assert_eq!(e.config.mode, file_config.mode);
            prop_assert_eq!(e.layers.len(), e.config.policies.len() + 1);
            prop_assert_eq!(e.config.default, o.default.map_or(file_config.default, |d| d.limit));
            for p in &pool {
                let in_overlay = o.policies.iter().find(|(q, _)| q == p).map(|(_, e)| e.limit);
                let in_file = policy_of(&file_config, p);
                let want = match (in_overlay, o.removed.contains(p)) {
                    (Some(r), _) => Some(r),
                    (None, true) => None,
                    (None, false) => in_file,
                };
                prop_assert_eq!(policy_of(&e.config, p), want, "{}", p);
                let layer = match (in_overlay.is_some(), in_file.is_some()) {
                    (true, true) => Some(Layer::OverlayOverridesFile),
                    (true, false) => Some(Layer::Overlay),
                    (false, _) => want.map(|_| Layer::File),
                };
                prop_assert_eq!(e.layer_of(p), layer, "{}", p);
            }
        }
    }

    fn policy_of(c: &Config, p: &Match) -> Option<Resolved> {
        c.policies.iter().find(|(q, _)| q == p).map(|(_, r)| *r)
    }
}
