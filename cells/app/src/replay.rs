//! Replaying a failed-over cell's acknowledged orders where its users are served now.
//!
//! An order is acknowledged once it is on the cell's own Kafka; the persister writes it to
//! MySQL later. When a region is cut off, orders its home acknowledged in its last moments
//! are on that home's log only: some never persisted (the home was fenced first), some
//! persisted only there (errant transactions, exported and then dropped by the rebuild).
//! Both must reach the new home, late but not lost. Orders travel through the global etcd
//! like the platform's other orders; no app reaches another region's stores:
//!
//! - **old home** (its cell `FailedOver`, served by another cell, and its ownership lease
//!   lost: a planned switchover leaves it held, and has nothing to replay): once per
//!   episode, it reads its log from a little before its last message (`lookback`, and
//!   never after the persister's committed offset) to the end, leaves out orders voided
//!   here (their clients were told "refused": the Redis marker `void:` or a
//!   `voided_orders` row), puts each under `replay/<cell>/orders/<id>` (into the cell's
//!   schema), and then `replay/<cell>/sent` with the counts and the epoch it saw;
//! - **serving cell** (the table says it serves that cell's users): persists each with the
//!   persister's idempotent write (a row that is there already is a duplicate; an order
//!   voided here is skipped), deletes it, and counts in `replay/<cell>/applied`.
//!
//! The platform leader waits for both before it ends the failover and records the counts.

use crate::consumer::{persist, Persisted};
use crate::metrics::Metrics;
use crate::orders::{marker_key, OrderEvent};
use crate::stores::{kafka_config, Stores};
use cellplane_cells::crd::CellPhase;
use cellplane_cells::etcd_keys::{
    replay_applied_key, replay_orders_prefix, replay_sent_key, ReplayApplied, ReplaySent,
};
use cellplane_cells::routing::RoutingTable;
use cellplane_table::TableStore;
use etcd_client::{Client, Compare, CompareOp, GetOptions, Txn, TxnOp};
use mysql_async::prelude::Queryable;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::Message;
use rdkafka::{Offset, TopicPartitionList};
use serde::{Deserialize, Serialize};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// How long one try at forwarding the log may take.
const FORWARD_DEADLINE: Duration = Duration::from_secs(60);

/// One forwarded order.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct ReplayedOrder {
    /// The replay it belongs to ([`ReplaySent::epoch`]).
    pub epoch: u64,
    /// Its offset on the old home's log.
    pub offset: i64,
    pub event: OrderEvent,
}

/// The epoch from which `me` must forward its log: its cell is failed over (its users
/// served by another, unfrozen cell). None otherwise.
pub fn failed_over_epoch(table: &RoutingTable, me: &str) -> Option<u64> {
    let cell = table.cell(me)?;
    let served_by = table.serving_for(me)?;
    (cell.state == CellPhase::FailedOver
        && !cell.frozen
        && served_by.name != me
        && !served_by.frozen)
        .then_some(table.epoch)
}

/// The failed-over cells whose users `me` serves now: their forwarded orders are its to
/// persist.
pub fn serving_for_others(table: &RoutingTable, me: &str) -> Vec<String> {
    table
        .cells
        .iter()
        .filter(|c| c.name != me && c.state == CellPhase::FailedOver)
        .filter(|c| table.serving_for(&c.name).is_some_and(|s| s.name == me))
        .map(|c| c.name.clone())
        .collect()
}

/// The first offset to forward: a `lookback` before the log's last message (covering what
/// was persisted here but may never have replicated), and no later than the persister's
/// committed offset (everything after it is unpersisted), within the log.
pub fn first_offset(low: i64, committed: Option<i64>, at_lookback: Option<i64>) -> i64 {
    let mut from = at_lookback.unwrap_or(low);
    if let Some(c) = committed {
        from = from.min(c);
    }
    from.max(low)
}

