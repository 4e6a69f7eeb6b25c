//! The policies in force, and every way they change: the config file (watched, never written)
//! and the API, whose changes live in the policy overlay the agent owns under `--state-dir`
//! (see [`crate::config::overlay`] for the precedence).
//!
//! One lock serialises changes (`writer`); another (`inner`), which stats, metrics and snapshots
//! take too, is held only to read the state and to write the maps and swap the state in: the new
//! config, its map entries and its differences are made outside it, so a change of a large config
//! keeps them waiting only while the maps are written. An API change is made on a copy of the
//! overlay, merged over the config file's text in force, applied to the maps, and only then stored
//! atomically; if storing fails, the maps go back to the policies in force before, so the overlay
//! and the maps never disagree. An overlay that cannot be read (corrupt, or of a newer version)
//! leaves the file's policies (or, on a reload, the ones in force) in force, and API changes are
//! refused until it is fixed or removed and the agent reloaded (SIGHUP), so nothing in it is
//! overwritten. An overlay that does not fit over the file (say the file nears `MAX_POLICIES` and
//! the overlay adds more) leaves the file alone in force at start; on a reload the new file is
//! rejected whole, as an invalid file would be, and the policies in force stay.
//!
//! [`PolicyStore`] is the store, the lock around the maps and the file watcher's reload; what
//! a change is lives in `change`, and the policies an agent starts with in `loaded`.

mod change;
mod global;
mod loaded;
mod names;

use self::loaded::store_pruned;
pub use self::{
    change::{Change, ChangeKind, Selector, Source, diff},
    global::{policies_for_cluster, with_shares},
    loaded::Loaded,
    names::GlobalNames,
};

use std::{
    hash::{DefaultHasher, Hash, Hasher},
    path::PathBuf,
    sync::{Arc, Mutex, MutexGuard},
};

use tokio::sync::broadcast;

use crate::{
    capped_read::{self, CappedReadError},
    check::Checker,
    cluster::{ClusterPolicies, GlobalPolicy, WireNames, membership::ShareView},
    config::{
        Config, MAX_CONFIG_BYTES, PolicyError, Resolved, Scope,
        overlay::{self, Effective, Layer, MergeError, Overlay, OverlayError, Removal},
    },
    datapath::{DatapathError, Tables, TrieDiff},
    metrics::Counters,
};

/// `config`'s policy for `selector` and its scope (the default's is local), if it has one.
fn policy_in(config: &Config, selector: &Selector) -> Option<(Resolved, Scope)> {
    match selector {
        Selector::Default => Some((config.default, Scope::Local)),
        Selector::Match(m) => config
            .policies
            .iter()
            .position(|(p, _)| p == m)
            .map(|i| (config.policies[i].1, config.scope(i as u16 + 1))),
    }
}

/// Whether `file` has a policy for `selector`, and its scope (local if it has none: a policy
/// only the API sets is local).
fn file_scope(file: &Config, selector: &Selector) -> (bool, Scope) {
    policy_in(file, selector).map_or((false, Scope::Local), |(_, scope)| (true, scope))
}

/// Changes a slow `Watch` subscriber may fall behind by before it is told it lagged.
const CHANGE_BUFFER: usize = 1024;

#[derive(Debug, thiserror::Error)]
pub enum LimitsError {
    #[error("no policy matches {0}")]
    NotFound(String),
    #[error("the default policy cannot be removed (the API has not set one); set it instead")]
    DeleteDefault,
    #[error(transparent)]
    Invalid(PolicyError),
    /// The overlay on disk cannot be used; `error` is why, as it was found (at start or at the
    /// last SIGHUP), with its causes.
    #[error(
        "{error}; API changes are refused until it is fixed or removed and the agent reloaded (SIGHUP)"
    )]
    OverlayUnusable { error: String },
    #[error("the change was not applied")]
    Overlay(#[source] OverlayError),
    #[error("applying the policies to the maps")]
    Apply(#[from] DatapathError),
    /// A change that asks for another scope than the policy's: scope is the config file's.
    #[error(
        "policy.scope: {}; a policy's scope comes from the config file (`scope: global` on \
         it), and the API changes its limit, window and action only",
        match (in_file, scope) {
            (true, scope) => format!("the policy for {selector} is {} in the config file", scope.as_str()),
            (false, _) => format!("the policy for {selector} is local (the config file has none, and one the API sets is local)"),
        }
    )]
    Scope {
        selector: String,
        in_file: bool,
        scope: Scope,
    },
}

