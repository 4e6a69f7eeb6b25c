//! Hostile sources against a real agent on a veth pair: spoofed source addresses sent as raw
//! frames from the sender namespace, counted per source at the receiver's veth (every frame the
//! XDP program passed). Root only; run one at a time (`cargo xtask test` passes
//! `--test-threads=1`).
//!
//! Counts are exact: the limits use `window: 1h` (see [`ExactWindow`]) unless a test is about
//! windows ending.

use std::{
    collections::HashMap,
    net::{IpAddr, Ipv4Addr},
    os::fd::{AsFd as _, AsRawFd as _},
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, ensure};
use aya::maps::MapData;
use limiter_tests::{
    agent::{Agent, client_counts, find_client},
    fixture::ExactWindow,
    netns::{TestNet, pin_dir},
    require_root,
    traffic::{Pacing, PacketCounter, RawSender, UDP_PORT},
};
use serde_json::Value;

/// Longest any one test's traffic phase may take; the hour window must not end inside it.
const TEST_SPAN: Duration = Duration::from_secs(60);

/// The `i`-th spoofed IPv4 source: 198.18.128.0 upwards (inside the test range 198.18.0.0/15,
/// outside the addresses the namespaces own).
fn spoofed_v4(i: u32) -> IpAddr {
    let [_, _, hi, lo] = (0x8000 + i).to_be_bytes();
    IpAddr::V4(Ipv4Addr::new(198, 18, hi, lo))
}

/// The `i`-th address of `2001:db8:0:NET::/64` (documentation range, outside the namespaces'
/// own fd00:77::/64), spread over the interface ID as privacy addresses are (RFC 8981).
fn rotating_v6(net: u16, i: u64) -> IpAddr {
    let iid = i.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    IpAddr::V6(((0x2001_0db8_u128 << 96) | ((net as u128) << 64) | iid as u128).into())
}

/// Sends `count` raw UDP frames from `src` to the receiver.
fn send_from(raw: &RawSender, src: IpAddr, count: u64) -> Result<()> {
    raw.send_udp(&[], src, UDP_PORT, count, Pacing::default())?;
    Ok(())
}

/// Waits until the receiver is idle and returns the counts since `before`, per source.
fn delivered_since(
    frames: &PacketCounter,
    before: &HashMap<IpAddr, u64>,
) -> Result<HashMap<IpAddr, u64>> {
    let now = frames.settle()?;
    Ok(now
        .into_iter()
        .map(|(src, n)| (src, n - before.get(&src).copied().unwrap_or(0)))
        .filter(|(_, n)| *n > 0)
        .collect())
}

fn global(stats: &Value, field: &str) -> u64 {
    stats["global"][field]
        .as_u64()
        .unwrap_or_else(|| panic!("global.{field} is not a number: {stats}"))
}

/// Kernel memory the pinned map `name` of the agent's interface charges (`memlock` in its
/// fdinfo: the preallocated elements and buckets).
fn map_memlock(iface: &str, name: &str) -> Result<u64> {
    let map = MapData::from_pin(pin_dir(iface).join(name))
        .with_context(|| format!("opening the pinned map {name}"))?;
    let fd = map.fd().as_fd().as_raw_fd();
    let info = std::fs::read_to_string(format!("/proc/self/fdinfo/{fd}"))?;
    info.lines()
        .find_map(|l| l.strip_prefix("memlock:"))
        .and_then(|v| v.trim().parse().ok())
        .with_context(|| format!("no memlock in the fdinfo of {name}: {info}"))
}

