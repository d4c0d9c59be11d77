//! A planned switchover of one cell to its standby, as a pure step function:
//! `(record, observed state, now) -> (next record, actions)`. The leader persists the record
//! in `drills/<id>` (compare-and-swap on its revision) before it carries out the actions, so
//! a new leader picks the operation up where the old one stopped; every step looks at the
//! world before it acts, so running a step twice changes nothing.
//!
//! The steps, and why in this order:
//! 1. **Preflight**: refuse with the gate that failed; nothing has changed yet.
//! 2. **Freeze**: the table marks the cell frozen (new epoch); once every live router has
//!    applied it, routers hold the cell's requests and the app (which follows the table)
//!    refuses them with 421. No new order enters the cell.
//! 3. **Drain**: the cell's order persister empties its Kafka backlog into MySQL. This comes
//!    before the fence because the persister writes through the app's MySQL account, which
//!    `read_only` would stop.
//! 4. **Fence**: the home's MySQL goes `read_only` with the app's sessions killed (intent);
//!    its `gtid_binlog_pos` then is the final position.
//! 5. **Catch up**: the standby has applied the final position.
//! 6. **Promote**: the standby stops replicating from the home (intent). From here on the
//!    operation goes forward only.
//! 7. **Flip**: one table write moves the slots to the standby, marks the cell FailedOver and
//!    unfreezes (new epoch); routers release the held requests to the new home.
//! 8. **Reverse**: the old home replicates from the new home, so a switch back is again
//!    zero loss.
//!
//! Before the promotion, a step that times out rolls back: the home is made writable and
//! unfrozen again.

use cellplane_cells::etcd_keys::{Intent, Registration, RouterAck};
use cellplane_cells::gtid;
use cellplane_cells::routing::{serves_traffic, RoutingTable};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

/// Gates and deadlines of a switchover (one place; defaults in [`Limits::default`]).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Limits {
    /// The RPO gate: most transactions the standby may be behind at preflight.
    pub max_lag_gtids: u64,
    /// How long a table change may take to reach every live router.
    pub ack_timeout_ms: u64,
    /// How long any other step may take.
    pub step_timeout_ms: u64,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_lag_gtids: 100,
            ack_timeout_ms: 5_000,
            step_timeout_ms: 30_000,
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Step {
    Preflight,
    Freeze,
    Drain,
    Fence,
    CatchUp,
    Promote,
    Flip,
    Reverse,
    RollBack,
    Done,
}

impl Step {
    /// Steps after which the operation only goes forward.
    fn past_promotion(self) -> bool {
        matches!(self, Step::Promote | Step::Flip | Step::Reverse)
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", tag = "result")]
pub enum Outcome {
    /// The slots moved; `warnings` lists what did not complete in time after the flip.
    Succeeded { warnings: Vec<String> },
    /// A preflight gate failed; nothing changed.
    Refused { gate: String, message: String },
    /// A step failed before the promotion; the home is writable and unfrozen again.
    RolledBack { step: Step, reason: String },
}

/// One step as it happened.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct StepRecord {
    pub step: Step,
    pub started_ms: u64,
    pub ended_ms: u64,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub note: String,
}

/// The persisted record of one switchover (`drills/<id>`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Switchover {
    pub id: String,
    pub cell: String,
    /// The standby the slots move to (fixed at creation).
    pub target: String,
    pub started_by: String,
    pub limits: Limits,
    pub step: Step,
    pub step_started_ms: u64,
    pub steps: Vec<StepRecord>,
    /// Epoch of the table that froze the cell, and when the freeze was written.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub freeze_epoch: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub frozen_at_ms: Option<u64>,
    /// Epoch of the table that moved the slots, and when every router had it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub flip_epoch: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub released_at_ms: Option<u64>,
    /// The home's position once fenced: what the standby must reach.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub final_gtid: Option<String>,
    /// Intent generations this operation asked for, by cell.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub intents: BTreeMap<String, u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub outcome: Option<Outcome>,
}

impl Switchover {
    pub fn new(
        id: &str,
        cell: &str,
        target: &str,
        started_by: &str,
        limits: Limits,
        now_ms: u64,
    ) -> Self {
        Self {
            id: id.into(),
            cell: cell.into(),
            target: target.into(),
            started_by: started_by.into(),
            limits,
            step: Step::Preflight,
            step_started_ms: now_ms,
            steps: Vec::new(),
            freeze_epoch: None,
            frozen_at_ms: None,
            flip_epoch: None,
            released_at_ms: None,
            final_gtid: None,
            intents: BTreeMap::new(),
            outcome: None,
        }
    }

    pub fn finished(&self) -> bool {
        self.step == Step::Done
    }

