//! The policies in force, and every way they change: the config file (watched) and the API.
//!
//! One lock serialises changes. An API change is made on the file's text (keeping its comments
//! and order), validated by parsing that text exactly as a reload would, applied to the maps,
//! and only then written back atomically; the watcher records the written text as applied, so it
//! never re-applies it as a change of its own. If writing fails, the maps go back to the config
//! in force before, so the file and the maps never disagree.

use std::{
    hash::{DefaultHasher, Hash, Hasher},
    path::PathBuf,
    sync::{Arc, Mutex, MutexGuard},
};

use tokio::sync::broadcast;

use crate::{
    check::Checker,
    config::edit::{self as config_edit, RuleText},
    config::{Action, Config, Match, PolicyError, Resolved},
    datapath::{DatapathError, Tables},
    metrics::Counters,
};

/// Changes a slow `Watch` subscriber may fall behind by before it is told it lagged.
const CHANGE_BUFFER: usize = 1024;

#[derive(Debug, thiserror::Error)]
pub enum LimitsError {
    #[error("no policy matches {0}")]
    NotFound(String),
    #[error("the default policy cannot be removed; set it instead")]
    DeleteDefault,
    #[error("{0}")]
    Invalid(PolicyError),
    #[error("the config file {path} is itself invalid, so it cannot be edited: {error}")]
    FileInvalid { path: PathBuf, error: PolicyError },
    #[error("reading the config file {path}: {error}")]
    Read {
        path: PathBuf,
        error: std::io::Error,
    },
    #[error("editing the config file {path}: {error}")]
    Edit {
        path: PathBuf,
        error: config_edit::EditError,
    },
    #[error("writing the config file {path} (the change was not applied): {error}")]
    Write {
        path: PathBuf,
        error: std::io::Error,
    },
    #[error("applying the policies to the maps: {0}")]
    Apply(#[from] DatapathError),
}

/// What a policy is keyed by: the default, or a `match`.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Selector {
    Default,
    Match(Match),
}

impl std::str::FromStr for Selector {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        if s.trim() == "default" {
            Ok(Selector::Default)
        } else {
            s.parse().map(Selector::Match)
        }
    }
}

impl std::fmt::Display for Selector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Selector::Default => f.write_str("default"),
            Selector::Match(m) => m.fmt(f),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ChangeKind {
    Set,
    Deleted,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Source {
    Api,
    File,
}

impl Source {
    pub fn as_str(self) -> &'static str {
        match self {
            Source::Api => "api",
            Source::File => "file",
        }
    }
}

/// One policy created, replaced or removed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Change {
    pub kind: ChangeKind,
    pub selector: Selector,
    /// The policy as it is now (for `Deleted`: as it was).
    pub limit: Resolved,
    pub generation: u32,
    pub source: Source,
}

struct Inner {
    tables: Tables,
    path: PathBuf,
    config: Config,
    /// Hash of the file text last applied (or rejected), so it is not parsed again.
    seen_hash: Option<u64>,
    /// The file could not be read at the last check (reported once per outage).
    unreadable: bool,
}

/// The live policies (see the module docs).
pub struct PolicyStore {
    inner: Mutex<Inner>,
    checker: Arc<Checker>,
    counters: Arc<Counters>,
    changes: broadcast::Sender<Change>,
}

fn hash(text: &str) -> u64 {
    let mut h = DefaultHasher::new();
    text.hash(&mut h);
    h.finish()
}

