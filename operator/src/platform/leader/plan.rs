//! The routing table the platform leader wants, from what the CellSets declare, what the
//! cells registered and the table in force. Pure: the leader's I/O reads the inputs and
//! writes the result with a compare-and-swap (`cellplane_table::etcd`).
//!
//! The rules, and why:
//! - A declared cell joins the table when it first registers with an address routers can
//!   dial; before that it owns nothing (a cell still starting must not get users).
//! - Once in the table a cell stays there, with its last endpoints, when its registration
//!   goes away (a lease that expired is the start of a failover, never a reason to rehash
//!   its users onto other cells' shards, which do not hold their data).
//! - A cell leaves the table only when no CellSet declares it any more.
//! - State (`Active`, `FailedOver`, frozen) is the table's own: only operations change it,
//!   so recomputing the table never undoes a failover. The slots placed on a cell that is
//!   not serving go to its standby.
//! - Pins override the placement for single slots and are kept in the table. A pinned
//!   slot's data is the pinned cell's (moving the rows is the pin's author's job).
//! - A slot's data lives with the cell it is placed on; when that cell does not serve, the
//!   table says so (`dataHomes`) and its standby serves the slot from the replicated schema.
//! - Where a slot's data lives is the table's own once written: only a slot move (which
//!   moves the rows first) changes it, so a cell that joins a running platform gets no
//!   slots by itself, and a move is never undone by recomputation. The placement decides
//!   only for the first table (written once every declared cell registered, or after the
//!   bring-up grace with those that did), for the slots of a cell that left, and for a
//!   slot whose pin was lifted.
//! - The epoch grows by one exactly when something a router sees changes.

use cellplane_cells::crd::CellPhase;
use cellplane_cells::etcd_keys::Registration;
use cellplane_cells::placement::{place, CellIndex, WeightedCell};
use cellplane_cells::routing::{serves_traffic, CellEntry, RoutingTable};
use cellplane_cells::slot::Slot;
use std::collections::BTreeMap;

/// A cell that a CellSet of the platform declares.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Member {
    pub name: String,
    pub region: String,
    pub weight: u32,
    pub standby: Option<String>,
}

/// Everything the table is computed from.
#[derive(Clone, Debug, Default)]
pub struct Inputs {
    pub platform: String,
    pub slots: u32,
    pub members: Vec<Member>,
    /// Live registrations by cell name.
    pub registrations: BTreeMap<String, Registration>,
    /// Requested slot -> cell overrides.
    pub pins: BTreeMap<Slot, String>,
    /// The first table may be written before every declared cell registered (the bring-up
    /// grace passed): the cells that registered later join with no slots.
    pub bring_up_over: bool,
}

/// What the leader should do with the table.
#[derive(Clone, Debug, PartialEq)]
pub enum Plan {
    /// Nothing to write: the table in force is what the inputs want (or no cell can take
    /// users yet).
    Keep,
    /// Write this table (its epoch is one above the one in force).
    Write(Box<RoutingTable>),
}

/// A pin that could not be applied: the table is written without it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct IgnoredPin {
    pub slot: Slot,
    pub cell: String,
    pub why: String,
}

/// The address a router dials for a registered cell: its `app` endpoint.
pub fn dial_address(reg: &Registration) -> Option<&str> {
    reg.endpoints
        .get("app")
        .map(String::as_str)
        .filter(|a| !a.is_empty())
}

