//! A drain (every serving cell of a region, or one cell, switched over to its standby) or a
//! failback of a region (every failed-over cell of it brought back), in waves: pure, like
//! the switchover it is made of. The batch record lives beside its members in `drills/`;
//! each pass the leader looks at the members and either waits, starts the next wave (new
//! member records), or finishes. A member that does not succeed stops the batch: the cells
//! of later waves stay where they are, and the report says which member failed and why.

use super::operation_for;
use super::record::{Kind, Limits, Outcome, Switchover};
use cellplane_cells::crd::CellPhase;
use cellplane_cells::routing::{serves_traffic, RoutingTable};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", tag = "result")]
pub enum BatchOutcome {
    /// Every cell moved.
    Succeeded,
    /// A member did not succeed; the batch stopped there.
    Stopped { member: String, reason: String },
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Batch {
    pub id: String,
    /// `Switchover` for a drain, `Failback` for a failback.
    pub kind: Kind,
    /// What was asked for, for the report (`region us-east`, `cell shop-us-0`).
    pub scope: String,
    /// The cells to move, in order.
    pub cells: Vec<String>,
    /// Most cells moving at once.
    pub wave_size: usize,
    pub started_by: String,
    pub limits: Limits,
    pub started_ms: u64,
    /// Member operation ids, in the order they were started; wave `n` is
    /// `waves[n]` of them.
    #[serde(default)]
    pub members: Vec<String>,
    #[serde(default)]
    pub waves: Vec<usize>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ended_ms: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub outcome: Option<BatchOutcome>,
}

/// The cells a drain or failback of `region` moves (sorted by name), or why there are none.
pub fn cells_of_region(t: &RoutingTable, kind: Kind, region: &str) -> Result<Vec<String>, String> {
    let in_region: Vec<_> = t.cells.iter().filter(|c| c.region == region).collect();
    if in_region.is_empty() {
        let regions: std::collections::BTreeSet<&str> =
            t.cells.iter().map(|c| c.region.as_str()).collect();
        let regions: Vec<&str> = regions.into_iter().collect();
        return Err(format!(
            "no cell of the table is in region {region:?}; regions: {}",
            regions.join(", ")
        ));
    }
    let mut cells: Vec<String> = in_region
        .iter()
        .filter(|c| match kind {
            Kind::Switchover | Kind::Emergency => {
                serves_traffic(c.state) && t.slot_count(&c.name) > 0
            }
            Kind::Failback => c.state == CellPhase::FailedOver,
        })
        .map(|c| c.name.clone())
        .collect();
    cells.sort();
    if cells.is_empty() {
        return Err(match kind {
            Kind::Switchover | Kind::Emergency => {
                format!("region {region} serves no slots; nothing to drain")
            }
            Kind::Failback => {
                format!("no cell of region {region} is failed over; nothing to fail back")
            }
        });
    }
    Ok(cells)
}

/// Whether `op` must wait for an unfinished batch started before it (a batch's own members
/// excepted): one the batch will start touches a cell of `op`. A batch's members are
/// created wave by wave, so until then only the batch says which cells it will move.
pub fn blocked_by_batches(op: &Switchover, batches: &[Batch], t: &RoutingTable) -> bool {
    let started = |b: &Batch| b.started_ms;
    let op_started = batches
        .iter()
        .find(|b| op.parent.as_deref() == Some(b.id.as_str()))
        .map_or(op.step_started_ms, started);
    batches
        .iter()
        .filter(|b| b.outcome.is_none() && op.parent.as_deref() != Some(b.id.as_str()))
        .filter(|b| started(b) <= op_started)
        .any(|b| {
            let claims = b.claims(t);
            op.cells().iter().any(|c| claims.contains(*c))
        })
}

impl Batch {
    /// Every cell the batch's members will touch: its cells and, for each, the cell it
    /// moves to or from.
    pub fn claims(&self, t: &RoutingTable) -> std::collections::BTreeSet<String> {
        let mut out = std::collections::BTreeSet::new();
        for cell in &self.cells {
            out.insert(cell.clone());
            let other = match self.kind {
                Kind::Failback => t.serving_for(cell).map(|c| c.name.clone()),
                _ => t.cell(cell).and_then(|c| c.standby.clone()),
            };
            out.extend(other);
        }
        out
    }

