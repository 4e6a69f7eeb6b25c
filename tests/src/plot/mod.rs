//! Renders the adaptive-window controller (`limiter_user::adaptive`) at work as four SVG charts,
//! for the README: a CPU step, a square-wave load faster than the dwell, the client patterns, and
//! fairness under overload. The scenarios are those of `limiter-user/tests/adaptive_sim.rs`; every
//! value plotted comes from the real `Controller::step` (its decisions, as the datapath would
//! hold them). No clock and no randomness: one loop iteration is one period, and the output is
//! the same bytes on every run.
//!
//! Usage: `plot-adaptive [--out DIR]` (default: the workspace's `docs/`). Writes
//! `adaptive-load-step.svg`, `adaptive-square-wave.svg`, `adaptive-client-patterns.svg` and
//! `adaptive-fairness.svg`.

use std::{fmt::Write as _, path::PathBuf};

use anyhow::{Context as _, bail};
use limiter_common::addr::{ClientKey, v4_mapped};
use limiter_user::adaptive::{AdaptiveConfig, Band, ClientObservation, Controller, LoadSample};

/// Every simulated client's policy: 100 packets per 1 s window, so r = 100 packets/s.
const LIMIT: u32 = 100;
const WINDOW_US: u32 = 1_000_000;
const R: f64 = 100.0;

// Okabe–Ito colours: distinguishable with the common colour-vision deficiencies.
const BLACK: &str = "#222222";
const BLUE: &str = "#0072b2";
const ORANGE: &str = "#e69f00";
const GREEN: &str = "#009e73";
const VERMILLION: &str = "#d55e00";
const PURPLE: &str = "#cc79a7";
const SKY: &str = "#56b4e9";
/// Background of the periods whose smoothed load is overloaded, and of the hysteresis band.
const OVERLOADED_TINT: &str = "#fbe1d6";
const STEADY_TINT: &str = "#eeeeee";

