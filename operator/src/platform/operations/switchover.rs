//! A planned switchover of one cell to its standby, or a failback of a failed-over cell
//! from the cell that serves its slots, as a pure step function:
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
//!
//! A **failback** runs the same steps with the roles swapped: the *source* is the cell
//! serving the failed-over cell's slots now (its standby, frozen and fenced as a whole for
//! the moment of the move, since its own users share its MySQL), the *target* is the
//! failed-over cell, which replicated the source since the switchover. Its reverse step
//! comes before the flip: the source must be writable again for its own users before the
//! freeze ends.

use super::gates::preflight;
use super::record::{enter, gated, note_error, rolled_back, Kind, Step, Switchover};
use super::{Action, Observed};
use crate::platform::intents::default_for;
use cellplane_cells::crd::CellPhase;
use cellplane_cells::etcd_keys::{Intent, Registration, RouterAck};
use cellplane_cells::gtid;
use cellplane_cells::routing::{serves_traffic, RoutingTable};
use std::collections::BTreeMap;

/// Advances `op` by at most one step: every step of a switchover or a failback, and the
/// promotion and flip of an unplanned failover. A step before the promotion that fails
/// rolls back; after it, errors are recorded and the operation goes forward.
pub(super) fn advance(op: &Switchover, obs: &Observed) -> (Switchover, Vec<Action>) {
    let step: StepFn = match op.step {
        Step::Preflight => preflight_step,
        Step::Freeze => freeze,
        Step::Drain => drain,
        Step::Fence => fence,
        Step::CatchUp => catch_up,
        Step::Promote => promote,
        Step::Flip => flip,
        Step::Reverse => reverse,
        Step::RollBack => roll_back_step,
        // An unplanned failover's own steps (`emergency::advance`), and the end.
        Step::Expire | Step::Rejoin | Step::Done => return (op.clone(), Vec::new()),
        // A slot move's own steps (`slot_move::advance`).
        Step::Copy | Step::Verify | Step::FinalSync | Step::Retire => {
            return (op.clone(), Vec::new())
        }
    };
    Pass::run(op, obs, step)
}

/// A step's function: moves the pass's record and adds actions; `Err` (before the
/// promotion only) rolls the operation back with that reason.
pub(super) type StepFn = fn(&mut Pass) -> Result<(), String>;

/// One pass of a step: the record as it was, what the leader sees, and what the step
/// makes of them (the next record, the actions).
pub(super) struct Pass<'a, 'o> {
    pub op: &'a Switchover,
    pub obs: &'a Observed<'o>,
    pub next: Switchover,
    pub actions: Vec<Action>,
}

impl<'a, 'o> Pass<'a, 'o> {
    /// Runs `step` on `op`: the next record and its actions, or the rollback.
    pub fn run(
        op: &'a Switchover,
        obs: &'a Observed<'o>,
        step: StepFn,
    ) -> (Switchover, Vec<Action>) {
        let mut p = Pass {
            op,
            obs,
            next: op.clone(),
            actions: Vec::new(),
        };
        match step(&mut p) {
            Ok(()) => (p.next, p.actions),
            Err(reason) => roll_back(op, obs, reason),
        }
    }

    /// Ends the current step with `note`: the operation goes on to its kind's next step.
    fn step_done(&mut self, note: String) {
        self.next.step_done(self.obs.now_ms, note);
    }

    /// Asks the source to be writable or not, replicating what it replicates today;
    /// returns the intent generation to wait for.
    fn want_source_role(&mut self, writable: bool) -> u64 {
        let sources = current_sources(self.obs, &self.op.source);
        want_intent(
            &mut self.next,
            &mut self.actions,
            self.obs,
            &self.op.source,
            writable,
            sources,
        )
    }

    /// Whether the current step has run longer than `limit`.
    pub fn timed_out(&self, limit: u64) -> bool {
        self.obs.now_ms.saturating_sub(self.op.step_started_ms) > limit
    }

    /// The source's registration (the home the slots move away from).
    pub fn home(&self) -> Option<&'o Registration> {
        self.obs.cells.get(&self.op.source)
    }

    /// The target's registration.
    pub fn target(&self) -> Option<&'o Registration> {
        self.obs.cells.get(&self.op.target)
    }
}

