//! The agent's side of the cluster: the incarnation kept in `--state-dir`, the node started with
//! the agent (or by a reload that adds the `cluster:` section), reloads of the section, and the
//! share views the node hands to the policy store.

use std::{
    path::{Path, PathBuf},
    sync::{Arc, Mutex},
};

use anyhow::Context as _;
use tokio::{sync::watch, task::JoinHandle};

use limiter_common::{ClientState, Grant, addr::ClientKey};

use crate::{
    api::auth::read_token,
    check::{Checker, PolicyView},
    cluster::{
        ClusterPolicies, PolicyName, WireNames,
        config::ClusterConfig,
        membership::{Phase, ShareView},
        node::{Credentials, Datapath, Entry, GrantsError, Node, ShareSink, TlsMaterial, Under},
    },
    datapath::ClusterMaps,
    limits::{GlobalNames, PolicyStore},
    metrics::Counters,
    state_file,
};

/// `IFACE.incarnation` in the state directory: a counter incremented at each start, so that
/// peers tell this run's messages from an earlier run's without comparing clocks.
pub fn incarnation_path(state_dir: &Path, iface: &str) -> PathBuf {
    state_dir.join(format!("{iface}.incarnation"))
}

/// Reads the incarnation the last start left (0 if none), and stores and returns the next. A
/// file that does not hold a number is an error naming it: the counter must never go back.
pub fn next_incarnation(path: &Path) -> anyhow::Result<u64> {
    let last = match std::fs::read_to_string(path) {
        Ok(text) => text.trim().parse::<u64>().with_context(|| {
            format!(
                "{} does not hold a number (the cluster incarnation counter); remove it only \
                 if this node's peers have forgotten it (after 10 × peer_timeout, at least 10 s)",
                path.display()
            )
        })?,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => 0,
        Err(e) => return Err(e).with_context(|| format!("reading {}", path.display())),
    };
    let next = last
        .checked_add(1)
        .with_context(|| format!("{}: the counter is at its maximum", path.display()))?;
    state_file::write_atomic(path, format!("{next}\n").as_bytes())
        .with_context(|| format!("writing {}", path.display()))?;
    Ok(next)
}

/// The agreed member count last in force, kept beside the incarnation as
/// `IFACE.cluster-members`, so that a restart counts at least as many members for a while (a
/// member added in a rolling change this node's config does not list yet). The count `path`
/// holds, if any; a file that does not hold one is reported and ignored.
fn previous_members(path: &Path) -> Option<u32> {
    let text = std::fs::read_to_string(path).ok()?;
    match text.trim().parse() {
        Ok(n) => Some(n),
        Err(_) => {
            tracing::error!(
                "{} does not hold a member count; ignored (this start counts only the members \
                 it finds)",
                path.display()
            );
            None
        }
    }
}

/// The node of a running agent, if its config has a `cluster:` section.
pub struct Member {
    node: Mutex<Option<Running>>,
    incarnation_path: PathBuf,
    /// The maps enrolment uses, handed to each node started.
    maps: Arc<Mutex<ClusterMaps>>,
    /// The checker: the API IDs of global policies that checks found hot (as dropped packets
    /// report addresses), and the policies IDs resolve to.
    checker: Arc<Checker>,
    global_caps: Arc<crate::adaptive::GlobalCaps>,
    max_global_clients: usize,
    /// The running node, for the API's `Cluster.Status`.
    published: watch::Sender<Option<Node>>,
    /// Why the config's section is not taken up, while it is not (`Cluster.Status` says it).
    error: watch::Sender<Option<String>>,
    counters: Arc<Counters>,
}

struct Running {
    node: Node,
    stop: watch::Sender<bool>,
}

/// A node made at start, with its listener bound, before the maps are written.
pub struct Prepared {
    node: Node,
    listener: tokio::net::TcpListener,
    /// Where the agreed member count is kept.
    members_path: PathBuf,
    /// Where the incarnation that last passed the join gate (and its hold) is kept.
    joined_path: PathBuf,
    incarnation: u64,
    /// The token the node was made with (what the token file held when it was read).
    token: Option<String>,
    /// The policies the node was made with.
    policies: ClusterPolicies,
}