pub struct Replayer {
    pub stores: Arc<Stores>,
    pub metrics: Arc<Metrics>,
    pub tables: Arc<TableStore>,
    pub endpoints: Vec<String>,
    pub platform: String,
    pub lookback: Duration,
}

/// Per-process state of the old home's side.
#[derive(Default)]
struct Episode {
    /// The epoch at which this process saw its cell failed over (None: it is not).
    since: Option<u64>,
    forwarded: bool,
}

impl Replayer {
    /// Runs both sides every second until the process ends.
    pub async fn run(self) {
        let mut client: Option<Client> = None;
        let mut episode = Episode::default();
        loop {
            tokio::time::sleep(Duration::from_secs(1)).await;
            let Some(table) = self.tables.get() else {
                continue;
            };
            match failed_over_epoch(&table, &self.stores.cell) {
                None => episode = Episode::default(),
                Some(epoch) if episode.since.is_none() => {
                    episode.since = Some(epoch);
                    // A planned switchover moves the users of a cell whose app kept its
                    // ownership lease throughout (its orders were drained and replicated
                    // before the flip); only a cell that lost its lease (cut off, or a
                    // process that never held one) may have orders to replay.
                    if self
                        .stores
                        .owner_lease
                        .get()
                        .is_some_and(|l| l.check().is_ok())
                    {
                        episode.forwarded = true;
                        tracing::info!(
                            epoch,
                            "failed over while holding its ownership lease (a planned switchover): nothing to replay"
                        );
                    }
                }
                Some(_) => {}
            }
            let others = serving_for_others(&table, &self.stores.cell);
            let forward_now = episode.since.is_some() && !episode.forwarded;
            if !forward_now && others.is_empty() {
                continue;
            }
            if client.is_none() {
                client = cellplane_table::etcd::connect(&self.endpoints, Duration::from_secs(1))
                    .await
                    .ok();
            }
            let Some(c) = client.as_mut() else { continue };
            if let (true, Some(epoch)) = (forward_now, episode.since) {
                // Bounded: a store that hangs fails this try, not the replay.
                let tried = tokio::time::timeout(FORWARD_DEADLINE, self.forward(c, epoch))
                    .await
                    .unwrap_or_else(|_| Err(format!("no end within {FORWARD_DEADLINE:?}")));
                match tried {
                    Ok(sent) => {
                        episode.forwarded = true;
                        tracing::warn!(forwarded = sent.forwarded, void_skipped = sent.void_skipped, from = sent.from_offset, to = sent.to_offset, epoch, "this cell failed over: its acknowledged orders were forwarded to the cell serving its users");
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, "forwarding this failed-over cell's orders failed; retrying");
                        client = None;
                        continue;
                    }
                }
            }
            for cell in others {
                if let Err(e) = self.apply(c, &cell).await {
                    tracing::warn!(%cell, error = %e, "persisting a failed-over cell's forwarded orders failed; retrying");
                    client = None;
                    break;
                }
            }
        }
    }

    /// The old home's side: forwards its log's orders (voided ones left out).
    async fn forward(&self, c: &mut Client, epoch: u64) -> Result<ReplaySent, String> {
        let (from, to, messages) = read_log(self.stores.clone(), self.lookback).await?;
        let mut events: Vec<(i64, OrderEvent)> = messages
            .into_iter()
            .filter_map(|(offset, payload)| {
                Some((offset, serde_json::from_slice::<OrderEvent>(&payload).ok()?))
            })
            .collect();
        // Only orders not voided here: a voided order's client was told "refused".
        let voided = self.voided(&events).await?;
        let before = events.len();
        events.retain(|(_, e)| !voided.contains(&e.order_id));
        let void_skipped = (before - events.len()) as u64;
        let schema = self.stores.own.schema().to_string();
        let prefix = replay_orders_prefix(&self.platform, &self.stores.cell);
        for chunk in events.chunks(64) {
            let ops: Vec<TxnOp> = chunk
                .iter()
                .map(|(offset, e)| {
                    let mut event = e.clone();
                    event.schema.get_or_insert_with(|| schema.clone());
                    let value = serde_json::to_vec(&ReplayedOrder {
                        epoch,
                        offset: *offset,
                        event,
                    })
                    .expect("an order serializes");
                    TxnOp::put(format!("{prefix}{}", e.order_id), value, None)
                })
                .collect();
            c.txn(Txn::new().and_then(ops))
                .await
                .map_err(|e| format!("etcd: {e}"))?;
        }
        let sent = ReplaySent {
            epoch,
            forwarded: events.len() as u64,
            void_skipped,
            from_offset: from,
            to_offset: to,
            at_ms: cellplane_table::store::now_ms(),
        };
        c.put(
            replay_sent_key(&self.platform, &self.stores.cell),
            serde_json::to_vec(&sent).expect("serializes"),
            None,
        )
        .await
        .map_err(|e| format!("etcd: {e}"))?;
        self.metrics.orders_replay_forwarded.inc_by(sent.forwarded);
        self.metrics.orders_replay_void_skipped.inc_by(void_skipped);
        Ok(sent)
    }

    /// The ids among `events` voided here (Redis marker, else a `voided_orders` row).
    async fn voided(&self, events: &[(i64, OrderEvent)]) -> Result<Vec<String>, String> {
        let mut out = Vec::new();
        let ids: Vec<&str> = events.iter().map(|(_, e)| e.order_id.as_str()).collect();
        for chunk in ids.chunks(200) {
            let keys: Vec<String> = chunk.iter().map(|id| marker_key(id)).collect();
            let markers: Vec<Option<String>> = self
                .stores
                .redis
                .run(|mut r| async move { redis::cmd("MGET").arg(&keys).query_async(&mut r).await })
                .await
                .map_err(|e| e.to_string())?;
            for (id, m) in chunk.iter().zip(markers) {
                if m.is_some_and(|m| m.starts_with("void:")) {
                    out.push(id.to_string());
                }
            }
            let voided = self.stores.own.table("voided_orders");
            let marks = crate::sql::repeated("?", chunk.len());
            let mut conn = self.stores.mysql_conn().await.map_err(|e| e.to_string())?;
            // Within the store deadline: the schema may be locked while the region
            // rebuilds it; the forward is tried again a second later.
            let rows: Vec<String> = crate::stores::timed(
                "mysql",
                self.stores.cfg.store_timeout * 2,
                conn.exec(
                    format!("SELECT order_id FROM {voided} WHERE order_id IN ({marks})"),
                    chunk.to_vec(),
                ),
            )
            .await
            .map_err(|e| format!("mysql: {e}"))?;
            out.extend(rows);
        }
        out.sort();
        out.dedup();
        Ok(out)
    }

    /// The serving cell's side: persists `cell`'s forwarded orders and counts them.
    async fn apply(&self, c: &mut Client, cell: &str) -> Result<(), String> {
        let prefix = replay_orders_prefix(&self.platform, cell);
        let page = c
            .get(
                prefix.as_str(),
                Some(GetOptions::new().with_prefix().with_limit(200)),
            )
            .await
            .map_err(|e| format!("etcd: {e}"))?;
        let mut counts = ReplayApplied::default();
        for kv in page.kvs() {
            let Ok(order) = serde_json::from_slice::<ReplayedOrder>(kv.value()) else {
                tracing::error!(key = %String::from_utf8_lossy(kv.key()), "an undecodable forwarded order; deleted");
                c.delete(kv.key(), None)
                    .await
                    .map_err(|e| format!("etcd: {e}"))?;
                continue;
            };
            let result = persist(&self.stores, &order.event, order.offset)
                .await
                .map_err(|e| e.to_string())?;
            // Whoever deletes it counts it (another pod of this cell may race).
            let deleted = c
                .txn(
                    Txn::new()
                        .when([Compare::mod_revision(
                            kv.key(),
                            CompareOp::Equal,
                            kv.mod_revision(),
                        )])
                        .and_then([TxnOp::delete(kv.key(), None)]),
                )
                .await
                .map_err(|e| format!("etcd: {e}"))?
                .succeeded();
            if !deleted {
                continue;
            }
            counts.epoch = counts.epoch.max(order.epoch);
            match result {
                Persisted::New => {
                    counts.persisted += 1;
                    self.metrics.orders_replayed.inc();
                }
                Persisted::Duplicate => counts.duplicates += 1,
                Persisted::Voided => counts.voided += 1,
            }
        }
        if counts.epoch > 0 {
            add_applied(c, &replay_applied_key(&self.platform, cell), &counts).await?;
            tracing::info!(%cell, persisted = counts.persisted, duplicates = counts.duplicates, voided = counts.voided, "forwarded orders of a failed-over cell persisted");
        }
        Ok(())
    }
}

