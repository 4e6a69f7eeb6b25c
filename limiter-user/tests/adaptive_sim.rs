//! Deterministic simulation of the adaptive-window controller (`limiter_user::adaptive`): CPU
//! traces (step, ramp, square wave, seeded noise) and client patterns (steady low, at the limit,
//! bursty, switching) drive `Controller::step`; the tests check stability, convergence bounds,
//! rate preservation and fairness. No clocks: one loop iteration is one period.

use limiter_common::addr::{ClientKey, v4_mapped};
use limiter_user::adaptive::{
    AdaptiveConfig, ClientObservation, Controller, FairDemand, LoadSample, StepOutput, effective,
    fair_shares, step_toward,
};

/// Every client's policy: 100 packets per second (r = 100/s).
const LIMIT: u32 = 100;
const WINDOW_US: u32 = 1_000_000;
const R: f64 = 100.0;

fn key(i: usize) -> ClientKey {
    v4_mapped([10, (i >> 16) as u8, (i >> 8) as u8, i as u8])
}

fn enabled() -> AdaptiveConfig {
    AdaptiveConfig {
        enabled: true,
        ..AdaptiveConfig::default()
    }
}

/// A client's utilisation `u` (offered rate / r) in period `t`.
type Pattern = Box<dyn Fn(usize) -> f64>;

fn steady_low() -> Pattern {
    Box::new(|_| 0.2)
}
fn at_limit() -> Pattern {
    Box::new(|_| 1.0)
}
/// 3 r for one period in five, silent otherwise.
fn bursty() -> Pattern {
    Box::new(|t| if t % 5 == 0 { 3.0 } else { 0.0 })
}
/// Low until `at`, at the limit from then on.
fn switching(at: usize) -> Pattern {
    Box::new(move |t| if t < at { 0.2 } else { 1.0 })
}

/// The history of a run: `g` and each client's `s` after every period.
struct Run {
    g: Vec<f64>,
    s: Vec<Vec<f64>>,
    outputs: Vec<StepOutput>,
}

fn run(config: AdaptiveConfig, cpu: impl Fn(usize) -> f64, clients: &[Pattern], n: usize) -> Run {
    let mut ctl = Controller::new(config).expect("valid config");
    let mut out = Run {
        g: Vec::new(),
        s: vec![Vec::new(); clients.len()],
        outputs: Vec::new(),
    };
    for t in 0..n {
        let observations = clients.iter().enumerate().map(|(i, u)| ClientObservation {
            key: key(i),
            limit: LIMIT,
            window_us: WINDOW_US,
            rate: u(t) * R,
        });
        let output = ctl.step(&LoadSample { cpu: cpu(t) }, observations);
        check_rate_preserved(&output);
        out.g.push(ctl.load_factor());
        for (i, s) in out.s.iter_mut().enumerate() {
            s.push(ctl.scale(&key(i)).unwrap_or(1.0));
        }
        out.outputs.push(output);
    }
    out
}

/// Every decision keeps `A / W = r · g` up to rounding `A` to a whole packet.
fn check_rate_preserved(output: &StepOutput) {
    for d in &output.decisions {
        let exact = R * d.window_us as f64 / 1e6 * output.load_factor;
        assert!((d.allowance as f64 - exact).abs() <= 0.5 + 1e-9, "{d:?}");
        assert_eq!(
            (d.window_us, d.allowance),
            effective(LIMIT, WINDOW_US, d.scale, output.load_factor)
        );
    }
}

/// Periods at which a series starts moving against its previous direction of movement.
fn reversals(series: &[f64]) -> Vec<usize> {
    let mut last: Option<bool> = None; // rising?
    let mut at = Vec::new();
    for (t, pair) in series.windows(2).enumerate() {
        if pair[1] == pair[0] {
            continue;
        }
        let rising = pair[1] > pair[0];
        if last.is_some_and(|r| r != rising) {
            at.push(t + 1);
        }
        last = Some(rising);
    }
    at
}

