//! Landing: what the app does when a new table gives it slots it did not serve (a
//! switchover moved a cell's users here, or a failback brought its own users back).
//!
//! Two things are wrong with the cache at that moment. Its entries for those users may be
//! stale: while another cell served them, their updates were written there (and reached
//! this cell's MySQL by replication), never invalidated here. And it is cold for users that
//! were never read here, so every first read goes to MySQL. So:
//! 1. the gained slots are *suspect* at once: their reads bypass both caches and refresh
//!    them from MySQL (a versioned fill replaces an older entry);
//! 2. a cleanup drops every Redis entry of those slots and the in-process cache;
//! 3. a warm-up fills the most recently updated profiles of those slots from MySQL (the
//!    data home's schema), so the hottest users do not all miss at once;
//! 4. the slots are trusted again.
//!
//! Which slots were gained is the pure [`gained_slots`]. At start the app has no earlier
//! table and trusts its cache (a cell restarted while another cell served its users should
//! flush its Redis; the operator does not do it yet).

use crate::cache::FILL_SCRIPT;
use crate::metrics::Metrics;
use crate::profiles::Profiles;
use crate::stores::Stores;
use cellplane_cells::routing::RoutingTable;
use cellplane_cells::slot::{slot_for_key, Slot};
use cellplane_table::TableStore;
use mysql_async::prelude::Queryable;
use parking_lot::RwLock;
use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::Instant;

/// Profiles filled per landing, most recently updated first.
pub const WARM_KEYS: usize = 2_000;

/// The slots `me` serves in `new` but did not serve in `old`, grouped by the cell whose
/// schema holds their data. None gained when there was no earlier table.
pub fn gained_slots(
    old: Option<&RoutingTable>,
    new: &RoutingTable,
    me: &str,
) -> BTreeMap<String, BTreeSet<Slot>> {
    let mut out: BTreeMap<String, BTreeSet<Slot>> = BTreeMap::new();
    let Some(old) = old else {
        return out;
    };
    for slot in 0..new.slots {
        let now_mine = new.cell_for_slot(slot).name == me;
        let before_mine = old.slots == new.slots && old.cell_for_slot(slot).name == me;
        if now_mine && !before_mine {
            out.entry(new.data_home(slot).name.clone())
                .or_default()
                .insert(slot);
        }
    }
    out
}

/// The slots whose cached entries are not trusted yet.
#[derive(Default)]
pub struct Landing {
    suspect: RwLock<BTreeSet<Slot>>,
}

impl Landing {
    pub fn is_suspect(&self, slot: Slot) -> bool {
        let s = self.suspect.read();
        !s.is_empty() && s.contains(&slot)
    }

    fn mark(&self, slots: &BTreeSet<Slot>) {
        self.suspect.write().extend(slots.iter().copied());
    }

    fn clear(&self, slots: &BTreeSet<Slot>) {
        self.suspect.write().retain(|s| !slots.contains(s));
    }
}

/// Follows the table and lands every gain (until the process ends).
pub async fn run(
    tables: Arc<TableStore>,
    stores: Arc<Stores>,
    profiles: Arc<Profiles>,
    landing: Arc<Landing>,
    metrics: Arc<Metrics>,
) {
    let mut epochs = tables.subscribe();
    let mut previous = tables.get();
    while epochs.changed().await.is_ok() {
        let Some(current) = tables.get() else {
            continue;
        };
        let gained = gained_slots(previous.as_deref(), &current, &stores.cell);
        previous = Some(current.clone());
        if gained.is_empty() {
            continue;
        }
        let all: BTreeSet<Slot> = gained.values().flatten().copied().collect();
        landing.mark(&all);
        let started = Instant::now();
        let dropped = drop_cached(&stores, &profiles, &current, &all).await;
        let mut warmed = 0;
        for (home, slots) in &gained {
            warmed += warm(&stores, &current, home, slots).await;
        }
        landing.clear(&all);
        metrics.landing_dropped.inc_by(dropped);
        metrics.landing_warmed.inc_by(warmed);
        tracing::info!(
            epoch = current.epoch,
            slots = all.len(),
            dropped,
            warmed,
            elapsed_ms = started.elapsed().as_millis() as u64,
            "landed new slots: stale cache entries dropped, recent profiles warmed"
        );
    }
}

