//! Prometheus metrics of the reference app.

use cellplane_table::owner_lease::OwnerLeaseMetrics;
use cellplane_table::TableMetrics;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct SourceLabel {
    pub source: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RouteLabels {
    /// The route pattern (`/users/{user}/profile`), never the raw path: bounded cardinality.
    pub route: String,
    pub method: String,
    /// "2xx", "4xx", ...
    pub class: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReasonLabel {
    pub reason: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct StoreLabel {
    pub store: &'static str,
}

pub struct Metrics {
    pub requests: Family<RouteLabels, Counter>,
    pub latency: Family<RouteLabels, Histogram>,
    pub profile_reads: Family<SourceLabel, Counter>,
    pub orders_accepted: Counter,
    pub orders_rejected: Family<ReasonLabel, Counter>,
    pub orders_persisted: Counter,
    /// The persister's MySQL transactions (each writes a fetched batch of orders).
    pub orders_persist_transactions: Counter,
    pub orders_duplicates: Counter,
    /// Orders whose delivery was in doubt, voided before the client was told "refused".
    pub orders_voided: Counter,
    /// Voided orders the persister found on the log and did not write (the broker had
    /// stored them after all).
    pub orders_void_skipped: Counter,
    /// A failed-over cell's acknowledged orders this (old home) app forwarded, and voided
    /// ones it left out; those this (serving) app persisted because they were missing.
    pub orders_replay_forwarded: Counter,
    pub orders_replay_void_skipped: Counter,
    pub orders_replayed: Counter,
    pub orders_poison: Counter,
    pub degraded: Family<StoreLabel, Counter>,
    pub table: TableMetrics,
    /// Requests for users (the fenced routes), for the load a failover moves.
    pub user_requests: Counter,
    /// Landings: stale cache entries dropped, recent profiles warmed.
    pub landing_dropped: Counter,
    pub landing_warmed: Counter,
    /// Pre-landings (before an announced flip): recent profiles warmed, and those filled
    /// again at the flip because their row changed after the warm-up.
    pub landing_prewarmed: Counter,
    pub landing_refreshed: Counter,
    /// MySQL queries made by profile reads (each reads a batch of users).
    pub profile_db_queries: Counter,
    /// The ownership lease that admits writes (unplanned failover's fence).
    pub owner_lease: OwnerLeaseMetrics,
    registry: Registry,
}

impl Metrics {
    pub fn new() -> Self {
        let mut r = Registry::with_prefix("cellplane_app");
        let m = Self {
            requests: Family::default(),
            latency: Family::new_with_constructor(|| {
                Histogram::new(exponential_buckets(0.0002, 2.0, 16))
            }),
            profile_reads: Family::default(),
            orders_accepted: Counter::default(),
            user_requests: Counter::default(),
            landing_dropped: Counter::default(),
            landing_warmed: Counter::default(),
            landing_prewarmed: Counter::default(),
            landing_refreshed: Counter::default(),
            profile_db_queries: Counter::default(),
            orders_rejected: Family::default(),
            orders_persisted: Counter::default(),
            orders_persist_transactions: Counter::default(),
            orders_duplicates: Counter::default(),
            orders_voided: Counter::default(),
            orders_void_skipped: Counter::default(),
            orders_replay_forwarded: Counter::default(),
            orders_replay_void_skipped: Counter::default(),
            orders_replayed: Counter::default(),
            orders_poison: Counter::default(),
            degraded: Family::default(),
            table: TableMetrics::default(),
            owner_lease: OwnerLeaseMetrics::default(),
            registry: Registry::default(),
        };
        r.register(
            "profile_reads",
            "Profile reads by where they were answered from",
            m.profile_reads.clone(),
        );
        r.register(
            "orders_accepted",
            "Orders accepted (on Kafka)",
            m.orders_accepted.clone(),
        );
        r.register(
            "orders_rejected",
            "Orders refused, by reason",
            m.orders_rejected.clone(),
        );
        r.register(
            "orders_persisted",
            "Orders written to MySQL",
            m.orders_persisted.clone(),
        );
        r.register(
            "orders_persist_transactions",
            "The persister's MySQL transactions that wrote a batch of orders (orders persisted / this = the mean batch)",
            m.orders_persist_transactions.clone(),
        );
        r.register(
            "user_requests",
            "Requests for users (the fenced routes)",
            m.user_requests.clone(),
        );
        r.register(
            "landing_cache_dropped",
            "Cached profiles dropped because this cell started serving their slots",
            m.landing_dropped.clone(),
        );
        r.register(
            "landing_cache_warmed",
            "Recently updated profiles filled into Redis when this cell started serving their slots",
            m.landing_warmed.clone(),
        );
        r.register(
            "profile_db_queries",
            "MySQL queries made by profile reads; each reads a batch of users (fewer than the reads under load)",
            m.profile_db_queries.clone(),
        );
        r.register(
            "landing_cache_prewarmed",
            "Recently updated profiles filled into Redis before an announced flip gave this cell their slots",
            m.landing_prewarmed.clone(),
        );
        r.register(
            "landing_cache_refreshed",
            "Profiles filled before a flip and filled again at it because their row changed in between",
            m.landing_refreshed.clone(),
        );
        r.register(
            "orders_duplicates",
            "Redelivered orders already in MySQL (not written twice)",
            m.orders_duplicates.clone(),
        );
        r.register(
            "orders_voided",
            "Orders whose delivery to Kafka was in doubt, voided before the client was told they were refused",
            m.orders_voided.clone(),
        );
        r.register(
            "orders_void_skipped",
            "Voided orders found on the order log and not persisted (the broker had stored them after all)",
            m.orders_void_skipped.clone(),
        );
        r.register(
            "orders_replay_forwarded",
            "Acknowledged orders of this failed-over cell forwarded to the cell serving its users",
            m.orders_replay_forwarded.clone(),
        );
        r.register(
            "orders_replay_void_skipped",
            "Orders of this failed-over cell not forwarded because they had been voided",
            m.orders_replay_void_skipped.clone(),
        );
        r.register(
            "orders_replayed",
            "Forwarded orders of a failed-over cell that this cell persisted (they were missing)",
            m.orders_replayed.clone(),
        );
        r.register(
            "orders_poison",
            "Undecodable messages skipped on the order topic",
            m.orders_poison.clone(),
        );
        r.register(
            "degraded",
            "Operations served or retried in a degraded mode, by the store that was down",
            m.degraded.clone(),
        );
        r.register(
            "requests",
            "HTTP requests by route, method and status class",
            m.requests.clone(),
        );
        r.register(
            "request_duration_seconds",
            "HTTP request duration by route, method and status class",
            m.latency.clone(),
        );
        m.table.register(&mut r);
        m.owner_lease.register(&mut r);
        Self { registry: r, ..m }
    }

    pub fn encode(&self) -> String {
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, &self.registry)
            .expect("String encoding");
        out
    }

    pub fn observe(&self, route: &str, method: &str, status: u16, seconds: f64) {
        let labels = RouteLabels {
            route: route.to_string(),
            method: method.to_string(),
            class: match status {
                100..=199 => "1xx",
                200..=299 => "2xx",
                300..=399 => "3xx",
                400..=499 => "4xx",
                _ => "5xx",
            },
        };
        self.requests.get_or_create(&labels).inc();
        self.latency.get_or_create(&labels).observe(seconds);
        if route.starts_with("/users/") {
            self.user_requests.inc();
        }
    }

    pub fn profile_read(&self, source: &'static str) {
        self.profile_reads
            .get_or_create(&SourceLabel { source })
            .inc();
    }

    pub fn order_rejected(&self, reason: &'static str) {
        self.orders_rejected
            .get_or_create(&ReasonLabel { reason })
            .inc();
    }

    pub fn degraded(&self, store: &'static str) {
        self.degraded.get_or_create(&StoreLabel { store }).inc();
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}
