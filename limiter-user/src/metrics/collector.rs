//! The kernel's figures as a prometheus-client [`Collector`]: read through the [`KernelSource`]
//! when a scrape encodes the registry, nothing kept in between except the resident-client
//! counts, which cost a walk of the client maps and are recounted at most once per
//! [`RESIDENT_MAX_AGE`].

use std::{
    fmt,
    sync::{Mutex, PoisonError},
    time::{Duration, Instant},
};

use prometheus_client::{
    collector::Collector,
    encoding::{DescriptorEncoder, EncodeMetric},
    metrics::{MetricType, counter::ConstCounter, gauge::ConstGauge},
};

use super::{Figures, KernelSource, Resident};

/// How long a count of the resident clients is served before the client maps are walked again.
///
/// No BPF hash map keeps an element count user space can read (the kernel's own, 6.6, is for BPF
/// programs: `bpf_map_sum_elem_count`), so the count is a walk of all four client maps, which
/// copies every entry out: about 0.4 s and 120 MiB for a million clients. Walked at every scrape,
/// several Prometheus replicas at a 15 s interval would each pay that; with this bound the
/// agent pays it at most twice a minute, and the gauge lags by at most 30 s. Every other kernel
/// figure is a handful of lookups, read fresh at every scrape.
pub const RESIDENT_MAX_AGE: Duration = Duration::from_secs(30);

/// Reads the kernel figures at scrape time and encodes them.
pub(super) struct KernelCollector {
    source: Box<dyn KernelSource>,
    /// The last count of resident clients and when it was taken.
    resident: Mutex<Option<(Instant, Resident)>>,
    resident_max_age: Duration,
    /// Why the last encoding failed, for [`super::Exporter::scrape`] to report: the collector
    /// interface can only return `fmt::Error`.
    error: Mutex<Option<anyhow::Error>>,
}

impl fmt::Debug for KernelCollector {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("KernelCollector")
            .field("resident_max_age", &self.resident_max_age)
            .finish_non_exhaustive()
    }
}

impl KernelCollector {
    pub(super) fn new(source: Box<dyn KernelSource>) -> Self {
        Self::with_max_age(source, RESIDENT_MAX_AGE)
    }

    fn with_max_age(source: Box<dyn KernelSource>, resident_max_age: Duration) -> Self {
        KernelCollector {
            source,
            resident: Mutex::new(None),
            resident_max_age,
            error: Mutex::new(None),
        }
    }

    /// The error of the last failed encoding, if it has not been taken yet.
    pub(super) fn take_error(&self) -> Option<anyhow::Error> {
        self.error
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .take()
    }

    /// The resident counts: the last ones while younger than the maximum age, else a new walk.
    /// A failed walk is not kept: the next scrape tries again.
    fn resident(&self) -> anyhow::Result<Resident> {
        // The lock is held across the walk, so concurrent scrapes (not that `Exporter` lets
        // them happen) share one walk. A panic in the source leaves the cache as it was.
        let mut cached = self.resident.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some((taken, resident)) = *cached
            && taken.elapsed() < self.resident_max_age
        {
            return Ok(resident);
        }
        let resident = self.source.resident()?;
        *cached = Some((Instant::now(), resident));
        Ok(resident)
    }

    fn read(&self) -> anyhow::Result<(Figures, Resident)> {
        Ok((self.source.figures()?, self.resident()?))
    }
}