    /// How long the cell's writes were frozen (freeze written -> slots released).
    pub fn write_freeze_ms(&self) -> Option<u64> {
        Some(self.released_at_ms?.saturating_sub(self.frozen_at_ms?))
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
    /// Another unfinished operation touches the cell or its standby.
    pub busy: bool,
}

/// What the leader must do after persisting the next record.
#[derive(Clone, Debug, PartialEq)]
pub enum Action {
    /// Compare-and-swap the table.
    WriteTable(Box<RoutingTable>),
    /// Put the cell's intent.
    WriteIntent { cell: String, intent: Intent },
}

/// Advances `op` by at most one step.
pub fn advance(op: &Switchover, obs: &Observed) -> (Switchover, Vec<Action>) {
    let mut next = op.clone();
    let mut actions = Vec::new();
    if op.finished() {
        return (next, actions);
    }
    let elapsed = obs.now_ms.saturating_sub(op.step_started_ms);
    let timed_out = |limit: u64| elapsed > limit;
    let home = obs.cells.get(&op.cell);
    let target = obs.cells.get(&op.target);
    match op.step {
        Step::Preflight => match preflight(op, obs) {
            Err((gate, message)) => {
                finish(
                    &mut next,
                    obs.now_ms,
                    Outcome::Refused {
                        gate: gate.into(),
                        message,
                    },
                );
            }
            Ok(()) => enter(&mut next, Step::Freeze, obs.now_ms, String::new()),
        },
        Step::Freeze => {
            let frozen = obs.table.cell(&op.cell).is_some_and(|c| c.frozen);
            if !frozen {
                match obs.table.frozen(&op.cell) {
                    Ok(t) => {
                        next.frozen_at_ms.get_or_insert(obs.now_ms);
                        actions.push(Action::WriteTable(Box::new(t)));
                    }
                    Err(e) => return roll_back(op, obs, format!("could not freeze: {e}")),
                }
            } else {
                let epoch = *next.freeze_epoch.get_or_insert(obs.table.epoch);
                next.frozen_at_ms.get_or_insert(obs.now_ms);
                let behind = routers_behind(obs.routers, epoch);
                if behind.is_empty() {
                    enter(
                        &mut next,
                        Step::Drain,
                        obs.now_ms,
                        format!("every router at epoch {epoch}"),
                    );
                } else if timed_out(op.limits.ack_timeout_ms) {
                    return roll_back(
                        op,
                        obs,
                        format!(
                            "routers {} did not apply epoch {epoch} within {} ms",
                            behind.join(", "),
                            op.limits.ack_timeout_ms
                        ),
                    );
                }
            }
        }
        Step::Drain => match home.and_then(|h| h.kafka_lag) {
            Some(0) => enter(
                &mut next,
                Step::Fence,
                obs.now_ms,
                "order backlog persisted".into(),
            ),
            lag if timed_out(op.limits.step_timeout_ms) => {
                let seen = lag.map_or("not reported".to_string(), |l| l.to_string());
                return roll_back(
                    op,
                    obs,
                    format!(
                        "the order backlog did not drain in {} ms (lag {seen})",
                        op.limits.step_timeout_ms
                    ),
                );
            }
            _ => {}
        },
        Step::Fence => {
            // Fencing stops writes; whatever the home replicates as a standby goes on.
            let sources = current_sources(obs, &op.cell);
            let generation = want_intent(&mut next, &mut actions, obs, &op.cell, false, sources);
            let fenced = home.and_then(|h| {
                let m = h.mysql.as_ref()?;
                (h.intent_generation >= generation && m.read_only)
                    .then(|| m.gtid_binlog_pos.clone())
            });
            match fenced {
                Some(pos) => {
                    next.final_gtid = Some(pos.clone());
                    enter(
                        &mut next,
                        Step::CatchUp,
                        obs.now_ms,
                        format!("final position {pos}"),
                    );
                }
                None if timed_out(op.limits.step_timeout_ms) => {
                    return roll_back(
                        op,
                        obs,
                        format!(
                            "{} did not report read_only within {} ms",
                            op.cell, op.limits.step_timeout_ms
                        ),
                    );
                }
                None => {}
            }
        }
        Step::CatchUp => {
            let want = op.final_gtid.clone().unwrap_or_default();
            let applied = target
                .and_then(|t| t.mysql.as_ref()?.replicas.get(&op.cell))
                .map(|r| r.gtid_slave_pos.clone());
            match applied {
                Some(pos) if gtid::reached(&pos, &want) => {
                    enter(
                        &mut next,
                        Step::Promote,
                        obs.now_ms,
                        format!("{} reached {want}", op.target),
                    );
                }
                pos if timed_out(op.limits.step_timeout_ms) => {
                    let behind = pos.map_or("no replication".to_string(), |p| {
                        format!("{} transactions behind", gtid::lag(&want, &p))
                    });
                    return roll_back(
                        op,
                        obs,
                        format!(
                            "{} did not reach {want} within {} ms ({behind})",
                            op.target, op.limits.step_timeout_ms
                        ),
                    );
                }
                _ => {}
            }
        }
        Step::Promote => {
            // The target stops replicating the home; it keeps whatever else it replicates.
            let others = obs
                .intents
                .get(&op.target)
                .map(|i| {
                    i.replicate_from
                        .iter()
                        .filter(|c| **c != op.cell)
                        .cloned()
                        .collect()
                })
                .unwrap_or_default();
            let generation = want_intent(&mut next, &mut actions, obs, &op.target, true, others);
            let promoted = target.is_some_and(|t| {
                t.intent_generation >= generation
                    && t.mysql
                        .as_ref()
                        .is_some_and(|m| !m.replicas.contains_key(&op.cell) && !m.read_only)
            });
            if promoted {
                enter(
                    &mut next,
                    Step::Flip,
                    obs.now_ms,
                    format!(
                        "{} writable, replication from {} stopped",
                        op.target, op.cell
                    ),
                );
            } else if timed_out(op.limits.step_timeout_ms) {
                // Past the point of no return: keep asking, and say so.
                note_error(
                    &mut next,
                    format!(
                        "{} has not confirmed its promotion after {} ms",
                        op.target, op.limits.step_timeout_ms
                    ),
                );
            }
        }
        Step::Flip => {
            let moved = obs.table.slot_count(&op.cell) == 0
                && obs.table.cell(&op.cell).is_some_and(|c| !c.frozen);
            if !moved {
                match flipped(obs.table, &op.cell) {
                    Ok(t) => actions.push(Action::WriteTable(Box::new(t))),
                    Err(e) => note_error(&mut next, format!("flip refused: {e}")),
                }
            } else {
                let epoch = *next.flip_epoch.get_or_insert(obs.table.epoch);
                let behind = routers_behind(obs.routers, epoch);
                if behind.is_empty() || timed_out(op.limits.ack_timeout_ms) {
                    next.released_at_ms = Some(obs.now_ms);
                    let note = if behind.is_empty() {
                        format!("every router at epoch {epoch}")
                    } else {
                        format!("routers {} had not applied epoch {epoch}; the old home answers them 421", behind.join(", "))
                    };
                    enter(&mut next, Step::Reverse, obs.now_ms, note);
                }
            }
        }
        Step::Reverse => {
            let mut sources = current_sources(obs, &op.cell);
            if !sources.contains(&op.target) {
                sources.push(op.target.clone());
            }
            let generation = want_intent(&mut next, &mut actions, obs, &op.cell, false, sources);
            let replicating = home.is_some_and(|h| {
                h.intent_generation >= generation
                    && h.mysql
                        .as_ref()
                        .and_then(|m| m.replicas.get(&op.target))
                        .is_some_and(|r| r.running)
            });
            if replicating {
                let warnings = warnings(&next);
                finish(&mut next, obs.now_ms, Outcome::Succeeded { warnings });
            } else if timed_out(op.limits.step_timeout_ms) {
                note_error(
                    &mut next,
                    format!(
                        "{} does not replicate from {} yet; the platform keeps asking",
                        op.cell, op.target
                    ),
                );
                let warnings = warnings(&next);
                finish(&mut next, obs.now_ms, Outcome::Succeeded { warnings });
            }
        }
        Step::RollBack => {
            let sources = current_sources(obs, &op.cell);
            let generation = want_intent(&mut next, &mut actions, obs, &op.cell, true, sources);
            let frozen = obs.table.cell(&op.cell).is_some_and(|c| c.frozen);
            if frozen {
                let mut t = obs.table.clone();
                t.epoch += 1;
                if let Some(i) = t.index_of(&op.cell) {
                    t.cells[i].frozen = false;
                }
                actions.push(Action::WriteTable(Box::new(t)));
            }
            let writable = home.is_none_or(|h| {
                h.intent_generation >= generation && h.mysql.as_ref().is_none_or(|m| !m.read_only)
            });
            if !frozen && writable {
                let reason = op.steps.last().map(|s| s.note.clone()).unwrap_or_default();
                let failed = op.steps.last().map_or(Step::Preflight, |s| s.step);
                finish(
                    &mut next,
                    obs.now_ms,
                    Outcome::RolledBack {
                        step: failed,
                        reason,
                    },
                );
            }
        }
        Step::Done => {}
    }
    (next, actions)
}

/// The gates, in order; the first that fails names itself and the fix.
fn preflight(op: &Switchover, obs: &Observed) -> Result<(), (&'static str, String)> {
    let t = obs.table;
    let cell = t.cell(&op.cell).ok_or((
        "cell",
        format!(
            "{} is not in the routing table; check the name with `cellplane cells`",
            op.cell
        ),
    ))?;
    if obs.busy {
        return Err((
            "concurrent",
            format!(
                "another operation is running on {} or {}; wait for it (`cellplane drills`)",
                op.cell, op.target
            ),
        ));
    }
    if cell.frozen || !serves_traffic(cell.state) {
        return Err((
            "state",
            format!(
                "{} is {:?}{}; only a serving, unfrozen cell can switch over",
                op.cell,
                cell.state,
                if cell.frozen { " and frozen" } else { "" }
            ),
        ));
    }
    if cell.standby.as_deref() != Some(op.target.as_str()) {
        return Err((
            "standby",
            format!(
                "{} has no standby {} in the table (standby: {:?}); pair it in the CellSet",
                op.cell, op.target, cell.standby
            ),
        ));
    }
    let standby = t.cell(&op.target).ok_or((
        "standby",
        format!(
            "standby {} is not in the routing table; it has not registered yet",
            op.target
        ),
    ))?;
    if !serves_traffic(standby.state) || standby.frozen {
        return Err((
            "standby",
            format!(
                "standby {} is {:?}; it must be Active to take users",
                op.target, standby.state
            ),
        ));
    }
    let reg = obs.cells.get(&op.target).filter(|r| r.healthy).ok_or((
        "standby",
        format!(
            "standby {} is not registered and healthy; check its region",
            op.target
        ),
    ))?;
    let home = obs.cells.get(&op.cell).ok_or((
        "home",
        format!(
            "{} is not registered; its region must carry out the fence",
            op.cell
        ),
    ))?;
    let home_pos = home
        .mysql
        .as_ref()
        .map(|m| m.gtid_binlog_pos.clone())
        .ok_or((
            "home",
            format!("{} has not reported its MySQL position yet", op.cell),
        ))?;
    let replica = reg
        .mysql
        .as_ref()
        .and_then(|m| m.replicas.get(&op.cell))
        .filter(|r| r.running)
        .ok_or(("replication", format!("{} does not replicate {} (no running connection '{}'); the standby's region sets it up from its intent", op.target, op.cell, op.cell)))?;
    let lag = gtid::lag(&home_pos, &replica.gtid_slave_pos);
    if lag > op.limits.max_lag_gtids {
        return Err((
            "rpo",
            format!(
                "{} is {lag} transactions behind {} (gate: {}); wait for it to catch up",
                op.target, op.cell, op.limits.max_lag_gtids
            ),
        ));
    }
    if obs.routers.is_empty() {
        return Err((
            "routers",
            "no live router acknowledges tables; start one so the freeze can be confirmed".into(),
        ));
    }
    Ok(())
}

/// The table after the flip: the cell's slots on its standby, the cell FailedOver and no
/// longer frozen, one epoch later.
fn flipped(t: &RoutingTable, cell: &str) -> cellplane_cells::Result<RoutingTable> {
    let mut next = t.failed_over(cell)?;
    if let Some(i) = next.index_of(cell) {
        next.cells[i].frozen = false;
    }
    next.validate()?;
    Ok(next)
}

/// Routers whose applied epoch is below `epoch`, by id.
fn routers_behind(routers: &BTreeMap<String, RouterAck>, epoch: u64) -> Vec<String> {
    routers
        .iter()
        .filter(|(_, a)| a.applied_epoch < epoch)
        .map(|(id, _)| id.clone())
        .collect()
}

/// Asks for `cell`'s intent (once per step: the generation is remembered in the record);
/// returns the generation to wait for.
fn want_intent(
    next: &mut Switchover,
    actions: &mut Vec<Action>,
    obs: &Observed,
    cell: &str,
    writable: bool,
    replicate_from: Vec<String>,
) -> u64 {
    let current = obs.intents.get(cell);
    if let Some(c) = current.filter(|c| {
        c.writable == writable
            && c.replicate_from == replicate_from
            && c.operation.as_deref() == Some(next.id.as_str())
    }) {
        next.intents.insert(cell.into(), c.generation);
        return c.generation;
    }
    let generation = current.map_or(1, |c| c.generation + 1);
    next.intents.insert(cell.into(), generation);
    actions.push(Action::WriteIntent {
        cell: cell.into(),
        intent: Intent {
            generation,
            writable,
            replicate_from,
            operation: Some(next.id.clone()),
        },
    });
    generation
}

fn enter(next: &mut Switchover, step: Step, now_ms: u64, note: String) {
    next.steps.push(StepRecord {
        step: next.step,
        started_ms: next.step_started_ms,
        ended_ms: now_ms,
        note,
    });
    next.step = step;
    next.step_started_ms = now_ms;
}

fn finish(next: &mut Switchover, now_ms: u64, outcome: Outcome) {
    let note = match &outcome {
        Outcome::Refused { message, .. } => message.clone(),
        _ => String::new(),
    };
    enter(next, Step::Done, now_ms, note);
    next.outcome = Some(outcome);
}

fn roll_back(op: &Switchover, obs: &Observed, reason: String) -> (Switchover, Vec<Action>) {
    debug_assert!(!op.step.past_promotion());
    let mut next = op.clone();
    enter(&mut next, Step::RollBack, obs.now_ms, reason);
    advance(&next, obs)
}

/// What `cell` replicates today (its intent in force).
fn current_sources(obs: &Observed, cell: &str) -> Vec<String> {
    obs.intents
        .get(cell)
        .map(|i| i.replicate_from.clone())
        .unwrap_or_default()
}

/// Errors after the promotion are recorded (once) and the operation goes on.
fn note_error(next: &mut Switchover, error: String) {
    let note = format!("error: {error}");
    if next.steps.iter().any(|s| s.note == note) {
        return;
    }
    next.steps.push(StepRecord {
        step: next.step,
        started_ms: next.step_started_ms,
        ended_ms: next.step_started_ms,
        note,
    });
}

fn warnings(op: &Switchover) -> Vec<String> {
    op.steps
        .iter()
        .filter_map(|s| s.note.strip_prefix("error: ").map(str::to_string))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use cellplane_cells::crd::CellPhase;
    use cellplane_cells::etcd_keys::{MysqlReport, ReplicaReport};
    use cellplane_cells::routing::CellEntry;

    /// The world a switchover acts on, with the regions and routers played by the test:
    /// intents are carried out and tables acknowledged on the next tick unless told not to.
    struct World {
        now_ms: u64,
        table: RoutingTable,
        cells: BTreeMap<String, Registration>,
        routers: BTreeMap<String, RouterAck>,
        intents: BTreeMap<String, Intent>,
        /// Routers that stop acknowledging.
        stuck_routers: Vec<String>,
        /// Cells whose region stops carrying out intents.
        deaf_regions: Vec<String>,
        /// The standby stops applying (its replica position freezes).
        replica_frozen: bool,
        /// Random mode (model check): every tick, each router, region and replica acts or
        /// not by the dice, `a` takes writes whenever its MySQL actually is writable, and
        /// time jumps by up to 3 s.
        dice: Option<Dice>,
        /// What `b` has applied of `a`'s writes (random mode).
        b_applied_a: u64,
        /// Random mode: how reliably (percent per tick) routers acknowledge, regions carry
        /// out intents and the replica applies; each run draws its own.
        odds: [u64; 3],
        kafka_lag: u64,
        /// Writes each cell's primary took (its GTID sequence).
        writes: BTreeMap<String, u64>,
        busy: bool,
    }

    fn pos(cell: &str, seq: u64) -> String {
        let domain = if cell == "a" { 1 } else { 2 };
        format!("{domain}-{domain}-{seq}")
    }

    impl World {
        fn new() -> Self {
            let mut a = CellEntry::active("a", "us", vec!["a:80".into()]);
            a.standby = Some("b".into());
            let mut b = CellEntry::active("b", "eu", vec!["b:80".into()]);
            b.standby = Some("a".into());
            let table = RoutingTable::placed("shop", 7, 256, vec![(a, 1), (b, 1)]).unwrap();
            let mut w = World {
                now_ms: 1_000,
                table,
                cells: BTreeMap::new(),
                routers: BTreeMap::new(),
                intents: BTreeMap::new(),
                stuck_routers: Vec::new(),
                deaf_regions: Vec::new(),
                replica_frozen: false,
                kafka_lag: 0,
                writes: BTreeMap::from([("a".into(), 500), ("b".into(), 300)]),
                busy: false,
                dice: None,
                b_applied_a: 500,
                odds: [100, 100, 100],
            };
            // Each cell stands by for the other (the two-region ring).
            for (cell, source) in [("a", "b"), ("b", "a")] {
                w.intents.insert(
                    cell.into(),
                    Intent {
                        generation: 1,
                        writable: true,
                        replicate_from: vec![source.into()],
                        operation: None,
                    },
                );
            }
            for id in ["r-us", "r-eu"] {
                w.routers.insert(
                    id.into(),
                    RouterAck {
                        region: "x".into(),
                        applied_epoch: 7,
                        applied_at_ms: 1,
                    },
                );
            }
            w.tick();
            w
        }

        fn observed(&self) -> Observed<'_> {
            Observed {
                now_ms: self.now_ms,
                table: &self.table,
                cells: &self.cells,
                routers: &self.routers,
                intents: &self.intents,
                busy: self.busy,
            }
        }

        fn apply(&mut self, actions: Vec<Action>) {
            for a in actions {
                match a {
                    Action::WriteTable(t) => {
                        assert_eq!(
                            t.epoch,
                            self.table.epoch + 1,
                            "every write bumps the epoch by one"
                        );
                        t.validate().unwrap();
                        self.table = *t;
                    }
                    Action::WriteIntent { cell, intent } => {
                        self.intents.insert(cell, intent);
                    }
                }
            }
        }

        /// Regions carry out intents and report; routers acknowledge; 100 ms pass.
        fn roll(&mut self, percent: u64) -> bool {
            self.dice.as_mut().is_none_or(|d| d.below(100) < percent)
        }

        fn tick(&mut self) {
            self.now_ms += match self.dice.as_mut() {
                Some(d) => 1 + d.below(3000),
                None => 100,
            };
            if self.dice.is_some() {
                // The home takes writes while its MySQL really is writable (a stale app
                // or router may send them whatever the table says).
                let a_writable = self
                    .cells
                    .get("a")
                    .and_then(|r| r.mysql.as_ref())
                    .is_some_and(|m| !m.read_only);
                if a_writable && self.roll(80) {
                    *self.writes.get_mut("a").unwrap() += 1;
                }
                if self.roll(self.odds[2]) {
                    let step = self.dice.as_mut().unwrap().below(3);
                    self.b_applied_a = (self.b_applied_a + step).min(self.writes["a"]);
                }
                if self.kafka_lag > 0 && self.roll(50) {
                    self.kafka_lag -= 1;
                }
            }
            let ids: Vec<String> = self.routers.keys().cloned().collect();
            for id in ids {
                if !self.stuck_routers.contains(&id) && self.roll(self.odds[0]) {
                    let epoch = self.table.epoch;
                    self.routers.get_mut(&id).unwrap().applied_epoch = epoch;
                }
            }
            let names: Vec<String> = self.intents.keys().cloned().collect();
            for cell in names {
                let intent = self.intents[&cell].clone();
                let old = self.cells.get(&cell).cloned();
                if (self.deaf_regions.contains(&cell) || !self.roll(self.odds[1])) && old.is_some()
                {
                    continue;
                }
                let mut replicas = BTreeMap::new();
                for source in &intent.replicate_from {
                    let applied = if self.dice.is_some() && cell == "b" && source == "a" {
                        pos("a", self.b_applied_a)
                    } else if self.replica_frozen && cell == "b" {
                        old.as_ref()
                            .and_then(|o| o.mysql.as_ref()?.replicas.get(source).cloned())
                            .map(|r| r.gtid_slave_pos)
                            .unwrap_or_default()
                    } else {
                        pos(source, self.writes[source])
                    };
                    replicas.insert(
                        source.clone(),
                        ReplicaReport {
                            running: true,
                            gtid_slave_pos: applied,
                            ..Default::default()
                        },
                    );
                }
                self.cells.insert(
                    cell.clone(),
                    Registration {
                        region: "r".into(),
                        zone: None,
                        state: CellPhase::Active,
                        capacity_weight: 1,
                        standby: None,
                        endpoints: BTreeMap::new(),
                        healthy: true,
                        mysql: Some(MysqlReport {
                            read_only: !intent.writable,
                            gtid_binlog_pos: pos(&cell, self.writes[&cell]),
                            replicas,
                        }),
                        kafka_lag: Some(if cell == "a" { self.kafka_lag } else { 0 }),
                        intent_generation: intent.generation,
                    },
                );
            }
        }

        /// Runs `op` until it is done (or `max` ticks); returns it and every table written.
        fn run(&mut self, mut op: Switchover, max: usize) -> (Switchover, Vec<RoutingTable>) {
            let mut tables = Vec::new();
            for _ in 0..max {
                let (next, actions) = advance(&op, &self.observed());
                // The same observation again asks for nothing new (idempotent steps).
                let (again, repeat) = advance(&op, &self.observed());
                assert_eq!((&again, &repeat), (&next, &actions));
                for a in &actions {
                    if let Action::WriteTable(t) = a {
                        tables.push((**t).clone());
                    }
                }
                self.apply(actions);
                op = next;
                if op.finished() {
                    break;
                }
                self.tick();
            }
            (op, tables)
        }
    }

