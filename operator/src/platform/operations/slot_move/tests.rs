//! A slot move driven through a world played by the test: the target's region copies,
//! verifies and follows as ordered, the source's apps drain, routers acknowledge.

use super::*;
use crate::platform::operations::test_world::{healthy_registration, pair_table};
use crate::platform::operations::Outcome;
use crate::platform::operations::{Operation, Recent};
use cellplane_cells::etcd_keys::{Registration, RouterAck};
use cellplane_cells::slot_move::{reference_app_tables, RetireReport};
use std::collections::BTreeMap;

struct MoveWorld {
    now_ms: u64,
    table: RoutingTable,
    cells: BTreeMap<String, Registration>,
    routers: BTreeMap<String, RouterAck>,
    intents: BTreeMap<String, Intent>,
    owners: BTreeMap<String, usize>,
    drained: BTreeMap<String, u64>,
    recent: Recent,
    busy: bool,
    /// The source's apps stop draining (a write that never ends).
    stuck_writes: bool,
    /// The source's region stops carrying out intents (its reports go stale).
    deaf_source: bool,
    /// The target's region cannot copy (this error).
    copy_fails: Option<String>,
    /// What the target's verification finds different, by phase.
    mismatch_in: Option<MovePhase>,
    /// Every table written, in order.
    tables: Vec<RoutingTable>,
}

fn slots(text: &str) -> SlotSet {
    SlotSet::parse(256, text).unwrap()
}

impl MoveWorld {
    fn new() -> Self {
        let table = pair_table(7, 256);
        let mut cells = BTreeMap::new();
        for (cell, region, domain) in [("a", "us", 1), ("b", "eu", 2)] {
            let mut reg = healthy_registration(
                region,
                MysqlReport {
                    read_only: false,
                    gtid_binlog_pos: format!("{domain}-{domain}-100"),
                    ..MysqlReport::default()
                },
            );
            reg.endpoints
                .insert("mysql".into(), format!("{cell}.example:3306"));
            cells.insert(cell.to_string(), reg);
        }
        let routers = ["r-us", "r-eu"]
            .into_iter()
            .map(|id| {
                (
                    id.to_string(),
                    RouterAck {
                        region: "x".into(),
                        applied_epoch: 7,
                        ..Default::default()
                    },
                )
            })
            .collect();
        Self {
            now_ms: 1_000,
            cells,
            routers,
            // Each cell serves and stands by for the other, as the table implies.
            intents: ["a", "b"]
                .into_iter()
                .map(|cell| {
                    let (writable, replicate_from) = default_for(&table, cell).unwrap();
                    let intent = Intent {
                        generation: 1,
                        writable,
                        replicate_from,
                        ..Intent::default()
                    };
                    (cell.to_string(), intent)
                })
                .collect(),
            owners: BTreeMap::from([("a".into(), 1), ("b".into(), 1)]),
            drained: BTreeMap::from([("a".into(), 7), ("b".into(), 7)]),
            recent: Recent::default(),
            busy: false,
            stuck_writes: false,
            deaf_source: false,
            copy_fails: None,
            mismatch_in: None,
            tables: Vec::new(),
            table,
        }
    }

