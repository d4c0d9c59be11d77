//! The retry budget: every request deposits `ratio` of a token, every retry spends one, and
//! `min_per_sec` tokens accrue with time; so retries stay a bounded share of traffic and a
//! failing cell cannot be hammered by retry storms.

use parking_lot::Mutex;
use std::time::Duration;
use tokio::time::Instant;

pub struct RetryBudget {
    ratio: f64,
    min_per_sec: f64,
    /// Tokens at least kept available by time alone.
    min_burst: f64,
    state: Mutex<(f64, Instant)>,
}

impl RetryBudget {
    pub fn new(ratio: f64, min_per_sec: f64) -> Self {
        let min_burst = (min_per_sec * 10.0).max(1.0);
        Self {
            ratio,
            min_per_sec,
            min_burst,
            state: Mutex::new((min_burst, Instant::now())),
        }
    }

    /// Called once per request.
    pub fn deposit(&self) {
        let mut s = self.state.lock();
        s.0 = (s.0 + self.ratio).min(self.cap());
    }

    fn cap(&self) -> f64 {
        self.min_burst.max(1000.0 * self.ratio)
    }

    /// Whether a retry may happen now (spends a token if so).
    pub fn try_withdraw(&self, now: Instant) -> bool {
        let mut s = self.state.lock();
        let elapsed = now.saturating_duration_since(s.1).as_secs_f64();
        s.0 = (s.0 + elapsed * self.min_per_sec).min(self.cap());
        s.1 = now;
        // The epsilon absorbs float drift: five deposits of 0.2 make one whole token.
        if s.0 >= 1.0 - 1e-9 {
            s.0 -= 1.0;
            true
        } else {
            false
        }
    }
}

/// `base` scaled by a factor in [0.5, 1.5) drawn from `unit` (a uniform sample in [0, 1)),
/// so retries from many routers after one failure do not arrive together.
pub fn jittered(base: Duration, unit: f64) -> Duration {
    base.mul_f64(0.5 + unit.clamp(0.0, 1.0))
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::time::advance;

    #[test]
    fn retry_backoff_is_jittered_around_the_base() {
        let base = Duration::from_millis(10);
        assert_eq!(jittered(base, 0.0), Duration::from_millis(5));
        assert_eq!(jittered(base, 0.5), Duration::from_millis(10));
        assert!(jittered(base, 0.999) < Duration::from_millis(15));
        assert_eq!(jittered(base, 7.0), Duration::from_millis(15), "clamped");
    }

    #[tokio::test(start_paused = true)]
    async fn retries_are_a_bounded_share_of_requests() {
        let b = RetryBudget::new(0.2, 0.0);
        while b.try_withdraw(Instant::now()) {} // the initial burst
        for _ in 0..100 {
            b.deposit();
        }
        let allowed = (0..100).filter(|_| b.try_withdraw(Instant::now())).count();
        assert_eq!(allowed, 20, "20% of 100 requests");
        advance(Duration::from_secs(3600)).await;
        assert!(
            !b.try_withdraw(Instant::now()),
            "no time-based refill at 0/s"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn the_minimum_refills_with_time_up_to_its_burst() {
        let b = RetryBudget::new(0.0, 10.0);
        let burst = std::iter::from_fn(|| b.try_withdraw(Instant::now()).then_some(()))
            .take(1000)
            .count();
        assert_eq!(burst, 100, "ten seconds' worth to start with");
        assert!(!b.try_withdraw(Instant::now()));
        advance(Duration::from_millis(99)).await;
        assert!(!b.try_withdraw(Instant::now()), "0.99 of a token");
        advance(Duration::from_millis(1)).await;
        assert!(b.try_withdraw(Instant::now()), "10 per second");
        advance(Duration::from_secs(3600)).await;
        let refilled = std::iter::from_fn(|| b.try_withdraw(Instant::now()).then_some(()))
            .take(1000)
            .count();
        assert_eq!(refilled, 100, "capped at the burst");
    }
}
