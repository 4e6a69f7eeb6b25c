//! The `Stats` service: global counters, one client, the busiest clients.
//!
//! The two answers that walk the client maps are bounded: `Top` returns at most [`MAX_TOP`]
//! clients and keeps only those while it walks; `Global`'s resident counts come from a walk
//! that holds one batch at a time, shared by concurrent callers ([`crate::stats::Walks`]).

use std::{
    cmp::Ordering,
    collections::{BinaryHeap, HashMap},
    time::{Duration, Instant},
};

use limiter_common::{
    ClientState,
    addr::ClientKey,
    maps::{ACTION_DROP, ACTION_PASS, FLAG_STATIC},
    window::estimate_at,
};
use tonic::{Request, Response, Status};

use super::{ApiState, blocking, convert::*};
use crate::{
    check::ClientId,
    config::Action,
    proto::{
        self,
        stats_server::{self},
    },
    stats::monotonic_ns,
    stats::{Figures, Resident},
};

/// Most clients one `Top` call returns (`n` = 0 asks for this many). A row is at most about
/// 600 bytes (a 256-byte ID named by a policy of the same name), so an answer stays well under
/// the 4 MiB gRPC clients accept by default.
pub const MAX_TOP: u32 = 1000;

pub struct StatsService(pub ApiState);

#[tonic::async_trait]
impl stats_server::Stats for StatsService {
    async fn global(
        &self,
        _request: Request<proto::GlobalStatsRequest>,
    ) -> Result<Response<proto::GlobalStats>, Status> {
        Ok(Response::new(global(&self.0).await?))
    }

    async fn client(
        &self,
        request: Request<proto::ClientStatsRequest>,
    ) -> Result<Response<proto::ClientStats>, Status> {
        async {
            let id: ClientId = request.get_ref().client_id.parse().map_err(check_status)?;
            let d = self.0.checker.check(&id, 0).map_err(check_status)?;
            // The kernel's answer gives the share in force (`d.limit`, the grant's while its
            // lease runs); the member adds the owner and the demand.
            let cluster = d.global_limit.and_then(|global| {
                let view = cluster_views(&self.0, &[(id.key(), d.limit, global)]).pop()??;
                Some(proto::ClientCluster {
                    share: d.limit,
                    ..view
                })
            });
            Ok(Response::new(proto::ClientStats {
                client_id: id.to_string(),
                policy: d.policy.to_string(),
                action: action_proto(d.action) as i32,
                limit: d.limit,
                window: Some(duration(d.window)),
                estimate: d.estimate,
                passed: d.passed,
                dropped: d.dropped,
                resident: d.resident,
                scale: 1.0,
                utilisation: 0.0,
                cluster,
                // Top's: a check does not say which map the entry is in.
                is_static: false,
                limited: false,
            }))
        }
        .await
    }

    async fn top(
        &self,
        request: Request<proto::TopRequest>,
    ) -> Result<Response<proto::TopResponse>, Status> {
        let n = top_n(request.get_ref().n)?;
        let state = self.0.clone();
        let (clients, resident) = self
            .0
            .walks
            .walk(move || top(&state, n))
            .await
            .map_err(|e| Status::internal(e.to_string()))??;
        Ok(Response::new(proto::TopResponse {
            clients,
            resident: resident.addresses + resident.ids,
        }))
    }
}

/// How the cluster member sees `clients` of global policies (key, cold share, limit across the
/// cluster): one entry per client, all `None` outside a cluster.
fn cluster_views(
    state: &ApiState,
    clients: &[(ClientKey, u32, u32)],
) -> Vec<Option<proto::ClientCluster>> {
    let node = state.cluster.borrow().clone();
    let Some(node) = node.filter(|_| !clients.is_empty()) else {
        return vec![None; clients.len()];
    };
    let keys: Vec<(ClientKey, u32)> = clients.iter().map(|&(k, cold, _)| (k, cold)).collect();
    node.client_views(&keys)
        .into_iter()
        .zip(clients)
        .map(|(view, &(_, _, global_limit))| {
            Some(proto::ClientCluster {
                global_limit,
                ..view
            })
        })
        .collect()
}

fn internal(e: crate::datapath::DatapathError) -> Status {
    Status::internal(crate::error_chain(&e))
}

