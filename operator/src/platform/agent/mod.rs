//! The region side of the platform (I/O): actions stay local. Every region's operator
//! carries out the intents for its own cells' MySQL (fence or unfence, which homes to
//! replicate) and reports what it measures in their registrations (position, read_only,
//! replication per connection, the order backlog, the intent generation carried out), so the
//! leader can advance an operation without ever reaching another region's databases.
//!
//! Credentials: a cell's MySQL admin account comes from its Secret (in-cluster: the
//! generated root password; external: `spec.mysql.external.adminSecretRef`). Replication
//! passwords are derived from the platform secret (`--replication-secret-file`), the same in
//! every region, so none travels through etcd.

mod app;
pub mod rebuild;

use crate::build::{names, Store};
use crate::platform::intents::{replication_password, REPLICATION_USER};
use crate::platform::observe::read_values;
use crate::registration::{Live, Registrar};
use crate::Result;
use cellplane_cell_sdk::replication::{self, ReplicationSource};
use cellplane_cells::crd::Cell;
use cellplane_cells::etcd_keys::{
    cells_prefix, intents_prefix, Intent, MysqlReport, Registration, ReplicaReport,
};
use etcd_client::Client;
use futures::StreamExt;
use k8s_openapi::api::core::v1::Secret;
use kube::runtime::reflector::{self, Store as KubeStore};
use kube::runtime::{watcher, WatchStreamExt};
use kube::{Api, ResourceExt};
use rebuild::RebuildTask;
use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Settings of the region agent.
#[derive(Clone)]
pub struct AgentConfig {
    pub platform: String,
    pub region: String,
    pub etcd_endpoints: Vec<String>,
    /// How often intents are checked and measurements reported.
    pub interval: Duration,
    /// The platform secret replication passwords are derived from (None: no replication).
    pub replication_secret: Option<Arc<Vec<u8>>>,
    /// How long without a confirmed contact with the etcd majority before the region's
    /// cells go read_only (`FailoverTimings::fence_after_ms`).
    pub fence_after: Duration,
    /// Where an old home's errant transactions are exported before it is rebuilt.
    pub export_dir: std::path::PathBuf,
    /// Replica lag and health of this region's cells are exported here.
    pub metrics: Arc<crate::metrics::Metrics>,
}

/// How long a cell's admin credentials are used before its Secret is read again.
const CREDENTIALS_TTL: Duration = Duration::from_secs(60);
/// Least time between two attempts to (re)configure one replication connection.
const RECONFIGURE_EVERY: Duration = Duration::from_secs(5);
/// How often the agent measures while an operation moves one of its cells.
const OPERATION_INTERVAL: Duration = Duration::from_millis(50);

struct CellState {
    pool: mysql_async::Pool,
    read_at: Instant,
    account_ready: bool,
    applied_generation: u64,
    last_error: String,
    reconfigured: HashMap<String, Instant>,
    /// The app's user request counter as read, oldest first, for the last minute's rate.
    request_samples: VecDeque<(Instant, u64)>,
    /// The last rebuild of the cell's MySQL an intent asked for.
    rebuild: Option<RebuildTask>,
    /// Since when the cell's app has answered ready without a break (and the region
    /// reached the global etcd).
    healthy_since_ms: Option<u64>,
}

