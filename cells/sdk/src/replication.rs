//! MariaDB GTID replication between a home cell's primary and its standby's MariaDB, as
//! the failover controller drives it: configure, measure (position, lag), promote the
//! replica, demote (fence) the old primary.
//!
//! Each cell's MariaDB has its own `gtid_domain_id` and the replica uses one named
//! connection per home cell (multi-source), so a standby's server keeps its own schema and
//! the replicated schema of the cell it stands by for side by side.

use crate::{Error, Result};
use mysql_async::prelude::Queryable;
use mysql_async::{Conn, Pool, Row};
use std::fmt;
use std::time::Duration;

fn mysql(what: &str) -> impl FnOnce(mysql_async::Error) -> Error + '_ {
    move |source| Error::Mysql {
        what: what.into(),
        source,
    }
}

/// The primary a replica follows, with the replication account from the home cell's
/// Secret. Debug output hides the password.
#[derive(Clone)]
pub struct ReplicationSource {
    pub host: String,
    pub port: u16,
    pub user: String,
    pub password: String,
}

impl fmt::Debug for ReplicationSource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{}@{}:{} (password hidden)",
            self.user, self.host, self.port
        )
    }
}

/// `CHANGE MASTER` takes no bind parameters: values are quoted here, and names that end up
/// unquoted are checked to be plain identifiers first.
fn quote(value: &str) -> String {
    format!("'{}'", value.replace('\\', "\\\\").replace('\'', "\\'"))
}

fn check_connection_name(name: &str) -> Result<()> {
    let ok = !name.is_empty()
        && name.len() <= 64
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_');
    if ok {
        Ok(())
    } else {
        Err(Error::Replication(format!(
            "connection name {name:?}: use the home cell's name (letters, digits, '-', '_')"
        )))
    }
}

async fn conn(pool: &Pool) -> Result<Conn> {
    pool.get_conn().await.map_err(mysql("connect"))
}

/// Points `replica` at `source` under connection `name` (the home cell's name) and starts
/// it from the replica's GTID position (`MASTER_USE_GTID=slave_pos`), so a restarted or
/// re-pointed replica resumes exactly where it stopped.
pub async fn start_replica(replica: &Pool, name: &str, source: &ReplicationSource) -> Result<()> {
    check_connection_name(name)?;
    let mut c = conn(replica).await?;
    let stmt = format!(
        "CHANGE MASTER '{name}' TO MASTER_HOST={}, MASTER_PORT={}, MASTER_USER={}, MASTER_PASSWORD={}, MASTER_USE_GTID=slave_pos, MASTER_CONNECT_RETRY=1",
        quote(&source.host),
        source.port,
        quote(&source.user),
        quote(&source.password)
    );
    c.query_drop(stmt).await.map_err(mysql("CHANGE MASTER"))?;
    c.query_drop(format!("START SLAVE '{name}'"))
        .await
        .map_err(mysql("START SLAVE"))?;
    Ok(())
}

/// A server's own position: what it has written (binlog) and whether it accepts writes
/// (the app's `/status` contract's type).
pub use cellplane_cells::app_status::MysqlPosition as Position;

pub async fn position(pool: &Pool) -> Result<Position> {
    let mut c = conn(pool).await?;
    let (gtid_binlog_pos, read_only): (String, i64) = c
        .query_first("SELECT @@GLOBAL.gtid_binlog_pos, @@GLOBAL.read_only")
        .await
        .map_err(mysql("read position"))?
        .ok_or_else(|| Error::Replication("no position row".into()))?;
    Ok(Position {
        gtid_binlog_pos,
        read_only: read_only != 0,
    })
}

/// One replication connection as the replica sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReplicaStatus {
    pub io_running: bool,
    pub sql_running: bool,
    /// `Seconds_Behind_Master`; `None` while the threads are not running.
    pub seconds_behind: Option<u64>,
    /// The GTIDs this server has applied as a replica (`gtid_slave_pos`, all domains).
    pub gtid_slave_pos: String,
    pub last_error: String,
}

