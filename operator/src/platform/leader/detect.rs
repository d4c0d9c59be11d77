//! Finding lost cells (pure): the leader looks at every serving cell on each pass; a cell
//! that stays lost ([`lost`]) for the grace is failed over to its standby,
//! automatically when the platform allows it, at most once per cell per no-flap window.
//! The detector remembers each cell's last registration, so the record can say how far the
//! standby was behind the home's last reported position: the estimated RPO. And the way
//! back ([`failbacks_due`]): a cell failed over unplanned returns to its old home once that
//! home stayed healthy for the stabilization window, when the platform is told to.

use crate::platform::operations::{lost, Kind, Loss, Observed, Switchover};
use cellplane_cells::crd::CellPhase;
use cellplane_cells::etcd_keys::Registration;
use cellplane_cells::failover_timing::FailoverTimings;
use cellplane_cells::gtid;
use cellplane_cells::routing::serves_traffic;
use std::collections::{BTreeMap, BTreeSet};

/// Who starts automatic failovers (in the record's `startedBy`).
pub const AUTOMATIC: &str = "platform (automatic)";

#[derive(Default)]
pub struct Detector {
    /// When each cell was first seen lost (this term).
    lost_since: BTreeMap<String, u64>,
    /// Each cell's last registration seen.
    last_seen: BTreeMap<String, Registration>,
    /// What was last said about each lost cell not failed over (said once, not per pass).
    announced: BTreeMap<String, String>,
    /// Cells seen holding an ownership lease (this term, or recorded under `leased/` by
    /// any leader). Only those can be failed over
    /// automatically: a cell whose app never took a lease (one that does not use the SDK's
    /// lease, or never started) cannot be shown fenced, so a person decides
    /// (`cellplane failover --emergency`).
    leased: BTreeSet<String>,
    markers_loaded: bool,
}

/// A cell lost for at least the grace, with what its failover should record.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Found {
    pub cell: String,
    pub standby: String,
    pub loss: Loss,
}

impl Detector {
    /// The cells lost for at least `grace_ms` (and the number lost at all).
    pub fn observe(&mut self, obs: &Observed, grace_ms: u64) -> (Vec<Found>, usize) {
        for (cell, reg) in obs.cells {
            self.last_seen.insert(cell.clone(), reg.clone());
        }
        for (cell, n) in obs.owners {
            if *n > 0 {
                self.leased.insert(cell.clone());
            }
        }
        let mut found = Vec::new();
        let mut lost_now = 0;
        for entry in &obs.table.cells {
            let candidate =
                serves_traffic(entry.state) && !entry.frozen && self.leased.contains(&entry.name);
            let why = match (&entry.standby, candidate) {
                (Some(_), true) => lost(obs, &entry.name).ok(),
                _ => None,
            };
            let Some(why) = why else {
                self.lost_since.remove(&entry.name);
                continue;
            };
            lost_now += 1;
            let since = *self
                .lost_since
                .entry(entry.name.clone())
                .or_insert(obs.now_ms);
            if obs.now_ms < since + grace_ms {
                continue;
            }
            let standby = entry.standby.clone().unwrap_or_default();
            let last_home_gtid = self
                .last_seen
                .get(&entry.name)
                .and_then(|r| Some(r.mysql.as_ref()?.gtid_binlog_pos.clone()));
            let replica = obs
                .cells
                .get(&standby)
                .and_then(|r| r.mysql.as_ref()?.replicas.get(&entry.name).cloned());
            found.push(Found {
                cell: entry.name.clone(),
                standby,
                loss: Loss {
                    detected_at_ms: obs.now_ms,
                    reason: format!("{why} for {} ms", obs.now_ms - since),
                    last_lag_gtids: last_home_gtid
                        .as_ref()
                        .zip(replica.as_ref())
                        .map(|(home, r)| gtid::lag(home, &r.gtid_slave_pos)),
                    last_lag_secs: replica.and_then(|r| r.seconds_behind),
                    last_home_gtid,
                    // Lost means no lease was left at this observation: the margin may
                    // count from here (a lease taken again before the freeze resets it).
                    leases_gone_at_ms: Some(obs.now_ms),
                    ..Loss::default()
                },
            });
        }
        (found, lost_now)
    }
}

