//! Traffic on a [`ClusterNet`]: one client's datagrams to one node, or spread over the nodes by
//! weight through time, and the receiver's count per source across all nodes.

use std::{
    net::{IpAddr, SocketAddr, UdpSocket},
    sync::atomic::{AtomicBool, Ordering},
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, ensure};

use super::{
    Pacing, PacketCounter, SEND_TIME_LIMIT, UDP_PORT, payload, send_retrying, send_udp,
    socket::{udp_counter_in, udp_sender_in, udp_timed_counter_in},
};
use crate::{clock::monotonic, netns::ClusterNet};

/// One client's traffic for [`ClusterNet::send_flows`]: `rate` datagrams a second from `src`
/// (one socket: one client), spread over the nodes by weights that may change along the way.
#[derive(Debug, Clone)]
pub struct Flow {
    /// The client's address (a [`cluster_client_v4`](crate::netns::cluster_client_v4), say).
    pub src: IpAddr,
    /// Datagrams per second.
    pub rate: f64,
    /// `(from, weights)`: the weights (one per node, not all zero) in force from `from` after
    /// the start on, in order; the first from zero.
    pub spreads: Vec<(Duration, Vec<u32>)>,
}

impl Flow {
    /// `rate` datagrams a second from `src`, spread by `weights` throughout.
    pub fn new(src: impl Into<IpAddr>, rate: f64, weights: &[u32]) -> Flow {
        Flow {
            src: src.into(),
            rate,
            spreads: vec![(Duration::ZERO, weights.to_vec())],
        }
    }

    /// The same flow, spread by `weights` from `from` after the start on.
    pub fn then(mut self, from: Duration, weights: &[u32]) -> Flow {
        self.spreads.push((from, weights.to_vec()));
        self
    }
}

/// What [`ClusterNet::send_flows`] sent.
#[derive(Debug, Clone)]
pub struct FlowsSent {
    /// Per flow (in the order given), how many datagrams each node was sent.
    pub sent: Vec<Vec<u64>>,
    /// CLOCK_MONOTONIC when sending started: a flow's spread `(from, _)` took effect within a
    /// millisecond or two of `started + from`.
    pub started: Duration,
    /// How long it sent.
    pub elapsed: Duration,
}

impl ClusterNet {
    /// A UDP socket in the sender namespace bound to `src` (a [`cluster_client_v4`] or
    /// [`cluster_client_v6`] address): one socket, one client, that reaches every node.
    ///
    /// [`cluster_client_v4`]: crate::netns::cluster_client_v4
    /// [`cluster_client_v6`]: crate::netns::cluster_client_v6
    pub fn udp_sender(&self, src: IpAddr) -> Result<UdpSocket> {
        udp_sender_in(&self.sender_ns, src)
    }

    /// A dual-stack UDP socket in the receiver namespace bound to `[::]:port`, so on every
    /// node's addresses, counting datagrams per source address on a background thread: what
    /// all the nodes together let through.
    pub fn udp_counter(&self, port: u16) -> Result<PacketCounter> {
        udp_counter_in(&self.receiver_ns, port)
    }

    /// [`ClusterNet::udp_counter`] that also keeps when each datagram arrived
    /// ([`PacketCounter::arrivals`], [`PacketCounter::per_window`]): the kernel's receive
    /// timestamp, by CLOCK_MONOTONIC, the clock the XDP program's windows are aligned to.
    pub fn udp_timed_counter(&self, port: u16) -> Result<PacketCounter> {
        udp_timed_counter_in(&self.receiver_ns, port)
    }

    /// Node `k`'s address in `src`'s family, on [`UDP_PORT`].
    pub fn node_dst(&self, k: usize, src: IpAddr) -> SocketAddr {
        SocketAddr::new(self.node(k).addr_for(src), UDP_PORT)
    }

