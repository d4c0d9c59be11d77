//! `cellplane-cell-app`: the reference cell app. Store settings come from the env the
//! operator injects (`cellplane_cells::env`: CELL_NAME, REDIS_ADDR, MYSQL_ADDR, MYSQL_USER,
//! MYSQL_PASSWORD, MYSQL_DATABASE, KAFKA_BOOTSTRAP, ...); the routing table from etcd or a
//! file.

// A request allocates many small, short-lived buffers (HTTP heads, Redis and MySQL
// packets, JSON) on two worker threads; glibc's malloc spent ~12% of the app's CPU on a
// cache miss under load, part of it waiting on its arena locks.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

use anyhow::{bail, Context as _};
use cellplane_cell_app::config::AppConfig;
use cellplane_cell_app::http::App;
use cellplane_cell_app::landing::Landing;
use cellplane_cell_app::metrics::Metrics;
use cellplane_cell_app::orders::Orders;
use cellplane_cell_app::profiles::Profiles;
use cellplane_cell_app::stores::Stores;
use cellplane_cell_app::{consumer, schema};
use cellplane_cell_sdk::settings::CellSettings;
use cellplane_cells::failover_timing::FailoverTimings;
use cellplane_table::owner_lease::OwnerLease;
use cellplane_table::TableSource;
use cellplane_table::TableStore;
use clap::Parser;
use futures::FutureExt as _;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;
use tokio::task::JoinSet;

#[derive(Parser)]
#[command(version, about = "The cellplane reference cell app")]
struct Args {
    /// Address to serve HTTP on (in a pod the operator sets every interface).
    #[arg(long, env = cellplane_cells::env::CELL_LISTEN, default_value = "127.0.0.1:8080")]
    listen: SocketAddr,
    /// Follow the routing table in this file (static mode).
    #[arg(long, env = "CELL_TABLE_FILE")]
    table_file: Option<PathBuf>,
    /// Follow the routing table in etcd (comma-separated endpoints).
    #[arg(long, env = "CELL_ETCD", value_delimiter = ',')]
    etcd: Vec<String>,
    /// Platform name (etcd key prefix).
    #[arg(long, env = "CELL_PLATFORM", default_value = "cellplane")]
    platform: String,
    /// Bearer token for the admin routes (stock); unset disables them.
    #[arg(long, env = "CELL_ADMIN_TOKEN", hide_env_values = true)]
    admin_token: Option<String>,
    /// Consumer group of the order persister.
    #[arg(long, env = "CELL_ORDERS_GROUP", default_value = "orders-persister")]
    orders_group: String,
    /// Deadline of every store call, in milliseconds.
    #[arg(long, env = "CELL_STORE_TIMEOUT_MS", default_value_t = 800)]
    store_timeout_ms: u64,
    /// The ownership lease's TTL, renewal period and fence (see
    /// `cellplane_cells::failover_timing`; defaults there), in milliseconds. Must match the
    /// platform leader's.
    #[arg(long, env = "CELL_OWNER_LEASE_TTL_MS")]
    owner_lease_ttl_ms: Option<u64>,
    #[arg(long, env = "CELL_OWNER_RENEW_EVERY_MS")]
    owner_renew_every_ms: Option<u64>,
    #[arg(long, env = "CELL_FENCE_AFTER_MS")]
    fence_after_ms: Option<u64>,
    /// After this cell failed over, its orders are forwarded to the cell serving its users
    /// from this long before its log's last message (seconds): orders persisted here in the
    /// last moments may never have replicated.
    #[arg(long, env = "CELL_REPLAY_LOOKBACK_SECS", default_value_t = 60)]
    replay_lookback_secs: u64,
}

/// Where the routing table comes from: a file or the global etcd.
fn table_source(args: &Args) -> anyhow::Result<TableSource> {
    Ok(match (&args.table_file, args.etcd.is_empty()) {
        (Some(path), _) => TableSource::File {
            path: path.clone(),
            poll: Duration::from_millis(200),
        },
        (None, false) => TableSource::Etcd {
            endpoints: args.etcd.clone(),
            platform: args.platform.clone(),
        },
        (None, true) => bail!("no routing table source: pass --table-file (CELL_TABLE_FILE) or --etcd (CELL_ETCD); the app must know which users it owns"),
    })
}

