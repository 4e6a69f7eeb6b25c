//! End-to-end tests of `limiter agent` and `limiter stats` on a veth pair between two network
//! namespaces. Root only; run one at a time (`cargo xtask test` passes `--test-threads=1`).
//!
//! Counts are exact: every policy uses `window: 1h`, so a fresh client is admitted exactly
//! `limit` packets as long as no hour boundary of CLOCK_MONOTONIC falls inside the test (see
//! [`ExactWindow`]), and the harness sends with light pacing and has nothing else (no ARP, no
//! neighbour discovery) reach the limiter from the test addresses.

use std::{
    fs,
    net::IpAddr,
    path::PathBuf,
    process::Command,
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, ensure};
use limiter_tests::{
    agent::{
        Agent, api_row, api_stats_json, client_counts, find_client, link_has_xdp, run_limiter,
        stats_json,
    },
    fixture::{ExactWindow, TempDir},
    frames::{TPID_8021AD, TPID_8021Q},
    netns::{
        QINQ_INNER, QINQ_OUTER, QINQ_TAGS, TestNet, VLAN_TAGS, pin_dir, qinq_v4, sender_v4,
        sender_v6, vlan_v4,
    },
    require_root,
    traffic::{Pacing, UDP_PORT, send, send_and_count},
};
use serde_json::Value;

/// UDP port the receiver listens on.
/// Longest any one test's traffic phase may take; the hour window must not end inside it.
const TEST_SPAN: Duration = Duration::from_secs(20);

fn u64_field(v: &Value, field: &str) -> u64 {
    v[field]
        .as_u64()
        .unwrap_or_else(|| panic!("{field} is not an unsigned number in {v}"))
}

/// The client entry of `addr` in `stats`, or a panic naming what is there.
fn client(stats: &Value, addr: IpAddr) -> &Value {
    find_client(stats, addr)
        .unwrap_or_else(|| panic!("client {addr} is not in `limiter stats --json`: {stats:#}"))
}

/// A policy name as stats print it; an exact-address policy may be shown with or without
/// its `/32` or `/128`.
fn same_policy(shown: &str, expected: &str) -> bool {
    let bare = |s: &str| {
        s.strip_suffix("/32")
            .or_else(|| s.strip_suffix("/128"))
            .unwrap_or(s)
            .to_owned()
    };
    bare(shown) == bare(expected)
}

/// What one source should see under a `limit` policy.
struct Expect {
    src: IpAddr,
    policy: &'static str,
    limit: u64,
    is_static: bool,
}

/// A temporary directory removed on drop.
/// The 1-based line of the first line of `text` containing `needle`.
fn line_of(text: &str, needle: &str) -> usize {
    text.lines()
        .position(|l| l.contains(needle))
        .unwrap_or_else(|| panic!("{needle:?} is not in the config"))
        + 1
}

/// Whether `log` names `field` and the line of the config where it is.
fn names_field_and_line(log: &str, field: &str, field_line: usize) -> bool {
    log.contains(field) && log.contains(&format!("line {field_line}"))
}

/// The part of the agent's stderr written after `from` bytes.
fn stderr_since(agent: &Agent, from: usize) -> String {
    agent.stderr().get(from..).unwrap_or_default().to_owned()
}

