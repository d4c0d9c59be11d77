//! Profile reads from MySQL, batched across users: a burst of cache misses (a cold cache
//! after a landing, a flushed Redis, a crowd of new users) becomes a few `IN (...)` reads
//! instead of one round trip per user.
//!
//! At most `in_flight` reads run at once. A miss that finds a free place is read at once,
//! alone (no added latency when the load is light); misses that arrive while every place
//! is taken wait, and the next read to finish takes up to `max_batch` of them (for one
//! schema) in one query. So batches grow with the load by themselves, with no timer, and
//! MySQL never sees more than `in_flight` profile reads from this process: the miss rate
//! it has to answer is bounded, whatever the cache does.
//!
//! The IN list is padded to a power of two (`sql::padded`), so each connection prepares at
//! most seven statements per schema instead of one per batch size.

use crate::metrics::Metrics;
use crate::profiles::Profile;
use crate::sql;
use crate::stores::{timed, Dataset, Stores};
use mysql_async::prelude::Queryable;
use parking_lot::Mutex;
use std::collections::{HashMap, VecDeque};
use std::sync::Arc;
use tokio::sync::oneshot;

/// One user's row: the profile and its version, or None when the user has none.
pub type Found = Option<(Profile, u64)>;

/// A batch's outcome for each of its users; a failed read fails the whole batch with
/// its reason (the callers retry, as for any read).
type Answer = Result<Found, String>;

struct Waiter {
    data: Dataset,
    user: String,
    answer: oneshot::Sender<Answer>,
}

#[derive(Default)]
struct Queue {
    running: usize,
    waiting: VecDeque<Waiter>,
}

pub struct BatchReads {
    stores: Arc<Stores>,
    metrics: Arc<Metrics>,
    in_flight: usize,
    max_batch: usize,
    queue: Mutex<Queue>,
}

/// Takes the oldest waiter and, behind it, up to `max - 1` more for the same key (in
/// arrival order); the others keep their places.
fn take_batch<W, K: PartialEq>(
    waiting: &mut VecDeque<W>,
    max: usize,
    key: impl Fn(&W) -> &K,
) -> Vec<W> {
    let Some(first) = waiting.pop_front() else {
        return Vec::new();
    };
    let mut batch = vec![first];
    let mut i = 0;
    while i < waiting.len() && batch.len() < max {
        if key(&waiting[i]) == key(&batch[0]) {
            batch.extend(waiting.remove(i));
        } else {
            i += 1;
        }
    }
    batch
}

/// A driver's place among the `in_flight`: given back under the queue's lock when the
/// driver finds nothing left to read (so a waiter queued just then is never stranded
/// without a driver), or on drop if the driver panicked.
struct Place<'a> {
    queue: &'a Mutex<Queue>,
    held: bool,
}

impl Drop for Place<'_> {
    fn drop(&mut self) {
        if self.held {
            self.queue.lock().running -= 1;
        }
    }
}

impl BatchReads {
    /// `in_flight` >= 1 reads at once, `max_batch` >= 1 users per read.
    pub fn new(
        stores: Arc<Stores>,
        metrics: Arc<Metrics>,
        in_flight: usize,
        max_batch: usize,
    ) -> Arc<Self> {
        Arc::new(Self {
            stores,
            metrics,
            in_flight: in_flight.max(1),
            max_batch: max_batch.max(1),
            queue: Mutex::default(),
        })
    }

    /// `user`'s profile in `data`, read alone or with other users' misses.
    pub async fn read(self: &Arc<Self>, user: &str, data: &Dataset) -> Result<Found, String> {
        let (tx, rx) = oneshot::channel();
        let start_driver = {
            let mut q = self.queue.lock();
            q.waiting.push_back(Waiter {
                data: data.clone(),
                user: user.to_string(),
                answer: tx,
            });
            let free = q.running < self.in_flight;
            if free {
                q.running += 1;
            }
            free
        };
        if start_driver {
            tokio::spawn(self.clone().drive());
        }
        // The driver answers every waiter it takes within the store deadline; the wait in
        // the queue before that is bounded too.
        let deadline = self.stores.cfg.store_timeout * 2;
        match tokio::time::timeout(deadline, rx).await {
            Ok(Ok(answer)) => answer,
            Ok(Err(_)) => Err("the batched read was dropped".into()),
            Err(_) => Err(format!("no answer within {deadline:?}")),
        }
    }

    /// Reads batches until none is waiting, then gives its place back.
    async fn drive(self: Arc<Self>) {
        let mut place = Place {
            queue: &self.queue,
            held: true,
        };
        loop {
            let batch = {
                let mut q = self.queue.lock();
                let batch = take_batch(&mut q.waiting, self.max_batch, |w| &w.data);
                if batch.is_empty() {
                    q.running -= 1;
                    place.held = false;
                    return;
                }
                batch
            };
            let users: Vec<&str> = batch.iter().map(|w| w.user.as_str()).collect();
            let rows = self.query(&batch[0].data, &users).await;
            for w in batch {
                let answer = match &rows {
                    Ok(rows) => Ok(rows.get(&w.user).cloned()),
                    Err(e) => Err(e.clone()),
                };
                let _ = w.answer.send(answer);
            }
        }
    }

    async fn query(
        &self,
        data: &Dataset,
        users: &[&str],
    ) -> Result<HashMap<String, (Profile, u64)>, String> {
        self.metrics.profile_db_queries.inc();
        read_profiles(&self.stores, data, users).await
    }
}

/// The profiles of `users` in `data` (absent users are not in the map), in one query: the
/// IN list padded to a power of two (repeating the last user), so each connection prepares
/// few statements. Also how a landing re-reads the profiles it warmed.
pub async fn read_profiles(
    stores: &Stores,
    data: &Dataset,
    users: &[&str],
) -> Result<HashMap<String, (Profile, u64)>, String> {
    if users.is_empty() {
        return Ok(HashMap::new());
    }
    let params = sql::padded(users.to_vec());
    let query = format!(
        "SELECT user_id, name, email, version FROM {} WHERE user_id IN ({})",
        data.table("profiles"),
        sql::repeated("?", params.len())
    );
    let read = async {
        let mut c = stores.mysql_conn().await?;
        timed(
            "mysql",
            stores.cfg.store_timeout,
            c.exec(query.as_str(), params),
        )
        .await
    };
    let rows: Vec<(String, String, String, u64)> = read.await.map_err(|e| e.to_string())?;
    Ok(rows
        .into_iter()
        .map(|(user, name, email, version)| (user, (Profile { name, email }, version)))
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_batch_is_the_oldest_waiter_and_the_next_ones_of_its_schema() {
        let mut waiting: VecDeque<(&str, u32)> =
            [("a", 1), ("b", 2), ("a", 3), ("a", 4), ("b", 5), ("a", 6)].into();
        let batch = take_batch(&mut waiting, 3, |w| &w.0);
        assert_eq!(batch, [("a", 1), ("a", 3), ("a", 4)]);
        assert_eq!(waiting, [("b", 2), ("b", 5), ("a", 6)], "order kept");
        assert_eq!(take_batch(&mut waiting, 3, |w| &w.0), [("b", 2), ("b", 5)]);
        assert_eq!(take_batch(&mut waiting, 1, |w| &w.0), [("a", 6)]);
        assert!(take_batch(&mut waiting, 3, |w| &w.0).is_empty());
    }
}