    fn observed(&self) -> Observed<'_> {
        Observed {
            now_ms: self.now_ms,
            table: &self.table,
            cells: &self.cells,
            routers: &self.routers,
            intents: &self.intents,
            owners: &self.owners,
            drained: &self.drained,
            busy: self.busy,
            recent: &self.recent,
        }
    }

    fn apply(&mut self, actions: Vec<Action>) {
        for a in actions {
            match a {
                Action::WriteTable(t) => {
                    assert_eq!(t.epoch, self.table.epoch + 1, "every write bumps the epoch");
                    t.validate().unwrap();
                    self.tables.push((*t).clone());
                    self.table = *t;
                }
                Action::WriteIntent { cell, intent } => {
                    self.intents.insert(cell, intent);
                }
            }
        }
    }

    /// The regions, apps and routers act; 100 ms pass.
    fn tick(&mut self) {
        self.now_ms += 100;
        let ids: Vec<String> = self.routers.keys().cloned().collect();
        for id in ids {
            self.router_applies(&id);
        }
        if !self.deaf_source {
            self.region_reports("a");
        }
        self.region_reports("b");
        if !self.stuck_writes {
            self.drained.insert("a".into(), self.table.epoch);
        }
        self.target_moves();
        self.source_retires();
    }

    /// Router `id` applies the table in force.
    fn router_applies(&mut self, id: &str) {
        let r = self.routers.get_mut(id).unwrap();
        if r.applied_epoch < self.table.epoch {
            r.applied_epoch = self.table.epoch;
            r.held_total += 2;
        }
    }

    /// `cell`'s region carries out its intent's generation and reports it.
    fn region_reports(&mut self, cell: &str) {
        if let (Some(intent), Some(reg)) = (self.intents.get(cell), self.cells.get_mut(cell)) {
            reg.intent_generation = intent.generation;
        }
    }

    /// The target's region: one stage further, as its order says.
    fn target_moves(&mut self) {
        let order = self.intents.get("b").and_then(|i| i.slot_move.clone());
        let mysql = self.cells.get_mut("b").unwrap().mysql.as_mut().unwrap();
        if let Some(order) = order {
            let report = mysql.slot_move.get_or_insert_with(MoveReport::default);
            if report.operation != order.operation {
                *report = MoveReport {
                    operation: order.operation.clone(),
                    ..MoveReport::default()
                };
            }
            if let Some(error) = &self.copy_fails {
                report.stage = MoveStage::Failed;
                report.error = error.clone();
                return;
            }
            let differs = self.mismatch_in == Some(order.phase);
            report.phase = Some(order.phase);
            report.stage = match (order.phase, report.stage) {
                (_, MoveStage::Mismatch) => MoveStage::Mismatch,
                (MovePhase::Copy, MoveStage::Copying) => {
                    report.rows_copied = 40;
                    report.rows_scanned = 80;
                    MoveStage::Verifying
                }
                (_, MoveStage::Verifying | MoveStage::Following) if differs => {
                    report.mismatches = vec!["profiles slot 3: 10 rows on a, 9 on b".into()];
                    report.verified_at = "1-1-120".into();
                    MoveStage::Mismatch
                }
                (MovePhase::Copy, MoveStage::Verifying) => {
                    report.verified_rows = Some(40);
                    report.verified_at = "1-1-110".into();
                    MoveStage::Following
                }
                (MovePhase::Final, MoveStage::Following) => {
                    report.verified_rows = Some(41);
                    report.verified_at = "1-1-130".into();
                    MoveStage::Synced
                }
                (_, stage) => stage,
            };
        }
    }

    /// The source's region deletes what it is told to.
    fn source_retires(&mut self) {
        let retire = self.intents.get("a").and_then(|i| i.retire.clone());
        if let Some(order) = retire {
            let mysql = self.cells.get_mut("a").unwrap().mysql.as_mut().unwrap();
            mysql.retired = Some(RetireReport {
                operation: order.operation,
                rows_deleted: 41,
                done: true,
                error: String::new(),
            });
        }
    }

    /// Advances `op` until it ends or `max` ticks pass; each pass's actions carried out.
    fn run(&mut self, mut op: SlotMove, max: usize) -> SlotMove {
        for _ in 0..max {
            let (next, actions) = advance(&op, &self.observed());
            self.apply(actions);
            op = next;
            if op.finished() {
                break;
            }
            self.tick();
        }
        op
    }
}

fn start(w: &MoveWorld, text: &str) -> SlotMove {
    let limits = MoveLimits {
        retention_ms: 60_000,
        ..MoveLimits::default()
    };
    SlotMove::new(
        "mv-1",
        "a",
        "b",
        &slots(text),
        reference_app_tables(),
        "tester",
        limits,
        w.now_ms,
    )
}

fn steps(op: &SlotMove) -> Vec<Step> {
    op.steps.iter().map(|s| s.step).collect()
}

/// Some slots `a` serves (the pair's placement gives each cell half).
fn a_slots(w: &MoveWorld, n: usize) -> String {
    let a = w.table.index_of("a").unwrap();
    let mine: Vec<u32> = (0..256u32)
        .filter(|&s| usize::from(w.table.owners[s as usize]) == a)
        .take(n)
        .collect();
    SlotSet::of(256, mine).unwrap().to_string()
}

mod model;

