//! The exposition, checked line by line.

use std::collections::HashMap;

use limiter_common::{AdaptiveStatus, GlobalStats};

use super::*;

/// A [`KernelSource`] from a closure for the figures; the residents are always
/// [`POPULATED_RESIDENT`].
pub(crate) struct FnSource<F>(pub F);

pub(crate) const POPULATED_RESIDENT: Resident = Resident {
    addresses: 38,
    ids: 2,
    limited: 5,
};

impl<F> KernelSource for FnSource<F>
where
    F: Fn() -> anyhow::Result<Figures> + Send + Sync + 'static,
{
    fn figures(&self) -> anyhow::Result<Figures> {
        (self.0)()
    }

    fn resident(&self) -> anyhow::Result<Resident> {
        Ok(POPULATED_RESIDENT)
    }
}

/// The document for these counters and figures.
pub(crate) fn render(counters: &Counters, figures: &Figures, iface: &str) -> String {
    let figures = *figures;
    Exporter::new(iface, counters, FnSource(move || Ok(figures)))
        .scrape()
        .unwrap()
}

pub(crate) fn populated() -> (Counters, Figures) {
    let counters = Counters::default();
    for _ in 0..5 {
        counters.check(true);
    }
    counters.check(false);
    counters.config_reloads.inc_by(3);
    counters.config_rejects.inc_by(1);
    counters.api_limit_changes.inc_by(7);
    counters.api_error(Code::InvalidArgument);
    counters.api_error(Code::InvalidArgument);
    counters.api_error(Code::Unauthenticated);
    counters.api_connections.refused_total.inc_by(4);
    counters.api_connections.refused_per_address.inc_by(2);
    counters.api_connections.open.set(3);
    counters.api_connections.timed_out_unauthenticated.inc_by(5);
    counters.api_connections.displaced.inc_by(3);
    counters.metrics_connections.refused_per_address.inc();
    counters.metrics_connections.open.set(1);
    counters.open_files_limit.set(524_288);
    counters.cluster_members.set(3);
    counters.cluster_cut_off.set(1);
    let figures = Figures {
        global: GlobalStats {
            passed: 1_000_000,
            dropped: 2_500,
            non_ip: 12,
            malformed: 3,
            new_clients: 40,
            map_full: 0,
            resolves: 44,
            contended: 1,
            limited_moves: 6,
            limited_full: 2,
        },
        policy_generation: 9,
        attached: true,
        dry_run: false,
        adaptive: AdaptiveStatus {
            cpu_ppm: 930_000,
            load_factor_ppm: 640_000,
            period_us: 1_000_000,
            tracked: 12,
            periods: 345,
        },
    };
    (counters, figures)
}

#[test]
fn grpc_code_table_is_indexed_by_number() {
    for (index, code) in GRPC_CODES.into_iter().enumerate() {
        assert_eq!(code as usize, index, "{code:?}");
        assert_eq!(Code::from_i32(code as i32), code);
        assert_eq!(code_name(code), format!("{code:?}"));
    }
}

#[test]
fn counters_count() {
    let (counters, _) = populated();
    assert_eq!(counters.checks_allowed.get(), 5);
    assert_eq!(counters.checks_denied.get(), 1);
    assert_eq!(counters.api_errors(Code::InvalidArgument), 2);
    assert_eq!(counters.api_errors(Code::Unauthenticated), 1);
    assert_eq!(counters.api_errors(Code::NotFound), 0);
}