/// Waits up to 3 s for the agent to log something containing `needle` after byte `from` of its
/// stderr; returns what it logged since then.
fn wait_for_log(agent: &Agent, from: usize, needle: &str) -> String {
    let deadline = Instant::now() + Duration::from_secs(3);
    loop {
        let log = stderr_since(agent, from);
        if log.contains(needle) || Instant::now() >= deadline {
            return log;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

// ---------------------------------------------------------------------------------------------
// The harness itself
// ---------------------------------------------------------------------------------------------

/// Without an agent every datagram and every tagged frame arrives, and dropping the network
/// leaves no namespace behind.
#[test]
fn harness_delivers_everything_without_an_agent() -> Result<()> {
    require_root!();
    let names;
    {
        let net = TestNet::new()?;
        names = [net.sender_ns.clone(), net.receiver_ns.clone()];
        let udp = net.udp_counter(UDP_PORT)?;
        let frames = net.frame_counter(UDP_PORT + 1)?;
        let sources: Vec<IpAddr> = vec![sender_v4(0).into(), sender_v6(0).into()];
        for src in &sources {
            send(&net, *src, 500)?;
        }
        let raw = net.raw_sender()?;
        let tagged: [(&[(u16, u16)], IpAddr); 3] = [
            (VLAN_TAGS, vlan_v4(10).into()),
            (QINQ_TAGS, qinq_v4(10).into()),
            (&[], sender_v4(1).into()),
        ];
        for (tags, src) in tagged {
            raw.send_udp(tags, src, UDP_PORT + 1, 300, Pacing::default())?;
        }
        let got = udp.settle()?;
        for src in &sources {
            assert_eq!(got.get(src), Some(&500), "UDP from {src}: {got:?}");
        }
        let got = frames.settle()?;
        for (_, src) in tagged {
            assert_eq!(got.get(&src), Some(&300), "frames from {src}: {got:?}");
        }
    }
    let list = String::from_utf8(Command::new("ip").args(["netns", "list"]).output()?.stdout)?;
    for name in names {
        assert!(
            !list.split_whitespace().any(|w| w == name),
            "namespace {name} left behind: {list}"
        );
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// a. Policies by prefix, by address and by default, IPv4 and IPv6
// ---------------------------------------------------------------------------------------------

#[test]
fn limits_each_source_to_its_policy() -> Result<()> {
    require_root!();
    // The namespaces' IPv6 senders share one /64: count them per address, as IPv4.
    let config = r#"mode: enforce
default: {limit: 7, window: 1h, per: {ipv6: address}}
policies:
  - match: 198.18.0.16/28
    limit: 11
    window: 1h
  - match: 198.18.0.12
    limit: 5
    window: 1h
  - match: "fd00:77::20/124"
    limit: 13
    window: 1h
  - match: "fd00:77::11"
    limit: 4
    window: 1h
"#;
    let expect = [
        Expect {
            src: sender_v4(0).into(), // 198.18.0.10
            policy: "default",
            limit: 7,
            is_static: false,
        },
        Expect {
            src: sender_v4(2).into(), // 198.18.0.12
            policy: "198.18.0.12",
            limit: 5,
            is_static: true,
        },
        Expect {
            src: sender_v4(7).into(), // 198.18.0.17
            policy: "198.18.0.16/28",
            limit: 11,
            is_static: false,
        },
        Expect {
            src: sender_v4(8).into(), // 198.18.0.18: same prefix, its own allowance
            policy: "198.18.0.16/28",
            limit: 11,
            is_static: false,
        },
        Expect {
            src: sender_v6(0).into(), // fd00:77::10
            policy: "default",
            limit: 7,
            is_static: false,
        },
        Expect {
            src: sender_v6(1).into(), // fd00:77::11
            policy: "fd00:77::11",
            limit: 4,
            is_static: true,
        },
        Expect {
            src: sender_v6(0x11).into(), // fd00:77::21
            policy: "fd00:77::20/124",
            limit: 13,
            is_static: false,
        },
        Expect {
            src: sender_v6(0x12).into(), // fd00:77::22
            policy: "fd00:77::20/124",
            limit: 13,
            is_static: false,
        },
    ];
    let net = TestNet::new()?;
    let agent = Agent::start(&net, config)?;
    let counter = net.udp_counter(UDP_PORT)?;
    let window = ExactWindow::start(TEST_SPAN);
    let before = agent.stats()?;
    let global_before = before["global"].clone();
    // An exact-address client that has sent nothing yet is shown under its policy, with its
    // limit (its entry is written blank, resolved by its first packet).
    for e in expect.iter().filter(|e| e.is_static) {
        let c = client(&before, e.src);
        assert!(
            same_policy(c["policy"].as_str().unwrap_or_default(), e.policy),
            "before its first packet, {} is under {}: {c}",
            e.src,
            e.policy
        );
        assert_eq!(
            (u64_field(c, "limit"), &c["action"]),
            (e.limit, &"limit".into()),
            "{c}"
        );
    }

    let sends: Vec<(IpAddr, u64)> = expect.iter().map(|e| (e.src, 3 * e.limit)).collect();
    let got = send_and_count(&net, &counter, &sends)?;
    let stats = agent.stats()?;
    window.check();
    let api = api_stats_json(
        &net.receiver_ns,
        &format!("/run/limiter/{}.sock", net.receiver_if),
    )?;

    for e in &expect {
        let row = api_row(&api, &e.src.to_string())
            .with_context(|| format!("no row for {} in {api:#}", e.src))?;
        assert_eq!(row["static"], e.is_static, "the API's stats: {row}");
        assert_eq!(
            got[&e.src], e.limit,
            "received from {} ({})",
            e.src, e.policy
        );
        let c = client(&stats, e.src);
        assert_eq!(
            u64_field(c, "passed"),
            e.limit,
            "stats passed of {}: {c}",
            e.src
        );
        assert_eq!(
            u64_field(c, "dropped"),
            2 * e.limit,
            "stats dropped of {}: {c}",
            e.src
        );
        assert_eq!(u64_field(c, "limit"), e.limit, "{c}");
        assert_eq!(c["action"], "limit", "{c}");
        assert_eq!(c["static"], e.is_static, "{c}");
        assert!(
            same_policy(c["policy"].as_str().unwrap_or_default(), e.policy),
            "policy of {}: expected {}, got {c}",
            e.src,
            e.policy
        );
        assert_eq!(c["window_ms"].as_f64(), Some(3_600_000.0), "{c}");
    }
    assert_eq!(stats["mode"], "enforce");
    assert!(stats["generation"].as_u64() >= Some(1));
    let (limits, drops): (u64, u64) = expect
        .iter()
        .fold((0, 0), |(p, d), e| (p + e.limit, d + 2 * e.limit));
    let global = &stats["global"];
    assert!(
        u64_field(global, "passed") - u64_field(&global_before, "passed") >= limits,
        "global: {global}"
    );
    assert!(
        u64_field(global, "dropped") - u64_field(&global_before, "dropped") >= drops,
        "global: {global}"
    );
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// b. Hot reload
// ---------------------------------------------------------------------------------------------

fn prefix_config(limit: u32) -> String {
    format!(
        "mode: enforce
default: {{limit: 7, window: 1h}}
policies:
  - match: 198.18.0.16/28
    limit: {limit}
    window: 1h
"
    )
}

#[test]
fn hot_reload_raises_a_limit_without_resetting_counters() -> Result<()> {
    require_root!();
    let net = TestNet::new()?;
    let agent = Agent::start(&net, &prefix_config(10))?;
    let counter = net.udp_counter(UDP_PORT)?;
    let window = ExactWindow::start(TEST_SPAN);
    let (raised, other, fresh): (IpAddr, IpAddr, IpAddr) = (
        sender_v4(7).into(), // 198.18.0.17, in the prefix
        sender_v4(0).into(), // 198.18.0.10, default
        sender_v4(8).into(), // 198.18.0.18, in the prefix, first seen after the reload
    );

    let got = send_and_count(&net, &counter, &[(raised, 30), (other, 21)])?;
    assert_eq!((got[&raised], got[&other]), (10, 7), "before the reload");
    let before = agent.stats()?;
    assert_eq!(client_counts(&before, raised), (10, 20));
    assert_eq!(client_counts(&before, other), (7, 14));

    let (generation, took) = agent.reload(&prefix_config(25), Duration::from_secs(5))?;
    eprintln!("reload applied in {took:?}");
    assert_eq!(generation, u64_field(&before, "generation") + 1);
    assert!(
        took <= Duration::from_secs(1),
        "the reload took {took:?} to apply"
    );

    let after = agent.stats()?;
    assert_eq!(
        client_counts(&after, other),
        client_counts(&before, other),
        "an unchanged client's counters changed at the reload"
    );
    assert_eq!(client_counts(&after, raised), (10, 20));
    assert_eq!(
        u64_field(client(&after, raised), "limit"),
        25,
        "stats show a client as its next packet will find it, under the reloaded policy"
    );
    let api = api_stats_json(
        &net.receiver_ns,
        &format!("/run/limiter/{}.sock", net.receiver_if),
    )?;
    let row = api_row(&api, &raised.to_string())
        .with_context(|| format!("no row for {raised} in {api:#}"))?;
    assert_eq!(row["limit"], 25, "the API's stats too: {row}");
    // The fields `limiter stats --iface` has, under its names.
    assert_eq!(row["addr"], raised.to_string(), "{row}");
    assert_eq!(row["static"], false, "{row}");
    assert!(row["rate_per_s"].is_f64(), "{row}");

    let got = send_and_count(&net, &counter, &[(raised, 30), (other, 5), (fresh, 30)])?;
    let stats = agent.stats()?;
    window.check();
    assert_eq!(
        got[&raised], 15,
        "the raised client gets exactly the extra 25 - 10"
    );
    assert_eq!(got[&other], 0, "the default client is still at its limit");
    assert_eq!(
        got[&fresh], 25,
        "a new client of the prefix gets the new limit"
    );
    assert_eq!(client_counts(&stats, raised), (25, 35));
    assert_eq!(client_counts(&stats, other), (7, 19));
    assert_eq!(client_counts(&stats, fresh), (25, 5));
    assert_eq!(u64_field(client(&stats, raised), "limit"), 25);
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// c. A rejected reload
// ---------------------------------------------------------------------------------------------

#[test]
fn rejected_reload_keeps_the_old_policies() -> Result<()> {
    require_root!();
    let net = TestNet::new()?;
    let agent = Agent::start(&net, &prefix_config(10))?;
    let counter = net.udp_counter(UDP_PORT)?;
    let window = ExactWindow::start(TEST_SPAN);
    let generation = agent.generation()?;

    let first: IpAddr = sender_v4(7).into();
    let got = send_and_count(&net, &counter, &[(first, 30)])?;
    assert_eq!(got[&first], 10);

    let bad_window = "mode: enforce
default: {limit: 7, window: 1h}
policies:
  - match: 198.18.0.16/28
    limit: 50
    window: 5x
";
    let bad_match = "mode: enforce
default: {limit: 7, window: 1h}
policies:
  - match: 10.0.0.0/33
    limit: 50
    window: 1h
";
    let probes: [(&str, &str, &str, IpAddr); 2] = [
        (bad_window, "window", "5x", sender_v4(8).into()),
        (bad_match, "match", "10.0.0.0/33", sender_v4(9).into()),
    ];
    for (config, field, value, probe) in probes {
        let line = line_of(config, value);
        let from = agent.stderr().len();
        agent.write_config(config)?;
        let log = wait_for_log(&agent, from, value);
        assert!(
            names_field_and_line(&log, field, line),
            "the agent should log why it rejected `{field}: {value}` (line {line}); it logged: \
             {log:?}"
        );
        // Give a (wrong) reload time to land before checking that none did.
        std::thread::sleep(Duration::from_millis(300));
        assert_eq!(
            agent.generation()?,
            generation,
            "a rejected config was applied"
        );
        let got = send_and_count(&net, &counter, &[(probe, 30), (first, 5)])?;
        assert_eq!(
            got[&probe], 10,
            "a new client after rejecting {field}: old limit"
        );
        assert_eq!(got[&first], 0, "the first client stays at the old limit");
        assert!(
            agent.exited()?.is_none(),
            "the agent exited after a bad config: {}",
            agent.stderr()
        );
    }

    // A good config after the bad ones is applied as usual.
    let (new_generation, _) = agent.reload(&prefix_config(12), Duration::from_secs(5))?;
    assert_eq!(new_generation, generation + 1);
    let got = send_and_count(&net, &counter, &[(first, 5)])?;
    let stats = agent.stats()?;
    window.check();
    assert_eq!(got[&first], 2, "raised from 10 to 12");
    assert_eq!(client_counts(&stats, first), (12, 20 + 5 + 5 + 3));
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// d. Dry run
// ---------------------------------------------------------------------------------------------

#[test]
fn dry_run_passes_everything_and_counts_would_be_drops() -> Result<()> {
    require_root!();
    let config = "mode: dry-run
default: {limit: 7, window: 1h}
policies:
  - match: 198.18.0.16/28
    limit: 10
    window: 1h
  - match: \"fd00:77::10\"
    limit: 4
    window: 1h
";
    let net = TestNet::new()?;
    let agent = Agent::start(&net, config)?;
    let counter = net.udp_counter(UDP_PORT)?;
    let window = ExactWindow::start(TEST_SPAN);
    let cases: [(IpAddr, u64, u64); 3] = [
        (sender_v4(0).into(), 7, 21),
        (sender_v4(7).into(), 10, 30),
        (sender_v6(0).into(), 4, 40),
    ];
    let sends: Vec<(IpAddr, u64)> = cases.iter().map(|(s, _, n)| (*s, *n)).collect();
    let got = send_and_count(&net, &counter, &sends)?;
    let stats = agent.stats()?;
    window.check();
    assert_eq!(stats["mode"], "dry-run");
    for (src, limit, sent) in cases {
        assert_eq!(got[&src], sent, "dry-run must pass everything from {src}");
        assert_eq!(
            client_counts(&stats, src),
            (limit, sent - limit),
            "stats of {src} count the would-be drops"
        );
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// e. Allow and block lists
// ---------------------------------------------------------------------------------------------

#[test]
fn pass_and_drop_actions() -> Result<()> {
    require_root!();
    let config = r#"mode: enforce
default: {limit: 7, window: 1h}
policies:
  - match: 198.18.0.11
    action: pass
  - match: "fd00:77::12"
    action: pass
  - match: 198.18.0.32/28
    action: drop
  - match: "fd00:77::30/124"
    action: drop
"#;
    let net = TestNet::new()?;
    let agent = Agent::start(&net, config)?;
    let counter = net.udp_counter(UDP_PORT)?;
    let window = ExactWindow::start(TEST_SPAN);
    let cases: [(IpAddr, &str, u64, u64); 5] = [
        (sender_v4(1).into(), "pass", 300, 300), // 198.18.0.11
        (sender_v6(2).into(), "pass", 300, 300), // fd00:77::12
        (sender_v4(23).into(), "drop", 50, 0),   // 198.18.0.33
        (sender_v6(0x21).into(), "drop", 50, 0), // fd00:77::31
        (sender_v4(0).into(), "limit", 21, 7),   // default
    ];
    let sends: Vec<(IpAddr, u64)> = cases.iter().map(|c| (c.0, c.2)).collect();
    let got = send_and_count(&net, &counter, &sends)?;
    let stats = agent.stats()?;
    window.check();
    for (src, action, sent, expected) in cases {
        assert_eq!(got[&src], expected, "received from {src} ({action})");
        let c = client(&stats, src);
        assert_eq!(c["action"], action, "{c}");
        assert_eq!(
            client_counts(&stats, src),
            (expected, sent - expected),
            "{c}"
        );
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// f. VLAN-tagged traffic
// ---------------------------------------------------------------------------------------------

/// Frames with these VLAN tags (outermost first) from this source: (tags, source, sent,
/// expected through).
type Tagged = (&'static [(u16, u16)], IpAddr, u64, u64);

#[test]
fn vlan_and_qinq_traffic_is_limited() -> Result<()> {
    require_root!();
    // The namespaces' IPv6 senders share one /64: count them per address, as IPv4.
    let config = "mode: enforce
default: {limit: 7, window: 1h, per: {ipv6: address}}
policies:
  - match: 198.18.10.0/24
    limit: 9
    window: 1h
  - match: 198.18.20.0/24
    limit: 6
    window: 1h
";
    let net = TestNet::new()?;
    let agent = Agent::start(&net, config)?;
    let frames = net.frame_counter(UDP_PORT)?;
    let raw = net.raw_sender()?;
    let window = ExactWindow::start(TEST_SPAN);
    let three_tags: &[(u16, u16)] = &[
        (TPID_8021AD, QINQ_OUTER),
        (TPID_8021Q, QINQ_INNER),
        (TPID_8021Q, 40),
    ];
    // (tags, source, sent, expected through)
    let cases: [Tagged; 7] = [
        (VLAN_TAGS, vlan_v4(10).into(), 27, 9),
        (VLAN_TAGS, vlan_v4(11).into(), 27, 9),
        (QINQ_TAGS, qinq_v4(10).into(), 18, 6),
        (QINQ_TAGS, sender_v4(0).into(), 21, 7), // default policy, double-tagged
        (VLAN_TAGS, sender_v6(3).into(), 21, 7), // IPv6 in 802.1Q
        (QINQ_TAGS, sender_v6(4).into(), 21, 7), // IPv6 in QinQ
        // Three tags are more than the parser looks through: a non-IP frame, passed untouched.
        (three_tags, qinq_v4(99).into(), 40, 40),
    ];
    let global_before = agent.stats()?["global"].clone();
    frames.settle()?;
    for (tags, src, sent, _) in cases {
        raw.send_udp(tags, src, UDP_PORT, sent, Pacing::default())?;
    }
    let got = frames.settle()?;
    let stats = agent.stats()?;
    window.check();
    let (three, limited) = cases.split_last().expect("cases");
    for (tags, src, sent, expected) in limited {
        assert_eq!(
            got.get(src).copied().unwrap_or(0),
            *expected,
            "frames from {src} with tags {tags:x?}"
        );
        assert_eq!(client_counts(&stats, *src), (*expected, sent - expected));
    }
    let (_, src, sent, _) = *three;
    assert_eq!(got.get(&src).copied().unwrap_or(0), sent, "three tags");
    assert!(
        find_client(&stats, src).is_none(),
        "a triple-tagged frame was limited as IP: {stats}"
    );
    let non_ip = u64_field(&stats["global"], "non_ip") - u64_field(&global_before, "non_ip");
    assert!(
        non_ip >= sent,
        "non_ip grew by {non_ip}, expected >= {sent}"
    );
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// g. Command-line errors
// ---------------------------------------------------------------------------------------------

const GOOD_CONFIG: &str = "default: {limit: 100, window: 1s}\n";

#[test]
fn agent_on_a_missing_interface_fails_clearly() -> Result<()> {
    require_root!();
    let net = TestNet::new()?;
    let dir = TempDir::new("noif")?;
    let config = dir.write("limiter.yaml", GOOD_CONFIG)?;
    let out = run_limiter(
        &net.receiver_ns,
        &[
            "agent",
            "--iface",
            "nosuch0",
            "--config",
            &config,
            "--xdp-mode",
            "native",
        ],
    )?;
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "exit {}: {stderr}", out.status);
    assert!(
        stderr.contains("does not exist") && stderr.contains("nosuch0"),
        "stderr: {stderr}"
    );
    assert_eq!(
        stderr.trim().lines().count(),
        1,
        "a one-line message: {stderr}"
    );
    let _ = fs::remove_dir_all(pin_dir("nosuch0"));
    Ok(())
}

/// A second agent on an interface one already runs on is refused before it touches anything,
/// whatever API socket and state directory it was given (it used to take the pinned link over,
/// write its own config into the maps, and detach the program when it stopped); the first
/// keeps its program attached and its config in force.
#[test]
fn a_second_agent_on_the_same_interface_is_refused() -> Result<()> {
    require_root!();
    let net = TestNet::new()?;
    let first = Agent::start(&net, "default: {limit: 7, window: 1h}\n")?;
    let dir = TempDir::new("second")?;
    let socket = dir.join("second.sock").to_string_lossy().into_owned();
    let second = Agent::spawn(&net, GOOD_CONFIG, &["--api-socket", &socket])?;
    let deadline = Instant::now() + Duration::from_secs(15);
    let status = loop {
        if let Some(status) = second.exited()? {
            break status;
        }
        assert!(Instant::now() < deadline, "the second agent did not stop");
        std::thread::sleep(Duration::from_millis(20));
    };
    let log = second.stderr();
    assert!(!status.success(), "{log}");
    assert!(
        log.contains(&format!(
            "another limiter agent (pid {}) runs on {} in this network namespace",
            first.pid().context("the first agent's pid")?,
            net.receiver_if
        )),
        "{log}"
    );
    assert!(
        first.xdp_attached()?,
        "the first agent's program stays attached"
    );
    let counter = net.udp_counter(UDP_PORT)?;
    let src: IpAddr = sender_v4(3).into();
    let got = send_and_count(&net, &counter, &[(src, 10)])?;
    assert_eq!(got[&src], 7, "the first agent's limit is in force");
    assert!(first.exited()?.is_none(), "{}", first.stderr());
    Ok(())
}

#[test]
fn agent_with_a_bad_config_fails_at_startup() -> Result<()> {
    require_root!();
    let net = TestNet::new()?;
    let dir = TempDir::new("badcfg")?;
    let text = "mode: enforce
default: {limit: 7, window: 1h}
policies:
  - match: 198.18.0.16/28
    limit: 10
    window: 5x
";
    let config = dir.write("limiter.yaml", text)?;
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
        ],
    )?;
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "exit {}: {stderr}", out.status);
    let line = line_of(text, "5x");
    assert!(
        names_field_and_line(&stderr, "window", line),
        "stderr should name the field and line {line}: {stderr}"
    );
    assert!(
        !link_has_xdp(&net.receiver_link()?),
        "a program stayed attached: {}",
        net.receiver_link()?
    );
    Ok(())
}

#[test]
fn native_xdp_on_loopback_is_refused() -> Result<()> {
    require_root!();
    let net = TestNet::new()?;
    let dir = TempDir::new("lo")?;
    let config = dir.write("limiter.yaml", GOOD_CONFIG)?;
    let lo_pins = pin_dir("lo");
    let had_lo_pins = lo_pins.exists();
    let out = run_limiter(
        &net.receiver_ns,
        &[
            "agent",
            "--iface",
            "lo",
            "--config",
            &config,
            "--xdp-mode",
            "native",
        ],
    );
    if !had_lo_pins {
        let _ = fs::remove_dir_all(&lo_pins);
    }
    let out = out?;
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "exit {}: {stderr}", out.status);
    assert!(
        stderr.contains("does not support XDP in native mode"),
        "stderr: {stderr}"
    );
    assert_eq!(
        stderr.trim().lines().count(),
        1,
        "a one-line message: {stderr}"
    );
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// h. SIGTERM
// ---------------------------------------------------------------------------------------------

#[test]
fn sigterm_detaches_and_exits_zero() -> Result<()> {
    require_root!();
    let net = TestNet::new()?;
    let agent = Agent::start(&net, GOOD_CONFIG)?;
    let link = net.receiver_link()?;
    assert!(link_has_xdp(&link), "no XDP program attached: {link}");
    let started = Instant::now();
    let status = agent.terminate()?;
    eprintln!("the agent exited {:?} after SIGTERM", started.elapsed());
    assert!(
        status.success(),
        "exit status {status}; stderr:\n{}",
        agent.stderr()
    );
    let link = net.receiver_link()?;
    assert!(
        !link.contains("xdp"),
        "still attached after SIGTERM: {link}"
    );
    assert!(
        pin_dir(&net.receiver_if).join("CLIENTS").exists(),
        "the maps should stay pinned after the agent exits"
    );
    Ok(())
}

/// A crashed agent (SIGKILL) leaves its pinned link, so the program keeps enforcing; the next
/// agent adopts the pinned maps with their counters.
#[test]
fn after_a_crash_enforcement_continues_and_a_new_agent_adopts_the_counters() -> Result<()> {
    require_root!();
    let net = TestNet::new()?;
    let counter = net.udp_counter(UDP_PORT)?;
    let window = ExactWindow::start(TEST_SPAN);
    let (first, second): (IpAddr, IpAddr) = (sender_v4(7).into(), sender_v4(8).into());
    let generation;
    {
        let mut agent = Agent::start(&net, &prefix_config(10))?;
        generation = agent.generation()?;
        let got = send_and_count(&net, &counter, &[(first, 30)])?;
        assert_eq!(got[&first], 10);
        let status = agent.kill()?;
        assert!(!status.success());
        assert!(
            link_has_xdp(&net.receiver_link()?),
            "the program should stay attached after a crash"
        );
        let got = send_and_count(&net, &counter, &[(second, 30), (first, 5)])?;
        assert_eq!(
            (got[&second], got[&first]),
            (10, 0),
            "enforcement without an agent"
        );
        agent.keep_pins();
    }
    let agent = Agent::start(&net, &prefix_config(10))?;
    agent.wait_generation(generation + 1, Duration::from_secs(15))?;
    let got = send_and_count(&net, &counter, &[(first, 5), (second, 5)])?;
    let stats = agent.stats()?;
    window.check();
    assert_eq!(
        (got[&first], got[&second]),
        (0, 0),
        "counters survive the agent restart"
    );
    assert_eq!(client_counts(&stats, first), (10, 20 + 5 + 5));
    assert_eq!(client_counts(&stats, second), (10, 20 + 5));
    Ok(())
}

/// A crashed agent's program stays attached, and stats say so; once the interface is deleted
/// (which detaches the link and leaves its pin) they say it is not.
#[test]
fn stats_say_detached_once_the_interface_is_gone() -> Result<()> {
    require_root!();
    let net = TestNet::new()?;
    let mut agent = Agent::start(&net, GOOD_CONFIG)?;
    assert!(!agent.kill()?.success());
    agent.keep_pins();
    let stats = stats_json(&net.receiver_ns, &net.receiver_if)?;
    assert_eq!(stats["attached"], true, "{stats}");
    let out = Command::new("ip")
        .args(["-n", &net.receiver_ns, "link", "del", &net.receiver_if])
        .output()?;
    ensure!(out.status.success(), "ip link del: {out:?}");
    let stats = stats_json(&net.receiver_ns, &net.receiver_if)?;
    assert_eq!(stats["attached"], false, "{stats}");
    Ok(())
}

/// Dropping the guards stops the agent, removes its pins and both namespaces.
#[test]
fn guards_clean_up_agent_pins_and_namespaces() -> Result<()> {
    require_root!();
    let (names, pins, pid);
    {
        let net = TestNet::new()?;
        let agent = Agent::start(&net, GOOD_CONFIG)?;
        names = [net.sender_ns.clone(), net.receiver_ns.clone()];
        pins = pin_dir(&net.receiver_if);
        pid = agent.pid().context("agent pid")?;
        assert!(pins.exists());
    }
    assert!(!pins.exists(), "{} left behind", pins.display());
    assert!(
        !PathBuf::from(format!("/proc/{pid}")).exists()
            || fs::read_to_string(format!("/proc/{pid}/cmdline"))
                .is_ok_and(|c| !c.contains("agent")),
        "agent {pid} still running"
    );
    let list = String::from_utf8(Command::new("ip").args(["netns", "list"]).output()?.stdout)?;
    for name in names {
        assert!(
            !list.split_whitespace().any(|w| w == name),
            "namespace {name} left behind: {list}"
        );
    }
    Ok(())
}
