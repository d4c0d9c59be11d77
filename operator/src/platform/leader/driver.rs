//! Driving operations (I/O, the platform leader): every unfinished record under `drills/`
//! is advanced one step per pass ([`operations::advance`]); the next record is written by
//! a compare-and-swap on the record's revision, fenced by the leader's election key, and
//! only then are its actions carried out ([`execute`], which knows no operation kind). A
//! leader that dies between the two leaves a record whose step the next leader runs again,
//! which changes nothing that already happened.

use super::detect::{self, Detector};
use super::PlatformConfig;
use crate::metrics::Metrics;
use crate::platform::observe::{keys_under, Records, Snapshot};
use crate::platform::operations::{
    self, batch, slot_move, Action, Batch, Limits, Observed, Operation, Outcome, SlotMove,
    Switchover,
};
use crate::platform::{intents, table_error};
use crate::Result;
use cellplane_cells::etcd_keys::{drill_key, intent_key, leased_key, leased_prefix, Intent};
use cellplane_table::write::{self, Fence, Swap};
use etcd_client::{Client, Compare, CompareOp, Txn, TxnOp};
use std::collections::{BTreeMap, BTreeSet};

/// Advances every unfinished operation by one step. Returns whether any is still running
/// (the caller then polls faster) or None when this leader lost its term.
pub async fn drive(
    client: &mut Client,
    cfg: &PlatformConfig,
    fence: &Fence,
    detector: &mut Detector,
    metrics: &Metrics,
) -> Result<Option<bool>> {
    let platform = cfg.platform.as_str();
    let mut records = Records::read(client, platform).await?;
    // Batches first: a wave they start is advanced in the same pass.
    if drive_batches(client, platform, fence, &mut records)
        .await?
        .is_none()
    {
        return Ok(None);
    }
    let all_operations = records.all();
    let running: Vec<(Switchover, i64)> = records
        .cells
        .values()
        .filter(|(op, _)| !op.finished())
        .cloned()
        .collect();
    let moves: Vec<(SlotMove, i64)> = records
        .moves
        .values()
        .filter(|(m, _)| !m.finished())
        .cloned()
        .collect();
    let mut held: BTreeSet<String> = running
        .iter()
        .flat_map(|(op, _)| op.cells().map(str::to_string))
        .collect();
    held.extend(
        moves
            .iter()
            .filter(|(m, _)| m.holds_cells())
            .flat_map(|(m, _)| m.cells().map(str::to_string)),
    );
    if !write_default_intents(client, platform, fence, &held).await? {
        return Ok(None);
    }
    let snapshot = Snapshot::read(client, platform, &all_operations).await?;
    if !mark_leased(client, platform, fence, detector, &snapshot.owners).await? {
        return Ok(None);
    }
    if let Some(table) = &snapshot.table {
        let observed = snapshot.observed(table, cellplane_table::store::now_ms(), false);
        match detect(
            client,
            cfg,
            fence,
            detector,
            metrics,
            &observed,
            &all_operations,
        )
        .await?
        {
            Some(false) => return Ok(None),
            // The new record runs from the next pass (50 ms), with its revision.
            Some(true) => return Ok(Some(true)),
            None => {}
        }
    }
    let batches = records.running_batches();
    for (i, (op, revision)) in running.iter().enumerate() {
        let current = write::read(client, platform).await.map_err(table_error)?;
        let Some(table) = &current.table else {
            tracing::warn!(operation = %op.id, "no routing table yet; the operation waits");
            continue;
        };
        // Operations run one at a time per cell: the oldest one (or batch) wins; a slot
        // move holds its cells until its retention window.
        let busy = running[..i].iter().any(|(other, _)| other.overlaps(op))
            || batch::blocked_by_batches(op, &batches, table)
            || moves
                .iter()
                .any(|(m, _)| m.holds_cells() && m.cells().iter().any(|c| op.cells().contains(c)));
        let observed = snapshot.observed(table, cellplane_table::store::now_ms(), busy);
        let Some(actions) = step(client, cfg, fence, metrics, op, *revision, &observed).await?
        else {
            return Ok(None);
        };
        if !execute(client, platform, fence, metrics, &current, actions).await? {
            return Ok(None);
        }
    }
    for (i, (m, revision)) in moves.iter().enumerate() {
        let current = write::read(client, platform).await.map_err(table_error)?;
        let Some(table) = &current.table else {
            continue;
        };
        // A move waits for the switchovers on its cells, for the moves before it on them,
        // and for any batch (a region's drain or failback moves many cells' slots).
        let busy = running
            .iter()
            .any(|(op, _)| !op.finished() && m.cells().iter().any(|c| op.cells().contains(c)))
            || moves[..i].iter().any(|(other, _)| {
                other.holds_cells() && other.cells().iter().any(|c| m.cells().contains(c))
            })
            || !batches.is_empty();
        let observed = snapshot.observed(table, cellplane_table::store::now_ms(), busy);
        let Some(actions) = step_move(client, cfg, fence, metrics, m, *revision, &observed).await?
        else {
            return Ok(None);
        };
        if !execute(client, platform, fence, metrics, &current, actions).await? {
            return Ok(None);
        }
    }
    // An operation waiting for a lost region's return, or a move in its retention window,
    // need not be polled fast.
    Ok(Some(
        running.iter().any(|(op, _)| !op.waiting_long())
            || moves.iter().any(|(m, _)| m.holds_cells()),
    ))
}