/// Adds `counts` to the applied record (reset for a newer replay), compare-and-swap.
async fn add_applied(c: &mut Client, key: &str, counts: &ReplayApplied) -> Result<(), String> {
    for _ in 0..5 {
        let current = c.get(key, None).await.map_err(|e| format!("etcd: {e}"))?;
        let (mut applied, revision) = match current.kvs().first() {
            Some(kv) => (
                serde_json::from_slice::<ReplayApplied>(kv.value()).unwrap_or_default(),
                kv.mod_revision(),
            ),
            None => (ReplayApplied::default(), 0),
        };
        if applied.epoch != counts.epoch {
            applied = ReplayApplied {
                epoch: counts.epoch,
                ..ReplayApplied::default()
            };
        }
        applied.persisted += counts.persisted;
        applied.duplicates += counts.duplicates;
        applied.voided += counts.voided;
        let value = serde_json::to_vec(&applied).expect("serializes");
        let done = c
            .txn(
                Txn::new()
                    .when([Compare::mod_revision(key, CompareOp::Equal, revision)])
                    .and_then([TxnOp::put(key, value, None)]),
            )
            .await
            .map_err(|e| format!("etcd: {e}"))?
            .succeeded();
        if done {
            return Ok(());
        }
    }
    Err(format!("{key}: kept changing under five attempts"))
}

