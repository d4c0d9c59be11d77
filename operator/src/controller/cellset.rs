//! The CellSet reconciler (I/O): fetch its cells -> build (pure, `build::cellset`: the
//! cells it wants, the placement, the status) -> apply them and delete the ones scaled
//! away -> write the status when it changed.

use super::{apply, error_action, Context};
use crate::build::{cellset, names};
use crate::{Error, Result};
use cellplane_cells::crd::{Cell, CellSet};
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
            ctx.event(
                set.as_ref(),
                EventType::Warning,
                "InvalidSpec",
                e.to_string(),
            )
            .await;
            return Err(e);
        }
    };
    let next = cellset::status(&set, desired.len(), slots, &existing.items);
    // Apply: every wanted cell; scale down: delete ours that are no longer wanted.
    for cell in &desired {
        apply::<Cell>(&ctx.client, cell).await?;
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
    // Status, written only when it changed.
    let previous = set.status.clone().unwrap_or_default();
    if previous != next {
        if previous.epoch != next.epoch {
            ctx.event(
                set.as_ref(),
                EventType::Normal,
                "PlacementChanged",
                format!("placement epoch {}", next.epoch),
            )
            .await;
        }
        let sets: Api<CellSet> = Api::namespaced(ctx.client.clone(), &ns);
        let patch = serde_json::json!({ "status": next });
        sets.patch_status(
            &set.name_any(),
            &PatchParams::default(),
            &Patch::Merge(&patch),
        )
        .await?;
    }
    Ok(Action::requeue(Duration::from_secs(60)))
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
