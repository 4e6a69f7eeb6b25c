//! The adaptive-window controller's simulated scenarios, shared by its tests
//! (`tests/tests/adaptive_sim.rs`) and its charts (`plot-adaptive`, [`crate::plot`]), so that what
//! the README shows is what the tests check. Every value comes from the real `Controller::step`;
//! no clock and no randomness: one loop iteration is one period.
//!
//! The controller's items are imported here only (and re-exported): if `limiter_user::adaptive`
//! moves, this is the one path to change.

pub use limiter_common::addr::{ClientKey, v4_mapped};
pub use limiter_user::{
    adaptive::{
        Band, ClientDecision, ClientObservation, Controller, FairDemand, LoadSample, StepOutput,
        effective, fair_shares, step_toward,
    },
    config::AdaptiveConfig,
};

/// Every simulated client's policy: 100 packets per 1 s window, so r = 100 packets/s.
pub const LIMIT: u32 = 100;
pub const WINDOW_US: u32 = 1_000_000;
pub const R: f64 = 100.0;

/// The CPU load of a loaded and of a relaxed period.
pub const HIGH_CPU: f64 = 0.95;
pub const LOW_CPU: f64 = 0.3;

/// The `i`-th simulated client: 10.x.y.z.
pub fn key(i: usize) -> ClientKey {
    v4_mapped([10, (i >> 16) as u8, (i >> 8) as u8, i as u8])
}

/// The default configuration, enabled.
pub fn enabled() -> AdaptiveConfig {
    AdaptiveConfig {
        enabled: true,
        ..AdaptiveConfig::default()
    }
}

// ---------------------------------------------------------------------------------------------
// Inputs: CPU traces and client patterns.

/// A client's utilisation `u` (offered rate / r) in period `t`.
pub type Pattern = Box<dyn Fn(usize) -> f64>;

pub fn steady_low() -> Pattern {
    Box::new(|_| 0.2)
}
pub fn at_limit() -> Pattern {
    Box::new(|_| 1.0)
}
/// 3 r for one period in five, silent otherwise.
pub fn bursty() -> Pattern {
    Box::new(|t| if t.is_multiple_of(5) { 3.0 } else { 0.0 })
}
/// Low until `at`, at the limit from then on.
pub fn switching(at: usize) -> Pattern {
    Box::new(move |t| if t < at { 0.2 } else { 1.0 })
}

/// A square wave: [`HIGH_CPU`] for `half` periods, then [`LOW_CPU`] for `half`, from period 0.
pub fn square(half: usize, t: usize) -> f64 {
    if (t / half).is_multiple_of(2) {
        HIGH_CPU
    } else {
        LOW_CPU
    }
}

/// The load step: CPU 30% → 95% at period `UP` → 30% at period `DOWN`, with a calm
/// ([`steady_low`]) and a busy ([`at_limit`]) client.
pub mod load_step {
    use super::{HIGH_CPU, LOW_CPU, Pattern, at_limit, steady_low};

    pub const UP: usize = 40;
    pub const DOWN: usize = 100;
    pub const PERIODS: usize = 170;

    pub fn cpu(t: usize) -> f64 {
        if (UP..DOWN).contains(&t) {
            HIGH_CPU
        } else {
            LOW_CPU
        }
    }

    pub fn clients() -> Vec<Pattern> {
        vec![steady_low(), at_limit()]
    }
}

/// The client patterns under a relaxed CPU (held at 30%): steady low, at the limit, bursty, and
/// switching from low to busy at `SWITCH_AT`.
pub mod client_patterns {
    use super::{LOW_CPU, Pattern, at_limit, bursty, steady_low, switching};

    pub const SWITCH_AT: usize = 60;
    pub const PERIODS: usize = 120;

    pub fn cpu(_: usize) -> f64 {
        LOW_CPU
    }

    pub fn clients() -> Vec<Pattern> {
        vec![steady_low(), at_limit(), bursty(), switching(SWITCH_AT)]
    }
}

/// The square wave: an unsmoothed load flipping every 2 periods (faster than the default dwell
/// of 3) until `FAST_UNTIL`, then every 8, over a calm, a busy and a bursty client.
pub mod square_wave {
    use super::{Pattern, at_limit, bursty, square, steady_low};

    pub const FAST_UNTIL: usize = 80;
    pub const PERIODS: usize = 160;

    pub fn cpu(t: usize) -> f64 {
        if t < FAST_UNTIL {
            square(2, t)
        } else {
            // Low first after the fast part: half a period of 8 later.
            square(8, t - FAST_UNTIL + 8)
        }
    }

