//! How far a cell's app has drained: the writes the ownership fence let through and that
//! have not been answered yet, by the table epoch they were admitted at. A slot move's
//! final catch-up waits until every app process of the source cell has drained up to the
//! freeze's epoch: from then on no write for a frozen slot is still running there.

use parking_lot::Mutex;
use std::collections::BTreeMap;
use std::sync::Arc;

/// Writes in flight, counted by the epoch they were admitted at.
#[derive(Debug, Default)]
pub struct InFlight {
    by_epoch: Mutex<BTreeMap<u64, usize>>,
}

impl InFlight {
    pub fn new() -> Arc<Self> {
        Arc::default()
    }

    /// Counts a write admitted at `epoch` until the returned guard is dropped (answered,
    /// failed or cancelled alike).
    pub fn enter(self: &Arc<Self>, epoch: u64) -> Admitted {
        *self.by_epoch.lock().entry(epoch).or_insert(0) += 1;
        Admitted {
            in_flight: self.clone(),
            epoch,
        }
    }

    /// The oldest epoch a write still running was admitted at.
    pub fn oldest(&self) -> Option<u64> {
        self.by_epoch.lock().keys().next().copied()
    }
}

/// One admitted write; dropping it ends it.
#[derive(Debug)]
pub struct Admitted {
    in_flight: Arc<InFlight>,
    epoch: u64,
}

impl Drop for Admitted {
    fn drop(&mut self) {
        let mut by_epoch = self.in_flight.by_epoch.lock();
        if let Some(n) = by_epoch.get_mut(&self.epoch) {
            *n -= 1;
            if *n == 0 {
                by_epoch.remove(&self.epoch);
            }
        }
    }
}

/// The epoch an app process has drained to: the table it follows, or the oldest epoch a
/// write it still runs was admitted at, whichever is older.
pub fn drained_epoch(table_epoch: u64, oldest_in_flight: Option<u64>) -> u64 {
    oldest_in_flight.map_or(table_epoch, |o| o.min(table_epoch))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_oldest_running_write_holds_the_drained_epoch_back() {
        let in_flight = InFlight::new();
        assert_eq!(drained_epoch(7, in_flight.oldest()), 7);
        let old = in_flight.enter(5);
        let a = in_flight.enter(7);
        let b = in_flight.enter(7);
        assert_eq!(drained_epoch(7, in_flight.oldest()), 5);
        drop(old);
        assert_eq!(in_flight.oldest(), Some(7));
        drop(a);
        assert_eq!(
            in_flight.oldest(),
            Some(7),
            "one write of epoch 7 still runs"
        );
        drop(b);
        assert_eq!(in_flight.oldest(), None);
        assert_eq!(drained_epoch(8, None), 8);
    }

    #[tokio::test]
    async fn a_cancelled_write_ends_too() {
        let in_flight = InFlight::new();
        let guard = in_flight.enter(3);
        let task = tokio::spawn(async move {
            let _running = guard;
            std::future::pending::<()>().await;
        });
        tokio::task::yield_now().await;
        assert_eq!(in_flight.oldest(), Some(3));
        task.abort();
        let _ = task.await;
        assert_eq!(in_flight.oldest(), None);
    }
}
