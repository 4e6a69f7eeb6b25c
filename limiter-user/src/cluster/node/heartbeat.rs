//! The client side of membership: resolving the `peers` names, and the heartbeat loop that
//! dials every endpoint each `sync_interval`, carries the enrolment messages, takes in the
//! answers and hands the policy store each new share view.

use std::{
    collections::{HashMap, HashSet},
    net::SocketAddr,
    sync::{Arc, Mutex, atomic::Ordering},
    time::{Duration, Instant},
};

use prost::Message as _;
use tokio::sync::watch;
use tonic::transport::{Endpoint, Uri};

use super::{
    MAX_MESSAGE_BYTES, NodeError, RESOLVE_INTERVAL, ShareSink, Shared, Traffic,
    answerer::Answerer,
    enrolment,
    service::{Client, TokenAdd, to_heartbeat, to_report},
};
use crate::{
    cluster::{
        config::PeerAddr,
        membership::{Heard, Membership, Phase, Refusal, ShareView},
    },
    proto::cluster::peer_client::PeerClient,
};

/// Resolves the `peers` names every [`RESOLVE_INTERVAL`]; a failed lookup keeps the addresses
/// it last gave (a DNS hiccup must not shrink the member count).
pub(super) async fn resolve_loop(shared: Arc<Shared>, mut stop: watch::Receiver<bool>) {
    let mut tick = tokio::time::interval(RESOLVE_INTERVAL);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            // Stop first: a tick that is due (an iteration overran the interval) must not run
            // one more iteration, whose view would reach the maps after the agent's own.
            biased;
            _ = stop.wait_for(|s| *s) => return,
            _ = tick.tick() => {}
        }
        let (names, timeout) = {
            let state = shared.lock();
            let names: Vec<PeerAddr> = state
                .config
                .peers
                .iter()
                .filter(|p| !matches!(p, PeerAddr::Socket(_)))
                .cloned()
                .collect();
            (names, state.config.peer_timeout)
        };
        for peer in names {
            let (name, port, all) = match &peer {
                PeerAddr::Host { name, port } => (name.clone(), *port, false),
                PeerAddr::Dns { name, port } => (name.clone(), *port, true),
                PeerAddr::Socket(_) => continue,
            };
            let lookup = tokio::time::timeout(timeout, tokio::net::lookup_host((name, port)));
            let addrs: Vec<SocketAddr> = match lookup.await {
                Ok(Ok(addrs)) => {
                    let mut addrs: Vec<SocketAddr> = addrs.collect();
                    addrs.sort();
                    addrs.dedup();
                    if !all {
                        addrs.truncate(1);
                    }
                    addrs
                }
                Ok(Err(e)) => {
                    tracing::debug!("resolving cluster peer {peer}: {e}");
                    continue;
                }
                Err(_) => {
                    tracing::debug!("resolving cluster peer {peer}: timed out");
                    continue;
                }
            };
            let mut state = shared.lock();
            if !state.config.peers.contains(&peer) {
                continue;
            }
            state.resolved.insert(peer, addrs);
            state.refresh_endpoints();
        }
    }
}

