//! What the topology page shows, built from what etcd holds (pure): the routing table,
//! the cells' registrations, the routers' acknowledgements and the operation records.
//! Everything the page draws is decided here and tested as a plain function; the page
//! only lays it out.

use crate::platform::operations::report;
use crate::platform::operations::{Outcome, SlotMove, Step, StepRecord, Switchover};
use cellplane_cells::crd::CellPhase;
use cellplane_cells::etcd_keys::{Registration, RouterAck};
use cellplane_cells::gtid;
use cellplane_cells::routing::RoutingTable;
use serde::Serialize;
use std::collections::BTreeMap;

/// The whole page's data.
#[derive(Serialize, Debug, Clone, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct ConsoleState {
    pub platform: String,
    /// The table's epoch (0: no table yet).
    pub epoch: u64,
    pub generated_at_ms: u64,
    pub regions: Vec<RegionView>,
    /// Home and standby, each pair once.
    pub pairs: Vec<(String, String)>,
    pub routers: Vec<RouterView>,
    pub running: Vec<OperationView>,
    /// The last finished operations, newest first.
    pub recent: Vec<OperationView>,
}

#[derive(Serialize, Debug, Clone, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct RegionView {
    pub name: String,
    pub cells: Vec<CellView>,
}

#[derive(Serialize, Debug, Clone, PartialEq, Default)]
#[serde(rename_all = "camelCase")]
pub struct CellView {
    pub name: String,
    /// Active, Frozen, FailedOver, Standby, Draining, ... (frozen shows over the rest).
    pub state: String,
    pub slots: u32,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub standby: Option<String>,
    /// The cell serving this one's users after a failover.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub served_by: Option<String>,
    /// Registered (its region reaches the global etcd) and healthy.
    pub registered: bool,
    pub healthy: bool,
    /// `primary` (writable) or `read-only`; None: not measured yet.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub mysql: Option<String>,
    /// How far behind the home it stands by for (transactions, seconds).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub replica_lag_gtids: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub replica_lag_secs: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub kafka_lag: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub requests_per_sec: Option<u64>,
    /// Answers per second it gave through every router (their last traffic windows), and
    /// the percentage of them that were 5xx; None: no router saw a request for it.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub edge_requests_per_sec: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub edge_error_percent: Option<f64>,
    /// Routers that see every endpoint of it down.
    pub down_in: Vec<String>,
    /// Routers whose clients of this cell's users are failing now.
    pub failing_in: Vec<String>,
}

#[derive(Serialize, Debug, Clone, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct RouterView {
    pub id: String,
    pub region: String,
    pub applied_epoch: u64,
    /// Behind the table's epoch.
    pub behind: bool,
}

#[derive(Serialize, Debug, Clone, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct OperationView {
    pub id: String,
    pub title: String,
    pub step: String,
    /// Steps done so far, with how long each took.
    pub steps: Vec<(String, u64)>,
    /// The kind's steps still ahead, after the current one (its step list, as data).
    pub to_come: Vec<String>,
    /// `running`, `succeeded`, `refused`, `rolled back`.
    pub outcome: String,
    pub started_ms: u64,
}

/// How many finished operations the page lists.
pub const RECENT: usize = 8;

