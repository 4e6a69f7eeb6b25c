//! Adaptive windows (issue 3): the pure, deterministic controller that scales each client's
//! window and allowance with its traffic pattern and with the system's load.
//!
//! Nothing here touches a map, a clock or a thread: the caller runs [`Controller::step`] once per
//! *period* (its choice, e.g. 1 s) with the period's CPU load and the clients it saw, and writes
//! the returned decisions wherever they go. Every knob counted in periods counts `step` calls.
//!
//! # Quantities
//!
//! A policy's `limit` L per `window` w defines the client's long-run rate `r = L / w`. The
//! controller keeps a per-client scale `s ∈ [min_scale, max_scale]` and a global load factor
//! `g ∈ [min_load_factor, 1]`, and the datapath enforces
//!
//! ```text
//! W = s · w              (effective window)
//! A = L · s · g          (effective allowance per W)     so   A / W = r · g
//! ```
//!
//! With `g = 1` the long-run rate stays `r` whatever `s` is: a larger `s` only tolerates larger
//! bursts, a smaller one smooths them. `W` is rounded to whole microseconds and clamped to the
//! datapath's 10 ms to 1 h; `A` is computed from the scale `W / w` actually used, rounded, and at
//! least 1 (a limited client is never turned into a blocked one).
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
//!
//! # Stability
//!
//! * Inputs are smoothed (EWMA with `alpha`; `alpha = 1` turns smoothing off).
//! * A *step* moves a quantity (`s`, `g`, `p`) by at most the factor `step` toward its target and
//!   never past it: `x ← min(x·step, t)` or `max(x/step, t)`. A target `k` steps away is reached
//!   in `⌈ln(t/x) / ln(step)⌉` periods, monotonically, without overshoot. (`s` and `g` each move
//!   at most one step per period, so `A` moves by at most `step²` and `W` by `step`.)
//! * **Dwell.** `s` and `g` remember the direction of their last move. A move in the opposite
//!   direction happens only once it has been demanded for `dwell` consecutive periods (a period
//!   demanding the old direction, or no move, restarts the count). Direction changes are
//!   therefore at least `dwell` periods apart, and a load whose band flips faster than that
//!   never reverses `g` or `s`. The first move has no dwell.
//! * **Convergence.** After a step in the input, a quantity reaches its new target `t` from `x`
//!   monotonically within `lag + dwell + ⌈|ln(t/x)| / ln(step)⌉` periods, where `lag` is the
//!   periods the EWMA needs to cross the band (for `s` after a pattern change, the band of `û`).
//!
//! # Cost and forgetting
//!
//! A `step` costs O(clients observed in it), amortised: per-client state lives in a `HashMap`,
//! only changed decisions are returned, and clients unseen for `idle_periods` are forgotten
//! through a timing wheel, each client sitting in exactly one slot. A period in which a client
//! is not observed leaves its state untouched (it counts neither as calm nor as busy); callers
//! that want silence to count as zero utilisation pass such clients with rate 0.
//!
//! # Fairness
//!
//! [`fair_shares`] divides an admitted capacity (e.g. `g · Σ r` over active clients) among
//! clients by weighted max-min water-filling. It is independent of the controller: how its
//! shares `fᵢ` combine with `A` (e.g. capping a client at `min(A, fᵢ · W)` under overload) is
//! the wiring's choice.

use std::collections::HashMap;

use limiter_common::{
    addr::ClientKey,
    window::{MAX_WINDOW_US, MIN_WINDOW_US},
};
use serde::Deserialize;

/// The `adaptive` knobs. Every field has a default; `enabled: false` (the default) pins
/// `s = g = 1`. Unknown keys are errors. With the defaults spelled out:
///
/// ```yaml
/// enabled: true
/// min_scale: 0.25          # s ∈ [min_scale, max_scale]
/// max_scale: 4
/// min_load_factor: 0.5     # g ∈ [min_load_factor, 1]
/// step: 1.25               # at most ×/÷ step per period
/// alpha: 0.3               # EWMA weight of the newest sample
/// dwell: 3                 # periods a reversal must be demanded
/// idle_periods: 30         # forget clients unseen this long
/// grow_below: 0.5          # û below this for grow_after periods: p grows
/// grow_after: 5
/// shrink_above: 0.8        # û above this: p shrinks toward 1
/// load: { high: 0.85, low: 0.60 }
/// ```
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AdaptiveConfig {
    pub enabled: bool,
    /// Lowest per-client scale `s` (≤ 1, > 0).
    pub min_scale: f64,
    /// Highest per-client scale `s` (≥ 1).
    pub max_scale: f64,
    /// Floor of the global load factor `g`, in (0, 1].
    pub min_load_factor: f64,
    /// Largest factor by which `s`, `g` or `p` moves in one period (> 1).
    pub step: f64,
    /// EWMA weight of the newest sample, in (0, 1].
    pub alpha: f64,
    /// Periods a reversal of `s` or `g` must be demanded before it happens (≥ 1).
    pub dwell: u32,
    /// Periods after which an unseen client's state is forgotten (≥ 1).
    pub idle_periods: u32,
    /// Smoothed utilisation below which a period counts as calm.
    pub grow_below: f64,
    /// Consecutive calm periods before `p` grows.
    pub grow_after: u32,
    /// Smoothed utilisation above which `p` shrinks toward 1.
    pub shrink_above: f64,
    pub load: LoadBands,
}