    #[allow(clippy::too_many_arguments)]
    pub fn new(
        id: &str,
        kind: Kind,
        scope: &str,
        cells: Vec<String>,
        wave_size: usize,
        started_by: &str,
        limits: Limits,
        now_ms: u64,
    ) -> Self {
        Self {
            id: id.into(),
            kind,
            scope: scope.into(),
            cells,
            wave_size: wave_size.max(1),
            started_by: started_by.into(),
            limits,
            started_ms: now_ms,
            members: Vec::new(),
            waves: Vec::new(),
            ended_ms: None,
            outcome: None,
        }
    }

    /// The id of the member operation that moves `cell`.
    pub fn member_id(&self, cell: &str) -> String {
        format!("{}-{cell}", self.id)
    }

    /// Write-freeze of each finished member, by cell, for the report.
    pub fn freezes<'a>(
        &self,
        members: &'a BTreeMap<String, Switchover>,
    ) -> Vec<(&'a str, Option<u64>)> {
        self.members
            .iter()
            .filter_map(|id| members.get(id))
            .map(|m| (m.cell.as_str(), m.write_freeze_ms()))
            .collect()
    }
}

/// Advances `batch`: waits for the running wave, stops at a failed member, starts the
/// next wave (returned as new member records to create), or finishes.
pub fn advance(
    batch: &Batch,
    members: &BTreeMap<String, Switchover>,
    table: &RoutingTable,
    now_ms: u64,
) -> (Batch, Vec<Switchover>) {
    let mut next = batch.clone();
    if batch.outcome.is_some() {
        return (next, Vec::new());
    }
    // A member whose record is not there yet (its creation is in flight) counts as running.
    let mut running = false;
    for id in &batch.members {
        match members.get(id).and_then(|m| m.outcome.as_ref()) {
            None => running = true,
            Some(Outcome::Succeeded { .. }) => {}
            Some(other) => {
                let reason = match other {
                    Outcome::Refused { gate, message } => {
                        format!("refused by the {gate} gate: {message}")
                    }
                    Outcome::RolledBack { step, reason } => {
                        format!("rolled back at {step:?}: {reason}")
                    }
                    Outcome::Succeeded { .. } => unreachable!(),
                };
                next.outcome = Some(BatchOutcome::Stopped {
                    member: id.clone(),
                    reason,
                });
                next.ended_ms = Some(now_ms);
                return (next, Vec::new());
            }
        }
    }
    if running {
        return (next, Vec::new());
    }
    let remaining = &batch.cells[batch.members.len()..];
    if remaining.is_empty() {
        next.outcome = Some(BatchOutcome::Succeeded);
        next.ended_ms = Some(now_ms);
        return (next, Vec::new());
    }
    // The next wave: up to wave_size cells in order, none sharing a cell with another
    // member of the wave (two cells with one standby move in different waves).
    let mut wave: Vec<Switchover> = Vec::new();
    for cell in remaining.iter().take(batch.wave_size) {
        let member = match member_for(batch, cell, table, now_ms) {
            Ok(m) => m,
            Err(reason) => {
                if wave.is_empty() {
                    next.outcome = Some(BatchOutcome::Stopped {
                        member: batch.member_id(cell),
                        reason,
                    });
                    next.ended_ms = Some(now_ms);
                    return (next, Vec::new());
                }
                break;
            }
        };
        if wave
            .iter()
            .any(|w| w.cells().iter().any(|c| member.cells().contains(c)))
        {
            break;
        }
        wave.push(member);
    }
    next.members.extend(wave.iter().map(|m| m.id.clone()));
    next.waves.push(wave.len());
    (next, wave)
}

