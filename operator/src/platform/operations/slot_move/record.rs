//! The record of a slot move (pure): what was asked, the steps so far, and what each step
//! found, as `drills/<id>` holds it.

use super::super::record::{Outcome, Progress, Step, StepRecord, Stepped};
use cellplane_cells::slot_move::MovedTable;
use cellplane_cells::slot_set::SlotSet;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

/// A slot move's steps on the way forward, in order.
pub const STEPS: &[Step] = &[
    Step::Preflight,
    Step::Copy,
    Step::Verify,
    Step::Freeze,
    Step::Drain,
    Step::FinalSync,
    Step::Flip,
    Step::Retire,
];

/// Deadlines and pace of a slot move (defaults in [`MoveLimits::default`]).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct MoveLimits {
    /// How long a table change may take to reach every live router.
    pub ack_timeout_ms: u64,
    /// How long the drain and the final sync may take (the slots are frozen meanwhile).
    pub step_timeout_ms: u64,
    /// How long the copy, and then its verification, may take.
    pub copy_timeout_ms: u64,
    /// The copy's pace (None: as fast as the source answers).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rows_per_sec: Option<u32>,
    /// How long the source keeps its copies after the flip.
    pub retention_ms: u64,
}

impl Default for MoveLimits {
    fn default() -> Self {
        Self {
            ack_timeout_ms: 5_000,
            step_timeout_ms: 30_000,
            copy_timeout_ms: 3_600_000,
            rows_per_sec: None,
            retention_ms: 3_600_000,
        }
    }
}

/// The persisted record of one slot move (`drills/<id>`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct SlotMove {
    pub id: String,
    pub started_by: String,
    /// The growth or shrink of a CellSet this move is a wave member of.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub parent: Option<String>,
    /// The cell that owns the slots and holds their rows.
    pub source: String,
    /// The cell they move to.
    pub target: String,
    /// The slots, as `SlotSet` prints them ("0-99,205"), and the table's slot count.
    pub slots: String,
    pub slot_count: u32,
    /// The tables whose rows move.
    pub tables: Vec<MovedTable>,
    pub limits: MoveLimits,
    pub step: Step,
    pub step_started_ms: u64,
    pub steps: Vec<StepRecord>,
    /// Rows of the moving slots copied, and verified before the freeze.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub copied_rows: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub verified_rows: Option<u64>,
    /// The freeze's epoch and when it was written.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub freeze_epoch: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub frozen_at_ms: Option<u64>,
    /// The source position the final sync verified at.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub synced_at: Option<String>,
    /// The flip's epoch and when every router had it (the slots' writes resumed).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub flip_epoch: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub released_at_ms: Option<u64>,
    /// Each router's hold counters at the freeze; requests held over the freeze and the
    /// holds that timed out.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub holds_at_freeze: BTreeMap<String, (u64, u64)>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub held_requests: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hold_timeouts: Option<u64>,
    /// The slots whose source copies were ordered deleted, and the rows deleted.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retired_slots: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retired_rows: Option<u64>,
    /// Intent generations this move asked for, by cell.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub intents: BTreeMap<String, u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub outcome: Option<Outcome>,
}

impl Stepped for SlotMove {
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

impl SlotMove {
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        id: &str,
        source: &str,
        target: &str,
        slots: &SlotSet,
        tables: Vec<MovedTable>,
        started_by: &str,
        limits: MoveLimits,
        now_ms: u64,
    ) -> Self {
        Self {
            id: id.into(),
            started_by: started_by.into(),
            parent: None,
            source: source.into(),
            target: target.into(),
            slots: slots.to_string(),
            slot_count: slots.slot_count(),
            tables,
            limits,
            step: Step::Preflight,
            step_started_ms: now_ms,
            steps: Vec::new(),
            copied_rows: None,
            verified_rows: None,
            freeze_epoch: None,
            frozen_at_ms: None,
            synced_at: None,
            flip_epoch: None,
            released_at_ms: None,
            holds_at_freeze: BTreeMap::new(),
            held_requests: None,
            hold_timeouts: None,
            retired_slots: None,
            retired_rows: None,
            intents: BTreeMap::new(),
            outcome: None,
        }
    }

    /// The moving slots (a record that does not parse moves nothing: its preflight says so).
    pub fn slot_set(&self) -> cellplane_cells::Result<SlotSet> {
        SlotSet::parse(self.slot_count, &self.slots)
    }

    pub fn finished(&self) -> bool {
        self.step == Step::Done
    }

    /// Whether the move holds its two cells now: every step but the retention window
    /// after the flip (other operations may run on them meanwhile; the deletion waits for
    /// them).
    pub fn holds_cells(&self) -> bool {
        !(self.finished() || (self.step == Step::Retire && self.retired_slots.is_none()))
    }

    /// The cells the move touches.
    pub fn cells(&self) -> [&str; 2] {
        [&self.source, &self.target]
    }

    /// Whether the move is past its point of no return (the flip written).
    pub fn past_flip(&self) -> bool {
        self.flip_epoch.is_some() || matches!(self.step, Step::Retire | Step::Done)
    }

    /// How long the moving slots' writes were frozen (freeze written -> released).
    pub fn write_freeze_ms(&self) -> Option<u64> {
        Some(self.released_at_ms?.saturating_sub(self.frozen_at_ms?))
    }

    pub(super) fn after(&self, step: Step) -> Step {
        STEPS
            .iter()
            .position(|s| *s == step)
            .and_then(|i| STEPS.get(i + 1))
            .copied()
            .unwrap_or(Step::Done)
    }
}
