//! The etcd layout (docs/architecture.md, "etcd layout") and the registration record a cell keeps alive. Pure.

use crate::crd::CellPhase;
use crate::slot_move::{MoveOrder, MoveReport, RetireOrder, RetireReport};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

/// `/cellplane/<platform>/`
pub fn platform_prefix(platform: &str) -> String {
    format!("/cellplane/{platform}/")
}

/// `/cellplane/<platform>/cells/` : prefix of every registration.
pub fn cells_prefix(platform: &str) -> String {
    format!("/cellplane/{platform}/cells/")
}

/// `/cellplane/<platform>/cells/<cell>` : a cell's registration, kept alive by a lease.
pub fn cell_key(platform: &str, cell: &str) -> String {
    format!("/cellplane/{platform}/cells/{cell}")
}

/// `/cellplane/<platform>/routing` : the routing table, written only by compare-and-swap.
pub fn routing_key(platform: &str) -> String {
    format!("/cellplane/{platform}/routing")
}

/// `/cellplane/<platform>/routing-history/<epoch>` : every table written, by epoch (zero
/// padded to 20 digits so keys sort by epoch; the writer trims the oldest).
pub fn routing_history_key(platform: &str, epoch: u64) -> String {
    format!("{}{epoch:020}", routing_history_prefix(platform))
}

/// `/cellplane/<platform>/routing-history/`
pub fn routing_history_prefix(platform: &str) -> String {
    format!("/cellplane/{platform}/routing-history/")
}

/// `/cellplane/<platform>/routers/` : prefix of every router's acknowledgement.
pub fn routers_prefix(platform: &str) -> String {
    format!("/cellplane/{platform}/routers/")
}

/// `/cellplane/<platform>/routers/<id>` : the epoch router `id` applied, kept on a lease.
pub fn router_key(platform: &str, id: &str) -> String {
    format!("/cellplane/{platform}/routers/{id}")
}

/// `/cellplane/<platform>/leader` : the platform controller's election (etcd election
/// API; the holder's key lives under this prefix on the holder's lease).
pub fn leader_election(platform: &str) -> String {
    format!("/cellplane/{platform}/leader")
}

/// `/cellplane/<platform>/pins` : slot -> cell overrides (a VIP user moved on purpose, a
/// slot under migration) that the leader applies on top of the placement.
pub fn pins_key(platform: &str) -> String {
    format!("/cellplane/{platform}/pins")
}

/// `/cellplane/<platform>/drills/<id>` : a drill record.
pub fn drill_key(platform: &str, id: &str) -> String {
    format!("/cellplane/{platform}/drills/{id}")
}

/// `/cellplane/<platform>/owners/<cell>/` : the ownership leases of a serving cell's apps
/// (one key per app process, on its own lease); the cell may take writes only while its
/// app holds one (`failover_timing`).
pub fn owners_prefix(platform: &str, cell: &str) -> String {
    format!("/cellplane/{platform}/owners/{cell}/")
}

/// `/cellplane/<platform>/leased/<cell>` : written by the leader the first time it sees the
/// cell hold an ownership lease; only such cells are failed over automatically (a cell
/// whose app never took one cannot be shown fenced). Survives leader changes.
pub fn leased_key(platform: &str, cell: &str) -> String {
    format!("/cellplane/{platform}/leased/{cell}")
}

/// `/cellplane/<platform>/leased/`
pub fn leased_prefix(platform: &str) -> String {
    format!("/cellplane/{platform}/leased/")
}

/// `/cellplane/<platform>/owners/` : prefix of every ownership lease.
pub fn all_owners_prefix(platform: &str) -> String {
    format!("/cellplane/{platform}/owners/")
}

/// `/cellplane/<platform>/replay/<cell>/` : the replay of a failed-over cell's orders,
/// acknowledged on its own Kafka but maybe never persisted where its users are now served.
pub fn replay_prefix(platform: &str, cell: &str) -> String {
    format!("/cellplane/{platform}/replay/{cell}/")
}

/// `.../replay/<cell>/orders/` : one key per order the old home's app forwarded; the app of
/// the cell now serving its users persists each (idempotent by order id) and deletes it.
pub fn replay_orders_prefix(platform: &str, cell: &str) -> String {
    format!("{}orders/", replay_prefix(platform, cell))
}

/// `.../replay/<cell>/sent` : [`ReplaySent`], written by the old home's app when it has
/// forwarded everything.
pub fn replay_sent_key(platform: &str, cell: &str) -> String {
    format!("{}sent", replay_prefix(platform, cell))
}

/// `.../replay/<cell>/applied` : [`ReplayApplied`], kept by the apps persisting them.
pub fn replay_applied_key(platform: &str, cell: &str) -> String {
    format!("{}applied", replay_prefix(platform, cell))
}