impl Collector for KernelCollector {
    fn encode(&self, mut encoder: DescriptorEncoder<'_>) -> fmt::Result {
        let (figures, resident) = match self.read() {
            Ok(read) => read,
            Err(err) => {
                *self.error.lock().unwrap_or_else(PoisonError::into_inner) = Some(err);
                return Err(fmt::Error);
            }
        };
        let global = &figures.global;
        let counters = [
            (
                "limiter_packets_passed",
                "IP packets passed by the XDP program, allow-listed clients included.",
                global.passed,
            ),
            (
                "limiter_packets_dropped",
                "IP packets dropped by the XDP program (in dry-run mode: that would have been \
                 dropped; they passed).",
                global.dropped,
            ),
            (
                "limiter_packets_non_ip",
                "Frames that are neither IPv4 nor IPv6, passed untouched.",
                global.non_ip,
            ),
            (
                "limiter_packets_malformed",
                "Truncated or malformed frames, passed untouched.",
                global.malformed,
            ),
            (
                "limiter_clients_created",
                "Client entries created in the LRU client map; once it is full each one evicts \
                 the least recently used dynamic client.",
                global.new_clients,
            ),
            (
                "limiter_map_full",
                "Packets whose client entry could not be created (map full, nothing evictable), \
                 charged to the shared overflow budget.",
                global.map_full,
            ),
            (
                "limiter_policy_resolves",
                "Policy lookups in the prefix trie: a client's first packet, or its first after a \
                 policy change.",
                global.resolves,
            ),
            (
                "limiter_contended",
                "Packets denied because their client's window state stayed contended past the \
                 retry bound.",
                global.contended,
            ),
            (
                "limiter_limited_moves",
                "Clients moved into the never-evicted map of clients over their limit on their \
                 first dropped packet.",
                global.limited_moves,
            ),
            (
                "limiter_limited_full",
                "Dropped packets of clients that could not move into the map of clients over \
                 their limit because it was full (--max-limited), or that came within 10 ms of \
                 a refused move on the same CPU (no move is tried then); they stay evictable.",
                global.limited_full,
            ),
        ];
        for (name, help, value) in counters {
            counter(&mut encoder, name, help, value)?;
        }

        {
            let mut active = encoder.encode_descriptor(
                "limiter_clients_active",
                "Client entries resident in the kernel maps, by key kind: an IP address, or a \
                 named ID from the API.",
                None,
                MetricType::Gauge,
            )?;
            for (kind, value) in [("address", resident.addresses), ("id", resident.ids)] {
                let labels = [("kind", kind)];
                ConstGauge::new(value).encode(active.encode_family(&labels)?)?;
            }
        }
        gauge(
            &mut encoder,
            "limiter_clients_limited",
            "Address clients held now in the never-evicted map of clients over their limit \
             (--max-limited), over their limit in a window not yet over; counted in \
             limiter_clients_active{kind=\"address\"} too.",
            resident.limited,
        )?;

        gauge(
            &mut encoder,
            "limiter_policy_generation",
            "Generation of the policy table in the kernel, bumped on every policy change.",
            u64::from(figures.policy_generation),
        )?;
        gauge(
            &mut encoder,
            "limiter_attached",
            "1 if the XDP program is attached to the interface, else 0.",
            u64::from(figures.attached),
        )?;
        gauge(
            &mut encoder,
            "limiter_dry_run",
            "1 if the limiter runs in dry-run mode (counts what it would drop, drops nothing), \
             else 0.",
            u64::from(figures.dry_run),
        )?;

        let adaptive = &figures.adaptive;
        gauge(
            &mut encoder,
            "limiter_adaptive_enabled",
            "1 if the agent adapts windows and allowances to CPU load and client patterns, else \
             0.",
            u64::from(adaptive.enabled()),
        )?;
        fraction(
            &mut encoder,
            "limiter_adaptive_cpu",
            "Smoothed CPU utilisation the adaptive controller acts on, 0 to 1.",
            adaptive.cpu(),
        )?;
        fraction(
            &mut encoder,
            "limiter_adaptive_load_factor",
            "Global load factor g of the adaptive controller, 1 when not overloaded.",
            adaptive.load_factor(),
        )?;
        gauge(
            &mut encoder,
            "limiter_adaptive_tracked_clients",
            "Clients the adaptive controller tracks (active within its idle_periods).",
            u64::from(adaptive.tracked),
        )?;
        counter(
            &mut encoder,
            "limiter_adaptive_periods",
            "Adaptive controller periods run since the agent started.",
            adaptive.periods,
        )
    }
}

/// A counter family of one sample; `name` without `_total`, which the encoder appends.
pub(super) fn counter(
    encoder: &mut DescriptorEncoder<'_>,
    name: &str,
    help: &str,
    value: u64,
) -> fmt::Result {
    ConstCounter::new(value).encode(encoder.encode_descriptor(
        name,
        help,
        None,
        MetricType::Counter,
    )?)
}

/// A gauge family of one integer sample.
pub(super) fn gauge(
    encoder: &mut DescriptorEncoder<'_>,
    name: &str,
    help: &str,
    value: u64,
) -> fmt::Result {
    ConstGauge::new(value).encode(encoder.encode_descriptor(name, help, None, MetricType::Gauge)?)
}

/// A gauge family of one sample between 0 and 1 (from parts per million): whole values are
/// written as integers (`1`, as the hand-written exposition did, rather than the encoder's
/// `1.0`), others in the shortest decimal form that reads back to the same `f64` (`0.93`).
fn fraction(
    encoder: &mut DescriptorEncoder<'_>,
    name: &str,
    help: &str,
    value: f64,
) -> fmt::Result {
    let descriptor = encoder.encode_descriptor(name, help, None, MetricType::Gauge)?;
    // Exact: a whole `f64` this small converts to `i64` without loss.
    if value.fract() == 0.0 && value.abs() < 1e15 {
        ConstGauge::new(value as i64).encode(descriptor)
    } else {
        ConstGauge::new(value).encode(descriptor)
    }
}

#[cfg(test)]
mod tests {
    use std::sync::{
        Arc,
        atomic::{AtomicU64, AtomicUsize, Ordering},
    };

    use anyhow::anyhow;
    use limiter_common::AdaptiveStatus;
    use prometheus_client::{encoding::prometheus_text, registry::Registry};

    use super::*;

    /// A source that counts how often each method is called, and returns as many address
    /// clients as walks so far (so a served count shows which walk it came from).
    #[derive(Default)]
    struct Counting {
        figures: AtomicUsize,
        walks: AtomicU64,
        fail_walks: bool,
    }

