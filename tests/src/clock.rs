//! CLOCK_MONOTONIC and its window boundaries: the XDP program's windows are aligned to it, so a
//! test with exact counts must not straddle a boundary.

use std::{mem, thread, time::Duration};

/// CLOCK_MONOTONIC, the clock the XDP program's windows are aligned to.
pub fn monotonic() -> Duration {
    // SAFETY: an all-zero timespec is valid; clock_gettime fills it.
    let mut ts: libc::timespec = unsafe { mem::zeroed() };
    // SAFETY: `ts` is a live timespec for the call to fill; CLOCK_MONOTONIC always exists.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    Duration::new(ts.tv_sec as u64, ts.tv_nsec as u32)
}

/// The fixed window (of `window` length) that CLOCK_MONOTONIC is in now.
pub fn window_index(window: Duration) -> u128 {
    monotonic().as_nanos() / window.as_nanos()
}

/// With `window: 1h` the limiter is exact only while no hour boundary of CLOCK_MONOTONIC falls
/// between a client's first and last packet. If the next boundary is less than `needed` away,
/// sleeps until just past it (at most `needed`) and says so. Returns the hour index to check
/// against afterwards with [`window_index`].
pub fn clear_of_hour_boundary(needed: Duration) -> u128 {
    clear_of_boundary(Duration::from_secs(3600), needed)
}

/// [`clear_of_hour_boundary`] for windows of any length: if the current `window` of
/// CLOCK_MONOTONIC ends less than `needed` from now, sleeps until just past its end (so `needed`
/// should be well under `window`). Returns the window index to check against afterwards with
/// [`window_index`].
///
/// It also keeps clear of the boundary just passed. For windows of 1 s and up the fast path
/// decides on the coarse clock, up to two jiffies behind CLOCK_MONOTONIC (8 ms at HZ=250,
/// 20 ms at HZ=100). A send that starts within that lag of a boundary has its first packets
/// counted in the previous window there and the rest in the new one, whose sliding estimate
/// floors the previous count's weight (just under 1) and so admits one packet more than the
/// limit: an exact count asserted over one window would see L + 1.
pub fn clear_of_boundary(window: Duration, needed: Duration) -> u128 {
    let settle = Duration::from_millis(50).min(window / 10);
    let into = Duration::from_nanos((monotonic().as_nanos() % window.as_nanos()) as u64);
    let left = window - into;
    if left < needed {
        let wait = left + settle;
        // Worth saying only when the wait is long.
        if window >= Duration::from_secs(60) {
            eprintln!(
                "a {window:?} boundary of CLOCK_MONOTONIC is {left:?} away: waiting {wait:?}"
            );
        }
        thread::sleep(wait);
    } else if into < settle {
        thread::sleep(settle - into);
    }
    window_index(window)
}
