//! cellplane-cell-sdk: what runs inside a cell (and beside it).
//!
//! - [`table`] / [`watch`]: follow the routing table (etcd or a static file), validated,
//!   swapped atomically, epochs only grow; shared by the router and by cell apps.
//! - [`ownership`]: a tower layer that answers 421 for requests whose user this cell must
//!   not serve at the current epoch (fencing against stale routers).
//! - [`settings`]: the connection settings the operator injects, with errors naming the
//!   variable and the fix.
//! - [`replication`]: MariaDB GTID replication from a home cell to its standby: configure,
//!   measure, promote, demote (fence). The failover controller calls these.

pub mod auth;
pub mod ownership;
pub mod replication;
pub mod settings;
pub mod table;
pub mod table_metrics;
pub mod watch;

/// Errors of the cell SDK; user-facing ones name the setting or field and the fix.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("routing table refused: {0}")]
    Table(#[from] cellplane_cells::Error),

    #[error("table file {path}: {source}")]
    TableFile {
        path: String,
        #[source]
        source: std::io::Error,
    },

    #[error("etcd: {0}")]
    Etcd(#[from] etcd_client::Error),

    #[error("setting {var}: {problem}")]
    Setting { var: String, problem: String },

    #[error("mysql ({what}): {source}")]
    Mysql {
        what: String,
        #[source]
        source: mysql_async::Error,
    },

    #[error("replication: {0}")]
    Replication(String),
}

pub type Result<T, E = Error> = std::result::Result<T, E>;
