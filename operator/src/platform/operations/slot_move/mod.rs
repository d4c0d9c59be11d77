//! A slot move (pure): some slots of one cell, with their rows, to another cell in the same
//! region or another, as a step function `(record, observed state) -> (next record,
//! actions)` in the shape of every operation (persisted in `drills/<id>` before its
//! actions are carried out; every step looks before it acts).
//!
//! The steps, and why in this order:
//! 1. **Preflight**: refuse with the gate that failed; nothing has changed yet.
//! 2. **Copy**: the target's intent orders the copy; the target's region reads the source's
//!    rows of those slots (the platform's replication account) and writes them into the
//!    target's schema in throttled batches, from a binary-log position taken before it read
//!    anything. The source keeps serving those users meanwhile.
//! 3. **Verify**: the target's region compares both sides per table and slot at one source
//!    position (counts and checksums), then keeps applying the source's changes of those
//!    slots from its binary log. A mismatch stops the move with the report.
//! 4. **Freeze**: the table freezes only the moving slots (new epoch); once every live
//!    router has applied it, routers hold those users' requests and the source's app
//!    refuses their writes. Every other user of both cells is untouched.
//! 5. **Drain**: the source's apps say every write admitted before the freeze has ended
//!    (their ownership leases' drained epoch) and its order backlog is persisted.
//! 6. **Final sync**: the target catches up to the source's binary log as it is now and
//!    verifies every row of those slots there; nothing may differ.
//! 7. **Flip**: one table write gives the slots to the target (owners, data homes, pins)
//!    and unfreezes them; routers release the held requests to the target, whose app lands
//!    them (its caches for those slots dropped and refilled from its MySQL). From here on
//!    the move only goes forward.
//! 8. **Retire**: the source's copies stay (unserved: its app refuses slots it does not
//!    own) for the retention window, so a move back loses nothing; then the source's region
//!    deletes them, except slots that came back to it meanwhile.
//!
//! Before the flip, a step that fails or times out rolls back: the slots are unfrozen and
//! the copy stops; the source never stopped owning them.

pub mod plan;
mod record;
#[cfg(test)]
mod tests;

pub use record::{MoveLimits, SlotMove, STEPS};

use super::record::{enter, gated, note_error, rolled_back, step_done_in, Step};
use super::switchover::{freeze_applied, released};
use super::{Action, Observed};
use crate::platform::intents::default_for;
use cellplane_cells::etcd_keys::{Intent, MysqlReport};
use cellplane_cells::routing::{serves_traffic, RoutingTable};
use cellplane_cells::slot_move::{MoveOrder, MovePhase, MoveReport, MoveStage, RetireOrder};
use cellplane_cells::slot_set::SlotSet;

/// Advances `op` by at most one step.
pub fn advance(op: &SlotMove, obs: &Observed) -> (SlotMove, Vec<Action>) {
    let step: StepFn = match op.step {
        Step::Preflight => preflight_step,
        Step::Copy => copy,
        Step::Verify => verify,
        Step::Freeze => freeze,
        Step::Drain => drain,
        Step::FinalSync => final_sync,
        Step::Flip => flip,
        Step::Retire => retire,
        Step::RollBack => roll_back_step,
        _ => return (op.clone(), Vec::new()),
    };
    let mut p = Pass {
        op,
        obs,
        next: op.clone(),
        actions: Vec::new(),
    };
    match step(&mut p) {
        Ok(()) => (p.next, p.actions),
        Err(reason) => {
            debug_assert!(!op.past_flip());
            let mut next = op.clone();
            enter(&mut next, Step::RollBack, obs.now_ms, reason);
            advance(&next, obs)
        }
    }
}

type StepFn = fn(&mut Pass) -> Result<(), String>;

struct Pass<'a, 'o> {
    op: &'a SlotMove,
    obs: &'a Observed<'o>,
    next: SlotMove,
    actions: Vec<Action>,
}

impl Pass<'_, '_> {
    fn step_done(&mut self, note: String) {
        let step = self.op.after(self.op.step);
        step_done_in(&mut self.next, step, self.obs.now_ms, note);
    }

    fn timed_out(&self, limit: u64) -> bool {
        self.obs.now_ms.saturating_sub(self.op.step_started_ms) > limit
    }

    fn slots(&self) -> Result<SlotSet, String> {
        self.op
            .slot_set()
            .map_err(|e| format!("slots {:?}: {e}", self.op.slots))
    }

