//! cellplane-table: following the routing table, for every process that routes by it or
//! fences by it (the router, cell apps, the operator).
//!
//! - [`store`]: the table in use, validated and swapped atomically; epochs only grow; the
//!   last good one is cached on disk so a restart while etcd is away still routes.
//! - [`source`]: where tables come from: etcd (read, then watch, reconnecting with
//!   backoff) or a static file (polled).
//! - [`ack`]: telling the platform leader which epoch this follower applied (on a lease).
//! - [`owner_lease`]: a serving cell's ownership lease, without which it takes no writes.
//! - [`write`]: the platform leader's compare-and-swap of the table, with its history.
//! - [`metrics`]: epoch, applied time, refusals, watch health; registered under the
//!   owner's prefix.

pub mod ack;
pub mod etcd;
pub mod metrics;
pub mod owner_lease;
pub mod source;
pub mod store;
pub mod write;

pub use metrics::TableMetrics;
pub use source::TableSource;
pub use store::TableStore;

/// Errors of table following; each names what was refused and why.
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
}

pub type Result<T, E = Error> = std::result::Result<T, E>;