impl Prepared {
    /// Binds `cluster.listen`, reads the token and the incarnation; `adopted`: the agent took
    /// over pinned maps.
    pub async fn new(
        config: &ClusterConfig,
        policies: ClusterPolicies,
        incarnation_path: &Path,
        adopted: bool,
        max_global_clients: usize,
    ) -> anyhow::Result<Prepared> {
        let listener = Node::bind(config).await?;
        let credentials = credentials(config)?;
        // Before the incarnation: a section retried every few seconds must not spend one on
        // each failed try.
        Node::check(&credentials).context("cluster")?;
        let incarnation = next_incarnation(incarnation_path)?;
        // Pins alone do not show that their shares are safe to continue with: a run started
        // without pins creates them at once, and if it stopped before its join gate and hold
        // were over, raises granted for fewer members (or while it was counted at a cut) may
        // still be in force. Only the pins of a run that passed them are continued at once.
        let joined_path = joined_path(incarnation_path);
        // Taken, not just read: this run writes it again once it has passed the gate (and the
        // hold), so a marker can only ever vouch for the run right before the next.
        let previous = previous_joined(&joined_path);
        forget_joined(incarnation_path);
        let adopted = adopted && previous == Some(incarnation - 1);
        let node = Node::new(
            config,
            &credentials,
            incarnation,
            adopted,
            policies.clone(),
            max_global_clients,
        )
        .context("cluster")?;
        // Beside the incarnation: IFACE.incarnation -> IFACE.cluster-members.
        let members_path = incarnation_path.with_extension("cluster-members");
        if let Some(before) = previous_members(&members_path) {
            node.set_floor(before);
        }
        tracing::info!(
            node_id = %config.node_id,
            listen = %config.listen,
            peers = config.peers.len(),
            incarnation,
            partition = %config.partition,
            "cluster: member of a cluster"
        );
        if adopted {
            // Continuing at once: this run has passed the gate (none to pass).
            write_joined(&joined_path, incarnation);
        }
        Ok(Prepared {
            node,
            listener,
            members_path,
            joined_path,
            incarnation,
            token: credentials.token,
            policies,
        })
    }

    /// The share view the maps start with.
    pub fn share_view(&self) -> ShareView {
        self.node.share_view()
    }
}

/// The token `cluster.token_file` holds, if the section names one.
fn token(config: &ClusterConfig) -> anyhow::Result<Option<String>> {
    config
        .token_file
        .as_deref()
        .map(read_token)
        .transpose()
        .context("cluster.token_file")
}

/// Reads the token and the TLS files the section names; with TLS, this node's certificate must
/// name its `node_id` (its peers check that it speaks only as itself).
fn credentials(config: &ClusterConfig) -> anyhow::Result<Credentials> {
    let token = token(config)?;
    let tls = match &config.tls {
        None => None,
        Some(tls) => {
            let read = |p: &Path| {
                std::fs::read(p).with_context(|| format!("cluster.tls: reading {}", p.display()))
            };
            let cert = read(&tls.cert)?;
            let cn = crate::certificate::pem_common_name(&cert)
                .map_err(|e| anyhow::anyhow!("cluster.tls.cert {}: {e}", tls.cert.display()))?;
            if cn.as_deref() != Some(config.node_id.as_str()) {
                anyhow::bail!(
                    "cluster.tls.cert {} names {:?}, not this node's node_id {:?}: a peer's \
                     certificate names it (common name), since peers accept a heartbeat only from \
                     the node its certificate names",
                    tls.cert.display(),
                    cn.unwrap_or_default(),
                    config.node_id.as_str()
                );
            }
            Some(TlsMaterial {
                cert,
                key: read(&tls.key)?,
                ca: read(&tls.client_ca)?,
                server_name: tls.server_name.clone(),
            })
        }
    };
    Ok(Credentials { token, tls })
}

