//! The test world every operation kind is driven through (tests only): two cells, each
//! the other's standby, with the regions, the routers and the replication played by the
//! test; faults (routers that stop acknowledging, deaf regions, a frozen replica, cuts and
//! heals, leaders that lose their actions) are switched on by the tests and the model checks.

use super::emergency::Loss;
use super::record::{Limits, Outcome, Step, Switchover};
use super::{advance, Action, Observed, Recent, ReplayState};
use cellplane_cells::crd::CellPhase;
use cellplane_cells::etcd_keys::{
    Intent, MysqlReport, RebuildReport, Registration, ReplayApplied, ReplaySent, ReplicaReport,
    RouterAck,
};
use cellplane_cells::failover_timing::{may_write, FailoverTimings};
use cellplane_cells::routing::{serves_traffic, RoutingTable};
use std::collections::BTreeMap;

/// Two cells, `a` in us and `b` in eu, each the other's standby (tests of this module and
/// of `detect`).
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

/// The world a switchover acts on, with the regions and routers played by the test:
/// intents are carried out and tables acknowledged on the next tick unless told not to.
pub(crate) struct World {
    pub(crate) now_ms: u64,
    pub(crate) table: RoutingTable,
    pub(crate) cells: BTreeMap<String, Registration>,
    pub(crate) routers: BTreeMap<String, RouterAck>,
    pub(crate) intents: BTreeMap<String, Intent>,
    /// Routers that stop acknowledging.
    pub(crate) stuck_routers: Vec<String>,
    /// Cells whose region stops carrying out intents.
    pub(crate) deaf_regions: Vec<String>,
    /// The standby stops applying (its replica position freezes).
    pub(crate) replica_frozen: bool,
    /// Random mode (model check): every tick, each router, region and replica acts or
    /// not by the dice, `a` takes writes whenever its MySQL actually is writable, and
    /// time jumps by up to 3 s.
    pub(crate) dice: Option<Dice>,
    /// The cell whose writes the model tracks (the operation's source) and the replica
    /// that must have them all before the flip (the target).
    pub(crate) writer: &'static str,
    pub(crate) replica: &'static str,
    /// What the replica has applied of the writer's writes (random mode).
    pub(crate) applied: u64,
    /// Random mode: how reliably (percent per tick) routers acknowledge, regions carry
    /// out intents and the replica applies; each run draws its own.
    pub(crate) odds: [u64; 3],
    pub(crate) kafka_lag: u64,
    /// Writes each cell's primary took (its GTID sequence).
    pub(crate) writes: BTreeMap<String, u64>,
    /// Each cell's measured user requests per second.
    pub(crate) rps: BTreeMap<String, u64>,
    pub(crate) busy: bool,
    /// Live ownership leases by cell.
    pub(crate) owners: BTreeMap<String, usize>,
    /// The lowest drained epoch of each cell's apps.
    pub(crate) drained: BTreeMap<String, u64>,
    /// Random mode: the writer takes no writes itself (the unplanned-failover model
    /// writes through the app's ownership lease instead).
    pub(crate) writes_gated: bool,
    /// The replica's binlog holds the writer's domain at what it applied (MariaDB's
    /// log_slave_updates), as the real cells run.
    pub(crate) log_replica_updates: bool,
    /// Largest time step in random mode.
    pub(crate) max_step_ms: u64,
    /// The rebuild each cell's region carried out.
    pub(crate) rebuilds: BTreeMap<String, RebuildReport>,
    /// The replays of failed-over cells' orders: the old home's app forwards 3 (one
    /// was already persisted) once its region answers again.
    pub(crate) recent: Recent,
    /// The old home's app never forwards its orders.
    pub(crate) app_silent: bool,
    /// What every region reports as its cells' `healthySinceMs`.
    pub(crate) healthy_since_ms: Option<u64>,
}

pub(crate) fn pos(cell: &str, seq: u64) -> String {
    let domain = if cell == "a" { 1 } else { 2 };
    format!("{domain}-{domain}-{seq}")
}