/// A client over its limit, then more spoofed sources than `--max-clients` (each within its
/// limit), then the client again: it gets nothing more in its window. Before the `LIMITED` map
/// the flood evicted it from the LRU map and it came back with a fresh allowance (10 more).
#[test]
fn a_flood_of_spoofed_sources_does_not_reset_a_limited_client() -> Result<()> {
    require_root!();
    const LIMIT: u64 = 10;
    const MAX_CLIENTS: u32 = 128;
    const FLOOD: u32 = 4 * MAX_CLIENTS;
    let started = Instant::now();
    let config = format!("default: {{limit: {LIMIT}, window: 1h}}\n");
    let net = TestNet::new()?;
    let max_clients = MAX_CLIENTS.to_string();
    let agent = Agent::start_with(&net, &config, &["--max-clients", &max_clients])?;
    let frames = net.frame_counter(UDP_PORT)?;
    let raw = net.raw_sender()?;
    let window = ExactWindow::start(TEST_SPAN);
    let client: IpAddr = Ipv4Addr::new(198, 18, 250, 1).into();

    let before = frames.settle()?;
    send_from(&raw, client, 2 * LIMIT)?;
    let got = delivered_since(&frames, &before)?;
    assert_eq!(got.get(&client), Some(&LIMIT), "{got:?}");
    let stats = agent.stats()?;
    let row = find_client(&stats, client).context("the client is not in stats")?;
    assert_eq!(row["limited"], Value::Bool(true), "{row}");
    let created_before = global(&stats, "new_clients");

    let before = frames.settle()?;
    for i in 0..FLOOD {
        send_from(&raw, spoofed_v4(i), 2)?;
    }
    let got = delivered_since(&frames, &before)?;
    let flood_delivered: u64 = got.values().sum();
    assert_eq!(
        flood_delivered,
        2 * FLOOD as u64,
        "every spoofed source is within its limit"
    );

    let before = frames.settle()?;
    send_from(&raw, client, 2 * LIMIT)?;
    let got = delivered_since(&frames, &before)?;
    let stats = agent.stats()?;
    window.check();
    assert_eq!(
        got.get(&client).copied().unwrap_or(0),
        0,
        "the flood reset the limited client's window"
    );
    assert_eq!(client_counts(&stats, client), (LIMIT, 3 * LIMIT));
    let created = global(&stats, "new_clients") - created_before;
    // One entry per spoofed source (plus any stray frame of the namespaces' own, e.g. IPv6
    // neighbour discovery).
    ensure!(created >= FLOOD as u64, "only {created} clients created");
    assert_eq!(global(&stats, "limited_moves"), 1);
    assert_eq!(global(&stats, "limited_full"), 0);
    let clients_kib = map_memlock(&net.receiver_if, "CLIENTS")? / 1024;
    let limited_kib = map_memlock(&net.receiver_if, "LIMITED")? / 1024;
    eprintln!(
        "flood of {FLOOD} sources at --max-clients {MAX_CLIENTS}: clients_created {created}, \
         resident {}, held in LIMITED {}; kernel memory CLIENTS {clients_kib} KiB, LIMITED \
         {limited_kib} KiB; took {:?}",
        global(&stats, "clients"),
        global(&stats, "limited"),
        started.elapsed()
    );
    Ok(())
}

/// Issue 13's rotating source: 10x the limit from one /64, every frame from a new address. Counted
/// per address (the agent before layout 6, and `per: { ipv6: address }` now), every frame had a
/// fresh budget and all were delivered; counted per /64, IPv6's default now, the /64 gets its
/// limit once, in one entry. Between the two the config is reloaded, not restarted.
#[test]
fn a_rotating_ipv6_source_gets_its_64s_limit_once() -> Result<()> {
    require_root!();
    const LIMIT: u64 = 10;
    const SENT: u64 = 10 * LIMIT;
    let per_address =
        format!("default: {{limit: {LIMIT}, window: 1h, per: {{ ipv6: address }}}}\n");
    let per_64 = format!("default: {{limit: {LIMIT}, window: 1h}}\n");
    let net = TestNet::new()?;
    let agent = Agent::start(&net, &per_address)?;
    let frames = net.frame_counter(UDP_PORT)?;
    let raw = net.raw_sender()?;
    let window = ExactWindow::start(TEST_SPAN);
    let from_net = |got: &HashMap<IpAddr, u64>, net: u16| -> u64 {
        got.iter()
            .filter(|(src, _)| match src {
                IpAddr::V6(a) => a.segments()[..4] == [0x2001, 0xdb8, 0, net],
                IpAddr::V4(_) => false,
            })
            .map(|(_, n)| n)
            .sum()
    };

    let mut results = Vec::new();
    for (phase, net_id) in [("per address", 1u16), ("per /64", 2)] {
        if net_id == 2 {
            agent.reload(&per_64, Duration::from_secs(10))?;
        }
        let created_before = global(&agent.stats()?, "new_clients");
        let before = frames.settle()?;
        for i in 0..SENT {
            send_from(&raw, rotating_v6(net_id, i), 1)?;
        }
        let got = delivered_since(&frames, &before)?;
        let stats = agent.stats()?;
        let created = global(&stats, "new_clients") - created_before;
        results.push((phase, from_net(&got, net_id), created));
        if net_id == 2 {
            let label = format!("2001:db8:0:{net_id}::/64");
            let row = stats["clients"]
                .as_array()
                .and_then(|rows| rows.iter().find(|r| r["addr"] == label.as_str()))
                .with_context(|| format!("no client {label} in {stats}"))?;
            assert_eq!(
                (row["passed"].as_u64(), row["dropped"].as_u64()),
                (Some(LIMIT), Some(SENT - LIMIT)),
                "{row}"
            );
        }
    }
    window.check();
    let clients_kib = map_memlock(&net.receiver_if, "CLIENTS")? / 1024;
    eprintln!(
        "{SENT} frames from a rotating /64 at limit {LIMIT}: {results:?} (phase, delivered, \
         clients_created); CLIENTS map {clients_kib} KiB"
    );
    let [(_, before, before_created), (_, after, after_created)] = results[..] else {
        unreachable!("two phases")
    };
    assert_eq!(before, SENT, "per address: every frame a fresh budget");
    // Each frame an entry (plus any stray frame of the namespaces' own).
    ensure!(before_created >= SENT, "{before_created} clients created");
    assert_eq!(after, LIMIT, "per /64: the limit, once");
    ensure!(
        after_created <= 3,
        "{after_created} clients created: one for the /64, plus stray frames at most"
    );
    Ok(())
}

