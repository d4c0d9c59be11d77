//! NetworkPolicies: a cell's stores accept only the cell's own pods, and its MySQL also the
//! operator (whose region agent fences and measures it); its app accepts only the cell's
//! pods, the router and the operator (which reads its `/status`). Nothing else crosses
//! between cells, except the address ranges a spec admits (`allowFrom`: other regions'
//! standbys and routers, on one port). Pure.

use super::names::{
    self, Store, APP, LABEL_CELL, LABEL_COMPONENT, OPERATOR_SELECTOR, ROUTER_SELECTOR,
};
use super::CellContext;
use k8s_openapi::api::networking::v1::{
    IPBlock, NetworkPolicy, NetworkPolicyIngressRule, NetworkPolicyPeer, NetworkPolicyPort,
    NetworkPolicySpec,
};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{LabelSelector, LabelSelectorRequirement};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
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

/// Pods with the label `(key, value)` in any namespace of the region (the router and the
/// operator are installed by their own charts, wherever the platform engineer chose).
fn any_namespace((key, value): (&str, &str)) -> NetworkPolicyPeer {
    NetworkPolicyPeer {
        namespace_selector: Some(LabelSelector::default()),
        pod_selector: Some(LabelSelector {
            match_labels: Some(BTreeMap::from([(key.to_string(), value.to_string())])),
            ..Default::default()
        }),
        ..Default::default()
    }
}

fn router() -> NetworkPolicyPeer {
    any_namespace(ROUTER_SELECTOR)
}

fn operator() -> NetworkPolicyPeer {
    any_namespace(OPERATOR_SELECTOR)
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
            ingress: Some(
                std::iter::once(NetworkPolicyIngressRule {
                    from: Some(vec![same_cell(ctx), router(), operator()]),
                    ..Default::default()
                })
                // Other regions' routers, on the app's port only.
                .chain(ranges(&ctx.spec.app.allow_from).map(|peers| rule(peers, ctx.spec.app.port)))
                .collect(),
            ),
            ..Default::default()
        }),
    }
}

/// `port` from `peers`.
fn rule(peers: Vec<NetworkPolicyPeer>, port: i32) -> NetworkPolicyIngressRule {
    NetworkPolicyIngressRule {
        from: Some(peers),
        ports: Some(vec![NetworkPolicyPort {
            port: Some(IntOrString::Int(port)),
            protocol: Some("TCP".into()),
            ..Default::default()
        }]),
    }
}

/// Each in-cluster store's `allowFrom` ranges, on its own port: the other regions'
/// standbys.
fn allowed_ranges(ctx: &CellContext) -> Vec<NetworkPolicyIngressRule> {
    Store::ALL
        .into_iter()
        .filter_map(|store| {
            let peers = ranges(&ctx.store(store).in_cluster.as_ref()?.allow_from)?;
            Some(rule(peers, store.port()))
        })
        .collect()
}

