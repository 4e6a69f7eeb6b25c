//! Envoy's rate limit service (`envoy.service.ratelimit.v3.RateLimitService/ShouldRateLimit`)
//! end to end: a real `limiter agent` with `--rls-listen` on 127.0.0.1 of the receiver
//! namespace and `--rls-config`, driven by tonic's generated client (envoy-types) while the
//! sender's packets cross the XDP path. Root only; run one at a time (`--test-threads=1`).
//!
//! Counts are exact: the limits are per hour and each test checks that no hour boundary of
//! CLOCK_MONOTONIC passed during it ([`ExactWindow`]).

use std::{
    io::{Read as _, Write as _},
    net::{IpAddr, SocketAddr, TcpStream},
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, anyhow};
use envoy_types::pb::envoy::{
    extensions::common::ratelimit::v3::{RateLimitDescriptor, rate_limit_descriptor::Entry},
    service::ratelimit::v3::{
        RateLimitRequest, RateLimitResponse,
        rate_limit_response::{Code, rate_limit::Unit},
        rate_limit_service_client::RateLimitServiceClient,
    },
};
use limiter_tests::{
    agent::{Agent, link_has_xdp, run_limiter},
    api::bounded,
    fixture::{ExactWindow, TempDir, wait_until},
    netns::{TestNet, sender_v4},
    require_root,
    traffic::{UDP_PORT, send_and_count},
};
use rcgen::{BasicConstraints, CertificateParams, CertifiedIssuer, IsCa, KeyPair};
use tonic::{
    Status,
    transport::{Certificate, Channel, ClientTlsConfig, Identity},
};

/// Longest any one test's traffic phase may take; the hour window must not end inside it.
const TEST_SPAN: Duration = Duration::from_secs(40);
/// Longest one call may take before the test gives up on it.
const CALL_TIMEOUT: Duration = Duration::from_secs(10);
/// The service's port, on 127.0.0.1 of the receiver namespace.
const RLS_PORT: u16 = 8081;

const AGENT_CONFIG: &str = "\
mode: enforce
default: {limit: 1000, window: 1h}
policies:
  - match: 198.18.0.16/28
    limit: 20
    window: 1h
";

const RLS_CONFIG: &str = "\
domain: web
descriptors:
  - key: user
    rate_limit:
      unit: hour
      requests_per_unit: 5
  - key: tier
    value: small
    rate_limit:
      unit: hour
      requests_per_unit: 1
  - key: remote_address
    rate_limit:
      unit: second
      requests_per_unit: 1000
";

const OK: i32 = Code::Ok as i32;
const OVER: i32 = Code::OverLimit as i32;

/// A blocking client of the service, connected from inside the receiver namespace.
struct Rls {
    rt: tokio::runtime::Runtime,
    client: RateLimitServiceClient<Channel>,
    channel: Channel,
}

impl Rls {
    /// Connects from the receiver namespace to 127.0.0.1 (retrying for up to 10 s: the agent
    /// starts serving just after it attaches).
    fn connect(net: &TestNet) -> Result<Rls> {
        let url = format!("http://127.0.0.1:{RLS_PORT}");
        net.in_receiver(|| Rls::connect_here(&url, None, Duration::from_secs(10)))?
    }

    /// Connects to `url` from the calling thread's namespace, retrying for `patience`.
    fn connect_here(url: &str, tls: Option<ClientTlsConfig>, patience: Duration) -> Result<Rls> {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        let deadline = Instant::now() + patience;
        loop {
            let attempt = rt.block_on(async {
                let mut endpoint = Channel::from_shared(url.to_owned())?;
                if let Some(tls) = &tls {
                    endpoint = endpoint.tls_config(tls.clone())?;
                }
                tokio::time::timeout(CALL_TIMEOUT, endpoint.connect())
                    .await
                    .map_err(|_| anyhow!("connect timed out"))?
                    .map_err(anyhow::Error::from)
            });
            match attempt {
                Ok(channel) => {
                    return Ok(Rls {
                        rt,
                        client: RateLimitServiceClient::new(channel.clone()),
                        channel,
                    });
                }
                Err(e) if Instant::now() >= deadline => {
                    return Err(e.context(format!("connecting to {url}")));
                }
                Err(_) => thread::sleep(Duration::from_millis(20)),
            }
        }
    }

