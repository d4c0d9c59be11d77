//! PodDisruptionBudgets. The app tolerates one pod down at a time; a store's single pod
//! is protected (minAvailable 1), so node maintenance drains the cell first, as a
//! unitized platform should. Pure.

use super::names::{self, Store, APP};
use super::CellContext;
use k8s_openapi::api::policy::v1::{PodDisruptionBudget, PodDisruptionBudgetSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector;
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;

pub fn app(ctx: &CellContext) -> PodDisruptionBudget {
    PodDisruptionBudget {
        metadata: ctx.meta(names::app(ctx.name), APP),
        spec: Some(PodDisruptionBudgetSpec {
            max_unavailable: Some(IntOrString::Int(1)),
            selector: Some(LabelSelector {
                match_labels: Some(ctx.selector(APP)),
                ..Default::default()
            }),
            ..Default::default()
        }),
        status: None,
    }
}

pub fn store(ctx: &CellContext, store: Store) -> PodDisruptionBudget {
    PodDisruptionBudget {
        metadata: ctx.meta(names::store(ctx.name, store), store.component()),
        spec: Some(PodDisruptionBudgetSpec {
            min_available: Some(IntOrString::Int(1)),
            selector: Some(LabelSelector {
                match_labels: Some(ctx.selector(store.component())),
                ..Default::default()
            }),
            ..Default::default()
        }),
        status: None,
    }
}
