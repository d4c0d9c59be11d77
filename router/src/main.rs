//! `cellplane-router`: the edge router. `cellplane-router --config router.yaml`.

// The proxy allocates small, short-lived buffers per request; mimalloc's thread-local
// free lists serve them faster than glibc malloc (measured by e2e/bin/bench-router).
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

use anyhow::Context as _;
use cellplane_router::config::{Config, EtcdConfig};
use cellplane_router::h1;
use cellplane_router::hyper_path;
use cellplane_router::metrics::{Metrics, ReasonLabel};
use cellplane_router::state::Router;
use cellplane_table::ack::{Acknowledger, HoldCounters};
use cellplane_table::TableSource;
use cellplane_table::TableStore;
use clap::Parser;
use http::{Response, StatusCode};
use http_body_util::Full;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::GracefulShutdown;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;
use tokio::net::TcpListener;
use tokio::task::JoinSet;

#[derive(Parser)]
#[command(
    name = "cellplane-router",
    version,
    about = "Pins every user to a cell and follows failovers"
)]
struct Cli {
    /// YAML config file (see README); flags below override it.
    #[arg(long, env = "CELLPLANE_ROUTER_CONFIG")]
    config: Option<PathBuf>,
    /// Listen address for traffic.
    #[arg(long, env = "CELLPLANE_ROUTER_LISTEN")]
    listen: Option<SocketAddr>,
    /// Listen address for /metrics, /healthz, /readyz.
    #[arg(long, env = "CELLPLANE_ROUTER_METRICS_LISTEN")]
    metrics_listen: Option<SocketAddr>,
    /// Static mode: a routing-table JSON file.
    #[arg(
        long,
        env = "CELLPLANE_ROUTER_TABLE_FILE",
        conflicts_with = "etcd_endpoints"
    )]
    table_file: Option<PathBuf>,
    /// etcd mode: endpoints (comma-separated).
    #[arg(
        long,
        env = "CELLPLANE_ETCD_ENDPOINTS",
        value_delimiter = ',',
        requires = "platform"
    )]
    etcd_endpoints: Vec<String>,
    /// etcd mode: the platform name.
    #[arg(long, env = "CELLPLANE_PLATFORM")]
    platform: Option<String>,
    /// etcd mode: this router's id in its acknowledgements (default: host name and pid).
    #[arg(long, env = "CELLPLANE_ROUTER_ID")]
    router_id: Option<String>,
    /// etcd mode: the region this router serves in.
    #[arg(long, env = "CELLPLANE_REGION")]
    region: Option<String>,
    /// Where the last good table is saved.
    #[arg(long, env = "CELLPLANE_ROUTER_CACHE_FILE")]
    cache_file: Option<PathBuf>,
    /// Worker threads (default: one per core); 1 runs everything on one thread.
    #[arg(long, env = "CELLPLANE_ROUTER_WORKERS")]
    workers: Option<usize>,
    /// Serve plain HTTP/1.1 on the direct path (true, the default) or everything through
    /// hyper (false).
    #[arg(long, env = "CELLPLANE_ROUTER_DIRECT_HTTP1")]
    direct_http1: Option<bool>,
    /// Validate the configuration and exit (0 when valid); files it names (TLS, admin
    /// token, tables) are read only when serving.
    #[arg(long)]
    check: bool,
}

fn load_config(cli: &Cli) -> anyhow::Result<Config> {
    let mut cfg = match &cli.config {
        Some(path) => {
            let text = std::fs::read_to_string(path)
                .with_context(|| format!("reading --config {}", path.display()))?;
            serde_yaml::from_str::<Config>(&text)
                .with_context(|| format!("{} is not a valid router config", path.display()))?
        }
        None => serde_yaml::from_str("table: {}").context("default config")?,
    };
    if let Some(l) = cli.listen {
        cfg.listen = l;
    }
    if let Some(l) = cli.metrics_listen {
        cfg.metrics_listen = l;
    }
    if let Some(f) = &cli.table_file {
        cfg.table.file = Some(f.clone());
        cfg.table.etcd = None;
    }
    if !cli.etcd_endpoints.is_empty() {
        let platform = cli.platform.clone().unwrap_or_default();
        cfg.table.file = None;
        let ack_ttl_secs = cfg.table.etcd.as_ref().map_or(5, |e| e.ack_ttl_secs);
        cfg.table.etcd = Some(EtcdConfig {
            endpoints: cli.etcd_endpoints.clone(),
            platform,
            router_id: None,
            region: None,
            ack_ttl_secs,
        });
    }
    if let Some(e) = cfg.table.etcd.as_mut() {
        if cli.router_id.is_some() {
            e.router_id = cli.router_id.clone();
        }
        if cli.region.is_some() {
            e.region = cli.region.clone();
        }
    }
    if let Some(c) = &cli.cache_file {
        cfg.table.cache_file = Some(c.clone());
    }
    if let Some(d) = cli.direct_http1 {
        cfg.direct_http1 = d;
    }
    cfg.validate()?;
    Ok(cfg)
}

