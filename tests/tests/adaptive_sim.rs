//! Deterministic simulation of the adaptive-window controller (`limiter_user::adaptive`): CPU
//! traces (step, ramp, square wave, seeded noise) and client patterns (steady low, at the limit,
//! bursty, switching) drive `Controller::step`; the tests check stability, convergence bounds,
//! rate preservation, controller-driven fairness under overload, hot reload (`set_config`) and
//! `desired`. No clocks: one loop iteration is one period.

#![expect(
    clippy::expect_used,
    reason = "test helpers outside #[test] functions; a panic there is the test failing"
)]

use std::collections::HashMap;

// The scenarios, the runners and the controller's items, shared with `plot-adaptive`.
use limiter_tests::adaptive_sim::{
    AGGRESSIVE, AdaptiveConfig, Client, ClientDecision, ClientKey, ClientObservation, Controller,
    FairDemand, LIMIT, LoadSample, Pattern, R, StepOutput, WINDOW_US, at_limit, bursty,
    check_decision, client_patterns, effective, enabled, fair_run, fair_shares, fairness, key,
    load_step, modest, simulate, square_wave, steady_low, step_toward, switching,
};
use limiter_user::config::Window;

/// The history of a run: `g` and each client's `s` and `gᵢ` after every period.
struct Run {
    g: Vec<f64>,
    s: Vec<Vec<f64>>,
    gi: Vec<Vec<f64>>,
    outputs: Vec<StepOutput>,
}

/// [`simulate`], checking every decision ([`check_rate_preserved`]).
fn run(config: AdaptiveConfig, cpu: impl Fn(usize) -> f64, clients: &[Pattern], n: usize) -> Run {
    let trace = simulate(config, cpu, clients, n);
    for output in &trace.outputs {
        check_rate_preserved(output);
    }
    Run {
        g: trace.g,
        s: trace.clients.iter().map(|c| c.s.clone()).collect(),
        gi: trace.clients.iter().map(|c| c.gi.clone()).collect(),
        outputs: trace.outputs,
    }
}

