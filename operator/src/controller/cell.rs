//! The Cell reconciler (I/O): fetch (its Secrets, its set's placement from a reflector)
//! -> build the whole desired state (pure, `build::render`: Secrets to create and the
//! endpoint map included) -> apply -> status, computed once (pure, `status::compute`) ->
//! report. A finalizer removes the cell's etcd registration before deletion completes.

use super::owned::{self, apply_if_changed, Ledger, OwnedStores};
use super::{error_action, Context};
use crate::build::{self, names, secret, CellContext, Store, CELL_FINALIZER};
use crate::status::{self, Observed, Readiness};
use crate::{Error, Result};
use cellplane_cells::crd::{Cell, CellPhase, CellSet, CellStatus};
use cellplane_cells::etcd_keys::Registration;
use futures::StreamExt;
use k8s_openapi::api::apps::v1::{Deployment, StatefulSet};
use k8s_openapi::api::core::v1::{ConfigMap, Secret, Service};
use k8s_openapi::api::networking::v1::NetworkPolicy;
use k8s_openapi::api::policy::v1::PodDisruptionBudget;
use kube::api::{Api, PartialObjectMeta, Patch, PatchParams, PostParams};
use kube::runtime::controller::{Action, Controller};
use kube::runtime::events::EventType;
use kube::runtime::finalizer::{finalizer, Event as Finalizer};
use kube::runtime::reflector::{self, reflector, ObjectRef};
use kube::runtime::{watcher, WatchStreamExt};
use kube::ResourceExt;
use rand::distr::{Alphanumeric, SampleString};
use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::Duration;

pub const CONTROLLER: &str = "cell";
/// Re-check period when nothing changes (status drift, registration refresh).
const RESYNC: Duration = Duration::from_secs(60);
/// How soon a cell whose external store did not answer is checked again (nothing else
/// would wake its reconcile when the store comes up).
const EXTERNAL_RETRY: Duration = Duration::from_secs(10);

/// The Cell reconciler's context: the shared one plus a reflector of CellSets (a cell's
/// placement comes from its set's status, read from memory, not from the API server).
pub struct CellReconciler {
    pub ctx: Arc<Context>,
    pub cellsets: reflector::Store<CellSet>,
    /// The cells' children, from the watches that also trigger reconciles.
    pub owned: OwnedStores,
    /// What was applied last, so unchanged objects are not sent again.
    pub ledger: Ledger,
}

/// What a reconcile reads before it builds anything.
struct Fetched {
    /// The cell's Secrets that exist, by name.
    secrets: BTreeSet<String>,
    /// Slots and epoch from the owning CellSet's placement.
    placement: (u32, u64),
}

async fn fetch(cell: &Cell, cx: &CellContext<'_>, r: &CellReconciler) -> Result<Fetched> {
    r.owned.ready().await;
    let secrets = Store::ALL
        .into_iter()
        .filter(|s| s.has_secret())
        .map(|store| names::secret(cx.name, store))
        .filter(|name| {
            r.owned
                .secrets
                .get(&ObjectRef::new(name).within(cx.namespace))
                .is_some()
        })
        .collect();
    let set = cell
        .labels()
        .get(names::LABEL_CELLSET)
        .and_then(|set| r.cellsets.get(&ObjectRef::new(set).within(cx.namespace)));
    Ok(Fetched {
        secrets,
        placement: build::cellset::placement_of(set.as_deref(), cx.name),
    })
}

/// Fresh passwords for the Secrets to create (the one source of randomness).
fn new_passwords(missing: Vec<Store>) -> Vec<(Store, secret::Passwords)> {
    let mut rng = rand::rng();
    missing
        .into_iter()
        .map(|store| {
            let pw = (0..secret::passwords_needed(store))
                .map(|_| Alphanumeric.sample_string(&mut rng, secret::PASSWORD_LEN))
                .collect();
            (store, secret::Passwords(pw))
        })
        .collect()
}

