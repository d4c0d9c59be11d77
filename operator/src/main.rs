//! `cellplane-operator`: run the controllers, print the CRDs, or render a CellSet offline.

use anyhow::Context as _;
use axum::{extract::State, http::StatusCode, routing::get, Router};
use cellplane_cells::crd::CellSet;
use cellplane_cells::failover_timing::FailoverTimings;
use cellplane_operator::controller::{self, Context};
use cellplane_operator::leader::LeaderElector;
use cellplane_operator::metrics::Metrics;
use cellplane_operator::platform::agent::AgentConfig;
use cellplane_operator::platform::leader::PlatformConfig;
use cellplane_operator::registration::Registrar;
use cellplane_operator::supervisor::Supervisor;
use clap::{Parser, Subcommand};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

#[derive(Parser)]
#[command(
    name = "cellplane-operator",
    version,
    about = "Stamps out self-contained cells in one region"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the Cell and CellSet controllers.
    Run(Box<RunArgs>),
    /// Print the CRDs (YAML) that `crds/` holds.
    Crd,
    /// Render a CellSet file offline: its cells, standby pairs and slot placement.
    Render {
        /// A CellSet YAML file.
        file: PathBuf,
        /// Print only this user's slot and home cell.
        #[arg(long)]
        user: Option<String>,
    },
}