impl From<MergeError> for LimitsError {
    fn from(e: MergeError) -> LimitsError {
        match e {
            MergeError::File(e) | MergeError::Effective(e) => LimitsError::Invalid(e),
        }
    }
}

struct Inner {
    tables: Tables,
    path: PathBuf,
    /// The config file's text in force, and its policies.
    file_text: Arc<str>,
    file: Arc<Config>,
    overlay_path: PathBuf,
    /// The overlay in force.
    overlay: Overlay,
    /// Why the overlay on disk cannot be used (API changes are refused meanwhile).
    overlay_error: Option<String>,
    /// The policies in force: the file with the overlay merged over it.
    effective: Arc<Effective>,
    /// What the cluster's shares derive from now ([`ShareView::ALONE`] outside a cluster).
    share_view: ShareView,
    /// The global limits of Envoy's rate limit service's rules (`--rls-scope global`; see
    /// [`PolicyStore::set_service_global`]).
    service_global: Arc<[GlobalPolicy]>,
    /// What the maps and the checker hold: `effective` with each global limit replaced by this
    /// node's share of it.
    applied: Arc<Config>,
    /// Hash of the file text last applied (or rejected), so it is not parsed again.
    seen_hash: Option<u64>,
    /// The file could not be read at the last check (reported once per outage).
    unreadable: bool,
}

/// The live policies (see the module docs).
pub struct PolicyStore {
    inner: Mutex<Inner>,
    /// Held by every change (file reloads, API changes, shares) from start to end, so that the
    /// state read at its start is still the state in force when it is swapped in.
    writer: Mutex<()>,
    checker: Arc<Checker>,
    counters: Arc<Counters>,
    changes: broadcast::Sender<Change>,
    cluster: tokio::sync::watch::Sender<ClusterPolicies>,
    /// The names on the wire of the global policies the maps' ids stand for.
    names: Arc<GlobalNames>,
}

fn hash_of(value: &impl Hash) -> u64 {
    let mut h = DefaultHasher::new();
    value.hash(&mut h);
    h.finish()
}

/// Frees `value` on a thread of its own: the configs and trie entries a change replaces hold
/// tens of thousands of allocations with a large policy set, milliseconds to free that the
/// change (and an API caller waiting for it) need not wait for.
fn free_later<T: Send + 'static>(value: T) {
    // A thread that cannot be spawned leaves the value to be freed here.
    let _ = std::thread::Builder::new()
        .name("limiter-free".into())
        .spawn(move || drop(value));
}

fn hash(text: &str) -> u64 {
    hash_of(&text)
}

impl PolicyStore {
    /// `with_shares(&loaded.effective.config, &service_global, &share_view)` has been applied
    /// to `tables`; `path` is the config file.
    pub fn new(
        tables: Tables,
        path: PathBuf,
        loaded: Loaded,
        share_view: ShareView,
        service_global: Vec<GlobalPolicy>,
        checker: Arc<Checker>,
        counters: Arc<Counters>,
    ) -> PolicyStore {
        let applied = Arc::new(with_shares(
            &loaded.effective.config,
            &service_global,
            &share_view,
        ));
        let cluster = policies_for_cluster(&loaded.effective.config, &service_global);
        let names = Arc::new(GlobalNames::new(
            tables.map_config().map_or(0, |c| c.generation),
            Arc::new(WireNames::new(&cluster.global)),
        ));
        checker.set_share_view(share_view);
        PolicyStore {
            inner: Mutex::new(Inner {
                tables,
                path,
                seen_hash: Some(hash(&loaded.file_text)),
                file_text: Arc::from(loaded.file_text),
                file: Arc::new(loaded.file),
                overlay_path: loaded.overlay_path,
                overlay: loaded.overlay,
                overlay_error: loaded.overlay_error,
                effective: Arc::new(loaded.effective),
                share_view,
                service_global: service_global.into(),
                applied,
                unreadable: false,
            }),
            writer: Mutex::new(()),
            checker,
            counters,
            changes: broadcast::channel(CHANGE_BUFFER).0,
            cluster: tokio::sync::watch::Sender::new(cluster),
            names,
        }
    }