    /// Sends `count` datagrams from `src` to node `k` (on [`UDP_PORT`]) with `pacing`.
    pub fn send_to_node(
        &self,
        src: impl Into<IpAddr>,
        k: usize,
        count: u64,
        pacing: Pacing,
    ) -> Result<u64> {
        let src = src.into();
        let socket = self.udp_sender(src)?;
        send_udp(&socket, self.node_dst(k, src), count, pacing)
            .with_context(|| format!("sending from {src} to node {k}"))
    }

    /// Sends `total` datagrams from `src` (one socket: one client) to the nodes, node `k`
    /// getting its share `weights[k]` of them, interleaved through time in the order of
    /// [`spread_order`] rather than node after node, with `pacing` over the whole. Returns how
    /// many each node was sent. `weights` has one entry per node, not all zero.
    pub fn send_spread(
        &self,
        src: impl Into<IpAddr>,
        total: u64,
        weights: &[u32],
        pacing: Pacing,
    ) -> Result<Vec<u64>> {
        let src = src.into();
        ensure!(
            weights.len() == self.nodes.len(),
            "send_spread: {} weights for {} nodes",
            weights.len(),
            self.nodes.len()
        );
        ensure!(
            weights.iter().any(|&w| w > 0),
            "send_spread: every weight is 0"
        );
        let socket = self.udp_sender(src)?;
        let dsts: Vec<SocketAddr> = (0..self.nodes.len())
            .map(|k| self.node_dst(k, src))
            .collect();
        let mut sent = vec![0u64; self.nodes.len()];
        let start = Instant::now();
        for (seq, k) in (0..total).zip(spread_order(weights)) {
            send_retrying(|| socket.send_to(&payload(seq), dsts[k]))
                .with_context(|| format!("sending from {src} to node {k} ({})", dsts[k]))?;
            sent[k] += 1;
            if pacing.burst > 0 && (seq + 1) % pacing.burst as u64 == 0 {
                thread::sleep(pacing.pause);
            }
            ensure!(
                start.elapsed() < SEND_TIME_LIMIT,
                "sending {total} datagrams over the nodes took over {SEND_TIME_LIMIT:?}"
            );
        }
        Ok(sent)
    }
}

impl ClusterNet {
    /// Sends every flow at once, from one thread, for `duration` or until `stop` is set: each
    /// flow at its rate (evenly through time, the flows' phases staggered so that they do not
    /// all send on the same tick), to the nodes in the order of [`spread_order`] for the
    /// weights in force. Keep the sum of the rates to a few thousand a second per core.
    pub fn send_flows(
        &self,
        flows: &[Flow],
        duration: Duration,
        stop: &AtomicBool,
    ) -> Result<FlowsSent> {
        let nodes = self.nodes.len();
        for flow in flows {
            ensure!(
                flow.rate > 0.0 && flow.spreads.first().is_some_and(|(f, _)| f.is_zero()),
                "send_flows: a flow from {} needs a rate and weights from the start",
                flow.src
            );
            for (_, weights) in &flow.spreads {
                ensure!(
                    weights.len() == nodes && weights.iter().any(|&w| w > 0),
                    "send_flows: weights {weights:?} of {} for {nodes} nodes",
                    flow.src
                );
            }
        }
        let sockets: Vec<UdpSocket> = flows
            .iter()
            .map(|f| self.udp_sender(f.src))
            .collect::<Result<_>>()?;
        let dsts: Vec<Vec<SocketAddr>> = flows
            .iter()
            .map(|f| (0..nodes).map(|k| self.node_dst(k, f.src)).collect())
            .collect();
        let mut orders: Vec<Box<dyn Iterator<Item = usize>>> = flows
            .iter()
            .map(|f| Box::new(spread_order(&f.spreads[0].1)) as Box<dyn Iterator<Item = usize>>)
            .collect();
        let mut phase = vec![0usize; flows.len()];
        let mut seq = vec![0u64; flows.len()];
        let mut sent = vec![vec![0u64; nodes]; flows.len()];
        let stagger: Vec<f64> = (0..flows.len())
            .map(|i| i as f64 / flows.len() as f64)
            .collect();
        let started = monotonic();
        let start = Instant::now();
        loop {
            let elapsed = start.elapsed();
            if elapsed >= duration || stop.load(Ordering::Relaxed) {
                break;
            }
            for (i, flow) in flows.iter().enumerate() {
                while phase[i] + 1 < flow.spreads.len() && elapsed >= flow.spreads[phase[i] + 1].0 {
                    phase[i] += 1;
                    orders[i] = Box::new(spread_order(&flow.spreads[phase[i]].1));
                }
                let due = (elapsed.as_secs_f64() * flow.rate + stagger[i]) as u64;
                while seq[i] < due {
                    let k = orders[i].next().context("send_flows: no node to send to")?;
                    send_retrying(|| sockets[i].send_to(&payload(seq[i]), dsts[i][k]))
                        .with_context(|| {
                            format!("sending from {} to node {k} ({})", flow.src, dsts[i][k])
                        })?;
                    sent[i][k] += 1;
                    seq[i] += 1;
                }
            }
            thread::sleep(Duration::from_millis(1));
        }
        Ok(FlowsSent {
            sent,
            started,
            elapsed: start.elapsed(),
        })
    }
}

