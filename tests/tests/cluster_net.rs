//! The multi-node test network ([`ClusterNet`]) the cluster tests run on: one client reaches every
//! node, the receiver counts it across all of them, agents run one per node in one namespace and
//! reach each other over its loopback, and dropping the network leaves nothing behind. Root only;
//! run one at a time (`cargo xtask test` passes `--test-threads=1`).
//!
//! Counts are exact. The agents here limit each host on its own (there is no cluster yet), with
//! `window: 1s`, so the traffic is sent early in one 1 s window of CLOCK_MONOTONIC (the windows
//! are aligned to it) and the test checks that it stayed inside it.

use std::{
    io::{Read as _, Write as _},
    net::{IpAddr, SocketAddr, TcpListener, TcpStream},
    path::Path,
    process::Command,
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, anyhow, ensure};
use limiter_tests::{
    agent::{Agent, client_counts},
    clock::{clear_of_boundary, window_index},
    fixture::wait_until,
    netns::{ClusterNet, cluster_client_v4, cluster_client_v6, pin_dir},
    require_root,
    traffic::{Pacing, UDP_PORT},
};

/// The per-host limit of the client in [`three_agents_each_limit_the_client_on_their_own_node`].
const CLIENT_LIMIT: u64 = 10;

/// Whether `ip netns list` still shows `name`.
fn netns_exists(name: &str) -> Result<bool> {
    let out = Command::new("ip")
        .args(["netns", "list"])
        .output()
        .context("running `ip netns list`")?;
    Ok(String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .any(|w| w == name))
}

/// `GET /metrics` on `127.0.0.1:port`, from a socket in the receiver namespace; the body of a 200.
fn get_metrics(net: &ClusterNet, port: u16) -> Result<String> {
    let raw = net.in_receiver(|| -> Result<String> {
        let addr = SocketAddr::from(([127, 0, 0, 1], port));
        let mut stream = TcpStream::connect_timeout(&addr, Duration::from_secs(2))
            .with_context(|| format!("connecting to {addr}"))?;
        stream.set_read_timeout(Some(Duration::from_secs(5)))?;
        stream.set_write_timeout(Some(Duration::from_secs(5)))?;
        stream
            .write_all(b"GET /metrics HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n")?;
        let mut raw = String::new();
        stream.read_to_string(&mut raw)?;
        Ok(raw)
    })??;
    let (head, body) = raw
        .split_once("\r\n\r\n")
        .ok_or_else(|| anyhow!("no end of the head in {raw:?}"))?;
    ensure!(
        head.starts_with("HTTP/1.1 200"),
        "GET /metrics on port {port}: {head}"
    );
    Ok(body.to_owned())
}

/// Without agents, one client (one socket per family) reaches every node, each node's datagrams
/// leave by its own veth, the one receiver socket counts them all, replies go back by the node
/// they answer, and dropping the network removes both namespaces.
#[test]
fn one_client_reaches_every_node_without_agents() -> Result<()> {
    require_root!();
    let names;
    {
        let net = ClusterNet::new(3)?;
        names = [net.sender_ns.clone(), net.receiver_ns.clone()];
        for (dev, value) in net.receiver_rp_filters()? {
            assert_eq!(value, "0", "rp_filter of {dev} in the receiver namespace");
        }
        let counter = net.udp_counter(UDP_PORT)?;
        let (v4, v6): (IpAddr, IpAddr) = (cluster_client_v4(0).into(), cluster_client_v6(0).into());
        for k in 0..3 {
            let before = net.node_tx_packets(k)?;
            net.send_to_node(v4, k, 40, Pacing::default())?;
            net.send_to_node(v6, k, 40, Pacing::default())?;
            assert_eq!(
                net.node_tx_packets(k)? - before,
                80,
                "node {k}'s datagrams went out of its own veth"
            );
        }
        let spread: IpAddr = cluster_client_v4(1).into();
        let before: Vec<u64> = (0..3)
            .map(|k| net.node_tx_packets(k))
            .collect::<Result<_>>()?;
        let sent = net.send_spread(spread, 40, &[2, 1, 1], Pacing::default())?;
        assert_eq!(sent, [20, 10, 10]);
        for k in 0..3 {
            assert_eq!(net.node_tx_packets(k)? - before[k], sent[k], "node {k}");
        }
        let got = counter.settle()?;
        assert_eq!(got.get(&v4), Some(&120), "{got:?}");
        assert_eq!(got.get(&v6), Some(&120), "{got:?}");
        assert_eq!(got.get(&spread), Some(&40), "{got:?}");
        assert_eq!(got.len(), 3, "nothing but the test's datagrams: {got:?}");

        // TCP to each node from an unbound socket, which speaks as client 0: the handshake
        // needs the receiver's answers, and they come back by the node they answer, and by no
        // other (the connections stay open, so nothing else is on the wire meanwhile).
        let listener = net.in_receiver(|| TcpListener::bind(("::", 5301)))??;
        let mut open = Vec::new();
        for k in 0..3 {
            for src in [v4, v6] {
                let dst = SocketAddr::new(net.node(k).addr_for(src), 5301);
                let rx_before: Vec<u64> = (0..3)
                    .map(|j| net.node_rx_packets(j))
                    .collect::<Result<_>>()?;
                let stream = net.in_sender(|| {
                    TcpStream::connect_timeout(&dst, Duration::from_secs(2))
                        .with_context(|| format!("connecting to {dst}"))
                })??;
                let (accepted, peer) = listener.accept()?;
                assert_eq!(
                    peer.ip().to_canonical(),
                    src,
                    "the source of a connection to {dst}"
                );
                for (j, before) in rx_before.iter().enumerate() {
                    let answers = net.node_rx_packets(j)? - before;
                    if j == k {
                        assert!(answers > 0, "{dst} answered by node {k}");
                    } else {
                        assert_eq!(answers, 0, "node {j} carried an answer from {dst}");
                    }
                }
                open.push((stream, accepted));
            }
        }
    }
    for name in names {
        assert!(!netns_exists(&name)?, "namespace {name} left behind");
    }
    Ok(())
}

