//! Metrics of table following, registered under the owner's prefix (router or app).

use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use std::sync::atomic::AtomicI64;

/// The Content-Type of every component's `/metrics` (prometheus-client encodes OpenMetrics
/// text); Prometheus 3 refuses to scrape a target that sends none.
pub const OPENMETRICS_CONTENT_TYPE: &str =
    "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// Cheap to clone: every metric is shared.
#[derive(Clone, Default)]
pub struct TableMetrics {
    pub table_epoch: Gauge<i64, AtomicI64>,
    pub table_applied_at: Gauge<i64, AtomicI64>,
    pub tables_refused: Counter,
    pub etcd_watch_up: Gauge<i64, AtomicI64>,
}

impl TableMetrics {
    pub fn register(&self, r: &mut Registry) {
        r.register(
            "table_epoch",
            "Epoch of the routing table in use",
            self.table_epoch.clone(),
        );
        r.register(
            "table_applied_timestamp_seconds",
            "When the table in use was applied",
            self.table_applied_at.clone(),
        );
        r.register(
            "tables_refused",
            "Routing tables refused as invalid or stale",
            self.tables_refused.clone(),
        );
        r.register(
            "etcd_watch_up",
            "1 while the etcd watch is established",
            self.etcd_watch_up.clone(),
        );
    }
}