    /// The `cluster:` section and global policies in force, updated as they change.
    pub fn cluster_policies(&self) -> tokio::sync::watch::Receiver<ClusterPolicies> {
        self.cluster.subscribe()
    }

    /// The names on the wire of the global policies the maps' ids stand for, with the maps'
    /// generation (see [`GlobalNames`]): the cluster's members name policies by content, and a
    /// change may renumber ids.
    pub fn global_names(&self) -> Arc<GlobalNames> {
        self.names.clone()
    }

    /// The view the shares in force derive from.
    pub fn share_view(&self) -> ShareView {
        self.lock().share_view
    }

    /// Applies the shares `view` gives (the cluster's membership changed); nothing is written
    /// if no global policy's share changes. Returns false, writing nothing, when the config in
    /// force has no `cluster:` section (checked under the writer lock): a node stopped by a
    /// reload that removed it must not put its shares back after the agent's own. If the maps
    /// cannot take them, the shares before are written back and the error returned.
    pub fn set_share_view(&self, view: ShareView) -> Result<bool, DatapathError> {
        let _writer = self.writer();
        let (before, service, in_cluster) = {
            let inner = self.lock();
            (
                inner.share_view,
                inner.service_global.clone(),
                inner.effective.config.cluster.is_some(),
            )
        };
        if !in_cluster {
            return Ok(false);
        }
        if before == view {
            return Ok(true);
        }
        self.reshare(view, service, || {})?;
        Ok(true)
    }

    /// Applies the shares of an agent alone ([`ShareView::ALONE`]) if the config in force has
    /// no `cluster:` section, checked under the writer lock, so that a reload that adds one
    /// again meanwhile keeps the joining view it set; returns whether the view changed. If the
    /// maps cannot take the shares, those before are written back and the error returned.
    pub fn alone_without_cluster(&self) -> Result<bool, DatapathError> {
        let _writer = self.writer();
        let (view, service, in_cluster) = {
            let inner = self.lock();
            (
                inner.share_view,
                inner.service_global.clone(),
                inner.effective.config.cluster.is_some(),
            )
        };
        if in_cluster || view == ShareView::ALONE {
            return Ok(false);
        }
        self.reshare(ShareView::ALONE, service, || {})?;
        Ok(true)
    }

    /// Takes the global limits of Envoy's rate limit service's rules (`--rls-scope global`;
    /// at start and after each reload of its config): they join the checker's global limits
    /// (whose clients it notes hot) and the cluster's (which enrols those clients). Nothing is
    /// written if they did not change. If the maps cannot take them, those before are written
    /// back and the error returned.
    ///
    /// `install` puts the service's config that makes them in force. It runs once the maps
    /// hold them, inside the change of the policies the cluster watches (`GlobalNames`), and
    /// not at all if the maps refuse them: the policy ids the service's checks write are then
    /// never named under the names before, nor the ids before under the new names (a reload
    /// can renumber them).
    pub fn set_service_global(
        &self,
        service: Vec<GlobalPolicy>,
        install: impl FnOnce(),
    ) -> Result<(), DatapathError> {
        let _writer = self.writer();
        let (view, before) = {
            let inner = self.lock();
            (inner.share_view, inner.service_global.clone())
        };
        if *before == *service {
            // The same limits have the same ids.
            install();
            return Ok(());
        }
        self.reshare(view, service.into(), install)
    }