/// The expected document for [`populated`] on `eth0`, line by line.
fn populated_lines() -> Vec<String> {
    let version = env!("CARGO_PKG_VERSION");
    let build_info = format!("limiter_build_info{{iface=\"eth0\",version=\"{version}\"}} 1");
    [
        "# HELP limiter_build_info Build information of the running limiter agent; the value is always 1.",
        "# TYPE limiter_build_info gauge",
        build_info.as_str(),
        "# HELP limiter_checks_total Decisions made by the RateLimiter API, by result.",
        "# TYPE limiter_checks_total counter",
        "limiter_checks_total{iface=\"eth0\",result=\"allowed\"} 5",
        "limiter_checks_total{iface=\"eth0\",result=\"denied\"} 1",
        "# HELP limiter_config_reloads_total Configuration reloads applied.",
        "# TYPE limiter_config_reloads_total counter",
        "limiter_config_reloads_total{iface=\"eth0\"} 3",
        "# HELP limiter_config_rejects_total Configuration changes rejected as invalid; the previous configuration stays in force.",
        "# TYPE limiter_config_rejects_total counter",
        "limiter_config_rejects_total{iface=\"eth0\"} 1",
        "# HELP limiter_api_limit_changes_total Limits set or deleted through the Limits API.",
        "# TYPE limiter_api_limit_changes_total counter",
        "limiter_api_limit_changes_total{iface=\"eth0\"} 7",
        "# HELP limiter_api_errors_total API calls answered with an error status, by gRPC status code (codes never seen are absent).",
        "# TYPE limiter_api_errors_total counter",
        "limiter_api_errors_total{iface=\"eth0\",code=\"InvalidArgument\"} 2",
        "limiter_api_errors_total{iface=\"eth0\",code=\"Unauthenticated\"} 1",
        "# HELP limiter_connections_refused_total TCP connections refused by a listener (closed at once): over its total cap, or over the cap of their source address (an IPv6 /64 counts as one).",
        "# TYPE limiter_connections_refused_total counter",
        "limiter_connections_refused_total{iface=\"eth0\",listener=\"api\",reason=\"total\"} 4",
        "limiter_connections_refused_total{iface=\"eth0\",listener=\"api\",reason=\"per_address\"} 2",
        "limiter_connections_refused_total{iface=\"eth0\",listener=\"metrics\",reason=\"total\"} 0",
        "limiter_connections_refused_total{iface=\"eth0\",listener=\"metrics\",reason=\"per_address\"} 1",
        "# HELP limiter_connections_open TCP connections a listener serves now.",
        "# TYPE limiter_connections_open gauge",
        "limiter_connections_open{iface=\"eth0\",listener=\"api\"} 3",
        "limiter_connections_open{iface=\"eth0\",listener=\"metrics\"} 1",
        "# HELP limiter_connections_timed_out_total TCP API connections closed by the agent: no authenticated call within --api-auth-timeout of opening (unauthenticated), or none in flight for --api-idle-timeout (idle).",
        "# TYPE limiter_connections_timed_out_total counter",
        "limiter_connections_timed_out_total{iface=\"eth0\",listener=\"api\",reason=\"unauthenticated\"} 5",
        "limiter_connections_timed_out_total{iface=\"eth0\",listener=\"api\",reason=\"idle\"} 0",
        "# HELP limiter_connections_displaced_total TCP API connections closed to make room for a new one: the listener served its total cap and they were the oldest that had made no authenticated call.",
        "# TYPE limiter_connections_displaced_total counter",
        "limiter_connections_displaced_total{iface=\"eth0\",listener=\"api\"} 3",
        "# HELP limiter_open_files_limit The limit on open descriptors the agent runs with (RLIMIT_NOFILE, raised at start to its hard limit).",
        "# TYPE limiter_open_files_limit gauge",
        "limiter_open_files_limit{iface=\"eth0\"} 524288",
        "# HELP limiter_cluster_members The agreed member count N of the cluster, which divides each global limit into this node's cold share (0 outside a cluster).",
        "# TYPE limiter_cluster_members gauge",
        "limiter_cluster_members{iface=\"eth0\"} 3",
        "# HELP limiter_cluster_cut_off 1 while this cluster member hears none of its peers; its global policies then follow the `partition` setting.",
        "# TYPE limiter_cluster_cut_off gauge",
        "limiter_cluster_cut_off{iface=\"eth0\"} 1",
        "# HELP limiter_cluster_joining 1 while this cluster member, started without pinned maps, waits to be counted by its peers; its global policies admit nothing meanwhile.",
        "# TYPE limiter_cluster_joining gauge",
        "limiter_cluster_joining{iface=\"eth0\"} 0",
        "# HELP limiter_packets_passed_total IP packets passed by the XDP program, allow-listed clients included.",
        "# TYPE limiter_packets_passed_total counter",
        "limiter_packets_passed_total{iface=\"eth0\"} 1000000",
        "# HELP limiter_packets_dropped_total IP packets dropped by the XDP program (in dry-run mode: that would have been dropped; they passed).",
        "# TYPE limiter_packets_dropped_total counter",
        "limiter_packets_dropped_total{iface=\"eth0\"} 2500",
        "# HELP limiter_packets_non_ip_total Frames that are neither IPv4 nor IPv6, passed untouched.",
        "# TYPE limiter_packets_non_ip_total counter",
        "limiter_packets_non_ip_total{iface=\"eth0\"} 12",
        "# HELP limiter_packets_malformed_total Truncated or malformed frames, passed untouched.",
        "# TYPE limiter_packets_malformed_total counter",
        "limiter_packets_malformed_total{iface=\"eth0\"} 3",
        "# HELP limiter_clients_created_total Client entries created in the LRU client map; once it is full each one evicts the least recently used dynamic client.",
        "# TYPE limiter_clients_created_total counter",
        "limiter_clients_created_total{iface=\"eth0\"} 40",
        "# HELP limiter_map_full_total Packets whose client entry could not be created (map full, nothing evictable), charged to the shared overflow budget.",
        "# TYPE limiter_map_full_total counter",
        "limiter_map_full_total{iface=\"eth0\"} 0",
        "# HELP limiter_policy_resolves_total Policy lookups in the prefix trie: a client's first packet, or its first after a policy change.",
        "# TYPE limiter_policy_resolves_total counter",
        "limiter_policy_resolves_total{iface=\"eth0\"} 44",
        "# HELP limiter_contended_total Packets denied because their client's window state stayed contended past the retry bound.",
        "# TYPE limiter_contended_total counter",
        "limiter_contended_total{iface=\"eth0\"} 1",
        "# HELP limiter_limited_moves_total Clients moved into the never-evicted map of clients over their limit on their first dropped packet.",
        "# TYPE limiter_limited_moves_total counter",
        "limiter_limited_moves_total{iface=\"eth0\"} 6",
        "# HELP limiter_limited_full_total Dropped packets of clients that could not move into the map of clients over their limit because it was full (--max-limited), or that came within 10 ms of a refused move on the same CPU (no move is tried then); they stay evictable.",
        "# TYPE limiter_limited_full_total counter",
        "limiter_limited_full_total{iface=\"eth0\"} 2",
        "# HELP limiter_clients_active Client entries resident in the kernel maps, by key kind: an IP address, or a named ID from the API.",
        "# TYPE limiter_clients_active gauge",
        "limiter_clients_active{iface=\"eth0\",kind=\"address\"} 38",
        "limiter_clients_active{iface=\"eth0\",kind=\"id\"} 2",
        "# HELP limiter_clients_limited Address clients held now in the never-evicted map of clients over their limit (--max-limited), over their limit in a window not yet over; counted in limiter_clients_active{kind=\"address\"} too.",
        "# TYPE limiter_clients_limited gauge",
        "limiter_clients_limited{iface=\"eth0\"} 5",
        "# HELP limiter_policy_generation Generation of the policy table in the kernel, bumped on every policy change.",
        "# TYPE limiter_policy_generation gauge",
        "limiter_policy_generation{iface=\"eth0\"} 9",
        "# HELP limiter_attached 1 if the XDP program is attached to the interface, else 0.",
        "# TYPE limiter_attached gauge",
        "limiter_attached{iface=\"eth0\"} 1",
        "# HELP limiter_dry_run 1 if the limiter runs in dry-run mode (counts what it would drop, drops nothing), else 0.",
        "# TYPE limiter_dry_run gauge",
        "limiter_dry_run{iface=\"eth0\"} 0",
        "# HELP limiter_adaptive_enabled 1 if the agent adapts windows and allowances to CPU load and client patterns, else 0.",
        "# TYPE limiter_adaptive_enabled gauge",
        "limiter_adaptive_enabled{iface=\"eth0\"} 1",
        "# HELP limiter_adaptive_cpu Smoothed CPU utilisation the adaptive controller acts on, 0 to 1.",
        "# TYPE limiter_adaptive_cpu gauge",
        "limiter_adaptive_cpu{iface=\"eth0\"} 0.93",
        "# HELP limiter_adaptive_load_factor Global load factor g of the adaptive controller, 1 when not overloaded.",
        "# TYPE limiter_adaptive_load_factor gauge",
        "limiter_adaptive_load_factor{iface=\"eth0\"} 0.64",
        "# HELP limiter_adaptive_tracked_clients Clients the adaptive controller tracks (active within its idle_periods).",
        "# TYPE limiter_adaptive_tracked_clients gauge",
        "limiter_adaptive_tracked_clients{iface=\"eth0\"} 12",
        "# HELP limiter_adaptive_periods_total Adaptive controller periods run since the agent started.",
        "# TYPE limiter_adaptive_periods_total counter",
        "limiter_adaptive_periods_total{iface=\"eth0\"} 345",
    ]
    .map(str::to_owned)
    .to_vec()
}