#[test]
fn a_move_copies_verifies_freezes_only_its_slots_syncs_flips_and_retires() {
    let mut w = MoveWorld::new();
    let before = w.table.clone();
    let moving = a_slots(&w, 10);
    let op = w.run(start(&w, &moving), 2_000);
    assert_eq!(
        op.outcome,
        Some(Outcome::Succeeded { warnings: vec![] }),
        "{op:#?}"
    );
    assert_eq!(steps(&op), STEPS.to_vec());
    // Two table writes: the freeze of exactly the moving slots, then the flip.
    assert_eq!(w.tables.len(), 2);
    let set = slots(&moving);
    assert_eq!(w.tables[0].frozen_slot_set().unwrap(), set);
    assert_eq!(
        w.tables[0].owners, before.owners,
        "the freeze moves nothing"
    );
    assert!(
        w.tables[0].cells.iter().all(|c| !c.frozen),
        "no cell is frozen whole"
    );
    let after = &w.tables[1];
    assert!(after.frozen_slots.is_empty());
    for s in 0..256u32 {
        let owner = &after.cell_for_slot(s).name;
        if set.contains(s) {
            assert_eq!(owner, "b", "slot {s} moved");
            assert_eq!(after.data_home(s).name, "b", "its data lives with b");
        } else {
            assert_eq!(owner, &before.cell_for_slot(s).name, "slot {s} stayed");
        }
    }
    assert_eq!(op.freeze_epoch, Some(8));
    assert_eq!(op.flip_epoch, Some(9));
    assert_eq!(op.copied_rows, Some(40));
    assert_eq!(op.verified_rows, Some(41));
    assert_eq!(op.synced_at.as_deref(), Some("1-1-130"));
    assert!(op.write_freeze_ms().unwrap() > 0);
    assert!(op.held_requests.unwrap() >= 4);
    // The retention window passed before the source's copies were deleted.
    let flip_done = op.released_at_ms.unwrap();
    let retire_end = op.steps.last().unwrap().ended_ms;
    assert!(
        retire_end >= flip_done + 60_000,
        "{retire_end} vs {flip_done}"
    );
    assert_eq!(op.retired_slots.as_deref(), Some(moving.as_str()));
    assert_eq!(op.retired_rows, Some(41));
    // The orders ended with the move; both cells keep their roles.
    for cell in ["a", "b"] {
        let i = &w.intents[cell];
        assert!(i.slot_move.is_none() && i.retire.is_none(), "{cell}: {i:?}");
        assert!(i.writable);
    }
    let json = serde_json::to_vec(&Operation::SlotMove(op.clone())).unwrap();
    assert_eq!(
        serde_json::from_slice::<Operation>(&json).unwrap(),
        Operation::SlotMove(op)
    );
}

#[test]
fn the_target_is_ordered_to_copy_then_to_sync_after_the_drain() {
    let mut w = MoveWorld::new();
    let mut op = start(&w, &a_slots(&w, 4));
    let mut phases = Vec::new();
    for _ in 0..200 {
        let (next, actions) = advance(&op, &w.observed());
        w.apply(actions);
        let phase = w
            .intents
            .get("b")
            .and_then(|i| i.slot_move.as_ref())
            .map(|o| o.phase);
        if phases.last() != Some(&(next.step, phase)) {
            phases.push((next.step, phase));
        }
        op = next;
        if op.step == Step::Retire {
            break;
        }
        w.tick();
    }
    use MovePhase::*;
    assert_eq!(
        phases,
        vec![
            (Step::Copy, None),
            (Step::Copy, Some(Copy)),
            (Step::Verify, Some(Copy)),
            (Step::Freeze, Some(Copy)),
            (Step::Drain, Some(Copy)),
            (Step::FinalSync, Some(Copy)),
            (Step::FinalSync, Some(Final)),
            (Step::Flip, Some(Final)),
            (Step::Retire, None),
        ]
    );
}

#[test]
fn a_mismatch_at_the_verification_stops_the_move_before_anything_froze() {
    let mut w = MoveWorld::new();
    w.mismatch_in = Some(MovePhase::Copy);
    let op = w.run(start(&w, &a_slots(&w, 4)), 200);
    match &op.outcome {
        Some(Outcome::RolledBack { step, reason }) => {
            assert_eq!(*step, Step::Verify);
            assert!(reason.contains("profiles slot 3"), "{reason}");
        }
        other => panic!("{other:?}"),
    }
    assert!(w.tables.is_empty(), "nothing was frozen or moved");
    assert!(w.intents["b"].slot_move.is_none(), "the copy stopped");
}

