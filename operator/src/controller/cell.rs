//! The Cell reconciler (I/O): fetch -> validate -> build -> apply -> status, with a
//! finalizer that removes the cell's etcd registration before deletion completes.

use super::{apply, error_action, Context};
use crate::build::{self, names, secret, CellContext, Store, CELL_FINALIZER};
use crate::status::{self, Observed, Readiness};
use crate::{Error, Result};
use cellplane_cells::crd::{condition, Cell, CellPhase, CellSet, CellStatus};
use cellplane_cells::etcd_keys::Registration;
use futures::StreamExt;
use k8s_openapi::api::apps::v1::{Deployment, StatefulSet};
use k8s_openapi::api::core::v1::{ConfigMap, Secret, Service};
use k8s_openapi::api::networking::v1::NetworkPolicy;
use k8s_openapi::api::policy::v1::PodDisruptionBudget;
use kube::api::{Api, Patch, PatchParams, PostParams};
use kube::runtime::controller::{Action, Controller};
use kube::runtime::events::EventType;
use kube::runtime::finalizer::{finalizer, Event as Finalizer};
use kube::ResourceExt;
use rand::distr::{Alphanumeric, SampleString};
use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

pub const CONTROLLER: &str = "cell";
/// Re-check period when nothing changes (status drift, registration refresh).
const RESYNC: Duration = Duration::from_secs(60);

fn fresh_password() -> String {
    Alphanumeric.sample_string(&mut rand::rng(), secret::PASSWORD_LEN)
}

