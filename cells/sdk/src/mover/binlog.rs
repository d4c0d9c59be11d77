//! Catching the target up from the source's binary log: MariaDB's replication protocol
//! from a GTID position (as a replica would connect, under a server id no cell uses), the
//! row changes of the moving slots applied to the target, one target transaction per
//! source transaction.

use super::rows::{utc_timestamp, TableShape};
use super::{mysql, utc, SlotMover};
use crate::{Error, Result};
use cellplane_cells::gtid::{Gtid, Position};
use futures_util::StreamExt;
use mysql_async::binlog::events::{Event, EventData, RowsEventData};
use mysql_async::binlog::row::BinlogRow;
use mysql_async::binlog::value::BinlogValue;
use mysql_async::prelude::Queryable;
use mysql_async::{BinlogStreamRequest, Conn, Value};

/// Where a catch-up stops.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Until {
    /// The end of the source's binary log when it is reached.
    End,
    /// Exactly before this binary-log position (a consistent snapshot's, from
    /// `SHOW STATUS LIKE 'binlog_snapshot_%'`): the target then holds what the snapshot saw.
    Position { file: String, pos: u64 },
}

/// What a catch-up did.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct CatchUp {
    /// The source position reached: where the next catch-up starts.
    pub position: String,
    /// Source transactions read, and the ones that changed a moving slot's rows.
    pub transactions: u64,
    pub applied: u64,
    /// Rows written or deleted on the target.
    pub rows: u64,
}

/// One row change of a moving slot, as the target applies it.
#[derive(Clone, Debug, PartialEq)]
enum Change {
    Upsert { table: usize, row: Vec<Value> },
    Delete { table: usize, primary: Vec<Value> },
}

// Event type codes (MariaDB's own are above 159).
const QUERY_EVENT: u8 = 2;
const ROTATE_EVENT: u8 = 4;
const FORMAT_DESCRIPTION_EVENT: u8 = 15;
const XID_EVENT: u8 = 16;
const MARIADB_GTID_EVENT: u8 = 162;
/// A GTID event's flag: the transaction is one statement with no COMMIT (DDL).
const GTID_STANDALONE: u8 = 1;
/// `mariadb_slave_capability` for a replica that understands GTIDs.
const CAPABILITY_GTID: u8 = 4;

/// A server id for the mover's replication connection: above 2^31, where cells' ids (31
/// bits) never are, so it never displaces a cell's replica.
fn mover_server_id() -> u32 {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or_default();
    0x8000_0000 | (xxhash_rust::xxh3::xxh3_64(&nanos.to_le_bytes()) as u32 & 0x7fff_ffff)
}

/// A MariaDB GTID event's transaction id and whether it stands alone (no COMMIT follows).
fn gtid_of(event: &Event) -> Result<(Gtid, bool)> {
    let data = event.data();
    if data.len() < 13 {
        return Err(Error::Move(format!(
            "a GTID event of {} bytes in the source's binary log; expected MariaDB's (13 or more)",
            data.len()
        )));
    }
    let seq = u64::from_le_bytes(data[0..8].try_into().expect("8 bytes"));
    let domain = u32::from_le_bytes(data[8..12].try_into().expect("4 bytes"));
    let gtid = Gtid {
        domain,
        server: event.header().server_id(),
        seq,
    };
    Ok((gtid, data[12] & GTID_STANDALONE != 0))
}

/// A statement that changes a moved table's definition: a move cannot go on across it (the
/// rows it reads would no longer match the target's columns). The app's start-up
/// `CREATE TABLE IF NOT EXISTS` does not count.
pub(super) fn changes_a_moved_table(query: &str, tables: &[TableShape]) -> bool {
    let q = query.trim_start().to_ascii_lowercase();
    let ddl = ["alter ", "drop ", "rename ", "truncate ", "create "]
        .iter()
        .any(|verb| q.starts_with(verb));
    if !ddl || q.starts_with("create table if not exists") || q.starts_with("create database") {
        return false;
    }
    let words: Vec<&str> = q
        .split(|c: char| !(c.is_ascii_alphanumeric() || c == '_' || c == '$'))
        .filter(|w| !w.is_empty())
        .collect();
    tables
        .iter()
        .any(|t| words.contains(&t.name.to_ascii_lowercase().as_str()))
}