impl PolicyStore {
    /// `config` has been applied to `tables` from the file's `text`.
    pub fn new(
        tables: Tables,
        path: PathBuf,
        config: Config,
        text: &str,
        checker: Arc<Checker>,
        counters: Arc<Counters>,
    ) -> PolicyStore {
        PolicyStore {
            inner: Mutex::new(Inner {
                tables,
                path,
                config,
                seen_hash: Some(hash(text)),
                unreadable: false,
            }),
            checker,
            counters,
            changes: broadcast::channel(CHANGE_BUFFER).0,
        }
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub fn subscribe(&self) -> broadcast::Receiver<Change> {
        self.changes.subscribe()
    }

    /// Runs `f` on the maps (under the lock: keep it short).
    pub fn with_tables<R>(&self, f: impl FnOnce(&Tables) -> R) -> R {
        f(&self.lock().tables)
    }

    /// Runs `f` on the config in force and the policy generation of the maps, read under one
    /// lock so that they belong together.
    pub fn with_policies<R>(
        &self,
        f: impl FnOnce(&Config, u32) -> R,
    ) -> Result<R, crate::datapath::DatapathError> {
        let inner = self.lock();
        let generation = inner.tables.map_config()?.generation;
        Ok(f(&inner.config, generation))
    }

    /// The config in force.
    pub fn config(&self) -> Config {
        self.lock().config.clone()
    }

    /// Applies the config file if it changed since it was last seen; `force` re-reads it even if
    /// not (SIGHUP). Errors are logged and counted; the policies in force stay.
    pub fn reload_file(&self, force: bool) {
        let mut inner = self.lock();
        if force {
            inner.seen_hash = None;
        }
        let text = match std::fs::read_to_string(&inner.path) {
            Ok(text) => {
                inner.unreadable = false;
                text
            }
            Err(_) if inner.unreadable => return,
            Err(e) => {
                inner.unreadable = true;
                tracing::warn!(
                    "reading config {}: {e}; the policies in force stay in force",
                    inner.path.display()
                );
                return;
            }
        };
        let h = hash(&text);
        if inner.seen_hash == Some(h) {
            return;
        }
        inner.seen_hash = Some(h);
        let config = match Config::parse(&text) {
            Ok(config) => config,
            Err(e) => {
                self.counters.config_rejects.inc();
                tracing::error!(
                    "config {} rejected: {e}; the policies in force stay in force",
                    inner.path.display()
                );
                return;
            }
        };
        match self.install(&mut inner, config, None) {
            Ok(changes) => {
                self.counters.config_reloads.inc();
                tracing::info!(
                    changes = changes.len(),
                    "config reloaded from {}",
                    inner.path.display()
                );
            }
            Err(e) => {
                self.counters.config_rejects.inc();
                tracing::error!("applying {}: {e}", inner.path.display());
            }
        }
    }

    /// Applies `config` to the maps and the checker, and announces the differences: the change
    /// to `api` (the policy an API call edited) as the API's, any other as the file's (an edit
    /// of the file the watcher had not applied yet). If the maps cannot take it, the config in
    /// force before is written back (a failed apply can stop halfway).
    fn install(
        &self,
        inner: &mut Inner,
        config: Config,
        api: Option<&Selector>,
    ) -> Result<Vec<Change>, DatapathError> {
        let report = match inner.tables.apply(&config) {
            Ok(report) => report,
            Err(e) => {
                if let Err(restore) = inner.tables.apply(&inner.config) {
                    tracing::error!(
                        "restoring the policies in force after a failed apply: {restore}"
                    );
                }
                return Err(e);
            }
        };
        self.checker.set_config(&config);
        let mut changes = diff(&inner.config, &config, report.generation, Source::File);
        for change in &mut changes {
            if api == Some(&change.selector) {
                change.source = Source::Api;
            }
        }
        inner.config = config;
        for change in &changes {
            // No subscribers is fine.
            let _ = self.changes.send(change.clone());
        }
        Ok(changes)
    }

    /// Creates or replaces a policy (the default with `Selector::Default`).
    pub fn set(&self, selector: &Selector, limit: Resolved) -> Result<Change, LimitsError> {
        let rule = rule_text(selector, &limit);
        let change = self.edit(selector, |text, path| {
            match selector {
                Selector::Default => config_edit::set_default(text, &rule),
                Selector::Match(_) => config_edit::upsert_policy(text, &rule),
            }
            .map_err(|error| LimitsError::Edit {
                path: path.into(),
                error,
            })
        })?;
        Ok(change.unwrap_or(Change {
            // Setting what is already in force changes nothing; report it as set.
            kind: ChangeKind::Set,
            selector: selector.clone(),
            limit,
            generation: self.with_tables(|t| t.map_config().map(|c| c.generation).unwrap_or(0)),
            source: Source::Api,
        }))
    }

    /// Removes a policy.
    pub fn delete(&self, m: &Match) -> Result<Change, LimitsError> {
        let before = self.get(&Selector::Match(m.clone()));
        let Some(before) = before else {
            return Err(LimitsError::NotFound(m.to_string()));
        };
        let selector = Selector::Match(m.clone());
        let change = self.edit(&selector, |text, path| {
            config_edit::remove_policy(text, &m.to_string())
                .map_err(|error| LimitsError::Edit {
                    path: path.into(),
                    error,
                })?
                .ok_or_else(|| LimitsError::NotFound(m.to_string()))
        })?;
        Ok(change.unwrap_or(Change {
            kind: ChangeKind::Deleted,
            selector: Selector::Match(m.clone()),
            limit: before,
            generation: 0,
            source: Source::Api,
        }))
    }

    /// The edit-validate-apply-write sequence shared by `set` and `delete`. `edit` returns the
    /// new text. Returns the change to the edited policy, if the maps changed.
    fn edit(
        &self,
        selector: &Selector,
        edit: impl FnOnce(&str, &std::path::Path) -> Result<String, LimitsError>,
    ) -> Result<Option<Change>, LimitsError> {
        let mut inner = self.lock();
        let path = inner.path.clone();
        let text = std::fs::read_to_string(&path).map_err(|error| LimitsError::Read {
            path: path.clone(),
            error,
        })?;
        // The file as it is now must be valid: an edit never carries a broken file forward.
        let on_disk = Config::parse(&text).map_err(|error| LimitsError::FileInvalid {
            path: path.clone(),
            error,
        })?;
        let new_text = edit(&text, &path)?;
        let config = Config::parse(&new_text).map_err(LimitsError::Invalid)?;
        if on_disk != inner.config {
            // A file change the watcher has not applied yet goes in with this one.
            tracing::info!(
                "applying a pending edit of {} with the API change",
                path.display()
            );
        }
        let previous = inner.config.clone();
        let changes = self.install(&mut inner, config, Some(selector))?;
        if let Err(error) = config_edit::write_atomic(&path, &new_text) {
            // Put the maps back so that file and maps agree; the change is reported as failed.
            if let Err(e) = self.install(&mut inner, previous, None) {
                tracing::error!("restoring the policies after a failed write: {e}");
            }
            return Err(LimitsError::Write { path, error });
        }
        inner.seen_hash = Some(hash(&new_text));
        self.counters.api_limit_changes.inc();
        Ok(changes.into_iter().find(|c| c.selector == *selector))
    }

    /// The policy for `selector`, if there is one.
    pub fn get(&self, selector: &Selector) -> Option<Resolved> {
        let inner = self.lock();
        match selector {
            Selector::Default => Some(inner.config.default),
            Selector::Match(m) => inner
                .config
                .policies
                .iter()
                .find(|(p, _)| p == m)
                .map(|(_, r)| *r),
        }
    }

    /// The default, then the policies in file order.
    pub fn list(&self) -> Vec<(Selector, Resolved)> {
        let inner = self.lock();
        std::iter::once((Selector::Default, inner.config.default))
            .chain(
                inner
                    .config
                    .policies
                    .iter()
                    .map(|(m, r)| (Selector::Match(m.clone()), *r)),
            )
            .collect()
    }
}

/// How a policy is written in the file.
pub fn rule_text(selector: &Selector, limit: &Resolved) -> RuleText {
    let (count, window, action) = match limit.action {
        Action::Limit => (Some(limit.limit), Some(limit.window.to_string()), None),
        Action::Pass => (None, None, Some("pass".to_string())),
        Action::Drop => (None, None, Some("drop".to_string())),
    };
    RuleText {
        matches: selector.to_string(),
        limit: count,
        window,
        action,
    }
}

/// The policy changes from `old` to `new`: the default if it changed, then every policy set or
/// replaced (in `new`'s order), then every one removed.
pub fn diff(old: &Config, new: &Config, generation: u32, source: Source) -> Vec<Change> {
    let mut out = Vec::new();
    let change = |kind, selector, limit| Change {
        kind,
        selector,
        limit,
        generation,
        source,
    };
    if old.default != new.default {
        out.push(change(ChangeKind::Set, Selector::Default, new.default));
    }
    for (m, r) in &new.policies {
        if !old.policies.iter().any(|(om, or)| om == m && or == r) {
            out.push(change(ChangeKind::Set, Selector::Match(m.clone()), *r));
        }
    }
    for (m, r) in &old.policies {
        if !new.policies.iter().any(|(nm, _)| nm == m) {
            out.push(change(ChangeKind::Deleted, Selector::Match(m.clone()), *r));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(yaml: &str) -> Config {
        Config::parse(yaml).expect("valid config")
    }

    fn described(changes: &[Change]) -> Vec<(ChangeKind, String, u32)> {
        changes
            .iter()
            .map(|c| (c.kind, c.selector.to_string(), c.limit.limit))
            .collect()
    }

    #[test]
    fn diff_lists_the_default_then_sets_then_removals() {
        let old = config(
            "default: { limit: 10, window: 1s }\npolicies:\n  - { match: 10.0.0.0/8, limit: 1, window: 1s }\n  - { match: tenant-a, limit: 2, window: 1s }\n  - { match: 192.0.2.1, limit: 3, window: 1s }\n",
        );
        let new = config(
            "default: { limit: 20, window: 1s }\npolicies:\n  - { match: 192.0.2.1, limit: 3, window: 1s }\n  - { match: tenant-a, limit: 5, window: 1s }\n  - { match: tenant-b, limit: 6, window: 1s }\n",
        );
        let changes = diff(&old, &new, 7, Source::File);
        assert_eq!(
            described(&changes),
            [
                (ChangeKind::Set, "default".into(), 20),
                (ChangeKind::Set, "tenant-a".into(), 5),
                (ChangeKind::Set, "tenant-b".into(), 6),
                // A removed policy is reported as it was.
                (ChangeKind::Deleted, "10.0.0.0/8".into(), 1),
            ]
        );
        assert!(
            changes
                .iter()
                .all(|c| c.generation == 7 && c.source == Source::File)
        );
    }

    #[test]
    fn diff_of_equal_configs_is_empty_and_reordering_is_no_change() {
        let a = config(
            "default: { limit: 10, window: 1s }\npolicies:\n  - { match: 10.0.0.0/8, limit: 1, window: 1s }\n  - { match: tenant-a, action: pass }\n",
        );
        let b = config(
            "default: { limit: 10, window: 1s }\npolicies:\n  - { match: tenant-a, action: pass }\n  - { match: 10.0.0.0/8, limit: 1, window: 1s }\n",
        );
        assert!(diff(&a, &a, 1, Source::Api).is_empty());
        assert!(diff(&a, &b, 1, Source::Api).is_empty());
        // A changed window alone is a change.
        let c = config(
            "default: { limit: 10, window: 2s }\npolicies:\n  - { match: 10.0.0.0/8, limit: 1, window: 1s }\n  - { match: tenant-a, action: pass }\n",
        );
        assert_eq!(
            described(&diff(&a, &c, 1, Source::Api)),
            [(ChangeKind::Set, "default".into(), 10)]
        );
    }
}