    fn start(w: &World) -> Switchover {
        Switchover::new("op-1", "a", "b", "test", Limits::default(), w.now_ms)
    }

    fn steps(op: &Switchover) -> Vec<Step> {
        op.steps
            .iter()
            .filter(|s| !s.note.starts_with("error: "))
            .map(|s| s.step)
            .collect()
    }

    #[test]
    fn a_switchover_moves_the_slots_in_order_and_reverses_replication() {
        let mut w = World::new();
        let before = w.table.clone();
        let a_slots = w.table.slot_count("a");
        let (op, tables) = w.run(start(&w), 100);
        assert_eq!(op.outcome, Some(Outcome::Succeeded { warnings: vec![] }));
        assert_eq!(
            steps(&op),
            [
                Step::Preflight,
                Step::Freeze,
                Step::Drain,
                Step::Fence,
                Step::CatchUp,
                Step::Promote,
                Step::Flip,
                Step::Reverse
            ]
        );
        // Exactly two table writes: the freeze, then the flip.
        assert_eq!(tables.len(), 2);
        assert!(tables[0].cell("a").unwrap().frozen);
        assert_eq!(tables[0].owners, before.owners, "the freeze moves nothing");
        let last = &tables[1];
        assert_eq!(last.slot_count("a"), 0);
        assert_eq!(last.slot_count("b"), 256);
        assert_eq!(w.table.slot_count("b"), 256);
        assert!(a_slots > 0);
        let a = last.cell("a").unwrap();
        assert_eq!((a.state, a.frozen), (CellPhase::FailedOver, false));
        // The fence recorded the home's final position; the old home now replicates the
        // new home and stays read-only; the new home no longer replicates the old.
        assert_eq!(op.final_gtid.as_deref(), Some("1-1-500"));
        assert_eq!(w.intents["a"].replicate_from, vec!["b".to_string()]);
        assert!(!w.intents["a"].writable);
        assert!(w.intents["b"].writable && w.intents["b"].replicate_from.is_empty());
        assert!(op.write_freeze_ms().unwrap() > 0);
        assert_eq!(op.freeze_epoch, Some(8));
        assert_eq!(op.flip_epoch, Some(9));
        // The record survives a round trip through etcd.
        let json = serde_json::to_vec(&op).unwrap();
        assert_eq!(serde_json::from_slice::<Switchover>(&json).unwrap(), op);
    }

