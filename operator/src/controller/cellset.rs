//! The CellSet reconciler (I/O): stamps out Cells from the template (pure:
//! `CellSetSpec::stamp`), removes the ones scaled away, and publishes the placement.

use super::{apply, error_action, Context};
use crate::build::{names, FIELD_MANAGER};
use crate::{Error, Result};
use cellplane_cells::crd::{condition, Cell, CellSet, CellSetStatus};
use cellplane_cells::placement::{place, Placement, WeightedCell};
use cellplane_cells::slot::DEFAULT_SLOTS;
use futures::StreamExt;
use kube::api::{Api, DeleteParams, ListParams, Patch, PatchParams};
use kube::runtime::controller::{Action, Controller};
use kube::runtime::events::EventType;
use kube::{Resource, ResourceExt};
use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

pub const CONTROLLER: &str = "cellset";

/// The Cell objects `set` wants in this operator's scope.
pub fn desired_cells(set: &CellSet, region: Option<&str>) -> Result<Vec<Cell>> {
    let name = set.name_any();
    let owner = set
        .controller_owner_ref(&())
        .ok_or(Error::MissingField("metadata.uid"))?;
    Ok(set
        .spec
        .stamp(&name)
        .into_iter()
        .filter(|c| region.is_none_or(|r| r == c.spec.region))
        .map(|c| {
            let mut cell = Cell::new(&c.name, c.spec);
            cell.metadata.namespace = set.namespace();
            cell.metadata.owner_references = Some(vec![owner.clone()]);
            cell.metadata.labels = Some(BTreeMap::from([
                (names::LABEL_CELLSET.to_string(), name.clone()),
                (
                    "app.kubernetes.io/managed-by".to_string(),
                    FIELD_MANAGER.to_string(),
                ),
            ]));
            cell
        })
        .collect())
}

/// The placement over every region's cells (the placement is global); None without cells.
pub fn placement(set: &CellSet) -> Result<Option<Placement>> {
    let cells: Vec<WeightedCell> = set
        .spec
        .stamp(&set.name_any())
        .into_iter()
        .map(|c| WeightedCell::new(c.name, c.spec.capacity_weight))
        .collect();
    if cells.is_empty() {
        return Ok(None);
    }
    place(&cells, DEFAULT_SLOTS)
        .map(Some)
        .map_err(|e| Error::InvalidSpec(e.to_string()))
}

/// Slots per cell.
pub fn placement_counts(set: &CellSet) -> Result<BTreeMap<String, u32>> {
    Ok(placement(set)?.map(|p| p.counts()).unwrap_or_default())
}

async fn apply_set(set: Arc<CellSet>, ctx: &Context) -> Result<Action> {
    let ns = set
        .namespace()
        .ok_or(Error::MissingField("metadata.namespace"))?;
    let api: Api<Cell> = Api::namespaced(ctx.client.clone(), &ns);
    let desired = desired_cells(&set, ctx.region.as_deref())?;
    for cell in &desired {
        apply::<Cell>(&ctx.client, cell).await?;
    }
    // Scale down: delete our cells that are no longer wanted.
    let selector = format!("{}={}", names::LABEL_CELLSET, set.name_any());
    let existing = api.list(&ListParams::default().labels(&selector)).await?;
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
    let slots = placement_counts(&set)?;
    let previous = set.status.clone().unwrap_or_default();
    // Ownership changed: a new epoch (DESIGN.md: every change of ownership bumps it).
    let epoch = if previous.slots != slots {
        previous.epoch + 1
    } else {
        previous.epoch
    };
    let ready_cells = existing
        .items
        .iter()
        .filter(|c| {
            c.status.as_ref().is_some_and(|s| {
                s.conditions
                    .iter()
                    .any(|k| k.type_ == condition::READY && k.status == "True")
            })
        })
        .count() as u32;
    let next = CellSetStatus {
        cells: desired.len() as u32,
        ready_cells,
        epoch,
        slots,
        observed_generation: set.metadata.generation,
    };
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
    let result = apply_set(set, &ctx).await;
    timer.done(&result);
    result
}

pub fn error_policy(set: Arc<CellSet>, error: &Error, _ctx: Arc<Context>) -> Action {
    tracing::warn!(cellset = %set.name_any(), error = %error, "reconcile failed");
    error_action(error, 1)
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
