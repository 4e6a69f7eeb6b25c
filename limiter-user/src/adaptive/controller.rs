//! Adaptive windows (issue 3): the pure, deterministic controller that scales each client's
//! window and allowance with its traffic pattern and with the system's load, and shares the
//! admitted capacity among clients by weighted max-min fairness under overload.
//!
//! Nothing here touches a map, a clock or a thread: the caller runs [`Controller::step`] once per
//! *period* ([`AdaptiveConfig::period`], e.g. 1 s; the controller never reads it) with the
//! period's CPU load and the clients it saw, and writes the returned decisions wherever they go.
//! Every knob counted in periods (`dwell`, `idle_periods`, `grow_after`) counts `step` calls.
//!
//! # Quantities
//!
//! A policy's `limit` L per `window` w defines the client's long-run rate `r = L / w`, and its
//! `weight` its claim under overload. The controller keeps a per-client scale
//! `s ∈ [min_scale, max_scale]`, a global load factor `g ∈ [min_load_factor, 1]` and a
//! per-client fairness factor `gᵢ ∈ (0, 1]`, and the datapath enforces
//!
//! ```text
//! W = s · w                    (effective window)
//! A = L · (W / w) · gᵢ         (effective allowance per W)     so   A / W = r · gᵢ
//! ```
//!
//! With `gᵢ = 1` the long-run rate stays `r` whatever `s` is: a larger `s` only tolerates larger
//! bursts, a smaller one smooths them. `W` is rounded to whole microseconds and clamped to the
//! datapath's 10 ms to 1 h; `A` is computed from the scale `W / w` actually used, rounded, and at
//! least 1 (a limited client is never turned into a blocked one). See [`effective`].
//!
//! # One period
//!
//! 1. **Load.** The CPU utilisation `c ∈ [0, 1]` is smoothed, `ĉ ← α·c + (1 − α)·ĉ` (the first
//!    sample initialises `ĉ`), and classified: [`Band::Overloaded`] if `ĉ > load.high`,
//!    [`Band::Relaxed`] if `ĉ < load.low`, [`Band::Steady`] in between (the hysteresis band).
//! 2. **Global factor.** Overloaded: `g` steps toward `min_load_factor`; relaxed: toward 1;
//!    steady: `g` holds.
//! 3. **Pattern**, per observed client: utilisation `u = rate / r` (offered rate: passed plus
//!    dropped, since the passed rate is capped by the limit and would hide demand), smoothed
//!    `û ← α·u + (1 − α)·û`. `calm` counts consecutive observed periods with `û < grow_below`.
//!    The client's pattern scale `p ∈ [1, max_scale]` grows one step per period once
//!    `calm ≥ grow_after`, shrinks one step per period toward 1 while `û > shrink_above`, and
//!    holds otherwise (`grow_below < shrink_above` is a hysteresis band).
//! 4. **Scale**, per observed client, steps toward a target that depends on the load band:
//!    overloaded `min_scale`; relaxed `p`; steady `min(s, p)` (nothing loosens, but a client
//!    whose pattern shrank still tightens).
//! 5. **Fairness factor**, once steps 3 and 4 are done for every client observed in the period
//!    (the set `O`), per client `i ∈ O` with `rᵢ = Lᵢ / wᵢ`:
//!
//!    ```text
//!    C  = g · Σ_{j ∈ O} r_j                      (admitted capacity)
//!    dᵢ = min(ûᵢ · rᵢ, rᵢ)                       (demand)
//!    fᵢ = fair_shares({(d_j, weight_j) : j ∈ O}, C)ᵢ      (only when g < 1)
//!    tᵢ = 1                 if g = 1, or if fᵢ ≥ dᵢ (not cut)
//!    tᵢ = fᵢ / rᵢ           otherwise (cut; < 1)
//!    tᵢ ← max(tᵢ, min(g, wᵢ / (Lᵢ · Wᵢ)))
//!    ```
//!
//!    and `gᵢ` steps toward `tᵢ` (see *Stability*). The last line is a floor that never changes
//!    `A`: below `w / (L · W)` the allowance is already its minimum of 1 packet, so a lower `gᵢ`
//!    would only delay the client's recovery (and a client of weight ~0, whose share is ~0,
//!    could never come back). `W` there is the client's effective window after step 4.
//! 6. **Decisions.** Each observed client's `(W, A) = effective(L, w, s, gᵢ)`; those that differ
//!    from what it was last given are returned.
//!
//! # Fairness
//!
//! Under overload (`g < 1`) the global factor no longer cuts everyone alike: it only sets the
//! capacity `C = g · Σ r` admitted for the clients observed in the period, and [`fair_shares`]
//! divides `C` by weighted max-min water-filling over their demands `dᵢ`. A client whose demand
//! is below the water level (`fᵢ ≥ dᵢ`) is not cut at all: its target `tᵢ` is 1, so it keeps its
//! traffic, bursts up to its policy included. Only the clients above the level are cut, each to
//! `A / W = fᵢ` (its share), so that the cut clients together get `C − Σ_{not cut} dᵢ`. With
//! `g = 1` nobody is cut.
//!
//! * `gᵢ` is not bounded by `min_load_factor`: a client whose policy is larger than the others'
//!   (a larger `rᵢ` for the same weight) can be cut further than `g`, since its share is bounded
//!   by the water level, not by its own rate. It stays above 0 (and above the floor of step 5).
//! * With equal policies and weights and every observed client heavy (`ûᵢ > g`), the water level
//!   is `g · r`, so `tᵢ = g` for everyone, and a client tracked since `g` was last 1 has
//!   `gᵢ = g` after every period (the global behaviour, `A / W = r · g`).
//! * Demands use the smoothed `û`, so one burst does not take capacity from the others.
//!
//! # Stability
//!
//! * Inputs are smoothed (EWMA with `alpha`; `alpha = 1` turns smoothing off).
//! * A *step* moves a quantity (`s`, `g`, `gᵢ`, `p`) by at most the factor `step` toward its
//!   target and never past it: `x ← min(x·step, t)` or `max(x/step, t)`. A target `k` steps away
//!   is reached in `⌈ln(t/x) / ln(step)⌉` periods, monotonically, without overshoot. (`s` and
//!   `gᵢ` each move at most one step per period, so `A` moves by at most `step²` and `W` by
//!   `step`.)
//! * **Dwell.** `s`, `g` and `gᵢ` remember the direction of their last move. A move in the
//!   opposite direction happens only once it has been demanded for `dwell` consecutive periods
//!   (a period demanding the old direction, or no move, restarts the count). Direction changes
//!   are therefore at least `dwell` periods apart, and a load whose band flips faster than that
//!   never reverses `g` or `s`. The first move has no dwell. One exception, so that `gᵢ` follows
//!   `g` rather than lagging it by a second dwell: a reversal of `gᵢ` in the direction `g` moved
//!   in the same period (compared with the end of the previous period) needs no dwell of its own,
//!   `g`'s dwell having already been served.
//! * **Convergence.** After a step in the input, a quantity reaches its new target `t` from `x`
//!   monotonically within `lag + dwell + ⌈|ln(t/x)| / ln(step)⌉` periods, where `lag` is the
//!   periods the EWMA needs to cross the band (for `s` after a pattern change, the band of `û`).
//!
//! # Cost and forgetting
//!
//! A `step` costs O(n log n) for the n clients observed in it, amortised (the log is the sort
//! of [`fair_shares`], only under overload): per-client state lives in a `HashMap`, only changed
//! decisions are returned, and clients unseen for `idle_periods` are forgotten through a timing
//! wheel, each client sitting in exactly one slot. A period in which a client is not observed
//! leaves its state untouched (it counts neither as calm nor as busy, and takes no share of the
//! capacity); callers that want silence to count as zero utilisation pass such clients with
//! rate 0.
//!
//! # Reload
//!
//! [`Controller::set_config`] swaps the knobs in place: state is kept and clamped into the new
//! ranges, or dropped when the new configuration is disabled. [`Controller::desired`] tells what
//! the controller wants a tracked client to hold, for rewriting entries a reload reset.