    #[test]
    fn preflight_refuses_with_the_gate_named_and_changes_nothing() {
        let refused = |w: &mut World, op: Switchover| -> (String, String) {
            let before = (w.table.clone(), w.intents.clone());
            let (op, tables) = w.run(op, 3);
            assert!(tables.is_empty());
            assert_eq!((w.table.clone(), w.intents.clone()), before);
            match op.outcome {
                Some(Outcome::Refused { gate, message }) => (gate, message),
                other => panic!("not refused: {other:?}"),
            }
        };
        // A lagging replica.
        let mut w = World::new();
        w.writes.insert("a".into(), 900);
        w.replica_frozen = true;
        w.tick();
        let (gate, msg) = {
            let op = start(&w);
            refused(&mut w, op)
        };
        assert_eq!(gate, "rpo");
        assert!(msg.contains("behind"), "{msg}");
        // A missing standby registration.
        let mut w = World::new();
        w.cells.remove("b");
        w.deaf_regions.push("b".into());
        let op = start(&w);
        let (gate, _) = {
            let (next, actions) = advance(&op, &w.observed());
            assert!(actions.is_empty());
            match next.outcome.unwrap() {
                Outcome::Refused { gate, message } => (gate, message),
                o => panic!("{o:?}"),
            }
        };
        assert_eq!(gate, "standby");
        // A concurrent operation.
        let mut w = World::new();
        w.busy = true;
        assert_eq!(
            {
                let op = start(&w);
                refused(&mut w, op)
            }
            .0,
            "concurrent"
        );
        // The wrong standby, an unknown cell.
        let mut w = World::new();
        let op = Switchover::new("op", "a", "zz", "t", Limits::default(), 0);
        assert_eq!(refused(&mut w, op).0, "standby");
        let op = Switchover::new("op", "nope", "b", "t", Limits::default(), 0);
        assert_eq!(refused(&mut w, op).0, "cell");
        // A frozen cell.
        let mut w = World::new();
        w.table = w.table.frozen("a").unwrap();
        assert_eq!(
            {
                let op = start(&w);
                refused(&mut w, op)
            }
            .0,
            "state"
        );
    }

