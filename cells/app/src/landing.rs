//! Landing: what the app does when a new table gives it slots it did not serve (a
//! switchover moved a cell's users here, or a failback brought its own users back).
//!
//! Two things are wrong with the cache at that moment. Its entries for those users may be
//! stale: while another cell served them, their updates were written there (and reached
//! this cell's MySQL by replication), never invalidated here. And it is cold for users that
//! were never read here, so every first read goes to MySQL.
//!
//! A planned move announces itself: the table freezes the moving cell (or, for a failback,
//! the cell serving for it) several hundred milliseconds before the flip. So, when a table
//! shows that this cell is about to gain slots ([`expected_gains`]), the cell *pre-lands*:
//! 1. the slots become *suspect* at once (their reads, should the flip come before the rest
//!    is done, bypass both caches and refresh them from MySQL; a versioned fill replaces an
//!    older entry);
//! 2. every Redis entry of those slots is dropped (nothing on this cell reads or writes
//!    them until the flip: the fence answers 421 for slots it does not serve);
//! 3. the most recently updated profiles of those slots are filled from this cell's MySQL
//!    (the data home's schema), remembering each one's version.
//!
//! Replication and the old home's last writes may still change rows after step 3, so at
//! the flip (which the leader writes only once this cell's MySQL has the old home's final
//! position) the remembered versions are checked in a few batched reads and every changed
//! profile is filled again, the in-process cache is emptied, and the slots are trusted.
//! A flip nobody announced (this cell saw no freeze, or missed its epoch) lands as before
//! the flip: suspect, drop, fill the recent profiles, trust. A freeze lifted without a move
//! (a rolled-back operation) ends the suspicion and forgets the pre-landing.
//!
//! At start the app has no earlier table and trusts its cache (a cell restarted while
//! another cell served its users should flush its Redis; the operator does not do it yet).

use crate::batch::read_profiles;
use crate::cache::FILL_SCRIPT;
use crate::metrics::Metrics;
use crate::profiles::{Profile, Profiles};
use crate::stores::Stores;
use cellplane_cells::crd::CellPhase;
use cellplane_cells::routing::RoutingTable;
use cellplane_cells::slot::{slot_for_key, Slot};
use cellplane_table::TableStore;
use futures::StreamExt;
use mysql_async::prelude::Queryable;
use parking_lot::RwLock;
use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::Instant;

/// Profiles filled per landing, most recently updated first.
pub const WARM_KEYS: usize = 2_000;

/// Redis fills in flight at once (one multiplexed connection pipelines them).
const FILLS_IN_FLIGHT: usize = 64;

/// Profiles per batched version check at the flip.
const CHECK_BATCH: usize = 512;

/// Slots grouped by the cell whose schema holds their data.
pub type Gains = BTreeMap<String, BTreeSet<Slot>>;

