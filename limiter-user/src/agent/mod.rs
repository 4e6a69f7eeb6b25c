//! `limiter agent`: load and attach the XDP program, apply the policies, keep them in step with
//! the config file, detach on SIGINT/SIGTERM.

mod claim;
pub mod cluster;
pub mod descriptors;
mod start;

use std::{
    net::SocketAddr,
    os::fd::{AsFd as _, OwnedFd},
    path::{Path, PathBuf},
    sync::{Arc, Mutex, mpsc},
    time::{Duration, Instant},
};

use anyhow::Context as _;
use tokio::signal::unix::{SignalKind, signal};

use self::start::StartGuard;
use crate::{
    adaptive::load::{FileLoad, LoadSource, SystemLoad},
    adaptive::tuner::Tuner,
    admission::Caps,
    api::{self, ApiOptions, ApiState, SocketFile},
    capped_read,
    check::Checker,
    cluster::membership::ShareView,
    config::{MAX_CONFIG_BYTES, MAX_STATIC_CLIENTS, overlay},
    datapath::{self, AttachMode, LoadOptions, Tables},
    limits::{Loaded, PolicyStore, policies_for_cluster, with_shares},
    metrics::{self, ClusterSource, Counters, Exporter, KernelSource},
    rls,
    snapshot::{Clocks, Snapshot},
    stats::{Figures, Resident, Walks},
    trusted_dir::{self, DirKind},
};

/// How long the API gets to finish requests in flight and close its connections at shutdown;
/// well inside the usual stop timeouts, so the final snapshot is always written.
const API_DRAIN: Duration = Duration::from_secs(2);

/// How often the config file is checked for changes. A change takes effect within this period
/// plus the time to write the maps (well under the 1 s the README promises).
pub const RELOAD_POLL: Duration = Duration::from_millis(200);

/// How often the entries of `LIMITED` whose windows are over are deleted (see
/// [`datapath::LimitedSweep`]): a client stays held at most this long after its window state
/// aged out, which costs it nothing (it is admitted in full either way).
const LIMITED_SWEEP: Duration = Duration::from_secs(1);

#[derive(Debug, Clone)]
pub struct AgentOptions {
    pub iface: String,
    pub config: PathBuf,
    pub mode: AttachMode,
    pub max_clients: u32,
    /// Capacity of the LRU map of API IDs that are not addresses.
    pub max_ids: u32,
    /// Capacity of `LIMITED`, the never-evicted map of clients over their limit.
    pub max_limited: u32,
    /// Capacity of `GRANTS`, and most clients the cluster node holds or owns.
    pub max_global_clients: u32,
    /// Where `IFACE.snapshot` lives.
    pub state_dir: PathBuf,
    /// How often client state is snapshotted (and once more on shutdown).
    pub snapshot_interval: Duration,
    /// Replace an XDP program that is not ours instead of refusing to start.
    pub replace: bool,
    pub api: ApiOptions,
    /// Serve Prometheus metrics here.
    pub metrics: Option<SocketAddr>,
    /// Connections the metrics endpoint serves at once.
    pub metrics_caps: Caps,
    /// Read the CPU load for adaptive windows from this file instead of the system (a number,
    /// `0.93` or `93%`); for tests and for operators who want their own load signal.
    pub load_file: Option<PathBuf>,
    /// Envoy's rate limit service (`--rls-listen`, `--rls-config`), if served.
    pub rls: Option<rls::listen::RlsAgentOptions>,
}

impl AgentOptions {
    pub fn snapshot_path(&self) -> PathBuf {
        self.state_dir.join(format!("{}.snapshot", self.iface))
    }

    /// Where the policy changes made through the API live (`IFACE.overlay.yaml`).
    pub fn overlay_path(&self) -> PathBuf {
        overlay::overlay_path(&self.state_dir, &self.iface)
    }
}

