//! Prometheus metrics for `limiter agent --metrics ADDR`: `GET /metrics` in the text exposition
//! format, version 0.0.4, written by the `prometheus-client` crate.
//!
//! Two sources feed a scrape, both in one [`prometheus_client::registry::Registry`] whose every
//! sample carries the `iface` label:
//! - the agent's own counters ([`Counters`]: API checks, reloads, errors), prometheus-client
//!   counters bumped where the events happen and registered once, when the [`Exporter`] is made;
//! - the kernel's figures (the per-CPU global counters, resident clients, the policy generation,
//!   the adaptive status), read from the BPF maps when the scrape arrives by a custom collector
//!   ([`collector`]) through one seam, [`KernelSource`], so they are exact and cost nothing
//!   between scrapes; only the resident clients, which take a walk of the client maps, are
//!   counted at most once per [`RESIDENT_MAX_AGE`].
//!
//! [`server`] answers HTTP.

mod cluster;
mod collector;
mod rls;
mod server;

use std::{
    borrow::Cow,
    sync::{Arc, Mutex, PoisonError},
};

use prometheus_client::{
    encoding::{EncodeMetric, MetricEncoder, prometheus_text},
    metrics::{MetricType, TypedMetric, counter::Counter, gauge::Gauge, info::Info},
    registry::Registry,
};
use tonic::Code;

use crate::admission::Refusal;

pub use crate::stats::{Figures, Resident};

pub use cluster::ClusterSource;
pub use collector::RESIDENT_MAX_AGE;
pub use server::{
    DEFAULT_MAX_CONNECTIONS, DEFAULT_MAX_CONNECTIONS_PER_ADDRESS, METRICS_PATH, serve,
};

use collector::KernelCollector;

/// `Content-Type` of a successful scrape: the Prometheus text format, version 0.0.4.
pub const EXPOSITION_CONTENT_TYPE: &str = prometheus_text::CONTENT_TYPE;

/// Every gRPC status code, in the order of its number (`Code::Ok` is 0, `Code::Unauthenticated`
/// 16), so that `code as usize` indexes [`Counters`]' per-code array.
const GRPC_CODES: [Code; 17] = [
    Code::Ok,
    Code::Cancelled,
    Code::Unknown,
    Code::InvalidArgument,
    Code::DeadlineExceeded,
    Code::NotFound,
    Code::AlreadyExists,
    Code::PermissionDenied,
    Code::ResourceExhausted,
    Code::FailedPrecondition,
    Code::Aborted,
    Code::OutOfRange,
    Code::Unimplemented,
    Code::Internal,
    Code::Unavailable,
    Code::DataLoss,
    Code::Unauthenticated,
];

/// The `code` label value of a gRPC status code: its name as the gRPC specification spells it in
/// CamelCase (the same as tonic's variant names), written out rather than taken from `Debug`,
/// whose output is not a stable interface. The match is exhaustive, so a code added to tonic
/// fails the build here instead of going unlabelled.
fn code_name(code: Code) -> &'static str {
    match code {
        Code::Ok => "Ok",
        Code::Cancelled => "Cancelled",
        Code::Unknown => "Unknown",
        Code::InvalidArgument => "InvalidArgument",
        Code::DeadlineExceeded => "DeadlineExceeded",
        Code::NotFound => "NotFound",
        Code::AlreadyExists => "AlreadyExists",
        Code::PermissionDenied => "PermissionDenied",
        Code::ResourceExhausted => "ResourceExhausted",
        Code::FailedPrecondition => "FailedPrecondition",
        Code::Aborted => "Aborted",
        Code::OutOfRange => "OutOfRange",
        Code::Unimplemented => "Unimplemented",
        Code::Internal => "Internal",
        Code::Unavailable => "Unavailable",
        Code::DataLoss => "DataLoss",
        Code::Unauthenticated => "Unauthenticated",
    }
}