/// IPv4 ranges as NetworkPolicy peers; None for none (no rule: an empty `from` would admit
/// everyone).
fn ranges(cidrs: &[String]) -> Option<Vec<NetworkPolicyPeer>> {
    (!cidrs.is_empty()).then(|| {
        cidrs
            .iter()
            .map(|cidr| NetworkPolicyPeer {
                ip_block: Some(IPBlock {
                    cidr: cidr.clone(),
                    except: None,
                }),
                ..Default::default()
            })
            .collect()
    })
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
            ingress: Some(
                [
                    NetworkPolicyIngressRule {
                        from: Some(vec![same_cell(ctx)]),
                        ..Default::default()
                    },
                    // The region agent: read_only on and off, GTID positions, replication.
                    rule(vec![operator()], Store::Mysql.port()),
                ]
                .into_iter()
                .chain(allowed_ranges(ctx))
                .collect(),
            ),
            ..Default::default()
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::build::fixtures;
    use cellplane_cells::crd::InClusterStore;

    /// The value a peer's pod selector requires for `key`.
    fn label_of<'a>(peer: &'a NetworkPolicyPeer, key: &str) -> &'a str {
        &peer
            .pod_selector
            .as_ref()
            .unwrap()
            .match_labels
            .as_ref()
            .unwrap()[key]
    }

    #[test]
    fn stores_admit_only_their_own_cell_and_the_operator_on_mysql() {
        let spec = fixtures::spec();
        let np = stores(&fixtures::ctx(&spec));
        let rules = np.spec.unwrap().ingress.unwrap();
        assert_eq!(rules.len(), 2);
        let agent = &rules[1];
        assert_eq!(
            label_of(&agent.from.as_ref().unwrap()[0], OPERATOR_SELECTOR.0),
            OPERATOR_SELECTOR.1
        );
        let ports = agent.ports.as_ref().unwrap();
        assert_eq!(ports.len(), 1, "the operator reaches MySQL only");
        assert_eq!(ports[0].port, Some(IntOrString::Int(3306)));
        let from = rules[0].from.as_ref().unwrap();
        assert_eq!(from.len(), 1);
        assert_eq!(label_of(&from[0], LABEL_CELL), "shop-us-0");
        assert!(
            from[0].namespace_selector.is_none(),
            "no other namespace reaches the stores"
        );
    }

    #[test]
    fn a_stores_allowed_ranges_reach_only_its_port() {
        let mut spec = fixtures::spec();
        spec.mysql.in_cluster = Some(InClusterStore {
            allow_from: vec!["10.20.0.0/16".into(), "10.30.0.0/16".into()],
            ..Default::default()
        });
        let rules = stores(&fixtures::ctx(&spec)).spec.unwrap().ingress.unwrap();
        assert_eq!(rules.len(), 3, "the cell, the operator, MySQL's ranges");
        assert_eq!(
            cidrs_and_port(&rules[2]),
            (vec!["10.20.0.0/16", "10.30.0.0/16"], 3306),
            "MySQL's port only, not Redis's or Kafka's"
        );
    }

    /// A rule's IP ranges and its one port.
    fn cidrs_and_port(rule: &NetworkPolicyIngressRule) -> (Vec<&str>, i32) {
        let cidrs = rule
            .from
            .as_ref()
            .unwrap()
            .iter()
            .map(|p| p.ip_block.as_ref().unwrap().cidr.as_str())
            .collect();
        let ports = rule.ports.as_ref().unwrap();
        assert_eq!(ports.len(), 1);
        match ports[0].port {
            Some(IntOrString::Int(port)) => (cidrs, port),
            ref other => panic!("port {other:?}"),
        }
    }

    #[test]
    fn the_apps_allowed_ranges_reach_its_port_and_none_admits_no_range() {
        let mut spec = fixtures::spec();
        let rules = app(&fixtures::ctx(&spec)).spec.unwrap().ingress.unwrap();
        assert_eq!(rules.len(), 1, "no range rule without allowFrom");
        spec.app.allow_from = vec!["10.199.1.2/32".into()];
        spec.app.port = 9090;
        let rules = app(&fixtures::ctx(&spec)).spec.unwrap().ingress.unwrap();
        assert_eq!(rules.len(), 2);
        assert_eq!(cidrs_and_port(&rules[1]), (vec!["10.199.1.2/32"], 9090));
    }

    #[test]
    fn app_admits_cell_router_and_operator() {
        let spec = fixtures::spec();
        let from = app(&fixtures::ctx(&spec)).spec.unwrap().ingress.unwrap()[0]
            .from
            .clone()
            .unwrap();
        assert_eq!(from.len(), 3);
        assert_eq!(label_of(&from[2], OPERATOR_SELECTOR.0), OPERATOR_SELECTOR.1);
        assert_eq!(label_of(&from[1], ROUTER_SELECTOR.0), ROUTER_SELECTOR.1);
    }
}
