//! Cell registration in etcd (I/O): a Ready cell's record under
//! `/cellplane/<platform>/cells/<cell>`, attached to one lease this operator keeps alive.
//! When the operator (or its region) dies, the lease expires and every record of the
//! region vanishes: the signal unplanned failover acts on.

use crate::Result;
use cellplane_cells::etcd_keys::{cell_key, MysqlReport, Registration};
use etcd_client::{Client, PutOptions};
use std::collections::HashMap;
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::Arc;
use std::time::Duration;

#[derive(Clone)]
pub struct Registrar {
    /// Replaced by the lease keeper when its member stops answering.
    client: Arc<parking_lot::Mutex<Client>>,
    lease: Arc<AtomicI64>,
    /// Per (platform, cell): what the Cell's reconcile registered last, and what the
    /// region's agent measured last (MySQL, Kafka, intent applied). Two writers fill one
    /// record, so each keeps its part here and every put carries both.
    records: Arc<parking_lot::Mutex<HashMap<(String, String), Parts>>>,
}

#[derive(Clone, Default)]
struct Parts {
    base: Option<Registration>,
    live: Option<Live>,
}

/// What the region's agent measures of a cell.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Live {
    pub mysql: Option<MysqlReport>,
    pub kafka_lag: Option<u64>,
    pub requests_per_sec: Option<u64>,
    /// Measured health (None: not measured; the registration's own value stands).
    pub healthy: Option<bool>,
    pub intent_generation: u64,
    pub healthy_since_ms: Option<u64>,
}

fn merged(parts: &Parts) -> Option<Registration> {
    let mut reg = parts.base.clone()?;
    if let Some(live) = &parts.live {
        reg.mysql = live.mysql.clone();
        reg.kafka_lag = live.kafka_lag;
        reg.requests_per_sec = live.requests_per_sec;
        if let Some(h) = live.healthy {
            reg.healthy = h;
        }
        reg.intent_generation = live.intent_generation;
        reg.healthy_since_ms = live.healthy_since_ms;
    }
    Some(reg)
}

impl Registrar {
    /// Connects, grants a lease of `ttl` and keeps it alive in the background; a lost
    /// lease is replaced and the next reconcile of each cell registers it again.
    pub async fn connect(endpoints: &[String], ttl: Duration) -> Result<Self> {
        let timeout = Duration::from_secs(2);
        let mut client = cellplane_table::etcd::connect(endpoints, timeout).await?;
        let ttl_secs = ttl.as_secs().max(2) as i64;
        let lease = client.lease_grant(ttl_secs, None).await?.id();
        let lease = Arc::new(AtomicI64::new(lease));
        let records: Arc<parking_lot::Mutex<HashMap<(String, String), Parts>>> = Default::default();
        let shared = Arc::new(parking_lot::Mutex::new(client));
        let (l, known, current) = (lease.clone(), records.clone(), shared.clone());
        let endpoints = endpoints.to_vec();
        tokio::spawn(async move {
            let renew_every = Duration::from_millis(ttl_secs as u64 * 1000 / 3);
            loop {
                tokio::time::sleep(renew_every).await;
                let id = l.load(Ordering::Relaxed);
                let mut c = current.lock().clone();
                let renewed = async {
                    let (mut keeper, mut stream) = c.lease_keep_alive(id).await.ok()?;
                    keeper.keep_alive().await.ok()?;
                    stream.message().await.ok()?.map(|r| r.ttl() > 0)
                };
                let alive = matches!(
                    tokio::time::timeout(renew_every, renewed).await,
                    Ok(Some(true))
                );
                if !alive {
                    // The member may be the problem: the next one in the majority serves.
                    if let Ok(fresh) = cellplane_table::etcd::connect(&endpoints, timeout).await {
                        *current.lock() = fresh.clone();
                        c = fresh;
                    }
                    tracing::warn!(lease = id, "registration lease lost; granting a new one");
                    if let Ok(r) = c.lease_grant(ttl_secs, None).await {
                        l.store(r.id(), Ordering::Relaxed);
                        // Every known cell again at once (a region back from a cut is
                        // seen again without waiting for each cell's next reconcile).
                        let again: Vec<((String, String), Registration)> = known
                            .lock()
                            .iter()
                            .filter_map(|(k, parts)| Some((k.clone(), merged(parts)?)))
                            .collect();
                        for ((platform, cell), reg) in again {
                            let value = serde_json::to_vec(&reg).unwrap_or_default();
                            let opts = PutOptions::new().with_lease(r.id());
                            if let Err(e) =
                                c.put(cell_key(&platform, &cell), value, Some(opts)).await
                            {
                                tracing::warn!(%cell, error = %e, "could not register the cell again");
                            }
                        }
                    }
                }
            }
        });
        Ok(Self {
            client: shared,
            lease,
            records,
        })
    }

    /// Registers the cell (from its reconcile), with the agent's latest measurements.
    pub async fn register(&self, platform: &str, cell: &str, reg: &Registration) -> Result<()> {
        let full = {
            let mut records = self.records.lock();
            let parts = records.entry((platform.into(), cell.into())).or_default();
            parts.base = Some(reg.clone());
            merged(parts)
        };
        self.put(platform, cell, &full.unwrap_or_else(|| reg.clone()))
            .await
    }

    /// Publishes the agent's measurements of a registered cell (nothing for a cell that is
    /// not registered yet: it registers once Ready, with them).
    pub async fn report(&self, platform: &str, cell: &str, live: Live) -> Result<()> {
        let full = {
            let mut records = self.records.lock();
            let parts = records.entry((platform.into(), cell.into())).or_default();
            if parts.live.as_ref() == Some(&live) && parts.base.is_some() {
                None
            } else {
                parts.live = Some(live);
                merged(parts)
            }
        };
        match full {
            Some(reg) => self.put(platform, cell, &reg).await,
            None => Ok(()),
        }
    }

    async fn put(&self, platform: &str, cell: &str, reg: &Registration) -> Result<()> {
        let value = serde_json::to_vec(reg).map_err(crate::Error::Serialization)?;
        let opts = PutOptions::new().with_lease(self.lease.load(Ordering::Relaxed));
        let mut client = self.client.lock().clone();
        client
            .put(cell_key(platform, cell), value, Some(opts))
            .await?;
        Ok(())
    }

    pub async fn deregister(&self, platform: &str, cell: &str) -> Result<()> {
        self.records
            .lock()
            .remove(&(platform.to_string(), cell.to_string()));
        let mut client = self.client.lock().clone();
        client.delete(cell_key(platform, cell), None).await?;
        Ok(())
    }
}