/// Runs until `stop` resolves.
pub async fn run(
    cfg: AgentConfig,
    kube: kube::Client,
    registrar: Registrar,
    stop: impl std::future::Future<Output = ()>,
) {
    let (cells, writer) = reflector::store::<Cell>();
    let drive = reflector::reflector(
        writer,
        watcher(
            Api::<Cell>::all(kube.clone()),
            crate::controller::watch_config(),
        ),
    )
    .default_backoff()
    .for_each(|_| async {});
    tokio::pin!(drive, stop);
    // When the last pass that reached the etcd majority read its intents, and each cell's
    // MySQL pool: after `fence_after` without a contact, the watchdog puts this region's
    // cells read_only, before their ownership leases can expire and a standby elsewhere is
    // promoted. It runs beside the passes: a pass stuck on an unreachable etcd must not
    // hold the fence back.
    let watch = Arc::new(Watchdog::default());
    let work = async {
        let mut states: HashMap<String, CellState> = HashMap::new();
        let mut client: Option<Client> = None;
        // A new intent wakes the agent at once: an operation's steps wait on it.
        let mut intents: Option<etcd_client::WatchStream> = None;
        loop {
            if client.is_none() {
                client = crate::platform::connect(&cfg.etcd_endpoints).await.ok();
                intents = None;
            }
            let mut busy = false;
            if let Some(c) = client.as_mut() {
                if intents.is_none() {
                    let opts = etcd_client::WatchOptions::new().with_prefix();
                    intents = c
                        .watch(intents_prefix(&cfg.platform), Some(opts))
                        .await
                        .ok();
                }
                match pass(&cfg, &kube, &registrar, c, &cells, &mut states, &watch).await {
                    Ok(b) => busy = b,
                    Err(e) => {
                        tracing::warn!(error = %e, "region agent: pass failed");
                        client = None;
                        // Out of touch with the global etcd: no cell of this region counts
                        // as healthy without a break any more (a failback waits for it).
                        for st in states.values_mut() {
                            st.healthy_since_ms = None;
                        }
                    }
                }
            }
            // While an operation moves one of this region's cells, the leader waits on
            // these reports (order backlog, positions): measure often.
            let wait = if busy {
                cfg.interval.min(OPERATION_INTERVAL)
            } else {
                cfg.interval
            };
            match intents.as_mut() {
                Some(stream) => {
                    tokio::select! {
                        _ = tokio::time::sleep(wait) => {}
                        msg = stream.message() => if !matches!(msg, Ok(Some(_))) {
                            intents = None;
                        },
                    }
                }
                None => tokio::time::sleep(wait).await,
            }
        }
    };
    let fence = watch.run(&cfg.etcd_endpoints, cfg.fence_after);
    tokio::select! {
        _ = &mut stop => {}
        _ = &mut drive => tracing::error!("Cell watch of the region agent ended"),
        _ = work => {}
        _ = fence => {}
    }
}

/// The region's self-fence: cut off from the etcd majority for `fence_after`, every
/// writable cell of the region goes `read_only` (the app's sessions killed), so nothing
/// this region still serves locally is written while a standby elsewhere may be promoted.
/// Intents restore them once etcd answers again.
#[derive(Default)]
struct Watchdog {
    /// When the last confirmed read from the etcd majority was sent.
    contact: parking_lot::Mutex<Option<Instant>>,
    pools: parking_lot::Mutex<HashMap<String, mysql_async::Pool>>,
}

impl Watchdog {
    fn contacted(&self, sent: Instant) {
        let mut c = self.contact.lock();
        if c.is_none_or(|at| sent > at) {
            *c = Some(sent);
        }
    }

    /// Probes the etcd majority and fences the region's cells when it stops answering.
    async fn run(&self, endpoints: &[String], fence_after: Duration) {
        tokio::join!(self.probe(endpoints, fence_after), self.guard(fence_after));
    }

    /// A linearizable read every sixth of `fence_after`, each allowed a quarter of it, on
    /// its own connection (moved to another member when one fails): the contact clock
    /// never waits on a slow pass or on a member that was cut off.
    async fn probe(&self, endpoints: &[String], fence_after: Duration) {
        let (every, timeout) = (fence_after / 6, fence_after / 4);
        let mut client: Option<Client> = None;
        loop {
            if client.is_none() {
                client = cellplane_table::etcd::connect(endpoints, timeout)
                    .await
                    .ok();
            }
            if let Some(c) = client.as_mut() {
                let sent = Instant::now();
                let opts = etcd_client::GetOptions::new().with_keys_only();
                match tokio::time::timeout(timeout, c.get("/cellplane-health", Some(opts))).await {
                    Ok(Ok(_)) => self.contacted(sent),
                    _ => client = None,
                }
            }
            tokio::time::sleep(every).await;
        }
    }

