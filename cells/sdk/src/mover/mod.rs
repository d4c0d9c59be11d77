//! The data half of a slot move: the rows of some slots go from one cell's MySQL schema
//! (the source) to another's (the target), while the source keeps serving them.
//!
//! 1. [`SlotMover::start_position`]: the source's GTID position before anything is read.
//! 2. [`SlotMover::clear_target`] then [`SlotMover::copy`]: the target's rows of those slots
//!    (left over from an earlier move) are deleted, then the source's are copied in
//!    primary-key batches, throttled.
//! 3. [`SlotMover::catch_up`]: the source's binary log from that position, its row changes
//!    of those slots applied to the target in their order, one target transaction per source
//!    transaction. Copy first, then replay from a position taken before the copy: every row
//!    ends as its last change left it, and a row nothing changed keeps its copied value.
//! 4. [`SlotMover::verify`]: the source's rows in a consistent snapshot against the
//!    target's, caught up to exactly that snapshot's binary-log position: per table and
//!    slot, row counts and checksums (as Vitess' VDiff).
//!
//! The contract for an app's tables (docs/reference.md, "Tables that move"): every table
//! that holds a user's data names the column with the user key (the router's key, as its
//! UTF-8 bytes, or a number as its decimal text), has a primary key, and has the same
//! columns on every cell. Both MySQL servers log rows in full (`binlog_format=ROW`,
//! `binlog_row_image=FULL`, the rendered defaults).

mod binlog;
pub mod rows;

pub use binlog::{CatchUp, Until};
pub use rows::{Digest, Digests, Mismatch, TableShape};

use crate::{Error, Result};
use cellplane_cells::slot_set::SlotSet;
use mysql_async::prelude::Queryable;
use mysql_async::{Conn, Opts, OptsBuilder, Pool, Row, Value};
use rows::Column;
use std::time::{Duration, Instant};

fn mysql(what: impl Into<String>) -> impl FnOnce(mysql_async::Error) -> Error {
    let what = what.into();
    move |source| Error::Mysql { what, source }
}

/// A table the app declares as holding users' data: it moves with its users' slots.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct UserTable {
    pub name: String,
    /// The column holding the user key.
    pub key_column: String,
}

impl UserTable {
    pub fn new(name: &str, key_column: &str) -> Self {
        Self {
            name: name.into(),
            key_column: key_column.into(),
        }
    }
}

/// One side of a move: a MySQL server and the schema holding the cell's rows.
#[derive(Clone, Debug)]
pub struct Side {
    pub opts: Opts,
    pub schema: String,
}

/// Sessions read and write `TIMESTAMP`s in UTC: the binary log carries them as epoch
/// seconds, and both sides must agree on what a row holds.
fn utc(opts: &Opts) -> Opts {
    OptsBuilder::from_opts(opts.clone())
        .init(vec!["SET time_zone = '+00:00'"])
        .into()
}

/// How fast a copy may go: rows per statement and rows per second (so that the source's
/// own users keep their latency).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Throttle {
    pub batch: usize,
    pub rows_per_sec: Option<u32>,
}

impl Default for Throttle {
    fn default() -> Self {
        Self {
            batch: 500,
            rows_per_sec: None,
        }
    }
}

/// Where a copy is: rows read from the source, rows of the moving slots written.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct CopyProgress {
    pub table: String,
    pub scanned: u64,
    pub copied: u64,
    pub elapsed: Duration,
}

/// The outcome of [`SlotMover::verify`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Verification {
    /// The source position both sides were compared at; the next catch-up starts here.
    pub position: String,
    /// Rows of the moving slots on the source at that position.
    pub rows: u64,
    pub mismatches: Vec<Mismatch>,
}

pub struct SlotMover {
    source: Side,
    target: Side,
    source_pool: Pool,
    target_pool: Pool,
    tables: Vec<TableShape>,
    slots: SlotSet,
}

