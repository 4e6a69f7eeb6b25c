//! Traffic on a [`ClusterNet`]: one client's datagrams to one node, or spread over the nodes by
//! weight through time, and the receiver's count per source across all nodes.

use std::{
    net::{IpAddr, SocketAddr, UdpSocket},
    thread,
    time::Instant,
};

use anyhow::{Context as _, Result, ensure};

use super::{
    Pacing, PacketCounter, SEND_TIME_LIMIT, UDP_PORT, payload, send_retrying, send_udp,
    socket::{udp_counter_in, udp_sender_in},
};
use crate::netns::ClusterNet;

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
