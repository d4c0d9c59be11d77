//! The model check of a slot move: random schedules of routers, apps, regions and leaders
//! (each acts or not every tick, time jumps up to 3 s, a leader may die between persisting a
//! record and acting on it), with clients writing the moving slots through the routers the
//! whole time. At every step each write is admitted by at most one cell, the one its app's
//! table makes the slot's writable home; at the end, every write acknowledged for a moving
//! slot is in the rows that end up serving it: on the source when the move rolled back,
//! within the final sync's snapshot when it flipped.

use super::*;
use crate::platform::operations::test_world::Dice;

/// A write a cell admitted: its slot, the table epoch its app admitted it under, and when
/// it completes (its acknowledgement).
struct Write {
    cell: &'static str,
    slot: u32,
    epoch: u64,
    done_at: u64,
}

struct Model {
    w: MoveWorld,
    dice: Dice,
    tick: u64,
    /// Every table written, by epoch (apps and routers route with the one they applied).
    tables: BTreeMap<u64, RoutingTable>,
    /// The epoch each cell's app applied.
    app_epoch: BTreeMap<&'static str, u64>,
    in_flight: Vec<Write>,
    /// Acknowledged writes of moving slots: (cell, slot, admitted epoch, tick).
    acked: Vec<(&'static str, u32, u64, u64)>,
    /// When the target's final sync read the source (its snapshot).
    snapshot_at: Option<u64>,
    moving: SlotSet,
    /// Percent per tick that routers apply, apps apply, regions act.
    odds: [u64; 3],
}

impl Model {
    fn new(seed: u64) -> (Self, SlotMove) {
        let w = MoveWorld::new();
        let mut dice = Dice(seed | 1);
        let n = 1 + dice.below(8) as usize;
        let op = start(&w, &a_slots(&w, n));
        // Some schedules are slow enough for the steps' deadlines to pass (rollbacks).
        let odds = [3 + dice.below(98), 3 + dice.below(98), 3 + dice.below(98)];
        let model = Self {
            tables: BTreeMap::from([(w.table.epoch, w.table.clone())]),
            app_epoch: BTreeMap::from([("a", w.table.epoch), ("b", w.table.epoch)]),
            moving: op.slot_set().unwrap(),
            w,
            dice,
            tick: 0,
            in_flight: Vec::new(),
            acked: Vec::new(),
            snapshot_at: None,
            odds,
        };
        (model, op)
    }

    fn roll(&mut self, percent: u64) -> bool {
        self.dice.below(100) < percent
    }

    /// One tick of the world around the operation.
    fn tick(&mut self) {
        self.tick += 1;
        let longest = if self.roll(10) { 3_000 } else { 200 };
        self.w.now_ms += 50 + self.dice.below(longest);
        if let Some(t) = self
            .tables
            .get(&self.w.table.epoch)
            .filter(|t| **t != self.w.table)
        {
            panic!("epoch {} written twice: {t:?}", t.epoch);
        }
        self.tables.insert(self.w.table.epoch, self.w.table.clone());
        let ids: Vec<String> = self.w.routers.keys().cloned().collect();
        for id in ids {
            if self.roll(self.odds[0]) {
                self.w.router_applies(&id);
            }
        }
        for cell in ["a", "b"] {
            if self.roll(self.odds[1]) {
                self.app_epoch.insert(cell, self.w.table.epoch);
            }
        }
        self.client_writes();
        self.complete_writes();
        // An app's drained epoch: the oldest epoch a running write was admitted at, else
        // the table it applied.
        for cell in ["a", "b"] {
            let oldest = self
                .in_flight
                .iter()
                .filter(|w| w.cell == cell)
                .map(|w| w.epoch)
                .min();
            self.w
                .drained
                .insert(cell.into(), oldest.unwrap_or(self.app_epoch[cell]));
        }
        for cell in ["a", "b"] {
            if self.roll(self.odds[2]) {
                self.w.region_reports(cell);
            }
        }
        if self.roll(self.odds[2]) {
            let before = self.synced();
            self.w.target_moves();
            if !before && self.synced() {
                // The final sync read the source's binary log up to here.
                self.snapshot_at = Some(self.tick);
            }
        }
        if self.roll(self.odds[2]) {
            self.w.source_retires();
        }
    }

