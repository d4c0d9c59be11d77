//! One of the region's cells (I/O): carries out its intent on its MySQL (fence or
//! unfence, replication connections, a rebuild) and measures what the region reports in its
//! registration (position, replication, the app's readiness, backlog and request rate).

use super::app;
use super::mover::{MoveTask, RetireTask};
use super::rebuild::{self, RebuildTask};
use super::AgentConfig;
use crate::build::{names, Store};
use crate::platform::intents::{replication_password, REPLICATION_USER};
use crate::registration::Live;
use crate::Result;
use cellplane_cell_sdk::mover::Side;
use cellplane_cell_sdk::replication::{self, ReplicationSource};
use cellplane_cells::crd::Cell;
use cellplane_cells::env::mysql_database;
use cellplane_cells::etcd_keys::{Intent, MysqlReport, Registration, ReplicaReport};
use k8s_openapi::api::core::v1::Secret;
use kube::{Api, ResourceExt};
use std::collections::{BTreeMap, HashMap, VecDeque};
use std::time::{Duration, Instant};

/// How long a cell's admin credentials are used before its Secret is read again.
const CREDENTIALS_TTL: Duration = Duration::from_secs(60);
/// Least time between two attempts to (re)configure one replication connection.
const RECONFIGURE_EVERY: Duration = Duration::from_secs(5);
/// What the agent keeps about one of its cells between passes.
pub(super) struct CellState {
    pub(super) pool: mysql_async::Pool,
    read_at: Instant,
    account_ready: bool,
    applied_generation: u64,
    pub(super) last_error: String,
    reconfigured: HashMap<String, Instant>,
    /// The app's user request counter as read, oldest first, for the last minute's rate.
    request_samples: VecDeque<(Instant, u64)>,
    /// The last rebuild of the cell's MySQL an intent asked for.
    rebuild: Option<RebuildTask>,
    /// The admin account's connection settings (the pool's, for a slot move's writes).
    admin_opts: mysql_async::Opts,
    /// The last slot move into this cell an intent ordered (stopped when the order went).
    slot_move: Option<MoveTask>,
    /// The last deletion of this cell's copies of moved slots an intent ordered.
    retire: Option<RetireTask>,
    /// Why the ordered move could not start, as last said.
    move_error: String,
    /// Since when the cell's app has answered ready without a break (and the region
    /// reached the global etcd).
    pub(super) healthy_since_ms: Option<u64>,
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
pub(super) async fn serve(
    cfg: &AgentConfig,
    kube: &kube::Client,
    cell: &Cell,
    intent: Option<&Intent>,
    regs: &BTreeMap<String, Registration>,
    states: &mut HashMap<String, CellState>,
) -> Result<Live> {
    let name = cell.name_any();
    let st = state(kube, cell, states).await?;
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
        carry_out(cfg, st, &name, intent, regs, &pool).await?;
    }
    measure(cfg, st, &name, regs, &pool).await
}

/// The cell's state, its MySQL pool made again from its Secret when the credentials are
/// older than [`CREDENTIALS_TTL`] (what else it knows is kept).
async fn state<'s>(
    kube: &kube::Client,
    cell: &Cell,
    states: &'s mut HashMap<String, CellState>,
) -> Result<&'s mut CellState> {
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
        let admin_opts = mysql_async::Opts::from(opts.clone());
        let fresh = CellState {
            pool: mysql_async::Pool::new(opts),
            admin_opts,
            slot_move: None,
            retire: None,
            move_error: String::new(),
            read_at: Instant::now(),
            account_ready: false,
            applied_generation: previous.as_ref().map_or(0, |p| p.applied_generation),
            last_error: String::new(),
            reconfigured: HashMap::new(),
            request_samples: VecDeque::new(),
            rebuild: None,
            healthy_since_ms: None,
        };
        let next = match previous {
            Some(p) => CellState {
                last_error: p.last_error,
                request_samples: p.request_samples,
                rebuild: p.rebuild,
                slot_move: p.slot_move,
                retire: p.retire,
                healthy_since_ms: p.healthy_since_ms,
                ..fresh
            },
            None => fresh,
        };
        states.insert(name.clone(), next);
    }
    Ok(states.get_mut(&name).expect("inserted above"))
}