/// The order log's messages to forward: `[from, to)` and each message's offset and
/// payload. Blocking librdkafka calls, off the async threads.
async fn read_log(
    stores: Arc<Stores>,
    lookback: Duration,
) -> Result<(i64, i64, Vec<(i64, Vec<u8>)>), String> {
    tokio::task::spawn_blocking(move || {
        let timeout = Duration::from_secs(5);
        let topic = stores.cfg.orders_topic.clone();
        // The persister's group, only to read its committed offset: assigning partitions
        // (never subscribing) does not join the group.
        let c: BaseConsumer = kafka_config(&stores.kafka_brokers)
            .set("group.id", &stores.cfg.orders_group)
            .set("enable.auto.commit", "false")
            .create()
            .map_err(|e| e.to_string())?;
        let (low, high) = c
            .fetch_watermarks(&topic, 0, timeout)
            .map_err(|e| format!("kafka watermarks: {e}"))?;
        if high <= low {
            return Ok((low, high, Vec::new()));
        }
        let mut tpl = TopicPartitionList::new();
        tpl.add_partition(&topic, 0);
        let committed = c
            .committed_offsets(tpl, timeout)
            .map_err(|e| format!("kafka committed offset: {e}"))?
            .find_partition(&topic, 0)
            .and_then(|p| match p.offset() {
                Offset::Offset(o) => Some(o),
                _ => None,
            });
        let last = read_range(&c, &topic, high - 1, high, timeout)?;
        let last_ms = last
            .first()
            .and_then(|(_, _, ts)| *ts)
            .ok_or("the log's last message has no timestamp")?;
        let mut at = TopicPartitionList::new();
        at.add_partition_offset(
            &topic,
            0,
            Offset::Offset(last_ms - lookback.as_millis() as i64),
        )
        .map_err(|e| e.to_string())?;
        let at_lookback = c
            .offsets_for_times(at, timeout)
            .map_err(|e| format!("kafka offsets for times: {e}"))?
            .find_partition(&topic, 0)
            .and_then(|p| match p.offset() {
                Offset::Offset(o) => Some(o),
                _ => None,
            });
        let from = first_offset(low, committed, at_lookback);
        let messages = read_range(&c, &topic, from, high, timeout)?
            .into_iter()
            .map(|(o, p, _)| (o, p))
            .collect();
        Ok((from, high, messages))
    })
    .await
    .map_err(|e| e.to_string())?
}

