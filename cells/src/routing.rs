//! The routing table: slot -> home cell, each cell's state and endpoints, and the epoch.
//! Pure: validation, lookups, encoding. Routers and operators share it via etcd.

use crate::crd::CellPhase;
use crate::placement::{place, CellIndex, Placement, WeightedCell};
use crate::slot::{check_slot_count, slot_for_key, Slot};
use crate::slot_set::SlotSet;
use crate::{Error, Result};
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, BTreeSet};

/// One cell as routers see it.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct CellEntry {
    pub name: String,
    pub region: String,
    pub state: CellPhase,
    /// `host:port` of the cell's app; the only addresses a router ever dials.
    #[serde(default)]
    pub endpoints: Vec<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub standby: Option<String>,
    /// The cell's slots are frozen (a planned failover or drain is moving them): routers
    /// hold its requests until a new table moves the slots, then release them to the new
    /// home, or answer 503 with Retry-After when the hold times out.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub frozen: bool,
}

impl CellEntry {
    /// An Active cell with the given endpoints.
    pub fn active(name: &str, region: &str, endpoints: Vec<String>) -> Self {
        Self {
            name: name.into(),
            region: region.into(),
            state: CellPhase::Active,
            endpoints,
            standby: None,
            frozen: false,
        }
    }
}

/// The routing table. `owners[slot]` indexes `cells`. Build with [`RoutingTable::new`] or
/// [`RoutingTable::decode`], both of which validate.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct RoutingTable {
    pub platform: String,
    /// Bumped on every change of state or ownership.
    pub epoch: u64,
    pub slots: u32,
    pub cells: Vec<CellEntry>,
    pub owners: Vec<CellIndex>,
    /// Explicit slot -> cell overrides applied on top of the placement (a VIP user moved on
    /// purpose, a slot under migration). `owners` already reflects them; they are kept here
    /// so every lookup can say that a slot is pinned, and so the next placement keeps them.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub pins: BTreeMap<Slot, String>,
    /// The cell whose database holds each slot's data (indexes `cells`), when it differs
    /// from the serving cell for some slot: after a failover the standby serves the slots
    /// of the cell it stood by for from that cell's replicated schema. Empty means every
    /// slot's data lives with its serving cell (the usual case, kept out of the encoding).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub data_homes: Vec<CellIndex>,
    /// Slots frozen on their own, as inclusive ranges (ascending, disjoint): a slot move
    /// is cutting them over. Routers hold only these slots' requests and their cell refuses
    /// them, while the cell's other users are served.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub frozen_slots: Vec<(Slot, Slot)>,
}

fn invalid(field: impl Into<String>, problem: impl Into<String>) -> Error {
    Error::InvalidTable {
        field: field.into(),
        problem: problem.into(),
    }
}

/// Cells in these states may be home for slots.
pub fn serves_traffic(state: CellPhase) -> bool {
    matches!(state, CellPhase::Active | CellPhase::Draining)
}

impl RoutingTable {
    /// Builds a table from a placement; `cells` must describe every placed cell.
    pub fn new(
        platform: &str,
        epoch: u64,
        placement: &Placement,
        cells: Vec<CellEntry>,
    ) -> Result<Self> {
        // Re-index the placement against the given cell order.
        let remap: Vec<CellIndex> = placement
            .cells
            .iter()
            .map(|name| {
                cells
                    .iter()
                    .position(|c| &c.name == name)
                    .map(|i| i as CellIndex)
                    .ok_or_else(|| {
                        invalid(
                            format!("cells[{name}]"),
                            "placed cell has no entry; add its registration",
                        )
                    })
            })
            .collect::<Result<_>>()?;
        let table = Self {
            platform: platform.into(),
            epoch,
            slots: placement.owners.len() as u32,
            cells,
            owners: placement
                .owners
                .iter()
                .map(|&o| remap[usize::from(o)])
                .collect(),
            pins: BTreeMap::new(),
            data_homes: Vec::new(),
            frozen_slots: Vec::new(),
        };
        table.validate()?;
        Ok(table)
    }

    /// Places `slots` slots over `cells` (each with its capacity weight) by weighted
    /// consistent hashing and builds the table.
    pub fn placed(
        platform: &str,
        epoch: u64,
        slots: u32,
        cells: Vec<(CellEntry, u32)>,
    ) -> Result<Self> {
        let weighted: Vec<WeightedCell> = cells
            .iter()
            .map(|(c, w)| WeightedCell::new(c.name.clone(), *w))
            .collect();
        let placement = place(&weighted, slots)?;
        Self::new(
            platform,
            epoch,
            &placement,
            cells.into_iter().map(|(c, _)| c).collect(),
        )
    }