    #[test]
    fn a_router_that_does_not_acknowledge_the_freeze_rolls_it_back() {
        let mut w = World::new();
        w.stuck_routers.push("r-eu".into());
        let (op, tables) = w.run(start(&w), 200);
        match &op.outcome {
            Some(Outcome::RolledBack { step, reason }) => {
                assert_eq!(*step, Step::Freeze);
                assert!(reason.contains("r-eu"), "{reason}");
            }
            other => panic!("{other:?}"),
        }
        assert_eq!(tables.len(), 2, "freeze, then unfreeze");
        assert!(!w.table.cell("a").unwrap().frozen);
        assert_eq!(w.table.slot_count("a"), tables[0].slot_count("a"));
        assert!(w.intents["a"].writable);
    }

    #[test]
    fn a_standby_that_does_not_catch_up_rolls_back_and_unfences_the_home() {
        let mut w = World::new();
        w.replica_frozen = true;
        // Writes arrive after preflight passed, then the standby stops applying.
        let op = start(&w);
        let (op, actions) = advance(&op, &w.observed());
        w.apply(actions);
        w.writes.insert("a".into(), 520);
        w.tick();
        let (op, _) = w.run(op, 1000);
        match &op.outcome {
            Some(Outcome::RolledBack { step, reason }) => {
                assert_eq!(*step, Step::CatchUp);
                assert!(reason.contains("20 transactions behind"), "{reason}");
            }
            other => panic!("{other:?}"),
        }
        assert!(w.intents["a"].writable, "the home takes writes again");
        assert!(!w.cells["a"].mysql.as_ref().unwrap().read_only);
        assert!(!w.table.cell("a").unwrap().frozen);
        assert!(w.table.slot_count("a") > 0, "nothing moved");
        assert_eq!(
            w.intents["a"].replicate_from,
            vec!["b".to_string()],
            "standby duty kept"
        );
    }

