//! NetworkPolicies: a cell's stores accept only the cell's own pods; its app accepts only
//! the cell's pods and the router. Nothing else crosses between cells. Pure.

use super::names::{self, APP, LABEL_CELL, LABEL_COMPONENT, ROUTER_SELECTOR};
use super::CellContext;
use k8s_openapi::api::networking::v1::{
    NetworkPolicy, NetworkPolicyIngressRule, NetworkPolicyPeer, NetworkPolicySpec,
};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{LabelSelector, LabelSelectorRequirement};
use std::collections::BTreeMap;

fn same_cell(ctx: &CellContext) -> NetworkPolicyPeer {
    NetworkPolicyPeer {
        pod_selector: Some(LabelSelector {
            match_labels: Some(BTreeMap::from([(
                LABEL_CELL.to_string(),
                ctx.name.to_string(),
            )])),
            ..Default::default()
        }),
        ..Default::default()
    }
}

fn router() -> NetworkPolicyPeer {
    NetworkPolicyPeer {
        // Routers may run in any namespace of the region.
        namespace_selector: Some(LabelSelector::default()),
        pod_selector: Some(LabelSelector {
            match_labels: Some(BTreeMap::from([(
                ROUTER_SELECTOR.0.to_string(),
                ROUTER_SELECTOR.1.to_string(),
            )])),
            ..Default::default()
        }),
        ..Default::default()
    }
}

pub fn app(ctx: &CellContext) -> NetworkPolicy {
    NetworkPolicy {
        metadata: ctx.meta(names::app(ctx.name), APP),
        spec: Some(NetworkPolicySpec {
            pod_selector: Some(LabelSelector {
                match_labels: Some(ctx.selector(APP)),
                ..Default::default()
            }),
            policy_types: Some(vec!["Ingress".into()]),
            ingress: Some(vec![NetworkPolicyIngressRule {
                from: Some(vec![same_cell(ctx), router()]),
                ..Default::default()
            }]),
            ..Default::default()
        }),
    }
}

pub fn stores(ctx: &CellContext) -> NetworkPolicy {
    NetworkPolicy {
        metadata: ctx.meta(format!("{}-stores", ctx.name), "stores"),
        spec: Some(NetworkPolicySpec {
            pod_selector: Some(LabelSelector {
                match_labels: Some(BTreeMap::from([(
                    LABEL_CELL.to_string(),
                    ctx.name.to_string(),
                )])),
                match_expressions: Some(vec![LabelSelectorRequirement {
                    key: LABEL_COMPONENT.into(),
                    operator: "In".into(),
                    values: Some(vec!["redis".into(), "mysql".into(), "kafka".into()]),
                }]),
            }),
            policy_types: Some(vec!["Ingress".into()]),
            ingress: Some(vec![NetworkPolicyIngressRule {
                from: Some(vec![same_cell(ctx)]),
                ..Default::default()
            }]),
            ..Default::default()
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::build::fixtures;

    #[test]
    fn stores_admit_only_their_own_cell() {
        let spec = fixtures::spec();
        let np = stores(&fixtures::ctx(&spec));
        let rules = np.spec.unwrap().ingress.unwrap();
        assert_eq!(rules.len(), 1);
        let from = rules[0].from.as_ref().unwrap();
        assert_eq!(from.len(), 1);
        assert_eq!(
            from[0]
                .pod_selector
                .as_ref()
                .unwrap()
                .match_labels
                .as_ref()
                .unwrap()[LABEL_CELL],
            "shop-us-0"
        );
        assert!(
            from[0].namespace_selector.is_none(),
            "no other namespace reaches the stores"
        );
    }

    #[test]
    fn app_admits_cell_and_router() {
        let spec = fixtures::spec();
        let from = app(&fixtures::ctx(&spec)).spec.unwrap().ingress.unwrap()[0]
            .from
            .clone()
            .unwrap();
        assert_eq!(from.len(), 2);
        assert_eq!(
            from[1]
                .pod_selector
                .as_ref()
                .unwrap()
                .match_labels
                .as_ref()
                .unwrap()[ROUTER_SELECTOR.0],
            ROUTER_SELECTOR.1
        );
    }
}