    /// Checks every invariant a router relies on. A table that fails is never applied.
    pub fn validate(&self) -> Result<()> {
        if self.platform.is_empty() {
            return Err(invalid("platform", "must not be empty"));
        }
        if self.epoch == 0 {
            return Err(invalid(
                "epoch",
                "must be >= 1; epochs start at 1 and only grow",
            ));
        }
        check_slot_count(self.slots)?;
        if self.owners.len() != self.slots as usize {
            return Err(invalid(
                "owners",
                format!(
                    "has {} entries but slots is {}; every slot needs exactly one home",
                    self.owners.len(),
                    self.slots
                ),
            ));
        }
        if self.cells.len() > usize::from(CellIndex::MAX) {
            return Err(invalid(
                "cells",
                format!("at most {} cells", CellIndex::MAX),
            ));
        }
        let mut names = BTreeSet::new();
        for (i, c) in self.cells.iter().enumerate() {
            if c.name.is_empty() {
                return Err(invalid(format!("cells[{i}].name"), "must not be empty"));
            }
            if !names.insert(c.name.as_str()) {
                return Err(invalid(
                    format!("cells[{i}].name"),
                    format!("duplicate cell {:?}", c.name),
                ));
            }
        }
        let mut owning = vec![false; self.cells.len()];
        for (slot, &o) in self.owners.iter().enumerate() {
            let Some(flag) = owning.get_mut(usize::from(o)) else {
                return Err(invalid(
                    format!("owners[{slot}]"),
                    format!("cell index {o} out of range (0..{})", self.cells.len()),
                ));
            };
            *flag = true;
        }
        for (&slot, cell) in &self.pins {
            let field = || format!("pins[{slot}]");
            if slot >= self.slots {
                return Err(invalid(
                    field(),
                    format!("slot {slot} out of range (0..{})", self.slots),
                ));
            }
            let owner = &self.cells[usize::from(self.owners[slot as usize])].name;
            if owner != cell {
                return Err(invalid(
                    field(),
                    format!("pinned to {cell:?} but owners[{slot}] is {owner:?}; a pin must be applied to owners"),
                ));
            }
        }
        if !self.data_homes.is_empty() && self.data_homes.len() != self.slots as usize {
            return Err(invalid(
                "dataHomes",
                format!(
                    "has {} entries but slots is {}; leave it empty when every slot's data lives with its owner",
                    self.data_homes.len(),
                    self.slots
                ),
            ));
        }
        if let Some(slot) = self
            .data_homes
            .iter()
            .position(|&d| usize::from(d) >= self.cells.len())
        {
            return Err(invalid(
                format!("dataHomes[{slot}]"),
                format!("cell index out of range (0..{})", self.cells.len()),
            ));
        }
        let mut after: Option<Slot> = None;
        for (i, &(first, last)) in self.frozen_slots.iter().enumerate() {
            if first > last || last >= self.slots || after.is_some_and(|a| first <= a + 1) {
                return Err(invalid(
                    format!("frozenSlots[{i}]"),
                    format!(
                        "[{first}, {last}] must be a range within 0..{}, after the previous one and not touching it",
                        self.slots
                    ),
                ));
            }
            after = Some(last);
        }
        for (c, owns) in self.cells.iter().zip(owning) {
            if owns && !serves_traffic(c.state) {
                return Err(invalid(
                    format!("cells[{}].state", c.name),
                    format!(
                        "{:?} cell owns slots; move its slots to an Active cell first",
                        c.state
                    ),
                ));
            }
            if owns && c.endpoints.is_empty() {
                return Err(invalid(
                    format!("cells[{}].endpoints", c.name),
                    "a cell that owns slots needs at least one endpoint",
                ));
            }
        }
        Ok(())
    }

    /// Decodes and validates a table read from etcd or disk.
    pub fn decode(bytes: &[u8]) -> Result<Self> {
        let table: Self =
            serde_json::from_slice(bytes).map_err(|e| Error::Decode(e.to_string()))?;
        table.validate()?;
        Ok(table)
    }

    /// Encodes the table for etcd or disk.
    pub fn encode(&self) -> Vec<u8> {
        serde_json::to_vec(self).expect("a routing table always serializes")
    }

