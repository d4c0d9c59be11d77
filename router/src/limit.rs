//! Rate limiting: a token bucket per user key and a global one. The clock is an argument,
//! so the arithmetic is tested as plain functions.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

#[derive(Clone, Copy, Debug)]
pub struct Rate {
    pub per_second: f64,
    pub burst: f64,
}

#[derive(Debug, Clone, Copy)]
pub struct Bucket {
    tokens: f64,
    last: Instant,
}

impl Bucket {
    pub fn full(rate: Rate, now: Instant) -> Self {
        Self {
            tokens: rate.burst,
            last: now,
        }
    }

    /// Takes one token, or says how long until one is available.
    pub fn take(&mut self, rate: Rate, now: Instant) -> Result<(), Duration> {
        let elapsed = now.saturating_duration_since(self.last).as_secs_f64();
        self.tokens = (self.tokens + elapsed * rate.per_second).min(rate.burst);
        self.last = now;
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            Ok(())
        } else {
            Err(Duration::from_secs_f64(
                (1.0 - self.tokens) / rate.per_second.max(f64::MIN_POSITIVE),
            ))
        }
    }
}

/// Limits per key and globally. Per-key buckets are bounded in number: when full, the
/// map is cleared (everyone gets a fresh burst) rather than growing without bound.
pub struct Limiter {
    global: Option<(Rate, Mutex<Bucket>)>,
    per_key: Option<(Rate, Mutex<HashMap<String, Bucket>>)>,
    max_keys: usize,
}

impl Limiter {
    pub fn new(global: Option<Rate>, per_key: Option<Rate>, max_keys: usize) -> Self {
        let now = Instant::now();
        Self {
            global: global.map(|r| (r, Mutex::new(Bucket::full(r, now)))),
            per_key: per_key.map(|r| (r, Mutex::new(HashMap::new()))),
            max_keys,
        }
    }

    /// Ok, or the time to wait (for `Retry-After`).
    pub fn check(&self, key: &str, now: Instant) -> Result<(), Duration> {
        if let Some((rate, map)) = &self.per_key {
            let mut map = map.lock().expect("lock");
            if map.len() >= self.max_keys && !map.contains_key(key) {
                map.clear();
            }
            map.entry(key.to_string())
                .or_insert_with(|| Bucket::full(*rate, now))
                .take(*rate, now)?;
        }
        if let Some((rate, bucket)) = &self.global {
            bucket.lock().expect("lock").take(*rate, now)?;
        }
        Ok(())
    }
}

/// Retry budget: every request deposits `ratio` of a token, every retry spends one, and
/// `min_per_sec` tokens accrue with time; so retries stay a bounded share of traffic and a
/// failing cell cannot be hammered by retry storms.
pub struct RetryBudget {
    ratio: f64,
    min: Rate,
    state: Mutex<(f64, Instant)>,
}

impl RetryBudget {
    pub fn new(ratio: f64, min_per_sec: f64) -> Self {
        let min = Rate {
            per_second: min_per_sec,
            burst: (min_per_sec * 10.0).max(1.0),
        };
        Self {
            ratio,
            min,
            state: Mutex::new((min.burst, Instant::now())),
        }
    }

    /// Called once per request.
    pub fn deposit(&self) {
        let mut s = self.state.lock().expect("lock");
        s.0 = (s.0 + self.ratio).min(self.cap());
    }

    fn cap(&self) -> f64 {
        self.min.burst.max(1000.0 * self.ratio)
    }

    /// Whether a retry may happen now (spends a token if so).
    pub fn try_withdraw(&self, now: Instant) -> bool {
        let mut s = self.state.lock().expect("lock");
        let elapsed = now.saturating_duration_since(s.1).as_secs_f64();
        s.0 = (s.0 + elapsed * self.min.per_second).min(self.cap());
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

    #[test]
    fn retry_backoff_is_jittered_around_the_base() {
        let base = Duration::from_millis(10);
        assert_eq!(jittered(base, 0.0), Duration::from_millis(5));
        assert_eq!(jittered(base, 0.5), Duration::from_millis(10));
        assert!(jittered(base, 0.999) < Duration::from_millis(15));
        assert_eq!(jittered(base, 7.0), Duration::from_millis(15), "clamped");
    }

    #[test]
    fn bucket_allows_burst_then_refills_at_rate() {
        let rate = Rate {
            per_second: 2.0,
            burst: 3.0,
        };
        let t0 = Instant::now();
        let mut b = Bucket::full(rate, t0);
        assert!(b.take(rate, t0).is_ok());
        assert!(b.take(rate, t0).is_ok());
        assert!(b.take(rate, t0).is_ok());
        let wait = b.take(rate, t0).unwrap_err();
        assert!((wait.as_secs_f64() - 0.5).abs() < 1e-9, "{wait:?}");
        assert!(b.take(rate, t0 + Duration::from_millis(500)).is_ok());
    }

    #[test]
    fn per_key_limits_do_not_affect_other_keys() {
        let l = Limiter::new(
            None,
            Some(Rate {
                per_second: 1.0,
                burst: 1.0,
            }),
            1000,
        );
        let now = Instant::now();
        assert!(l.check("a", now).is_ok());
        assert!(l.check("a", now).is_err());
        assert!(l.check("b", now).is_ok());
    }

    #[test]
    fn retry_budget_bounds_retries_to_a_share_of_requests() {
        let b = RetryBudget::new(0.2, 0.0);
        let now = Instant::now();
        while b.try_withdraw(now) {} // drain the initial burst
        for _ in 0..100 {
            b.deposit();
        }
        let allowed = (0..100).filter(|_| b.try_withdraw(now)).count();
        assert_eq!(allowed, 20, "20% of 100 requests");
        let refill = RetryBudget::new(0.0, 10.0);
        while refill.try_withdraw(now) {}
        assert!(!refill.try_withdraw(now));
        assert!(
            refill.try_withdraw(now + Duration::from_millis(150)),
            "min_per_sec refills"
        );
    }

    #[test]
    fn global_limit_applies_to_everyone() {
        let l = Limiter::new(
            Some(Rate {
                per_second: 1.0,
                burst: 2.0,
            }),
            None,
            10,
        );
        let now = Instant::now();
        assert!(l.check("a", now).is_ok());
        assert!(l.check("b", now).is_ok());
        assert!(l.check("c", now).is_err());
    }
}
