//! Property tests of the sliding-window counter against a brute-force reference that keeps a log
//! of every admitted hit and recomputes the estimate from it.

#![expect(
    clippy::expect_used,
    reason = "test helpers outside #[test] functions; a panic there is the test failing"
)]

use std::num::NonZeroU64;

use limiter_common::window::{self, FRAC_BITS};
use proptest::prelude::*;

const MS: u64 = 1_000_000;
const MIN_WINDOW_NS: u64 = window::MIN_WINDOW_US as u64 * 1000;
const MAX_WINDOW_NS: u64 = window::MAX_WINDOW_US as u64 * 1000;

fn nz(w: u64) -> NonZeroU64 {
    NonZeroU64::new(w).expect("windows are never zero")
}

/// The reference: a log of admitted `(time, hits)`.
#[derive(Default)]
struct Reference {
    log: Vec<(u64, u64)>,
}

impl Reference {
    /// Admitted hits in fixed window `index`.
    fn in_window(&self, index: u64, w: u64) -> u64 {
        self.log
            .iter()
            .filter(|(t, _)| t / w == index)
            .map(|(_, h)| h)
            .sum()
    }

    /// Admitted hits with a time in `[from, to]`.
    fn in_interval(&self, from: u64, to: u64) -> u64 {
        self.log
            .iter()
            .filter(|(t, _)| (from..=to).contains(t))
            .map(|(_, h)| h)
            .sum()
    }

    /// `(previous-window count, weight)` at `t`.
    fn prev_and_weight(&self, t: u64, w: u64) -> (u64, u64) {
        let index = t / w;
        let prev = if index == 0 {
            0
        } else {
            self.in_window(index - 1, w)
        };
        let elapsed = t - index * w;
        (prev, ((w - elapsed) << FRAC_BITS) / w)
    }

    fn admit(&mut self, t: u64, w: u64, limit: u32, hits: u32) -> bool {
        let cur = self.in_window(t / w, w);
        let (prev, weight) = self.prev_and_weight(t, w);
        let estimate = cur + ((prev * weight) >> FRAC_BITS);
        let admitted = estimate + hits as u64 <= limit as u64;
        if admitted && hits > 0 {
            self.log.push((t, hits as u64));
        }
        admitted
    }
}

/// How the next time follows the previous one.
#[derive(Debug, Clone)]
enum Step {
    Same,
    /// A little later (below a thousandth of a window).
    Small(u64),
    /// Exactly the start of the next window.
    Boundary,
    /// One nanosecond before the next window.
    JustBefore,
    /// Anywhere in the next window length (may cross one boundary).
    Within(u64),
    /// `windows` whole windows later, plus an offset.
    Gap {
        windows: u64,
        offset: u64,
    },
}

impl Step {
    fn apply(&self, t: u64, w: u64) -> u64 {
        let next_boundary = (t / w + 1) * w;
        match *self {
            Step::Same => t,
            Step::Small(x) => t + x % (w / 1000 + 1),
            Step::Boundary => next_boundary,
            Step::JustBefore => next_boundary - 1,
            Step::Within(x) => t + x % w,
            Step::Gap { windows, offset } => t + windows * w + offset % w,
        }
    }
}

fn step() -> impl Strategy<Value = Step> {
    prop_oneof![
        2 => Just(Step::Same),
        6 => any::<u64>().prop_map(Step::Small),
        2 => Just(Step::Boundary),
        2 => Just(Step::JustBefore),
        3 => any::<u64>().prop_map(Step::Within),
        1 => (1u64..=6, any::<u64>()).prop_map(|(windows, offset)| Step::Gap { windows, offset }),
    ]
}

/// Hits per decision: mostly 0..=3, sometimes a large batch relative to the limit.
#[derive(Debug, Clone)]
enum Hits {
    Few(u32),
    PercentOfLimit(u8),
    Any(u32),
}

