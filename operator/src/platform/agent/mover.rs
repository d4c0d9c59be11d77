//! The region side of a slot move (I/O). The target cell's region runs the data work the
//! target's intent orders ([`MoveOrder`]): it reads the source's rows and binary log with
//! the platform's replication account at the source's registered MySQL address, writes the
//! target's own schema with the target's admin account, and reports each stage in the
//! target's registration ([`MoveReport`]). The source cell's region deletes the source's
//! copies when its intent says so ([`RetireOrder`]).
//!
//! A task survives nothing but its process: a new agent (or one that lost its task) starts
//! the copy over (the target's rows of those slots are cleared first, so a copy run twice
//! leaves the same rows); the leader's copy step waits for it within its deadline.

use cellplane_cell_sdk::mover::{self, Side, SlotMover, Throttle, Until, UserTable};
use cellplane_cells::slot_move::{
    MoveOrder, MovePhase, MoveReport, MoveStage, MovedTable, RetireOrder, RetireReport,
};
use cellplane_cells::slot_set::SlotSet;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::watch;

/// How often a following copy reads the source's new changes.
const FOLLOW_EVERY: Duration = Duration::from_millis(300);
/// How long a failed move or deletion waits before it is tried again.
pub const RETRY_AFTER: Duration = Duration::from_secs(10);

/// A move the target's region carries out; dropping it stops the work.
pub struct MoveTask {
    pub operation: String,
    phase: watch::Sender<MovePhase>,
    pub report: Arc<parking_lot::Mutex<MoveReport>>,
    work: tokio::task::JoinHandle<()>,
}

impl Drop for MoveTask {
    fn drop(&mut self) {
        self.work.abort();
    }
}

impl MoveTask {
    /// Starts moving `order`'s slots from `source` into `target` in the background.
    pub fn start(cell: &str, order: &MoveOrder, source: Side, target: Side) -> Self {
        let report = Arc::new(parking_lot::Mutex::new(MoveReport {
            operation: order.operation.clone(),
            phase: Some(order.phase),
            ..MoveReport::default()
        }));
        let (phase, phases) = watch::channel(order.phase);
        let job = Job {
            cell: cell.to_string(),
            order: order.clone(),
            source,
            target,
            report: report.clone(),
        };
        tracing::info!(%cell, operation = %order.operation, source = %order.source, slots = %order.slots, "slot move: copying");
        Self {
            operation: order.operation.clone(),
            phase,
            report,
            work: tokio::spawn(job.run(phases)),
        }
    }

    /// Passes the order's phase on (the final sync begins when it says so).
    pub fn follow(&self, order: &MoveOrder) {
        self.phase.send_if_modified(|p| {
            let changed = *p != order.phase;
            *p = order.phase;
            changed
        });
    }

    /// Whether the work goes on (not stopped, not ended).
    pub fn running(&self) -> bool {
        !self.work.is_finished()
    }

    /// Stopped (or its process lost it) before it had an answer for the leader.
    pub fn needs_restart(&self) -> bool {
        !self.running()
            && !matches!(
                self.report.lock().stage,
                MoveStage::Synced | MoveStage::Mismatch
            )
    }

    /// Stops the work; the last report stays.
    pub fn stop(&self) {
        self.work.abort();
    }

    /// The last report, as the region publishes it.
    pub fn snapshot(&self) -> MoveReport {
        self.report.lock().clone()
    }
}

struct Job {
    cell: String,
    order: MoveOrder,
    source: Side,
    target: Side,
    report: Arc<parking_lot::Mutex<MoveReport>>,
}

impl Job {
    async fn run(self, mut phases: watch::Receiver<MovePhase>) {
        loop {
            match self.attempt(&mut phases).await {
                // Synced or a mismatch: the report says it; the leader decides next.
                Ok(()) => return,
                Err(e) => {
                    tracing::warn!(cell = %self.cell, operation = %self.order.operation, error = %e, "slot move failed; trying again");
                    let mut r = self.report.lock();
                    r.error = e;
                    if r.stage != MoveStage::Following {
                        r.stage = MoveStage::Failed;
                    }
                }
            }
            tokio::time::sleep(RETRY_AFTER).await;
        }
    }

    fn update(&self, f: impl FnOnce(&mut MoveReport)) {
        f(&mut self.report.lock());
    }

    async fn attempt(&self, phases: &mut watch::Receiver<MovePhase>) -> Result<(), String> {
        let slots = SlotSet::parse(self.order.slot_count, &self.order.slots)
            .map_err(|e| format!("slots {:?}: {e}", self.order.slots))?;
        let tables = user_tables(&self.order.tables);
        let m = SlotMover::new(self.source.clone(), self.target.clone(), &tables, slots)
            .await
            .map_err(|e| e.to_string())?;
        let result = self.work(&m, phases).await;
        let _ = m.close().await;
        result
    }

