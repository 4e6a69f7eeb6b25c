//! `limiter agent`: load and attach the XDP program, apply the policies, keep them in step with
//! the config file, detach on SIGINT/SIGTERM.

use std::{
    hash::{DefaultHasher, Hash, Hasher},
    path::{Path, PathBuf},
    time::Duration,
};

use anyhow::Context as _;
use tokio::signal::unix::{SignalKind, signal};

use crate::{
    datapath::{self, AttachMode, LoadOptions, Tables},
    policy::Config,
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
}

/// The config file as last seen: its content hash, so that an unchanged or already-rejected file
/// is not parsed (or complained about) again.
struct Watched {
    path: PathBuf,
    last_hash: Option<u64>,
}

impl Watched {
    /// The file's text if it changed since the last call.
    fn changed(&mut self) -> anyhow::Result<Option<String>> {
        let text = std::fs::read_to_string(&self.path)
            .with_context(|| format!("reading config {}", self.path.display()))?;
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
    let mut watched = Watched { path: opts.config.clone(), last_hash: None };
    let text = watched.changed()?.unwrap_or_default();
    let config = parse(&opts.config, &text)?;

    let pins = datapath::pin_dir(&opts.iface);
    let adopting = pins.exists();
    let mut ebpf = datapath::load(&LoadOptions { pin_dir: Some(pins.clone()), max_clients: opts.max_clients })
        .with_context(|| format!("loading the XDP program for {}", opts.iface))?;
    // Policies first, then attach: the first packet the program sees is already enforced.
    let started = Tables::take(&mut ebpf).and_then(|mut tables| {
        let report = tables.apply(&config)?;
        let attachment = datapath::attach(&mut ebpf, &opts.iface, opts.mode, Some(&pins))?;
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
        "ready: XDP program attached and policies applied"
    );

    let mut sigint = signal(SignalKind::interrupt()).context("installing the SIGINT handler")?;
    let mut sigterm = signal(SignalKind::terminate()).context("installing the SIGTERM handler")?;
    let mut sighup = signal(SignalKind::hangup()).context("installing the SIGHUP handler")?;
    let mut poll = tokio::time::interval(RELOAD_POLL);
    poll.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = sigint.recv() => break,
            _ = sigterm.recv() => break,
            _ = sighup.recv() => {
                watched.last_hash = None;
                reload(&mut watched, &mut tables);
            }
            _ = poll.tick() => reload(&mut watched, &mut tables),
        }
    }
    // A signal is an orderly stop: detach. (A crash leaves the pinned link, which keeps the
    // program enforcing until the next agent takes it over.) The pinned maps and their counters
    // remain for `limiter stats` and the next agent.
    attachment.detach()?;
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