impl Hits {
    fn resolve(&self, limit: u32) -> u32 {
        match *self {
            Hits::Few(h) => h,
            Hits::PercentOfLimit(p) => (limit as u64 * p as u64 / 100) as u32,
            Hits::Any(h) => h,
        }
    }
}

fn hits() -> impl Strategy<Value = Hits> {
    prop_oneof![
        30 => (0u32..=3).prop_map(Hits::Few),
        1 => (0u8..=100).prop_map(Hits::PercentOfLimit),
        1 => any::<u32>().prop_map(Hits::Any),
    ]
}

fn window_ns() -> impl Strategy<Value = u64> {
    prop_oneof![
        Just(MIN_WINDOW_NS),
        Just(1000 * MS),
        Just(MAX_WINDOW_NS),
        MIN_WINDOW_NS..=MAX_WINDOW_NS,
        // Whole microseconds, as policies have.
        (window::MIN_WINDOW_US..=window::MAX_WINDOW_US).prop_map(|us| us as u64 * 1000),
    ]
}

fn limit() -> impl Strategy<Value = u32> {
    prop_oneof![
        0u32..=20,
        0u32..=1000,
        any::<u32>(),
        (u32::MAX - 100)..=u32::MAX
    ]
}

fn start() -> impl Strategy<Value = u64> {
    // Small times, and times whose window index is beyond 2^32 (tags are the index's low 32 bits).
    prop_oneof![0u64..=10 * MAX_WINDOW_NS, 0u64..(1 << 62)]
}

/// One scenario: a window, a limit, and timed requests.
#[derive(Debug, Clone)]
struct Scenario {
    w: u64,
    limit: u32,
    start: u64,
    steps: Vec<(Step, Hits)>,
}

fn scenario() -> impl Strategy<Value = Scenario> {
    (
        window_ns(),
        limit(),
        start(),
        prop::collection::vec((step(), hits()), 1..300),
    )
        .prop_map(|(w, limit, start, steps)| Scenario {
            w,
            limit,
            start,
            steps,
        })
}

/// `(time, hits, admitted)` of each decision.
type Decisions = Vec<(u64, u32, bool)>;

