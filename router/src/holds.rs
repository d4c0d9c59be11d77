//! Cells held by an operator through the admin API: their requests wait as if the cell
//! were frozen in the table, until released. The request path pays one atomic load while
//! nothing is held.

use std::collections::BTreeSet;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;
use tokio::sync::watch;

#[derive(Default)]
pub struct Holds {
    any: AtomicBool,
    cells: Mutex<BTreeSet<String>>,
    changed: watch::Sender<u64>,
}

impl Holds {
    #[inline]
    pub fn is_held(&self, cell: &str) -> bool {
        self.any.load(Ordering::Acquire) && self.lock().contains(cell)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, BTreeSet<String>> {
        self.cells.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Holds or releases `cell`; returns every held cell afterwards.
    pub fn set(&self, cell: &str, held: bool) -> Vec<String> {
        let mut cells = self.lock();
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

#[cfg(test)]
mod tests {
    use super::*;

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
}