pub async fn run(mut opts: AgentOptions) -> anyhow::Result<()> {
    // First: a SIGTERM that arrives while the agent starts (a supervisor stopping it as soon as
    // it looks ready, say) is then held for the main loop, which stops in order, instead of
    // killing the process with the program attached and no final snapshot.
    let mut sigint = signal(SignalKind::interrupt()).context("installing the SIGINT handler")?;
    let mut sigterm = signal(SignalKind::terminate()).context("installing the SIGTERM handler")?;
    let mut sighup = signal(SignalKind::hangup()).context("installing the SIGHUP handler")?;
    datapath::check_environment()?;
    // The kernel features the program and the agent need; not for `limiter detach`, which must
    // clean up on any kernel.
    datapath::kernel::check().map_err(datapath::DatapathError::from)?;
    datapath::if_index(&opts.iface)?;
    // Before anything is read, bound or written: another agent on this interface stops the
    // start here, whatever socket and state directory it was given.
    let _claim = claim::InterfaceClaim::take(&opts.iface)?;
    // Before anything is read from it: an overlay or a snapshot in a directory others can write
    // could be theirs.
    trusted_dir::prepare(&opts.state_dir, DirKind::State)?;
    let text = capped_read::read_to_string(&opts.config, MAX_CONFIG_BYTES, "config")?;
    let loaded = Loaded::load(&text, &opts.overlay_path())
        .with_context(|| format!("config {} rejected", opts.config.display()))?;
    let config = loaded.effective.config.clone();

    // Listeners first: a port in use, a bad certificate or another agent on this agent's
    // socket stops the start before anything is loaded, written or attached.
    let listeners = api::bind(&opts.api).await?;
    // Removes the socket when `run` returns, whichever way (an orderly stop, an error after the
    // start, a failed start); dropped last, after the API has stopped.
    let _socket = SocketFile::claim(&opts.api.socket);
    let rls_listener = match &opts.rls {
        Some(options) => Some(rls::listen::bind(options).await?),
        None => None,
    };
    let mut guard = StartGuard::new();
    let metrics_listener = match opts.metrics {
        None => None,
        Some(addr) => match tokio::net::TcpListener::bind(addr).await {
            Ok(l) => Some(l),
            Err(e) => {
                return Err(e).with_context(|| format!("binding the metrics listener to {addr}"));
            }
        },
    };

    let load: Box<dyn LoadSource> = match &opts.load_file {
        Some(path) => Box::new(FileLoad::new(path.clone())),
        None => match SystemLoad::new() {
            Ok(load) => Box::new(load),
            Err(e) => {
                return Err(e).context("opening the system CPU load source (/proc/stat)");
            }
        },
    };

    let pins = datapath::pin_dir(&opts.iface);
    let load_options = LoadOptions {
        pin_dir: Some(pins.clone()),
        max_clients: opts.max_clients,
        max_ids: opts.max_ids,
        max_limited: opts.max_limited,
        max_global_clients: opts.max_global_clients,
    };
    // Whether the load will adopt the maps pinned there (not those of another layout or size,
    // which it discards): the cluster node continues at once only on adopted maps.
    let adopting = datapath::lifecycle::adoptable_pins(&load_options);
    // The cluster's listener with the others, before anything is written; the node's first
    // share view is what the maps start with.
    let incarnation_path = cluster::incarnation_path(&opts.state_dir, &opts.iface);
    // The rate limit service's global limits (`--rls-scope global`) are the cluster's too.
    let service_global = rls_listener
        .as_ref()
        .map(|bound| bound.store.global_policies())
        .unwrap_or_default();
    let prepared = match &config.cluster {
        None => {
            // Not a member now: a later start with a `cluster:` section must join again.
            cluster::forget_joined(&incarnation_path);
            None
        }
        Some(section) => Some(
            cluster::Prepared::new(
                section,
                policies_for_cluster(&config, &service_global),
                &incarnation_path,
                adopting,
                opts.max_global_clients as usize,
            )
            .await?,
        ),
    };
    let share_view = prepared
        .as_ref()
        .map_or(ShareView::ALONE, cluster::Prepared::share_view);
    let applied = with_shares(&config, &service_global, &share_view);
    let mut ebpf = datapath::load(&load_options)
        .with_context(|| format!("loading the XDP program for {}", opts.iface))?;
    if !adopting {
        guard.created_pins(pins.clone());
    }
    let snapshot_path = opts.snapshot_path();
    // Policies first, then attach: the first packet the program sees is already enforced.
    let started = (|| -> anyhow::Result<_> {
        let mut tables = Tables::take(&mut ebpf)?;
        // The kernel verifies the programs while the policies are written.
        let report = datapath::load_programs_while(&mut ebpf, &datapath::AGENT_PROGRAMS, || {
            restore(&mut tables, &snapshot_path, snapshot_capacity(&opts))?;
            let report = tables.apply(&applied)?;
            anyhow::Ok(report)
        })??;
        let adapt_program = datapath::load_adapt_program(&mut ebpf)?;
        tables.set_refresher(
            adapt_program
                .try_clone()
                .context("duplicating the adapt program's descriptor")?,
        );
        // The policies went in before the refresher was loaded: on adopted maps, the refresh
        // their first apply is due runs now, still before the program is attached.
        tables.refresh_if_owed()?;
        // The cluster's enrolment reads its held clients' entries in the adapt program's read
        // frames.
        let cluster_reads = adapt_program
            .try_clone()
            .context("duplicating the adapt program's descriptor")?;
        let check_program = datapath::load_check_program(&mut ebpf)?;
        let tuner = Tuner::new(
            &applied,
            report.generation,
            datapath::take_active(&mut ebpf)?,
            adapt_program,
            tables.adaptive_handles()?,
            load,
        )?;
        let sweep = tables.limited_sweep()?;
        let cluster_maps = datapath::ClusterMaps::take(&mut ebpf, &tables, cluster_reads)?;
        let attachment =
            datapath::attach(&mut ebpf, &opts.iface, opts.mode, Some(&pins), opts.replace)?;
        datapath::complete_upgrade(&mut ebpf, &mut tables)?;
        Ok((
            tables,
            report,
            check_program,
            tuner,
            sweep,
            cluster_maps,
            attachment,
        ))
    })();
    let (tables, report, check_program, tuner, sweep, cluster_maps, attachment) = started?;
    let mut sweep = Some(sweep);
    let survives_agent = attachment.is_pinned();
    if config.cluster.is_some() && !survives_agent {
        tracing::error!(
            iface = %opts.iface,
            "cluster member attached without a pinned link (netlink XDP): when this agent \
             stops or crashes the program goes, and this host admits everything of its global \
             clients while its peers still count on its share"
        );
    }
    guard.attached(attachment);
    tracing::info!(
        iface = %opts.iface,
        pins = %pins.display(),
        policies = config.policies.len(),
        generation = report.generation,
        mode = ?config.mode,
        survives_agent,
        "ready: XDP program attached and policies applied"
    );
    // Said at every start: IPv6 clients used to be single addresses (before layout 6).
    tracing::info!(
        ipv4 = %config.grouping.default_v4,
        ipv6 = %config.grouping.default_v6,
        "clients: sources are counted per these groups unless a policy says otherwise (`per`); \
         IPv6 per /64 is the default since map layout 6 (before, each address), and \
         `default: {{ per: {{ ipv6: address }} }}` restores per-address counting"
    );
    // Here rather than first thing: a start that fails says so in one line. Everything the caps
    // are for (the listeners' serving) starts below.
    let nofile = open_files(&mut opts);

    let counters = Arc::new(Counters::default());
    counters
        .open_files_limit
        .set(i64::try_from(nofile).unwrap_or(i64::MAX));
    let checker = Arc::new(Checker::new(check_program, &applied));
    let limits = Arc::new(PolicyStore::new(
        tables,
        opts.config.clone(),
        loaded,
        share_view,
        service_global,
        checker.clone(),
        counters.clone(),
    ));
    let walks = Arc::new(Walks::default());
    let (cluster_tx, cluster_rx) = tokio::sync::watch::channel(None);
    let (cluster_error_tx, cluster_error_rx) = tokio::sync::watch::channel(None);
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let served = api::serve(
        ApiState {
            iface: opts.iface.clone(),
            checker: checker.clone(),
            limits: limits.clone(),
            counters: counters.clone(),
            max_batch: opts.api.max_batch,
            walks: walks.clone(),
            cluster: cluster_rx.clone(),
            cluster_error: cluster_error_rx,
        },
        opts.api.clone(),
        listeners,
        stop_rx.clone(),
    )
    .await;
    let mut tasks = served?.tasks;
    let rls_store = rls_listener.as_ref().map(|bound| Arc::clone(&bound.store));
    if let Some(bound) = rls_listener {
        tasks.push(rls::listen::serve(bound, checker.clone(), stop_rx.clone()).await?);
    }
    guard.serving(stop_tx);
    if let Some(listener) = metrics_listener {
        tracing::info!(addr = %listener.local_addr()?, "metrics on /metrics");
        let source = StoreFigures {
            limits: limits.clone(),
            iface: opts.iface.clone(),
            walks,
        };
        let mut exporter =
            Exporter::new(&opts.iface, &counters, source).with_cluster(MemberFigures(cluster_rx));
        if let Some(store) = &rls_store {
            exporter = exporter.with_rls(Arc::clone(store.hits()));
        }
        let exporter = Arc::new(exporter);
        let (caps, connections) = (opts.metrics_caps, counters.metrics_connections.clone());
        let mut stop = stop_rx.clone();
        tasks.push(tokio::spawn(async move {
            let shutdown = async move {
                let _ = stop.wait_for(|s| *s).await;
            };
            if let Err(e) = metrics::serve(listener, exporter, caps, connections, shutdown).await {
                tracing::error!("metrics: {e:#}");
            }
        }));
    }

    let (_member, member_task) = cluster::Member::start(
        prepared,
        &limits,
        &counters,
        cluster::Enrolling {
            incarnation_path,
            maps: cluster_maps,
            checker: checker.clone(),
            global_caps: tuner.global_caps(),
            max_global_clients: opts.max_global_clients as usize,
        },
        cluster_tx,
        cluster_error_tx,
        stop_rx.clone(),
    );
    tasks.push(member_task);
    let (adaptive_stop, adaptive_loop) = spawn_adaptive(tuner, limits.clone())?;
    let (attachment, stop_tx) = guard.started();

    let mut poll = tokio::time::interval(RELOAD_POLL);
    poll.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut snapshot_tick = tokio::time::interval(opts.snapshot_interval);
    snapshot_tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    snapshot_tick.reset();
    let mut sweep_tick = tokio::time::interval(LIMITED_SWEEP);
    sweep_tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut snapshotting: Option<tokio::task::JoinHandle<()>> = None;
    // When the next periodic snapshot may start (`snapshot::periodic_gap`), set by the last one.
    let snapshot_pace = Arc::new(Mutex::new(SnapshotPace::default()));
    loop {
        tokio::select! {
            _ = sigint.recv() => break,
            _ = sigterm.recv() => break,
            _ = sighup.recv() => {
                let (limits, rls) = (limits.clone(), rls_store.clone());
                let _ = tokio::task::spawn_blocking(move || {
                    limits.reload_file(true);
                    rls.inspect(|r| reload_service(&limits, r, true));
                })
                .await;
            }
            _ = poll.tick() => {
                let (limits, rls) = (limits.clone(), rls_store.clone());
                let _ = tokio::task::spawn_blocking(move || {
                    limits.reload_file(false);
                    rls.inspect(|r| reload_service(&limits, r, false));
                })
                .await;
            }
            _ = sweep_tick.tick() => {
                if let Some(mut held) = sweep.take() {
                    let (held, result) = tokio::task::spawn_blocking(move || {
                        let result = held.sweep(crate::stats::monotonic_ns());
                        (held, result)
                    })
                    .await
                    .context("the LIMITED sweep panicked")?;
                    sweep = Some(held);
                    match result {
                        Ok(0) => {}
                        Ok(n) => tracing::debug!(released = n, "LIMITED: released clients whose windows are over"),
                        Err(e) => tracing::error!("LIMITED sweep: {}", crate::error_chain(&e)),
                    }
                }
            }
            due = snapshot_tick.tick() => {
                // Off the agent's thread; a snapshot still running is not started twice, nor
                // one before the last one's CPU time allows.
                let not_before = snapshot_pace
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .not_before
                    .filter(|&t| Instant::now() < t);
                if let Some(t) = not_before {
                    // Paced: the next tick comes when it may start.
                    snapshot_tick.reset_at(tokio::time::Instant::from_std(t));
                } else if snapshotting.as_ref().is_none_or(|h| h.is_finished()) {
                    match limits.with_tables(Tables::client_fds) {
                        Ok(fds) => {
                            let path = snapshot_path.clone();
                            let pace = Arc::clone(&snapshot_pace);
                            let interval = opts.snapshot_interval;
                            let due = due.into_std();
                            snapshotting = Some(tokio::task::spawn_blocking(move || {
                                let (cpu, result) = take_snapshot(&fds, &path);
                                pace.lock()
                                    .unwrap_or_else(|e| e.into_inner())
                                    .took(due, cpu, interval);
                                if let Err(e) = result {
                                    tracing::error!("snapshot {}: {e:#}", path.display());
                                }
                            }));
                        }
                        Err(e) => tracing::error!(
                            "snapshot: duplicating map descriptors: {}",
                            crate::error_chain(&e)
                        ),
                    }
                }
            }
        }
    }
    if let Some(h) = snapshotting {
        let _ = h.await;
    }
    drop(adaptive_stop);
    if adaptive_loop.join().is_err() {
        tracing::error!("the adaptive loop panicked");
    }
    if let Some(stop_tx) = &stop_tx {
        let _ = stop_tx.send(true);
    }
    // One deadline for all the listeners' tasks, so a stop takes API_DRAIN at most, not that
    // much per listener.
    let drained = tokio::time::Instant::now() + API_DRAIN;
    for task in tasks {
        if tokio::time::timeout_at(drained, task).await.is_err() {
            tracing::warn!(
                "API connections still open after {API_DRAIN:?} (a client not closing?); stopping anyway"
            );
            break;
        }
    }
    // A signal is an orderly stop: detach. (A crash leaves the pinned link, which keeps the
    // program enforcing until the next agent takes it over.) The pinned maps and their counters
    // remain for `limiter stats` and the next agent. A cluster member stays attached: detached,
    // this host would admit everything of its global clients while its peers still count on it
    // enforcing its share (`limiter detach` removes it).
    let in_cluster = limits.config().cluster.is_some();
    let detached = match attachment {
        Some(a) if in_cluster && a.is_pinned() => {
            tracing::info!(
                iface = %opts.iface,
                "cluster member: the program stays attached and enforcing its shares; \
                    `limiter detach --iface {}` removes it",
                opts.iface
            );
            Ok(())
        }
        a => a.map_or(Ok(()), |a| a.detach()),
    };
    // The final snapshot, with the counters as the program left them (taken even if detaching
    // failed: the state is worth keeping either way).
    let fds = limits
        .with_tables(Tables::client_fds)
        .context("duplicating map descriptors for the final snapshot")?;
    take_snapshot(&fds, &snapshot_path).1?;
    detached?;
    drop(ebpf);
    if !in_cluster {
        tracing::info!(iface = %opts.iface, "detached; maps stay pinned under {}", pins.display());
    }
    Ok(())
}