/// Advances one slot move and persists its next record; returns the actions to carry out
/// (None: the term is over).
async fn step_move(
    client: &mut Client,
    cfg: &PlatformConfig,
    fence: &Fence,
    metrics: &Metrics,
    m: &SlotMove,
    revision: i64,
    observed: &Observed<'_>,
) -> Result<Option<Vec<Action>>> {
    let (mut next, actions) = slot_move::advance(m, observed);
    for s in next.steps.iter_mut().skip(m.steps.len()) {
        s.by = cfg.identity.clone();
    }
    if next == *m {
        return Ok(Some(actions));
    }
    if !put_record(
        client,
        &cfg.platform,
        &Operation::SlotMove(next.clone()),
        revision,
        fence,
    )
    .await?
    {
        return Ok(None);
    }
    if next.step != m.step {
        tracing::info!(operation = %m.id, slots = %m.slots, source = %m.source, target = %m.target, from = ?m.step, to = ?next.step, "slot move step");
    }
    if let Some(outcome) = &next.outcome {
        finished(metrics, "slot_move", outcome);
        tracing::info!(operation = %m.id, ?outcome, write_freeze_ms = ?next.write_freeze_ms(), "slot move finished");
    }
    Ok(Some(actions))
}

/// Counts a finished operation by kind and outcome.
fn finished(metrics: &Metrics, kind: &'static str, outcome: &Outcome) {
    let labels = crate::metrics::OperationLabels {
        kind,
        outcome: match outcome {
            Outcome::Succeeded { .. } => "succeeded",
            Outcome::Refused { .. } => "refused",
            Outcome::RolledBack { .. } => "rolled_back",
        },
    };
    metrics.operations_finished.get_or_create(&labels).inc();
}

/// Cells no operation holds get the intents the table implies. False: the term is over.
async fn write_default_intents(
    client: &mut Client,
    platform: &str,
    fence: &Fence,
    busy: &BTreeSet<String>,
) -> Result<bool> {
    let Some(table) = write::read(client, platform)
        .await
        .map_err(table_error)?
        .table
    else {
        return Ok(true);
    };
    let in_force: BTreeMap<String, Intent> = crate::platform::observe::read_values(
        client,
        &cellplane_cells::etcd_keys::intents_prefix(platform),
    )
    .await?;
    for (cell, intent) in intents::to_write(&table, &in_force, busy) {
        tracing::info!(%cell, generation = intent.generation, writable = intent.writable, replicate_from = ?intent.replicate_from, "intent");
        if !put_intent(client, platform, &cell, &intent, fence).await? {
            return Ok(false);
        }
    }
    Ok(true)
}

/// Records which cells ever held an ownership lease (read once per term; written for the
/// next leader): only those are failed over automatically. False: the term is over.
async fn mark_leased(
    client: &mut Client,
    platform: &str,
    fence: &Fence,
    detector: &mut Detector,
    owners: &BTreeMap<String, usize>,
) -> Result<bool> {
    if !detector.markers_loaded() {
        let marked = keys_under(client, &leased_prefix(platform)).await?;
        detector.remember_leased(marked);
    }
    let new: Vec<String> = owners
        .iter()
        .filter(|(c, n)| **n > 0 && !detector.is_leased(c))
        .map(|(c, _)| c.clone())
        .collect();
    for cell in new {
        let key = leased_key(platform, &cell);
        if !fenced_put(client, &key, b"1".to_vec(), None, fence).await? {
            return Ok(false);
        }
        detector.remember_leased([cell]);
    }
    Ok(true)
}

