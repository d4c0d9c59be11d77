//! The cell's MySQL schema, created at start and brought up to date (idempotent).
//!
//! User keys are stored as the bytes they are (`VARBINARY(256)`): the key contract
//! (`cellplane_cells::user_key`) allows up to 256 bytes and is case-sensitive, so `Alice`
//! and `alice` are two users; a case-insensitive `VARCHAR` would merge their rows.

use crate::error::AppResult;
use crate::stores::{timed, Stores};
use mysql_async::prelude::Queryable;

/// The tables, as created at start (also by tests that need the app's schema without it).
pub const STATEMENTS: &[&str] = &[
    "CREATE TABLE IF NOT EXISTS profiles (
        user_id VARBINARY(256) NOT NULL PRIMARY KEY,
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
        user_id VARBINARY(256) NOT NULL,
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

/// The tables that hold a user's rows, and the column with the user key: they move with
/// their users' slots (the platform's contract for an app's tables, docs/reference.md).
/// `voided_orders` is not one: it fences this cell's own Kafka log, which never moves.
pub const USER_TABLES: &[(&str, &str)] = &[("profiles", "user_id"), ("orders", "user_id")];

/// Columns that earlier versions created otherwise, and what they are now: tables made
/// before user keys were bytes (`VARCHAR(128)` in a case-insensitive collation) are
/// altered once.
const MIGRATIONS: &[(&str, &str, &str)] = &[
    ("profiles", "user_id", "VARBINARY(256) NOT NULL"),
    ("orders", "user_id", "VARBINARY(256) NOT NULL"),
];

pub async fn ensure(stores: &Stores) -> AppResult<()> {
    let mut c = stores.mysql_conn().await?;
    let deadline = stores.cfg.store_timeout * 4;
    for s in STATEMENTS {
        timed("mysql", deadline, c.query_drop(*s)).await?;
    }
    for (table, column, definition) in MIGRATIONS {
        let current: Option<String> = timed(
            "mysql",
            deadline,
            c.exec_first(
                "SELECT LOWER(COLUMN_TYPE) FROM information_schema.COLUMNS \
                 WHERE TABLE_SCHEMA = DATABASE() AND TABLE_NAME = ? AND COLUMN_NAME = ?",
                (table, column),
            ),
        )
        .await?;
        let wanted = definition
            .split(' ')
            .next()
            .unwrap_or_default()
            .to_lowercase();
        if current.is_some_and(|t| t != wanted) {
            tracing::warn!(%table, %column, to = %definition, "migrating the column (user keys are bytes)");
            let alter = format!("ALTER TABLE {table} MODIFY {column} {definition}");
            timed("mysql", deadline * 30, c.query_drop(alter)).await?;
        }
    }
    Ok(())
}
