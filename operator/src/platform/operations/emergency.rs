//! An unplanned failover (pure): the cell is lost (its region cut off or dead); its
//! standby is promoted once the cell's ownership leases have expired plus a margin, without
//! waiting for a final position. The steps only this kind has: freeze without the home,
//! wait out its leases (`Expire`), and take it back fenced when it returns (`Rejoin`):
//! count what it wrote that the new home never got (errant transactions, exported, never
//! dropped), wait for its app to replay the orders its log acknowledged, rebuild it as the
//! new home's replica. The shared steps (promote, flip) are the switchover's.

use super::record::{enter, note_error, Kind, Limits, Step, Switchover};
use super::switchover::{want_intent, want_intent_with, Pass, StepFn};
use super::{Action, Observed};
use cellplane_cells::etcd_keys::{MysqlReport, Outage, ReplayApplied, ReplaySent};
use cellplane_cells::gtid;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

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
pub(super) fn advance(op: &Switchover, obs: &Observed) -> (Switchover, Vec<Action>) {
    let step: StepFn = match op.step {
        Step::Freeze => freeze_lost,
        Step::Expire => expire,
        Step::Rejoin => rejoin,
        step => unreachable!("the unplanned steps only, not {step:?}"),
    };
    Pass::run(op, obs, step)
}

/// Freeze without the home: the table marks it frozen (no new ownership lease can be
/// taken) and its intent fences it for good whenever its region hears from etcd again.
fn freeze_lost(p: &mut Pass) -> Result<(), String> {
    // Fenced for good whenever its region hears from etcd again: no writes, and no
    // replication (its GTIDs are compared with the new home's first).
    want_intent(
        &mut p.next,
        &mut p.actions,
        p.obs,
        &p.op.source,
        false,
        Vec::new(),
    );
    match p.obs.table.cell(&p.op.source).map(|c| c.frozen) {
        Some(true) => {
            let epoch = *p.next.freeze_epoch.get_or_insert(p.obs.table.epoch);
            p.next.frozen_at_ms.get_or_insert(p.obs.now_ms);
            // No router acknowledgement is awaited: the lost region's routers cannot
            // give one, and safety comes from the ownership leases, not the routers.
            enter(
                &mut p.next,
                Step::Expire,
                p.obs.now_ms,
                format!("frozen at epoch {epoch}: no new ownership lease can be taken"),
            );
        }
        _ => match p.obs.table.frozen(&p.op.source) {
            Ok(t) => {
                p.next.frozen_at_ms.get_or_insert(p.obs.now_ms);
                p.actions.push(Action::WriteTable(Box::new(t)));
            }
            Err(e) => return Err(format!("could not freeze: {e}")),
        },
    }
    Ok(())
}

/// Expire: wait until no ownership lease of the lost cell is left, plus the margin; from
/// then on it cannot take a write. A cell that comes back healthy first is rolled back.
fn expire(p: &mut Pass) -> Result<(), String> {
    let owners = p.obs.owners.get(&p.op.source).copied().unwrap_or(0);
    let healthy = p.home().is_some_and(|h| h.healthy);
    let loss = p.next.loss.get_or_insert_with(Box::default);
    if healthy {
        return Err(format!(
            "{} is registered and healthy again before its standby was promoted",
            p.op.source
        ));
    }
    if owners > 0 {
        loss.leases_gone_at_ms = None;
        if p.timed_out(p.op.limits.step_timeout_ms) {
            return Err(format!(
                "{} still holds {owners} ownership lease(s) after {} ms: it reaches the global etcd, so it is not lost",
                p.op.source, p.op.limits.step_timeout_ms
            ));
        }
    } else {
        let gone = *loss.leases_gone_at_ms.get_or_insert(p.obs.now_ms);
        if p.obs.now_ms >= gone + p.op.limits.expiry_margin_ms {
            enter(
                &mut p.next,
                Step::Promote,
                p.obs.now_ms,
                format!(
                    "no ownership lease of {} since {} ms ago (margin {} ms)",
                    p.op.source,
                    p.obs.now_ms - gone,
                    p.op.limits.expiry_margin_ms
                ),
            );
        }
    }
    Ok(())
}

/// Rejoin: wait for the old home to return; count what it wrote that the new home never
/// got (errant transactions), keep it fenced, export and rebuild, confirm the replay.
fn rejoin(p: &mut Pass) -> Result<(), String> {
    // Keep the old home fenced and away from replication until its data is sorted:
    // first count what it has that the new home lacks; with anything errant, have
    // its region export that and rebuild it from the new home. Meanwhile its app
    // forwards the orders its log acknowledged; the operation ends once they are in.
    note_clients(&mut p.next, p.obs);
    let errant_known = p.next.loss.as_ref().and_then(|l| l.errant_transactions);
    let rebuild_from = errant_known.filter(|n| *n > 0).map(|_| p.op.target.clone());
    let generation = want_intent_with(
        &mut p.next,
        &mut p.actions,
        p.obs,
        &p.op.source,
        false,
        Vec::new(),
        rebuild_from,
    );
    let returned = p.home().and_then(|h| {
        let m = h.mysql.as_ref()?;
        (h.intent_generation >= generation && m.read_only).then_some(m)
    });
    let Some(old) = returned else {
        return Ok(());
    };
    let Some(errant) = errant_known else {
        count_errant(p, old);
        return Ok(());
    };
    let Some(mut note) = sorted_out(p, old, errant) else {
        return Ok(());
    };
    if !replay_confirmed(p, &mut note) {
        return Ok(());
    }
    note.push_str(&format!("; it becomes {}'s replica", p.op.target));
    p.next.step_done(p.obs.now_ms, note);
    Ok(())
}