/// `IFACE.cluster-joined` beside `IFACE.incarnation`: the incarnation that passed the join gate
/// and its hold (or continued at once), while it runs and after it stopped.
fn joined_path(incarnation_path: &Path) -> PathBuf {
    incarnation_path.with_extension("cluster-joined")
}

/// The incarnation `path` (`IFACE.cluster-joined`) says last passed the join gate, if any.
fn previous_joined(path: &Path) -> Option<u64> {
    std::fs::read_to_string(path).ok()?.trim().parse().ok()
}

/// Removes the join marker: this agent is not a member now (no `cluster:` section, or it was
/// removed), so its peers will forget it, and its next start as a member must join again.
pub fn forget_joined(incarnation_path: &Path) {
    let path = joined_path(incarnation_path);
    match std::fs::remove_file(&path) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => tracing::error!(
            "cluster: removing the join marker {}: {e} (the next start may continue at once)",
            path.display()
        ),
    }
}

/// Records that run `incarnation` passed the join gate and its hold (or continued at once).
fn write_joined(path: &Path, incarnation: u64) {
    if let Err(e) = state_file::write_atomic(path, format!("{incarnation}\n").as_bytes()) {
        tracing::error!(
            "cluster: keeping the join in {} (the next start will join again): {}",
            path.display(),
            crate::error_chain(&e)
        );
    }
}

fn sink(limits: &Arc<PolicyStore>, counters: &Arc<Counters>, prepared: &Prepared) -> ShareSink {
    let (limits, counters) = (limits.clone(), counters.clone());
    let members_path = prepared.members_path.clone();
    let (joined_path, incarnation) = (prepared.joined_path.clone(), prepared.incarnation);
    let joined = std::sync::atomic::AtomicBool::new(false);
    Arc::new(move |view: ShareView| match limits.set_share_view(view) {
        // The section is gone (a reload removed it): this node is stopping.
        Ok(false) => false,
        Ok(true) => {
            show(&counters, Some(view));
            if view.phase != Phase::Joining
                && !joined.swap(true, std::sync::atomic::Ordering::Relaxed)
            {
                write_joined(&joined_path, incarnation);
            }
            let text = format!("{}\n", view.members);
            if let Err(e) = state_file::write_atomic(&members_path, text.as_bytes()) {
                tracing::error!(
                    "cluster: keeping the member count in {}: {}",
                    members_path.display(),
                    crate::error_chain(&e)
                );
            }
            true
        }
        Err(e) => {
            tracing::error!(
                "cluster: applying the shares of {} members (retried at the next sync \
                 interval): {}",
                view.members,
                crate::error_chain(&e)
            );
            false
        }
    })
}

/// The cluster gauges for `view` (`None`: not a member).
fn show(counters: &Counters, view: Option<ShareView>) {
    let (members, phase) = view.map_or((0, None), |v| (i64::from(v.members), Some(v.phase)));
    counters.cluster_members.set(members);
    counters
        .cluster_cut_off
        .set(i64::from(phase == Some(Phase::CutOff)));
    counters
        .cluster_joining
        .set(i64::from(phase == Some(Phase::Joining)));
}

impl Member {
    /// Starts the prepared node, if any, and follows the `cluster:` section through reloads
    /// until `stop` turns true.
    pub fn start(
        prepared: Option<Prepared>,
        limits: &Arc<PolicyStore>,
        counters: &Arc<Counters>,
        enrolment: Enrolling,
        published: watch::Sender<Option<Node>>,
        error: watch::Sender<Option<String>>,
        stop: watch::Receiver<bool>,
    ) -> (Arc<Member>, JoinHandle<()>) {
        let membership = Arc::new(Member {
            node: Mutex::new(None),
            incarnation_path: enrolment.incarnation_path,
            maps: Arc::new(Mutex::new(enrolment.maps)),
            checker: enrolment.checker,
            global_caps: enrolment.global_caps,
            max_global_clients: enrolment.max_global_clients,
            published,
            error,
            counters: counters.clone(),
        });
        let token = prepared.as_ref().and_then(|p| p.token.clone());
        // The API serves before the node starts: a change of the policies since the node was
        // made (a global policy set through it) reaches the node as a change, not only with
        // the next one.
        let mut policies = limits.cluster_policies();
        if prepared
            .as_ref()
            .is_some_and(|p| *policies.borrow() != p.policies)
        {
            policies.mark_changed();
        }
        if let Some(p) = prepared {
            membership.run(p, limits);
        }
        let task = tokio::spawn(follow(
            membership.clone(),
            limits.clone(),
            policies,
            token,
            stop,
        ));
        (membership, task)
    }