    #[test]
    fn a_backlog_that_does_not_drain_rolls_back_before_the_fence() {
        let mut w = World::new();
        w.kafka_lag = 40;
        let (op, _) = w.run(start(&w), 1000);
        match &op.outcome {
            Some(Outcome::RolledBack { step, reason }) => {
                assert_eq!(*step, Step::Drain);
                assert!(reason.contains("lag 40"), "{reason}");
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn after_the_promotion_it_only_goes_forward() {
        let mut w = World::new();
        let mut op = start(&w);
        while op.step != Step::Flip {
            let (next, actions) = advance(&op, &w.observed());
            w.apply(actions);
            op = next;
            w.tick();
        }
        // A router stops acknowledging the flip: the operation finishes with a warning.
        w.stuck_routers.push("r-us".into());
        let (op, _) = w.run(op, 200);
        match &op.outcome {
            Some(Outcome::Succeeded { warnings }) => assert!(warnings.is_empty(), "{warnings:?}"),
            other => panic!("{other:?}"),
        }
        assert!(op
            .steps
            .iter()
            .any(|s| s.note.contains("r-us had not applied")));
        // The old home's region does not answer the reverse: still success, with a warning.
        // (Here the old home stands by for nobody, so the reverse is a new connection; in
        // the two-region ring it already replicates the new home and the step is a no-op.)
        let mut w = World::new();
        w.intents.get_mut("a").unwrap().replicate_from.clear();
        w.tick();
        let mut op = start(&w);
        while op.step != Step::Reverse {
            let (next, actions) = advance(&op, &w.observed());
            w.apply(actions);
            op = next;
            w.tick();
        }
        w.deaf_regions.push("a".into());
        let (op, _) = w.run(op, 1000);
        match &op.outcome {
            Some(Outcome::Succeeded { warnings }) => {
                assert!(warnings[0].contains("does not replicate"), "{warnings:?}")
            }
            other => panic!("{other:?}"),
        }
    }

    /// A tiny deterministic PRNG (xorshift), so every model-check run can be replayed.
    struct Dice(u64);

    impl Dice {
        fn below(&mut self, n: u64) -> u64 {
            self.0 ^= self.0 << 13;
            self.0 ^= self.0 >> 7;
            self.0 ^= self.0 << 17;
            self.0 % n
        }
    }

    /// Model check: thousands of random worlds in which routers, regions and the replica
    /// act late or not at all, the home keeps taking writes while its MySQL is writable,
    /// time jumps, and the leader dies between persisting a record and carrying out its
    /// actions (the actions are lost and the next leader runs the step again). Whatever
    /// happens: the slots never move to the standby unless the home is read-only and the
    /// standby has every write the home ever took; after the move the home never becomes
    /// writable again; a rollback leaves the home serving and writable; and every run ends.
    #[test]
    fn model_check_no_two_writable_homes_and_no_lost_write() {
        for seed in 1..=3000u64 {
            let mut w = World::new();
            let mut dice = Dice(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1);
            let levels = [3, 20, 60, 95];
            w.odds = [0, 1, 2].map(|_| levels[dice.below(4) as usize]);
            w.dice = Some(dice);
            w.kafka_lag = seed % 7;
            let mut op = start(&w);
            let mut moved = false;
            for _ in 0..5000 {
                let (next, actions) = advance(&op, &w.observed());
                let crashed =
                    w.roll(10) && !actions.is_empty() && w.dice.is_some() && seed % 3 == 0;
                for a in &actions {
                    if let Action::WriteTable(t) = a {
                        if !crashed && t.slot_count("a") == 0 && w.table.slot_count("a") > 0 {
                            let a_mysql = w.cells["a"].mysql.as_ref().unwrap();
                            assert!(
                                a_mysql.read_only,
                                "seed {seed}: slots moved while a is writable"
                            );
                            assert!(
                                w.b_applied_a >= w.writes["a"],
                                "seed {seed}: slots moved before b had a's {} writes ({} applied)",
                                w.writes["a"],
                                w.b_applied_a
                            );
                            moved = true;
                        }
                    }
                }
                if !crashed {
                    w.apply(actions);
                }
                op = next;
                if moved {
                    let a_mysql = w.cells["a"].mysql.as_ref().unwrap();
                    assert!(
                        a_mysql.read_only,
                        "seed {seed}: a writable again after the move"
                    );
                    assert!(!w.intents["a"].writable, "seed {seed}");
                }
                if op.finished() {
                    break;
                }
                w.tick();
            }
            assert!(op.finished(), "seed {seed}: still at {:?}", op.step);
            match &op.outcome {
                Some(Outcome::Succeeded { .. }) => {
                    assert!(moved, "seed {seed}");
                    assert_eq!(w.table.slot_count("a"), 0);
                }
                Some(Outcome::RolledBack { .. }) => {
                    assert!(!moved, "seed {seed}: rolled back after the move");
                    assert!(!w.table.cell("a").unwrap().frozen, "seed {seed}");
                    assert!(w.table.slot_count("a") > 0);
                    assert!(w.intents["a"].writable, "seed {seed}");
                }
                Some(Outcome::Refused { .. }) => assert!(!moved),
                None => unreachable!(),
            }
        }
    }
}