/// Computes the next table. Errors name what makes a valid table impossible (the leader
/// keeps the table in force and reports).
pub fn next_table(
    current: Option<&RoutingTable>,
    inputs: &Inputs,
) -> cellplane_cells::Result<(Plan, Vec<IgnoredPin>)> {
    // Sorted by name: the same inputs always give the same table, byte for byte.
    let mut entries: Vec<(CellEntry, u32)> = inputs
        .members
        .iter()
        .filter_map(|m| entry(m, current, inputs.registrations.get(&m.name)))
        .collect();
    entries.sort_by(|a, b| a.0.name.cmp(&b.0.name));
    if entries.is_empty() {
        return Ok((Plan::Keep, Vec::new()));
    }
    if current.is_none() && entries.len() < inputs.members.len() && !inputs.bring_up_over {
        // The first placement is the only one made without moves: wait for every cell.
        return Ok((Plan::Keep, Vec::new()));
    }
    let slots = current.map_or(inputs.slots, |t| t.slots);
    let weighted: Vec<WeightedCell> = entries
        .iter()
        .map(|(c, w)| WeightedCell::new(c.name.clone(), *w))
        .collect();
    let placement = place(&weighted, slots)?;
    let cells: Vec<CellEntry> = entries.into_iter().map(|(c, _)| c).collect();
    let index: BTreeMap<&str, CellIndex> = cells
        .iter()
        .enumerate()
        .map(|(i, c)| (c.name.as_str(), i as CellIndex))
        .collect();
    // Each placed cell's slots go to the first serving cell along its standby chain.
    let mut home_of: Vec<Option<CellIndex>> = Vec::with_capacity(cells.len());
    for c in &cells {
        home_of.push(serving_home(&cells, &index, &c.name));
    }
    let mut owners = Vec::with_capacity(slots as usize);
    let mut data_homes = Vec::with_capacity(slots as usize);
    for (slot, &placed) in placement.owners.iter().enumerate() {
        // Kept where the table in force has the slot's data (a pinned slot's is the pin's).
        let kept = current
            .filter(|t| !t.pins.contains_key(&(slot as Slot)))
            .and_then(|t| index.get(t.data_home(slot as Slot).name.as_str()).copied());
        let i = kept.unwrap_or_else(|| index[placement.cells[usize::from(placed)].as_str()]);
        let name = &cells[usize::from(i)].name;
        data_homes.push(i);
        owners.push(home_of[usize::from(i)].ok_or_else(|| {
            cellplane_cells::Error::InvalidTable {
                field: format!("cells[{name}].standby"),
                problem: "the cell does not serve and no cell along its standby chain does; \
                          fail back or pair a healthy standby"
                    .into(),
            }
        })?);
    }
    let mut pins = BTreeMap::new();
    let mut ignored = Vec::new();
    for (&slot, cell) in &inputs.pins {
        let why = if slot >= slots {
            Some(format!("slot {slot} is out of range (0..{slots})"))
        } else {
            match index.get(cell.as_str()) {
                None => Some(format!("{cell:?} is not in the table")),
                Some(&i) if !serves_traffic(cells[usize::from(i)].state) => {
                    Some(format!("{cell:?} does not serve traffic"))
                }
                Some(&i) => {
                    owners[slot as usize] = i;
                    data_homes[slot as usize] = i;
                    pins.insert(slot, cell.clone());
                    None
                }
            }
        };
        if let Some(why) = why {
            ignored.push(IgnoredPin {
                slot,
                cell: cell.clone(),
                why,
            });
        }
    }
    let mut next = RoutingTable {
        platform: inputs.platform.clone(),
        epoch: current.map_or(1, |t| t.epoch),
        slots,
        cells,
        owners,
        pins,
        data_homes,
        // A slot move's cut-over owns these until it flips or thaws them.
        frozen_slots: current.map(|t| t.frozen_slots.clone()).unwrap_or_default(),
    };
    next.compact_data_homes();
    if let Some(cur) = current {
        if *cur == next {
            return Ok((Plan::Keep, ignored));
        }
        next.epoch = cur.epoch + 1;
    }
    next.validate()?;
    Ok((Plan::Write(Box::new(next)), ignored))
}

/// The table entry of a declared cell, or None while it has never registered an address.
fn entry(
    m: &Member,
    current: Option<&RoutingTable>,
    reg: Option<&Registration>,
) -> Option<(CellEntry, u32)> {
    let known = current.and_then(|t| t.cell(&m.name));
    let endpoints = match reg.and_then(dial_address) {
        Some(addr) => vec![addr.to_string()],
        None => known?.endpoints.clone(),
    };
    let (state, frozen) = known.map_or((CellPhase::Active, false), |k| (k.state, k.frozen));
    Some((
        CellEntry {
            name: m.name.clone(),
            region: m.region.clone(),
            state,
            endpoints,
            standby: m.standby.clone(),
            frozen,
        },
        m.weight,
    ))
}

