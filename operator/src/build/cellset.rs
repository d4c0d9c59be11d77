//! CellSet -> the Cells it stamps out, its placement and its status. Pure.

use super::{names, FIELD_MANAGER};
use crate::status::{set_condition, set_refused, Readiness};
use crate::{Error, Result};
use cellplane_cells::crd::{condition, Cell, CellPhase, CellSet, CellSetPhase, CellSetStatus};
use cellplane_cells::placement::{place, Placement, WeightedCell};
use cellplane_cells::slot::DEFAULT_SLOTS;
use kube::{Resource, ResourceExt};
use std::collections::BTreeMap;

/// The Cell objects `set` wants in this operator's scope (`region`; None: every region).
pub fn desired_cells(set: &CellSet, region: Option<&str>) -> Result<Vec<Cell>> {
    let name = set.name_any();
    let unknown = set.spec.unknown_overrides(&name);
    if !unknown.is_empty() {
        return Err(Error::InvalidSpec(format!(
            "spec.overrides names {} but this set stamps no such cell (cells are named <set>-<region>-<index>, e.g. {name}-{}-0)",
            unknown.join(", "),
            set.spec.regions.first().map_or("us", |r| r.name.as_str())
        )));
    }
    let owner = set
        .controller_owner_ref(&())
        .ok_or(Error::MissingField("metadata.uid"))?;
    Ok(set
        .spec
        .stamp(&name)
        .into_iter()
        .filter(|c| region.is_none_or(|r| r == c.spec.region))
        .map(|c| {
            let mut cell = Cell::new(&c.name, c.spec);
            cell.metadata.namespace = set.namespace();
            cell.metadata.owner_references = Some(vec![owner.clone()]);
            cell.metadata.labels = Some(BTreeMap::from([
                (names::LABEL_CELLSET.to_string(), name.clone()),
                (
                    "app.kubernetes.io/managed-by".to_string(),
                    FIELD_MANAGER.to_string(),
                ),
            ]));
            cell
        })
        .collect())
}

/// The placement over every region's cells (the placement is global); None without cells.
pub fn placement(set: &CellSet) -> Result<Option<Placement>> {
    let cells: Vec<WeightedCell> = set
        .spec
        .stamp(&set.name_any())
        .into_iter()
        .map(|c| WeightedCell::new(c.name, c.spec.capacity_weight))
        .collect();
    if cells.is_empty() {
        return Ok(None);
    }
    place(&cells, DEFAULT_SLOTS)
        .map(Some)
        .map_err(|e| Error::InvalidSpec(e.to_string()))
}

/// Slots per cell.
pub fn placement_counts(set: &CellSet) -> Result<BTreeMap<String, u32>> {
    Ok(placement(set)?.map(|p| p.counts()).unwrap_or_default())
}