impl Detector {
    /// Cells known (from etcd, or just recorded there) to have held an ownership lease.
    pub fn remember_leased(&mut self, cells: impl IntoIterator<Item = String>) {
        self.leased.extend(cells);
        self.markers_loaded = true;
    }

    /// Whether this term read the `leased/` records yet.
    pub fn markers_loaded(&self) -> bool {
        self.markers_loaded
    }

    pub fn is_leased(&self, cell: &str) -> bool {
        self.leased.contains(cell)
    }

    /// True the first time `why` is given for `cell` (log it then).
    pub fn announce(&mut self, cell: &str, why: &str) -> bool {
        self.announced
            .insert(cell.to_string(), why.to_string())
            .as_deref()
            != Some(why)
    }
}

/// Whether the leader may fail `cell` over by itself now: no operation on it or its standby
/// is running, and no automatic failover of either ended within the no-flap window.
pub fn may_start_automatically(
    found: &Found,
    operations: &[Switchover],
    now_ms: u64,
    timings: &FailoverTimings,
) -> Result<(), String> {
    let pair = [found.cell.as_str(), found.standby.as_str()];
    let touches = |op: &Switchover| op.cells().iter().any(|c| pair.contains(c));
    if let Some(op) = operations.iter().find(|op| !op.finished() && touches(op)) {
        return Err(format!("operation {} is running on {}", op.id, op.cell));
    }
    // Only a failover that moved the slots counts: one refused or rolled back moved nothing.
    let recent = operations.iter().find(|op| {
        let started = op
            .loss
            .as_ref()
            .map_or(op.step_started_ms, |l| l.detected_at_ms);
        op.kind == Kind::Emergency
            && op.started_by == AUTOMATIC
            && op.flip_epoch.is_some()
            && touches(op)
            && now_ms < started + timings.no_flap_window_ms
    });
    match recent {
        Some(op) => Err(format!(
            "{} failed over automatically less than {} s ago ({}); no flapping: fail it over with `cellplane failover {} --emergency`",
            op.cell,
            timings.no_flap_window_ms / 1000,
            op.id,
            found.cell
        )),
        None => Ok(()),
    }
}

/// When an operation was started (its first step began then).
fn started_ms(op: &Switchover) -> u64 {
    op.steps
        .first()
        .map_or(op.step_started_ms, |s| s.started_ms)
}

