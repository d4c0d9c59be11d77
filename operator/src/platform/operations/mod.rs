//! Operations (pure): the multi-step changes the platform leader carries out, each kind in
//! its own module of the same shape (STYLE.md, "Rooms for operations"): a persisted record
//! ([`record`]), one step at a time as `advance(record, observed, now) -> (record,
//! actions)`, its gates, and its step list as data ([`Kind::steps`]) for the reports, the
//! CLI and the page. The leader's driver (`leader::driver`) persists the next record with a
//! compare-and-swap before it carries out the actions, so a new leader picks an operation
//! up where the old one stopped; every step looks at the world before it acts, so running a
//! step twice changes nothing.
//!
//! The kinds: [`switchover`] (planned, zero loss), [`failback`] (the way back),
//! [`emergency`] (an unplanned failover of a lost cell), and [`batch`] (a region's drain or
//! failback in waves of the others). [`gates`] holds the preflight every kind on one cell
//! passes; [`report`] prints records for people.

pub mod batch;
pub mod emergency;
pub mod failback;
pub mod gates;
pub mod record;
pub mod report;
pub mod slot_move;
pub mod switchover;
#[cfg(test)]
pub(crate) mod test_world;

pub use batch::Batch;
pub use emergency::{last_losses, lost, Loss, ReplayState};
pub use record::{Kind, Limits, Outcome, Step, StepRecord, Switchover, DEFAULT_STABILIZATION_MS};
pub use slot_move::{MoveLimits, SlotMove};

use cellplane_cells::crd::CellPhase;
use cellplane_cells::etcd_keys::{Intent, Registration, RouterAck};
use cellplane_cells::routing::RoutingTable;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

/// What `drills/<id>` holds, tagged by `type`: one cell's switchover, failback or
/// unplanned failover (its `kind`), or a batch of them.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(tag = "type", rename_all = "camelCase")]
pub enum Operation {
    Switchover(Switchover),
    Batch(Batch),
    SlotMove(SlotMove),
}

/// The tagged form, and the untagged records written before the tag (a batch is the one
/// with `waveSize`), so an upgrade reads the records a running platform already has.
impl<'de> Deserialize<'de> for Operation {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        use serde::de::Error as _;
        let mut value = serde_json::Value::deserialize(d)?;
        let tag = match value.as_object_mut() {
            Some(fields) => fields.remove("type"),
            None => return Err(D::Error::custom("an operation record is a JSON object")),
        };
        let tag = match tag.as_ref().map(|t| t.as_str()) {
            Some(Some(t @ ("batch" | "switchover" | "slotMove"))) => t,
            Some(other) => {
                return Err(D::Error::custom(format!(
                    "unknown operation type {other:?}; expected \"switchover\", \"batch\" or \"slotMove\""
                )))
            }
            None if value.get("waveSize").is_some() => "batch",
            None => "switchover",
        };
        match tag {
            "batch" => serde_json::from_value(value).map(Operation::Batch),
            "slotMove" => serde_json::from_value(value).map(Operation::SlotMove),
            _ => serde_json::from_value(value).map(Operation::Switchover),
        }
        .map_err(D::Error::custom)
    }
}

impl Operation {
    pub fn id(&self) -> &str {
        match self {
            Operation::Batch(b) => &b.id,
            Operation::Switchover(s) => &s.id,
            Operation::SlotMove(m) => &m.id,
        }
    }

    pub fn finished(&self) -> bool {
        match self {
            Operation::Batch(b) => b.outcome.is_some(),
            Operation::Switchover(s) => s.finished(),
            Operation::SlotMove(m) => m.finished(),
        }
    }
}

/// What the leader sees when it advances an operation.
pub struct Observed<'a> {
    pub now_ms: u64,
    pub table: &'a RoutingTable,
    /// Live registrations by cell.
    pub cells: &'a BTreeMap<String, Registration>,
    /// Live routers' acknowledgements.
    pub routers: &'a BTreeMap<String, RouterAck>,
    /// The intents in force by cell.
    pub intents: &'a BTreeMap<String, Intent>,
    /// Live ownership leases by cell (`owners/<cell>/`).
    pub owners: &'a BTreeMap<String, usize>,
    /// By cell, the lowest epoch its apps say they have drained (every write admitted
    /// under an older table has ended): a slot move's cut-over waits for its freeze's.
    pub drained: &'a BTreeMap<String, u64>,
    /// Another unfinished operation touches the cell or its standby.
    pub busy: bool,
    /// What the records and etcd say beyond the registrations.
    pub recent: &'a Recent,
}