/// Advances one operation and persists its next record; returns the actions to carry out
/// (None: the term is over).
async fn step(
    client: &mut Client,
    cfg: &PlatformConfig,
    fence: &Fence,
    metrics: &Metrics,
    op: &Switchover,
    revision: i64,
    observed: &Observed<'_>,
) -> Result<Option<Vec<Action>>> {
    let (mut next, actions) = operations::advance(op, observed);
    // The record says which leader ended each step (a handover shows in the report).
    for s in next.steps.iter_mut().skip(op.steps.len()) {
        s.by = cfg.identity.clone();
    }
    if next == *op {
        return Ok(Some(actions));
    }
    let record = Operation::Switchover(next.clone());
    if !put_record(client, &cfg.platform, &record, revision, fence).await? {
        return Ok(None);
    }
    if next.step != op.step {
        tracing::info!(operation = %op.id, cell = %op.cell, from = ?op.step, to = ?next.step, "operation step");
    }
    if let Some(outcome) = &next.outcome {
        finished(metrics, next.kind.label(), outcome);
        tracing::info!(operation = %op.id, ?outcome, write_freeze_ms = ?next.write_freeze_ms(), "operation finished");
    }
    Ok(Some(actions))
}

/// The executor: turns an operation's actions into etcd writes (the table by
/// compare-and-swap against `current`, intents fenced by the term). False: the term is over.
async fn execute(
    client: &mut Client,
    platform: &str,
    fence: &Fence,
    metrics: &Metrics,
    current: &write::Current,
    actions: Vec<Action>,
) -> Result<bool> {
    for action in actions {
        match action {
            Action::WriteTable(t) => {
                match write::compare_and_swap(
                    client,
                    current,
                    &t,
                    Some(fence),
                    write::DEFAULT_HISTORY,
                )
                .await
                .map_err(table_error)?
                {
                    Swap::NotLeader => return Ok(false),
                    // The next pass re-reads the table and asks again.
                    Swap::Stale => {
                        metrics.table_conflicts.inc();
                    }
                    Swap::Written { .. } => {
                        metrics.table_writes.inc();
                        metrics.table_epoch.set(t.epoch as i64);
                    }
                }
            }
            Action::WriteIntent { cell, intent } => {
                if !put_intent(client, platform, &cell, &intent, fence).await? {
                    return Ok(false);
                }
            }
        }
    }
    Ok(true)
}

async fn put_intent(
    client: &mut Client,
    platform: &str,
    cell: &str,
    intent: &Intent,
    fence: &Fence,
) -> Result<bool> {
    let bytes = serde_json::to_vec(intent).map_err(crate::Error::Serialization)?;
    fenced_put(client, &intent_key(platform, cell), bytes, None, fence).await
}

/// Looks for lost cells; starts the failover of one (automatic mode) when allowed.
/// Some(true): one was started; Some(false): the term is over; None: nothing started.
async fn detect(
    client: &mut Client,
    cfg: &PlatformConfig,
    fence: &Fence,
    detector: &mut Detector,
    metrics: &Metrics,
    observed: &Observed<'_>,
    operations: &[Switchover],
) -> Result<Option<bool>> {
    let now_ms = observed.now_ms;
    let (found, lost_now) = detector.observe(observed, cfg.timings.grace_ms);
    metrics.cells_lost.set(lost_now as i64);
    for f in found {
        let allowed = if cfg.auto_failover {
            detect::may_start_automatically(&f, operations, now_ms, &cfg.timings)
        } else {
            Err(format!(
                "automatic failover is off; fail it over with `cellplane failover {} --emergency`",
                f.cell
            ))
        };
        if let Err(why) = allowed {
            if detector.announce(&f.cell, &why) {
                tracing::error!(cell = %f.cell, lost = %f.loss.reason, %why, "cell lost; not failing it over");
            }
            continue;
        }
        let limits = Limits {
            expiry_margin_ms: cfg.timings.expiry_margin_ms,
            ..Limits::default()
        };
        let id = format!("failover-{}-{}", f.cell, now_ms);
        let op = Switchover::emergency(&id, &f.cell, &f.standby, detect::AUTOMATIC, limits, f.loss);
        if !put_record(
            client,
            &cfg.platform,
            &Operation::Switchover(op.clone()),
            0,
            fence,
        )
        .await?
        {
            return Ok(Some(false));
        }
        metrics.failovers_started.inc();
        tracing::error!(operation = %id, cell = %f.cell, standby = %f.standby, lost = ?op.loss.as_ref().map(|l| &l.reason), "cell lost: unplanned failover started");
        return Ok(Some(true));
    }
    if cfg.auto_failback {
        let window = cfg.stabilization.as_millis() as u64;
        if let Some((cell, source)) = detect::failbacks_due(observed, operations, window)
            .into_iter()
            .next()
        {
            let limits = Limits {
                stabilization_ms: window,
                ..Limits::default()
            };
            let id = format!("failback-{cell}-{now_ms}");
            let op = Switchover::failback(&id, &cell, &source, detect::AUTOMATIC, limits, now_ms);
            if !put_record(client, &cfg.platform, &Operation::Switchover(op), 0, fence).await? {
                return Ok(Some(false));
            }
            tracing::warn!(operation = %id, %cell, from = %source, window_secs = window / 1000, "the old home stayed healthy for the stabilization window: failback started");
            return Ok(Some(true));
        }
    }
    Ok(None)
}

