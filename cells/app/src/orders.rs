//! Flash sale orders: the cell's stock allotment lives in Redis and is decremented
//! atomically (never below zero); an accepted order is on the cell's Kafka before the
//! client hears "accepted", and the consumer persists it to MySQL idempotently.
//!
//! Degradation: Redis down -> no orders (stock cannot be checked); Kafka down -> no new
//! orders (503) and the reserved stock is given back; MySQL down -> orders are still
//! accepted and wait in Kafka until the consumer can persist them.

use crate::error::{AppError, AppResult};
use crate::metrics::Metrics;
use crate::stores::{timed, Dataset, Stores};
use mysql_async::prelude::Queryable;
use rdkafka::producer::FutureRecord;
use redis::AsyncCommands;
use serde::{Deserialize, Serialize};
use std::sync::Arc;
use std::time::Duration;

/// KEYS: stock, order marker. ARGV: qty, marker ttl, user. Returns {code, left}: 1
/// reserved, 0 sold out, -2 no sale for this sku, -3 order id already taken. The marker
/// names the user, so a queued order's status is shown to its user only.
const RESERVE_SCRIPT: &str = r#"
if redis.call('EXISTS', KEYS[2]) == 1 then return {-3, 0} end
local s = redis.call('GET', KEYS[1])
if not s then return {-2, 0} end
s = tonumber(s)
local q = tonumber(ARGV[1])
if s < q then return {0, s} end
redis.call('DECRBY', KEYS[1], q)
redis.call('SET', KEYS[2], 'queued:' .. ARGV[3], 'EX', ARGV[2])
return {1, s - q}
"#;

/// KEYS: stock, order marker. ARGV: qty. Gives the stock back once per order.
const RELEASE_SCRIPT: &str = r#"
if redis.call('DEL', KEYS[2]) == 1 then redis.call('INCRBY', KEYS[1], ARGV[1]) end
return 1
"#;

/// KEYS: stock, order marker. ARGV: qty. A voided order: its stock back once, and its
/// marker kept as `void:<user>` so a retry with the same id is told, not taken again.
const VOID_SCRIPT: &str = r#"
local m = redis.call('GET', KEYS[2])
if m and string.sub(m, 1, 7) == 'queued:' then
  redis.call('SET', KEYS[2], 'void:' .. string.sub(m, 8), 'KEEPTTL')
  redis.call('INCRBY', KEYS[1], ARGV[1])
end
return 1
"#;

/// What voiding an order in doubt found.
enum Doubt {
    /// Voided: the persister will never write it.
    Voided,
    /// It was persisted already (the broker had stored it and the persister was quicker):
    /// the order stands.
    Persisted,
}

const MARKER_TTL_SECS: u64 = 24 * 3600;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct OrderRequest {
    pub sku: String,
    #[serde(default = "one")]
    pub qty: i64,
    /// Client-chosen id makes retries safe: the same id is never sold twice.
    pub order_id: Option<String>,
}

fn one() -> i64 {
    1
}

/// What goes on Kafka (key: the user, so one user's orders stay in order).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct OrderEvent {
    pub order_id: String,
    pub user_id: String,
    pub sku: String,
    pub qty: i64,
    pub accepted_at_ms: i64,
    /// The schema the order belongs in when it is not the cell's own (the cell serves a
    /// failed-over cell's users from that cell's replicated schema).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub schema: Option<String>,
}

#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct OrderStatus {
    pub order_id: String,
    /// `queued` (accepted, on Kafka) or `persisted` (in MySQL).
    pub status: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub stock_left: Option<i64>,
}

fn is_id(s: &str, max: usize) -> bool {
    !s.is_empty()
        && s.len() <= max
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
}

impl OrderRequest {
    pub fn validate(&self) -> AppResult<()> {
        if !is_id(&self.sku, 64) {
            return Err(AppError::BadRequest(
                "sku: 1 to 64 letters, digits, '-' or '_'".into(),
            ));
        }
        if !(1..=10).contains(&self.qty) {
            return Err(AppError::BadRequest("qty: must be 1 to 10".into()));
        }
        if let Some(id) = &self.order_id {
            if !is_id(id, 64) {
                return Err(AppError::BadRequest(
                    "orderId: 1 to 64 letters, digits, '-' or '_'".into(),
                ));
            }
        }
        Ok(())
    }
}

pub struct Orders {
    stores: Arc<Stores>,
    metrics: Arc<Metrics>,
    reserve: redis::Script,
    release: redis::Script,
    void: redis::Script,
}

fn stock_key(sku: &str) -> String {
    format!("stock:{sku}")
}
pub(crate) fn marker_key(order_id: &str) -> String {
    format!("order:{order_id}")
}

impl Orders {
    pub fn new(stores: Arc<Stores>, metrics: Arc<Metrics>) -> Self {
        Self {
            stores,
            metrics,
            reserve: redis::Script::new(RESERVE_SCRIPT),
            release: redis::Script::new(RELEASE_SCRIPT),
            void: redis::Script::new(VOID_SCRIPT),
        }
    }

