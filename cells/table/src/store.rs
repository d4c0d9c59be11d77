//! The routing table in use: validated before use, swapped atomically (readers never
//! lock), never moved back to an older epoch, and saved to local disk so a router
//! restarted while etcd is down still routes. The router and cell apps both use it.

use crate::metrics::TableMetrics;
use crate::{Error, Result};
use arc_swap::ArcSwapOption;
use cellplane_cells::routing::RoutingTable;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use tokio::sync::watch;

/// What applying a candidate table did.
#[derive(Debug, PartialEq, Eq)]
pub enum Applied {
    /// Now in use.
    New { epoch: u64 },
    /// Same epoch and content as the one in use.
    Unchanged,
}

pub struct TableStore {
    current: ArcSwapOption<RoutingTable>,
    cache_file: Option<PathBuf>,
    metrics: TableMetrics,
    /// Bumps on every applied table, for requests held during a failover.
    epochs: watch::Sender<u64>,
    /// When the table in use was applied (ms since the Unix epoch; 0: none yet).
    applied_at_ms: AtomicU64,
    /// The source was read and holds no table yet (a platform whose leader has not placed
    /// any cell): nothing can be routed here, and nothing is missing either.
    none_published: AtomicBool,
}

/// Milliseconds since the Unix epoch.
pub fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

impl TableStore {
    pub fn new(cache_file: Option<PathBuf>, metrics: TableMetrics) -> Self {
        Self {
            current: ArcSwapOption::empty(),
            cache_file,
            metrics,
            epochs: watch::channel(0).0,
            applied_at_ms: AtomicU64::new(0),
            none_published: AtomicBool::new(false),
        }
    }

    /// Records that the source was read and holds no table.
    pub fn mark_none_published(&self) {
        self.none_published.store(true, Ordering::Relaxed);
    }

    /// Whether the source was read and held no table (see [`TableStore::mark_none_published`]):
    /// a cell's app is ready to be placed then, though it has no table to follow yet.
    pub fn none_published(&self) -> bool {
        self.none_published.load(Ordering::Relaxed)
    }

    /// The table in use (a cheap pointer load).
    #[inline]
    pub fn get(&self) -> Option<Arc<RoutingTable>> {
        self.current.load_full()
    }

    pub fn metrics(&self) -> &TableMetrics {
        &self.metrics
    }

    /// When the table in use was applied (ms since the Unix epoch; 0: none yet).
    pub fn applied_at_ms(&self) -> u64 {
        self.applied_at_ms.load(Ordering::Relaxed)
    }

    pub fn subscribe(&self) -> watch::Receiver<u64> {
        self.epochs.subscribe()
    }

    /// Validates and applies `bytes`. A refused table leaves the current one in place.
    pub fn apply_bytes(&self, bytes: &[u8], source: &str) -> Result<Applied> {
        let result = RoutingTable::decode(bytes)
            .map_err(Error::from)
            .and_then(|t| self.apply(t, source));
        if let Err(e) = &result {
            self.metrics.tables_refused.inc();
            tracing::error!(%source, error = %e, "routing table refused; keeping the last good one");
        }
        result
    }

    fn apply(&self, table: RoutingTable, source: &str) -> Result<Applied> {
        if let Some(cur) = self.current.load().as_ref() {
            if table.epoch < cur.epoch || (table.epoch == cur.epoch && **cur != table) {
                return Err(Error::Table(cellplane_cells::Error::InvalidTable {
                    field: "epoch".into(),
                    problem: format!("{} is not newer than the epoch in use ({}); every change must bump the epoch", table.epoch, cur.epoch),
                }));
            }
            if **cur == table {
                return Ok(Applied::Unchanged);
            }
        }
        let epoch = table.epoch;
        if let Some(path) = &self.cache_file {
            if let Err(e) = save(path, &table.encode()) {
                tracing::warn!(path = %path.display(), error = %e, "could not save the routing table to disk");
            }
        }
        self.current.store(Some(Arc::new(table)));
        self.metrics.table_epoch.set(epoch as i64);
        let now = now_ms();
        self.applied_at_ms.store(now, Ordering::Relaxed);
        self.metrics.table_applied_at.set((now / 1000) as i64);
        self.epochs.send_replace(epoch);
        tracing::info!(%source, epoch, "routing table applied");
        Ok(Applied::New { epoch })
    }

    /// Loads the table saved by a previous run, if any.
    pub fn load_cache(&self) -> Option<Applied> {
        let path = self.cache_file.as_ref()?;
        let bytes = std::fs::read(path).ok()?;
        self.apply_bytes(&bytes, "disk cache").ok()
    }
}

/// Writes atomically: a crash mid-write never leaves a torn table behind.
fn save(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, bytes)?;
    std::fs::rename(tmp, path)
}

/// Reads a table file (static mode).
pub fn read_file(path: &Path) -> Result<Vec<u8>> {
    std::fs::read(path).map_err(|source| Error::TableFile {
        path: path.display().to_string(),
        source,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use cellplane_cells::routing::CellEntry;

    fn table(epoch: u64) -> RoutingTable {
        let cells = ["a", "b"]
            .map(|n| (CellEntry::active(n, "r", vec!["127.0.0.1:1".into()]), 10))
            .to_vec();
        RoutingTable::placed("t", epoch, 64, cells).unwrap()
    }

    #[test]
    fn bad_and_stale_tables_are_refused_and_the_last_good_kept() {
        let dir = std::env::temp_dir().join(format!("cp-table-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let cache = dir.join("table.json");
        let store = TableStore::new(Some(cache.clone()), TableMetrics::default());
        assert_eq!(
            store.apply_bytes(&table(2).encode(), "test").unwrap(),
            Applied::New { epoch: 2 }
        );
        assert!(store.apply_bytes(b"{garbage", "test").is_err());
        assert!(
            store.apply_bytes(&table(1).encode(), "test").is_err(),
            "older epoch refused"
        );
        let mut same_epoch_other = table(2);
        same_epoch_other.owners.swap(0, 63);
        if same_epoch_other != table(2) {
            assert!(store
                .apply_bytes(&same_epoch_other.encode(), "test")
                .is_err());
        }
        assert_eq!(
            store.apply_bytes(&table(2).encode(), "test").unwrap(),
            Applied::Unchanged
        );
        assert_eq!(store.get().unwrap().epoch, 2);

        // A new router process reads the cache.
        let restarted = TableStore::new(Some(cache), TableMetrics::default());
        assert_eq!(restarted.load_cache(), Some(Applied::New { epoch: 2 }));
        std::fs::remove_dir_all(dir).unwrap();
    }
}