#[derive(clap::Args)]
struct RunArgs {
    /// Watch only this namespace (default: all).
    #[arg(long, env = "CELLPLANE_NAMESPACE")]
    namespace: Option<String>,
    /// The region this operator runs in; only its cells get workloads.
    #[arg(long, env = "CELLPLANE_REGION")]
    region: Option<String>,
    /// etcd endpoints for cell registration (comma-separated); none disables registration.
    #[arg(long, env = "CELLPLANE_ETCD_ENDPOINTS", value_delimiter = ',')]
    etcd_endpoints: Vec<String>,
    /// Registration lease TTL in seconds: how long a region cut off from the global etcd
    /// stays registered, i.e. how soon its cells are found lost.
    #[arg(long, env = "CELLPLANE_REGISTRATION_TTL", default_value_t = FailoverTimings::default().registration_ttl_ms / 1000)]
    registration_ttl: u64,
    /// Address of /healthz, /readyz and /metrics.
    #[arg(long, env = "CELLPLANE_HTTP_ADDR", default_value = "0.0.0.0:8080")]
    http_addr: SocketAddr,
    /// Namespace of the leader-election Lease (default: the pod's namespace, else "default").
    #[arg(long, env = "POD_NAMESPACE", default_value = "default")]
    lease_namespace: String,
    /// Name of the leader-election Lease.
    #[arg(
        long,
        env = "CELLPLANE_LEASE_NAME",
        default_value = "cellplane-operator"
    )]
    lease_name: String,
    /// This replica's identity in the Lease (default: hostname + pid).
    #[arg(long, env = "POD_NAME")]
    identity: Option<String>,
    /// Lease duration in seconds: how long a dead leader blocks a takeover.
    #[arg(long, default_value_t = 15)]
    lease_duration: u64,
    /// Campaign for the platform controller of this platform (the leader across regions
    /// that writes the routing table); needs --etcd-endpoints. Unset: this operator only
    /// runs its region's cells.
    #[arg(long, env = "CELLPLANE_PLATFORM")]
    platform: Option<String>,
    /// Platform leader lease in seconds: how long a dead platform leader blocks a takeover.
    #[arg(long, env = "CELLPLANE_PLATFORM_LEASE", default_value_t = 5)]
    platform_lease: u64,
    /// How often the platform leader re-reads its inputs without a change event (ms).
    #[arg(long, env = "CELLPLANE_PLATFORM_RESYNC_MS", default_value_t = 2000)]
    platform_resync_ms: u64,
    /// The platform secret (a file, the same in every region) from which each cell's
    /// replication password is derived; without it this region sets up no replication.
    #[arg(long, env = "CELLPLANE_REPLICATION_SECRET_FILE")]
    replication_secret_file: Option<PathBuf>,
    /// How often this region carries out its cells' intents and reports their MySQL (ms).
    #[arg(long, env = "CELLPLANE_AGENT_INTERVAL_MS", default_value_t = 500)]
    agent_interval_ms: u64,
    /// Fail a lost cell over to its standby without asking a person (the leader does it
    /// after --failover-grace-ms; at most once per cell per --no-flap-window-secs). Off:
    /// `cellplane failover CELL --emergency` asks for it.
    #[arg(long, env = "CELLPLANE_AUTO_FAILOVER", default_value_t = true, action = clap::ArgAction::Set)]
    auto_failover: bool,
    /// After an unplanned failover, bring the cell's users back to it by itself once its old
    /// home has stayed healthy for --failback-stabilization-secs (a planned, zero-loss
    /// failback). Off: `cellplane failback CELL` after the same window.
    #[arg(long, env = "CELLPLANE_AUTO_FAILBACK", default_value_t = false, action = clap::ArgAction::Set)]
    auto_failback: bool,
    /// How long the old home of a cell failed over unplanned must stay healthy before it
    /// fails back (seconds).
    #[arg(long, env = "CELLPLANE_FAILBACK_STABILIZATION_SECS", default_value_t = cellplane_operator::platform::operations::DEFAULT_STABILIZATION_MS / 1000)]
    failback_stabilization_secs: u64,
    /// How long a cell must stay lost before the leader fails it over (ms).
    #[arg(long, env = "CELLPLANE_FAILOVER_GRACE_MS", default_value_t = FailoverTimings::default().grace_ms)]
    failover_grace_ms: u64,
    /// No second automatic failover of a cell within this window (seconds).
    #[arg(long, env = "CELLPLANE_NO_FLAP_WINDOW_SECS", default_value_t = FailoverTimings::default().no_flap_window_ms / 1000)]
    no_flap_window_secs: u64,
    /// The apps' ownership lease TTL and fence, and the leader's margin after the last
    /// lease of a lost cell expired (ms); the apps must be given the same TTL and fence
    /// (CELL_OWNER_LEASE_TTL_MS, CELL_FENCE_AFTER_MS). Defaults and the safety argument:
    /// `cellplane_cells::failover_timing`.
    #[arg(long, env = "CELLPLANE_OWNER_LEASE_TTL_MS", default_value_t = FailoverTimings::default().owner_lease_ttl_ms)]
    owner_lease_ttl_ms: u64,
    #[arg(long, env = "CELLPLANE_FENCE_AFTER_MS", default_value_t = FailoverTimings::default().fence_after_ms)]
    fence_after_ms: u64,
    #[arg(long, env = "CELLPLANE_EXPIRY_MARGIN_MS", default_value_t = FailoverTimings::default().expiry_margin_ms)]
    expiry_margin_ms: u64,
    /// Where this region exports the errant transactions of an old home that returned after
    /// an emergency failover, before rebuilding it (mount a persistent volume here).
    #[arg(
        long,
        env = "CELLPLANE_EXPORT_DIR",
        default_value = "/var/lib/cellplane/exports"
    )]
    export_dir: PathBuf,
    /// Serve the live topology page (`/console`) on --http-addr, its data behind this bearer
    /// token (a file; at least 16 bytes). Needs --platform. Unset: no page.
    #[arg(long, env = "CELLPLANE_CONSOLE_TOKEN_FILE")]
    console_token_file: Option<PathBuf>,
    /// Routing tables kept in etcd under routing-history/.
    #[arg(long, default_value_t = cellplane_table::write::DEFAULT_HISTORY)]
    routing_history: u64,
}

fn init_tracing() {
    use tracing_subscriber::{fmt, EnvFilter};
    let filter =
        EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info,kube=warn"));
    fmt()
        .json()
        .with_env_filter(filter)
        .with_current_span(false)
        .init();
}

struct Health {
    metrics: Arc<Metrics>,
    ready: AtomicBool,
}