/// Applies the desired state; returns the workloads as the API server has them.
async fn apply_all(cell: &Cell, r: &CellReconciler, desired: &build::Desired) -> Result<Applied> {
    let ctx = r.ctx.as_ref();
    let client = &ctx.client;
    let (owned, ledger) = (&r.owned, &r.ledger);
    for o in &desired.secrets {
        let name = o.metadata.name.clone().unwrap_or_default();
        let api: Api<Secret> = Api::namespaced(
            client.clone(),
            o.metadata.namespace.as_deref().unwrap_or_default(),
        );
        match api.create(&PostParams::default(), o).await {
            Ok(_) => {
                ctx.event(
                    cell,
                    EventType::Normal,
                    "SecretCreated",
                    format!("generated credentials in Secret {name}"),
                )
                .await
            }
            // Another reconcile won the race: keep its Secret.
            Err(kube::Error::Api(e)) if e.code == 409 => {}
            Err(e) => return Err(e.into()),
        }
    }
    // Metadata-only children: applied when changed, nothing to read back.
    for o in &desired.config_maps {
        let cur = owned::find(&owned.config_maps, o);
        apply_if_changed(client, ledger, o, cur.as_ref().map(|c| &c.metadata)).await?;
    }
    for o in &desired.pdbs {
        let cur = owned::find(&owned.pdbs, o);
        apply_if_changed(client, ledger, o, cur.as_ref().map(|c| &c.metadata)).await?;
    }
    for o in &desired.network_policies {
        let cur = owned::find(&owned.network_policies, o);
        apply_if_changed(client, ledger, o, cur.as_ref().map(|c| &c.metadata)).await?;
    }
    // Whole children: their status is read, from the apply's answer or from the watch.
    let services = apply_all_of(client, ledger, &owned.services, &desired.services).await?;
    let sts = apply_all_of(client, ledger, &owned.statefulsets, &desired.statefulsets).await?;
    let deps = apply_all_of(client, ledger, &owned.deployments, &desired.deployments).await?;
    Ok(Applied {
        deployments: deps,
        statefulsets: sts,
        services,
    })
}

/// Applies each changed object of one kind; every object as the API server last gave it.
async fn apply_all_of<K>(
    client: &kube::Client,
    ledger: &Ledger,
    store: &reflector::Store<K>,
    desired: &[K],
) -> Result<Vec<K>>
where
    K: kube::Resource<Scope = k8s_openapi::NamespaceResourceScope, DynamicType = ()>
        + Clone
        + std::fmt::Debug
        + serde::Serialize
        + serde::de::DeserializeOwned
        + Send
        + Sync
        + 'static,
{
    let mut out = Vec::with_capacity(desired.len());
    for o in desired {
        let cur = owned::find(store, o);
        match apply_if_changed(client, ledger, o, cur.as_ref().map(|c| c.meta())).await? {
            Some(applied) => out.push(applied),
            None => out.extend(cur.map(|c| (*c).clone())),
        }
    }
    Ok(out)
}

/// The objects as the API server returned them from the apply (with their status).
struct Applied {
    deployments: Vec<Deployment>,
    statefulsets: Vec<StatefulSet>,
    services: Vec<Service>,
}

/// How long the operator waits for an external store to accept a connection.
const EXTERNAL_CONNECT_TIMEOUT: Duration = Duration::from_secs(2);

/// Whether an external store accepted a connection (`Err`: why not).
type Connected = std::result::Result<(), String>;

/// Whether one of the `host:port` endpoints (comma-separated) accepts a TCP connection.
async fn connects(endpoint: &str) -> Connected {
    let mut errors = vec![];
    for address in endpoint.split(',').map(str::trim) {
        match tokio::time::timeout(
            EXTERNAL_CONNECT_TIMEOUT,
            tokio::net::TcpStream::connect(address),
        )
        .await
        {
            Ok(Ok(_)) => return Ok(()),
            Ok(Err(e)) => errors.push(format!("{address}: {e}")),
            Err(_) => errors.push(format!(
                "{address}: no answer in {}s",
                EXTERNAL_CONNECT_TIMEOUT.as_secs()
            )),
        }
    }
    Err(errors.join("; "))
}

/// Each external store's connection check, run side by side.
async fn check_external_stores(cx: &CellContext<'_>) -> BTreeMap<Store, Connected> {
    let checks = Store::ALL.into_iter().filter_map(|store| {
        let endpoint = cx.store(store).external.as_ref()?.endpoint.clone();
        Some(async move { (store, connects(&endpoint).await) })
    });
    futures::future::join_all(checks)
        .await
        .into_iter()
        .collect()
}

fn store_readiness(
    cx: &CellContext,
    store: Store,
    sts: &[StatefulSet],
    external: &BTreeMap<Store, Connected>,
) -> Readiness {
    if let (Some(spec), Some(connected)) = (&cx.store(store).external, external.get(&store)) {
        return status::external(store.field(), &spec.endpoint, connected);
    }
    let name = names::store(cx.name, store);
    status::statefulset(
        sts.iter()
            .find(|s| s.metadata.name.as_deref() == Some(&name)),
    )
}

