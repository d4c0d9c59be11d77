//! Writing the routing table (I/O, the platform leader only): one etcd transaction that
//! compares the revision the writer read (a real compare-and-swap) and, when given, that
//! the writer still holds its leadership key, then puts the table and its history entry
//! and trims the history. A writer that lost a race re-reads and decides again; a writer
//! that lost leadership writes nothing.

use crate::{Error, Result};
use cellplane_cells::etcd_keys::{routing_history_key, routing_history_prefix, routing_key};
use cellplane_cells::routing::RoutingTable;
use etcd_client::{Client, Compare, CompareOp, DeleteOptions, Txn, TxnOp};

/// Tables kept under `routing-history/` by default.
pub const DEFAULT_HISTORY: u64 = 1000;

/// The table in force and the revision it was read at.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Current {
    pub table: Option<RoutingTable>,
    /// `mod_revision` of the routing key (0: no table was ever written).
    pub revision: i64,
}

/// Leadership proof checked inside the write: the leader's election key and the revision
/// that created it. If the key is gone or was re-created, the leader lost its term.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Fence {
    pub key: Vec<u8>,
    pub create_revision: i64,
}

/// What a compare-and-swap did.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Swap {
    /// Written at this revision.
    Written { revision: i64 },
    /// Someone wrote the table after it was read: re-read and decide again.
    Stale,
    /// The fence failed: this writer is not the leader any more.
    NotLeader,
}

/// Reads the table in force. A stored table that does not decode is an error: the leader
/// never overwrites what it cannot read without a person looking.
pub async fn read(client: &mut Client, platform: &str) -> Result<Current> {
    let resp = client.get(routing_key(platform), None).await?;
    Ok(match resp.kvs().first() {
        None => Current::default(),
        Some(kv) => Current {
            table: Some(RoutingTable::decode(kv.value())?),
            revision: kv.mod_revision(),
        },
    })
}

/// Writes `next` if the table is still the one in `current` (and `fence` still holds),
/// keeping the last `history` tables under `routing-history/`.
pub async fn compare_and_swap(
    client: &mut Client,
    current: &Current,
    next: &RoutingTable,
    fence: Option<&Fence>,
    history: u64,
) -> Result<Swap> {
    next.validate()?;
    if let Some(cur) = &current.table {
        if next.epoch <= cur.epoch || next.platform != cur.platform {
            return Err(Error::Table(cellplane_cells::Error::InvalidTable {
                field: "epoch".into(),
                problem: format!(
                    "{} is not above the epoch in force ({}); every write must bump it",
                    next.epoch, cur.epoch
                ),
            }));
        }
    }
    let platform = &next.platform;
    let key = routing_key(platform);
    let bytes = next.encode();
    let mut compares = vec![Compare::mod_revision(
        key.as_str(),
        CompareOp::Equal,
        current.revision,
    )];
    if let Some(f) = fence {
        compares.push(Compare::create_revision(
            f.key.clone(),
            CompareOp::Equal,
            f.create_revision,
        ));
    }
    let mut ops = vec![
        TxnOp::put(key.as_str(), bytes.clone(), None),
        TxnOp::put(routing_history_key(platform, next.epoch), bytes, None),
    ];
    if next.epoch > history {
        // Everything older than the newest `history` epochs.
        ops.push(TxnOp::delete(
            routing_history_prefix(platform),
            Some(
                DeleteOptions::new()
                    .with_range(routing_history_key(platform, next.epoch - history + 1)),
            ),
        ));
    }
    let txn = Txn::new().when(compares).and_then(ops);
    let resp = client.txn(txn).await?;
    if resp.succeeded() {
        let revision = resp.header().map_or(0, |h| h.revision());
        return Ok(Swap::Written { revision });
    }
    // Tell a lost race from a lost term.
    if let Some(f) = fence {
        let held = client.get(f.key.clone(), None).await?;
        if held
            .kvs()
            .first()
            .is_none_or(|kv| kv.create_revision() != f.create_revision)
        {
            return Ok(Swap::NotLeader);
        }
    }
    Ok(Swap::Stale)
}

/// The tables in the history, oldest first (at most `limit`, newest kept).
pub async fn history(
    client: &mut Client,
    platform: &str,
    limit: usize,
) -> Result<Vec<RoutingTable>> {
    let resp = client
        .get(
            routing_history_prefix(platform),
            Some(etcd_client::GetOptions::new().with_prefix()),
        )
        .await?;
    let kvs = resp.kvs();
    kvs[kvs.len().saturating_sub(limit)..]
        .iter()
        .map(|kv| RoutingTable::decode(kv.value()).map_err(Error::from))
        .collect()
}