async fn serve_http(
    addr: SocketAddr,
    health: Arc<Health>,
    console: Option<Arc<cellplane_operator::console::Console>>,
) -> anyhow::Result<()> {
    let mut app = Router::new()
        .route("/healthz", get(|| async { "ok" }))
        .route(
            "/readyz",
            get(|State(h): State<Arc<Health>>| async move {
                if h.ready.load(Ordering::Relaxed) {
                    (StatusCode::OK, "ready")
                } else {
                    (StatusCode::SERVICE_UNAVAILABLE, "starting")
                }
            }),
        )
        .route(
            "/metrics",
            get(|State(h): State<Arc<Health>>| async move {
                (
                    [(
                        axum::http::header::CONTENT_TYPE,
                        cellplane_table::metrics::OPENMETRICS_CONTENT_TYPE,
                    )],
                    h.metrics.encode(),
                )
            }),
        )
        .with_state(health);
    if let Some(c) = console {
        app = app.merge(c.routes());
    }
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .with_context(|| format!("binding --http-addr {addr}"))?;
    axum::serve(listener, app).await?;
    Ok(())
}

/// A secret from a file (trimmed), refused when shorter than 16 bytes.
fn read_secret(flag: &str, path: &std::path::Path) -> anyhow::Result<Vec<u8>> {
    let bytes =
        std::fs::read(path).with_context(|| format!("reading {flag} {}", path.display()))?;
    let secret = String::from_utf8_lossy(&bytes).trim().as_bytes().to_vec();
    anyhow::ensure!(
        secret.len() >= 16,
        "{flag} {} holds {} bytes; use at least 16 random bytes (e.g. openssl rand -hex 32)",
        path.display(),
        secret.len()
    );
    Ok(secret)
}

async fn shutdown_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
            .expect("SIGTERM handler");
        tokio::select! { _ = ctrl_c => {}, _ = term.recv() => {} }
    }
    #[cfg(not(unix))]
    let _ = ctrl_c.await;
}

async fn run(args: RunArgs) -> anyhow::Result<()> {
    let metrics = Arc::new(Metrics::new());
    let client = kube_client(&metrics).await?;
    let health = Arc::new(Health {
        metrics: metrics.clone(),
        ready: AtomicBool::new(false),
    });
    let http = tokio::spawn(serve_http(args.http_addr, health.clone(), console(&args)?));
    let identity = args.identity.clone().unwrap_or_else(|| {
        let host = std::fs::read_to_string("/etc/hostname")
            .map(|h| h.trim().to_string())
            .unwrap_or_else(|_| "operator".into());
        format!("{host}-{}", std::process::id())
    });
    let elector = LeaderElector::new(
        kube::Api::namespaced(client.clone(), &args.lease_namespace),
        &args.lease_name,
        &identity,
        Duration::from_secs(args.lease_duration.max(3)),
    );
    // A follower is healthy and ready (it serves probes), it just does not reconcile.
    health.ready.store(true, Ordering::Relaxed);
    let timings = timings(&args)?;
    let registrar = if args.etcd_endpoints.is_empty() {
        tracing::warn!("no --etcd-endpoints: cells will not be registered");
        None
    } else {
        let ttl = Duration::from_secs(args.registration_ttl);
        Some(
            Registrar::connect(&args.etcd_endpoints, ttl)
                .await
                .context("connecting to etcd (--etcd-endpoints)")?,
        )
    };
    let platform = platform_config(&args, &identity, &timings)?;
    let agent = match (&platform, &args.region, &registrar) {
        (Some(p), Some(region), Some(reg)) => Some((
            agent_config(&args, p, region, &timings, &metrics)?,
            reg.clone(),
        )),
        _ => None,
    };
    let ctx = Arc::new(Context {
        etcd_endpoints: args.etcd_endpoints.clone(),
        timings: timings.clone(),
        ..Context::new(
            client.clone(),
            metrics.clone(),
            registrar,
            args.region.clone(),
        )
    });
    let shutdown = shutdown_signal();
    tokio::pin!(shutdown);
    tokio::pin!(http);
    // Lead, and when leadership is lost (e.g. the API server was unreachable for longer
    // than the lease), stop reconciling and stand by again: never two leaders, and no
    // restart needed when the API server comes back.
    loop {
        tracing::info!(%identity, lease = %args.lease_name, "waiting for leadership");
        tokio::select! {
            r = elector.acquire() => r?,
            _ = &mut shutdown => break,
        }
        metrics.leader.set(1);
        tracing::info!(%identity, "leading");
        let mut term = start_term(&ctx, &args, &client, platform.clone(), agent.clone());
        let lost = tokio::select! {
            _ = elector.hold() => true,
            _ = &mut shutdown => false,
            r = &mut http => { r??; false }
            task = term.ended() => {
                // Holding the lease while doing nothing is worse than restarting.
                health.ready.store(false, Ordering::Relaxed);
                metrics.leader.set(0);
                term.stop(Duration::from_secs(5)).await;
                elector.release().await;
                anyhow::bail!("the {task} ended on its own while this operator leads its region; exiting so that it is restarted");
            }
        };
        metrics.leader.set(0);
        term.stop(Duration::from_secs(20)).await;
        if !lost {
            break;
        }
        tracing::warn!(%identity, "stepped down; standing by");
    }
    elector.release().await;
    tracing::info!("shut down cleanly");
    Ok(())
}