    /// The target's report of this move (None: not started there yet).
    fn report(&self) -> Option<&MoveReport> {
        mysql_of(self.obs, &self.op.target)?
            .slot_move
            .as_ref()
            .filter(|r| r.operation == self.op.id)
    }

    /// Orders the target's region to move the rows in `phase`, or (None) to stop.
    fn order_move(&mut self, phase: Option<MovePhase>) -> u64 {
        let order = phase.map(|phase| MoveOrder {
            operation: self.op.id.clone(),
            source: self.op.source.clone(),
            slots: self.op.slots.clone(),
            slot_count: self.op.slot_count,
            tables: self.op.tables.clone(),
            phase,
            rows_per_sec: self.op.limits.rows_per_sec,
        });
        let target = self.op.target.clone();
        self.want_intent(&target, order, None)
    }

    /// Asks for `cell`'s intent: its role as the table implies, with `slot_move` and
    /// `retire` as given; returns the generation to wait for.
    fn want_intent(
        &mut self,
        cell: &str,
        slot_move: Option<MoveOrder>,
        retire: Option<RetireOrder>,
    ) -> u64 {
        let (writable, replicate_from) = default_for(self.obs.table, cell).unwrap_or_else(|| {
            let current = self.obs.intents.get(cell);
            (
                current.is_some_and(|i| i.writable),
                current
                    .map(|i| i.replicate_from.clone())
                    .unwrap_or_default(),
            )
        });
        let current = self.obs.intents.get(cell);
        let wanted = Intent {
            generation: 0,
            writable,
            replicate_from,
            operation: Some(self.op.id.clone()),
            rebuild_from: None,
            slot_move: slot_move.map(Box::new),
            retire: retire.map(Box::new),
        };
        if let Some(c) = current.filter(|c| {
            Intent {
                generation: 0,
                ..(*c).clone()
            } == wanted
        }) {
            self.next.intents.insert(cell.into(), c.generation);
            return c.generation;
        }
        let generation = current.map_or(1, |c| c.generation + 1);
        self.next.intents.insert(cell.into(), generation);
        self.actions.push(Action::WriteIntent {
            cell: cell.into(),
            intent: Intent {
                generation,
                ..wanted
            },
        });
        generation
    }
}

fn mysql_of<'o>(obs: &Observed<'o>, cell: &str) -> Option<&'o MysqlReport> {
    obs.cells.get(cell)?.mysql.as_ref()
}

/// Preflight: refuse with the gate that failed; nothing has changed yet.
fn preflight_step(p: &mut Pass) -> Result<(), String> {
    if p.obs.busy && p.op.parent.is_some() {
        // A wave of a rebalance waits for the waves before it on its cells.
        return Ok(());
    }
    let next_step = p.op.after(Step::Preflight);
    gated(&mut p.next, p.obs.now_ms, gates(p.op, p.obs), next_step);
    Ok(())
}

/// The preflight gates, in order; the first that fails names itself and the fix.
pub fn gates(op: &SlotMove, obs: &Observed) -> Result<(), (&'static str, String)> {
    let t = obs.table;
    let slots = op
        .slot_set()
        .map_err(|e| ("slots", format!("slots {:?}: {e}", op.slots)))?;
    if slots.is_empty() {
        return Err(("slots", "no slots to move; name some, e.g. 0-15".into()));
    }
    if op.slot_count != t.slots {
        return Err((
            "slots",
            format!(
                "the move counts {} slots, the routing table {}; start it again",
                op.slot_count, t.slots
            ),
        ));
    }
    if op.tables.is_empty() {
        return Err((
            "tables",
            "no tables named: the users' rows would stay behind; name them with --table NAME:KEY_COLUMN".into(),
        ));
    }
    if op.source == op.target {
        return Err(("target", format!("the slots are on {} already", op.target)));
    }
    if obs.busy {
        return Err((
            "concurrent",
            format!(
                "another operation is running on {} or {}; wait for it (`cellplane drills`)",
                op.source, op.target
            ),
        ));
    }
    for (gate, name) in [("source", &op.source), ("target", &op.target)] {
        let cell = t.cell(name).ok_or((
            gate,
            format!("{name} is not in the routing table; check the name with `cellplane cells`"),
        ))?;
        if !serves_traffic(cell.state) || cell.frozen {
            return Err((
                gate,
                format!(
                    "{name} is {:?}{}; both cells must be Active and unfrozen",
                    cell.state,
                    if cell.frozen { " and frozen" } else { "" }
                ),
            ));
        }
    }
    let source = t.index_of(&op.source).unwrap_or_default();
    if let Some(s) = slots
        .iter()
        .find(|&s| usize::from(t.owners[s as usize]) != source)
    {
        return Err((
            "slots",
            format!(
                "slot {s} is served by {}, not {}; move only slots the source serves",
                t.cell_for_slot(s).name,
                op.source
            ),
        ));
    }
    if let Some(s) = slots.iter().find(|&s| t.data_home_index(s) != source) {
        return Err((
            "slots",
            format!(
                "slot {s}'s data lives with {} (a failover); fail it back first",
                t.data_home(s).name
            ),
        ));
    }
    if let Some(s) = slots.iter().find(|&s| t.slot_frozen(s)) {
        return Err((
            "slots",
            format!("slot {s} is frozen by another move; wait for it"),
        ));
    }
    for (gate, name) in [("source", &op.source), ("target", &op.target)] {
        let reg = obs.cells.get(name).filter(|r| r.healthy).ok_or((
            gate,
            format!("{name} is not registered and healthy; check its region"),
        ))?;
        if reg.mysql.as_ref().is_none_or(|m| m.read_only) {
            return Err((
                gate,
                format!("{name}'s MySQL is not reported writable; check its region's operator"),
            ));
        }
    }
    if !obs.cells[&op.source].endpoints.contains_key("mysql") {
        return Err((
            "source",
            format!(
                "{} has no registered MySQL address for the target's region to read from",
                op.source
            ),
        ));
    }
    Ok(())
}