    fn run(&self, prepared: Prepared, limits: &Arc<PolicyStore>) {
        let (stop, stop_rx) = watch::channel(false);
        show(&self.counters, Some(prepared.node.share_view()));
        let sink = sink(limits, &self.counters, &prepared);
        prepared.node.set_datapath(Box::new(Maps {
            maps: self.maps.clone(),
            checker: self.checker.clone(),
            caps: self.global_caps.clone(),
            caps_seen: 0,
            primed: false,
            names: limits.global_names(),
            unnamed: Vec::new(),
            deferred: Deferred::default(),
            max_unnamed: self.max_global_clients,
        }));
        let tasks = prepared.node.run(prepared.listener, sink, stop_rx);
        drop(tasks);
        self.published.send_replace(Some(prepared.node.clone()));
        *self.node.lock().unwrap_or_else(|e| e.into_inner()) = Some(Running {
            node: prepared.node,
            stop,
        });
    }

    /// The section could not be taken up: says why, once until the reason changes (it is tried
    /// again every [`RETRY`]).
    fn not_taken_up(&self, why: String) {
        self.error.send_if_modified(|e| {
            if e.as_deref() == Some(why.as_str()) {
                return false;
            }
            tracing::error!("cluster: {why}");
            *e = Some(why);
            true
        });
    }

    /// The section in force is the config's (or there is none).
    fn taken_up(&self) {
        self.error.send_if_modified(|e| {
            if e.take().is_some() {
                tracing::info!("cluster: the section is taken up now");
                return true;
            }
            false
        });
    }

    /// The running node, if any.
    pub fn node(&self) -> Option<Node> {
        self.node
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .as_ref()
            .map(|r| r.node.clone())
    }

    /// Stops the node (its listener and heartbeats).
    /// Stops the node. A share view it is writing meanwhile cannot land after the agent's
    /// own: `PolicyStore::set_share_view` writes nothing once the config in force has no
    /// `cluster:` section, checked under the store's writer lock, which the reload holds too.
    fn stop_node(&self) {
        if let Some(running) = self.node.lock().unwrap_or_else(|e| e.into_inner()).take() {
            let _ = running.stop.send(true);
        }
        self.published.send_replace(None);
        show(&self.counters, None);
    }
}

/// How often a section that could not be taken up is tried again, and the token file read
/// for a new token.
const RETRY: std::time::Duration = std::time::Duration::from_secs(2);