    fn ask(&mut self, request: RateLimitRequest) -> Result<RateLimitResponse, Status> {
        let call = self.client.should_rate_limit(request);
        self.rt.block_on(bounded(CALL_TIMEOUT, call))
    }

    /// ShouldRateLimit for `descriptors` of domain `web`, one hit.
    fn web(&mut self, descriptors: &[&[(&str, &str)]]) -> Result<RateLimitResponse> {
        self.ask(request("web", descriptors))
            .map_err(|s| anyhow!("ShouldRateLimit: {s}"))
    }

    fn serving(&mut self) -> Result<i32> {
        let mut health = tonic_health::pb::health_client::HealthClient::new(self.channel.clone());
        let call = health.check(tonic_health::pb::HealthCheckRequest {
            service: "envoy.service.ratelimit.v3.RateLimitService".into(),
        });
        let answer = self.rt.block_on(bounded(CALL_TIMEOUT, call))?;
        Ok(answer.status)
    }
}

fn request(domain: &str, descriptors: &[&[(&str, &str)]]) -> RateLimitRequest {
    RateLimitRequest {
        domain: domain.into(),
        descriptors: descriptors
            .iter()
            .map(|entries| RateLimitDescriptor {
                entries: entries
                    .iter()
                    .map(|(k, v)| Entry {
                        key: (*k).into(),
                        value: (*v).into(),
                    })
                    .collect(),
                ..RateLimitDescriptor::default()
            })
            .collect(),
        hits_addend: 0,
    }
}

fn codes(r: &RateLimitResponse) -> (i32, Vec<i32>) {
    (r.overall_code, r.statuses.iter().map(|s| s.code).collect())
}

fn start(net: &TestNet, dir: &TempDir, extra: &[&str]) -> Result<Agent> {
    let rls = dir.write("rls.yaml", RLS_CONFIG)?;
    let socket = dir.join("api.sock").to_string_lossy().into_owned();
    let listen = format!("127.0.0.1:{RLS_PORT}");
    let mut args = vec![
        "--api-socket",
        &socket,
        "--rls-listen",
        &listen,
        "--rls-config",
        &rls,
    ];
    args.extend_from_slice(extra);
    Agent::start_with(net, AGENT_CONFIG, &args)
}