/// Starts the adaptive loop on a thread of its own (its work is map syscalls); it runs until the
/// returned sender is dropped.
fn spawn_adaptive(
    mut tuner: Tuner,
    limits: Arc<PolicyStore>,
) -> anyhow::Result<(mpsc::Sender<()>, std::thread::JoinHandle<()>)> {
    let (stop_tx, stop_rx) = mpsc::channel::<()>();
    let handle = std::thread::Builder::new()
        .name("limiter-adaptive".into())
        .spawn(move || {
            match tuner.adopt_reported() {
                Ok(0) => {}
                Ok(n) => tracing::info!(
                    clients = n,
                    "adaptive: adopted the clients a previous agent tracked"
                ),
                Err(e) => tracing::warn!(
                    "adaptive: adopting tracked clients: {}",
                    crate::error_chain(&e)
                ),
            }
            tracing::info!(
                load = %tuner.load_source(),
                enabled = tuner.controller().config().enabled,
                period = ?tuner.period(),
                "adaptive loop running"
            );
            let mut last = Instant::now();
            let mut failing = false;
            // Until the agent drops the sender (or sends on it).
            while let Err(mpsc::RecvTimeoutError::Timeout) = stop_rx.recv_timeout(tuner.period()) {
                let synced = limits
                    .with_policies(|config, generation| tuner.set_policies(config, generation));
                let now = Instant::now();
                let result = match synced {
                    Ok(Ok(())) => tuner.tick(now - last),
                    Ok(Err(e)) => Err(e),
                    Err(e) => Err(e.into()),
                };
                last = now;
                match result {
                    Ok(report) => {
                        failing = false;
                        tracing::debug!(?report, "adaptive period");
                    }
                    // A period that fails leaves every entry as it was, and takes the caps on
                    // global clients back; logged once per outage.
                    Err(e) => {
                        tuner.clear_global_caps();
                        if !failing {
                            failing = true;
                            tracing::error!(
                                "adaptive period failed: {}; entries keep their windows",
                                crate::error_chain(&e)
                            );
                        }
                    }
                }
            }
        })
        .context("starting the adaptive loop thread")?;
    Ok((stop_tx, handle))
}

