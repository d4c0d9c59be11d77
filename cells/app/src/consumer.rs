//! The order persister: reads the cell's order queue and writes each order to MySQL once,
//! a fetched batch per transaction.
//!
//! At-least-once delivery (offsets are committed only after the row is written) plus an
//! idempotent write (`INSERT IGNORE` on the order id) gives exactly one row per order, also
//! when Kafka redelivers after a crash or a rebalance. While MySQL is down the consumer
//! waits and retries the same message: nothing is skipped, nothing is committed.

use crate::metrics::Metrics;
use crate::orders::OrderEvent;
use crate::sql;
use crate::stores::{kafka_config, Dataset, Stores};
use futures::FutureExt;
use mysql_async::prelude::Queryable;
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::consumer::{CommitMode, Consumer, StreamConsumer};
use rdkafka::error::KafkaError;
use rdkafka::message::{BorrowedMessage, Message};
use rdkafka::producer::Producer;
use rdkafka::types::RDKafkaErrorCode;
use rdkafka::{Offset, TopicPartitionList};
use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

pub fn consumer(stores: &Stores) -> Result<StreamConsumer, KafkaError> {
    kafka_config(&stores.kafka_brokers)
        .set("group.id", &stores.cfg.orders_group)
        .set("enable.auto.commit", "false")
        .set("auto.offset.reset", "earliest")
        .set("session.timeout.ms", "6000")
        .set("heartbeat.interval.ms", "1000")
        .set("topic.metadata.refresh.interval.ms", "2000")
        .create()
}

/// Creates the order topic if missing (one partition per cell: a cell is small by design).
pub async fn ensure_topic(stores: &Stores) -> Result<(), KafkaError> {
    let admin: AdminClient<DefaultClientContext> = kafka_config(&stores.kafka_brokers).create()?;
    let topic = NewTopic::new(&stores.cfg.orders_topic, 1, TopicReplication::Fixed(1));
    let opts = AdminOptions::new().operation_timeout(Some(Duration::from_secs(5)));
    for result in admin.create_topics([&topic], &opts).await? {
        match result {
            Ok(_) | Err((_, RDKafkaErrorCode::TopicAlreadyExists)) => {}
            Err((name, code)) => {
                return Err(KafkaError::AdminOp(code)).inspect_err(
                    |_| tracing::warn!(topic = %name, ?code, "could not create the order topic"),
                )
            }
        }
    }
    Ok(())
}

/// The most orders persisted in one transaction. A batch is what the consumer has fetched
/// already (it never waits to fill one), so under a light load a batch is one order and
/// under a backlog one transaction writes hundreds: a cell serving two cells' users keeps
/// up, and a drain before a switchover takes one or two transactions instead of one per
/// order. 256 rows of 6 values stay far below MySQL's 65,535 placeholders per statement.
const BATCH: usize = 256;

/// Runs until the process ends.
pub async fn run(stores: Arc<Stores>, metrics: Arc<Metrics>, consumer: Arc<StreamConsumer>) {
    let mut backoff = Duration::from_millis(200);
    while let Err(e) = ensure_topic(&stores).await {
        tracing::warn!(error = %e, "order topic not ready; retrying");
        tokio::time::sleep(backoff).await;
        backoff = (backoff * 2).min(Duration::from_secs(5));
    }
    // Retried like the topic: a persister that gave up would leave every accepted order
    // unpersisted while the app answers ready.
    while let Err(e) = consumer.subscribe(&[&stores.cfg.orders_topic]) {
        tracing::error!(error = %e, "cannot subscribe to the order topic; retrying");
        tokio::time::sleep(backoff).await;
        backoff = (backoff * 2).min(Duration::from_secs(5));
    }
    let mut orders = Vec::with_capacity(BATCH);
    loop {
        let mut last = match consumer.recv().await {
            Ok(m) => m,
            Err(e) => {
                tracing::debug!(error = %e, "order queue read failed; retrying");
                tokio::time::sleep(Duration::from_millis(200)).await;
                continue;
            }
        };
        orders.clear();
        decode_into(&metrics, &last, &mut orders);
        // Whatever else is fetched already joins the batch; an error ends it (the next
        // `recv` reports it).
        while orders.len() < BATCH {
            match consumer.recv().now_or_never() {
                Some(Ok(m)) => {
                    decode_into(&metrics, &m, &mut orders);
                    last = m;
                }
                Some(Err(_)) | None => break,
            }
        }
        if !orders.is_empty() {
            persist_until_done(&stores, &metrics, &orders).await;
        }
        // Committing the batch's last message commits the batch (one partition).
        // Asynchronous: a synchronous commit blocks its thread for as long as Kafka is
        // away, which would stall this async runtime. A commit that never lands only
        // means a redelivery, which the persister absorbs.
        if let Err(e) = consumer.commit_message(&last, CommitMode::Async) {
            tracing::warn!(offset = last.offset(), error = %e, "offset commit not queued; the orders may be redelivered (harmless)");
        }
    }
}

