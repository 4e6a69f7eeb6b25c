//! A holder's estimate of its demand for a global client, on its own clock: `demand()`, from
//! its own samples of the client's counters (passed + dropped), over the policy's window, or over
//! its last few sampling rounds when they show the rate has changed (`SHORT_SPANS`). Capped by
//! the adaptive loop's cap on the client, if any, it is what the holder reports to the client's
//! owner (`super::lease::Report::demand`).
//!
//! Only durations on the holder's own monotonic clock are measured, never a time compared with
//! another node's: a member whose wall clock is off by an hour, or steps, reports the same
//! demand. How the owner merges a holder's reports is the ledger's (`super::lease`).

use std::{collections::VecDeque, time::Duration};

/// The spans, in sampling rounds back from the newest sample, that [`demand`] looks for a change
/// over, shortest first.
pub(super) const SHORT_SPANS: [usize; 3] = [1, 2, 4];
const _: () = assert!(
    SHORT_SPANS[0] < SHORT_SPANS[1] && SHORT_SPANS[1] < SHORT_SPANS[2],
    "demand() and the trimming in enrolment's observe() take SHORT_SPANS to be ascending"
);

/// The fewest packets a short span must hold (or would at the rate it is compared with) to be
/// measured over: below that, a span of a few rounds is mostly noise (at 10 packets a second, 0
/// or 1 in 200 ms), and the window's rate is used.
const SHORT_SPAN_PACKETS: u64 = 16;