/// Raises the open-files limit to its hard limit, logs it, and fits the TCP listeners' caps under
/// it (see [`descriptors`]); returns the soft limit the agent runs with.
fn open_files(opts: &mut AgentOptions) -> u64 {
    let soft = match descriptors::raise() {
        Ok(limit) => {
            if limit.before < limit.soft {
                tracing::info!(
                    "open files: soft limit raised from {} to the hard limit, {}",
                    limit.before,
                    limit.soft
                );
            } else {
                tracing::info!("open files: limit {}", limit.soft);
            }
            limit.soft
        }
        Err(e) => {
            // getrlimit and raising the soft limit to the hard one do not fail on Linux; were
            // they to, assume systemd's default soft limit.
            tracing::warn!("open files: cannot raise RLIMIT_NOFILE: {e}; assuming 1024");
            1024
        }
    };
    let (api, metrics, lowered) = descriptors::fit(
        soft,
        opts.api.listen.map(|_| opts.api.connections.caps),
        opts.metrics.map(|_| opts.metrics_caps),
    );
    if let Some(api) = api {
        opts.api.connections.caps = api;
    }
    if let Some(metrics) = metrics {
        opts.metrics_caps = metrics;
    }
    if let Some(lowered) = lowered {
        tracing::warn!("{lowered}");
    }
    soft
}