/// Adds the message's order to `orders`. A message that can never be an order is skipped,
/// loudly: retrying it forever would stop the cell's orders behind it.
fn decode_into(metrics: &Metrics, msg: &BorrowedMessage<'_>, orders: &mut Vec<LoggedOrder>) {
    let offset = msg.offset();
    match msg.payload().map(serde_json::from_slice::<OrderEvent>) {
        Some(Ok(event)) => orders.push(LoggedOrder { event, offset }),
        other => {
            metrics.orders_poison.inc();
            tracing::error!(offset, problem = ?other.map(|r| r.err()), "skipping an undecodable message on the order topic");
        }
    }
}

/// An order as read from the log.
pub(crate) struct LoggedOrder {
    pub event: OrderEvent,
    pub offset: i64,
}

async fn persist_until_done(stores: &Stores, metrics: &Metrics, orders: &[LoggedOrder]) {
    let mut backoff = Duration::from_millis(100);
    // Said at the first failure and then once a minute: a fenced or failed-over cell's
    // persister may retry for as long as the failover lasts.
    let mut said: Option<std::time::Instant> = None;
    let mut retries = 0u64;
    loop {
        match persist_batch(stores, orders).await {
            Ok(outcomes) => {
                metrics.orders_persist_transactions.inc();
                for (order, outcome) in orders.iter().zip(outcomes) {
                    match outcome {
                        Persisted::New => {
                            metrics.orders_persisted.inc();
                        }
                        Persisted::Duplicate => {
                            metrics.orders_duplicates.inc();
                        }
                        Persisted::Voided => {
                            metrics.orders_void_skipped.inc();
                            tracing::warn!(order_id = %order.event.order_id, "a voided order was on the log after all; not persisted (its client was told it was refused)");
                        }
                    }
                }
                return;
            }
            Err(err) => {
                metrics.degraded("mysql");
                retries += 1;
                if said.is_none_or(|at| at.elapsed() >= Duration::from_secs(60)) {
                    said = Some(std::time::Instant::now());
                    tracing::warn!(first_order_id = %orders[0].event.order_id, orders = orders.len(), error = %err, retries, "orders not persisted yet; retrying (they stay in Kafka; said once a minute)");
                }
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(2));
            }
        }
    }
}

/// What persisting one order from the log did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Persisted {
    New,
    /// Redelivered: its row exists.
    Duplicate,
    /// Voided by the app (its delivery was in doubt and its client told "refused").
    Voided,
}

/// Writes one order unless it was voided (see `persist_batch`).
pub(crate) async fn persist(
    stores: &Stores,
    event: &OrderEvent,
    offset: i64,
) -> Result<Persisted, crate::error::AppError> {
    let order = [LoggedOrder {
        event: event.clone(),
        offset,
    }];
    let outcomes = persist_batch(stores, &order).await?;
    Ok(outcomes[0])
}

/// Writes the orders that were not voided and are not written yet, in one transaction, and
/// says what each was. The void check locks each order's key in `voided_orders` (`FOR
/// UPDATE`, a gap lock when absent), so a void racing with this write either lands first
/// (and the order is skipped) or waits until the order is written (and the app finds it
/// persisted); see `orders::void`. The existing rows are read with a lock as well, so the
/// outcome of each order is exact even when another writer (a replay) races.
pub(crate) async fn persist_batch(
    stores: &Stores,
    orders: &[LoggedOrder],
) -> Result<Vec<Persisted>, crate::error::AppError> {
    let mut c = stores.mysql_conn().await?;
    let write = async {
        let mut tx = c.start_transaction(Default::default()).await?;
        let mut outcomes = vec![Persisted::Duplicate; orders.len()];
        for (schema, members) in by_schema(orders) {
            let data = schema.map_or(stores.own.clone(), Dataset::new);
            let (table, voided_table) = (data.table("orders"), data.table("voided_orders"));
            let ids: Vec<&str> = members
                .iter()
                .map(|&i| orders[i].event.order_id.as_str())
                .collect();
            let in_list = sql::padded(ids.clone());
            let marks = sql::repeated("?", in_list.len());
            let voided: HashSet<String> = tx
                .exec(
                    format!(
                        "SELECT order_id FROM {voided_table} WHERE order_id IN ({marks}) FOR UPDATE"
                    ),
                    in_list.clone(),
                )
                .await?
                .into_iter()
                .collect();
            let written: HashSet<String> = tx
                .exec(
                    format!("SELECT order_id FROM {table} WHERE order_id IN ({marks}) FOR UPDATE"),
                    in_list,
                )
                .await?
                .into_iter()
                .collect();
            let decided = decide(&ids, &voided, &written);
            let mut rows = Vec::new();
            for (&i, outcome) in members.iter().zip(decided) {
                outcomes[i] = outcome;
                if outcome == Persisted::New {
                    let LoggedOrder { event: e, offset } = &orders[i];
                    rows.push([
                        mysql_async::Value::from(e.order_id.as_str()),
                        e.user_id.as_str().into(),
                        e.sku.as_str().into(),
                        e.qty.into(),
                        e.accepted_at_ms.into(),
                        (*offset).into(),
                    ]);
                }
            }
            if !rows.is_empty() {
                let rows = sql::padded(rows);
                let values = sql::repeated("(?, ?, ?, ?, ?, ?)", rows.len());
                // IGNORE: the locks above rule a duplicate out, except the padding's
                // copies of the last row, which it drops.
                tx.exec_drop(
                    format!("INSERT IGNORE INTO {table} (order_id, user_id, sku, qty, accepted_at_ms, kafka_offset) VALUES {values}"),
                    rows.concat(),
                )
                .await?;
            }
        }
        tx.commit().await?;
        Ok::<_, mysql_async::Error>(outcomes)
    };
    crate::stores::timed("mysql", stores.cfg.store_timeout * 2, write).await
}