impl SlotMover {
    /// Checks both sides' tables (each declared table exists with a primary key and the key
    /// column, and has the same columns on the target) and prepares the connections.
    pub async fn new(
        source: Side,
        target: Side,
        tables: &[UserTable],
        slots: SlotSet,
    ) -> Result<Self> {
        let source_pool = Pool::new(utc(&source.opts));
        let target_pool = Pool::new(utc(&target.opts));
        let mut shapes = Vec::new();
        {
            let mut s = source_pool.get_conn().await.map_err(mysql("source"))?;
            let mut t = target_pool.get_conn().await.map_err(mysql("target"))?;
            for table in tables {
                let shape = shape_of(&mut s, &source.schema, table, "source").await?;
                let theirs = shape_of(&mut t, &target.schema, table, "target").await?;
                if theirs.columns != shape.columns || theirs.primary != shape.primary {
                    return Err(Error::Move(format!(
                        "table {}: the target's columns ({}) differ from the source's ({}); \
                         run the same app version (and schema) in both cells before moving",
                        table.name,
                        column_names(&theirs),
                        column_names(&shape)
                    )));
                }
                shapes.push(shape);
            }
        }
        Ok(Self {
            source,
            target,
            source_pool,
            target_pool,
            tables: shapes,
            slots,
        })
    }

    pub fn slots(&self) -> &SlotSet {
        &self.slots
    }

    pub fn tables(&self) -> &[TableShape] {
        &self.tables
    }

    /// The source's GTID position now (`@@gtid_binlog_pos`): take it before the copy.
    pub async fn start_position(&self) -> Result<String> {
        let mut c = self.source_pool.get_conn().await.map_err(mysql("source"))?;
        let pos: Option<String> = c
            .query_first("SELECT @@gtid_binlog_pos")
            .await
            .map_err(mysql("source gtid_binlog_pos"))?;
        Ok(pos.unwrap_or_default())
    }

    /// Deletes the target's rows of the moving slots (what an earlier move left there).
    pub async fn clear_target(&self, throttle: Throttle) -> Result<u64> {
        delete_slots(
            &self.target_pool,
            &self.target.schema,
            &self.tables,
            &self.slots,
            throttle,
        )
        .await
    }

    /// Deletes the source's rows of the moved slots: the end of a move, once its retention
    /// window passed.
    pub async fn delete_from_source(&self, throttle: Throttle) -> Result<u64> {
        delete_slots(
            &self.source_pool,
            &self.source.schema,
            &self.tables,
            &self.slots,
            throttle,
        )
        .await
    }

    /// Copies the source's rows of the moving slots into the target, table by table in
    /// primary-key batches; `progress` hears after every batch.
    pub async fn copy(
        &self,
        throttle: Throttle,
        mut progress: impl FnMut(&CopyProgress),
    ) -> Result<CopyProgress> {
        let started = Instant::now();
        let mut total = CopyProgress::default();
        let mut src = self.source_pool.get_conn().await.map_err(mysql("source"))?;
        let mut dst = self.target_pool.get_conn().await.map_err(mysql("target"))?;
        for table in &self.tables {
            total.table = table.name.clone();
            let mut pages = Pages::new(table, &self.source.schema, throttle.batch);
            while let Some(rows) = pages.next(&mut src).await? {
                total.scanned += rows.len() as u64;
                let moving: Vec<Vec<Value>> = rows
                    .into_iter()
                    .filter(|r| table.in_slots(r, &self.slots))
                    .collect();
                if !moving.is_empty() {
                    let params: Vec<Value> = moving.iter().flatten().cloned().collect();
                    dst.exec_drop(table.upsert(&self.target.schema, moving.len()), params)
                        .await
                        .map_err(mysql(format!("writing {}", table.name)))?;
                    total.copied += moving.len() as u64;
                }
                total.elapsed = started.elapsed();
                progress(&total);
                pace(throttle, total.copied, started).await;
            }
        }
        total.elapsed = started.elapsed();
        Ok(total)
    }

