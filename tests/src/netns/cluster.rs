//! A test network for several agents: one sender and one receiver namespace joined by one veth
//! pair per node.
//!
//! ```text
//!   sender ns                                       receiver ns
//!   lo: 198.18.99.10..  fd00:77:99::10..            lo: 127.0.0.1 (the agents talk here),
//!                                                       fd00:77:100::1, fd00:77:101::1, ...
//!   cs<pid>x<n>n0  02:6c:74:01:00:02  <-- veth -->  cr<pid>x<n>n0  02:6c:74:01:00:01
//!                                                   198.18.100.1/24
//!   cs<pid>x<n>n1  02:6c:74:01:01:02  <-- veth -->  cr<pid>x<n>n1  02:6c:74:01:01:01
//!                                                   198.18.101.1/24
//!   ...
//! ```
//!
//! Node `k` is the receiver veth `cr<pid>x<n>n<k>`, where an agent attaches; all agents run in
//! the one receiver namespace, so they reach each other over its loopback. Node `k`'s IPv6
//! address lives on the receiver's loopback, not on its veth: an IPv6 address on the veth makes
//! the kernel join its solicited-node group there and send MLD reports (from `::`) out of it
//! (`multicast off` does not stop them). The sender routes it out of veth `k` all the same. The clients'
//! addresses ([`cluster_client_v4`], [`cluster_client_v6`]) live on the sender's loopback, not on
//! a veth, so one client (one source address, one socket) reaches every node: the sender routes
//! node `k`'s /24 (/64) out of veth `k`, with client 0 as the source of a socket that binds to
//! none. The sender veths have no address at all, so they send nothing of their own (no ARP, no
//! neighbour discovery, no MLD).
//!
//! The receiver accepts the same source on every node, and answers by the node it is answering:
//! a policy rule per node (`from NODE_ADDR lookup 100+k`) routes the clients' addresses out of
//! veth `k` for node `k`'s replies (which also satisfies a strict reverse-path check for them),
//! and `rp_filter` is 0 for `all`, `default` and every veth in both namespaces, so that a source
//! with no route back (a spoofed one from a raw socket, say) is accepted too (new namespaces copy
//! the host's IPv4 settings, which may be strict). Both ends have permanent neighbour entries
//! for the other (every client on every node), so nothing is resolved at run time and every IP
//! packet an agent sees from a client address is one the test sent.
//!
//! Dropping the guard (also while unwinding from a panic) kills the agents started on its nodes,
//! deletes both namespaces (and so every veth), and removes the nodes' pin directories.

use std::{
    fs,
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    process::Command,
    sync::{Arc, atomic::Ordering},
};

use anyhow::{Context as _, Result, bail, ensure};

use super::{
    AgentRegistry, NEXT_ID, in_netns, ip_batch, ip_batch_with, link_packets, mac_string, pin_dir,
    quiet_ipv6, teardown, wait_links_up, write_sysctls,
};
use crate::{agent::AgentTarget, command::run_ok};

/// Most nodes a [`ClusterNet`] has (its interface names stay within 15 characters).
pub const MAX_NODES: usize = 16;
/// How many IPv4 and how many IPv6 client addresses [`ClusterNet::new`] gives the cluster's
/// sender: [`cluster_client_v4`]`(0..CLUSTER_CLIENTS)`, [`cluster_client_v6`]`(0..CLUSTER_CLIENTS)`.
pub const CLUSTER_CLIENTS: u8 = 16;
/// Most client addresses of each family a [`ClusterNet::with_clients`] can have: 198.18.99.10 to
/// 198.18.99.255.
pub const MAX_CLUSTER_CLIENTS: u8 = 246;

/// The subnet of the [`cluster_client_v4`] addresses.
pub const CLUSTER_CLIENTS_V4: &str = "198.18.99.0/24";
/// The subnet of the [`cluster_client_v6`] addresses.
pub const CLUSTER_CLIENTS_V6: &str = "fd00:77:99::/64";

/// The `i`-th client IPv4 address of a [`ClusterNet`]: 198.18.99.(10 + i). The sender has it if
/// `i` is below the network's [`ClusterNet::clients`].
pub fn cluster_client_v4(i: u8) -> Ipv4Addr {
    assert!(
        i < MAX_CLUSTER_CLIENTS,
        "cluster_client_v4({i}): a cluster's sender has at most {MAX_CLUSTER_CLIENTS} addresses"
    );
    Ipv4Addr::new(198, 18, 99, 10 + i)
}

/// The `i`-th client IPv6 address of a [`ClusterNet`]: fd00:77:99::(0x10 + i). The sender has it
/// if `i` is below the network's [`ClusterNet::clients`].
pub fn cluster_client_v6(i: u8) -> Ipv6Addr {
    assert!(
        i < MAX_CLUSTER_CLIENTS,
        "cluster_client_v6({i}): a cluster's sender has at most {MAX_CLUSTER_CLIENTS} addresses"
    );
    Ipv6Addr::new(0xfd00, 0x77, 0x99, 0, 0, 0, 0, 0x10 + i as u16)
}