    /// Writes the config in force again with `view`'s shares and `service`'s global limits
    /// (called with the writer lock held, which keeps every other change out), and takes them
    /// in. The config and its trie entries are made outside the policy lock (stats, metrics and
    /// checks take it), which is held only to write the maps and swap. `installed` runs once the
    /// maps hold them, before the change is done (see [`PolicyStore::set_service_global`]).
    fn reshare(
        &self,
        view: ShareView,
        service: Arc<[GlobalPolicy]>,
        installed: impl FnOnce(),
    ) -> Result<(), DatapathError> {
        let (effective, in_force) = {
            let inner = self.lock();
            (inner.effective.clone(), inner.applied.clone())
        };
        let applied = with_shares(&effective.config, &service, &view);
        let cluster = policies_for_cluster(&effective.config, &service);
        let names = Arc::new(WireNames::new(&cluster.global));
        let changing = self.names.changing();
        if applied == *in_force {
            let generation = {
                let mut inner = self.lock();
                // Read first: a failed read changes nothing (the service's config is not
                // installed, and the limits are tried again at the next reload).
                let generation = inner.tables.map_config()?.generation;
                inner.share_view = view;
                inner.service_global = service;
                generation
            };
            // Out of the lock that stats and checks take.
            installed();
            changing.done(generation, names);
        } else {
            let applied = Arc::new(applied);
            let entries = applied.lpm_entries();
            let trie_diff = TrieDiff::between(self.lock().tables.trie_written(), &entries);
            let (replaced, generation) = {
                let mut inner = self.lock();
                let report = match inner.tables.apply_diff(&applied, entries, &trie_diff) {
                    Ok(report) => report,
                    Err(e) => {
                        match inner.tables.apply(&in_force) {
                            Ok(restored) => changing.restored(restored.generation),
                            Err(restore) => tracing::error!(
                                "restoring the shares in force after a failed apply: {restore}"
                            ),
                        }
                        return Err(e);
                    }
                };
                inner.share_view = view;
                inner.service_global = service;
                (
                    std::mem::replace(&mut inner.applied, applied.clone()),
                    report.generation,
                )
            };
            free_later((replaced, in_force, effective, trie_diff));
            self.checker.set_config(&applied);
            installed();
            // After the checker and the service: they write the ids of API IDs' and the
            // service's entries.
            changing.done(generation, names);
        }
        self.checker.set_share_view(view);
        self.publish_cluster(cluster);
        Ok(())
    }