pub async fn replica_status(replica: &Pool, name: &str) -> Result<Option<ReplicaStatus>> {
    check_connection_name(name)?;
    let mut c = conn(replica).await?;
    let row: Option<Row> = c
        .query_first(format!("SHOW SLAVE '{name}' STATUS"))
        .await
        .or_else(|e| match &e {
            // 1617: no such connection (never configured, or reset by a promotion).
            mysql_async::Error::Server(s) if s.code == 1617 => Ok(None),
            _ => Err(e),
        })
        .map_err(mysql("SHOW SLAVE STATUS"))?;
    let Some(row) = row else { return Ok(None) };
    // Read separately: SHOW SLAVE '<name>' STATUS leaves its Gtid_Slave_Pos column empty.
    let gtid_slave_pos: Option<String> = c
        .query_first("SELECT @@GLOBAL.gtid_slave_pos")
        .await
        .map_err(mysql("read gtid_slave_pos"))?;
    let text = |col: &str| -> String {
        row.get_opt::<Option<String>, _>(col)
            .and_then(|r| r.ok())
            .flatten()
            .unwrap_or_default()
    };
    Ok(Some(ReplicaStatus {
        io_running: text("Slave_IO_Running") == "Yes",
        sql_running: text("Slave_SQL_Running") == "Yes",
        seconds_behind: text("Seconds_Behind_Master").parse().ok(),
        gtid_slave_pos: gtid_slave_pos.unwrap_or_default(),
        last_error: [text("Last_IO_Error"), text("Last_SQL_Error")]
            .into_iter()
            .filter(|e| !e.is_empty())
            .collect::<Vec<_>>()
            .join("; "),
    }))
}

/// Transactions the replica still has to apply (see [`cellplane_cells::gtid::lag`]).
pub fn gtid_lag(primary: &str, replica: &str) -> u64 {
    cellplane_cells::gtid::lag(primary, replica)
}

/// Waits until the replica has applied everything up to `gtid_pos` (the primary's
/// `gtid_binlog_pos`). `Ok(false)` on timeout.
pub async fn wait_caught_up(replica: &Pool, gtid_pos: &str, timeout: Duration) -> Result<bool> {
    let mut c = conn(replica).await?;
    let waited: Option<i64> = c
        .exec_first(
            "SELECT MASTER_GTID_WAIT(?, ?)",
            (gtid_pos, timeout.as_secs_f64()),
        )
        .await
        .map_err(mysql("MASTER_GTID_WAIT"))?;
    Ok(waited == Some(0))
}

/// Makes the replica its own primary for the home cell's data: waits until it has applied
/// `caught_up_to` (the fenced home's final position; a replica that is behind is refused),
/// stops and forgets the replication connection, and makes the server writable. There is
/// no unchecked promotion: an emergency failover passes the position it accepts to lose
/// from, and says so.
pub async fn promote(
    replica: &Pool,
    name: &str,
    caught_up_to: &str,
    timeout: Duration,
) -> Result<()> {
    check_connection_name(name)?;
    if !wait_caught_up(replica, caught_up_to, timeout).await? {
        return Err(Error::Replication(format!(
            "replica has not applied {caught_up_to} within {timeout:?}; not promoting a replica that is behind"
        )));
    }
    let mut c = conn(replica).await?;
    c.query_drop(format!("STOP SLAVE '{name}'"))
        .await
        .map_err(mysql("STOP SLAVE"))?;
    c.query_drop(format!("RESET SLAVE '{name}' ALL"))
        .await
        .map_err(mysql("RESET SLAVE"))?;
    c.query_drop("SET GLOBAL read_only = 0")
        .await
        .map_err(mysql("SET read_only = 0"))?;
    Ok(())
}

