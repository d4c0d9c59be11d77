//! Driving operations (I/O, the platform leader): every unfinished record under `drills/`
//! is advanced one step per pass ([`switchover::advance`]); the next record is written by a
//! compare-and-swap on the record's revision, fenced by the leader's election key, and only
//! then are its actions carried out. A leader that dies between the two leaves a record
//! whose step the next leader runs again, which changes nothing that already happened.

use super::batch::{self, Batch, Operation};
use super::detect::{self, Detector};
use super::switchover::{self, Action, Observed, Recent, ReplayState, Switchover};
use crate::metrics::Metrics;
use crate::Result;
use cellplane_cells::etcd_keys::{
    all_owners_prefix, cells_prefix, drill_key, drills_prefix, intent_key, intents_prefix,
    leased_key, leased_prefix, replay_applied_key, replay_orders_prefix, replay_sent_key,
    routers_prefix, Intent, Registration, RouterAck,
};
use cellplane_table::write::{self, Fence, Swap};
use etcd_client::{Client, Compare, CompareOp, GetOptions, Txn, TxnOp};
use serde::de::DeserializeOwned;
use std::collections::{BTreeMap, BTreeSet};

/// Everything under one prefix, decoded, by the key's last segment; undecodable values
/// are logged and skipped.
pub async fn read_prefix<T: DeserializeOwned>(
    client: &mut Client,
    prefix: &str,
) -> Result<BTreeMap<String, (T, i64)>> {
    let resp = client
        .get(prefix, Some(GetOptions::new().with_prefix()))
        .await?;
    let mut out = BTreeMap::new();
    for kv in resp.kvs() {
        let name = String::from_utf8_lossy(&kv.key()[prefix.len()..]).into_owned();
        match serde_json::from_slice::<T>(kv.value()) {
            Ok(v) => {
                out.insert(name, (v, kv.mod_revision()));
            }
            Err(e) => {
                tracing::warn!(key = %String::from_utf8_lossy(kv.key()), error = %e, "unreadable record skipped")
            }
        }
    }
    Ok(out)
}

/// Everything under one prefix, decoded, by the key's last segment (revisions dropped).
pub async fn read_values<T: DeserializeOwned>(
    client: &mut Client,
    prefix: &str,
) -> Result<BTreeMap<String, T>> {
    Ok(read_prefix(client, prefix)
        .await?
        .into_iter()
        .map(|(k, (v, _))| (k, v))
        .collect())
}

