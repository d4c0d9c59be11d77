//! Prometheus metrics of the reconcilers: counts, errors by kind, durations.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ControllerLabel {
    pub controller: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ErrorLabel {
    pub controller: &'static str,
    pub error: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct PhaseLabel {
    pub phase: &'static str,
    pub ready: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct OperationLabels {
    pub kind: &'static str,
    /// `succeeded`, `refused` or `rolled_back`.
    pub outcome: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReplicaLabels {
    pub cell: String,
    /// The cell it replicates.
    pub source: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct CellLabel {
    pub cell: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct VerbLabel {
    pub verb: &'static str,
}

/// The Kubernetes API verb of a request, from its method and query (a GET with
/// `watch=true` is a watch).
pub fn api_verb<B>(req: &http::Request<B>) -> &'static str {
    let watch = req
        .uri()
        .query()
        .is_some_and(|q| q.split('&').any(|p| p == "watch=true" || p == "watch=1"));
    match *req.method() {
        http::Method::GET if watch => "watch",
        http::Method::GET => "get",
        http::Method::POST => "create",
        http::Method::PUT => "update",
        http::Method::PATCH => "patch",
        http::Method::DELETE => "delete",
        _ => "other",
    }
}

pub struct Metrics {
    pub reconciles: Family<ControllerLabel, Counter>,
    /// Requests this operator sent to the Kubernetes API, by verb.
    pub api_requests: Family<VerbLabel, Counter>,
    pub errors: Family<ErrorLabel, Counter>,
    pub duration: Family<ControllerLabel, Histogram>,
    pub leader: Gauge<i64, std::sync::atomic::AtomicI64>,
    /// Cells this operator runs, by the phase and readiness it last wrote.
    pub cells: Family<PhaseLabel, Gauge<i64, std::sync::atomic::AtomicI64>>,
    /// The phase and readiness last written per cell (namespace/name), so the gauge
    /// moves by one on each change.
    cell_states: parking_lot::Mutex<std::collections::HashMap<String, PhaseLabel>>,
    /// 1 while this operator is the platform controller (leader across regions).
    pub platform_leader: Gauge<i64, std::sync::atomic::AtomicI64>,
    /// Terms won in the platform election.
    pub platform_terms: Counter,
    /// Routing tables written by compare-and-swap.
    pub table_writes: Counter,
    /// Compare-and-swaps lost to a concurrent writer (re-read and decided again).
    pub table_conflicts: Counter,
    /// Times the inputs gave no valid table (the table in force was kept).
    pub table_plan_errors: Counter,
    /// Operations this leader brought to an end, by kind and outcome.
    pub operations_finished: Family<OperationLabels, Counter>,
    /// This region's cells (its agent measures them): replication lag per connection in
    /// transactions and seconds, and health (1 healthy).
    pub replica_lag_transactions: Family<ReplicaLabels, Gauge<i64, std::sync::atomic::AtomicI64>>,
    pub replica_lag_seconds: Family<ReplicaLabels, Gauge<i64, std::sync::atomic::AtomicI64>>,
    pub cell_healthy: Family<CellLabel, Gauge<i64, std::sync::atomic::AtomicI64>>,
    /// Cells the leader sees lost now (no ownership lease, region gone or unhealthy).
    pub cells_lost: Gauge<i64, std::sync::atomic::AtomicI64>,
    /// Unplanned failovers this leader started by itself.
    pub failovers_started: Counter,
    /// Epoch of the last table this operator wrote.
    pub table_epoch: Gauge<i64, std::sync::atomic::AtomicI64>,
    pub registry: Registry,
}

impl Metrics {
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("cellplane_operator");
        let reconciles = Family::<ControllerLabel, Counter>::default();
        let errors = Family::<ErrorLabel, Counter>::default();
        let duration = Family::<ControllerLabel, Histogram>::new_with_constructor(|| {
            Histogram::new(exponential_buckets(0.005, 2.0, 12))
        });
        let leader = Gauge::<i64, std::sync::atomic::AtomicI64>::default();
        let api_requests = Family::<VerbLabel, Counter>::default();
        registry.register("reconciles", "Reconciliations run", reconciles.clone());
        registry.register(
            "api_requests",
            "Requests sent to the Kubernetes API, by verb",
            api_requests.clone(),
        );
        registry.register(
            "reconcile_errors",
            "Reconciliations that failed, by error kind",
            errors.clone(),
        );
        registry.register(
            "reconcile_duration_seconds",
            "Time per reconciliation",
            duration.clone(),
        );
        registry.register("leader", "1 while this replica leads", leader.clone());
        let cells = Family::<PhaseLabel, Gauge<i64, std::sync::atomic::AtomicI64>>::default();
        registry.register(
            "cells",
            "Cells this operator runs, by the phase and readiness it last wrote to their status",
            cells.clone(),
        );
        let platform_leader = Gauge::<i64, std::sync::atomic::AtomicI64>::default();
        let table_epoch = Gauge::<i64, std::sync::atomic::AtomicI64>::default();
        let [platform_terms, table_writes, table_conflicts, table_plan_errors, failovers_started] =
            std::array::from_fn(|_| Counter::default());
        let operations_finished = Family::<OperationLabels, Counter>::default();
        let replica_lag_transactions = Family::default();
        let replica_lag_seconds = Family::default();
        let cell_healthy = Family::default();
        registry.register(
            "replica_lag_transactions",
            "Transactions a cell's MySQL still has to apply from the cell it replicates (this region's cells)",
            replica_lag_transactions.clone(),
        );
        registry.register(
            "replica_lag_seconds",
            "Seconds a cell's MySQL is behind the cell it replicates (Seconds_Behind_Master; this region's cells)",
            replica_lag_seconds.clone(),
        );
        registry.register(
            "cell_healthy",
            "1 while a cell of this region answers ready (its stores and a table), else 0",
            cell_healthy.clone(),
        );
        let cells_lost = Gauge::<i64, std::sync::atomic::AtomicI64>::default();
        registry.register(
            "cells_lost",
            "Cells the platform leader sees lost now (no ownership lease; region gone, unhealthy or seen down by routers)",
            cells_lost.clone(),
        );
        registry.register(
            "failovers_started",
            "Unplanned failovers the platform leader started by itself",
            failovers_started.clone(),
        );
        registry.register(
            "operations_finished",
            "Operations (switchovers, failbacks, failovers) brought to an end by this leader, by kind and outcome",
            operations_finished.clone(),
        );
        registry.register(
            "platform_leader",
            "1 while this operator is the platform controller across regions",
            platform_leader.clone(),
        );
        registry.register(
            "platform_terms",
            "Terms won in the platform election",
            platform_terms.clone(),
        );
        registry.register(
            "routing_table_writes",
            "Routing tables written by compare-and-swap",
            table_writes.clone(),
        );
        registry.register(
            "routing_table_conflicts",
            "Compare-and-swaps of the routing table lost to a concurrent writer",
            table_conflicts.clone(),
        );
        registry.register(
            "routing_table_plan_errors",
            "Times the inputs gave no valid routing table (the table in force was kept)",
            table_plan_errors.clone(),
        );
        registry.register(
            "routing_table_epoch",
            "Epoch of the last routing table this operator wrote",
            table_epoch.clone(),
        );
        Self {
            reconciles,
            api_requests,
            errors,
            duration,
            leader,
            cells,
            cell_states: Default::default(),
            platform_leader,
            platform_terms,
            table_writes,
            table_conflicts,
            table_plan_errors,
            operations_finished,
            replica_lag_transactions,
            replica_lag_seconds,
            cell_healthy,
            cells_lost,
            failovers_started,
            table_epoch,
            registry,
        }
    }

    /// Times one reconciliation; call `.done(result)` at the end.
    pub fn start(&self, controller: &'static str) -> ReconcileTimer<'_> {
        self.reconciles
            .get_or_create(&ControllerLabel { controller })
            .inc();
        ReconcileTimer {
            metrics: self,
            controller,
            start: std::time::Instant::now(),
        }
    }

    /// Records the phase and readiness written for `cell` (None: the cell is gone).
    pub fn cell_state(&self, cell: &str, state: Option<PhaseLabel>) {
        let mut states = self.cell_states.lock();
        let before = match &state {
            Some(s) => states.insert(cell.to_string(), s.clone()),
            None => states.remove(cell),
        };
        if before == state {
            return;
        }
        if let Some(b) = before {
            self.cells.get_or_create(&b).dec();
        }
        if let Some(s) = state {
            self.cells.get_or_create(&s).inc();
        }
    }

    pub fn encode(&self) -> String {
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, &self.registry)
            .expect("encoding to a String cannot fail");
        out
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

pub struct ReconcileTimer<'a> {
    metrics: &'a Metrics,
    controller: &'static str,
    start: std::time::Instant,
}

impl ReconcileTimer<'_> {
    pub fn done<T>(self, result: &crate::Result<T>) {
        self.metrics
            .duration
            .get_or_create(&ControllerLabel {
                controller: self.controller,
            })
            .observe(self.start.elapsed().as_secs_f64());
        if let Err(e) = result {
            self.metrics
                .errors
                .get_or_create(&ErrorLabel {
                    controller: self.controller,
                    error: e.metric_label(),
                })
                .inc();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_errors_by_kind() {
        let m = Metrics::new();
        m.start("cell")
            .done::<()>(&Err(crate::Error::InvalidSpec("x".into())));
        m.start("cell").done(&Ok(()));
        let text = m.encode();
        assert!(
            text.contains("cellplane_operator_reconciles_total{controller=\"cell\"} 2"),
            "{text}"
        );
        assert!(text.contains("error=\"invalid_spec\"} 1"), "{text}");
    }

    #[test]
    fn requests_are_named_by_their_api_verb() {
        let req = |method: &str, uri: &str| {
            http::Request::builder()
                .method(method)
                .uri(uri)
                .body(())
                .unwrap()
        };
        assert_eq!(
            api_verb(&req("GET", "/api/v1/namespaces/d/secrets/x")),
            "get"
        );
        assert_eq!(
            api_verb(&req(
                "GET",
                "/apis/cellplane.io/v1alpha1/cells?watch=true&resourceVersion=5"
            )),
            "watch"
        );
        assert_eq!(
            api_verb(&req("GET", "/api/v1/pods?labelSelector=watch%3Dtrue")),
            "get"
        );
        assert_eq!(
            api_verb(&req("PATCH", "/apis/apps/v1/namespaces/d/deployments/x")),
            "patch"
        );
        assert_eq!(
            api_verb(&req("POST", "/api/v1/namespaces/d/secrets")),
            "create"
        );
        assert_eq!(
            api_verb(&req(
                "PUT",
                "/apis/coordination.k8s.io/v1/namespaces/d/leases/l"
            )),
            "update"
        );
        assert_eq!(
            api_verb(&req(
                "DELETE",
                "/apis/cellplane.io/v1alpha1/namespaces/d/cells/c"
            )),
            "delete"
        );
    }

    #[test]
    fn cells_by_phase_move_by_one_per_change_and_vanish_with_the_cell() {
        let m = Metrics::new();
        let pending = PhaseLabel {
            phase: "Pending",
            ready: "false",
        };
        let active = PhaseLabel {
            phase: "Active",
            ready: "true",
        };
        m.cell_state("ns/a", Some(pending.clone()));
        m.cell_state("ns/b", Some(pending.clone()));
        m.cell_state("ns/a", Some(pending.clone()));
        assert_eq!(
            m.cells.get_or_create(&pending).get(),
            2,
            "a repeated state counts once"
        );
        m.cell_state("ns/a", Some(active.clone()));
        assert_eq!(m.cells.get_or_create(&pending).get(), 1);
        assert_eq!(m.cells.get_or_create(&active).get(), 1);
        m.cell_state("ns/a", None);
        m.cell_state("ns/zz", None);
        assert_eq!(m.cells.get_or_create(&active).get(), 0);
        assert!(m
            .encode()
            .contains("cellplane_operator_cells{phase=\"Pending\",ready=\"false\"} 1"));
    }
}
