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
    let hour = Duration::from_secs(3600);
    let into = Duration::from_nanos((monotonic().as_nanos() % hour.as_nanos()) as u64);
    let left = hour - into;
    if left < needed {
        let wait = left + Duration::from_millis(50);
        eprintln!("an hour boundary of CLOCK_MONOTONIC is {left:?} away: waiting {wait:?}");
        thread::sleep(wait);
    }
    window_index(hour)
}
