//! The datapath model: grants written, flows counted by the sliding-window counter as the
//! XDP program counts them.

use std::time::Duration;

use limiter_common::maps::hot_count;

use super::{Grant, Sim};

/// A grant in a member's datapath, and the limit it was last counted at.
#[derive(Debug, Clone, Copy)]
pub(super) struct Entry {
    pub(super) grant: Grant,
    pub(super) counted: u32,
}

/// A client's packets at one member.
#[derive(Debug, Clone)]
pub(super) struct Flow {
    /// Packets per window arriving here.
    pub(super) rate: f64,
    /// passed + dropped since the flow began (what the agent reads from the client's entry).
    pub(super) count: f64,
    /// The datapath's window (index on the member's window grid), what it passed in it and in
    /// the window before (the sliding-window counter's two slots).
    pub(super) window: i64,
    pub(super) passed: f64,
    pub(super) previous: f64,
    /// The window in which the fast path last flagged the client.
    pub(super) flagged: i64,
    /// Member clock up to which packets were counted.
    pub(super) last: Duration,
}

impl Flow {
    /// Moves the counter to window `index`: the current window's count becomes the previous
    /// one's (or nothing, after a window without packets).
    fn roll(&mut self, index: i64) {
        if self.window != index {
            self.previous = if self.window == index - 1 {
                self.passed
            } else {
                0.0
            };
            self.passed = 0.0;
            self.window = index;
        }
    }

    /// The sliding-window estimate at `now` (member clock): the current window's count plus the
    /// previous one's, weighted by how much of it is still within the last window.
    pub(super) fn estimate(&self, phase: Duration, window: Duration, now: Duration) -> f64 {
        let since = now.saturating_sub(phase);
        let index = (since.as_nanos() / window.as_nanos()) as i64;
        let x = (since.as_secs_f64() / window.as_secs_f64()) - index as f64;
        // `window` starts at i64::MIN (never counted): no difference to take.
        match index.checked_sub(self.window) {
            Some(0) => self.passed + self.previous * (1.0 - x),
            Some(1) => self.passed * (1.0 - x),
            _ => 0.0,
        }
    }
}

/// What a sliding-window counter (`limiter_common::window`) admits of a fluid flow of `rate`
/// packets per window over `(x0, x1)` of one fixed window (in windows since its start), with
/// `current` already counted in this window, `previous` in the last one, and `limit` in force:
/// everything while the estimate `current + previous · (1 − x)` is below the limit; once it is
/// there, what the previous window's fading weight frees (`previous` per window); nothing while
/// it is above (a cut), until that weight has brought it down to the limit.
fn sliding_admit(current: f64, previous: f64, (x0, x1): (f64, f64), rate: f64, limit: f64) -> f64 {
    let estimate = current + previous * (1.0 - x0);
    let (before, at_limit_from) = if estimate < limit {
        if rate <= previous {
            // The estimate does not rise: all of it passes.
            return rate * (x1 - x0);
        }
        let reached = x0 + (limit - estimate) / (rate - previous);
        if reached >= x1 {
            return rate * (x1 - x0);
        }
        (rate * (reached - x0), reached)
    } else if previous > 0.0 {
        let reached = x0 + (estimate - limit) / previous;
        if reached >= x1 {
            return 0.0;
        }
        (0.0, reached)
    } else {
        return 0.0;
    };
    before + rate.min(previous) * (x1 - at_limit_from)
}