    /// Hands `cluster` (the `cluster:` section, global limits and the policies nested in them in
    /// force) to the cluster's node, if it changed.
    fn publish_cluster(&self, cluster: ClusterPolicies) {
        self.cluster.send_if_modified(|c| {
            let changed = *c != cluster;
            *c = cluster;
            changed
        });
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn writer(&self) -> MutexGuard<'_, ()> {
        self.writer.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub fn subscribe(&self) -> broadcast::Receiver<Change> {
        self.changes.subscribe()
    }

    /// Runs `f` on the maps (under the lock: keep it short).
    pub fn with_tables<R>(&self, f: impl FnOnce(&Tables) -> R) -> R {
        f(&self.lock().tables)
    }

    /// Runs `f` on the config the maps enforce (global limits replaced by this node's shares)
    /// and the policy generation of the maps, read under one lock so that they belong together.
    pub fn with_policies<R>(&self, f: impl FnOnce(&Config, u32) -> R) -> Result<R, DatapathError> {
        let inner = self.lock();
        let generation = inner.tables.map_config()?.generation;
        Ok(f(&inner.applied, generation))
    }

    /// The config in force.
    pub fn config(&self) -> Config {
        let effective = self.lock().effective.clone();
        effective.config.clone()
    }

    /// The config in force as YAML, with a comment saying what comes from the overlay
    /// (`limiter limits effective`).
    pub fn effective_yaml(&self) -> String {
        let (effective, path, overlay_path, error) = {
            let inner = self.lock();
            (
                inner.effective.clone(),
                inner.path.clone(),
                inner.overlay_path.clone(),
                inner.overlay_error.clone(),
            )
        };
        // Written out of the lock: the text of a large config takes a while.
        let mut text = effective.render(&path, &overlay_path);
        if let Some(error) = error {
            text.insert_str(0, &format!("# NOT IN FORCE: {error}\n"));
        }
        text
    }

    /// Applies the config file if it changed since it was last seen; `force` (SIGHUP) re-reads
    /// it even if not, and re-reads the overlay too (so a fixed or removed overlay is taken up).
    /// Errors are logged and counted; the policies in force stay.
    pub fn reload_file(&self, force: bool) {
        let _writer = self.writer();
        let mut inner = self.lock();
        // The overlay read on SIGHUP is taken up only with the file it is merged over: until
        // then the one in force stays (and stays in step with the maps).
        let mut disk_overlay = None;
        if force {
            inner.seen_hash = None;
            // The state directory is checked again before the overlay in it is read: one made
            // writable by others since the start could hold a planted overlay.
            let trusted = match inner.overlay_path.parent() {
                Some(dir) => crate::trusted_dir::check(dir, crate::trusted_dir::DirKind::State)
                    .map_err(|e| crate::error_chain(&e)),
                None => Ok(()),
            };
            let read = match trusted {
                Ok(()) => Overlay::load(&inner.overlay_path).map_err(|e| crate::error_chain(&e)),
                Err(error) => Err(error),
            };
            match read {
                Ok(overlay) => disk_overlay = Some(overlay),
                Err(error) => {
                    tracing::error!(
                        "{error}; the overlay in force stays in force, and API changes are refused"
                    );
                    inner.overlay_error = Some(error);
                }
            }
        }
        // The file is read and parsed without the lock, which stats, metrics and snapshots
        // take too: a large file takes a while to parse.
        let (path, seen_hash) = (inner.path.clone(), inner.seen_hash);
        drop(inner);
        let read = capped_read::read_to_string(&path, MAX_CONFIG_BYTES, "config");
        let parsed = read.as_ref().ok().and_then(|text| {
            let h = hash(text);
            (seen_hash != Some(h)).then(|| (h, Config::parse(text)))
        });
        let mut inner = self.lock();
        let text = match read {
            Ok(text) => {
                inner.unreadable = false;
                text
            }
            Err(e) => {
                // Reported once per outage (and on every SIGHUP); a file over the size cap is
                // a rejected config, counted as such once.
                let first = !inner.unreadable;
                inner.unreadable = true;
                if first && matches!(e, CappedReadError::TooLarge { .. }) {
                    self.counters.config_rejects.inc();
                }
                if first || force {
                    tracing::error!(
                        "{}; the policies in force stay in force",
                        crate::error_chain(&e)
                    );
                }
                return;
            }
        };
        // Unchanged since it was last seen (or taken up meanwhile by another reload).
        let Some((h, parsed)) = parsed else {
            return;
        };
        if inner.seen_hash == Some(h) {
            return;
        }
        inner.seen_hash = Some(h);
        let file = match parsed {
            Ok(file) => file,
            Err(e) => {
                self.counters.config_rejects.inc();
                tracing::error!(
                    "config {} rejected: {e}; the policies in force stay in force",
                    inner.path.display()
                );
                return;
            }
        };
        // Removals of policies the file no longer has are dropped (see `Overlay::prune`).
        let taken_up = disk_overlay.is_some();
        let mut overlay = disk_overlay.unwrap_or_else(|| inner.overlay.clone());
        drop(inner);
        let stale = overlay.prune(&file);
        let text: Arc<str> = Arc::from(text);
        let effective = match overlay::merge_parsed(text.clone(), &file, &overlay) {
            Ok(effective) => effective,
            Err(e) => {
                self.counters.config_rejects.inc();
                tracing::error!(
                    "config {} rejected: {}; the policies in force stay in force",
                    path.display(),
                    crate::error_chain(&e)
                );
                return;
            }
        };
        match self.install(Arc::new(effective), None) {
            Ok(changes) => {
                self.counters.config_reloads.inc();
                let mut inner = self.lock();
                inner.file_text = text;
                inner.file = Arc::new(file);
                if taken_up && inner.overlay_error.take().is_some() {
                    tracing::info!(
                        "the policy overlay {} is usable again",
                        inner.overlay_path.display()
                    );
                }
                // Stored only when read from disk in this reload: the disk may hold what the
                // operator put there since (a deleted or restored overlay not taken up yet), and
                // a stale removal left on disk is inert.
                if taken_up && !stale.is_empty() && inner.overlay_error.is_none() {
                    store_pruned(&overlay, &inner.overlay_path);
                }
                inner.overlay = overlay;
                tracing::info!(
                    changes = changes.len(),
                    "config reloaded from {}",
                    inner.path.display()
                );
            }
            Err(e) => {
                self.counters.config_rejects.inc();
                tracing::error!("applying {}: {}", path.display(), crate::error_chain(&e));
            }
        }
    }

    /// Applies `effective` to the maps and the checker, and announces the differences: the
    /// change to `api` (the policy an API call edited) as the API's, any other as the file's.
    /// If the maps cannot take it, the config in force before is written back (a failed apply
    /// can stop halfway). Called with the writer lock held; takes the state lock only to write
    /// the maps and swap the state in.
    fn install(
        &self,
        effective: Arc<Effective>,
        api: Option<&Selector>,
    ) -> Result<Vec<Change>, DatapathError> {
        let (before, mut share_view, trie, service) = {
            let inner = self.lock();
            (
                inner.effective.clone(),
                inner.share_view,
                inner.tables.trie_written(),
                inner.service_global.clone(),
            )
        };
        // A `cluster:` section added by this change: global policies admit nothing until the
        // node has started and been counted (the agent's cluster task then sets the view).
        if effective.config.cluster.is_some() && before.config.cluster.is_none() {
            share_view = ShareView::JOINING;
        }
        let applied = Arc::new(with_shares(&effective.config, &service, &share_view));
        let entries = applied.lpm_entries();
        let trie_diff = TrieDiff::between(trie, &entries);
        let mut changes = diff(&before.config, &effective.config, 0, Source::File);
        let cluster = policies_for_cluster(&effective.config, &service);
        let names = Arc::new(WireNames::new(&cluster.global));
        let changing = self.names.changing();
        let (replaced, generation) = {
            let mut inner = self.lock();
            let report = match inner.tables.apply_diff(&applied, entries, &trie_diff) {
                Ok(report) => report,
                Err(e) => {
                    let in_force = inner.applied.clone();
                    match inner.tables.apply(&in_force) {
                        Ok(restored) => changing.restored(restored.generation),
                        Err(restore) => tracing::error!(
                            "restoring the policies in force after a failed apply: {restore}"
                        ),
                    }
                    return Err(e);
                }
            };
            for change in &mut changes {
                change.generation = report.generation;
            }
            inner.share_view = share_view;
            (
                (
                    std::mem::replace(&mut inner.applied, applied.clone()),
                    std::mem::replace(&mut inner.effective, effective.clone()),
                ),
                report.generation,
            )
        };
        // The configs and the trie replaced go out of the lock, and off the caller's path.
        free_later((replaced, trie_diff));
        self.checker.set_config(&applied);
        // After the checker: it writes the ids of API IDs' entries.
        changing.done(generation, names);
        self.checker.set_share_view(share_view);
        for warning in &effective.config.warnings {
            if !before.config.warnings.contains(warning) {
                tracing::warn!("{warning}");
            }
        }
        self.publish_cluster(cluster);
        for change in &mut changes {
            if api == Some(&change.selector) {
                change.source = Source::Api;
            }
        }
        for change in &changes {
            // No subscribers is fine.
            let _ = self.changes.send(change.clone());
        }
        free_later(before);
        Ok(changes)
    }

    /// Creates or replaces a policy (the default with `Selector::Default`) in the overlay.
    /// `scope`, if given, must be the policy's: the config file's, local for a policy it does
    /// not have (checked under the writer, against the file in force).
    pub fn set(
        &self,
        selector: &Selector,
        limit: Resolved,
        scope: Option<Scope>,
    ) -> Result<Change, LimitsError> {
        let mut kept = Scope::Local;
        let change = self.change(selector, |overlay, file| {
            let (in_file, current) = file_scope(file, selector);
            if let Some(wanted) = scope
                && wanted != current
            {
                return Err(LimitsError::Scope {
                    selector: selector.to_string(),
                    in_file,
                    scope: current,
                });
            }
            kept = current;
            match selector {
                Selector::Default => overlay.set_default(limit),
                Selector::Match(m) => overlay.set_policy(m, limit),
            }
            Ok(())
        })?;
        Ok(change.unwrap_or_else(|| Change {
            // Setting what is already in force changes nothing; report it as set.
            kind: ChangeKind::Set,
            selector: selector.clone(),
            limit,
            scope: kept,
            generation: self.generation(),
            source: Source::Api,
        }))
    }

    /// Removes a policy: the overlay's entry for it (the file's policy, if any, is then in force
    /// again), else the file's (by a tombstone in the overlay); for the default, the overlay's
    /// (see [`crate::config::overlay`]).
    pub fn delete(&self, selector: &Selector) -> Result<Change, LimitsError> {
        let mut outcome = None;
        let mut kept = Scope::Local;
        let change = self.change(selector, |overlay, file| {
            // The file's policy stays, or was the one removed; an overlay-only one is local.
            kept = file_scope(file, selector).1;
            let before = match selector {
                Selector::Default => {
                    if !overlay.unset_default() {
                        return Err(LimitsError::DeleteDefault);
                    }
                    Removal::RestoredFile(file.default)
                }
                Selector::Match(m) => overlay.remove_policy(m, file).map_err(|e| match e {
                    OverlayError::NotFound(m) => LimitsError::NotFound(m),
                    e => LimitsError::Overlay(e),
                })?,
            };
            outcome = Some(before);
            Ok(())
        })?;
        if let Some(change) = change {
            return Ok(change);
        }
        // The maps did not change (say the overlay had set what the file has).
        let (kind, limit) = match outcome {
            Some(Removal::RestoredFile(r)) => (ChangeKind::Set, r),
            Some(Removal::Removed(r) | Removal::Tombstoned(r)) => (ChangeKind::Deleted, r),
            None => return Err(LimitsError::NotFound(selector.to_string())),
        };
        Ok(Change {
            kind,
            selector: selector.clone(),
            limit,
            scope: kept,
            generation: self.generation(),
            source: Source::Api,
        })
    }

    fn generation(&self) -> u32 {
        self.with_tables(|t| t.map_config().map(|c| c.generation).unwrap_or(0))
    }

    /// The change-merge-apply-store sequence shared by `set` and `delete`: `edit` changes a
    /// copy of the overlay (given the file's policies). Returns the change to the edited
    /// policy, if the maps changed.
    fn change(
        &self,
        selector: &Selector,
        edit: impl FnOnce(&mut Overlay, &Config) -> Result<(), LimitsError>,
    ) -> Result<Option<Change>, LimitsError> {
        let _writer = self.writer();
        let (file_text, file, mut overlay, previous, overlay_path) = {
            let inner = self.lock();
            if let Some(error) = &inner.overlay_error {
                return Err(LimitsError::OverlayUnusable {
                    error: error.clone(),
                });
            }
            (
                inner.file_text.clone(),
                inner.file.clone(),
                inner.overlay.clone(),
                inner.effective.clone(),
                inner.overlay_path.clone(),
            )
        };
        edit(&mut overlay, &file)?;
        let effective = overlay::merge_parsed(file_text, &file, &overlay)?;
        let changes = self.install(Arc::new(effective), Some(selector))?;
        if let Err(error) = overlay.store(&overlay_path) {
            // Put the maps back so that the overlay and the maps agree; the change failed.
            if let Err(e) = self.install(previous, None) {
                // The change stays in force in the maps, but not on disk: keep the overlay in
                // step with what is in force, and refuse further changes until a SIGHUP reads
                // the overlay again.
                let behind = format!(
                    "the policy overlay {} is behind the policies in force (writing it failed: \
                     {}; restoring the maps failed: {})",
                    overlay_path.display(),
                    crate::error_chain(&error),
                    crate::error_chain(&e)
                );
                tracing::error!("{behind}");
                let mut inner = self.lock();
                inner.overlay = overlay;
                inner.overlay_error = Some(behind);
            }
            return Err(LimitsError::Overlay(error));
        }
        let replaced = std::mem::replace(&mut self.lock().overlay, overlay);
        free_later((previous, replaced));
        self.counters.api_limit_changes.inc();
        Ok(changes.into_iter().find(|c| c.selector == *selector))
    }

    /// The policy for `selector`, if there is one.
    pub fn get(&self, selector: &Selector) -> Option<(Resolved, Scope)> {
        let effective = self.lock().effective.clone();
        policy_in(&effective.config, selector)
    }

    /// The default, then the policies in order (the file's, then the overlay's new ones), each
    /// with the layer it comes from and its scope.
    pub fn list(&self) -> Vec<(Selector, Resolved, Layer, Scope)> {
        let e = self.lock().effective.clone();
        std::iter::once((
            Selector::Default,
            e.config.default,
            e.layer(0),
            Scope::Local,
        ))
        .chain(e.config.policies.iter().enumerate().map(|(i, (m, r))| {
            (
                Selector::Match(m.clone()),
                *r,
                e.layer(i + 1),
                e.config.scope(i as u16 + 1),
            )
        }))
        .collect()
    }
}

#[cfg(test)]
mod tests;
