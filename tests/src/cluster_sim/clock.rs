use std::time::Duration;

/// A member's clock: `offset + real·(1 + ppm/10⁶)`.
#[derive(Debug, Clone, Copy)]
pub(super) struct Clock {
    pub(super) offset: Duration,
    pub(super) ppm: i64,
}

impl Clock {
    pub(super) fn at(&self, real: Duration) -> Duration {
        let ns = real.as_nanos() as i128;
        let skewed = ns + ns * i128::from(self.ppm) / 1_000_000;
        self.offset + Duration::from_nanos(u64::try_from(skewed.max(0)).unwrap_or(u64::MAX))
    }

    /// The earliest real time at which this clock reads `clock` or more (0 if it already did at
    /// real time 0).
    pub(super) fn real_at(&self, clock: Duration) -> Duration {
        let Some(since) = clock.checked_sub(self.offset) else {
            return Duration::ZERO;
        };
        let real = since.as_nanos() as i128 * 1_000_000 / (1_000_000 + i128::from(self.ppm));
        let mut real = Duration::from_nanos(u64::try_from(real.max(0)).unwrap_or(u64::MAX));
        while real > Duration::ZERO && self.at(real - Duration::from_nanos(1)) >= clock {
            real -= Duration::from_nanos(1);
        }
        while self.at(real) < clock {
            real += Duration::from_nanos(1);
        }
        real
    }
}
