//! `limiter agent`: load and attach the XDP program, apply the policies, keep them in step with
//! the config file, detach on SIGINT/SIGTERM.

use std::{
    hash::{DefaultHasher, Hash, Hasher},
    os::fd::{AsFd as _, OwnedFd},
    path::{Path, PathBuf},
    time::Duration,
};

use anyhow::Context as _;
use tokio::signal::unix::{SignalKind, signal};

use crate::{
    datapath::{self, AttachMode, LoadOptions, Tables},
    policy::Config,
    snapshot::{Clocks, Snapshot},
};

/// How often the config file is checked for changes. A change takes effect within this period
/// plus the time to write the maps (well under the 1 s the README promises).
pub const RELOAD_POLL: Duration = Duration::from_millis(200);

#[derive(Debug, Clone)]
pub struct AgentOptions {
    pub iface: String,
    pub config: PathBuf,
    pub mode: AttachMode,
    pub max_clients: u32,
    /// Where `IFACE.snapshot` lives.
    pub state_dir: PathBuf,
    /// How often client state is snapshotted (and once more on shutdown).
    pub snapshot_interval: Duration,
    /// Replace an XDP program that is not ours instead of refusing to start.
    pub replace: bool,
}

impl AgentOptions {
    pub fn snapshot_path(&self) -> PathBuf {
        self.state_dir.join(format!("{}.snapshot", self.iface))
    }
}

/// The config file as last seen: its content hash, so that an unchanged or already-rejected file
/// is not parsed (or complained about) again.
struct Watched {
    path: PathBuf,
    last_hash: Option<u64>,
    /// The file could not be read at the last check (reported once, not every poll).
    unreadable: bool,
}

impl Watched {
    fn new(path: PathBuf) -> Watched {
        Watched {
            path,
            last_hash: None,
            unreadable: false,
        }
    }

    /// The file's text if it changed since the last call. A read error is returned once per
    /// outage (a deleted or unreadable file), then `Ok(None)` until the file is back.
    fn changed(&mut self) -> anyhow::Result<Option<String>> {
        let text = match std::fs::read_to_string(&self.path) {
            Ok(text) => {
                self.unreadable = false;
                text
            }
            Err(_) if self.unreadable => return Ok(None),
            Err(e) => {
                self.unreadable = true;
                return Err(e).with_context(|| format!("reading config {}", self.path.display()));
            }
        };
        let mut h = DefaultHasher::new();
        text.hash(&mut h);
        let hash = h.finish();
        if self.last_hash == Some(hash) {
            return Ok(None);
        }
        self.last_hash = Some(hash);
        Ok(Some(text))
    }
}

fn parse(path: &Path, text: &str) -> anyhow::Result<Config> {
    Config::parse(text).with_context(|| format!("config {} rejected", path.display()))
}

