//! cellplane-router: the data-plane entry. The decision (key extraction, slot -> cell,
//! endpoint choice) is pure and benchmarked; table watching, limits and proxying wrap it.

pub mod config;
pub mod decision;
pub mod endpoints;
pub mod health;
pub mod key;
pub mod limit;
pub mod metrics;
pub mod proxy;
pub mod table;
pub mod watch;

/// Errors of the router; user-facing ones name the field and the fix.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("config {field}: {problem}")]
    Config { field: String, problem: String },

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
}

pub type Result<T, E = Error> = std::result::Result<T, E>;