    pub fn clients() -> Vec<Pattern> {
        vec![steady_low(), at_limit(), bursty()]
    }
}

/// Fairness under overload: the [`AGGRESSIVE`] client and 20 modest ones offering 40 to 78 pps,
/// CPU relaxed until `OVERLOAD_FROM`, pinned at 100% from then on.
pub mod fairness {
    use super::{AGGRESSIVE, Client, LOW_CPU, modest};

    pub const OVERLOAD_FROM: usize = 10;
    pub const PERIODS: usize = 50;

    pub fn cpu(t: usize) -> f64 {
        if t < OVERLOAD_FROM { LOW_CPU } else { 1.0 }
    }

    /// The aggressive client first, then the modest ones.
    pub fn clients() -> Vec<Client> {
        std::iter::once(AGGRESSIVE)
            .chain((0..20).map(|i| modest(40.0 + 2.0 * i as f64)))
            .collect()
    }
}

// ---------------------------------------------------------------------------------------------
// Running a scenario.

/// One client's history, one entry per period, each taken after that period's step.
#[derive(Debug, Clone, Default)]
pub struct ClientTrace {
    /// Offered utilisation `u` (the input).
    pub u: Vec<f64>,
    /// Scale `s`.
    pub s: Vec<f64>,
    /// Fairness factor `gᵢ`.
    pub gi: Vec<f64>,
    /// Effective window `W`, seconds, as last decided (the datapath's view).
    pub w: Vec<f64>,
    /// Effective allowance `A` per `W`, as last decided.
    pub a: Vec<f64>,
}

/// A run's history, one entry per period.
#[derive(Debug)]
pub struct Trace {
    /// Raw CPU sample.
    pub cpu: Vec<f64>,
    /// Smoothed load.
    pub load: Vec<f64>,
    /// The band of the smoothed load.
    pub band: Vec<Band>,
    /// Global load factor `g`.
    pub g: Vec<f64>,
    /// Every step's output.
    pub outputs: Vec<StepOutput>,
    pub clients: Vec<ClientTrace>,
}

/// Runs `periods` steps of a controller with `config`: CPU `cpu(t)`, and one client per pattern
/// (policy [`LIMIT`] per [`WINDOW_US`], weight 1) offering `u(t) · r`.
///
/// # Panics
/// If `config` is invalid: the scenarios' configurations are constants.
pub fn simulate(
    config: AdaptiveConfig,
    cpu: impl Fn(usize) -> f64,
    patterns: &[Pattern],
    periods: usize,
) -> Trace {
    #[expect(
        clippy::expect_used,
        reason = "the simulated configurations are constants, valid by construction"
    )]
    let mut ctl = Controller::new(config).expect("the simulated configurations are valid");
    let mut trace = Trace {
        cpu: Vec::new(),
        load: Vec::new(),
        band: Vec::new(),
        g: Vec::new(),
        outputs: Vec::new(),
        clients: vec![ClientTrace::default(); patterns.len()],
    };
    // What the datapath holds per client: the policy until a decision changes it.
    let mut held = vec![(WINDOW_US, LIMIT); patterns.len()];
    for t in 0..periods {
        let observations = patterns.iter().enumerate().map(|(i, u)| ClientObservation {
            key: key(i),
            limit: LIMIT,
            window_us: WINDOW_US,
            rate: u(t) * R,
            weight: 1.0,
            fixed_window: false,
        });
        let sample = LoadSample { cpu: cpu(t) };
        let output = ctl.step(&sample, observations);
        for decision in &output.decisions {
            if let Some(i) = (0..patterns.len()).find(|&i| key(i) == decision.key) {
                held[i] = (decision.window_us, decision.allowance);
            }
        }
        trace.cpu.push(sample.cpu);
        trace.load.push(output.load);
        trace.band.push(output.band);
        trace.g.push(ctl.load_factor());
        for (i, client) in trace.clients.iter_mut().enumerate() {
            client.u.push(patterns[i](t));
            client.s.push(ctl.scale(&key(i)).unwrap_or(1.0));
            let desired = ctl.desired(&key(i));
            client.gi.push(desired.map_or(1.0, |d| d.load_factor));
            client.w.push(held[i].0 as f64 / 1e6);
            client.a.push(held[i].1 as f64);
        }
        trace.outputs.push(output);
    }
    trace
}