/// The orders' indices grouped by the schema they belong in (`None`: the cell's own), in
/// the order each schema first appears.
fn by_schema(orders: &[LoggedOrder]) -> Vec<(Option<&str>, Vec<usize>)> {
    let mut groups: Vec<(Option<&str>, Vec<usize>)> = Vec::new();
    for (i, order) in orders.iter().enumerate() {
        let schema = order.event.schema.as_deref();
        match groups.iter_mut().find(|(s, _)| *s == schema) {
            Some((_, members)) => members.push(i),
            None => groups.push((schema, vec![i])),
        }
    }
    groups
}

/// What each order of a batch is, given the ids voided and the ids written already. An id
/// twice in one batch (a redelivery) is written once: its later copies are duplicates.
fn decide(ids: &[&str], voided: &HashSet<String>, written: &HashSet<String>) -> Vec<Persisted> {
    let mut seen = HashSet::new();
    ids.iter()
        .map(|&id| {
            if voided.contains(id) {
                Persisted::Voided
            } else if written.contains(id) || !seen.insert(id) {
                Persisted::Duplicate
            } else {
                Persisted::New
            }
        })
        .collect()
}

/// The order persister's position on the order topic (the `/status` contract's type).
pub use cellplane_cells::app_status::OrderBacklog as Lag;

/// Consumer lag on the order topic (blocking librdkafka calls: run off the async threads).
///
/// The high watermark is asked on the producer's connection: a broker answers a
/// connection's requests in order, and the consumer's connection is mostly parked in a
/// long-poll fetch, behind which the question would wait up to `fetch.wait.max.ms`.
pub async fn lag(stores: Arc<Stores>, consumer: Arc<StreamConsumer>) -> Result<Lag, KafkaError> {
    tokio::task::spawn_blocking(move || {
        let timeout = Duration::from_secs(2);
        let topic = stores.cfg.orders_topic.as_str();
        let (_, high) = stores
            .producer
            .client()
            .fetch_watermarks(topic, 0, timeout)?;
        let mut tpl = TopicPartitionList::new();
        tpl.add_partition(topic, 0);
        let committed = consumer.committed_offsets(tpl, timeout)?;
        let committed = match committed.find_partition(topic, 0).map(|p| p.offset()) {
            Some(Offset::Offset(o)) => o,
            _ => 0,
        };
        Ok(Lag {
            high,
            committed,
            lag: (high - committed).max(0),
        })
    })
    .await
    .map_err(|_| KafkaError::Canceled)?
}

#[cfg(test)]
mod tests {
    use super::*;

    fn order(id: &str, schema: Option<&str>) -> LoggedOrder {
        LoggedOrder {
            event: OrderEvent {
                order_id: id.into(),
                user_id: "u".into(),
                sku: "s".into(),
                qty: 1,
                accepted_at_ms: 0,
                schema: schema.map(Into::into),
            },
            offset: 0,
        }
    }

    fn set(ids: &[&str]) -> HashSet<String> {
        ids.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn a_voided_order_is_never_written_even_when_a_row_exists() {
        let ids = ["a", "b", "c", "d"];
        let decided = decide(&ids, &set(&["b", "d"]), &set(&["c", "d"]));
        use Persisted::*;
        assert_eq!(decided, [New, Voided, Duplicate, Voided]);
    }

    #[test]
    fn an_order_twice_in_one_batch_is_written_once() {
        use Persisted::*;
        let decided = decide(&["a", "b", "a", "a"], &set(&[]), &set(&[]));
        assert_eq!(decided, [New, New, Duplicate, Duplicate]);
        let decided = decide(&["a", "a"], &set(&["a"]), &set(&[]));
        assert_eq!(decided, [Voided, Voided]);
    }

    #[test]
    fn orders_are_grouped_by_schema_in_first_seen_order() {
        let orders = [
            order("1", Some("cell_b")),
            order("2", None),
            order("3", Some("cell_b")),
            order("4", None),
            order("5", Some("cell_c")),
        ];
        let groups = by_schema(&orders);
        assert_eq!(
            groups,
            vec![
                (Some("cell_b"), vec![0, 2]),
                (None, vec![1, 3]),
                (Some("cell_c"), vec![4]),
            ]
        );
    }
}
