//! Every timing of unplanned failover in one place (docs/architecture.md, "Losing a
//! region", explains them). Pure: the app's write gate, the region agent's self-fence and
//! the leader's wait before a promotion all decide with these numbers, so the safety
//! argument can be checked as arithmetic ([`FailoverTimings::validate`]).
//!
//! The argument: a serving cell's app keeps an *ownership lease* (`owners/<cell>/<lease>`)
//! of `owner_lease_ttl`, renewed every `owner_renew_every`. It admits a write only within
//! `fence_after` of *sending* its last renewal that etcd confirmed; etcd expires the lease
//! no earlier than `owner_lease_ttl` after *receiving* that renewal, which is later than the
//! send. So the app stops admitting writes at least `owner_lease_ttl - fence_after` before
//! its lease can expire, and the leader promotes the standby only `expiry_margin` after it
//! saw the last lease of the cell gone: a write admitted in time has
//! `owner_lease_ttl - fence_after + expiry_margin` to finish before another cell takes
//! writes for its slots. The region agent puts the cell's MySQL `read_only` after the same
//! `fence_after` without a confirmed contact with the etcd majority.

use serde::{Deserialize, Serialize};
use std::time::Duration;

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct FailoverTimings {
    /// Lifetime of a serving app's ownership lease in etcd.
    pub owner_lease_ttl_ms: u64,
    /// How often the app renews it.
    pub owner_renew_every_ms: u64,
    /// How long after sending its last confirmed renewal the app still admits writes (and
    /// the region agent leaves MySQL writable without a confirmed etcd contact).
    pub fence_after_ms: u64,
    /// Lifetime of a region's registration lease: how long a region cut off from the etcd
    /// majority stays registered (detection).
    pub registration_ttl_ms: u64,
    /// How long the leader waits after it saw a lost cell's last ownership lease gone
    /// before it promotes the standby.
    pub expiry_margin_ms: u64,
    /// How long a cell must stay lost before the leader starts its failover.
    pub grace_ms: u64,
    /// After an automatic failover of a cell, none for it (or its standby) within this
    /// window: no flapping.
    pub no_flap_window_ms: u64,
}

impl Default for FailoverTimings {
    /// RTO under 3 s for a whole region in the lab: detection within 2 s (registration
    /// lease), the last ownership lease gone by then, 300 ms margin, promotion and flip.
    fn default() -> Self {
        Self {
            owner_lease_ttl_ms: 2_000,
            owner_renew_every_ms: 250,
            fence_after_ms: 1_200,
            registration_ttl_ms: 2_000,
            expiry_margin_ms: 300,
            grace_ms: 0,
            no_flap_window_ms: 600_000,
        }
    }
}

impl FailoverTimings {
    pub fn owner_lease_ttl(&self) -> Duration {
        Duration::from_millis(self.owner_lease_ttl_ms)
    }
    pub fn owner_renew_every(&self) -> Duration {
        Duration::from_millis(self.owner_renew_every_ms)
    }
    pub fn fence_after(&self) -> Duration {
        Duration::from_millis(self.fence_after_ms)
    }
    pub fn registration_ttl(&self) -> Duration {
        Duration::from_millis(self.registration_ttl_ms)
    }

    /// How long a write admitted at the last moment has to finish before the standby can
    /// be promoted (see the module's argument).
    pub fn write_completion_budget_ms(&self) -> u64 {
        self.owner_lease_ttl_ms.saturating_sub(self.fence_after_ms) + self.expiry_margin_ms
    }