/// Node `k`'s IPv4 address: 198.18.(100 + k).1, on a /24.
pub fn node_v4(k: usize) -> Ipv4Addr {
    assert!(k < MAX_NODES, "node_v4({k}): at most {MAX_NODES} nodes");
    Ipv4Addr::new(198, 18, 100 + k as u8, 1)
}

/// Node `k`'s IPv6 address: fd00:77:(100 + k)::1 (the hextet written as those digits), in the
/// /64 the sender routes out of node `k`'s veth.
pub fn node_v6(k: usize) -> Ipv6Addr {
    assert!(k < MAX_NODES, "node_v6({k}): at most {MAX_NODES} nodes");
    Ipv6Addr::new(0xfd00, 0x77, 0x100 + k as u16, 0, 0, 0, 0, 1)
}

/// One node of a [`ClusterNet`]: a veth pair and the receiver's addresses on it.
#[derive(Debug, Clone)]
pub struct ClusterNode {
    /// The sender's end of the pair (in the sender namespace).
    pub sender_if: String,
    /// The receiver's end (in the receiver namespace), where the node's agent attaches. Unique
    /// machine-wide, as the agent's pin directory `/sys/fs/bpf/limiter/IFACE` is.
    pub receiver_if: String,
    /// The node's IPv4 address ([`node_v4`]).
    pub v4: Ipv4Addr,
    /// The node's IPv6 address ([`node_v6`]), on the receiver's loopback, reached by veth `k`.
    pub v6: Ipv6Addr,
    /// MAC address of `sender_if`: 02:6c:74:01:k:02.
    pub sender_mac: [u8; 6],
    /// MAC address of `receiver_if`: 02:6c:74:01:k:01.
    pub receiver_mac: [u8; 6],
}

impl ClusterNode {
    /// The node's IPv4 subnet, such as `198.18.100.0/24`.
    pub fn v4_subnet(&self) -> String {
        format!("{}/24", Ipv4Addr::from(u32::from(self.v4) & !0xff))
    }

    /// The node's IPv6 subnet, such as `fd00:77:100::/64`.
    pub fn v6_subnet(&self) -> String {
        format!(
            "{}/64",
            Ipv6Addr::from(u128::from(self.v6) & !u128::from(u64::MAX))
        )
    }

    /// The node's address in `src`'s family.
    pub fn addr_for(&self, src: IpAddr) -> IpAddr {
        match src {
            IpAddr::V4(_) => self.v4.into(),
            IpAddr::V6(_) => self.v6.into(),
        }
    }
}

/// A sender and a receiver namespace joined by one veth pair per node; see the module
/// documentation.
pub struct ClusterNet {
    /// Sender namespace name (under /run/netns).
    pub sender_ns: String,
    /// Receiver namespace name (under /run/netns), where every node's agent runs.
    pub receiver_ns: String,
    /// The nodes, in order: node `k` is `nodes[k]`.
    pub nodes: Vec<ClusterNode>,
    /// How many client addresses of each family the sender has: [`cluster_client_v4`]`(0..clients)`
    /// and [`cluster_client_v6`]`(0..clients)`.
    pub clients: u8,
    agents: AgentRegistry,
    created: Vec<String>,
}

impl ClusterNet {
    /// Creates both namespaces and `nodes` veth pairs with their addresses, routes, rules and
    /// neighbour entries, and waits until every link is up at both ends. The sender has
    /// [`CLUSTER_CLIENTS`] client addresses of each family.
    pub fn new(nodes: usize) -> Result<ClusterNet> {
        ClusterNet::with_clients(nodes, CLUSTER_CLIENTS)
    }