    async fn guard(&self, fence_after: Duration) {
        let mut fenced = false;
        loop {
            tokio::time::sleep(Duration::from_millis(50)).await;
            let Some(contact) = *self.contact.lock() else {
                continue;
            };
            let lost = contact.elapsed() >= fence_after;
            if lost && !fenced {
                fenced = true;
                let pools: Vec<(String, mysql_async::Pool)> = self
                    .pools
                    .lock()
                    .iter()
                    .map(|(c, p)| (c.clone(), p.clone()))
                    .collect();
                for (cell, pool) in pools {
                    fence_cell(&cell, &pool, fence_after).await;
                }
            } else if !lost && fenced {
                fenced = false;
                tracing::info!(
                    "region agent: the global etcd answers again; the cells follow their intents"
                );
            }
        }
    }
}

async fn fence_cell(cell: &str, pool: &mysql_async::Pool, after: Duration) {
    let fenced = async {
        let pos = replication::position(pool).await?;
        if pos.read_only {
            return Ok(None);
        }
        replication::demote(pool).await.map(Some)
    };
    match tokio::time::timeout(Duration::from_secs(2), fenced).await {
        Ok(Ok(Some(p))) => {
            tracing::warn!(%cell, position = %p.gtid_binlog_pos, no_contact_ms = after.as_millis() as u64, "fenced itself: no contact with the global etcd majority; read_only until it answers again")
        }
        Ok(Ok(None)) => {}
        Ok(Err(e)) => {
            tracing::error!(%cell, error = %e, "could not fence the cell's MySQL after losing the global etcd")
        }
        Err(_) => {
            tracing::error!(%cell, "fencing the cell's MySQL timed out after losing the global etcd")
        }
    }
}

/// One pass over the region's cells of the platform; true when an operation is moving
/// one of them.
async fn pass(
    cfg: &AgentConfig,
    kube: &kube::Client,
    registrar: &Registrar,
    client: &mut Client,
    cells: &KubeStore<Cell>,
    states: &mut HashMap<String, CellState>,
    watch: &Watchdog,
) -> Result<bool> {
    let intents: BTreeMap<String, Intent> =
        read_values(client, &intents_prefix(&cfg.platform)).await?;
    let regs: BTreeMap<String, Registration> =
        read_values(client, &cells_prefix(&cfg.platform)).await?;
    let mine: Vec<Arc<Cell>> = cells
        .state()
        .into_iter()
        .filter(|c| c.spec.region == cfg.region && c.spec.platform == cfg.platform)
        .collect();
    let busy = mine.iter().any(|c| {
        intents
            .get(&c.name_any())
            .is_some_and(|i| i.operation.is_some())
    });
    for cell in mine {
        let name = cell.name_any();
        let started = Instant::now();
        let outcome = serve_cell(cfg, kube, &cell, intents.get(&name), &regs, states).await;
        if let Some(st) = states.get(&name) {
            watch.pools.lock().insert(name.clone(), st.pool.clone());
        }
        tracing::debug!(
            cell = %name,
            elapsed_ms = started.elapsed().as_millis() as u64,
            order_backlog = ?outcome.as_ref().ok().and_then(|l| l.kafka_lag),
            "region agent: cell served"
        );
        let state = states.get_mut(&name);
        match outcome {
            Ok(live) => {
                if let Some(s) = state {
                    s.last_error.clear();
                }
                registrar.report(&cfg.platform, &name, live).await?;
            }
            Err(e) => {
                // Said once per distinct error, not every pass.
                let msg = e.to_string();
                let new = state.as_ref().is_none_or(|s| s.last_error != msg);
                if new {
                    tracing::warn!(cell = %name, error = %msg, "region agent: cannot serve the cell's intent or measure it");
                }
                if let Some(s) = states.get_mut(&name) {
                    s.last_error = msg;
                }
            }
        }
    }
    Ok(busy)
}

