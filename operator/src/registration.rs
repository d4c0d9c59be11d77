//! Cell registration in etcd (I/O): a Ready cell's record under
//! `/cellplane/<platform>/cells/<cell>`, attached to one lease this operator keeps alive.
//! When the operator (or its region) dies, the lease expires and every record of the
//! region vanishes: the signal unplanned failover acts on.

use crate::Result;
use cellplane_cells::etcd_keys::{cell_key, Registration};
use etcd_client::{Client, PutOptions};
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::Arc;
use std::time::Duration;

#[derive(Clone)]
pub struct Registrar {
    client: Client,
    lease: Arc<AtomicI64>,
}

impl Registrar {
    /// Connects, grants a lease of `ttl` and keeps it alive in the background; a lost
    /// lease is replaced and the next reconcile of each cell registers it again.
    pub async fn connect(endpoints: &[String], ttl: Duration) -> Result<Self> {
        let options = etcd_client::ConnectOptions::new()
            .with_connect_timeout(Duration::from_secs(5))
            .with_timeout(Duration::from_secs(5));
        let mut client = Client::connect(endpoints, Some(options)).await?;
        let ttl_secs = ttl.as_secs().max(3) as i64;
        let lease = client.lease_grant(ttl_secs, None).await?.id();
        let lease = Arc::new(AtomicI64::new(lease));
        let (mut c, l) = (client.clone(), lease.clone());
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(Duration::from_secs((ttl_secs / 3).max(1) as u64)).await;
                let id = l.load(Ordering::Relaxed);
                let alive = match c.lease_keep_alive(id).await {
                    Ok((mut keeper, mut stream)) => {
                        keeper.keep_alive().await.is_ok()
                            && matches!(stream.message().await, Ok(Some(r)) if r.ttl() > 0)
                    }
                    Err(_) => false,
                };
                if !alive {
                    tracing::warn!(lease = id, "registration lease lost; granting a new one");
                    if let Ok(r) = c.lease_grant(ttl_secs, None).await {
                        l.store(r.id(), Ordering::Relaxed);
                    }
                }
            }
        });
        Ok(Self { client, lease })
    }

    pub async fn register(&self, platform: &str, cell: &str, reg: &Registration) -> Result<()> {
        let value = serde_json::to_vec(reg).map_err(crate::Error::Serialization)?;
        let opts = PutOptions::new().with_lease(self.lease.load(Ordering::Relaxed));
        self.client
            .clone()
            .put(cell_key(platform, cell), value, Some(opts))
            .await?;
        Ok(())
    }

    pub async fn deregister(&self, platform: &str, cell: &str) -> Result<()> {
        self.client
            .clone()
            .delete(cell_key(platform, cell), None)
            .await?;
        Ok(())
    }
}