/// The whole document for known inputs, line by line: names, HELP and TYPE lines, label
/// order, values, and the family order (the agent's families first, as prometheus-client
/// writes registered metrics before collectors).
#[test]
fn render_writes_every_family() {
    let (counters, figures) = populated();
    let text = render(&counters, &figures, "eth0");
    let expected = populated_lines();
    let lines: Vec<&str> = text.lines().collect();
    for (index, (got, want)) in lines.iter().zip(&expected).enumerate() {
        assert_eq!(got, want, "line {}", index + 1);
    }
    assert_eq!(lines.len(), expected.len(), "{text}");
    assert!(text.ends_with('\n'), "the last line is terminated");
}

#[test]
fn api_errors_family_is_declared_without_samples() {
    let text = render(&Counters::default(), &Figures::default(), "eth0");
    assert!(text.contains("# HELP limiter_api_errors_total "));
    assert!(text.contains("# TYPE limiter_api_errors_total counter\n"));
    assert!(!text.contains("limiter_api_errors_total{"), "{text}");
    // Zero-valued plain series are still written: absent and zero differ to Prometheus.
    assert!(text.contains("limiter_packets_dropped_total{iface=\"eth0\"} 0\n"));
    assert!(text.contains("limiter_attached{iface=\"eth0\"} 0\n"));
    assert!(text.contains("limiter_checks_total{iface=\"eth0\",result=\"denied\"} 0\n"));
    // Adaptive windows off: load factor 1, as enforced.
    assert!(text.contains("limiter_adaptive_enabled{iface=\"eth0\"} 0\n"));
    assert!(text.contains("limiter_adaptive_load_factor{iface=\"eth0\"} 1\n"));
}

