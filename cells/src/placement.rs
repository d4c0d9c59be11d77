//! Placement: which cell is home for each slot. Weighted consistent hashing over the
//! active cells with the `consistent_hash` crate. Pure; computed off the hot path.
//!
//! Each cell gets `capacityWeight * VNODES_PER_WEIGHT` virtual nodes, a number that depends
//! only on the cell itself, so adding or removing a cell moves only slots onto or off it.

use crate::slot::{check_slot_count, Slot};
use crate::{Error, Result};
use consistent_hash::{Node, RingHash, StaticHashRing};
use std::collections::BTreeMap;
use std::hash::{Hash, Hasher};
use xxhash_rust::xxh3::Xxh3Default;

/// Virtual nodes per unit of capacity weight. A cell's share of the ring deviates from
/// its weight by about 1/sqrt(weight * VNODES_PER_WEIGHT): ~3% for weight 1, ~1% for 10.
pub const VNODES_PER_WEIGHT: usize = 1024;

/// Index of a cell in a placement's (sorted) cell list.
pub type CellIndex = u16;

/// A cell taking part in placement.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct WeightedCell {
    pub name: String,
    pub weight: u32,
}

impl WeightedCell {
    pub fn new(name: impl Into<String>, weight: u32) -> Self {
        Self {
            name: name.into(),
            weight,
        }
    }
}

/// An explicit slot -> cell assignment.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Placement {
    /// Cell names, sorted; `owners` index into it.
    pub cells: Vec<String>,
    /// `owners[slot]` is the home cell of `slot`.
    pub owners: Vec<CellIndex>,
}

/// One slot changing home.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SlotMove {
    pub slot: Slot,
    pub from: String,
    pub to: String,
}

/// Ring positions. Virtual nodes sit at XXH3 of (cell, sequence): stable across
/// processes and machines, unlike `DefaultHasher`. Slots sit at evenly spaced positions
/// (`slot * 2^64 / slots`), so a cell's slot count follows its arc length exactly instead
/// of adding the sampling noise of hashing 16384 points; neighbouring slots also tend to
/// share a home, which keeps tables compressible.
struct SlotRing;

impl RingHash for SlotRing {
    fn hash_item<T: Hash>(&self, item: &T) -> u64 {
        let mut h = RingPosition(0);
        item.hash(&mut h);
        h.0
    }

    fn hash_vnode<K: Hash>(&self, node_key: &K, vnode_seq: usize) -> u64 {
        let mut h = Xxh3Default::new();
        node_key.hash(&mut h);
        (vnode_seq as u64).hash(&mut h);
        h.finish()
    }
}

/// Passes a precomputed ring position (a `u64`) through `Hash` unchanged.
struct RingPosition(u64);

impl Hasher for RingPosition {
    fn finish(&self) -> u64 {
        self.0
    }
    fn write(&mut self, _bytes: &[u8]) {
        unreachable!("only u64 ring positions are hashed with RingPosition")
    }
    fn write_u64(&mut self, position: u64) {
        self.0 = position;
    }
}

/// Ring position of `slot`: evenly spaced over the u64 ring.
fn slot_position(slot: Slot, slots: u32) -> u64 {
    ((u128::from(slot) << 64) / u128::from(slots)) as u64
}

/// Places `slots` slots on `cells` by weighted consistent hashing.
pub fn place(cells: &[WeightedCell], slots: u32) -> Result<Placement> {
    check_slot_count(slots)?;
    if cells.is_empty() {
        return Err(Error::NoActiveCells);
    }
    if cells.len() > usize::from(CellIndex::MAX) {
        return Err(Error::InvalidTable {
            field: "cells".into(),
            problem: format!(
                "{} cells exceed the limit of {}",
                cells.len(),
                CellIndex::MAX
            ),
        });
    }
    for c in cells {
        if !(1..=crate::crd::MAX_WEIGHT).contains(&c.weight) {
            return Err(Error::Weight {
                cell: c.name.clone(),
                got: c.weight,
                max: crate::crd::MAX_WEIGHT,
            });
        }
    }
    let mut names: Vec<String> = cells.iter().map(|c| c.name.clone()).collect();
    names.sort();
    names.dedup();
    let index: BTreeMap<&str, CellIndex> = names
        .iter()
        .enumerate()
        .map(|(i, n)| (n.as_str(), i as CellIndex))
        .collect();

    let nodes = cells
        .iter()
        .map(|c| Node::new(c.name.as_str()).quantity(c.weight as usize * VNODES_PER_WEIGHT));
    let ring = StaticHashRing::new(SlotRing, nodes);
    let owners = (0..slots)
        .map(|slot| {
            let position = slot_position(slot, slots);
            let node = ring
                .calc_candidates(&position)
                .next()
                .expect("ring is not empty");
            index[node.key]
        })
        .collect();
    Ok(Placement {
        cells: names,
        owners,
    })
}

impl Placement {
    /// Home cell of `slot`.
    pub fn owner_of(&self, slot: Slot) -> &str {
        &self.cells[usize::from(self.owners[slot as usize])]
    }

    /// Slots per cell (cells owning none are listed with 0).
    pub fn counts(&self) -> BTreeMap<String, u32> {
        let mut counts: BTreeMap<String, u32> = self.cells.iter().map(|c| (c.clone(), 0)).collect();
        for &o in &self.owners {
            *counts
                .get_mut(&self.cells[usize::from(o)])
                .expect("owner is a cell") += 1;
        }
        counts
    }