fn main() -> anyhow::Result<()> {
    let mut out = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .context("the tests crate has a parent directory")?
        .join("docs");
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        match arg.as_str() {
            "--out" => out = args.next().context("--out needs a directory")?.into(),
            "-h" | "--help" => {
                println!(
                    "usage: plot-adaptive [--out DIR]   (default {})",
                    out.display()
                );
                return Ok(());
            }
            other => bail!("unknown argument {other:?} (expected --out DIR)"),
        }
    }
    std::fs::create_dir_all(&out).with_context(|| format!("creating {}", out.display()))?;
    let figures = [
        ("adaptive-load-step.svg", load_step()),
        ("adaptive-square-wave.svg", square_wave()),
        ("adaptive-client-patterns.svg", client_patterns()),
        ("adaptive-fairness.svg", fairness()),
    ];
    for (name, figure) in figures {
        let path = out.join(name);
        std::fs::write(&path, figure.render(name.trim_end_matches(".svg")))
            .with_context(|| format!("writing {}", path.display()))?;
        println!("wrote {}", path.display());
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// Simulation: the scenarios, run through the real controller.

/// A client's utilisation `u` (offered rate / r) in period `t`.
type Pattern = fn(usize) -> f64;

fn steady_low(_: usize) -> f64 {
    0.2
}
fn at_limit(_: usize) -> f64 {
    1.0
}
/// 3 r for one period in five, silent otherwise.
fn bursty(t: usize) -> f64 {
    if t.is_multiple_of(5) { 3.0 } else { 0.0 }
}
/// The period from which the switching client turns busy.
const SWITCH_AT: usize = 60;
fn switching(t: usize) -> f64 {
    if t < SWITCH_AT { 0.2 } else { 1.0 }
}

fn key(i: usize) -> ClientKey {
    v4_mapped([10, (i >> 16) as u8, (i >> 8) as u8, i as u8])
}

fn enabled() -> AdaptiveConfig {
    AdaptiveConfig {
        enabled: true,
        ..AdaptiveConfig::default()
    }
}

/// One client's history, one entry per period, each taken after that period's step.
struct ClientTrace {
    /// Offered utilisation `u` (the input).
    u: Vec<f64>,
    /// Scale `s`.
    s: Vec<f64>,
    /// Fairness factor `gᵢ`.
    gi: Vec<f64>,
    /// Effective window `W`, seconds, as last decided (the datapath's view).
    w: Vec<f64>,
    /// Effective allowance `A` per `W`, as last decided.
    a: Vec<f64>,
}

/// A run's history, one entry per period.
struct Trace {
    /// Raw CPU sample.
    cpu: Vec<f64>,
    /// Smoothed load `ĉ` and its band.
    load: Vec<f64>,
    band: Vec<Band>,
    /// Global load factor `g`.
    g: Vec<f64>,
    clients: Vec<ClientTrace>,
}

fn simulate(
    config: AdaptiveConfig,
    cpu: impl Fn(usize) -> f64,
    patterns: &[Pattern],
    periods: usize,
) -> Trace {
    let mut ctl = Controller::new(config).expect("the plotted configurations are valid");
    let mut trace = Trace {
        cpu: Vec::new(),
        load: Vec::new(),
        band: Vec::new(),
        g: Vec::new(),
        clients: patterns
            .iter()
            .map(|_| ClientTrace {
                u: Vec::new(),
                s: Vec::new(),
                gi: Vec::new(),
                w: Vec::new(),
                a: Vec::new(),
            })
            .collect(),
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
        trace.g.push(output.load_factor);
        for (i, client) in trace.clients.iter_mut().enumerate() {
            client.u.push(patterns[i](t));
            client.s.push(ctl.scale(&key(i)).unwrap_or(1.0));
            let desired = ctl.desired(&key(i));
            client.gi.push(desired.map_or(1.0, |d| d.load_factor));
            client.w.push(held[i].0 as f64 / 1e6);
            client.a.push(held[i].1 as f64);
        }
    }
    trace
}

/// Background strips for the periods in the overloaded and the steady band.
fn band_shading(bands: &[Band]) -> Vec<Shade> {
    let mut shades = Vec::new();
    let mut start = 0;
    for t in 1..=bands.len() {
        if t < bands.len() && bands[t] == bands[start] {
            continue;
        }
        let fill = match bands[start] {
            Band::Overloaded => Some(OVERLOADED_TINT),
            Band::Steady => Some(STEADY_TINT),
            Band::Relaxed => None,
        };
        if let Some(fill) = fill {
            shades.push(Shade {
                from: start as f64,
                to: t as f64,
                fill,
            });
        }
        start = t;
    }
    shades
}

/// The CPU panel of the load-driven figures: raw and smoothed load, the bands.
fn cpu_panel(title: &str, trace: &Trace, config: &AdaptiveConfig) -> Panel {
    let mut panel = Panel::new(title, 96.0, Axis::percent());
    if config.alpha < 1.0 {
        panel.step("raw CPU sample c", &trace.cpu, Stroke::solid(SKY, 2.0));
        let name = format!("smoothed ĉ (α = {})", config.alpha);
        panel.step(&name, &trace.load, Stroke::solid(BLACK, 2.0));
    } else {
        panel.step("CPU load (ĉ = c)", &trace.load, Stroke::solid(BLACK, 2.0));
    }
    let (high, low) = (config.load.high, config.load.low);
    let high_stroke = Stroke::dashed(VERMILLION, 1.3);
    panel.rule(&format!("load.high = {high}"), high, high_stroke);
    panel.rule(
        &format!("load.low = {low}"),
        low,
        Stroke::dashed(GREEN, 1.3),
    );
    panel.swatch("overloaded (ĉ > high)", OVERLOADED_TINT);
    panel.swatch("steady (low ≤ ĉ ≤ high)", STEADY_TINT);
    panel
}

fn scale_axis() -> Axis {
    Axis::log2(0.25, 4.0, |v| format!("×{}", trim(v)))
}

fn period_axis(periods: usize, step: f64) -> Axis {
    Axis::linear(0.0, periods as f64, step, trim_int)
}

const PERIOD_LABEL: &str = "period (one Controller::step each)";

// ---------------------------------------------------------------------------------------------
// The four figures.

/// CPU 30% → 95% at period 40 → 30% at period 100, with a calm and a busy client.
fn load_step() -> Figure {
    let config = enabled();
    let (up, down, periods) = (40, 100, 170);
    let cpu = |t: usize| if (up..down).contains(&t) { 0.95 } else { 0.3 };
    let trace = simulate(config.clone(), cpu, &[steady_low, at_limit], periods);
    let (calm, busy) = (&trace.clients[0], &trace.clients[1]);

    let mut load = cpu_panel(
        "CPU load: the input, its EWMA and the hysteresis band",
        &trace,
        &config,
    );
    load.marker(up as f64, "CPU → 95%", Corner::Bottom);
    load.marker(down as f64, "CPU → 30%", Corner::Top);

    let mut scale = Panel::new(
        "Global load factor g, per-client scale s and fairness factor gᵢ",
        96.0,
        scale_axis(),
    );
    scale.step("g (global)", &trace.g, Stroke::solid(BLACK, 2.0));
    // Under overload the capacity g · Σ r = 100 covers the calm client's 20 and leaves 80 of
    // the busy one's 100: the busy one is cut to gᵢ = 0.8, the calm one not at all.
    scale.step("gᵢ, busy client", &busy.gi, Stroke::dashed(VERMILLION, 2.0));
    let calm_name = "calm client (u = 0.2)";
    let busy_name = "busy client (u = 1)";
    scale.step(
        &format!("s, {calm_name}"),
        &calm.s,
        Stroke::solid(BLUE, 2.0),
    );
    scale.step(
        &format!("s, {busy_name}"),
        &busy.s,
        Stroke::solid(ORANGE, 2.0),
    );
    scale.note("(gᵢ, calm client: 1, never cut)");

    let seconds = |v: f64| {
        if v < 1.0 {
            format!("{} ms", trim(v * 1e3))
        } else {
            format!("{} s", trim(v))
        }
    };
    let mut window = Panel::new(
        "Effective window W = s · w (policy w = 1 s)",
        82.0,
        Axis::log2(0.25, 4.0, seconds),
    );
    window.step("W, calm client", &calm.w, Stroke::solid(BLUE, 2.0));
    window.step("W, busy client", &busy.w, Stroke::solid(ORANGE, 2.0));

    let mut allowance = Panel::new(
        "Effective allowance A = L · s · gᵢ per W (policy L = 100), so A / W = r · gᵢ",
        82.0,
        Axis::log2(12.5, 400.0, trim),
    );
    allowance.step("A, calm client", &calm.a, Stroke::solid(BLUE, 2.0));
    allowance.step("A, busy client", &busy.a, Stroke::solid(ORANGE, 2.0));
    allowance.note("(packets per W)");

    Figure {
        width: 900.0,
        title: "Adaptive windows: a CPU load step up, then down".into(),
        subtitle: vec![
            format!(
                "Default knobs. While ĉ > {} everything tightens toward s = {}, g = {}; once \
                 ĉ < {} it relaxes back,",
                config.load.high, config.min_scale, config.min_load_factor, config.load.low
            ),
            format!(
                "at most ×{} per period, monotonically, without overshoot. The calm client \
                 returns to its longer window.",
                config.step
            ),
        ],
        x: period_axis(periods, 10.0),
        x_label: PERIOD_LABEL.into(),
        shading: band_shading(&trace.band),
        panels: vec![load, scale, window, allowance],
    }
}

/// An unsmoothed load flipping every 2 periods (faster than the dwell of 3), then every 8; and
/// the same input without a dwell, for contrast.
fn square_wave() -> Figure {
    let (fast_until, periods) = (80, 160);
    let cpu = |t: usize| {
        let high = if t < fast_until {
            (t / 2).is_multiple_of(2)
        } else {
            !((t - fast_until) / 8).is_multiple_of(2)
        };
        if high { 0.95 } else { 0.3 }
    };
    let unsmoothed = AdaptiveConfig {
        alpha: 1.0,
        ..enabled()
    };
    let no_dwell = AdaptiveConfig {
        dwell: 1,
        ..unsmoothed.clone()
    };
    let patterns: [Pattern; 3] = [steady_low, at_limit, bursty];
    let damped = simulate(unsmoothed.clone(), cpu, &patterns, periods);
    let undamped = simulate(no_dwell, cpu, &patterns, periods);
    // The legend says the bursty client moves as the one at the limit: keep it true.
    for trace in [&damped, &undamped] {
        assert_eq!(
            trace.clients[2].s, trace.clients[1].s,
            "the bursty client's scale differs from the one at the limit: plot it"
        );
    }

    let mut load = cpu_panel(
        "CPU load, unsmoothed (α = 1): only the dwell stands between the wave and g, s",
        &damped,
        &unsmoothed,
    );
    load.marker(0.0, "flips every 2 periods", Corner::Bottom);
    load.marker(fast_until as f64, "flips every 8 periods", Corner::Bottom);

    // Where the series coincide, g shows as a wide black edge, and the dashes of the last one
    // let the blue one show through.
    let series = |panel: &mut Panel, trace: &Trace| {
        let s = &trace.clients;
        panel.step("g (global)", &trace.g, Stroke::solid(BLACK, 4.4));
        panel.step("s, calm (u = 0.2)", &s[0].s, Stroke::solid(BLUE, 2.2));
        panel.step("s, at limit (u = 1)", &s[1].s, Stroke::dashed(ORANGE, 2.2));
        panel.note("(a bursty client: as at limit)");
    };
    let mut with_dwell = Panel::new(
        "dwell = 3 (default): the fast wave never reverses g or s; the slow one is followed",
        110.0,
        scale_axis(),
    );
    series(&mut with_dwell, &damped);
    let mut without_dwell = Panel::new(
        "dwell = 1, same input, for contrast: g and s chatter with every flip of the band",
        110.0,
        scale_axis(),
    );
    series(&mut without_dwell, &undamped);

    Figure {
        width: 900.0,
        title: "Adaptive windows: a square-wave load faster than the dwell".into(),
        subtitle: vec![
            "A move against the last one happens only once demanded for dwell periods in a row. \
             A load flipping faster"
                .into(),
            "never reverses g or s: they settle one way. A slower wave is followed, with \
             reversals at least dwell periods apart."
                .into(),
        ],
        x: period_axis(periods, 10.0),
        x_label: PERIOD_LABEL.into(),
        shading: band_shading(&damped.band),
        panels: vec![load, with_dwell, without_dwell],
    }
}

/// CPU held at 30% (relaxed): each client's scale follows its own pattern.
fn client_patterns() -> Figure {
    let config = enabled();
    let periods = 120;
    let patterns: [Pattern; 4] = [steady_low, at_limit, bursty, switching];
    let trace = simulate(config.clone(), |_| 0.3, &patterns, periods);
    let panels = [
        (
            format!(
                "Steady low (u = 0.2): calm for grow_after = {} periods, then s grows ×{} per \
                 period to {}",
                config.grow_after, config.step, config.max_scale
            ),
            BLUE,
        ),
        (
            "At the limit (u = 1): never calm, so s stays 1 and no decision is emitted".into(),
            ORANGE,
        ),
        (
            format!(
                "Bursty (3 r one period in five): smoothed û never < {} for {} periods: s stays 1",
                config.grow_below, config.grow_after
            ),
            PURPLE,
        ),
        (
            format!(
                "Switching (u = 0.2, then 1 from period {SWITCH_AT}): grows, then shrinks back \
                 to 1"
            ),
            GREEN,
        ),
    ];
    let panels = panels
        .into_iter()
        .zip(&trace.clients)
        .map(|((title, colour), client)| {
            let mut panel = Panel::new(&title, 70.0, Axis::linear(0.0, 4.0, 1.0, trim_int));
            panel.area("offered u = rate / r", &client.u, colour);
            panel.step("scale s", &client.s, Stroke::solid(colour, 2.2));
            panel
        })
        .collect();
    Figure {
        width: 900.0,
        title: "Adaptive windows: client patterns under low load".into(),
        subtitle: vec![
            "CPU held at 30% (relaxed): each client's scale s follows its own traffic. A calm \
             client gets a longer window"
                .into(),
            "W = s · w and allowance A = L · s: the same long-run rate r, larger bursts \
             tolerated. Busy clients stay at their policy."
                .into(),
        ],
        x: period_axis(periods, 10.0),
        x_label: PERIOD_LABEL.into(),
        shading: Vec::new(),
        panels,
    }
}

/// One aggressive client and 20 modest ones under an injected overload, through the controller:
/// `g` sets the capacity `g · Σ r`, and each client's own factor `gᵢ` its share of it.
fn fairness() -> Figure {
    let config = enabled();
    let (overload_from, periods) = (10, 50);
    // The aggressive client: a larger policy (1000/s), offering 5000 pps.
    let (aggressive_limit, aggressive_offer) = (1_000u32, 5_000.0);
    // The modest ones: 100/s each, offering 40 to 78 pps.
    let modest: Vec<f64> = (0..20).map(|i| 40.0 + 2.0 * i as f64).collect();
    let limits: Vec<u32> = std::iter::once(aggressive_limit)
        .chain(modest.iter().map(|_| LIMIT))
        .collect();
    let offers: Vec<f64> = std::iter::once(aggressive_offer)
        .chain(modest.iter().copied())
        .collect();
    let total_rate: f64 = limits.iter().map(|&l| l as f64).sum();
    // The modest client plotted over time: one offering more than g · r would leave it.
    let shown = 1 + modest
        .iter()
        .position(|&m| m == 60.0)
        .expect("a 60 pps client");

    let mut ctl = Controller::new(config.clone()).expect("the default configuration is valid");
    let mut held: Vec<(u32, u32)> = limits.iter().map(|&l| (WINDOW_US, l)).collect();
    let enforced = |(w, a): (u32, u32)| a as f64 * 1e6 / w as f64;
    let (mut capacity, mut g, mut gi_aggressive, mut gi_modest) = (vec![], vec![], vec![], vec![]);
    let (mut aggressive_rate, mut modest_rate, mut modest_uniform) = (vec![], vec![], vec![]);
    for t in 0..periods {
        let cpu = if t < overload_from { 0.3 } else { 1.0 };
        let observations = offers
            .iter()
            .enumerate()
            .map(|(i, &rate)| ClientObservation {
                key: key(i),
                limit: limits[i],
                window_us: WINDOW_US,
                rate,
                weight: 1.0,
            });
        let output = ctl.step(&LoadSample { cpu }, observations);
        for decision in &output.decisions {
            if let Some(i) = (0..offers.len()).find(|&i| key(i) == decision.key) {
                held[i] = (decision.window_us, decision.allowance);
            }
        }
        let factor = |i: usize| ctl.desired(&key(i)).map_or(1.0, |d| d.load_factor);
        capacity.push(output.load_factor * total_rate);
        g.push(output.load_factor);
        gi_aggressive.push(factor(0));
        gi_modest.push(factor(shown));
        aggressive_rate.push(enforced(held[0]));
        modest_rate.push(enforced(held[shown]));
        modest_uniform.push(output.load_factor * R);
    }
    let final_g = g[periods - 1];
    let final_capacity = capacity[periods - 1];
    // What the legend and subtitle say: the modest ones are never cut; the aggressive one is cut
    // to the water level, below min_load_factor.
    for i in 1..offers.len() {
        let desired = ctl.desired(&key(i)).expect("tracked");
        assert_eq!(
            desired.load_factor, 1.0,
            "modest client {i} was cut: fix the legend"
        );
    }
    let level = gi_aggressive[periods - 1] * aggressive_limit as f64;
    assert!((level - (final_capacity - modest.iter().sum::<f64>())).abs() < 1e-6);
    assert!(gi_aggressive[periods - 1] < config.min_load_factor);

    let mut over_time = Panel::new(
        &format!(
            "Packets per second let through (A / W): CPU pinned at 100% from period \
             {overload_from}; g falls to {final_g}"
        ),
        130.0,
        Axis::log10(20.0, 10_000.0, true),
    );
    over_time.step(
        "aggressive: offered",
        &vec![aggressive_offer; periods],
        Stroke::dashed(VERMILLION, 1.6),
    );
    let aggressive_stroke = Stroke::solid(VERMILLION, 2.2);
    over_time.step("aggressive: A / W", &aggressive_rate, aggressive_stroke);
    over_time.step("capacity C = g · Σ r", &capacity, Stroke::solid(BLACK, 2.0));
    over_time.step(
        "modest (60 pps): A / W",
        &modest_rate,
        Stroke::solid(BLUE, 2.2),
    );
    over_time.step(
        "modest: offered",
        &vec![offers[shown]; periods],
        Stroke::dashed(BLUE, 1.6),
    );
    over_time.step(
        "modest if uniform: g · r",
        &modest_uniform,
        Stroke::dashed(SKY, 1.6),
    );
    over_time.marker(overload_from as f64, "CPU → 100%", Corner::Bottom);

    let mut factors = Panel::new(
        "Global g (the capacity) and each client's own factor gᵢ (its A / W = r · gᵢ)",
        96.0,
        Axis::linear(0.0, 1.0, 0.25, trim),
    );
    factors.step("g (global)", &g, Stroke::solid(BLACK, 2.0));
    factors.step(
        "gᵢ, aggressive",
        &gi_aggressive,
        Stroke::solid(VERMILLION, 2.2),
    );
    factors.step("gᵢ, modest (all 20)", &gi_modest, Stroke::dashed(BLUE, 2.2));
    factors.rule(
        &format!("min_load_factor = {}", config.min_load_factor),
        config.min_load_factor,
        Stroke::dashed(GREEN, 1.3),
    );
    factors.marker(overload_from as f64, "CPU → 100%", Corner::Bottom);

    let mut per_client = Panel::new(
        &format!(
            "Each client at the end: C = {} pps among 21 clients (log scale)",
            trim(final_capacity)
        ),
        170.0,
        Axis::log10(10.0, 10_000.0, false),
    );
    per_client.x = Some(Axis {
        min: -0.6,
        max: 20.6,
        log: false,
        ticks: (0..21)
            .map(|i| {
                let label = if i == 0 {
                    "aggr.".into()
                } else {
                    i.to_string()
                };
                (i as f64, label)
            })
            .collect(),
    });
    per_client.x_label = "client (aggr. = the aggressive one, 1–20 the modest ones)".into();
    per_client.bars("offered (pps)", indexed(&offers), 0.8, "#d4d4d4");
    let through: Vec<f64> = held.iter().map(|&h| enforced(h)).collect();
    per_client.bars("A / W let through", indexed(&through), 0.44, BLUE);
    let uniform: Vec<f64> = limits.iter().map(|&l| final_g * l as f64).collect();
    per_client.ticks(
        "uniform cut r · g",
        indexed(&uniform),
        0.8,
        Stroke::solid(BLACK, 2.4),
    );
    per_client.rule(
        &format!("water level λ = {} pps", trim(level)),
        level,
        Stroke::dashed(VERMILLION, 1.4),
    );

    Figure {
        width: 900.0,
        title: "Adaptive windows: fairness under overload (per-client factors gᵢ)".into(),
        subtitle: vec![
            "1 aggressive client (offers 5000 pps, policy 1000/s) and 20 modest ones (40–78 pps, \
             100/s). g sets the capacity C = g · Σ r;"
                .into(),
            "water-filling C over the demands min(û, 1) · r gives each client its gᵢ: the modest \
             keep their traffic (gᵢ = 1),"
                .into(),
            "the aggressive one is cut to λ, one step per period. A uniform cut r · g would take \
             up to 36% from the modest ones."
                .into(),
        ],
        x: period_axis(periods, 5.0),
        x_label: PERIOD_LABEL.into(),
        shading: Vec::new(),
        panels: vec![over_time, factors, per_client],
    }
}

/// `(i, values[i])` for bar charts over client indices.
fn indexed(values: &[f64]) -> Vec<(f64, f64)> {
    values
        .iter()
        .enumerate()
        .map(|(i, &v)| (i as f64, v))
        .collect()
}

// ---------------------------------------------------------------------------------------------
// A small hand-written SVG chart: stacked panels sharing a time axis, a legend beside each.

/// A number without trailing zeros: 0.25, 1, 12.5.
fn trim(v: f64) -> String {
    let s = format!("{v:.3}");
    s.trim_end_matches('0').trim_end_matches('.').to_string()
}

fn trim_int(v: f64) -> String {
    format!("{v:.0}")
}

/// An SVG coordinate, to 0.1 px.
fn px(v: f64) -> String {
    let s = format!("{v:.1}");
    match s.strip_suffix(".0") {
        Some(whole) => whole.to_string(),
        None => s,
    }
}

fn escape(text: &str) -> String {
    text.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
}

#[derive(Clone)]
struct Axis {
    min: f64,
    max: f64,
    log: bool,
    ticks: Vec<(f64, String)>,
}

impl Axis {
    fn linear(min: f64, max: f64, step: f64, label: fn(f64) -> String) -> Self {
        let count = ((max - min) / step).round() as usize;
        let ticks = (0..=count)
            .map(|i| min + step * i as f64)
            .map(|v| (v, label(v)))
            .collect();
        Axis {
            min,
            max,
            log: false,
            ticks,
        }
    }

    fn percent() -> Self {
        Axis::linear(0.0, 1.0, 0.25, |v| format!("{:.0}%", v * 100.0))
    }

    /// Log scale with a tick at every doubling from `min`.
    fn log2(min: f64, max: f64, label: fn(f64) -> String) -> Self {
        let count = (max / min).log2().round() as i32;
        let ticks = (0..=count)
            .map(|k| min * 2f64.powi(k))
            .map(|v| (v, label(v)))
            .collect();
        Axis {
            min,
            max,
            log: true,
            ticks,
        }
    }

    /// Log scale with ticks at every power of 10 from `min`, and at 2 and 5 of each decade if
    /// `minor`.
    fn log10(min: f64, max: f64, minor: bool) -> Self {
        let multiples: &[f64] = if minor { &[1.0, 2.0, 5.0] } else { &[1.0] };
        let decades = (max / min).log10().round() as i32;
        let ticks = (0..=decades)
            .flat_map(|k| multiples.iter().map(move |m| min * 10f64.powi(k) * m))
            .filter(|&v| v <= max * (1.0 + 1e-9))
            .map(|v| (v, trim(v)))
            .collect();
        Axis {
            min,
            max,
            log: true,
            ticks,
        }
    }

    /// Where `v` falls, 0 at `min` to 1 at `max` (log axes clamp non-positive values to `min`).
    fn fraction(&self, v: f64) -> f64 {
        if self.log {
            (v.max(self.min) / self.min).ln() / (self.max / self.min).ln()
        } else {
            (v - self.min) / (self.max - self.min)
        }
    }
}

#[derive(Clone, Copy)]
struct Stroke {
    colour: &'static str,
    width: f64,
    dashed: bool,
}

impl Stroke {
    fn solid(colour: &'static str, width: f64) -> Self {
        Stroke {
            colour,
            width,
            dashed: false,
        }
    }

    fn dashed(colour: &'static str, width: f64) -> Self {
        Stroke {
            colour,
            width,
            dashed: true,
        }
    }

    fn attributes(&self) -> String {
        let dash = if self.dashed {
            r#" stroke-dasharray="6 4""#
        } else {
            ""
        };
        format!(
            r#"stroke="{}" stroke-width="{}"{dash}"#,
            self.colour,
            px(self.width)
        )
    }
}

/// Opacity of filled areas, and of their legend swatches.
const AREA_OPACITY: &str = "0.35";

/// A background strip over the periods `from..to`, in every panel sharing the time axis.
struct Shade {
    from: f64,
    to: f64,
    fill: &'static str,
}

/// Where a marker's label goes: at the top or the bottom of the plot.
#[derive(Clone, Copy)]
enum Corner {
    Top,
    Bottom,
}

enum Item {
    /// Value `values[t]` held over period `[t, t + 1)`.
    Step(Vec<f64>, Stroke),
    /// The same, filled down to the axis, translucent.
    Area(Vec<f64>, &'static str),
    /// A horizontal reference line.
    Rule(f64, Stroke),
    /// Bars centred on `x`, `width` wide in axis units, from the axis floor up to the value.
    Bars(Vec<(f64, f64)>, f64, &'static str),
    /// A short horizontal mark at each value, `width` wide in axis units.
    Ticks(Vec<(f64, f64)>, f64, Stroke),
    /// A labelled vertical line at `x`.
    Marker(f64, String, Corner),
}

enum Key {
    Line(Stroke),
    Swatch(&'static str),
    Area(&'static str),
    Text,
}

struct Panel {
    title: String,
    height: f64,
    y: Axis,
    /// Its own x axis (drawn under it) instead of the figure's shared one.
    x: Option<Axis>,
    x_label: String,
    items: Vec<Item>,
    legend: Vec<(Key, String)>,
}

impl Panel {
    fn new(title: &str, height: f64, y: Axis) -> Self {
        Panel {
            title: title.into(),
            height,
            y,
            x: None,
            x_label: String::new(),
            items: Vec::new(),
            legend: Vec::new(),
        }
    }

    fn step(&mut self, name: &str, values: &[f64], stroke: Stroke) {
        self.items.push(Item::Step(values.to_vec(), stroke));
        self.legend.push((Key::Line(stroke), name.into()));
    }

    fn area(&mut self, name: &str, values: &[f64], fill: &'static str) {
        self.items.push(Item::Area(values.to_vec(), fill));
        self.legend.push((Key::Area(fill), name.into()));
    }

    fn rule(&mut self, name: &str, y: f64, stroke: Stroke) {
        self.items.push(Item::Rule(y, stroke));
        self.legend.push((Key::Line(stroke), name.into()));
    }

    fn bars(&mut self, name: &str, bars: Vec<(f64, f64)>, width: f64, fill: &'static str) {
        self.items.push(Item::Bars(bars, width, fill));
        self.legend.push((Key::Swatch(fill), name.into()));
    }

    fn ticks(&mut self, name: &str, marks: Vec<(f64, f64)>, width: f64, stroke: Stroke) {
        self.items.push(Item::Ticks(marks, width, stroke));
        self.legend.push((Key::Line(stroke), name.into()));
    }

    fn marker(&mut self, x: f64, label: &str, corner: Corner) {
        self.items.push(Item::Marker(x, label.into(), corner));
    }

    fn swatch(&mut self, name: &str, fill: &'static str) {
        self.legend.push((Key::Swatch(fill), name.into()));
    }

    fn note(&mut self, text: &str) {
        self.legend.push((Key::Text, text.into()));
    }
}

struct Figure {
    width: f64,
    title: String,
    /// One entry per line.
    subtitle: Vec<String>,
    x: Axis,
    x_label: String,
    shading: Vec<Shade>,
    panels: Vec<Panel>,
}

/// Left edge of the plots (room for the y tick labels).
const PLOT_LEFT: f64 = 62.0;
/// Left edge of the title.
const MARGIN: f64 = 18.0;
/// Width of the legend column right of the plots.
const LEGEND_WIDTH: f64 = 212.0;
/// Space above a panel for its title.
const PANEL_TITLE: f64 = 22.0;
/// Space under a panel that carries an x axis (ticks, labels, axis title).
const X_AXIS: f64 = 40.0;
/// Space between panels.
const GAP: f64 = 10.0;
/// Room kept inside a plot above its top tick and below its bottom one, so that lines at the
/// extremes are not cut in half by the frame.
const INSET: f64 = 5.0;

/// Where a panel's plot area sits.
#[derive(Clone, Copy)]
struct Frame {
    left: f64,
    right: f64,
    top: f64,
    bottom: f64,
}

impl Frame {
    fn x(&self, axis: &Axis, v: f64) -> f64 {
        self.left + axis.fraction(v) * (self.right - self.left)
    }

    fn y(&self, axis: &Axis, v: f64) -> f64 {
        let span = self.bottom - self.top - 2.0 * INSET;
        self.bottom - INSET - axis.fraction(v).clamp(-0.05, 1.05) * span
    }
}

struct Text {
    size: f64,
    anchor: &'static str,
    bold: bool,
    fill: &'static str,
}

const TITLE: Text = Text {
    size: 17.0,
    anchor: "start",
    bold: true,
    fill: BLACK,
};
const SUBTITLE: Text = Text {
    size: 12.0,
    anchor: "start",
    bold: false,
    fill: "#555555",
};
const HEADING: Text = Text {
    size: 12.0,
    anchor: "start",
    bold: true,
    fill: "#333333",
};
const LABEL: Text = Text {
    size: 11.0,
    anchor: "start",
    bold: false,
    fill: "#333333",
};
const NOTE: Text = Text {
    fill: "#666666",
    ..LABEL
};
const TICK_LEFT: Text = Text {
    size: 10.5,
    anchor: "end",
    bold: false,
    fill: "#555555",
};
const TICK_MIDDLE: Text = Text {
    anchor: "middle",
    ..TICK_LEFT
};
const MARKER: Text = Text {
    size: 10.5,
    ..LABEL
};

struct Svg(String);

impl Svg {
    fn text(&mut self, x: f64, y: f64, text: &str, style: &Text) {
        let weight = if style.bold {
            r#" font-weight="bold""#
        } else {
            ""
        };
        let _ = writeln!(
            self.0,
            r#"<text x="{}" y="{}" font-size="{}" text-anchor="{}" fill="{}"{weight}>{}</text>"#,
            px(x),
            px(y),
            px(style.size),
            style.anchor,
            style.fill,
            escape(text)
        );
    }

    fn line(&mut self, (x1, y1): (f64, f64), (x2, y2): (f64, f64), stroke: &Stroke) {
        let _ = writeln!(
            self.0,
            r#"<line x1="{}" y1="{}" x2="{}" y2="{}" {}/>"#,
            px(x1),
            px(y1),
            px(x2),
            px(y2),
            stroke.attributes()
        );
    }

    /// A rectangle; `extra` holds further attributes, each with a leading space.
    fn rect(&mut self, (x, y): (f64, f64), (w, h): (f64, f64), fill: &str, extra: &str) {
        let _ = writeln!(
            self.0,
            r#"<rect x="{}" y="{}" width="{}" height="{}" fill="{fill}"{extra}/>"#,
            px(x),
            px(y),
            px(w.max(0.0)),
            px(h.max(0.0))
        );
    }
}

impl Figure {
    /// Whether the panel `n` carries an x axis under it: its own, or the shared one under the
    /// last panel using it.
    fn axis_under(&self, n: usize) -> bool {
        self.panels[n].x.is_some() || self.panels.iter().rposition(|p| p.x.is_none()) == Some(n)
    }

    /// Where the first panel starts, under the title and subtitle.
    fn header(&self) -> f64 {
        48.0 + 16.0 * self.subtitle.len() as f64
    }

    fn height(&self) -> f64 {
        let panels: f64 = (0..self.panels.len())
            .map(|n| {
                let axis = if self.axis_under(n) { X_AXIS } else { 0.0 };
                PANEL_TITLE + self.panels[n].height + axis + GAP
            })
            .sum();
        (self.header() + panels).round()
    }

    fn render(&self, id: &str) -> String {
        let (width, height) = (self.width, self.height());
        let mut svg = Svg(String::new());
        let _ = writeln!(
            svg.0,
            r#"<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" viewBox="0 0 {w} {h}" font-family="DejaVu Sans, Helvetica, Arial, Liberation Sans, sans-serif">"#,
            w = px(width),
            h = px(height)
        );
        let _ = writeln!(svg.0, "<title>{}</title>", escape(&self.title));
        svg.rect((0.0, 0.0), (width, height), "#ffffff", "");
        svg.text(MARGIN, 28.0, &self.title, &TITLE);
        for (n, line) in self.subtitle.iter().enumerate() {
            svg.text(MARGIN, 48.0 + 16.0 * n as f64, line, &SUBTITLE);
        }
        let mut top = self.header();
        for (n, panel) in self.panels.iter().enumerate() {
            let frame = Frame {
                left: PLOT_LEFT,
                right: width - LEGEND_WIDTH,
                top: top + PANEL_TITLE,
                bottom: top + PANEL_TITLE + panel.height,
            };
            self.panel(&mut svg, &format!("{id}-{n}"), panel, frame);
            top = frame.bottom + GAP;
            if self.axis_under(n) {
                match &panel.x {
                    Some(own) => x_axis(&mut svg, own, &panel.x_label, frame),
                    None => x_axis(&mut svg, &self.x, &self.x_label, frame),
                }
                top += X_AXIS;
            }
        }
        svg.0.push_str("</svg>\n");
        svg.0
    }

    fn panel(&self, svg: &mut Svg, id: &str, panel: &Panel, frame: Frame) {
        let x_of = panel.x.as_ref().unwrap_or(&self.x);
        let x = |v: f64| frame.x(x_of, v);
        let y = |v: f64| frame.y(&panel.y, v);
        let size = (frame.right - frame.left, frame.bottom - frame.top);
        svg.text(frame.left, frame.top - 7.0, &panel.title, &HEADING);
        let _ = writeln!(
            svg.0,
            r#"<clipPath id="{id}"><rect x="{}" y="{}" width="{}" height="{}"/></clipPath>"#,
            px(frame.left),
            px(frame.top),
            px(size.0),
            px(size.1)
        );
        if panel.x.is_none() {
            for shade in &self.shading {
                let (x0, x1) = (x(shade.from), x(shade.to));
                svg.rect((x0, frame.top), (x1 - x0, size.1), shade.fill, "");
            }
        }
        let grid = Stroke::solid("#e0e0e0", 1.0);
        for (v, label) in &panel.y.ticks {
            let yv = y(*v);
            svg.line((frame.left, yv), (frame.right, yv), &grid);
            svg.text(frame.left - 6.0, yv + 3.5, label, &TICK_LEFT);
        }
        if panel.x.is_none() {
            for (v, _) in &self.x.ticks {
                svg.line((x(*v), frame.top), (x(*v), frame.bottom), &grid);
            }
        }
        let _ = writeln!(svg.0, r#"<g clip-path="url(#{id})" fill="none">"#);
        for item in &panel.items {
            match item {
                Item::Step(values, stroke) => {
                    let _ = writeln!(
                        svg.0,
                        r#"<path d="{}" {} stroke-linejoin="round"/>"#,
                        step_path(values, x, y),
                        stroke.attributes()
                    );
                }
                Item::Area(values, fill) => {
                    let floor = px(y(panel.y.min));
                    let _ = writeln!(
                        svg.0,
                        r#"<path d="M{} {floor} {} V{floor} Z" fill="{fill}" fill-opacity="{AREA_OPACITY}" stroke="none"/>"#,
                        px(x(0.0)),
                        step_path(values, x, y).replacen('M', "L", 1)
                    );
                }
                Item::Rule(v, stroke) => {
                    svg.line((frame.left, y(*v)), (frame.right, y(*v)), stroke);
                }
                Item::Bars(bars, w, fill) => {
                    for &(c, v) in bars {
                        let (x0, x1) = (x(c - w / 2.0), x(c + w / 2.0));
                        svg.rect((x0, y(v)), (x1 - x0, y(panel.y.min) - y(v)), fill, "");
                    }
                }
                Item::Ticks(marks, w, stroke) => {
                    for &(c, v) in marks {
                        svg.line((x(c - w / 2.0), y(v)), (x(c + w / 2.0), y(v)), stroke);
                    }
                }
                Item::Marker(at, label, corner) => {
                    let xv = x(*at);
                    let stroke = Stroke::dashed("#555555", 1.0);
                    svg.line((xv, frame.top), (xv, frame.bottom), &stroke);
                    // On a white backing, so that the lines do not cross the text.
                    let width = 5.7 * label.chars().count() as f64 + 6.0;
                    let top = match corner {
                        Corner::Top => frame.top + 2.0,
                        Corner::Bottom => frame.bottom - 16.0,
                    };
                    let backing = r#" fill-opacity="0.85""#;
                    svg.rect((xv + 2.0, top), (width, 14.0), "#ffffff", backing);
                    svg.text(xv + 5.0, top + 10.5, label, &MARKER);
                }
            }
        }
        svg.0.push_str("</g>\n");
        let border = r##" stroke="#9a9a9a" stroke-width="1""##;
        svg.rect((frame.left, frame.top), size, "none", border);
        legend(svg, &panel.legend, frame);
    }
}

/// Ticks and labels under `frame`, and the axis title.
fn x_axis(svg: &mut Svg, axis: &Axis, label: &str, frame: Frame) {
    let stroke = Stroke::solid("#9a9a9a", 1.0);
    for (v, text) in &axis.ticks {
        let xv = frame.x(axis, *v);
        svg.line((xv, frame.bottom), (xv, frame.bottom + 4.0), &stroke);
        svg.text(xv, frame.bottom + 16.0, text, &TICK_MIDDLE);
    }
    let middle = Text {
        anchor: "middle",
        ..LABEL
    };
    let centre = (frame.left + frame.right) / 2.0;
    svg.text(centre, frame.bottom + 33.0, label, &middle);
}

/// The legend right of `frame`, one entry per line from its top.
fn legend(svg: &mut Svg, entries: &[(Key, String)], frame: Frame) {
    let x = frame.right + 14.0;
    for (n, (key, text)) in entries.iter().enumerate() {
        let y = frame.top + 9.0 + 15.0 * n as f64;
        let swatch = |svg: &mut Svg, fill: &str, extra: &str| {
            let outline = format!(r##" stroke="#bdbdbd" stroke-width="0.8"{extra}"##);
            svg.rect((x, y - 9.0), (22.0, 11.0), fill, &outline);
        };
        match key {
            Key::Line(stroke) => svg.line((x, y - 3.5), (x + 22.0, y - 3.5), stroke),
            Key::Swatch(fill) => swatch(svg, fill, ""),
            Key::Area(fill) => swatch(svg, fill, &format!(r#" fill-opacity="{AREA_OPACITY}""#)),
            Key::Text => {}
        }
        let style = if matches!(key, Key::Text) {
            &NOTE
        } else {
            &LABEL
        };
        svg.text(x + 28.0, y, text, style);
    }
}

/// The outline of a step series: `values[t]` from `t` to `t + 1`.
fn step_path(values: &[f64], x: impl Fn(f64) -> f64, y: impl Fn(f64) -> f64) -> String {
    let mut d = String::new();
    let mut current: Option<String> = None;
    for (t, &v) in values.iter().enumerate() {
        let yv = px(y(v));
        if current.as_ref() == Some(&yv) {
            continue;
        }
        let xv = px(x(t as f64));
        if current.is_none() {
            let _ = write!(d, "M{xv} {yv}");
        } else {
            let _ = write!(d, " H{xv} V{yv}");
        }
        current = Some(yv);
    }
    let _ = write!(d, " H{}", px(x(values.len() as f64)));
    d
}