/// The Kubernetes client, every request counted by verb (`api_requests_total`).
async fn kube_client(metrics: &Metrics) -> anyhow::Result<kube::Client> {
    let config = kube::Config::infer()
        .await
        .context("connecting to the Kubernetes API (kubeconfig or in-cluster)")?;
    let requests = metrics.api_requests.clone();
    let count = tower::util::MapRequestLayer::new(move |req: http::Request<kube::client::Body>| {
        let verb = cellplane_operator::metrics::api_verb(&req);
        requests
            .get_or_create(&cellplane_operator::metrics::VerbLabel { verb })
            .inc();
        req
    });
    Ok(kube::client::ClientBuilder::try_from(config)
        .context("building the Kubernetes client")?
        .with_layer(&count)
        .build())
}

/// The topology page, when a token file is given.
fn console(args: &RunArgs) -> anyhow::Result<Option<Arc<cellplane_operator::console::Console>>> {
    match (&args.console_token_file, &args.platform) {
        (Some(path), Some(platform)) => {
            let token = read_secret("--console-token-file", path)?;
            Ok(Some(Arc::new(cellplane_operator::console::Console::new(
                platform,
                &args.etcd_endpoints,
                String::from_utf8_lossy(&token).into_owned(),
            ))))
        }
        (Some(_), None) => {
            anyhow::bail!("--console-token-file needs --platform (the page shows that platform)")
        }
        (None, _) => Ok(None),
    }
}

/// The unplanned failover's timings from the flags, refused when unsafe.
fn timings(args: &RunArgs) -> anyhow::Result<FailoverTimings> {
    let timings = FailoverTimings {
        owner_lease_ttl_ms: args.owner_lease_ttl_ms,
        fence_after_ms: args.fence_after_ms,
        registration_ttl_ms: args.registration_ttl * 1000,
        expiry_margin_ms: args.expiry_margin_ms,
        grace_ms: args.failover_grace_ms,
        no_flap_window_ms: args.no_flap_window_secs * 1000,
        ..FailoverTimings::default()
    };
    // The reference app's store deadline bounds how long an admitted write may take.
    timings
        .validate(800)
        .context("the failover timings (--owner-lease-ttl-ms, --fence-after-ms, --expiry-margin-ms, --registration-ttl)")?;
    Ok(timings)
}

/// The platform controller's settings, with `--platform`.
fn platform_config(
    args: &RunArgs,
    identity: &str,
    timings: &FailoverTimings,
) -> anyhow::Result<Option<PlatformConfig>> {
    match (&args.platform, args.etcd_endpoints.is_empty()) {
        (Some(_), true) => anyhow::bail!(
            "--platform needs --etcd-endpoints: the platform controller lives in the global etcd"
        ),
        (Some(p), false) => Ok(Some(PlatformConfig {
            platform: p.clone(),
            etcd_endpoints: args.etcd_endpoints.clone(),
            identity: format!("{}/{identity}", args.region.as_deref().unwrap_or("-")),
            lease: Duration::from_secs(args.platform_lease.max(2)),
            resync: Duration::from_millis(args.platform_resync_ms.max(100)),
            history: args.routing_history.max(1),
            timings: timings.clone(),
            auto_failover: args.auto_failover,
            auto_failback: args.auto_failback,
            stabilization: Duration::from_secs(args.failback_stabilization_secs),
        })),
        (None, _) => Ok(None),
    }
}