/// The agent's sweep releases a held client once its window is over: `limiter stats` shows it
/// held, then gone from `LIMITED`, and its next packets start a fresh window in the LRU map.
#[test]
fn a_held_client_is_released_when_its_window_is_over() -> Result<()> {
    require_root!();
    const LIMIT: u64 = 5;
    let config = format!("default: {{limit: {LIMIT}, window: 1s}}\n");
    let net = TestNet::new()?;
    let agent = Agent::start(&net, &config)?;
    let frames = net.frame_counter(UDP_PORT)?;
    let raw = net.raw_sender()?;
    let client: IpAddr = Ipv4Addr::new(198, 18, 250, 2).into();

    // Back to back: inside one window, or two if a boundary falls in between.
    let before = frames.settle()?;
    raw.send_udp(
        &[],
        client,
        UDP_PORT,
        3 * LIMIT,
        Pacing {
            burst: 0,
            pause: Duration::ZERO,
        },
    )?;
    let got = delivered_since(&frames, &before)?;
    ensure!(
        got.get(&client).copied().unwrap_or(0) <= 2 * LIMIT,
        "more than two windows' worth got through: {got:?}"
    );
    let stats = agent.stats()?;
    assert_eq!(global(&stats, "limited"), 1, "{stats}");
    // Two windows and the sweep's period (1 s) later, it is released.
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let stats = agent.stats()?;
        if global(&stats, "limited") == 0 {
            // Released back into the LRU map with its lifetime counters.
            let row = find_client(&stats, client).context("released, and its entry lost")?;
            assert_eq!(row["limited"], Value::Bool(false), "{row}");
            assert!(row["dropped"].as_u64().unwrap_or(0) >= LIMIT, "{row}");
            break;
        }
        ensure!(
            Instant::now() < deadline,
            "still held 5 s after its window ended: {stats}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let before = frames.settle()?;
    send_from(&raw, client, 1)?;
    let got = delivered_since(&frames, &before)?;
    assert_eq!(got.get(&client), Some(&1));
    let stats = agent.stats()?;
    let row = find_client(&stats, client).context("the client is not back")?;
    assert_eq!(row["limited"], Value::Bool(false), "{row}");
    Ok(())
}

/// The same flood with `LIMITED` full (`--max-limited 1`): the client held first keeps its
/// window; the second limited client could not be held, so the flood can evict it and it then
/// comes back with a fresh allowance (the behaviour before `LIMITED` for every client), and
/// `limited_full` says so.
#[test]
fn with_limited_full_a_flood_resets_the_unheld_client_and_says_so() -> Result<()> {
    require_root!();
    const LIMIT: u64 = 10;
    const MAX_CLIENTS: u32 = 128;
    const FLOOD: u32 = 4 * MAX_CLIENTS;
    let config = format!("default: {{limit: {LIMIT}, window: 1h}}\n");
    let net = TestNet::new()?;
    let max_clients = MAX_CLIENTS.to_string();
    let agent = Agent::start_with(
        &net,
        &config,
        &["--max-clients", &max_clients, "--max-limited", "1"],
    )?;
    let frames = net.frame_counter(UDP_PORT)?;
    let raw = net.raw_sender()?;
    let window = ExactWindow::start(TEST_SPAN);
    let held: IpAddr = Ipv4Addr::new(198, 18, 250, 3).into();
    let unheld: IpAddr = Ipv4Addr::new(198, 18, 250, 4).into();

    let before = frames.settle()?;
    send_from(&raw, held, 2 * LIMIT)?;
    send_from(&raw, unheld, 2 * LIMIT)?;
    let got = delivered_since(&frames, &before)?;
    assert_eq!(
        (got.get(&held), got.get(&unheld)),
        (Some(&LIMIT), Some(&LIMIT))
    );
    let stats = agent.stats()?;
    assert_eq!(
        global(&stats, "limited_full"),
        LIMIT,
        "each drop of the unheld client"
    );

    for i in 0..FLOOD {
        send_from(&raw, spoofed_v4(i), 2)?;
    }
    let before = frames.settle()?;
    send_from(&raw, held, 2 * LIMIT)?;
    send_from(&raw, unheld, 2 * LIMIT)?;
    let got = delivered_since(&frames, &before)?;
    window.check();
    assert_eq!(got.get(&held), None, "the held client got through: {got:?}");
    // The unheld client is evictable again: the kernel's LRU (per-CPU lists, which differ
    // between kernels) may or may not have picked it; if it did, it came back with a fresh
    // window, and it never gets more than that.
    assert!(
        matches!(got.get(&unheld), None | Some(&LIMIT)),
        "the unheld client got neither its old state nor one fresh window: {got:?}"
    );
    Ok(())
}