    /// Checks the safety argument's inequalities; `write_deadline_ms` is how long one
    /// admitted write may take at most (the app's store deadlines).
    pub fn validate(&self, write_deadline_ms: u64) -> crate::Result<()> {
        let err = |field: &str, problem: String| {
            Err(crate::Error::Timing {
                field: field.into(),
                problem,
            })
        };
        // etcd refuses leases shorter than 1.5 election timeouts (1.5 s by default) and
        // counts them in whole seconds.
        for (field, ms) in [
            ("ownerLeaseTtlMs", self.owner_lease_ttl_ms),
            ("registrationTtlMs", self.registration_ttl_ms),
        ] {
            if ms < 2_000 || !ms.is_multiple_of(1_000) {
                return err(
                    field,
                    format!("{ms} ms: etcd leases are whole seconds, at least 2 s"),
                );
            }
        }
        if self.owner_renew_every_ms == 0 || self.owner_renew_every_ms * 3 > self.fence_after_ms {
            return err(
                "ownerRenewEveryMs",
                format!(
                    "{} ms: renew at least three times within fenceAfterMs ({} ms), or one slow renewal fences the cell",
                    self.owner_renew_every_ms, self.fence_after_ms
                ),
            );
        }
        if self.fence_after_ms >= self.owner_lease_ttl_ms {
            return err(
                "fenceAfterMs",
                format!(
                    "{} ms: must be shorter than ownerLeaseTtlMs ({} ms), so a cut-off home stops writing before its lease can expire",
                    self.fence_after_ms, self.owner_lease_ttl_ms
                ),
            );
        }
        if self.write_completion_budget_ms() <= write_deadline_ms {
            return err(
                "expiryMarginMs",
                format!(
                    "{} ms leaves a write admitted last {} ms to finish, but one may take {write_deadline_ms} ms; raise expiryMarginMs or lower fenceAfterMs",
                    self.expiry_margin_ms,
                    self.write_completion_budget_ms()
                ),
            );
        }
        Ok(())
    }
}

/// Whether a home may admit a write at `now_ms`: `confirmed_sent_ms` is when it sent the
/// last renewal of its ownership lease that etcd confirmed (None: it holds no lease).
pub fn may_write(confirmed_sent_ms: Option<u64>, now_ms: u64, t: &FailoverTimings) -> bool {
    confirmed_sent_ms.is_some_and(|sent| now_ms < sent + t.fence_after_ms)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Error;

    #[test]
    fn the_defaults_are_safe_for_the_apps_store_deadlines() {
        let t = FailoverTimings::default();
        // The reference app: one store call of 800 ms on a write's critical path.
        t.validate(800).unwrap();
        assert_eq!(t.write_completion_budget_ms(), 1_100);
        let e = t.validate(1_100).unwrap_err().to_string();
        assert!(e.starts_with("failover timing expiryMarginMs:"), "{e}");
    }

    #[test]
    fn unsafe_timings_are_refused_with_the_field_named() {
        let base = FailoverTimings::default();
        let bad = |f: fn(&mut FailoverTimings)| {
            let mut t = base.clone();
            f(&mut t);
            match t.validate(100).unwrap_err() {
                e @ Error::Timing { .. } => e,
                other => panic!("{other}"),
            }
        };
        let field = |e: Error| match e {
            Error::Timing { field, .. } => field,
            _ => unreachable!(),
        };
        let e = bad(|t| t.fence_after_ms = 2_000);
        assert!(e.to_string().contains("before its lease can expire"), "{e}");
        assert_eq!(field(e), "fenceAfterMs");
        assert_eq!(
            field(bad(|t| t.owner_lease_ttl_ms = 1_500)),
            "ownerLeaseTtlMs"
        );
        assert_eq!(
            field(bad(|t| t.registration_ttl_ms = 1_000)),
            "registrationTtlMs"
        );
        assert_eq!(
            field(bad(|t| t.owner_renew_every_ms = 500)),
            "ownerRenewEveryMs"
        );
        assert_eq!(
            field(bad(|t| t.owner_renew_every_ms = 0)),
            "ownerRenewEveryMs"
        );
    }

    #[test]
    fn a_home_writes_only_within_fence_after_of_its_last_confirmed_renewal() {
        let t = FailoverTimings::default();
        assert!(!may_write(None, 5_000, &t), "no lease, no writes");
        assert!(may_write(Some(5_000), 5_000, &t));
        assert!(may_write(Some(5_000), 6_199, &t));
        assert!(!may_write(Some(5_000), 6_200, &t));
    }
}