/// What an old home's app forwarded after its cell failed over.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct ReplaySent {
    /// The table epoch at which the app saw its cell failed over (>= the flip's).
    pub epoch: u64,
    /// Orders forwarded.
    pub forwarded: u64,
    /// Orders on the log that had been voided (their clients were told "refused").
    pub void_skipped: u64,
    /// The log's offsets read, `[from, to)`.
    pub from_offset: i64,
    pub to_offset: i64,
    pub at_ms: u64,
}

/// What the serving cell's apps did with the forwarded orders of one replay.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct ReplayApplied {
    /// The replay's [`ReplaySent::epoch`].
    pub epoch: u64,
    /// Written now: acknowledged orders that were missing.
    pub persisted: u64,
    /// Already there (persisted before the cut and replicated).
    pub duplicates: u64,
    /// Voided where they are served now: not written.
    pub voided: u64,
}

/// What a Ready cell publishes under [`cell_key`].
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct Registration {
    pub region: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub zone: Option<String>,
    pub state: CellPhase,
    pub capacity_weight: u32,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub standby: Option<String>,
    /// Named endpoints, e.g. `app` -> `shop-us-0-app.ns.svc:8080`.
    pub endpoints: BTreeMap<String, String>,
    /// True when registered; then what the region's agent measures: the cell's app
    /// answers `/readyz` (its three stores and a table).
    pub healthy: bool,
    /// The cell's MySQL as its region's operator last saw it (None: not measured yet).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mysql: Option<MysqlReport>,
    /// Messages the cell's order persister has not consumed yet (None: not measured).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kafka_lag: Option<u64>,
    /// Requests for users the cell's app served per second over the last minute (None:
    /// not measured yet): the load a switchover moves to the standby.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub requests_per_sec: Option<u64>,
    /// The generation of the cell's intent that its region has carried out (0: none).
    #[serde(default)]
    pub intent_generation: u64,
    /// Since when (ms since the Unix epoch) the cell has been healthy without a break, as
    /// its region measures it; a region cut off from the global etcd starts it again. A
    /// failback after an unplanned failover waits for a stabilization window of it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub healthy_since_ms: Option<u64>,
}

/// A cell's MySQL: its own position and role, and each replication connection it runs
/// (named after the cell it replicates).
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct MysqlReport {
    pub read_only: bool,
    pub gtid_binlog_pos: String,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub replicas: BTreeMap<String, ReplicaReport>,
    /// The last rebuild its region carried out or is carrying out (see
    /// [`Intent::rebuild_from`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rebuild: Option<RebuildReport>,
    /// The last slot move into this cell its region carried out or carries out (see
    /// [`Intent::slot_move`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub slot_move: Option<MoveReport>,
    /// The last deletion of this cell's copies of slots moved away (see
    /// [`Intent::retire`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retired: Option<RetireReport>,
}

/// How a cell's MySQL rebuild went, as its region reports it.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct RebuildReport {
    /// The operation whose intent asked for it.
    pub operation: String,
    /// The cell it was rebuilt from.
    pub source: String,
    /// Transactions the old position had that the source lacked, exported before anything
    /// was dropped.
    pub errant_transactions: u64,
    /// Where they were exported (a file on the region operator's export volume).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub export_file: String,
    /// The source's position at the snapshot: the rebuilt server's position.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub cloned_at: String,
    /// Rows copied.
    #[serde(default)]
    pub rows: u64,
    /// Finished (with `error` empty: rebuilt).
    pub done: bool,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub error: String,
}

#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct ReplicaReport {
    /// Both replication threads run.
    pub running: bool,
    pub gtid_slave_pos: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub seconds_behind: Option<u64>,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub error: String,
}

/// `/cellplane/<platform>/intents/<cell>` : what the leader wants of a cell's MySQL; the
/// cell's region carries it out and reports the generation it applied.
pub fn intent_key(platform: &str, cell: &str) -> String {
    format!("/cellplane/{platform}/intents/{cell}")
}

/// `/cellplane/<platform>/intents/` : prefix of every intent.
pub fn intents_prefix(platform: &str) -> String {
    format!("/cellplane/{platform}/intents/")
}

/// `/cellplane/<platform>/drills/` : prefix of every operation record.
pub fn drills_prefix(platform: &str) -> String {
    format!("/cellplane/{platform}/drills/")
}

