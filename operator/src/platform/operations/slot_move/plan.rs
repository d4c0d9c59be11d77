//! The moves a rebalance makes (pure): where the placement puts each slot over the serving
//! cells and their weights, against where its data lives now; every slot to move grouped by
//! source and target, in waves of at most `max_slots` slots. The leader runs the moves one at
//! a time per cell (a move holds both its cells until its flip), so the waves follow each
//! other.

use cellplane_cells::placement::{place, WeightedCell};
use cellplane_cells::routing::{serves_traffic, RoutingTable};
use cellplane_cells::slot::Slot;
use cellplane_cells::slot_set::SlotSet;
use std::collections::BTreeMap;

/// One move of a rebalance.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PlannedMove {
    pub source: String,
    pub target: String,
    pub slots: SlotSet,
}

/// The moves that bring `table` to the placement over its serving cells with `weights`
/// (a cell without one weighs 1), at most `max_slots` slots each; or why there are none to
/// make (naming the fix).
pub fn rebalance(
    table: &RoutingTable,
    weights: &BTreeMap<String, u32>,
    max_slots: usize,
) -> Result<Vec<PlannedMove>, String> {
    if max_slots == 0 {
        return Err("--max-slots must be at least 1".into());
    }
    if let Some(c) = table.cells.iter().find(|c| !serves_traffic(c.state)) {
        return Err(format!(
            "{} is {:?}: its users are served from its data elsewhere; fail it back before rebalancing",
            c.name, c.state
        ));
    }
    if !table.frozen_slots.is_empty() || table.cells.iter().any(|c| c.frozen) {
        return Err("an operation has slots frozen; wait for it (`cellplane drills`)".into());
    }
    let mut cells: Vec<WeightedCell> = table
        .cells
        .iter()
        .map(|c| WeightedCell::new(c.name.clone(), weights.get(&c.name).copied().unwrap_or(1)))
        .collect();
    cells.sort_by(|a, b| a.name.cmp(&b.name));
    let placement = place(&cells, table.slots).map_err(|e| e.to_string())?;
    let mut groups: BTreeMap<(String, String), Vec<Slot>> = BTreeMap::new();
    for (slot, &placed) in placement.owners.iter().enumerate() {
        let slot = slot as Slot;
        if table.pinned(slot).is_some() {
            continue;
        }
        let want = &placement.cells[usize::from(placed)];
        let have = &table.data_home(slot).name;
        if want != have {
            groups
                .entry((have.clone(), want.clone()))
                .or_default()
                .push(slot);
        }
    }
    let mut moves = Vec::new();
    for ((source, target), slots) in groups {
        for wave in slots.chunks(max_slots) {
            moves.push(PlannedMove {
                source: source.clone(),
                target: target.clone(),
                slots: SlotSet::of(table.slots, wave.iter().copied()).map_err(|e| e.to_string())?,
            });
        }
    }
    Ok(moves)
}

#[cfg(test)]
mod tests {
    use super::*;
    use cellplane_cells::routing::CellEntry;

    fn table(cells: &[&str]) -> RoutingTable {
        let entries = cells
            .iter()
            .map(|c| (CellEntry::active(c, "us", vec![format!("{c}:80")]), 1))
            .collect();
        RoutingTable::placed("shop", 1, 1024, entries).unwrap()
    }

    #[test]
    fn a_new_cell_gets_its_share_from_every_other_cell_in_bounded_waves() {
        // Two cells placed, then a third joins with no slots (as the leader writes it).
        let two = table(&["a", "b"]);
        let mut three = two.clone();
        three
            .cells
            .push(CellEntry::active("c", "us", vec!["c:80".into()]));
        three.validate().unwrap();
        assert_eq!(three.slot_count("c"), 0);
        let moves = rebalance(&three, &BTreeMap::new(), 100).unwrap();
        assert!(moves
            .iter()
            .all(|m| m.target == "c" && m.slots.len() <= 100));
        let moved: usize = moves.iter().map(|m| m.slots.len()).sum();
        assert!((250..450).contains(&moved), "moved {moved}");
        assert!(moves.iter().any(|m| m.source == "a") && moves.iter().any(|m| m.source == "b"));
        // After the moves the table is what the placement wants: nothing more to do.
        let mut after = three.clone();
        for m in &moves {
            after = after.moved_slots(&m.slots, &m.target).unwrap();
        }
        assert_eq!(rebalance(&after, &BTreeMap::new(), 100).unwrap(), vec![]);
        assert!((250..450).contains(&(after.slot_count("c") as usize)));
    }

    #[test]
    fn weights_pinned_slots_and_unfit_tables_are_respected() {
        let t = table(&["a", "b"]);
        let heavy = BTreeMap::from([("a".to_string(), 3)]);
        let moves = rebalance(&t, &heavy, 10_000).unwrap();
        assert!(moves.iter().all(|m| m.source == "b" && m.target == "a"));
        let mut pinned = t.clone();
        let slot = moves[0].slots.iter().next().unwrap();
        pinned.pins.insert(slot, "b".into());
        let again = rebalance(&pinned, &heavy, 10_000).unwrap();
        assert!(
            again.iter().all(|m| !m.slots.contains(slot)),
            "a pinned slot stays"
        );
        let mut paired = t.clone();
        paired.cells[0].standby = Some("b".into());
        let failed = paired.failed_over("a").unwrap();
        let err = rebalance(&failed, &BTreeMap::new(), 10).unwrap_err();
        assert!(err.contains("fail it back"), "{err}");
        assert!(rebalance(&t, &BTreeMap::new(), 0).is_err());
    }
}