/// Follows reloads: the section's changes go to the running node; a section added starts one
/// (joining: it admits nothing of global policies until counted); one removed stops it. A
/// section that cannot be taken up (its token file missing, its port taken) is tried again every
/// [`RETRY`], so that fixing the cause is enough (the config need not change); the token file is
/// read as often, so that a new token takes effect without a change of the config either.
async fn follow(
    membership: Arc<Member>,
    limits: Arc<PolicyStore>,
    mut policies: watch::Receiver<ClusterPolicies>,
    mut token_in_force: Option<String>,
    mut stop: watch::Receiver<bool>,
) {
    let mut retry = tokio::time::interval(RETRY);
    retry.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            changed = policies.changed() => if changed.is_err() { break },
            _ = retry.tick() => {
                let failed = membership.error.borrow().is_some();
                let config = policies.borrow().config.clone();
                let new_token = match (&config, membership.node()) {
                    (Some(config), Some(_)) => token(config).ok().flatten(),
                    _ => token_in_force.clone(),
                };
                if !failed && new_token == token_in_force {
                    continue;
                }
            }
            _ = stop.wait_for(|s| *s) => break,
        }
        let current = policies.borrow_and_update().clone();
        match (&current.config, membership.node()) {
            (Some(config), Some(node)) => {
                let reconfigured = token(config).and_then(|token| {
                    node.reconfigure(config, token.as_deref(), current.clone())?;
                    Ok(token)
                });
                // The section removed and added again by reloads this task saw as one: the
                // store took the second for a section added and wrote a joining view, which
                // admits nothing of global policies, and the node, whose view did not change,
                // would never write another.
                // The node's view first: a round writes the maps, then its view.
                let in_force = node.share_view();
                let held = limits.share_view();
                if held != in_force {
                    node.maps_hold(in_force, held);
                }
                match reconfigured {
                    Ok(token) => {
                        token_in_force = token;
                        membership.taken_up();
                        tracing::info!(peers = config.peers.len(), "cluster: section reloaded")
                    }
                    Err(e) => membership.not_taken_up(format!(
                        "the reloaded section is not taken up: {e:#}; the one in force stays"
                    )),
                }
            }
            (Some(config), None) => {
                match Prepared::new(
                    config,
                    current.clone(),
                    &membership.incarnation_path,
                    false,
                    membership.max_global_clients,
                )
                .await
                {
                    Ok(prepared) => {
                        token_in_force = prepared.token.clone();
                        let view = prepared.share_view();
                        let limits2 = limits.clone();
                        let _ =
                            tokio::task::spawn_blocking(move || limits2.set_share_view(view)).await;
                        membership.run(prepared, &limits);
                        membership.taken_up();
                    }
                    Err(e) => membership.not_taken_up(format!(
                        "the added section is not taken up: {e:#}; global policies admit \
                         nothing here until it is fixed"
                    )),
                }
            }
            (None, Some(_)) => {
                membership.stop_node();
                membership.taken_up();
                forget_joined(&membership.incarnation_path);
                let limits = limits.clone();
                let _ = tokio::task::spawn_blocking(move || limits.alone_without_cluster()).await;
                tracing::info!("cluster: section removed; this agent limits alone");
            }
            (None, None) => {
                membership.taken_up();
                // A section added and not taken up (above) left the shares as a joining node's,
                // which admit nothing of a global limit (the rate limit service's rules under
                // `--rls-scope global` have no other way out): with the section gone again, this
                // agent limits alone.
                let limits = limits.clone();
                if let Ok(Ok(true)) =
                    tokio::task::spawn_blocking(move || limits.alone_without_cluster()).await
                {
                    tracing::info!("cluster: section removed; this agent limits alone");
                }
            }
        }
    }
    membership.stop_node();
}

/// What every node the agent starts needs besides its config.
pub struct Enrolling {
    /// `IFACE.incarnation` in the state directory.
    pub incarnation_path: PathBuf,
    /// The maps of enrolment.
    pub maps: ClusterMaps,
    /// The checker: its API IDs of global policies that checks found hot, and the policies
    /// it resolves IDs to.
    pub checker: Arc<Checker>,
    /// The adaptive loop's caps on global clients.
    pub global_caps: Arc<crate::adaptive::GlobalCaps>,
    /// `--max-global-clients`.
    pub max_global_clients: usize,
}

/// Enrolment's view of the agent's maps.
struct Maps {
    maps: Arc<Mutex<ClusterMaps>>,
    /// The API IDs that checks found hot, and the policies IDs resolve to (see [`under`]).
    checker: Arc<Checker>,
    caps: Arc<crate::adaptive::GlobalCaps>,
    /// The version of `caps` last handed to enrolment.
    caps_seen: u64,
    /// The clients already in `LIMITED` were offered as hot (at the node's first round: those a
    /// previous run, or the time before the node started, left there).
    primed: bool,
    /// Names clients' policies (see [`GlobalNames`]).
    names: Arc<GlobalNames>,
    /// Hot notices read while the policies changed, named at the next round.
    unnamed: Vec<ClientKey>,
    /// Hot notices whose entry was under no policy known yet, read again at the next rounds.
    deferred: Deferred,
    /// Most of either kept.
    max_unnamed: usize,
}

