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

#[cfg(test)]
mod tests {
    use super::*;

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