/// Advances each running batch: the members it starts are created (their records did not
/// exist: revision 0) before the batch record that names them, so a leader that dies in
/// between leaves members that the next leader's batch pass finds by id.
async fn drive_batches(
    client: &mut Client,
    platform: &str,
    fence: &Fence,
    records: &mut Records,
) -> Result<Option<()>> {
    let Some(table) = write::read(client, platform)
        .await
        .map_err(table_error)?
        .table
    else {
        return Ok(Some(()));
    };
    let batches: Vec<(Batch, i64)> = records
        .batches
        .values()
        .filter(|(b, _)| b.outcome.is_none())
        .cloned()
        .collect();
    for (b, revision) in &batches {
        let members: BTreeMap<String, Switchover> = records
            .cells
            .iter()
            .filter(|(_, (s, _))| s.parent.as_deref() == Some(b.id.as_str()))
            .map(|(id, (s, _))| (id.clone(), s.clone()))
            .collect();
        let (next, wave) = batch::advance(b, &members, &table, cellplane_table::store::now_ms());
        for member in wave {
            if records.cells.contains_key(&member.id) {
                continue;
            }
            if !put_record(
                client,
                platform,
                &Operation::Switchover(member.clone()),
                0,
                fence,
            )
            .await?
            {
                return Ok(None);
            }
            tracing::info!(batch = %b.id, operation = %member.id, cell = %member.cell, "wave member started");
            // Its revision is unknown here; the next pass reads it.
            records.cells.insert(member.id.clone(), (member, -1));
        }
        if next != *b {
            if !put_record(
                client,
                platform,
                &Operation::Batch(next.clone()),
                *revision,
                fence,
            )
            .await?
            {
                return Ok(None);
            }
            if let Some(outcome) = &next.outcome {
                tracing::info!(batch = %b.id, ?outcome, "batch finished");
            }
        }
    }
    // Members just created run from the next pass, with their real revisions.
    records.cells.retain(|_, (_, rev)| *rev >= 0);
    Ok(Some(()))
}

/// Writes an operation record if it is still at `revision` (0: create) and this leader
/// still holds its term. False when the term is over.
pub async fn put_record(
    client: &mut Client,
    platform: &str,
    op: &Operation,
    revision: i64,
    fence: &Fence,
) -> Result<bool> {
    let bytes = serde_json::to_vec(op).map_err(crate::Error::Serialization)?;
    fenced_put(
        client,
        &drill_key(platform, op.id()),
        bytes,
        Some(revision),
        fence,
    )
    .await
}

/// Puts `key` in a transaction that checks the leader's fence (and, when given, the key's
/// revision). False when the fence failed; a lost revision race is not an error (the next
/// pass re-reads).
async fn fenced_put(
    client: &mut Client,
    key: &str,
    value: Vec<u8>,
    revision: Option<i64>,
    fence: &Fence,
) -> Result<bool> {
    let mut compares = vec![Compare::create_revision(
        fence.key.clone(),
        CompareOp::Equal,
        fence.create_revision,
    )];
    if let Some(rev) = revision {
        compares.push(Compare::mod_revision(key, CompareOp::Equal, rev));
    }
    let txn = Txn::new()
        .when(compares)
        .and_then([TxnOp::put(key, value, None)])
        .or_else([TxnOp::get(fence.key.clone(), None)]);
    let resp = client.txn(txn).await?;
    if resp.succeeded() {
        return Ok(true);
    }
    let still_leader = resp.op_responses().into_iter().any(|r| match r {
        etcd_client::TxnOpResponse::Get(g) => g
            .kvs()
            .first()
            .is_some_and(|kv| kv.create_revision() == fence.create_revision),
        _ => false,
    });
    Ok(still_leader)
}
