//! The agent's sweep of `LIMITED`.

use std::{
    os::fd::AsFd as _,
    sync::{Arc, Mutex},
    time::Instant,
};

use aya::maps::{HashMap, IterableMap as _, MapData, MapError};
use limiter_common::{
    ClientState,
    addr::ClientKey,
    maps::ACTION_LIMIT,
    window::{slot_count, slot_tag},
};

use super::{Tables, dup_map, policies::PROGRAM_RUNS_END};
use crate::datapath::{DatapathError, map_err, syscall};

impl Tables {
    /// A handle of its own on `LIMITED`, for the agent's periodic [`LimitedSweep`].
    pub fn limited_sweep(&self) -> Result<LimitedSweep, DatapathError> {
        Ok(LimitedSweep {
            limited: HashMap::try_from(dup_map(self.limited.map(), "LIMITED")?)
                .map_err(map_err("LIMITED"))?,
            clients: HashMap::try_from(dup_map(self.clients.map(), "CLIENTS")?)
                .map_err(map_err("CLIENTS"))?,
            statics: HashMap::try_from(dup_map(self.static_clients.map(), "STATIC_CLIENTS")?)
                .map_err(map_err("STATIC_CLIENTS"))?,
            made_static: Arc::clone(&self.made_static),
        })
    }
}

/// `BPF_NOEXIST` (include/uapi/linux/bpf.h): create only, fail with EEXIST if the key is there.
const BPF_NOEXIST: u64 = 1;

/// The agent's periodic sweep of `LIMITED`: releases the entries whose window state has aged
/// out back into `CLIENTS`.
///
/// The program moves a client into `LIMITED` on its first dropped packet and never takes it out;
/// once neither window slot counts anything the current or the previous window could weigh, the
/// client would be admitted in full anyway, so it goes back to `CLIENTS` with its counters
/// (where it is evictable again until it next goes over its limit). Entries whose policy no
/// longer limits them (`pass`, `drop` after a reload) go at once.
pub struct LimitedSweep {
    limited: HashMap<MapData, ClientKey, ClientState>,
    clients: HashMap<MapData, ClientKey, ClientState>,
    statics: HashMap<MapData, ClientKey, ClientState>,
    /// Keys an apply made static, and when (see [`LimitedSweep::strays`]).
    made_static: Arc<Mutex<Vec<(ClientKey, Instant)>>>,
}

/// How far behind CLOCK_MONOTONIC the program's coarse clock may be (two jiffies at HZ=250 are
/// 8 ms; see `entry::coarse_now` in limiter-ebpf): the sweep judges a window over only once the
/// program's clock is past it too.
const PROGRAM_CLOCK_LAG_NS: u64 = 20_000_000;

impl LimitedSweep {
    /// Releases the aged-out entries at `now_ns` (CLOCK_MONOTONIC) back into `CLIENTS`, with
    /// their lifetime counters (a client's `passed` and `dropped` never go back because it was
    /// held); returns how many went. Each is read again just before it moves, so a client that
    /// resumed since the walk stays held. The copy goes into `CLIENTS` (`BPF_NOEXIST`) before the
    /// entry leaves `LIMITED`, so a packet always finds it in one or the other (the program
    /// creates an entry only when all three maps miss, and its insert finds the copy if one went
    /// in meanwhile). A hit that lands between the re-read and the copy is lost, and on a CPU that
    /// looks in `LIMITED` first (`find_packet` in limiter-ebpf) one that lands before the delete:
    /// a few microseconds, on entries with nothing left to protect. First it takes out the copies
    /// a packet put back while an apply made their clients static ([`LimitedSweep::strays`]).
    /// One batched walk of at most
    /// `--max-limited` entries (65,536 by default: about 25 ms).
    pub fn sweep(&mut self, now_ns: u64) -> Result<usize, DatapathError> {
        self.strays();
        let entries =
            syscall::lookup_all::<ClientKey, ClientState>(self.limited.map().fd().as_fd())
                .map_err(|error| DatapathError::Io {
                    what: "reading",
                    path: "LIMITED".into(),
                    error,
                })?;
        let mut removed = 0;
        for (key, state) in entries {
            let now = now_ns.saturating_sub(PROGRAM_CLOCK_LAG_NS);
            if !aged_out(&state, now) {
                continue;
            }
            let state = match self.limited.get(&key, 0) {
                Ok(state) if aged_out(&state, now) => state,
                // Resumed since the walk, or gone meanwhile.
                Ok(_) => continue,
                Err(MapError::KeyNotFound) => continue,
                Err(e) => return Err(map_err("LIMITED")(e)),
            };
            let copied = match self.clients.insert(key, state, BPF_NOEXIST) {
                Ok(()) => true,
                // Already there (cannot happen while LIMITED holds the key, but harmless).
                Err(MapError::SyscallError(e))
                    if e.io_error.raw_os_error() == Some(libc::EEXIST) =>
                {
                    false
                }
                // CLIENTS is full and would not take it (an LRU map evicts instead, so this is a
                // preallocation failure): the client starts afresh, as before it was held.
                Err(_) => false,
            };
            match self.limited.remove(&key) {
                Ok(()) => removed += 1,
                // Gone meanwhile: an `apply` moved it into the static map, so the copy just
                // made is a second entry, which packets looking in `CLIENTS` first would use.
                Err(MapError::SyscallError(e))
                    if e.io_error.raw_os_error() == Some(libc::ENOENT) =>
                {
                    if copied {
                        let _ = self.clients.remove(&key);
                    }
                }
                Err(e) => return Err(map_err("LIMITED")(e)),
            }
        }
        Ok(removed)
    }