#[test]
fn a_copy_that_keeps_failing_stops_the_move_after_the_step_deadline_with_its_error() {
    let mut w = MoveWorld::new();
    w.copy_fails = Some("table cell_b.orders does not exist on the target".into());
    let op = w.run(start(&w, &a_slots(&w, 4)), 2_000);
    match &op.outcome {
        Some(Outcome::RolledBack { step, reason }) => {
            assert_eq!(*step, Step::Copy);
            assert!(reason.contains("does not exist on the target"), "{reason}");
        }
        other => panic!("{other:?}"),
    }
    let copy = op.steps.iter().find(|s| s.step == Step::Copy).unwrap();
    let ran = copy.ended_ms - copy.started_ms;
    assert!(
        (30_000..40_000).contains(&ran),
        "{ran} ms, not the copy's hour"
    );
    assert!(w.tables.is_empty());
}

#[test]
fn a_mismatch_at_the_final_sync_unfreezes_the_slots_on_the_source() {
    let mut w = MoveWorld::new();
    let before = w.table.clone();
    w.mismatch_in = Some(MovePhase::Final);
    let op = w.run(start(&w, &a_slots(&w, 4)), 200);
    assert!(
        matches!(
            &op.outcome,
            Some(Outcome::RolledBack {
                step: Step::FinalSync,
                ..
            })
        ),
        "{:?}",
        op.outcome
    );
    assert_eq!(w.tables.len(), 2, "the freeze, then the thaw");
    assert!(w.table.frozen_slots.is_empty());
    assert_eq!(
        w.table.owners, before.owners,
        "the source still owns its slots"
    );
    assert!(w.intents["b"].slot_move.is_none());
}

#[test]
fn writes_that_never_drain_roll_the_move_back_after_the_step_timeout() {
    let mut w = MoveWorld::new();
    w.stuck_writes = true;
    let op = w.run(start(&w, &a_slots(&w, 4)), 2_000);
    match &op.outcome {
        Some(Outcome::RolledBack { step, reason }) => {
            assert_eq!(*step, Step::Drain);
            assert!(reason.contains("drained to epoch 7, want 8"), "{reason}");
        }
        other => panic!("{other:?}"),
    }
    assert!(w.table.frozen_slots.is_empty());
    // A source with no live ownership lease cannot write: it counts as drained.
    let mut w = MoveWorld::new();
    w.stuck_writes = true;
    w.owners.remove("a");
    let op = w.run(start(&w, &a_slots(&w, 4)), 2_000);
    assert_eq!(op.outcome, Some(Outcome::Succeeded { warnings: vec![] }));
}

#[test]
fn an_order_backlog_measured_before_the_writes_ended_does_not_count() {
    // The source's region stops reporting: its last report says "no backlog", but it was
    // measured before the last orders were acknowledged.
    let mut w = MoveWorld::new();
    let mut op = start(&w, &a_slots(&w, 4));
    while op.step != Step::Drain {
        let (next, actions) = advance(&op, &w.observed());
        w.apply(actions);
        op = next;
        w.tick();
    }
    w.deaf_source = true;
    let op = w.run(op, 1_000);
    assert!(
        matches!(
            &op.outcome,
            Some(Outcome::RolledBack {
                step: Step::Drain,
                ..
            })
        ),
        "{:?}",
        op.outcome
    );
    assert!(w.table.frozen_slots.is_empty());
}