use std::collections::{HashMap, hash_map::Entry};

use crate::config::{AdaptiveConfig, AdaptiveError};
use limiter_common::{
    addr::ClientKey,
    window::{MAX_WINDOW_US, MIN_WINDOW_US},
};

/// One period's system input.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct LoadSample {
    /// CPU utilisation over the period, 0 to 1 (clamped; NaN keeps the previous smoothed value).
    pub cpu: f64,
}

/// One client as seen during a period.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ClientObservation {
    pub key: ClientKey,
    /// The policy's `limit` (a client with limit 0 is blocked and skipped).
    pub limit: u32,
    /// The policy's `window`, µs. A changed `(limit, window)` starts the client afresh (for a
    /// `fixed_window` client, only a changed window: its limit is a cold share, which follows
    /// the cluster's member count).
    pub window_us: u32,
    /// Offered rate over the period, packets per second (passed plus dropped).
    pub rate: f64,
    /// The policy's `weight` (1 for equal treatment): the client's claim on the capacity under
    /// overload. Not positive or not finite counts as the smallest positive weight, as in
    /// [`fair_shares`].
    pub weight: f64,
    /// The window stays the policy's: `s` is held at 1 and only `gᵢ` moves (a global policy's
    /// client, whose window every member of the cluster counts alike; see
    /// [`super::global`]).
    pub fixed_window: bool,
}