    /// [`ClusterNet::new`] with `clients` client addresses of each family (at most
    /// [`MAX_CLUSTER_CLIENTS`]): a test with many clients, one per source address.
    pub fn with_clients(nodes: usize, clients: u8) -> Result<ClusterNet> {
        ensure!(
            (1..=MAX_NODES).contains(&nodes),
            "a ClusterNet has 1 to {MAX_NODES} nodes, not {nodes}"
        );
        ensure!(
            (1..=MAX_CLUSTER_CLIENTS).contains(&clients),
            "a ClusterNet has 1 to {MAX_CLUSTER_CLIENTS} clients, not {clients}"
        );
        super::sweep_stale();
        let pid = std::process::id();
        let n = NEXT_ID.fetch_add(1, Ordering::Relaxed);
        let mut node_list = Vec::with_capacity(nodes);
        for k in 0..nodes {
            // "cs"/"cr" + pid (<= 7 digits) + "x" + n + "n" + k: unique on this machine, and
            // apart from TestNet's "ls"/"lr" names.
            let sender_if = format!("cs{pid}x{n}n{k}");
            let receiver_if = format!("cr{pid}x{n}n{k}");
            if receiver_if.len() > 15 {
                bail!(
                    "interface name {receiver_if} is over 15 characters (too many networks in this process)"
                );
            }
            node_list.push(ClusterNode {
                sender_if,
                receiver_if,
                v4: node_v4(k),
                v6: node_v6(k),
                sender_mac: [0x02, 0x6c, 0x74, 0x01, k as u8, 0x02],
                receiver_mac: [0x02, 0x6c, 0x74, 0x01, k as u8, 0x01],
            });
        }
        let mut net = ClusterNet {
            sender_ns: format!("lc{pid}s{n}"),
            receiver_ns: format!("lc{pid}r{n}"),
            nodes: node_list,
            clients,
            agents: Arc::default(),
            created: Vec::new(),
        };
        // Stale pins of an earlier process with the same pid would be adopted with their counters.
        for node in &net.nodes {
            let _ = fs::remove_dir_all(pin_dir(&node.receiver_if));
        }
        for ns in [net.sender_ns.clone(), net.receiver_ns.clone()] {
            run_ok(Command::new("ip").args(["netns", "add", &ns]))?;
            net.created.push(ns);
        }
        net.setup().with_context(|| {
            format!(
                "setting up cluster network {} <-> {} ({nodes} nodes)",
                net.sender_ns, net.receiver_ns
            )
        })?;
        Ok(net)
    }

    fn setup(&self) -> Result<()> {
        let (s_ns, r_ns) = (&self.sender_ns, &self.receiver_ns);
        // Before the veths exist, so that they start from these defaults too.
        let no_rp_filter = |devs: &[&str]| -> Vec<(String, &'static str)> {
            devs.iter()
                .map(|dev| (format!("ipv4/conf/{dev}/rp_filter"), "0"))
                .collect()
        };
        for ns in [s_ns, r_ns] {
            write_sysctls(ns, &no_rp_filter(&["all", "default"]))?;
        }
        let mut batch = Vec::new();
        for node in &self.nodes {
            batch.push(format!(
                "link add {} address {} type veth peer name {} address {} netns {r_ns}",
                node.sender_if,
                mac_string(&node.sender_mac),
                node.receiver_if,
                mac_string(&node.receiver_mac),
            ));
        }
        ip_batch(s_ns, &batch)?;
        for node in &self.nodes {
            quiet_ipv6(s_ns, &node.sender_if)?;
            quiet_ipv6(r_ns, &node.receiver_if)?;
        }
        let sender_ifs: Vec<&str> = self.nodes.iter().map(|n| n.sender_if.as_str()).collect();
        let receiver_ifs: Vec<&str> = self.nodes.iter().map(|n| n.receiver_if.as_str()).collect();
        write_sysctls(s_ns, &no_rp_filter(&sender_ifs))?;
        write_sysctls(r_ns, &no_rp_filter(&receiver_ifs))?;

        let clients_v4 = (0..self.clients).map(cluster_client_v4);
        let clients_v6 = (0..self.clients).map(cluster_client_v6);
        let mut sender = vec!["link set lo up".to_owned()];
        for ip in clients_v4.clone() {
            sender.push(format!("addr add {ip}/32 dev lo"));
        }
        for ip in clients_v6.clone() {
            sender.push(format!("addr add {ip}/128 dev lo nodad"));
        }
        // An unbound socket (a gRPC client, say) speaks as client 0.
        let (client_v4, client_v6) = (cluster_client_v4(0), cluster_client_v6(0));
        let mut receiver = vec!["link set lo up".to_owned()];
        // IPv6 rules need `ip -6`, which a batch line cannot say.
        let mut receiver_v6_rules = Vec::new();
        for (k, node) in self.nodes.iter().enumerate() {
            let (s_if, r_if) = (&node.sender_if, &node.receiver_if);
            let (smac, rmac) = (mac_string(&node.sender_mac), mac_string(&node.receiver_mac));
            let (v4, v6) = (node.v4, node.v6);
            let table = 100 + k;
            sender.extend([
                format!("link set {s_if} up"),
                format!("route add {} dev {s_if} src {client_v4}", node.v4_subnet()),
                format!("route add {} dev {s_if} src {client_v6}", node.v6_subnet()),
                format!("neigh replace {v4} lladdr {rmac} dev {s_if} nud permanent"),
                format!("neigh replace {v6} lladdr {rmac} dev {s_if} nud permanent"),
            ]);
            receiver.extend([
                format!("link set {r_if} up"),
                format!("addr add {v4}/24 dev {r_if}"),
                format!("addr add {v6}/128 dev lo nodad"),
                // Replies from node k's address leave by node k.
                format!("route add {CLUSTER_CLIENTS_V4} dev {r_if} table {table}"),
                format!("route add {CLUSTER_CLIENTS_V6} dev {r_if} table {table}"),
                format!("rule add from {v4} lookup {table} priority {table}"),
            ]);
            receiver_v6_rules.push(format!(
                "rule add from {v6} lookup {table} priority {table}"
            ));
            for ip in clients_v4.clone() {
                receiver.push(format!(
                    "neigh replace {ip} lladdr {smac} dev {r_if} nud permanent"
                ));
            }
            for ip in clients_v6.clone() {
                receiver.push(format!(
                    "neigh replace {ip} lladdr {smac} dev {r_if} nud permanent"
                ));
            }
        }
        // Anything else the receiver sends to a client (from 127.0.0.1, say) leaves by node 0.
        let first = &self.nodes[0].receiver_if;
        receiver.push(format!("route add {CLUSTER_CLIENTS_V4} dev {first}"));
        receiver.push(format!("route add {CLUSTER_CLIENTS_V6} dev {first}"));
        ip_batch(s_ns, &sender)?;
        ip_batch(r_ns, &receiver)?;
        ip_batch_with(r_ns, &["-6"], &receiver_v6_rules)?;

        let links: Vec<(&str, &str)> = self
            .nodes
            .iter()
            .flat_map(|n| {
                [
                    (s_ns.as_str(), n.sender_if.as_str()),
                    (r_ns.as_str(), n.receiver_if.as_str()),
                ]
            })
            .collect();
        wait_links_up(&links)
    }