fn member_for(
    batch: &Batch,
    cell: &str,
    t: &RoutingTable,
    now_ms: u64,
) -> Result<Switchover, String> {
    let mut op = operation_for(
        batch.kind,
        t,
        cell,
        &batch.member_id(cell),
        &batch.started_by,
        &batch.limits,
        now_ms,
    )?;
    op.parent = Some(batch.id.clone());
    Ok(op)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::platform::operations::Operation;
    use cellplane_cells::routing::CellEntry;

    /// Region us has u0, u1 (standbys e0, e1); eu has e0, e1 (standbys u0, u1).
    fn table() -> RoutingTable {
        let cells = [
            ("u0", "us", "e0"),
            ("u1", "us", "e1"),
            ("e0", "eu", "u0"),
            ("e1", "eu", "u1"),
        ]
        .map(|(n, r, s)| {
            let mut e = CellEntry::active(n, r, vec![format!("{n}:1")]);
            e.standby = Some(s.into());
            (e, 1)
        })
        .to_vec();
        RoutingTable::placed("p", 1, 256, cells).unwrap()
    }

    fn done(op: &Switchover, outcome: Outcome) -> Switchover {
        let mut d = op.clone();
        d.outcome = Some(outcome);
        d.step = super::super::record::Step::Done;
        d
    }

    /// A switchover started while a drain has not started the member that touches its
    /// cells must wait (it once ran alongside and could not flip after its promotion);
    /// the drain's own members, other cells and batches started later do not block it.
    #[test]
    fn an_operation_waits_for_a_batch_that_will_touch_its_cells() {
        let t = table();
        let drain = Batch::new(
            "d1",
            Kind::Switchover,
            "region us",
            vec!["u0".into(), "u1".into()],
            1,
            "sre",
            Limits::default(),
            1_000,
        );
        let batches = [drain.clone()];
        let so = |cell: &str, standby: &str, at: u64| {
            Switchover::new("so", cell, standby, "sre", Limits::default(), at)
        };
        assert!(
            blocked_by_batches(&so("e0", "u0", 2_000), &batches, &t),
            "e0 -> u0 meets the drain of u0"
        );
        assert!(blocked_by_batches(&so("e1", "u1", 2_000), &batches, &t));
        let mut member = so("u0", "e0", 2_000);
        member.parent = Some("d1".into());
        assert!(!blocked_by_batches(&member, &batches, &t), "its own member");
        assert!(
            !blocked_by_batches(&so("e0", "u0", 500), &batches, &t),
            "started before the drain"
        );
        let mut finished = drain.clone();
        finished.outcome = Some(BatchOutcome::Succeeded);
        assert!(!blocked_by_batches(&so("e0", "u0", 2_000), &[finished], &t));
        // A failback of a region claims the cells serving its cells' slots.
        let t2 = t.failed_over("u0").unwrap();
        let fb = Batch::new(
            "f1",
            Kind::Failback,
            "region us",
            vec!["u0".into()],
            1,
            "sre",
            Limits::default(),
            1_000,
        );
        assert!(fb.claims(&t2).contains("e0"));
    }

    #[test]
    fn a_region_drains_in_waves_and_stops_at_the_first_failure() {
        let t = table();
        let cells = cells_of_region(&t, Kind::Switchover, "us").unwrap();
        assert_eq!(cells, ["u0", "u1"]);
        let b = Batch::new(
            "d1",
            Kind::Switchover,
            "region us",
            cells,
            1,
            "t",
            Limits::default(),
            0,
        );
        let (b, wave) = advance(&b, &BTreeMap::new(), &t, 1);
        assert_eq!(wave.len(), 1);
        assert_eq!(
            (wave[0].cell.as_str(), wave[0].target.as_str()),
            ("u0", "e0")
        );
        assert_eq!(wave[0].parent.as_deref(), Some("d1"));
        // While the member runs, nothing new starts.
        let mut members = BTreeMap::from([(wave[0].id.clone(), wave[0].clone())]);
        let (b2, none) = advance(&b, &members, &t, 2);
        assert!(none.is_empty());
        assert_eq!(b2, b);
        // It succeeded: the second wave.
        members.insert(
            wave[0].id.clone(),
            done(&wave[0], Outcome::Succeeded { warnings: vec![] }),
        );
        let (b, wave2) = advance(&b, &members, &t, 3);
        assert_eq!(wave2[0].cell, "u1");
        assert_eq!(b.waves, [1, 1]);
        // It rolled back: the batch stops and says why.
        members.insert(
            wave2[0].id.clone(),
            done(
                &wave2[0],
                Outcome::RolledBack {
                    step: super::super::record::Step::CatchUp,
                    reason: "lag".into(),
                },
            ),
        );
        let (b, none) = advance(&b, &members, &t, 4);
        assert!(none.is_empty());
        match b.outcome {
            Some(BatchOutcome::Stopped { member, reason }) => {
                assert_eq!(member, "d1-u1");
                assert!(reason.contains("rolled back at CatchUp"), "{reason}");
            }
            other => panic!("{other:?}"),
        }
        assert_eq!(b.ended_ms, Some(4));
    }

    #[test]
    fn a_wave_never_holds_two_members_sharing_a_cell_and_a_batch_ends() {
        let mut t = table();
        // Both us cells stand by on e0.
        let i = t.index_of("u1").unwrap();
        t.cells[i].standby = Some("e0".into());
        let cells = cells_of_region(&t, Kind::Switchover, "us").unwrap();
        let b = Batch::new(
            "d",
            Kind::Switchover,
            "region us",
            cells,
            8,
            "t",
            Limits::default(),
            0,
        );
        let (b, wave) = advance(&b, &BTreeMap::new(), &t, 1);
        assert_eq!(wave.len(), 1, "u1 waits for u0: they share e0");
        let members: BTreeMap<_, _> = wave
            .iter()
            .map(|w| {
                (
                    w.id.clone(),
                    done(w, Outcome::Succeeded { warnings: vec![] }),
                )
            })
            .collect();
        let (b, wave) = advance(&b, &members, &t, 2);
        assert_eq!(wave[0].cell, "u1");
        let mut members = members;
        members.insert(
            wave[0].id.clone(),
            done(&wave[0], Outcome::Succeeded { warnings: vec![] }),
        );
        let (b, none) = advance(&b, &members, &t, 3);
        assert!(none.is_empty());
        assert_eq!(b.outcome, Some(BatchOutcome::Succeeded));
        // The record round-trips as an operation, distinct from a switchover.
        let json = serde_json::to_vec(&Operation::Batch(b.clone())).unwrap();
        assert_eq!(
            serde_json::from_slice::<Operation>(&json).unwrap(),
            Operation::Batch(b)
        );
        let so = members.values().next().unwrap().clone();
        let json = serde_json::to_vec(&so).unwrap();
        assert_eq!(
            serde_json::from_slice::<Operation>(&json).unwrap(),
            Operation::Switchover(so)
        );
    }

    #[test]
    fn a_region_fails_back_its_failed_over_cells_from_whoever_serves_them() {
        let t = table()
            .failed_over("u0")
            .unwrap()
            .failed_over("u1")
            .unwrap();
        assert!(cells_of_region(&t, Kind::Switchover, "us")
            .unwrap_err()
            .contains("serves no slots"));
        let cells = cells_of_region(&t, Kind::Failback, "us").unwrap();
        let b = Batch::new(
            "f",
            Kind::Failback,
            "region us",
            cells,
            2,
            "t",
            Limits::default(),
            0,
        );
        let (_, wave) = advance(&b, &BTreeMap::new(), &t, 1);
        let pairs: Vec<(&str, &str, &str)> = wave
            .iter()
            .map(|w| (w.cell.as_str(), w.source.as_str(), w.target.as_str()))
            .collect();
        assert_eq!(pairs, [("u0", "e0", "u0"), ("u1", "e1", "u1")]);
        assert!(wave.iter().all(|w| w.kind == Kind::Failback));
        assert!(cells_of_region(&t, Kind::Failback, "mars")
            .unwrap_err()
            .contains("regions: eu, us"));
        assert!(cells_of_region(&table(), Kind::Failback, "eu")
            .unwrap_err()
            .contains("nothing to fail back"));
    }
}
