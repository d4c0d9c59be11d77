//! The order persister: reads the cell's order queue and writes each order to MySQL once.
//!
//! At-least-once delivery (offsets are committed only after the row is written) plus an
//! idempotent write (`INSERT IGNORE` on the order id) gives exactly one row per order, also
//! when Kafka redelivers after a crash or a rebalance. While MySQL is down the consumer
//! waits and retries the same message: nothing is skipped, nothing is committed.

use crate::metrics::Metrics;
use crate::orders::OrderEvent;
use crate::stores::{kafka_config, Dataset, Stores};
use mysql_async::prelude::Queryable;
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::consumer::{CommitMode, Consumer, StreamConsumer};
use rdkafka::error::KafkaError;
use rdkafka::message::Message;
use rdkafka::producer::Producer;
use rdkafka::types::RDKafkaErrorCode;
use rdkafka::{Offset, TopicPartitionList};
use serde::Serialize;
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

/// Runs until the process ends.
pub async fn run(stores: Arc<Stores>, metrics: Arc<Metrics>, consumer: Arc<StreamConsumer>) {
    let mut backoff = Duration::from_millis(200);
    while let Err(e) = ensure_topic(&stores).await {
        tracing::warn!(error = %e, "order topic not ready; retrying");
        tokio::time::sleep(backoff).await;
        backoff = (backoff * 2).min(Duration::from_secs(5));
    }
    if let Err(e) = consumer.subscribe(&[&stores.cfg.orders_topic]) {
        tracing::error!(error = %e, "cannot subscribe to the order topic");
        return;
    }
    loop {
        let msg = match consumer.recv().await {
            Ok(m) => m,
            Err(e) => {
                tracing::debug!(error = %e, "order queue read failed; retrying");
                tokio::time::sleep(Duration::from_millis(200)).await;
                continue;
            }
        };
        let offset = msg.offset();
        match msg.payload().map(serde_json::from_slice::<OrderEvent>) {
            Some(Ok(event)) => persist_until_done(&stores, &metrics, &event, offset).await,
            // A message that can never be an order is skipped, loudly; retrying it forever
            // would stop the cell's orders behind it.
            other => {
                metrics.orders_poison.inc();
                tracing::error!(offset, problem = ?other.map(|r| r.err()), "skipping an undecodable message on the order topic");
            }
        }
        // Asynchronous: a synchronous commit blocks its thread for as long as Kafka is
        // away, which would stall this async runtime. A commit that never lands only
        // means a redelivery, which the persister absorbs.
        if let Err(e) = consumer.commit_message(&msg, CommitMode::Async) {
            tracing::warn!(offset, error = %e, "offset commit not queued; the order may be redelivered (harmless)");
        }
    }
}

async fn persist_until_done(stores: &Stores, metrics: &Metrics, e: &OrderEvent, offset: i64) {
    let mut backoff = Duration::from_millis(100);
    // Said at the first failure and then once a minute: a fenced or failed-over cell's
    // persister may retry for as long as the failover lasts.
    let mut said: Option<std::time::Instant> = None;
    let mut retries = 0u64;
    loop {
        match persist(stores, e, offset).await {
            Ok(Persisted::New) => {
                metrics.orders_persisted.inc();
                return;
            }
            Ok(Persisted::Duplicate) => {
                metrics.orders_duplicates.inc();
                return;
            }
            Ok(Persisted::Voided) => {
                metrics.orders_void_skipped.inc();
                tracing::warn!(order_id = %e.order_id, "a voided order was on the log after all; not persisted (its client was told it was refused)");
                return;
            }
            Err(err) => {
                metrics.degraded("mysql");
                retries += 1;
                if said.is_none_or(|at| at.elapsed() >= Duration::from_secs(60)) {
                    said = Some(std::time::Instant::now());
                    tracing::warn!(order_id = %e.order_id, error = %err, retries, "order not persisted yet; retrying (it stays in Kafka; said once a minute)");
                }
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(2));
            }
        }
    }
}

/// What persisting one order from the log did.
pub(crate) enum Persisted {
    New,
    /// Redelivered: its row exists.
    Duplicate,
    /// Voided by the app (its delivery was in doubt and its client told "refused").
    Voided,
}

/// Writes the order unless it was voided. The void check locks the order's key in
/// `voided_orders` (`FOR UPDATE`, a gap lock when absent), so a void racing with this
/// write either lands first (and the order is skipped) or waits until the order is written
/// (and the app finds it persisted); see `orders::void`.
pub(crate) async fn persist(
    stores: &Stores,
    e: &OrderEvent,
    offset: i64,
) -> Result<Persisted, crate::error::AppError> {
    let data = e.schema.as_deref().map_or(stores.own.clone(), Dataset::new);
    let (orders, voided) = (data.table("orders"), data.table("voided_orders"));
    let mut c = stores.mysql_conn().await?;
    let write = async {
        let mut tx = c.start_transaction(Default::default()).await?;
        let void: Option<String> = tx
            .exec_first(
                format!("SELECT order_id FROM {voided} WHERE order_id = ? FOR UPDATE"),
                (&e.order_id,),
            )
            .await?;
        if void.is_some() {
            tx.commit().await?;
            return Ok(Persisted::Voided);
        }
        let insert = format!(
            "INSERT IGNORE INTO {orders} (order_id, user_id, sku, qty, accepted_at_ms, kafka_offset) VALUES (?, ?, ?, ?, ?, ?)"
        );
        tx.exec_drop(
            insert.as_str(),
            (
                &e.order_id,
                &e.user_id,
                &e.sku,
                e.qty,
                e.accepted_at_ms,
                offset,
            ),
        )
        .await?;
        let new = tx.affected_rows() == 1;
        tx.commit().await?;
        Ok::<_, mysql_async::Error>(if new {
            Persisted::New
        } else {
            Persisted::Duplicate
        })
    };
    crate::stores::timed("mysql", stores.cfg.store_timeout * 2, write).await
}

#[derive(Debug, Serialize, Default)]
#[serde(rename_all = "camelCase")]
pub struct Lag {
    /// Next offset to be written (the partition's high watermark).
    pub high: i64,
    /// Next offset the persister will read (its committed offset).
    pub committed: i64,
    pub lag: i64,
}

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