#[test]
fn flags_render_as_one() {
    let figures = Figures {
        attached: false,
        dry_run: true,
        ..Figures::default()
    };
    let text = render(&Counters::default(), &figures, "lo");
    assert!(text.contains("\nlimiter_attached{iface=\"lo\"} 0\n"));
    assert!(text.contains("\nlimiter_dry_run{iface=\"lo\"} 1\n"));
}

#[test]
fn label_values_are_escaped() {
    let text = render(
        &Counters::default(),
        &Figures::default(),
        "we\"ird\\if\nace",
    );
    assert!(
        text.contains("\nlimiter_packets_passed_total{iface=\"we\\\"ird\\\\if\\nace\"} 0\n"),
        "{text}"
    );
    // The newline in the label did not split any sample.
    for line in text.lines().filter(|line| !line.starts_with('#')) {
        assert!(line.starts_with("limiter_"), "{line:?}");
    }
}

/// The document read back by `prometheus-parse` (a parser written by others, not for this
/// crate): every family's HELP and TYPE, and every sample with its labels and value, as
/// written. A document it misreads (a sample line it skips, a label it splits wrongly, a
/// value it cannot parse) fails here.
#[test]
fn prometheus_parse_reads_the_whole_document() {
    use prometheus_parse::{Scrape, Value};

    let (counters, figures) = populated();
    let text = render(&counters, &figures, "eth0");
    let scrape = Scrape::parse(text.lines().map(|line| Ok(line.to_owned()))).unwrap();

    let expected = populated_lines();
    let sample_lines: Vec<&String> = expected.iter().filter(|l| !l.starts_with('#')).collect();
    assert_eq!(scrape.samples.len(), sample_lines.len(), "{text}");
    let families = expected
        .iter()
        .filter(|line| line.starts_with("# HELP "))
        .count();
    assert_eq!(scrape.docs.len(), families, "{:?}", scrape.docs);
    assert_eq!(
        scrape.docs["limiter_config_rejects_total"],
        "Configuration changes rejected as invalid; the previous configuration stays in force."
    );
    for (sample, line) in scrape.samples.iter().zip(sample_lines) {
        // The parser keeps the full name (with `_total`) and files a sample under the TYPE
        // of that name: a counter is a counter, a gauge a gauge.
        assert!(line.starts_with(&format!("{}{{", sample.metric)), "{line}");
        assert_eq!(sample.labels.get("iface"), Some("eth0"), "{line}");
        let value = match sample.value {
            Value::Counter(v) => {
                assert!(sample.metric.ends_with("_total"), "{line}");
                v
            }
            Value::Gauge(v) => {
                assert!(!sample.metric.ends_with("_total"), "{line}");
                v
            }
            ref other => panic!("{line}: read as {other:?}"),
        };
        let written: f64 = line.rsplit_once(' ').unwrap().1.parse().unwrap();
        assert_eq!(value, written, "{line}");
    }
    let checks: HashMap<&str, f64> = scrape
        .samples
        .iter()
        .filter(|s| s.metric == "limiter_checks_total")
        .map(|s| match s.value {
            Value::Counter(v) => (s.labels.get("result").unwrap(), v),
            ref other => panic!("{other:?}"),
        })
        .collect();
    assert_eq!(checks, HashMap::from([("allowed", 5.0), ("denied", 1.0)]));
}