/// The set's next status once its cells are applied: `desired` cells in scope, the
/// placement's `slots`, and the cells that exist now (counted when Ready). A changed
/// placement is a new epoch (every change of ownership bumps it).
pub fn status(
    set: &CellSet,
    desired: usize,
    slots: BTreeMap<String, u32>,
    existing: &[Cell],
    now: &str,
) -> CellSetStatus {
    let previous = set.status.clone().unwrap_or_default();
    let epoch = if previous.slots != slots {
        previous.epoch + 1
    } else {
        previous.epoch
    };
    let ready_cells = existing
        .iter()
        .filter(|c| {
            c.status.as_ref().is_some_and(|s| {
                s.conditions
                    .iter()
                    .any(|k| k.type_ == condition::READY && k.status == "True")
            })
        })
        .count() as u32;
    // A stamped cell that cannot be built fails the set: its person applied the set.
    let failed: Vec<String> = existing
        .iter()
        .filter(|c| c.status.as_ref().and_then(|s| s.phase) == Some(CellPhase::Failed))
        .map(|c| {
            let why = c.status.as_ref().and_then(|s| {
                s.conditions
                    .iter()
                    .find(|k| k.type_ == condition::READY)
                    .map(|k| k.message.clone())
            });
            format!("Cell {}: {}", c.name_any(), why.unwrap_or_default())
        })
        .collect();
    let ready = if !failed.is_empty() {
        Readiness {
            ready: false,
            reason: "CellsFailed",
            message: failed.join("; "),
        }
    } else if ready_cells as usize >= desired {
        Readiness {
            ready: true,
            reason: "AllCellsReady",
            message: format!("{desired} of {desired} cells Ready"),
        }
    } else {
        Readiness {
            ready: false,
            reason: "CellsNotReady",
            message: format!("{ready_cells} of {desired} cells Ready"),
        }
    };
    let mut conditions = previous.conditions;
    set_condition(
        &mut conditions,
        condition::READY,
        &ready,
        set.metadata.generation,
        now,
    );
    CellSetStatus {
        phase: Some(if failed.is_empty() {
            CellSetPhase::Active
        } else {
            CellSetPhase::Failed
        }),
        conditions,
        cells: desired as u32,
        ready_cells,
        epoch,
        slots,
        observed_generation: set.metadata.generation,
    }
}

/// The status of a set whose cells cannot be applied: phase Failed, `Ready=False` with
/// `reason` (`InvalidSpec` or `ApplyFailed`) and the message naming what to fix; the rest
/// of the status (placement, counts) stays as it was.
pub fn failed(set: &CellSet, reason: &'static str, message: &str, now: &str) -> CellSetStatus {
    let mut next = set.status.clone().unwrap_or_default();
    let generation = set.metadata.generation;
    set_refused(
        &mut next.conditions,
        generation,
        "CellSet",
        reason,
        message,
        now,
    );
    next.phase = Some(CellSetPhase::Failed);
    next
}

/// Slots and epoch of `cell` in its set's published placement ((0, 0) before the set
/// published one, or for a cell the set no longer places).
pub fn placement_of(set: Option<&CellSet>, cell: &str) -> (u32, u64) {
    let Some(st) = set.and_then(|s| s.status.as_ref()) else {
        return (0, 0);
    };
    (st.slots.get(cell).copied().unwrap_or(0), st.epoch)
}

#[cfg(test)]
mod tests {
    use super::*;
    use cellplane_cells::crd::{CellStatus, Condition};

    fn set() -> CellSet {
        let text = include_str!("../../../examples/demo-cellset.yaml");
        let mut set: CellSet = serde_yaml::from_str(text).unwrap();
        set.metadata.uid = Some("uid-1".into());
        set.metadata.generation = Some(3);
        set
    }

    fn ready(mut cell: Cell, is_ready: bool) -> Cell {
        cell.status = Some(CellStatus {
            conditions: vec![Condition {
                type_: condition::READY.into(),
                status: if is_ready { "True" } else { "False" }.into(),
                reason: String::new(),
                message: String::new(),
                last_transition_time: String::new(),
                observed_generation: None,
            }],
            ..Default::default()
        });
        cell
    }

    #[test]
    fn cells_in_scope_are_owned_and_labelled() {
        let s = set();
        let all = desired_cells(&s, None).unwrap();
        assert_eq!(all.len(), 4);
        let us = desired_cells(&s, Some("us-east")).unwrap();
        let names: Vec<String> = us.iter().map(|c| c.name_any()).collect();
        assert_eq!(names, ["shop-us-east-0", "shop-us-east-1"]);
        let c = &us[0];
        assert_eq!(
            c.metadata.owner_references.as_ref().unwrap()[0].uid,
            "uid-1"
        );
        assert_eq!(c.labels()[names::LABEL_CELLSET], "shop");
        assert_eq!(c.namespace().as_deref(), Some("default"));

        // An override naming a cell the set does not stamp is refused, naming it.
        let mut typo = set();
        typo.spec
            .overrides
            .insert("shop-us-east-9".into(), Default::default());
        let err = desired_cells(&typo, None).unwrap_err().to_string();
        assert!(err.contains("spec.overrides names shop-us-east-9"), "{err}");
    }