/// The rounds a hot notice whose entry is under no policy known yet ([`Under::Unknown`]: one
/// resolved before a reload, an ID's renumbered by it) is read again before it is dropped: by
/// then a packet or check of the client has resolved it, if it still comes. A client that stays
/// hot is reported again anyway (a crossing per window, paced denials); this only saves it the
/// wait.
const DEFERRED_ROUNDS: u8 = 20;

/// Hot notices whose entry was under no policy known yet, each with the rounds it was read in.
#[derive(Debug, Default)]
struct Deferred(std::collections::HashMap<ClientKey, u8>);

impl Deferred {
    /// The clients to read again this round.
    fn clients(&self) -> impl Iterator<Item = ClientKey> + '_ {
        self.0.keys().copied()
    }

    fn contains(&self, client: &ClientKey) -> bool {
        self.0.contains_key(client)
    }

    /// Sorts the notices read this round (each client once, with the policy its entry is under,
    /// `None` without an entry): those under a global policy are returned; those under no
    /// policy known yet are kept for the next round, each for [`DEFERRED_ROUNDS`] rounds in all
    /// and at most `max` of them; the rest are dropped.
    fn sort(
        &mut self,
        notices: impl IntoIterator<Item = (ClientKey, Option<Under>)>,
        max: usize,
    ) -> Vec<(ClientKey, PolicyName)> {
        let before = std::mem::take(&mut self.0);
        let mut hot = Vec::new();
        for (client, under) in notices {
            match under {
                Some(Under::Global(policy)) => hot.push((client, policy)),
                Some(Under::Unknown) => {
                    let rounds = before.get(&client).copied().unwrap_or(0) + 1;
                    if rounds < DEFERRED_ROUNDS && self.0.len() < max {
                        self.0.insert(client, rounds);
                    }
                }
                Some(Under::Local) | None => {}
            }
        }
        hot
    }
}

impl Maps {
    fn lock(&self) -> std::sync::MutexGuard<'_, ClusterMaps> {
        self.maps.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The entries of `clients` with the policies they are under now; `None` if the policies
    /// changed while they were read (the entries alone then, under `Under::Unknown`).
    fn read(&self, clients: &[ClientKey]) -> (Vec<Option<Entry>>, bool) {
        let read = |named: Option<Names<'_>>| -> Vec<Option<Entry>> {
            let entries = self.lock().entries(clients);
            clients
                .iter()
                .zip(entries)
                .map(|(key, entry)| {
                    let (state, id) = entry?;
                    Some(Entry {
                        state,
                        under: named.map_or(Under::Unknown, |n| under(n, key, &state, id)),
                    })
                })
                .collect()
        };
        // The checker's view is read within the bracket: a change sets it before it is done.
        match self.names.read(|generation, names| {
            read(Some(Names {
                generation,
                names,
                view: &self.checker.view(),
            }))
        }) {
            Some(entries) => (entries, true),
            None => (read(None), false),
        }
    }
}

/// The policies in force, as one change left them: the maps' generation, the global policies'
/// names, and the checker's view (which resolves API IDs).
#[derive(Clone, Copy)]
struct Names<'a> {
    generation: u32,
    names: &'a WireNames,
    view: &'a PolicyView,
}

/// The policy the entry `state` of client `key` (`id`: an API ID's or the rate limit service's,
/// in the `NAMED` maps) is under now.
///
/// An address's entry records the generation it was resolved at: one of another generation is
/// unknown until its next packet resolves it. An ID's entry carries no generation: its policy
/// is the one its last check resolved, and a reload that renumbers the config's policies (one
/// added above it) leaves the id it holds standing for another policy until its next check. So
/// an id of the config's is taken only if a check of that ID resolves to it now (its exact-ID
/// policy's, else the default's), and is unknown otherwise. The rate limit service's ids are
/// drawn from its limits, which come into force within the change (see
/// `PolicyStore::set_service_global`); one held across a reload that moved it on a collision's
/// path is named by what it stands for now until its next check.
fn under(n: Names<'_>, key: &ClientKey, state: &ClientState, id: bool) -> Under {
    let policy = state.policy();
    let current = if id {
        usize::from(policy) > crate::config::MAX_POLICIES || n.view.id_policy(key) == policy
    } else {
        state.is_current(n.generation)
    };
    if !current {
        return Under::Unknown;
    }
    n.names.name(policy).map_or(Under::Local, Under::Global)
}