    fn synced(&self) -> bool {
        self.w.cells["b"]
            .mysql
            .as_ref()
            .and_then(|m| m.slot_move.as_ref())
            .is_some_and(|r| r.stage == MoveStage::Synced)
    }

    /// A client writes a moving slot through a router: held while the router's table has
    /// the slot frozen, else sent to the cell that table names, whose app admits it only
    /// when its own table makes it the slot's writable home (else 421, not acknowledged).
    fn client_writes(&mut self) {
        if !self.roll(60) {
            return;
        }
        let slots: Vec<u32> = self.moving.iter().collect();
        let slot = slots[self.dice.below(slots.len() as u64) as usize];
        let ids: Vec<String> = self.w.routers.keys().cloned().collect();
        let router = &ids[self.dice.below(ids.len() as u64) as usize];
        let routed = &self.tables[&self.w.routers[router].applied_epoch];
        if routed.is_frozen(slot) {
            return;
        }
        let cell: &'static str = if routed.cell_for_slot(slot).name == "a" {
            "a"
        } else {
            "b"
        };
        let epoch = self.app_epoch[cell];
        let app_table = &self.tables[&epoch];
        if app_table.cell_for_slot(slot).name != cell || app_table.is_frozen(slot) {
            return;
        }
        // Most writes end within a few ticks; some take long (a slow MySQL commit).
        let longest = if self.roll(10) { 40 } else { 4 };
        let done_at = self.tick + self.dice.below(longest);
        self.in_flight.push(Write {
            cell,
            slot,
            epoch,
            done_at,
        });
    }

    fn complete_writes(&mut self) {
        let tick = self.tick;
        let (done, running): (Vec<Write>, Vec<Write>) =
            self.in_flight.drain(..).partition(|w| w.done_at <= tick);
        self.in_flight = running;
        self.acked
            .extend(done.into_iter().map(|w| (w.cell, w.slot, w.epoch, tick)));
    }
}

#[test]
fn model_check_a_slot_move_never_loses_an_acknowledged_write_or_has_two_writable_homes() {
    let mut outcomes: BTreeMap<String, usize> = BTreeMap::new();
    for seed in 0..400u64 {
        let (mut m, mut op) = Model::new(seed.wrapping_mul(0x9e37_79b9_7f4a_7c15));
        for _ in 0..6_000 {
            let (next, actions) = advance(&op, &m.w.observed());
            // A leader may die after persisting the record and before acting on it.
            if !m.roll(10) {
                m.w.apply(actions);
            }
            op = next;
            if op.finished() {
                break;
            }
            m.tick();
        }
        // The clients' last writes end.
        for _ in 0..45 {
            m.tick();
        }
        let t = &m.w.table;
        let flip = op.flip_epoch;
        let label = match &op.outcome {
            Some(Outcome::Succeeded { .. }) => "succeeded".to_string(),
            Some(Outcome::RolledBack { step, .. }) => format!("rolled back at {step:?}"),
            other => panic!("seed {seed}: {other:?}"),
        };
        *outcomes.entry(label).or_default() += 1;
        assert!(t.frozen_slots.is_empty(), "seed {seed}: {t:?}");
        for &(cell, slot, epoch, at) in &m.acked {
            let admitted = &m.tables[&epoch];
            // One writable home: a write is admitted only under a table that makes its
            // cell the slot's owner, unfrozen.
            assert_eq!(admitted.cell_for_slot(slot).name, cell, "seed {seed}");
            match (cell, flip) {
                // The source's writes must all be in the final sync's snapshot.
                ("a", Some(_)) => assert!(
                    m.snapshot_at.is_some_and(|s| at <= s),
                    "seed {seed}: a write acknowledged by the source at tick {at} after the final sync at {:?} is lost",
                    m.snapshot_at
                ),
                ("b", Some(flip)) => assert!(epoch >= flip, "seed {seed}"),
                ("b", None) => panic!("seed {seed}: the target took a write with no flip"),
                _ => {}
            }
        }
        let owner = if flip.is_some() { "b" } else { "a" };
        assert!(
            m.moving.iter().all(|s| t.cell_for_slot(s).name == owner),
            "seed {seed}"
        );
    }
    println!("{outcomes:?}");
    assert!(
        outcomes.get("succeeded").copied().unwrap_or(0) > 100,
        "{outcomes:?}"
    );
    assert!(outcomes.len() > 1, "some schedules roll back: {outcomes:?}");
}