/// Where `source`'s MySQL is (its registration) and the replication account for it.
fn replication_source(
    cfg: &AgentConfig,
    regs: &BTreeMap<String, Registration>,
    source: &str,
) -> Result<ReplicationSource> {
    let secret = cfg.replication_secret.as_ref().ok_or_else(|| {
        crate::Error::InvalidSpec(
            "no --replication-secret-file: this region cannot set up replication".into(),
        )
    })?;
    let addr = regs
        .get(source)
        .and_then(|r| r.endpoints.get("mysql"))
        .ok_or_else(|| {
            crate::Error::InvalidSpec(format!(
                "{source} has no registered MySQL address to replicate from"
            ))
        })?;
    let (host, port) = split(addr).ok_or_else(|| {
        crate::Error::InvalidSpec(format!("{source}: MySQL address {addr:?} is not host:port"))
    })?;
    Ok(ReplicationSource {
        host,
        port,
        user: REPLICATION_USER.into(),
        password: replication_password(secret, source),
    })
}

/// `host:port` -> (host, port).
fn split(addr: &str) -> Option<(String, u16)> {
    let (h, p) = addr.rsplit_once(':')?;
    Some((h.to_string(), p.parse().ok()?))
}

/// The cell's MySQL admin account: address, user, password.
async fn admin_access(kube: &kube::Client, cell: &Cell) -> Result<(String, u16, String, String)> {
    let ns = cell.namespace().unwrap_or_default();
    let secrets: Api<Secret> = Api::namespaced(kube.clone(), &ns);
    let read = |secret: Secret, user_key: &str, pw_key: &str| -> Option<(String, String)> {
        let data = secret.data?;
        let get = |k: &str| {
            data.get(k)
                .map(|v| String::from_utf8_lossy(&v.0).into_owned())
        };
        Some((get(user_key)?, get(pw_key)?))
    };
    let name = cell.name_any();
    let (addr, (user, password)) = match &cell.spec.mysql.external {
        Some(ext) => {
            let r = ext.admin_secret_ref.as_ref().ok_or_else(|| {
                crate::Error::InvalidSpec(format!(
                    "{name}: spec.mysql.external.adminSecretRef is not set; the cell cannot be fenced or replicated"
                ))
            })?;
            let s = secrets.get(&r.name).await?;
            (
                ext.endpoint.clone(),
                read(s, "username", "password").ok_or_else(|| {
                    crate::Error::InvalidSpec(format!(
                        "Secret {}: needs keys username and password",
                        r.name
                    ))
                })?,
            )
        }
        None => {
            let s = secrets.get(&names::secret(&name, Store::Mysql)).await?;
            let pw = read(s, "root-password", "root-password")
                .ok_or(crate::Error::MissingField("root-password"))?
                .1;
            (
                names::store_address(&name, &ns, Store::Mysql),
                ("root".to_string(), pw),
            )
        }
    };
    let (host, port) = split(&addr).ok_or_else(|| {
        crate::Error::InvalidSpec(format!("{name}: MySQL address {addr:?} is not host:port"))
    })?;
    Ok((host, port, user, password))
}

/// The app's MySQL account name: the generated one in-cluster, the Secret's `username`
/// for an external MySQL.
async fn app_account(kube: &kube::Client, cell: &Cell) -> Result<String> {
    let Some(ext) = &cell.spec.mysql.external else {
        return Ok(crate::build::secret::MYSQL_APP_USER.to_string());
    };
    let ns = cell.namespace().unwrap_or_default();
    let secret = Api::<Secret>::namespaced(kube.clone(), &ns)
        .get(&ext.secret_ref.name)
        .await?;
    secret
        .data
        .and_then(|d| {
            d.get("username")
                .map(|v| String::from_utf8_lossy(&v.0).into_owned())
        })
        .ok_or_else(|| {
            crate::Error::InvalidSpec(format!(
                "Secret {}: needs key username (the app's MySQL account)",
                ext.secret_ref.name
            ))
        })
}