/// Preflight: refuse with the gate that failed; nothing has changed yet.
fn preflight_step(p: &mut Pass) -> Result<(), String> {
    let next_step = p.op.after(Step::Preflight);
    gated(&mut p.next, p.obs.now_ms, preflight(p.op, p.obs), next_step);
    Ok(())
}

/// Freeze: the table marks the source frozen; the step ends once every live router
/// applied it (routers then hold its requests, its app refuses them with 421).
fn freeze(p: &mut Pass) -> Result<(), String> {
    let frozen = p.obs.table.cell(&p.op.source).is_some_and(|c| c.frozen);
    if !frozen {
        match p.obs.table.frozen(&p.op.source) {
            Ok(t) => {
                p.next.frozen_at_ms.get_or_insert(p.obs.now_ms);
                p.actions.push(Action::WriteTable(Box::new(t)));
            }
            Err(e) => return Err(format!("could not freeze: {e}")),
        }
    } else {
        let epoch = *p.next.freeze_epoch.get_or_insert(p.obs.table.epoch);
        p.next.frozen_at_ms.get_or_insert(p.obs.now_ms);
        let timed_out = p.timed_out(p.op.limits.ack_timeout_ms);
        if let Some(holds) =
            freeze_applied(p.obs.routers, epoch, timed_out, p.op.limits.ack_timeout_ms)?
        {
            p.next.holds_at_freeze = holds;
            p.step_done(format!("every router at epoch {epoch}"));
        }
    }
    Ok(())
}

/// Each router's counters of requests held and holds timed out, by router id.
pub(super) type Holds = BTreeMap<String, (u64, u64)>;

/// A freeze at `epoch` once every live router applied it: each router's hold counters
/// then (None: wait); an error once `timed_out` (after `timeout_ms`).
pub(super) fn freeze_applied(
    routers: &BTreeMap<String, RouterAck>,
    epoch: u64,
    timed_out: bool,
    timeout_ms: u64,
) -> Result<Option<Holds>, String> {
    let behind = routers_behind(routers, epoch);
    if behind.is_empty() {
        return Ok(Some(
            routers
                .iter()
                .map(|(id, a)| (id.clone(), (a.held_total, a.hold_timeouts_total)))
                .collect(),
        ));
    }
    if timed_out {
        return Err(format!(
            "routers {} did not apply epoch {epoch} within {timeout_ms} ms",
            behind.join(", ")
        ));
    }
    Ok(None)
}

/// The release after a flip at `epoch`, once every live router applied it or `timed_out`:
/// requests held and holds timed out since the freeze, and the step's note (None: wait).
pub(super) fn released(
    routers: &BTreeMap<String, RouterAck>,
    holds_at_freeze: &BTreeMap<String, (u64, u64)>,
    epoch: u64,
    timed_out: bool,
    old_home: &str,
) -> Option<(u64, u64, String)> {
    let behind = routers_behind(routers, epoch);
    if !behind.is_empty() && !timed_out {
        return None;
    }
    let (held, timeouts) = holds_since(holds_at_freeze, routers);
    let note = if behind.is_empty() {
        format!("every router at epoch {epoch}")
    } else {
        format!(
            "routers {} had not applied epoch {epoch}; {old_home} answers them 421",
            behind.join(", ")
        )
    };
    Some((held, timeouts, note))
}

/// Drain: the source's order persister empties its Kafka backlog into MySQL (before the
/// fence: the persister writes through the app's account, which `read_only` would stop).
fn drain(p: &mut Pass) -> Result<(), String> {
    match p.home().and_then(|h| h.kafka_lag) {
        Some(0) => p.step_done("order backlog persisted".into()),
        lag if p.timed_out(p.op.limits.step_timeout_ms) => {
            let seen = lag.map_or("not reported".to_string(), |l| l.to_string());
            return Err(format!(
                "the order backlog did not drain in {} ms (lag {seen})",
                p.op.limits.step_timeout_ms
            ));
        }
        _ => {}
    }
    Ok(())
}