    /// Per table and slot, the source's rows in a consistent snapshot against the target's
    /// caught up (from `from`) to exactly that snapshot.
    pub async fn verify(&self, from: &str) -> Result<Verification> {
        let mut snap = self.source_pool.get_conn().await.map_err(mysql("source"))?;
        snap.query_drop("START TRANSACTION WITH CONSISTENT SNAPSHOT")
            .await
            .map_err(mysql("source snapshot"))?;
        let status: Vec<(String, String)> = snap
            .query("SHOW STATUS LIKE 'binlog_snapshot_%'")
            .await
            .map_err(mysql("source snapshot position"))?;
        let field = |name: &str| {
            status
                .iter()
                .find(|(k, _)| k.eq_ignore_ascii_case(name))
                .map(|(_, v)| v.clone())
                .ok_or_else(|| {
                    Error::Move(format!(
                        "the source reports no {name}; its binary log must be on (log_bin)"
                    ))
                })
        };
        let file = field("Binlog_snapshot_file")?;
        let pos = field("Binlog_snapshot_position")?
            .parse::<u64>()
            .map_err(|e| Error::Move(format!("Binlog_snapshot_position: {e}")))?;
        let source = self.digest(&mut snap, &self.source.schema).await?;
        snap.query_drop("COMMIT")
            .await
            .map_err(mysql("source snapshot"))?;
        drop(snap);
        let caught = self.catch_up(from, Until::Position { file, pos }).await?;
        let mut dst = self.target_pool.get_conn().await.map_err(mysql("target"))?;
        let target = self.digest(&mut dst, &self.target.schema).await?;
        Ok(Verification {
            position: caught.position,
            rows: source.values().map(|d| d.rows).sum(),
            mismatches: rows::compare(&source, &target),
        })
    }

    /// Digests of the moving slots' rows in `schema`, read on `conn`.
    async fn digest(&self, conn: &mut Conn, schema: &str) -> Result<Digests> {
        let mut digests = Digests::new();
        let slot_count = self.slots.slot_count();
        for table in &self.tables {
            let mut result = conn
                .exec_iter(table.select_all(schema), ())
                .await
                .map_err(mysql(format!("reading {}", table.name)))?;
            result
                .for_each(|row: Row| {
                    let values = row.unwrap();
                    if let Some(slot) = table
                        .slot_of(&values, slot_count)
                        .filter(|s| self.slots.contains(*s))
                    {
                        digests
                            .entry((table.name.clone(), slot))
                            .or_default()
                            .add(&values);
                    }
                })
                .await
                .map_err(mysql(format!("reading {}", table.name)))?;
        }
        Ok(digests)
    }

    /// Closes the connections.
    pub async fn close(self) -> Result<()> {
        self.source_pool
            .disconnect()
            .await
            .map_err(mysql("source"))?;
        self.target_pool.disconnect().await.map_err(mysql("target"))
    }
}

/// Deletes one cell's copies of moved slots (a move's end, once its retention window
/// passed: run by the cell's own region with its admin account); returns the rows deleted.
pub async fn retire_slots(
    side: &Side,
    tables: &[UserTable],
    slots: &SlotSet,
    throttle: Throttle,
) -> Result<u64> {
    let pool = Pool::new(utc(&side.opts));
    let deleted = async {
        let mut shapes = Vec::new();
        {
            let mut c = pool.get_conn().await.map_err(mysql("connecting"))?;
            for table in tables {
                shapes.push(shape_of(&mut c, &side.schema, table, "source").await?);
            }
        }
        delete_slots(&pool, &side.schema, &shapes, slots, throttle).await
    }
    .await;
    let _ = pool.disconnect().await;
    deleted
}

/// A table read in primary-key order, a batch at a time (keyset paging: each batch starts
/// after the last key of the one before, so rows written meanwhile never shift it).
struct Pages<'a> {
    table: &'a TableShape,
    schema: &'a str,
    batch: usize,
    after: Option<Vec<Value>>,
}

impl<'a> Pages<'a> {
    fn new(table: &'a TableShape, schema: &'a str, batch: usize) -> Self {
        Self {
            table,
            schema,
            batch,
            after: None,
        }
    }

    /// The next batch, or None at the end.
    async fn next(&mut self, conn: &mut Conn) -> Result<Option<Vec<Vec<Value>>>> {
        let sql = self
            .table
            .select_batch(self.schema, self.batch, self.after.is_some());
        let rows: Vec<Row> = conn
            .exec(sql, self.after.clone().unwrap_or_default())
            .await
            .map_err(mysql(format!("reading {}", self.table.name)))?;
        if rows.is_empty() {
            return Ok(None);
        }
        let rows: Vec<Vec<Value>> = rows.into_iter().map(Row::unwrap).collect();
        self.after = rows.last().map(|r| self.table.primary_of(r));
        Ok(Some(rows))
    }
}