    pub async fn place(
        &self,
        user: &str,
        req: OrderRequest,
        data: &Dataset,
    ) -> AppResult<OrderStatus> {
        req.validate()?;
        let order_id = req
            .order_id
            .clone()
            .unwrap_or_else(|| uuid::Uuid::new_v4().to_string());
        let cfg = &self.stores.cfg;
        let (stock, marker) = (stock_key(&req.sku), marker_key(&order_id));
        let mut reserve = self.reserve.key(&stock);
        reserve
            .key(&marker)
            .arg(req.qty)
            .arg(MARKER_TTL_SECS)
            .arg(user);
        let (code, left): (i64, i64) = self
            .stores
            .redis
            .run(|mut c| async move { reserve.invoke_async(&mut c).await })
            .await
            .inspect_err(|_| self.metrics.order_rejected("redis"))?;
        match code {
            1 => {}
            0 => {
                self.metrics.order_rejected("sold_out");
                return Err(AppError::SoldOut {
                    sku: req.sku,
                    left,
                    wanted: req.qty,
                });
            }
            -2 => return Err(AppError::NoSale(req.sku)),
            -3 => return self.status(user, &order_id, data).await,
            other => {
                return Err(AppError::unavailable(
                    "redis",
                    format!("reserve script returned {other}"),
                ))
            }
        }
        let event = OrderEvent {
            order_id: order_id.clone(),
            user_id: user.into(),
            sku: req.sku.clone(),
            qty: req.qty,
            accepted_at_ms: now_ms(),
            schema: (*data != self.stores.own).then(|| data.schema().to_string()),
        };
        let payload = serde_json::to_vec(&event).expect("event serializes");
        let record = FutureRecord::to(&cfg.orders_topic)
            .key(user)
            .payload(&payload);
        // The order goes on the log only while the cell holds its ownership lease. The
        // delivery future ends by itself within message.timeout.ms.
        let delivered = match self.stores.may_write() {
            Ok(()) => self
                .stores
                .producer
                .send(record, Duration::from_millis(0))
                .await
                .map_err(|(e, _)| AppError::unavailable(
                    "orders",
                    format!("the order queue (Kafka) did not take the order: {e}; new orders are refused until it is back, nothing was charged"),
                )),
            Err(fenced) => Err(fenced),
        };
        match delivered {
            Ok(_) => {
                self.metrics.orders_accepted.inc();
                Ok(OrderStatus {
                    order_id,
                    status: "queued",
                    stock_left: Some(left),
                })
            }
            // Never sent (the cell is fenced): nothing is in doubt.
            Err(
                refusal @ AppError::Unavailable {
                    what: "ownership", ..
                },
            ) => {
                self.metrics.order_rejected("fenced");
                self.give_back(&self.release, &stock, &marker, req.qty, &order_id)
                    .await;
                Err(refusal)
            }
            // The delivery timed out or failed: the broker may still have stored it. Void
            // it before telling the client "refused", or find it persisted and say so.
            Err(refusal) => match self.void(&order_id, user, &req, data).await {
                Ok(Doubt::Voided) => {
                    self.metrics.order_rejected("kafka");
                    self.metrics.orders_voided.inc();
                    self.give_back(&self.void, &stock, &marker, req.qty, &order_id)
                        .await;
                    Err(refusal)
                }
                Ok(Doubt::Persisted) => {
                    self.metrics.orders_accepted.inc();
                    Ok(OrderStatus {
                        order_id,
                        status: "persisted",
                        stock_left: Some(left),
                    })
                }
                // Neither voided nor known persisted: keep the unit reserved (no oversell)
                // and let the client ask again with the same id.
                Err(e) => {
                    self.metrics.order_rejected("in_doubt");
                    tracing::error!(%order_id, error = %e, "order in doubt: delivery failed and it could not be voided; its stock stays reserved");
                    Err(AppError::unavailable(
                        "orders",
                        format!("order {order_id} is in doubt (the order queue did not confirm it and it could not be voided); ask for it again with the same orderId"),
                    ))
                }
            },
        }
    }

    /// Gives an order's stock back through `script` (release or void), once.
    async fn give_back(
        &self,
        script: &redis::Script,
        stock: &str,
        marker: &str,
        qty: i64,
        order_id: &str,
    ) {
        let mut call = script.key(stock);
        call.key(marker).arg(qty);
        let done = self
            .stores
            .redis
            .run(|mut c| async move { call.invoke_async::<i64>(&mut c).await })
            .await;
        if let Err(e) = done {
            tracing::error!(%order_id, error = %e, "stock of a refused order could not be given back");
        }
    }