/// One parsed sample line.
#[derive(Debug)]
struct Sample {
    name: String,
    labels: Vec<(String, String)>,
    value: f64,
}

/// Parses `name{label="value",...} value` strictly per the 0.0.4 grammar (no timestamp,
/// which the limiter never writes); `None` when the line does not match.
fn parse_sample(line: &str) -> Option<Sample> {
    fn name_end(s: &str, first: fn(char) -> bool, rest: fn(char) -> bool) -> Option<usize> {
        let mut chars = s.char_indices();
        let (_, c) = chars.next()?;
        if !first(c) {
            return None;
        }
        Some(
            chars
                .find(|&(_, c)| !rest(c))
                .map_or(s.len(), |(index, _)| index),
        )
    }
    let metric_first = |c: char| c.is_ascii_alphabetic() || c == '_' || c == ':';
    let metric_rest = |c: char| c.is_ascii_alphanumeric() || c == '_' || c == ':';
    let label_first = |c: char| c.is_ascii_alphabetic() || c == '_';
    let label_rest = |c: char| c.is_ascii_alphanumeric() || c == '_';

    let end = name_end(line, metric_first, metric_rest)?;
    let name = line[..end].to_owned();
    let mut rest = &line[end..];
    let mut labels = Vec::new();
    if let Some(after) = rest.strip_prefix('{') {
        rest = after;
        loop {
            if let Some(after) = rest.strip_prefix('}') {
                rest = after;
                break;
            }
            if !labels.is_empty() {
                rest = rest.strip_prefix(',')?;
            }
            let end = name_end(rest, label_first, label_rest)?;
            let label = rest[..end].to_owned();
            rest = rest[end..].strip_prefix("=\"")?;
            let mut value = String::new();
            let mut chars = rest.char_indices();
            let close = loop {
                match chars.next()? {
                    (index, '"') => break index,
                    (_, '\\') => match chars.next()?.1 {
                        '\\' => value.push('\\'),
                        '"' => value.push('"'),
                        'n' => value.push('\n'),
                        _ => return None,
                    },
                    (_, '\n') => return None,
                    (_, c) => value.push(c),
                }
            };
            rest = &rest[close + 1..];
            labels.push((label, value));
        }
    }
    let value = rest.strip_prefix(' ')?;
    if value.is_empty() || value.contains(' ') {
        return None;
    }
    Some(Sample {
        name,
        labels,
        value: value.parse().ok()?,
    })
}