/// How many clients a `Top` call asks for: `n`, 0 for [`MAX_TOP`], more is INVALID_ARGUMENT.
fn top_n(n: u32) -> Result<usize, Status> {
    match n {
        0 => Ok(MAX_TOP as usize),
        n if n <= MAX_TOP => Ok(n as usize),
        n => Err(Status::invalid_argument(format!(
            "n: at most {MAX_TOP} clients per call, got {n} (0 asks for {MAX_TOP})"
        ))),
    }
}

pub(super) async fn global(state: &ApiState) -> Result<proto::GlobalStats, Status> {
    let arrived = Instant::now();
    let reader = state.clone();
    // Under the policy lock only what is cheap; the walk runs on duplicated descriptors, shared
    // with any other caller walking now.
    let f = blocking(move || {
        reader
            .limits
            .with_tables(|t| Figures::read(t, &reader.iface))
            .map_err(internal)
    })
    .await?;
    let walker = state.clone();
    let resident = state
        .walks
        .resident(arrived, move || {
            let maps = walker
                .limits
                .with_tables(|t| t.client_maps())
                .map_err(internal)?;
            Resident::count(&maps).map_err(internal)
        })
        .await
        .map_err(|e| Status::internal(e.to_string()))??;
    let (g, adaptive, c) = (&f.global, &f.adaptive, &state.counters);
    Ok(proto::GlobalStats {
        packets_passed: g.passed,
        packets_dropped: g.dropped,
        packets_non_ip: g.non_ip,
        packets_malformed: g.malformed,
        clients_created: g.new_clients,
        map_full: g.map_full,
        policy_resolves: g.resolves,
        contended: g.contended,
        limited_moves: g.limited_moves,
        limited_full: g.limited_full,
        clients_resident: resident.addresses,
        clients_limited: resident.limited,
        ids_resident: resident.ids,
        checks_allowed: c.checks_allowed.get(),
        checks_denied: c.checks_denied.get(),
        policy_generation: f.policy_generation as u64,
        dry_run: f.dry_run,
        attached: f.attached,
        config_reloads: c.config_reloads.get(),
        config_rejects: c.config_rejects.get(),
        adaptive: adaptive.enabled(),
        cpu: adaptive.cpu(),
        load_factor: adaptive.load_factor(),
        adaptive_tracked: adaptive.tracked,
    })
}

/// One candidate of [`Busiest`]: ordered so that the worse candidate is the greater, so the top
/// of a max-heap is the one to drop first.
struct Ranked<T> {
    rate: f64,
    total: u64,
    id: String,
    item: T,
}

impl<T> Ranked<T> {
    fn rank(&self, other: &Self) -> Ordering {
        // Better: higher rate, then more packets, then the smaller ID.
        other
            .rate
            .total_cmp(&self.rate)
            .then(other.total.cmp(&self.total))
            .then(self.id.cmp(&other.id))
    }
}

impl<T> PartialEq for Ranked<T> {
    fn eq(&self, other: &Self) -> bool {
        self.rank(other) == Ordering::Equal
    }
}

impl<T> Eq for Ranked<T> {}

impl<T> PartialOrd for Ranked<T> {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}

impl<T> Ord for Ranked<T> {
    fn cmp(&self, other: &Self) -> Ordering {
        self.rank(other)
    }
}

/// The `n` best of a stream of candidates by rate, then packets, then ID (the order
/// `limiter stats` lists), keeping only `n` of them: a walk of a million clients for the top 20
/// holds 20. The ID, a string, is only made for a candidate that gets in or ties the worst.
struct Busiest<T> {
    n: usize,
    heap: BinaryHeap<Ranked<T>>,
}

impl<T> Busiest<T> {
    fn new(n: usize) -> Busiest<T> {
        Busiest {
            n,
            heap: BinaryHeap::with_capacity(n.min(MAX_TOP as usize) + 1),
        }
    }

    fn offer(
        &mut self,
        rate: f64,
        total: u64,
        id: impl FnOnce() -> String,
        item: impl FnOnce() -> T,
    ) {
        if self.n == 0 {
            return;
        }
        if self.heap.len() == self.n {
            let Some(worst) = self.heap.peek() else {
                return;
            };
            match rate.total_cmp(&worst.rate).then(total.cmp(&worst.total)) {
                Ordering::Less => return,
                Ordering::Greater => {}
                Ordering::Equal => {
                    let id = id();
                    if id >= worst.id {
                        return;
                    }
                    self.heap.pop();
                    self.heap.push(Ranked {
                        rate,
                        total,
                        id,
                        item: item(),
                    });
                    return;
                }
            }
            self.heap.pop();
        }
        self.heap.push(Ranked {
            rate,
            total,
            id: id(),
            item: item(),
        });
    }