    /// The explicit moves that turn `self` into `next` (same slot count).
    pub fn moves_to(&self, next: &Placement) -> Vec<SlotMove> {
        (0..self.owners.len().min(next.owners.len()) as Slot)
            .filter_map(|slot| {
                let (from, to) = (self.owner_of(slot), next.owner_of(slot));
                (from != to).then(|| SlotMove {
                    slot,
                    from: from.into(),
                    to: to.into(),
                })
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::slot::DEFAULT_SLOTS;
    use proptest::prelude::*;

    fn cells(n: usize, weight: u32) -> Vec<WeightedCell> {
        (0..n)
            .map(|i| WeightedCell::new(format!("cell-r{}-{i}", i % 3), weight))
            .collect()
    }

    #[test]
    fn errors_name_the_problem() {
        assert_eq!(place(&[], 16), Err(Error::NoActiveCells));
        let e = place(&[WeightedCell::new("a", 0)], 16).unwrap_err();
        assert!(e.to_string().contains("cells[a].capacityWeight"), "{e}");
        assert!(place(&cells(1, 1), 0).is_err());
    }

    #[test]
    fn deterministic_across_calls_and_input_order() {
        let a = place(&cells(5, 10), DEFAULT_SLOTS).unwrap();
        let mut rev = cells(5, 10);
        rev.reverse();
        assert_eq!(a, place(&rev, DEFAULT_SLOTS).unwrap());
    }

    /// Golden values: placement must not change between releases, or every user moves.
    #[test]
    fn golden_owners() {
        let p = place(&cells(3, 10), DEFAULT_SLOTS).unwrap();
        let got: Vec<&str> = [0, 1, 2, 5808, 16383]
            .iter()
            .map(|&s| p.owner_of(s))
            .collect();
        assert_eq!(
            got,
            include_str!("../testdata/placement-golden.txt")
                .trim()
                .split(',')
                .collect::<Vec<_>>()
        );
    }

    // A fixed seed: placement is statistical (a weight-1 cell is ~3% off its share, one
    // sigma), so a random seed would occasionally draw a 3-sigma input and flake.
    // The fixed seed still covers 48 varied inputs per property, the same ones every run.
    fn config() -> ProptestConfig {
        ProptestConfig {
            cases: 48,
            rng_seed: proptest::test_runner::RngSeed::Fixed(0x5eed_ce11),
            failure_persistence: None,
            ..ProptestConfig::default()
        }
    }

    #[test]
    fn slot_positions_are_evenly_spaced_and_ordered() {
        assert_eq!(slot_position(0, 4), 0);
        assert_eq!(slot_position(1, 4), 1 << 62);
        assert_eq!(slot_position(3, 4), 3 << 62);
        assert!(slot_position(16383, 16384) > slot_position(16382, 16384));
    }

    proptest! {
        #![proptest_config(config())]

        #[test]
        fn every_slot_has_exactly_one_home(n in 1usize..12, w in 1u32..40) {
            let p = place(&cells(n, w), DEFAULT_SLOTS).unwrap();
            prop_assert_eq!(p.owners.len(), DEFAULT_SLOTS as usize);
            prop_assert!(p.owners.iter().all(|&o| (o as usize) < n));
            prop_assert_eq!(p.counts().values().sum::<u32>(), DEFAULT_SLOTS);
        }

        #[test]
        fn adding_a_cell_moves_few_slots_and_only_onto_it(n in 1usize..24, salt in 0u32..1000) {
            let mut before: Vec<WeightedCell> =
                (0..n).map(|i| WeightedCell::new(format!("c{salt}-{i}"), 10)).collect();
            let old = place(&before, DEFAULT_SLOTS).unwrap();
            before.push(WeightedCell::new(format!("new-{salt}"), 10));
            let new = place(&before, DEFAULT_SLOTS).unwrap();
            let moves = old.moves_to(&new);
            let newcomer = format!("new-{salt}");
            prop_assert!(moves.iter().all(|m| m.to == newcomer));
            let bound = 1.15 / (n as f64 + 1.0) * f64::from(DEFAULT_SLOTS);
            prop_assert!((moves.len() as f64) <= bound, "moved {} > bound {bound:.0}", moves.len());
        }

        #[test]
        fn removing_a_cell_moves_only_its_slots(n in 2usize..24, victim in 0usize..24) {
            let all = cells(n, 10);
            let old = place(&all, DEFAULT_SLOTS).unwrap();
            let gone = all[victim % n].name.clone();
            let rest: Vec<_> = all.into_iter().filter(|c| c.name != gone).collect();
            let new = place(&rest, DEFAULT_SLOTS).unwrap();
            let moves = old.moves_to(&new);
            prop_assert!(moves.iter().all(|m| m.from == gone));
            prop_assert_eq!(moves.len() as u32, old.counts()[&gone]);
        }

        #[test]
        fn weights_are_honoured_within_ten_percent(ws in proptest::collection::vec(1u32..=100, 2..8)) {
            let cs: Vec<_> = ws.iter().enumerate()
                .map(|(i, &w)| WeightedCell::new(format!("w{i}"), w)).collect();
            let p = place(&cs, DEFAULT_SLOTS).unwrap();
            let total: u32 = ws.iter().sum();
            let counts = p.counts();
            for c in &cs {
                let want = f64::from(DEFAULT_SLOTS) * f64::from(c.weight) / f64::from(total);
                let got = f64::from(counts[&c.name]);
                let tolerance = 0.10 * want;
                prop_assert!((got - want).abs() <= tolerance,
                    "{}: weight {} got {got} want {want:.0}", c.name, c.weight);
            }
        }
    }
}