/// Packets per `window` the client sends this member: over the last window (at least two
/// sampling rounds), unless the last rounds show the rate has changed. They show a change when
/// the longest short span (of [`SHORT_SPANS`] rounds) differs from what the window's rate
/// predicts by more than chance would (three standard deviations of a Poisson count, and two
/// packets) and holds enough packets to measure (at the window's rate, or its own: a busy client
/// that stopped reads as stopped within a few rounds). Demand is then the rate over the
/// longest span that also differs from the window's rate and whose older part agrees with each
/// shorter span's rate, so that it measures only the new rate, with the least noise: a rise
/// sixteenfold reads in full one round later, not diluted over four. The longest span has to
/// differ first so that a client whose packets come in bursts every second or fourth round (a
/// poller, TCP's round trips) keeps the window's rate rather than swinging with each burst;
/// bursts whose cycle the four rounds do not hold whole (every third round, or fifth) still
/// swing, as they did when only that span was measured over, and more with the shorter spans.
/// A steady client's demand stays the window's. What the shorter spans cost: after a step, the
/// older part of a span is tested against a shorter span's count scaled up, whose own noise the
/// tolerance does not count, so in a round in several the demand is measured over a shorter
/// span than it could be (noisier than over four).
///
/// The short spans are what let a spread change settle within a window and a few sync
/// intervals: over a whole window, the member the traffic left would go on reporting (and be
/// granted) its old demand for a window while the member it moved to waited. It is safe because
/// the owner raises nobody into room a cut member's window still holds (its reports' `used`).
pub(super) fn demand(samples: &VecDeque<(Duration, u64)>, now: Duration, window: Duration) -> u32 {
    let Some(&(newest_at, newest)) = samples.back() else {
        return 0;
    };
    let from = now.saturating_sub(window);
    let Some(&(oldest_at, oldest)) = samples
        .iter()
        .find(|(at, _)| *at >= from)
        .filter(|(at, _)| *at < newest_at)
        .or_else(|| samples.iter().rev().nth(1))
    else {
        return 0;
    };
    let per_window = |packets: u64, elapsed: Duration| -> u32 {
        let packets = u128::from(packets);
        u32::try_from(packets * window.as_nanos() / elapsed.as_nanos()).unwrap_or(u32::MAX)
    };
    let elapsed = newest_at.saturating_sub(oldest_at);
    if elapsed.is_zero() {
        return 0;
    }
    let packets = newest.saturating_sub(oldest);
    // Packets a span of `span` holds at the rate of `count` over `over` (not zero).
    let at_rate = |count: u64, over: Duration, span: Duration| -> u64 {
        u64::try_from(u128::from(count) * span.as_nanos() / over.as_nanos()).unwrap_or(u64::MAX)
    };
    // Whether `seen` packets differ from the `expected` by more than chance.
    let differs = |expected: u64, seen: u64| -> bool {
        seen.max(expected) >= SHORT_SPAN_PACKETS
            && seen.abs_diff(expected) as f64 > 3.0 * (expected as f64).sqrt() + 2.0
    };
    // Each short span back from the newest sample, and the packets in it (`None` for one
    // reaching before the window's oldest sample, or of no length).
    let spans = SHORT_SPANS.map(|rounds| {
        let &(at, count) = samples.iter().rev().nth(rounds)?;
        (at >= oldest_at && at < newest_at).then(|| (newest_at - at, newest.saturating_sub(count)))
    });
    let changed =
        |&(span, in_span): &(Duration, u64)| differs(at_rate(packets, elapsed, span), in_span);
    if !spans.iter().flatten().next_back().is_some_and(changed) {
        return per_window(packets, elapsed);
    }
    for (i, &(span, in_span)) in spans
        .iter()
        .enumerate()
        .rev()
        .filter_map(|(i, s)| Some((i, s.as_ref()?)))
    {
        if !changed(&(span, in_span)) {
            continue;
        }
        // The part of this span before each shorter one, against the shorter one's rate.
        let agree = spans[..i].iter().flatten().all(|&(shorter, count)| {
            let (older, older_count) =
                (span.saturating_sub(shorter), in_span.saturating_sub(count));
            !differs(at_rate(count, shorter, older), older_count)
        });
        if agree {
            return per_window(in_span, span);
        }
    }
    per_window(packets, elapsed)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Samples of a client's counter every 50 ms: `rate(i)` packets per second in round `i`.
    fn sampled(rounds: u32, rate: impl Fn(u32) -> u64) -> VecDeque<(Duration, u64)> {
        let mut samples = VecDeque::new();
        let mut count = 0;
        for i in 0..rounds {
            count += rate(i) / 20;
            samples.push_back((Duration::from_millis(50 * u64::from(i)), count));
        }
        samples
    }

    /// A busy client's demand follows a change within a few rounds (the short span); a slow one's
    /// is measured over the window, where a few rounds would hold a packet or none.
    #[test]
    fn demand_follows_a_busy_client_within_rounds_and_a_slow_one_over_the_window() {
        let window = Duration::from_secs(1);
        let last = |s: &VecDeque<(Duration, u64)>| s.back().expect("samples").0;
        // 2,000 a second, then nothing from round 40 on: five rounds later it reads 0.
        let stopped = sampled(45, |i| if i < 40 { 2_000 } else { 0 });
        assert_eq!(demand(&stopped, last(&stopped), window), 0);
        // ...where the window's rate would still say about 1,000.
        let busy = sampled(40, |_| 2_000);
        assert_eq!(demand(&busy, last(&busy), window), 2_000);
        // 100 a second, then 2,000: it reads 2,000 one round later (the one-round span; the
        // two- and four-round spans, which hold the change, would read 1,050 and 575)...
        let rose = sampled(45, |i| if i < 44 { 100 } else { 2_000 });
        assert_eq!(demand(&rose, last(&rose), window), 2_000);
        // ...and from three rounds on, over the spans that hold only the new rate.
        for since in [42, 41, 38] {
            let rose = sampled(45, |i| if i < since { 100 } else { 2_000 });
            assert_eq!(
                demand(&rose, last(&rose), window),
                2_000,
                "since round {since}"
            );
        }
        // 20 a second (one packet a round): too few for the short span, so the window's rate, which
        // a 10-packet burst in the last round moves only a little.
        let slow = sampled(40, |i| if i == 39 { 200 } else { 20 });
        let d = demand(&slow, last(&slow), window);
        assert!((20..=40).contains(&d), "{d}");
    }

    /// A step reads as the new rate from the round after it on, with no dip while the short spans
    /// still hold the old rate (a span is measured over only when its older part agrees with the
    /// shorter spans' rate): up from nothing, up fourfold, and down to nothing (from the second
    /// round: after one, the four-round span still holds three rounds at 400 a second, within
    /// chance of the window's rate).
    #[test]
    fn demand_after_a_step_is_the_new_rate_every_round() {
        let window = Duration::from_secs(1);
        for (before, after, from_round) in [(0, 800, 1), (400, 1_600, 1), (400, 0, 2)] {
            for rounds_since in from_round..=6 {
                let stepped = sampled(40 + rounds_since, |i| if i < 40 { before } else { after });
                let now = stepped.back().expect("samples").0;
                assert_eq!(
                    demand(&stepped, now, window),
                    after as u32,
                    "{before} -> {after} a second, {rounds_since} rounds on"
                );
            }
        }
    }

    /// A client whose packets come in bursts every second or fourth round (a poller, TCP's round
    /// trips) keeps the window's rate as its demand, whichever round of its cycle the sample ends
    /// in: its one-round span swings with every burst, its longest holds whole cycles. (A cycle of
    /// three or five rounds still swings: see `demand`.)
    #[test]
    fn demand_of_a_client_sending_in_bursts_stays_the_windows() {
        let window = Duration::from_secs(1);
        for (period, burst) in [(2, 800), (4, 1_600), (4, 8_000)] {
            for end in 40..40 + period {
                let bursty = sampled(end, |i| if i % period == 0 { burst } else { 0 });
                let now = bursty.back().expect("samples").0;
                let mean = burst / period as u64;
                let d = u64::from(demand(&bursty, now, window));
                assert!(
                    d.abs_diff(mean) <= mean / 10,
                    "a burst of {burst}/s every {period} rounds, ending in round {end}: {d}, \
                     not about {mean}"
                );
            }
        }
    }

    /// A busy client whose rate wobbles by chance keeps the window's rate as its demand: a few
    /// rounds of it are not taken for a change.
    #[test]
    fn demand_stays_the_windows_through_chance_wobbles() {
        let window = Duration::from_secs(1);
        // 400 a second (20 a round), the last four rounds 22, 18, 23, 19: within chance.
        let wobbly = sampled(40, |i| match i {
            36 => 440,
            37 => 360,
            38 => 460,
            39 => 380,
            _ => 400,
        });
        let now = wobbly.back().expect("samples").0;
        // The window's rate (the wobble's part in it: 402), not the last rounds' 410.
        assert_eq!(demand(&wobbly, now, window), 402);
    }
}
