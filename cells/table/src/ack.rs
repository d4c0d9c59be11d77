//! Acknowledging the table in use (I/O): a follower keeps
//! `/cellplane/<platform>/routers/<id>` = {region, applied epoch, applied at} alive on a
//! lease and rewrites it on every applied epoch, so the platform leader knows when a change
//! has reached every live router. A follower that dies stops acknowledging within the TTL
//! and is no longer waited for.

use crate::store::TableStore;
use crate::Result;
use cellplane_cells::etcd_keys::{router_key, CellTraffic, Outage, RouterAck};
use etcd_client::PutOptions;
use prometheus_client::metrics::counter::Counter;
use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

#[derive(Clone)]
pub struct Acknowledger {
    pub endpoints: Vec<String>,
    pub platform: String,
    /// Unique among the platform's routers (default: host name and pid).
    pub id: String,
    pub region: String,
    /// Lease TTL: how long a dead follower keeps being waited for.
    pub ttl: Duration,
    /// The follower's hold counters, published with each acknowledgement (routers).
    pub holds: Option<HoldCounters>,
    /// The cells whose every endpoint the follower sees down (routers), published when it
    /// changes: the leader's second signal that a cell is lost.
    pub down: Option<DownCells>,
    /// The last outage each cell's users saw through the follower (routers), published
    /// when it changes: the RTO as clients saw it.
    pub outages: Option<CellOutages>,
    /// Each cell's answers so far (routers), published as the counts of the last window
    /// of at least [`TRAFFIC_WINDOW`] when they change.
    pub traffic: Option<CellCounts>,
}

/// The shortest window the published traffic covers: rates for a person's eyes, without a
/// write to the global etcd on every renewal.
pub const TRAFFIC_WINDOW: Duration = Duration::from_secs(5);

/// Each cell's (requests, 5xx answers) since the follower started.
pub type CellCounts = std::sync::Arc<dyn Fn() -> BTreeMap<String, (u64, u64)> + Send + Sync>;

/// What each cell answered between two readings of the counters `window_ms` apart (cells
/// with no request in the window are left out; a counter that went back counts from 0).
pub fn traffic_between(
    before: &BTreeMap<String, (u64, u64)>,
    now: &BTreeMap<String, (u64, u64)>,
    window_ms: u64,
) -> BTreeMap<String, CellTraffic> {
    now.iter()
        .filter_map(|(cell, &(requests, errors))| {
            let (r0, e0) = before.get(cell).copied().unwrap_or_default();
            let (r0, e0) = if requests < r0 { (0, 0) } else { (r0, e0) };
            let t = CellTraffic {
                requests: requests - r0,
                errors: errors.saturating_sub(e0),
                window_ms,
            };
            (t.requests > 0).then(|| (cell.clone(), t))
        })
        .collect()
}

/// Each cell's users' last outage, as the follower sees it now.
pub type CellOutages = std::sync::Arc<dyn Fn() -> BTreeMap<String, Outage> + Send + Sync>;

/// Names the cells whose every endpoint is down, as the follower sees them now.
pub type DownCells = std::sync::Arc<dyn Fn() -> Vec<String> + Send + Sync>;

/// A router's counters of held requests and of holds that timed out.
#[derive(Clone, Debug, Default)]
pub struct HoldCounters {
    pub held: Counter,
    pub timed_out: Counter,
}

impl Acknowledger {
    /// Acknowledges forever: reconnects with backoff when etcd is away.
    pub async fn run(self, store: Arc<TableStore>) {
        let mut backoff = crate::etcd::Backoff::default();
        loop {
            let started = tokio::time::Instant::now();
            if let Err(e) = self.session(&store).await {
                tracing::warn!(error = %e, id = %self.id, "table acknowledgement lost; retrying");
            }
            tokio::time::sleep(backoff.after(started.elapsed())).await;
        }
    }