async fn shutdown_signal() {
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .expect("SIGTERM handler");
    tokio::select! { _ = tokio::signal::ctrl_c() => {}, _ = term.recv() => {} }
}

async fn serve_admin(listener: TcpListener, router: Arc<Router>) -> anyhow::Result<()> {
    loop {
        let (stream, _) = listener.accept().await?;
        let router = router.clone();
        tokio::spawn(async move {
            let svc = service_fn(move |req: http::Request<hyper::body::Incoming>| {
                let router = router.clone();
                async move {
                    let (code, body) = match req.uri().path() {
                        "/metrics" => (StatusCode::OK, router.metrics.encode()),
                        "/healthz" => (StatusCode::OK, "ok".to_string()),
                        "/readyz" if router.tables.get().is_some() => {
                            (StatusCode::OK, "ready".to_string())
                        }
                        "/readyz" => (
                            StatusCode::SERVICE_UNAVAILABLE,
                            "no routing table yet".to_string(),
                        ),
                        _ => (StatusCode::NOT_FOUND, "not found".to_string()),
                    };
                    let content_type = if req.uri().path() == "/metrics" {
                        cellplane_table::metrics::OPENMETRICS_CONTENT_TYPE
                    } else {
                        "text/plain; charset=utf-8"
                    };
                    Ok::<_, std::convert::Infallible>(
                        Response::builder()
                            .status(code)
                            .header(http::header::CONTENT_TYPE, content_type)
                            .body(Full::new(bytes::Bytes::from(body)))
                            .expect("valid"),
                    )
                }
            });
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(stream), svc)
                .await;
        });
    }
}

fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .json()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .init();
    let cli = Cli::parse();
    let cfg = load_config(&cli)?;
    if cli.check {
        println!("config is valid");
        return Ok(());
    }
    let workers = cli.workers.unwrap_or_else(|| {
        std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(1)
    });
    let runtime = if workers <= 1 {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?
    } else {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(workers)
            .enable_all()
            .build()?
    };
    runtime.block_on(serve(cfg))
}

/// Whether TLS negotiated HTTP/2 (ALPN `h2`): such a connection goes straight to hyper.
trait AlpnH2 {
    fn alpn_h2(&self) -> bool;
}

impl AlpnH2 for tokio::net::TcpStream {
    fn alpn_h2(&self) -> bool {
        false
    }
}

impl AlpnH2 for tokio_rustls::server::TlsStream<tokio::net::TcpStream> {
    fn alpn_h2(&self) -> bool {
        self.get_ref().1.alpn_protocol() == Some(b"h2")
    }
}

/// One accepted client connection and what serving it needs.
struct Connection {
    router: Arc<Router>,
    peer: SocketAddr,
    builder: auto::Builder<TokioExecutor>,
    watcher: hyper_util::server::graceful::Watcher,
    /// Some: the direct HTTP/1.1 path serves it first (with its shutdown signal).
    direct: Option<tokio::sync::watch::Receiver<bool>>,
}

impl Connection {
    /// The direct path first (unless off, or TLS negotiated HTTP/2), then hyper for what
    /// the direct path hands over.
    async fn serve<S>(self, stream: S)
    where
        S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static + AlpnH2,
    {
        let Connection {
            router,
            peer,
            builder,
            watcher,
            direct,
        } = self;
        let direct_router = router.clone();
        let svc = service_fn(move |req| {
            let router = router.clone();
            async move { Ok::<_, std::convert::Infallible>(hyper_path::handle(router, req, peer).await) }
        });
        let io = match direct.filter(|_| !stream.alpn_h2()) {
            Some(shutdown) => match h1::serve(&direct_router, stream, peer, shutdown).await {
                h1::Outcome::Closed => return,
                h1::Outcome::HandOff(io) => io,
            },
            None => h1::Rewind::new(stream, bytes::Bytes::new()),
        };
        let conn = builder.serve_connection_with_upgrades(TokioIo::new(io), svc);
        let _ = watcher.watch(conn.into_owned()).await;
    }
}