    /// [`Busiest::offer`] for a candidate the stream may have offered before (`same` finds
    /// that copy): only the better copy is kept (the first on a tie), so no candidate is kept
    /// twice. A copy that would not get in needs no search: the one kept, if any, is better
    /// (or ties it, and came first), and so is every tie with the worst kept that `offer`
    /// would refuse (idle clients, once fewer than `n` are busy, all tie).
    fn offer_again(
        &mut self,
        rate: f64,
        total: u64,
        id: impl FnOnce() -> String,
        item: impl FnOnce() -> T,
        same: impl Fn(&T) -> bool,
    ) {
        let mut id = Some(id);
        let mut label = None;
        if self.heap.len() == self.n
            && let Some(worst) = self.heap.peek()
        {
            match rate.total_cmp(&worst.rate).then(total.cmp(&worst.total)) {
                Ordering::Less => return,
                Ordering::Equal => {
                    let this = id.take().map_or_else(String::new, |id| id());
                    if this >= worst.id {
                        return;
                    }
                    label = Some(this);
                }
                Ordering::Greater => {}
            }
        }
        if let Some(kept) = self.heap.iter().find(|r| same(&r.item)) {
            if rate.total_cmp(&kept.rate).then(total.cmp(&kept.total)) != Ordering::Greater {
                return;
            }
            self.heap.retain(|r| !same(&r.item));
        }
        // The label, made at most once.
        let label = move || label.unwrap_or_else(|| id.map_or_else(String::new, |id| id()));
        self.offer(rate, total, label, item);
    }

    /// The kept candidates, best first.
    fn into_sorted(self) -> Vec<Ranked<T>> {
        self.heap.into_sorted_vec()
    }
}

/// Which walk found a client of [`top`]: an address's (held in `LIMITED` or not) or an ID's.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Seen {
    Address,
    Held,
    Id,
}

impl Busiest<(ClientKey, ClientState, Seen)> {
    /// A client a map walk visited (`seen`: an address's, held or not, or an ID's):
    /// [`Busiest::offer_again`] for a visit that may be the client's second (`again`),
    /// [`Busiest::offer`] otherwise.
    #[expect(
        clippy::too_many_arguments,
        reason = "one visit's fields, passed through"
    )]
    fn offer_visit(
        &mut self,
        again: bool,
        rate: f64,
        total: u64,
        id: impl FnOnce() -> String,
        key: &ClientKey,
        state: &ClientState,
        seen: Seen,
    ) {
        let item = || (*key, *state, seen);
        if again {
            self.offer_again(rate, total, id, item, |(kept, _, _)| kept == key);
        } else {
            self.offer(rate, total, id, item);
        }
    }
}