/// Makes the cell's MySQL what `intent` says: writable or fenced, replicating exactly the
/// named homes, rebuilt when asked.
async fn carry_out(
    cfg: &AgentConfig,
    st: &mut CellState,
    name: &str,
    intent: &Intent,
    regs: &BTreeMap<String, Registration>,
    pool: &mysql_async::Pool,
) -> Result<()> {
    let pos = replication::position(pool).await.map_err(sdk)?;
    if intent.writable && pos.read_only {
        replication::make_writable(pool).await.map_err(sdk)?;
        tracing::info!(cell = %name, generation = intent.generation, "writable again");
    } else if !intent.writable && !pos.read_only {
        let p = replication::demote(pool).await.map_err(sdk)?;
        tracing::info!(cell = %name, generation = intent.generation, position = %p.gtid_binlog_pos, "fenced: read_only, app sessions killed");
    }
    let existing = replication::connections(pool).await.map_err(sdk)?;
    for source in &intent.replicate_from {
        let status = replication::replica_status(pool, source)
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
            replication::stop_replica(pool, source).await.map_err(sdk)?;
        }
        replication::start_replica(pool, source, &src)
            .await
            .map_err(sdk)?;
        tracing::info!(cell = %name, %source, "replication (re)configured");
    }
    for extra in existing
        .iter()
        .filter(|c| !intent.replicate_from.contains(c))
    {
        replication::stop_replica(pool, extra).await.map_err(sdk)?;
        // The pause between attempts is for a connection that keeps failing; one an
        // intent stopped starts at once when an intent asks for it again.
        st.reconfigured.remove(extra);
        tracing::info!(cell = %name, source = %extra, "replication stopped");
    }
    if let (Some(source), Some(operation)) = (&intent.rebuild_from, &intent.operation) {
        if RebuildTask::needs_run(st.rebuild.as_ref(), operation) {
            st.rebuild = Some(start_rebuild(cfg, name, operation, source, regs, pool)?);
        }
    }
    // A move that cannot start yet (the source not registered) must not stop the cell's
    // own reports: said once, tried again every pass.
    match carry_out_moves(cfg, st, name, intent, regs) {
        Ok(()) => st.move_error.clear(),
        Err(e) => {
            let msg = e.to_string();
            if st.move_error != msg {
                tracing::warn!(cell = %name, error = %msg, "slot move: cannot start the copy yet");
                st.move_error = msg;
            }
        }
    }
    st.applied_generation = intent.generation;
    Ok(())
}

/// Starts, steers or stops the slot move into this cell and the deletion of its moved
/// slots' old copies, as the intent orders.
fn carry_out_moves(
    cfg: &AgentConfig,
    st: &mut CellState,
    name: &str,
    intent: &Intent,
    regs: &BTreeMap<String, Registration>,
) -> Result<()> {
    let own = Side {
        opts: st.admin_opts.clone(),
        schema: mysql_database(name),
    };
    match intent.slot_move.as_deref() {
        Some(order) => match st.slot_move.as_ref() {
            // Going on, or ended with its answer (synced, or rows that differ) for the
            // leader: nothing to start.
            Some(task) if task.operation == order.operation && !task.needs_restart() => {
                task.follow(order)
            }
            _ => {
                let src = replication_source(cfg, regs, &order.source)?;
                let source = Side {
                    opts: mysql_async::OptsBuilder::default()
                        .ip_or_hostname(src.host)
                        .tcp_port(src.port)
                        .user(Some(src.user))
                        .pass(Some(src.password))
                        .into(),
                    schema: mysql_database(&order.source),
                };
                st.slot_move = Some(MoveTask::start(name, order, source, own.clone()));
            }
        },
        None => {
            if let Some(task) = st.slot_move.as_ref().filter(|t| t.running()) {
                tracing::info!(cell = %name, operation = %task.operation, "slot move: order withdrawn; the copy stops");
                task.stop();
            }
        }
    }
    if let Some(order) = intent.retire.as_deref() {
        if RetireTask::needs_run(st.retire.as_ref(), order) {
            tracing::warn!(cell = %name, operation = %order.operation, slots = %order.slots, "deleting this cell's copies of moved slots");
            st.retire = Some(RetireTask::start(name, order, own));
        }
    }
    Ok(())
}

/// What the region reports about the cell: its MySQL (position, role, replication,
/// rebuild) and its app (readiness, order backlog, request rate).
async fn measure(
    cfg: &AgentConfig,
    st: &mut CellState,
    name: &str,
    regs: &BTreeMap<String, Registration>,
    pool: &mysql_async::Pool,
) -> Result<Live> {
    // The database and the app are measured at once: an operation's step waits on this
    // report, and the two answer independently.
    let measure_mysql = async {
        let pos = replication::position(pool).await.map_err(sdk)?;
        let replicas = measure_replicas(cfg, name, pool, regs).await?;
        Ok::<_, crate::Error>((pos, replicas))
    };
    let measure_app = async {
        match regs.get(name).and_then(|r| r.endpoints.get("app")) {
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
        .get_or_create(&crate::metrics::CellLabel {
            cell: name.to_string(),
        })
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
            slot_move: st.slot_move.as_ref().map(MoveTask::snapshot),
            retired: st.retire.as_ref().map(|t| t.report.lock().clone()),
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