/// What the metrics endpoint reads from the maps: the stats read model, the cheap figures under
/// the policy lock, the resident walk on handles of its own outside it, shared with the API's
/// (a walk the API started within the last second serves the scrape too).
struct StoreFigures {
    limits: Arc<PolicyStore>,
    iface: String,
    walks: Arc<Walks>,
}

impl KernelSource for StoreFigures {
    fn figures(&self) -> anyhow::Result<Figures> {
        Ok(self.limits.with_tables(|t| Figures::read(t, &self.iface))?)
    }

    fn resident(&self) -> anyhow::Result<Resident> {
        let now = Instant::now();
        let since = now.checked_sub(Duration::from_secs(1)).unwrap_or(now);
        let resident = self.walks.blocking_resident(since, || {
            let maps = self.limits.with_tables(|t| t.client_maps())?;
            Resident::count(&maps)
        })?;
        Ok(resident)
    }
}

/// The pacing of periodic snapshots (see [`crate::snapshot::periodic_gap`]).
#[derive(Debug, Default)]
struct SnapshotPace {
    /// The next periodic snapshot starts no earlier (`None`: none taken yet).
    not_before: Option<Instant>,
    /// The interval is stretched (logged when that changes, with hysteresis).
    stretched: bool,
}

impl SnapshotPace {
    /// A periodic snapshot due at `due` (its tick) took `cpu` of its thread's CPU time.
    fn took(&mut self, due: Instant, cpu: Duration, interval: Duration) {
        let gap = crate::snapshot::periodic_gap(interval, cpu);
        self.not_before = due.checked_add(gap).or_else(|| due.checked_add(interval));
        // Stretched when the gap exceeds the interval; back only once 20 times the CPU time is
        // below 80% of the interval, so that a snapshot whose CPU time hovers at interval / 20
        // does not log at every snapshot (a gap over the interval is above that too).
        let stretched = if self.stretched {
            cpu.saturating_mul(crate::snapshot::PERIODIC_CPU_SHARE * 5)
                >= interval.saturating_mul(4)
        } else {
            gap > interval
        };
        if stretched != self.stretched {
            if stretched {
                tracing::info!(
                    cpu = ?cpu,
                    every = ?gap,
                    "snapshots: one every {gap:.1?} instead of --snapshot-interval {interval:?}, so that they take at most 1/{} of a CPU",
                    crate::snapshot::PERIODIC_CPU_SHARE
                );
            } else {
                tracing::info!("snapshots: back to one every {interval:?}");
            }
            self.stretched = stretched;
        }
    }
}