/// Advances every unfinished operation by one step. Returns whether any is still running
/// (the caller then polls faster) or None when this leader lost its term.
pub async fn drive(
    client: &mut Client,
    cfg: &super::PlatformConfig,
    fence: &Fence,
    detector: &mut Detector,
    metrics: &Metrics,
) -> Result<Option<bool>> {
    let (platform, leader) = (cfg.platform.as_str(), cfg.identity.as_str());
    let ops: BTreeMap<String, (Operation, i64)> =
        read_prefix(client, &drills_prefix(platform)).await?;
    // Batches first: a wave they start is advanced in the same pass.
    let batches: Vec<(Batch, i64)> = ops
        .values()
        .filter_map(|(op, rev)| match op {
            Operation::Batch(b) if b.outcome.is_none() => Some((b.clone(), *rev)),
            _ => None,
        })
        .collect();
    let mut switchovers: BTreeMap<String, (Switchover, i64)> = ops
        .into_iter()
        .filter_map(|(id, (op, rev))| match op {
            Operation::Switchover(s) => Some((id, (s, rev))),
            Operation::Batch(_) => None,
        })
        .collect();
    if !batches.is_empty() {
        match drive_batches(client, platform, fence, &batches, &mut switchovers).await? {
            Some(()) => {}
            None => return Ok(None),
        }
    }
    let all_operations: Vec<Switchover> = switchovers.values().map(|(op, _)| op.clone()).collect();
    let running: Vec<(String, Switchover, i64)> = switchovers
        .into_iter()
        .filter(|(_, (op, _))| !op.finished())
        .map(|(id, (op, rev))| (id, op, rev))
        .collect();
    let intents: BTreeMap<String, Intent> = read_values(client, &intents_prefix(platform)).await?;
    // Cells no operation is moving get the intents the table implies.
    let busy: BTreeSet<String> = running
        .iter()
        .flat_map(|(_, op, _)| op.cells().map(str::to_string))
        .collect();
    // Read once for the intents and the detection: neither writes the table.
    let table = write::read(client, platform)
        .await
        .map_err(super::table_error)?
        .table;
    if let Some(table) = &table {
        for (cell, intent) in super::intents::to_write(table, &intents, &busy) {
            let bytes = serde_json::to_vec(&intent).map_err(crate::Error::Serialization)?;
            tracing::info!(%cell, generation = intent.generation, writable = intent.writable, replicate_from = ?intent.replicate_from, "intent");
            if !fenced_put(client, &intent_key(platform, &cell), bytes, None, fence).await? {
                return Ok(None);
            }
        }
    }
    let intents: BTreeMap<String, Intent> = read_values(client, &intents_prefix(platform)).await?;
    let cells: BTreeMap<String, Registration> =
        read_values(client, &cells_prefix(platform)).await?;
    let routers: BTreeMap<String, RouterAck> =
        read_values(client, &routers_prefix(platform)).await?;
    let owners = read_owners(client, platform).await?;
    // Which cells held a lease once: read once per term, recorded for the next leader.
    if !detector.markers_loaded() {
        let marked = keys_under(client, &leased_prefix(platform)).await?;
        detector.remember_leased(marked);
    }
    for cell in owners
        .iter()
        .filter(|(c, n)| **n > 0 && !detector.is_leased(c))
        .map(|(c, _)| c.clone())
        .collect::<Vec<_>>()
    {
        if !fenced_put(
            client,
            &leased_key(platform, &cell),
            b"1".to_vec(),
            None,
            fence,
        )
        .await?
        {
            return Ok(None);
        }
        detector.remember_leased([cell]);
    }
    let mut recent = Recent {
        lost_at_ms: switchover::last_losses(&all_operations),
        ..Recent::default()
    };
    if let Some(table) = &table {
        let observed = Observed {
            now_ms: cellplane_table::store::now_ms(),
            table,
            cells: &cells,
            routers: &routers,
            intents: &intents,
            owners: &owners,
            busy: false,
            recent: &recent,
        };
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
    if running.is_empty() {
        return Ok(Some(false));
    }
    // Only an unplanned failover waiting for its old home needs the replay of its orders.
    let rejoining: Vec<String> = running
        .iter()
        .filter(|(_, op, _)| {
            op.kind == switchover::Kind::Emergency && op.step == switchover::Step::Rejoin
        })
        .map(|(_, op, _)| op.source.clone())
        .collect();
    recent.replays = read_replays(client, platform, rejoining).await?;
    for (i, (id, op, revision)) in running.iter().enumerate() {
        let current = write::read(client, platform)
            .await
            .map_err(super::table_error)?;
        let Some(table) = &current.table else {
            tracing::warn!(operation = %id, "no routing table yet; the operation waits");
            continue;
        };
        // Operations run one at a time per cell: the oldest one (or batch) wins.
        let busy = running[..i].iter().any(|(_, other, _)| other.overlaps(op))
            || batch::blocked_by_batches(
                op,
                &batches.iter().map(|(b, _)| b.clone()).collect::<Vec<_>>(),
                table,
            );
        let observed = Observed {
            now_ms: cellplane_table::store::now_ms(),
            table,
            cells: &cells,
            routers: &routers,
            intents: &intents,
            owners: &owners,
            busy,
            recent: &recent,
        };
        let (mut next, actions) = switchover::advance(op, &observed);
        // The record says which leader ended each step (a handover shows in the report).
        for s in next.steps.iter_mut().skip(op.steps.len()) {
            s.by = leader.to_string();
        }
        if next != *op {
            let record = Operation::Switchover(next.clone());
            if !put_record(client, platform, &record, *revision, fence).await? {
                return Ok(None);
            }
            if next.step != op.step {
                tracing::info!(operation = %id, cell = %op.cell, from = ?op.step, to = ?next.step, "operation step");
            }
            if let Some(outcome) = &next.outcome {
                metrics
                    .operations_finished
                    .get_or_create(&crate::metrics::OperationLabels {
                        kind: match next.kind {
                            switchover::Kind::Switchover => "switchover",
                            switchover::Kind::Failback => "failback",
                            switchover::Kind::Emergency => "failover",
                        },
                        outcome: match outcome {
                            switchover::Outcome::Succeeded { .. } => "succeeded",
                            switchover::Outcome::Refused { .. } => "refused",
                            switchover::Outcome::RolledBack { .. } => "rolled_back",
                        },
                    })
                    .inc();
                tracing::info!(operation = %id, ?outcome, write_freeze_ms = ?next.write_freeze_ms(), "operation finished");
            }
        }
        for action in actions {
            match action {
                Action::WriteTable(t) => {
                    match write::compare_and_swap(
                        client,
                        &current,
                        &t,
                        Some(fence),
                        write::DEFAULT_HISTORY,
                    )
                    .await
                    .map_err(super::table_error)?
                    {
                        Swap::NotLeader => return Ok(None),
                        Swap::Stale => {
                            // The next pass re-reads the table and asks again.
                            metrics.table_conflicts.inc();
                        }
                        Swap::Written { .. } => {
                            metrics.table_writes.inc();
                            metrics.table_epoch.set(t.epoch as i64);
                        }
                    }
                }
                Action::WriteIntent { cell, intent } => {
                    let bytes = serde_json::to_vec(&intent).map_err(crate::Error::Serialization)?;
                    if !fenced_put(client, &intent_key(platform, &cell), bytes, None, fence).await?
                    {
                        return Ok(None);
                    }
                }
            }
        }
    }
    // An operation waiting for a lost region's return need not be polled fast.
    Ok(Some(running.iter().any(|(_, op, _)| !op.waiting_long())))
}

/// The keys under `prefix`, without it (no values read).
async fn keys_under(client: &mut Client, prefix: &str) -> Result<Vec<String>> {
    let opts = GetOptions::new().with_prefix().with_keys_only();
    let resp = client.get(prefix, Some(opts)).await?;
    Ok(resp
        .kvs()
        .iter()
        .map(|kv| String::from_utf8_lossy(&kv.key()[prefix.len()..]).into_owned())
        .collect())
}

/// Live ownership leases by cell (`owners/<cell>/<lease>`).
/// The replays of the given failed-over cells' orders (`replay/<cell>/`).
async fn read_replays(
    client: &mut Client,
    platform: &str,
    cells: Vec<String>,
) -> Result<BTreeMap<String, ReplayState>> {
    let mut out = BTreeMap::new();
    for cell in cells {
        let pending = client
            .get(
                replay_orders_prefix(platform, &cell),
                Some(GetOptions::new().with_prefix().with_count_only()),
            )
            .await
            .map_err(crate::Error::Etcd)?
            .count();
        let sent = get_bytes(client, &replay_sent_key(platform, &cell))
            .await?
            .and_then(|b| serde_json::from_slice(&b).ok());
        let applied = get_bytes(client, &replay_applied_key(platform, &cell))
            .await?
            .and_then(|b| serde_json::from_slice(&b).ok());
        out.insert(
            cell,
            ReplayState {
                sent,
                applied,
                pending: pending.max(0) as u64,
            },
        );
    }
    Ok(out)
}

async fn get_bytes(client: &mut Client, key: &str) -> Result<Option<Vec<u8>>> {
    Ok(client
        .get(key, None)
        .await
        .map_err(crate::Error::Etcd)?
        .kvs()
        .first()
        .map(|kv| kv.value().to_vec()))
}

pub async fn read_owners(client: &mut Client, platform: &str) -> Result<BTreeMap<String, usize>> {
    let mut owners = BTreeMap::new();
    for key in keys_under(client, &all_owners_prefix(platform)).await? {
        if let Some((cell, _lease)) = key.split_once('/') {
            *owners.entry(cell.to_string()).or_insert(0) += 1;
        }
    }
    Ok(owners)
}

/// Looks for lost cells; starts the failover of one (automatic mode) when allowed.
/// Some(true): one was started; Some(false): the term is over; None: nothing started.
async fn detect(
    client: &mut Client,
    cfg: &super::PlatformConfig,
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
        let limits = switchover::Limits {
            expiry_margin_ms: cfg.timings.expiry_margin_ms,
            ..switchover::Limits::default()
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
            let limits = switchover::Limits {
                stabilization_ms: window,
                ..switchover::Limits::default()
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
    batches: &[(Batch, i64)],
    switchovers: &mut BTreeMap<String, (Switchover, i64)>,
) -> Result<Option<()>> {
    let Some(table) = write::read(client, platform)
        .await
        .map_err(super::table_error)?
        .table
    else {
        return Ok(Some(()));
    };
    for (b, revision) in batches {
        let members: BTreeMap<String, Switchover> = switchovers
            .iter()
            .filter(|(_, (s, _))| s.parent.as_deref() == Some(b.id.as_str()))
            .map(|(id, (s, _))| (id.clone(), s.clone()))
            .collect();
        let (next, wave) = batch::advance(b, &members, &table, cellplane_table::store::now_ms());
        for member in wave {
            if switchovers.contains_key(&member.id) {
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
            switchovers.insert(member.id.clone(), (member, -1));
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
    switchovers.retain(|_, (_, rev)| *rev >= 0);
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
