//! Envoy's rate limit service (`envoy.service.ratelimit.v3.RateLimitService`), served by the
//! agent on `--rls-listen` from an envoyproxy/ratelimit configuration (`--rls-config`):
//! [`config`] reads it, [`matching`] finds each descriptor's limit, [`service`] decides with the
//! check program and answers, [`hits`] counts each rule's hits for the metrics.

pub mod budget;
pub mod config;
pub mod hits;
pub mod listen;
pub mod matching;
pub mod metadata;
pub mod service;

use std::{
    path::PathBuf,
    sync::{Arc, Mutex, RwLock},
    time::Instant,
};

pub use self::config::{RlsConfig, RlsConfigError, Unit};
use self::hits::{DEFAULT_MAX_DETAILED_SERIES, RlsHits};

/// The rate limit service's config in force, and its file(s), re-read on change.
pub struct RlsStore {
    path: PathBuf,
    current: RwLock<Arc<RlsConfig>>,
    /// The fingerprint of the files last seen (loaded or refused), so a refused file is reported
    /// once, not at every poll; and, for files whose limits the maps refused, when they are
    /// tried again if they do not change ([`RlsStore::refused`]).
    seen: Mutex<(Option<u64>, Option<Instant>)>,
    /// The hit counters, attached to each config before it comes into force.
    hits: Arc<RlsHits>,
    /// The rules' limits are global across the cluster (`--rls-scope global`): a config whose
    /// rules have more distinct limits than there are ids for is refused.
    global: bool,
}

impl RlsStore {
    /// Loads `path` (a file or a directory), its hits counted in `hits`, its rules' limits
    /// global across the cluster if `global`; an error here stops the start.
    pub fn load(
        path: PathBuf,
        hits: Arc<RlsHits>,
        global: bool,
    ) -> Result<RlsStore, RlsConfigError> {
        let (mut config, fingerprint) = load(&path, global)?;
        log_loaded(&path, &config);
        hits.install(&mut config);
        Ok(RlsStore {
            path,
            current: RwLock::new(Arc::new(config)),
            seen: Mutex::new((Some(fingerprint), None)),
            hits,
            global,
        })
    }

    /// A store over a config already parsed (tests), counted with the default cap.
    pub fn fixed(mut config: RlsConfig) -> RlsStore {
        let hits = Arc::new(RlsHits::new(DEFAULT_MAX_DETAILED_SERIES));
        hits.install(&mut config);
        RlsStore {
            path: PathBuf::new(),
            current: RwLock::new(Arc::new(config)),
            seen: Mutex::new((None, None)),
            hits,
            global: false,
        }
    }

    /// The cluster's global limits the rules in force make (none unless `--rls-scope global`;
    /// see [`RlsConfig::global_policies`]).
    pub fn global_policies(&self) -> Vec<crate::cluster::GlobalPolicy> {
        self.global_policies_of(&self.current())
    }

    /// The cluster's global limits `config`'s rules make here.
    fn global_policies_of(&self, config: &RlsConfig) -> Vec<crate::cluster::GlobalPolicy> {
        if !self.global {
            return Vec::new();
        }
        config.global_policies()
    }

    /// The hit counters of the rules in force.
    pub fn hits(&self) -> &Arc<RlsHits> {
        &self.hits
    }