/// A descriptor is admitted exactly its limit; a request with a descriptor over its limit is
/// denied whole and spends nothing of its other descriptors; bad requests are
/// INVALID_ARGUMENT naming the field; health says SERVING.
#[test]
fn descriptors_admit_exactly_their_limit_all_or_nothing() -> Result<()> {
    require_root!();
    let net = TestNet::new()?;
    let dir = TempDir::new("rls")?;
    let _agent = start(&net, &dir, &[])?;
    let window = ExactWindow::start(TEST_SPAN);
    let mut rls = Rls::connect(&net)?;
    assert_eq!(
        rls.serving()?,
        tonic_health::pb::health_check_response::ServingStatus::Serving as i32
    );

    let mut lefts = Vec::new();
    let mut overall = Vec::new();
    for _ in 0..8 {
        let r = rls.web(&[&[("user", "ann")]])?;
        overall.push(r.overall_code);
        lefts.push(r.statuses[0].limit_remaining);
        let limit = r.statuses[0]
            .current_limit
            .as_ref()
            .context("current_limit")?;
        assert_eq!(
            (limit.requests_per_unit, limit.unit),
            (5, Unit::Hour as i32),
            "{r:?}"
        );
    }
    assert_eq!(overall, [OK, OK, OK, OK, OK, OVER, OVER, OVER]);
    assert_eq!(lefts, [4, 3, 2, 1, 0, 0, 0, 0]);
    let denied = rls.web(&[&[("user", "ann")]])?;
    let wait = denied.statuses[0]
        .duration_until_reset
        .context("duration_until_reset")?;
    assert!(
        wait.seconds > 0 && wait.seconds <= 3600,
        "one more request is admitted within the hour: {wait:?}"
    );

    // `tier=small` admits 1 an hour: with it, `user=bob` is spent once, then never again.
    let both: [&[(&str, &str)]; 2] = [&[("user", "bob")], &[("tier", "small")]];
    assert_eq!(codes(&rls.web(&both)?), (OK, vec![OK, OK]));
    for _ in 0..6 {
        let r = rls.web(&both)?;
        assert_eq!(codes(&r), (OVER, vec![OK, OVER]), "{r:?}");
        assert_eq!(r.statuses[0].limit_remaining, 4, "bob is not spent: {r:?}");
    }
    let alone: Vec<i32> = (0..6)
        .map(|_| rls.web(&[&[("user", "bob")]]).map(|r| r.overall_code))
        .collect::<Result<_>>()?;
    assert_eq!(alone, [OK, OK, OK, OK, OVER, OVER], "bob had 4 left");

    // An unknown domain, or a descriptor no rule matches: OK, nothing limited.
    let r = rls.ask(request("elsewhere", &[&[("user", "ann")]]))?;
    assert_eq!(codes(&r), (OK, vec![OK]));
    let r = rls.web(&[&[("path", "/")]])?;
    assert!(r.statuses[0].current_limit.is_none(), "{r:?}");

    let e = rls.ask(request("", &[&[("user", "ann")]])).unwrap_err();
    assert_eq!(e.code(), tonic::Code::InvalidArgument);
    assert!(e.message().starts_with("domain:"), "{e}");
    let e = rls.ask(request("web", &[])).unwrap_err();
    assert_eq!(e.code(), tonic::Code::InvalidArgument);
    assert!(e.message().starts_with("descriptors:"), "{e}");
    window.check();
    Ok(())
}

/// A `remote_address` descriptor spends the budget of that address's packets at the XDP fast
/// path, both ways round; with `--rls-address-clients false` it is a client of its own.
#[test]
fn a_remote_address_descriptor_shares_the_budget_of_its_packets() -> Result<()> {
    require_root!();
    let net = TestNet::new()?;
    let dir = TempDir::new("rls")?;
    let agent = start(&net, &dir, &[])?;
    let counter = net.udp_counter(UDP_PORT)?;
    let window = ExactWindow::start(TEST_SPAN);
    let mut rls = Rls::connect(&net)?;

    // 198.18.0.17, under the /28's 20 an hour: 7 packets first.
    let src: IpAddr = sender_v4(7).into();
    let got = send_and_count(&net, &counter, &[(src, 7)])?;
    assert_eq!(got[&src], 7);
    let addr = src.to_string();
    let descriptor: [&[(&str, &str)]; 1] = [&[("remote_address", &addr)]];
    let first = rls.web(&descriptor)?;
    let limit = first.statuses[0]
        .current_limit
        .as_ref()
        .context("current_limit")?;
    assert_eq!(
        (limit.requests_per_unit, limit.unit),
        (20, Unit::Hour as i32),
        "the agent's policy for the address, not the rule's: {first:?}"
    );
    assert_eq!(
        first.statuses[0].limit_remaining, 12,
        "the packets spent 7: {first:?}"
    );
    let mut admitted = 1;
    for _ in 0..20 {
        if rls.web(&descriptor)?.overall_code == OK {
            admitted += 1;
        }
    }
    assert_eq!(admitted, 13, "20 less the 7 packets");
    let got = send_and_count(&net, &counter, &[(src, 10)])?;
    assert_eq!(got[&src], 0, "the service spent what the packets had left");

    // The other way round: requests first, then the packets get the rest.
    let fresh: IpAddr = sender_v4(8).into();
    let fresh_addr = fresh.to_string();
    for _ in 0..15 {
        assert_eq!(
            rls.web(&[&[("remote_address", &fresh_addr)]])?.overall_code,
            OK
        );
    }
    let got = send_and_count(&net, &counter, &[(fresh, 20)])?;
    assert_eq!(got[&fresh], 5, "the packets get what the requests left");
    window.check();
    drop(rls);
    drop(agent);

    // Off: the address is a client of its own under the rule's 1000 per second.
    let dir = TempDir::new("rls-off")?;
    let _agent = start(&net, &dir, &["--rls-address-clients", "false"])?;
    let mut rls = Rls::connect(&net)?;
    let r = rls.web(&[&[("remote_address", &addr)]])?;
    let limit = r.statuses[0]
        .current_limit
        .as_ref()
        .context("current_limit")?;
    assert_eq!(
        (r.overall_code, limit.requests_per_unit, limit.unit),
        (OK, 1000, Unit::Second as i32),
        "{r:?}"
    );
    Ok(())
}

