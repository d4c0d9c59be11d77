//! The platform leader (I/O): one leader across every region of a platform, elected in
//! the global etcd. Every region's operator campaigns while it leads its own region; the
//! winner writes the routing table (from the CellSets, the registrations and the pins,
//! [`plan`]) with a compare-and-swap fenced by its election key. Losing the etcd majority
//! or the region's leadership ends the term; another region's operator takes over.
//!
//! Timings (one place): `--platform-lease` (default 5 s) is how long a dead leader blocks
//! a takeover; the leader renews every third of it and stops acting when a renewal has not
//! succeeded for two thirds of it, before the lease can expire under it.

pub mod detect;
pub mod driver;
pub mod election;
pub mod plan;

use super::observe::read_values;
use super::{connect, table_error};
use crate::metrics::Metrics;
use crate::Result;
use cellplane_cells::crd::CellSet;
use cellplane_cells::etcd_keys::{cells_prefix, pins_key, platform_prefix, Registration};
use cellplane_cells::failover_timing::FailoverTimings;
use cellplane_cells::slot::{Slot, DEFAULT_SLOTS};
use cellplane_table::write::{self, Fence, Swap};
use election::Term;
use etcd_client::{Client, WatchOptions};
use futures::StreamExt;
use kube::runtime::reflector::{self, Store};
use kube::runtime::{watcher, WatchStreamExt};
use kube::{Api, ResourceExt};
use plan::{Inputs, Member, Plan};
use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

/// How often the leader looks at a running operation without a change event.
const OPERATION_POLL: Duration = Duration::from_millis(50);
/// How long a new platform's first table waits, after the first declared cell registered,
/// for every other one before it places the slots on the cells that did (the others then
/// join with no slots).
const BRING_UP_GRACE: Duration = Duration::from_secs(30);

/// Settings of the platform controller.
#[derive(Clone, Debug)]
pub struct PlatformConfig {
    pub platform: String,
    pub etcd_endpoints: Vec<String>,
    /// This candidate's name in the election (region and identity).
    pub identity: String,
    pub lease: Duration,
    /// How often the leader re-reads everything even without a change event.
    pub resync: Duration,
    /// Tables kept in `routing-history/`.
    pub history: u64,
    /// Unplanned failover's timings (detection, margin, grace, no-flap window).
    pub timings: FailoverTimings,
    /// Fail lost cells over without asking a person.
    pub auto_failover: bool,
    /// Fail cells back after an unplanned failover without asking a person, once the old
    /// home stayed healthy for `stabilization`.
    pub auto_failback: bool,
    pub stabilization: Duration,
}

/// Campaigns, leads while elected, campaigns again; returns when `stop` resolves.
pub async fn run(
    cfg: PlatformConfig,
    kube: kube::Client,
    metrics: Arc<Metrics>,
    stop: impl std::future::Future<Output = ()>,
) {
    let api: Api<CellSet> = Api::all(kube);
    let (sets, writer) = reflector::store();
    let drive = reflector::reflector(writer, watcher(api, crate::controller::watch_config()))
        .applied_objects()
        .for_each(|_| async {});
    tokio::pin!(drive, stop);
    let lead = async {
        let mut backoff = Duration::from_millis(200);
        loop {
            match lead_once(&cfg, &sets, &metrics).await {
                Ok(()) => backoff = Duration::from_millis(200),
                Err(e) => {
                    tracing::warn!(error = %e, "platform controller: etcd unavailable; campaigning again")
                }
            }
            metrics.platform_leader.set(0);
            tokio::time::sleep(backoff).await;
            backoff = (backoff * 2).min(Duration::from_secs(5));
        }
    };
    tokio::select! {
        _ = &mut stop => {}
        _ = &mut drive => tracing::error!("CellSet watch ended"),
        _ = lead => {}
    }
    metrics.platform_leader.set(0);
}

/// One campaign and, when it wins, one term.
async fn lead_once(cfg: &PlatformConfig, sets: &Store<CellSet>, metrics: &Metrics) -> Result<()> {
    let mut client = connect(&cfg.etcd_endpoints).await?;
    let term = Term::campaign(&mut client, cfg).await?;
    tracing::info!(platform = %cfg.platform, identity = %cfg.identity, "leading the platform");
    metrics.platform_leader.set(1);
    metrics.platform_terms.inc();
    let fence = term.fence();
    let result = tokio::select! {
        r = write_tables(&mut client, cfg, sets, &fence, metrics) => r,
        _ = term.lost() => {
            tracing::error!(platform = %cfg.platform, "platform leadership lost; stopping");
            Ok(())
        }
    };
    metrics.platform_leader.set(0);
    term.resign(&mut client).await;
    result
}

