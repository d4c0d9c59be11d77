//! What a cell's users see through this router during a failure: each run of failed
//! requests (5xx answers, the router's own rejections included) until the first request
//! served again. Tracked by the cell whose data the users are (a failover moves the
//! serving cell, not that), published with the router's acknowledgements, so the record of
//! an unplanned failover holds the RTO as clients saw it.
//!
//! The serving path pays one relaxed load of a router-wide flag per request while no cell
//! has an outage open.

use cellplane_cells::etcd_keys::Outage;
use parking_lot::{Mutex, RwLock};
use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;

/// One cell's users' last outage. Failures count at the time their request arrived (a
/// request that hangs until its client gives up failed from the start); the outage ends
/// with the first request served that arrived after its last failure.
pub struct OutageTracker {
    /// An outage is open (failures since the last request served).
    open: AtomicBool,
    /// How many cells of the router have one open.
    open_cells: Arc<AtomicUsize>,
    last: Mutex<Option<Tracked>>,
}

struct Tracked {
    outage: Outage,
    /// When the request that ended it arrived.
    recovered_by: Option<u64>,
}

impl OutageTracker {
    fn new(open_cells: Arc<AtomicUsize>) -> Self {
        Self {
            open: AtomicBool::new(false),
            open_cells,
            last: Mutex::new(None),
        }
    }

    /// A request for the cell's users that arrived at `arrived_ms` failed.
    pub fn failed(&self, arrived_ms: u64) {
        let mut last = self.last.lock();
        match last.as_mut() {
            // Open, or it arrived before the request that ended the outage: part of it.
            Some(t) if t.recovered_by.is_none_or(|r| arrived_ms <= r) => {
                let o = &mut t.outage;
                o.first_failed_ms = o.first_failed_ms.min(arrived_ms);
                o.last_failed_ms = o.last_failed_ms.max(arrived_ms);
                o.failed_requests += 1;
            }
            _ => {
                *last = Some(Tracked {
                    outage: Outage {
                        first_failed_ms: arrived_ms,
                        last_failed_ms: arrived_ms,
                        failed_requests: 1,
                        recovered_at_ms: None,
                    },
                    recovered_by: None,
                });
                if !self.open.swap(true, Ordering::AcqRel) {
                    self.open_cells.fetch_add(1, Ordering::AcqRel);
                }
            }
        }
    }

    /// A request for the cell's users that arrived at `arrived_ms` was served at
    /// `now_ms()` (the clock is read only while an outage is open).
    #[inline]
    pub fn served(&self, arrived_ms: u64, now_ms: impl FnOnce() -> u64) {
        if !self.open.load(Ordering::Relaxed) {
            return;
        }
        let mut last = self.last.lock();
        if let Some(t) = last
            .as_mut()
            .filter(|t| t.recovered_by.is_none() && arrived_ms >= t.outage.last_failed_ms)
        {
            t.outage.recovered_at_ms = Some(now_ms());
            t.recovered_by = Some(arrived_ms);
            if self.open.swap(false, Ordering::AcqRel) {
                self.open_cells.fetch_sub(1, Ordering::AcqRel);
            }
        }
    }

    pub fn last(&self) -> Option<Outage> {
        self.last.lock().as_ref().map(|t| t.outage.clone())
    }
}

/// The trackers by cell, kept across tables (views are rebuilt at every epoch).
#[derive(Default)]
pub struct Outages {
    by_cell: RwLock<HashMap<String, Arc<OutageTracker>>>,
    open_cells: Arc<AtomicUsize>,
}

impl Outages {
    /// Some cell's users have an outage open: only then do served requests need looking at.
    #[inline]
    pub fn any_open(&self) -> bool {
        self.open_cells.load(Ordering::Relaxed) > 0
    }

    /// The tracker of `cell` (resolved once per table, off the hot path).
    pub fn of(&self, cell: &str) -> Arc<OutageTracker> {
        if let Some(t) = self.by_cell.read().get(cell) {
            return t.clone();
        }
        self.by_cell
            .write()
            .entry(cell.to_string())
            .or_insert_with(|| Arc::new(OutageTracker::new(self.open_cells.clone())))
            .clone()
    }

    /// Every cell's last outage.
    pub fn snapshot(&self) -> BTreeMap<String, Outage> {
        self.by_cell
            .read()
            .iter()
            .filter_map(|(c, t)| Some((c.clone(), t.last()?)))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_outage_runs_from_the_first_failed_arrival_to_a_later_request_served() {
        let all = Outages::default();
        let t = all.of("a");
        assert!(!all.any_open());
        t.served(0, || {
            unreachable!("nothing open: not even the clock is read")
        });
        assert_eq!(t.last(), None);
        t.failed(250);
        assert!(all.any_open());
        t.failed(100); // arrived earlier, failed later (its client gave up)
        t.failed(900);
        t.served(800, || {
            unreachable!("arrived before the last failure: not a recovery")
        });
        t.served(950, || 1_000);
        assert!(!all.any_open());
        t.served(990, || 2_000);
        // A request that arrived before the recovering one fails late: same outage.
        t.failed(920);
        let want = Outage {
            first_failed_ms: 100,
            last_failed_ms: 920,
            failed_requests: 4,
            recovered_at_ms: Some(1_000),
        };
        assert_eq!(t.last(), Some(want));
        // A failure that arrived after it opens a new outage.
        t.failed(5_000);
        assert_eq!(
            t.last(),
            Some(Outage {
                first_failed_ms: 5_000,
                last_failed_ms: 5_000,
                failed_requests: 1,
                recovered_at_ms: None,
            })
        );
        assert!(all.any_open());
        let _ = all.of("b");
        assert_eq!(all.snapshot().keys().collect::<Vec<_>>(), vec!["a"]);
    }
}
