//! Counting received packets per source address on a background thread.

use std::{
    collections::HashMap,
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
        let state = Arc::new(CounterState::default());
        let stop = Arc::new(AtomicBool::new(false));
        let epoch = Instant::now();
        let thread = {
            let (state, stop) = (Arc::clone(&state), Arc::clone(&stop));
            thread::spawn(move || {
                while !stop.load(Ordering::Relaxed) {
                    match recv_one() {
                        Ok(Some(ip)) => {
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