/// Counters kept by the agent itself (the kernel's counters come from the maps at scrape time).
///
/// Each is a prometheus-client [`Counter`]: a shared `AtomicU64` bumped with
/// `Ordering::Relaxed` (each is an independent tally, a scrape never needs two of them to agree,
/// and a relaxed add is the cheapest thing the API's hot path can do). [`Exporter::new`]
/// registers clones of them, which share the atomics.
#[derive(Debug, Default)]
pub struct Counters {
    /// `Check`/`CheckBatch` decisions that admitted the hits.
    pub checks_allowed: Counter,
    /// `Check`/`CheckBatch` decisions that denied them.
    pub checks_denied: Counter,
    /// Configuration reloads applied (the file changed, or `SIGHUP`, and the new one was valid).
    pub config_reloads: Counter,
    /// Configuration changes rejected as invalid; the previous configuration stays in force.
    pub config_rejects: Counter,
    /// Limits set or deleted through the `Limits` API.
    pub api_limit_changes: Counter,
    /// API calls answered with an error status, indexed by the status code's number.
    api_errors: [Counter; GRPC_CODES.len()],
    /// The TCP API's connections.
    pub api_connections: ListenerCounters,
    /// The metrics endpoint's connections.
    pub metrics_connections: ListenerCounters,
    /// The soft limit on open descriptors the agent runs with (after raising it at start).
    pub open_files_limit: Gauge,
    /// The agreed member count N of the cluster (0 outside one).
    pub cluster_members: Gauge,
    /// 1 while this cluster member hears none of its peers (its global policies follow
    /// `partition`).
    pub cluster_cut_off: Gauge,
    /// 1 while this member, started without pins, waits to be counted by its peers (its global
    /// policies admit nothing).
    pub cluster_joining: Gauge,
}

/// The connections of one TCP listener (the API's or the metrics endpoint's). Clones share the
/// atomics, so a listener keeps its own clone.
#[derive(Debug, Default, Clone)]
pub struct ListenerCounters {
    /// Connections refused because the listener served its total cap.
    pub refused_total: Counter,
    /// Connections refused because their source (an IPv4 address or an IPv6 /64) held its cap.
    pub refused_per_address: Counter,
    /// Connections open now.
    pub open: Gauge,
    /// Connections closed for not making an authenticated call in time (the API only).
    pub timed_out_unauthenticated: Counter,
    /// Connections closed after the idle timeout with no call in flight (the API only).
    pub timed_out_idle: Counter,
    /// Connections closed to make room for a new one: the listener was full and they had made
    /// no authenticated call (the API only).
    pub displaced: Counter,
}

impl ListenerCounters {
    /// Counts a refused connection.
    pub fn refused(&self, why: Refusal) {
        match why {
            Refusal::Total => self.refused_total.inc(),
            Refusal::PerSource => self.refused_per_address.inc(),
        };
    }

    /// Counts a connection open until the returned guard is dropped.
    pub fn opened(&self) -> OpenConnection {
        self.open.inc();
        OpenConnection(self.open.clone())
    }
}

/// One open connection in [`ListenerCounters::open`]; dropping it counts the close.
#[derive(Debug)]
pub struct OpenConnection(Gauge);

impl Drop for OpenConnection {
    fn drop(&mut self) {
        self.0.dec();
    }
}

impl Counters {
    /// Counts one decision of the `RateLimiter` API.
    pub fn check(&self, allowed: bool) {
        let counter = if allowed {
            &self.checks_allowed
        } else {
            &self.checks_denied
        };
        counter.inc();
    }

    /// Counts one API call answered with status `code`. `Code::Ok` is counted like any other
    /// code if passed (it is not an error, so callers normally do not).
    pub fn api_error(&self, code: Code) {
        // In bounds: `GRPC_CODES` lists every code at the index of its number (see the test
        // `grpc_code_table_is_indexed_by_number`), and the array has one slot per entry.
        self.api_errors[code as usize].inc();
    }

    /// API calls answered with status `code` so far.
    pub fn api_errors(&self, code: Code) -> u64 {
        self.api_errors[code as usize].get()
    }
}

/// Where the kernel figures come from: the one seam between the metrics and the maps (the agent
/// reads the stats read model, [`Figures`] and [`Resident`], from its `Tables`; tests stand in). Both methods are called on tokio's
/// blocking pool, at scrape time; an error fails the whole scrape (503), never half of it.
pub trait KernelSource: Send + Sync + 'static {
    /// The global counters, policy generation, flags and adaptive status: called once per
    /// scrape.
    fn figures(&self) -> anyhow::Result<Figures>;

    /// Resident client entries: a walk of the client maps, called at most once per
    /// [`RESIDENT_MAX_AGE`] however often scrapes come.
    fn resident(&self) -> anyhow::Result<Resident>;
}

