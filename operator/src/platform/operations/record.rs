//! The record of an operation on one cell (pure): what was asked, the steps so far with
//! their times, and the result, as `drills/<id>` holds it; each kind's step list as data;
//! the helpers every kind's step function moves the record with.

use super::emergency::Loss;
use cellplane_cells::failover_timing::FailoverTimings;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

/// Gates and deadlines of a switchover (one place; defaults in [`Limits::default`]).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Limits {
    /// The RPO gate: most transactions the standby may be behind at preflight. The two
    /// positions come from two regions' reports taken up to an agent pass apart, so under
    /// load a healthy replica shows a few hundred; the catch-up step closes any gap before
    /// the promotion, so the gate only keeps the write freeze short.
    pub max_lag_gtids: u64,
    /// The RPO gate in time: most seconds the standby's SQL thread may be behind.
    #[serde(default = "default_max_lag_secs")]
    pub max_lag_secs: u64,
    /// The capacity gate: what one unit of `capacityWeight` serves, in user requests per
    /// second (0: no capacity gate). A cell of weight 10 serves 10x this.
    #[serde(default = "default_rps_per_weight")]
    pub capacity_rps_per_weight: u64,
    /// The capacity gate: the target's load after the move (its own plus what moves, as
    /// measured over the last minute) must stay under this share of its capacity, so the
    /// target region keeps headroom for the next failure.
    #[serde(default = "default_max_utilization")]
    pub max_utilization_pct: u64,
    /// How long a table change may take to reach every live router.
    pub ack_timeout_ms: u64,
    /// How long any other step may take.
    pub step_timeout_ms: u64,
    /// Unplanned failover: how long after the lost cell's last ownership lease was seen
    /// gone the standby may be promoted (`FailoverTimings::expiry_margin_ms`).
    #[serde(default = "default_expiry_margin")]
    pub expiry_margin_ms: u64,
    /// Failback after an unplanned failover: how long the old home must have been healthy
    /// without a break (its registration's `healthySinceMs`) before its users go back.
    #[serde(default = "default_stabilization")]
    pub stabilization_ms: u64,
}

/// The default stabilization window before a failback after an unplanned failover.
pub const DEFAULT_STABILIZATION_MS: u64 = 300_000;

fn default_stabilization() -> u64 {
    DEFAULT_STABILIZATION_MS
}

fn default_expiry_margin() -> u64 {
    FailoverTimings::default().expiry_margin_ms
}

fn default_max_lag_secs() -> u64 {
    5
}

fn default_rps_per_weight() -> u64 {
    100
}

fn default_max_utilization() -> u64 {
    80
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_lag_gtids: 2_000,
            max_lag_secs: default_max_lag_secs(),
            capacity_rps_per_weight: default_rps_per_weight(),
            max_utilization_pct: default_max_utilization(),
            ack_timeout_ms: 5_000,
            step_timeout_ms: 30_000,
            expiry_margin_ms: default_expiry_margin(),
            stabilization_ms: default_stabilization(),
        }
    }
}

/// Which way the slots move.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub enum Kind {
    /// From a serving cell to its standby.
    #[default]
    Switchover,
    /// Back to a failed-over cell from the cell that serves its slots.
    Failback,
    /// Unplanned: the cell is lost (its region cut off or dead); its standby is promoted
    /// once the cell's ownership leases have expired, without waiting for a final position.
    Emergency,
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
    /// Unplanned failover: wait until no ownership lease of the lost cell is left, plus
    /// the margin; from then on the cell cannot take a write.
    Expire,
    /// Unplanned failover: wait for the old home to return, count what it wrote that the
    /// new home never got (errant transactions), keep it fenced.
    Rejoin,
    /// Slot move: copy the slots' rows into the target (it then follows the source).
    Copy,
    /// Slot move: the copy compared with the source, per table and slot.
    Verify,
    /// Slot move: with the slots frozen and the source drained, the target caught up to
    /// the source's position and verified there.
    FinalSync,
    /// Slot move: after the retention window, the source's copies deleted.
    Retire,
    RollBack,
    Done,
}

