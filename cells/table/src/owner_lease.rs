//! A serving cell's ownership lease (I/O): the app keeps
//! `/cellplane/<platform>/owners/<cell>/<lease>` alive on a lease of its own and admits a
//! write only while etcd confirmed a renewal recently enough
//! ([`cellplane_cells::failover_timing`] holds the numbers and the safety argument). Cut
//! off from the etcd majority, the cell stops writing before the lease can expire, and the
//! platform leader promotes the standby only after the last such lease expired.
//!
//! A lease is taken only while the table says the cell serves and is not frozen, checked
//! in the same transaction that creates the key (it compares the table's revision): once
//! the leader froze a lost cell, no app of it can take a new lease behind its back.

use crate::Result;
use cellplane_cells::etcd_keys::{owners_prefix, routing_key, OwnerLeaseValue};
use cellplane_cells::failover_timing::{may_write, FailoverTimings};
use cellplane_cells::routing::{serves_traffic, RoutingTable};
use etcd_client::{Compare, CompareOp, PutOptions, Txn, TxnOp};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::Instant;

/// No confirmed renewal yet.
const NONE: u64 = u64::MAX;

pub struct OwnerLease {
    timings: FailoverTimings,
    /// The clock [`Self::confirmed_sent_ms`] counts from (monotonic).
    base: Instant,
    /// When the last renewal that etcd confirmed was sent, in ms since `base`.
    confirmed_sent_ms: AtomicU64,
    pub metrics: OwnerLeaseMetrics,
    /// How far the app has drained (`OwnerLeaseValue::drained_epoch`), published under the
    /// lease's key whenever it changes; set once by the app's ownership fence.
    drained: OnceLock<DrainedEpoch>,
}

/// Reads the epoch the app has drained to.
pub type DrainedEpoch = Arc<dyn Fn() -> u64 + Send + Sync>;

#[derive(Clone, Default)]
pub struct OwnerLeaseMetrics {
    /// 1 while a lease is held and fresh enough to write.
    pub held: Gauge<i64, AtomicI64>,
    /// Leases taken (a new one after each loss).
    pub acquired: Counter,
    /// Writes refused because the lease was not fresh.
    pub writes_fenced: Counter,
}

impl OwnerLeaseMetrics {
    pub fn register(&self, r: &mut Registry) {
        r.register(
            "owner_lease_held",
            "1 while the cell holds a fresh ownership lease and may take writes",
            self.held.clone(),
        );
        r.register(
            "owner_leases_acquired",
            "Ownership leases taken in the global etcd",
            self.acquired.clone(),
        );
        r.register(
            "writes_fenced",
            "Writes refused because the ownership lease was not fresh (cut off from the global etcd)",
            self.writes_fenced.clone(),
        );
    }
}

/// Why a write is refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Fenced {
    /// Milliseconds since the last confirmed renewal was sent (None: never held).
    pub since_ms: Option<u64>,
}

impl std::fmt::Display for Fenced {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.since_ms {
            None => write!(f, "the cell holds no ownership lease in the global etcd yet"),
            Some(ms) => write!(
                f,
                "the cell's ownership lease was last confirmed {ms} ms ago (cut off from the global etcd?)"
            ),
        }
    }
}

impl OwnerLease {
    pub fn new(timings: FailoverTimings, metrics: OwnerLeaseMetrics) -> Arc<Self> {
        Arc::new(Self {
            timings,
            base: Instant::now(),
            confirmed_sent_ms: AtomicU64::new(NONE),
            metrics,
            drained: OnceLock::new(),
        })
    }

    /// Publishes `drained` under the lease's key (a slot move waits on it); the first call
    /// wins.
    pub fn publish_drained(&self, drained: DrainedEpoch) {
        self.drained.set(drained).ok();
    }

    /// What the lease's key holds now.
    fn value(&self) -> OwnerLeaseValue {
        OwnerLeaseValue {
            drained_epoch: self.drained.get().map_or(0, |d| d()),
        }
    }

    fn now_ms(&self) -> u64 {
        self.base.elapsed().as_millis() as u64
    }

    /// Whether a write may be admitted now.
    pub fn check(&self) -> std::result::Result<(), Fenced> {
        let sent = self.confirmed_sent_ms.load(Ordering::Acquire);
        let confirmed = (sent != NONE).then_some(sent);
        let now = self.now_ms();
        if may_write(confirmed, now, &self.timings) {
            return Ok(());
        }
        self.metrics.writes_fenced.inc();
        Err(Fenced {
            since_ms: confirmed.map(|s| now.saturating_sub(s)),
        })
    }

