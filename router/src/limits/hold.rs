//! Holds: requests for a cell that is frozen in the table (a failover is moving its slots)
//! or held through the admin API wait, up to `timeouts.holdMs`, until a new table or a
//! release lets them go; then they fail fast. The request path pays one atomic load while
//! nothing is held.

use parking_lot::Mutex;
use std::collections::BTreeSet;
use std::sync::atomic::{AtomicBool, Ordering};
use tokio::sync::watch;
use tokio::time::Instant;

/// Cells held by an operator through the admin API.
#[derive(Default)]
pub struct Holds {
    any: AtomicBool,
    cells: Mutex<BTreeSet<String>>,
    changed: watch::Sender<u64>,
}

impl Holds {
    #[inline]
    pub fn is_held(&self, cell: &str) -> bool {
        self.any.load(Ordering::Acquire) && self.cells.lock().contains(cell)
    }

    /// Holds or releases `cell`; returns every held cell afterwards.
    pub fn set(&self, cell: &str, held: bool) -> Vec<String> {
        let mut cells = self.cells.lock();
        if held {
            cells.insert(cell.to_string());
        } else {
            cells.remove(cell);
        }
        self.any.store(!cells.is_empty(), Ordering::Release);
        let now: Vec<String> = cells.iter().cloned().collect();
        drop(cells);
        self.changed.send_modify(|n| *n += 1);
        now
    }

    /// Fires on every hold or release (held requests re-check then).
    pub fn subscribe(&self) -> watch::Receiver<u64> {
        self.changed.subscribe()
    }
}

/// How a wait on a held cell ended.
#[derive(Debug, PartialEq, Eq)]
pub enum Waited {
    /// The table or a hold changed: decide again.
    Changed,
    /// The deadline passed (or nothing can change any more): fail fast.
    TimedOut,
}

/// Waits until the table (`epochs`) or the holds change, or `deadline`. Changes already
/// seen by the receivers do not count: the caller re-checks its decision after marking
/// them seen, so nothing slips in between.
pub async fn wait(
    epochs: &mut watch::Receiver<u64>,
    holds: &mut watch::Receiver<u64>,
    deadline: Instant,
) -> Waited {
    let changed = async {
        tokio::select! {
            r = epochs.changed() => r.is_ok(),
            r = holds.changed() => r.is_ok(),
        }
    };
    match tokio::time::timeout_at(deadline, changed).await {
        Ok(true) => Waited::Changed,
        _ => Waited::TimedOut,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn holds_are_per_cell_and_wake_waiters() {
        let h = Holds::default();
        let mut rx = h.subscribe();
        assert!(!h.is_held("a"));
        assert_eq!(h.set("a", true), vec!["a".to_string()]);
        assert!(h.is_held("a") && !h.is_held("b"));
        assert!(rx.has_changed().unwrap());
        rx.mark_unchanged();
        assert!(h.set("a", false).is_empty());
        assert!(!h.is_held("a"));
        assert!(rx.has_changed().unwrap());
    }

    #[tokio::test(start_paused = true)]
    async fn a_release_ends_the_wait_when_it_happens() {
        let holds = std::sync::Arc::new(Holds::default());
        holds.set("us-0", true);
        let (_epoch_tx, mut epochs) = watch::channel(1u64);
        let mut released = holds.subscribe();
        released.mark_unchanged();
        let start = Instant::now();
        let releaser = holds.clone();
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(120)).await;
            releaser.set("us-0", false);
        });
        let waited = wait(&mut epochs, &mut released, start + Duration::from_secs(5)).await;
        assert_eq!(waited, Waited::Changed);
        assert_eq!(start.elapsed(), Duration::from_millis(120));
    }

    #[tokio::test(start_paused = true)]
    async fn a_new_table_ends_the_wait() {
        let holds = Holds::default();
        let (epoch_tx, mut epochs) = watch::channel(1u64);
        let mut h = holds.subscribe();
        let start = Instant::now();
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(30)).await;
            epoch_tx.send_replace(2);
            // Keep the sender until the waiter has seen the change.
            tokio::time::sleep(Duration::from_secs(60)).await;
        });
        let waited = wait(&mut epochs, &mut h, start + Duration::from_secs(1)).await;
        assert_eq!(waited, Waited::Changed);
        assert_eq!(start.elapsed(), Duration::from_millis(30));
    }

    #[tokio::test(start_paused = true)]
    async fn nothing_changing_times_out_exactly_at_the_deadline() {
        let holds = Holds::default();
        let (_epoch_tx, mut epochs) = watch::channel(1u64);
        let mut h = holds.subscribe();
        let start = Instant::now();
        let waited = wait(&mut epochs, &mut h, start + Duration::from_millis(2500)).await;
        assert_eq!(waited, Waited::TimedOut);
        assert_eq!(start.elapsed(), Duration::from_millis(2500));
    }

    #[tokio::test(start_paused = true)]
    async fn a_table_source_that_went_away_gives_up_at_once() {
        let holds = Holds::default();
        let (epoch_tx, mut epochs) = watch::channel(1u64);
        drop(epoch_tx);
        let mut h = holds.subscribe();
        let start = Instant::now();
        let waited = wait(&mut epochs, &mut h, start + Duration::from_secs(5)).await;
        assert_eq!(waited, Waited::TimedOut);
        assert_eq!(start.elapsed(), Duration::ZERO);
    }
}
