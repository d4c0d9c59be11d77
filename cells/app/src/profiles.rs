//! Profiles: read-through cache (in-process hot keys, then Redis, then MySQL and fill);
//! updates write MySQL and then invalidate with versioned tombstones (see `cache`).
//!
//! Degradation: Redis down -> reads go to MySQL under a concurrency cap (beyond it, 503)
//! and updates pause (503), because an update whose invalidation cannot be written could
//! leave a stale entry behind. MySQL down -> cached profiles are still served.

use crate::batch::BatchReads;
use crate::cache::{self, Entry, HotCache};
use crate::error::{AppError, AppResult};
use crate::metrics::Metrics;
use crate::stores::{retry_read, timed, Dataset, Stores};
use mysql_async::prelude::Queryable;
use redis::AsyncCommands;
use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use std::sync::Arc;
use tokio::sync::{OnceCell, Semaphore};

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Profile {
    pub name: String,
    pub email: String,
}

impl Profile {
    pub fn validate(&self) -> AppResult<()> {
        for (field, value) in [("name", &self.name), ("email", &self.email)] {
            if value.trim().is_empty() || value.len() > 256 {
                return Err(AppError::BadRequest(format!(
                    "{field}: must be 1 to 256 bytes"
                )));
            }
        }
        if !self.email.contains('@') {
            return Err(AppError::BadRequest("email: must contain '@'".into()));
        }
        Ok(())
    }
}

/// A profile and where it came from (`local`, `cache`, `db`, `db-degraded`).
#[derive(Debug, Clone, Serialize)]
pub struct ProfileRead {
    pub user: String,
    pub version: u64,
    pub source: &'static str,
    #[serde(flatten)]
    pub profile: Profile,
}

/// Reads of one key from MySQL under way: concurrent misses for a key wait for the one
/// read instead of each asking MySQL (a landing, a hot key just invalidated).
type InFlight = parking_lot::Mutex<HashMap<String, Arc<OnceCell<(Profile, u64)>>>>;

pub struct Profiles {
    stores: Arc<Stores>,
    metrics: Arc<Metrics>,
    hot: HotCache,
    in_flight: InFlight,
    db_fallback: Semaphore,
    db_reads: Arc<BatchReads>,
    fill: redis::Script,
    tombstone: redis::Script,
}

fn cache_key(user: &str) -> String {
    format!("profile:{user}")
}

impl Profiles {
    pub fn new(stores: Arc<Stores>, metrics: Arc<Metrics>) -> Self {
        let cfg = &stores.cfg;
        Self {
            hot: HotCache::new(cfg.local_ttl, cfg.local_capacity, cfg.hot_reads_per_sec),
            in_flight: InFlight::default(),
            db_fallback: Semaphore::new(cfg.db_fallback_concurrency),
            db_reads: BatchReads::new(
                stores.clone(),
                metrics.clone(),
                cfg.db_reads_in_flight,
                cfg.db_read_batch,
            ),
            fill: redis::Script::new(cache::FILL_SCRIPT),
            tombstone: redis::Script::new(cache::TOMBSTONE_SCRIPT),
            stores,
            metrics,
        }
    }

    /// A profile; `suspect` (a slot this cell just started serving) skips both caches
    /// and refreshes them from MySQL.
    pub async fn get(&self, user: &str, data: &Dataset, suspect: bool) -> AppResult<ProfileRead> {
        let key = cache_key(user);
        let read = if suspect {
            self.read_db_and_fill(user, &key, data).await?
        } else {
            self.read(user, &key, data).await?
        };
        self.metrics.profile_read(read.source);
        Ok(read)
    }

    async fn read(&self, user: &str, key: &str, data: &Dataset) -> AppResult<ProfileRead> {
        if let Some((version, data)) = self.hot.get(key) {
            return decode(user, version, &data, "local");
        }
        let cfg = &self.stores.cfg;
        let cached = retry_read(cfg.read_attempts, || {
            self.stores
                .redis
                .run(|mut c| async move { c.get::<_, Option<String>>(key).await })
        })
        .await;
        match cached {
            Ok(Some(s)) => {
                if let Some(Entry::Value { version, data }) = cache::decode(&s) {
                    self.hot.offer(key, version, &data);
                    return decode(user, version, &data, "cache");
                }
                // A tombstone: an update happened; read the truth and fill.
                self.read_db_and_fill(user, key, data).await
            }
            Ok(None) => self.read_db_and_fill(user, key, data).await,
            Err(e) => {
                // Cache down: protect MySQL with a cap on concurrent fallback reads.
                self.metrics.degraded("redis");
                let _permit = tokio::time::timeout(cfg.store_timeout, self.db_fallback.acquire())
                    .await
                    .map_err(|_| {
                        AppError::unavailable(
                            "profiles",
                            format!("{e}; the database fallback is at its concurrency cap"),
                        )
                    })?
                    .expect("semaphore never closed");
                let (profile, version) = self.read_db(user, data).await?;
                Ok(ProfileRead {
                    user: user.into(),
                    version,
                    source: "db-degraded",
                    profile,
                })
            }
        }
    }