/// Copy: the target's region copies the rows; the step ends when the copy is done.
fn copy(p: &mut Pass) -> Result<(), String> {
    p.order_move(Some(MovePhase::Copy));
    match p.report().map(|r| (r.stage, r.clone())) {
        Some((MoveStage::Verifying | MoveStage::Following, r)) => {
            p.next.copied_rows = Some(r.rows_copied);
            p.step_done(format!(
                "{} rows copied ({} scanned, {} rows/s)",
                r.rows_copied, r.rows_scanned, r.rows_per_sec
            ));
        }
        Some((MoveStage::Mismatch, r)) => return Err(mismatch(&r)),
        Some((MoveStage::Failed, r)) if p.timed_out(p.op.limits.step_timeout_ms) => {
            return Err(failed(&r));
        }
        report if p.timed_out(p.op.limits.copy_timeout_ms) => {
            return Err(format!(
                "the copy did not end within {} ms ({})",
                p.op.limits.copy_timeout_ms,
                report.map_or("not started by the target's region".into(), |(_, r)| {
                    progress_of(&r)
                })
            ));
        }
        _ => {}
    }
    Ok(())
}

/// Verify: the copy matches the source at one position, table by table and slot by slot.
fn verify(p: &mut Pass) -> Result<(), String> {
    p.order_move(Some(MovePhase::Copy));
    match p.report().map(|r| (r.stage, r.clone())) {
        Some((MoveStage::Following, r)) => {
            p.next.verified_rows = r.verified_rows;
            p.step_done(format!(
                "{} rows match at {}",
                r.verified_rows.unwrap_or_default(),
                r.verified_at
            ));
        }
        Some((MoveStage::Mismatch, r)) => return Err(mismatch(&r)),
        Some((MoveStage::Failed, r)) if p.timed_out(p.op.limits.step_timeout_ms) => {
            return Err(failed(&r));
        }
        report if p.timed_out(p.op.limits.copy_timeout_ms) => {
            return Err(format!(
                "the verification did not end within {} ms ({})",
                p.op.limits.copy_timeout_ms,
                report.map_or("no report".into(), |(_, r)| progress_of(&r))
            ));
        }
        _ => {}
    }
    Ok(())
}

/// Freeze: the table freezes the moving slots; the step ends once every live router
/// applied it.
fn freeze(p: &mut Pass) -> Result<(), String> {
    p.order_move(Some(MovePhase::Copy));
    let slots = p.slots()?;
    if !slots.iter().all(|s| p.obs.table.slot_frozen(s)) {
        let t = p
            .obs
            .table
            .with_frozen_slots(&slots)
            .map_err(|e| format!("could not freeze: {e}"))?;
        p.next.frozen_at_ms.get_or_insert(p.obs.now_ms);
        p.actions.push(Action::WriteTable(Box::new(t)));
        return Ok(());
    }
    let epoch = *p.next.freeze_epoch.get_or_insert(p.obs.table.epoch);
    p.next.frozen_at_ms.get_or_insert(p.obs.now_ms);
    let timed_out = p.timed_out(p.op.limits.ack_timeout_ms);
    if let Some(holds) =
        freeze_applied(p.obs.routers, epoch, timed_out, p.op.limits.ack_timeout_ms)?
    {
        p.next.holds_at_freeze = holds;
        p.step_done(format!("every router at epoch {epoch}"));
    }
    Ok(())
}