impl Datapath for Maps {
    fn hot(&mut self) -> Vec<(ClientKey, PolicyName)> {
        let primed = std::mem::replace(&mut self.primed, true);
        let mut hot = std::mem::take(&mut self.unnamed);
        {
            let mut maps = self.lock();
            hot.extend(maps.hot());
            if !primed {
                hot.extend(maps.limited());
            }
        }
        hot.extend(self.checker.hot_ids().take());
        hot.extend(self.deferred.clients());
        // Once each: a client over its limit for long is reported again and again (paced),
        // and each notice costs the round a lookup in every client map.
        hot.sort_unstable();
        hot.dedup();
        let (entries, named) = self.read(&hot);
        if !named {
            // Named at the next round (at most --max-global-clients of them are kept); the
            // deferred ones are read again from `deferred`, and take no room here.
            hot.retain(|c| !self.deferred.contains(c));
            hot.truncate(self.max_unnamed);
            self.unnamed = hot;
            return Vec::new();
        }
        let notices = hot
            .into_iter()
            .zip(entries)
            .map(|(client, entry)| (client, entry.map(|e| e.under)));
        self.deferred.sort(notices, self.max_unnamed)
    }

    fn entries(&mut self, clients: &[ClientKey]) -> Vec<Option<Entry>> {
        self.read(clients).0
    }

    fn caps(&mut self) -> Option<std::collections::HashMap<ClientKey, u32>> {
        let (version, caps) = self.caps.changed_since(self.caps_seen)?;
        self.caps_seen = version;
        Some(caps)
    }

    fn write(&mut self, writes: &[(ClientKey, Option<Grant>)]) -> Vec<(usize, GrantsError)> {
        self.lock()
            .write(writes)
            .into_iter()
            .map(|(i, e)| (i, GrantsError(crate::error_chain(&e))))
            .collect()
    }

    fn grants(&self) -> Result<Vec<crate::cluster::enrolment::PinnedGrant>, GrantsError> {
        Ok(self
            .lock()
            .grants()
            .map_err(|e| GrantsError(crate::error_chain(&e)))?
            .into_iter()
            .map(|(client, g)| crate::cluster::enrolment::PinnedGrant {
                client,
                value: g.value,
                until: (g.until_ns != 0).then(|| std::time::Duration::from_nanos(g.until_ns)),
                silence: (g.silence_ms != 0)
                    .then(|| std::time::Duration::from_millis(u64::from(g.silence_ms))),
            })
            .collect())
    }
}

#[cfg(test)]
mod tests {
    use std::str::FromStr as _;

    use super::*;
    use crate::{check::ClientId, config::Config, limits::policies_for_cluster};