    /// The home cell of `slot` (the hot path: one array index).
    #[inline]
    pub fn cell_for_slot(&self, slot: Slot) -> &CellEntry {
        &self.cells[usize::from(self.owners[slot as usize])]
    }

    /// The cell whose database holds `slot`'s data (its owner unless a failover moved it).
    #[inline]
    pub fn data_home(&self, slot: Slot) -> &CellEntry {
        &self.cells[self.data_home_index(slot)]
    }

    /// Index in `cells` of [`RoutingTable::data_home`].
    #[inline]
    pub fn data_home_index(&self, slot: Slot) -> usize {
        let i = self
            .data_homes
            .get(slot as usize)
            .copied()
            .unwrap_or(self.owners[slot as usize]);
        usize::from(i)
    }

    /// Empties `data_homes` when every slot's data lives with its owner again.
    pub fn compact_data_homes(&mut self) {
        if self.data_homes == self.owners {
            self.data_homes.clear();
        }
    }

    /// Requests for `slot` wait: its cell is frozen, or the slot itself is.
    #[inline]
    pub fn is_frozen(&self, slot: Slot) -> bool {
        self.cell_for_slot(slot).frozen || self.slot_frozen(slot)
    }

    /// `slot` is frozen on its own (in [`RoutingTable::frozen_slots`]).
    #[inline]
    pub fn slot_frozen(&self, slot: Slot) -> bool {
        if self.frozen_slots.is_empty() {
            return false;
        }
        let i = self.frozen_slots.partition_point(|&(_, last)| last < slot);
        self.frozen_slots
            .get(i)
            .is_some_and(|&(first, _)| first <= slot)
    }

    /// The frozen slots as a set.
    pub fn frozen_slot_set(&self) -> Result<SlotSet> {
        SlotSet::of(
            self.slots,
            self.frozen_slots.iter().flat_map(|&(a, b)| a..=b),
        )
    }

    /// The table with `slots` frozen too (a slot move's cut-over begins), one epoch later.
    pub fn with_frozen_slots(&self, slots: &SlotSet) -> Result<Self> {
        let mut all = self.frozen_slot_set()?;
        for s in slots.iter() {
            all.insert(s)?;
        }
        let mut next = self.clone();
        next.epoch += 1;
        next.frozen_slots = all.ranges();
        next.validate()?;
        Ok(next)
    }

    /// The table with `slots` no longer frozen (a cut-over rolled back), one epoch later.
    pub fn without_frozen_slots(&self, slots: &SlotSet) -> Result<Self> {
        let rest = SlotSet::of(
            self.slots,
            self.frozen_slot_set()?
                .iter()
                .filter(|&s| !slots.contains(s)),
        )?;
        let mut next = self.clone();
        next.epoch += 1;
        next.frozen_slots = rest.ranges();
        next.validate()?;
        Ok(next)
    }

    /// The table after a slot move's flip: `slots` are served by `to` from its own
    /// database and no longer frozen, one epoch later. A pin on a moved slot follows it.
    /// Refused for a slot whose data lives elsewhere than with its owner (served after a
    /// failover: fail back first), and for a target that does not serve traffic.
    pub fn moved_slots(&self, slots: &SlotSet, to: &str) -> Result<Self> {
        let target = self
            .index_of(to)
            .ok_or_else(|| invalid(format!("cells[{to}]"), "no such cell"))?;
        if !serves_traffic(self.cells[target].state) {
            return Err(invalid(
                format!("cells[{to}].state"),
                format!(
                    "a {:?} cell cannot take slots; activate it first",
                    self.cells[target].state
                ),
            ));
        }
        if let Some(slot) = slots
            .iter()
            .find(|&s| self.data_home_index(s) != usize::from(self.owners[s as usize]))
        {
            return Err(invalid(
                format!("dataHomes[{slot}]"),
                format!(
                    "slot {slot} is served by {} from {}'s data (a failover); fail {} back before moving its slots",
                    self.cell_for_slot(slot).name,
                    self.data_home(slot).name,
                    self.data_home(slot).name
                ),
            ));
        }
        let unfrozen = self.without_frozen_slots(slots)?;
        let mut next = self.clone();
        next.epoch += 1;
        next.frozen_slots = unfrozen.frozen_slots;
        for s in slots.iter() {
            next.owners[s as usize] = target as CellIndex;
            if !next.data_homes.is_empty() {
                next.data_homes[s as usize] = target as CellIndex;
            }
            if let Some(pin) = next.pins.get_mut(&s) {
                *pin = to.to_string();
            }
        }
        next.compact_data_homes();
        next.validate()?;
        Ok(next)
    }

