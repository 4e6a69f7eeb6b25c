//! The rate limit service's per-rule hit counters (`rls::hits`) as a prometheus-client
//! [`Collector`], read when a scrape encodes the registry:
//!
//! - `limiter_rls_hits_total{domain,descriptor,outcome}`: every hit of a limited descriptor,
//!   once, as `within_limit` or `over_limit` (the two partition the hits, so
//!   `sum without (outcome)` is envoyproxy/ratelimit's `total_hits`);
//! - `limiter_rls_near_limit_hits_total{domain,descriptor}`: the `within_limit` hits above 80%
//!   of the limit;
//! - `limiter_rls_shadow_mode_hits_total{domain,descriptor}`: the `over_limit` hits a
//!   `shadow_mode` rule let through;
//! - `limiter_rls_detailed_series` / `limiter_rls_detailed_series_max`: the series keyed by
//!   request values held now, and their cap;
//! - `limiter_rls_unrecorded_hits_total`: hits of such series that did not fit under the cap;
//! - `limiter_rls_calls_total{thread}`: the calls each serving thread (`--rls-threads`) answered.
//!
//! `near_limit` and `shadow_mode` overlap the outcomes, so they are families of their own rather
//! than values of `outcome`: a sum over one label of one family never counts a hit twice.

use std::{fmt, sync::Arc};

use prometheus_client::{
    collector::Collector,
    encoding::{DescriptorEncoder, EncodeMetric},
    metrics::{MetricType, counter::ConstCounter},
};

use super::collector::{counter, gauge};
use crate::rls::hits::{RlsHits, Sample};

pub(super) struct RlsCollector(pub(super) Arc<RlsHits>);

impl fmt::Debug for RlsCollector {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("RlsCollector")
    }
}

/// A counter family with a sample per series that `value` gives one for.
fn per_series(
    encoder: &mut DescriptorEncoder<'_>,
    name: &str,
    help: &str,
    series: &[Sample],
    value: impl Fn(&Sample) -> u64,
) -> fmt::Result {
    let mut family = encoder.encode_descriptor(name, help, None, MetricType::Counter)?;
    for s in series {
        let labels = [
            ("domain", s.domain.as_str()),
            ("descriptor", s.descriptor.as_str()),
        ];
        ConstCounter::new(value(s)).encode(family.encode_family(&labels)?)?;
    }
    Ok(())
}

impl Collector for RlsCollector {
    fn encode(&self, mut encoder: DescriptorEncoder<'_>) -> fmt::Result {
        let snapshot = self.0.snapshot();
        let series = &snapshot.series;
        {
            let mut family = encoder.encode_descriptor(
                "limiter_rls_hits",
                "Hits of the rate limit service's descriptors a rule (or the request's own \
                 limit) limits, by domain, descriptor key (envoyproxy/ratelimit's stat key \
                 without the domain) and outcome: within_limit (the descriptor fitted; \
                 spent unless another descriptor refused the request) or over_limit \
                 (refused, or let through by shadow_mode or dry-run); their sum is \
                 envoyproxy/ratelimit's total_hits.",
                None,
                MetricType::Counter,
            )?;
            for s in series {
                for (outcome, value) in [
                    ("within_limit", s.counts.within_limit),
                    ("over_limit", s.counts.over_limit),
                ] {
                    let labels = [
                        ("domain", s.domain.as_str()),
                        ("descriptor", s.descriptor.as_str()),
                        ("outcome", outcome),
                    ];
                    ConstCounter::new(value).encode(family.encode_family(&labels)?)?;
                }
            }
        }
        per_series(
            &mut encoder,
            "limiter_rls_near_limit_hits",
            "Admitted hits of a rate limit service descriptor that landed above 80% of its \
             limit (part of the within_limit hits).",
            series,
            |s| s.counts.near_limit,
        )?;
        per_series(
            &mut encoder,
            "limiter_rls_shadow_mode_hits",
            "Over-limit hits of a rate limit service descriptor that its shadow_mode rule let \
             through (part of the over_limit hits).",
            series,
            |s| s.counts.shadow_mode,
        )?;
        gauge(
            &mut encoder,
            "limiter_rls_detailed_series",
            "Rate limit service series keyed by request values (detailed_metric rules, and \
             descriptors with their own limit) held now.",
            snapshot.detailed_series as u64,
        )?;
        gauge(
            &mut encoder,
            "limiter_rls_detailed_series_max",
            "The cap on limiter_rls_detailed_series (--rls-metrics-max-detailed).",
            snapshot.max_detailed_series as u64,
        )?;
        {
            let mut family = encoder.encode_descriptor(
                "limiter_rls_calls",
                "ShouldRateLimit calls answered (valid or not), by serving thread \
                 (--rls-threads, numbered from 0). Connections are handed to the threads in \
                 turn, so a thread is as busy as the connections it holds.",
                None,
                MetricType::Counter,
            )?;
            for (thread, calls) in snapshot.calls.iter().enumerate() {
                let thread = thread.to_string();
                ConstCounter::new(*calls)
                    .encode(family.encode_family(&[("thread", thread.as_str())])?)?;
            }
        }
        counter(
            &mut encoder,
            "limiter_rls_unrecorded_hits",
            "Hits of rate limit service series keyed by request values that were not recorded: \
             the cap on such series was reached, or the key was longer than 256 bytes.",
            snapshot.unrecorded,
        )
    }
}