/// Periods the EWMA needs, starting at `from` with samples `to`, to cross `band`.
fn ewma_lag(from: f64, to: f64, band: f64, alpha: f64) -> usize {
    let mut x = from;
    (1..)
        .find(|_| {
            x = alpha * to + (1.0 - alpha) * x;
            if to > band { x > band } else { x < band }
        })
        .expect("an EWMA crosses every band between its start and its input")
}

/// Steps of factor `step` from `start` to `target`: `⌈|ln(target/start)| / ln(step)⌉`.
fn steps(start: f64, target: f64, step: f64) -> usize {
    ((target / start).ln().abs() / step.ln() - 1e-9).ceil() as usize
}

/// From period `from`, `series` moves monotonically from its value there to `target`, never
/// past it, and gets there within `bound` periods.
fn converges(series: &[f64], from: usize, target: f64, bound: usize) {
    let start = series[from - 1];
    let up = target > start;
    for t in from..series.len() {
        let (prev, x) = (series[t - 1], series[t]);
        assert!(
            if up { x >= prev } else { x <= prev },
            "not monotone at {t}"
        );
        assert!(
            if up { x <= target } else { x >= target },
            "overshoot at {t}: {x}"
        );
    }
    let reached = series[from..].iter().position(|&x| x == target);
    let reached = reached.unwrap_or_else(|| panic!("never reached {target}")) + 1;
    assert!(
        reached <= bound,
        "reached {target} after {reached} periods, bound {bound}"
    );
}

#[test]
fn validation_names_the_field_and_the_constraint() {
    assert_eq!(enabled().validate(), Ok(()));
    let bad = |edit: fn(&mut AdaptiveConfig), message: &str| {
        let mut c = enabled();
        edit(&mut c);
        assert_eq!(c.validate().unwrap_err().to_string(), message);
        assert!(Controller::new(c).is_err());
    };
    bad(
        |c| c.load.low = 0.9,
        "load.low must be >= 0 and < load.high (0.85), got 0.9",
    );
    bad(
        |c| c.load.high = 1.2,
        "load.high must be in (0, 1], got 1.2",
    );
    bad(|c| c.min_scale = 0.0, "min_scale must be in (0, 1], got 0");
    bad(
        |c| c.min_scale = 1.5,
        "min_scale must be in (0, 1], got 1.5",
    );
    bad(
        |c| c.max_scale = 0.5,
        "max_scale must be >= 1 and finite, got 0.5",
    );
    bad(|c| c.step = 1.0, "step must be > 1 and finite, got 1");
    bad(|c| c.alpha = 0.0, "alpha must be in (0, 1], got 0");
    bad(|c| c.alpha = f64::NAN, "alpha must be in (0, 1], got NaN");
    bad(
        |c| c.min_load_factor = 1.1,
        "min_load_factor must be in (0, 1], got 1.1",
    );
    bad(|c| c.dwell = 0, "dwell must be >= 1, got 0");
    bad(
        |c| c.shrink_above = 0.4,
        "shrink_above must be > grow_below (0.5) and finite, got 0.4",
    );
}

#[test]
fn config_parses_with_defaults_and_rejects_unknown_keys() {
    let c: AdaptiveConfig = serde_yaml::from_str("enabled: true\nload: { high: 0.9 }\n").unwrap();
    assert!(c.enabled);
    assert_eq!(
        (c.load.high, c.load.low, c.min_scale, c.max_scale),
        (0.9, 0.6, 0.25, 4.0)
    );
    assert_eq!(
        (c.step, c.dwell, c.grow_after, c.min_load_factor),
        (1.25, 3, 5, 0.5)
    );
    assert!(!AdaptiveConfig::default().enabled);
    let e = serde_yaml::from_str::<AdaptiveConfig>("alpah: 0.3\n")
        .unwrap_err()
        .to_string();
    assert!(e.contains("unknown field `alpah`"), "{e}");
    let e = serde_yaml::from_str::<AdaptiveConfig>("load: { hihg: 0.9 }\n")
        .unwrap_err()
        .to_string();
    assert!(e.contains("unknown field `hihg`"), "{e}");
}

