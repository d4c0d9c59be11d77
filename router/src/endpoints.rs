//! Per-endpoint state: requests in flight (for power-of-two choices) and passive outlier
//! ejection (consecutive connect errors / 5xx, exponential backoff, a cap on the share
//! of a cell's endpoints that may be ejected at once).

use crate::decision::power_of_two;
use std::collections::HashMap;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

#[derive(Clone, Debug)]
pub struct EjectionPolicy {
    pub consecutive_failures: u32,
    pub base_ejection: Duration,
    pub max_ejection: Duration,
    /// At most this share (percent) of a cell's endpoints is ejected at once.
    pub max_ejection_percent: u32,
}

impl Default for EjectionPolicy {
    fn default() -> Self {
        Self {
            consecutive_failures: 3,
            base_ejection: Duration::from_secs(5),
            max_ejection: Duration::from_secs(120),
            max_ejection_percent: 50,
        }
    }
}

#[derive(Debug, Default)]
pub struct EndpointState {
    pub in_flight: AtomicU32,
    failures: AtomicU32,
    ejections: AtomicU32,
    /// Milliseconds since the registry's start until which the endpoint is ejected.
    ejected_until_ms: AtomicU64,
}

/// Decrements `in_flight` when the request ends, however it ends.
pub struct InFlight(Arc<EndpointState>);

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.in_flight.fetch_sub(1, Ordering::Relaxed);
    }
}

pub struct Endpoints {
    start: Instant,
    policy: EjectionPolicy,
    states: RwLock<HashMap<String, Arc<EndpointState>>>,
}

impl Endpoints {
    pub fn new(policy: EjectionPolicy) -> Self {
        Self {
            start: Instant::now(),
            policy,
            states: RwLock::new(HashMap::new()),
        }
    }

    fn now_ms(&self) -> u64 {
        self.start.elapsed().as_millis() as u64
    }

    pub fn state(&self, addr: &str) -> Arc<EndpointState> {
        if let Some(s) = self.states.read().expect("lock").get(addr) {
            return s.clone();
        }
        self.states
            .write()
            .expect("lock")
            .entry(addr.to_string())
            .or_default()
            .clone()
    }

    pub fn is_ejected(&self, addr: &str) -> bool {
        self.state(addr).ejected_until_ms.load(Ordering::Relaxed) > self.now_ms()
    }

    /// Picks an endpoint of a cell by power of two choices over the non-ejected ones
    /// (all of them when every one is ejected: failing open beats refusing all traffic).
    pub fn choose<'a>(
        &self,
        addrs: &'a [String],
        exclude: Option<&str>,
    ) -> Option<(&'a str, InFlight)> {
        let now = self.now_ms();
        let mut candidates: Vec<(&'a str, Arc<EndpointState>)> = addrs
            .iter()
            .filter(|a| Some(a.as_str()) != exclude)
            .map(|a| (a.as_str(), self.state(a)))
            .collect();
        let healthy: Vec<_> = candidates
            .iter()
            .filter(|(_, s)| s.ejected_until_ms.load(Ordering::Relaxed) <= now)
            .cloned()
            .collect();
        if !healthy.is_empty() {
            candidates = healthy;
        }
        let loads: Vec<u32> = candidates
            .iter()
            .map(|(_, s)| s.in_flight.load(Ordering::Relaxed))
            .collect();
        let i = power_of_two(
            &loads,
            rand::random::<u32>() as usize,
            rand::random::<u32>() as usize,
        )?;
        let (addr, state) = candidates.swap_remove(i);
        state.in_flight.fetch_add(1, Ordering::Relaxed);
        Some((addr, InFlight(state)))
    }

    pub fn record_success(&self, addr: &str) {
        let s = self.state(addr);
        s.failures.store(0, Ordering::Relaxed);
        s.ejections.store(0, Ordering::Relaxed);
    }

    /// Records a connect error or 5xx; returns true when this ejected the endpoint.
    pub fn record_failure(&self, addr: &str, cell_endpoints: &[String]) -> bool {
        let s = self.state(addr);
        let failures = s.failures.fetch_add(1, Ordering::Relaxed) + 1;
        if failures < self.policy.consecutive_failures {
            return false;
        }
        let now = self.now_ms();
        let ejected = cell_endpoints
            .iter()
            .filter(|a| {
                a.as_str() != addr && self.state(a).ejected_until_ms.load(Ordering::Relaxed) > now
            })
            .count()
            + 1;
        if ejected * 100 > cell_endpoints.len().max(1) * self.policy.max_ejection_percent as usize
            && cell_endpoints.len() > 1
        {
            return false;
        }
        let n = s.ejections.fetch_add(1, Ordering::Relaxed);
        let backoff = self
            .policy
            .base_ejection
            .saturating_mul(1u32 << n.min(10))
            .min(self.policy.max_ejection);
        s.ejected_until_ms
            .store(now + backoff.as_millis() as u64, Ordering::Relaxed);
        s.failures.store(0, Ordering::Relaxed);
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn addrs(n: usize) -> Vec<String> {
        (0..n).map(|i| format!("10.0.0.{i}:80")).collect()
    }

    #[test]
    fn consecutive_failures_eject_and_success_resets() {
        let e = Endpoints::new(EjectionPolicy::default());
        let a = addrs(4);
        assert!(!e.record_failure(&a[0], &a));
        e.record_success(&a[0]);
        assert!(!e.record_failure(&a[0], &a));
        assert!(!e.record_failure(&a[0], &a));
        assert!(e.record_failure(&a[0], &a));
        assert!(e.is_ejected(&a[0]));
        for _ in 0..50 {
            let (addr, _g) = e.choose(&a, None).unwrap();
            assert_ne!(addr, a[0], "ejected endpoints get no traffic");
        }
    }

    #[test]
    fn ejection_share_is_capped() {
        let e = Endpoints::new(EjectionPolicy::default());
        let a = addrs(2);
        for _ in 0..3 {
            e.record_failure(&a[0], &a);
        }
        assert!(e.is_ejected(&a[0]));
        for _ in 0..3 {
            e.record_failure(&a[1], &a);
        }
        assert!(
            !e.is_ejected(&a[1]),
            "50% cap keeps one of two endpoints in"
        );
    }

    #[test]
    fn in_flight_is_released_on_drop() {
        let e = Endpoints::new(EjectionPolicy::default());
        let a = addrs(1);
        let (addr, guard) = e.choose(&a, None).unwrap();
        assert_eq!(e.state(addr).in_flight.load(Ordering::Relaxed), 1);
        drop(guard);
        assert_eq!(e.state(addr).in_flight.load(Ordering::Relaxed), 0);
        assert!(e.choose(&a, Some(&a[0])).is_none());
    }
}