impl Sim {
    /// Counts client `c`'s packets at member `i` up to real time `real` through its datapath.
    pub(super) fn flow_until(&mut self, i: usize, c: u32, real: Duration) {
        let window = self.cfg.window;
        let node = &mut self.nodes[i];
        let now = node.clock.at(real);
        let Some(flow) = node.flows.get_mut(&c) else {
            return;
        };
        let mut from = flow.last;
        flow.last = now;
        if flow.rate <= 0.0 || now <= from {
            return;
        }
        let entry = node.grants.get(&c).copied();
        let mut admitted_parts: Vec<(Duration, Duration, f64)> = Vec::new();
        while from < now {
            let since = from.saturating_sub(node.window_phase);
            let index = (since.as_nanos() / window.as_nanos()) as i64;
            let window_end = node.window_phase + window * (index as u32 + 1);
            let mut to = window_end.min(now);
            // The limit in force changes where a lease ends.
            let mut in_force = node.cold;
            if let Some(e) = entry {
                let from_ns = from.as_nanos() as u64;
                in_force = e.grant.limit_at(from_ns, node.cold);
                if e.grant.until_ns > from_ns && e.grant.until_ns < to.as_nanos() as u64 {
                    to = Duration::from_nanos(e.grant.until_ns);
                }
            }
            flow.roll(index);
            let start = node.window_phase + window * index as u32;
            let at = |t: Duration| t.saturating_sub(start).as_secs_f64() / window.as_secs_f64();
            let (x0, x1) = (at(from), at(to));
            let arrived = flow.rate * (x1 - x0);
            let admitted = sliding_admit(
                flow.passed,
                flow.previous,
                (x0, x1),
                flow.rate,
                f64::from(in_force),
            );
            // As the fast path flags it (`limiter_common::maps::crosses_hot`): the admission
            // that takes the window's count to ⌈0.8 · limit⌉, or a drop.
            let hot = f64::from(hot_count(in_force));
            let crossed = flow.passed < hot && flow.passed + admitted >= hot;
            flow.passed += admitted;
            flow.count += arrived;
            if (crossed || arrived - admitted > 1e-9) && flow.flagged != index {
                flow.flagged = index;
                node.hot.push(c);
            }
            admitted_parts.push((from, to, admitted));
            from = to;
        }
        if self.measure.is_some() {
            let clock = self.nodes[i].clock;
            for (from, to, admitted) in admitted_parts {
                let (a, b) = (clock.real_at(from), clock.real_at(to));
                self.admit(c, a, b, admitted);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Runs a flow of `rate` per window through the model's counter for `windows` windows in
    /// `steps` steps each, the limit given per window; returns what each window admitted.
    fn run(rate: f64, limits: &[f64], steps: u32) -> Vec<f64> {
        let mut current = 0.0;
        let mut admitted = Vec::new();
        for &limit in limits {
            let previous = std::mem::replace(&mut current, 0.0);
            for s in 0..steps {
                let x = (
                    f64::from(s) / f64::from(steps),
                    f64::from(s + 1) / f64::from(steps),
                );
                current += sliding_admit(current, previous, x, rate, limit);
            }
            admitted.push(current);
        }
        admitted
    }

    /// A flow above its limit gets the limit in every window, however finely it is stepped; one
    /// under it passes whole.
    #[test]
    fn the_counter_admits_the_limit_per_window_and_all_of_a_flow_under_it() {
        for steps in [1, 7, 50] {
            let over = run(300.0, &[100.0; 6], steps);
            assert!(
                over.iter().all(|a| (a - 100.0).abs() < 1e-9),
                "{steps}: {over:?}"
            );
            let under = run(60.0, &[100.0; 6], steps);
            assert!(
                under.iter().all(|a| (a - 60.0).abs() < 1e-9),
                "{steps}: {under:?}"
            );
        }
    }

    /// Cut from 100 to 20 at a window's start: nothing passes until the previous window's
    /// weight has faded to the cut (at 80% of the window), then what the fading frees: 20 in
    /// the last fifth, and 20 in each window after.
    #[test]
    fn a_cut_passes_nothing_until_the_previous_window_fades_to_it() {
        let early = sliding_admit(0.0, 100.0, (0.0, 0.8), 300.0, 20.0);
        assert!(early.abs() < 1e-9, "{early}");
        let admitted = run(300.0, &[100.0, 100.0, 20.0, 20.0], 50);
        assert!((admitted[2] - 20.0).abs() < 1e-9, "{admitted:?}");
        assert!((admitted[3] - 20.0).abs() < 1e-9, "{admitted:?}");
    }
}
