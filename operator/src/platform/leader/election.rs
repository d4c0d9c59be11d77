//! The platform leader's term (I/O): an etcd election on a lease. The term's election key
//! and its create revision fence every write the leader makes; the term ends (and the
//! leader stops acting) when the lease cannot be renewed in time.

use super::PlatformConfig;
use crate::Result;
use cellplane_cells::etcd_keys::leader_election;
use cellplane_table::write::Fence;
use etcd_client::{Client, LeaderKey};
use std::time::Duration;
use tokio::sync::watch;

pub struct Term {
    leader: LeaderKey,
    lease: i64,
    /// Becomes true when the term is over (renewal failed for too long, or lease gone).
    over: watch::Receiver<bool>,
    keeper: tokio::task::JoinHandle<()>,
}

impl Term {
    /// Waits until elected. The lease is kept alive while waiting too, so a candidate that
    /// dies leaves the queue within the lease.
    pub async fn campaign(client: &mut Client, cfg: &PlatformConfig) -> Result<Term> {
        let ttl = cfg.lease.as_secs().max(2) as i64;
        let lease = client.lease_grant(ttl, None).await?.id();
        let (over_tx, over) = watch::channel(false);
        let keeper = tokio::spawn(keep_alive(client.clone(), lease, cfg.lease, over_tx));
        let name = leader_election(&cfg.platform);
        let mut elections = client.election_client();
        let campaign = elections.campaign(name, cfg.identity.clone(), lease);
        let mut lost = over.clone();
        let resp = tokio::select! {
            r = campaign => r,
            _ = lost.wait_for(|o| *o) => {
                keeper.abort();
                return Err(etcd_client::Error::LeaseKeepAliveError("lease lost while campaigning".into()).into());
            }
        };
        let resp = match resp {
            Ok(r) => r,
            Err(e) => {
                keeper.abort();
                let _ = client.lease_revoke(lease).await;
                return Err(e.into());
            }
        };
        let leader = resp.leader().cloned().ok_or_else(|| {
            etcd_client::Error::ElectError("campaign returned no leader key".into())
        })?;
        Ok(Term {
            leader,
            lease,
            over,
            keeper,
        })
    }

    /// The proof of leadership that writes compare.
    pub fn fence(&self) -> Fence {
        Fence {
            key: self.leader.key().to_vec(),
            create_revision: self.leader.rev(),
        }
    }

    /// Resolves when the term is over.
    pub async fn lost(&self) {
        let mut over = self.over.clone();
        let _ = over.wait_for(|o| *o).await;
    }

    /// Ends the term at once (graceful shutdown, lost region leadership): the next
    /// candidate does not wait for the lease.
    pub async fn resign(self, client: &mut Client) {
        self.keeper.abort();
        let _ = client.lease_revoke(self.lease).await;
    }
}

/// Renews every third of the lease; declares the term over when no renewal succeeded for
/// two thirds of it (before etcd can expire it and elect someone else).
async fn keep_alive(mut client: Client, lease: i64, ttl: Duration, over: watch::Sender<bool>) {
    let every = ttl / 3;
    let limit = ttl * 2 / 3;
    let mut last_ok = tokio::time::Instant::now();
    let mut stream = None;
    loop {
        tokio::time::sleep(every).await;
        if stream.is_none() {
            stream = client.lease_keep_alive(lease).await.ok();
        }
        let renewed = match stream.as_mut() {
            Some((keeper, responses)) => {
                let attempt = async {
                    keeper.keep_alive().await?;
                    responses.message().await
                };
                match tokio::time::timeout(every, attempt).await {
                    Ok(Ok(Some(r))) if r.ttl() > 0 => true,
                    Ok(Ok(Some(_))) => {
                        // The lease is gone: the term is over for sure.
                        let _ = over.send(true);
                        return;
                    }
                    _ => false,
                }
            }
            None => false,
        };
        if renewed {
            last_ok = tokio::time::Instant::now();
        } else {
            stream = None;
            if last_ok.elapsed() >= limit {
                tracing::error!(lease, "platform lease not renewed in time; ending the term");
                let _ = over.send(true);
                return;
            }
        }
    }
}