/// The region side of the platform: carries out this region's cells' intents.
fn agent_config(
    args: &RunArgs,
    platform: &PlatformConfig,
    region: &str,
    timings: &FailoverTimings,
    metrics: &Arc<Metrics>,
) -> anyhow::Result<AgentConfig> {
    let replication_secret = match &args.replication_secret_file {
        Some(path) => Some(Arc::new(read_secret("--replication-secret-file", path)?)),
        None => None,
    };
    Ok(AgentConfig {
        platform: platform.platform.clone(),
        region: region.to_string(),
        etcd_endpoints: args.etcd_endpoints.clone(),
        interval: Duration::from_millis(args.agent_interval_ms.max(50)),
        replication_secret,
        fence_after: timings.fence_after(),
        export_dir: args.export_dir.clone(),
        metrics: metrics.clone(),
    })
}

/// One term as the region's leader: the controllers, the platform campaign and the
/// region agent, supervised and stopped together when the term ends.
fn start_term(
    ctx: &Arc<Context>,
    args: &RunArgs,
    client: &kube::Client,
    platform: Option<PlatformConfig>,
    agent: Option<(AgentConfig, Registrar)>,
) -> Supervisor {
    let mut term = Supervisor::default();
    let ns = args.namespace.clone();
    let stopped = term.stopped();
    term.spawn(
        "Cell controller",
        controller::cell::run(ctx.clone(), ns.clone(), stopped),
    );
    let stopped = term.stopped();
    term.spawn(
        "CellSet controller",
        controller::cellset::run(ctx.clone(), ns, stopped),
    );
    // The region's leader campaigns for the platform; it stops with the region's term.
    if let Some(cfg) = platform {
        let stopped = term.stopped();
        let metrics = ctx.metrics.clone();
        let task = cellplane_operator::platform::leader::run(cfg, client.clone(), metrics, stopped);
        term.spawn("platform controller", task);
    }
    if let Some((cfg, reg)) = agent {
        let stopped = term.stopped();
        let task = cellplane_operator::platform::agent::run(cfg, client.clone(), reg, stopped);
        term.spawn("region agent", task);
    }
    term
}

fn print_crds() -> anyhow::Result<()> {
    print!("{}", cellplane_operator::crds_yaml()?);
    Ok(())
}

fn render(file: &PathBuf, user: Option<&str>) -> anyhow::Result<()> {
    let text =
        std::fs::read_to_string(file).with_context(|| format!("reading {}", file.display()))?;
    let set: CellSet = serde_yaml::from_str(&text)
        .with_context(|| format!("{} is not a valid CellSet", file.display()))?;
    if let Some(user) = user {
        let placement = cellplane_operator::build::cellset::placement(&set)?
            .context("the CellSet has no cells")?;
        let slot = cellplane_cells::slot::slot_for_key(user, cellplane_cells::slot::DEFAULT_SLOTS);
        println!("slot {slot:>5} -> {}", placement.owner_of(slot));
        return Ok(());
    }
    let counts = cellplane_operator::build::cellset::placement_counts(&set)?;
    let cells = set.spec.stamp(&kube::ResourceExt::name_any(&set));
    println!(
        "{:<28} {:<10} {:<28} {:>6} {:>7}",
        "CELL", "REGION", "STANDBY", "SLOTS", "SHARE"
    );
    for c in &cells {
        let slots = counts.get(&c.name).copied().unwrap_or(0);
        println!(
            "{:<28} {:<10} {:<28} {:>6} {:>6.1}%",
            c.name,
            c.spec.region,
            c.spec
                .standby
                .as_ref()
                .map(|s| s.cell.as_str())
                .unwrap_or("-"),
            slots,
            100.0 * f64::from(slots) / f64::from(cellplane_cells::slot::DEFAULT_SLOTS)
        );
    }
    Ok(())
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    match cli.command {
        Command::Crd => print_crds(),
        Command::Render { file, user } => render(&file, user.as_deref()),
        Command::Run(args) => {
            init_tracing();
            run(*args).await
        }
    }
}