/// The old home is back, fenced: what it has that the new home lacks, counted from the two
/// positions, goes into the record.
fn count_errant(p: &mut Pass, old: &MysqlReport) {
    let Some(new) = p.obs.cells.get(&p.op.target).and_then(|t| t.mysql.as_ref()) else {
        return;
    };
    let errant = gtid::lag(&old.gtid_binlog_pos, &new.gtid_binlog_pos);
    let loss = p.next.loss.get_or_insert_with(Box::default);
    loss.returned_gtid = Some(old.gtid_binlog_pos.clone());
    loss.errant_transactions = Some(errant);
    loss.returned_at_ms = Some(p.obs.now_ms);
    if errant > 0 {
        note_error(
            &mut p.next,
            format!(
                "{} returned with {errant} transaction(s) that never reached {} (its position {}, the new home's {}); it stays fenced while they are exported and it is rebuilt from {}",
                p.op.source, p.op.target, old.gtid_binlog_pos, new.gtid_binlog_pos, p.op.target
            ),
        );
    }
}

/// The old home's data sorted out: nothing errant, or its errant transactions exported
/// and the home rebuilt from the new one (the step's note); None while that runs.
fn sorted_out(p: &mut Pass, old: &MysqlReport, errant: u64) -> Option<String> {
    if errant == 0 {
        let at = p.next.loss.as_ref().and_then(|l| l.returned_gtid.clone());
        return Some(format!(
            "{} returned at {} with nothing the new home lacks",
            p.op.source,
            at.unwrap_or_default()
        ));
    }
    let r = old
        .rebuild
        .as_ref()
        .filter(|r| r.operation == p.op.id && r.source == p.op.target)?;
    let loss = p.next.loss.get_or_insert_with(Box::default);
    if !r.export_file.is_empty() {
        loss.errant_export = Some(r.export_file.clone());
        loss.errant_exported = Some(r.errant_transactions);
    }
    if !r.done {
        return None;
    }
    if !r.error.is_empty() {
        let error = format!(
            "rebuilding {} failed (tried again): {}",
            p.op.source, r.error
        );
        note_error(&mut p.next, error);
        return None;
    }
    loss.rebuilt_at_gtid = Some(r.cloned_at.clone());
    loss.rebuilt_rows = Some(r.rows);
    if r.errant_transactions != errant {
        note_error(
            &mut p.next,
            format!(
                "{errant} errant transaction(s) counted from the positions, {} found in the binary log",
                r.errant_transactions
            ),
        );
    }
    Some(format!(
        "{} exported {} errant transaction(s) to {} and was rebuilt from {} at {} ({} rows)",
        p.op.source, r.errant_transactions, r.export_file, p.op.target, r.cloned_at, r.rows
    ))
}

/// Whether the old home's app confirmed the replay of its log's orders (the figures go
/// into `note`), or gave up waiting for it with a warning; false while it may still come.
fn replay_confirmed(p: &mut Pass, note: &mut String) -> bool {
    let returned_at = p
        .next
        .loss
        .as_ref()
        .and_then(|l| l.returned_at_ms)
        .unwrap_or(p.obs.now_ms);
    match replay_settled(p.op, p.obs) {
        Some(figures) => {
            note.push_str(&format!(
                "; its log's orders replayed: {} forwarded, {} persisted late, {} already there, {} voided",
                figures.forwarded, figures.persisted, figures.duplicates, figures.voided + figures.void_skipped
            ));
            p.next.loss.get_or_insert_with(Box::default).replay = Some(figures);
        }
        None if p.obs.now_ms.saturating_sub(returned_at) < REPLAY_CONFIRM_MS => return false,
        None => note_error(
            &mut p.next,
            format!(
                "{}'s app did not confirm forwarding its log's orders within {} s of its return; orders it acknowledged in its last moments may be missing at {} (see `replay/{}/` in etcd and the app's log)",
                p.op.source,
                REPLAY_CONFIRM_MS / 1000,
                p.op.target,
                p.op.source
            ),
        ),
    }
    true
}

#[cfg(test)]
mod tests {
    use super::super::advance;
    use super::super::record::{warnings, Outcome};
    use super::super::test_world::*;
    use super::*;
    use cellplane_cells::crd::CellPhase;

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
        assert!(warnings(&op.steps)[0].contains("8 transaction(s) that never reached b"));
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
                warnings: warnings(&op.steps)
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
            warnings(&op.steps)
                .iter()
                .any(|w| w.contains("did not confirm forwarding its log's orders within 60 s")),
            "{:?}",
            warnings(&op.steps)
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
            let mut detector = crate::platform::leader::detect::Detector::default();
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
