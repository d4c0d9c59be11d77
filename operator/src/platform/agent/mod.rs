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
mod cell;
pub mod mover;
pub mod rebuild;

use crate::platform::observe::read_values;
use crate::registration::Registrar;
use crate::Result;
use cellplane_cell_sdk::replication;
use cellplane_cells::crd::Cell;
use cellplane_cells::etcd_keys::{cells_prefix, intents_prefix, Intent, Registration};
use etcd_client::Client;
use futures::StreamExt;
use kube::runtime::reflector::{self, Store as KubeStore};
use kube::runtime::{watcher, WatchStreamExt};
use kube::{Api, ResourceExt};
use std::collections::{BTreeMap, HashMap, HashSet};
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

/// How often the agent measures while an operation moves one of its cells.
const OPERATION_INTERVAL: Duration = Duration::from_millis(50);
/// The longest one cell's pass may take (its intent carried out, its MySQL and app
/// measured); a pass over it that takes longer is abandoned and retried next time.
const CELL_SERVE_TIMEOUT: Duration = Duration::from_secs(5);

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
        let mut states: HashMap<String, cell::CellState> = HashMap::new();
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
    /// Cells this watchdog put read-only. A cell with an intent follows it once etcd
    /// answers again; one without (not in the table yet: no slots, no users) would stay
    /// read-only for good, its app unable to create its schema, never Ready, never placed.
    self_fenced: parking_lot::Mutex<HashSet<String>>,
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

    /// Fences every cell whose MySQL this region reaches once the etcd majority has not
    /// answered for `fence_after` (counted from the start when it never answered), and
    /// keeps trying a cell until its MySQL is confirmed read-only: a fence that failed or
    /// timed out is tried again while the region stays cut off.
    async fn guard(&self, fence_after: Duration) {
        let started = Instant::now();
        let mut fenced: HashSet<String> = HashSet::new();
        let mut failures: HashMap<String, u32> = HashMap::new();
        let mut was_lost = false;
        loop {
            tokio::time::sleep(Duration::from_millis(50)).await;
            let contact = self.contact.lock().unwrap_or(started);
            let lost = contact.elapsed() >= fence_after;
            if lost {
                let pools: Vec<(String, mysql_async::Pool)> = self
                    .pools
                    .lock()
                    .iter()
                    .filter(|(c, _)| !fenced.contains(*c))
                    .map(|(c, p)| (c.clone(), p.clone()))
                    .collect();
                for (cell, pool) in pools {
                    let tries = failures.entry(cell.clone()).or_default();
                    match fence_cell(&cell, &pool, fence_after).await {
                        Ok(()) => {
                            self.self_fenced.lock().insert(cell.clone());
                            fenced.insert(cell);
                        }
                        // Said on the first failure and then every 20th: it is retried
                        // every pass while the region stays cut off.
                        Err(e) => {
                            *tries += 1;
                            if *tries % 20 == 1 {
                                tracing::error!(%cell, error = %e, attempts = *tries, "could not fence the cell's MySQL after losing the global etcd; trying again");
                            }
                        }
                    }
                }
            } else if was_lost {
                fenced.clear();
                failures.clear();
                tracing::info!(
                    "region agent: the global etcd answers again; the cells follow their intents"
                );
            }
            was_lost = lost;
        }
    }
}

/// Puts the cell's MySQL read-only (the app's sessions killed) unless it already is; Ok
/// once it is confirmed read-only.
async fn fence_cell(cell: &str, pool: &mysql_async::Pool, after: Duration) -> Result<(), String> {
    let fenced = async {
        let pos = replication::position(pool).await?;
        if pos.read_only {
            return Ok(None);
        }
        replication::demote(pool).await.map(Some)
    };
    match tokio::time::timeout(Duration::from_secs(2), fenced).await {
        Ok(Ok(Some(p))) => {
            tracing::warn!(%cell, position = %p.gtid_binlog_pos, no_contact_ms = after.as_millis() as u64, "fenced itself: no contact with the global etcd majority; read_only until it answers again");
            Ok(())
        }
        Ok(Ok(None)) => Ok(()),
        Ok(Err(e)) => Err(e.to_string()),
        Err(_) => Err("no answer within 2 s".into()),
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
    states: &mut HashMap<String, cell::CellState>,
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
        if !intents.contains_key(&name) && watch.self_fenced.lock().contains(&name) {
            // Fenced by the watchdog while it had no intent: etcd answers again (this pass
            // read it), and nothing of the table's lives in it yet.
            if let Some(pool) = states.get(&name).map(|s| s.pool.clone()) {
                match replication::make_writable(&pool).await {
                    Ok(()) => {
                        watch.self_fenced.lock().remove(&name);
                        tracing::info!(cell = %name, "writable again: fenced while it had no intent, and etcd answers");
                    }
                    Err(e) => {
                        tracing::warn!(cell = %name, error = %e, "could not lift the self-fence of a cell with no intent")
                    }
                }
            }
        }
        // Bounded: a cell whose MySQL swallows packets (a NetworkPolicy's drop, a pod not
        // started yet) would otherwise hold a connect for minutes, and every other cell of
        // the region with it.
        let outcome = tokio::time::timeout(
            CELL_SERVE_TIMEOUT,
            cell::serve(cfg, kube, &cell, intents.get(&name), &regs, states),
        )
        .await
        .unwrap_or_else(|_| {
            Err(crate::Error::TimedOut {
                what: format!("cell {name}'s MySQL or Kubernetes API"),
                after: CELL_SERVE_TIMEOUT,
            })
        });
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