/// The cells of the table in use whose every endpoint this router sees down.
fn down_cells(router: Arc<Router>) -> cellplane_table::ack::DownCells {
    Arc::new(move || {
        let Some(table) = router.tables.get() else {
            return Vec::new();
        };
        table
            .cells
            .iter()
            .filter(|c| {
                !c.endpoints.is_empty()
                    && c.endpoints
                        .iter()
                        .all(|a| router.endpoints.is_ejected(&router.endpoints.state(a)))
            })
            .map(|c| c.name.clone())
            .collect()
    })
}

fn default_router_id() -> String {
    let host = std::fs::read_to_string("/etc/hostname")
        .map(|h| h.trim().to_string())
        .unwrap_or_else(|_| "router".into());
    format!("{host}-{}", std::process::id())
}

/// Where the routing table comes from (the config was validated: one of the two).
fn table_source(cfg: &Config) -> TableSource {
    match (&cfg.table.file, &cfg.table.etcd) {
        (Some(f), _) => TableSource::File {
            path: f.clone(),
            poll: Duration::from_millis(cfg.table.poll_ms.max(50)),
        },
        (None, Some(e)) => TableSource::Etcd {
            endpoints: e.endpoints.clone(),
            platform: e.platform.clone(),
        },
        (None, None) => unreachable!("validated"),
    }
}

/// Tells the platform leader which epoch this router applied, with what the leader reads
/// beside it: holds, cells seen down, what clients saw fail, each cell's traffic.
fn acknowledger(
    e: &cellplane_router::config::EtcdConfig,
    router: &Arc<Router>,
    metrics: &Metrics,
) -> Acknowledger {
    Acknowledger {
        endpoints: e.endpoints.clone(),
        platform: e.platform.clone(),
        id: e.router_id.clone().unwrap_or_else(default_router_id),
        region: e.region.clone().unwrap_or_default(),
        ttl: Duration::from_secs(e.ack_ttl_secs.clamp(2, 300)),
        holds: Some(HoldCounters {
            held: metrics.held.clone(),
            timed_out: metrics
                .rejected
                .get_or_create(&ReasonLabel {
                    reason: "hold_timeout",
                })
                .clone(),
        }),
        down: Some(down_cells(router.clone())),
        outages: Some({
            let r = router.clone();
            Arc::new(move || r.outages.snapshot())
        }),
        traffic: Some({
            let r = router.clone();
            Arc::new(move || r.cell_counts())
        }),
    }
}

/// The gRPC admin API, on its own listener.
fn spawn_admin(
    tasks: &mut JoinSet<&'static str>,
    admin: cellplane_router::config::AdminConfig,
    router: Arc<Router>,
) -> anyhow::Result<()> {
    let token = cellplane_router::admin::load_token(&admin)?;
    let server = cellplane_router::admin::listener(&admin)?;
    tracing::info!(listen = %admin.listen, mtls = admin.tls.is_some(), "admin API (gRPC) serving");
    tasks.spawn(async move {
        if let Err(e) = cellplane_router::admin::serve(server, admin.listen, token, router).await {
            tracing::error!(error = %e, "admin API stopped");
        }
        "admin API"
    });
    Ok(())
}

/// hyper's server settings: header read timeout and size bounds, keep-alive.
fn http_builder(cfg: &Config) -> auto::Builder<TokioExecutor> {
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(Duration::from_millis(cfg.timeouts.header_read_ms))
        .max_buf_size(cfg.limits.max_header_bytes)
        .keep_alive(true);
    builder
        .http2()
        .max_header_list_size(cfg.limits.max_header_bytes as u32);
    builder
}