impl Kind {
    /// This kind's steps on the way forward, in order: the one list the step function,
    /// the reports, the CLI's progress and the topology page read.
    pub fn steps(self) -> &'static [Step] {
        use Step::*;
        match self {
            Kind::Switchover => &[
                Preflight, Freeze, Drain, Fence, CatchUp, Promote, Flip, Reverse,
            ],
            // The source must be writable again for its own users before the freeze ends.
            Kind::Failback => &[
                Preflight, Freeze, Drain, Fence, CatchUp, Promote, Reverse, Flip,
            ],
            Kind::Emergency => &[Preflight, Freeze, Expire, Promote, Flip, Rejoin],
        }
    }

    /// What people call it (reports, metrics).
    pub fn label(self) -> &'static str {
        match self {
            Kind::Switchover => "switchover",
            Kind::Failback => "failback",
            Kind::Emergency => "failover",
        }
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
    /// The platform leader that ended the step (its election identity).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub by: String,
}

/// The persisted record of one switchover or failback (`drills/<id>`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Switchover {
    pub id: String,
    #[serde(default)]
    pub kind: Kind,
    /// The cell whose slots move (the cell whose database holds their data).
    pub cell: String,
    /// The cell serving the slots now: frozen, drained and fenced (fixed at creation).
    pub source: String,
    /// The cell the slots move to (fixed at creation).
    pub target: String,
    pub started_by: String,
    /// The drain or failback of a region this operation is a wave member of.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub parent: Option<String>,
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
    /// Each router's hold counters (held, timed out) when it applied the freeze.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub holds_at_freeze: BTreeMap<String, (u64, u64)>,
    /// Requests the routers held while the cell was frozen, and how many of them timed out
    /// (503) instead of being released to the new home.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub held_requests: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hold_timeouts: Option<u64>,
    /// Intent generations this operation asked for, by cell.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub intents: BTreeMap<String, u64>,
    /// Unplanned failover: what was lost, when it was seen, and the data at risk.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub loss: Option<Box<Loss>>,
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
            kind: Kind::Switchover,
            cell: cell.into(),
            source: cell.into(),
            target: target.into(),
            started_by: started_by.into(),
            parent: None,
            limits,
            step: Step::Preflight,
            step_started_ms: now_ms,
            steps: Vec::new(),
            freeze_epoch: None,
            frozen_at_ms: None,
            flip_epoch: None,
            released_at_ms: None,
            final_gtid: None,
            holds_at_freeze: BTreeMap::new(),
            held_requests: None,
            hold_timeouts: None,
            intents: BTreeMap::new(),
            loss: None,
            outcome: None,
        }
    }

    /// Every cell the operation touches (no other operation may touch them meanwhile).
    pub fn cells(&self) -> [&str; 3] {
        [&self.cell, &self.source, &self.target]
    }

    /// Whether another operation on `cells` must wait for this one.
    pub fn overlaps(&self, other: &Switchover) -> bool {
        !self.finished() && self.cells().iter().any(|c| other.cells().contains(c))
    }

    /// The step after `step` on the way forward (`Done` after the last).
    pub(super) fn after(&self, step: Step) -> Step {
        let steps = self.kind.steps();
        steps
            .iter()
            .position(|s| *s == step)
            .and_then(|i| steps.get(i + 1))
            .copied()
            .unwrap_or(Step::Done)
    }

    /// Whether the operation is past its point of no return (the promotion): from there
    /// on it only goes forward.
    pub fn past_promotion(&self) -> bool {
        let steps = self.kind.steps();
        let at = |step| steps.iter().position(|s| *s == step);
        matches!((at(self.step), at(Step::Promote)), (Some(now), Some(p)) if now >= p)
    }

    pub fn finished(&self) -> bool {
        self.step == Step::Done
    }

    /// Waiting for something that may take hours (a lost region's return): the leader
    /// need not poll it fast.
    pub fn waiting_long(&self) -> bool {
        self.step == Step::Rejoin
    }

    /// How long the cell's writes were frozen (freeze written -> slots released).
    pub fn write_freeze_ms(&self) -> Option<u64> {
        Some(self.released_at_ms?.saturating_sub(self.frozen_at_ms?))
    }
}

