//! Reading the platform's state from the global etcd (I/O): the one observer that builds
//! what operations see ([`Observed`]) for the leader's driver, the CLI's preflight and the
//! topology page, so the three never disagree about what a gate looked at.

use super::operations::{
    last_losses, Batch, Kind, Observed, Operation, Recent, ReplayState, SlotMove, Step, Switchover,
};
use crate::Result;
use cellplane_cells::etcd_keys::{
    all_owners_prefix, cells_prefix, drills_prefix, intents_prefix, replay_applied_key,
    replay_orders_prefix, replay_sent_key, routers_prefix, Intent, OwnerLeaseValue, Registration,
    RouterAck,
};
use cellplane_cells::routing::RoutingTable;
use etcd_client::{Client, GetOptions};
use serde::de::DeserializeOwned;
use std::collections::BTreeMap;

/// Everything under one prefix, decoded, by the key's last segment, with its revision;
/// undecodable values are logged and skipped.
pub async fn read_prefix<T: DeserializeOwned>(
    client: &mut Client,
    prefix: &str,
) -> Result<BTreeMap<String, (T, i64)>> {
    let resp = client
        .get(prefix, Some(GetOptions::new().with_prefix()))
        .await?;
    let mut out = BTreeMap::new();
    for kv in resp.kvs() {
        let name = String::from_utf8_lossy(&kv.key()[prefix.len()..]).into_owned();
        match serde_json::from_slice::<T>(kv.value()) {
            Ok(v) => {
                out.insert(name, (v, kv.mod_revision()));
            }
            Err(e) => {
                tracing::warn!(key = %String::from_utf8_lossy(kv.key()), error = %e, "unreadable record skipped")
            }
        }
    }
    Ok(out)
}

/// Everything under one prefix, decoded, by the key's last segment (revisions dropped).
pub async fn read_values<T: DeserializeOwned>(
    client: &mut Client,
    prefix: &str,
) -> Result<BTreeMap<String, T>> {
    Ok(read_prefix(client, prefix)
        .await?
        .into_iter()
        .map(|(k, (v, _))| (k, v))
        .collect())
}

/// The keys under `prefix`, without it (no values read).
pub async fn keys_under(client: &mut Client, prefix: &str) -> Result<Vec<String>> {
    let opts = GetOptions::new().with_prefix().with_keys_only();
    let resp = client.get(prefix, Some(opts)).await?;
    Ok(resp
        .kvs()
        .iter()
        .map(|kv| String::from_utf8_lossy(&kv.key()[prefix.len()..]).into_owned())
        .collect())
}

/// Live ownership leases by cell (`owners/<cell>/<lease>`): how many, and the lowest epoch
/// any of them says its app has drained (a write admitted under an older table may still
/// be running below it).
pub async fn read_owners(client: &mut Client, platform: &str) -> Result<OwnerLeases> {
    let prefix = all_owners_prefix(platform);
    let resp = client
        .get(prefix.as_str(), Some(GetOptions::new().with_prefix()))
        .await?;
    let mut leases = OwnerLeases::default();
    for kv in resp.kvs() {
        let key = String::from_utf8_lossy(&kv.key()[prefix.len()..]).into_owned();
        if let Some((cell, _lease)) = key.split_once('/') {
            let value = OwnerLeaseValue::decode(kv.value());
            *leases.count.entry(cell.to_string()).or_insert(0) += 1;
            let drained = leases
                .drained
                .entry(cell.to_string())
                .or_insert(value.drained_epoch);
            *drained = (*drained).min(value.drained_epoch);
        }
    }
    Ok(leases)
}

/// What the live ownership leases say, by cell.
#[derive(Clone, Debug, Default)]
pub struct OwnerLeases {
    pub count: BTreeMap<String, usize>,
    /// The lowest drained epoch over the cell's leases.
    pub drained: BTreeMap<String, u64>,
}

/// The operation records under `drills/`, by kind, with their revisions.
#[derive(Default)]
pub struct Records {
    pub cells: BTreeMap<String, (Switchover, i64)>,
    pub batches: BTreeMap<String, (Batch, i64)>,
    pub moves: BTreeMap<String, (SlotMove, i64)>,
}

