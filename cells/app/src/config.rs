//! Tunables of the reference app, with defaults that suit one cell (flags in main.rs).

use std::time::Duration;

#[derive(Clone, Debug)]
pub struct AppConfig {
    /// Deadline of every single store call (Redis, MySQL, Kafka produce).
    pub store_timeout: Duration,
    /// Attempts for idempotent store reads (the first try included).
    pub read_attempts: u32,
    /// How long a filled Redis entry lives; bounds staleness if an invalidation is lost.
    pub cache_ttl: Duration,
    /// How long a tombstone written by an update lives: longer than any read in flight.
    pub tombstone_ttl: Duration,
    /// In-process hot-key cache: entry lifetime, capacity, reads per second to be "hot".
    pub local_ttl: Duration,
    pub local_capacity: usize,
    pub hot_reads_per_sec: u32,
    /// Concurrent MySQL reads allowed when the cache is down (protects the database).
    pub db_fallback_concurrency: usize,
    /// Profile reads from MySQL at once; misses beyond them wait and are read together,
    /// up to `db_read_batch` users per query (see `batch`). Two: batches large enough to
    /// save most round trips under load (the miss path 1.3x of one query per miss in
    /// `e2e/bin/bench-cell`), and a second read so one slow query does not stall the rest.
    pub db_reads_in_flight: usize,
    pub db_read_batch: usize,
    pub orders_topic: String,
    pub orders_group: String,
    /// Admin endpoints (stock) need `Authorization: Bearer <token>`; none -> disabled.
    pub admin_token: Option<String>,
    /// Request body cap.
    pub max_body_bytes: usize,
}

impl Default for AppConfig {
    fn default() -> Self {
        Self {
            store_timeout: Duration::from_millis(800),
            read_attempts: 2,
            cache_ttl: Duration::from_secs(300),
            tombstone_ttl: Duration::from_secs(30),
            local_ttl: Duration::from_secs(1),
            local_capacity: 10_000,
            hot_reads_per_sec: 20,
            db_fallback_concurrency: 8,
            db_reads_in_flight: 2,
            db_read_batch: 64,
            orders_topic: "orders".into(),
            orders_group: "orders-persister".into(),
            admin_token: None,
            max_body_bytes: 16 * 1024,
        }
    }
}
