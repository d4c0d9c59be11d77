//! The etcd layout (docs/architecture.md, "etcd layout") and the registration record a cell keeps alive. Pure.

use crate::crd::CellPhase;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

/// `/cellplane/<platform>/`
pub fn platform_prefix(platform: &str) -> String {
    format!("/cellplane/{platform}/")
}

/// `/cellplane/<platform>/cells/` : prefix of every registration.
pub fn cells_prefix(platform: &str) -> String {
    format!("/cellplane/{platform}/cells/")
}

/// `/cellplane/<platform>/cells/<cell>` : a cell's registration, kept alive by a lease.
pub fn cell_key(platform: &str, cell: &str) -> String {
    format!("/cellplane/{platform}/cells/{cell}")
}

/// `/cellplane/<platform>/routing` : the routing table, written only by compare-and-swap.
pub fn routing_key(platform: &str) -> String {
    format!("/cellplane/{platform}/routing")
}

/// `/cellplane/<platform>/drills/<id>` : a drill record.
pub fn drill_key(platform: &str, id: &str) -> String {
    format!("/cellplane/{platform}/drills/{id}")
}

/// What a Ready cell publishes under [`cell_key`].
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct Registration {
    pub region: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub zone: Option<String>,
    pub state: CellPhase,
    pub capacity_weight: u32,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub standby: Option<String>,
    /// Named endpoints, e.g. `app` -> `shop-us-0-app.ns.svc:8080`.
    pub endpoints: BTreeMap<String, String>,
    pub healthy: bool,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layout_matches_design() {
        assert_eq!(
            cell_key("shop", "shop-us-0"),
            "/cellplane/shop/cells/shop-us-0"
        );
        assert!(cell_key("shop", "x").starts_with(&cells_prefix("shop")));
        assert!(cells_prefix("shop").starts_with(&platform_prefix("shop")));
        assert_eq!(routing_key("shop"), "/cellplane/shop/routing");
        assert_eq!(drill_key("shop", "7"), "/cellplane/shop/drills/7");
    }
}