/// A changed config is taken up without a restart; a broken one is refused with its field and
/// line, and the config in force stays.
#[test]
fn the_config_is_reloaded_and_a_bad_one_is_refused() -> Result<()> {
    require_root!();
    let net = TestNet::new()?;
    let dir = TempDir::new("rls")?;
    let agent = start(&net, &dir, &[])?;
    let window = ExactWindow::start(TEST_SPAN);
    let mut rls = Rls::connect(&net)?;
    let limit_of = |rls: &mut Rls, user: &str| -> Result<u32> {
        let r = rls.web(&[&[("user", user)]])?;
        Ok(r.statuses[0]
            .current_limit
            .as_ref()
            .map_or(0, |l| l.requests_per_unit))
    };
    assert_eq!(limit_of(&mut rls, "a")?, 5);
    dir.write(
        "rls.yaml",
        &RLS_CONFIG.replace("requests_per_unit: 5", "requests_per_unit: 7"),
    )?;
    let deadline = Instant::now() + Duration::from_secs(5);
    while limit_of(&mut rls, "b")? != 7 {
        assert!(Instant::now() < deadline, "the new limit was not taken up");
        thread::sleep(Duration::from_millis(50));
    }
    let admitted = (0..10)
        .filter(|_| {
            rls.web(&[&[("user", "c")]])
                .is_ok_and(|r| r.overall_code == OK)
        })
        .count();
    assert_eq!(admitted, 7);

    dir.write(
        "rls.yaml",
        "domain: web\ndescriptors:\n  - key: user\n    rate_limit:\n      unit: fortnight\n",
    )?;
    assert!(
        agent.wait_for_stderr(
            "descriptors[0].rate_limit.unit (line 5)",
            Duration::from_secs(5)
        ),
        "the refusal names the field and line: {}",
        agent.stderr()
    );
    assert!(
        agent
            .stderr()
            .contains("the config in force stays in force")
    );
    assert_eq!(limit_of(&mut rls, "d")?, 7, "the config in force stayed");
    window.check();
    Ok(())
}

/// Under `--rls-scope global` a `cluster:` section that is added and cannot be taken up (its
/// token file is missing) leaves the rules admitting nothing, as a joining node's global limits
/// do; once the section is removed again each rule is the agent's whole limit, without a
/// restart.
#[test]
fn a_cluster_section_not_taken_up_and_removed_leaves_the_rules_whole() -> Result<()> {
    require_root!();
    let net = TestNet::new()?;
    let dir = TempDir::new("rls")?;
    let agent = start(&net, &dir, &["--rls-scope", "global"])?;
    let window = ExactWindow::start(TEST_SPAN);
    let mut rls = Rls::connect(&net)?;
    let left = |rls: &mut Rls, user: &str| -> Result<(i32, u32)> {
        let r = rls.web(&[&[("user", user)]])?;
        Ok((r.overall_code, r.statuses[0].limit_remaining))
    };
    assert_eq!(left(&mut rls, "a")?, (OK, 4), "alone: the whole limit of 5");
    let missing = dir.join("no-such.token").to_string_lossy().into_owned();
    agent.write_config(&format!(
        "{AGENT_CONFIG}cluster:\n  node_id: n1\n  listen: 127.0.0.1:7299\n  peers: []\n  \
         token_file: {missing}\n"
    ))?;
    assert!(
        agent.wait_for_stderr("the added section is not taken up", Duration::from_secs(5)),
        "{}",
        agent.stderr()
    );
    let over = wait_until("the rules to admit nothing", Duration::from_secs(5), || {
        Ok((left(&mut rls, "b")?.0 == OVER).then_some(()))
    });
    assert!(over.is_ok(), "joining: a global rule admits nothing");
    agent.write_config(AGENT_CONFIG)?;
    wait_until(
        "the rules to be whole again",
        Duration::from_secs(5),
        || Ok((left(&mut rls, "c")?.0 == OK).then_some(())),
    )?;
    assert_eq!(left(&mut rls, "c")?, (OK, 3), "the whole limit again");
    window.check();
    Ok(())
}