    /// Key -> slot -> home cell.
    #[inline]
    pub fn route(&self, key: &str) -> (Slot, &CellEntry) {
        let slot = slot_for_key(key, self.slots);
        (slot, self.cell_for_slot(slot))
    }

    /// The cell `slot` is pinned to, if an override placed it.
    pub fn pinned(&self, slot: Slot) -> Option<&str> {
        self.pins.get(&slot).map(String::as_str)
    }

    /// Index of `cell` in `cells`.
    pub fn index_of(&self, cell: &str) -> Option<usize> {
        self.cells.iter().position(|c| c.name == cell)
    }

    /// The entry of `cell`.
    pub fn cell(&self, cell: &str) -> Option<&CellEntry> {
        self.cells.iter().find(|c| c.name == cell)
    }

    /// Number of slots `cell` is home for.
    pub fn slot_count(&self, cell: &str) -> u32 {
        match self.cells.iter().position(|c| c.name == cell) {
            Some(i) => self.owners.iter().filter(|&&o| usize::from(o) == i).count() as u32,
            None => 0,
        }
    }

    /// The table with `cell`'s slots frozen (first step of a planned failover or drain),
    /// at the next epoch.
    pub fn frozen(&self, cell: &str) -> Result<Self> {
        let i = self
            .cells
            .iter()
            .position(|c| c.name == cell)
            .ok_or_else(|| invalid(format!("cells[{cell}]"), "no such cell"))?;
        let mut next = self.clone();
        next.epoch += 1;
        next.cells[i].frozen = true;
        next.validate()?;
        Ok(next)
    }

    /// The table after failing `cell` over to its standby: every slot of `cell` moves to
    /// the standby in one step, `cell` becomes FailedOver, and the epoch grows by one.
    pub fn failed_over(&self, cell: &str) -> Result<Self> {
        let from = self
            .cells
            .iter()
            .position(|c| c.name == cell)
            .ok_or_else(|| invalid(format!("cells[{cell}]"), "no such cell"))?;
        if self.cells[from].state == CellPhase::FailedOver {
            return Err(invalid(
                format!("cells[{cell}].state"),
                "cell is already FailedOver; fail back explicitly first",
            ));
        }
        let standby = self.cells[from].standby.clone().ok_or_else(|| {
            invalid(
                format!("cells[{cell}].standby"),
                "cell has no standby; pair it before failing over",
            )
        })?;
        let to = self
            .cells
            .iter()
            .position(|c| c.name == standby)
            .ok_or_else(|| {
                invalid(
                    format!("cells[{cell}].standby"),
                    format!("standby {standby:?} is not in the table"),
                )
            })?;
        let mut next = self.clone();
        next.epoch += 1;
        next.cells[from].state = CellPhase::FailedOver;
        if next.data_homes.is_empty() {
            next.data_homes = next.owners.clone();
        }
        for o in &mut next.owners {
            if usize::from(*o) == from {
                *o = to as CellIndex;
            }
        }
        // A pin names the cell that serves a slot; the failed cell serves nothing now.
        next.pins.retain(|_, c| c != cell);
        next.validate()?;
        Ok(next)
    }

    /// The table after failing `cell` back: it is Active again and serves every slot whose
    /// data it holds, which move back from the cell that served them; one epoch later.
    pub fn failed_back(&self, cell: &str) -> Result<Self> {
        let me = self
            .index_of(cell)
            .ok_or_else(|| invalid(format!("cells[{cell}]"), "no such cell"))?;
        if self.cells[me].state != CellPhase::FailedOver {
            return Err(invalid(
                format!("cells[{cell}].state"),
                format!(
                    "cell is {:?}; only a FailedOver cell fails back",
                    self.cells[me].state
                ),
            ));
        }
        let mut next = self.clone();
        next.epoch += 1;
        next.cells[me].state = CellPhase::Active;
        for slot in 0..next.slots {
            if next.data_home(slot).name == cell {
                next.owners[slot as usize] = me as CellIndex;
                next.pins.remove(&slot);
            }
        }
        next.compact_data_homes();
        next.validate()?;
        Ok(next)
    }