#[test]
fn helpers_bound_steps_and_keep_the_rate() {
    assert_eq!(step_toward(1.0, 4.0, 1.25), 1.25);
    assert_eq!(step_toward(3.9, 4.0, 1.25), 4.0);
    assert_eq!(step_toward(1.0, 0.9, 1.25), 0.9);
    assert_eq!(effective(100, 1_000_000, 2.0, 0.5), (2_000_000, 100));
    // 20 ms × 0.25 is below the datapath's 10 ms: the scale used is 0.5, and A follows it.
    assert_eq!(effective(10, 20_000, 0.25, 1.0), (10_000, 5));
    // A limited client stays limited, never blocked.
    assert_eq!(effective(1, 1_000_000, 0.25, 0.5), (250_000, 1));
}

#[test]
fn disabled_pins_scale_and_factor_to_one() {
    let r = run(
        AdaptiveConfig::default(),
        |_| 1.0,
        &[steady_low(), at_limit()],
        50,
    );
    assert!(r.g.iter().all(|&g| g == 1.0));
    assert!(r.outputs.iter().all(|o| o.decisions.is_empty()));
}

#[test]
fn constant_input_never_reverses() {
    let patterns = || vec![steady_low(), at_limit(), Box::new(|_| 0.65) as Pattern];
    for cpu in [0.3, 0.7, 0.95] {
        let r = run(enabled(), |_| cpu, &patterns(), 200);
        assert!(reversals(&r.g).is_empty(), "cpu {cpu}");
        for s in &r.s {
            assert!(reversals(s).is_empty(), "cpu {cpu}");
        }
        let last = |s: &[f64]| *s.last().unwrap();
        match cpu {
            0.3 => assert_eq!(
                [last(&r.g), last(&r.s[0]), last(&r.s[1]), last(&r.s[2])],
                [1.0, 4.0, 1.0, 1.0]
            ),
            0.7 => assert!(
                r.outputs.iter().all(|o| o.decisions.is_empty()),
                "steady band moves nothing"
            ),
            _ => assert_eq!(
                [last(&r.g), last(&r.s[0]), last(&r.s[1])],
                [0.5, 0.25, 0.25]
            ),
        }
    }
}

#[test]
fn step_converges_monotonically_within_the_bound() {
    let c = enabled();
    let (up, down) = (40, 100);
    let cpu = |t: usize| if (up..down).contains(&t) { 0.95 } else { 0.3 };
    let r = run(c.clone(), cpu, &[steady_low(), at_limit()], 170);
    // Before the step: calm client at max_scale, the other at 1, g = 1.
    assert_eq!(
        (r.g[up - 1], r.s[0][up - 1], r.s[1][up - 1]),
        (1.0, 4.0, 1.0)
    );
    let lag_up = ewma_lag(0.3, 0.95, c.load.high, c.alpha);
    let bound = |from: f64, to: f64, lag: usize| lag + c.dwell as usize + steps(from, to, c.step);
    converges(
        &r.g[..down],
        up,
        c.min_load_factor,
        bound(1.0, c.min_load_factor, lag_up),
    );
    converges(
        &r.s[0][..down],
        up,
        c.min_scale,
        bound(4.0, c.min_scale, lag_up),
    );
    converges(
        &r.s[1][..down],
        up,
        c.min_scale,
        bound(1.0, c.min_scale, lag_up),
    );
    // And back: everything relaxes to where it was.
    let lag_down = ewma_lag(0.95, 0.3, c.load.low, c.alpha);
    converges(&r.g, down, 1.0, bound(c.min_load_factor, 1.0, lag_down));
    converges(&r.s[0], down, 4.0, bound(c.min_scale, 4.0, lag_down));
    converges(&r.s[1], down, 1.0, bound(c.min_scale, 1.0, lag_down));
}

#[test]
fn ramp_moves_each_quantity_one_way() {
    let cpu = |t: usize| (0.2 + 0.8 * t as f64 / 100.0).min(1.0);
    let r = run(enabled(), cpu, &[steady_low(), at_limit()], 160);
    assert!(reversals(&r.g).is_empty());
    assert!(reversals(&r.s[1]).is_empty());
    // The calm client grows while the load is low, then shrinks once: one reversal.
    assert_eq!(reversals(&r.s[0]).len(), 1);
    assert_eq!((r.g[159], r.s[0][159], r.s[1][159]), (0.5, 0.25, 0.25));
}

