//! Per-endpoint state: requests in flight (for power-of-two choices) and passive outlier
//! ejection (consecutive connect errors / 5xx, exponential backoff, a cap on the share
//! of a cell's endpoints that may be ejected at once). The hot path works on handles
//! resolved once per routing table: no map lookups, no allocation per request.

use crate::decision::power_of_two;
use parking_lot::RwLock;
use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::Arc;
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

#[derive(Debug)]
pub struct EndpointState {
    pub addr: String,
    pub in_flight: AtomicU32,
    failures: AtomicU32,
    ejections: AtomicU32,
    /// Milliseconds since the registry's start until which the endpoint is ejected.
    ejected_until_ms: AtomicU64,
    /// Set by active health checks; cleared when they pass again.
    down: AtomicBool,
    /// Consecutive active-check results in the current direction (failures while up,
    /// successes while down).
    streak: AtomicU32,
}

impl EndpointState {
    /// Taken down by active health checks.
    pub fn is_down(&self) -> bool {
        self.down.load(Ordering::Relaxed)
    }
}

/// Decrements `in_flight` when the request ends, however it ends.
pub struct InFlight(Arc<EndpointState>);

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.in_flight.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Endpoint states by address; they outlive routing tables, so an endpoint ejected
/// before a table change stays ejected after it.
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

    /// The handle of `addr` (resolved once per table, off the hot path).
    pub fn state(&self, addr: &str) -> Arc<EndpointState> {
        if let Some(s) = self.states.read().get(addr) {
            return s.clone();
        }
        let mut map = self.states.write();
        map.entry(addr.to_string())
            .or_insert_with(|| {
                Arc::new(EndpointState {
                    addr: addr.to_string(),
                    in_flight: AtomicU32::new(0),
                    failures: AtomicU32::new(0),
                    ejections: AtomicU32::new(0),
                    ejected_until_ms: AtomicU64::new(0),
                    down: AtomicBool::new(false),
                    streak: AtomicU32::new(0),
                })
            })
            .clone()
    }

    fn ejected_at(&self, s: &EndpointState, now: u64) -> bool {
        s.down.load(Ordering::Relaxed) || s.ejected_until_ms.load(Ordering::Relaxed) > now
    }

    /// Records an active health-check result; returns Some(new_down) when the endpoint
    /// changed state (down after `unhealthy` failures in a row, up after `healthy` passes).
    pub fn record_check(
        &self,
        s: &EndpointState,
        ok: bool,
        unhealthy: u32,
        healthy: u32,
    ) -> Option<bool> {
        let down = s.down.load(Ordering::Relaxed);
        // A result agreeing with the current state resets the streak.
        if ok != down {
            s.streak.store(0, Ordering::Relaxed);
            return None;
        }
        let streak = s.streak.fetch_add(1, Ordering::Relaxed) + 1;
        let needed = if down { healthy } else { unhealthy };
        if streak < needed.max(1) {
            return None;
        }
        s.streak.store(0, Ordering::Relaxed);
        s.down.store(!down, Ordering::Relaxed);
        Some(!down)
    }

    pub fn is_ejected(&self, s: &EndpointState) -> bool {
        self.ejected_at(s, self.now_ms())
    }

    /// Picks an endpoint by power of two choices, preferring non-ejected ones (when all
    /// are ejected it fails open rather than refusing all traffic). `exclude` skips one
    /// index (the endpoint a retry is moving away from).
    pub fn choose(
        &self,
        eps: &[Arc<EndpointState>],
        exclude: Option<usize>,
    ) -> Option<(usize, InFlight)> {
        let n = eps.len();
        let usable = |i: usize| Some(i) != exclude;
        let now = self.now_ms();
        let healthy = |i: usize| usable(i) && !self.ejected_at(&eps[i], now);
        let pick = match n {
            0 => return None,
            1 => usable(0).then_some(0)?,
            _ => {
                let (r1, r2) = (
                    rand::random::<u32>() as usize,
                    rand::random::<u32>() as usize,
                );
                let (mut a, mut b) = (r1 % n, r2 % n);
                // Two draws among healthy endpoints; fall back to any usable one.
                if !healthy(a) {
                    a = (0..n)
                        .map(|k| (a + k) % n)
                        .find(|&i| healthy(i))
                        .or_else(|| (0..n).find(|&i| usable(i)))?;
                }
                if !healthy(b) {
                    b = (0..n)
                        .map(|k| (b + k) % n)
                        .find(|&i| healthy(i))
                        .unwrap_or(a);
                }
                let loads = [
                    eps[a].in_flight.load(Ordering::Relaxed),
                    eps[b].in_flight.load(Ordering::Relaxed),
                ];
                [a, b][power_of_two(&loads, 0, 1).expect("two candidates")]
            }
        };
        let state = eps[pick].clone();
        state.in_flight.fetch_add(1, Ordering::Relaxed);
        Some((pick, InFlight(state)))
    }

    pub fn record_success(&self, s: &EndpointState) {
        if s.failures.load(Ordering::Relaxed) != 0 {
            s.failures.store(0, Ordering::Relaxed);
        }
        if s.ejections.load(Ordering::Relaxed) != 0 {
            s.ejections.store(0, Ordering::Relaxed);
        }
    }

    /// Records a connect error or 5xx; returns true when this ejected the endpoint.
    pub fn record_failure(&self, s: &EndpointState, cell: &[Arc<EndpointState>]) -> bool {
        let failures = s.failures.fetch_add(1, Ordering::Relaxed) + 1;
        if failures < self.policy.consecutive_failures {
            return false;
        }
        let now = self.now_ms();
        let others_ejected = cell
            .iter()
            .filter(|e| e.addr != s.addr && self.ejected_at(e, now))
            .count();
        if cell.len() > 1
            && (others_ejected + 1) * 100 > cell.len() * self.policy.max_ejection_percent as usize
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

    fn cell(e: &Endpoints, n: usize) -> Vec<Arc<EndpointState>> {
        (0..n).map(|i| e.state(&format!("10.0.0.{i}:80"))).collect()
    }

    #[test]
    fn consecutive_failures_eject_and_success_resets() {
        let e = Endpoints::new(EjectionPolicy::default());
        let a = cell(&e, 4);
        assert!(!e.record_failure(&a[0], &a));
        e.record_success(&a[0]);
        assert!(!e.record_failure(&a[0], &a));
        assert!(!e.record_failure(&a[0], &a));
        assert!(e.record_failure(&a[0], &a));
        assert!(e.is_ejected(&a[0]));
        for _ in 0..200 {
            let (i, _g) = e.choose(&a, None).unwrap();
            assert_ne!(i, 0, "ejected endpoints get no traffic");
        }
    }

    #[test]
    fn active_checks_take_endpoints_down_and_up_with_thresholds() {
        let e = Endpoints::new(EjectionPolicy::default());
        let a = cell(&e, 2);
        assert_eq!(e.record_check(&a[0], false, 2, 2), None);
        assert_eq!(
            e.record_check(&a[0], true, 2, 2),
            None,
            "a pass resets the failure streak"
        );
        assert_eq!(e.record_check(&a[0], false, 2, 2), None);
        assert_eq!(e.record_check(&a[0], false, 2, 2), Some(true));
        assert!(e.is_ejected(&a[0]));
        for _ in 0..50 {
            assert_eq!(e.choose(&a, None).unwrap().0, 1);
        }
        assert_eq!(e.record_check(&a[0], true, 2, 2), None);
        assert_eq!(e.record_check(&a[0], true, 2, 2), Some(false));
        assert!(!e.is_ejected(&a[0]));
    }

    #[test]
    fn ejection_share_is_capped() {
        let e = Endpoints::new(EjectionPolicy::default());
        let a = cell(&e, 2);
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
    fn in_flight_is_released_and_exclusion_respected() {
        let e = Endpoints::new(EjectionPolicy::default());
        let a = cell(&e, 1);
        let (i, guard) = e.choose(&a, None).unwrap();
        assert_eq!(a[i].in_flight.load(Ordering::Relaxed), 1);
        drop(guard);
        assert_eq!(a[i].in_flight.load(Ordering::Relaxed), 0);
        assert!(e.choose(&a, Some(0)).is_none());
        let two = cell(&e, 2);
        for _ in 0..50 {
            assert_eq!(e.choose(&two, Some(0)).unwrap().0, 1);
        }
    }

    #[test]
    fn p2c_spreads_by_load() {
        let e = Endpoints::new(EjectionPolicy::default());
        let a = cell(&e, 3);
        a[0].in_flight.store(100, Ordering::Relaxed);
        let mut hits = [0; 3];
        for _ in 0..300 {
            hits[e.choose(&a, None).unwrap().0] += 1;
        }
        assert!(hits[0] < hits[1] && hits[0] < hits[2], "{hits:?}");
    }
}
