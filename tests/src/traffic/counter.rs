//! Counting received packets per source address on a background thread, and (for a counter that
//! knows when each packet arrived) when they arrived, by CLOCK_MONOTONIC.

use std::{
    collections::{BTreeMap, HashMap},
    io,
    net::IpAddr,
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    thread::{self, JoinHandle},
    time::{Duration, Instant},
};

use anyhow::{Result, bail};

#[derive(Default)]
struct CounterState {
    counts: Mutex<HashMap<IpAddr, u64>>,
    /// Per source, when each packet arrived (CLOCK_MONOTONIC), in the order they were read; only
    /// for a counter whose receive function says.
    arrivals: Mutex<HashMap<IpAddr, Vec<Duration>>>,
    total: AtomicU64,
    /// Nanoseconds since `epoch` of the last counted packet.
    last_ns: AtomicU64,
    error: Mutex<Option<String>>,
}

/// Counts received packets per source address on a background thread until dropped.
pub struct PacketCounter {
    state: Arc<CounterState>,
    epoch: Instant,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl PacketCounter {
    /// Spawns the counting thread around `recv_one`, which waits a short while (its socket's
    /// timeout) for one packet: `Ok(Some(source))` counts it, `Ok(None)` counts nothing.
    pub(super) fn spawn(
        mut recv_one: impl FnMut() -> io::Result<Option<IpAddr>> + Send + 'static,
    ) -> PacketCounter {
        PacketCounter::spawn_inner(move || Ok(recv_one()?.map(|ip| (ip, None))))
    }

    /// [`PacketCounter::spawn`] around a `recv_one` that also says when the packet arrived
    /// (CLOCK_MONOTONIC): the counter keeps every arrival time, for [`PacketCounter::arrivals`].
    pub(super) fn spawn_timed(
        mut recv_one: impl FnMut() -> io::Result<Option<(IpAddr, Duration)>> + Send + 'static,
    ) -> PacketCounter {
        PacketCounter::spawn_inner(move || Ok(recv_one()?.map(|(ip, at)| (ip, Some(at)))))
    }

    fn spawn_inner(
        mut recv_one: impl FnMut() -> io::Result<Option<(IpAddr, Option<Duration>)>> + Send + 'static,
    ) -> PacketCounter {
        let state = Arc::new(CounterState::default());
        let stop = Arc::new(AtomicBool::new(false));
        let epoch = Instant::now();
        let thread = {
            let (state, stop) = (Arc::clone(&state), Arc::clone(&stop));
            thread::spawn(move || {
                while !stop.load(Ordering::Relaxed) {
                    match recv_one() {
                        Ok(Some((ip, at))) => {
                            if let Some(at) = at {
                                state
                                    .arrivals
                                    .lock()
                                    .unwrap_or_else(|e| e.into_inner())
                                    .entry(ip)
                                    .or_default()
                                    .push(at);
                            }
                            *state
                                .counts
                                .lock()
                                .unwrap_or_else(|e| e.into_inner())
                                .entry(ip)
                                .or_default() += 1;
                            state.total.fetch_add(1, Ordering::Relaxed);
                            state
                                .last_ns
                                .store(epoch.elapsed().as_nanos() as u64, Ordering::Relaxed);
                        }
                        Ok(None) => {}
                        Err(e) => {
                            *state.error.lock().unwrap_or_else(|e| e.into_inner()) =
                                Some(e.to_string());
                            return;
                        }
                    }
                }
            })
        };
        PacketCounter {
            state,
            epoch,
            stop,
            thread: Some(thread),
        }
    }

    /// Packets counted so far, per source address (IPv4 as IPv4, not IPv4-mapped).
    pub fn counts(&self) -> HashMap<IpAddr, u64> {
        self.state
            .counts
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Packets counted so far from `ip`.
    pub fn count(&self, ip: impl Into<IpAddr>) -> u64 {
        self.counts().get(&ip.into()).copied().unwrap_or(0)
    }

    /// When each packet counted so far arrived (CLOCK_MONOTONIC), per source, in time order;
    /// empty unless the counter knows arrival times (such as
    /// [`ClusterNet::udp_timed_counter`](crate::netns::ClusterNet::udp_timed_counter)).
    pub fn arrivals(&self) -> HashMap<IpAddr, Vec<Duration>> {
        let mut arrivals = self
            .state
            .arrivals
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        for times in arrivals.values_mut() {
            times.sort_unstable();
        }
        arrivals
    }

    /// Packets counted so far per source and per fixed `window` of CLOCK_MONOTONIC (the window
    /// index: arrival time / `window`), for a counter that knows arrival times; sources with no
    /// arrival time recorded are left out.
    pub fn per_window(&self, window: Duration) -> HashMap<IpAddr, BTreeMap<u64, u64>> {
        self.arrivals()
            .into_iter()
            .map(|(ip, times)| {
                let mut windows = BTreeMap::new();
                for at in times {
                    let index = (at.as_nanos() / window.as_nanos()) as u64;
                    *windows.entry(index).or_default() += 1;
                }
                (ip, windows)
            })
            .collect()
    }

    /// Packets counted so far from all sources.
    pub fn total(&self) -> u64 {
        self.state.total.load(Ordering::Relaxed)
    }

    /// Waits until no packet has arrived for `idle` (counted from the later of the last packet
    /// and this call), at most 30 s, and returns the counts. Fails if the receiving thread hit
    /// an error.
    pub fn wait_idle(&self, idle: Duration) -> Result<HashMap<IpAddr, u64>> {
        let start = self.epoch.elapsed();
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(e) = self
                .state
                .error
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .clone()
            {
                bail!("receiving: {e}");
            }
            let last = Duration::from_nanos(self.state.last_ns.load(Ordering::Relaxed)).max(start);
            let now = self.epoch.elapsed();
            if now.saturating_sub(last) >= idle {
                return Ok(self.counts());
            }
            if Instant::now() >= deadline {
                bail!("traffic did not go idle within 30 s");
            }
            thread::sleep(Duration::from_millis(10));
        }
    }

    /// [`PacketCounter::wait_idle`] with the usual 400 ms.
    pub fn settle(&self) -> Result<HashMap<IpAddr, u64>> {
        self.wait_idle(Duration::from_millis(400))
    }
}

impl Drop for PacketCounter {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}