/// Registers a Ready cell in etcd (kept alive on a lease); None without a registrar.
async fn register(
    cell: &Cell,
    ctx: &Context,
    observed: &Observed,
    routable: bool,
) -> Option<Readiness> {
    let registrar = ctx.registrar.as_ref()?;
    if !status::readiness(observed).ready {
        return Some(Readiness {
            ready: false,
            reason: "NotReady",
            message: "registers once Ready".into(),
        });
    }
    if !routable {
        return Some(Readiness {
            ready: false,
            reason: "AwaitingLoadBalancer",
            message: "spec.app.expose is LoadBalancer and the app Service has no load balancer address yet; routers could not dial the cell".into(),
        });
    }
    let reg = Registration {
        region: cell.spec.region.clone(),
        zone: cell.spec.zone.clone(),
        state: status::phase(cell.status.as_ref(), observed),
        capacity_weight: cell.spec.capacity_weight,
        standby: cell.spec.standby.as_ref().map(|s| s.cell.clone()),
        endpoints: observed.endpoints.clone(),
        healthy: true,
        mysql: None,
        kafka_lag: None,
        requests_per_sec: None,
        intent_generation: 0,
        healthy_since_ms: None,
    };
    Some(
        match registrar
            .register(&cell.spec.platform, &cell.name_any(), &reg)
            .await
        {
            Ok(()) => Readiness {
                ready: true,
                reason: "Registered",
                message: "registration kept alive in etcd".into(),
            },
            Err(e) => Readiness {
                ready: false,
                reason: "EtcdUnavailable",
                message: e.to_string(),
            },
        },
    )
}

/// fetch -> build (pure) -> apply -> status (computed once) -> report.
async fn apply_cell(cell: Arc<Cell>, r: &CellReconciler) -> Result<Action> {
    let ctx = r.ctx.as_ref();
    if ctx
        .region
        .as_ref()
        .is_some_and(|reg| reg != &cell.spec.region)
    {
        // Another region's operator runs this cell.
        return Ok(Action::await_change());
    }
    let cx = CellContext::from_cell(&cell)?.with_etcd(&ctx.etcd_endpoints, &ctx.timings);
    let fetched = fetch(&cell, &cx, r).await?;
    let passwords = new_passwords(build::missing_secrets(&cx, &fetched.secrets));
    let desired = match build::render(&cx, &passwords) {
        Ok(d) => d,
        Err(e) => {
            mark_failed(&cell, ctx, "InvalidSpec", &e.to_string()).await?;
            return Err(e);
        }
    };
    let applied = match apply_all(&cell, r, &desired).await {
        Ok(a) => a,
        Err(e) => {
            if let Some(message) = e.refused_by_api_server() {
                let message = format!("the API server refused the cell's objects: {message}");
                mark_failed(&cell, ctx, "ApplyFailed", &message).await?;
            }
            return Err(e);
        }
    };
    let pruned = super::prune::prune(&ctx.client, &r.ledger, &r.owned, &cell, &desired).await?;
    if !pruned.is_empty() {
        let message = format!(
            "deleted what the spec no longer renders: {}",
            pruned.join(", ")
        );
        ctx.event(cell.as_ref(), EventType::Normal, "Pruned", message)
            .await;
    }
    let (deployments, statefulsets) = (&applied.deployments, &applied.statefulsets);
    let app_service = applied
        .services
        .iter()
        .find(|s| s.metadata.name.as_deref() == Some(&names::app(cx.name)));
    let app_address = build::app_address(&cx, app_service);
    let mut endpoints = desired.endpoints.clone();
    if let Some(a) = &app_address {
        endpoints.insert("app".into(), a.clone());
    }
    let (slots, epoch) = fetched.placement;
    let external = check_external_stores(&cx).await;
    let mut observed = Observed {
        generation: cell.metadata.generation,
        app: status::deployment(deployments.first()),
        redis: store_readiness(&cx, Store::Redis, statefulsets, &external),
        mysql: store_readiness(&cx, Store::Mysql, statefulsets, &external),
        kafka: store_readiness(&cx, Store::Kafka, statefulsets, &external),
        registered: None,
        slots,
        epoch,
        endpoints: endpoints.clone(),
        cellset: cell.labels().get(names::LABEL_CELLSET).cloned(),
    };
    observed.registered = register(&cell, ctx, &observed, app_address.is_some()).await;
    let now = k8s_openapi::jiff::Timestamp::now().to_string();
    let next = status::compute(cell.status.as_ref(), &observed, &now);
    let state = crate::metrics::PhaseLabel {
        phase: phase_name(next.phase),
        ready: if status::readiness(&observed).ready {
            "true"
        } else {
            "false"
        },
    };
    update_status(&cell, ctx, next).await?;
    ctx.metrics.cell_state(&state_key(&cell), Some(state));
    if external.values().any(Result::is_err) {
        return Ok(Action::requeue(EXTERNAL_RETRY));
    }
    Ok(Action::requeue(RESYNC))
}

