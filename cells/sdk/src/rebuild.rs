//! Rebuilding an old home's MariaDB after an emergency failover, when it returned with
//! errant transactions (ones the new home never received, so GTID replication from the
//! new home would silently diverge):
//!
//! 1. [`errant_transactions`]: read them from the old home's binary log (`SHOW BINLOG
//!    EVENTS`, the statement of each row event included) so they can be exported before
//!    anything is dropped;
//! 2. [`clone_schemas`]: copy every cell schema from a consistent snapshot of the new
//!    home (a logical copy through the replication account, which may read the cell
//!    schemas), without writing the old home's binary log;
//! 3. [`take_position`]: drop the old binary log (exported above) and take the snapshot's
//!    position, so replication from the new home starts exactly after the snapshot and
//!    the server's next own transactions follow the new home's history.
//!
//! A logical copy suits the small schemas of a cell; a very large one would rather be
//! restored from a physical backup (`mariadb-backup`), which this does not do.

use crate::{Error, Result};
use cellplane_cells::gtid::{self, Gtid};
use mysql_async::prelude::Queryable;
use mysql_async::{Conn, Pool, Row, Value};
use serde::Serialize;

fn mysql(what: &'static str) -> impl FnOnce(mysql_async::Error) -> Error {
    move |source| Error::Mysql {
        what: what.into(),
        source,
    }
}

/// One event of a transaction as `SHOW BINLOG EVENTS` prints it.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct BinlogEvent {
    pub pos: u64,
    #[serde(rename = "type")]
    pub event_type: String,
    pub info: String,
}

/// A transaction of the old home's binary log that the new home lacks.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct ErrantTransaction {
    pub gtid: String,
    pub file: String,
    /// The statements that made its row events (`Annotate_rows`), in order.
    pub statements: Vec<String>,
    pub events: Vec<BinlogEvent>,
}

/// How many events one `SHOW BINLOG EVENTS` page reads.
const PAGE: u64 = 1000;

/// `` `name` `` with backticks doubled.
fn ident(name: &str) -> String {
    format!("`{}`", name.replace('`', "``"))
}

/// The transactions of `server`'s binary log beyond `known` (the new home's
/// `gtid_binlog_pos`), oldest first. Reads from the newest binary log file back to the
/// first whose starting position (`Gtid_list`) the new home already has.
pub async fn errant_transactions(server: &Pool, known: &str) -> Result<Vec<ErrantTransaction>> {
    let mut c = server.get_conn().await.map_err(mysql("connect"))?;
    let files: Vec<(String, u64)> = c
        .query("SHOW BINARY LOGS")
        .await
        .map_err(mysql("SHOW BINARY LOGS"))?;
    let names: Vec<String> = files.into_iter().map(|(n, _)| n).collect();
    let mut first = 0;
    for (i, name) in names.iter().enumerate().rev() {
        let head = events(&mut c, name, 4, 4).await?;
        let start = head
            .iter()
            .find(|e| e.event.event_type == "Gtid_list")
            .map(|e| {
                e.event
                    .info
                    .trim_matches(|ch| ch == '[' || ch == ']')
                    .to_string()
            });
        if start.is_some_and(|s| gtid::lag(&s, known) == 0) {
            first = i;
            break;
        }
    }
    let mut out = Vec::new();
    for name in &names[first..] {
        let mut pos = 4;
        let mut current: Option<ErrantTransaction> = None;
        loop {
            let page = events(&mut c, name, pos, PAGE).await?;
            let Some(last) = page.last() else { break };
            let next = last.next_pos;
            let full = page.len() as u64 == PAGE;
            for e in page {
                if e.event.event_type == "Gtid" {
                    out.extend(current.take());
                    current = gtid::of_gtid_event(&e.event.info)
                        .filter(|g: &Gtid| g.beyond(known))
                        .map(|g| ErrantTransaction {
                            gtid: g.to_string(),
                            file: name.clone(),
                            statements: Vec::new(),
                            events: Vec::new(),
                        });
                }
                if let Some(t) = current.as_mut() {
                    if e.event.event_type == "Annotate_rows" {
                        t.statements.push(e.event.info.clone());
                    }
                    t.events.push(e.event);
                }
            }
            if !full || next <= pos {
                break;
            }
            pos = next;
        }
        out.extend(current.take());
    }
    Ok(out)
}