fn sdk(e: cellplane_cell_sdk::Error) -> crate::Error {
    crate::Error::InvalidSpec(format!("mysql: {e}"))
}

/// Carries out `intent` (if any) on the cell's MySQL and measures it.
async fn serve_cell(
    cfg: &AgentConfig,
    kube: &kube::Client,
    cell: &Cell,
    intent: Option<&Intent>,
    regs: &BTreeMap<String, Registration>,
    states: &mut HashMap<String, CellState>,
) -> Result<Live> {
    let name = cell.name_any();
    let stale = states
        .get(&name)
        .is_none_or(|s| s.read_at.elapsed() > CREDENTIALS_TTL);
    if stale {
        let (host, port, user, password) = admin_access(kube, cell).await?;
        let opts = mysql_async::OptsBuilder::default()
            .ip_or_hostname(host)
            .tcp_port(port)
            .user(Some(user))
            .pass(Some(password))
            .pool_opts(
                mysql_async::PoolOpts::default()
                    .with_constraints(mysql_async::PoolConstraints::new(0, 2).expect("0 <= 2"))
                    // Kept between passes (mysql_async closes idle connections above the
                    // minimum at once when this is zero).
                    .with_inactive_connection_ttl(Duration::from_secs(60)),
            );
        let previous = states.remove(&name);
        let previous_samples = previous
            .as_ref()
            .map(|p| p.request_samples.clone())
            .unwrap_or_default();
        let previous_rebuild = previous.as_ref().and_then(|p| p.rebuild.clone());
        let previous_healthy_since = previous.as_ref().and_then(|p| p.healthy_since_ms);
        states.insert(
            name.clone(),
            CellState {
                pool: mysql_async::Pool::new(opts),
                read_at: Instant::now(),
                account_ready: false,
                applied_generation: previous.as_ref().map_or(0, |p| p.applied_generation),
                last_error: previous.map(|p| p.last_error).unwrap_or_default(),
                reconfigured: HashMap::new(),
                request_samples: previous_samples,
                rebuild: previous_rebuild,
                healthy_since_ms: previous_healthy_since,
            },
        );
    }
    let st = states.get_mut(&name).expect("inserted above");
    let pool = st.pool.clone();
    if let (Some(secret), false) = (&cfg.replication_secret, st.account_ready) {
        let pw = replication_password(secret, &name);
        replication::ensure_replication_account(&pool, REPLICATION_USER, &pw)
            .await
            .map_err(sdk)?;
        // The app serves a failed-over cell's users from that cell's replicated schema.
        let app_user = app_account(kube, cell).await?;
        replication::grant_cell_schemas(&pool, &app_user)
            .await
            .map_err(sdk)?;
        st.account_ready = true;
    }
    if let Some(intent) = intent {
        let pos = replication::position(&pool).await.map_err(sdk)?;
        if intent.writable && pos.read_only {
            replication::make_writable(&pool).await.map_err(sdk)?;
            tracing::info!(cell = %name, generation = intent.generation, "writable again");
        } else if !intent.writable && !pos.read_only {
            let p = replication::demote(&pool).await.map_err(sdk)?;
            tracing::info!(cell = %name, generation = intent.generation, position = %p.gtid_binlog_pos, "fenced: read_only, app sessions killed");
        }
        let existing = replication::connections(&pool).await.map_err(sdk)?;
        for source in &intent.replicate_from {
            let status = replication::replica_status(&pool, source)
                .await
                .map_err(sdk)?;
            let running = status
                .as_ref()
                .is_some_and(|s| s.io_running && s.sql_running);
            let recently = st
                .reconfigured
                .get(source)
                .is_some_and(|t| t.elapsed() < RECONFIGURE_EVERY);
            if running || recently {
                continue;
            }
            let src = replication_source(cfg, regs, source)?;
            st.reconfigured.insert(source.clone(), Instant::now());
            if status.is_some() {
                replication::stop_replica(&pool, source)
                    .await
                    .map_err(sdk)?;
            }
            replication::start_replica(&pool, source, &src)
                .await
                .map_err(sdk)?;
            tracing::info!(cell = %name, %source, "replication (re)configured");
        }
        for extra in existing
            .iter()
            .filter(|c| !intent.replicate_from.contains(c))
        {
            replication::stop_replica(&pool, extra).await.map_err(sdk)?;
            // The pause between attempts is for a connection that keeps failing; one an
            // intent stopped starts at once when an intent asks for it again.
            st.reconfigured.remove(extra);
            tracing::info!(cell = %name, source = %extra, "replication stopped");
        }
        if let (Some(source), Some(operation)) = (&intent.rebuild_from, &intent.operation) {
            if RebuildTask::needs_run(st.rebuild.as_ref(), operation) {
                st.rebuild = Some(start_rebuild(cfg, &name, operation, source, regs, &pool)?);
            }
        }
        st.applied_generation = intent.generation;
    }
    // The database and the app are measured at once: an operation's step waits on this
    // report, and the two answer independently.
    let measure_mysql = async {
        let pos = replication::position(&pool).await.map_err(sdk)?;
        let replicas = measure_replicas(cfg, &name, &pool, regs).await?;
        Ok::<_, crate::Error>((pos, replicas))
    };
    let measure_app = async {
        match regs.get(&name).and_then(|r| r.endpoints.get("app")) {
            Some(addr) => app::read(addr).await,
            None => app::AppReading::default(),
        }
    };
    let (mysql, app) = tokio::join!(measure_mysql, measure_app);
    let (pos, replicas) = mysql?;
    if let Some(total) = app.user_requests_total() {
        st.request_samples.push_back((Instant::now(), total));
    }
    let requests_per_sec = rate_over_last_minute(&mut st.request_samples);
    let healthy = app.ready.unwrap_or(false);
    cfg.metrics
        .cell_healthy
        .get_or_create(&crate::metrics::CellLabel { cell: name.clone() })
        .set(i64::from(healthy));
    st.healthy_since_ms = healthy.then(|| {
        st.healthy_since_ms
            .unwrap_or_else(cellplane_table::store::now_ms)
    });
    Ok(Live {
        mysql: Some(MysqlReport {
            read_only: pos.read_only,
            gtid_binlog_pos: pos.gtid_binlog_pos,
            replicas,
            rebuild: st.rebuild.as_ref().map(|t| t.report.lock().clone()),
        }),
        kafka_lag: app.order_backlog(),
        requests_per_sec,
        // The app's own readiness (its three stores and a table); an app that does not
        // answer at all is not healthy either.
        healthy: Some(healthy),
        intent_generation: st.applied_generation,
        healthy_since_ms: st.healthy_since_ms,
    })
}