/// Every `sync_interval`: a heartbeat to each endpoint that has none in flight, and the share
/// view handed to the sink when it changed.
pub(super) async fn heartbeat_loop(
    shared: Arc<Shared>,
    sink: ShareSink,
    mut stop: watch::Receiver<bool>,
) {
    let mut clients: HashMap<SocketAddr, Dialled> = HashMap::new();
    let in_flight: Arc<Mutex<HashSet<SocketAddr>>> = Arc::default();
    let mut interval = shared.lock().config.sync_interval;
    let mut tick = tokio::time::interval(interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut differing = ViewsDiffer::default();
    loop {
        tokio::select! {
            // Stop first: a tick that is due (an iteration overran the interval) must not run
            // one more iteration.
            biased;
            _ = stop.wait_for(|s| *s) => return,
            _ = tick.tick() => {}
        }
        let now = Instant::now();
        let (endpoints, timeout, sync_interval, view, previous) = {
            let mut state = shared.lock();
            let view = state.membership.share_view(now);
            let previous = state.view;
            let peer_timeout = state.config.peer_timeout;
            differing.watch(&state.membership, now, peer_timeout);
            let endpoints: Vec<SocketAddr> = state.membership.endpoints().collect();
            (
                endpoints,
                state.config.peer_timeout,
                state.config.sync_interval,
                view,
                previous,
            )
        };
        if view != previous && !*stop.borrow() {
            say_view(&previous, &view);
            let sink = sink.clone();
            // Map writes: off the runtime's workers. The view is in force (and in the status)
            // once they are done.
            let applied = tokio::task::spawn_blocking(move || sink(view))
                .await
                .unwrap_or(false);
            let mut state = shared.lock();
            // Unless the agent said meanwhile that the maps hold another view
            // (`Node::maps_hold`): then the next round writes this one again.
            if applied && state.view == previous {
                state.view = view;
            }
        }
        {
            let shared = shared.clone();
            let _ = tokio::task::spawn_blocking(move || {
                let started = Instant::now();
                enrolment::round(&shared);
                let took = u64::try_from(started.elapsed().as_nanos()).unwrap_or(u64::MAX);
                shared.traffic.rounds.fetch_add(1, Ordering::Relaxed);
                shared.traffic.round_ns.fetch_add(took, Ordering::Relaxed);
            })
            .await;
        }
        if sync_interval != interval {
            interval = sync_interval;
            tick = tokio::time::interval(interval);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        }
        clients.retain(|a, _| endpoints.contains(a));
        for addr in endpoints {
            if !in_flight
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .insert(addr)
            {
                continue;
            }
            let client = match clients.get(&addr) {
                Some(c) => c.clone(),
                None => match client(addr, timeout, &shared) {
                    Ok(c) => clients.entry(addr).or_insert(c).clone(),
                    Err(e) => {
                        tracing::warn!(%addr, "cluster peer: {}", crate::error_chain(&e));
                        in_flight
                            .lock()
                            .unwrap_or_else(|e| e.into_inner())
                            .remove(&addr);
                        continue;
                    }
                },
            };
            let (shared, in_flight) = (shared.clone(), in_flight.clone());
            tokio::spawn(async move {
                heartbeat(&shared, addr, client, timeout).await;
                in_flight
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .remove(&addr);
            });
        }
    }
}

/// A peer address's client, and over TLS who answers there.
#[derive(Clone)]
pub(super) struct Dialled {
    client: Client,
    answerer: Option<Arc<Answerer>>,
}

pub(super) fn client(
    addr: SocketAddr,
    timeout: Duration,
    shared: &Arc<Shared>,
) -> Result<Dialled, NodeError> {
    // From the listen address when it is a specific one of the same family: the peer then
    // sees this node's heartbeats come from where it answers (and a firewall rule on that
    // address cuts both ways).
    let listen = shared.lock().config.listen.ip();
    let local = (!listen.is_unspecified() && listen.is_ipv4() == addr.is_ipv4()).then_some(listen);
    let endpoint = Endpoint::from_shared(format!("http://{addr}"))
        .map_err(|source| NodeError::Uri { addr, source })?
        .connect_timeout(timeout)
        .timeout(timeout);
    let mut answerer = None;
    let channel = match &shared.tls {
        // The connection is the answerer's own, so that it knows who answers (answerer.rs).
        Some(tls) => {
            let dialler = tls.dialler()?;
            let answers = Arc::new(Answerer::default());
            answerer = Some(answers.clone());
            endpoint.connect_with_connector_lazy(tower::service_fn(move |_: Uri| {
                let (dialler, answers) = (dialler.clone(), answers.clone());
                async move { dialler.connect(addr, local, timeout, &answers).await }
            }))
        }
        None => endpoint
            .local_address(local)
            .tcp_nodelay(true)
            .connect_lazy(),
    };
    Ok(Dialled {
        client: PeerClient::with_interceptor(channel, TokenAdd(shared.clone()))
            .max_decoding_message_size(MAX_MESSAGE_BYTES)
            .max_encoding_message_size(MAX_MESSAGE_BYTES),
        answerer,
    })
}

async fn heartbeat(shared: &Shared, addr: SocketAddr, dialled: Dialled, timeout: Duration) {
    let Dialled {
        mut client,
        answerer,
    } = dialled;
    let sent = Instant::now();
    let seq = shared.next_seq();
    let (mut request, node) = {
        let state = shared.lock();
        (
            to_heartbeat(
                state
                    .membership
                    .report(shared.incarnation, seq, sent, &state.view),
                0,
                shared,
            ),
            state.membership.endpoint_node(addr).cloned(),
        )
    };
    let mut carried = None;
    if let Some(node) = node {
        request.to_node_id = node.to_string();
        carried = enrolment::attach_outgoing(shared, &node, &mut request);
    }
    // No answer (a timeout, a broken connection): what it carried waits for the next one.
    let unanswered = |carried: Option<enrolment::Taken>| {
        if let Some(taken) = carried {
            enrolment::put_back_outgoing(shared, taken);
        }
    };
    let traffic = &shared.traffic;
    Traffic::add(&traffic.bytes_sent, request.encoded_len());
    // Half of peer_timeout: one stalled call (a lost SYN) leaves room for another within it.
    let answer = match tokio::time::timeout(timeout / 2, client.heartbeat(request)).await {
        Ok(Ok(answer)) => answer.into_inner(),
        Ok(Err(status))
            if matches!(
                status.code(),
                tonic::Code::FailedPrecondition
                    | tonic::Code::InvalidArgument
                    | tonic::Code::Unauthenticated
                    | tonic::Code::PermissionDenied
            ) =>
        {
            // Refused as a member (another node uses this id), for what it sent (a member
            // count the peer cannot take) or not authenticated (the tokens differ, or the
            // certificate does not name the node): worth an operator's eye, once
            // a minute rather than at every heartbeat. Keyed by the code, not the message,
            // which a peer may vary at will.
            if shared.say(format!("refused {addr}"), &format!("{:?}", status.code())) {
                tracing::warn!(
                    %addr,
                    "cluster heartbeat refused ({:?}): {}",
                    status.code(),
                    status.message()
                );
            }
            Traffic::add(&traffic.heartbeats_failed, 1);
            return;
        }
        Ok(Err(status)) => {
            tracing::debug!(%addr, "cluster heartbeat: {}", status.message());
            Traffic::add(&traffic.heartbeats_failed, 1);
            unanswered(carried);
            return;
        }
        Err(_) => {
            Traffic::add(&traffic.heartbeats_failed, 1);
            unanswered(carried);
            return;
        }
    };
    Traffic::add(&traffic.bytes_received, answer.encoded_len());
    // Over mutual TLS an answer speaks only as the certificate the peer presented, as a
    // heartbeat does (see `answerer.rs`): nothing of it is taken in otherwise.
    if let Some(name) = answerer.as_ref().map(|a| a.name())
        && name.as_deref() != Some(answer.node_id.as_str())
    {
        let name = name.map_or_else(|| "no common name".to_owned(), |n| format!("{n:?}"));
        if shared.say(format!("answer certificate of {addr}"), &answer.node_id) {
            tracing::warn!(
                %addr,
                "cluster peer answered as node_id {:?} but its certificate names {name}: a \
                 peer answers only as itself; the answer is ignored",
                answer.node_id
            );
        }
        Traffic::add(&traffic.heartbeats_failed, 1);
        return;
    }
    if answer.echo != seq {
        tracing::debug!(%addr, "cluster heartbeat: the answer echoes {} not {seq}", answer.echo);
        return;
    }
    let report = match to_report(&answer) {
        Ok(report) => report,
        Err(status) => {
            tracing::warn!(%addr, "cluster peer answered with {}", status.message());
            return;
        }
    };
    // Read whole before any of it is taken in, as a heartbeat is (see the peer service).
    let incoming = match enrolment::from_wire(&answer) {
        Ok(incoming) => incoming,
        Err(status) => {
            tracing::warn!(%addr, "cluster peer answered with {}", status.message());
            return;
        }
    };
    let mut state = shared.lock();
    let heard = match state
        .membership
        .answered(addr, sent, &report, Instant::now())
    {
        Ok(Heard::Known) => true,
        // Under the state lock, so that no answer to the member goes out in between (see the
        // peer service).
        Ok(Heard::Restarted) => {
            shared
                .enrolment()
                .holder_restarted(&report.node, report.incarnation);
            true
        }
        // This node itself (its own heartbeat came back): not counted. Another node with this
        // node's id (another nonce) is refused, and its endpoint still counts as a member.
        Err(Refusal::OwnId(_)) if answer.nonce == shared.nonce => {
            state.membership.answered_as_this_node(addr, true);
            tracing::debug!(%addr, "cluster: this endpoint is this node");
            false
        }
        Err(refusal) => {
            if matches!(refusal, Refusal::OwnId(_)) {
                state.membership.answered_as_this_node(addr, false);
            }
            let text = refusal.to_string();
            if shared.say(format!("answer of {addr}"), &text) {
                tracing::warn!(%addr, "cluster peer refused: {text}");
            }
            false
        }
    };
    drop(state);
    if heard && !(answer.reports.is_empty() && answer.grants.is_empty()) {
        enrolment::take_in(shared, &report.node, incoming);
    }
}

/// Says so (once, until they agree again) when live peers' views have differed from this
/// node's for longer than a join takes: enrolment waits for every view to agree, so a lasting
/// difference (a peer missing from one member's list, or global policies that differ in match,
/// limit, window or grouping, or a different `peer_timeout`) silently keeps every global client
/// at its cold share.
#[derive(Default)]
struct ViewsDiffer {
    since: Option<Instant>,
    said: bool,
}

impl ViewsDiffer {
    fn watch(&mut self, membership: &Membership, now: Instant, peer_timeout: Duration) {
        let differ: Vec<String> = membership
            .peers(now)
            .iter()
            .filter(|p| p.live && !p.agrees)
            .filter_map(|p| {
                let id = p.node.as_ref()?.as_str();
                Some(if p.differs.is_empty() {
                    id.to_owned()
                } else {
                    let what: Vec<&str> = p.differs.iter().map(|d| d.as_str()).collect();
                    format!("{id} ({})", what.join(" and "))
                })
            })
            .collect();
        if differ.is_empty() {
            if self.said {
                tracing::info!("cluster: every live peer's view agrees with this node's again");
            }
            *self = ViewsDiffer::default();
            return;
        }
        let since = *self.since.get_or_insert(now);
        if !self.said && now.saturating_duration_since(since) >= peer_timeout * 3 {
            self.said = true;
            tracing::warn!(
                peers = %differ.join(","),
                "cluster: these live peers' views differ from this node's: no client is enrolled \
                 until every view agrees (global clients keep their cold share). Each member \
                 must count the same members (one down or gone may be remembered by some and \
                 not others until it is forgotten), have the same global policies (match, \
                 limit, window and per; their order does not matter), the same policies inside \
                 global prefixes and the same peer_timeout; \
                 `limiter cluster status` shows which peers differ, and whether in their \
                 policies or their member lists"
            );
        }
    }
}

fn say_view(previous: &ShareView, view: &ShareView) {
    if previous.phase != view.phase {
        match view.phase {
            Phase::CutOff => tracing::warn!(
                partition = %view.partition,
                "cluster: no peer answers within peer_timeout: cut off; global policies now \
                 follow `partition: {}`",
                view.partition
            ),
            phase => tracing::info!(
                phase = phase.as_str(),
                members = view.members,
                "cluster: {}",
                phase.as_str()
            ),
        }
    }
    if previous.members != view.members {
        tracing::info!(
            members = view.members,
            before = previous.members,
            "cluster: the agreed member count changed; global policies' shares follow"
        );
    }
}