/// Failed-over cells whose users may go back to them automatically, with the cell that
/// serves them now: an unplanned failover moved them, the old home has been healthy
/// without a break for `window_ms` since it came back, nothing runs on either cell, and
/// no automatic failback of the cell was tried within the window (a refused one waits).
pub fn failbacks_due(
    obs: &Observed,
    operations: &[Switchover],
    window_ms: u64,
) -> Vec<(String, String)> {
    let t = obs.table;
    t.cells
        .iter()
        .filter(|c| c.state == CellPhase::FailedOver && !c.frozen)
        .filter_map(|c| {
            let lost_at = *obs.recent.lost_at_ms.get(&c.name)?;
            let serving = t.serving_for(&c.name)?.name.clone();
            let reg = obs.cells.get(&c.name).filter(|r| r.healthy)?;
            let since = reg.healthy_since_ms.filter(|s| *s > lost_at)?;
            if obs.now_ms < since + window_ms {
                return None;
            }
            let pair = [c.name.as_str(), serving.as_str()];
            let busy = operations
                .iter()
                .any(|op| !op.finished() && op.cells().iter().any(|x| pair.contains(x)));
            let tried = operations.iter().any(|op| {
                op.kind == Kind::Failback
                    && op.cell == c.name
                    && op.started_by == AUTOMATIC
                    && obs.now_ms < started_ms(op) + window_ms
            });
            (!busy && !tried).then(|| (c.name.clone(), serving))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use cellplane_cells::etcd_keys::{Intent, MysqlReport, ReplicaReport, RouterAck};
    use cellplane_cells::routing::RoutingTable;

    fn table() -> RoutingTable {
        crate::platform::operations::test_world::pair_table(3, 64)
    }

    fn reg(region: &str, pos: &str, replica_of: Option<(&str, &str)>) -> Registration {
        let replicas = replica_of
            .map(|(c, p)| {
                let report = ReplicaReport {
                    running: true,
                    gtid_slave_pos: p.into(),
                    seconds_behind: Some(1),
                    error: String::new(),
                };
                (c.to_string(), report)
            })
            .into_iter()
            .collect();
        let mysql = MysqlReport {
            read_only: false,
            gtid_binlog_pos: pos.into(),
            replicas,
            ..MysqlReport::default()
        };
        crate::platform::operations::test_world::healthy_registration(region, mysql)
    }

    /// Detection never looks at how far apps drained.
    static NO_DRAINS: BTreeMap<String, u64> = BTreeMap::new();

    struct Seen {
        table: RoutingTable,
        cells: BTreeMap<String, Registration>,
        routers: BTreeMap<String, RouterAck>,
        owners: BTreeMap<String, usize>,
        intents: BTreeMap<String, Intent>,
        recent: crate::platform::operations::Recent,
    }

    impl Seen {
        fn observed(&self, now_ms: u64) -> Observed<'_> {
            Observed {
                now_ms,
                table: &self.table,
                cells: &self.cells,
                routers: &self.routers,
                intents: &self.intents,
                owners: &self.owners,
                drained: &NO_DRAINS,
                busy: false,
                recent: &self.recent,
            }
        }
    }

    fn healthy_pair() -> Seen {
        Seen {
            table: table(),
            cells: BTreeMap::from([
                ("a".into(), reg("us", "1-1-100", Some(("b", "2-2-50")))),
                ("b".into(), reg("eu", "2-2-50", Some(("a", "1-1-97")))),
            ]),
            routers: BTreeMap::new(),
            owners: BTreeMap::from([("a".into(), 1), ("b".into(), 1)]),
            intents: BTreeMap::new(),
            recent: Default::default(),
        }
    }

    #[test]
    fn a_cut_off_cell_is_found_after_the_grace_with_its_last_lag() {
        let mut seen = healthy_pair();
        let mut d = Detector::default();
        assert_eq!(d.observe(&seen.observed(1_000), 500), (vec![], 0));
        // Its registration expired, but its app still holds a lease: not lost.
        seen.cells.remove("a");
        assert_eq!(d.observe(&seen.observed(2_000), 500).1, 0);
        // Its lease too: lost from now, found once the grace has passed.
        seen.owners.remove("a");
        assert_eq!(d.observe(&seen.observed(3_000), 500), (vec![], 1));
        let (found, lost) = d.observe(&seen.observed(3_500), 500);
        assert_eq!(lost, 1);
        assert_eq!(found.len(), 1);
        let f = &found[0];
        assert_eq!((f.cell.as_str(), f.standby.as_str()), ("a", "b"));
        assert_eq!(f.loss.last_home_gtid.as_deref(), Some("1-1-100"));
        assert_eq!(
            f.loss.last_lag_gtids,
            Some(3),
            "1-1-100 seen last, 1-1-97 applied"
        );
        assert_eq!(f.loss.last_lag_secs, Some(1));
        assert_eq!(
            f.loss.leases_gone_at_ms,
            Some(3_500),
            "no lease at the finding"
        );
        assert!(
            f.loss.reason.contains("registration expired"),
            "{}",
            f.loss.reason
        );
        assert!(f.loss.reason.ends_with("for 500 ms"), "{}", f.loss.reason);
        // It comes back: the clock starts over.
        seen.owners.insert("a".into(), 1);
        assert_eq!(d.observe(&seen.observed(3_600), 500).1, 0);
        seen.owners.remove("a");
        assert!(d.observe(&seen.observed(3_700), 500).0.is_empty());
    }

    #[test]
    fn routers_of_two_other_regions_must_agree_when_the_region_still_reports() {
        let mut seen = healthy_pair();
        let mut d = Detector::default();
        d.observe(&seen.observed(900), 0);
        seen.owners.remove("a");
        let router = |region: &str| RouterAck {
            region: region.into(),
            down: vec!["a".into()],
            ..Default::default()
        };
        // One region's routers, or the cell's own region's, are not enough.
        seen.routers.insert("r1".into(), router("eu"));
        seen.routers.insert("r2".into(), router("us"));
        seen.routers.insert("r3".into(), router("eu"));
        assert_eq!(d.observe(&seen.observed(1_000), 0).1, 0);
        seen.routers.insert("r4".into(), router("ap"));
        let (found, _) = d.observe(&seen.observed(1_100), 0);
        assert!(
            found[0].loss.reason.contains("routers in ap, eu"),
            "{:?}",
            found
        );
        // A cell reported unhealthy by its own region, without a lease, is lost too.
        seen.routers.clear();
        seen.cells.get_mut("a").unwrap().healthy = false;
        assert_eq!(d.observe(&seen.observed(1_200), 0).0.len(), 1);
        // A frozen or failed-over cell is another operation's business.
        seen.table = seen.table.frozen("a").unwrap();
        assert_eq!(d.observe(&seen.observed(1_300), 0).1, 0);
    }

    #[test]
    fn a_cell_never_seen_with_a_lease_is_not_failed_over_automatically() {
        let mut seen = healthy_pair();
        seen.owners.clear();
        seen.cells.remove("a");
        let mut d = Detector::default();
        assert_eq!(d.observe(&seen.observed(1_000), 0), (vec![], 0));
        // Once seen with one, its loss counts.
        seen.owners.insert("a".into(), 1);
        d.observe(&seen.observed(1_100), 0);
        seen.owners.clear();
        assert_eq!(d.observe(&seen.observed(1_200), 0).1, 1);
    }

    #[test]
    fn no_automatic_failover_while_another_runs_or_within_the_window() {
        let found = Found {
            cell: "a".into(),
            standby: "b".into(),
            loss: Loss::default(),
        };
        let t = FailoverTimings::default();
        let limits = crate::platform::operations::Limits::default();
        assert_eq!(may_start_automatically(&found, &[], 0, &t), Ok(()));
        let mut op =
            Switchover::emergency("f-1", "b", "a", AUTOMATIC, limits.clone(), Loss::default());
        let e = may_start_automatically(&found, std::slice::from_ref(&op), 10, &t).unwrap_err();
        assert!(e.contains("operation f-1 is running"), "{e}");
        op.step = crate::platform::operations::Step::Done;
        op.loss.as_mut().unwrap().detected_at_ms = 1_000;
        // Refused (nothing moved): no window.
        assert_eq!(
            may_start_automatically(&found, std::slice::from_ref(&op), 2_000, &t),
            Ok(())
        );
        op.flip_epoch = Some(9);
        let e = may_start_automatically(&found, std::slice::from_ref(&op), 2_000, &t).unwrap_err();
        assert!(
            e.contains("no flapping") && e.contains("cellplane failover a --emergency"),
            "{e}"
        );
        assert_eq!(
            may_start_automatically(&found, &[op.clone()], 1_000 + t.no_flap_window_ms, &t),
            Ok(())
        );
        // One a person started does not count against the window.
        op.started_by = "alice".into();
        assert_eq!(may_start_automatically(&found, &[op], 2_000, &t), Ok(()));
    }
}