impl Records {
    pub async fn read(client: &mut Client, platform: &str) -> Result<Self> {
        let mut records = Records::default();
        for (id, (op, rev)) in read_prefix::<Operation>(client, &drills_prefix(platform)).await? {
            match op {
                Operation::Switchover(s) => records.cells.insert(id, (s, rev)).map(|_| ()),
                Operation::Batch(b) => records.batches.insert(id, (b, rev)).map(|_| ()),
                Operation::SlotMove(m) => records.moves.insert(id, (m, rev)).map(|_| ()),
            };
        }
        Ok(records)
    }

    /// Every one-cell operation, finished or not.
    pub fn all(&self) -> Vec<Switchover> {
        self.cells.values().map(|(s, _)| s.clone()).collect()
    }

    /// The one-cell operations still running, oldest id first.
    pub fn running(&self) -> Vec<Switchover> {
        self.cells
            .values()
            .filter(|(s, _)| !s.finished())
            .map(|(s, _)| s.clone())
            .collect()
    }

    /// The batches still running.
    pub fn running_batches(&self) -> Vec<Batch> {
        self.batches
            .values()
            .filter(|(b, _)| b.outcome.is_none())
            .map(|(b, _)| b.clone())
            .collect()
    }
}

/// What the cells, routers and regions report, read once: what a step or a gate looks at.
pub struct Snapshot {
    pub table: Option<RoutingTable>,
    pub cells: BTreeMap<String, Registration>,
    pub routers: BTreeMap<String, RouterAck>,
    pub intents: BTreeMap<String, Intent>,
    pub owners: BTreeMap<String, usize>,
    pub drained: BTreeMap<String, u64>,
    pub recent: Recent,
}

impl Snapshot {
    /// Reads the table, registrations, router acks, intents and ownership leases; from
    /// `operations`, when each cell an unplanned failover moved was lost, and the replays
    /// of the cells whose failover waits for them (`Rejoin`).
    pub async fn read(
        client: &mut Client,
        platform: &str,
        operations: &[Switchover],
    ) -> Result<Self> {
        let table = cellplane_table::write::read(client, platform)
            .await
            .map_err(super::table_error)?
            .table;
        let rejoining = operations
            .iter()
            .filter(|op| op.kind == Kind::Emergency && op.step == Step::Rejoin)
            .map(|op| op.source.clone());
        let mut replays = BTreeMap::new();
        for cell in rejoining {
            let state = read_replay(client, platform, &cell).await?;
            replays.insert(cell, state);
        }
        let leases = read_owners(client, platform).await?;
        Ok(Self {
            table,
            cells: read_values(client, &cells_prefix(platform)).await?,
            routers: read_values(client, &routers_prefix(platform)).await?,
            intents: read_values(client, &intents_prefix(platform)).await?,
            owners: leases.count,
            drained: leases.drained,
            recent: Recent {
                lost_at_ms: last_losses(operations),
                replays,
            },
        })
    }

    /// What an operation sees against `table` (the snapshot's, or one read since).
    pub fn observed<'a>(
        &'a self,
        table: &'a RoutingTable,
        now_ms: u64,
        busy: bool,
    ) -> Observed<'a> {
        Observed {
            now_ms,
            table,
            cells: &self.cells,
            routers: &self.routers,
            intents: &self.intents,
            owners: &self.owners,
            drained: &self.drained,
            busy,
            recent: &self.recent,
        }
    }
}

/// The replay of a failed-over cell's orders (`replay/<cell>/`).
async fn read_replay(client: &mut Client, platform: &str, cell: &str) -> Result<ReplayState> {
    let pending = client
        .get(
            replay_orders_prefix(platform, cell),
            Some(GetOptions::new().with_prefix().with_count_only()),
        )
        .await?
        .count();
    Ok(ReplayState {
        sent: get_json(client, &replay_sent_key(platform, cell)).await?,
        applied: get_json(client, &replay_applied_key(platform, cell)).await?,
        pending: pending.max(0) as u64,
    })
}

/// One key's JSON value (None: absent or unreadable).
async fn get_json<T: DeserializeOwned>(client: &mut Client, key: &str) -> Result<Option<T>> {
    Ok(client
        .get(key, None)
        .await?
        .kvs()
        .first()
        .and_then(|kv| serde_json::from_slice(kv.value()).ok()))
}
