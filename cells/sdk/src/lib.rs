//! cellplane-cell-sdk: what runs inside a cell (and beside it).
//!
//! The routing table itself is followed with `cellplane-table` (shared with the router).
//! - [`ownership`]: a tower layer that answers 421 for requests whose user this cell must
//!   not serve at the current epoch (fencing against stale routers).
//! - [`settings`]: the connection settings the operator injects, with errors naming the
//!   variable and the fix.
//! - [`replication`]: MariaDB GTID replication from a home cell to its standby: configure,
//!   measure, promote, demote (fence). The failover controller calls these.
//! - [`drain`]: the writes in flight by admission epoch (how far an app has drained).
//! - [`mover`]: a slot move's rows: copy, catch up from the binary log, verify.
//! - [`rebuild`]: an old home that returned with errant transactions: export them, clone
//!   the new home's cell schemas, take its position.

pub mod drain;
pub mod mover;
pub mod ownership;
pub mod rebuild;
pub mod replication;
pub mod settings;

/// Errors of the cell SDK; user-facing ones name the setting or field and the fix.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Table(#[from] cellplane_table::Error),

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

    #[error("slot move: {0}")]
    Move(String),
}

pub type Result<T, E = Error> = std::result::Result<T, E>;