#[test]
fn square_wave_faster_than_the_dwell_does_not_chatter() {
    // Unsmoothed (alpha = 1), so that only the dwell stands between the wave and the output.
    for (dwell, half) in [(3, 1), (6, 2), (6, 1), (10, 4)] {
        let c = AdaptiveConfig {
            dwell,
            alpha: 1.0,
            ..enabled()
        };
        let cpu = |t: usize| {
            if (t / half).is_multiple_of(2) {
                0.95
            } else {
                0.3
            }
        };
        let r = run(c, cpu, &[steady_low(), at_limit(), bursty()], 400);
        assert!(
            reversals(&r.g).is_empty(),
            "dwell {dwell}, half period {half}"
        );
        for s in &r.s {
            assert!(reversals(s).is_empty(), "dwell {dwell}, half period {half}");
        }
    }
    // A wave slower than the dwell is followed, with reversals at least `dwell` apart.
    let c = AdaptiveConfig {
        alpha: 1.0,
        ..enabled()
    };
    let r = run(
        c,
        |t| if (t / 8).is_multiple_of(2) { 0.95 } else { 0.3 },
        &[at_limit()],
        200,
    );
    let turns = reversals(&r.g);
    assert!(turns.len() > 10, "{turns:?}");
    assert!(turns.windows(2).all(|w| w[1] - w[0] >= 3), "{turns:?}");
}

/// SplitMix64: a seeded, dependency-free PRNG.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> f64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        (z ^ (z >> 31)) as f64 / u64::MAX as f64
    }
}

fn noise(seed: u64, mid: f64, spread: f64, n: usize) -> Vec<f64> {
    let mut rng = Rng(seed);
    (0..n)
        .map(|_| mid + spread * (2.0 * rng.next() - 1.0))
        .collect()
}

#[test]
fn noisy_load_is_smoothed_away() {
    let patterns = || vec![steady_low(), at_limit(), bursty(), switching(150)];
    // Inside the band on average, raw samples often outside it: nothing moves with the load.
    let trace = noise(7, 0.725, 0.2, 600);
    assert!(trace.iter().any(|&c| c > 0.85) && trace.iter().any(|&c| c < 0.6));
    let r = run(enabled(), |t| trace[t], &patterns(), 600);
    assert!(r.g.iter().all(|&g| g == 1.0));
    // Overloaded on average, with dips below the band: a monotone descent to the floors.
    let trace = noise(11, 0.95, 0.12, 300);
    let r = run(enabled(), |t| trace[t], &patterns(), 300);
    assert!(reversals(&r.g).is_empty() && r.g[299] == 0.5);
    assert!(
        r.s.iter()
            .all(|s| reversals(s).is_empty() && s[299] == 0.25)
    );
    // Anything at all: reversals stay `dwell` apart, values inside their bounds.
    let trace = noise(3, 0.5, 0.5, 2000);
    let r = run(enabled(), |t| trace[t], &patterns(), 2000);
    for series in r.s.iter().chain([&r.g]) {
        assert!(reversals(series).windows(2).all(|w| w[1] - w[0] >= 3));
        assert!(series.iter().all(|&x| (0.25..=4.0).contains(&x)));
    }
    assert!(r.g.iter().all(|&g| (0.5..=1.0).contains(&g)));
}

#[test]
fn client_patterns_under_low_load() {
    let c = enabled();
    let at = 60;
    let r = run(
        c.clone(),
        |_| 0.3,
        &[steady_low(), at_limit(), bursty(), switching(at)],
        120,
    );
    // Steady low: calm from the first period, one step per period once calm for `grow_after`.
    converges(
        &r.s[0],
        1,
        c.max_scale,
        c.grow_after as usize + steps(1.0, c.max_scale, c.step),
    );
    // At the limit: never touched, never a decision.
    assert!(r.s[1].iter().all(|&s| s == 1.0));
    assert!(
        r.outputs
            .iter()
            .all(|o| o.decisions.iter().all(|d| d.key != key(1)))
    );
    // Bursty (u = 3 one period in five): its smoothed utilisation never stays calm for long.
    assert!(r.s[2].iter().all(|&s| s == 1.0));
    // Switching: grows like steady low, then back to 1 after it turns busy.
    assert_eq!(r.s[3][at - 1], c.max_scale);
    let lag = ewma_lag(0.2, 1.0, c.shrink_above, c.alpha);
    let bound = lag + c.dwell as usize + steps(c.max_scale, 1.0, c.step);
    converges(&r.s[3], at, 1.0, bound);
}

