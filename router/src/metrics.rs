//! Prometheus metrics of the router, served on their own port.

use cellplane_table::TableMetrics;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RequestLabels {
    pub cell: String,
    /// "2xx", "4xx", "5xx", ...
    pub class: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct CellLabel {
    pub cell: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReasonLabel {
    pub reason: &'static str,
}

/// Every reason the router answers a request itself with (`rejected_total{reason}`).
pub const REJECT_REASONS: [&str; 16] = [
    "no_user_key",
    "bad_user_key",
    "rate_limited",
    "body_too_large",
    "bad_body",
    "body_timeout",
    "bad_request",
    "no_table",
    "hold_timeout",
    "cell_unavailable",
    "cell_overloaded",
    "no_endpoint",
    "bad_endpoint",
    "upstream_timeout",
    "upstream_unreachable",
    "bad_response",
];
/// Why a request was sent again (`retries_total{reason}`).
pub const RETRY_REASONS: [&str; 3] = ["connect", "idempotent", "misdirected"];
/// Active health-check transitions (`health_transitions_total{reason}`).
pub const HEALTH_TRANSITIONS: [&str; 2] = ["down", "up"];
/// Why the direct path handed a connection to hyper (`http1_handoffs_total{reason}`).
pub const HANDOFF_REASONS: [&str; 2] = ["not_plain", "unparsed"];

pub struct Metrics {
    pub requests: Family<RequestLabels, Counter>,
    pub latency: Family<CellLabel, Histogram>,
    pub rejected: Family<ReasonLabel, Counter>,
    pub ejections: Family<CellLabel, Counter>,
    pub retries: Family<ReasonLabel, Counter>,
    pub held: Counter,
    pub health_transitions: Family<ReasonLabel, Counter>,
    /// Client connections the direct HTTP/1.1 path handed to hyper, by reason.
    pub handoffs: Family<ReasonLabel, Counter>,
    pub table: TableMetrics,
    registry: Registry,
}

impl Metrics {
    pub fn new() -> Self {
        let mut r = Registry::with_prefix("cellplane_router");
        let requests = Family::<RequestLabels, Counter>::default();
        let latency = Family::<CellLabel, Histogram>::new_with_constructor(|| {
            Histogram::new(exponential_buckets(0.0001, 2.0, 18))
        });
        let rejected = Family::<ReasonLabel, Counter>::default();
        let ejections = Family::<CellLabel, Counter>::default();
        let retries = Family::<ReasonLabel, Counter>::default();
        let held = Counter::default();
        let health_transitions = Family::<ReasonLabel, Counter>::default();
        let handoffs = Family::<ReasonLabel, Counter>::default();
        let table = TableMetrics::default();
        table.register(&mut r);
        r.register(
            "requests",
            "Proxied requests by cell and status class",
            requests.clone(),
        );
        r.register(
            "request_duration_seconds",
            "Upstream response time by cell",
            latency.clone(),
        );
        r.register(
            "rejected",
            "Requests answered by the router itself, by reason",
            rejected.clone(),
        );
        r.register(
            "ejections",
            "Endpoints ejected as outliers",
            ejections.clone(),
        );
        r.register("retries", "Retries by reason", retries.clone());
        r.register(
            "held",
            "Requests held while their cell was frozen for a failover",
            held.clone(),
        );
        r.register(
            "health_transitions",
            "Endpoints taken down or brought up by active health checks",
            health_transitions.clone(),
        );
        r.register(
            "http1_handoffs",
            "Client connections the direct HTTP/1.1 path handed to hyper, by reason",
            handoffs.clone(),
        );
        // Every series of a known label value exists from the start, at 0: `rate()` and
        // alerts see it before its first event, and a missing series means a wrong name.
        for (family, reasons) in [
            (&rejected, &REJECT_REASONS[..]),
            (&retries, &RETRY_REASONS[..]),
            (&health_transitions, &HEALTH_TRANSITIONS[..]),
            (&handoffs, &HANDOFF_REASONS[..]),
        ] {
            for &reason in reasons {
                drop(family.get_or_create(&ReasonLabel { reason }));
            }
        }
        Self {
            requests,
            latency,
            rejected,
            ejections,
            retries,
            held,
            health_transitions,
            handoffs,
            table,
            registry: r,
        }
    }

    pub fn encode(&self) -> String {
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, &self.registry)
            .expect("String encoding");
        out
    }

    pub fn reject(&self, reason: &'static str) {
        debug_assert!(
            REJECT_REASONS.contains(&reason),
            "add {reason} to REJECT_REASONS"
        );
        self.rejected.get_or_create(&ReasonLabel { reason }).inc();
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_known_reason_is_exposed_at_zero_from_the_start() {
        let text = Metrics::new().encode();
        for reason in REJECT_REASONS {
            let series = format!("cellplane_router_rejected_total{{reason=\"{reason}\"}} 0");
            assert!(text.contains(&series), "{series} in {text}");
        }
        for reason in HANDOFF_REASONS {
            let series = format!("cellplane_router_http1_handoffs_total{{reason=\"{reason}\"}} 0");
            assert!(text.contains(&series), "{series}");
        }
        assert!(text.contains("cellplane_router_retries_total{reason=\"misdirected\"} 0"));
        assert!(text.contains("cellplane_router_health_transitions_total{reason=\"up\"} 0"));
    }
}
