//! The platform's one backoff: a wait that doubles with each failure in a
//! row, from `first` up to `max`, with optional jitter (so that many
//! retries that failed together do not come back together). Used for ACME
//! orders, the supervisor's restarts of platform services and the service
//! manager's restarts of user services.
#![deny(clippy::disallowed_methods)]

use std::time::Duration;

/// A backoff policy.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Backoff {
    /// The wait after the first failure.
    pub first: Duration,
    /// The longest wait.
    pub max: Duration,
    /// The spread: each wait is scaled by a random factor within
    /// `1 ± jitter` (0 for none).
    pub jitter: f64,
}

impl Backoff {
    /// Doubling from `first` up to `max`, without jitter.
    #[must_use]
    pub const fn new(first: Duration, max: Duration) -> Self {
        Self {
            first,
            max,
            jitter: 0.0,
        }
    }

    /// The same with each wait spread by `1 ± jitter`.
    #[must_use]
    pub const fn with_jitter(self, jitter: f64) -> Self {
        Self { jitter, ..self }
    }

    /// The wait after `failures` failures in a row, less one (0: the first).
    #[must_use]
    pub fn wait(&self, failures: u32) -> Duration {
        let base = self
            .first
            .saturating_mul(1u32 << failures.min(20))
            .min(self.max);
        if self.jitter > 0.0 {
            base.mul_f64(rand::random_range(1.0 - self.jitter..1.0 + self.jitter))
        } else {
            base
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn doubles_and_caps() {
        let b = Backoff::new(Duration::from_millis(100), Duration::from_secs(30));
        assert_eq!(b.wait(0), Duration::from_millis(100));
        assert_eq!(b.wait(1), Duration::from_millis(200));
        assert_eq!(b.wait(30), Duration::from_secs(30));
        assert_eq!(b.wait(u32::MAX), Duration::from_secs(30));
    }

    #[test]
    fn jitter_stays_within_its_spread() {
        let b = Backoff::new(Duration::from_secs(5), Duration::from_hours(1)).with_jitter(0.25);
        for failures in 0..20 {
            let d = b.wait(failures).as_secs_f64();
            let base = (5.0 * 2f64.powi(i32::try_from(failures).unwrap())).min(3600.0);
            assert!(d >= base * 0.75 && d <= base * 1.25, "{failures}: {d}");
        }
    }
}
