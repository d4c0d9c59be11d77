//! The routing decision: key -> slot -> home cell -> endpoint. Pure and benchmarked.

use cellplane_cells::routing::{CellEntry, RoutingTable};
use cellplane_cells::slot::{slot_for_key, Slot};

/// Where a request goes, at which epoch.
#[derive(Debug, Clone, Copy)]
pub struct Decision<'t> {
    pub slot: Slot,
    /// Index of the cell in `table.cells`.
    pub cell_index: usize,
    pub cell: &'t CellEntry,
    pub epoch: u64,
    /// The user's requests wait: the cell or the slot is frozen.
    pub frozen: bool,
}

#[inline]
pub fn decide<'t>(table: &'t RoutingTable, key: &str) -> Decision<'t> {
    let slot = slot_for_key(key, table.slots);
    let cell_index = usize::from(table.owners[slot as usize]);
    Decision {
        slot,
        cell_index,
        cell: &table.cells[cell_index],
        epoch: table.epoch,
        frozen: table.is_frozen(slot),
    }
}

/// Power of two choices: of two random candidates (indices `a`, `b` drawn by the caller
/// from `0..candidates.len()`), the one with fewer requests in flight. `None` when empty.
#[inline]
pub fn power_of_two(in_flight: &[u32], a: usize, b: usize) -> Option<usize> {
    match in_flight.len() {
        0 => None,
        1 => Some(0),
        n => {
            let (a, b) = (a % n, b % n);
            Some(if in_flight[b] < in_flight[a] { b } else { a })
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decision_matches_the_table() {
        let cells = ["a", "b"]
            .map(|n| (CellEntry::active(n, "r", vec!["e:1".into()]), 10))
            .to_vec();
        let t = RoutingTable::placed("p", 7, 16384, cells).unwrap();
        for u in ["alice", "bob", "carol"] {
            let d = decide(&t, u);
            let (slot, cell) = t.route(u);
            assert_eq!(
                (d.slot, d.cell.name.as_str(), d.epoch),
                (slot, cell.name.as_str(), 7)
            );
            assert_eq!(t.cells[d.cell_index].name, cell.name);
        }
    }

    #[test]
    fn p2c_prefers_the_less_loaded() {
        assert_eq!(power_of_two(&[], 0, 1), None);
        assert_eq!(power_of_two(&[9], 3, 7), Some(0));
        assert_eq!(power_of_two(&[5, 1, 3], 0, 1), Some(1));
        assert_eq!(power_of_two(&[5, 1, 3], 2, 0), Some(2));
        assert_eq!(
            power_of_two(&[2, 2], 1, 0),
            Some(1),
            "ties keep the first draw"
        );
    }
}