/// The metrics port, on 127.0.0.1 of the receiver namespace.
const METRICS_PORT: u16 = 9464;

const METRICS_RLS_CONFIG: &str = "\
domain: web
descriptors:
  - key: user
    rate_limit: { unit: hour, requests_per_unit: 5 }
  - key: tier
    value: small
    shadow_mode: true
    rate_limit: { unit: hour, requests_per_unit: 1 }
  - key: client
    detailed_metric: true
    rate_limit: { unit: hour, requests_per_unit: 10 }
";

/// The body of `GET /metrics` on 127.0.0.1:`METRICS_PORT` of the receiver namespace, waiting
/// (up to 10 s) for the endpoint to come up.
fn scrape(net: &TestNet) -> Result<String> {
    let get = || -> Result<String> {
        let raw = net.in_receiver(|| -> Result<Vec<u8>> {
            let addr = SocketAddr::from(([127, 0, 0, 1], METRICS_PORT));
            let mut stream = TcpStream::connect_timeout(&addr, Duration::from_secs(2))?;
            stream.set_read_timeout(Some(Duration::from_secs(5)))?;
            stream.write_all(
                b"GET /metrics HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n",
            )?;
            let mut raw = Vec::new();
            stream.read_to_end(&mut raw)?;
            Ok(raw)
        })??;
        let text = String::from_utf8(raw).context("the answer is not UTF-8")?;
        let (head, body) = text
            .split_once("\r\n\r\n")
            .ok_or_else(|| anyhow!("no end of the head in {text:?}"))?;
        anyhow::ensure!(head.starts_with("HTTP/1.1 200"), "GET /metrics: {head}");
        Ok(body.to_owned())
    };
    wait_until(
        "the metrics endpoint answers",
        Duration::from_secs(10),
        || Ok(get().ok()),
    )
}

/// The value of the one sample of `name` carrying every label of `labels` (whatever others it
/// has), if there is one.
fn sample(body: &str, name: &str, labels: &[(&str, &str)]) -> Option<u64> {
    let found: Vec<u64> = body
        .lines()
        .filter_map(|line| {
            let rest = line.strip_prefix(name)?;
            let (labelled, value) = rest.rsplit_once(' ')?;
            if !labelled.is_empty() && !labelled.starts_with('{') {
                return None;
            }
            labels
                .iter()
                .all(|(k, v)| labelled.contains(&format!("{k}=\"{v}\"")))
                .then(|| value.parse().ok())?
        })
        .collect();
    match found[..] {
        [one] => Some(one),
        _ => None,
    }
}