/// Each replication connection of a cell's MySQL: its state, for the report and the lag
/// metrics.
async fn measure_replicas(
    cfg: &AgentConfig,
    name: &str,
    pool: &mysql_async::Pool,
    regs: &BTreeMap<String, Registration>,
) -> Result<BTreeMap<String, ReplicaReport>> {
    let mut replicas = BTreeMap::new();
    for connection in replication::connections(pool).await.map_err(sdk)? {
        if let Some(s) = replication::replica_status(pool, &connection)
            .await
            .map_err(sdk)?
        {
            let labels = crate::metrics::ReplicaLabels {
                cell: name.to_string(),
                source: connection.clone(),
            };
            let source_pos = regs
                .get(&connection)
                .and_then(|r| r.mysql.as_ref())
                .map(|m| m.gtid_binlog_pos.as_str());
            if let Some(pos) = source_pos {
                cfg.metrics
                    .replica_lag_transactions
                    .get_or_create(&labels)
                    .set(cellplane_cells::gtid::lag(pos, &s.gtid_slave_pos) as i64);
            }
            if let Some(secs) = s.seconds_behind {
                cfg.metrics
                    .replica_lag_seconds
                    .get_or_create(&labels)
                    .set(secs as i64);
            }
            replicas.insert(
                connection,
                ReplicaReport {
                    running: s.io_running && s.sql_running,
                    gtid_slave_pos: s.gtid_slave_pos,
                    seconds_behind: s.seconds_behind,
                    error: s.last_error,
                },
            );
        }
    }
    Ok(replicas)
}