/// The file a rotate event names. Read before the format description (the stream's first
/// event), a checksummed event's last 4 bytes are still on the name: they are cut as
/// bytes (any byte value), before the name is read as text.
fn rotated_to(name: &[u8], with_checksum: bool) -> String {
    let name = match name.len() {
        n if with_checksum && n > 4 => &name[..n - 4],
        _ => name,
    };
    String::from_utf8_lossy(name).into_owned()
}

/// An event starting at `start` in binary-log file `file` is at or after position
/// (`until_file`, `until`). Files are compared by name (`binlog.000012`): the server may
/// report a snapshot's file with the directory it was configured with, the replication
/// stream names it without.
fn past(file: &str, start: u64, until_file: &str, until: u64) -> bool {
    let name = |f: &str| f.rsplit('/').next().unwrap_or(f).to_string();
    let (file, until_file) = (name(file), name(until_file));
    file > until_file || (file == until_file && start >= until)
}

/// A row image as column values, `TIMESTAMP`s as UTC dates.
fn values_of(row: &BinlogRow, table: &TableShape) -> Result<Vec<Value>> {
    if row.len() != table.columns.len() {
        return Err(Error::Move(format!(
            "table {}: the binary log has {} columns, the table {}; did its definition change \
             during the move?",
            table.name,
            row.len(),
            table.columns.len()
        )));
    }
    table
        .columns
        .iter()
        .enumerate()
        .map(|(i, column)| {
            let value = row.as_ref(i).ok_or_else(|| {
                Error::Move(format!(
                    "table {}: column {} is missing from a row image; the source must log \
                     whole rows (binlog_row_image=FULL)",
                    table.name, column.name
                ))
            })?;
            let value = match value.clone() {
                BinlogValue::Value(v) => v,
                other => Value::try_from(other).map_err(|e| {
                    Error::Move(format!("table {} column {}: {e}", table.name, column.name))
                })?,
            };
            match value {
                Value::Bytes(ref text) if column.timestamp => {
                    utc_timestamp(text).ok_or_else(|| {
                        Error::Move(format!(
                            "table {} column {}: {:?} is not a binary-log timestamp",
                            table.name,
                            column.name,
                            String::from_utf8_lossy(text)
                        ))
                    })
                }
                v => Ok(v),
            }
        })
        .collect()
}