/// Drain: every write the source's apps admitted before the freeze has ended, and its
/// order backlog is persisted.
fn drain(p: &mut Pass) -> Result<(), String> {
    p.order_move(Some(MovePhase::Copy));
    let epoch = p.op.freeze_epoch.unwrap_or(p.obs.table.epoch);
    // No live lease: no app of the source can write (it writes only under its lease).
    let leases = p.obs.owners.get(&p.op.source).copied().unwrap_or(0);
    let drained = p.obs.drained.get(&p.op.source).copied();
    let writes_done = leases == 0 || drained.is_some_and(|d| d >= epoch);
    // The backlog must be measured after the writes ended (an order acknowledged just
    // before may not be counted in an older report): once they have, the source's intent
    // gets a new generation, and only a report that carried it out counts.
    let generation = if writes_done {
        let source = p.op.source.clone();
        Some(p.want_intent(&source, None, None))
    } else {
        None
    };
    let reg = p.obs.cells.get(&p.op.source);
    let fresh = generation.is_some_and(|g| reg.is_some_and(|r| r.intent_generation >= g));
    let backlog = reg.and_then(|r| r.kafka_lag);
    if fresh && backlog == Some(0) {
        p.step_done(format!(
            "writes admitted before epoch {epoch} ended; order backlog persisted"
        ));
    } else if p.timed_out(p.op.limits.step_timeout_ms) {
        return Err(format!(
            "{} did not drain within {} ms (apps drained to epoch {}, want {epoch}; order backlog {})",
            p.op.source,
            p.op.limits.step_timeout_ms,
            drained.map_or("unknown".into(), |d| d.to_string()),
            backlog.map_or("not reported".into(), |b| b.to_string())
        ));
    }
    Ok(())
}

/// Final sync: the target caught up to the source's position after the drain and every
/// row of the moving slots verified there.
fn final_sync(p: &mut Pass) -> Result<(), String> {
    p.order_move(Some(MovePhase::Final));
    let report = p
        .report()
        .filter(|r| r.phase == Some(MovePhase::Final))
        .cloned();
    match report.as_ref().map(|r| r.stage) {
        Some(MoveStage::Synced) => {
            let r = report.expect("matched");
            p.next.synced_at = Some(r.verified_at.clone());
            p.next.verified_rows = r.verified_rows;
            p.step_done(format!(
                "{} rows match at {}",
                r.verified_rows.unwrap_or_default(),
                r.verified_at
            ));
        }
        Some(MoveStage::Mismatch) => return Err(mismatch(&report.expect("matched"))),
        _ if p.timed_out(p.op.limits.step_timeout_ms) => {
            return Err(format!(
                "the final sync did not end within {} ms ({})",
                p.op.limits.step_timeout_ms,
                report.map_or("no report".into(), |r| progress_of(&r))
            ));
        }
        _ => {}
    }
    Ok(())
}

/// Flip: one table write gives the slots to the target and unfreezes them; the step ends
/// once every router has it (or the ack timeout: the source answers them 421).
fn flip(p: &mut Pass) -> Result<(), String> {
    let slots = p.slots()?;
    if !moved(p.obs.table, p.op, &slots) {
        // Not written yet: the move may still roll back.
        let t = p
            .obs
            .table
            .moved_slots(&slots, &p.op.target)
            .map_err(|e| format!("flip refused: {e}"))?;
        p.actions.push(Action::WriteTable(Box::new(t)));
        return Ok(());
    }
    let epoch = *p.next.flip_epoch.get_or_insert(p.obs.table.epoch);
    // The copy stops: the target owns the rows now.
    p.order_move(None);
    let timed_out = p.timed_out(p.op.limits.ack_timeout_ms);
    let source = format!("the source {}", p.op.source);
    if let Some((held, timeouts, note)) = released(
        p.obs.routers,
        &p.op.holds_at_freeze,
        epoch,
        timed_out,
        &source,
    ) {
        p.next.released_at_ms = Some(p.obs.now_ms);
        p.next.held_requests = Some(held);
        p.next.hold_timeouts = Some(timeouts);
        p.step_done(note);
    }
    Ok(())
}