/// Checks a document against the format's rules: every non-comment line a sample; every
/// family with one HELP and one TYPE, TYPE before any of its samples; a family's samples
/// contiguous; no series twice; every sample labelled with `iface`.
fn check_exposition(text: &str, iface: &str) -> Vec<Sample> {
    let mut help: HashMap<String, usize> = HashMap::new();
    let mut types: HashMap<String, String> = HashMap::new();
    let mut finished: Vec<String> = Vec::new();
    let mut current: Option<String> = None;
    let mut series = Vec::new();
    let mut samples = Vec::new();
    assert!(text.ends_with('\n'));
    for line in text.lines() {
        if let Some(rest) = line.strip_prefix("# HELP ") {
            let (name, _) = rest.split_once(' ').expect("HELP name text");
            *help.entry(name.to_owned()).or_default() += 1;
        } else if let Some(rest) = line.strip_prefix("# TYPE ") {
            let (name, kind) = rest.split_once(' ').expect("TYPE name kind");
            assert!(["counter", "gauge"].contains(&kind), "{line}");
            assert!(
                types.insert(name.to_owned(), kind.to_owned()).is_none(),
                "second TYPE for {name}"
            );
            assert!(help.contains_key(name), "TYPE before HELP for {name}");
            if let Some(done) = current.replace(name.to_owned()) {
                finished.push(done);
            }
        } else {
            assert!(!line.starts_with('#'), "unexpected comment {line:?}");
            let sample = parse_sample(line).unwrap_or_else(|| panic!("not a sample: {line:?}"));
            assert!(
                types.contains_key(&sample.name),
                "sample before its TYPE: {line}"
            );
            assert_eq!(
                current.as_deref(),
                Some(sample.name.as_str()),
                "samples of a family interrupted: {line}"
            );
            assert!(!finished.contains(&sample.name));
            if types[&sample.name] == "counter" {
                assert!(sample.name.ends_with("_total"), "{line}");
            }
            assert_eq!(
                sample.labels.first(),
                Some(&("iface".to_owned(), iface.to_owned())),
                "{line}"
            );
            let key = (sample.name.clone(), sample.labels.clone());
            assert!(!series.contains(&key), "series twice: {line}");
            series.push(key);
            samples.push(sample);
        }
    }
    for (name, count) in &help {
        assert_eq!(*count, 1, "HELP lines for {name}");
        assert!(types.contains_key(name), "HELP without TYPE for {name}");
    }
    samples
}

#[test]
fn exposition_is_well_formed() {
    let (counters, figures) = populated();
    for iface in ["eth0", "a\"b\\c\nd", ""] {
        for (counters, figures) in [
            (&counters, &figures),
            (&Counters::default(), &Figures::default()),
        ] {
            let text = render(counters, figures, iface);
            let samples = check_exposition(&text, iface);
            let families: Vec<&str> = text
                .lines()
                .filter_map(|line| line.strip_prefix("# TYPE "))
                .collect();
            assert_eq!(families.len(), 34, "{text}");
            let value = |name: &str| {
                samples
                    .iter()
                    .find(|sample| sample.name == name)
                    .map(|sample| sample.value)
            };
            assert_eq!(value("limiter_build_info"), Some(1.0));
            assert_eq!(
                value("limiter_packets_passed_total"),
                Some(figures.global.passed as f64)
            );
        }
    }
}

#[test]
fn sample_parser_rejects_malformed_lines() {
    assert!(parse_sample("a{b=\"c\"} 1").is_some());
    assert!(parse_sample("a 1.5").is_some());
    for bad in [
        "a{b=\"c} 1",
        "a{b=\"c\"}1",
        "a{b=c} 1",
        "1a 1",
        "a{b=\"c\",} 1",
        "a{b=\"\\x\"} 1",
        "a x",
        "a 1 2",
        "a",
    ] {
        assert!(parse_sample(bad).is_none(), "{bad:?}");
    }
}

struct FixedCluster(Option<crate::proto::ClusterStatus>);

impl ClusterSource for FixedCluster {
    fn status(&self) -> Option<crate::proto::ClusterStatus> {
        self.0.clone()
    }
}