#[test]
fn the_preflight_names_the_gate_and_the_fix() {
    let w = MoveWorld::new();
    let b = w.table.index_of("b").unwrap();
    let b_slot = (0..256u32)
        .find(|&s| usize::from(w.table.owners[s as usize]) == b)
        .unwrap();
    let refused = |w: &MoveWorld, op: SlotMove| match advance(&op, &w.observed()).0.outcome {
        Some(Outcome::Refused { gate, message }) => (gate, message),
        other => panic!("{other:?}"),
    };
    let (gate, msg) = refused(&w, start(&w, &b_slot.to_string()));
    assert_eq!(gate, "slots");
    assert!(msg.contains("served by b, not a"), "{msg}");
    let mut op = start(&w, &a_slots(&w, 2));
    op.tables.clear();
    let (gate, msg) = refused(&w, op);
    assert_eq!(gate, "tables");
    assert!(msg.contains("--table NAME:KEY_COLUMN"), "{msg}");
    let mut op = start(&w, &a_slots(&w, 2));
    op.target = "a".into();
    assert_eq!(refused(&w, op).0, "target");
    let mut busy = MoveWorld::new();
    busy.busy = true;
    assert_eq!(
        refused(&busy, start(&busy, &a_slots(&busy, 2))).0,
        "concurrent"
    );
    // A wave of a rebalance waits instead.
    let mut wave = start(&busy, &a_slots(&busy, 2));
    wave.parent = Some("rebalance-1".into());
    let (waiting, actions) = advance(&wave, &busy.observed());
    assert_eq!((waiting.step, actions), (Step::Preflight, vec![]));
    // Slots served after a failover (their data with the old home) are refused.
    let mut failed = MoveWorld::new();
    failed.table = failed.table.failed_over("a").unwrap();
    let moving = {
        let t = &failed.table;
        let a = t.index_of("a").unwrap();
        let s = (0..256u32).find(|&s| t.data_home_index(s) == a).unwrap();
        s.to_string()
    };
    let mut op = start(&failed, &moving);
    op.source = "b".into();
    op.target = "a".into();
    let (gate, msg) = refused(&failed, op);
    assert!(gate == "target" || gate == "slots", "{gate}: {msg}");
    let mut readonly = MoveWorld::new();
    readonly
        .cells
        .get_mut("b")
        .unwrap()
        .mysql
        .as_mut()
        .unwrap()
        .read_only = true;
    let (gate, msg) = refused(&readonly, start(&readonly, &a_slots(&readonly, 2)));
    assert_eq!(gate, "target");
    assert!(msg.contains("not reported writable"), "{msg}");
}

#[test]
fn every_step_run_twice_with_its_actions_lost_asks_for_the_same_again() {
    // A leader that dies after persisting a record but before acting: the next leader
    // runs the same step on the same record and must ask for the same writes.
    let mut w = MoveWorld::new();
    let mut op = start(&w, &a_slots(&w, 6));
    for _ in 0..2_000 {
        let (next, actions) = advance(&op, &w.observed());
        let (again, actions_again) = advance(&op, &w.observed());
        assert_eq!(next, again);
        assert_eq!(actions, actions_again);
        w.apply(actions);
        // The next pass never writes an intent that is in force already.
        if !next.finished() {
            let (_, repeat) = advance(&next, &w.observed());
            for a in &repeat {
                if let Action::WriteIntent { cell, intent } = a {
                    let in_force = w.intents.get(cell).map(|i| Intent {
                        generation: intent.generation,
                        ..i.clone()
                    });
                    assert_ne!(in_force.as_ref(), Some(intent), "{:?}", next.step);
                }
            }
        }
        op = next;
        if op.finished() {
            break;
        }
        w.tick();
    }
    assert_eq!(op.outcome, Some(Outcome::Succeeded { warnings: vec![] }));
}

#[test]
fn slots_moved_back_during_the_retention_window_keep_their_rows_on_the_source() {
    let mut w = MoveWorld::new();
    let moving = a_slots(&w, 4);
    let mut op = start(&w, &moving);
    while op.step != Step::Retire {
        let (next, actions) = advance(&op, &w.observed());
        w.apply(actions);
        op = next;
        w.tick();
    }
    assert!(!op.holds_cells(), "the retention window holds no cell");
    // A move back of every slot lands inside the window.
    w.table = w.table.moved_slots(&slots(&moving), "a").unwrap();
    w.now_ms += 120_000;
    let op = w.run(op, 10);
    assert_eq!(op.retired_rows, Some(0));
    assert!(op.retired_slots.is_none());
    assert!(
        w.intents.get("a").is_none_or(|i| i.retire.is_none()),
        "nothing was ordered deleted"
    );
    assert!(op.steps.last().unwrap().note.contains("back on a"));
}