    fn confirm(&self, sent_ms: u64) {
        // Never moves back (a later confirmation of an earlier send changes nothing).
        self.confirmed_sent_ms
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |cur| {
                (cur == NONE || sent_ms > cur).then_some(sent_ms)
            })
            .ok();
        self.metrics.held.set(1);
    }

    /// Keeps the cell's lease forever: takes one when the table lets it, renews it, takes a
    /// new one when it is lost.
    pub async fn run(self: Arc<Self>, endpoints: Vec<String>, platform: String, cell: String) {
        let mut said = String::new();
        // The lease held, kept across reconnections to another member while it lives.
        let mut held = None;
        loop {
            let result = self.session(&endpoints, &platform, &cell, &mut held).await;
            self.metrics.held.set(0);
            if let Err(e) = result {
                // Said once per distinct error, not every attempt.
                let msg = e.to_string();
                if msg != said {
                    tracing::warn!(%cell, error = %msg, "ownership lease lost; writes are fenced until a new one is confirmed");
                    said = msg;
                }
            }
            tokio::time::sleep(self.timings.owner_renew_every()).await;
        }
    }

    async fn session(
        &self,
        endpoints: &[String],
        platform: &str,
        cell: &str,
        held: &mut Option<i64>,
    ) -> Result<()> {
        let renew = self.timings.owner_renew_every();
        let mut client = crate::etcd::connect(endpoints, renew * 2).await?;
        if let Some(lease) = *held {
            // Still alive? Then keep renewing it from this member. etcd answers a renewal
            // of a lease that expired meanwhile (the region was cut off) with an error:
            // forget it, so a new one is taken once the table lets the cell serve again.
            let key = format!("{}{lease:x}", owners_prefix(platform, cell));
            let kept = self.keep(&mut client, lease, &key, held).await;
            if kept
                .as_ref()
                .is_err_and(|e| e.to_string().contains("lease not found"))
            {
                *held = None;
            }
            return kept;
        }
        let ttl = (self.timings.owner_lease_ttl_ms / 1000).max(2) as i64;
        // The lease may be taken only while the table lets the cell serve.
        let (lease, key, granted_at) = loop {
            let resp = client.get(routing_key(platform), None).await?;
            let kv = resp.kvs().first();
            let serving = kv
                .and_then(|kv| RoutingTable::decode(kv.value()).ok())
                .and_then(|t| t.cell(cell).map(|c| serves_traffic(c.state) && !c.frozen))
                .unwrap_or(false);
            if !serving {
                tokio::time::sleep(renew).await;
                continue;
            }
            let table_revision = kv.map_or(0, |kv| kv.mod_revision());
            let sent = self.now_ms();
            let lease = client.lease_grant(ttl, None).await?.id();
            let key = format!("{}{lease:x}", owners_prefix(platform, cell));
            let txn = Txn::new()
                .when([Compare::mod_revision(
                    routing_key(platform),
                    CompareOp::Equal,
                    table_revision,
                )])
                .and_then([TxnOp::put(
                    key.clone(),
                    self.value().encode(),
                    Some(PutOptions::new().with_lease(lease)),
                )]);
            if client.txn(txn).await?.succeeded() {
                break (lease, key, sent);
            }
            // The table changed in between: look again (the lease expires unused).
            client.lease_revoke(lease).await.ok();
        };
        self.metrics.acquired.inc();
        self.confirm(granted_at);
        tracing::info!(%cell, lease = format!("{lease:x}"), "ownership lease taken");
        *held = Some(lease);
        self.keep(&mut client, lease, &key, held).await
    }

    /// Renews `lease` until it fails, and rewrites its `key` when the drained epoch moves;
    /// forgets the lease (`held`) once etcd says it expired.
    async fn keep(
        &self,
        client: &mut etcd_client::Client,
        lease: i64,
        key: &str,
        held: &mut Option<i64>,
    ) -> Result<()> {
        let renew = self.timings.owner_renew_every();
        let mut tick = tokio::time::interval(renew);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let (mut keeper, mut answers) = client.lease_keep_alive(lease).await?;
        let mut published = None;
        loop {
            tick.tick().await;
            let value = self.value();
            if published != Some(value) {
                client
                    .put(
                        key,
                        value.encode(),
                        Some(PutOptions::new().with_lease(lease)),
                    )
                    .await?;
                published = Some(value);
            }
            let sent = self.now_ms();
            keeper.keep_alive().await?;
            match tokio::time::timeout(renew * 2, answers.message()).await {
                Ok(Ok(Some(a))) if a.ttl() > 0 => self.confirm(sent),
                Ok(Ok(_)) => {
                    *held = None;
                    return Err(etcd_client::Error::LeaseKeepAliveError(
                        "the ownership lease expired".into(),
                    )
                    .into());
                }
                Ok(Err(e)) => return Err(e.into()),
                // The member may be the one cut off: start over on another (a late answer
                // on this stream is never taken for a renewal sent after it).
                Err(_) => {
                    return Err(etcd_client::Error::LeaseKeepAliveError(format!(
                        "no renewal answer in {:?}",
                        renew * 2
                    ))
                    .into())
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn writes_are_admitted_only_after_a_confirmation_and_until_fence_after() {
        let t = FailoverTimings::default();
        let lease = OwnerLease::new(t.clone(), Default::default());
        assert_eq!(lease.check(), Err(Fenced { since_ms: None }));
        lease.confirm(lease.now_ms());
        assert_eq!(lease.check(), Ok(()));
        // A confirmation of an older send does not move the clock back.
        lease.confirm(0);
        assert_eq!(lease.check(), Ok(()));
        // Last confirmed (sent) a fence_after ago: fenced, and the message says since when.
        let lease = OwnerLease {
            base: Instant::now() - Duration::from_secs(10),
            ..Arc::into_inner(OwnerLease::new(t.clone(), Default::default())).unwrap()
        };
        lease.confirm(10_000 - t.fence_after_ms);
        let e = lease.check().unwrap_err();
        assert!(e.since_ms.unwrap() >= t.fence_after_ms, "{e:?}");
        assert!(e.to_string().contains("last confirmed"), "{e}");
        assert_eq!(lease.metrics.writes_fenced.get(), 1);
    }
}