/// The nodes, one per datagram, in the order [`ClusterNet::send_spread`] sends to them: smooth
/// weighted round robin, so that every `sum(weights)` consecutive datagrams give node `k`
/// exactly `weights[k]` of them, and each node's share is spread evenly through them
/// (`[1, 1, 1]` is 0, 1, 2, 0, 1, 2, ...; `[3, 1]` is 0, 0, 1, 0, ...). Endless (empty if every
/// weight is 0).
pub fn spread_order(weights: &[u32]) -> impl Iterator<Item = usize> + use<> {
    let weights: Vec<i64> = weights.iter().map(|&w| i64::from(w)).collect();
    let sum: i64 = weights.iter().sum();
    let mut credit = vec![0i64; weights.len()];
    std::iter::from_fn(move || {
        if sum == 0 {
            return None;
        }
        for (c, w) in credit.iter_mut().zip(&weights) {
            *c += w;
        }
        // The most credit, the first node on a tie (there is a node: the sum is not 0).
        let k = (0..credit.len()).rev().max_by_key(|&k| credit[k])?;
        credit[k] -= sum;
        Some(k)
    })
}

#[cfg(test)]
mod tests {
    use super::spread_order;

    fn order(weights: &[u32], n: usize) -> Vec<usize> {
        spread_order(weights).take(n).collect()
    }

    fn shares(weights: &[u32], n: usize) -> Vec<usize> {
        let mut count = vec![0; weights.len()];
        for k in spread_order(weights).take(n) {
            count[k] += 1;
        }
        count
    }

    #[test]
    fn equal_weights_take_turns() {
        assert_eq!(order(&[1, 1, 1], 7), [0, 1, 2, 0, 1, 2, 0]);
        assert_eq!(shares(&[5, 5, 5], 60), [20, 20, 20]);
    }

    #[test]
    fn every_period_gives_each_node_its_weight() {
        let weights = [80, 15, 5];
        assert_eq!(shares(&weights, 100), [80, 15, 5]);
        assert_eq!(shares(&weights, 1000), [800, 150, 50]);
        // Spread through time: in each tenth of a period every node has about its share.
        let seq = order(&weights, 100);
        for tenth in seq.chunks(10) {
            let n0 = tenth.iter().filter(|&&k| k == 0).count();
            assert!((7..=9).contains(&n0), "{tenth:?}");
        }
        let first_2 = seq.iter().position(|&k| k == 2).unwrap();
        assert!(first_2 < 20, "node 2's first datagram is number {first_2}");
    }

    #[test]
    fn zero_weights_get_nothing() {
        assert_eq!(shares(&[0, 1, 0], 10), [0, 10, 0]);
        assert_eq!(order(&[0, 0], 5), Vec::<usize>::new());
        assert_eq!(order(&[3, 1], 4), [0, 0, 1, 0]);
    }
}