/// Fence: the source's MySQL `read_only` with the app's sessions killed (intent); its
/// `gtid_binlog_pos` then is the final position.
fn fence(p: &mut Pass) -> Result<(), String> {
    // Fencing stops writes; whatever the home replicates as a standby goes on.
    let generation = p.want_source_role(false);
    let fenced = p.home().and_then(|h| {
        let m = h.mysql.as_ref()?;
        (h.intent_generation >= generation && m.read_only).then(|| m.gtid_binlog_pos.clone())
    });
    match fenced {
        Some(pos) => {
            p.next.final_gtid = Some(pos.clone());
            p.step_done(format!("final position {pos}"));
        }
        None if p.timed_out(p.op.limits.step_timeout_ms) => {
            return Err(format!(
                "{} did not report read_only within {} ms",
                p.op.source, p.op.limits.step_timeout_ms
            ));
        }
        None => {}
    }
    Ok(())
}

/// Catch up: the target has applied the final position.
fn catch_up(p: &mut Pass) -> Result<(), String> {
    let want = p.op.final_gtid.clone().unwrap_or_default();
    let applied = p
        .target()
        .and_then(|t| t.mysql.as_ref()?.replicas.get(&p.op.source))
        .map(|r| r.gtid_slave_pos.clone());
    match applied {
        Some(pos) if gtid::reached(&pos, &want) => {
            p.step_done(format!("{} reached {want}", p.op.target));
        }
        pos if p.timed_out(p.op.limits.step_timeout_ms) => {
            let behind = pos.map_or("no replication".to_string(), |p| {
                format!("{} transactions behind", gtid::lag(&want, &p))
            });
            return Err(format!(
                "{} did not reach {want} within {} ms ({behind})",
                p.op.target, p.op.limits.step_timeout_ms
            ));
        }
        _ => {}
    }
    Ok(())
}

/// Promote: the target becomes writable with the replication it keeps once the slots are
/// its own. From here on the operation goes forward only.
fn promote(p: &mut Pass) -> Result<(), String> {
    // The target takes the replication it has once the slots are its own: a
    // switchover's target stops following the old home (fenced for good); a
    // failback's target keeps following the cell it stands by for.
    let sources = match flipped(p.obs.table, p.op) {
        Ok(after) => default_for(&after, &p.op.target)
            .map(|(_, from)| from)
            .unwrap_or_default(),
        Err(e) => {
            note_error(&mut p.next, format!("flip impossible: {e}"));
            return Ok(());
        }
    };
    let generation = want_intent(
        &mut p.next,
        &mut p.actions,
        p.obs,
        &p.op.target,
        true,
        sources.clone(),
    );
    let target = p.target();
    let promoted = target.is_some_and(|t| {
        t.intent_generation >= generation
            && t.mysql
                .as_ref()
                .is_some_and(|m| !m.read_only && m.replicas.keys().all(|c| sources.contains(c)))
    });
    if promoted {
        if let (Some(loss), Some(m)) = (p.next.loss.as_mut(), target.and_then(|t| t.mysql.as_ref()))
        {
            loss.estimated_lost_gtids = loss
                .last_home_gtid
                .as_ref()
                .map(|last| gtid::lag(last, &m.gtid_binlog_pos));
            loss.promoted_at_gtid = Some(m.gtid_binlog_pos.clone());
        }
        p.step_done(format!(
            "{} writable, replicating {}",
            p.op.target,
            if sources.is_empty() {
                "nothing".to_string()
            } else {
                sources.join(", ")
            }
        ));
    } else if p.timed_out(p.op.limits.step_timeout_ms) {
        // Past the point of no return: keep asking, and say so.
        note_error(
            &mut p.next,
            format!(
                "{} has not confirmed its promotion after {} ms",
                p.op.target, p.op.limits.step_timeout_ms
            ),
        );
    }
    Ok(())
}

/// Flip: one table write moves the slots and unfreezes the source (new epoch); the step
/// ends once every router has it (or the ack timeout: the old home answers them 421).
fn flip(p: &mut Pass) -> Result<(), String> {
    if !moved(p.obs.table, p.op) {
        match flipped(p.obs.table, p.op) {
            Ok(t) => p.actions.push(Action::WriteTable(Box::new(t))),
            Err(e) => note_error(&mut p.next, format!("flip refused: {e}")),
        }
    } else {
        let epoch = *p.next.flip_epoch.get_or_insert(p.obs.table.epoch);
        let timed_out = p.timed_out(p.op.limits.ack_timeout_ms);
        if let Some((held, timeouts, note)) = released(
            p.obs.routers,
            &p.op.holds_at_freeze,
            epoch,
            timed_out,
            "the old home",
        ) {
            p.next.released_at_ms = Some(p.obs.now_ms);
            p.next.held_requests = Some(held);
            p.next.hold_timeouts = Some(timeouts);
            p.step_done(note);
        }
    }
    Ok(())
}