/// What the datapath should enforce for one client from now on.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ClientDecision {
    pub key: ClientKey,
    /// The scale `s`.
    pub scale: f64,
    /// Effective window `W`, µs.
    pub window_us: u32,
    /// Effective allowance `A` per `W`.
    pub allowance: u32,
    /// The client's fairness factor `gᵢ`: `(W, A) = effective(L, w, s, gᵢ)`.
    pub load_factor: f64,
}

/// The load band of a period (see the module docs).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Band {
    Relaxed,
    Steady,
    Overloaded,
}

/// The result of one [`Controller::step`].
#[derive(Debug, Clone, PartialEq)]
pub struct StepOutput {
    /// Smoothed CPU utilisation.
    pub load: f64,
    pub band: Band,
    /// The global load factor `g` now in force (it sets the capacity; each client's own factor
    /// is its decision's `load_factor`).
    pub load_factor: f64,
    /// Observed clients whose `(W, A)` changed; unchanged ones are left out. A change of `g`
    /// reaches a client's `A` when it is next observed: idle clients keep what they were given.
    pub decisions: Vec<ClientDecision>,
    /// Every client observed this period and what it is to hold now ([`Controller::desired`]
    /// of each, changed or not), in the order given; observations skipped (a blocked client,
    /// a second observation) are left out.
    pub observed: Vec<ClientDecision>,
    /// Clients forgotten this period: the datapath should return them to their policy
    /// (`s = gᵢ = 1`).
    pub forgotten: Vec<ClientKey>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Dir {
    Up,
    Down,
}

/// A quantity that moves by bounded steps and reverses only after `dwell` periods of demand.
#[derive(Debug, Clone, Copy)]
struct Guarded {
    value: f64,
    last: Option<Dir>,
    /// Consecutive periods a move against `last` has been demanded.
    opposing: u32,
}

impl Guarded {
    fn new(value: f64) -> Self {
        Guarded {
            value,
            last: None,
            opposing: 0,
        }
    }

    /// One period: moves one step toward `target` unless the move would reverse the last one
    /// and has not yet been demanded for `dwell` consecutive periods.
    fn drive(&mut self, target: f64, step: f64, dwell: u32) {
        let dir = match target {
            t if t > self.value => Dir::Up,
            t if t < self.value => Dir::Down,
            _ => {
                self.opposing = 0;
                return;
            }
        };
        if self.last.is_some_and(|last| last != dir) {
            self.opposing += 1;
            if self.opposing < dwell {
                return;
            }
        }
        self.value = step_toward(self.value, target, step);
        self.last = Some(dir);
        self.opposing = 0;
    }