/// The registry of every metric, and the way to write it out. Made once at start; each scrape
/// is one [`Exporter::scrape`].
#[derive(Debug)]
pub struct Exporter {
    registry: Registry,
    kernel: Arc<KernelCollector>,
    /// Held for the length of a scrape: one at a time, so that a failure of the kernel source
    /// is reported to the scrape it belongs to, and two scrapers never walk the maps at once.
    scraping: Mutex<()>,
}

impl Exporter {
    /// Registers the agent's `counters` (clones sharing their atomics) and a collector reading
    /// `source`, every sample labelled `iface`.
    pub fn new(iface: &str, counters: &Counters, source: impl KernelSource) -> Exporter {
        let labels = [(Cow::Borrowed("iface"), Cow::Owned(iface.to_owned()))];
        let mut registry = Registry::with_labels(labels.into_iter());
        // prometheus-client appends the full stop of the help text itself, and the `_total`
        // of a counter's name.
        registry.register(
            "limiter_build",
            "Build information of the running limiter agent; the value is always 1",
            Info::new([("version", env!("CARGO_PKG_VERSION"))]),
        );
        registry.register(
            "limiter_checks",
            "Decisions made by the RateLimiter API, by result",
            ByLabel {
                label: "result",
                series: vec![
                    ("allowed", counters.checks_allowed.clone()),
                    ("denied", counters.checks_denied.clone()),
                ],
                only_seen: false,
            },
        );
        registry.register(
            "limiter_config_reloads",
            "Configuration reloads applied",
            counters.config_reloads.clone(),
        );
        registry.register(
            "limiter_config_rejects",
            "Configuration changes rejected as invalid; the previous configuration stays in \
             force",
            counters.config_rejects.clone(),
        );
        registry.register(
            "limiter_api_limit_changes",
            "Limits set or deleted through the Limits API",
            counters.api_limit_changes.clone(),
        );
        // Only the codes seen: seventeen series, most of them zero forever, would be noise.
        registry.register(
            "limiter_api_errors",
            "API calls answered with an error status, by gRPC status code (codes never seen are \
             absent)",
            ByLabel {
                label: "code",
                series: GRPC_CODES
                    .into_iter()
                    .map(|code| (code_name(code), counters.api_errors[code as usize].clone()))
                    .collect(),
                only_seen: true,
            },
        );
        let listeners = [
            ("api", &counters.api_connections),
            ("metrics", &counters.metrics_connections),
        ];
        registry.register(
            "limiter_connections_refused",
            "TCP connections refused by a listener (closed at once): over its total cap, or \
             over the cap of their source address (an IPv6 /64 counts as one)",
            ByLabels {
                metric_type: MetricType::Counter,
                series: listeners
                    .iter()
                    .flat_map(|(listener, c)| {
                        [
                            (
                                vec![("listener", *listener), ("reason", "total")],
                                c.refused_total.clone(),
                            ),
                            (
                                vec![("listener", *listener), ("reason", "per_address")],
                                c.refused_per_address.clone(),
                            ),
                        ]
                    })
                    .collect(),
            },
        );
        registry.register(
            "limiter_connections_open",
            "TCP connections a listener serves now",
            ByLabels {
                metric_type: MetricType::Gauge,
                series: listeners
                    .iter()
                    .map(|(listener, c)| (vec![("listener", *listener)], c.open.clone()))
                    .collect(),
            },
        );
        let api = &counters.api_connections;
        registry.register(
            "limiter_connections_timed_out",
            "TCP API connections closed by the agent: no authenticated call within \
             --api-auth-timeout of opening (unauthenticated), or none in flight for \
             --api-idle-timeout (idle)",
            ByLabels {
                metric_type: MetricType::Counter,
                series: vec![
                    (
                        vec![("listener", "api"), ("reason", "unauthenticated")],
                        api.timed_out_unauthenticated.clone(),
                    ),
                    (
                        vec![("listener", "api"), ("reason", "idle")],
                        api.timed_out_idle.clone(),
                    ),
                ],
            },
        );
        registry.register(
            "limiter_connections_displaced",
            "TCP API connections closed to make room for a new one: the listener served its \
             total cap and they were the oldest that had made no authenticated call",
            ByLabels {
                metric_type: MetricType::Counter,
                series: vec![(vec![("listener", "api")], api.displaced.clone())],
            },
        );
        registry.register(
            "limiter_open_files_limit",
            "The limit on open descriptors the agent runs with (RLIMIT_NOFILE, raised at start \
             to its hard limit)",
            counters.open_files_limit.clone(),
        );
        registry.register(
            "limiter_cluster_members",
            "The agreed member count N of the cluster, which divides each global limit into \
             this node's cold share (0 outside a cluster)",
            counters.cluster_members.clone(),
        );
        registry.register(
            "limiter_cluster_cut_off",
            "1 while this cluster member hears none of its peers; its global policies then \
             follow the `partition` setting",
            counters.cluster_cut_off.clone(),
        );
        registry.register(
            "limiter_cluster_joining",
            "1 while this cluster member, started without pinned maps, waits to be counted by \
             its peers; its global policies admit nothing meanwhile",
            counters.cluster_joining.clone(),
        );
        let kernel = Arc::new(KernelCollector::new(Box::new(source)));
        registry.register_collector(Box::new(Arc::clone(&kernel)));
        Exporter {
            registry,
            kernel,
            scraping: Mutex::new(()),
        }
    }