    /// The cell that serves the slots whose data `cell` holds, when another cell does
    /// (after a failover), else None.
    pub fn serving_for(&self, cell: &str) -> Option<&CellEntry> {
        (0..self.slots)
            .filter(|&s| self.data_home(s).name == cell)
            .map(|s| self.cell_for_slot(s))
            .find(|c| c.name != cell)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(name: &str, region: &str, standby: Option<&str>) -> CellEntry {
        CellEntry {
            standby: standby.map(Into::into),
            ..CellEntry::active(name, region, vec![format!("{name}.svc:8080")])
        }
    }

    fn table() -> RoutingTable {
        let cells = vec![
            (entry("b", "eu", Some("a")), 10),
            (entry("a", "us", Some("b")), 10),
        ];
        RoutingTable::placed("shop", 1, 1024, cells).unwrap()
    }

    #[test]
    fn round_trips_and_routes() {
        let t = table();
        let back = RoutingTable::decode(&t.encode()).unwrap();
        assert_eq!(back, t);
        let (slot, cell) = t.route("alice");
        assert_eq!(slot, crate::slot::slot_for_key("alice", 1024));
        assert_eq!(t.cell_for_slot(slot), cell);
        assert_eq!(t.slot_count("a") + t.slot_count("b"), 1024);
    }

    #[test]
    fn bad_tables_are_refused_with_the_field_named() {
        let mut t = table();
        t.owners.pop();
        assert!(t.validate().unwrap_err().to_string().contains("owners"));

        let mut t = table();
        t.owners[7] = 9;
        assert!(t.validate().unwrap_err().to_string().contains("owners[7]"));

        let mut t = table();
        t.epoch = 0;
        assert!(t.validate().unwrap_err().to_string().contains("epoch"));

        let mut t = table();
        t.cells[0].state = CellPhase::FailedOver;
        assert!(t
            .validate()
            .unwrap_err()
            .to_string()
            .contains("cells[b].state"));

        let mut t = table();
        t.cells[1].name = "b".into();
        assert!(t.validate().unwrap_err().to_string().contains("duplicate"));

        assert!(matches!(
            RoutingTable::decode(b"{not json"),
            Err(Error::Decode(_))
        ));
    }

    #[test]
    fn pins_must_match_the_owners_and_round_trip() {
        let mut t = table();
        let slot = 7;
        let owner = t.cell_for_slot(slot).name.clone();
        t.pins.insert(slot, owner.clone());
        t.validate().unwrap();
        assert_eq!(t.pinned(slot), Some(owner.as_str()));
        assert_eq!(RoutingTable::decode(&t.encode()).unwrap(), t);
        let other = if owner == "a" { "b" } else { "a" };
        t.pins.insert(slot, other.into());
        assert!(t.validate().unwrap_err().to_string().contains("pins[7]"));
        t.pins = BTreeMap::from([(4096, "a".into())]);
        assert!(t
            .validate()
            .unwrap_err()
            .to_string()
            .contains("out of range"));
        assert!(!String::from_utf8(table().encode())
            .unwrap()
            .contains("pins"));
    }

    #[test]
    fn freezing_bumps_the_epoch_and_round_trips() {
        let t = table();
        let f = t.frozen("a").unwrap();
        assert_eq!(f.epoch, t.epoch + 1);
        assert!(f.cells.iter().find(|c| c.name == "a").unwrap().frozen);
        assert_eq!(RoutingTable::decode(&f.encode()).unwrap(), f);
        assert!(
            !String::from_utf8(t.encode()).unwrap().contains("frozen"),
            "absent when false"
        );
        assert!(t.frozen("nope").is_err());
    }

    #[test]
    fn slots_freeze_on_their_own_and_a_move_flips_only_them() {
        let t = table();
        let moving = SlotSet::parse(1024, "10-19,500").unwrap();
        let from: Vec<String> = moving
            .iter()
            .map(|s| t.cell_for_slot(s).name.clone())
            .collect();
        let frozen = t.with_frozen_slots(&moving).unwrap();
        assert_eq!(frozen.epoch, t.epoch + 1);
        assert_eq!(frozen.frozen_slots, vec![(10, 19), (500, 500)]);
        assert!(frozen.is_frozen(10) && frozen.is_frozen(19) && frozen.is_frozen(500));
        assert!(!frozen.is_frozen(9) && !frozen.is_frozen(20) && !frozen.is_frozen(501));
        assert!(frozen.cells.iter().all(|c| !c.frozen), "no cell is frozen");
        assert_eq!(RoutingTable::decode(&frozen.encode()).unwrap(), frozen);
        assert!(String::from_utf8(frozen.encode())
            .unwrap()
            .contains(r#""frozenSlots":[[10,19],[500,500]]"#));
        assert!(!String::from_utf8(t.encode())
            .unwrap()
            .contains("frozenSlots"));
        // Adding to the frozen set merges; thawing removes only what is named.
        let more = frozen
            .with_frozen_slots(&SlotSet::parse(1024, "20-21").unwrap())
            .unwrap();
        assert_eq!(more.frozen_slots, vec![(10, 21), (500, 500)]);
        let thawed = more.without_frozen_slots(&moving).unwrap();
        assert_eq!(thawed.frozen_slots, vec![(20, 21)]);

        let moved = frozen.moved_slots(&moving, "b").unwrap();
        assert_eq!(moved.epoch, frozen.epoch + 1);
        assert!(moved.frozen_slots.is_empty());
        for s in 0..1024 {
            let want = if moving.contains(s) {
                "b"
            } else {
                t.cell_for_slot(s).name.as_str()
            };
            assert_eq!(moved.cell_for_slot(s).name, want, "slot {s}");
            assert_eq!(moved.data_home(s).name, want, "its data lives with it");
        }
        assert!(moved.data_homes.is_empty());
        assert!(from.iter().any(|c| c == "a"), "some slot really moved");
        assert!(t.moved_slots(&moving, "nope").is_err());
        // After a failover, a's slots are served from a's data by b: not movable.
        let over = t.failed_over("a").unwrap();
        let a_slot = (0..1024).find(|&s| t.cell_for_slot(s).name == "a").unwrap();
        let err = over
            .moved_slots(&SlotSet::of(1024, [a_slot]).unwrap(), "b")
            .unwrap_err()
            .to_string();
        assert!(err.contains("fail a back"), "{err}");
    }

    #[test]
    fn bad_frozen_slots_are_refused() {
        for (ranges, why) in [
            (vec![(5, 3)], "backwards"),
            (vec![(0, 1024)], "out of range"),
            (vec![(0, 5), (3, 9)], "overlapping"),
            (vec![(0, 5), (6, 9)], "touching: one range"),
            (vec![(10, 12), (0, 5)], "descending"),
        ] {
            let mut t = table();
            t.frozen_slots = ranges;
            let err = t.validate().unwrap_err().to_string();
            assert!(err.contains("frozenSlots["), "{why}: {err}");
        }
    }

    #[test]
    fn failover_moves_exactly_the_cells_slots_and_bumps_epoch() {
        let t = table();
        let a_slots = t.slot_count("a");
        let next = t.failed_over("a").unwrap();
        assert_eq!(next.epoch, t.epoch + 1);
        assert_eq!(next.slot_count("a"), 0);
        assert_eq!(next.slot_count("b"), 1024);
        let moved = (0..1024)
            .filter(|&s| t.cell_for_slot(s).name != next.cell_for_slot(s).name)
            .count();
        assert_eq!(moved as u32, a_slots);
        assert!(next
            .failed_over("a")
            .unwrap_err()
            .to_string()
            .contains("already FailedOver"));
        // a's data stays a's: b serves those slots from a's schema.
        for s in 0..1024 {
            assert_eq!(next.data_home(s).name, t.cell_for_slot(s).name);
        }
        assert_eq!(next.serving_for("a").map(|c| c.name.as_str()), Some("b"));
        assert_eq!(RoutingTable::decode(&next.encode()).unwrap(), next);
    }

    #[test]
    fn failing_back_returns_exactly_the_cells_slots_and_forgets_data_homes() {
        let t = table();
        assert!(t.data_homes.is_empty());
        assert!(!String::from_utf8(t.encode()).unwrap().contains("dataHomes"));
        assert_eq!(t.serving_for("a"), None);
        let over = t.failed_over("a").unwrap();
        let back = over.failed_back("a").unwrap();
        assert_eq!(back.epoch, over.epoch + 1);
        assert_eq!(back.owners, t.owners);
        assert!(back.data_homes.is_empty(), "compacted once equal");
        assert_eq!(back.cell("a").unwrap().state, CellPhase::Active);
        assert!(back
            .failed_back("a")
            .unwrap_err()
            .to_string()
            .contains("only a FailedOver cell"));
        let mut bad = over.clone();
        bad.data_homes.pop();
        assert!(bad
            .validate()
            .unwrap_err()
            .to_string()
            .contains("dataHomes"));
        let mut bad = over;
        bad.data_homes[3] = 9;
        assert!(bad
            .validate()
            .unwrap_err()
            .to_string()
            .contains("dataHomes[3]"));
    }
}