/// A record moved step by step: where it is, the steps so far, and its result (every
/// kind of operation keeps these the same way).
pub(super) trait Stepped {
    fn progress(&mut self) -> Progress<'_>;
    fn step_list(&self) -> &[StepRecord];
}

/// The parts of a record its steps move.
pub(super) struct Progress<'a> {
    pub step: &'a mut Step,
    pub step_started_ms: &'a mut u64,
    pub steps: &'a mut Vec<StepRecord>,
    pub outcome: &'a mut Option<Outcome>,
}

impl Stepped for Switchover {
    fn progress(&mut self) -> Progress<'_> {
        Progress {
            step: &mut self.step,
            step_started_ms: &mut self.step_started_ms,
            steps: &mut self.steps,
            outcome: &mut self.outcome,
        }
    }

    fn step_list(&self) -> &[StepRecord] {
        &self.steps
    }
}

/// Ends the current step with `note` and enters `step`.
pub(super) fn enter(next: &mut impl Stepped, step: Step, now_ms: u64, note: String) {
    let p = next.progress();
    p.steps.push(StepRecord {
        step: *p.step,
        started_ms: *p.step_started_ms,
        ended_ms: now_ms,
        note,
        by: String::new(),
    });
    *p.step = step;
    *p.step_started_ms = now_ms;
}

pub(super) fn finish(next: &mut impl Stepped, now_ms: u64, outcome: Outcome) {
    let note = match &outcome {
        Outcome::Refused { message, .. } => message.clone(),
        _ => String::new(),
    };
    finish_with_note(next, now_ms, outcome, note);
}

impl Switchover {
    /// Ends the current step with `note`: the kind's next step, or after its last the
    /// operation succeeds (with the errors recorded after the promotion as warnings).
    pub(super) fn step_done(&mut self, now_ms: u64, note: String) {
        step_done_in(self, self.after(self.step), now_ms, note);
    }
}

/// Ends the current step with `note` and enters `next_step`; after the last step
/// (`Done`) the operation succeeds with the errors recorded on the way as warnings.
pub(super) fn step_done_in(next: &mut impl Stepped, next_step: Step, now_ms: u64, note: String) {
    match next_step {
        Step::Done => {
            let warnings = warnings(next.step_list());
            finish_with_note(next, now_ms, Outcome::Succeeded { warnings }, note);
        }
        step => enter(next, step, now_ms, note),
    }
}

pub(super) fn finish_with_note(
    next: &mut impl Stepped,
    now_ms: u64,
    outcome: Outcome,
    note: String,
) {
    enter(next, Step::Done, now_ms, note);
    *next.progress().outcome = Some(outcome);
}

/// Ends the preflight: refused by the gate that failed, or on to the next step.
pub(super) fn gated(
    next: &mut impl Stepped,
    now_ms: u64,
    gates: Result<(), (&'static str, String)>,
    next_step: Step,
) {
    match gates {
        Err((gate, message)) => finish(
            next,
            now_ms,
            Outcome::Refused {
                gate: gate.into(),
                message,
            },
        ),
        Ok(()) => step_done_in(next, next_step, now_ms, String::new()),
    }
}

/// Ends a rollback: rolled back at the step that failed, for the reason it noted.
pub(super) fn rolled_back(next: &mut impl Stepped, now_ms: u64) {
    let (step, reason) = next
        .step_list()
        .last()
        .map_or((Step::Preflight, String::new()), |s| {
            (s.step, s.note.clone())
        });
    finish(next, now_ms, Outcome::RolledBack { step, reason });
}

/// Errors after the point of no return are recorded (once) and the operation goes on.
pub(super) fn note_error(next: &mut impl Stepped, error: String) {
    let note = format!("error: {error}");
    let p = next.progress();
    if p.steps.iter().any(|s| s.note == note) {
        return;
    }
    let (step, at) = (*p.step, *p.step_started_ms);
    p.steps.push(StepRecord {
        step,
        started_ms: at,
        ended_ms: at,
        note,
        by: String::new(),
    });
}

pub(super) fn warnings(steps: &[StepRecord]) -> Vec<String> {
    steps
        .iter()
        .filter_map(|s| s.note.strip_prefix("error: ").map(str::to_string))
        .collect()
}