/// Every decision keeps `A / W = r · gᵢ` (its own `load_factor`) up to rounding `A` to a whole
/// packet, with `gᵢ ∈ (0, 1]`, and is the controller's own `effective` of its scale and factor.
///
/// # Panics
/// If the decision breaks any of these.
pub fn check_decision(d: &ClientDecision, limit: u32, window_us: u32) {
    let r = limit as f64 * 1e6 / window_us as f64;
    assert!(d.load_factor > 0.0 && d.load_factor <= 1.0, "{d:?}");
    let exact = r * d.window_us as f64 / 1e6 * d.load_factor;
    assert!(
        (d.allowance as f64 - exact).abs() <= 0.5 + 1e-9 || d.allowance == 1,
        "{d:?}"
    );
    assert_eq!(
        (d.window_us, d.allowance),
        effective(limit, window_us, d.scale, d.load_factor)
    );
}

// ---------------------------------------------------------------------------------------------
// Controller-driven fairness: per-client factors gᵢ under an injected overload.

/// A client of the fairness runs: a policy of `limit` per 1 s (so r = limit/s), its weight, and
/// the rate it offers every period.
#[derive(Debug, Clone, Copy)]
pub struct Client {
    pub limit: u32,
    pub weight: f64,
    pub offered: f64,
}

impl Client {
    pub fn r(&self) -> f64 {
        self.limit as f64
    }
}

/// The aggressive client of the fairness scenarios: a larger policy (1000/s), offering 5000 pps.
pub const AGGRESSIVE: Client = Client {
    limit: 1_000,
    weight: 1.0,
    offered: 5_000.0,
};

/// A modest client: the usual policy ([`LIMIT`]/s), offering `offered` pps.
pub fn modest(offered: f64) -> Client {
    Client {
        limit: LIMIT,
        weight: 1.0,
        offered,
    }
}

/// The history of a fairness run, one entry per period, each taken after that period's step.
#[derive(Debug)]
pub struct FairRun {
    pub g: Vec<f64>,
    /// Each client's `gᵢ`.
    pub gi: Vec<Vec<f64>>,
    /// Each client's `(W, A)` as the datapath holds it: its policy until a decision changes it.
    pub held: Vec<Vec<(u32, u32)>>,
}

impl FairRun {
    /// The rate the datapath lets client `i` through at the end of period `t`: `A / W`.
    pub fn enforced(&self, i: usize, t: usize) -> f64 {
        let (w, a) = self.held[i][t];
        a as f64 * 1e6 / w as f64
    }

    /// Half a packet per `W`: how far `A / W` can be from its exact value by rounding `A`.
    pub fn rounding(&self, i: usize, t: usize) -> f64 {
        0.5 * 1e6 / self.held[i][t].0 as f64 + 1e-9
    }
}

/// Runs `n` steps of a controller with `config` over `clients` (all observed every period) under
/// CPU `cpu(t)`, checking every decision ([`check_decision`]) and that what each client holds is
/// what the controller wants. Returns the controller, for its final view, and the history.
///
/// # Panics
/// If `config` is invalid or a check fails.
pub fn fair_run(
    config: AdaptiveConfig,
    cpu: impl Fn(usize) -> f64,
    clients: &[Client],
    n: usize,
) -> (Controller, FairRun) {
    #[expect(
        clippy::expect_used,
        reason = "the simulated configurations are constants, valid by construction"
    )]
    let mut ctl = Controller::new(config).expect("the simulated configurations are valid");
    let mut run = FairRun {
        g: Vec::new(),
        gi: vec![Vec::new(); clients.len()],
        held: vec![Vec::new(); clients.len()],
    };
    let mut held: Vec<(u32, u32)> = clients.iter().map(|c| (WINDOW_US, c.limit)).collect();
    for t in 0..n {
        let observations = clients.iter().enumerate().map(|(i, c)| ClientObservation {
            key: key(i),
            limit: c.limit,
            window_us: WINDOW_US,
            rate: c.offered,
            weight: c.weight,
            fixed_window: false,
        });
        let output = ctl.step(&LoadSample { cpu: cpu(t) }, observations);
        for d in &output.decisions {
            let i = (0..clients.len()).find(|&i| key(i) == d.key);
            let i = i.unwrap_or_else(|| panic!("a decision for an unknown client: {d:?}"));
            check_decision(d, clients[i].limit, WINDOW_US);
            held[i] = (d.window_us, d.allowance);
        }
        run.g.push(ctl.load_factor());
        for (i, c) in clients.iter().enumerate() {
            // Every client is observed every period: what it holds is what the controller wants.
            let desired = ctl.desired(&key(i));
            let desired = desired.unwrap_or_else(|| panic!("client {i} is not tracked: {c:?}"));
            assert_eq!((desired.window_us, desired.allowance), held[i], "{c:?}");
            run.gi[i].push(desired.load_factor);
            run.held[i].push(held[i]);
        }
    }
    (ctl, run)
}