/// Three agents, one per node, each limiting the client to 10 packets a second on its own node:
/// 60 datagrams spread evenly over the nodes within one window get 10 through each node, 30 in
/// all at the receiver, and each agent's stats show the client on its own node. The agents share
/// the receiver namespace's loopback: each one's metrics endpoint answers on 127.0.0.1 there,
/// with the counts of its own interface.
#[test]
fn three_agents_each_limit_the_client_on_their_own_node() -> Result<()> {
    require_root!();
    let net = ClusterNet::new(3)?;
    let client = cluster_client_v4(0);
    let config = format!(
        "default: {{ limit: 1000, window: 1s }}\npolicies:\n  - match: {client}/32\n    limit: \
         {CLIENT_LIMIT}\n    window: 1s\n"
    );
    let ports = [9400u16, 9401, 9402];
    let agents: Vec<Agent> = (0..3)
        .map(|k| {
            let metrics = format!("127.0.0.1:{}", ports[k]);
            Agent::start_on(&net.agent_target(k), &config, &["--metrics", &metrics])
                .with_context(|| format!("starting node {k}'s agent"))
        })
        .collect::<Result<_>>()?;
    for (k, agent) in agents.iter().enumerate() {
        assert_eq!(agent.iface, net.node(k).receiver_if);
        assert_eq!(agent.ns, net.receiver_ns);
    }
    let counter = net.udp_counter(UDP_PORT)?;

    // 60 datagrams, a few milliseconds of sending, inside one 1 s window.
    let window = Duration::from_secs(1);
    let index = clear_of_boundary(window, Duration::from_millis(600));
    let start = Instant::now();
    let sent = net.send_spread(client, 60, &[1, 1, 1], Pacing::default())?;
    let took = start.elapsed();
    assert_eq!(
        window_index(window),
        index,
        "a 1 s window boundary passed while sending ({took:?}), so the counts may be off; rerun"
    );
    assert_eq!(sent, [20, 20, 20]);

    let got = counter.settle()?;
    assert_eq!(
        got.get(&client.into()).copied(),
        Some(3 * CLIENT_LIMIT),
        "what the three nodes let through from {client}: {got:?}"
    );
    for (k, agent) in agents.iter().enumerate() {
        let stats = agent.stats()?;
        assert_eq!(
            client_counts(&stats, client),
            (CLIENT_LIMIT, 20 - CLIENT_LIMIT),
            "(passed, dropped) of {client} in node {k}'s stats: {stats:#}"
        );
    }

    // Each agent's metrics endpoint, from the receiver namespace's loopback, is that agent's.
    for (k, port) in ports.iter().enumerate() {
        let body = wait_until(
            "the metrics endpoint answers",
            Duration::from_secs(10),
            || Ok(get_metrics(&net, *port).ok()),
        )?;
        let iface = &net.node(k).receiver_if;
        let passed =
            format!("\nlimiter_packets_passed_total{{iface=\"{iface}\"}} {CLIENT_LIMIT}\n");
        assert!(
            body.contains(&passed),
            "node {k}'s metrics on 127.0.0.1:{port} lack {passed:?}:\n{body}"
        );
    }
    Ok(())
}

/// An agent whose guard leaked is killed when its ClusterNet is dropped, and the namespaces and
/// every node's pin directory go with it.
#[test]
fn dropping_the_network_kills_its_agents_and_removes_everything() -> Result<()> {
    require_root!();
    let net = ClusterNet::new(2)?;
    let names = [net.sender_ns.clone(), net.receiver_ns.clone()];
    let ifaces: Vec<String> = net.nodes.iter().map(|n| n.receiver_if.clone()).collect();
    let agent = Agent::start_on(
        &net.agent_target(1),
        "default: { limit: 5, window: 1s }\n",
        &[],
    )?;
    let pid = agent.pid().context("the agent has no pid")? as i32;
    let dir = agent
        .config_path
        .parent()
        .context("the config has no directory")?
        .to_owned();
    assert!(pin_dir(&ifaces[1]).exists(), "the agent pinned its maps");
    std::mem::forget(agent);

    drop(net);
    // SAFETY: signal 0 only checks whether the process exists.
    let alive = unsafe { libc::kill(pid, 0) } == 0;
    let _ = std::fs::remove_dir_all(&dir);
    assert!(!alive, "the agent (pid {pid}) outlived its network");
    for name in names {
        assert!(!netns_exists(&name)?, "namespace {name} left behind");
    }
    for iface in &ifaces {
        assert!(
            !Path::new(&pin_dir(iface)).exists(),
            "{} left behind",
            pin_dir(iface).display()
        );
        let socket = limiter_user::api::default_socket(iface);
        assert!(!socket.exists(), "{} left behind", socket.display());
    }
    Ok(())
}