/// The leader's loop: read, plan, compare-and-swap; then wait for a change under the
/// platform's prefix or the resync period. Returns when the term ended (fence failed).
async fn write_tables(
    client: &mut Client,
    cfg: &PlatformConfig,
    sets: &Store<CellSet>,
    fence: &Fence,
    metrics: &Metrics,
) -> Result<()> {
    sets.wait_until_ready()
        .await
        .map_err(|e| crate::Error::InvalidSpec(format!("CellSet store: {e}")))?;
    let mut changes = client
        .watch(
            platform_prefix(&cfg.platform),
            Some(WatchOptions::new().with_prefix()),
        )
        .await?;
    let routers = cellplane_cells::etcd_keys::routers_prefix(&cfg.platform);
    let mut detector = detect::Detector::default();
    // When this leader first saw a declared cell registered (the bring-up grace counts
    // from there: cells whose pods start slowly all register late, together).
    let mut first_registered: Option<std::time::Instant> = None;
    loop {
        match write_table_once(client, cfg, sets, fence, metrics, &mut first_registered).await? {
            Some(Swap::NotLeader) => return Ok(()),
            Some(Swap::Stale) => {
                metrics.table_conflicts.inc();
                continue;
            }
            Some(Swap::Written { .. }) | None => {}
        }
        let Some(operating) = driver::drive(client, cfg, fence, &mut detector, metrics).await?
        else {
            return Ok(());
        };
        // Wait for something that can change the table (router acks cannot, unless an
        // operation waits for them); while an operation runs, poll fast: its write freeze
        // lasts as long as the slowest of these waits.
        let wait = if operating {
            OPERATION_POLL
        } else {
            cfg.resync
        };
        let deadline = tokio::time::sleep(wait);
        tokio::pin!(deadline);
        loop {
            tokio::select! {
                _ = &mut deadline => break,
                msg = changes.message() => {
                    let Some(msg) = msg? else { return Ok(()) };
                    if operating || msg.events().iter().any(|e| e.kv().is_some_and(|kv| !kv.key().starts_with(routers.as_bytes()))) {
                        break;
                    }
                }
            }
        }
    }
}

/// Reads the inputs and the table, writes the planned table (None: nothing to write).
async fn write_table_once(
    client: &mut Client,
    cfg: &PlatformConfig,
    sets: &Store<CellSet>,
    fence: &Fence,
    metrics: &Metrics,
    first_registered: &mut Option<std::time::Instant>,
) -> Result<Option<Swap>> {
    let mut inputs = read_inputs(client, cfg, sets).await?;
    let dialable = |m: &plan::Member| {
        inputs
            .registrations
            .get(&m.name)
            .and_then(plan::dial_address)
            .is_some()
    };
    if inputs.members.iter().any(dialable) {
        first_registered.get_or_insert_with(std::time::Instant::now);
    }
    inputs.bring_up_over = first_registered.is_some_and(|at| at.elapsed() > BRING_UP_GRACE);
    let current = write::read(client, &cfg.platform)
        .await
        .map_err(table_error)?;
    let (plan, ignored) = match plan::next_table(current.table.as_ref(), &inputs) {
        Ok(p) => p,
        Err(e) => {
            metrics.table_plan_errors.inc();
            tracing::error!(error = %e, "no valid routing table from the inputs; keeping the table in force");
            return Ok(None);
        }
    };
    for pin in ignored {
        tracing::warn!(slot = pin.slot, cell = %pin.cell, why = %pin.why, "pin not applied");
    }
    let Plan::Write(next) = plan else {
        return Ok(None);
    };
    let swap = write::compare_and_swap(client, &current, &next, Some(fence), cfg.history)
        .await
        .map_err(table_error)?;
    if let Swap::Written { revision } = swap {
        metrics.table_writes.inc();
        metrics.table_epoch.set(next.epoch as i64);
        tracing::info!(
            epoch = next.epoch,
            revision,
            cells = next.cells.len(),
            "routing table written"
        );
    }
    Ok(Some(swap))
}

/// The declared cells of the platform (every CellSet's stamp), the registrations and pins.
async fn read_inputs(
    client: &mut Client,
    cfg: &PlatformConfig,
    sets: &Store<CellSet>,
) -> Result<Inputs> {
    let mut members: Vec<Member> = sets
        .state()
        .iter()
        .filter(|s| s.spec.platform == cfg.platform && s.metadata.deletion_timestamp.is_none())
        .flat_map(|s| s.spec.stamp(&s.name_any()))
        .map(|c| Member {
            name: c.name,
            region: c.spec.region,
            weight: c.spec.capacity_weight,
            standby: c.spec.standby.map(|s| s.cell),
        })
        .collect();
    members.sort_by(|a, b| a.name.cmp(&b.name));
    members.dedup_by(|a, b| a.name == b.name);
    let registrations: BTreeMap<String, Registration> =
        read_values(client, &cells_prefix(&cfg.platform)).await?;
    let pins = match client.get(pins_key(&cfg.platform), None).await?.kvs().first() {
        None => BTreeMap::new(),
        Some(kv) => serde_json::from_slice::<BTreeMap<Slot, String>>(kv.value()).unwrap_or_else(|e| {
            tracing::warn!(error = %e, "pins are not a JSON object of slot -> cell; ignoring them");
            BTreeMap::new()
        }),
    };
    Ok(Inputs {
        platform: cfg.platform.clone(),
        slots: DEFAULT_SLOTS,
        members,
        registrations,
        pins,
        bring_up_over: false,
    })
}