    /// Node `k`; panics past the last node.
    pub fn node(&self, k: usize) -> &ClusterNode {
        assert!(
            k < self.nodes.len(),
            "node {k}: this network has {} nodes",
            self.nodes.len()
        );
        &self.nodes[k]
    }

    /// Where [`Agent::spawn_on`](crate::agent::Agent::spawn_on) starts node `k`'s agent: its
    /// receiver veth in the receiver namespace; dropping the network kills it.
    pub fn agent_target(&self, k: usize) -> AgentTarget {
        AgentTarget {
            ns: self.receiver_ns.clone(),
            iface: self.node(k).receiver_if.clone(),
            registry: Arc::clone(&self.agents),
        }
    }

    /// Runs `f` inside the sender namespace (see [`in_netns`]).
    pub fn in_sender<T: Send>(&self, f: impl FnOnce() -> T + Send) -> Result<T> {
        in_netns(&self.sender_ns, f)
    }

    /// Runs `f` inside the receiver namespace (see [`in_netns`]), where the agents run.
    pub fn in_receiver<T: Send>(&self, f: impl FnOnce() -> T + Send) -> Result<T> {
        in_netns(&self.receiver_ns, f)
    }

    /// Packets the sender has put on node `k`'s veth pair (its `tx` count in `ip -s link`): the
    /// sender's veths have no address and send nothing of their own, so this is the test traffic
    /// routed to node `k`, whatever the node's agent did with it.
    pub fn node_tx_packets(&self, k: usize) -> Result<u64> {
        self.sender_link_packets(k, "tx")
    }

    /// Packets the sender has received on node `k`'s veth pair (its `rx` count): what the
    /// receiver namespace sent out of node `k` (answers to the clients: it has nothing to say of
    /// its own there).
    pub fn node_rx_packets(&self, k: usize) -> Result<u64> {
        self.sender_link_packets(k, "rx")
    }

    /// The `tx` or `rx` packet count of node `k`'s sender veth.
    fn sender_link_packets(&self, k: usize, direction: &str) -> Result<u64> {
        link_packets(&self.sender_ns, &self.node(k).sender_if, direction)
    }

    /// `/proc/sys/net/ipv4/conf/DEV/rp_filter` in the receiver namespace, for `all` and every
    /// node's veth: what decides whether a client is accepted on every node.
    pub fn receiver_rp_filters(&self) -> Result<Vec<(String, String)>> {
        let devs: Vec<String> = std::iter::once("all".to_owned())
            .chain(self.nodes.iter().map(|n| n.receiver_if.clone()))
            .collect();
        self.in_receiver(|| -> Result<Vec<(String, String)>> {
            devs.iter()
                .map(|dev| {
                    let path = format!("/proc/sys/net/ipv4/conf/{dev}/rp_filter");
                    let value =
                        fs::read_to_string(&path).with_context(|| format!("reading {path}"))?;
                    Ok((dev.clone(), value.trim().to_owned()))
                })
                .collect()
        })?
    }
}

impl Drop for ClusterNet {
    fn drop(&mut self) {
        let ifaces: Vec<&str> = self.nodes.iter().map(|n| n.receiver_if.as_str()).collect();
        teardown(&self.agents, &self.created, &ifaces);
    }
}