/// Says on the Cell (status and a Warning event) why it cannot be built.
async fn mark_failed(
    cell: &Cell,
    ctx: &Context,
    reason: &'static str,
    message: &str,
) -> Result<()> {
    ctx.event(cell, EventType::Warning, reason, message.to_string())
        .await;
    let now = k8s_openapi::jiff::Timestamp::now().to_string();
    let next = status::failed(
        cell.status.as_ref(),
        cell.metadata.generation,
        reason,
        message,
        &now,
    );
    update_status(cell, ctx, next).await
}

fn state_key(cell: &Cell) -> String {
    format!(
        "{}/{}",
        cell.namespace().unwrap_or_default(),
        cell.name_any()
    )
}

fn phase_name(phase: Option<CellPhase>) -> &'static str {
    match phase {
        None => "None",
        Some(CellPhase::Pending) => "Pending",
        Some(CellPhase::Active) => "Active",
        Some(CellPhase::Draining) => "Draining",
        Some(CellPhase::Drained) => "Drained",
        Some(CellPhase::FailedOver) => "FailedOver",
        Some(CellPhase::Standby) => "Standby",
        Some(CellPhase::Failed) => "Failed",
    }
}

/// Writes the status only when it changed, and records phase changes as events.
async fn update_status(cell: &Cell, ctx: &Context, next: CellStatus) -> Result<()> {
    if cell.status.as_ref() == Some(&next) {
        return Ok(());
    }
    let before = cell.status.as_ref().and_then(|s| s.phase);
    let api: Api<Cell> = Api::namespaced(ctx.client.clone(), &cell.namespace().unwrap_or_default());
    let patch = serde_json::json!({ "status": next });
    api.patch_status(
        &cell.name_any(),
        &PatchParams::default(),
        &Patch::Merge(&patch),
    )
    .await?;
    if before != next.phase {
        let note = format!(
            "phase {:?} -> {:?}",
            before,
            next.phase.unwrap_or(CellPhase::Pending)
        );
        ctx.event(cell, EventType::Normal, "PhaseChanged", note)
            .await;
    }
    Ok(())
}

async fn cleanup_cell(cell: Arc<Cell>, r: &CellReconciler) -> Result<Action> {
    let ctx = r.ctx.as_ref();
    ctx.metrics.cell_state(&state_key(&cell), None);
    // Children are all named `<cell>-...`.
    r.ledger.forget_namespace_prefix(
        &cell.namespace().unwrap_or_default(),
        &format!("{}-", cell.name_any()),
    );
    if let Some(registrar) = &ctx.registrar {
        registrar
            .deregister(&cell.spec.platform, &cell.name_any())
            .await?;
    }
    ctx.event(
        cell.as_ref(),
        EventType::Normal,
        "Deregistered",
        "registration removed; children are garbage-collected".into(),
    )
    .await;
    Ok(Action::await_change())
}

pub async fn reconcile(cell: Arc<Cell>, r: Arc<CellReconciler>) -> Result<Action> {
    let ctx = &r.ctx;
    let timer = ctx.metrics.start(CONTROLLER);
    let ns = cell
        .namespace()
        .ok_or(Error::MissingField("metadata.namespace"))?;
    let key = ObjectRef::from_obj(cell.as_ref()).erase();
    let api: Api<Cell> = Api::namespaced(ctx.client.clone(), &ns);
    let result = finalizer(&api, CELL_FINALIZER, cell, |event| async {
        match event {
            Finalizer::Apply(c) => apply_cell(c, &r).await,
            Finalizer::Cleanup(c) => cleanup_cell(c, &r).await,
        }
    })
    .await
    .map_err(|e| match e {
        kube::runtime::finalizer::Error::ApplyFailed(e)
        | kube::runtime::finalizer::Error::CleanupFailed(e) => e,
        other => Error::Finalizer(other.to_string()),
    });
    if result.is_ok() {
        ctx.retries.succeeded(&key);
    }
    timer.done(&result);
    result
}