    /// The config in force.
    pub fn current(&self) -> Arc<RlsConfig> {
        self.current
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Re-reads the config if its files changed (`force`: even if not): the new config, for
    /// [`RlsStore::install`]. A config that does not load is logged (`None`), and the one in
    /// force stays.
    ///
    /// Installing is the caller's: under `--rls-scope global` the rules' limits have policy ids
    /// of their own, which the cluster names through the policies in force, so the new config
    /// comes into force inside the policies' change (`PolicyStore::set_service_global`), never
    /// before it, and not at all if the maps refuse its limits (then see
    /// [`RlsStore::refused`]).
    pub fn reread(&self, force: bool) -> Option<Reread> {
        let mut guard = self.seen.lock().unwrap_or_else(|e| e.into_inner());
        let (seen, retry) = &mut *guard;
        let fingerprint = match RlsConfig::fingerprint_of(&self.path) {
            Ok(f) => f,
            Err(e) => {
                // Once per outage (the fingerprint forgotten), and on every SIGHUP.
                if seen.is_some() || force {
                    tracing::error!(
                        "rate limit service config: {}; the config in force stays in force",
                        crate::error_chain(&e)
                    );
                }
                (*seen, *retry) = (None, None);
                return None;
            }
        };
        let due = retry.is_some_and(|at| Instant::now() >= at);
        if !force && !due && *seen == Some(fingerprint) {
            return None;
        }
        *retry = None;
        let loaded = load(&self.path, self.global);
        // Taken as seen only if the files did not change while they were read (a file caught
        // mid-write would otherwise stay in force, or stay rejected, until a SIGHUP).
        let settled = RlsConfig::fingerprint_of(&self.path).is_ok_and(|after| after == fingerprint);
        match loaded {
            Ok((config, _)) => Some(Reread {
                config,
                fingerprint: settled.then_some(fingerprint),
            }),
            Err(e) => {
                *seen = settled.then_some(fingerprint);
                tracing::error!(
                    "rate limit service config rejected: {}; the config in force stays in force",
                    crate::error_chain(&e)
                );
                None
            }
        }
    }

    /// Puts a config [`RlsStore::reread`] returned in force.
    pub fn install(&self, reread: Reread) {
        let Reread {
            mut config,
            fingerprint,
        } = reread;
        log_loaded(&self.path, &config);
        self.hits.install(&mut config);
        *self.current.write().unwrap_or_else(|e| e.into_inner()) = Arc::new(config);
        *self.seen.lock().unwrap_or_else(|e| e.into_inner()) = (fingerprint, None);
    }

    /// The maps refused the global limits of a config [`RlsStore::reread`] returned (their
    /// fingerprint: [`Reread::fingerprint`]): the config in force stays, and the files are read
    /// again when they change, on SIGHUP, or from `retry` on (the refusal may pass: the
    /// policies' own config may change to leave room); not at every poll, each of which would
    /// parse them again and log the refusal again.
    pub fn refused(&self, fingerprint: Option<u64>, retry: Instant) {
        *self.seen.lock().unwrap_or_else(|e| e.into_inner()) = (fingerprint, Some(retry));
    }
}

/// A config [`RlsStore::reread`] loaded, not in force yet.
pub struct Reread {
    config: RlsConfig,
    /// The files' fingerprint, if they did not change while they were read.
    fingerprint: Option<u64>,
}

impl Reread {
    /// The cluster's global limits its rules make under `--rls-scope global` (see
    /// [`RlsStore::global_policies`]).
    pub fn global_policies(&self, store: &RlsStore) -> Vec<crate::cluster::GlobalPolicy> {
        store.global_policies_of(&self.config)
    }

    /// The files' fingerprint, if they did not change while they were read (for
    /// [`RlsStore::refused`]).
    pub fn fingerprint(&self) -> Option<u64> {
        self.fingerprint
    }
}

/// [`RlsConfig::load`], and under `--rls-scope global` [`RlsConfig::check_global`].
fn load(path: &std::path::Path, global: bool) -> Result<(RlsConfig, u64), RlsConfigError> {
    let (config, fingerprint) = RlsConfig::load(path)?;
    if global {
        config.check_global()?;
    }
    Ok((config, fingerprint))
}

fn log_loaded(path: &std::path::Path, config: &RlsConfig) {
    let mut domains: Vec<&str> = config.domains.keys().map(String::as_str).collect();
    domains.sort_unstable();
    tracing::info!(
        path = %path.display(),
        domains = ?domains,
        "rate limit service config loaded"
    );
    for note in &config.notes {
        if note.contains("WARNING") {
            tracing::warn!("rate limit service config: {note}");
            continue;
        }
        tracing::info!("rate limit service config: {note}");
    }
}