    /// A hot notice whose entry is under no policy known yet is read again at the next rounds,
    /// and taken up once its entry is resolved; a bounded number of rounds, and of notices.
    #[test]
    fn a_hot_notice_under_no_known_policy_is_read_again_for_a_while() {
        let key = |i: u8| -> ClientKey { [i; 16] };
        let policy: PolicyName = 7;
        let mut deferred = Deferred::default();
        let hot = deferred.sort(
            [
                (key(1), Some(Under::Unknown)),
                (key(2), Some(Under::Global(policy))),
                (key(3), Some(Under::Local)),
                (key(4), None),
                (key(5), Some(Under::Unknown)),
            ],
            16,
        );
        assert_eq!(hot, vec![(key(2), policy)]);
        let mut again: Vec<ClientKey> = deferred.clients().collect();
        again.sort_unstable();
        assert_eq!(again, vec![key(1), key(5)], "the unknown ones, read again");
        // Resolved by its next packet: taken up; the other stays unknown.
        let hot = deferred.sort(
            [
                (key(1), Some(Under::Global(policy))),
                (key(5), Some(Under::Unknown)),
            ],
            16,
        );
        assert_eq!(hot, vec![(key(1), policy)]);
        assert_eq!(deferred.clients().collect::<Vec<_>>(), vec![key(5)]);
        // Dropped after DEFERRED_ROUNDS rounds in all.
        for _ in 2..DEFERRED_ROUNDS {
            assert!(deferred.clients().any(|c| c == key(5)));
            assert!(
                deferred
                    .sort([(key(5), Some(Under::Unknown))], 16)
                    .is_empty()
            );
        }
        assert_eq!(deferred.clients().count(), 0, "dropped");
        // At most `max` kept.
        let many = (10..20).map(|i| (key(i), Some(Under::Unknown)));
        assert!(deferred.sort(many, 4).is_empty());
        assert_eq!(deferred.clients().count(), 4);
    }

    /// An API ID's entry is named by the policy a check of it resolves to now: after a reload
    /// that put a policy above its own (renumbering them), the id its entry still holds stands
    /// for another global policy until its next check, and is unknown meanwhile, never taken
    /// for that other policy (whose owner's grants would then apply to this client's checks).
    #[test]
    fn an_api_id_s_entry_renumbered_by_a_reload_is_unknown_until_its_next_check() {
        let policy = |name: &str, limit: u32| {
            format!("  - match: {name}\n    limit: {limit}\n    window: 1s\n    scope: global\n")
        };
        let cluster = "cluster:\n  node_id: n1\n  listen: 127.0.0.1:7201\n  peers: [\"127.0.0.1:7202\"]\n  \
                       token_file: /run/limiter/cluster.token\n";
        let before = Config::parse(&format!(
            "default: {{limit: 10, window: 1s}}\n{cluster}policies:\n{}",
            policy("tenant-a", 300)
        ))
        .expect("config");
        let after = Config::parse(&format!(
            "default: {{limit: 10, window: 1s}}\n{cluster}policies:\n{}{}",
            policy("tenant-b", 600),
            policy("tenant-a", 300)
        ))
        .expect("config");
        let wire = |config: &Config| -> (WireNames, PolicyView) {
            let cluster = policies_for_cluster(config, &[]);
            (WireNames::new(&cluster.global), PolicyView::new(config))
        };
        let key = |id: &str| ClientId::from_str(id).expect("an ID").key();
        let entry = |policy: u16| {
            let mut state = ClientState::default();
            state.set_policy(policy);
            state
        };
        let (names_before, view_before) = wire(&before);
        let (names_after, view_after) = wire(&after);
        let at = |names, view| Names {
            generation: 1,
            names,
            view,
        };
        let a = names_before.name(1).expect("tenant-a is global");
        assert_eq!(names_after.name(2), Some(a), "named by content");
        let b = names_after.name(1).expect("tenant-b is global");
        let [ka, kb] = [key("tenant-a"), key("tenant-b")];
        let before = at(&names_before, &view_before);
        assert_eq!(under(before, &ka, &entry(1), true), Under::Global(a));
        let after = at(&names_after, &view_after);
        // Checked before the reload: policy 1, which is tenant-b's now.
        assert_eq!(under(after, &ka, &entry(1), true), Under::Unknown);
        // Its next check writes policy 2.
        assert_eq!(under(after, &ka, &entry(2), true), Under::Global(a));
        assert_eq!(under(after, &kb, &entry(1), true), Under::Global(b));
        // An ID under the default is local.
        assert_eq!(under(after, &key("someone"), &entry(0), true), Under::Local);
        // The rate limit service's ids are its own (not named here: local).
        let service = crate::rls::service::RLS_POLICY_ID;
        assert_eq!(under(after, &ka, &entry(service), true), Under::Local);
    }
}