pub fn error_policy(cell: Arc<Cell>, error: &Error, r: Arc<CellReconciler>) -> Action {
    let retries = r
        .ctx
        .retries
        .failed(&ObjectRef::from_obj(cell.as_ref()).erase());
    tracing::warn!(cell = %cell.name_any(), error = %error, retries, "reconcile failed");
    error_action(error, retries)
}

/// Runs the Cell controller until `shutdown` resolves.
pub async fn run(
    ctx: Arc<Context>,
    namespace: Option<String>,
    shutdown: impl std::future::Future<Output = ()> + Send + Sync + 'static,
) {
    let client = ctx.client.clone();
    // Children are watched by our label only: the operator never caches other objects.
    let owned = super::watch_config().labels(&format!(
        "app.kubernetes.io/managed-by={}",
        build::FIELD_MANAGER
    ));
    macro_rules! owned_api {
        ($t:ty) => {
            match &namespace {
                Some(ns) => Api::<$t>::namespaced(client.clone(), ns),
                None => Api::<$t>::all(client.clone()),
            }
        };
    }
    // CellSets from memory: one reflector, ready before the first reconcile (a cell must
    // never be reported with zero slots just because its set was not read yet).
    let (cellsets, writer) = reflector::store::<CellSet>();
    let reflect = reflector(writer, watcher(owned_api!(CellSet), super::watch_config()))
        .default_backoff()
        .for_each(|_| async {});
    let reflect = tokio::spawn(reflect);
    if cellsets.wait_until_ready().await.is_err() {
        tracing::error!("CellSet reflector stopped before it was ready");
        return;
    }
    // One watch per child kind: it triggers the cell's reconcile and fills the store the
    // reconcile reads (see `owned`).
    let (deployments, deployments_changed) = owned::watch(owned_api!(Deployment), owned.clone());
    let (statefulsets, statefulsets_changed) = owned::watch(owned_api!(StatefulSet), owned.clone());
    let (services, services_changed) = owned::watch(owned_api!(Service), owned.clone());
    let (config_maps, config_maps_changed) =
        owned::watch(owned_api!(PartialObjectMeta<ConfigMap>), owned.clone());
    let (pdbs, pdbs_changed) = owned::watch(
        owned_api!(PartialObjectMeta<PodDisruptionBudget>),
        owned.clone(),
    );
    let (network_policies, network_policies_changed) =
        owned::watch(owned_api!(PartialObjectMeta<NetworkPolicy>), owned.clone());
    let (secrets, secrets_changed) = owned::watch(owned_api!(PartialObjectMeta<Secret>), owned);
    let reconciler = Arc::new(CellReconciler {
        ctx,
        cellsets,
        owned: OwnedStores {
            deployments,
            statefulsets,
            services,
            config_maps,
            pdbs,
            network_policies,
            secrets,
        },
        ledger: Ledger::default(),
    });
    // A set's placement changes: its cells' status follows at once.
    let cells_of_set = |set: CellSet| {
        let ns = set.namespace();
        set.status
            .map(|s| s.slots.into_keys().collect::<Vec<_>>())
            .unwrap_or_default()
            .into_iter()
            .map(move |cell| {
                let r = ObjectRef::<Cell>::new(&cell);
                match &ns {
                    Some(ns) => r.within(ns),
                    None => r,
                }
            })
    };
    Controller::new(owned_api!(Cell), super::watch_config())
        .with_config(super::controller_config())
        .watches(owned_api!(CellSet), super::watch_config(), cells_of_set)
        .owns_stream(deployments_changed)
        .owns_stream(statefulsets_changed)
        .owns_stream(services_changed)
        .owns_stream(config_maps_changed)
        .owns_stream(pdbs_changed)
        .owns_stream(network_policies_changed)
        .owns_stream(secrets_changed)
        .trigger_backoff(super::WatchBackoff::default())
        .graceful_shutdown_on(shutdown)
        .run(reconcile, error_policy, reconciler)
        .for_each(|r| async move {
            if let Err(e) = r {
                tracing::debug!(error = %e, "cell controller event");
            }
        })
        .await;
    reflect.abort();
}
