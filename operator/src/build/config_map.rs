//! ConfigMaps: the cell's identity and addresses, and per-store configuration files. Pure.

use super::names::{self, Store};
use super::CellContext;
use k8s_openapi::api::core::v1::ConfigMap;
use std::collections::BTreeMap;

/// Address of a store: the in-cluster Service, or the external endpoint.
pub fn store_address(ctx: &CellContext, store: Store) -> String {
    match &ctx.store(store).external {
        Some(ext) => ext.endpoint.clone(),
        None => names::store_address(ctx.name, ctx.namespace, store),
    }
}

/// Where the store is reached from other regions, as the cell registers it: an external
/// store's endpoint, else `inCluster.advertise`, else the in-cluster name (this cluster
/// only).
pub fn registered_address(ctx: &CellContext, store: Store) -> String {
    match ctx
        .store(store)
        .in_cluster
        .as_ref()
        .and_then(|s| s.advertise.clone())
    {
        Some(advertised) => advertised,
        None => store_address(ctx, store),
    }
}

/// `<cell>-info`: what the app (and humans) need to know about the cell.
pub fn cell_info(ctx: &CellContext) -> ConfigMap {
    let mut data = BTreeMap::from([
        ("cell".to_string(), ctx.name.to_string()),
        ("region".to_string(), ctx.spec.region.clone()),
        ("platform".to_string(), ctx.spec.platform.clone()),
        ("redisAddr".to_string(), store_address(ctx, Store::Redis)),
        ("mysqlAddr".to_string(), store_address(ctx, Store::Mysql)),
        (
            "kafkaBootstrap".to_string(),
            store_address(ctx, Store::Kafka),
        ),
    ]);
    if let Some(zone) = &ctx.spec.zone {
        data.insert("zone".into(), zone.clone());
    }
    if !ctx.etcd_endpoints.is_empty() {
        data.insert("etcdEndpoints".into(), ctx.etcd_endpoints.join(","));
    }
    ConfigMap {
        metadata: ctx.meta(names::info_config_map(ctx.name), names::APP),
        data: Some(data),
        ..Default::default()
    }
}

/// MariaDB server id: stable per cell and distinct between cells with overwhelming
/// probability, as GTID replication between a home cell and its standby requires.
pub fn mysql_server_id(cell: &str) -> u32 {
    (xxhash_rust::xxh3::xxh3_64(cell.as_bytes()) % (u64::from(u32::MAX) - 1)) as u32 + 1
}

/// Config file for stores that take one (Kafka is configured through env).
pub fn store(ctx: &CellContext, store: Store) -> Option<ConfigMap> {
    let (file, body) = match store {
        Store::Redis => (
            "redis.conf",
            // Cache semantics: evict least-recently-used keys rather than refuse writes.
            "bind 0.0.0.0\nprotected-mode no\nappendonly no\nmaxmemory-policy allkeys-lru\ndir /data\n".to_string(),
        ),
        Store::Mysql => (
            "cellplane.cnf",
            // Binary log with GTIDs so the standby cell in another region can replicate;
            // one GTID domain per cell keeps positions apart on a standby that also
            // replicates (multi-source) while writing its own schema. Accounts are each
            // server's own: the image's first start writes the app's account to the binary
            // log (the upstream entrypoint does), and a standby that applied it would stop
            // on its own account of the same name, so the `mysql` schema is not replicated.
            format!(
                "[mariadb]\nserver_id={id}\ngtid_domain_id={id}\nlog_bin=mysql-bin\nbinlog_format=ROW\ngtid_strict_mode=ON\nlog_slave_updates=ON\nreplicate_wild_ignore_table=mysql.%\nbind_address=0.0.0.0\nskip_name_resolve=ON\n",
                id = mysql_server_id(ctx.name)
            ),
        ),
        Store::Kafka => return None,
    };
    Some(ConfigMap {
        metadata: ctx.meta(names::store_config_map(ctx.name, store), store.component()),
        data: Some(BTreeMap::from([(file.to_string(), body)])),
        ..Default::default()
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::build::fixtures;

    #[test]
    fn an_advertised_store_registers_its_address_while_the_app_dials_the_local_service() {
        let mut spec = fixtures::spec();
        spec.mysql.in_cluster = Some(cellplane_cells::crd::InClusterStore {
            advertise: Some("mysql.us-0.example.com:3306".into()),
            ..Default::default()
        });
        let ctx = fixtures::ctx(&spec);
        assert_eq!(
            crate::build::endpoints(&ctx)["mysql"],
            "mysql.us-0.example.com:3306",
            "other regions (the standby's replication) reach it there"
        );
        assert_eq!(
            cell_info(&ctx).data.unwrap()["mysqlAddr"],
            "shop-us-0-mysql.shop.svc:3306",
            "the cell's own app stays on the in-cluster Service"
        );
        assert_eq!(
            crate::build::endpoints(&ctx)["redis"],
            "shop-us-0-redis.shop.svc:6379"
        );
    }

    #[test]
    fn info_lists_addresses() {
        let spec = fixtures::spec();
        let cm = cell_info(&fixtures::ctx(&spec));
        let data = cm.data.unwrap();
        assert_eq!(data["mysqlAddr"], "shop-us-0-mysql.shop.svc:3306");
        assert_eq!(data["kafkaBootstrap"], "shop-us-0-kafka.shop.svc:9092");
        assert_eq!(data["zone"], "us-east-1a");
    }

    #[test]
    fn server_ids_are_stable_nonzero_and_differ() {
        assert_eq!(mysql_server_id("a"), mysql_server_id("a"));
        assert_ne!(mysql_server_id("shop-us-0"), mysql_server_id("shop-eu-0"));
        assert!(mysql_server_id("x") >= 1);
        let spec = fixtures::spec();
        let cnf = store(&fixtures::ctx(&spec), Store::Mysql)
            .unwrap()
            .data
            .unwrap();
        assert!(
            cnf["cellplane.cnf"].contains(&format!("server_id={}", mysql_server_id("shop-us-0")))
        );
        assert!(
            cnf["cellplane.cnf"].contains("replicate_wild_ignore_table=mysql.%"),
            "accounts are not replicated"
        );
        assert!(store(&fixtures::ctx(&spec), Store::Kafka).is_none());
    }
}