/// The page's data at `now_ms`.
pub fn build(
    platform: &str,
    table: Option<&RoutingTable>,
    cells: &BTreeMap<String, Registration>,
    routers: &BTreeMap<String, RouterAck>,
    operations: &[Switchover],
    moves: &[SlotMove],
    now_ms: u64,
) -> ConsoleState {
    let epoch = table.map_or(0, |t| t.epoch);
    let mut regions: BTreeMap<String, Vec<CellView>> = BTreeMap::new();
    let mut pairs = Vec::new();
    let names: Vec<String> = match table {
        Some(t) => t.cells.iter().map(|c| c.name.clone()).collect(),
        None => cells.keys().cloned().collect(),
    };
    for name in names {
        let entry = table.and_then(|t| t.cell(&name));
        let reg = cells.get(&name);
        let region = entry
            .map(|e| e.region.clone())
            .or_else(|| reg.map(|r| r.region.clone()))
            .unwrap_or_default();
        let standby = entry
            .and_then(|e| e.standby.clone())
            .or_else(|| reg.and_then(|r| r.standby.clone()));
        if let Some(s) = &standby {
            let pair = if name < *s {
                (name.clone(), s.clone())
            } else {
                (s.clone(), name.clone())
            };
            if !pairs.contains(&pair) {
                pairs.push(pair);
            }
        }
        let state = match entry {
            Some(e) if e.frozen => "Frozen".to_string(),
            Some(e) => phase(e.state),
            None => reg.map_or("Unknown".into(), |r| phase(r.state)),
        };
        // The lag of its replication from the home it stands by for.
        let (lag_gtids, lag_secs) = match (&standby, reg.and_then(|r| r.mysql.as_ref())) {
            (Some(home), Some(m)) => match m.replicas.get(home) {
                Some(r) => (
                    cells
                        .get(home)
                        .and_then(|h| h.mysql.as_ref())
                        .map(|hm| gtid::lag(&hm.gtid_binlog_pos, &r.gtid_slave_pos)),
                    r.seconds_behind,
                ),
                None => (None, None),
            },
            _ => (None, None),
        };
        let edge = edge_traffic(routers, &name);
        let view = CellView {
            name: name.clone(),
            state,
            slots: table.map_or(0, |t| t.slot_count(&name)),
            standby,
            served_by: table
                .and_then(|t| t.serving_for(&name))
                .map(|c| c.name.clone()),
            registered: reg.is_some(),
            healthy: reg.is_some_and(|r| r.healthy),
            mysql: reg.and_then(|r| r.mysql.as_ref()).map(|m| {
                if m.read_only {
                    "read-only".to_string()
                } else {
                    "primary".to_string()
                }
            }),
            replica_lag_gtids: lag_gtids,
            replica_lag_secs: lag_secs,
            kafka_lag: reg.and_then(|r| r.kafka_lag),
            requests_per_sec: reg.and_then(|r| r.requests_per_sec),
            edge_requests_per_sec: edge.map(|(rps, _)| rps),
            edge_error_percent: edge.map(|(_, pct)| pct),
            down_in: routers
                .iter()
                .filter(|(_, a)| a.down.contains(&name))
                .map(|(id, _)| id.clone())
                .collect(),
            failing_in: routers
                .iter()
                .filter(|(_, a)| {
                    a.outages
                        .get(&name)
                        .is_some_and(|o| o.recovered_at_ms.is_none())
                })
                .map(|(id, _)| id.clone())
                .collect(),
        };
        regions.entry(region).or_default().push(view);
    }
    let mut ops: Vec<OperationView> = operations
        .iter()
        .map(operation)
        .chain(moves.iter().map(slot_move))
        .collect();
    ops.sort_by_key(|o| std::cmp::Reverse(o.started_ms));
    let (running, finished): (Vec<OperationView>, Vec<OperationView>) =
        ops.into_iter().partition(|o| o.outcome == "running");
    let recent = finished.into_iter().take(RECENT).collect();
    ConsoleState {
        platform: platform.to_string(),
        epoch,
        generated_at_ms: now_ms,
        regions: regions
            .into_iter()
            .map(|(name, cells)| RegionView { name, cells })
            .collect(),
        pairs,
        routers: routers
            .iter()
            .map(|(id, a)| RouterView {
                id: id.clone(),
                region: a.region.clone(),
                applied_epoch: a.applied_epoch,
                behind: a.applied_epoch < epoch,
            })
            .collect(),
        running,
        recent,
    }
}

/// A cell's answers per second through all routers and the percentage that were 5xx,
/// rounded for the page (one decimal).
fn edge_traffic(routers: &BTreeMap<String, RouterAck>, cell: &str) -> Option<(f64, f64)> {
    let windows: Vec<_> = routers
        .values()
        .filter_map(|a| a.traffic.get(cell))
        .collect();
    let requests: u64 = windows.iter().map(|t| t.requests).sum();
    if requests == 0 {
        return None;
    }
    let errors: u64 = windows.iter().map(|t| t.errors).sum();
    let rps: f64 = windows
        .iter()
        .map(|t| t.requests as f64 * 1000.0 / t.window_ms.max(1) as f64)
        .sum();
    let round = |x: f64| (x * 10.0).round() / 10.0;
    Some((round(rps), round(errors as f64 * 100.0 / requests as f64)))
}

fn phase(p: CellPhase) -> String {
    format!("{p:?}")
}

fn operation(op: &Switchover) -> OperationView {
    view(
        &op.id,
        report::title(op),
        (op.step, op.step_started_ms),
        &op.steps,
        op.outcome.as_ref(),
        op.kind.steps(),
    )
}