/// Per-rule counters on `--metrics`: exact within, over, near-limit and shadow-mode hits under
/// the rule's config key; detailed_metric rules under the request's values, capped by
/// --rls-metrics-max-detailed with the rest counted as unrecorded; a reload drops the series
/// of a rule that went.
#[test]
fn per_rule_hits_are_counted_in_the_metrics() -> Result<()> {
    require_root!();
    let net = TestNet::new()?;
    let dir = TempDir::new("rls")?;
    let rls_config = dir.write("rls.yaml", METRICS_RLS_CONFIG)?;
    let socket = dir.join("api.sock").to_string_lossy().into_owned();
    let listen = format!("127.0.0.1:{RLS_PORT}");
    let metrics = format!("127.0.0.1:{METRICS_PORT}");
    let _agent = Agent::start_with(
        &net,
        AGENT_CONFIG,
        &[
            "--api-socket",
            &socket,
            "--rls-listen",
            &listen,
            "--rls-config",
            &rls_config,
            "--metrics",
            &metrics,
            "--rls-metrics-max-detailed",
            "2",
        ],
    )?;
    let window = ExactWindow::start(TEST_SPAN);
    let mut rls = Rls::connect(&net)?;

    // Before any call: the rules' series exist at zero; detailed ones do not yet.
    let body = scrape(&net)?;
    let hits = |body: &str, descriptor: &str, outcome: &str| {
        sample(
            body,
            "limiter_rls_hits_total",
            &[
                ("domain", "web"),
                ("descriptor", descriptor),
                ("outcome", outcome),
            ],
        )
    };
    assert_eq!(hits(&body, "user", "within_limit"), Some(0), "{body}");
    assert_eq!(hits(&body, "client_a", "within_limit"), None, "{body}");

    // user (5 an hour): ann 7 times (5 admitted, the 5th above 80% of 5; 2 refused), bob once.
    let ann: Vec<i32> = (0..7)
        .map(|_| rls.web(&[&[("user", "ann")]]).map(|r| r.overall_code))
        .collect::<Result<_>>()?;
    assert_eq!(ann, [OK, OK, OK, OK, OK, OVER, OVER]);
    assert_eq!(rls.web(&[&[("user", "bob")]])?.overall_code, OK);
    // tier=small (1 an hour, shadow mode): 3 calls all answered OK, 2 of them over.
    for _ in 0..3 {
        assert_eq!(rls.web(&[&[("tier", "small")]])?.overall_code, OK);
    }
    // client (detailed, cap 2): a 3 times, b once, then c twice, which does not fit.
    for client in ["a", "a", "a", "b", "c", "c"] {
        assert_eq!(rls.web(&[&[("client", client)]])?.overall_code, OK);
    }

    let body = scrape(&net)?;
    let labelled = |name: &str, descriptor: &str| {
        sample(
            &body,
            name,
            &[("domain", "web"), ("descriptor", descriptor)],
        )
    };
    assert_eq!(hits(&body, "user", "within_limit"), Some(6), "{body}");
    assert_eq!(hits(&body, "user", "over_limit"), Some(2), "{body}");
    assert_eq!(
        labelled("limiter_rls_near_limit_hits_total", "user"),
        Some(1)
    );
    assert_eq!(
        labelled("limiter_rls_shadow_mode_hits_total", "user"),
        Some(0)
    );
    assert_eq!(hits(&body, "tier_small", "within_limit"), Some(1), "{body}");
    assert_eq!(hits(&body, "tier_small", "over_limit"), Some(2), "{body}");
    assert_eq!(
        labelled("limiter_rls_shadow_mode_hits_total", "tier_small"),
        Some(2)
    );
    assert_eq!(hits(&body, "client_a", "within_limit"), Some(3), "{body}");
    assert_eq!(hits(&body, "client_b", "within_limit"), Some(1), "{body}");
    assert_eq!(hits(&body, "client_c", "within_limit"), None, "{body}");
    assert_eq!(sample(&body, "limiter_rls_detailed_series", &[]), Some(2));
    assert_eq!(
        sample(&body, "limiter_rls_detailed_series_max", &[]),
        Some(2)
    );
    assert_eq!(
        sample(&body, "limiter_rls_unrecorded_hits_total", &[]),
        Some(2),
        "{body}"
    );

    // A reload without the tier rule: its series goes, user's counts go on.
    dir.write(
        "rls.yaml",
        &METRICS_RLS_CONFIG.replace("  - key: tier\n    value: small\n", "  - key: plan\n"),
    )?;
    let body = wait_until(
        "the reload drops tier_small",
        Duration::from_secs(5),
        || {
            let body = scrape(&net)?;
            Ok(hits(&body, "tier_small", "within_limit")
                .is_none()
                .then_some(body))
        },
    )?;
    assert_eq!(hits(&body, "user", "within_limit"), Some(6), "{body}");
    assert_eq!(hits(&body, "plan", "within_limit"), Some(0), "{body}");
    window.check();
    Ok(())
}