    /// Puts the value into `[lo, hi]`, keeping the direction memory.
    fn clamp(&mut self, lo: f64, hi: f64) {
        self.value = self.value.clamp(lo, hi);
    }
}

/// `x` moved by at most the factor `step` toward `target`, never past it.
pub fn step_toward(x: f64, target: f64, step: f64) -> f64 {
    if target > x {
        (x * step).min(target)
    } else {
        (x / step).max(target)
    }
}

/// Exponentially weighted moving average: `alpha` is the newest sample's weight.
fn ewma(prev: Option<f64>, sample: f64, alpha: f64) -> f64 {
    prev.map_or(sample, |p| alpha * sample + (1.0 - alpha) * p)
}

/// What an observed client brings to the period's share-out (pass 2), as pass 1 left it.
#[derive(Debug, Clone, Copy)]
struct Claim {
    /// `dᵢ = min(ûᵢ, 1) · rᵢ`.
    demand: f64,
    weight: f64,
    /// The policy's `rᵢ = Lᵢ / wᵢ`.
    rate: f64,
    limit: u32,
    window_us: u32,
    /// `s` after pass 1.
    scale: f64,
}

#[derive(Debug, Clone)]
struct ClientTrack {
    limit: u32,
    window_us: u32,
    /// The weight of the last observation.
    weight: f64,
    /// `s` is held at 1 ([`ClientObservation::fixed_window`]).
    fixed_window: bool,
    /// Smoothed utilisation `û`.
    util: f64,
    calm: u32,
    /// Pattern-driven scale `p`.
    pattern: f64,
    scale: Guarded,
    /// Fairness factor `gᵢ`.
    factor: Guarded,
    /// `(W, A)` the datapath holds.
    emitted: (u32, u32),
    last_seen: u64,
}

impl ClientTrack {
    fn new(obs: &ClientObservation, util: f64, now: u64) -> Self {
        ClientTrack {
            limit: obs.limit,
            window_us: obs.window_us,
            weight: obs.weight,
            fixed_window: obs.fixed_window,
            util,
            calm: 0,
            pattern: 1.0,
            scale: Guarded::new(1.0),
            factor: Guarded::new(1.0),
            emitted: (obs.window_us, obs.limit),
            last_seen: now,
        }
    }

    /// The policy's long-run rate `r = L / w`, packets per second.
    fn rate(&self) -> f64 {
        self.limit as f64 * 1e6 / self.window_us as f64
    }

    /// `effective(L, w, s, gᵢ)`.
    fn effective(&self) -> (u32, u32) {
        effective(
            self.limit,
            self.window_us,
            self.scale.value,
            self.factor.value,
        )
    }

    fn decision(&self, key: ClientKey) -> ClientDecision {
        let (window_us, allowance) = self.effective();
        ClientDecision {
            key,
            scale: self.scale.value,
            window_us,
            allowance,
            load_factor: self.factor.value,
        }
    }
}

/// The adaptive-window controller. See the module docs for the exact semantics.
#[derive(Debug)]
pub struct Controller {
    config: AdaptiveConfig,
    period: u64,
    load: Option<f64>,
    factor: Guarded,
    /// `g` at the end of the previous period (for the dwell exception of `gᵢ`).
    last_factor: f64,
    clients: HashMap<ClientKey, ClientTrack>,
    /// Timing wheel of `idle_periods + 1` slots: slot `t % len` holds the clients to check for
    /// expiry at period `t`.
    wheel: Vec<Vec<ClientKey>>,
}

impl Controller {
    /// A controller with no history (`s = g = gᵢ = 1` everywhere).
    pub fn new(config: AdaptiveConfig) -> Result<Self, AdaptiveError> {
        config.validate()?;
        let slots = config.idle_periods as usize + 1;
        Ok(Controller {
            config,
            period: 0,
            load: None,
            factor: Guarded::new(1.0),
            last_factor: 1.0,
            clients: HashMap::new(),
            wheel: vec![Vec::new(); slots],
        })
    }

    pub fn config(&self) -> &AdaptiveConfig {
        &self.config
    }

    /// Replaces the knobs (hot reload). An invalid `config` is an error and changes nothing.
    ///
    /// * `enabled: false`: every client's state is dropped, the load history too, `g` is back
    ///   to 1, and every previously tracked key is returned (sorted) so that the caller returns
    ///   them to their policy.
    /// * Otherwise client state is kept: each `s` is clamped into `[min_scale, max_scale]`, each
    ///   `p` into `[1, max_scale]`, each `gᵢ` into `(0, 1]` (its range does not depend on the
    ///   knobs: it moves toward its new target by bounded steps from the next period), and `g`
    ///   into `[min_load_factor, 1]`. If `idle_periods` changed, the timing wheel is rebuilt and
    ///   every client refiled to expire `idle_periods` (new) after it was last seen, or at the
    ///   next period if that is already past. Returns an empty vector.
    ///
    /// Clamped values reach the datapath when the client is next observed; [`Self::desired`]
    /// tells them at once.
    pub fn set_config(&mut self, config: AdaptiveConfig) -> Result<Vec<ClientKey>, AdaptiveError> {
        config.validate()?;
        let resize = config.idle_periods != self.config.idle_periods;
        if !config.enabled {
            let mut keys: Vec<ClientKey> = self.clients.drain().map(|(k, _)| k).collect();
            keys.sort_unstable();
            self.wheel = vec![Vec::new(); config.idle_periods as usize + 1];
            self.load = None;
            self.factor = Guarded::new(1.0);
            self.last_factor = 1.0;
            self.config = config;
            return Ok(keys);
        }
        let c = &config;
        for state in self.clients.values_mut() {
            state.scale.clamp(c.min_scale, c.max_scale);
            state.pattern = state.pattern.clamp(1.0, c.max_scale);
            state.factor.clamp(f64::MIN_POSITIVE, 1.0);
        }
        self.factor.clamp(c.min_load_factor, 1.0);
        if resize {
            self.rebuild_wheel(c.idle_periods);
        }
        self.config = config;
        Ok(Vec::new())
    }

