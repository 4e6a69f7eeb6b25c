//! The adaptive loop: once per period it finds the clients active in the period, feeds their
//! observed rates and the CPU load to the [`Controller`], and writes the windows and allowances
//! the controller wants into the client entries the XDP program reads.
//!
//! # Work per period is proportional to the active clients
//!
//! The loop never walks the client maps. It learns of clients from the `ACTIVE` ring buffer,
//! into which the fast path pushes a client's key when the client starts a new window and is
//! not yet tracked (`FLAG_REPORTED`). Each period it then reads only the clients it tracks (one
//! map lookup each), runs the controller over those that sent something, and rewrites only the
//! entries whose window or allowance differs from what the controller wants. A client that has
//! been silent for `idle_periods` is released (its entry back to its policy, its flag cleared,
//! so its next window reports it again) and costs nothing from then on. The one walk is at
//! start, to adopt the clients a previous agent left flagged.
//!
//! # Writing entries
//!
//! The agent cannot write a client's entry from userspace without racing the packets counting
//! in it, so it runs the never-attached `limiter_adapt` program with BPF_PROG_TEST_RUN on an
//! adapt frame of up to `ADAPT_BATCH` changes. The program changes window and allowance in
//! place and rescales the window slots so that the client keeps the fraction of its allowance
//! it has used (`window::rescale`); see the program for its ordering against packets. A
//! request carries the policy generation it was computed for and is refused (`ADAPT_STALE`)
//! after a reload, which resets every entry to its policy; the next period recomputes.
//!
//! # Global clients
//!
//! A client under a `scope: global` policy keeps its entry as the policy and the cluster set it:
//! the loop observes it against this node's cold share with its window fixed, and publishes a
//! cap on it in [`GlobalCaps`] when its factor is below 1, which the cluster's enrolment
//! enforces through the client's grant (see [`super::global`]).

use std::{
    collections::HashMap,
    io,
    os::fd::{AsFd as _, OwnedFd},
    sync::Arc,
    time::Duration,
};

use aya::maps::{MapData, RingBuf};
use limiter_common::{
    AdaptSlot, AdaptiveStatus, ClientState,
    addr::ClientKey,
    maps::{ACTION_LIMIT, ADAPT_APPLIED, ADAPT_BATCH, ADAPT_RELEASE, ADAPT_STALE, HOME_STATIC},
};

use super::{
    controller::{ClientObservation, Controller, LoadSample},
    global::GlobalCaps,
    load::LoadSource,
};
use crate::{
    config::{Action, AdaptiveError, Config, Scope},
    datapath::{
        ADAPT_FRAME, ADAPT_PROGRAM, AdaptiveHandles, DatapathError, EntryReads, ReadFrameError,
        TestRunFrame, XDP_PASS,
    },
};