/// The first serving cell along `cell`'s standby chain (itself first), if any.
fn serving_home(
    cells: &[CellEntry],
    index: &BTreeMap<&str, CellIndex>,
    cell: &str,
) -> Option<CellIndex> {
    let mut at = *index.get(cell)?;
    for _ in 0..cells.len() {
        let c = &cells[usize::from(at)];
        if serves_traffic(c.state) && !c.endpoints.is_empty() {
            return Some(at);
        }
        at = *index.get(c.standby.as_deref()?)?;
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    fn member(name: &str, region: &str, standby: &str) -> Member {
        Member {
            name: name.into(),
            region: region.into(),
            weight: 100,
            standby: Some(standby.into()),
        }
    }

    fn reg(addr: &str) -> Registration {
        Registration {
            region: "r".into(),
            zone: None,
            state: CellPhase::Active,
            capacity_weight: 100,
            standby: None,
            endpoints: BTreeMap::from([("app".into(), addr.into())]),
            healthy: true,
            mysql: None,
            kafka_lag: None,
            requests_per_sec: None,
            intent_generation: 0,
            healthy_since_ms: None,
        }
    }

    fn inputs(registered: &[&str]) -> Inputs {
        Inputs {
            platform: "shop".into(),
            slots: 1024,
            members: vec![
                member("a", "us", "b"),
                member("b", "eu", "a"),
                member("c", "us", "a"),
            ],
            registrations: registered
                .iter()
                .map(|n| (n.to_string(), reg(&format!("{n}.example:80"))))
                .collect(),
            pins: BTreeMap::new(),
            bring_up_over: true,
        }
    }

    fn write(plan: Plan) -> RoutingTable {
        match plan {
            Plan::Write(t) => *t,
            Plan::Keep => panic!("expected a write"),
        }
    }

    #[test]
    fn only_registered_cells_join_and_the_first_table_is_epoch_1() {
        assert_eq!(next_table(None, &inputs(&[])).unwrap().0, Plan::Keep);
        let t = write(next_table(None, &inputs(&["a", "b"])).unwrap().0);
        assert_eq!(t.epoch, 1);
        assert_eq!(t.cells.len(), 2);
        assert_eq!(t.slot_count("a") + t.slot_count("b"), 1024);
        assert_eq!(t.cell("a").unwrap().endpoints, vec!["a.example:80"]);
        assert_eq!(t.cell("a").unwrap().standby.as_deref(), Some("b"));
    }

    #[test]
    fn unchanged_inputs_keep_the_table_and_a_change_bumps_the_epoch_once() {
        let t1 = write(next_table(None, &inputs(&["a", "b"])).unwrap().0);
        assert_eq!(
            next_table(Some(&t1), &inputs(&["a", "b"])).unwrap().0,
            Plan::Keep
        );
        // A third cell registers: it joins the table with no slots (no slot goes anywhere
        // without its rows; slot moves give it some).
        let t2 = write(next_table(Some(&t1), &inputs(&["a", "b", "c"])).unwrap().0);
        assert_eq!(t2.epoch, 2);
        assert!(t2.cell("c").is_some());
        assert_eq!(t2.slot_count("c"), 0);
        assert_eq!(t2.owners.len(), t1.owners.len());
        assert!((0..1024).all(|s| t1.cell_for_slot(s).name == t2.cell_for_slot(s).name));
        // A slot move's flip is kept by the next recomputation.
        let moving = cellplane_cells::slot_set::SlotSet::of(1024, [1, 2, 3]).unwrap();
        let moved = t2.moved_slots(&moving, "c").unwrap();
        assert_eq!(
            next_table(Some(&moved), &inputs(&["a", "b", "c"]))
                .unwrap()
                .0,
            Plan::Keep
        );
        // A moved endpoint is a change too.
        let mut moved_addr = inputs(&["a", "b", "c"]);
        moved_addr
            .registrations
            .insert("a".into(), reg("a2.example:80"));
        let t3 = write(next_table(Some(&t2), &moved_addr).unwrap().0);
        assert_eq!(t3.epoch, 3);
        assert_eq!(t3.owners, t2.owners);
    }

    #[test]
    fn the_first_table_waits_for_every_declared_cell_until_the_bring_up_grace() {
        let mut waiting = inputs(&["a", "b"]);
        waiting.bring_up_over = false;
        assert_eq!(next_table(None, &waiting).unwrap().0, Plan::Keep);
        let mut all = inputs(&["a", "b", "c"]);
        all.bring_up_over = false;
        let t = write(next_table(None, &all).unwrap().0);
        assert!(["a", "b", "c"].iter().all(|c| t.slot_count(c) > 250));
    }

    #[test]
    fn a_cell_whose_registration_expired_keeps_its_slots_and_endpoints() {
        let t1 = write(next_table(None, &inputs(&["a", "b"])).unwrap().0);
        let (plan, _) = next_table(Some(&t1), &inputs(&["b"])).unwrap();
        assert_eq!(plan, Plan::Keep, "no rehash onto shards without the data");
    }

    #[test]
    fn a_cell_no_set_declares_leaves_and_its_slots_are_placed_again() {
        let t1 = write(next_table(None, &inputs(&["a", "b", "c"])).unwrap().0);
        let mut fewer = inputs(&["a", "b", "c"]);
        fewer.members.retain(|m| m.name != "c");
        let t2 = write(next_table(Some(&t1), &fewer).unwrap().0);
        assert!(t2.cell("c").is_none());
        assert_eq!(t2.slot_count("a") + t2.slot_count("b"), 1024);
    }

    #[test]
    fn failed_over_cells_stay_failed_over_and_their_slots_stay_with_the_standby() {
        let t1 = write(next_table(None, &inputs(&["a", "b"])).unwrap().0);
        let t2 = t1.failed_over("a").unwrap();
        // The registrations still say Active: the table's own state wins.
        assert_eq!(
            next_table(Some(&t2), &inputs(&["a", "b"])).unwrap().0,
            Plan::Keep
        );
        // A new cell joins: the slots placed on it move, a's stay with b.
        let t3 = write(next_table(Some(&t2), &inputs(&["a", "b", "c"])).unwrap().0);
        assert_eq!(t3.slot_count("a"), 0);
        assert_eq!(t3.cell("a").unwrap().state, CellPhase::FailedOver);
        // The slots still placed on a are served by b from a's data.
        let a_data = (0..1024).filter(|&s| t3.data_home(s).name == "a").count();
        assert!(a_data > 0);
        assert!((0..1024)
            .filter(|&s| t3.data_home(s).name == "a")
            .all(|s| t3.cell_for_slot(s).name == "b"));
        // Failing back (the table's state) makes the table plain again.
        let t4 = t3.failed_back("a").unwrap();
        assert!(t4.data_homes.is_empty());
        assert_eq!(
            next_table(Some(&t4), &inputs(&["a", "b", "c"])).unwrap().0,
            Plan::Keep
        );
        for s in 0..1024 {
            let owner = &t3.cell_for_slot(s).name;
            assert!(owner == "b" || owner == "c");
        }
    }

    #[test]
    fn no_serving_cell_on_the_standby_chain_is_an_error_naming_the_cell() {
        let t1 = write(next_table(None, &inputs(&["a", "b"])).unwrap().0);
        let mut broken = t1.clone();
        for c in &mut broken.cells {
            c.state = CellPhase::FailedOver;
        }
        let err = next_table(Some(&broken), &inputs(&["a", "b"])).unwrap_err();
        assert!(err.to_string().contains(".standby"), "{err}");
    }

    #[test]
    fn pins_override_the_placement_and_bad_pins_are_reported_not_applied() {
        let t1 = write(next_table(None, &inputs(&["a", "b"])).unwrap().0);
        let slot = (0..1024)
            .find(|&s| t1.cell_for_slot(s).name == "a")
            .unwrap();
        let mut pinned = inputs(&["a", "b"]);
        pinned.pins = BTreeMap::from([(slot, "b".into()), (5000, "a".into()), (1, "zz".into())]);
        let (plan, ignored) = next_table(Some(&t1), &pinned).unwrap();
        let t2 = write(plan);
        assert_eq!(t2.cell_for_slot(slot).name, "b");
        assert_eq!(t2.pinned(slot), Some("b"));
        assert_eq!(t2.pins.len(), 1);
        assert_eq!(ignored.len(), 2);
        assert!(ignored
            .iter()
            .any(|p| p.slot == 5000 && p.why.contains("out of range")));
        assert!(ignored
            .iter()
            .any(|p| p.cell == "zz" && p.why.contains("not in the table")));
        // Only the pinned slot moved.
        let moved = (0..1024)
            .filter(|&s| t1.cell_for_slot(s).name != t2.cell_for_slot(s).name)
            .count();
        assert_eq!(moved, 1);
        // Removing the pin puts the slot back.
        let t3 = write(next_table(Some(&t2), &inputs(&["a", "b"])).unwrap().0);
        assert_eq!(t3.owners, t1.owners);
        assert!(t3.pins.is_empty());
    }

    #[test]
    fn frozen_is_kept_across_recomputation() {
        let t1 = write(next_table(None, &inputs(&["a", "b"])).unwrap().0);
        let f = t1.frozen("a").unwrap();
        assert_eq!(
            next_table(Some(&f), &inputs(&["a", "b"])).unwrap().0,
            Plan::Keep
        );
    }
}