/// The `n` busiest clients (addresses and IDs) by current rate, and what the walk counted. IDs are
/// stored by hash; those named by a policy are shown by name, others as `id:` and the first 8
/// bytes of the hash in hex. Runs on the blocking pool, in [`crate::stats::Walks`]' turn.
pub(super) fn top(
    state: &ApiState,
    n: usize,
) -> Result<(Vec<proto::ClientStats>, Resident), Status> {
    let view = state.checker.view();
    let config = state.limits.config();
    let id_names: HashMap<ClientKey, String> = config
        .named_policies()
        .keys()
        .map(|n| (n.key(), n.to_string()))
        .collect();
    let maps = state
        .limits
        .with_tables(|t| t.client_maps())
        .map_err(internal)?;
    let now = monotonic_ns();
    // What the order needs: the estimate (0 for pass and drop), the rate, and the packets.
    let measure = |s: &ClientState| {
        let window_ns = s.window_us as u64 * 1000;
        let estimate = std::num::NonZeroU64::new(window_ns)
            .filter(|_| s.action() != ACTION_PASS && s.action() != ACTION_DROP)
            .map_or(0, |w| estimate_at(&s.slots, now, w));
        let rate = if window_ns > 0 {
            estimate as f64 / window_ns as f64
        } else {
            0.0
        };
        (
            estimate,
            rate,
            s.total_passed().saturating_add(s.dropped_count()),
        )
    };
    let mut busiest = Busiest::new(n);
    let mut resident = Resident::default();
    maps.each_address(|k, s, again, held| {
        resident.addresses += 1;
        resident.limited += u64::from(held);
        let (_, rate, total) = measure(s);
        let label = || crate::stats::client_label(k);
        let seen = if held { Seen::Held } else { Seen::Address };
        busiest.offer_visit(again, rate, total, label, k, s, seen);
    })
    .map_err(internal)?;
    maps.each_id(|k, s, again| {
        resident.ids += 1;
        let (_, rate, total) = measure(s);
        let id = || {
            id_names.get(k).cloned().unwrap_or_else(|| {
                let hex: String = k[..8].iter().map(|b| format!("{b:02x}")).collect();
                format!("id:{hex}")
            })
        };
        busiest.offer_visit(again, rate, total, id, k, s, Seen::Id);
    })
    .map_err(internal)?;
    let mut ranked = busiest.into_sorted();
    // Addresses the policies in force have not re-resolved yet are shown as their next packet
    // will find them (see `crate::stats::as_resolved`).
    state
        .limits
        .with_tables(|t| {
            let generation = t.map_config()?.generation;
            for r in ranked.iter_mut().filter(|r| r.item.2 != Seen::Id) {
                if let Some(resolved) =
                    crate::stats::as_resolved(t, &r.item.0, &r.item.1, generation)
                {
                    r.item.1 = resolved;
                }
            }
            Ok(())
        })
        .map_err(internal)?;
    let global: Vec<(ClientKey, u32, u32)> = ranked
        .iter()
        .filter_map(|r| {
            let (k, s, _) = &r.item;
            Some((*k, s.limit, view.global_limit(s.policy())?))
        })
        .collect();
    let mut cluster = cluster_views(state, &global).into_iter();
    let rows = ranked
        .into_iter()
        .map(
            |Ranked {
                 rate,
                 id,
                 item: (_, s, seen),
                 ..
             }| {
                let (estimate, _, _) = measure(&s);
                let window_ns = s.window_us as u64 * 1000;
                let action = match s.action() {
                    ACTION_PASS => Action::Pass,
                    ACTION_DROP => Action::Drop,
                    _ => Action::Limit,
                };
                let base = config
                    .policy_base(s.policy())
                    .map(|r| r.to_policy(s.policy()));
                let (scale, utilisation) = crate::stats::adaptation(&s, base.as_ref(), rate * 1e9);
                let cluster = if view.global_limit(s.policy()).is_some() {
                    cluster.next().flatten()
                } else {
                    None
                };
                proto::ClientStats {
                    client_id: id,
                    policy: view.name(s.policy()).to_string(),
                    action: action_proto(action) as i32,
                    // A global client's allowance in force: the grant's while its lease runs.
                    limit: cluster.as_ref().map_or(s.limit, |c| c.share),
                    window: Some(duration(Duration::from_nanos(window_ns))),
                    estimate,
                    passed: s.total_passed(),
                    dropped: s.dropped_count(),
                    resident: true,
                    scale,
                    utilisation,
                    cluster,
                    is_static: s.flags() & FLAG_STATIC != 0,
                    limited: seen == Seen::Held,
                }
            },
        )
        .collect();
    Ok((rows, resident))
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    /// The kept candidates, as (rate, total, id).
    fn kept(busiest: Busiest<()>) -> Vec<(u64, u64, String)> {
        busiest
            .into_sorted()
            .into_iter()
            .map(|r| (r.rate as u64, r.total, r.id))
            .collect()
    }

    #[test]
    fn n_is_bounded_and_zero_asks_for_the_maximum() {
        assert_eq!(top_n(0).unwrap(), MAX_TOP as usize);
        assert_eq!(top_n(1).unwrap(), 1);
        assert_eq!(top_n(MAX_TOP).unwrap(), MAX_TOP as usize);
        let status = top_n(MAX_TOP + 1).unwrap_err();
        assert_eq!(status.code(), tonic::Code::InvalidArgument);
        assert!(
            status.message().starts_with("n: at most 1000"),
            "{status:?}"
        );
        assert!(top_n(u32::MAX).is_err());
    }

    #[test]
    fn ids_are_made_only_for_candidates_that_get_in_or_tie() {
        let mut busiest = Busiest::new(2);
        let mut made = 0;
        for (rate, total, id) in [(5.0, 1, "e"), (9.0, 1, "i"), (1.0, 1, "a"), (5.0, 1, "d")] {
            busiest.offer(
                rate,
                total,
                || {
                    made += 1;
                    id.to_owned()
                },
                || (),
            );
        }
        // e and i get in; a is worse than e without its ID; d ties e and wins on its ID.
        assert_eq!(made, 3);
        assert_eq!(
            kept(busiest),
            [(9, 1, "i".to_owned()), (5, 1, "d".to_owned())]
        );
    }

    proptest! {
        /// The same clients, in the same order, as sorting them all and keeping the first `n`.
        #[test]
        fn busiest_is_sort_and_truncate(
            entries in prop::collection::vec((0u64..4, 0u64..4, 0u32..50), 0..200),
            n in 0usize..30,
        ) {
            let mut all: Vec<(u64, u64, String)> = entries
                .iter()
                .map(|(rate, total, id)| (*rate, *total, format!("c{id}")))
                .collect();
            // IDs are unique in a walk (one entry per key).
            all.sort_by(|a, b| a.2.cmp(&b.2));
            all.dedup_by(|a, b| a.2 == b.2);
            let mut busiest = Busiest::new(n);
            for (rate, total, id) in &all {
                busiest.offer(*rate as f64, *total, || id.clone(), || ());
            }
            all.sort_by(|a, b| b.0.cmp(&a.0).then(b.1.cmp(&a.1)).then(a.2.cmp(&b.2)));
            all.truncate(n);
            prop_assert_eq!(kept(busiest), all);
        }

        /// A walk that visits some clients a second time (a client moving between maps during
        /// `each_address`), the second copy offered with `offer_again`: each client is kept
        /// once, by its better copy (the earlier on a tie: the copies of a client tie on the
        /// label, and may differ in the state shown), as if the walk had seen only that one.
        #[test]
        fn a_client_offered_again_is_kept_once_by_its_better_copy(
            entries in prop::collection::vec((0u64..4, 0u64..4, 0u32..50), 0..200),
            again in prop::collection::vec((0usize..200, 0u64..4, 0u64..4), 0..40),
            n in 0usize..30,
        ) {
            let mut first: Vec<(u64, u64, u32)> = entries.clone();
            first.sort_by_key(|e| e.2);
            first.dedup_by_key(|e| e.2);
            // (rate, total, key, copy): copy 0 is the first visit, copy j + 1 the j-th again.
            let stream: Vec<(u64, u64, u32, usize)> = first
                .iter()
                .map(|&(rate, total, key)| (rate, total, key, 0))
                .chain(again.iter().enumerate().filter_map(|(j, (i, rate, total))| {
                    first.get(*i).map(|e| (*rate, *total, e.2, j + 1))
                }))
                .collect();
            let mut busiest: Busiest<(u32, usize)> = Busiest::new(n);
            for &(rate, total, key, copy) in &stream {
                let id = || format!("c{key}");
                if copy == 0 {
                    busiest.offer(rate as f64, total, id, || (key, copy));
                } else {
                    busiest.offer_again(rate as f64, total, id, || (key, copy), |kept| {
                        kept.0 == key
                    });
                }
            }
            let mut best: std::collections::BTreeMap<u32, (u64, u64, usize)> =
                std::collections::BTreeMap::new();
            for &(rate, total, key, copy) in &stream {
                let kept = best.entry(key).or_insert((rate, total, copy));
                if (rate, total) > (kept.0, kept.1) {
                    *kept = (rate, total, copy);
                }
            }
            let mut all: Vec<(u64, u64, String, (u32, usize))> = best
                .into_iter()
                .map(|(key, (rate, total, copy))| (rate, total, format!("c{key}"), (key, copy)))
                .collect();
            all.sort_by(|a, b| b.0.cmp(&a.0).then(b.1.cmp(&a.1)).then(a.2.cmp(&b.2)));
            all.truncate(n);
            let got: Vec<(u64, u64, String, (u32, usize))> = busiest
                .into_sorted()
                .into_iter()
                .map(|r| (r.rate as u64, r.total, r.id, r.item))
                .collect();
            prop_assert_eq!(got, all);
        }
    }
}