/// The names of the replication connections configured on `replica`.
pub async fn connections(replica: &Pool) -> Result<Vec<String>> {
    let mut c = conn(replica).await?;
    let rows: Vec<Row> = c
        .query("SHOW ALL SLAVES STATUS")
        .await
        .map_err(mysql("SHOW ALL SLAVES STATUS"))?;
    Ok(rows
        .iter()
        .filter_map(|r| {
            r.get_opt::<String, _>("Connection_name")
                .and_then(|v| v.ok())
        })
        .filter(|n| !n.is_empty())
        .collect())
}

/// Removes connection `name` (stopped, forgotten); a connection that does not exist is fine.
pub async fn stop_replica(replica: &Pool, name: &str) -> Result<()> {
    check_connection_name(name)?;
    let mut c = conn(replica).await?;
    // Stop receiving first, then let the SQL thread apply what was already received (a
    // promotion after losing the primary keeps every event that reached this replica:
    // `RESET SLAVE ALL` drops the relay logs), at most APPLY_RECEIVED_WAIT.
    match c.query_drop(format!("STOP SLAVE '{name}' IO_THREAD")).await {
        Ok(()) => {
            let row: Option<Row> = c
                .query_first(format!("SHOW SLAVE '{name}' STATUS"))
                .await
                .map_err(mysql("SHOW SLAVE STATUS"))?;
            let received = row
                .and_then(|r| r.get_opt::<Option<String>, _>("Gtid_IO_Pos"))
                .and_then(|r| r.ok())
                .flatten()
                .unwrap_or_default();
            if !received.is_empty() {
                let waited: Option<i64> = c
                    .exec_first(
                        "SELECT MASTER_GTID_WAIT(?, ?)",
                        (&received, APPLY_RECEIVED_WAIT.as_secs_f64()),
                    )
                    .await
                    .map_err(mysql("MASTER_GTID_WAIT"))?;
                if waited != Some(0) {
                    tracing::warn!(connection = name, %received, "the replica did not apply everything it received in time; the rest is dropped with its relay log");
                }
            }
        }
        // 1617: no such connection.
        Err(mysql_async::Error::Server(s)) if s.code == 1617 => return Ok(()),
        Err(e) => return Err(mysql("stop replica")(e)),
    }
    for stmt in [
        format!("STOP SLAVE '{name}'"),
        format!("RESET SLAVE '{name}' ALL"),
    ] {
        if let Err(e) = c.query_drop(&stmt).await {
            // 1617: no such connection.
            if !matches!(&e, mysql_async::Error::Server(s) if s.code == 1617) {
                return Err(mysql("stop replica")(e));
            }
        }
    }
    Ok(())
}

/// How long stopping a replica waits for it to apply what it already received.
const APPLY_RECEIVED_WAIT: Duration = Duration::from_secs(2);

/// Makes the server writable for every account again (the end of a fence).
pub async fn make_writable(primary: &Pool) -> Result<()> {
    let mut c = conn(primary).await?;
    c.query_drop("SET GLOBAL read_only = 0")
        .await
        .map_err(mysql("SET read_only = 0"))
}

/// Ensures the account standbys replicate with exists on this server with `password`,
/// without writing it to the binary log (accounts are per server and must not replicate).
pub async fn ensure_replication_account(primary: &Pool, user: &str, password: &str) -> Result<()> {
    check_connection_name(user)?;
    let mut c = conn(primary).await?;
    let pw = quote(password);
    for stmt in [
        "SET SESSION sql_log_bin = 0".to_string(),
        format!("CREATE USER IF NOT EXISTS '{user}'@'%' IDENTIFIED BY {pw}"),
        format!("ALTER USER '{user}'@'%' IDENTIFIED BY {pw}"),
        format!(
            "GRANT REPLICATION SLAVE, REPLICATION CLIENT, BINLOG MONITOR ON *.* TO '{user}'@'%'"
        ),
        // An old home that returned with errant transactions is rebuilt from a copy of
        // the cell schemas (`rebuild`): read access to those, nothing else.
        format!("GRANT SELECT, SHOW VIEW ON `cell\\_%`.* TO '{user}'@'%'"),
    ] {
        c.query_drop(stmt)
            .await
            .map_err(mysql("replication account"))?;
    }
    Ok(())
}