/// Starts rebuilding `cell`'s MySQL from `source`'s (the new home), errant transactions
/// exported first.
fn start_rebuild(
    cfg: &AgentConfig,
    cell: &str,
    operation: &str,
    source: &str,
    regs: &BTreeMap<String, Registration>,
    target: &mysql_async::Pool,
) -> Result<RebuildTask> {
    let position = regs
        .get(source)
        .and_then(|r| r.mysql.as_ref())
        .map(|m| m.gtid_binlog_pos.clone())
        .ok_or_else(|| {
            crate::Error::InvalidSpec(format!(
                "{source} reports no MySQL position; its errant transactions cannot be told apart yet"
            ))
        })?;
    let src = replication_source(cfg, regs, source)?;
    let opts = mysql_async::OptsBuilder::default()
        .ip_or_hostname(src.host)
        .tcp_port(src.port)
        .user(Some(src.user))
        .pass(Some(src.password))
        .pool_opts(
            mysql_async::PoolOpts::default()
                .with_constraints(mysql_async::PoolConstraints::new(0, 1).expect("0 <= 1")),
        );
    tracing::warn!(%cell, %source, %operation, "rebuilding the old home: exporting its errant transactions, then cloning the new home");
    Ok(rebuild::start(
        rebuild::RebuildPlan {
            cell: cell.to_string(),
            operation: operation.to_string(),
            source: source.to_string(),
            source_position: position,
            export_dir: cfg.export_dir.clone(),
        },
        target.clone(),
        mysql_async::Pool::new(opts),
    ))
}

/// Drops samples older than a minute (keeping one at or before the window's start) and
/// returns the rate between the oldest and newest, rounded up; None until the samples
/// span a second. A counter that went down (the app restarted) starts over.
fn rate_over_last_minute(samples: &mut VecDeque<(Instant, u64)>) -> Option<u64> {
    let (newest_at, newest) = *samples.back()?;
    if samples.iter().any(|(_, v)| *v > newest) {
        samples.retain(|(at, _)| *at == newest_at);
    }
    while samples.len() > 2 && newest_at.duration_since(samples[1].0) >= Duration::from_secs(60) {
        samples.pop_front();
    }
    let (oldest_at, oldest) = *samples.front()?;
    let span = newest_at.duration_since(oldest_at).as_secs_f64();
    (span >= 1.0).then(|| ((newest - oldest) as f64 / span).ceil() as u64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_request_rate_covers_the_last_minute_and_survives_a_restart() {
        let t0 = Instant::now();
        let at = |s: u64| t0 + Duration::from_secs(s);
        let mut samples = VecDeque::from([(t0, 100)]);
        assert_eq!(rate_over_last_minute(&mut samples), None, "one sample");
        samples.push_back((at(10), 600));
        assert_eq!(rate_over_last_minute(&mut samples), Some(50));
        // Later the first sample leaves the window; the newest one at or before the
        // window's start stays, so the rate spans at least the last minute.
        samples.push_back((at(70), 3_600));
        samples.push_back((at(100), 3_900));
        assert_eq!(
            rate_over_last_minute(&mut samples),
            Some(37),
            "(3900-600)/90"
        );
        assert_eq!(samples.front().unwrap().0, at(10));
        // The app restarted: its counter begins again.
        samples.push_back((at(101), 5));
        assert_eq!(rate_over_last_minute(&mut samples), None);
        samples.push_back((at(103), 11));
        assert_eq!(rate_over_last_minute(&mut samples), Some(3));
    }
}