async fn serve(cfg: Config) -> anyhow::Result<()> {
    let metrics = Arc::new(Metrics::new());
    let tables = Arc::new(TableStore::new(
        cfg.table.cache_file.clone(),
        metrics.table.clone(),
    ));
    let source = table_source(&cfg);
    // The disk cache first: a router restarted while etcd is down still routes.
    tables.load_cache();
    if let Err(e) = source.refresh(&tables).await {
        tracing::warn!(error = %e, "initial table read failed; serving from the cache if any");
    }
    // The router's own tasks run for its whole life; one that ends on its own (the table
    // follower, the acknowledgements, health checks, the metrics or admin server) leaves a
    // router that looks alive but routes blind: it exits instead, naming the task.
    let mut tasks: JoinSet<&'static str> = JoinSet::new();
    let follow = source.clone().follow(tables.clone());
    tasks.spawn(async move {
        follow.await;
        "routing table follower"
    });

    let router = Arc::new(Router::new(
        cfg.clone(),
        tables.clone(),
        source,
        metrics.clone(),
    )?);
    if let Some(e) = &cfg.table.etcd {
        let ack = acknowledger(e, &router, &metrics).run(tables.clone());
        tasks.spawn(async move {
            ack.await;
            "table acknowledgements"
        });
    }
    if cfg.health_check.enabled {
        let health = cellplane_router::health::run(router.clone());
        tasks.spawn(async move {
            health.await;
            "health checks"
        });
    }
    if let Some(admin) = cfg.admin.clone() {
        spawn_admin(&mut tasks, admin, router.clone())?;
    }
    // Bound before serving: a router whose health and metrics port is taken must not run
    // blind, it stops with the reason.
    let metrics_listener = TcpListener::bind(cfg.metrics_listen)
        .await
        .with_context(|| format!("binding metricsListen {}", cfg.metrics_listen))?;
    tasks.spawn({
        let r = router.clone();
        async move {
            if let Err(e) = serve_admin(metrics_listener, r).await {
                tracing::error!(error = %e, "metrics server stopped");
            }
            "metrics server"
        }
    });

    let listener = TcpListener::bind(cfg.listen)
        .await
        .with_context(|| format!("binding listen {}", cfg.listen))?;
    tracing::info!(listen = %cfg.listen, metrics = %cfg.metrics_listen, "routing");
    let builder = http_builder(&cfg);
    let tls = cfg
        .tls
        .as_ref()
        .map(cellplane_router::tls::acceptor)
        .transpose()?;
    let handshake_timeout = Duration::from_millis(cfg.timeouts.header_read_ms);
    let graceful = GracefulShutdown::new();
    // The direct path's connections close between requests when this turns true. Every
    // connection holds a graceful watcher whichever path serves it, so the drain below
    // waits for direct-path requests in flight too.
    let (direct_shutdown, _) = tokio::sync::watch::channel(false);
    let shutdown = shutdown_signal();
    tokio::pin!(shutdown);
    loop {
        tokio::select! {
            accepted = listener.accept() => {
                let (stream, peer) = match accepted {
                    Ok(a) => a,
                    Err(e) => { tracing::warn!(error = %e, "accept failed"); continue; }
                };
                let _ = stream.set_nodelay(true);
                let conn = Connection {
                    router: router.clone(),
                    peer,
                    builder: builder.clone(),
                    watcher: graceful.watcher(),
                    direct: cfg.direct_http1.then(|| direct_shutdown.subscribe()),
                };
                match &tls {
                    None => { tokio::spawn(conn.serve(stream)); }
                    Some(acceptor) => {
                        // The handshake is bounded like a request head: a slow client
                        // cannot hold a task open forever.
                        let acceptor = acceptor.clone();
                        tokio::spawn(async move {
                            let stream = match tokio::time::timeout(handshake_timeout, acceptor.accept(stream)).await {
                                Ok(Ok(s)) => s,
                                Ok(Err(e)) => { tracing::debug!(%peer, error = %e, "TLS handshake failed"); return; }
                                Err(_) => { tracing::debug!(%peer, "TLS handshake timed out"); return; }
                            };
                            conn.serve(stream).await;
                        });
                    }
                }
            }
            _ = &mut shutdown => break,
            ended = tasks.join_next() => {
                let what = match ended {
                    Some(Ok(name)) => format!("the {name} task ended on its own"),
                    Some(Err(e)) => format!("a task failed: {e}"),
                    None => "every task ended".to_string(),
                };
                anyhow::bail!("{what}; exiting so that the router is restarted");
            }
        }
    }
    tracing::info!("draining in-flight requests");
    direct_shutdown.send_replace(true);
    tokio::select! {
        _ = graceful.shutdown() => tracing::info!("drained"),
        _ = tokio::time::sleep(Duration::from_secs(30)) => tracing::warn!("drain timed out"),
    }
    Ok(())
}
