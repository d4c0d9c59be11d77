//! The cell's MySQL schema, created at start (idempotent).

use crate::error::AppResult;
use crate::stores::{timed, Stores};
use mysql_async::prelude::Queryable;

const STATEMENTS: &[&str] = &[
    "CREATE TABLE IF NOT EXISTS profiles (
        user_id VARCHAR(128) NOT NULL PRIMARY KEY,
        name VARCHAR(256) NOT NULL,
        email VARCHAR(256) NOT NULL,
        version BIGINT UNSIGNED NOT NULL,
        updated_at TIMESTAMP(3) NOT NULL DEFAULT CURRENT_TIMESTAMP(3) ON UPDATE CURRENT_TIMESTAMP(3),
        -- A landing warms the most recently updated profiles first.
        KEY by_updated (updated_at)
    ) ENGINE=InnoDB",
    // One row per order id, whatever Kafka redelivers: the primary key is the fence.
    "CREATE TABLE IF NOT EXISTS orders (
        order_id VARCHAR(64) NOT NULL PRIMARY KEY,
        user_id VARCHAR(128) NOT NULL,
        sku VARCHAR(64) NOT NULL,
        qty INT NOT NULL,
        accepted_at_ms BIGINT NOT NULL,
        kafka_offset BIGINT NOT NULL,
        persisted_at TIMESTAMP(3) NOT NULL DEFAULT CURRENT_TIMESTAMP(3),
        KEY by_user (user_id)
    ) ENGINE=InnoDB",
    // Orders whose delivery to Kafka was in doubt (it timed out, though the broker may have
    // stored it) and that the client was told were refused: the persister never writes
    // them. Voiding and persisting lock the same keys (`orders::void`, the persister).
    "CREATE TABLE IF NOT EXISTS voided_orders (
        order_id VARCHAR(64) NOT NULL PRIMARY KEY,
        voided_at TIMESTAMP(3) NOT NULL DEFAULT CURRENT_TIMESTAMP(3)
    ) ENGINE=InnoDB",
];

pub async fn ensure(stores: &Stores) -> AppResult<()> {
    let mut c = stores.mysql_conn().await?;
    for s in STATEMENTS {
        timed("mysql", stores.cfg.store_timeout * 4, c.query_drop(*s)).await?;
    }
    Ok(())
}