    impl KernelSource for Arc<Counting> {
        fn figures(&self) -> anyhow::Result<Figures> {
            self.figures.fetch_add(1, Ordering::SeqCst);
            Ok(Figures::default())
        }

        fn resident(&self) -> anyhow::Result<Resident> {
            let walks = self.walks.fetch_add(1, Ordering::SeqCst) + 1;
            if self.fail_walks {
                return Err(anyhow!("walk {walks} failed"));
            }
            Ok(Resident {
                addresses: walks,
                ..Resident::default()
            })
        }
    }

    fn scrape(registry: &Registry) -> Result<String, fmt::Error> {
        let mut text = String::new();
        prometheus_text::encode(&mut text, registry)?;
        Ok(text)
    }

    fn registry_of(collector: &Arc<KernelCollector>) -> Registry {
        let mut registry = Registry::default();
        registry.register_collector(Box::new(Arc::clone(collector)));
        registry
    }

    /// The point of the cache: scrapes within the maximum age do not walk the client maps;
    /// each still reads the cheap figures. Past the age, the next scrape walks again.
    #[test]
    fn scrapes_within_the_max_age_do_not_walk_the_client_maps() {
        let source = Arc::new(Counting::default());
        let collector = Arc::new(KernelCollector::with_max_age(
            Box::new(Arc::clone(&source)),
            Duration::from_secs(3600),
        ));
        let registry = registry_of(&collector);
        for _ in 0..5 {
            let text = scrape(&registry).unwrap();
            assert!(
                text.contains("\nlimiter_clients_active{kind=\"address\"} 1\n"),
                "{text}"
            );
        }
        assert_eq!(
            source.walks.load(Ordering::SeqCst),
            1,
            "one walk for five scrapes"
        );
        assert_eq!(
            source.figures.load(Ordering::SeqCst),
            5,
            "figures at every scrape"
        );

        // An expired count is replaced at the next scrape.
        let source = Arc::new(Counting::default());
        let collector = Arc::new(KernelCollector::with_max_age(
            Box::new(Arc::clone(&source)),
            Duration::ZERO,
        ));
        let registry = registry_of(&collector);
        scrape(&registry).unwrap();
        let text = scrape(&registry).unwrap();
        assert!(text.contains("\nlimiter_clients_active{kind=\"address\"} 2\n"));
        assert_eq!(source.walks.load(Ordering::SeqCst), 2);
    }

    /// The agent runs with the documented bound.
    #[test]
    fn the_agent_collector_uses_the_documented_max_age() {
        let collector = KernelCollector::new(Box::new(Arc::new(Counting::default())));
        assert_eq!(collector.resident_max_age, RESIDENT_MAX_AGE);
    }

    /// A failed walk fails the scrape with its error, and is not cached: the next scrape walks
    /// again.
    #[test]
    fn a_failed_walk_fails_the_scrape_and_is_retried() {
        let source = Arc::new(Counting {
            fail_walks: true,
            ..Counting::default()
        });
        let collector = Arc::new(KernelCollector::with_max_age(
            Box::new(Arc::clone(&source)),
            Duration::from_secs(3600),
        ));
        let registry = registry_of(&collector);
        assert!(scrape(&registry).is_err());
        assert_eq!(collector.take_error().unwrap().to_string(), "walk 1 failed");
        assert!(collector.take_error().is_none(), "taken once");
        assert!(scrape(&registry).is_err());
        assert_eq!(collector.take_error().unwrap().to_string(), "walk 2 failed");
    }

    struct Fixed(Figures);

    impl KernelSource for Fixed {
        fn figures(&self) -> anyhow::Result<Figures> {
            Ok(self.0)
        }

        fn resident(&self) -> anyhow::Result<Resident> {
            Ok(Resident::default())
        }
    }

    /// Every CPU figure the controller can write (parts per million) reads back as the same
    /// `f64`, whole ones as integers.
    #[test]
    fn fractions_read_back_exactly() {
        for ppm in [
            0, 1, 7, 10, 999, 123_456, 333_333, 930_000, 999_999, 1_000_000,
        ] {
            let adaptive = AdaptiveStatus {
                cpu_ppm: ppm,
                ..AdaptiveStatus::default()
            };
            let collector = KernelCollector::new(Box::new(Fixed(Figures {
                adaptive,
                ..Figures::default()
            })));
            let mut registry = Registry::default();
            registry.register_collector(Box::new(Arc::new(collector)));
            let mut text = String::new();
            prometheus_text::encode(&mut text, &registry).unwrap();
            let written = text
                .lines()
                .find_map(|line| line.strip_prefix("limiter_adaptive_cpu "))
                .unwrap();
            assert_eq!(written.parse::<f64>().unwrap(), adaptive.cpu(), "{ppm}");
            if ppm % 1_000_000 == 0 {
                assert!(!written.contains('.'), "{written}");
            }
        }
    }
}