pub async fn run(opts: AgentOptions) -> anyhow::Result<()> {
    datapath::check_environment()?;
    datapath::if_index(&opts.iface)?;
    let mut watched = Watched::new(opts.config.clone());
    let text = watched.changed()?.unwrap_or_default();
    let config = parse(&opts.config, &text)?;

    let pins = datapath::pin_dir(&opts.iface);
    let adopting = pins.exists();
    let mut ebpf = datapath::load(&LoadOptions {
        pin_dir: Some(pins.clone()),
        max_clients: opts.max_clients,
    })
    .with_context(|| format!("loading the XDP program for {}", opts.iface))?;
    let snapshot_path = opts.snapshot_path();
    // Policies first, then attach: the first packet the program sees is already enforced.
    let started = Tables::take(&mut ebpf).and_then(|mut tables| {
        restore(&mut tables, &snapshot_path)?;
        let report = tables.apply(&config)?;
        let attachment =
            datapath::attach(&mut ebpf, &opts.iface, opts.mode, Some(&pins), opts.replace)?;
        Ok((tables, report, attachment))
    });
    let (mut tables, report, attachment) = match started {
        Ok(started) => started,
        Err(e) => {
            if !adopting {
                // Leave no pins behind from a start that never enforced anything.
                drop(ebpf);
                let _ = datapath::remove_pins(&pins);
            }
            return Err(e.into());
        }
    };
    tracing::info!(
        iface = %opts.iface,
        pins = %pins.display(),
        policies = config.policies.len(),
        generation = report.generation,
        mode = ?config.mode,
        survives_agent = attachment.is_pinned(),
        "ready: XDP program attached and policies applied"
    );

    let mut sigint = signal(SignalKind::interrupt()).context("installing the SIGINT handler")?;
    let mut sigterm = signal(SignalKind::terminate()).context("installing the SIGTERM handler")?;
    let mut sighup = signal(SignalKind::hangup()).context("installing the SIGHUP handler")?;
    let mut poll = tokio::time::interval(RELOAD_POLL);
    poll.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut snapshot_tick = tokio::time::interval(opts.snapshot_interval);
    snapshot_tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    snapshot_tick.reset();
    let mut snapshotting: Option<tokio::task::JoinHandle<()>> = None;
    loop {
        tokio::select! {
            _ = sigint.recv() => break,
            _ = sigterm.recv() => break,
            _ = sighup.recv() => {
                watched.last_hash = None;
                reload(&mut watched, &mut tables);
            }
            _ = poll.tick() => reload(&mut watched, &mut tables),
            _ = snapshot_tick.tick() => {
                // Off the agent's thread; a snapshot still running is not started twice.
                if snapshotting.as_ref().is_none_or(|h| h.is_finished()) {
                    match tables.client_fds() {
                        Ok(fds) => {
                            let path = snapshot_path.clone();
                            snapshotting = Some(tokio::task::spawn_blocking(move || {
                                if let Err(e) = take_snapshot(&fds, &path) {
                                    tracing::error!("snapshot {}: {e:#}", path.display());
                                }
                            }));
                        }
                        Err(e) => tracing::error!("snapshot: duplicating map descriptors: {e}"),
                    }
                }
            }
        }
    }
    if let Some(h) = snapshotting {
        let _ = h.await;
    }
    // A signal is an orderly stop: detach. (A crash leaves the pinned link, which keeps the
    // program enforcing until the next agent takes it over.) The pinned maps and their counters
    // remain for `limiter stats` and the next agent.
    let detached = attachment.detach();
    // The final snapshot, with the counters as the program left them (taken even if detaching
    // failed: the state is worth keeping either way).
    let fds = tables
        .client_fds()
        .context("duplicating map descriptors for the final snapshot")?;
    take_snapshot(&fds, &snapshot_path)?;
    detached?;
    drop(ebpf);
    tracing::info!(iface = %opts.iface, "detached; maps stay pinned under {}", pins.display());
    Ok(())
}

/// Applies the config file if it changed. Any error is logged and the policies in force stay.
fn reload(watched: &mut Watched, tables: &mut Tables) {
    let text = match watched.changed() {
        Ok(Some(text)) => text,
        Ok(None) => return,
        Err(e) => {
            tracing::warn!("{e:#}; the policies in force stay in force");
            return;
        }
    };
    match parse(&watched.path, &text) {
        Ok(config) => match tables.apply(&config) {
            Ok(r) => tracing::info!(
                generation = r.generation,
                written = r.policies_written,
                removed = r.policies_removed,
                statics_added = r.statics_added,
                statics_removed = r.statics_removed,
                "config reloaded"
            ),
            Err(e) => tracing::error!("applying {}: {e}", watched.path.display()),
        },
        Err(e) => tracing::error!("{e:#}; the policies in force stay in force"),
    }
}

/// Captures both client maps and writes the snapshot atomically.
fn take_snapshot(fds: &(OwnedFd, OwnedFd), path: &Path) -> anyhow::Result<()> {
    let started = std::time::Instant::now();
    let snapshot = Snapshot::capture(fds.0.as_fd(), fds.1.as_fd(), Clocks::now())
        .context("reading the client maps")?;
    snapshot.write(path)?;
    tracing::debug!(clients = snapshot.entries.len(), took = ?started.elapsed(), path = %path.display(), "snapshot written");
    Ok(())
}

/// On fresh maps (nothing pinned to adopt), restores client state from the snapshot if there is
/// a usable one.
fn restore(tables: &mut Tables, path: &Path) -> Result<(), crate::datapath::DatapathError> {
    if tables.map_config()?.generation != 0 {
        return Ok(()); // adopted pinned maps: they are newer than any snapshot
    }
    let snapshot = match Snapshot::load(path) {
        Ok(Some(snapshot)) => snapshot,
        Ok(None) => return Ok(()),
        Err(e) => {
            tracing::warn!("not restoring: {e}");
            return Ok(());
        }
    };
    let now = Clocks::now();
    let entries = snapshot.restored(now);
    tables.restore_clients(&entries)?;
    tracing::info!(
        clients = entries.len(),
        age_s = now.wall_ns.saturating_sub(snapshot.wall_ns) as f64 / 1e9,
        same_boot = snapshot.boot_id == now.boot_id,
        "restored client state from {}",
        path.display()
    );
    Ok(())
}
