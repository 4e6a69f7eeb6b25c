//! The in-place refresh of every entry's cached policy.

use std::{
    io,
    os::fd::{AsFd as _, OwnedFd},
};

use aya::maps::IterableMap as _;
use limiter_common::{
    AdaptSlot, ClientState,
    addr::ClientKey,
    maps::{ADAPT_BATCH, ADAPT_REFRESH, ADAPT_UNCHANGED},
};

use super::Tables;
use crate::datapath::{ADAPT_FRAME, ADAPT_PROGRAM, DatapathError, TestRunFrame, XDP_PASS, syscall};

impl Tables {
    /// Gives these tables the `limiter_adapt` program (from [`load_adapt_program`]), with which
    /// `apply` refreshes every entry in place when one is due. The agent always does; without
    /// it (tests, benchmarks) nothing is refreshed and a client idle across 2^15 policy changes
    /// could keep a stale policy until its next change.
    pub fn set_refresher(&mut self, program: OwnedFd) {
        self.refresher = Some(program);
    }

    /// Runs the refresh an `apply` made before [`Tables::set_refresher`] could not: on adopted
    /// maps (whose previous agent may have died owing one) the first apply is due one, and
    /// without a refresher it leaves it owed. Returns the entries refreshed, `None` if none was
    /// owed (or there is no refresher).
    pub fn refresh_if_owed(&mut self) -> Result<Option<usize>, DatapathError> {
        if self.refresher.is_none() || self.last_refresh.is_some() {
            return Ok(None);
        }
        let generation = self.map_config()?.generation;
        if generation == 0 {
            return Ok(None);
        }
        let refreshed = self.refresh_all()?;
        tracing::info!(
            generation,
            refreshed,
            "refreshed every client's policy in place (due on adopted maps)"
        );
        self.last_refresh = Some(generation);
        Ok(Some(refreshed))
    }

    /// Brings the cached policy of every resident address client up to the current generation,
    /// in place (`ADAPT_REFRESH`, with the same atomics as the fast path, so no concurrent count
    /// is lost). Entries store only a 15-bit generation tag; `apply` runs this
    /// `GENERATION_SWEEP` (2^14) generations after the last refresh, so no resident entry's tag
    /// is ever 2^15 generations old, where it would alias the current one. Returns the entries
    /// refreshed (0 without a refresher; a busy entry that stays contended is left to its own
    /// packets): a million take 0.9 s (BENCHMARKS.md).
    pub fn refresh_all(&self) -> Result<usize, DatapathError> {
        let Some(program) = &self.refresher else {
            return Ok(0);
        };
        let mut frame = TestRunFrame::new(ADAPT_FRAME);
        let mut refreshed = 0;
        for (map, name) in [
            (&self.clients, "CLIENTS"),
            (&self.static_clients, "STATIC_CLIENTS"),
            (&self.limited, "LIMITED"),
        ] {
            // A batched walk: its cursor is a bucket, so evictions during the walk (a flood of
            // new sources) cannot restart it, as they can a walk by `get_next_key`.
            let slots: Vec<AdaptSlot> =
                syscall::lookup_all::<ClientKey, ClientState>(map.map().fd().as_fd())
                    .map_err(|error| DatapathError::Io {
                        what: "reading",
                        path: name.into(),
                        error,
                    })?
                    .into_iter()
                    .map(|(key, _)| AdaptSlot {
                        key,
                        flags: ADAPT_REFRESH,
                        ..AdaptSlot::default()
                    })
                    .collect();
            for chunk in slots.chunks(ADAPT_BATCH) {
                let io_err = |error| DatapathError::Io {
                    what: "refreshing the policies of",
                    path: name.into(),
                    error,
                };
                let run = frame
                    .run::<AdaptSlot, AdaptSlot>(program.as_fd(), chunk, 0)
                    .map_err(io_err)?;
                if run.ret != XDP_PASS {
                    return Err(io_err(io::Error::other(format!(
                        "{ADAPT_PROGRAM} returned {}",
                        run.ret
                    ))));
                }
                refreshed += run
                    .answers
                    .iter()
                    .filter(|slot| slot.result == ADAPT_UNCHANGED)
                    .count();
            }
        }
        Ok(refreshed)
    }
}