#[test]
fn only_changes_are_emitted_and_idle_clients_are_forgotten() {
    let c = AdaptiveConfig {
        idle_periods: 10,
        ..enabled()
    };
    let mut ctl = Controller::new(c).unwrap();
    let obs = |i: usize| ClientObservation {
        key: key(i),
        limit: LIMIT,
        window_us: WINDOW_US,
        rate: R,
    };
    let hot = LoadSample { cpu: 0.95 };
    let first = ctl.step(&hot, (0..10_000).map(obs));
    assert_eq!(
        first.decisions.len(),
        10_000,
        "g and s both moved for every client"
    );
    let mut forgotten = Vec::new();
    let mut quiet_decisions = 0;
    for _ in 0..60 {
        let out = ctl.step(&hot, [obs(0)]);
        forgotten.extend(out.forgotten);
        quiet_decisions += out.decisions.len();
    }
    assert_eq!(ctl.tracked(), 1);
    forgotten.sort();
    forgotten.dedup();
    assert_eq!(
        forgotten.len(),
        9_999,
        "each idle client forgotten exactly once"
    );
    assert!(!forgotten.contains(&key(0)));
    // Client 0 reached its floors (g: 4 steps, s: 7 steps) and then went quiet.
    assert_eq!(quiet_decisions, 6);
    assert_eq!(ctl.scale(&key(0)), Some(0.25));
}

fn fair(demand: f64, weight: f64) -> FairDemand {
    FairDemand { demand, weight }
}

#[test]
fn fairness_protects_modest_clients_from_an_aggressive_one() {
    // Injected overload: the controller brings g to its floor; capacity = g · Σ r.
    let r = run(enabled(), |_| 1.0, &[at_limit()], 30);
    let g = r.g[29];
    assert_eq!(g, 0.5);
    let capacity = g * R * 21.0;
    let mut clients = vec![fair(5_000.0, 1.0)];
    clients.extend((0..20).map(|_| fair(40.0, 1.0)));
    let shares = fair_shares(&clients, capacity);
    for (c, s) in clients[1..].iter().zip(&shares[1..]) {
        assert!(
            *s >= 0.95 * c.demand,
            "modest client got {s} of {}",
            c.demand
        );
    }
    // The aggressive one gets what is left: the water level, above every modest demand.
    assert!((shares[0] - (capacity - 20.0 * 40.0)).abs() < 1e-9);
    assert!(shares[0] > 40.0 && shares[0] < clients[0].demand);
    assert!((shares.iter().sum::<f64>() - capacity).abs() < 1e-6);
}

#[test]
fn fairness_respects_weights() {
    let clients = [
        fair(1_000.0, 1.0),
        fair(1_000.0, 3.0),
        fair(10.0, 1.0),
        fair(70.0, 2.0),
    ];
    let shares = fair_shares(&clients, 480.0);
    // 10 and 70 fit under the level (100 per unit weight); 400 is split 1 : 3.
    let expected = [100.0, 300.0, 10.0, 70.0];
    for (s, e) in shares.iter().zip(expected) {
        assert!((s - e).abs() < 1e-9, "{shares:?}");
    }
    // Max-min: no client is below its demand while another has more per unit of weight.
    for (i, (ci, si)) in clients.iter().zip(&shares).enumerate() {
        assert!(*si <= ci.demand + 1e-9);
        if *si < ci.demand - 1e-9 {
            for (j, (cj, sj)) in clients.iter().zip(&shares).enumerate() {
                assert!(sj / cj.weight <= si / ci.weight + 1e-9, "{i} cut below {j}");
            }
        }
    }
    // Enough for everyone: everyone gets their demand.
    assert_eq!(
        fair_shares(&clients, 1e6),
        clients.map(|c| c.demand).to_vec()
    );
}