/// Creates each store's credentials Secret if it is missing; never overwrites one.
async fn ensure_secrets(cell: &Cell, cx: &CellContext<'_>, ctx: &Context) -> Result<()> {
    let api: Api<Secret> = Api::namespaced(ctx.client.clone(), cx.namespace);
    for store in Store::ALL {
        if !store.has_secret() || cx.store(store).in_cluster.is_none() {
            continue;
        }
        let name = names::secret(cx.name, store);
        if api.get_metadata_opt(&name).await?.is_some() {
            continue;
        }
        let pw = secret::Passwords(
            (0..secret::passwords_needed(store))
                .map(|_| fresh_password())
                .collect(),
        );
        let Some(obj) = secret::store(cx, store, &pw) else {
            continue;
        };
        match api.create(&PostParams::default(), &obj).await {
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
    Ok(())
}

async fn apply_all(
    client: &kube::Client,
    desired: &build::Desired,
) -> Result<(Vec<Deployment>, Vec<StatefulSet>)> {
    for o in &desired.config_maps {
        apply::<ConfigMap>(client, o).await?;
    }
    for o in &desired.services {
        apply::<Service>(client, o).await?;
    }
    let mut sts = Vec::new();
    for o in &desired.statefulsets {
        sts.push(apply::<StatefulSet>(client, o).await?);
    }
    let mut deps = Vec::new();
    for o in &desired.deployments {
        deps.push(apply::<Deployment>(client, o).await?);
    }
    for o in &desired.pdbs {
        apply::<PodDisruptionBudget>(client, o).await?;
    }
    for o in &desired.network_policies {
        apply::<NetworkPolicy>(client, o).await?;
    }
    Ok((deps, sts))
}

/// Slots and epoch as the owning CellSet's placement says (0 for standalone cells
/// until the routing table in etcd takes over).
async fn placement_of(cell: &Cell, ctx: &Context) -> (u32, u64) {
    let (Some(set), Some(ns)) = (cell.labels().get(names::LABEL_CELLSET), cell.namespace()) else {
        return (0, 0);
    };
    let api: Api<CellSet> = Api::namespaced(ctx.client.clone(), &ns);
    match api.get_opt(set).await {
        Ok(Some(s)) => {
            let st = s.status.unwrap_or_default();
            (
                st.slots.get(&cell.name_any()).copied().unwrap_or(0),
                st.epoch,
            )
        }
        _ => (0, 0),
    }
}

fn store_readiness(cx: &CellContext, store: Store, sts: &[StatefulSet]) -> Readiness {
    if cx.store(store).external.is_some() {
        return status::external();
    }
    let name = names::store(cx.name, store);
    status::statefulset(
        sts.iter()
            .find(|s| s.metadata.name.as_deref() == Some(&name)),
    )
}

async fn apply_cell(cell: Arc<Cell>, ctx: &Context) -> Result<Action> {
    if ctx.region.as_ref().is_some_and(|r| r != &cell.spec.region) {
        // Another region's operator runs this cell.
        return Ok(Action::await_change());
    }
    let cx = CellContext::from_cell(&cell)?;
    let desired = match build::render(&cx) {
        Ok(d) => d,
        Err(e) => {
            ctx.event(
                cell.as_ref(),
                EventType::Warning,
                "InvalidSpec",
                e.to_string(),
            )
            .await;
            return Err(e);
        }
    };
    ensure_secrets(&cell, &cx, ctx).await?;
    let (deployments, statefulsets) = apply_all(&ctx.client, &desired).await?;
    let (slots, epoch) = placement_of(&cell, ctx).await;

    let mut endpoints = BTreeMap::from([(
        "app".to_string(),
        names::app_address(cx.name, cx.namespace, cell.spec.app.port),
    )]);
    for store in Store::ALL {
        endpoints.insert(
            store.component().into(),
            build::config_map::store_address(&cx, store),
        );
    }
    let mut observed = Observed {
        generation: cell.metadata.generation,
        app: status::deployment(deployments.first()),
        redis: store_readiness(&cx, Store::Redis, &statefulsets),
        mysql: store_readiness(&cx, Store::Mysql, &statefulsets),
        kafka: store_readiness(&cx, Store::Kafka, &statefulsets),
        registered: None,
        slots,
        epoch,
        endpoints: endpoints.clone(),
    };
    let now = k8s_openapi::jiff::Timestamp::now().to_string();
    let mut next = status::compute(&cell.spec, cell.status.as_ref(), &observed, &now);
    let ready = next
        .conditions
        .iter()
        .any(|c| c.type_ == condition::READY && c.status == "True");

    if let Some(registrar) = &ctx.registrar {
        observed.registered = Some(if ready {
            let reg = Registration {
                region: cell.spec.region.clone(),
                zone: cell.spec.zone.clone(),
                state: next.phase.unwrap_or(CellPhase::Pending),
                capacity_weight: cell.spec.capacity_weight,
                standby: cell.spec.standby.as_ref().map(|s| s.cell.clone()),
                endpoints,
                healthy: true,
            };
            match registrar.register(&cell.spec.platform, cx.name, &reg).await {
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
            }
        } else {
            Readiness {
                ready: false,
                reason: "NotReady",
                message: "registers once Ready".into(),
            }
        });
        next = status::compute(&cell.spec, cell.status.as_ref(), &observed, &now);
    }
    update_status(&cell, ctx, next).await?;
    Ok(Action::requeue(RESYNC))
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

async fn cleanup_cell(cell: Arc<Cell>, ctx: &Context) -> Result<Action> {
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

pub async fn reconcile(cell: Arc<Cell>, ctx: Arc<Context>) -> Result<Action> {
    let timer = ctx.metrics.start(CONTROLLER);
    let ns = cell
        .namespace()
        .ok_or(Error::MissingField("metadata.namespace"))?;
    let api: Api<Cell> = Api::namespaced(ctx.client.clone(), &ns);
    let result = finalizer(&api, CELL_FINALIZER, cell, |event| async {
        match event {
            Finalizer::Apply(c) => apply_cell(c, &ctx).await,
            Finalizer::Cleanup(c) => cleanup_cell(c, &ctx).await,
        }
    })
    .await
    .map_err(|e| match e {
        kube::runtime::finalizer::Error::ApplyFailed(e)
        | kube::runtime::finalizer::Error::CleanupFailed(e) => e,
        other => Error::Finalizer(other.to_string()),
    });
    timer.done(&result);
    result
}

pub fn error_policy(cell: Arc<Cell>, error: &Error, _ctx: Arc<Context>) -> Action {
    tracing::warn!(cell = %cell.name_any(), error = %error, "reconcile failed");
    error_action(error, 1)
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
    Controller::new(owned_api!(Cell), super::watch_config())
        .owns(owned_api!(Deployment), owned.clone())
        .owns(owned_api!(StatefulSet), owned.clone())
        .owns(owned_api!(Service), owned.clone())
        .owns(owned_api!(ConfigMap), owned.clone())
        .owns(owned_api!(PodDisruptionBudget), owned.clone())
        .owns(owned_api!(NetworkPolicy), owned.clone())
        .owns(owned_api!(Secret), owned)
        .trigger_backoff(super::WatchBackoff::default())
        .graceful_shutdown_on(shutdown)
        .run(reconcile, error_policy, ctx)
        .for_each(|r| async move {
            if let Err(e) = r {
                tracing::debug!(error = %e, "cell controller event");
            }
        })
        .await;
}