/// Plaintext off loopback is refused at start, before anything is attached.
#[test]
fn plaintext_off_loopback_is_refused() -> Result<()> {
    require_root!();
    let net = TestNet::new()?;
    let dir = TempDir::new("rls")?;
    let config = dir.write("limiter.yaml", AGENT_CONFIG)?;
    let rls = dir.write("rls.yaml", RLS_CONFIG)?;
    let socket = dir.join("api.sock").to_string_lossy().into_owned();
    let state = dir.join("state").to_string_lossy().into_owned();
    let listen = format!("198.18.0.1:{RLS_PORT}");
    let out = run_limiter(
        &net.receiver_ns,
        &[
            "agent",
            "--iface",
            &net.receiver_if,
            "--config",
            &config,
            "--xdp-mode",
            "native",
            "--state-dir",
            &state,
            "--api-socket",
            &socket,
            "--rls-listen",
            &listen,
            "--rls-config",
            &rls,
        ],
    )?;
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{stderr}");
    for needle in ["--rls-listen 198.18.0.1", "loopback", "--rls-tls-cert"] {
        assert!(stderr.contains(needle), "{needle:?} not in {stderr}");
    }
    assert!(!link_has_xdp(&net.receiver_link()?), "nothing attached");
    Ok(())
}

/// Off loopback with mutual TLS: a client with a certificate of the configured CA is served,
/// one without a certificate is not.
#[test]
fn mutual_tls_serves_off_loopback() -> Result<()> {
    require_root!();
    let net = TestNet::new()?;
    let dir = TempDir::new("rls-tls")?;
    let mut params = CertificateParams::new(Vec::<String>::new())?;
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    let ca = CertifiedIssuer::self_signed(params, KeyPair::generate()?)?;
    let issue = |name: &str, sans: &[&str]| -> Result<(String, String)> {
        let key = KeyPair::generate()?;
        let cert = CertificateParams::new(sans.iter().map(|s| s.to_string()).collect::<Vec<_>>())?
            .signed_by(&key, &ca)?;
        Ok((
            dir.write(&format!("{name}.pem"), &cert.pem())?,
            dir.write(&format!("{name}.key"), &key.serialize_pem())?,
        ))
    };
    let (server_cert, server_key) = issue("server", &["198.18.0.1"])?;
    let (client_cert, client_key) = issue("envoy", &["envoy"])?;
    let ca_path = dir.write("ca.pem", &ca.pem())?;
    let rls = dir.write("rls.yaml", RLS_CONFIG)?;
    let socket = dir.join("api.sock").to_string_lossy().into_owned();
    let listen = format!("198.18.0.1:{RLS_PORT}");
    let _agent = Agent::start_with(
        &net,
        AGENT_CONFIG,
        &[
            "--api-socket",
            &socket,
            "--rls-listen",
            &listen,
            "--rls-config",
            &rls,
            "--rls-tls-cert",
            &server_cert,
            "--rls-tls-key",
            &server_key,
            "--rls-tls-client-ca",
            &ca_path,
        ],
    )?;
    let url = format!("https://198.18.0.1:{RLS_PORT}");
    let trust = ClientTlsConfig::new().ca_certificate(Certificate::from_pem(ca.pem()));
    let with_cert = trust.clone().identity(Identity::from_pem(
        std::fs::read(&client_cert)?,
        std::fs::read(&client_key)?,
    ));
    let (served, refused) = net.in_sender(|| -> Result<_> {
        let mut rls = Rls::connect_here(&url, Some(with_cert), Duration::from_secs(10))?;
        let served = rls.web(&[&[("user", "tls")]])?;
        // Without a client certificate the handshake (or the first call) fails.
        let refused = match Rls::connect_here(&url, Some(trust), Duration::ZERO) {
            Err(e) => format!("connect: {e:#}"),
            Ok(mut rls) => match rls.web(&[&[("user", "tls")]]) {
                Ok(r) => anyhow::bail!("served without a client certificate: {r:?}"),
                Err(e) => format!("call: {e:#}"),
            },
        };
        Ok((served, refused))
    })??;
    assert_eq!(codes(&served), (OK, vec![OK]));
    assert_eq!(served.statuses[0].limit_remaining, 4);
    eprintln!("refused as expected: {refused}");
    Ok(())
}