/// Lets the app's account (every host it is defined for) read and write the schemas of
/// all cells (`cell_*`) on this server: a standby serves a failed-over cell's users from
/// that cell's replicated schema. Kept out of the binary log, like every account change.
pub async fn grant_cell_schemas(server: &Pool, app_user: &str) -> Result<()> {
    let mut c = conn(server).await?;
    let hosts: Vec<String> = c
        .exec("SELECT Host FROM mysql.user WHERE User = ?", (app_user,))
        .await
        .map_err(mysql("list app account hosts"))?;
    if hosts.is_empty() {
        return Err(Error::Replication(format!(
            "no MySQL account {app_user:?} on this server; the app's account must exist before standbys can serve with it"
        )));
    }
    c.query_drop("SET SESSION sql_log_bin = 0")
        .await
        .map_err(mysql("sql_log_bin"))?;
    for host in hosts {
        c.query_drop(format!(
            "GRANT SELECT, INSERT, UPDATE, DELETE ON `cell\\_%`.* TO {}@{}",
            quote(app_user),
            quote(&host)
        ))
        .await
        .map_err(mysql("grant the app account the cell schemas"))?;
    }
    c.query_drop("SET SESSION sql_log_bin = 1")
        .await
        .map_err(mysql("sql_log_bin"))
}

/// Fences the old primary: read-only for every account without admin rights (the apps'),
/// and their open sessions are killed so no transaction started before the fence commits
/// after it. Returns the final position, which the replica must reach before promotion.
pub async fn demote(primary: &Pool) -> Result<Position> {
    let mut c = conn(primary).await?;
    c.query_drop("SET GLOBAL read_only = 1")
        .await
        .map_err(mysql("SET read_only = 1"))?;
    let sessions: Vec<u64> = c
        .query(
            "SELECT ID FROM information_schema.PROCESSLIST \
             WHERE ID <> CONNECTION_ID() AND COMMAND NOT IN ('Binlog Dump', 'Daemon') \
             AND USER NOT IN ('root', 'system user', 'event_scheduler', 'repl')",
        )
        .await
        .map_err(mysql("list sessions"))?;
    for id in sessions {
        // A session may end on its own meanwhile: 1094 (unknown thread) is fine.
        if let Err(e) = c.query_drop(format!("KILL CONNECTION {id}")).await {
            if !matches!(&e, mysql_async::Error::Server(s) if s.code == 1094) {
                return Err(mysql("KILL CONNECTION")(e));
            }
        }
    }
    drop(c);
    position(primary).await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lag_counts_missing_transactions_per_domain() {
        assert_eq!(gtid_lag("7-7-120", "7-7-100"), 20);
        assert_eq!(gtid_lag("7-7-120", "7-7-120,9-9-5"), 0);
        assert_eq!(gtid_lag("7-7-120", ""), 120);
        assert_eq!(gtid_lag("7-7-10,8-8-4", "8-8-1,7-7-10"), 3);
        assert_eq!(gtid_lag("", "7-7-10"), 0);
    }

    #[test]
    fn quoting_and_names_are_safe() {
        assert_eq!(quote(r"a'b\c"), r"'a\'b\\c'");
        assert!(check_connection_name("shop-eu-0").is_ok());
        assert!(check_connection_name("x'; DROP").is_err());
        assert!(check_connection_name("").is_err());
        let src = ReplicationSource {
            host: "h".into(),
            port: 1,
            user: "repl".into(),
            password: "s3cret".into(),
        };
        assert!(!format!("{src:?}").contains("s3cret"));
    }
}