impl World {
    pub(crate) fn new() -> Self {
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
            drained: BTreeMap::new(),
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
                    ..Intent::default()
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

    pub(crate) fn observed(&self) -> Observed<'_> {
        Observed {
            now_ms: self.now_ms,
            table: &self.table,
            cells: &self.cells,
            routers: &self.routers,
            intents: &self.intents,
            owners: &self.owners,
            drained: &self.drained,
            busy: self.busy,
            recent: &self.recent,
        }
    }

    pub(crate) fn apply(&mut self, actions: Vec<Action>) {
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
    pub(crate) fn roll(&mut self, percent: u64) -> bool {
        self.dice.as_mut().is_none_or(|d| d.below(100) < percent)
    }

    pub(crate) fn tick(&mut self) {
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
            if self.deaf_regions.contains(&cell) || (!self.roll(self.odds[1]) && old.is_some()) {
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
                            gtid_binlog_pos: if self.log_replica_updates && cell == self.replica {
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
                            ..MysqlReport::default()
                        },
                    )
                },
            );
        }
    }

    /// Runs `op` until it is done (or `max` ticks); returns it and every table written.
    pub(crate) fn run(
        &mut self,
        mut op: Switchover,
        max: usize,
    ) -> (Switchover, Vec<RoutingTable>) {
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

pub(crate) fn start(w: &World) -> Switchover {
    Switchover::new("op-1", "a", "b", "test", Limits::default(), w.now_ms)
}

pub(crate) fn steps(op: &Switchover) -> Vec<Step> {
    op.steps
        .iter()
        .filter(|s| !s.note.starts_with("error: "))
        .map(|s| s.step)
        .collect()
}

/// A world in which `a` switched over to `b` (b serves a's slots from a's data), with
/// the model now tracking b's writes as they reach a.
pub(crate) fn failed_over_world() -> (World, RoutingTable) {
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

pub(crate) fn start_failback(w: &World) -> Switchover {
    Switchover::failback("fb-1", "a", "b", "test", Limits::default(), w.now_ms)
}

/// A tiny deterministic PRNG (xorshift), so every model-check run can be replayed.
pub(crate) struct Dice(pub(crate) u64);

impl Dice {
    pub(crate) fn below(&mut self, n: u64) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0 % n
    }
}

/// Region us (cell `a`) cut off from the etcd majority and from `b`, as the lab's netlab
/// does it: `a`'s app and region keep running but renew nothing; its registration and
/// ownership lease expire on etcd's clock; `b` stops receiving `a`'s writes.
pub(crate) struct Cut {
    pub(crate) w: World,
    pub(crate) t: FailoverTimings,
    /// When the cut began and ends (None: not cut / never heals).
    pub(crate) cut_at: u64,
    pub(crate) heal_at: Option<u64>,
    /// `a`'s app: when its last confirmed renewal was sent, and when etcd expires it.
    pub(crate) confirmed_sent: Option<u64>,
    pub(crate) lease_expires: u64,
    /// `a`'s region: its last registration renewal.
    pub(crate) registered_at: u64,
    /// Percent per tick that `a`'s clients send a write.
    pub(crate) write_odds: u64,
    /// When `a`'s app last admitted a write, and when the slots moved to `b`.
    pub(crate) last_admit: Option<u64>,
    pub(crate) flipped_at: Option<u64>,
}

impl Cut {
    pub(crate) fn new(cut_at: u64, heal_at: Option<u64>, dice: Dice, odds: [u64; 3]) -> Self {
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

    pub(crate) fn cut(&self) -> bool {
        let now = self.w.now_ms;
        now >= self.cut_at && self.heal_at.is_none_or(|h| now < h)
    }

    pub(crate) fn tick(&mut self) {
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

/// Region us cut off for good: `a` reports nothing, its registration and lease are
/// gone; what the leader found.
pub(crate) fn cut_off_a(w: &mut World) -> Loss {
    w.deaf_regions = vec!["a".into()];
    w.cells.remove("a");
    w.owners.insert("a".into(), 0);
    Loss {
        detected_at_ms: w.now_ms,
        reason: "test".into(),
        ..Loss::default()
    }
}