/// Reverse: the source takes the role and replication the table after the flip implies,
/// so a switch back is again zero loss.
fn reverse(p: &mut Pass) -> Result<(), String> {
    // The source's replication and role as the table after the flip implies it.
    let after = if moved(p.obs.table, p.op) {
        Ok(p.obs.table.clone())
    } else {
        flipped(p.obs.table, p.op)
    };
    let (writable, sources) = after
        .ok()
        .and_then(|after| default_for(&after, &p.op.source))
        .unwrap_or_else(|| (false, current_sources(p.obs, &p.op.source)));
    let generation = want_intent(
        &mut p.next,
        &mut p.actions,
        p.obs,
        &p.op.source,
        writable,
        sources.clone(),
    );
    // The role must be in place before the step ends (a failback's source takes
    // its own users' writes again at the flip); a replication connection that is
    // still starting is reported, and the failback preflight checks it later.
    let applied = p.home().and_then(|h| {
        let m = h.mysql.as_ref()?;
        (h.intent_generation >= generation && m.read_only != writable).then_some(m)
    });
    if let Some(m) = applied {
        let starting: Vec<&str> = sources
            .iter()
            .filter(|c| !m.replicas.get(*c).is_some_and(|r| r.running))
            .map(String::as_str)
            .collect();
        let note = format!(
            "{} {}, replicating {}{}",
            p.op.source,
            if writable { "writable" } else { "read-only" },
            if sources.is_empty() {
                "nothing".to_string()
            } else {
                sources.join(", ")
            },
            if starting.is_empty() {
                String::new()
            } else {
                format!(" ({} still starting)", starting.join(", "))
            }
        );
        p.step_done(note);
    } else if p.timed_out(p.op.limits.step_timeout_ms) {
        note_error(
                &mut p.next,
                format!(
                    "{} has not carried out its role (writable: {writable}, replicating: {}) after {} ms; the platform keeps asking",
                    p.op.source,
                    sources.join(", "),
                    p.op.limits.step_timeout_ms
                ),
            );
        p.step_done(String::new());
    }
    Ok(())
}

/// Roll back (before the promotion only): the source writable and unfrozen again.
fn roll_back_step(p: &mut Pass) -> Result<(), String> {
    let generation = p.want_source_role(true);
    let frozen = p.obs.table.cell(&p.op.source).is_some_and(|c| c.frozen);
    if frozen {
        let mut t = p.obs.table.clone();
        t.epoch += 1;
        if let Some(i) = t.index_of(&p.op.source) {
            t.cells[i].frozen = false;
        }
        p.actions.push(Action::WriteTable(Box::new(t)));
    }
    let writable = p.home().is_none_or(|h| {
        h.intent_generation >= generation && h.mysql.as_ref().is_none_or(|m| !m.read_only)
    });
    if !frozen && writable {
        rolled_back(&mut p.next, p.obs.now_ms);
    }
    Ok(())
}

/// The table after the flip, one epoch later: a switchover's cell FailedOver with its slots
/// on its standby, a failback's cell Active with its slots back; the source unfrozen.
fn flipped(t: &RoutingTable, op: &Switchover) -> cellplane_cells::Result<RoutingTable> {
    let mut next = match op.kind {
        Kind::Switchover | Kind::Emergency => t.failed_over(&op.cell)?,
        Kind::Failback => t.failed_back(&op.cell)?,
    };
    if let Some(i) = next.index_of(&op.source) {
        next.cells[i].frozen = false;
    }
    next.validate()?;
    Ok(next)
}