/// What the leader (or the CLI) knows beyond the registrations: from etcd, the replays of
/// failed-over cells' orders (read for operations at `Rejoin` only); from the records,
/// when each cell whose slots an unplanned failover moved last was found lost.
#[derive(Clone, Debug, Default)]
pub struct Recent {
    pub replays: BTreeMap<String, ReplayState>,
    pub lost_at_ms: BTreeMap<String, u64>,
}

/// What the leader must do after persisting the next record.
#[derive(Clone, Debug, PartialEq)]
pub enum Action {
    /// Compare-and-swap the table.
    WriteTable(Box<RoutingTable>),
    /// Put the cell's intent.
    WriteIntent { cell: String, intent: Intent },
}

/// Advances `op` by at most one step: the unplanned failover's own steps in [`emergency`],
/// every other step in [`switchover`] (the failback's too, with the roles swapped).
pub fn advance(op: &Switchover, obs: &Observed) -> (Switchover, Vec<Action>) {
    match (op.kind, op.step) {
        (_, Step::Done) => (op.clone(), Vec::new()),
        (Kind::Emergency, Step::Freeze | Step::Expire | Step::Rejoin) => {
            emergency::advance(op, obs)
        }
        _ => switchover::advance(op, obs),
    }
}

/// The switchover of `cell` to its standby, or the failback of `cell` from the cell that
/// serves its slots, as the table pairs them; or why there is none (naming the fix).
pub fn operation_for(
    kind: Kind,
    t: &RoutingTable,
    cell: &str,
    id: &str,
    started_by: &str,
    limits: &Limits,
    now_ms: u64,
) -> Result<Switchover, String> {
    let Some(entry) = t.cell(cell) else {
        let known: Vec<&str> = t.cells.iter().map(|c| c.name.as_str()).collect();
        return Err(format!(
            "unknown cell {cell:?}; the table has {}",
            known.join(", ")
        ));
    };
    match kind {
        Kind::Emergency => Err(format!(
            "{cell}: an unplanned failover is started for one lost cell (`cellplane failover {cell} --emergency`), not in waves"
        )),
        Kind::Switchover => {
            let standby = entry.standby.as_deref().ok_or_else(|| {
                format!("{cell} has no standby; pair it (CellSets pair every cell with one in the next region)")
            })?;
            Ok(Switchover::new(
                id,
                cell,
                standby,
                started_by,
                limits.clone(),
                now_ms,
            ))
        }
        Kind::Failback => {
            if entry.state != CellPhase::FailedOver {
                return Err(format!(
                    "{cell} is {:?}, not failed over; there is nothing to fail back",
                    entry.state
                ));
            }
            let source = t.serving_for(cell).ok_or_else(|| {
                format!("no cell serves {cell}'s slots; there is nothing to fail back")
            })?;
            Ok(Switchover::failback(
                id,
                cell,
                &source.name,
                started_by,
                limits.clone(),
                now_ms,
            ))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_are_tagged_and_untagged_ones_still_read() {
        let op = Switchover::new("s-1", "a", "b", "me", Limits::default(), 5);
        let json = serde_json::to_value(Operation::Switchover(op.clone())).unwrap();
        assert_eq!(json["type"], "switchover");
        assert_eq!(
            serde_json::from_value::<Operation>(json).unwrap(),
            Operation::Switchover(op.clone())
        );
        // A record written before the tag.
        let legacy = serde_json::to_value(&op).unwrap();
        assert!(legacy.get("type").is_none());
        assert_eq!(
            serde_json::from_value::<Operation>(legacy).unwrap(),
            Operation::Switchover(op)
        );
        let bad = serde_json::json!({"type": "reshard", "id": "x"});
        let err = serde_json::from_value::<Operation>(bad)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("unknown operation type") && err.contains("reshard"),
            "{err}"
        );
    }
}