    async fn read_db(&self, user: &str, data: &Dataset) -> AppResult<(Profile, u64)> {
        let found = retry_read(self.stores.cfg.read_attempts, || async {
            self.db_reads
                .read(user, data)
                .await
                .map_err(|e| AppError::unavailable("mysql", e))
        })
        .await?;
        found.ok_or_else(|| AppError::NotFound(format!("profile of {user}")))
    }

    async fn read_db_and_fill(
        &self,
        user: &str,
        key: &str,
        data: &Dataset,
    ) -> AppResult<ProfileRead> {
        let cell = self
            .in_flight
            .lock()
            .entry(key.to_string())
            .or_default()
            .clone();
        let mut leader = false;
        let read = cell
            .get_or_try_init(|| {
                leader = true;
                self.read_db(user, data)
            })
            .await
            .cloned();
        {
            let mut m = self.in_flight.lock();
            if m.get(key).is_some_and(|c| Arc::ptr_eq(c, &cell)) {
                m.remove(key);
            }
        }
        let (profile, version) = read?;
        if !leader {
            return Ok(ProfileRead {
                user: user.into(),
                version,
                source: "db-coalesced",
                profile,
            });
        }
        let data = serde_json::to_string(&profile).expect("profile serializes");
        let cfg = &self.stores.cfg;
        // Best effort: a refused or failed fill only costs a later miss.
        let mut fill = self.fill.key(key);
        fill.arg(version).arg(&data).arg(cfg.cache_ttl.as_secs());
        let _ = self
            .stores
            .redis
            .run(|mut c| async move { fill.invoke_async::<i64>(&mut c).await })
            .await;
        self.hot.offer(key, version, &data);
        Ok(ProfileRead {
            user: user.into(),
            version,
            source: "db",
            profile,
        })
    }

    /// Writes MySQL, then invalidates; returns the new version.
    pub async fn put(&self, user: &str, profile: &Profile, data: &Dataset) -> AppResult<u64> {
        profile.validate()?;
        let key = cache_key(user);
        let cfg = &self.stores.cfg;
        let tombstone_ttl = cfg.tombstone_ttl;
        // 1. No fills while the update is in flight (here and in Redis).
        self.hot.invalidate(&key, None, tombstone_ttl);
        let in_flight = cache::encode(&Entry::Tombstone { version: None });
        let key_ref = &key;
        self.stores
            .redis
            .run(|mut c| async move {
                c.set_ex::<_, _, ()>(key_ref, in_flight, tombstone_ttl.as_secs())
                    .await
            })
            .await
            .map_err(paused)?;
        // 2. The truth, only while the cell holds its ownership lease.
        self.stores.may_write()?;
        let version = self.write_db(user, profile, data).await?;
        // A MySQL read already in flight for this key may have read the old row: readers
        // that start from now on must not join it (they start their own read).
        self.in_flight.lock().remove(&key);
        // 3. Readers may fill again, from this version on. If this fails, the in-flight
        // tombstone expires after `tombstone_ttl` and readers go to MySQL until then.
        let mut t = self.tombstone.key(&key);
        t.arg(version).arg(tombstone_ttl.as_secs());
        let written = self
            .stores
            .redis
            .run(|mut c| async move { t.invoke_async::<i64>(&mut c).await })
            .await;
        if let Err(e) = written {
            tracing::warn!(error = %e, "profile tombstone not written; it expires on its own");
        }
        self.hot.invalidate(&key, Some(version), tombstone_ttl);
        Ok(version)
    }

    async fn write_db(&self, user: &str, p: &Profile, data: &Dataset) -> AppResult<u64> {
        let deadline = self.stores.cfg.store_timeout * 2;
        let table = data.table("profiles");
        let upsert = format!(
            "INSERT INTO {table} (user_id, name, email, version) VALUES (?, ?, ?, 1) \
             ON DUPLICATE KEY UPDATE name = VALUES(name), email = VALUES(email), version = version + 1"
        );
        let select = format!("SELECT version FROM {table} WHERE user_id = ?");
        let mut c = self.stores.mysql_conn().await?;
        let write = async {
            let mut tx = c.start_transaction(mysql_async::TxOpts::default()).await?;
            tx.exec_drop(upsert.as_str(), (user, &p.name, &p.email))
                .await?;
            let version: Option<u64> = tx.exec_first(select.as_str(), (user,)).await?;
            tx.commit().await?;
            Ok::<_, mysql_async::Error>(version.unwrap_or(1))
        };
        timed("mysql", deadline, write).await
    }

    /// Empties the in-process cache of values (a landing: they may predate writes made
    /// by another cell).
    pub fn forget_local(&self) {
        self.hot.clear_values();
    }

    /// Entries in the in-process cache (for /status).
    pub fn hot_entries(&self) -> usize {
        self.hot.len()
    }
}

fn paused(e: AppError) -> AppError {
    AppError::unavailable(
        "profile updates",
        format!(
            "{e}; updates pause while the cache cannot be invalidated (reads continue from MySQL)"
        ),
    )
}

fn decode(user: &str, version: u64, data: &str, source: &'static str) -> AppResult<ProfileRead> {
    let profile: Profile = serde_json::from_str(data)
        .map_err(|e| AppError::unavailable("cache", format!("undecodable entry: {e}")))?;
    Ok(ProfileRead {
        user: user.into(),
        version,
        source,
        profile,
    })
}