/// CPU-utilisation hysteresis band, fractions of 1.
#[derive(Debug, Clone, Copy, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LoadBands {
    /// Above this (smoothed) everyone tightens.
    pub high: f64,
    /// Below this everyone relaxes.
    pub low: f64,
}

impl Default for LoadBands {
    fn default() -> Self {
        LoadBands {
            high: 0.85,
            low: 0.60,
        }
    }
}

impl Default for AdaptiveConfig {
    fn default() -> Self {
        AdaptiveConfig {
            enabled: false,
            min_scale: 0.25,
            max_scale: 4.0,
            min_load_factor: 0.5,
            step: 1.25,
            alpha: 0.3,
            dwell: 3,
            idle_periods: 30,
            grow_below: 0.5,
            grow_after: 5,
            shrink_above: 0.8,
            load: LoadBands::default(),
        }
    }
}

/// A knob out of range: names the field and the constraint it breaks.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("{field} must be {constraint}, got {value}")]
pub struct AdaptiveError {
    pub field: &'static str,
    pub constraint: String,
    pub value: f64,
}

impl AdaptiveConfig {
    /// Checks every knob; the first one out of range is the error.
    pub fn validate(&self) -> Result<(), AdaptiveError> {
        let c = self;
        let unit = |x: f64| x > 0.0 && x <= 1.0; // false for NaN
        let finite_above = |x: f64, lo: f64| x.is_finite() && x > lo;
        ensure(unit(c.min_scale), "min_scale", c.min_scale, "in (0, 1]")?;
        let max_ok = c.max_scale.is_finite() && c.max_scale >= 1.0;
        ensure(max_ok, "max_scale", c.max_scale, ">= 1 and finite")?;
        let floor = c.min_load_factor;
        ensure(unit(floor), "min_load_factor", floor, "in (0, 1]")?;
        ensure(finite_above(c.step, 1.0), "step", c.step, "> 1 and finite")?;
        ensure(unit(c.alpha), "alpha", c.alpha, "in (0, 1]")?;
        ensure(c.dwell >= 1, "dwell", c.dwell.into(), ">= 1")?;
        let idle = c.idle_periods;
        ensure(idle >= 1, "idle_periods", idle.into(), ">= 1")?;
        ensure(c.grow_after >= 1, "grow_after", c.grow_after.into(), ">= 1")?;
        let grow_ok = c.grow_below.is_finite() && c.grow_below >= 0.0;
        ensure(grow_ok, "grow_below", c.grow_below, ">= 0 and finite")?;
        ensure(
            finite_above(c.shrink_above, c.grow_below),
            "shrink_above",
            c.shrink_above,
            format!("> grow_below ({}) and finite", c.grow_below),
        )?;
        ensure(unit(c.load.high), "load.high", c.load.high, "in (0, 1]")?;
        ensure(
            c.load.low >= 0.0 && c.load.low < c.load.high,
            "load.low",
            c.load.low,
            format!(">= 0 and < load.high ({})", c.load.high),
        )
    }
}

fn ensure(
    ok: bool,
    field: &'static str,
    value: f64,
    constraint: impl Into<String>,
) -> Result<(), AdaptiveError> {
    if ok {
        return Ok(());
    }
    Err(AdaptiveError {
        field,
        constraint: constraint.into(),
        value,
    })
}

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
    /// The policy's `window`, µs. A changed `(limit, window)` starts the client afresh.
    pub window_us: u32,
    /// Offered rate over the period, packets per second (passed plus dropped).
    pub rate: f64,
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
    /// The global load factor `g` now in force.
    pub load_factor: f64,
    /// Observed clients whose `(W, A)` changed; unchanged ones are left out. A change of `g`
    /// reaches a client's `A` when it is next observed: idle clients keep what they were given.
    pub decisions: Vec<ClientDecision>,
    /// Clients forgotten this period: the datapath should return them to their policy
    /// (`s = g = 1`).
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