/// Sleeps as long as the copy is ahead of `rows_per_sec`.
async fn pace(throttle: Throttle, copied: u64, started: Instant) {
    if let Some(rate) = throttle.rows_per_sec.filter(|r| *r > 0) {
        let due = Duration::from_secs_f64(copied as f64 / f64::from(rate));
        if let Some(ahead) = due.checked_sub(started.elapsed()) {
            tokio::time::sleep(ahead).await;
        }
    }
}

/// Deletes the rows of `slots` from `schema`, a batch of keys per transaction.
async fn delete_slots(
    pool: &Pool,
    schema: &str,
    tables: &[TableShape],
    slots: &SlotSet,
    throttle: Throttle,
) -> Result<u64> {
    let started = Instant::now();
    let mut c = pool.get_conn().await.map_err(mysql("connecting"))?;
    let mut deleted = 0u64;
    for table in tables {
        let mut pages = Pages::new(table, schema, throttle.batch);
        while let Some(rows) = pages.next(&mut c).await? {
            let keys: Vec<Vec<Value>> = rows
                .iter()
                .filter(|r| table.in_slots(r, slots))
                .map(|r| table.primary_of(r))
                .collect();
            if keys.is_empty() {
                continue;
            }
            let mut tx = c
                .start_transaction(Default::default())
                .await
                .map_err(mysql("begin"))?;
            tx.exec_batch(table.delete_by_primary(schema), keys.iter().cloned())
                .await
                .map_err(mysql(format!("deleting from {}", table.name)))?;
            tx.commit().await.map_err(mysql("commit"))?;
            deleted += keys.len() as u64;
            pace(throttle, deleted, started).await;
        }
    }
    Ok(deleted)
}

fn column_names(shape: &TableShape) -> String {
    shape
        .columns
        .iter()
        .map(|c| c.name.as_str())
        .collect::<Vec<_>>()
        .join(", ")
}

/// A declared table's columns, primary key and key column, from `information_schema`.
async fn shape_of(c: &mut Conn, schema: &str, table: &UserTable, side: &str) -> Result<TableShape> {
    let columns: Vec<(String, String)> = c
        .exec(
            "SELECT COLUMN_NAME, LOWER(DATA_TYPE) FROM information_schema.COLUMNS \
             WHERE TABLE_SCHEMA = ? AND TABLE_NAME = ? ORDER BY ORDINAL_POSITION",
            (schema, &table.name),
        )
        .await
        .map_err(mysql(format!("{side} columns of {}", table.name)))?;
    if columns.is_empty() {
        return Err(Error::Move(format!(
            "table {schema}.{} does not exist on the {side}; the app declares it as holding \
             users' data: start the app in that cell (it creates its tables) or fix the declared name",
            table.name
        )));
    }
    let primary_names: Vec<String> = c
        .exec(
            "SELECT COLUMN_NAME FROM information_schema.KEY_COLUMN_USAGE \
             WHERE TABLE_SCHEMA = ? AND TABLE_NAME = ? AND CONSTRAINT_NAME = 'PRIMARY' \
             ORDER BY ORDINAL_POSITION",
            (schema, &table.name),
        )
        .await
        .map_err(mysql(format!("{side} primary key of {}", table.name)))?;
    let index = |name: &str| columns.iter().position(|(n, _)| n == name);
    let primary: Vec<usize> = primary_names.iter().filter_map(|n| index(n)).collect();
    if primary.is_empty() {
        return Err(Error::Move(format!(
            "table {schema}.{} has no primary key; a moved table needs one (rows are copied and \
             replayed by it)",
            table.name
        )));
    }
    let key = index(&table.key_column).ok_or_else(|| {
        Error::Move(format!(
            "table {schema}.{} has no column {:?}, declared as its user key; name the column \
             that holds the user key",
            table.name, table.key_column
        ))
    })?;
    Ok(TableShape {
        name: table.name.clone(),
        columns: columns
            .into_iter()
            .map(|(name, data_type)| Column {
                timestamp: data_type == "timestamp",
                name,
            })
            .collect(),
        primary,
        key,
    })
}