    #[test]
    fn a_new_placement_is_a_new_epoch_and_ready_cells_are_counted() {
        let mut s = set();
        let slots = placement_counts(&s).unwrap();
        assert_eq!(slots.values().sum::<u32>(), DEFAULT_SLOTS);
        let cells = desired_cells(&s, None).unwrap();
        let existing = [
            ready(cells[0].clone(), true),
            ready(cells[1].clone(), false),
        ];
        let first = status(&s, 4, slots.clone(), &existing, "t1");
        assert_eq!((first.epoch, first.cells, first.ready_cells), (1, 4, 1));
        assert_eq!(first.observed_generation, Some(3));
        s.status = Some(first.clone());
        assert_eq!(
            status(&s, 4, slots.clone(), &existing, "t1").epoch,
            1,
            "same placement"
        );
        s.spec.regions[0].cells = 3;
        let moved = status(&s, 5, placement_counts(&s).unwrap(), &existing, "t2");
        assert_eq!(moved.epoch, 2);
        assert_eq!(
            placement_of(Some(&s), "shop-us-east-0"),
            (slots["shop-us-east-0"], 1)
        );
        assert_eq!(placement_of(Some(&s), "gone"), (0, 1));
        assert_eq!(placement_of(None, "shop-us-east-0"), (0, 0));
    }

    fn ready_condition(st: &CellSetStatus) -> (&str, &str, &str) {
        let c = st
            .conditions
            .iter()
            .find(|c| c.type_ == condition::READY)
            .unwrap();
        (c.status.as_str(), c.reason.as_str(), c.message.as_str())
    }

    #[test]
    fn a_set_that_cannot_be_applied_says_so_and_recovers_when_fixed() {
        let mut s = set();
        let slots = placement_counts(&s).unwrap();
        let cells = desired_cells(&s, None).unwrap();
        let existing: Vec<Cell> = cells.iter().map(|c| ready(c.clone(), true)).collect();
        s.status = Some(status(&s, 4, slots.clone(), &existing, "t1"));
        assert_eq!(ready_condition(s.status.as_ref().unwrap()).0, "True");

        let refused = failed(
            &s,
            "ApplyFailed",
            "Cell shop-us-east-0: spec.zone: Invalid",
            "t2",
        );
        assert_eq!(refused.phase, Some(CellSetPhase::Failed));
        let (st, reason, message) = ready_condition(&refused);
        assert_eq!((st, reason), ("False", "ApplyFailed"));
        assert!(message.contains("spec.zone") && message.ends_with("fix the CellSet's spec"));
        assert_eq!(refused.slots, slots, "the placement stays as it was");

        s.status = Some(refused);
        let fixed = status(&s, 4, slots, &existing, "t3");
        assert_eq!(fixed.phase, Some(CellSetPhase::Active));
        assert_eq!(ready_condition(&fixed).1, "AllCellsReady");
        let flipped = fixed
            .conditions
            .iter()
            .find(|c| c.type_ == condition::READY)
            .unwrap();
        assert_eq!(flipped.last_transition_time, "t3");

        // A stamped cell that fails fails the set, with the cell's reason.
        let mut broken = existing.clone();
        let st = broken[1].status.as_mut().unwrap();
        st.phase = Some(CellPhase::Failed);
        st.conditions[0].message = "requests must be less than or equal to cpu limit".into();
        let of_cells = status(&s, 4, placement_counts(&s).unwrap(), &broken, "t4");
        assert_eq!(of_cells.phase, Some(CellSetPhase::Failed));
        let (st, reason, message) = ready_condition(&of_cells);
        assert_eq!((st, reason), ("False", "CellsFailed"));
        assert_eq!(
            message,
            "Cell shop-us-east-1: requests must be less than or equal to cpu limit"
        );
    }
}