fn slot_move(m: &SlotMove) -> OperationView {
    view(
        &m.id,
        report::move_title(m),
        (m.step, m.step_started_ms),
        &m.steps,
        m.outcome.as_ref(),
        crate::platform::operations::slot_move::STEPS,
    )
}

/// An operation of any kind as the page lists it: its steps so far and those to come.
fn view(
    id: &str,
    title: String,
    (step, step_started_ms): (Step, u64),
    steps: &[StepRecord],
    outcome: Option<&Outcome>,
    kind_steps: &[Step],
) -> OperationView {
    OperationView {
        id: id.to_string(),
        title,
        step: format!("{step:?}"),
        steps: steps
            .iter()
            .filter(|s| !s.note.starts_with("error: "))
            .map(|s| {
                (
                    format!("{:?}", s.step),
                    s.ended_ms.saturating_sub(s.started_ms),
                )
            })
            .collect(),
        outcome: match outcome {
            None => "running",
            Some(Outcome::Succeeded { .. }) => "succeeded",
            Some(Outcome::Refused { .. }) => "refused",
            Some(Outcome::RolledBack { .. }) => "rolled back",
        }
        .to_string(),
        started_ms: steps.first().map_or(step_started_ms, |s| s.started_ms),
        to_come: if step == Step::Done {
            Vec::new()
        } else {
            kind_steps
                .iter()
                .skip_while(|s| **s != step)
                .skip(1)
                .map(|s| format!("{s:?}"))
                .collect()
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::platform::operations::test_world::healthy_registration;
    use crate::platform::operations::Limits;
    use cellplane_cells::etcd_keys::{CellTraffic, MysqlReport, Outage, ReplicaReport};
    use cellplane_cells::routing::CellEntry;

    fn table() -> RoutingTable {
        let mut a = CellEntry::active("a", "us", vec!["a:1".into()]);
        a.standby = Some("b".into());
        let mut b = CellEntry::active("b", "eu", vec!["b:1".into()]);
        b.standby = Some("a".into());
        RoutingTable::placed("shop", 4, 64, vec![(a, 1), (b, 1)]).unwrap()
    }

    fn reg(
        region: &str,
        pos: &str,
        replica: Option<(&str, &str)>,
        read_only: bool,
    ) -> Registration {
        let replicas = replica
            .map(|(c, p)| {
                BTreeMap::from([(
                    c.to_string(),
                    ReplicaReport {
                        running: true,
                        gtid_slave_pos: p.into(),
                        seconds_behind: Some(1),
                        error: String::new(),
                    },
                )])
            })
            .unwrap_or_default();
        healthy_registration(
            region,
            MysqlReport {
                read_only,
                gtid_binlog_pos: pos.into(),
                replicas,
                ..MysqlReport::default()
            },
        )
    }

    #[test]
    fn the_page_shows_every_cell_by_region_with_its_role_lag_and_routers() {
        let t = table();
        let cells = BTreeMap::from([
            (
                "a".to_string(),
                reg("us", "1-1-100", Some(("b", "2-2-40")), false),
            ),
            (
                "b".to_string(),
                reg("eu", "2-2-50", Some(("a", "1-1-97")), false),
            ),
        ]);
        let mut r_eu = RouterAck {
            region: "eu".into(),
            applied_epoch: 4,
            ..Default::default()
        };
        r_eu.down.push("a".into());
        r_eu.outages.insert(
            "a".into(),
            Outage {
                first_failed_ms: 1,
                last_failed_ms: 2,
                failed_requests: 2,
                recovered_at_ms: None,
            },
        );
        // 100 answers in 5 s through r-eu (4 of them 5xx), 300 in 10 s through r-us.
        let traffic = |requests, errors, window_ms| CellTraffic {
            requests,
            errors,
            window_ms,
        };
        r_eu.traffic.insert("a".into(), traffic(100, 4, 5000));
        let routers = BTreeMap::from([
            ("r-eu".to_string(), r_eu),
            (
                "r-us".to_string(),
                RouterAck {
                    region: "us".into(),
                    applied_epoch: 3,
                    traffic: BTreeMap::from([("a".to_string(), traffic(300, 0, 10_000))]),
                    ..Default::default()
                },
            ),
        ]);
        let s = build("shop", Some(&t), &cells, &routers, &[], &[], 9);
        assert_eq!(s.epoch, 4);
        let names: Vec<&str> = s.regions.iter().map(|r| r.name.as_str()).collect();
        assert_eq!(names, ["eu", "us"]);
        let a = &s.regions[1].cells[0];
        assert_eq!((a.name.as_str(), a.state.as_str()), ("a", "Active"));
        assert_eq!(a.slots + s.regions[0].cells[0].slots, 64);
        assert_eq!(a.mysql.as_deref(), Some("primary"));
        assert_eq!(a.replica_lag_gtids, Some(10), "b at 50, a applied 40 of it");
        assert_eq!(a.replica_lag_secs, Some(1));
        assert_eq!(a.down_in, ["r-eu"]);
        assert_eq!(a.failing_in, ["r-eu"]);
        assert_eq!(a.edge_requests_per_sec, Some(50.0), "20/s + 30/s");
        assert_eq!(a.edge_error_percent, Some(1.0), "4 of 400");
        assert_eq!(s.regions[0].cells[0].edge_requests_per_sec, None);
        assert_eq!(s.pairs, [("a".to_string(), "b".to_string())]);
        assert!(s.routers.iter().any(|r| r.id == "r-us" && r.behind));
        assert!(s.routers.iter().any(|r| r.id == "r-eu" && !r.behind));
    }

    #[test]
    fn a_failover_shows_frozen_then_failed_over_and_the_operations_with_their_steps() {
        let t = table();
        let cells = BTreeMap::new();
        let frozen = t.frozen("a").unwrap();
        let mut op = Switchover::new("op-1", "a", "b", "t", Limits::default(), 10);
        op.steps.push(crate::platform::operations::StepRecord {
            step: crate::platform::operations::Step::Preflight,
            started_ms: 10,
            ended_ms: 15,
            note: String::new(),
            by: String::new(),
        });
        op.step = crate::platform::operations::Step::Freeze;
        let s = build(
            "shop",
            Some(&frozen),
            &cells,
            &BTreeMap::new(),
            &[op.clone()],
            &[],
            20,
        );
        let a = s
            .regions
            .iter()
            .flat_map(|r| &r.cells)
            .find(|c| c.name == "a")
            .unwrap();
        assert_eq!(a.state, "Frozen");
        assert!(!a.registered && a.mysql.is_none());
        assert_eq!(s.running.len(), 1);
        assert_eq!(s.running[0].steps, [("Preflight".to_string(), 5)]);
        assert_eq!(
            s.running[0].to_come,
            ["Drain", "Fence", "CatchUp", "Promote", "Flip", "Reverse"],
            "the switchover's step list after its current step"
        );
        assert_eq!(s.running[0].outcome, "running");
        let flipped = t.failed_over("a").unwrap();
        op.outcome = Some(Outcome::Succeeded { warnings: vec![] });
        op.step = crate::platform::operations::Step::Done;
        let s = build(
            "shop",
            Some(&flipped),
            &cells,
            &BTreeMap::new(),
            &[op],
            &[],
            30,
        );
        let a = s
            .regions
            .iter()
            .flat_map(|r| &r.cells)
            .find(|c| c.name == "a")
            .unwrap();
        assert_eq!(a.state, "FailedOver");
        assert_eq!(a.slots, 0);
        assert_eq!(a.served_by.as_deref(), Some("b"));
        assert!(s.running.is_empty());
        assert_eq!(s.recent[0].outcome, "succeeded");
        assert!(
            s.recent[0].title.contains("switchover of a to b"),
            "{}",
            s.recent[0].title
        );
    }

    #[test]
    fn a_slot_move_in_progress_is_listed_with_its_steps_to_come() {
        let t = table();
        let slots = cellplane_cells::slot_set::SlotSet::parse(t.slots, "0-3").unwrap();
        let mut m = SlotMove::new(
            "mv-1",
            "a",
            "b",
            &slots,
            cellplane_cells::slot_move::reference_app_tables(),
            "t",
            Default::default(),
            40,
        );
        m.step = Step::Copy;
        let s = build(
            "shop",
            Some(&t),
            &BTreeMap::new(),
            &BTreeMap::new(),
            &[],
            &[m],
            50,
        );
        assert_eq!(s.running.len(), 1);
        assert_eq!(s.running[0].title, "move of slots 0-3 from a to b");
        assert_eq!(s.running[0].step, "Copy");
        assert_eq!(
            s.running[0].to_come,
            ["Verify", "Freeze", "Drain", "FinalSync", "Flip", "Retire"]
        );
    }
}