impl SlotMover {
    /// Reads the source's binary log from `from` (a GTID position) to `until`, applying
    /// the row changes of the moving slots to the target. Applying a change twice leaves
    /// the same rows, so a catch-up interrupted anywhere can start again from its `from`.
    pub async fn catch_up(&self, from: &str, until: Until) -> Result<CatchUp> {
        let mut position = Position::parse(from).ok_or_else(|| {
            Error::Move(format!(
                "{from:?} is not a GTID position (domain-server-seqno, comma-separated)"
            ))
        })?;
        let mut conn = Conn::new(utc(&self.source.opts))
            .await
            .map_err(mysql("source (binary log)"))?;
        // Whether events end with a CRC32: the stream's first event (a rotate naming the
        // file) comes before the format description that says so, and is read with it.
        let checksum: Option<String> = conn
            .query_first("SELECT @@global.binlog_checksum")
            .await
            .map_err(mysql("source binlog_checksum"))?;
        let mut footer_unknown = checksum.is_some_and(|c| !c.eq_ignore_ascii_case("NONE"));
        for set in [
            format!("SET @mariadb_slave_capability = {CAPABILITY_GTID}"),
            // Checked by Position::parse: digits, '-' and ','.
            format!("SET @slave_connect_state = '{position}'"),
        ] {
            conn.query_drop(set)
                .await
                .map_err(mysql("source (binary log)"))?;
        }
        let mut stream = conn
            .get_binlog_stream(BinlogStreamRequest::new(mover_server_id()).with_non_blocking())
            .await
            .map_err(mysql("source (binary log)"))?;
        let mut target = self.target_pool.get_conn().await.map_err(mysql("target"))?;
        let mut done = CatchUp::default();
        let mut file = String::new();
        let mut current: Option<Gtid> = None;
        let mut pending: Vec<Change> = Vec::new();
        while let Some(event) = stream.next().await {
            let event = event.map_err(mysql("reading the source's binary log"))?;
            let header = event.header();
            let kind = header.event_type_raw();
            if kind == FORMAT_DESCRIPTION_EVENT {
                footer_unknown = false;
            }
            if kind == ROTATE_EVENT {
                if let Some(EventData::RotateEvent(r)) = event.read_data().map_err(io)? {
                    file = rotated_to(r.name_raw(), footer_unknown);
                }
                continue;
            }
            if let Until::Position { file: f, pos } = &until {
                let start =
                    u64::from(header.log_pos()).saturating_sub(u64::from(header.event_size()));
                if header.log_pos() != 0 && past(&file, start, f, *pos) {
                    break;
                }
            }
            match kind {
                MARIADB_GTID_EVENT => {
                    let (gtid, standalone) = gtid_of(&event)?;
                    pending.clear();
                    current = Some(gtid);
                    if standalone {
                        // Its one statement (a QUERY event) follows; it ends there.
                        done.transactions += 1;
                        position.advance(gtid);
                        current = None;
                    }
                }
                XID_EVENT => {
                    self.commit(&mut target, &mut pending, &mut done).await?;
                    if let Some(gtid) = current.take() {
                        done.transactions += 1;
                        position.advance(gtid);
                    }
                }
                QUERY_EVENT => {
                    let Some(EventData::QueryEvent(q)) = event.read_data().map_err(io)? else {
                        continue;
                    };
                    let query = q.query();
                    if query.eq_ignore_ascii_case("COMMIT") {
                        self.commit(&mut target, &mut pending, &mut done).await?;
                        if let Some(gtid) = current.take() {
                            done.transactions += 1;
                            position.advance(gtid);
                        }
                    } else if q.schema() == self.source.schema
                        && changes_a_moved_table(&query, &self.tables)
                    {
                        return Err(Error::Move(format!(
                            "the source's schema changed during the move ({query}); cancel the \
                             move and start it again once both cells run the new schema"
                        )));
                    }
                }
                _ => {
                    if let Some(EventData::RowsEvent(rows)) = event.read_data().map_err(io)? {
                        self.collect(&stream, &rows, &mut pending)?;
                    }
                }
            }
        }
        stream.close().await.map_err(mysql("source (binary log)"))?;
        done.position = position.to_string();
        Ok(done)
    }

    /// The changes of the moving slots in one rows event.
    fn collect(
        &self,
        stream: &mysql_async::BinlogStream,
        rows: &RowsEventData<'_>,
        pending: &mut Vec<Change>,
    ) -> Result<()> {
        let Some(map) = stream.get_tme(rows.table_id()) else {
            return Ok(());
        };
        if map.database_name() != self.source.schema {
            return Ok(());
        }
        let name = map.table_name();
        let Some(t) = self.tables.iter().position(|t| t.name == name) else {
            return Ok(());
        };
        let table = &self.tables[t];
        let moving = |row: &[Value]| table.in_slots(row, &self.slots);
        for images in rows.rows(map) {
            let (before, after) = images.map_err(io)?;
            let before = before.map(|r| values_of(&r, table)).transpose()?;
            let after = after.map(|r| values_of(&r, table)).transpose()?;
            if let Some(after) = after.filter(|r| moving(r)) {
                // A changed primary key leaves the old row behind: delete it too.
                if let Some(before) = before.as_ref().filter(|b| moving(b)) {
                    if table.primary_of(before) != table.primary_of(&after) {
                        pending.push(Change::Delete {
                            table: t,
                            primary: table.primary_of(before),
                        });
                    }
                }
                pending.push(Change::Upsert {
                    table: t,
                    row: after,
                });
            } else if let Some(before) = before.filter(|r| moving(r)) {
                // Deleted, or its user's key changed to a slot that is not moving.
                pending.push(Change::Delete {
                    table: t,
                    primary: table.primary_of(&before),
                });
            }
        }
        Ok(())
    }