struct PagedEvent {
    event: BinlogEvent,
    /// Where the next event starts.
    next_pos: u64,
}

async fn events(c: &mut Conn, file: &str, from: u64, limit: u64) -> Result<Vec<PagedEvent>> {
    let rows: Vec<Row> = c
        .query(format!(
            "SHOW BINLOG EVENTS IN '{}' FROM {from} LIMIT {limit}",
            file.replace('\\', "\\\\").replace('\'', "\\'")
        ))
        .await
        .map_err(mysql("SHOW BINLOG EVENTS"))?;
    Ok(rows
        .into_iter()
        .filter_map(|r| {
            Some(PagedEvent {
                event: BinlogEvent {
                    pos: r.get_opt::<u64, _>("Pos")?.ok()?,
                    event_type: r.get_opt::<String, _>("Event_type")?.ok()?,
                    info: r
                        .get_opt::<Option<String>, _>("Info")
                        .and_then(|v| v.ok())
                        .flatten()
                        .unwrap_or_default(),
                },
                next_pos: r.get_opt::<u64, _>("End_log_pos")?.ok()?,
            })
        })
        .collect())
}

/// What a clone copied.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Cloned {
    /// The source's position at the snapshot.
    pub gtid_pos: String,
    pub schemas: Vec<String>,
    pub rows: u64,
}

/// Rows per `INSERT` while copying.
const BATCH: usize = 200;

/// Copies every cell schema (`cell_*`) the source has, as of one consistent snapshot,
/// into `target` (each one dropped and created again), without writing the target's
/// binary log. Schemas only the target has are left alone.
pub async fn clone_schemas(target: &Pool, source: &Pool) -> Result<Cloned> {
    let mut src = source
        .get_conn()
        .await
        .map_err(mysql("connect to the source"))?;
    src.query_drop("SET SESSION TRANSACTION ISOLATION LEVEL REPEATABLE READ")
        .await
        .map_err(mysql("isolation level"))?;
    src.query_drop("START TRANSACTION WITH CONSISTENT SNAPSHOT")
        .await
        .map_err(mysql("snapshot"))?;
    // The binary log coordinates of exactly this snapshot (MariaDB keeps them per
    // transaction), as a GTID position.
    let status: Vec<(String, String)> = src
        .query("SHOW STATUS LIKE 'binlog_snapshot_%'")
        .await
        .map_err(mysql("snapshot position"))?;
    let get = |k: &str| {
        status
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(k))
            .map(|(_, v)| v.clone())
    };
    let (file, pos) = get("Binlog_snapshot_file")
        .zip(get("Binlog_snapshot_position"))
        .ok_or_else(|| Error::Replication("the source reports no snapshot position".into()))?;
    let gtid_pos: Option<String> = src
        .exec_first("SELECT BINLOG_GTID_POS(?, ?)", (&file, &pos))
        .await
        .map_err(mysql("BINLOG_GTID_POS"))?;
    let gtid_pos = gtid_pos.ok_or_else(|| {
        Error::Replication(format!(
            "the source cannot name the GTID position of {file}:{pos}"
        ))
    })?;
    let schemas: Vec<String> = src
        .query(
            "SELECT SCHEMA_NAME FROM information_schema.SCHEMATA \
             WHERE SCHEMA_NAME LIKE 'cell\\_%' ORDER BY SCHEMA_NAME",
        )
        .await
        .map_err(mysql("list schemas"))?;
    let mut dst = target.get_conn().await.map_err(mysql("connect"))?;
    for stmt in [
        "SET SESSION sql_log_bin = 0",
        "SET SESSION foreign_key_checks = 0",
    ] {
        dst.query_drop(stmt).await.map_err(mysql("session"))?;
    }
    let mut rows = 0;
    for schema in &schemas {
        dst.query_drop(format!("DROP DATABASE IF EXISTS {}", ident(schema)))
            .await
            .map_err(mysql("drop schema"))?;
        dst.query_drop(format!("CREATE DATABASE {}", ident(schema)))
            .await
            .map_err(mysql("create schema"))?;
        dst.query_drop(format!("USE {}", ident(schema)))
            .await
            .map_err(mysql("use schema"))?;
        let tables: Vec<String> = src
            .exec(
                "SELECT TABLE_NAME FROM information_schema.TABLES \
                 WHERE TABLE_SCHEMA = ? AND TABLE_TYPE = 'BASE TABLE' ORDER BY TABLE_NAME",
                (schema,),
            )
            .await
            .map_err(mysql("list tables"))?;
        for table in tables {
            let qualified = format!("{}.{}", ident(schema), ident(&table));
            let create: Option<(String, String)> = src
                .query_first(format!("SHOW CREATE TABLE {qualified}"))
                .await
                .map_err(mysql("SHOW CREATE TABLE"))?;
            let (_, create) = create
                .ok_or_else(|| Error::Replication(format!("no definition for {qualified}")))?;
            dst.query_drop(create)
                .await
                .map_err(mysql("create table"))?;
            rows += copy_rows(&mut src, &mut dst, &qualified).await?;
        }
    }
    src.query_drop("COMMIT")
        .await
        .map_err(mysql("end snapshot"))?;
    Ok(Cloned {
        gtid_pos,
        schemas,
        rows,
    })
}