/// This thread's CPU time (user and system).
fn thread_cpu() -> Duration {
    Duration::from_nanos(crate::stats::clock_ns(libc::CLOCK_THREAD_CPUTIME_ID))
}

/// Captures the client maps and writes the snapshot atomically; returns the CPU time this thread spent on
/// it, whether or not it succeeded.
fn take_snapshot(fds: &[OwnedFd], path: &Path) -> (Duration, anyhow::Result<()>) {
    let started = Instant::now();
    let cpu = thread_cpu();
    let result = (|| {
        let maps: Vec<_> = fds.iter().map(|fd| fd.as_fd()).collect();
        let snapshot =
            Snapshot::capture(&maps, Clocks::now()).context("reading the client maps")?;
        snapshot.write(path)?;
        anyhow::Ok(snapshot.entries.len())
    })();
    let cpu = thread_cpu().saturating_sub(cpu);
    let result = result.map(|clients| {
        tracing::debug!(clients, took = ?started.elapsed(), cpu = ?cpu, path = %path.display(), "snapshot written");
    });
    (cpu, result)
}

/// The most entries a snapshot restored into this agent's maps can usefully hold: the dynamic
/// clients (`--max-clients`), the exact-address ones and the held limited ones (`--max-limited`).
/// A bigger file is refused unread.
fn snapshot_capacity(opts: &AgentOptions) -> u64 {
    u64::from(opts.max_clients) + MAX_STATIC_CLIENTS as u64 + u64::from(opts.max_limited)
}

