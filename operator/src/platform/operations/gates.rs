//! The preflight gates of an operation on one cell (pure), in order; the first that fails
//! names itself and the fix, and nothing has changed yet.

use super::emergency::lost;
use super::failback::stable;
use super::record::{Kind, Switchover};
use super::Observed;
use cellplane_cells::crd::CellPhase;
use cellplane_cells::etcd_keys::Registration;
use cellplane_cells::gtid;
use cellplane_cells::routing::{serves_traffic, CellEntry};

/// The gates, in order; the first that fails names itself and the fix.
pub(super) fn preflight(op: &Switchover, obs: &Observed) -> Result<(), (&'static str, String)> {
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
        Kind::Switchover | Kind::Emergency => serving_gate(op, cell)?,
        Kind::Failback => super::failback::state_gate(op, cell, t)?,
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
    let home = rpo_gate(op, obs, reg)?;
    capacity_gate(op, obs, reg, home)?;
    if obs.routers.is_empty() {
        return Err((
            "routers",
            "no live router acknowledges tables; start one so the freeze can be confirmed".into(),
        ));
    }
    Ok(())
}

/// A switchover's (or unplanned failover's) cell serves, unfrozen, paired with the target.
fn serving_gate(op: &Switchover, cell: &CellEntry) -> Result<(), (&'static str, String)> {
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
    Ok(())
}

/// The home is registered with its position, the target replicates it, and the target is
/// within the RPO gates (transactions and seconds behind). Returns the home's registration.
fn rpo_gate<'o>(
    op: &Switchover,
    obs: &Observed<'o>,
    reg: &Registration,
) -> Result<&'o Registration, (&'static str, String)> {
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
    Ok(home)
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
