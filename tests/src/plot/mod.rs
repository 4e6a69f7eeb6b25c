//! Renders the adaptive-window controller (`limiter_user::adaptive`) at work as four SVG charts,
//! for the README: a CPU step, a square-wave load faster than the dwell, the client patterns, and
//! fairness under overload. The scenarios are [`crate::adaptive_sim`]'s, which its tests
//! (`tests/tests/adaptive_sim.rs`) check; every value plotted comes from the real
//! `Controller::step` (its decisions, as the datapath would hold them). No clock and no randomness: one loop iteration is one period, and the output is
//! the same bytes on every run.
//!
//! Usage: `plot-adaptive [--out DIR]` (default: the workspace's `docs/`). Writes
//! `adaptive-load-step.svg`, `adaptive-square-wave.svg`, `adaptive-client-patterns.svg` and
//! `adaptive-fairness.svg`.

mod svg;

use std::path::PathBuf;

use anyhow::{Context as _, ensure};

use self::svg::{Axis, Corner, Figure, Panel, Shade, Stroke, trim, trim_int};
use crate::adaptive_sim::{
    self as sim, AdaptiveConfig, Band, Client, R, Trace, client_patterns, enabled, fair_run, key,
    load_step, simulate,
};

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

/// `plot-adaptive [--out DIR]`.
#[derive(clap::Parser)]
#[command(about = "Renders the adaptive controller's simulations as SVG charts")]
pub struct Args {
    /// Where to write the SVGs (default: the workspace's docs/).
    #[arg(long, value_name = "DIR")]
    pub out: Option<PathBuf>,
}

/// Writes the four charts into `args.out`.
pub fn run(args: &Args) -> anyhow::Result<()> {
    let out = match &args.out {
        Some(out) => out.clone(),
        None => PathBuf::from(env!("CARGO_MANIFEST_DIR"))
            .parent()
            .context("the tests crate has a parent directory")?
            .join("docs"),
    };
    std::fs::create_dir_all(&out).with_context(|| format!("creating {}", out.display()))?;
    let figures = [
        ("adaptive-load-step.svg", load_step()),
        ("adaptive-square-wave.svg", square_wave()),
        ("adaptive-client-patterns.svg", client_patterns()),
        ("adaptive-fairness.svg", fairness()?),
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
// What the scenarios' traces look like on a chart.

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
    let (up, down, periods) = (load_step::UP, load_step::DOWN, load_step::PERIODS);
    let trace = simulate(
        config.clone(),
        load_step::cpu,
        &load_step::clients(),
        periods,
    );
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
    let (fast_until, periods) = (sim::square_wave::FAST_UNTIL, sim::square_wave::PERIODS);
    let cpu = sim::square_wave::cpu;
    let unsmoothed = AdaptiveConfig {
        alpha: 1.0,
        ..enabled()
    };
    let no_dwell = AdaptiveConfig {
        dwell: 1,
        ..unsmoothed.clone()
    };
    let patterns = sim::square_wave::clients();
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
    let periods = client_patterns::PERIODS;
    let trace = simulate(
        config.clone(),
        client_patterns::cpu,
        &client_patterns::clients(),
        periods,
    );
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
                "Switching (u = 0.2, then 1 from period {}): grows, then shrinks back \
                 to 1",
                client_patterns::SWITCH_AT
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
fn fairness() -> anyhow::Result<Figure> {
    let config = enabled();
    let (overload_from, periods) = (sim::fairness::OVERLOAD_FROM, sim::fairness::PERIODS);
    let clients = sim::fairness::clients();
    let (aggressive_limit, aggressive_offer) = (clients[0].limit, clients[0].offered);
    // The modest ones: 100/s each, offering 40 to 78 pps.
    let modest: Vec<f64> = clients[1..].iter().map(|c| c.offered).collect();
    let offers: Vec<f64> = clients.iter().map(|c| c.offered).collect();
    let limits: Vec<u32> = clients.iter().map(|c| c.limit).collect();
    let total_rate: f64 = clients.iter().map(Client::r).sum();
    // The modest client plotted over time: one offering more than g · r would leave it.
    let shown = 1 + modest
        .iter()
        .position(|&m| m == 60.0)
        .context("the fairness scenario has a 60 pps client")?;

    let (ctl, run) = fair_run(config.clone(), sim::fairness::cpu, &clients, periods);
    let g = run.g.clone();
    let capacity: Vec<f64> = g.iter().map(|g| g * total_rate).collect();
    let gi_aggressive = run.gi[0].clone();
    let gi_modest = run.gi[shown].clone();
    let aggressive_rate: Vec<f64> = (0..periods).map(|t| run.enforced(0, t)).collect();
    let modest_rate: Vec<f64> = (0..periods).map(|t| run.enforced(shown, t)).collect();
    let modest_uniform: Vec<f64> = g.iter().map(|g| g * R).collect();
    let final_g = g[periods - 1];
    let final_capacity = capacity[periods - 1];
    // What the legend and subtitle say: the modest ones are never cut; the aggressive one is cut
    // to the water level, below min_load_factor.
    for i in 1..offers.len() {
        let cut = ctl.desired(&key(i)).map(|d| d.load_factor);
        ensure!(
            cut == Some(1.0),
            "modest client {i} was cut ({cut:?}): fix the legend"
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
    let through: Vec<f64> = (0..clients.len())
        .map(|i| run.enforced(i, periods - 1))
        .collect();
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

    Ok(Figure {
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
    })
}

/// `(i, values[i])` for bar charts over client indices.
fn indexed(values: &[f64]) -> Vec<(f64, f64)> {
    values
        .iter()
        .enumerate()
        .map(|(i, &v)| (i as f64, v))
        .collect()
}
