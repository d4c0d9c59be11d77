//! The platform layer, by who acts: the [`leader`] (one across every region: the routing
//! table, operations, failure detection), each region's [`agent`] (carries out intents for
//! its own cells' MySQL, reports what it measures), and what both share: the operations
//! themselves ([`operations`], pure, one module per kind), the one reader of the platform's
//! state in etcd ([`observe`]) and the intents a cell should follow ([`intents`]).

pub mod agent;
pub mod intents;
pub mod leader;
pub mod observe;
pub mod operations;

use crate::Result;
use etcd_client::Client;
use std::time::Duration;

/// Connects to the global etcd (the one way the platform layer reaches it).
pub async fn connect(endpoints: &[String]) -> Result<Client> {
    Ok(cellplane_table::etcd::connect(endpoints, Duration::from_secs(2)).await?)
}

pub(crate) fn table_error(e: cellplane_table::Error) -> crate::Error {
    match e {
        cellplane_table::Error::Etcd(e) => crate::Error::Etcd(e),
        other => crate::Error::InvalidSpec(other.to_string()),
    }
}
