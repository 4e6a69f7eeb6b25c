//! The cluster member's figures as a prometheus-client [`Collector`]: its status (the same the
//! `Cluster.Status` RPC and `limiter cluster status` show), read when a scrape encodes the
//! registry. Outside a cluster it writes nothing.

use std::fmt;

use prometheus_client::{
    collector::Collector,
    encoding::{DescriptorEncoder, EncodeMetric},
    metrics::{MetricType, counter::ConstCounter, gauge::ConstGauge},
};

use super::collector::{counter, gauge};
use crate::proto;

/// Where the cluster figures come from: the running member's status (`None`: not a member).
/// Called on tokio's blocking pool, at scrape time.
pub trait ClusterSource: Send + Sync + 'static {
    fn status(&self) -> Option<proto::ClusterStatus>;
}

pub(super) struct ClusterCollector(pub(super) Box<dyn ClusterSource>);

impl fmt::Debug for ClusterCollector {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("ClusterCollector")
    }
}

fn seconds(d: Option<&prost_types::Duration>) -> Option<f64> {
    d.map(|d| d.seconds as f64 + f64::from(d.nanos) / 1e9)
}

/// A family of labelled samples of one type.
fn family<T: EncodeMetric>(
    encoder: &mut DescriptorEncoder<'_>,
    name: &str,
    help: &str,
    metric_type: MetricType,
    samples: impl IntoIterator<Item = (Vec<(&'static str, String)>, T)>,
) -> fmt::Result {
    let mut family = encoder.encode_descriptor(name, help, None, metric_type)?;
    for (labels, value) in samples {
        value.encode(family.encode_family(&labels)?)?;
    }
    Ok(())
}

impl Collector for ClusterCollector {
    fn encode(&self, mut encoder: DescriptorEncoder<'_>) -> fmt::Result {
        let Some(status) = self.0.status().filter(|s| s.configured) else {
            return Ok(());
        };
        let peer = |p: &proto::ClusterPeer| {
            if p.node_id.is_empty() {
                p.address.clone()
            } else {
                p.node_id.clone()
            }
        };
        let live = status.peers.iter().filter(|p| p.live).count() as u64;
        family(
            &mut encoder,
            "limiter_cluster_peers",
            "Peers of this cluster member by state: live (an answer or a heartbeat within \
             peer_timeout) or down",
            MetricType::Gauge,
            [
                (vec![("state", "live".to_string())], ConstGauge::new(live)),
                (
                    vec![("state", "down".to_string())],
                    ConstGauge::new(status.peers.len() as u64 - live),
                ),
            ],
        )?;
        gauge(
            &mut encoder,
            "limiter_cluster_view_mismatches",
            "Live peers whose view (member list and global policies) differs from this \
             member's; while any does, no client is newly enrolled and the smaller cold share \
             is used",
            status
                .peers
                .iter()
                .filter(|p| p.live && !p.node_id.is_empty() && !p.agrees)
                .count() as u64,
        )?;
        family(
            &mut encoder,
            "limiter_cluster_peer_last_contact_seconds",
            "Age of the newest data from each peer this member acts on: since the newest \
             heartbeat it answered was sent, or since it was last heard",
            MetricType::Gauge,
            status.peers.iter().filter_map(|p| {
                let age = seconds(p.since.as_ref())?;
                Some((vec![("peer", peer(p))], ConstGauge::new(age)))
            }),
        )?;
        family(
            &mut encoder,
            "limiter_cluster_peer_rtt_seconds",
            "Round trip of the newest answered heartbeat to each dialled peer",
            MetricType::Gauge,
            status.peers.iter().filter_map(|p| {
                let rtt = seconds(p.rtt.as_ref())?;
                Some((vec![("peer", peer(p))], ConstGauge::new(rtt)))
            }),
        )?;
        if let Some(t) = &status.traffic {
            counter(
                &mut encoder,
                "limiter_cluster_rounds",
                "Enrolment rounds run, one per sync interval",
                t.rounds,
            )?;
            ConstCounter::new(seconds(t.round_time.as_ref()).unwrap_or(0.0)).encode(
                encoder.encode_descriptor(
                    "limiter_cluster_round_seconds",
                    "Time spent in enrolment rounds (map reads, shares, grant writes)",
                    None,
                    MetricType::Counter,
                )?,
            )?;
            family(
                &mut encoder,
                "limiter_cluster_bytes",
                "Heartbeat bytes (protobuf encoded) by direction, both ways of every call",
                MetricType::Counter,
                [
                    (
                        vec![("direction", "sent".to_string())],
                        ConstCounter::new(t.bytes_sent),
                    ),
                    (
                        vec![("direction", "received".to_string())],
                        ConstCounter::new(t.bytes_received),
                    ),
                ],
            )?;
            counter(
                &mut encoder,
                "limiter_cluster_heartbeats_failed",
                "Heartbeats this member sent that got no valid answer (timeout, error, refusal)",
                t.heartbeats_failed,
            )?;
        }
        if let Some(e) = &status.enrolment {
            family(
                &mut encoder,
                "limiter_cluster_clients",
                "Hot global clients by role: owned (this member splits the limit), learning (of \
                 those, in learning mode), held (this member reports demand and enforces \
                 grants), granted (of those, with a grant in force), capped (global clients \
                 with a cap from the adaptive loop)",
                MetricType::Gauge,
                [
                    ("owned", e.owned),
                    ("learning", e.learning),
                    ("held", e.held),
                    ("granted", e.granted),
                    ("capped", e.capped),
                ]
                .map(|(role, n)| (vec![("role", role.to_string())], ConstGauge::new(n))),
            )?;
            for (name, help, value) in [
                (
                    "limiter_cluster_clients_refused",
                    "Hot global clients not enrolled for want of room (--max-global-clients): \
                     they keep the cold share",
                    e.refused,
                ),
                (
                    "limiter_cluster_foreign_messages",
                    "Grant messages ignored: from a member that is not the client's owner here, or \
                     for a policy that is not the client's global policy here",
                    e.foreign,
                ),
                (
                    "limiter_cluster_messages_over_budget",
                    "Peers' messages about clients neither owned nor held here that were ignored, \
                     past what one heartbeat may check (sent again by the peer)",
                    e.over_budget,
                ),
                (
                    "limiter_cluster_grant_writes_refused",
                    "Grant changes the maps refused (offered again each round)",
                    e.unwritten,
                ),
                (
                    "limiter_cluster_raises_lapsed",
                    "Raises held here that ran out before a newer grant came; the kernel went \
                     back to the cold share on its own",
                    e.raises_lapsed,
                ),
            ] {
                counter(&mut encoder, name, help, value)?;
            }
        }
        Ok(())
    }
}