#[derive(Debug, Clone)]
struct ClientState {
    limit: u32,
    window_us: u32,
    util: f64,
    calm: u32,
    /// Pattern-driven scale `p`.
    pattern: f64,
    scale: Guarded,
    /// `(W, A)` the datapath holds.
    emitted: (u32, u32),
    last_seen: u64,
}

impl ClientState {
    fn new(obs: &ClientObservation, util: f64, now: u64) -> Self {
        ClientState {
            limit: obs.limit,
            window_us: obs.window_us,
            util,
            calm: 0,
            pattern: 1.0,
            scale: Guarded::new(1.0),
            emitted: (obs.window_us, obs.limit),
            last_seen: now,
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
    clients: HashMap<ClientKey, ClientState>,
    /// Timing wheel of `idle_periods + 1` slots: slot `t % len` holds the clients to check for
    /// expiry at period `t`.
    wheel: Vec<Vec<ClientKey>>,
}

impl Controller {
    /// A controller with no history (`s = g = 1` everywhere).
    pub fn new(config: AdaptiveConfig) -> Result<Self, AdaptiveError> {
        config.validate()?;
        let slots = config.idle_periods as usize + 1;
        Ok(Controller {
            config,
            period: 0,
            load: None,
            factor: Guarded::new(1.0),
            clients: HashMap::new(),
            wheel: vec![Vec::new(); slots],
        })
    }

    pub fn config(&self) -> &AdaptiveConfig {
        &self.config
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

    /// Runs one period. Costs O(observed clients), amortised.
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
        let mut decisions = Vec::new();
        for obs in clients {
            if let Some(decision) = self.observe(&obs, band) {
                decisions.push(decision);
            }
        }
        StepOutput {
            load: self.load.unwrap_or(0.0),
            band,
            load_factor: self.factor.value,
            decisions,
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

    /// Updates one client; returns its decision if its `(W, A)` changed.
    fn observe(&mut self, obs: &ClientObservation, band: Band) -> Option<ClientDecision> {
        if obs.limit == 0 || obs.window_us == 0 {
            return None;
        }
        let c = &self.config;
        let now = self.period;
        let util = obs.rate.max(0.0) * obs.window_us as f64 / (obs.limit as f64 * 1e6);
        let fresh = match self.clients.get(&obs.key) {
            // Seen twice in one period: the first observation counts.
            Some(s) if s.last_seen == now => return None,
            Some(s) => (s.limit, s.window_us) != (obs.limit, obs.window_us),
            None => {
                let slot = (now + c.idle_periods as u64) as usize % self.wheel.len();
                self.wheel[slot].push(obs.key);
                true
            }
        };
        if fresh {
            let state = ClientState::new(obs, util, now);
            self.clients.insert(obs.key, state);
        }
        let state = self.clients.get_mut(&obs.key).expect("inserted above");
        if !fresh {
            state.util = ewma(Some(state.util), util, c.alpha);
        }
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
            Band::Overloaded => c.min_scale,
            Band::Relaxed => state.pattern,
            Band::Steady => state.scale.value.min(state.pattern),
        };
        state.scale.drive(target, c.step, c.dwell);
        let effective = effective(
            obs.limit,
            obs.window_us,
            state.scale.value,
            self.factor.value,
        );
        if effective == state.emitted {
            return None;
        }
        state.emitted = effective;
        Some(ClientDecision {
            key: obs.key,
            scale: state.scale.value,
            window_us: effective.0,
            allowance: effective.1,
        })
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

/// `(W, A)` for a policy of `limit` per `window_us`, scale `s` and load factor `g`: `W` rounded
/// and clamped to the datapath's window range, `A = L · (W / w) · g` rounded, at least 1.
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
    // Fill in order of demand per unit weight: the least demanding saturate first.
    let ratio = |i: usize| demand(&clients[i]) / weight(&clients[i]);
    let mut order: Vec<usize> = (0..clients.len()).collect();
    order.sort_by(|&a, &b| ratio(a).total_cmp(&ratio(b)));
    let (mut left, mut weights) = (capacity, clients.iter().map(weight).sum::<f64>());
    let mut shares: Vec<f64> = clients.iter().map(demand).collect();
    for (n, &i) in order.iter().enumerate() {
        if ratio(i) > left / weights {
            // Everyone from here on asks for more than the level: cut them to it.
            let level = left / weights;
            for &j in &order[n..] {
                shares[j] = weight(&clients[j]) * level;
            }
            break;
        }
        left -= demand(&clients[i]);
        weights -= weight(&clients[i]);
    }
    shares
}
