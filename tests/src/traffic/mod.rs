//! Test traffic: UDP datagrams from the sender namespace's addresses (paced, or at a rate), raw
//! VLAN-tagged frames, and per-source counting at the receiver; on a
//! [`ClusterNet`](crate::netns::ClusterNet), one client's datagrams spread over its nodes.

mod cluster;
mod counter;
mod raw;
mod socket;

use std::{
    collections::HashMap,
    io,
    net::{IpAddr, SocketAddr, UdpSocket},
    sync::atomic::{AtomicBool, AtomicU64, Ordering},
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, ensure};

use self::socket::is_timeout;
use crate::netns::{RECEIVER_V4, RECEIVER_V6, TestNet};

pub use self::{
    cluster::{Flow, FlowsSent, spread_order},
    counter::PacketCounter,
    raw::RawSender,
};

/// Light pacing: `burst` packets back to back, then `pause`.
#[derive(Debug, Clone, Copy)]
pub struct Pacing {
    pub burst: u32,
    pub pause: Duration,
}

impl Default for Pacing {
    /// 8 packets per 250 µs (at most ~32k packets/s): far below what the veth ring and the
    /// receiver drain, so nothing is lost outside the limiter.
    fn default() -> Self {
        Pacing {
            burst: 8,
            pause: Duration::from_micros(250),
        }
    }
}

/// Longest a bounded send may take.
pub(crate) const SEND_TIME_LIMIT: Duration = Duration::from_secs(30);

fn payload(seq: u64) -> [u8; 32] {
    let mut p = [0u8; 32];
    p[..16].copy_from_slice(b"limiter-test-pkt");
    p[16..24].copy_from_slice(&seq.to_be_bytes());
    p
}

/// Retries a send that failed for lack of buffer space a bounded number of times.
fn send_retrying(mut send: impl FnMut() -> io::Result<usize>) -> Result<()> {
    let mut attempts = 0;
    loop {
        match send() {
            Ok(_) => return Ok(()),
            Err(e)
                if attempts < 100
                    && (e.raw_os_error() == Some(libc::ENOBUFS) || is_timeout(&e)) =>
            {
                attempts += 1;
                thread::sleep(Duration::from_millis(1));
            }
            Err(e) => return Err(e.into()),
        }
    }
}

/// Sends `count` datagrams from `socket` to `dst` with `pacing`; returns how many were sent
/// (all of them, or an error).
pub fn send_udp(socket: &UdpSocket, dst: SocketAddr, count: u64, pacing: Pacing) -> Result<u64> {
    let start = Instant::now();
    for seq in 0..count {
        send_retrying(|| socket.send_to(&payload(seq), dst))
            .with_context(|| format!("sending to {dst}"))?;
        if pacing.burst > 0 && (seq + 1) % pacing.burst as u64 == 0 {
            thread::sleep(pacing.pause);
        }
        ensure!(
            start.elapsed() < SEND_TIME_LIMIT,
            "sending {count} datagrams took over {SEND_TIME_LIMIT:?}"
        );
    }
    Ok(count)
}

/// Sends at `rate` datagrams per second for at most `duration`, or until `stop` is set, adding
/// each sent datagram to `sent`. Returns the number sent.
pub fn send_udp_at_rate(
    socket: &UdpSocket,
    dst: SocketAddr,
    rate: f64,
    duration: Duration,
    stop: &AtomicBool,
    sent: &AtomicU64,
) -> Result<u64> {
    let start = Instant::now();
    let mut seq = 0u64;
    while !stop.load(Ordering::Relaxed) {
        let elapsed = start.elapsed();
        if elapsed >= duration {
            break;
        }
        let due = (elapsed.as_secs_f64() * rate) as u64 + 1;
        while seq < due {
            send_retrying(|| socket.send_to(&payload(seq), dst))?;
            seq += 1;
            sent.fetch_add(1, Ordering::Relaxed);
        }
        thread::sleep(Duration::from_secs_f64((1.0 / rate).clamp(0.0002, 0.01)));
    }
    Ok(seq)
}

/// The UDP port the privileged tests' receivers listen on.
pub const UDP_PORT: u16 = 5300;

/// The receiver's address in `src`'s family, on [`UDP_PORT`].
pub fn receiver_for(src: IpAddr) -> SocketAddr {
    match src {
        IpAddr::V4(_) => SocketAddr::new(RECEIVER_V4.into(), UDP_PORT),
        IpAddr::V6(_) => SocketAddr::new(RECEIVER_V6.into(), UDP_PORT),
    }
}

/// Sends `count` datagrams from `src` to the receiver (light pacing).
pub fn send(net: &TestNet, src: impl Into<IpAddr>, count: u64) -> Result<u64> {
    let src = src.into();
    let socket = net.udp_sender(src)?;
    send_udp(&socket, receiver_for(src), count, Pacing::default())
}

/// Sends `count` datagrams from each source (one after the other), waits until the receiver is
/// idle, and returns how many each source got through.
pub fn send_and_count(
    net: &TestNet,
    counter: &PacketCounter,
    sends: &[(IpAddr, u64)],
) -> Result<HashMap<IpAddr, u64>> {
    let before = counter.settle()?;
    for (src, count) in sends {
        send(net, *src, *count)?;
    }
    let after = counter.settle()?;
    Ok(sends
        .iter()
        .map(|(src, _)| {
            let got = after.get(src).copied().unwrap_or(0) - before.get(src).copied().unwrap_or(0);
            (*src, got)
        })
        .collect())
}