    /// Adds the cluster member's figures (written only while the agent is a member).
    pub fn with_cluster(mut self, source: impl ClusterSource) -> Exporter {
        self.registry
            .register_collector(Box::new(cluster::ClusterCollector(Box::new(source))));
        self
    }

    /// Adds the rate limit service's per-rule hit counters.
    pub fn with_rls(mut self, hits: Arc<crate::rls::hits::RlsHits>) -> Exporter {
        self.registry
            .register_collector(Box::new(rls::RlsCollector(hits)));
        self
    }

    /// The whole document, or the error of the kernel source (nothing partial).
    ///
    /// Every family gets its `# HELP` and `# TYPE` lines, even one without samples (the API
    /// error counter before the first error), so that a dashboard sees the metric exists.
    /// Counter names end in `_total`, and the `TYPE` line carries the full name, as version
    /// 0.0.4 expects.
    pub fn scrape(&self) -> anyhow::Result<String> {
        // A panic in an earlier scrape (in the kernel source) poisons the lock; the unit it
        // guards holds nothing that panic could have left half-done.
        let _one_at_a_time = self.scraping.lock().unwrap_or_else(PoisonError::into_inner);
        // About 4 KiB once every family is written; one allocation in the common case.
        let mut text = String::with_capacity(4096);
        let encoded = prometheus_text::encode(&mut text, &self.registry);
        if let Some(err) = self.kernel.take_error() {
            return Err(err);
        }
        // Writing to a `String` cannot fail, and the collector fails only with an error it
        // has just stored (taken above); anything else is a bug of the encoder.
        encoded.map_err(|_| anyhow::anyhow!("encoding the exposition failed"))?;
        Ok(text)
    }
}

/// A counter family with a fixed, ordered set of label values, one label: the samples come out
/// in the order given (prometheus-client's `Family` keeps a hash map, whose order changes from
/// run to run), and its `HELP` and `TYPE` lines are written even with no sample (a `Family`
/// with no series is left out whole).
#[derive(Debug)]
struct ByLabel {
    label: &'static str,
    series: Vec<(&'static str, Counter)>,
    /// Leave out the series still at zero.
    only_seen: bool,
}

impl TypedMetric for ByLabel {
    const TYPE: MetricType = MetricType::Counter;
}

impl EncodeMetric for ByLabel {
    fn encode(&self, mut encoder: MetricEncoder<'_>) -> Result<(), std::fmt::Error> {
        for (value, counter) in &self.series {
            if self.only_seen && counter.get() == 0 {
                continue;
            }
            let labels = [(self.label, *value)];
            counter.encode(encoder.encode_family(&labels)?)?;
        }
        Ok(())
    }

    fn metric_type(&self) -> MetricType {
        Self::TYPE
    }
}

/// A family of one metric type whose series each carry their own fixed labels, written in the
/// order given (see [`ByLabel`] for why not a `Family`).
#[derive(Debug)]
struct ByLabels<M> {
    metric_type: MetricType,
    series: Vec<(Vec<(&'static str, &'static str)>, M)>,
}

impl<M: EncodeMetric> EncodeMetric for ByLabels<M> {
    fn encode(&self, mut encoder: MetricEncoder<'_>) -> Result<(), std::fmt::Error> {
        for (labels, metric) in &self.series {
            metric.encode(encoder.encode_family(labels)?)?;
        }
        Ok(())
    }

    fn metric_type(&self) -> MetricType {
        self.metric_type
    }
}

#[cfg(test)]
pub(crate) mod tests;