/// Deletes every Redis profile entry of `slots` and empties the in-process cache.
async fn drop_cached(
    stores: &Stores,
    profiles: &Profiles,
    table: &RoutingTable,
    slots: &BTreeSet<Slot>,
) -> u64 {
    profiles.forget_local();
    let mut cursor: u64 = 0;
    let mut dropped = 0;
    loop {
        let page = stores
            .redis
            .run(|mut c| async move {
                redis::cmd("SCAN")
                    .arg(cursor)
                    .arg("MATCH")
                    .arg("profile:*")
                    .arg("COUNT")
                    .arg(1000)
                    .query_async::<(u64, Vec<String>)>(&mut c)
                    .await
            })
            .await;
        let Ok((next, keys)) = page else {
            // Redis away: its entries cannot be served either; what is left expires.
            tracing::warn!("landing: Redis scan failed; stale entries expire with their TTL");
            return dropped;
        };
        let stale: Vec<String> = keys
            .into_iter()
            .filter(|k| {
                k.strip_prefix("profile:")
                    .is_some_and(|user| slots.contains(&slot_for_key(user, table.slots)))
            })
            .collect();
        if !stale.is_empty() {
            let n = stale.len() as u64;
            let deleted = stores
                .redis
                .run(|mut c| async move {
                    redis::cmd("DEL")
                        .arg(&stale)
                        .query_async::<u64>(&mut c)
                        .await
                })
                .await;
            if deleted.is_ok() {
                dropped += n;
            }
        }
        cursor = next;
        if cursor == 0 {
            return dropped;
        }
    }
}

/// Fills Redis with the most recently updated profiles of `slots` from `home`'s schema.
async fn warm(stores: &Stores, table: &RoutingTable, home: &str, slots: &BTreeSet<Slot>) -> u64 {
    let data = stores.dataset(home);
    let query = format!(
        "SELECT user_id, name, email, version FROM {} ORDER BY updated_at DESC LIMIT {}",
        data.table("profiles"),
        WARM_KEYS * 4
    );
    let rows: Vec<(String, String, String, u64)> = match stores.mysql_conn().await {
        Ok(mut c) => c.query(query).await.unwrap_or_default(),
        Err(_) => return 0,
    };
    let fill = redis::Script::new(FILL_SCRIPT);
    let ttl = stores.cfg.cache_ttl.as_secs();
    let mut warmed = 0;
    for (user, name, email, version) in rows
        .into_iter()
        .filter(|(u, ..)| slots.contains(&slot_for_key(u, table.slots)))
        .take(WARM_KEYS)
    {
        let body = serde_json::json!({"name": name, "email": email}).to_string();
        let mut inv = fill.key(format!("profile:{user}"));
        inv.arg(version).arg(body).arg(ttl);
        if stores
            .redis
            .run(|mut c| async move { inv.invoke_async::<i64>(&mut c).await })
            .await
            .is_ok_and(|filled| filled == 1)
        {
            warmed += 1;
        }
    }
    warmed
}

#[cfg(test)]
mod tests {
    use super::*;
    use cellplane_cells::routing::CellEntry;

    fn table() -> RoutingTable {
        let cells = [("a", "b"), ("b", "a")]
            .map(|(n, s)| {
                let mut e = CellEntry::active(n, "r", vec![format!("{n}:1")]);
                e.standby = Some(s.into());
                (e, 1)
            })
            .to_vec();
        RoutingTable::placed("p", 1, 64, cells).unwrap()
    }

    #[test]
    fn a_switchover_and_a_failback_are_gains_for_the_cell_taking_the_slots() {
        let t1 = table();
        let a_slots: BTreeSet<Slot> = (0..64)
            .filter(|&s| t1.cell_for_slot(s).name == "a")
            .collect();
        assert!(gained_slots(None, &t1, "b").is_empty(), "nothing at start");
        assert!(gained_slots(Some(&t1), &t1, "b").is_empty());
        let t2 = t1.failed_over("a").unwrap();
        // b gains a's slots, whose data lives in a's schema; a gains nothing.
        assert_eq!(
            gained_slots(Some(&t1), &t2, "b"),
            BTreeMap::from([("a".to_string(), a_slots.clone())])
        );
        assert!(gained_slots(Some(&t1), &t2, "a").is_empty());
        // Failing back: a gains its own slots again (its cache missed every update made on b).
        let t3 = t2.failed_back("a").unwrap();
        assert_eq!(
            gained_slots(Some(&t2), &t3, "a"),
            BTreeMap::from([("a".to_string(), a_slots)])
        );
        assert!(gained_slots(Some(&t2), &t3, "b").is_empty());
    }

    #[test]
    fn suspicion_is_per_slot_and_ends_when_cleared() {
        let l = Landing::default();
        let s = BTreeSet::from([3, 9]);
        assert!(!l.is_suspect(3));
        l.mark(&s);
        assert!(l.is_suspect(3) && l.is_suspect(9) && !l.is_suspect(4));
        l.clear(&s);
        assert!(!l.is_suspect(3));
    }
}