    /// Removes from `LIMITED` and `CLIENTS` the copies of clients an apply made static at least
    /// [`PROGRAM_RUNS_END`] ago that a packet running during the move put back there (it found
    /// the client in `CLIENTS` before the move and held it after), if the key is still static.
    /// Each key's check and removal under the lock an apply moves clients between the maps with,
    /// so that none is made dynamic again in between; taken per key, so that an apply waits for
    /// a few syscalls at most, not for the whole list.
    fn strays(&mut self) {
        let lock = || {
            self.made_static
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
        };
        let due: Vec<ClientKey> = {
            let mut made = lock();
            let now = Instant::now();
            let (due, young): (Vec<_>, Vec<_>) = made
                .drain(..)
                .partition(|(_, at)| now.duration_since(*at) >= PROGRAM_RUNS_END);
            *made = young;
            due.into_iter().map(|(key, _)| key).collect()
        };
        for key in due {
            let _moving = lock();
            if self.statics.get(&key, 0).is_ok() {
                let _ = self.limited.remove(&key);
                let _ = self.clients.remove(&key);
            }
        }
    }
}

/// Whether a `LIMITED` entry has nothing left to protect at `now_ns` (at least as late as the
/// program's clock can be): it is not a `limit` entry any more, or no slot with a count is of
/// the current or the previous window (tags are window numbers modulo 2^32; a slot ahead of
/// `now_ns` counts as live).
pub fn aged_out(state: &ClientState, now_ns: u64) -> bool {
    if state.action() != ACTION_LIMIT {
        return true;
    }
    let Some(window) = std::num::NonZeroU64::new(state.window_us as u64 * 1000) else {
        return true;
    };
    let index = (now_ns / window) as u32;
    state.slots.iter().all(|&slot| {
        let behind = index.wrapping_sub(slot_tag(slot));
        slot_count(slot) == 0 || (2..1 << 31).contains(&behind)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn limited_entries_age_out_after_two_windows() {
        use limiter_common::window::slot;
        let entry = |slots: [u64; 2]| ClientState {
            slots,
            limit: 10,
            window_us: 1_000_000,
            ..ClientState::default()
        };
        let at = |window: u64, ms: u64| window * 1_000_000_000 + ms * 1_000_000;
        // Counted in window 7: live through window 8 (the previous window weighs in), over in 9.
        let s = entry([slot(7, 10), 0]);
        assert!(!aged_out(&s, at(7, 999)));
        assert!(!aged_out(&s, at(8, 999)));
        assert!(aged_out(&s, at(9, 0)));
        // The other slot counts too; empty slots never do.
        let s = entry([slot(2, 3), slot(9, 1)]);
        assert!(!aged_out(&s, at(10, 500)));
        assert!(aged_out(&s, at(11, 0)));
        assert!(aged_out(&entry([slot(9, 0), slot(10, 0)]), at(10, 0)));
        // A slot ahead of the sweep's clock (the program's clock is later) is live.
        assert!(!aged_out(&entry([slot(12, 4), 0]), at(11, 999)));
        // Entries whose policy no longer limits them go at once.
        let mut pass = entry([slot(10, 3), 0]);
        pass.window_us = 0;
        assert!(aged_out(&pass, at(10, 0)));
        let mut drop = entry([slot(10, 3), 0]);
        drop.limit = 0;
        assert!(aged_out(&drop, at(10, 0)));
    }
}
