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

use super::intents::default_for;
use cellplane_cells::crd::CellPhase;
use cellplane_cells::etcd_keys::{
    Intent, Outage, Registration, ReplayApplied, ReplaySent, RouterAck,
};
use cellplane_cells::failover_timing::FailoverTimings;
use cellplane_cells::gtid;
use cellplane_cells::routing::{serves_traffic, RoutingTable};
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
    RollBack,
    Done,
}

impl Step {
    /// Steps after which the operation only goes forward.
    fn past_promotion(self) -> bool {
        matches!(
            self,
            Step::Promote | Step::Flip | Step::Reverse | Step::Rejoin
        )
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

/// What an unplanned failover records about the lost cell (its RPO, first estimated, then
/// counted when the old home returns).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Loss {
    /// When the leader found the cell lost, and why.
    pub detected_at_ms: u64,
    pub reason: String,
    /// The home's last position the leader saw, and how far the standby was behind it
    /// then: the estimated RPO.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_home_gtid: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_lag_gtids: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_lag_secs: Option<u64>,
    /// When the leader saw no ownership lease of the cell left.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub leases_gone_at_ms: Option<u64>,
    /// The new home's position when it was promoted.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub promoted_at_gtid: Option<String>,
    /// Of the last position seen, what the new home had not applied at its promotion.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub estimated_lost_gtids: Option<u64>,
    /// The old home's position when it came back, and its transactions that never reached
    /// the new home (counted, never dropped: it stays fenced).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub returned_gtid: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub errant_transactions: Option<u64>,
    /// Where the old home's region exported them (before anything was dropped), and how
    /// many its binary log held.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub errant_export: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub errant_exported: Option<u64>,
    /// What clients saw through each router (by id): the failed requests for the cell's
    /// users and when they were served again.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub clients: BTreeMap<String, ClientOutage>,
    /// The RTO clients saw: the longest outage (first failed request to the first served
    /// again) through a router outside the lost cell's region.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub client_rto_ms: Option<u64>,
    /// When the old home was seen back (fenced, its intent carried out).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub returned_at_ms: Option<u64>,
    /// The orders its log had acknowledged, forwarded by its app and persisted where its
    /// users are served now.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub replay: Option<ReplayFigures>,
    /// The new home's position the old home was rebuilt at, and the rows copied.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rebuilt_at_gtid: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rebuilt_rows: Option<u64>,
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

    /// An unplanned failover of the lost `cell` to its standby `target`.
    pub fn emergency(
        id: &str,
        cell: &str,
        target: &str,
        started_by: &str,
        limits: Limits,
        loss: Loss,
    ) -> Self {
        Self {
            kind: Kind::Emergency,
            loss: Some(Box::new(loss.clone())),
            ..Self::new(id, cell, target, started_by, limits, loss.detected_at_ms)
        }
    }

    /// A failback of `cell` from `source`, the cell that serves its slots now.
    pub fn failback(
        id: &str,
        cell: &str,
        source: &str,
        started_by: &str,
        limits: Limits,
        now_ms: u64,
    ) -> Self {
        Self {
            kind: Kind::Failback,
            source: source.into(),
            ..Self::new(id, cell, cell, started_by, limits, now_ms)
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

    /// The step after `step` on the way forward.
    fn after(&self, step: Step) -> Step {
        match (self.kind, step) {
            (_, Step::Preflight) => Step::Freeze,
            (Kind::Emergency, Step::Freeze) => Step::Expire,
            (Kind::Emergency, Step::Expire) => Step::Promote,
            (Kind::Emergency, Step::Promote) => Step::Flip,
            (Kind::Emergency, Step::Flip) => Step::Rejoin,
            (Kind::Emergency, _) => Step::Done,
            (_, Step::Freeze) => Step::Drain,
            (_, Step::Drain) => Step::Fence,
            (_, Step::Fence) => Step::CatchUp,
            (_, Step::CatchUp) => Step::Promote,
            (Kind::Switchover, Step::Promote) => Step::Flip,
            (Kind::Switchover, Step::Flip) => Step::Reverse,
            (Kind::Failback, Step::Promote) => Step::Reverse,
            (Kind::Failback, Step::Reverse) => Step::Flip,
            _ => Step::Done,
        }
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
    /// Live ownership leases by cell (`owners/<cell>/`).
    pub owners: &'a BTreeMap<String, usize>,
    /// Another unfinished operation touches the cell or its standby.
    pub busy: bool,
    /// What the records and etcd say beyond the registrations.
    pub recent: &'a Recent,
}

/// One router's view of a lost cell's users.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct ClientOutage {
    pub region: String,
    #[serde(flatten)]
    pub outage: Outage,
}

/// How long before the loss was found a router's failures still count as this incident's.
const CLIENT_LOOKBACK_MS: u64 = 30_000;

/// Takes the routers' outages of the lost cell's users into the record.
fn note_clients(next: &mut Switchover, obs: &Observed) {
    let region = obs.table.cell(&next.source).map(|c| c.region.clone());
    let Some(loss) = next.loss.as_mut() else {
        return;
    };
    let since = loss.detected_at_ms.saturating_sub(CLIENT_LOOKBACK_MS);
    for (id, ack) in obs.routers {
        if let Some(o) = ack
            .outages
            .get(&next.source)
            .filter(|o| o.first_failed_ms >= since)
        {
            loss.clients.insert(
                id.clone(),
                ClientOutage {
                    region: ack.region.clone(),
                    outage: o.clone(),
                },
            );
        }
    }
    loss.client_rto_ms = loss
        .clients
        .values()
        .filter(|c| Some(&c.region) != region.as_ref())
        .filter_map(|c| {
            Some(
                c.outage
                    .recovered_at_ms?
                    .saturating_sub(c.outage.first_failed_ms),
            )
        })
        .max();
}

/// What the leader (or the CLI) knows beyond the registrations: from etcd, the replays of
/// failed-over cells' orders (read for operations at `Rejoin` only); from the records,
/// when each cell whose slots an unplanned failover moved last was found lost.
#[derive(Clone, Debug, Default)]
pub struct Recent {
    pub replays: BTreeMap<String, ReplayState>,
    pub lost_at_ms: BTreeMap<String, u64>,
}

/// For each cell whose slots were last moved away by an unplanned failover (rather than
/// a planned switchover), when it was found lost.
pub fn last_losses(operations: &[Switchover]) -> BTreeMap<String, u64> {
    let mut last: BTreeMap<&str, &Switchover> = BTreeMap::new();
    for op in operations
        .iter()
        .filter(|o| matches!(o.kind, Kind::Switchover | Kind::Emergency) && o.flip_epoch.is_some())
    {
        let entry = last.entry(op.cell.as_str()).or_insert(op);
        if op.flip_epoch > entry.flip_epoch {
            *entry = op;
        }
    }
    last.into_iter()
        .filter_map(|(cell, op)| {
            let loss = op.loss.as_ref().filter(|_| op.kind == Kind::Emergency)?;
            Some((cell.to_string(), loss.detected_at_ms))
        })
        .collect()
}

/// The replay of a failed-over cell's orders as etcd shows it (`replay/<cell>/`).
#[derive(Clone, Debug, Default, PartialEq)]
pub struct ReplayState {
    pub sent: Option<ReplaySent>,
    pub applied: Option<ReplayApplied>,
    /// Forwarded orders not persisted yet.
    pub pending: u64,
}

/// What a replay did, for the record.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct ReplayFigures {
    /// Orders the old home's app forwarded, and voided ones it left out.
    pub forwarded: u64,
    pub void_skipped: u64,
    /// Written by the new home because they were missing (acknowledged, late, not lost).
    pub persisted: u64,
    /// Already there.
    pub duplicates: u64,
    /// Voided at the new home: not written.
    pub voided: u64,
}

/// How long after the old home's return the leader waits for its app to confirm the
/// replay of its orders before it ends the operation with a warning.
pub const REPLAY_CONFIRM_MS: u64 = 60_000;

/// The replay of `op.source`'s orders, once its app forwarded everything after the flip
/// and every forwarded order was persisted.
fn replay_settled(op: &Switchover, obs: &Observed) -> Option<ReplayFigures> {
    let state = obs.recent.replays.get(&op.source)?;
    let sent = state.sent.as_ref()?;
    if sent.epoch < op.flip_epoch.unwrap_or(u64::MAX) || state.pending > 0 {
        return None;
    }
    let applied = match &state.applied {
        Some(a) if a.epoch == sent.epoch => a.clone(),
        _ if sent.forwarded == 0 => ReplayApplied::default(),
        _ => return None,
    };
    Some(ReplayFigures {
        forwarded: sent.forwarded,
        void_skipped: sent.void_skipped,
        persisted: applied.persisted,
        duplicates: applied.duplicates,
        voided: applied.voided,
    })
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
    let home = obs.cells.get(&op.source);
    let target = obs.cells.get(&op.target);
    if op.kind == Kind::Emergency && matches!(op.step, Step::Freeze | Step::Expire | Step::Rejoin) {
        return advance_lost(op, obs);
    }
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
            Ok(()) => enter(
                &mut next,
                op.after(Step::Preflight),
                obs.now_ms,
                String::new(),
            ),
        },
        Step::Freeze => {
            let frozen = obs.table.cell(&op.source).is_some_and(|c| c.frozen);
            if !frozen {
                match obs.table.frozen(&op.source) {
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
                    next.holds_at_freeze = obs
                        .routers
                        .iter()
                        .map(|(id, a)| (id.clone(), (a.held_total, a.hold_timeouts_total)))
                        .collect();
                    enter(
                        &mut next,
                        op.after(Step::Freeze),
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
                op.after(Step::Drain),
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
            let sources = current_sources(obs, &op.source);
            let generation = want_intent(&mut next, &mut actions, obs, &op.source, false, sources);
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
                        op.after(Step::Fence),
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
                            op.source, op.limits.step_timeout_ms
                        ),
                    );
                }
                None => {}
            }
        }
        Step::CatchUp => {
            let want = op.final_gtid.clone().unwrap_or_default();
            let applied = target
                .and_then(|t| t.mysql.as_ref()?.replicas.get(&op.source))
                .map(|r| r.gtid_slave_pos.clone());
            match applied {
                Some(pos) if gtid::reached(&pos, &want) => {
                    enter(
                        &mut next,
                        op.after(Step::CatchUp),
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
            // The target takes the replication it has once the slots are its own: a
            // switchover's target stops following the old home (fenced for good); a
            // failback's target keeps following the cell it stands by for.
            let sources = match flipped(obs.table, op) {
                Ok(after) => default_for(&after, &op.target)
                    .map(|(_, from)| from)
                    .unwrap_or_default(),
                Err(e) => {
                    note_error(&mut next, format!("flip impossible: {e}"));
                    return (next, actions);
                }
            };
            let generation = want_intent(
                &mut next,
                &mut actions,
                obs,
                &op.target,
                true,
                sources.clone(),
            );
            let promoted = target.is_some_and(|t| {
                t.intent_generation >= generation
                    && t.mysql.as_ref().is_some_and(|m| {
                        !m.read_only && m.replicas.keys().all(|c| sources.contains(c))
                    })
            });
            if promoted {
                if let (Some(loss), Some(m)) =
                    (next.loss.as_mut(), target.and_then(|t| t.mysql.as_ref()))
                {
                    loss.estimated_lost_gtids = loss
                        .last_home_gtid
                        .as_ref()
                        .map(|last| gtid::lag(last, &m.gtid_binlog_pos));
                    loss.promoted_at_gtid = Some(m.gtid_binlog_pos.clone());
                }
                enter(
                    &mut next,
                    op.after(Step::Promote),
                    obs.now_ms,
                    format!(
                        "{} writable, replicating {}",
                        op.target,
                        if sources.is_empty() {
                            "nothing".to_string()
                        } else {
                            sources.join(", ")
                        }
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
            if !moved(obs.table, op) {
                match flipped(obs.table, op) {
                    Ok(t) => actions.push(Action::WriteTable(Box::new(t))),
                    Err(e) => note_error(&mut next, format!("flip refused: {e}")),
                }
            } else {
                let epoch = *next.flip_epoch.get_or_insert(obs.table.epoch);
                let behind = routers_behind(obs.routers, epoch);
                if behind.is_empty() || timed_out(op.limits.ack_timeout_ms) {
                    next.released_at_ms = Some(obs.now_ms);
                    let (held, timeouts) = holds_since(&op.holds_at_freeze, obs.routers);
                    next.held_requests = Some(held);
                    next.hold_timeouts = Some(timeouts);
                    let note = if behind.is_empty() {
                        format!("every router at epoch {epoch}")
                    } else {
                        format!("routers {} had not applied epoch {epoch}; the old home answers them 421", behind.join(", "))
                    };
                    match op.after(Step::Flip) {
                        Step::Done => {
                            let warnings = warnings(&next);
                            finish_with_note(
                                &mut next,
                                obs.now_ms,
                                Outcome::Succeeded { warnings },
                                note,
                            );
                        }
                        step => enter(&mut next, step, obs.now_ms, note),
                    }
                }
            }
        }
        Step::Reverse => {
            // The source's replication and role as the table after the flip implies it.
            let after = if moved(obs.table, op) {
                Ok(obs.table.clone())
            } else {
                flipped(obs.table, op)
            };
            let (writable, sources) = after
                .ok()
                .and_then(|after| default_for(&after, &op.source))
                .unwrap_or_else(|| (false, current_sources(obs, &op.source)));
            let generation = want_intent(
                &mut next,
                &mut actions,
                obs,
                &op.source,
                writable,
                sources.clone(),
            );
            // The role must be in place before the step ends (a failback's source takes
            // its own users' writes again at the flip); a replication connection that is
            // still starting is reported, and the failback preflight checks it later.
            let applied = home.and_then(|h| {
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
                    op.source,
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
                after_reverse(&mut next, op, obs.now_ms, note);
            } else if timed_out(op.limits.step_timeout_ms) {
                note_error(
                    &mut next,
                    format!(
                        "{} has not carried out its role (writable: {writable}, replicating: {}) after {} ms; the platform keeps asking",
                        op.source,
                        sources.join(", "),
                        op.limits.step_timeout_ms
                    ),
                );
                after_reverse(&mut next, op, obs.now_ms, String::new());
            }
        }
        Step::RollBack => {
            let sources = current_sources(obs, &op.source);
            let generation = want_intent(&mut next, &mut actions, obs, &op.source, true, sources);
            let frozen = obs.table.cell(&op.source).is_some_and(|c| c.frozen);
            if frozen {
                let mut t = obs.table.clone();
                t.epoch += 1;
                if let Some(i) = t.index_of(&op.source) {
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
        // Only unplanned failovers have these (advance_lost above).
        Step::Expire | Step::Rejoin | Step::Done => {}
    }
    (next, actions)
}

/// Why `cell` counts as lost (Err: why it does not): none of its apps holds an ownership
/// lease (none can take a write) and its region's registration expired or says it is
/// unhealthy, or routers in two regions other than its own see all its endpoints down.
pub fn lost(obs: &Observed, cell: &str) -> Result<String, String> {
    let owners = obs.owners.get(cell).copied().unwrap_or(0);
    if owners > 0 {
        return Err(format!(
            "{cell} still holds {owners} ownership lease(s): its app reaches the global etcd and takes writes; move it with `cellplane switchover` (zero loss)"
        ));
    }
    let region = obs.table.cell(cell).map(|c| c.region.as_str());
    let mut seen_down: Vec<&str> = obs
        .routers
        .values()
        .filter(|r| Some(r.region.as_str()) != region && r.down.iter().any(|c| c == cell))
        .map(|r| r.region.as_str())
        .collect();
    seen_down.sort_unstable();
    seen_down.dedup();
    match obs.cells.get(cell) {
        None => Ok(format!(
            "{cell}'s registration expired (its region lost the global etcd) and it holds no ownership lease"
        )),
        Some(r) if !r.healthy => Ok(format!(
            "{cell} is registered unhealthy (its app does not answer in its region) and holds no ownership lease"
        )),
        Some(_) if seen_down.len() >= 2 => Ok(format!(
            "routers in {} see every endpoint of {cell} down and it holds no ownership lease",
            seen_down.join(", ")
        )),
        Some(_) => Err(format!(
            "{cell} is registered and healthy; it holds no ownership lease but is not lost (its app may be starting)"
        )),
    }
}

/// The steps only an unplanned failover has: freeze without the home, wait out its
/// ownership leases, and take it back fenced when it returns.
fn advance_lost(op: &Switchover, obs: &Observed) -> (Switchover, Vec<Action>) {
    let mut next = op.clone();
    let mut actions = Vec::new();
    let elapsed = obs.now_ms.saturating_sub(op.step_started_ms);
    let home = obs.cells.get(&op.source);
    match op.step {
        Step::Freeze => {
            // Fenced for good whenever its region hears from etcd again: no writes, and no
            // replication (its GTIDs are compared with the new home's first).
            want_intent(&mut next, &mut actions, obs, &op.source, false, Vec::new());
            match obs.table.cell(&op.source).map(|c| c.frozen) {
                Some(true) => {
                    let epoch = *next.freeze_epoch.get_or_insert(obs.table.epoch);
                    next.frozen_at_ms.get_or_insert(obs.now_ms);
                    // No router acknowledgement is awaited: the lost region's routers cannot
                    // give one, and safety comes from the ownership leases, not the routers.
                    enter(
                        &mut next,
                        Step::Expire,
                        obs.now_ms,
                        format!("frozen at epoch {epoch}: no new ownership lease can be taken"),
                    );
                }
                _ => match obs.table.frozen(&op.source) {
                    Ok(t) => {
                        next.frozen_at_ms.get_or_insert(obs.now_ms);
                        actions.push(Action::WriteTable(Box::new(t)));
                    }
                    Err(e) => return roll_back(op, obs, format!("could not freeze: {e}")),
                },
            }
        }
        Step::Expire => {
            let owners = obs.owners.get(&op.source).copied().unwrap_or(0);
            let loss = next.loss.get_or_insert_with(Box::default);
            if home.is_some_and(|h| h.healthy) {
                return roll_back(
                    op,
                    obs,
                    format!(
                        "{} is registered and healthy again before its standby was promoted",
                        op.source
                    ),
                );
            }
            if owners > 0 {
                loss.leases_gone_at_ms = None;
                if elapsed > op.limits.step_timeout_ms {
                    return roll_back(
                        op,
                        obs,
                        format!(
                            "{} still holds {owners} ownership lease(s) after {} ms: it reaches the global etcd, so it is not lost",
                            op.source, op.limits.step_timeout_ms
                        ),
                    );
                }
            } else {
                let gone = *loss.leases_gone_at_ms.get_or_insert(obs.now_ms);
                if obs.now_ms >= gone + op.limits.expiry_margin_ms {
                    enter(
                        &mut next,
                        Step::Promote,
                        obs.now_ms,
                        format!(
                            "no ownership lease of {} since {} ms ago (margin {} ms)",
                            op.source,
                            obs.now_ms - gone,
                            op.limits.expiry_margin_ms
                        ),
                    );
                }
            }
        }
        Step::Rejoin => {
            // Keep the old home fenced and away from replication until its data is sorted:
            // first count what it has that the new home lacks; with anything errant, have
            // its region export that and rebuild it from the new home. Meanwhile its app
            // forwards the orders its log acknowledged; the operation ends once they are in.
            note_clients(&mut next, obs);
            let errant_known = next.loss.as_ref().and_then(|l| l.errant_transactions);
            let rebuild_from = errant_known.filter(|n| *n > 0).map(|_| op.target.clone());
            let generation = want_intent_with(
                &mut next,
                &mut actions,
                obs,
                &op.source,
                false,
                Vec::new(),
                rebuild_from,
            );
            let returned = home.and_then(|h| {
                let m = h.mysql.as_ref()?;
                (h.intent_generation >= generation && m.read_only).then_some(m)
            });
            let Some(old) = returned else {
                return (next, actions);
            };
            let Some(errant) = errant_known else {
                if let Some(new) = obs.cells.get(&op.target).and_then(|t| t.mysql.as_ref()) {
                    let errant = gtid::lag(&old.gtid_binlog_pos, &new.gtid_binlog_pos);
                    let loss = next.loss.get_or_insert_with(Box::default);
                    loss.returned_gtid = Some(old.gtid_binlog_pos.clone());
                    loss.errant_transactions = Some(errant);
                    loss.returned_at_ms = Some(obs.now_ms);
                    if errant > 0 {
                        note_error(
                            &mut next,
                            format!(
                                "{} returned with {errant} transaction(s) that never reached {} (its position {}, the new home's {}); it stays fenced while they are exported and it is rebuilt from {}",
                                op.source, op.target, old.gtid_binlog_pos, new.gtid_binlog_pos, op.target
                            ),
                        );
                    }
                }
                return (next, actions);
            };
            let mut note = if errant == 0 {
                format!(
                    "{} returned at {} with nothing the new home lacks",
                    op.source,
                    next.loss
                        .as_ref()
                        .and_then(|l| l.returned_gtid.clone())
                        .unwrap_or_default()
                )
            } else {
                let report = old
                    .rebuild
                    .as_ref()
                    .filter(|r| r.operation == op.id && r.source == op.target);
                let Some(r) = report else {
                    return (next, actions);
                };
                let loss = next.loss.get_or_insert_with(Box::default);
                if !r.export_file.is_empty() {
                    loss.errant_export = Some(r.export_file.clone());
                    loss.errant_exported = Some(r.errant_transactions);
                }
                if !r.done {
                    return (next, actions);
                }
                if !r.error.is_empty() {
                    note_error(
                        &mut next,
                        format!("rebuilding {} failed (tried again): {}", op.source, r.error),
                    );
                    return (next, actions);
                }
                loss.rebuilt_at_gtid = Some(r.cloned_at.clone());
                loss.rebuilt_rows = Some(r.rows);
                if r.errant_transactions != errant {
                    note_error(
                        &mut next,
                        format!(
                            "{errant} errant transaction(s) counted from the positions, {} found in the binary log",
                            r.errant_transactions
                        ),
                    );
                }
                format!(
                    "{} exported {} errant transaction(s) to {} and was rebuilt from {} at {} ({} rows)",
                    op.source, r.errant_transactions, r.export_file, op.target, r.cloned_at, r.rows
                )
            };
            let returned_at = next
                .loss
                .as_ref()
                .and_then(|l| l.returned_at_ms)
                .unwrap_or(obs.now_ms);
            match replay_settled(op, obs) {
                Some(figures) => {
                    note.push_str(&format!(
                        "; its log's orders replayed: {} forwarded, {} persisted late, {} already there, {} voided",
                        figures.forwarded, figures.persisted, figures.duplicates, figures.voided + figures.void_skipped
                    ));
                    next.loss.get_or_insert_with(Box::default).replay = Some(figures);
                }
                None if obs.now_ms.saturating_sub(returned_at) < REPLAY_CONFIRM_MS => {
                    return (next, actions);
                }
                None => note_error(
                    &mut next,
                    format!(
                        "{}'s app did not confirm forwarding its log's orders within {} s of its return; orders it acknowledged in its last moments may be missing at {} (see `replay/{}/` in etcd and the app's log)",
                        op.source,
                        REPLAY_CONFIRM_MS / 1000,
                        op.target,
                        op.source
                    ),
                ),
            }
            note.push_str(&format!("; it becomes {}'s replica", op.target));
            let warnings = warnings(&next);
            finish_with_note(&mut next, obs.now_ms, Outcome::Succeeded { warnings }, note);
        }
        _ => unreachable!("advance_lost runs the unplanned steps only"),
    }
    (next, actions)
}

/// After an unplanned failover, the old home must have stayed healthy for the
/// stabilization window since it came back before its users return to it.
fn stable(op: &Switchover, reg: &Registration, lost_at: u64, now_ms: u64) -> Result<(), String> {
    let window = op.limits.stabilization_ms;
    let since = reg.healthy_since_ms.filter(|s| *s > lost_at);
    let healthy_for = since.map_or(0, |s| now_ms.saturating_sub(s));
    if healthy_for >= window {
        return Ok(());
    }
    Err(format!(
        "{} was lost (an unplanned failover) and has been healthy for {} s of the {} s stabilization window since it came back; wait {} s, or shorten the window with --stabilization-secs",
        op.cell,
        healthy_for / 1000,
        window / 1000,
        (window - healthy_for).div_ceil(1000)
    ))
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
                "another operation is running on {}; wait for it (`cellplane drills`)",
                op.cells().join(" or ")
            ),
        ));
    }
    match op.kind {
        Kind::Switchover | Kind::Emergency => {
            if cell.frozen || !serves_traffic(cell.state) {
                return Err((
                    "state",
                    format!(
                        "{} is {:?}{}; only a serving, unfrozen cell can switch over{}",
                        op.cell,
                        cell.state,
                        if cell.frozen { " and frozen" } else { "" },
                        if cell.state == CellPhase::FailedOver {
                            " (fail it back with `cellplane failback`)"
                        } else {
                            ""
                        }
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
        }
        Kind::Failback => {
            if cell.state != CellPhase::FailedOver || cell.frozen {
                return Err((
                    "state",
                    format!(
                        "{} is {:?}{}; only a failed-over cell fails back",
                        op.cell,
                        cell.state,
                        if cell.frozen { " and frozen" } else { "" }
                    ),
                ));
            }
            let serving = t.serving_for(&op.cell).map(|c| c.name.as_str());
            if serving != Some(op.source.as_str()) {
                return Err((
                    "source",
                    format!(
                        "{}'s slots are served by {serving:?}, not {}; start the failback again",
                        op.cell, op.source
                    ),
                ));
            }
        }
    }
    let target = t.cell(&op.target).ok_or((
        "standby",
        format!(
            "{} is not in the routing table; it has not registered yet",
            op.target
        ),
    ))?;
    let target_ok = match op.kind {
        Kind::Switchover | Kind::Emergency => serves_traffic(target.state),
        Kind::Failback => true,
    };
    if !target_ok || target.frozen {
        return Err((
            "standby",
            format!(
                "standby {} is {:?}{}; it must be Active and unfrozen to take users",
                op.target,
                target.state,
                if target.frozen { " and frozen" } else { "" }
            ),
        ));
    }
    if let Some(source) = t.cell(&op.source).filter(|c| c.frozen) {
        return Err((
            "state",
            format!(
                "{} is frozen by another operation; wait for it",
                source.name
            ),
        ));
    }
    let reg = obs.cells.get(&op.target).filter(|r| r.healthy).ok_or((
        "standby",
        format!(
            "{} is not registered and healthy; check its region",
            op.target
        ),
    ))?;
    if let (Kind::Failback, Some(lost_at)) = (op.kind, obs.recent.lost_at_ms.get(&op.cell)) {
        stable(op, reg, *lost_at, obs.now_ms).map_err(|why| ("stable", why))?;
    }
    if op.kind == Kind::Emergency {
        // The home cannot be asked for anything: it must be lost, and nothing else gates.
        return match lost(obs, &op.source) {
            Ok(_) => Ok(()),
            Err(why) => Err(("lost", why)),
        };
    }
    let home = obs.cells.get(&op.source).ok_or((
        "home",
        format!(
            "{} is not registered; its region must carry out the fence",
            op.source
        ),
    ))?;
    let home_pos = home
        .mysql
        .as_ref()
        .map(|m| m.gtid_binlog_pos.clone())
        .ok_or((
            "home",
            format!("{} has not reported its MySQL position yet", op.source),
        ))?;
    let replica = reg
        .mysql
        .as_ref()
        .and_then(|m| m.replicas.get(&op.source))
        .filter(|r| r.running)
        .ok_or(("replication", format!("{} does not replicate {} (no running connection '{}'); the region of {} sets it up from its intent", op.target, op.source, op.source, op.target)))?;
    let lag = gtid::lag(&home_pos, &replica.gtid_slave_pos);
    if let Some(secs) = replica
        .seconds_behind
        .filter(|s| *s > op.limits.max_lag_secs)
    {
        return Err((
            "rpo",
            format!(
                "{} is {secs} s behind {} (gate: {} s); wait for it to catch up",
                op.target, op.source, op.limits.max_lag_secs
            ),
        ));
    }
    if lag > op.limits.max_lag_gtids {
        return Err((
            "rpo",
            format!(
                "{} is {lag} transactions behind {} (gate: {}); wait for it to catch up",
                op.target, op.source, op.limits.max_lag_gtids
            ),
        ));
    }
    capacity_gate(op, obs, reg, home)?;
    if obs.routers.is_empty() {
        return Err((
            "routers",
            "no live router acknowledges tables; start one so the freeze can be confirmed".into(),
        ));
    }
    Ok(())
}

/// The target keeps headroom after taking the moving load: its own rate plus the moving
/// share of the source's, against its weight's capacity. Rates not measured yet count as
/// zero (a cell without traffic moves freely).
fn capacity_gate(
    op: &Switchover,
    obs: &Observed,
    target: &Registration,
    source: &Registration,
) -> Result<(), (&'static str, String)> {
    let per_weight = op.limits.capacity_rps_per_weight;
    if per_weight == 0 {
        return Ok(());
    }
    let t = obs.table;
    let moving_slots = (0..t.slots)
        .filter(|&s| t.data_home(s).name == op.cell && t.cell_for_slot(s).name == op.source)
        .count() as u64;
    let source_slots = u64::from(t.slot_count(&op.source)).max(1);
    let source_rate = source.requests_per_sec.unwrap_or(0);
    let moving = source_rate * moving_slots.min(source_slots) / source_slots;
    let projected = target.requests_per_sec.unwrap_or(0) + moving;
    let capacity = u64::from(target.capacity_weight) * per_weight;
    let allowed = capacity * op.limits.max_utilization_pct / 100;
    if projected > allowed {
        return Err((
            "capacity",
            format!(
                "{} would serve {projected} requests/s ({moving} moving from {}), over {}% of its capacity {capacity} (weight {} x {per_weight}); add capacity to its region, raise its capacityWeight, or move fewer cells at once",
                op.target,
                op.source,
                op.limits.max_utilization_pct,
                target.capacity_weight
            ),
        ));
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

/// Leaves the reverse step: to the flip (a failback) or the end (a switchover).
fn after_reverse(next: &mut Switchover, op: &Switchover, now_ms: u64, note: String) {
    match op.after(Step::Reverse) {
        Step::Done => {
            let warnings = warnings(next);
            finish_with_note(next, now_ms, Outcome::Succeeded { warnings }, note);
        }
        step => enter(next, step, now_ms, note),
    }
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
fn want_intent(
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
fn want_intent_with(
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
        by: String::new(),
    });
    next.step = step;
    next.step_started_ms = now_ms;
}

fn finish(next: &mut Switchover, now_ms: u64, outcome: Outcome) {
    let note = match &outcome {
        Outcome::Refused { message, .. } => message.clone(),
        _ => String::new(),
    };
    finish_with_note(next, now_ms, outcome, note);
}

fn finish_with_note(next: &mut Switchover, now_ms: u64, outcome: Outcome, note: String) {
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
        by: String::new(),
    });
}

fn warnings(op: &Switchover) -> Vec<String> {
    op.steps
        .iter()
        .filter_map(|s| s.note.strip_prefix("error: ").map(str::to_string))
        .collect()
}

/// Two cells, `a` in us and `b` in eu, each the other's standby (tests of this module and
/// of `detect`).
#[cfg(test)]
pub(crate) fn pair_table(epoch: u64, slots: u32) -> RoutingTable {
    use cellplane_cells::routing::CellEntry;
    let mut a = CellEntry::active("a", "us", vec!["a:80".into()]);
    a.standby = Some("b".into());
    let mut b = CellEntry::active("b", "eu", vec!["b:80".into()]);
    b.standby = Some("a".into());
    RoutingTable::placed("shop", epoch, slots, vec![(a, 1), (b, 1)]).expect("a valid pair")
}

/// A healthy Active cell's registration in `region` with its MySQL as given (tests of
/// this module and of `detect`).
#[cfg(test)]
pub(crate) fn healthy_registration(
    region: &str,
    mysql: cellplane_cells::etcd_keys::MysqlReport,
) -> Registration {
    Registration {
        region: region.into(),
        zone: None,
        state: CellPhase::Active,
        capacity_weight: 1,
        standby: None,
        endpoints: BTreeMap::new(),
        healthy: true,
        mysql: Some(mysql),
        kafka_lag: Some(0),
        requests_per_sec: None,
        intent_generation: 1,
        healthy_since_ms: Some(0),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use cellplane_cells::crd::CellPhase;
    use cellplane_cells::etcd_keys::{MysqlReport, RebuildReport, ReplicaReport};

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
        /// The cell whose writes the model tracks (the operation's source) and the replica
        /// that must have them all before the flip (the target).
        writer: &'static str,
        replica: &'static str,
        /// What the replica has applied of the writer's writes (random mode).
        applied: u64,
        /// Random mode: how reliably (percent per tick) routers acknowledge, regions carry
        /// out intents and the replica applies; each run draws its own.
        odds: [u64; 3],
        kafka_lag: u64,
        /// Writes each cell's primary took (its GTID sequence).
        writes: BTreeMap<String, u64>,
        /// Each cell's measured user requests per second.
        rps: BTreeMap<String, u64>,
        busy: bool,
        /// Live ownership leases by cell.
        owners: BTreeMap<String, usize>,
        /// Random mode: the writer takes no writes itself (the unplanned-failover model
        /// writes through the app's ownership lease instead).
        writes_gated: bool,
        /// The replica's binlog holds the writer's domain at what it applied (MariaDB's
        /// log_slave_updates), as the real cells run.
        log_replica_updates: bool,
        /// Largest time step in random mode.
        max_step_ms: u64,
        /// The rebuild each cell's region carried out.
        rebuilds: BTreeMap<String, RebuildReport>,
        /// The replays of failed-over cells' orders: the old home's app forwards 3 (one
        /// was already persisted) once its region answers again.
        recent: Recent,
        /// The old home's app never forwards its orders.
        app_silent: bool,
        /// What every region reports as its cells' `healthySinceMs`.
        healthy_since_ms: Option<u64>,
    }

    fn pos(cell: &str, seq: u64) -> String {
        let domain = if cell == "a" { 1 } else { 2 };
        format!("{domain}-{domain}-{seq}")
    }

    impl World {
        fn new() -> Self {
            let table = pair_table(7, 256);
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
                rps: BTreeMap::new(),
                dice: None,
                writer: "a",
                replica: "b",
                applied: 500,
                odds: [100, 100, 100],
                owners: BTreeMap::from([("a".into(), 1), ("b".into(), 1)]),
                writes_gated: false,
                log_replica_updates: false,
                rebuilds: BTreeMap::new(),
                recent: Recent::default(),
                app_silent: false,
                healthy_since_ms: Some(0),
                max_step_ms: 3000,
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
                        rebuild_from: None,
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
                        ..Default::default()
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
                owners: &self.owners,
                busy: self.busy,
                recent: &self.recent,
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
                Some(d) => 1 + d.below(self.max_step_ms),
                None => 100,
            };
            if self.dice.is_some() {
                // The home takes writes while its MySQL really is writable (a stale app
                // or router may send them whatever the table says).
                let writable = self
                    .cells
                    .get(self.writer)
                    .and_then(|r| r.mysql.as_ref())
                    .is_some_and(|m| !m.read_only);
                if writable && !self.writes_gated && self.roll(80) {
                    *self.writes.get_mut(self.writer).unwrap() += 1;
                }
                let replicating = self
                    .intents
                    .get(self.replica)
                    .is_some_and(|i| i.replicate_from.iter().any(|c| c == self.writer));
                if replicating && !self.replica_frozen && self.roll(self.odds[2]) {
                    let step = self.dice.as_mut().unwrap().below(3);
                    self.applied = (self.applied + step).min(self.writes[self.writer]);
                }
                if self.kafka_lag > 0 && self.roll(50) {
                    self.kafka_lag -= 1;
                }
            }
            let ids: Vec<String> = self.routers.keys().cloned().collect();
            let frozen = self.table.cells.iter().any(|c| c.frozen);
            for id in ids {
                if !self.stuck_routers.contains(&id) && self.roll(self.odds[0]) {
                    let epoch = self.table.epoch;
                    let ack = self.routers.get_mut(&id).unwrap();
                    ack.applied_epoch = epoch;
                    // Each router holds two requests per tick of a freeze.
                    if frozen {
                        ack.held_total += 2;
                    }
                }
            }
            let names: Vec<String> = self.intents.keys().cloned().collect();
            for cell in names {
                let intent = self.intents[&cell].clone();
                let old = self.cells.get(&cell).cloned();
                // A deaf region reports nothing (a cut-off one not even a first time).
                if self.deaf_regions.contains(&cell) || (!self.roll(self.odds[1]) && old.is_some())
                {
                    continue;
                }
                // The old home's app forwards its log once it sees its cell failed over.
                let failed_over = self
                    .table
                    .cell(&cell)
                    .is_some_and(|c| c.state == CellPhase::FailedOver && !c.frozen);
                if failed_over && !self.app_silent && !self.recent.replays.contains_key(&cell) {
                    let epoch = self.table.epoch;
                    self.recent.replays.insert(
                        cell.clone(),
                        ReplayState {
                            sent: Some(ReplaySent {
                                epoch,
                                forwarded: 3,
                                ..Default::default()
                            }),
                            applied: Some(ReplayApplied {
                                epoch,
                                persisted: 2,
                                duplicates: 1,
                                voided: 0,
                            }),
                            pending: 0,
                        },
                    );
                }
                // The region rebuilds the cell from the new home once per operation: its
                // errant writes exported, its position the new home's view of it.
                if let (Some(src), Some(op)) = (&intent.rebuild_from, &intent.operation) {
                    if self.rebuilds.get(&cell).is_none_or(|r| &r.operation != op) {
                        let kept = if cell == self.writer { self.applied } else { 0 };
                        let errant = self.writes[&cell] - kept;
                        self.writes.insert(cell.clone(), kept);
                        self.rebuilds.insert(
                            cell.clone(),
                            RebuildReport {
                                operation: op.clone(),
                                source: src.clone(),
                                errant_transactions: errant,
                                export_file: format!("/exports/{op}-{cell}-errant.jsonl"),
                                cloned_at: pos(src, self.writes[src]),
                                rows: 42,
                                done: true,
                                error: String::new(),
                            },
                        );
                    }
                }
                let mut replicas = BTreeMap::new();
                for source in &intent.replicate_from {
                    let applied =
                        if self.dice.is_some() && cell == self.replica && source == self.writer {
                            pos(self.writer, self.applied)
                        } else if self.replica_frozen && cell == self.replica {
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
                        kafka_lag: Some(if cell == self.writer {
                            self.kafka_lag
                        } else {
                            0
                        }),
                        requests_per_sec: self.rps.get(&cell).copied(),
                        intent_generation: intent.generation,
                        healthy_since_ms: self.healthy_since_ms,
                        ..healthy_registration(
                            "r",
                            MysqlReport {
                                read_only: !intent.writable,
                                gtid_binlog_pos: if self.log_replica_updates && cell == self.replica
                                {
                                    format!(
                                        "{},{}",
                                        pos(self.writer, self.applied),
                                        pos(&cell, self.writes[&cell])
                                    )
                                } else {
                                    pos(&cell, self.writes[&cell])
                                },
                                replicas,
                                rebuild: self.rebuilds.get(&cell).cloned(),
                            },
                        )
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

    /// A world in which `a` switched over to `b` (b serves a's slots from a's data), with
    /// the model now tracking b's writes as they reach a.
    fn failed_over_world() -> (World, RoutingTable) {
        let mut w = World::new();
        let before = w.table.clone();
        let (op, _) = w.run(start(&w), 100);
        assert!(matches!(op.outcome, Some(Outcome::Succeeded { .. })));
        w.writer = "b";
        w.replica = "a";
        w.applied = w.writes["b"];
        w.tick();
        (w, before)
    }

    fn start_failback(w: &World) -> Switchover {
        Switchover::failback("fb-1", "a", "b", "test", Limits::default(), w.now_ms)
    }

    #[test]
    fn a_failback_returns_the_slots_and_leaves_both_cells_writable_and_paired() {
        let (mut w, before) = failed_over_world();
        *w.writes.get_mut("b").unwrap() += 40;
        w.tick();
        let (op, tables) = w.run(start_failback(&w), 100);
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
                Step::Reverse,
                Step::Flip
            ],
            "the source is writable again before its users are released"
        );
        assert_eq!(tables.len(), 2, "freeze b, then flip");
        assert!(tables[0].cell("b").unwrap().frozen);
        assert_eq!(
            w.table.owners, before.owners,
            "every slot back where it was"
        );
        assert!(w.table.data_homes.is_empty());
        assert_eq!(w.table.cell("a").unwrap().state, CellPhase::Active);
        assert!(!w.table.cell("b").unwrap().frozen);
        assert_eq!(op.final_gtid.as_deref(), Some("2-2-340"), "b's position");
        for (cell, source) in [("a", "b"), ("b", "a")] {
            assert!(w.intents[cell].writable, "{cell}");
            assert_eq!(w.intents[cell].replicate_from, vec![source.to_string()]);
        }
    }

    /// After an unplanned failover the old home must stay healthy for the stabilization
    /// window (since it came back) before its users return; after a planned one, no wait.
    #[test]
    fn a_failback_after_a_loss_waits_for_the_stabilization_window() {
        let (mut w, _) = failed_over_world();
        let (op, _) = w.run(start_failback(&w), 100);
        assert!(
            matches!(op.outcome, Some(Outcome::Succeeded { .. })),
            "planned: no window"
        );
        let (mut w, _) = failed_over_world();
        let lost = w.now_ms;
        w.recent.lost_at_ms.insert("a".into(), lost);
        // Healthy since before the loss does not count: it was lost after that.
        w.now_ms += 400_000;
        w.tick();
        let (op, _) = w.run(start_failback(&w), 3);
        assert!(
            matches!(&op.outcome, Some(Outcome::Refused { gate, message }) if gate == "stable" && message.contains("healthy for 0 s of the 300 s stabilization window") && message.contains("--stabilization-secs")),
            "{:?}",
            op.outcome
        );
        // Back 100 s ago: 200 s to wait.
        w.healthy_since_ms = Some(w.now_ms - 100_000);
        w.tick();
        let (op, _) = w.run(start_failback(&w), 3);
        assert!(
            matches!(&op.outcome, Some(Outcome::Refused { message, .. }) if message.contains("healthy for 100 s") && message.contains("wait 200 s")),
            "{:?}",
            op.outcome
        );
        let due = |w: &World, ops: &[Switchover]| {
            super::super::detect::failbacks_due(&w.observed(), ops, 300_000)
        };
        assert!(due(&w, &[]).is_empty(), "not yet");
        w.now_ms += 200_000;
        w.tick();
        assert_eq!(due(&w, &[]), vec![("a".to_string(), "b".to_string())]);
        // Not while another operation touches the pair, nor again soon after an
        // automatic attempt (a refused one included).
        let mut other = start(&w);
        other.cell = "b".into();
        assert!(due(&w, &[other]).is_empty());
        let mut tried = Switchover::failback(
            "fb-0",
            "a",
            "b",
            super::super::detect::AUTOMATIC,
            Limits::default(),
            w.now_ms - 1,
        );
        tried.outcome = Some(Outcome::Refused {
            gate: "rpo".into(),
            message: String::new(),
        });
        assert!(due(&w, &[tried]).is_empty());
        let (op, _) = w.run(start_failback(&w), 100);
        assert!(
            matches!(op.outcome, Some(Outcome::Succeeded { .. })),
            "{:?}",
            op.outcome
        );
        assert!(due(&w, &[]).is_empty(), "a serves its users again");
    }

    #[test]
    fn last_losses_name_cells_whose_last_move_was_unplanned() {
        let mut planned = Switchover::new("s", "a", "b", "t", Limits::default(), 10);
        planned.flip_epoch = Some(5);
        let mut lost = Switchover::emergency(
            "f",
            "a",
            "b",
            "t",
            Limits::default(),
            Loss {
                detected_at_ms: 20,
                ..Loss::default()
            },
        );
        lost.flip_epoch = Some(9);
        assert_eq!(
            last_losses(&[planned.clone(), lost.clone()]),
            BTreeMap::from([("a".to_string(), 20)])
        );
        planned.flip_epoch = Some(12);
        assert!(
            last_losses(&[planned, lost.clone()]).is_empty(),
            "a planned move since"
        );
        lost.flip_epoch = None;
        assert!(
            last_losses(&[lost]).is_empty(),
            "a failover that never flipped"
        );
    }

    #[test]
    fn a_failback_is_refused_for_a_serving_cell_or_the_wrong_source() {
        let mut w = World::new();
        let (op, _) = w.run(start_failback(&w), 3);
        assert!(
            matches!(&op.outcome, Some(Outcome::Refused { gate, message }) if gate == "state" && message.contains("only a failed-over cell")),
            "{:?}",
            op.outcome
        );
        let (mut w, _) = failed_over_world();
        let op = Switchover::failback("fb", "a", "c", "t", Limits::default(), w.now_ms);
        let (op, _) = w.run(op, 3);
        assert!(
            matches!(&op.outcome, Some(Outcome::Refused { gate, .. }) if gate == "source"),
            "{:?}",
            op.outcome
        );
        // A switchover of the failed-over cell points at failback.
        let (op, _) = w.run(start(&w), 3);
        assert!(
            matches!(&op.outcome, Some(Outcome::Refused { message, .. }) if message.contains("cellplane failback")),
            "{:?}",
            op.outcome
        );
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

    /// The same model check for a failback: the source (`b`) serves its own users and
    /// a's, so it is fenced only for the move; a gets the slots back only once b was fenced
    /// and a has every write b took until then; a rollback leaves b serving and writable
    /// and a failed over and read-only.
    #[test]
    fn model_check_failback_never_loses_a_write() {
        let mut outcomes = BTreeMap::<&str, u32>::new();
        for seed in 1..=2000u64 {
            let (mut w, before) = failed_over_world();
            let mut dice = Dice(seed.wrapping_mul(0xD1B5_4A32_D192_ED03) | 1);
            let levels = [3, 20, 60, 95];
            w.odds = [0, 1, 2].map(|_| levels[dice.below(4) as usize]);
            w.dice = Some(dice);
            w.kafka_lag = seed % 5;
            let mut op = start_failback(&w);
            let mut moved = false;
            for _ in 0..5000 {
                let (next, actions) = advance(&op, &w.observed());
                let crashed = w.roll(10) && !actions.is_empty() && seed % 3 == 0;
                for a in &actions {
                    if let Action::WriteTable(t) = a {
                        if !crashed && t.slot_count("a") > 0 && w.table.slot_count("a") == 0 {
                            assert!(
                                op.final_gtid.is_some(),
                                "seed {seed}: slots moved before b was fenced"
                            );
                            assert!(
                                w.applied
                                    >= op.final_gtid.as_deref().map_or(u64::MAX, |g| {
                                        g.rsplit('-').next().unwrap().parse().unwrap()
                                    }),
                                "seed {seed}: slots moved before a had b's final position"
                            );
                            moved = true;
                        }
                    }
                }
                if !crashed {
                    w.apply(actions);
                }
                // Between its fence and its reverse, b is read-only: a write there would
                // be one a might lack.
                if matches!(op.step, Step::CatchUp | Step::Promote) {
                    let b_mysql = w.cells["b"].mysql.as_ref().unwrap();
                    assert!(
                        b_mysql.read_only,
                        "seed {seed}: b writable at {:?}",
                        op.step
                    );
                }
                op = next;
                if op.finished() {
                    break;
                }
                w.tick();
            }
            assert!(op.finished(), "seed {seed}: still at {:?}", op.step);
            *outcomes
                .entry(match &op.outcome {
                    Some(Outcome::Succeeded { .. }) => "succeeded",
                    Some(Outcome::RolledBack { .. }) => "rolled back",
                    _ => "refused",
                })
                .or_default() += 1;
            match &op.outcome {
                Some(Outcome::Succeeded { .. }) => {
                    assert!(moved, "seed {seed}");
                    assert_eq!(w.table.owners, before.owners, "seed {seed}");
                    assert!(w.intents["a"].writable && w.intents["b"].writable);
                }
                Some(Outcome::RolledBack { .. }) => {
                    assert!(!moved, "seed {seed}: rolled back after the move");
                    assert!(!w.table.cell("b").unwrap().frozen, "seed {seed}");
                    assert_eq!(w.table.slot_count("a"), 0);
                    assert!(w.intents["b"].writable, "seed {seed}");
                    assert!(!w.intents["a"].writable, "seed {seed}");
                }
                Some(Outcome::Refused { .. }) => assert!(!moved),
                None => unreachable!(),
            }
        }
        // The worlds exercise both ends.
        assert!(
            outcomes.get("succeeded") > Some(&100) && outcomes.get("rolled back") > Some(&100),
            "{outcomes:?}"
        );
    }

    /// Region us (cell `a`) cut off from the etcd majority and from `b`, as the lab's netlab
    /// does it: `a`'s app and region keep running but renew nothing; its registration and
    /// ownership lease expire on etcd's clock; `b` stops receiving `a`'s writes.
    struct Cut {
        w: World,
        t: FailoverTimings,
        /// When the cut began and ends (None: not cut / never heals).
        cut_at: u64,
        heal_at: Option<u64>,
        /// `a`'s app: when its last confirmed renewal was sent, and when etcd expires it.
        confirmed_sent: Option<u64>,
        lease_expires: u64,
        /// `a`'s region: its last registration renewal.
        registered_at: u64,
        /// Percent per tick that `a`'s clients send a write.
        write_odds: u64,
        /// When `a`'s app last admitted a write, and when the slots moved to `b`.
        last_admit: Option<u64>,
        flipped_at: Option<u64>,
    }

    impl Cut {
        fn new(cut_at: u64, heal_at: Option<u64>, dice: Dice, odds: [u64; 3]) -> Self {
            let mut w = World::new();
            w.dice = Some(dice);
            w.odds = odds;
            w.writes_gated = true;
            w.log_replica_updates = true;
            w.max_step_ms = 300;
            let now = w.now_ms;
            let t = FailoverTimings::default();
            Self {
                w,
                cut_at,
                heal_at,
                confirmed_sent: Some(now),
                lease_expires: now + t.owner_lease_ttl_ms,
                registered_at: now,
                write_odds: 80,
                last_admit: None,
                flipped_at: None,
                t,
            }
        }

        fn cut(&self) -> bool {
            let now = self.w.now_ms;
            now >= self.cut_at && self.heal_at.is_none_or(|h| now < h)
        }

        fn tick(&mut self) {
            let cut = self.cut();
            self.w.deaf_regions = if cut { vec!["a".into()] } else { vec![] };
            self.w.replica_frozen = cut;
            self.w.tick();
            let now = self.w.now_ms;
            if !self.cut() {
                // `a` reaches etcd: it renews a live lease, or takes a new one when the
                // table lets it (serving, unfrozen).
                let entry = self.w.table.cell("a").unwrap();
                let may_take = serves_traffic(entry.state) && !entry.frozen;
                if now < self.lease_expires || may_take {
                    self.confirmed_sent = Some(now);
                    self.lease_expires = now + self.t.owner_lease_ttl_ms;
                }
                self.registered_at = now;
            } else if now >= self.registered_at + self.t.registration_ttl_ms {
                self.w.cells.remove("a");
            }
            let live = usize::from(now < self.lease_expires);
            self.w.owners.insert("a".into(), live);
            // `a`'s app admits writes only while its lease is fresh (its clients inside the
            // cut-off region keep sending them).
            if may_write(self.confirmed_sent, now, &self.t) && self.w.roll(self.write_odds) {
                *self.w.writes.get_mut("a").unwrap() += 1;
                self.last_admit = Some(now);
                assert!(
                    self.flipped_at.is_none(),
                    "a took a write at {now} after its slots moved at {:?}",
                    self.flipped_at
                );
            }
        }
    }

    use cellplane_cells::failover_timing::may_write;

    /// Region us cut off for good: `a` reports nothing, its registration and lease are
    /// gone; what the leader found.
    fn cut_off_a(w: &mut World) -> Loss {
        w.deaf_regions = vec!["a".into()];
        w.cells.remove("a");
        w.owners.insert("a".into(), 0);
        Loss {
            detected_at_ms: w.now_ms,
            reason: "test".into(),
            ..Loss::default()
        }
    }

    /// A lease taken between the preflight and the freeze (the cell came back just then):
    /// the standby is not promoted while it lives; the cell registered healthy again gets
    /// its slots back; one that keeps a lease without registering is rolled back at the
    /// step timeout.
    #[test]
    fn a_lost_cell_that_still_holds_a_lease_is_not_promoted_over() {
        let mut w = World::new();
        let loss = cut_off_a(&mut w);
        let op = Switchover::emergency("f", "a", "b", "test", Limits::default(), loss);
        let (op, _) = w.run(op, 3);
        assert_eq!(op.step, Step::Expire, "{:?}", op.steps);
        assert!(w.table.cell("a").unwrap().frozen);
        assert!(!w.intents["a"].writable, "fenced by intent at the freeze");
        // The lease came back just before the freeze: the standby waits, then gives up.
        w.owners.insert("a".into(), 1);
        let (op, tables) = w.run(op, 400);
        assert_eq!(
            tables.last().map(|t| t.cell("a").unwrap().frozen),
            Some(false)
        );
        match &op.outcome {
            Some(Outcome::RolledBack { step, reason }) => {
                assert_eq!(*step, Step::Expire);
                assert!(reason.contains("still holds 1 ownership lease"), "{reason}");
            }
            other => panic!("{other:?}"),
        }
        assert_eq!(w.table.cell("a").unwrap().state, CellPhase::Active);
        assert!(w.intents["a"].writable);
    }

    /// The whole unplanned path: found lost, frozen, leases waited out plus the margin,
    /// promoted without a final position, flipped; the old home returns fenced and what it
    /// wrote that the standby never got is counted, never dropped.
    #[test]
    fn an_unplanned_failover_promotes_after_the_leases_and_counts_errant_writes_on_return() {
        let mut w = World::new();
        w.log_replica_updates = true;
        // b applied a's writes up to 495 of 500 when the region was cut.
        w.applied = 495;
        w.replica_frozen = true;
        let loss = Loss {
            last_home_gtid: Some(pos("a", 500)),
            ..cut_off_a(&mut w)
        };
        let op = Switchover::emergency("f", "a", "b", "test", Limits::default(), loss);
        let (op, tables) = w.run(op, 50);
        assert_eq!(
            steps(&op),
            [
                Step::Preflight,
                Step::Freeze,
                Step::Expire,
                Step::Promote,
                Step::Flip
            ]
        );
        assert_eq!(op.step, Step::Rejoin, "waits for the old home");
        let expire = &op.steps[2];
        let gone = op.loss.as_ref().unwrap().leases_gone_at_ms.unwrap();
        assert!(expire.ended_ms >= gone + Limits::default().expiry_margin_ms);
        assert_eq!(tables.len(), 2, "freeze, then the flip");
        assert_eq!(w.table.cell("a").unwrap().state, CellPhase::FailedOver);
        assert_eq!(w.table.slot_count("a"), 0);
        let loss = op.loss.clone().unwrap();
        assert_eq!(loss.estimated_lost_gtids, Some(5), "500 seen, 495 applied");
        assert!(loss.promoted_at_gtid.unwrap().contains("1-1-495"));
        // b replicates nothing from a any more, and a is fenced with no replication.
        assert!(w.intents["b"].replicate_from.is_empty());
        assert!(!w.intents["a"].writable && w.intents["a"].replicate_from.is_empty());
        // The region returns: a wrote 3 more in its last moments before its fence.
        *w.writes.get_mut("a").unwrap() += 3;
        w.deaf_regions.clear();
        w.tick();
        let (op, _) = w.run(op, 1);
        let loss = op.loss.clone().unwrap();
        assert_eq!(
            loss.errant_transactions,
            Some(8),
            "5 never sent plus 3 late"
        );
        assert_eq!(loss.returned_gtid.as_deref(), Some(pos("a", 503).as_str()));
        assert_eq!(
            op.step,
            Step::Rejoin,
            "kept fenced while errant writes exist"
        );
        assert!(w.cells["a"].mysql.as_ref().unwrap().read_only);
        assert!(warnings(&op)[0].contains("8 transaction(s) that never reached b"));
        // Then its region is asked to export them and rebuild a from b; a stays fenced
        // and replicates nothing until that is done.
        let (op, _) = w.run(op, 1);
        assert_eq!(op.step, Step::Rejoin);
        assert_eq!(w.intents["a"].rebuild_from.as_deref(), Some("b"));
        assert!(!w.intents["a"].writable && w.intents["a"].replicate_from.is_empty());
        let (op, _) = w.run(op, 5);
        assert_eq!(
            op.outcome,
            Some(Outcome::Succeeded {
                warnings: warnings(&op)
            })
        );
        let loss = op.loss.clone().unwrap();
        assert_eq!(
            loss.errant_transactions,
            Some(8),
            "the count on return stays"
        );
        assert_eq!(loss.errant_exported, Some(8));
        assert_eq!(
            loss.errant_export.as_deref(),
            Some("/exports/f-a-errant.jsonl")
        );
        assert_eq!(loss.rebuilt_rows, Some(42));
        assert!(loss.rebuilt_at_gtid.is_some());
        assert!(
            op.steps
                .last()
                .unwrap()
                .note
                .contains("exported 8 errant transaction(s) to /exports/f-a-errant.jsonl"),
            "{:?}",
            op.steps
        );
        // The orders a's log had acknowledged were forwarded and persisted at b.
        assert_eq!(
            loss.replay,
            Some(ReplayFigures {
                forwarded: 3,
                persisted: 2,
                duplicates: 1,
                ..Default::default()
            })
        );
        assert!(op.steps.last().unwrap().note.contains(
            "its log's orders replayed: 3 forwarded, 2 persisted late, 1 already there, 0 voided"
        ));
    }

    /// The routers' view of the lost cell's users goes into the record; the RTO clients
    /// saw counts routers outside the lost region (its own clients could reach nothing).
    #[test]
    fn the_record_keeps_what_clients_saw_through_each_router() {
        let mut w = World::new();
        let loss = cut_off_a(&mut w);
        let found = loss.detected_at_ms;
        let outage = |first: u64, recovered: Option<u64>| Outage {
            first_failed_ms: found + first,
            last_failed_ms: found + first + 10,
            failed_requests: 4,
            recovered_at_ms: recovered.map(|r| found + r),
        };
        for (id, region, o) in [
            ("r-eu", "eu", outage(100, Some(900))),
            ("r-us", "us", outage(50, None)),
        ] {
            let ack = w.routers.get_mut(id).unwrap();
            ack.region = region.into();
            ack.outages.insert("a".into(), o);
            // Another cell's users' outage is not this one's.
            ack.outages.insert("b".into(), outage(0, Some(10)));
        }
        let op = Switchover::emergency("f", "a", "b", "test", Limits::default(), loss);
        let (op, _) = w.run(op, 50);
        assert_eq!(op.step, Step::Rejoin);
        let loss = op.loss.clone().unwrap();
        assert_eq!(loss.clients.len(), 2);
        assert_eq!(loss.clients["r-eu"].region, "eu");
        assert_eq!(
            loss.client_rto_ms,
            Some(800),
            "r-eu's; r-us is in the lost region"
        );
        let text = super::super::report::text(&op);
        assert!(text.contains("clients through router r-eu (eu): 4 failed request(s) from 100 ms to 110 ms after the loss was found, served again 800 ms after the first failure"), "{text}");
        assert!(text.contains("clients through router r-us (us): 4 failed request(s) from 50 ms to 60 ms after the loss was found, not served again yet"), "{text}");
        assert!(
            text.contains("RTO seen by clients outside a's region: 800 ms"),
            "{text}"
        );
    }

    /// An old home whose app never confirms the replay of its orders: the operation ends
    /// after `REPLAY_CONFIRM_MS` with a warning that says where to look.
    #[test]
    fn a_replay_never_confirmed_ends_the_failover_with_a_warning() {
        let mut w = World::new();
        w.log_replica_updates = true;
        w.applied = 500;
        *w.writes.get_mut("a").unwrap() = 500;
        w.app_silent = true;
        let loss = cut_off_a(&mut w);
        let op = Switchover::emergency("f", "a", "b", "test", Limits::default(), loss);
        let (op, _) = w.run(op, 50);
        assert_eq!(op.step, Step::Rejoin);
        w.deaf_regions.clear();
        w.tick();
        let (op, _) = w.run(op, 5);
        assert_eq!(op.loss.as_ref().unwrap().errant_transactions, Some(0));
        assert!(!op.finished(), "waits for the replay");
        w.now_ms += REPLAY_CONFIRM_MS;
        let (op, _) = w.run(op, 2);
        assert!(op.finished());
        assert!(op.loss.as_ref().unwrap().replay.is_none());
        assert!(
            warnings(&op)
                .iter()
                .any(|w| w.contains("did not confirm forwarding its log's orders within 60 s")),
            "{:?}",
            warnings(&op)
        );
    }

    /// Model check of unplanned failover: thousands of random worlds in which region us is
    /// cut off at a random time (and maybe heals), time moves in random steps, regions and
    /// the replica act late, and the leader loses its actions at random. Whatever happens:
    /// the slots move to `b` only when `a` holds no lease, at least the write-completion
    /// budget after `a`'s last admitted write; `a` never takes a write after that; a cell
    /// that returns before the promotion gets its slots back; one that returns after it is
    /// kept fenced with exactly the writes `b` never got counted as errant.
    #[test]
    fn model_check_an_unplanned_failover_never_lets_two_cells_take_writes() {
        let mut outcomes = BTreeMap::<String, u32>::new();
        for seed in 1..=2000u64 {
            let mut dice = Dice(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1);
            let levels = [20, 60, 95];
            let odds = [0, 1, 2].map(|_| levels[dice.below(3) as usize]);
            let cut_at = 1_500 + dice.below(3_000);
            let heal_at = match dice.below(3) {
                0 => None,
                _ => Some(cut_at + 500 + dice.below(6_000)),
            };
            let write_odds = [80, 80, 10, 0][dice.below(4) as usize];
            let mut m = Cut::new(cut_at, heal_at, dice, odds);
            m.write_odds = write_odds;
            let budget = m.t.write_completion_budget_ms();
            let mut detector = super::super::detect::Detector::default();
            let mut op: Option<Switchover> = None;
            let mut counted_errant: Option<u64> = None;
            for _ in 0..3_000 {
                m.tick();
                let Some(current) = op.clone() else {
                    if heal_at.is_some_and(|h| m.w.now_ms > h + 5_000) {
                        break;
                    }
                    let (found, _) = detector.observe(&m.w.observed(), 0);
                    if let Some(f) = found.first() {
                        let limits = Limits {
                            expiry_margin_ms: m.t.expiry_margin_ms,
                            ..Limits::default()
                        };
                        op = Some(Switchover::emergency(
                            "f",
                            &f.cell,
                            &f.standby,
                            "model",
                            limits,
                            f.loss.clone(),
                        ));
                    }
                    continue;
                };
                let (next, actions) = advance(&current, &m.w.observed());
                if next.step == Step::Promote && current.step != Step::Promote {
                    let now = m.w.now_ms;
                    assert_eq!(
                        m.w.owners["a"], 0,
                        "seed {seed}: promoted with a live lease"
                    );
                    assert!(
                        now >= m.lease_expires + m.t.expiry_margin_ms,
                        "seed {seed}: promoted at {now}, {} ms after a's lease expired (margin {})",
                        now - m.lease_expires,
                        m.t.expiry_margin_ms
                    );
                }
                let crashed = seed % 3 == 0 && !actions.is_empty() && m.w.roll(10);
                if !crashed {
                    for a in &actions {
                        if let Action::WriteTable(t) = a {
                            if t.slot_count("a") == 0 && m.w.table.slot_count("a") > 0 {
                                let now = m.w.now_ms;
                                assert_eq!(m.w.owners["a"], 0, "seed {seed}");
                                if let Some(last) = m.last_admit {
                                    assert!(
                                        now >= last + budget,
                                        "seed {seed}: slots moved at {now}, {} ms after a's last write (budget {budget})",
                                        now - last
                                    );
                                }
                                m.flipped_at = Some(now);
                            }
                        }
                    }
                    m.w.apply(actions);
                }
                op = Some(next);
                let op = op.as_ref().unwrap();
                if op.finished() || (op.step == Step::Rejoin && m.heal_at.is_none()) {
                    break;
                }
                // Counted on return: what a wrote that b never applied (the rebuild that
                // follows makes a's history b's view of it).
                if op.step == Step::Rejoin && counted_errant.is_none() {
                    if let Some(n) = op.loss.as_ref().unwrap().errant_transactions {
                        assert_eq!(
                            n,
                            m.w.writes["a"] - m.w.applied,
                            "seed {seed}: errant transactions miscounted"
                        );
                        counted_errant = Some(n);
                    }
                }
            }
            let Some(op) = op else {
                // A short cut: back before its leases expired, never lost.
                assert!(
                    heal_at.is_some_and(|h| h < cut_at + m.t.owner_lease_ttl_ms + 300),
                    "seed {seed}: a never found lost (cut at {cut_at}, heal {heal_at:?})"
                );
                assert_eq!(m.w.table.cell("a").unwrap().state, CellPhase::Active);
                *outcomes.entry("a blip, never lost".into()).or_default() += 1;
                continue;
            };
            let key = match (&op.outcome, op.step) {
                (Some(Outcome::Refused { gate, .. }), _) => {
                    // Back between the detection and the freeze: the preflight saw it.
                    assert_eq!(gate, "lost", "seed {seed}");
                    assert!(
                        m.flipped_at.is_none()
                            && m.w.table.cell("a").unwrap().state == CellPhase::Active,
                        "seed {seed}"
                    );
                    "refused (returned before the freeze)".to_string()
                }
                (Some(Outcome::RolledBack { .. }), _) => {
                    assert!(m.flipped_at.is_none(), "seed {seed}");
                    assert!(!m.w.table.cell("a").unwrap().frozen, "seed {seed}");
                    assert!(m.w.intents["a"].writable, "seed {seed}");
                    "rolled back (returned in time)".to_string()
                }
                (Some(Outcome::Succeeded { .. }), _) | (None, Step::Rejoin) => {
                    assert!(m.flipped_at.is_some(), "seed {seed}");
                    assert_eq!(m.w.table.cell("a").unwrap().state, CellPhase::FailedOver);
                    assert!(!m.w.intents["a"].writable, "seed {seed}");
                    let loss = op.loss.as_ref().unwrap();
                    match (loss.errant_transactions, m.heal_at) {
                        (Some(errant), Some(_)) => {
                            assert_eq!(Some(errant), counted_errant, "seed {seed}");
                            // Ended once the old home's orders were replayed and, with
                            // errant writes, once they were exported and a rebuilt.
                            assert!(op.finished(), "seed {seed}: {:?}", op.steps);
                            assert!(loss.replay.is_some(), "seed {seed}");
                            if errant == 0 {
                                "failed over, nothing lost"
                            } else {
                                assert_eq!(loss.errant_exported, Some(errant), "seed {seed}");
                                assert!(loss.rebuilt_at_gtid.is_some(), "seed {seed}");
                                "failed over, errant exported, rebuilt"
                            }
                            .to_string()
                        }
                        (None, None) => "failed over, region still away".to_string(),
                        other => panic!("seed {seed}: {other:?} at {:?}", op.step),
                    }
                }
                other => panic!("seed {seed}: ended {other:?}"),
            };
            *outcomes.entry(key).or_default() += 1;
        }
        // Every path was taken.
        assert_eq!(outcomes.len(), 6, "{outcomes:?}");
    }
}
