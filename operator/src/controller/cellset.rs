//! The CellSet reconciler (I/O): fetch its cells -> build (pure, `build::cellset`: the
//! cells it wants, the placement, the status) -> apply them and delete the ones scaled
//! away -> write the status when it changed.

use super::{apply, error_action, Context};
use crate::build::{cellset, names};
use crate::{Error, Result};
use cellplane_cells::crd::{Cell, CellSet, CellSetStatus};
use futures::StreamExt;
use kube::api::{Api, DeleteParams, ListParams, Patch, PatchParams};
use kube::runtime::controller::{Action, Controller};
use kube::runtime::events::EventType;
use kube::runtime::reflector::ObjectRef;
use kube::ResourceExt;
use std::sync::Arc;
use std::time::Duration;

pub const CONTROLLER: &str = "cellset";

async fn apply_set(set: Arc<CellSet>, ctx: &Context) -> Result<Action> {
    let ns = set
        .namespace()
        .ok_or(Error::MissingField("metadata.namespace"))?;
    let api: Api<Cell> = Api::namespaced(ctx.client.clone(), &ns);
    // Fetch: the cells the set has now.
    let selector = format!("{}={}", names::LABEL_CELLSET, set.name_any());
    let existing = api.list(&ListParams::default().labels(&selector)).await?;
    // Build (pure): the cells it wants, the placement, the status.
    let built = cellset::desired_cells(&set, ctx.region.as_deref())
        .and_then(|desired| Ok((desired, cellset::placement_counts(&set)?)));
    let (desired, slots) = match built {
        Ok(b) => b,
        Err(e) => {
            mark_failed(&set, ctx, "InvalidSpec", &e.to_string()).await?;
            return Err(e);
        }
    };
    let now = k8s_openapi::jiff::Timestamp::now().to_string();
    let next = cellset::status(&set, desired.len(), slots, &existing.items, &now);
    // Apply: every wanted cell; scale down: delete ours that are no longer wanted.
    for cell in &desired {
        if let Err(e) = apply::<Cell>(&ctx.client, cell).await {
            if let Some(message) = e.refused_by_api_server() {
                let message = format!("the API server refused Cell {}: {message}", cell.name_any());
                mark_failed(&set, ctx, "ApplyFailed", &message).await?;
            }
            return Err(e);
        }
    }
    for cell in &existing.items {
        if !desired.iter().any(|d| d.name_any() == cell.name_any()) {
            api.delete(&cell.name_any(), &DeleteParams::default())
                .await?;
            ctx.event(
                set.as_ref(),
                EventType::Normal,
                "CellRemoved",
                format!("scaled down: deleted Cell {}", cell.name_any()),
            )
            .await;
        }
    }
    let previous = set.status.clone().unwrap_or_default();
    if previous.epoch != next.epoch {
        ctx.event(
            set.as_ref(),
            EventType::Normal,
            "PlacementChanged",
            format!("placement epoch {}", next.epoch),
        )
        .await;
    }
    write_status(&set, ctx, next).await?;
    Ok(Action::requeue(Duration::from_secs(60)))
}

/// Says on the CellSet (status and a Warning event) why its cells cannot be applied.
async fn mark_failed(
    set: &CellSet,
    ctx: &Context,
    reason: &'static str,
    message: &str,
) -> Result<()> {
    ctx.event(set, EventType::Warning, reason, message.to_string())
        .await;
    let now = k8s_openapi::jiff::Timestamp::now().to_string();
    write_status(set, ctx, cellset::failed(set, reason, message, &now)).await
}

/// Writes the status when it changed.
async fn write_status(set: &CellSet, ctx: &Context, next: CellSetStatus) -> Result<()> {
    if set.status.as_ref() == Some(&next) {
        return Ok(());
    }
    let ns = set
        .namespace()
        .ok_or(Error::MissingField("metadata.namespace"))?;
    let sets: Api<CellSet> = Api::namespaced(ctx.client.clone(), &ns);
    let patch = serde_json::json!({ "status": next });
    sets.patch_status(
        &set.name_any(),
        &PatchParams::default(),
        &Patch::Merge(&patch),
    )
    .await?;
    Ok(())
}

pub async fn reconcile(set: Arc<CellSet>, ctx: Arc<Context>) -> Result<Action> {
    let timer = ctx.metrics.start(CONTROLLER);
    let key = ObjectRef::from_obj(set.as_ref()).erase();
    let result = apply_set(set, &ctx).await;
    if result.is_ok() {
        ctx.retries.succeeded(&key);
    }
    timer.done(&result);
    result
}

pub fn error_policy(set: Arc<CellSet>, error: &Error, ctx: Arc<Context>) -> Action {
    let retries = ctx
        .retries
        .failed(&ObjectRef::from_obj(set.as_ref()).erase());
    tracing::warn!(cellset = %set.name_any(), error = %error, retries, "reconcile failed");
    error_action(error, retries)
}

pub async fn run(
    ctx: Arc<Context>,
    namespace: Option<String>,
    shutdown: impl std::future::Future<Output = ()> + Send + Sync + 'static,
) {
    let (sets, cells) = match &namespace {
        Some(ns) => (
            Api::<CellSet>::namespaced(ctx.client.clone(), ns),
            Api::<Cell>::namespaced(ctx.client.clone(), ns),
        ),
        None => (
            Api::<CellSet>::all(ctx.client.clone()),
            Api::<Cell>::all(ctx.client.clone()),
        ),
    };
    Controller::new(sets, super::watch_config())
        .with_config(super::controller_config())
        .owns(cells, super::watch_config().labels(names::LABEL_CELLSET))
        .trigger_backoff(super::WatchBackoff::default())
        .graceful_shutdown_on(shutdown)
        .run(reconcile, error_policy, ctx)
        .for_each(|r| async move {
            if let Err(e) = r {
                tracing::debug!(error = %e, "cellset controller event");
            }
        })
        .await;
}
