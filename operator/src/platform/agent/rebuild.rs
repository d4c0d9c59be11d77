//! The region side of rejoining an old home that returned with errant transactions (I/O):
//! the leader's intent names the new home to rebuild from; the old home's region exports
//! the errant transactions to a file first, then clones the new home's cell schemas and
//! takes its position (`cellplane_cell_sdk::rebuild`), reporting each stage in the cell's
//! registration (`MysqlReport::rebuild`). Nothing is dropped before the export is on disk.

use cellplane_cell_sdk::rebuild;
use cellplane_cells::etcd_keys::RebuildReport;
use serde_json::json;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

/// How long a failed rebuild waits before it is tried again.
pub const RETRY_AFTER: Duration = Duration::from_secs(30);

/// A rebuild started for one operation's intent.
#[derive(Clone)]
pub struct RebuildTask {
    pub operation: String,
    pub started: Instant,
    pub report: Arc<parking_lot::Mutex<RebuildReport>>,
}

impl RebuildTask {
    /// Whether the intent of `operation` needs a (new) run of the rebuild.
    pub fn needs_run(task: Option<&RebuildTask>, operation: &str) -> bool {
        match task {
            None => true,
            Some(t) if t.operation != operation => true,
            Some(t) => {
                let r = t.report.lock();
                r.done && !r.error.is_empty() && t.started.elapsed() > RETRY_AFTER
            }
        }
    }
}

/// What a rebuild needs to know.
pub struct RebuildPlan {
    pub cell: String,
    pub operation: String,
    pub source: String,
    /// The new home's `gtid_binlog_pos`: what is beyond it on the old home is errant.
    pub source_position: String,
    pub export_dir: PathBuf,
}

/// Starts the rebuild in the background; its progress shows in the returned task.
pub fn start(
    plan: RebuildPlan,
    target: mysql_async::Pool,
    source: mysql_async::Pool,
) -> RebuildTask {
    let report = Arc::new(parking_lot::Mutex::new(RebuildReport {
        operation: plan.operation.clone(),
        source: plan.source.clone(),
        ..RebuildReport::default()
    }));
    let task = RebuildTask {
        operation: plan.operation.clone(),
        started: Instant::now(),
        report: report.clone(),
    };
    tokio::spawn(async move {
        let result = run(&plan, &target, &source, &report).await;
        {
            let mut r = report.lock();
            r.done = true;
            match result {
                Ok(()) => {
                    tracing::info!(cell = %plan.cell, source = %plan.source, errant = r.errant_transactions, export = %r.export_file, position = %r.cloned_at, rows = r.rows, "rebuilt from the new home")
                }
                Err(e) => {
                    tracing::error!(cell = %plan.cell, source = %plan.source, error = %e, "rebuild failed; the cell stays fenced and it is tried again");
                    r.error = e;
                }
            }
        }
        let _ = source.disconnect().await;
    });
    task
}

async fn run(
    plan: &RebuildPlan,
    target: &mysql_async::Pool,
    source: &mysql_async::Pool,
    report: &parking_lot::Mutex<RebuildReport>,
) -> Result<(), String> {
    let errant = rebuild::errant_transactions(target, &plan.source_position)
        .await
        .map_err(|e| format!("reading the errant transactions: {e}"))?;
    let file = export(plan, &errant)
        .map_err(|e| format!("exporting the errant transactions: {e}; nothing was dropped"))?;
    {
        let mut r = report.lock();
        r.errant_transactions = errant.len() as u64;
        r.export_file = file.display().to_string();
    }
    tracing::warn!(cell = %plan.cell, errant = errant.len(), file = %file.display(), "errant transactions exported; cloning the new home");
    let cloned = rebuild::clone_schemas(target, source)
        .await
        .map_err(|e| format!("cloning {}: {e}", plan.source))?;
    rebuild::take_position(target, &cloned.gtid_pos)
        .await
        .map_err(|e| format!("taking the position {}: {e}", cloned.gtid_pos))?;
    let mut r = report.lock();
    r.cloned_at = cloned.gtid_pos;
    r.rows = cloned.rows;
    Ok(())
}

/// `<dir>/<operation>-<cell>-errant.jsonl`: a header line, then one line per errant
/// transaction (GTID, binary log file, statements, events). Written and synced before
/// the clone may drop anything.
fn export(plan: &RebuildPlan, errant: &[rebuild::ErrantTransaction]) -> std::io::Result<PathBuf> {
    std::fs::create_dir_all(&plan.export_dir)?;
    let path = export_path(&plan.export_dir, &plan.operation, &plan.cell);
    let tmp = path.with_extension("jsonl.partial");
    let mut f = std::fs::File::create(&tmp)?;
    let now_ms = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64);
    let header = json!({
        "cell": plan.cell,
        "operation": plan.operation,
        "newHome": plan.source,
        "newHomePosition": plan.source_position,
        "exportedAtMs": now_ms,
        "errantTransactions": errant.len(),
    });
    writeln!(f, "{header}")?;
    for t in errant {
        writeln!(f, "{}", serde_json::to_string(t)?)?;
    }
    f.sync_all()?;
    std::fs::rename(&tmp, &path)?;
    Ok(path)
}

fn export_path(dir: &Path, operation: &str, cell: &str) -> PathBuf {
    let safe = |s: &str| {
        s.chars()
            .map(|c| {
                if c.is_ascii_alphanumeric() || c == '-' || c == '_' {
                    c
                } else {
                    '_'
                }
            })
            .collect::<String>()
    };
    dir.join(format!("{}-{}-errant.jsonl", safe(operation), safe(cell)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn export_files_are_named_after_the_operation_and_cell_only() {
        let p = export_path(Path::new("/x"), "failover-shop-us-0-17", "../etc/passwd");
        assert_eq!(
            p,
            Path::new("/x/failover-shop-us-0-17-___etc_passwd-errant.jsonl")
        );
    }

    #[test]
    fn a_failed_rebuild_is_tried_again_later_and_a_new_operation_at_once() {
        let report = Arc::new(parking_lot::Mutex::new(RebuildReport::default()));
        let task = RebuildTask {
            operation: "op-1".into(),
            started: Instant::now(),
            report: report.clone(),
        };
        assert!(RebuildTask::needs_run(None, "op-1"));
        assert!(!RebuildTask::needs_run(Some(&task), "op-1"), "running");
        assert!(RebuildTask::needs_run(Some(&task), "op-2"));
        report.lock().done = true;
        report.lock().error = "boom".into();
        assert!(
            !RebuildTask::needs_run(Some(&task), "op-1"),
            "failed just now: waits"
        );
        let old = RebuildTask {
            started: Instant::now() - RETRY_AFTER - Duration::from_secs(1),
            ..task
        };
        assert!(RebuildTask::needs_run(Some(&old), "op-1"));
        report.lock().error.clear();
        assert!(
            !RebuildTask::needs_run(Some(&old), "op-1"),
            "done: never again"
        );
    }
}