/// The leader's wish for one cell's MySQL.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct Intent {
    /// Grows with every change; the region reports the one it carried out.
    pub generation: u64,
    /// false: fenced (`read_only`, the app's sessions killed).
    pub writable: bool,
    /// The cells whose writes this cell's MySQL replicates, one named connection each:
    /// the home it stands by for, and after a switchover the new home of its own slots.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub replicate_from: Vec<String>,
    /// The operation that asked for it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub operation: Option<String>,
    /// Rebuild this cell's MySQL from that cell's (an old home that returned with errant
    /// transactions after an emergency failover): export the errant transactions to a
    /// file, copy the cell schemas from a consistent snapshot of the new home, and take
    /// the snapshot's position, so it can replicate from the new home again.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rebuild_from: Option<String>,
    /// Copy some slots' rows from another cell into this one and keep them in step, then
    /// sync them at the cut-over (a slot move whose target this cell is).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub slot_move: Option<Box<MoveOrder>>,
    /// Delete this cell's copies of slots moved away.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retire: Option<Box<RetireOrder>>,
}

/// What a router publishes under [`router_key`]: the table it routes with.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct RouterAck {
    pub region: String,
    /// Epoch of the table in use (0: none yet).
    pub applied_epoch: u64,
    /// When it was applied, in milliseconds since the Unix epoch.
    pub applied_at_ms: u64,
    /// Requests the router had held for frozen cells when it applied the epoch (a
    /// counter): the leader reports the growth over a freeze.
    #[serde(default)]
    pub held_total: u64,
    /// Of those, the ones answered 503 because the hold timed out (a counter).
    #[serde(default)]
    pub hold_timeouts_total: u64,
    /// Cells whose every endpoint this router sees down (ejected): with two other regions'
    /// routers agreeing, a cell without an ownership lease is lost.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub down: Vec<String>,
    /// The last outage each cell's users saw through this router (by the cell whose data
    /// they are: a failover does not change it): the RTO as clients see it.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub outages: BTreeMap<String, Outage>,
    /// What each cell answered through this router over its last traffic window (by the
    /// cell that answered): the request and error rates on the topology page.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub traffic: BTreeMap<String, CellTraffic>,
}

/// Responses a cell gave through one router in one window.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct CellTraffic {
    pub requests: u64,
    /// Of those, 5xx answers.
    pub errors: u64,
    pub window_ms: u64,
}

/// A run of failed requests (5xx, the router's own included) for one cell's users, ended
/// by the first one served again.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct Outage {
    /// When the first and the last failed request were answered (ms since the Unix epoch).
    pub first_failed_ms: u64,
    pub last_failed_ms: u64,
    pub failed_requests: u64,
    /// When the first request after them was served (None: still failing).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub recovered_at_ms: Option<u64>,
}

/// What an app process keeps under its ownership lease key (`owners/<cell>/<lease>`): how
/// far it has drained. `drained_epoch` is the table epoch it follows, or the epoch a request
/// it still runs was admitted at, whichever is older: once it is at a slot move's freeze
/// epoch, no write the process admitted before the freeze is still running, so the move's
/// final catch-up misses none. Early versions wrote the cell's name: read as 0.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct OwnerLeaseValue {
    #[serde(default)]
    pub drained_epoch: u64,
}

impl OwnerLeaseValue {
    pub fn encode(&self) -> Vec<u8> {
        serde_json::to_vec(self).expect("serializes")
    }

    /// Any other value (an early version's cell name) has drained nothing.
    pub fn decode(bytes: &[u8]) -> Self {
        serde_json::from_slice(bytes).unwrap_or_default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layout_matches_design() {
        assert_eq!(
            cell_key("shop", "shop-us-0"),
            "/cellplane/shop/cells/shop-us-0"
        );
        assert!(cell_key("shop", "x").starts_with(&cells_prefix("shop")));
        assert!(cells_prefix("shop").starts_with(&platform_prefix("shop")));
        assert_eq!(routing_key("shop"), "/cellplane/shop/routing");
        assert_eq!(drill_key("shop", "7"), "/cellplane/shop/drills/7");
        assert_eq!(
            routing_history_key("shop", 42),
            "/cellplane/shop/routing-history/00000000000000000042"
        );
        assert!(routing_history_key("shop", 9) < routing_history_key("shop", 10));
        assert!(router_key("shop", "r1").starts_with(&routers_prefix("shop")));
        assert_eq!(leader_election("shop"), "/cellplane/shop/leader");
        assert_eq!(pins_key("shop"), "/cellplane/shop/pins");
    }

    #[test]
    fn owner_lease_values_round_trip_and_old_ones_read_as_undrained() {
        let v = OwnerLeaseValue { drained_epoch: 42 };
        assert_eq!(OwnerLeaseValue::decode(&v.encode()), v);
        assert_eq!(
            String::from_utf8(v.encode()).unwrap(),
            r#"{"drainedEpoch":42}"#
        );
        assert_eq!(OwnerLeaseValue::decode(b"shop-us-0").drained_epoch, 0);
    }
}