/// The ownership lease's timings (the operator passes its own), checked against the
/// store deadline.
fn timings(args: &Args, cfg: &AppConfig) -> anyhow::Result<FailoverTimings> {
    let mut timings = FailoverTimings::default();
    timings.owner_lease_ttl_ms = args
        .owner_lease_ttl_ms
        .unwrap_or(timings.owner_lease_ttl_ms);
    timings.owner_renew_every_ms = args
        .owner_renew_every_ms
        .unwrap_or(timings.owner_renew_every_ms);
    timings.fence_after_ms = args.fence_after_ms.unwrap_or(timings.fence_after_ms);
    // A write starts its durable step (a profile's MySQL write, an order's Kafka produce)
    // only while the lease is fresh; the MySQL write takes at most one store deadline. An
    // order's produce may end later (message.timeout.ms) on the old home's own log, which
    // the platform replays into the new home when the region returns.
    timings
        .validate(cfg.store_timeout.as_millis() as u64)
        .context("the ownership lease's timings")?;
    Ok(timings)
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .json()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| "info,librdkafka=warn,rdkafka=warn".into()),
        )
        .init();
    let args = Args::parse();
    let settings = CellSettings::from_env()?;
    let source = table_source(&args)?;
    let cfg = AppConfig {
        store_timeout: Duration::from_millis(args.store_timeout_ms.clamp(50, 30_000)),
        admin_token: args.admin_token.clone().filter(|t| !t.is_empty()),
        orders_group: args.orders_group.clone(),
        ..AppConfig::default()
    };
    let timings = timings(&args, &cfg)?;
    tracing::info!(?settings, "starting");
    let stores =
        Arc::new(Stores::connect(&settings, cfg).context("connecting to the cell's stores")?);
    let metrics = Arc::new(Metrics::new());
    let tables = Arc::new(TableStore::new(None, metrics.table.clone()));
    if let Err(e) = source.refresh(&tables).await {
        tracing::warn!(error = %e, "no routing table yet; user requests get 503 until one arrives");
    }
    // A table from etcd: the cell takes writes only while it holds an ownership lease there.
    // The cell's long-running tasks: each must run for the life of the process. One that
    // ends on its own (an order persister that stopped persisting, a lease no longer
    // renewed) would leave an app that answers /readyz while part of it does nothing: the
    // process exits instead, naming it, and is restarted.
    let mut tasks: JoinSet<&'static str> = JoinSet::new();
    let owner_lease = match &source {
        TableSource::Etcd {
            endpoints,
            platform,
        } => {
            let lease = OwnerLease::new(timings, metrics.owner_lease.clone());
            stores.owner_lease.set(lease.clone()).ok();
            let run = lease
                .clone()
                .run(endpoints.clone(), platform.clone(), settings.cell.clone());
            tasks.spawn(run.map(|_| "ownership lease"));
            let replayer = cellplane_cell_app::replay::Replayer {
                stores: stores.clone(),
                metrics: metrics.clone(),
                tables: tables.clone(),
                endpoints: endpoints.clone(),
                platform: platform.clone(),
                lookback: Duration::from_secs(args.replay_lookback_secs),
            };
            tasks.spawn(replayer.run().map(|_| "order replay"));
            Some(lease)
        }
        TableSource::File { .. } => None,
    };
    tasks.spawn(
        source
            .follow(tables.clone())
            .map(|_| "routing table follower"),
    );
    // The schema is needed before the first request; wait for MySQL rather than serve errors.
    let mut backoff = Duration::from_millis(200);
    while let Err(e) = schema::ensure(&stores).await {
        tracing::warn!(error = %e, "MySQL not ready; retrying");
        tokio::time::sleep(backoff).await;
        backoff = (backoff * 2).min(Duration::from_secs(5));
    }
    let consumer = Arc::new(consumer::consumer(&stores).context("creating the order consumer")?);
    let persister = consumer::run(stores.clone(), metrics.clone(), consumer.clone());
    tasks.spawn(persister.map(|_| "order persister"));
    let profiles = Arc::new(Profiles::new(stores.clone(), metrics.clone()));
    let landing = Arc::new(Landing::default());
    let landing_task = cellplane_cell_app::landing::run(
        tables.clone(),
        stores.clone(),
        profiles.clone(),
        landing.clone(),
        metrics.clone(),
    );
    tasks.spawn(landing_task.map(|_| "landing"));
    let app = App {
        profiles,
        orders: Arc::new(Orders::new(stores.clone(), metrics.clone())),
        stores,
        metrics,
        tables,
        consumer,
        landing,
        owner_lease,
    };
    let listener = tokio::net::TcpListener::bind(args.listen)
        .await
        .with_context(|| format!("binding --listen {}", args.listen))?;
    tracing::info!(listen = %args.listen, "serving");
    let serve = axum::serve(listener, cellplane_cell_app::http::router(app))
        .with_graceful_shutdown(async {
            let _ = tokio::signal::ctrl_c().await;
        });
    tokio::select! {
        served = serve => served?,
        ended = tasks.join_next() => {
            let what = match ended {
                Some(Ok(name)) => format!("the {name} task ended on its own"),
                Some(Err(e)) => format!("a task failed: {e}"),
                None => "every task ended".to_string(),
            };
            anyhow::bail!("{what}; exiting so that the cell's app is restarted");
        }
    }
    Ok(())
}