    /// Refiles every tracked client in a new wheel for `idle` periods, in the order the old
    /// wheel would have come due (deterministic).
    fn rebuild_wheel(&mut self, idle: u32) {
        let old = std::mem::take(&mut self.wheel);
        let len = idle as usize + 1;
        self.wheel = vec![Vec::new(); len];
        let next = self.period + 1;
        let order = (0..old.len()).map(|k| (next as usize + k) % old.len());
        for slot in order {
            for &key in &old[slot] {
                let Some(state) = self.clients.get(&key) else {
                    continue;
                };
                let due = (state.last_seen + idle as u64).max(next);
                self.wheel[due as usize % len].push(key);
            }
        }
    }

    /// The global load factor `g`.
    pub fn load_factor(&self) -> f64 {
        self.factor.value
    }

    /// Clients with state (seen within `idle_periods`).
    pub fn tracked(&self) -> usize {
        self.clients.len()
    }

    /// The scale `s` of a tracked client.
    pub fn scale(&self, key: &ClientKey) -> Option<f64> {
        self.clients.get(key).map(|c| c.scale.value)
    }

    /// The smoothed utilisation `û` (offered rate / r) of a tracked client.
    pub fn utilisation(&self, key: &ClientKey) -> Option<f64> {
        self.clients.get(key).map(|c| c.util)
    }

    /// What the controller currently wants a tracked client to hold: its `s`, `gᵢ` and
    /// `(W, A) = effective(L, w, s, gᵢ)`. Equal to the client's last decision unless a
    /// [`Self::set_config`] clamped it since.
    pub fn desired(&self, key: &ClientKey) -> Option<ClientDecision> {
        self.clients.get(key).map(|c| c.decision(*key))
    }