/// With `--rls-threads 3` the connections are served by three threads in turn: four
/// connections (thread 0 serves two), each on a client thread of its own, all calling at once.
/// Each request has two descriptors: `user=spread`, whose limit of 5 an hour all of them share,
/// and `user=own-I`, its connection's own (5 an hour). Across the threads the shared budget is
/// admitted exactly 5 times, and all or nothing: a connection's own descriptor was spent only
/// by its admitted requests, so it has exactly 5 less those left. The metrics show every thread
/// answered its connections' calls (on one thread this would fail). The agent still stops
/// cleanly (SIGTERM: every thread drains its connections).
#[test]
fn connections_spread_over_the_serving_threads_share_one_budget() -> Result<()> {
    require_root!();
    const CONNECTIONS: usize = 4;
    const CALLS: usize = 20;
    const ALONE: usize = 6;
    let net = TestNet::new()?;
    let dir = TempDir::new("rls-threads")?;
    let metrics = format!("127.0.0.1:{METRICS_PORT}");
    let agent = start(&net, &dir, &["--rls-threads", "3", "--metrics", &metrics])?;
    assert!(
        agent.wait_for_stderr("threads=3", Duration::from_secs(10)),
        "the service says it serves on 3 threads:\n{}",
        agent.stderr()
    );
    let window = ExactWindow::start(TEST_SPAN);
    // Connected one after the other: the agent hands them to threads 0, 1, 2, 0.
    let clients = (0..CONNECTIONS)
        .map(|_| Rls::connect(&net))
        .collect::<Result<Vec<_>>>()?;
    let together = std::sync::Barrier::new(CONNECTIONS);
    let admitted: Vec<(Rls, usize)> = thread::scope(|scope| {
        let calling: Vec<_> = clients
            .into_iter()
            .enumerate()
            .map(|(i, mut rls)| {
                let together = &together;
                scope.spawn(move || -> Result<(Rls, usize)> {
                    let own = format!("own-{i}");
                    together.wait();
                    let mut admitted = 0;
                    for call in 0..CALLS {
                        let r = rls
                            .web(&[&[("user", "spread")], &[("user", &own)]])
                            .with_context(|| format!("connection {i}, call {call}"))?;
                        admitted += usize::from(r.overall_code == OK);
                    }
                    Ok((rls, admitted))
                })
            })
            .collect();
        calling
            .into_iter()
            .map(|t| t.join().map_err(|_| anyhow!("a client thread panicked"))?)
            .collect::<Result<Vec<_>>>()
    })?;
    let total: usize = admitted.iter().map(|(_, n)| n).sum();
    let each: Vec<usize> = admitted.iter().map(|(_, n)| *n).collect();
    assert_eq!(
        total,
        5,
        "{} requests at once, sharing a client limited to 5 an hour, admitted {each:?}",
        CONNECTIONS * CALLS
    );
    for (i, (rls, spent)) in admitted.into_iter().enumerate() {
        let own = format!("own-{i}");
        let mut rls = rls;
        let left = (0..ALONE)
            .map(|_| rls.web(&[&[("user", &own)]]).map(|r| r.overall_code == OK))
            .collect::<Result<Vec<_>>>()?
            .into_iter()
            .filter(|&ok| ok)
            .count();
        assert_eq!(
            left,
            5 - spent,
            "connection {i} had {spent} requests admitted: only those spent its own descriptor"
        );
    }
    window.check();
    let body = scrape(&net)?;
    let calls: Vec<Option<u64>> = (0..3)
        .map(|t| {
            sample(
                &body,
                "limiter_rls_calls_total",
                &[("thread", &t.to_string())],
            )
        })
        .collect();
    let per_connection = (CALLS + ALONE) as u64;
    assert_eq!(
        calls,
        [
            Some(2 * per_connection),
            Some(per_connection),
            Some(per_connection)
        ],
        "calls answered by threads 0, 1, 2 (four connections handed out in turn)"
    );
    let status = agent.terminate()?;
    assert!(status.success(), "the agent stopped with {status}");
    Ok(())
}