async fn copy_rows(src: &mut Conn, dst: &mut Conn, table: &str) -> Result<u64> {
    let all: Vec<Row> = src
        .query(format!("SELECT * FROM {table}"))
        .await
        .map_err(mysql("read rows"))?;
    let mut copied = 0;
    for chunk in all.chunks(BATCH) {
        let width = chunk[0].len();
        let one = format!("({})", vec!["?"; width].join(","));
        let sql = format!(
            "INSERT INTO {table} VALUES {}",
            vec![one; chunk.len()].join(",")
        );
        let params: Vec<Value> = chunk.iter().flat_map(|r| r.clone().unwrap()).collect();
        dst.exec_drop(sql, params)
            .await
            .map_err(mysql("write rows"))?;
        copied += chunk.len() as u64;
    }
    Ok(copied)
}

/// Drops the server's binary log (its errant transactions must have been exported) and
/// takes `gtid_pos` (the snapshot it was cloned from) as both its own history and what it
/// has applied as a replica; domains the snapshot lacks keep their replica position.
/// Every replication connection must be stopped.
pub async fn take_position(server: &Pool, gtid_pos: &str) -> Result<()> {
    let mut c = server.get_conn().await.map_err(mysql("connect"))?;
    let slave_pos: String = c
        .query_first("SELECT @@GLOBAL.gtid_slave_pos")
        .await
        .map_err(mysql("read gtid_slave_pos"))?
        .unwrap_or_default();
    let replica_pos = gtid::merge(gtid_pos, &slave_pos);
    c.query_drop("RESET MASTER")
        .await
        .map_err(mysql("RESET MASTER"))?;
    c.exec_drop("SET GLOBAL gtid_binlog_state = ?", (gtid_pos,))
        .await
        .map_err(mysql("SET gtid_binlog_state"))?;
    c.exec_drop("SET GLOBAL gtid_slave_pos = ?", (&replica_pos,))
        .await
        .map_err(mysql("SET gtid_slave_pos"))?;
    Ok(())
}