    /// One lease: publish, then republish on every new epoch; renew a third of the TTL.
    async fn session(&self, store: &TableStore) -> Result<()> {
        let mut client = crate::etcd::connect(&self.endpoints, Duration::from_secs(2)).await?;
        let ttl = self.ttl.as_secs().max(2) as i64;
        let lease = client.lease_grant(ttl, None).await?.id();
        let (mut keeper, mut responses) = client.lease_keep_alive(lease).await?;
        let mut epochs = store.subscribe();
        let key = router_key(&self.platform, &self.id);
        let mut renew = tokio::time::interval(Duration::from_millis((ttl as u64 * 1000) / 3));
        renew.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        renew.tick().await;
        let mut publish = true;
        let down_now = || self.down.as_ref().map(|f| f()).unwrap_or_default();
        let outages_now = || self.outages.as_ref().map(|f| f()).unwrap_or_default();
        let mut down = down_now();
        let mut outages = outages_now();
        let counts_now = || self.traffic.as_ref().map(|f| f()).unwrap_or_default();
        let mut counted = (tokio::time::Instant::now(), counts_now());
        let mut traffic = BTreeMap::new();
        loop {
            if publish {
                let ack = RouterAck {
                    region: self.region.clone(),
                    applied_epoch: store.get().map_or(0, |t| t.epoch),
                    applied_at_ms: store.applied_at_ms(),
                    held_total: self.holds.as_ref().map_or(0, |h| h.held.get()),
                    hold_timeouts_total: self.holds.as_ref().map_or(0, |h| h.timed_out.get()),
                    down: down.clone(),
                    outages: outages.clone(),
                    traffic: traffic.clone(),
                };
                let value = serde_json::to_vec(&ack).expect("an ack always serializes");
                client
                    .put(
                        key.as_str(),
                        value,
                        Some(PutOptions::new().with_lease(lease)),
                    )
                    .await?;
            }
            tokio::select! {
                changed = epochs.changed() => {
                    if changed.is_err() {
                        return Ok(());
                    }
                    publish = true;
                }
                _ = renew.tick() => {
                    keeper.keep_alive().await?;
                    if !matches!(responses.message().await?, Some(r) if r.ttl() > 0) {
                        return Err(etcd_client::Error::LeaseKeepAliveError("lease expired".into()).into());
                    }
                    let (seen, outages_seen) = (down_now(), outages_now());
                    publish = seen != down || outages_seen != outages;
                    down = seen;
                    outages = outages_seen;
                    let window = counted.0.elapsed();
                    if self.traffic.is_some() && window >= TRAFFIC_WINDOW {
                        let now = counts_now();
                        let seen = traffic_between(&counted.1, &now, window.as_millis() as u64);
                        publish |= seen != traffic;
                        traffic = seen;
                        counted = (tokio::time::Instant::now(), now);
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn traffic_is_the_growth_of_the_counters_in_the_window() {
        let before = BTreeMap::from([("a".to_string(), (100, 2)), ("b".to_string(), (50, 0))]);
        let now = BTreeMap::from([
            ("a".to_string(), (160, 5)),
            ("b".to_string(), (50, 0)),
            ("c".to_string(), (7, 7)),
        ]);
        let t = traffic_between(&before, &now, 5000);
        assert_eq!(
            t,
            BTreeMap::from([
                (
                    "a".to_string(),
                    CellTraffic {
                        requests: 60,
                        errors: 3,
                        window_ms: 5000
                    }
                ),
                (
                    "c".to_string(),
                    CellTraffic {
                        requests: 7,
                        errors: 7,
                        window_ms: 5000
                    }
                ),
            ]),
            "an idle cell is left out; a new one counts from 0"
        );
        // A router that restarted its counters counts from 0 again.
        let restarted = BTreeMap::from([("a".to_string(), (10, 1))]);
        assert_eq!(traffic_between(&now, &restarted, 5000)["a"].requests, 10);
    }
}