    /// Applies one source transaction's changes in one target transaction.
    async fn commit(
        &self,
        target: &mut Conn,
        pending: &mut Vec<Change>,
        done: &mut CatchUp,
    ) -> Result<()> {
        if pending.is_empty() {
            return Ok(());
        }
        let schema = &self.target.schema;
        let mut tx = target
            .start_transaction(Default::default())
            .await
            .map_err(mysql("target begin"))?;
        for change in pending.drain(..) {
            match change {
                Change::Upsert { table, row } => {
                    let t = &self.tables[table];
                    tx.exec_drop(t.upsert(schema, 1), row)
                        .await
                        .map_err(mysql(format!("writing {}", t.name)))?;
                }
                Change::Delete { table, primary } => {
                    let t = &self.tables[table];
                    tx.exec_drop(t.delete_by_primary(schema), primary)
                        .await
                        .map_err(mysql(format!("deleting from {}", t.name)))?;
                }
            }
            done.rows += 1;
        }
        tx.commit().await.map_err(mysql("target commit"))?;
        done.applied += 1;
        Ok(())
    }
}

fn io(e: std::io::Error) -> Error {
    Error::Move(format!("decoding the source's binary log: {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::mover::rows::Column;

    #[test]
    fn only_a_change_to_a_moved_table_stops_a_move() {
        let tables = [TableShape {
            name: "orders".into(),
            columns: vec![Column {
                name: "order_id".into(),
                timestamp: false,
            }],
            primary: vec![0],
            key: 0,
        }];
        for stops in [
            "ALTER TABLE orders ADD COLUMN x INT",
            "  drop table `orders`",
            "RENAME TABLE orders TO old_orders",
            "TRUNCATE orders",
            "CREATE INDEX by_qty ON orders (qty)",
        ] {
            assert!(changes_a_moved_table(stops, &tables), "{stops}");
        }
        for goes_on in [
            "CREATE TABLE IF NOT EXISTS orders (order_id INT)",
            "ALTER TABLE orders_archive ADD COLUMN x INT",
            "ALTER TABLE profiles ADD COLUMN x INT",
            "BEGIN",
            "CREATE DATABASE cell_x",
        ] {
            assert!(!changes_a_moved_table(goes_on, &tables), "{goes_on}");
        }
    }

    #[test]
    fn the_first_rotate_loses_its_checksum() {
        assert_eq!(rotated_to(b"binlog.000001IxP2", true), "binlog.000001");
        assert_eq!(rotated_to(b"binlog.000001", false), "binlog.000001");
        // A checksum is any four bytes, not text: cut before the name is decoded.
        let mut raw = b"binlog.000001".to_vec();
        raw.extend_from_slice(&[0xd3, 0x53, 0xf7, 0x0b]);
        assert_eq!(rotated_to(&raw, true), "binlog.000001");
    }

    #[test]
    fn a_snapshot_position_is_compared_by_file_name_then_offset() {
        let until = "/var/lib/mysql/binlog.000002";
        assert!(!past("binlog.000001", 9_999, until, 400));
        assert!(!past("binlog.000002", 399, until, 400));
        assert!(past("binlog.000002", 400, until, 400));
        assert!(past("binlog.000003", 4, until, 400));
        assert!(past("./binlog.000002", 500, "binlog.000002", 400));
    }

    #[test]
    fn the_movers_server_id_is_out_of_the_cells_range() {
        for _ in 0..100 {
            assert!(mover_server_id() >= 0x8000_0000);
        }
    }
}