/// The slots `me` serves in `new` but did not serve in `old`, grouped by the cell whose
/// schema holds their data. None gained when there was no earlier table.
pub fn gained_slots(old: Option<&RoutingTable>, new: &RoutingTable, me: &str) -> Gains {
    let mut out = Gains::new();
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

/// The slots `me` would gain if every move that `table` shows under way completed: a
/// frozen cell failing over to its standby, or a failed-over cell failing back from the
/// frozen cell that serves for it. Grouped like [`gained_slots`].
pub fn expected_gains(table: &RoutingTable, me: &str) -> Gains {
    let mut out = Gains::new();
    for frozen in table.cells.iter().filter(|c| c.frozen) {
        let mut moves = Vec::new();
        if frozen.state != CellPhase::FailedOver && frozen.standby.as_deref() == Some(me) {
            moves.extend(table.failed_over(&frozen.name).ok());
        }
        let me_away = table
            .cell(me)
            .is_some_and(|c| c.state == CellPhase::FailedOver);
        if me_away && table.serving_for(me).is_some_and(|s| s.name == frozen.name) {
            moves.extend(table.failed_back(me).ok());
        }
        for next in &moves {
            for (home, slots) in gained_slots(Some(table), next, me) {
                out.entry(home).or_default().extend(slots);
            }
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

/// A pre-landing: the slots prepared before a flip, and the profiles filled for them
/// (user, version), per data home.
#[derive(Default)]
struct Prepared {
    slots: Gains,
    filled: FilledProfiles,
}

impl Prepared {
    fn covers(&self, gains: &Gains) -> bool {
        gains.iter().all(|(home, slots)| {
            self.slots
                .get(home)
                .is_some_and(|mine| slots.is_subset(mine))
        })
    }

    fn all_slots(&self) -> BTreeSet<Slot> {
        union(&self.slots)
    }
}

fn union(gains: &Gains) -> BTreeSet<Slot> {
    gains.values().flatten().copied().collect()
}

/// Follows the table: pre-lands announced gains and lands every gain (until the process
/// ends).
pub async fn run(
    tables: Arc<TableStore>,
    stores: Arc<Stores>,
    profiles: Arc<Profiles>,
    landing: Arc<Landing>,
    metrics: Arc<Metrics>,
) {
    let mut epochs = tables.subscribe();
    let mut previous = tables.get();
    let mut prepared = Prepared::default();
    while epochs.changed().await.is_ok() {
        let Some(current) = tables.get() else {
            continue;
        };
        let gained = gained_slots(previous.as_deref(), &current, &stores.cell);
        previous = Some(current.clone());
        if !gained.is_empty() {
            let all = union(&gained);
            landing.mark(&all);
            let started = Instant::now();
            let refreshed = if prepared.covers(&gained) {
                profiles.forget_local();
                refresh_changed(&stores, &prepared.filled).await
            } else {
                None
            };
            if let Some(refreshed) = refreshed {
                metrics.landing_refreshed.inc_by(refreshed);
                tracing::info!(
                    epoch = current.epoch,
                    slots = all.len(),
                    refreshed,
                    elapsed_ms = started.elapsed().as_millis() as u64,
                    "landed announced slots: the profiles filled before the flip checked, changed ones filled again"
                );
            } else {
                profiles.forget_local();
                drop_and_warm(&stores, &metrics, &current, &gained, WarmUp::AfterFlip).await;
            }
            landing.clear(&all);
            prepared = Prepared::default();
        }

        let expected = expected_gains(&current, &stores.cell);
        if expected.is_empty() && !prepared.slots.is_empty() {
            // The freeze was lifted without a move: nothing lands.
            landing.clear(&prepared.all_slots());
            tracing::info!(
                epoch = current.epoch,
                "announced move called off; pre-landing forgotten"
            );
            prepared = Prepared::default();
        }
        if !expected.is_empty() && !prepared.covers(&expected) {
            landing.mark(&union(&expected));
            let filled =
                drop_and_warm(&stores, &metrics, &current, &expected, WarmUp::BeforeFlip).await;
            prepared = Prepared {
                slots: expected,
                filled,
            };
        }
    }
}

/// Profiles filled, as (user, version), per data home.
type FilledProfiles = BTreeMap<String, Vec<(String, u64)>>;

/// When a warm-up runs: before a flip the table announced, or after one it did not.
#[derive(Clone, Copy, PartialEq, Eq)]
enum WarmUp {
    BeforeFlip,
    AfterFlip,
}

/// Drops every Redis profile entry of the slots of `gains`, then fills the most recent
/// profiles of each data home's slots; counts and logs both, returns what was filled.
async fn drop_and_warm(
    stores: &Stores,
    metrics: &Metrics,
    table: &RoutingTable,
    gains: &Gains,
    when: WarmUp,
) -> FilledProfiles {
    let started = Instant::now();
    let slots = union(gains);
    let dropped = drop_cached(stores, table, &slots).await;
    let mut filled = FilledProfiles::new();
    for (home, slots) in gains {
        filled.insert(home.clone(), warm(stores, table, home, slots).await);
    }
    let warmed: u64 = filled.values().map(|f| f.len() as u64).sum();
    metrics.landing_dropped.inc_by(dropped);
    match when {
        WarmUp::BeforeFlip => metrics.landing_prewarmed.inc_by(warmed),
        WarmUp::AfterFlip => metrics.landing_warmed.inc_by(warmed),
    };
    tracing::info!(
        epoch = table.epoch,
        slots = slots.len(),
        dropped,
        warmed,
        before_flip = when == WarmUp::BeforeFlip,
        elapsed_ms = started.elapsed().as_millis() as u64,
        "landing: stale cache entries of the slots dropped, their recent profiles warmed"
    );
    filled
}

/// Deletes every Redis profile entry of `slots`.
async fn drop_cached(stores: &Stores, table: &RoutingTable, slots: &BTreeSet<Slot>) -> u64 {
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

/// One profile to fill: user, profile, version.
type Row = (String, Profile, u64);

/// Profiles filled: (user, version) of each, and how many fills failed (Redis away). A fill
/// refused because Redis holds a newer version is neither.
#[derive(Default)]
struct Filled {
    done: Vec<(String, u64)>,
    failed: usize,
}

/// Fills Redis with `rows` (a versioned fill: never over a newer entry).
async fn fill(stores: &Stores, rows: Vec<Row>) -> Filled {
    let script = redis::Script::new(FILL_SCRIPT);
    let ttl = stores.cfg.cache_ttl.as_secs();
    let outcomes: Vec<_> = futures::stream::iter(rows)
        .map(|(user, profile, version)| {
            let body = serde_json::to_string(&profile).expect("a profile serializes");
            let mut inv = script.key(format!("profile:{user}"));
            inv.arg(version).arg(body).arg(ttl);
            async move {
                let filled = stores
                    .redis
                    .run(|mut c| async move { inv.invoke_async::<i64>(&mut c).await })
                    .await;
                filled.map(|f| (f == 1).then_some((user, version)))
            }
        })
        .buffer_unordered(FILLS_IN_FLIGHT)
        .collect()
        .await;
    let mut out = Filled::default();
    for o in outcomes {
        match o {
            Ok(Some(done)) => out.done.push(done),
            Ok(None) => {}
            Err(_) => out.failed += 1,
        }
    }
    out
}

/// Fills Redis with the most recently updated profiles of `slots` from `home`'s schema;
/// returns the (user, version) of each profile filled.
async fn warm(
    stores: &Stores,
    table: &RoutingTable,
    home: &str,
    slots: &BTreeSet<Slot>,
) -> Vec<(String, u64)> {
    let data = stores.dataset(home);
    let query = format!(
        "SELECT user_id, name, email, version FROM {} ORDER BY updated_at DESC LIMIT {}",
        data.table("profiles"),
        WARM_KEYS * 4
    );
    let rows: Vec<(String, String, String, u64)> = match stores.mysql_conn().await {
        Ok(mut c) => c.query(query).await.unwrap_or_default(),
        Err(_) => return Vec::new(),
    };
    let rows = rows
        .into_iter()
        .filter(|(u, ..)| slots.contains(&slot_for_key(u, table.slots)))
        .take(WARM_KEYS)
        .map(|(user, name, email, version)| (user, Profile { name, email }, version))
        .collect();
    fill(stores, rows).await.done
}

/// Reads the current rows of the profiles filled before the flip (per data home) and fills
/// again every one whose version moved on since; returns how many were filled again, or
/// None when a read failed (the caller then drops the slots' entries instead).
async fn refresh_changed(stores: &Stores, filled: &FilledProfiles) -> Option<u64> {
    let mut changed: Vec<Row> = Vec::new();
    for (home, filled) in filled {
        let data = stores.dataset(home);
        let known: BTreeMap<&str, u64> = filled.iter().map(|(u, v)| (u.as_str(), *v)).collect();
        for batch in filled.chunks(CHECK_BATCH) {
            let users: Vec<&str> = batch.iter().map(|(u, _)| u.as_str()).collect();
            let rows = match read_profiles(stores, &data, &users).await {
                Ok(rows) => rows,
                Err(error) => {
                    tracing::warn!(%error, "landing: checking the profiles filled before the flip failed");
                    return None;
                }
            };
            changed.extend(
                rows.into_iter()
                    .filter(|(u, (_, v))| known.get(u.as_str()).is_some_and(|k| v > k))
                    .map(|(user, (profile, version))| (user, profile, version)),
            );
        }
    }
    // A refill refused because a read since the flip filled a newer version is fine; one
    // that failed (Redis away) may leave a stale entry: drop instead.
    let refilled = fill(stores, changed).await;
    (refilled.failed == 0).then_some(refilled.done.len() as u64)
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
    fn a_freeze_announces_the_gains_of_the_move_it_starts_to_the_cell_that_gains() {
        let t1 = table();
        let a_slots: BTreeSet<Slot> = (0..64)
            .filter(|&s| t1.cell_for_slot(s).name == "a")
            .collect();
        assert!(expected_gains(&t1, "a").is_empty() && expected_gains(&t1, "b").is_empty());
        // Switchover of a: its standby b expects exactly what the flip will give it.
        let frozen = t1.frozen("a").unwrap();
        let flip = frozen.failed_over("a").unwrap();
        assert_eq!(
            expected_gains(&frozen, "b"),
            gained_slots(Some(&frozen), &flip, "b")
        );
        assert_eq!(expected_gains(&frozen, "b")["a"], a_slots);
        assert!(
            expected_gains(&frozen, "a").is_empty(),
            "the frozen cell gains nothing"
        );
        // After the flip nothing more is announced (the freeze went with the move).
        let mut after = flip.clone();
        after.cells.iter_mut().for_each(|c| c.frozen = false);
        assert!(expected_gains(&after, "b").is_empty());
        // Failback: the cell serving for a is frozen; a expects its own slots back.
        let serving_frozen = after.frozen("b").unwrap();
        let back = serving_frozen.failed_back("a").unwrap();
        assert_eq!(
            expected_gains(&serving_frozen, "a"),
            gained_slots(Some(&serving_frozen), &back, "a")
        );
        assert_eq!(expected_gains(&serving_frozen, "a")["a"], a_slots);
        assert!(expected_gains(&serving_frozen, "b").is_empty());
        // A cell whose standby is someone else expects nothing from a freeze.
        assert!(expected_gains(&frozen, "c").is_empty());
    }

    #[test]
    fn a_pre_landing_covers_a_flip_only_when_it_prepared_every_gained_slot() {
        let prepared = Prepared {
            slots: Gains::from([("a".to_string(), BTreeSet::from([1, 2, 3]))]),
            filled: BTreeMap::new(),
        };
        assert!(prepared.covers(&Gains::from([("a".to_string(), BTreeSet::from([1, 3]))])));
        assert!(!prepared.covers(&Gains::from([("a".to_string(), BTreeSet::from([4]))])));
        assert!(!prepared.covers(&Gains::from([("b".to_string(), BTreeSet::from([1]))])));
        assert_eq!(prepared.all_slots(), BTreeSet::from([1, 2, 3]));
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