    /// Runs one period. Costs O(n log n) for the n observed clients, amortised.
    pub fn step(
        &mut self,
        sample: &LoadSample,
        clients: impl IntoIterator<Item = ClientObservation>,
    ) -> StepOutput {
        self.period += 1;
        if !self.config.enabled {
            return StepOutput {
                load: sample.cpu,
                band: Band::Steady,
                load_factor: 1.0,
                decisions: Vec::new(),
                observed: Vec::new(),
                forgotten: Vec::new(),
            };
        }
        let band = self.update_load(sample.cpu);
        let c = &self.config;
        let factor_target = match band {
            Band::Overloaded => c.min_load_factor,
            Band::Relaxed => 1.0,
            Band::Steady => self.factor.value,
        };
        self.factor.drive(factor_target, c.step, c.dwell);
        // Pass 1: each client's utilisation, pattern and scale, and what it claims.
        let observed: Vec<(ClientKey, Claim)> = clients
            .into_iter()
            .filter_map(|obs| Some((obs.key, self.observe(&obs, band)?)))
            .collect();
        // Pass 2: the capacity, each client's share and factor, the decisions.
        let targets = self.fair_targets(&observed);
        let g = self.factor.value;
        let g_moved = direction(self.last_factor, g);
        self.last_factor = g;
        let (step, dwell) = (self.config.step, self.config.dwell);
        let mut decisions = Vec::new();
        let mut all = Vec::with_capacity(observed.len());
        for ((key, _), target) in observed.iter().zip(targets) {
            #[expect(
                clippy::expect_used,
                reason = "every observed key was tracked by `observe` earlier this period"
            )]
            let state = self.clients.get_mut(key).expect("observed this period");
            let dwell = match direction(state.factor.value, target) {
                Some(dir) if Some(dir) == g_moved => 1,
                _ => dwell,
            };
            state.factor.drive(target, step, dwell);
            let decision = state.decision(*key);
            let effective = (decision.window_us, decision.allowance);
            if effective != state.emitted {
                state.emitted = effective;
                decisions.push(decision);
            }
            all.push(decision);
        }
        StepOutput {
            load: self.load.unwrap_or(0.0),
            band,
            load_factor: g,
            decisions,
            observed: all,
            forgotten: self.expire(),
        }
    }

    fn update_load(&mut self, cpu: f64) -> Band {
        if !cpu.is_nan() {
            self.load = Some(ewma(self.load, cpu.clamp(0.0, 1.0), self.config.alpha));
        }
        match self.load {
            Some(l) if l > self.config.load.high => Band::Overloaded,
            Some(l) if l < self.config.load.low => Band::Relaxed,
            _ => Band::Steady,
        }
    }

    /// Pass 1 for one client: its utilisation, pattern and scale; returns what it claims for
    /// pass 2. `None` if the observation is skipped (blocked client, or already observed this
    /// period).
    fn observe(&mut self, obs: &ClientObservation, band: Band) -> Option<Claim> {
        if obs.limit == 0 || obs.window_us == 0 {
            return None;
        }
        let c = &self.config;
        let now = self.period;
        let util = obs.rate.max(0.0) * obs.window_us as f64 / (obs.limit as f64 * 1e6);
        // One lookup: at 100k clients each is a cache miss.
        let (state, fresh) = match self.clients.entry(obs.key) {
            Entry::Occupied(entry) => {
                let s = entry.into_mut();
                // Seen twice in one period: the first observation counts.
                if s.last_seen == now {
                    return None;
                }
                // A global client whose cold share changed (the member count did) keeps its
                // state: starting it afresh would lift an overloaded node's caps at every
                // membership change.
                let kept = s.fixed_window && obs.fixed_window && s.window_us == obs.window_us;
                let fresh = !kept
                    && (s.limit, s.window_us, s.fixed_window)
                        != (obs.limit, obs.window_us, obs.fixed_window);
                if fresh {
                    *s = ClientTrack::new(obs, util, now);
                }
                (s, fresh)
            }
            Entry::Vacant(entry) => {
                let slot = (now + c.idle_periods as u64) as usize % self.wheel.len();
                self.wheel[slot].push(obs.key);
                (entry.insert(ClientTrack::new(obs, util, now)), true)
            }
        };
        if !fresh {
            state.util = ewma(Some(state.util), util, c.alpha);
            state.limit = obs.limit;
        }
        state.weight = obs.weight;
        state.last_seen = now;
        state.calm = if state.util < c.grow_below {
            state.calm + 1
        } else {
            0
        };
        if state.calm >= c.grow_after {
            state.pattern = step_toward(state.pattern, c.max_scale, c.step);
        } else if state.util > c.shrink_above {
            state.pattern = step_toward(state.pattern, 1.0, c.step);
        }
        let target = match band {
            _ if state.fixed_window => 1.0,
            Band::Overloaded => c.min_scale,
            Band::Relaxed => state.pattern,
            Band::Steady => state.scale.value.min(state.pattern),
        };
        state.scale.drive(target, c.step, c.dwell);
        Some(Claim {
            demand: state.util.min(1.0) * state.rate(),
            weight: state.weight,
            rate: state.rate(),
            limit: state.limit,
            window_us: state.window_us,
            scale: state.scale.value,
        })
    }

    /// The target `tᵢ` of each observed client's `gᵢ` (module docs, step 5), from what pass 1
    /// found (no lookup per client: at 100k clients each is a cache miss).
    fn fair_targets(&self, observed: &[(ClientKey, Claim)]) -> Vec<f64> {
        let g = self.factor.value;
        if g >= 1.0 {
            return vec![1.0; observed.len()];
        }
        let demands: Vec<FairDemand> = observed
            .iter()
            .map(|(_, c)| FairDemand {
                demand: c.demand,
                weight: c.weight,
            })
            .collect();
        let capacity = g * observed.iter().map(|(_, c)| c.rate).sum::<f64>();
        let shares = fair_shares(&demands, capacity);
        observed
            .iter()
            .zip(shares)
            .map(|((_, claim), share)| {
                if share >= claim.demand {
                    return 1.0;
                }
                // Below this gᵢ the allowance is 1 packet whatever gᵢ is.
                let (w, _) = effective(claim.limit, claim.window_us, claim.scale, 1.0);
                let floor = claim.window_us as f64 / (claim.limit as f64 * w as f64);
                (share / claim.rate).max(floor.min(g))
            })
            .collect()
    }

    /// Forgets the clients whose slot comes due and who stayed unseen; re-files the others.
    fn expire(&mut self) -> Vec<ClientKey> {
        let idle = self.config.idle_periods as u64;
        let len = self.wheel.len();
        let due = std::mem::take(&mut self.wheel[self.period as usize % len]);
        let mut forgotten = Vec::new();
        for key in due {
            let Some(state) = self.clients.get(&key) else {
                continue;
            };
            let expiry = state.last_seen + idle;
            if expiry <= self.period {
                self.clients.remove(&key);
                forgotten.push(key);
            } else {
                self.wheel[expiry as usize % len].push(key);
            }
        }
        forgotten
    }
}