#[derive(Debug, thiserror::Error)]
pub enum TunerError {
    #[error(transparent)]
    Map(#[from] DatapathError),
    #[error("running {ADAPT_PROGRAM} with BPF_PROG_TEST_RUN")]
    TestRun(#[from] io::Error),
    #[error("{ADAPT_PROGRAM} rejected an adapt frame (returned {0})")]
    Rejected(u32),
    #[error("adaptive")]
    Config(#[from] AdaptiveError),
}

/// What a policy contributes to the controller: its rate and weight.
#[derive(Debug, Clone, Copy, PartialEq)]
struct Base {
    /// The policy's limit; a global policy's cold share on this node.
    limit: u32,
    window_us: u32,
    weight: f64,
    /// A global policy: its clients' entries are not rewritten; their caps go to
    /// [`GlobalCaps`] for the cluster's enrolment to enforce.
    global: bool,
}

/// A client the loop tracks. Tracked clients are observed every period, silent ones with rate
/// 0, until they have been silent for `idle_periods`.
#[derive(Debug, Clone, Copy)]
struct Tracked {
    /// `passed + dropped` at the last read; `None` until the first read (a newly reported
    /// client is observed from its second period on, when a full period's delta exists).
    total: Option<u64>,
    /// Found in `STATIC_CLIENTS` last time (look there first).
    in_static: bool,
    /// Last period with traffic.
    last_active: u64,
    /// Window and allowance the entry had at the last read.
    window_us: u32,
    limit: u32,
}

/// What one period did.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct PeriodReport {
    pub period: u64,
    /// CPU utilisation sampled for this period (NaN if the source failed).
    pub cpu: f64,
    /// Smoothed CPU utilisation the controller acted on.
    pub load: f64,
    /// The global load factor `g`.
    pub load_factor: f64,
    /// Keys read from the ring (reports of newly active clients).
    pub reported: usize,
    /// Clients tracked after the period.
    pub tracked: usize,
    /// Tracked clients' entries read (in read frames of the adapt program, dozens per run).
    pub reads: usize,
    /// Read frames run (BPF_PROG_TEST_RUN calls).
    pub read_runs: usize,
    /// Clients with traffic in the period, fed to the controller.
    pub observed: usize,
    /// Entries whose window and allowance were changed.
    pub written: usize,
    /// Clients released (idle, evicted or forgotten).
    pub released: usize,
    /// Changes refused because a reload happened in between (redone next period).
    pub stale: usize,
    /// Adapt frames run (BPF_PROG_TEST_RUN calls).
    pub runs: usize,
}

/// The adaptive loop's state (see the module docs).
pub struct Tuner {
    controller: Controller,
    ring: RingBuf<MapData>,
    program: OwnedFd,
    maps: AdaptiveHandles,
    load: Box<dyn LoadSource>,
    tracked: HashMap<ClientKey, Tracked>,
    /// Policy facts by policy id, for `generation`.
    bases: Vec<Option<Base>>,
    generation: u32,
    /// Clients to return to their policy at the next period (adaptive was switched off).
    pending_release: Vec<ClientKey>,
    period: u64,
    /// The adapt frame, reused.
    frame: TestRunFrame,
    /// The read frames, their buffer reused.
    reads: EntryReads,
    /// Where the caps on global clients are published, for the cluster's enrolment.
    caps: Arc<GlobalCaps>,
    /// The caps as last published.
    capped: HashMap<ClientKey, u32>,
}

impl Tuner {
    pub fn new(
        config: &Config,
        generation: u32,
        ring: RingBuf<MapData>,
        program: OwnedFd,
        maps: AdaptiveHandles,
        load: Box<dyn LoadSource>,
    ) -> Result<Tuner, TunerError> {
        let mut tuner = Tuner {
            controller: Controller::new(config.adaptive.clone())?,
            ring,
            program,
            maps,
            load,
            tracked: HashMap::new(),
            bases: Vec::new(),
            generation: 0,
            pending_release: Vec::new(),
            period: 0,
            frame: TestRunFrame::new(ADAPT_FRAME),
            reads: EntryReads::default(),
            caps: Arc::default(),
            capped: HashMap::new(),
        };
        tuner.set_policies(config, generation)?;
        Ok(tuner)
    }

    pub fn controller(&self) -> &Controller {
        &self.controller
    }

    /// The controller's period.
    pub fn period(&self) -> Duration {
        Duration::from_micros(self.controller.config().period.micros as u64)
    }

    /// The caps this loop puts on global clients (see [`super::global`]): the cluster's
    /// enrolment enforces them.
    pub fn global_caps(&self) -> Arc<GlobalCaps> {
        Arc::clone(&self.caps)
    }

    pub fn load_source(&self) -> String {
        self.load.describe()
    }

    /// Tracks the clients a previous agent left flagged as reported (one walk of the address
    /// maps); returns how many.
    pub fn adopt_reported(&mut self) -> Result<usize, TunerError> {
        let reported = self.maps.reported()?;
        let n = reported.len();
        for (key, in_static) in reported {
            self.track(key, in_static);
        }
        Ok(n)
    }

    fn track(&mut self, key: ClientKey, in_static: bool) {
        let period = self.period;
        self.tracked.entry(key).or_insert(Tracked {
            total: None,
            in_static,
            last_active: period,
            window_us: 0,
            limit: 0,
        });
    }

    /// Takes a newly applied config: its policies (for `generation`) and its `adaptive` section.
    /// A rejected section changes nothing (the config parser validates it first, so this only
    /// happens for a config built in code).
    pub fn set_policies(&mut self, config: &Config, generation: u32) -> Result<(), TunerError> {
        if config.adaptive != *self.controller.config() {
            let released = self.controller.set_config(config.adaptive.clone())?;
            self.pending_release.extend(released);
        }
        if generation == self.generation && !self.bases.is_empty() {
            return Ok(());
        }
        let ids = config.policies.len() + 1;
        self.bases = (0..ids)
            .map(|id| {
                let id = u16::try_from(id).ok()?;
                let base = config.policy_base(id)?;
                // A global policy's limit in `config` is already this node's cold share (see
                // `limits::with_shares`): its clients are observed against it, with their
                // windows fixed, and capped through enrolment (`super::global`).
                let adapted = base.action == Action::Limit && base.limit > 0;
                adapted.then(|| Base {
                    limit: base.limit,
                    window_us: base.window.micros,
                    weight: config.weight(id),
                    global: config.scope(id) == Scope::Global,
                })
            })
            .collect();
        self.generation = generation;
        Ok(())
    }

    /// Runs one period. `elapsed` is the time since the previous one (rates are per second of
    /// it); the first period only establishes baselines.
    pub fn tick(&mut self, elapsed: Duration) -> Result<PeriodReport, TunerError> {
        self.period += 1;
        let mut report = PeriodReport {
            period: self.period,
            ..PeriodReport::default()
        };
        let mut reported = Vec::new();
        while let Some(item) = self.ring.next() {
            if let Ok(key) = <ClientKey>::try_from(&item[..item.len().min(16)]) {
                reported.push(key);
            }
        }
        report.reported = reported.len();
        let enabled = self.controller.config().enabled;
        let mut slots = Vec::new();
        let mut release = std::mem::take(&mut self.pending_release);
        if enabled {
            for key in reported {
                self.track(key, false);
            }
        } else {
            // Flagged before adaptive was switched off: clear their flags, or they would never
            // be reported again once it is back on.
            release.extend(reported);
            release.extend(self.tracked.keys().copied());
        }
        let secs = elapsed.as_secs_f64().max(1e-3);
        let idle = self.controller.config().idle_periods as u64;
        let mut observations = Vec::new();
        let mut evicted = Vec::new();
        let entries = if enabled {
            self.read_tracked(&mut report)?
        } else {
            Vec::new()
        };
        // What each observed client's entry had at the read (window, allowance), beside
        // `observations`.
        let mut held = Vec::new();
        if enabled {
            // `entries` answers `tracked` in its iteration order (`read_tracked`), which nothing
            // changed since: no lookup per client.
            for ((key, t), entry) in self.tracked.iter_mut().zip(&entries) {
                let Some((state, in_static)) = *entry else {
                    evicted.push(*key);
                    continue;
                };
                t.in_static = in_static;
                let total = state.total_passed().wrapping_add(state.dropped_count());
                let delta = match t.total {
                    // An entry evicted and created again starts from zero.
                    Some(before) if total >= before => Some(total - before),
                    _ => None,
                };
                t.total = Some(total);
                (t.window_us, t.limit) = (state.window_us, state.limit);
                // A silent period counts (as rate 0): a client sending a burst every few
                // periods is as calm as one sending evenly at the same average rate.
                match delta {
                    Some(d) if d > 0 => t.last_active = self.period,
                    _ if self.period.saturating_sub(t.last_active) > idle => {
                        release.push(*key);
                        continue;
                    }
                    Some(_) => {}
                    // No baseline yet (first read, or the entry was evicted and created again).
                    None => continue,
                }
                // A client whose policy no longer limits it has nothing to adapt.
                if state.is_current(self.generation) && state.action() != ACTION_LIMIT {
                    release.push(*key);
                    continue;
                }
                // An entry that has not seen the current policies yet is left for a later period.
                if !state.is_current(self.generation) {
                    continue;
                }
                let Some(Some(base)) = self.bases.get(state.policy() as usize) else {
                    continue;
                };
                observations.push(ClientObservation {
                    key: *key,
                    limit: base.limit,
                    window_us: base.window_us,
                    rate: delta.unwrap_or(0) as f64 / secs,
                    weight: base.weight,
                    fixed_window: base.global,
                });
                held.push((t.window_us, t.limit));
            }
        }
        report.observed = observations.len();
        let cpu = self.load.sample();
        let output = self
            .controller
            .step(&LoadSample { cpu }, observations.iter().copied());
        report.cpu = cpu;
        report.load = output.load;
        report.load_factor = output.load_factor;
        release.extend(output.forgotten);
        let mut caps = Vec::new();
        let mut uncapped = Vec::new();
        // The step's decisions follow `observations`, less those it skipped (for which the
        // controller is asked: no lookup per client otherwise).
        let mut decided = output.observed.iter().peekable();
        for (obs, &held) in observations.iter().zip(&held) {
            let want = match decided.next_if(|d| d.key == obs.key) {
                Some(d) => *d,
                None => match self.controller.desired(&obs.key) {
                    Some(d) => d,
                    None => continue,
                },
            };
            if obs.fixed_window {
                // A global client: its entry keeps the policy's window and cold share.
                if want.load_factor < 1.0 && want.allowance < obs.limit {
                    caps.push((obs.key, want.allowance));
                } else {
                    uncapped.push(obs.key);
                }
                continue;
            }
            uncapped.push(obs.key);
            if (want.window_us, want.allowance) != held {
                slots.push(AdaptSlot {
                    key: obs.key,
                    limit: want.allowance,
                    window_us: want.window_us,
                    generation: self.generation,
                    ..AdaptSlot::default()
                });
            }
        }
        for key in &evicted {
            self.tracked.remove(key);
            report.released += 1;
        }
        release.sort_unstable();
        release.dedup();
        let clear = uncapped
            .into_iter()
            .chain(evicted)
            .chain(release.iter().copied());
        self.publish_caps(caps, clear);
        for &key in &release {
            self.tracked.remove(&key);
            report.released += 1;
            // Back to the policy it resolves to (the program looks it up): s = g = 1.
            slots.push(AdaptSlot {
                key,
                flags: ADAPT_RELEASE,
                ..AdaptSlot::default()
            });
        }
        for chunk in slots.chunks(ADAPT_BATCH) {
            report.runs += 1;
            let results = match self.run(chunk) {
                Ok(results) => results,
                Err(e) => {
                    // Untracked already: retried next period, or their flags would stay set.
                    self.pending_release = release;
                    return Err(e);
                }
            };
            for result in results {
                // Unchanged, not resident (evicted since the read), skipped or invalid: nothing to
                // count; the next period reads the entry afresh.
                match result {
                    ADAPT_APPLIED => report.written += 1,
                    ADAPT_STALE => report.stale += 1,
                    _ => {}
                }
            }
        }
        report.tracked = self.tracked.len();
        let status = AdaptiveStatus {
            cpu_ppm: ppm(output.load),
            load_factor_ppm: ppm(output.load_factor),
            period_us: if enabled {
                self.controller.config().period.micros
            } else {
                0
            },
            tracked: u32::try_from(self.tracked.len()).unwrap_or(u32::MAX),
            periods: self.period,
        };
        self.maps.set_status(status)?;
        Ok(report)
    }

    /// Takes every published cap back (a period failed: the caps stop following the load, and
    /// no cap is always safe).
    pub fn clear_global_caps(&mut self) {
        if !self.capped.is_empty() {
            self.capped.clear();
            self.caps.publish(HashMap::new());
        }
    }

    /// Puts `set` into the caps and takes out those of `clear`; publishes them if that changed
    /// anything.
    fn publish_caps(&mut self, set: Vec<(ClientKey, u32)>, clear: impl Iterator<Item = ClientKey>) {
        // Nothing capped and nothing to cap (no global client under overload): no lookup per
        // observed client.
        if set.is_empty() && self.capped.is_empty() {
            return;
        }
        let mut changed = false;
        for (client, cap) in set {
            changed |= self.capped.insert(client, cap) != Some(cap);
        }
        for client in clear {
            changed |= self.capped.remove(&client).is_some();
        }
        if changed {
            self.caps.publish(self.capped.clone());
        }
    }

    /// The controller's scale and smoothed utilisation of a tracked client.
    pub fn client(&self, key: &ClientKey) -> Option<(f64, f64)> {
        Some((
            self.controller.scale(key)?,
            self.controller.utilisation(key)?,
        ))
    }

    /// The tracked clients' resident entries (and whether each is in `STATIC_CLIENTS`), in the
    /// order `tracked` iterates (one per client, `None` for a client without an entry), read in
    /// frames of `ADAPT_READ_BATCH`: one program run per frame instead of a lookup syscall per
    /// client, and no map of the answers to look each client up in (at 100k tracked clients
    /// each lookup is a cache miss).
    fn read_tracked(
        &mut self,
        report: &mut PeriodReport,
    ) -> Result<Vec<Option<(ClientState, bool)>>, TunerError> {
        let keys: Vec<ClientKey> = self.tracked.keys().copied().collect();
        let answers = self
            .reads
            .read(self.program.as_fd(), &keys)
            .map_err(|e| match e {
                ReadFrameError::Run(e) => TunerError::TestRun(e),
                ReadFrameError::Rejected(ret) => TunerError::Rejected(ret),
            })?;
        report.read_runs += self.reads.runs(keys.len());
        report.reads += keys.len();
        // One answer per key, in order, so the entries keep `tracked`'s order.
        Ok(keys
            .iter()
            .zip(&answers)
            .map(|(asked, read)| {
                // The program answers each slot about the key it was asked (it never rewrites
                // an adapt read's key); a different one would be a broken frame: no entry.
                (read.result == ADAPT_APPLIED && read.key == *asked)
                    .then_some((read.state, read.home == HOME_STATIC))
            })
            .collect())
    }

    /// Runs one adapt frame; returns each slot's result.
    fn run(&mut self, chunk: &[AdaptSlot]) -> Result<Vec<u32>, TunerError> {
        let out = self
            .frame
            .run::<AdaptSlot, AdaptSlot>(self.program.as_fd(), chunk, 0)?;
        if out.ret != XDP_PASS {
            return Err(TunerError::Rejected(out.ret));
        }
        Ok(out.answers.iter().map(|slot| slot.result).collect())
    }
}

/// A fraction in parts per million, saturating (NaN reads as 0).
fn ppm(x: f64) -> u32 {
    (x * 1e6).round().clamp(0.0, u32::MAX as f64) as u32
}