/// On fresh maps (nothing pinned to adopt), restores client state from the snapshot if there is
/// a usable one (at most `max_entries` entries, see [`snapshot_capacity`]).
fn restore(
    tables: &mut Tables,
    path: &Path,
    max_entries: u64,
) -> Result<(), datapath::DatapathError> {
    if tables.map_config()?.generation != 0 {
        return Ok(()); // adopted pinned maps: they are newer than any snapshot
    }
    let snapshot = match Snapshot::load(path, max_entries) {
        Ok(Some(snapshot)) => snapshot,
        Ok(None) => return Ok(()),
        Err(e) => {
            tracing::warn!("not restoring: {}", crate::error_chain(&e));
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

/// The cluster member's status for the metrics (the node the cluster task publishes, if any).
struct MemberFigures(tokio::sync::watch::Receiver<Option<crate::cluster::node::Node>>);

impl ClusterSource for MemberFigures {
    fn status(&self) -> Option<crate::proto::ClusterStatus> {
        self.0.borrow().as_ref().map(|node| node.figures())
    }
}

/// How long after the maps refused the rate limit service's limits its files are tried again
/// though they did not change (the refusal may have passed: the policies' own config may leave
/// room by then).
const RLS_REFUSED_RETRY: Duration = Duration::from_secs(10);

/// Re-reads the rate limit service's config (`force`: even if its files did not change) and
/// hands the global limits of its rules to the policies, which put it in force with them (see
/// [`PolicyStore::set_service_global`]); if the maps refuse them, the config in force stays and
/// the files are tried again when they change, on SIGHUP, or after [`RLS_REFUSED_RETRY`].
fn reload_service(limits: &PolicyStore, rls: &rls::RlsStore, force: bool) {
    let Some(reread) = rls.reread(force) else {
        return;
    };
    let global = reread.global_policies(rls);
    let fingerprint = reread.fingerprint();
    if let Err(e) = limits.set_service_global(global, || rls.install(reread)) {
        rls.refused(fingerprint, Instant::now() + RLS_REFUSED_RETRY);
        tracing::error!(
            "the rate limit service's limits across the cluster were not applied: {}; its \
             config in force stays in force (its files are tried again when they change, on \
             SIGHUP, or in {} s)",
            crate::error_chain(&e),
            RLS_REFUSED_RETRY.as_secs()
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The next periodic snapshot is due 20 x the last one's CPU time after the last one's
    /// tick, or an interval; the stretch is switched off only well below the threshold, so CPU
    /// times hovering at interval / 20 do not flip it at every snapshot.
    #[test]
    fn snapshot_pace_stretches_with_hysteresis() {
        let interval = Duration::from_secs(5);
        let due = Instant::now();
        let mut pace = SnapshotPace::default();
        pace.took(due, Duration::from_millis(10), interval);
        assert_eq!(pace.not_before, Some(due + interval));
        assert!(!pace.stretched);
        pace.took(due, Duration::from_millis(600), interval);
        assert_eq!(pace.not_before, Some(due + Duration::from_secs(12)));
        assert!(pace.stretched);
        // Just under the threshold (20 x 240 ms = 4.8 s): the interval, still flagged stretched.
        pace.took(due, Duration::from_millis(240), interval);
        assert_eq!(pace.not_before, Some(due + interval));
        assert!(pace.stretched);
        // At 80% of it (20 x 200 ms = 4 s): still stretched; just under: back.
        pace.took(due, Duration::from_millis(200), interval);
        assert!(pace.stretched);
        pace.took(due, Duration::from_millis(199), interval);
        assert!(!pace.stretched);
        // Just under the threshold again: not stretched.
        pace.took(due, Duration::from_millis(240), interval);
        assert!(!pace.stretched);
    }
}
