//! The env contract between the operator (which injects these into a cell's app pods) and
//! the cell SDK (which reads them). One list, so the two cannot drift apart.

pub const CELL_NAME: &str = "CELL_NAME";
pub const CELL_REGION: &str = "CELL_REGION";
pub const CELL_PLATFORM: &str = "CELL_PLATFORM";
/// `address:port` the app serves HTTP on: every interface at `spec.app.port` (the kubelet's
/// probes, the Service and the routers reach the pod's address, not its loopback).
pub const CELL_LISTEN: &str = "CELL_LISTEN";
/// Comma-separated endpoints of the global etcd the app follows the routing table in.
pub const CELL_ETCD: &str = "CELL_ETCD";
/// `host:port` of the cell's Redis.
pub const REDIS_ADDR: &str = "REDIS_ADDR";
pub const REDIS_PASSWORD: &str = "REDIS_PASSWORD";
/// `host:port` of the cell's MySQL shard.
pub const MYSQL_ADDR: &str = "MYSQL_ADDR";
pub const MYSQL_USER: &str = "MYSQL_USER";
pub const MYSQL_PASSWORD: &str = "MYSQL_PASSWORD";
pub const MYSQL_DATABASE: &str = "MYSQL_DATABASE";
/// Comma-separated `host:port` list of the cell's Kafka brokers.
pub const KAFKA_BOOTSTRAP: &str = "KAFKA_BOOTSTRAP";
/// The app's ownership lease (`failover_timing`): TTL, renewal period and fence, in ms;
/// the operator passes its own so the app and the platform leader agree.
pub const CELL_OWNER_LEASE_TTL_MS: &str = "CELL_OWNER_LEASE_TTL_MS";
pub const CELL_OWNER_RENEW_EVERY_MS: &str = "CELL_OWNER_RENEW_EVERY_MS";
pub const CELL_FENCE_AFTER_MS: &str = "CELL_FENCE_AFTER_MS";

/// Every variable the operator sets in a cell's app pods: `spec.app.env` may not name one
/// (admission refuses it; the cell's own setting would be shadowed or duplicated).
pub const RESERVED: [&str; 15] = [
    CELL_NAME,
    CELL_LISTEN,
    CELL_REGION,
    CELL_PLATFORM,
    CELL_ETCD,
    REDIS_ADDR,
    REDIS_PASSWORD,
    MYSQL_ADDR,
    MYSQL_USER,
    MYSQL_PASSWORD,
    MYSQL_DATABASE,
    KAFKA_BOOTSTRAP,
    CELL_OWNER_LEASE_TTL_MS,
    CELL_OWNER_RENEW_EVERY_MS,
    CELL_FENCE_AFTER_MS,
];

/// The schema holding a cell's users in its MySQL shard: `cell_<name>` with `-` as `_`.
/// Per cell, so a standby's MariaDB can hold its own schema and, replicated, the schema of
/// the cell it stands by for.
pub fn mysql_database(cell: &str) -> String {
    format!("cell_{}", cell.replace('-', "_"))
}

#[cfg(test)]
mod tests {
    #[test]
    fn schema_names_are_per_cell_identifiers() {
        assert_eq!(
            super::mysql_database("shop-us-east-0"),
            "cell_shop_us_east_0"
        );
    }
}