/// Whether the table has every slot on the target, none frozen.
fn moved(t: &RoutingTable, op: &SlotMove, slots: &SlotSet) -> bool {
    let Some(target) = t.index_of(&op.target) else {
        return false;
    };
    slots
        .iter()
        .all(|s| usize::from(t.owners[s as usize]) == target && !t.slot_frozen(s))
}

/// Retire: after the retention window, the source's region deletes its copies of the
/// slots it does not serve again; nothing else runs on the source meanwhile.
fn retire(p: &mut Pass) -> Result<(), String> {
    let since = p.op.released_at_ms.unwrap_or(p.op.step_started_ms);
    if p.obs.now_ms < since + p.op.limits.retention_ms {
        return Ok(());
    }
    let Some(retired) = p.op.retired_slots.clone() else {
        // Slots that came back to the source (a move back) keep their rows.
        let t = p.obs.table;
        let source = t.index_of(&p.op.source);
        let slots = p.slots()?;
        let gone = SlotSet::of(
            slots.slot_count(),
            slots.iter().filter(|&s| {
                Some(usize::from(t.owners[s as usize])) != source
                    && Some(t.data_home_index(s)) != source
            }),
        )
        .map_err(|e| e.to_string())?;
        if gone.is_empty() {
            p.next.retired_rows = Some(0);
            p.step_done(format!(
                "every slot is back on {}; nothing deleted",
                p.op.source
            ));
        } else if !p.obs.busy {
            p.next.retired_slots = Some(gone.to_string());
        }
        return Ok(());
    };
    let order = RetireOrder {
        operation: p.op.id.clone(),
        slots: retired.clone(),
        slot_count: p.op.slot_count,
        tables: p.op.tables.clone(),
    };
    let source = p.op.source.clone();
    p.want_intent(&source, None, Some(order));
    let report = mysql_of(p.obs, &p.op.source)
        .and_then(|m| m.retired.as_ref())
        .filter(|r| r.operation == p.op.id);
    match report {
        Some(r) if r.done && r.error.is_empty() => {
            p.next.retired_rows = Some(r.rows_deleted);
            let rows = r.rows_deleted;
            // The source's intent without the order.
            p.want_intent(&source, None, None);
            p.step_done(format!(
                "{rows} rows of slots {retired} deleted from {source}"
            ));
        }
        Some(r) if !r.error.is_empty() => {
            note_error(
                &mut p.next,
                format!("deleting {source}'s copies: {}", r.error),
            );
        }
        _ => {}
    }
    Ok(())
}

/// Roll back (before the flip only): the slots unfrozen, the copy stopped.
fn roll_back_step(p: &mut Pass) -> Result<(), String> {
    p.order_move(None);
    let slots = p.slots();
    let frozen: Vec<u32> = slots
        .as_ref()
        .map(|s| s.iter().filter(|&s| p.obs.table.slot_frozen(s)).collect())
        .unwrap_or_default();
    if let (false, Ok(slots)) = (frozen.is_empty(), &slots) {
        match p.obs.table.without_frozen_slots(slots) {
            Ok(t) => p.actions.push(Action::WriteTable(Box::new(t))),
            Err(e) => note_error(&mut p.next, format!("could not unfreeze: {e}")),
        }
        return Ok(());
    }
    rolled_back(&mut p.next, p.obs.now_ms);
    Ok(())
}

fn mismatch(r: &MoveReport) -> String {
    let shown: Vec<&str> = r.mismatches.iter().take(5).map(String::as_str).collect();
    format!(
        "the target's rows differ from the source's at {}: {}{}",
        r.verified_at,
        shown.join("; "),
        if r.mismatches.len() > shown.len() {
            format!(" (and {} more)", r.mismatches.len() - shown.len())
        } else {
            String::new()
        }
    )
}

/// A copy that still fails after the step's deadline (the region retries every 10 s) stops
/// the move instead of waiting for the copy's: a missing table or a refused account does
/// not heal by itself.
fn failed(r: &MoveReport) -> String {
    format!(
        "the target's region cannot copy: {} (fix it and start the move again)",
        r.error
    )
}

fn progress_of(r: &MoveReport) -> String {
    let mut s = format!(
        "{:?}: {} rows copied of {} scanned",
        r.stage, r.rows_copied, r.rows_scanned
    );
    if !r.error.is_empty() {
        s.push_str(&format!("; last error: {}", r.error));
    }
    s
}