/// The decisions of a scenario, checked against the reference.
fn run(s: &Scenario) -> Result<(Decisions, Reference), TestCaseError> {
    let mut slots = [0u64; 2];
    let mut reference = Reference::default();
    let mut t = s.start;
    let mut decisions = Vec::with_capacity(s.steps.len());
    for (i, (step, hits)) in s.steps.iter().enumerate() {
        t = step.apply(t, s.w);
        let hits = hits.resolve(s.limit);
        let expected = reference.admit(t, s.w, s.limit, hits);
        let got = window::admit(&mut slots, t, nz(s.w), s.limit, hits);
        prop_assert_eq!(
            got,
            expected,
            "decision {} at t={} (window index {}, elapsed {}), hits {}, slots {:x?}",
            i,
            t,
            t / s.w,
            t % s.w,
            hits,
            slots
        );
        decisions.push((t, hits, got));
    }
    Ok((decisions, reference))
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 512, ..ProptestConfig::default() })]

    /// `window::admit` makes exactly the reference's decision every time.
    #[test]
    fn agrees_with_the_reference(s in scenario()) {
        run(&s)?;
    }

    /// No fixed window ever admits more than `limit` hits.
    #[test]
    fn fixed_window_never_exceeds_the_limit(s in scenario()) {
        let (decisions, reference) = run(&s)?;
        for &(t, _, _) in &decisions {
            let admitted = reference.in_window(t / s.w, s.w);
            prop_assert!(admitted <= s.limit as u64, "window {} admitted {}", t / s.w, admitted);
        }
    }

    /// In every sliding interval `[t - w, t]` ending at an admitted hit, the hits admitted are at
    /// most `limit + prev - floor(prev * weight(t))`: the estimate counts the previous window's
    /// `prev` hits as spread evenly, so at most the part of `prev` it discounts can exceed the
    /// limit (all of it when `prev`'s hits came at the end of its window). Hence also `2 * limit`.
    #[test]
    fn sliding_interval_bound(s in scenario()) {
        let (decisions, reference) = run(&s)?;
        for &(t, hits, admitted) in &decisions {
            if !admitted || hits == 0 {
                continue;
            }
            let (prev, weight) = reference.prev_and_weight(t, s.w);
            let discounted = prev - ((prev * weight) >> FRAC_BITS);
            let in_interval = reference.in_interval(t.saturating_sub(s.w), t);
            prop_assert!(
                in_interval <= s.limit as u64 + discounted,
                "t={} admitted {} in [t-w, t]; limit {}, prev {}, weight {}",
                t, in_interval, s.limit, prev, weight
            );
            prop_assert!(in_interval <= 2 * s.limit as u64);
        }
    }

    /// Over any interval `[t, t + k*w)` (it meets at most `k + 1` fixed windows) at most
    /// `(k + 1) * limit` hits are admitted.
    #[test]
    fn long_run_rate(s in scenario(), k in 1u64..=8) {
        let (decisions, reference) = run(&s)?;
        for &(t, _, _) in &decisions {
            let admitted = reference.in_interval(t, t + k * s.w - 1);
            prop_assert!(admitted <= (k + 1) * s.limit as u64, "{} admitted in {} windows from t={}", admitted, k, t);
        }
    }

    /// A saturating sender (one hit per step) is admitted exactly `limit` hits in a fresh window.
    #[test]
    fn fresh_window_admits_exactly_the_limit(w in window_ns(), limit in 0u32..=500, idle in 2u64..=1000, offset in any::<u64>()) {
        let mut slots = [0u64; 2];
        let t0 = idle * w + offset % (w / 2);
        let step = (w / 2) / (limit as u64 + 10);
        let admitted = (0..limit as u64 + 10)
            .filter(|i| window::admit(&mut slots, t0 + i * step, nz(w), limit, 1))
            .count();
        prop_assert_eq!(admitted, limit as usize);
    }

    /// The previous window's weight is in `(0, 1]` and never grows within a window.
    #[test]
    fn weight_is_a_fraction(w in window_ns(), t in any::<u64>(), d in any::<u64>()) {
        let t = t >> 2;
        let p = window::position(t, nz(w));
        prop_assert!(p.weight > 0 && p.weight <= 1 << FRAC_BITS);
        prop_assert_eq!(p.index, t / w);
        let later = (t + d % w).min(p.index * w + w - 1);
        prop_assert!(window::position(later, nz(w)).weight <= p.weight);
    }

    /// `admitted_after` is the exact first admitted moment: `decide` denies one nanosecond
    /// earlier and admits then, and `reset_after` is the first moment the estimate is zero.
    #[test]
    fn retry_and_reset_are_exact(s in scenario(), hits in 0u32..=600) {
        let (decisions, _) = run(&s)?;
        let Some(&(t_last, _, _)) = decisions.last() else { return Ok(()) };
        let mut slots = [0u64; 2];
        for &(t, h, _) in &decisions {
            window::admit(&mut slots, t, nz(s.w), s.limit, h);
        }
        let now = t_last + 1;
        match window::admitted_after(&slots, now, nz(s.w), s.limit, hits) {
            None => prop_assert!(hits > s.limit),
            Some(d) => {
                prop_assert!(d <= 2 * s.w);
                prop_assert!(window::decide(&slots, now + d, nz(s.w), s.limit, hits) != window::Verdict::Deny);
                if d > 0 {
                    prop_assert_eq!(window::decide(&slots, now + d - 1, nz(s.w), s.limit, hits), window::Verdict::Deny);
                }
            }
        }
        let r = window::reset_after(&slots, now, nz(s.w));
        prop_assert_eq!(window::estimate_at(&slots, now + r, nz(s.w)), 0);
        if r > 0 {
            prop_assert!(window::estimate_at(&slots, now + r - 1, nz(s.w)) > 0);
        }
    }
}