    /// Voids an order whose delivery is in doubt, unless the persister wrote it already.
    /// Both sides lock the order's keys (`FOR UPDATE` on the other table), so one of them
    /// wins; a deadlock between them is retried.
    async fn void(
        &self,
        order_id: &str,
        user: &str,
        req: &OrderRequest,
        data: &Dataset,
    ) -> AppResult<Doubt> {
        let (orders, voided) = (data.table("orders"), data.table("voided_orders"));
        let mut last = None;
        for _ in 0..3 {
            let mut c = match self.stores.mysql_conn().await {
                Ok(c) => c,
                Err(e) => {
                    last = Some(e);
                    continue;
                }
            };
            let attempt = async {
                let mut tx = c.start_transaction(Default::default()).await?;
                let found: Option<String> = tx
                    .exec_first(
                        format!("SELECT user_id FROM {orders} WHERE order_id = ? FOR UPDATE"),
                        (order_id,),
                    )
                    .await?;
                if found.is_some() {
                    tx.commit().await?;
                    return Ok(Doubt::Persisted);
                }
                tx.exec_drop(
                    format!("INSERT IGNORE INTO {voided} (order_id) VALUES (?)"),
                    (order_id,),
                )
                .await?;
                tx.commit().await?;
                Ok::<_, mysql_async::Error>(Doubt::Voided)
            };
            match timed("mysql", self.stores.cfg.store_timeout * 2, attempt).await {
                Ok(d) => {
                    tracing::warn!(%order_id, %user, sku = %req.sku, voided = matches!(d, Doubt::Voided), "order delivery in doubt settled");
                    return Ok(d);
                }
                Err(e) => last = Some(e),
            }
        }
        Err(last.expect("three attempts"))
    }

    /// Persisted (MySQL) or queued (marker in Redis); 404 otherwise or for another user.
    pub async fn status(
        &self,
        user: &str,
        order_id: &str,
        data: &Dataset,
    ) -> AppResult<OrderStatus> {
        if !is_id(order_id, 64) {
            return Err(AppError::BadRequest(
                "orderId: 1 to 64 letters, digits, '-' or '_'".into(),
            ));
        }
        let cfg = &self.stores.cfg;
        let not_found = || AppError::NotFound(format!("order {order_id}"));
        let query = format!(
            "SELECT user_id FROM {} WHERE order_id = ?",
            data.table("orders")
        );
        let persisted = async {
            let mut c = self.stores.mysql_conn().await?;
            timed(
                "mysql",
                cfg.store_timeout,
                c.exec_first::<String, _, _>(query.as_str(), (order_id,)),
            )
            .await
        }
        .await;
        match persisted {
            Ok(Some(owner)) if owner == user => {
                return Ok(OrderStatus {
                    order_id: order_id.into(),
                    status: "persisted",
                    stock_left: None,
                })
            }
            Ok(Some(_)) => return Err(not_found()),
            Ok(None) | Err(_) => {}
        }
        let key = marker_key(order_id);
        let marker: Option<String> = self
            .stores
            .redis
            .run(|mut c| async move { c.get(&key).await })
            .await?;
        // Another user's queued order is as unknown as a missing one.
        match marker.as_deref() {
            Some(m) if m.strip_prefix("queued:") == Some(user) => Ok(OrderStatus {
                order_id: order_id.into(),
                status: "queued",
                stock_left: None,
            }),
            Some(m) if m.strip_prefix("void:") == Some(user) => {
                Err(AppError::Voided(order_id.into()))
            }
            _ => Err(not_found()),
        }
    }

    /// Opens (or resets) the sale of `sku` in this cell with `stock` units.
    pub async fn set_stock(&self, sku: &str, stock: i64) -> AppResult<()> {
        if !is_id(sku, 64) {
            return Err(AppError::BadRequest(
                "sku: 1 to 64 letters, digits, '-' or '_'".into(),
            ));
        }
        if !(0..=1_000_000_000).contains(&stock) {
            return Err(AppError::BadRequest(
                "stock: must be 0 to 1000000000".into(),
            ));
        }
        let key = stock_key(sku);
        self.stores
            .redis
            .run(|mut c| async move { c.set::<_, _, ()>(&key, stock).await })
            .await
    }

    pub async fn stock(&self, sku: &str) -> AppResult<Option<i64>> {
        let key = stock_key(sku);
        self.stores
            .redis
            .run(|mut c| async move { c.get(&key).await })
            .await
    }
}

pub fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn order_requests_are_validated_by_field() {
        let ok = OrderRequest {
            sku: "phone-1".into(),
            qty: 1,
            order_id: None,
        };
        assert!(ok.validate().is_ok());
        let cases = [
            (
                OrderRequest {
                    sku: "".into(),
                    ..ok_clone(&ok)
                },
                "sku",
            ),
            (
                OrderRequest {
                    sku: "a b".into(),
                    ..ok_clone(&ok)
                },
                "sku",
            ),
            (
                OrderRequest {
                    qty: 0,
                    ..ok_clone(&ok)
                },
                "qty",
            ),
            (
                OrderRequest {
                    qty: 11,
                    ..ok_clone(&ok)
                },
                "qty",
            ),
            (
                OrderRequest {
                    order_id: Some("x'y".into()),
                    ..ok_clone(&ok)
                },
                "orderId",
            ),
        ];
        for (req, field) in cases {
            let err = req.validate().unwrap_err().to_string();
            assert!(err.starts_with(field), "{err}");
        }
    }

    fn ok_clone(r: &OrderRequest) -> OrderRequest {
        OrderRequest {
            sku: r.sku.clone(),
            qty: r.qty,
            order_id: r.order_id.clone(),
        }
    }
}
