//! The `Stats` service: global counters, one client, the busiest clients.

use std::{collections::HashMap, time::Duration};

use limiter_common::{
    ClientState,
    addr::ClientKey,
    maps::{ACTION_DROP, ACTION_PASS},
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

pub struct StatsService(pub ApiState);

#[tonic::async_trait]
impl stats_server::Stats for StatsService {
    async fn global(
        &self,
        _request: Request<proto::GlobalStatsRequest>,
    ) -> Result<Response<proto::GlobalStats>, Status> {
        async {
            let state = self.0.clone();
            let out = blocking(move || global(&state)).await?;
            Ok(Response::new(out))
        }
        .await
    }

    async fn client(
        &self,
        request: Request<proto::ClientStatsRequest>,
    ) -> Result<Response<proto::ClientStats>, Status> {
        async {
            let id: ClientId = request.get_ref().client_id.parse().map_err(check_status)?;
            let d = self.0.checker.check(&id, 0).map_err(check_status)?;
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
            }))
        }
        .await
    }

    async fn top(
        &self,
        request: Request<proto::TopRequest>,
    ) -> Result<Response<proto::TopResponse>, Status> {
        async {
            let n = request.get_ref().n as usize;
            let state = self.0.clone();
            let clients = blocking(move || top(&state, n)).await?;
            Ok(Response::new(proto::TopResponse { clients }))
        }
        .await
    }
}

pub(super) fn global(state: &ApiState) -> Result<proto::GlobalStats, Status> {
    // Under the policy lock only what is cheap; the walks run on duplicated descriptors.
    let internal = |e: crate::datapath::DatapathError| Status::internal(crate::error_chain(&e));
    let (f, maps) = state
        .limits
        .with_tables(|t| Ok((Figures::read(t, &state.iface)?, t.client_maps()?)))
        .map_err(internal)?;
    let resident = Resident::count(&maps).map_err(internal)?;
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

/// The busiest clients (addresses and IDs) by current rate. IDs are stored by hash; those named
/// by a policy are shown by name, others as `id:` and the first 8 bytes of the hash in hex.
pub(super) fn top(state: &ApiState, n: usize) -> Result<Vec<proto::ClientStats>, Status> {
    let internal = |e: crate::datapath::DatapathError| Status::internal(crate::error_chain(&e));
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
    let addresses = maps.addresses().map_err(internal)?;
    let named = maps.ids().map_err(internal)?;
    let now = monotonic_ns();
    let row = |id: String, s: &ClientState| {
        let window_ns = s.window_us as u64 * 1000;
        let estimate = std::num::NonZeroU64::new(window_ns)
            .filter(|_| s.action() != ACTION_PASS && s.action() != ACTION_DROP)
            .map_or(0, |w| estimate_at(&s.slots, now, w));
        let action = match s.action() {
            ACTION_PASS => Action::Pass,
            ACTION_DROP => Action::Drop,
            _ => Action::Limit,
        };
        let rate = if window_ns > 0 {
            estimate as f64 / window_ns as f64
        } else {
            0.0
        };
        let base = config
            .policy_base(s.policy())
            .map(|r| r.to_policy(s.policy()));
        let (scale, utilisation) = crate::stats::adaptation(s, base.as_ref(), rate * 1e9);
        (
            rate,
            proto::ClientStats {
                client_id: id,
                policy: view.name(s.policy()).to_string(),
                action: action_proto(action) as i32,
                limit: s.limit,
                window: Some(duration(Duration::from_nanos(window_ns))),
                estimate,
                passed: s.total_passed(),
                dropped: s.dropped_count(),
                resident: true,
                scale,
                utilisation,
            },
        )
    };
    let mut rows: Vec<(f64, proto::ClientStats)> = addresses
        .iter()
        .map(|(k, s)| (crate::stats::addr_of(k).to_string(), s))
        .chain(named.iter().map(|(k, s)| {
            let name = id_names.get(k).cloned().unwrap_or_else(|| {
                let hex: String = k[..8].iter().map(|b| format!("{b:02x}")).collect();
                format!("id:{hex}")
            });
            (name, s)
        }))
        .map(|(id, s)| row(id, s))
        .collect();
    rows.sort_by(|a, b| {
        b.0.total_cmp(&a.0)
            .then((b.1.passed + b.1.dropped).cmp(&(a.1.passed + a.1.dropped)))
            .then(a.1.client_id.cmp(&b.1.client_id))
    });
    if n > 0 {
        rows.truncate(n);
    }
    Ok(rows.into_iter().map(|(_, r)| r).collect())
}