fn member_status() -> crate::proto::ClusterStatus {
    use crate::proto::{ClusterEnrolment, ClusterPeer, ClusterStatus, ClusterTraffic};
    let d = |ms: u64| prost_types::Duration::try_from(std::time::Duration::from_millis(ms)).ok();
    ClusterStatus {
        configured: true,
        node_id: "n0".into(),
        peers: vec![
            ClusterPeer {
                address: "127.0.0.2:7201".into(),
                node_id: "n1".into(),
                live: true,
                since: d(40),
                agrees: true,
                rtt: d(2),
                ..ClusterPeer::default()
            },
            ClusterPeer {
                address: "127.0.0.3:7201".into(),
                node_id: "n2".into(),
                live: true,
                since: d(1_500),
                agrees: false,
                rtt: None,
                ..ClusterPeer::default()
            },
            ClusterPeer {
                address: "127.0.0.4:7201".into(),
                live: false,
                ..ClusterPeer::default()
            },
        ],
        enrolment: Some(ClusterEnrolment {
            owned: 4,
            held: 9,
            granted: 7,
            refused: 1,
            foreign: 2,
            unwritten: 3,
            learning: 1,
            raises_lapsed: 5,
            capped: 4,
            over_budget: 6,
        }),
        traffic: Some(ClusterTraffic {
            rounds: 1200,
            round_time: d(2_500),
            bytes_sent: 64_000,
            bytes_received: 51_000,
            heartbeats_failed: 6,
        }),
        ..ClusterStatus::default()
    }
}

#[test]
fn a_cluster_member_exports_its_sync_and_enrolment() {
    let (counters, figures) = populated();
    let text = Exporter::new("eth0", &counters, FnSource(move || Ok(figures)))
        .with_cluster(FixedCluster(Some(member_status())))
        .scrape()
        .unwrap();
    let samples = check_exposition(&text, "eth0");
    let value = |name: &str, label: Option<(&str, &str)>| {
        samples
            .iter()
            .find(|s| {
                s.name == name
                    && label.is_none_or(|(k, v)| s.labels.iter().any(|(a, b)| a == k && b == v))
            })
            .map(|s| s.value)
    };
    assert_eq!(
        value("limiter_cluster_peers", Some(("state", "live"))),
        Some(2.0)
    );
    assert_eq!(
        value("limiter_cluster_peers", Some(("state", "down"))),
        Some(1.0)
    );
    assert_eq!(value("limiter_cluster_view_mismatches", None), Some(1.0));
    assert_eq!(
        value(
            "limiter_cluster_peer_last_contact_seconds",
            Some(("peer", "n2"))
        ),
        Some(1.5)
    );
    assert_eq!(
        value("limiter_cluster_peer_rtt_seconds", Some(("peer", "n1"))),
        Some(0.002)
    );
    assert_eq!(
        value("limiter_cluster_peer_rtt_seconds", Some(("peer", "n2"))),
        None
    );
    assert_eq!(value("limiter_cluster_rounds_total", None), Some(1200.0));
    assert_eq!(
        value("limiter_cluster_messages_over_budget_total", None),
        Some(6.0)
    );
    assert_eq!(
        value("limiter_cluster_round_seconds_total", None),
        Some(2.5)
    );
    assert_eq!(
        value("limiter_cluster_bytes_total", Some(("direction", "sent"))),
        Some(64_000.0)
    );
    assert_eq!(
        value("limiter_cluster_heartbeats_failed_total", None),
        Some(6.0)
    );
    assert_eq!(
        value("limiter_cluster_clients", Some(("role", "learning"))),
        Some(1.0)
    );
    assert_eq!(
        value("limiter_cluster_clients", Some(("role", "granted"))),
        Some(7.0)
    );
    assert_eq!(
        value("limiter_cluster_clients", Some(("role", "capped"))),
        Some(4.0)
    );
    assert_eq!(
        value("limiter_cluster_raises_lapsed_total", None),
        Some(5.0)
    );
    assert_eq!(
        value("limiter_cluster_grant_writes_refused_total", None),
        Some(3.0)
    );
    // Outside a cluster: no cluster family at all (the three membership gauges aside).
    let alone = Exporter::new("eth0", &counters, FnSource(move || Ok(figures)))
        .with_cluster(FixedCluster(None))
        .scrape()
        .unwrap();
    assert_eq!(
        alone.matches("# TYPE limiter_cluster_").count(),
        3,
        "{alone}"
    );
}
