//! The `adaptive` section of the config: the knobs of the controller ([`crate::adaptive`]),
//! their defaults and their ranges.

use serde::{Deserialize, Deserializer, de};

use super::Window;

/// The `adaptive` knobs. Every field has a default; `enabled: false` (the default) pins
/// `s = g = gᵢ = 1`. Unknown keys are errors. With the defaults spelled out:
///
/// ```yaml
/// enabled: true
/// period: 1s               # one Controller::step per period, 100ms to 60s
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
    /// The controller period, written like a window (`1s`, `250ms`), 100 ms to 60 s. The
    /// controller does not read it: the caller runs one `Controller::step` per period, and
    /// every knob counted in periods counts `step` calls.
    #[serde(deserialize_with = "deserialize_period")]
    pub period: Window,
    /// Lowest per-client scale `s` (≤ 1, > 0).
    pub min_scale: f64,
    /// Highest per-client scale `s` (≥ 1).
    pub max_scale: f64,
    /// Floor of the global load factor `g`, in (0, 1]. (A client's `gᵢ` can go lower: see the
    /// module docs.)
    pub min_load_factor: f64,
    /// Largest factor by which `s`, `g`, `gᵢ` or `p` moves in one period (> 1).
    pub step: f64,
    /// EWMA weight of the newest sample, in (0, 1].
    pub alpha: f64,
    /// Periods a reversal of `s`, `g` or `gᵢ` must be demanded before it happens (≥ 1).
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

/// The default [`AdaptiveConfig::period`], µs.
pub const DEFAULT_PERIOD_US: u32 = 1_000_000;
/// The shortest [`AdaptiveConfig::period`], µs.
pub const MIN_PERIOD_US: u32 = 100_000;
/// The longest [`AdaptiveConfig::period`], µs.
pub const MAX_PERIOD_US: u32 = 60_000_000;

impl Default for AdaptiveConfig {
    fn default() -> Self {
        AdaptiveConfig {
            enabled: false,
            period: Window {
                micros: DEFAULT_PERIOD_US,
            },
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

/// `period: 250ms`: a number and a unit of `ms`, `s` or `m`, a whole number of microseconds.
/// The range (100 ms to 60 s) is checked by [`AdaptiveConfig::validate`].
fn deserialize_period<'de, D: Deserializer<'de>>(d: D) -> Result<Window, D::Error> {
    let text = String::deserialize(d)?;
    parse_period(&text).map_err(de::Error::custom)
}

fn parse_period(s: &str) -> Result<Window, String> {
    let micros = super::parse_duration_us(s, "period")?;
    // The 100ms..=60s range is `validate`'s, which names the field and the bounds.
    if !(0.0..=u32::MAX as f64).contains(&micros) {
        return Err(format!(
            "period {:?} is out of range: it must be between 100ms and 60s",
            s.trim()
        ));
    }
    Ok(Window {
        micros: micros as u32,
    })
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
    /// Checks every knob; the first one out of range is the error. (`period` is reported in
    /// seconds.)
    pub fn validate(&self) -> Result<(), AdaptiveError> {
        let c = self;
        let unit = |x: f64| x > 0.0 && x <= 1.0; // false for NaN
        let finite_above = |x: f64, lo: f64| x.is_finite() && x > lo;
        let period = c.period.micros;
        ensure(
            (MIN_PERIOD_US..=MAX_PERIOD_US).contains(&period),
            "period",
            period as f64 / 1e6,
            "between 100ms and 60s (0.1 to 60 seconds)",
        )?;
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn period_parses_like_a_window() {
        let micros = |s: &str| parse_period(s).map(|w| w.micros);
        assert_eq!(micros("1s"), Ok(1_000_000));
        assert_eq!(micros(" 250ms "), Ok(250_000));
        assert_eq!(micros("0.1s"), Ok(100_000));
        assert_eq!(micros("1.1s"), Ok(1_100_000));
        assert_eq!(micros("2m"), Ok(120_000_000));
        // Out of the period's range, but a duration: validate() names it.
        assert_eq!(micros("5ms"), Ok(5_000));
        assert!(micros("1.5ms").is_ok());
        assert!(micros("0.0001ms").unwrap_err().contains("whole number"));
        assert_eq!(micros("1h"), Ok(3_600_000_000));
        assert!(micros("1d").unwrap_err().contains("unit"));
        assert!(micros("fast").unwrap_err().contains("invalid period"));
        assert!(micros("1..2s").unwrap_err().contains("not a number"));
        assert!(micros("100000m").unwrap_err().contains("out of range"));
    }
}