/// Whether the table already has the slots where the operation moves them.
fn moved(t: &RoutingTable, op: &Switchover) -> bool {
    let state = t.cell(&op.cell).map(|c| c.state);
    let arrived = match op.kind {
        Kind::Switchover | Kind::Emergency => state == Some(CellPhase::FailedOver),
        Kind::Failback => state.is_some_and(serves_traffic),
    };
    arrived && t.cell(&op.source).is_some_and(|c| !c.frozen)
}

/// Requests held and holds timed out since the freeze, summed over the routers that
/// reported at both ends (counters, as each router published them with its acks).
fn holds_since(
    at_freeze: &BTreeMap<String, (u64, u64)>,
    routers: &BTreeMap<String, RouterAck>,
) -> (u64, u64) {
    at_freeze
        .iter()
        .filter_map(|(id, (held, timeouts))| {
            let now = routers.get(id)?;
            Some((
                now.held_total.saturating_sub(*held),
                now.hold_timeouts_total.saturating_sub(*timeouts),
            ))
        })
        .fold((0, 0), |(a, b), (h, t)| (a + h, b + t))
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
pub(super) fn want_intent(
    next: &mut Switchover,
    actions: &mut Vec<Action>,
    obs: &Observed,
    cell: &str,
    writable: bool,
    replicate_from: Vec<String>,
) -> u64 {
    want_intent_with(next, actions, obs, cell, writable, replicate_from, None)
}

/// [`want_intent`], with a rebuild of the cell's MySQL from `rebuild_from`.
pub(super) fn want_intent_with(
    next: &mut Switchover,
    actions: &mut Vec<Action>,
    obs: &Observed,
    cell: &str,
    writable: bool,
    replicate_from: Vec<String>,
    rebuild_from: Option<String>,
) -> u64 {
    let current = obs.intents.get(cell);
    if let Some(c) = current.filter(|c| {
        c.writable == writable
            && c.replicate_from == replicate_from
            && c.rebuild_from == rebuild_from
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
            rebuild_from,
            ..Intent::default()
        },
    });
    generation
}

pub(super) fn roll_back(
    op: &Switchover,
    obs: &Observed,
    reason: String,
) -> (Switchover, Vec<Action>) {
    debug_assert!(!op.past_promotion());
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

#[cfg(test)]
mod tests {
    use super::super::record::{Limits, Outcome};
    use super::super::test_world::*;
    use super::*;
    use cellplane_cells::crd::CellPhase;
    use std::collections::BTreeMap;

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
        // Both routers held requests from the freeze to the flip; none timed out.
        assert!(op.held_requests.unwrap() >= 4, "{:?}", op.held_requests);
        assert_eq!(op.hold_timeouts, Some(0));
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
        w.writes.insert("a".into(), 5_000);
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
                assert!(
                    warnings[0].contains("has not carried out its role"),
                    "{warnings:?}"
                )
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn the_capacity_gate_keeps_headroom_on_the_target() {
        // Weight 1 x 100 rps at 80%: b may carry 80 requests/s after the move.
        let mut w = World::new();
        w.rps = BTreeMap::from([("a".into(), 50), ("b".into(), 40)]);
        w.tick();
        let (op, _) = w.run(start(&w), 3);
        match &op.outcome {
            Some(Outcome::Refused { gate, message }) => {
                assert_eq!(gate, "capacity");
                assert!(
                    message.contains("would serve 90 requests/s (50 moving from a)"),
                    "{message}"
                );
            }
            other => panic!("{other:?}"),
        }
        w.rps.insert("a".into(), 40);
        w.tick();
        let (op, _) = w.run(start(&w), 100);
        assert!(
            matches!(op.outcome, Some(Outcome::Succeeded { .. })),
            "{:?}",
            op.outcome
        );
        // No gate when capacity is not declared.
        let mut w = World::new();
        w.rps = BTreeMap::from([("a".into(), 5_000)]);
        w.tick();
        let limits = Limits {
            capacity_rps_per_weight: 0,
            ..Limits::default()
        };
        let op = Switchover::new("op", "a", "b", "t", limits, w.now_ms);
        assert!(matches!(
            w.run(op, 100).0.outcome,
            Some(Outcome::Succeeded { .. })
        ));
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
                                w.applied >= w.writes["a"],
                                "seed {seed}: slots moved before b had a's {} writes ({} applied)",
                                w.writes["a"],
                                w.applied
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