    async fn work(
        &self,
        m: &SlotMover,
        phases: &mut watch::Receiver<MovePhase>,
    ) -> Result<(), String> {
        let err = |e: cellplane_cell_sdk::Error| e.to_string();
        let mut position = self.report.lock().position.clone();
        if self.report.lock().verified_rows.is_none() {
            // Copy (again, from a clean target) from a position taken before reading.
            self.update(|r| {
                r.stage = MoveStage::Copying;
                r.error.clear();
            });
            let start = m.start_position().await.map_err(err)?;
            let throttle = Throttle {
                rows_per_sec: self.order.rows_per_sec,
                ..Throttle::default()
            };
            m.clear_target(throttle).await.map_err(err)?;
            let copied = m
                .copy(throttle, |p| {
                    let mut r = self.report.lock();
                    r.rows_scanned = p.scanned;
                    r.rows_copied = p.copied;
                    r.rows_per_sec = rate(p.copied, p.elapsed);
                })
                .await
                .map_err(err)?;
            tracing::info!(cell = %self.cell, operation = %self.order.operation, rows = copied.copied, elapsed_ms = copied.elapsed.as_millis() as u64, "slot move: copied; verifying");
            self.update(|r| {
                r.stage = MoveStage::Verifying;
                r.position = start.clone();
            });
            position = start;
            if !self.verify(m, &mut position, MovePhase::Copy).await? {
                return Ok(());
            }
        }
        loop {
            if *phases.borrow_and_update() == MovePhase::Final {
                // The slots are frozen and the source drained: catch up to its log as it is
                // now and compare every row there.
                let started = Instant::now();
                let matched = self.verify(m, &mut position, MovePhase::Final).await?;
                if matched {
                    self.update(|r| r.stage = MoveStage::Synced);
                    tracing::info!(cell = %self.cell, operation = %self.order.operation, position = %position, elapsed_ms = started.elapsed().as_millis() as u64, "slot move: synced at the cut-over");
                }
                return Ok(());
            }
            let caught = m.catch_up(&position, Until::End).await.map_err(err)?;
            position = caught.position.clone();
            self.update(|r| {
                r.position = caught.position;
                r.transactions_applied += caught.applied;
                r.rows_applied += caught.rows;
                r.error.clear();
            });
            tokio::select! {
                _ = tokio::time::sleep(FOLLOW_EVERY) => {}
                _ = phases.changed() => {}
            }
        }
    }

    /// Verifies at a source snapshot reached from `position` (moved to it); false when
    /// rows differ (the report lists them).
    async fn verify(
        &self,
        m: &SlotMover,
        position: &mut String,
        phase: MovePhase,
    ) -> Result<bool, String> {
        let v = m.verify(position).await.map_err(|e| e.to_string())?;
        *position = v.position.clone();
        let matched = v.mismatches.is_empty();
        if !matched {
            tracing::error!(cell = %self.cell, operation = %self.order.operation, mismatches = v.mismatches.len(), first = %v.mismatches[0], "slot move: the target's rows differ from the source's");
        }
        self.update(|r| {
            r.phase = Some(phase);
            r.position = v.position.clone();
            r.verified_at = v.position.clone();
            r.verified_rows = Some(v.rows);
            r.mismatches = v.mismatches.iter().map(ToString::to_string).collect();
            r.error.clear();
            r.stage = if matched {
                MoveStage::Following
            } else {
                MoveStage::Mismatch
            };
        });
        Ok(matched)
    }
}

fn user_tables(tables: &[MovedTable]) -> Vec<UserTable> {
    tables
        .iter()
        .map(|t| UserTable::new(&t.name, &t.key_column))
        .collect()
}

fn rate(rows: u64, elapsed: Duration) -> u64 {
    let secs = elapsed.as_secs_f64();
    if secs > 0.0 {
        (rows as f64 / secs) as u64
    } else {
        0
    }
}

/// A deletion of a cell's copies of moved slots, carried out by the cell's own region.
pub struct RetireTask {
    pub operation: String,
    pub started: Instant,
    pub report: Arc<parking_lot::Mutex<RetireReport>>,
}

impl RetireTask {
    /// Whether `order` needs a (new) run: none yet, another operation's, or a failed one
    /// long enough ago.
    pub fn needs_run(task: Option<&RetireTask>, order: &RetireOrder) -> bool {
        match task {
            None => true,
            Some(t) if t.operation != order.operation => true,
            Some(t) => {
                let r = t.report.lock();
                r.done && !r.error.is_empty() && t.started.elapsed() > RETRY_AFTER
            }
        }
    }

    pub fn start(cell: &str, order: &RetireOrder, side: Side) -> Self {
        let report = Arc::new(parking_lot::Mutex::new(RetireReport {
            operation: order.operation.clone(),
            ..RetireReport::default()
        }));
        let (cell, order2, shared) = (cell.to_string(), order.clone(), report.clone());
        tokio::spawn(async move {
            let outcome = async {
                let slots = SlotSet::parse(order2.slot_count, &order2.slots)
                    .map_err(|e| format!("slots {:?}: {e}", order2.slots))?;
                mover::retire_slots(
                    &side,
                    &user_tables(&order2.tables),
                    &slots,
                    Throttle::default(),
                )
                .await
                .map_err(|e| e.to_string())
            }
            .await;
            let mut r = shared.lock();
            r.done = true;
            match outcome {
                Ok(rows) => {
                    r.rows_deleted = rows;
                    tracing::info!(%cell, operation = %order2.operation, slots = %order2.slots, rows, "moved slots' old copies deleted");
                }
                Err(e) => {
                    tracing::error!(%cell, operation = %order2.operation, error = %e, "deleting the moved slots' old copies failed; tried again");
                    r.error = e;
                }
            }
        });
        Self {
            operation: order.operation.clone(),
            started: Instant::now(),
            report,
        }
    }
}
