//! Rate limiting: a token bucket per user key and a global one. The clock is an argument,
//! so the arithmetic is tested as plain functions (and on tokio's paused clock).

use parking_lot::Mutex;
use std::collections::HashMap;
use std::time::Duration;
use tokio::time::Instant;

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

/// One shared bucket (the global limit, the access log's rate).
pub struct SharedBucket {
    rate: Rate,
    bucket: Mutex<Bucket>,
}

impl SharedBucket {
    pub fn new(rate: Rate) -> Self {
        Self {
            rate,
            bucket: Mutex::new(Bucket::full(rate, Instant::now())),
        }
    }

    pub fn take(&self, now: Instant) -> Result<(), Duration> {
        self.bucket.lock().take(self.rate, now)
    }
}

/// Limits per key and globally. Per-key buckets are bounded in number: when full, the
/// map is cleared (everyone gets a fresh burst) rather than growing without bound.
pub struct Limiter {
    global: Option<SharedBucket>,
    per_key: Option<(Rate, Mutex<HashMap<String, Bucket>>)>,
    max_keys: usize,
}

impl Limiter {
    pub fn new(global: Option<Rate>, per_key: Option<Rate>, max_keys: usize) -> Self {
        Self {
            global: global.map(SharedBucket::new),
            per_key: per_key.map(|r| (r, Mutex::new(HashMap::new()))),
            max_keys,
        }
    }

    /// Ok, or the time to wait (for `Retry-After`).
    pub fn check(&self, key: &str, now: Instant) -> Result<(), Duration> {
        if let Some((rate, map)) = &self.per_key {
            let mut map = map.lock();
            if map.len() >= self.max_keys && !map.contains_key(key) {
                map.clear();
            }
            map.entry(key.to_string())
                .or_insert_with(|| Bucket::full(*rate, now))
                .take(*rate, now)?;
        }
        if let Some(bucket) = &self.global {
            bucket.take(now)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::time::advance;

    const ONE_PER_SEC: Rate = Rate {
        per_second: 1.0,
        burst: 1.0,
    };

    #[tokio::test(start_paused = true)]
    async fn bucket_allows_burst_then_refills_at_rate() {
        let rate = Rate {
            per_second: 2.0,
            burst: 3.0,
        };
        let mut b = Bucket::full(rate, Instant::now());
        for _ in 0..3 {
            assert!(b.take(rate, Instant::now()).is_ok());
        }
        let wait = b.take(rate, Instant::now()).unwrap_err();
        assert!((wait.as_secs_f64() - 0.5).abs() < 1e-9, "{wait:?}");
        advance(Duration::from_millis(499)).await;
        assert!(b.take(rate, Instant::now()).is_err(), "not yet");
        advance(Duration::from_millis(1)).await;
        assert!(b.take(rate, Instant::now()).is_ok(), "refilled after 0.5 s");
        advance(Duration::from_secs(60)).await;
        for _ in 0..3 {
            assert!(b.take(rate, Instant::now()).is_ok());
        }
        assert!(
            b.take(rate, Instant::now()).is_err(),
            "never more than the burst"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn per_key_limits_do_not_affect_other_keys() {
        let l = Limiter::new(None, Some(ONE_PER_SEC), 1000);
        assert!(l.check("a", Instant::now()).is_ok());
        assert_eq!(l.check("a", Instant::now()), Err(Duration::from_secs(1)));
        assert!(l.check("b", Instant::now()).is_ok());
        advance(Duration::from_secs(1)).await;
        assert!(l.check("a", Instant::now()).is_ok());
    }

    #[tokio::test(start_paused = true)]
    async fn tracked_keys_are_bounded_by_starting_over() {
        let l = Limiter::new(None, Some(ONE_PER_SEC), 2);
        assert!(l.check("a", Instant::now()).is_ok());
        assert!(l.check("b", Instant::now()).is_ok());
        assert!(l.check("a", Instant::now()).is_err());
        assert!(
            l.check("c", Instant::now()).is_ok(),
            "a third key clears the map"
        );
        assert!(
            l.check("a", Instant::now()).is_ok(),
            "so a starts with a fresh burst"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn global_limit_applies_to_everyone() {
        let l = Limiter::new(
            Some(Rate {
                per_second: 1.0,
                burst: 2.0,
            }),
            None,
            10,
        );
        assert!(l.check("a", Instant::now()).is_ok());
        assert!(l.check("b", Instant::now()).is_ok());
        assert!(l.check("c", Instant::now()).is_err());
        advance(Duration::from_secs(1)).await;
        assert!(l.check("c", Instant::now()).is_ok());
    }
}