/// Every decision keeps `A / W = r · gᵢ` (its own `load_factor`) up to rounding `A` to a whole
/// packet, with `gᵢ ∈ (0, 1]`.
fn check_rate_preserved(output: &StepOutput) {
    for d in &output.decisions {
        check_decision(d, LIMIT, WINDOW_US);
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
    // The load step the README's chart shows.
    let (up, down) = (load_step::UP, load_step::DOWN);
    let r = run(
        c.clone(),
        load_step::cpu,
        &load_step::clients(),
        load_step::PERIODS,
    );
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
    // The client patterns the README's chart shows.
    let at = client_patterns::SWITCH_AT;
    let r = run(
        c.clone(),
        client_patterns::cpu,
        &client_patterns::clients(),
        client_patterns::PERIODS,
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
        weight: 1.0,
        fixed_window: false,
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

// ---------------------------------------------------------------------------------------------
// Controller-driven fairness: per-client factors gᵢ under an injected overload.

/// `gᵢ` moves by at most one `step` per period, and reverses at least `dwell` periods apart.
fn check_bounded(series: &[f64], c: &AdaptiveConfig) {
    for (t, pair) in series.windows(2).enumerate() {
        let ratio = pair[1] / pair[0];
        assert!(
            ratio <= c.step * (1.0 + 1e-12) && ratio >= 1.0 / c.step * (1.0 - 1e-12),
            "jump at period {}: {} -> {}",
            t + 1,
            pair[0],
            pair[1]
        );
    }
    let turns = reversals(series);
    assert!(
        turns.windows(2).all(|w| w[1] - w[0] >= c.dwell as usize),
        "{turns:?}"
    );
}

#[test]
fn fairness_under_overload_protects_modest_clients_from_an_aggressive_one() {
    let c = enabled();
    // One aggressive client with a larger policy (1000/s), 20 modest ones (100/s) offering 0.6 r.
    let aggressive = AGGRESSIVE;
    let mut clients = vec![aggressive];
    clients.extend((0..20).map(|_| modest(0.6 * R)));
    let n = 60;
    let (_, run) = fair_run(c.clone(), |_| 1.0, &clients, n);
    let last = n - 1;
    let g = run.g[last];
    assert_eq!(g, c.min_load_factor);
    // A uniform cut (A / W = r · g for everyone) would take 17% of each modest client's traffic.
    assert!(g * R < 0.95 * 0.6 * R);
    let capacity = g * clients.iter().map(Client::r).sum::<f64>();
    for (i, m) in clients.iter().enumerate().skip(1) {
        assert!(
            run.enforced(i, last) >= 0.95 * m.offered,
            "modest client {i} let through {} of {}",
            run.enforced(i, last),
            m.offered
        );
        assert!(
            run.gi[i].iter().all(|&gi| gi == 1.0),
            "modest client {i} cut"
        );
    }
    // The aggressive one is cut to what is left of the capacity, below its policy rate.
    let share = capacity - 20.0 * 0.6 * R;
    assert!(
        (run.enforced(0, last) - share).abs() <= run.rounding(0, last),
        "aggressive let through {}, share {share}",
        run.enforced(0, last)
    );
    assert!(run.enforced(0, last) < aggressive.r());
    // Its larger policy takes it below min_load_factor: bounded by the water level instead.
    assert!((run.gi[0][last] - share / aggressive.r()).abs() < 1e-9);
    assert!(run.gi[0][last] < c.min_load_factor);
    // No jump from 1 to 0.3: one step per period, monotonically, within the bound.
    for gi in &run.gi {
        check_bounded(gi, &c);
    }
    assert!(reversals(&run.gi[0]).is_empty());
    let reached = run.gi[0]
        .iter()
        .position(|&gi| gi == run.gi[0][last])
        .unwrap();
    // Not cut while the capacity covers every demand (g = 0.8 in period 0), then one step a
    // period: the target (≥ 0.3) is reached in ⌈ln(1 / 0.3) / ln(1.25)⌉ steps.
    assert_eq!(run.gi[0][0], 1.0);
    assert!(
        reached <= 1 + steps(1.0, share / aggressive.r(), c.step),
        "{reached}"
    );
}

#[test]
fn fairness_under_overload_respects_weights() {
    let c = enabled();
    let heavy = |weight| Client {
        limit: 1_000,
        weight,
        offered: 5_000.0,
    };
    let mut clients = vec![heavy(1.0), heavy(3.0)];
    clients.extend((0..10).map(|_| modest(0.6 * R)));
    let n = 60;
    let (_, run) = fair_run(c.clone(), |_| 1.0, &clients, n);
    let last = n - 1;
    // C = 0.5 · 3000 = 1500; the modest take 600; the 900 left are split 1 : 3.
    let capacity = run.g[last] * clients.iter().map(Client::r).sum::<f64>();
    assert_eq!(capacity, 1_500.0);
    for (i, expected) in [(0, 225.0), (1, 675.0)] {
        let got = run.enforced(i, last);
        assert!(
            (got - expected).abs() <= run.rounding(i, last),
            "{i}: {got}"
        );
        assert!((run.gi[i][last] - expected / 1_000.0).abs() < 1e-9);
    }
    for i in 2..clients.len() {
        assert_eq!(run.gi[i][last], 1.0);
        assert!(run.enforced(i, last) >= 0.6 * R);
    }
    for gi in &run.gi {
        check_bounded(gi, &c);
    }
}

#[test]
fn a_zero_weight_client_is_held_to_one_packet_and_recovers() {
    let c = enabled();
    // Weight 0 counts as the smallest positive weight: its share is ~0 under overload.
    let clients = [
        Client {
            limit: LIMIT,
            weight: 0.0,
            offered: 5.0 * R,
        },
        modest(3.0 * R),
    ];
    let (over, back, n) = (0, 60, 140);
    let cpu = |t: usize| if t < back { 1.0 } else { 0.3 };
    let (_, run) = fair_run(c.clone(), cpu, &clients, n);
    // Never blocked: 1 packet per W at the bottom, gᵢ floored where A reaches 1 (W = 250 ms:
    // 1 / (100 · 0.25) = 0.04), not driven toward 0.
    assert_eq!(run.held[0][back - 1], (250_000, 1));
    assert!((run.gi[0][back - 1] - 0.04).abs() < 1e-12);
    assert!(run.gi[0][over..].iter().all(|&gi| gi >= 0.04 - 1e-12));
    // The other heavy client gets the whole capacity it can use: C = 0.5 · 200 = 100.
    assert_eq!(run.held[1][back - 1], (250_000, 25));
    // Back to the policy once the overload is over, within the bound: the EWMA lag and dwell of
    // g, g's climb, then gᵢ's own climb (no second dwell: g moved up in the same period).
    let lag = ewma_lag(1.0, 0.3, c.load.low, c.alpha);
    let g_back = lag + c.dwell as usize + steps(c.min_load_factor, 1.0, c.step);
    let bound = g_back + steps(0.04, 1.0, c.step);
    converges(&run.gi[0], back, 1.0, bound);
    check_bounded(&run.gi[0], &c);
}

#[test]
fn without_overload_nobody_is_cut() {
    let aggressive = AGGRESSIVE;
    let mut clients = vec![aggressive];
    clients.extend((0..20).map(|_| modest(0.6 * R)));
    // Relaxed (g climbs to / stays at 1) and steady (g holds at 1).
    for cpu in [0.3, 0.7] {
        let (_, run) = fair_run(enabled(), |_| cpu, &clients, 60);
        assert!(run.g.iter().all(|&g| g == 1.0));
        for (i, gi) in run.gi.iter().enumerate() {
            assert!(gi.iter().all(|&gi| gi == 1.0), "cpu {cpu}, client {i}");
            // A / W = r: the policy's rate, whatever the window.
            let r = clients[i].r();
            assert!((run.enforced(i, 59) - r).abs() <= run.rounding(i, 59));
        }
    }
}

#[test]
fn equal_heavy_clients_follow_the_global_factor_exactly() {
    // Equal policies, every client above the water level: gᵢ = g after every period, through
    // descents, holds and reversals (the dwell of g is not served twice).
    let patterns = || {
        vec![
            at_limit(),
            at_limit(),
            Box::new(|_| 2.0) as Pattern,
            Box::new(|t: usize| 1.0 + (t % 3) as f64) as Pattern,
        ]
    };
    let unsmoothed = AdaptiveConfig {
        alpha: 1.0,
        ..enabled()
    };
    let step_trace = load_step::cpu;
    let slow_wave = |t: usize| if (t / 8).is_multiple_of(2) { 0.95 } else { 0.3 };
    let fast_wave = |t: usize| if (t / 2).is_multiple_of(2) { 0.95 } else { 0.3 };
    let runs = [
        run(enabled(), step_trace, &patterns(), load_step::PERIODS),
        run(unsmoothed.clone(), slow_wave, &patterns(), 200),
        run(unsmoothed, fast_wave, &patterns(), 200),
        run(enabled(), |_| 1.0, &patterns(), 50),
    ];
    for (n, r) in runs.iter().enumerate() {
        assert!(r.g.iter().any(|&g| g < 1.0), "run {n} never cut");
        for gi in &r.gi {
            assert_eq!(gi, &r.g, "run {n}");
        }
        for o in &r.outputs {
            assert!(o.decisions.iter().all(|d| d.load_factor == o.load_factor));
        }
    }
    assert!(reversals(&runs[1].g).len() > 10);
}

// ---------------------------------------------------------------------------------------------
// Hot reload and the controller's view of each client.

fn obs(i: usize, rate: f64) -> ClientObservation {
    ClientObservation {
        key: key(i),
        limit: LIMIT,
        window_us: WINDOW_US,
        rate,
        weight: 1.0,
        fixed_window: false,
    }
}

const HOT: LoadSample = LoadSample { cpu: 1.0 };
const COOL: LoadSample = LoadSample { cpu: 0.3 };

#[test]
fn period_is_a_window_between_100ms_and_60s() {
    assert_eq!(
        AdaptiveConfig::default().period,
        Window { micros: 1_000_000 }
    );
    let parse = |yaml: &str| serde_yaml::from_str::<AdaptiveConfig>(yaml);
    assert_eq!(parse("period: 250ms").unwrap().period.micros, 250_000);
    assert_eq!(parse("period: 1.5s").unwrap().period.micros, 1_500_000);
    assert_eq!(parse("period: 1m").unwrap().period.micros, 60_000_000);
    let e = parse("period: fast").unwrap_err().to_string();
    assert!(e.contains("invalid period \"fast\""), "{e}");
    let e = parse("period: 1").unwrap_err().to_string();
    assert!(e.contains("invalid"), "{e}");
    for (yaml, got) in [("period: 50ms", "0.05"), ("period: 2m", "120")] {
        let c = parse(yaml).unwrap();
        assert_eq!(
            c.validate().unwrap_err().to_string(),
            format!("period must be between 100ms and 60s (0.1 to 60 seconds), got {got}")
        );
        assert_eq!(c.validate().unwrap_err().field, "period");
    }
    for ok in ["period: 100ms", "period: 60s"] {
        assert_eq!(parse(ok).unwrap().validate(), Ok(()));
    }
}

#[test]
fn desired_is_the_last_decision_until_a_reload() {
    let mut ctl = Controller::new(enabled()).unwrap();
    let mut last: HashMap<ClientKey, ClientDecision> = HashMap::new();
    let rates = [5.0 * R, 0.6 * R, 0.2 * R, R];
    for t in 0..40 {
        let cpu = if t < 25 { HOT } else { COOL };
        let out = ctl.step(&cpu, rates.iter().enumerate().map(|(i, &r)| obs(i, r)));
        check_rate_preserved(&out);
        for d in out.decisions {
            last.insert(d.key, d);
        }
        for i in 0..rates.len() {
            let desired = ctl.desired(&key(i)).unwrap();
            match last.get(&key(i)) {
                Some(d) => assert_eq!(&desired, d, "period {t}"),
                None => assert_eq!((desired.window_us, desired.allowance), (WINDOW_US, LIMIT)),
            }
        }
    }
    assert_eq!(ctl.desired(&key(99)), None);
    assert_eq!(ctl.utilisation(&key(99)), None);
    // The smoothed utilisation of constant offers is the offer.
    for (i, &r) in rates.iter().enumerate() {
        let u = ctl.utilisation(&key(i)).unwrap();
        assert!((u - r / R).abs() < 1e-9, "{i}: {u}");
    }
}

#[test]
fn set_config_disabled_returns_every_key_and_pins_one() {
    let mut ctl = Controller::new(enabled()).unwrap();
    for _ in 0..20 {
        ctl.step(&HOT, (0..5).map(|i| obs(i, R)));
    }
    assert_eq!(ctl.load_factor(), 0.5);
    assert_eq!(ctl.scale(&key(3)), Some(0.25));
    let keys = ctl.set_config(AdaptiveConfig::default()).unwrap();
    assert_eq!(keys, (0..5).map(key).collect::<Vec<_>>());
    assert!(!ctl.config().enabled);
    assert_eq!((ctl.tracked(), ctl.load_factor()), (0, 1.0));
    assert_eq!((ctl.scale(&key(3)), ctl.desired(&key(3))), (None, None));
    for _ in 0..10 {
        let out = ctl.step(&HOT, (0..5).map(|i| obs(i, R)));
        assert!(out.decisions.is_empty() && out.forgotten.is_empty());
        assert_eq!(out.load_factor, 1.0);
    }
    // Disabling twice returns nothing more; enabling starts afresh, without the old load history.
    assert_eq!(
        ctl.set_config(AdaptiveConfig::default()).unwrap(),
        Vec::<ClientKey>::new()
    );
    assert_eq!(ctl.set_config(enabled()).unwrap(), Vec::<ClientKey>::new());
    let out = ctl.step(&COOL, [obs(0, R)]);
    assert_eq!(out.band, limiter_user::adaptive::Band::Relaxed);
    assert_eq!(out.load_factor, 1.0);
}

#[test]
fn set_config_clamps_into_narrower_ranges() {
    // Relaxed: the calm client's s and p grow to 4.
    let mut ctl = Controller::new(enabled()).unwrap();
    for _ in 0..40 {
        ctl.step(&COOL, [obs(0, 0.2 * R), obs(1, R)]);
    }
    assert_eq!(ctl.scale(&key(0)), Some(4.0));
    let narrow = AdaptiveConfig {
        max_scale: 2.0,
        ..enabled()
    };
    assert_eq!(
        ctl.set_config(narrow.clone()).unwrap(),
        Vec::<ClientKey>::new()
    );
    assert_eq!(ctl.config(), &narrow);
    assert_eq!(ctl.scale(&key(0)), Some(2.0));
    let d = ctl.desired(&key(0)).unwrap();
    assert_eq!((d.scale, d.window_us, d.allowance), (2.0, 2_000_000, 200));
    // The pattern was clamped too: nothing grows back past the new max_scale.
    for _ in 0..40 {
        ctl.step(&COOL, [obs(0, 0.2 * R), obs(1, R)]);
        assert_eq!(ctl.scale(&key(0)), Some(2.0));
    }

    // Overloaded: g and s at their floors; a higher floor lifts them at once, and each gᵢ
    // follows by bounded steps.
    let mut ctl = Controller::new(enabled()).unwrap();
    for _ in 0..20 {
        ctl.step(&HOT, [obs(0, R), obs(1, R)]);
    }
    assert_eq!((ctl.load_factor(), ctl.scale(&key(0))), (0.5, Some(0.25)));
    let higher = AdaptiveConfig {
        min_load_factor: 0.8,
        min_scale: 0.5,
        ..enabled()
    };
    ctl.set_config(higher).unwrap();
    assert_eq!((ctl.load_factor(), ctl.scale(&key(0))), (0.8, Some(0.5)));
    let d = ctl.desired(&key(0)).unwrap();
    assert_eq!(
        (d.load_factor, d.window_us, d.allowance),
        (0.5, 500_000, 25)
    );
    let mut gi = vec![0.5];
    for _ in 0..5 {
        let out = ctl.step(&HOT, [obs(0, R), obs(1, R)]);
        check_rate_preserved(&out);
        gi.push(ctl.desired(&key(0)).unwrap().load_factor);
    }
    assert_eq!(gi, [0.5, 0.625, 0.78125, 0.8, 0.8, 0.8]);
}

#[test]
fn an_invalid_config_changes_nothing() {
    let mut ctl = Controller::new(enabled()).unwrap();
    for _ in 0..20 {
        ctl.step(&HOT, (0..3).map(|i| obs(i, R)));
    }
    let snapshot = |ctl: &Controller| {
        (
            ctl.config().clone(),
            ctl.load_factor(),
            ctl.tracked(),
            (0..3).map(|i| ctl.desired(&key(i))).collect::<Vec<_>>(),
        )
    };
    let before = snapshot(&ctl);
    // Invalid even though it also disables: the state must not be dropped.
    let bad = AdaptiveConfig {
        alpha: 0.0,
        ..AdaptiveConfig::default()
    };
    assert_eq!(ctl.set_config(bad).unwrap_err().field, "alpha");
    let bad = AdaptiveConfig {
        period: Window { micros: 50_000 },
        idle_periods: 3,
        ..enabled()
    };
    assert_eq!(ctl.set_config(bad).unwrap_err().field, "period");
    assert_eq!(snapshot(&ctl), before);
    // And the wheel still works at the old idle_periods (30).
    let mut forgotten = 0;
    for t in 21..=60 {
        let out = ctl.step(&HOT, []);
        forgotten += out.forgotten.len();
        if t < 50 {
            assert_eq!(ctl.tracked(), 3, "period {t}");
        }
    }
    assert_eq!((forgotten, ctl.tracked()), (3, 0));
}

#[test]
fn changing_idle_periods_keeps_expiry_working() {
    let with_idle = |idle_periods| AdaptiveConfig {
        idle_periods,
        ..enabled()
    };
    // Periods are numbered from 1; a client last seen at t is forgotten at t + idle_periods.
    let forgotten_at = |ctl: &mut Controller, from: u64, to: u64, keep: &[usize]| {
        let mut at = HashMap::new();
        for t in from..=to {
            let out = ctl.step(&COOL, keep.iter().map(|&i| obs(i, R)));
            for k in out.forgotten {
                assert!(at.insert(k, t).is_none(), "forgotten twice");
            }
        }
        at
    };
    // Shrinking 30 → 5 at period 12: client 0 (last seen at 1) is overdue and goes at once,
    // client 1 (last seen at 10) at 15, client 2 (seen every period) stays.
    let mut ctl = Controller::new(with_idle(30)).unwrap();
    ctl.step(&COOL, [obs(0, R), obs(1, R), obs(2, R)]);
    for _ in 2..10 {
        ctl.step(&COOL, [obs(1, R), obs(2, R)]);
    }
    ctl.step(&COOL, [obs(1, R), obs(2, R)]); // period 10
    ctl.step(&COOL, [obs(2, R)]); // 11
    ctl.step(&COOL, [obs(2, R)]); // 12
    assert_eq!(
        ctl.set_config(with_idle(5)).unwrap(),
        Vec::<ClientKey>::new()
    );
    let at = forgotten_at(&mut ctl, 13, 80, &[2]);
    assert_eq!(at, HashMap::from([(key(0), 13), (key(1), 15)]));
    assert_eq!(ctl.tracked(), 1);

    // Growing 5 → 20 at period 3: a client last seen at 1 now goes at 21, not 6.
    let mut ctl = Controller::new(with_idle(5)).unwrap();
    ctl.step(&COOL, [obs(0, R), obs(1, R)]);
    ctl.step(&COOL, [obs(1, R)]);
    ctl.step(&COOL, [obs(1, R)]);
    ctl.set_config(with_idle(20)).unwrap();
    let at = forgotten_at(&mut ctl, 4, 100, &[1]);
    assert_eq!(at, HashMap::from([(key(0), 21)]));
    // Clients that arrive after the change use the new wheel: last seen at 100, gone at 120.
    let at = forgotten_at(&mut ctl, 101, 200, &[]);
    assert_eq!(at, HashMap::from([(key(1), 120)]));
}

// ---------------------------------------------------------------------------------------------
// The scenarios the README's charts show (`plot-adaptive`), checked for what their captions say.

#[test]
fn the_charted_square_wave_does_not_chatter_while_faster_than_the_dwell() {
    let c = AdaptiveConfig {
        alpha: 1.0,
        ..enabled()
    };
    let r = run(
        c.clone(),
        square_wave::cpu,
        &square_wave::clients(),
        square_wave::PERIODS,
    );
    let fast = square_wave::FAST_UNTIL;
    assert!(reversals(&r.g[..fast]).is_empty(), "{:?}", &r.g[..fast]);
    // Once it flips every 8 periods, g follows it, turning at least `dwell` periods apart.
    let turns = reversals(&r.g);
    assert!(!turns.is_empty(), "g never followed the slow wave");
    assert!(
        turns.windows(2).all(|w| w[1] - w[0] >= c.dwell as usize),
        "{turns:?}"
    );
}

#[test]
fn the_charted_fairness_run_cuts_only_the_aggressive_client() {
    let c = enabled();
    let clients = fairness::clients();
    let (ctl, run) = fair_run(c.clone(), fairness::cpu, &clients, fairness::PERIODS);
    let last = fairness::PERIODS - 1;
    // Nobody is cut before the overload.
    assert!(
        run.gi
            .iter()
            .all(|gi| gi[fairness::OVERLOAD_FROM - 1] == 1.0)
    );
    for (i, _) in clients.iter().enumerate().skip(1) {
        assert_eq!(ctl.desired(&key(i)).map(|d| d.load_factor), Some(1.0));
    }
    assert!(run.gi[0][last] < c.min_load_factor, "{}", run.gi[0][last]);
    let modest_total: f64 = clients[1..].iter().map(|c| c.offered).sum();
    let capacity = run.g[last] * clients.iter().map(Client::r).sum::<f64>();
    assert!((run.gi[0][last] * AGGRESSIVE.r() - (capacity - modest_total)).abs() < 1e-6);
}

/// A global policy's client (issue 12): under overload its window stays the policy's while a
/// local client's shrinks, and its allowance is cut by its fairness factor alone; relief brings
/// it back to the policy. Removing `fixed_window`'s hold on `s` fails the first assertion.
#[test]
fn a_fixed_window_client_is_cut_by_its_factor_only() {
    let mut ctl = Controller::new(enabled()).unwrap();
    let global = |rate| ClientObservation {
        fixed_window: true,
        ..obs(0, rate)
    };
    let mut cut = None;
    for _ in 0..30 {
        let out = ctl.step(&HOT, [global(3.0 * R), obs(1, 3.0 * R)]);
        for d in &out.decisions {
            if d.key == key(0) {
                assert_eq!(d.window_us, WINDOW_US, "a fixed window moved: {d:?}");
                assert_eq!(d.scale, 1.0);
                assert_eq!(
                    d.allowance,
                    effective(LIMIT, WINDOW_US, 1.0, d.load_factor).1
                );
                cut = Some(d.allowance);
            } else {
                assert!(d.window_us <= WINDOW_US);
            }
        }
    }
    let cut = cut.expect("overload cut the global client");
    assert!(cut < LIMIT, "{cut}");
    assert!(
        ctl.scale(&key(1)).unwrap() < 1.0,
        "the local client's window shrank"
    );
    for _ in 0..60 {
        ctl.step(&COOL, [global(3.0 * R), obs(1, 3.0 * R)]);
    }
    let back = ctl.desired(&key(0)).unwrap();
    assert_eq!((back.window_us, back.allowance), (WINDOW_US, LIMIT));
}

/// A global client's cold share changes with the cluster's member count: its factor carries
/// over (a restart of its state would lift an overloaded node's cap at every membership change),
/// and its allowance follows the new share at once.
#[test]
fn a_fixed_window_client_keeps_its_factor_when_its_share_changes() {
    let mut ctl = Controller::new(enabled()).unwrap();
    let global = |limit, rate| ClientObservation {
        fixed_window: true,
        limit,
        ..obs(0, rate)
    };
    for _ in 0..30 {
        ctl.step(&HOT, [global(LIMIT, 3.0 * R), obs(1, 3.0 * R)]);
    }
    let before = ctl.desired(&key(0)).unwrap();
    assert!(before.load_factor < 1.0, "{before:?}");
    let out = ctl.step(&HOT, [global(LIMIT / 2, 3.0 * R), obs(1, 3.0 * R)]);
    let after = ctl.desired(&key(0)).unwrap();
    assert!(
        after.load_factor <= before.load_factor,
        "{before:?} → {after:?}"
    );
    assert_eq!(
        after.allowance,
        effective(LIMIT / 2, WINDOW_US, 1.0, after.load_factor).1
    );
    assert!(out.decisions.iter().any(|d| d.key == key(0)));
}