/// The direction from `from` to `to`, if they differ.
fn direction(from: f64, to: f64) -> Option<Dir> {
    match to {
        t if t > from => Some(Dir::Up),
        t if t < from => Some(Dir::Down),
        _ => None,
    }
}

/// `(W, A)` for a policy of `limit` per `window_us`, scale `s` and factor `g` (a client's `gᵢ`):
/// `W` rounded and clamped to the datapath's window range, `A = L · (W / w) · g` rounded, at
/// least 1.
pub fn effective(limit: u32, window_us: u32, s: f64, g: f64) -> (u32, u32) {
    let w = (window_us as f64 * s)
        .round()
        .clamp(MIN_WINDOW_US as f64, MAX_WINDOW_US as f64) as u32;
    let used = w as f64 / window_us as f64;
    let a = (limit as f64 * used * g)
        .round()
        .clamp(1.0, u32::MAX as f64) as u32;
    (w, a)
}

/// One client's claim on a shared capacity.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct FairDemand {
    /// What the client would use (e.g. its offered rate), ≥ 0.
    pub demand: f64,
    /// Its weight, > 0 (1 for equal treatment).
    pub weight: f64,
}

/// Weighted max-min fair allowances of `capacity` among `clients`, by water-filling: the level
/// `λ` is found such that `Σ min(dᵢ, wᵢ·λ) = capacity`, and client `i` gets `min(dᵢ, wᵢ·λ)`.
/// Clients asking for less than their share `wᵢ·λ` keep their demand; the heaviest are cut to
/// their share. If the total demand fits, everyone gets their demand. Negative or NaN demands
/// count as 0; weights that are not positive and finite count as the smallest positive weight.
/// O(n log n).
pub fn fair_shares(clients: &[FairDemand], capacity: f64) -> Vec<f64> {
    let demand = |c: &FairDemand| c.demand.max(0.0);
    let weight = |c: &FairDemand| match c.weight {
        w if w.is_finite() && w > 0.0 => w,
        _ => f64::MIN_POSITIVE,
    };
    let capacity = capacity.max(0.0);
    if clients.iter().map(demand).sum::<f64>() <= capacity {
        return clients.iter().map(demand).collect();
    }
    // Fill in order of demand per unit weight: the least demanding saturate first. (Ties, e.g.
    // the infinite ratios of weights that count as the smallest positive one, by demand; then
    // in the order given: the sort is stable.) The keys are computed once, beside the index, so
    // that a comparison reads two adjacent records rather than divide and chase two indices
    // (that sort and a second lookup of each client took about a third of an overloaded period's
    // controller time at 100k clients).
    let mut keyed: Vec<(f64, f64, usize)> = clients
        .iter()
        .enumerate()
        .map(|(i, c)| (demand(c) / weight(c), demand(c), i))
        .collect();
    keyed.sort_by(|a, b| a.0.total_cmp(&b.0).then(a.1.total_cmp(&b.1)));
    let order: Vec<usize> = keyed.into_iter().map(|(_, _, i)| i).collect();
    // The weight of the clients from position n on, summed afresh rather than by subtracting
    // from the total (which would lose weights as small as `f64::MIN_POSITIVE`). The level
    // `left / rest[n]` is never formed: it overflows when `rest[n]` is that small.
    let mut rest = vec![0.0; order.len() + 1];
    for n in (0..order.len()).rev() {
        rest[n] = rest[n + 1] + weight(&clients[order[n]]);
    }
    let mut left = capacity;
    let mut shares: Vec<f64> = clients.iter().map(demand).collect();
    for (n, &i) in order.iter().enumerate() {
        let (d, w) = (demand(&clients[i]), weight(&clients[i]));
        if d * rest[n] > left.max(0.0) * w {
            // Everyone from here on asks for more than the level: cut them to it.
            for &j in &order[n..] {
                shares[j] = left.max(0.0) * (weight(&clients[j]) / rest[n]);
            }
            break;
        }
        left -= d;
    }
    shares
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `StepOutput::observed` is what `desired` says of each client observed, in the order
    /// given, with the skipped observations (a blocked client, a second one of a client) left
    /// out, across bands and periods (the tuner takes it instead of asking `desired`).
    #[test]
    fn observed_decisions_are_what_desired_says_in_order() {
        let mut ctl = Controller::new(AdaptiveConfig {
            enabled: true,
            ..AdaptiveConfig::default()
        })
        .expect("valid");
        let obs = |i: u8, limit, rate| ClientObservation {
            key: [i; 16],
            limit,
            window_us: 1_000_000,
            rate,
            weight: 1.0,
            fixed_window: i.is_multiple_of(3),
        };
        for (period, cpu) in [0.1, 0.95, 0.95, 0.95, 0.2, 0.5].into_iter().enumerate() {
            let observations = [
                obs(1, 100, 10.0 * period as f64),
                obs(2, 0, 50.0),
                obs(3, 40, 80.0),
                obs(1, 100, 1.0),
                obs(4, 10, 0.0),
                obs(6, 1000, 2000.0),
            ];
            let output = ctl.step(&LoadSample { cpu }, observations);
            let expected: Vec<ClientDecision> = [1u8, 3, 4, 6]
                .iter()
                .map(|&i| ctl.desired(&[i; 16]).expect("tracked"))
                .collect();
            assert_eq!(output.observed, expected, "period {period}");
            for d in &output.decisions {
                assert!(
                    output.observed.contains(d),
                    "a change is an observed decision"
                );
            }
        }
    }

    #[test]
    fn dwell_delays_reversals_and_one_waives_it() {
        let mut x = Guarded::new(1.0);
        x.drive(0.5, 1.25, 3);
        assert_eq!(x.value, 0.8);
        x.drive(1.0, 1.25, 3);
        x.drive(1.0, 1.25, 3);
        assert_eq!(x.value, 0.8, "two periods of demand are not enough");
        x.drive(1.0, 1.25, 3);
        assert_eq!(x.value, 1.0);
        x.drive(0.5, 1.25, 1);
        assert_eq!(x.value, 0.8, "dwell 1: reverses at once");
    }

    #[test]
    fn fair_shares_cuts_a_zero_weight_client_to_nothing() {
        let claim = |demand, weight| FairDemand { demand, weight };
        let shares = fair_shares(&[claim(100.0, 0.0), claim(100.0, 1.0)], 100.0);
        assert_eq!(shares, [0.0, 100.0]);
        let shares = fair_shares(&[claim(100.0, f64::NAN), claim(300.0, 1.0)], 100.0);
        assert!(shares[0] < 1e-300 && shares[1] == 100.0, "{shares:?}");
        // Only zero weights: the capacity is split among them as if equal.
        let shares = fair_shares(&[claim(100.0, 0.0), claim(100.0, -1.0)], 100.0);
        assert_eq!(shares, [50.0, 50.0]);
    }

    #[test]
    fn fair_targets_floor_where_the_allowance_is_one_packet() {
        // A limit of 2 per 1 s at s = 0.25 holds 0.5 packets at gᵢ = 1: any cut leaves A = 1.
        assert_eq!(effective(2, 1_000_000, 0.25, 1.0), (250_000, 1));
        assert_eq!(effective(2, 1_000_000, 0.25, 0.01), (250_000, 1));
        assert_eq!(effective(100, 1_000_000, 0.25, 0.04), (250_000, 1));
    }
}
