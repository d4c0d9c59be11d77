//! The router's shared state: configuration, the followed table, endpoint health, limits,
//! metrics, upstream connections, and the per-table `View` the hot path reads.

use crate::config::Config;
use crate::endpoints::{EndpointState, Endpoints};
use crate::limits::budget::RetryBudget;
use crate::limits::hold::Holds;
use crate::limits::rate::{Limiter, Rate, SharedBucket};
use crate::metrics::{CellLabel, Metrics, RequestLabels};
use crate::outage::{OutageTracker, Outages};
use crate::upstream::pool::{Idle, Pools};
use crate::upstream::HyperClients;
use arc_swap::ArcSwapOption;
use cellplane_cells::routing::RoutingTable;
use cellplane_table::{TableSource, TableStore};
use http::header::HeaderValue;
use http::uri::Authority;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::histogram::Histogram;
use std::sync::Arc;

/// What the hot path needs about one routing table, resolved once when the table changes:
/// endpoint handles, idle-connection pools, URI authorities, header values and metric
/// handles per cell.
pub struct View {
    pub table: Arc<RoutingTable>,
    pub(crate) cells: Vec<CellView>,
}

pub(crate) struct CellView {
    pub endpoints: Vec<Arc<EndpointState>>,
    pub pools: Vec<Arc<Idle>>,
    pub authorities: Vec<Option<Authority>>,
    pub name_header: HeaderValue,
    /// Requests by status class: 1xx..5xx.
    pub requests: [Counter; 5],
    pub latency: Histogram,
    pub ejections: Counter,
    /// The outages this cell's users saw (by data home), kept across views.
    pub outage: Arc<OutageTracker>,
}

impl View {
    fn build(
        table: Arc<RoutingTable>,
        endpoints: &Endpoints,
        pools: &Pools,
        outages: &Outages,
        m: &Metrics,
    ) -> Self {
        let cells = table
            .cells
            .iter()
            .map(|c| {
                let cell = CellLabel {
                    cell: c.name.clone(),
                };
                CellView {
                    endpoints: c.endpoints.iter().map(|a| endpoints.state(a)).collect(),
                    pools: c.endpoints.iter().map(|a| pools.of(a)).collect(),
                    authorities: c.endpoints.iter().map(|a| a.parse().ok()).collect(),
                    name_header: HeaderValue::from_str(&c.name)
                        .unwrap_or_else(|_| HeaderValue::from_static("invalid")),
                    requests: ["1xx", "2xx", "3xx", "4xx", "5xx"].map(|class| {
                        m.requests
                            .get_or_create(&RequestLabels {
                                cell: c.name.clone(),
                                class,
                            })
                            .clone()
                    }),
                    latency: m.latency.get_or_create(&cell).clone(),
                    ejections: m.ejections.get_or_create(&cell).clone(),
                    outage: outages.of(&c.name),
                }
            })
            .collect();
        Self { table, cells }
    }
}

pub struct Router {
    pub config: Config,
    pub tables: Arc<TableStore>,
    pub source: TableSource,
    pub endpoints: Endpoints,
    pub pools: Pools,
    pub limiter: Limiter,
    pub retry_budget: RetryBudget,
    /// Cells held through the admin API.
    pub holds: Holds,
    /// What each cell's users saw fail (published with the acknowledgements).
    pub outages: Outages,
    access_log: Option<SharedBucket>,
    pub metrics: Arc<Metrics>,
    view: ArcSwapOption<View>,
    pub hyper: HyperClients,
}

impl Router {
    pub fn new(
        config: Config,
        tables: Arc<TableStore>,
        source: TableSource,
        metrics: Arc<Metrics>,
    ) -> crate::Result<Self> {
        let limiter = Limiter::new(
            config.global_rate()?,
            config.per_key_rate()?,
            config.limits.max_tracked_keys,
        );
        let per_sec = config.limits.access_log_per_sec;
        let access_log = (per_sec > 0.0).then(|| {
            SharedBucket::new(Rate {
                per_second: per_sec,
                burst: per_sec.max(1.0),
            })
        });
        Ok(Self {
            endpoints: Endpoints::new(config.ejection_policy()),
            pools: Pools::default(),
            retry_budget: RetryBudget::new(
                config.limits.retry_budget_ratio,
                config.limits.retry_budget_min_per_sec,
            ),
            hyper: HyperClients::new(config.timeouts.connect_ms, config.timeouts.idle_ms),
            config,
            tables,
            source,
            limiter,
            holds: Default::default(),
            outages: Outages::default(),
            access_log,
            metrics,
            view: ArcSwapOption::empty(),
        })
    }

    /// Whether this request may be written to the access log (a bounded rate).
    pub fn may_log(&self) -> bool {
        // Not even the rate limiter's lock when access lines would be filtered out anyway.
        if !tracing::enabled!(target: "access", tracing::Level::INFO) {
            return false;
        }
        self.access_log
            .as_ref()
            .is_some_and(|b| b.take(tokio::time::Instant::now()).is_ok())
    }

    /// The view of the current table, rebuilt when the table changed.
    pub fn view(&self) -> Option<Arc<View>> {
        let table = self.tables.get()?;
        if let Some(v) = self
            .view
            .load_full()
            .filter(|v| Arc::ptr_eq(&v.table, &table))
        {
            return Some(v);
        }
        let v = Arc::new(View::build(
            table,
            &self.endpoints,
            &self.pools,
            &self.outages,
            &self.metrics,
        ));
        self.view.store(Some(v.clone()));
        Some(v)
    }

    /// Each cell's (requests answered, of them 5xx) since the router started, from the
    /// same counters as `cellplane_router_requests_total`.
    pub fn cell_counts(&self) -> std::collections::BTreeMap<String, (u64, u64)> {
        let Some(view) = self.view() else {
            return Default::default();
        };
        view.table
            .cells
            .iter()
            .zip(&view.cells)
            .map(|(c, cv)| {
                let requests = cv.requests.iter().map(|n| n.get()).sum();
                (c.name.clone(), (requests, cv.requests[4].get()))
            })
            .collect()
    }
}