type Read = (i64, Vec<u8>, Option<i64>);

/// Messages at offsets `[from, to)`: offset, payload, timestamp.
fn read_range(
    c: &BaseConsumer,
    topic: &str,
    from: i64,
    to: i64,
    timeout: Duration,
) -> Result<Vec<Read>, String> {
    let mut tpl = TopicPartitionList::new();
    tpl.add_partition_offset(topic, 0, Offset::Offset(from))
        .map_err(|e| e.to_string())?;
    c.assign(&tpl).map_err(|e| format!("kafka assign: {e}"))?;
    let deadline = Instant::now() + timeout * 6;
    let mut out = Vec::new();
    let mut next = from;
    while next < to {
        if Instant::now() > deadline {
            return Err(format!(
                "kafka: read {next} of [{from}, {to}) before the deadline"
            ));
        }
        match c.poll(timeout) {
            Some(Ok(m)) => {
                next = m.offset() + 1;
                out.push((
                    m.offset(),
                    m.payload().unwrap_or_default().to_vec(),
                    m.timestamp().to_millis(),
                ));
            }
            Some(Err(e)) => return Err(format!("kafka read: {e}")),
            None => {}
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use cellplane_cells::routing::CellEntry;

    fn active() -> RoutingTable {
        let mut a = CellEntry::active("a", "us", vec!["a:1".into()]);
        a.standby = Some("b".into());
        let mut b = CellEntry::active("b", "eu", vec!["b:1".into()]);
        b.standby = Some("a".into());
        RoutingTable::placed("shop", 6, 64, vec![(a, 1), (b, 1)]).unwrap()
    }

    #[test]
    fn the_old_home_forwards_only_while_failed_over_and_the_new_home_applies() {
        let t = active().failed_over("a").unwrap();
        assert_eq!(failed_over_epoch(&t, "a"), Some(7));
        assert_eq!(failed_over_epoch(&t, "b"), None);
        assert_eq!(serving_for_others(&t, "b"), vec!["a".to_string()]);
        assert!(serving_for_others(&t, "a").is_empty());
        // Frozen (a failback under way): wait.
        assert_eq!(failed_over_epoch(&t.frozen("b").unwrap(), "a"), None);
        // Serving its own users: nothing to forward, nobody applies for it.
        let t = active();
        assert_eq!(failed_over_epoch(&t, "a"), None);
        assert!(serving_for_others(&t, "b").is_empty());
    }

    #[test]
    fn forwarding_starts_a_lookback_before_the_end_and_never_after_the_unpersisted() {
        // Persister at 90, the lookback starts at 80: from 80.
        assert_eq!(first_offset(0, Some(90), Some(80)), 80);
        // Persister far behind (stuck at 10): everything after it too.
        assert_eq!(first_offset(0, Some(10), Some(80)), 10);
        // No committed offset, no timestamp match: the whole log.
        assert_eq!(first_offset(5, None, None), 5);
        // Never before the log's start.
        assert_eq!(first_offset(50, Some(10), Some(20)), 50);
    }
}
