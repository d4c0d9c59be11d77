//! The CLI's connection to one platform in the global etcd (I/O): the table in force and
//! the operation records, read through the platform's own observer.

use anyhow::Context as _;
use cellplane_cells::etcd_keys::drills_prefix;
use cellplane_cells::routing::RoutingTable;
use cellplane_operator::platform::observe::{read_values, Records, Snapshot};
use cellplane_operator::platform::operations::{Operation, Switchover};
use cellplane_table::write;
use etcd_client::Client;
use std::collections::BTreeMap;

pub struct Platform {
    pub client: Client,
    pub name: String,
}

impl Platform {
    pub async fn table(&mut self) -> anyhow::Result<RoutingTable> {
        write::read(&mut self.client, &self.name)
            .await?
            .table
            .with_context(|| format!("platform {:?} has no routing table yet (is a leader running with --platform {0}?)", self.name))
    }

    pub async fn prefix<T: serde::de::DeserializeOwned>(
        &mut self,
        prefix: &str,
    ) -> anyhow::Result<BTreeMap<String, T>> {
        Ok(read_values(&mut self.client, prefix).await?)
    }

    /// Every record under `drills/`, by id.
    pub async fn operations(&mut self) -> anyhow::Result<BTreeMap<String, Operation>> {
        self.prefix(&drills_prefix(&self.name)).await
    }

    /// The records by kind, with their revisions.
    pub async fn records(&mut self) -> anyhow::Result<Records> {
        Ok(Records::read(&mut self.client, &self.name).await?)
    }

    /// What the leader would see now (for the preflight the CLI runs before writing).
    pub async fn snapshot(&mut self, operations: &[Switchover]) -> anyhow::Result<Snapshot> {
        Ok(Snapshot::read(&mut self.client, &self.name, operations).await?)
    }
}

/// The one-cell operations among `all`, by id (a batch's members).
pub fn switchovers(all: &BTreeMap<String, Operation>) -> BTreeMap<String, Switchover> {
    all.iter()
        .filter_map(|(id, o)| match o {
            Operation::Switchover(s) => Some((id.clone(), s.clone())),
            Operation::Batch(_) | Operation::SlotMove(_) => None,
        })
        .collect()
}
