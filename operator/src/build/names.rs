//! Names and labels of the objects a Cell owns. Pure.

/// Label naming the cell an object belongs to.
pub const LABEL_CELL: &str = "cellplane.io/cell";
/// Label naming the part of the cell (`app`, `redis`, `mysql`, `kafka`).
pub const LABEL_COMPONENT: &str = "cellplane.io/component";
/// Label naming the cell's region.
pub const LABEL_REGION: &str = "cellplane.io/region";
/// Label a CellSet puts on the Cells it stamps out.
pub const LABEL_CELLSET: &str = "cellplane.io/cellset";
/// Label the router's pods carry; only they (and the cell itself) reach a cell's app.
pub const ROUTER_SELECTOR: (&str, &str) = ("app.kubernetes.io/name", "cellplane-router");
/// Label the operator's pods carry: their region agent reads a cell's app (`/status`) and
/// fences and measures its MySQL.
pub const OPERATOR_SELECTOR: (&str, &str) = ("app.kubernetes.io/name", "cellplane-operator");

/// The component name of the app.
pub const APP: &str = "app";

/// The three per-cell backing stores.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Store {
    Redis,
    Mysql,
    Kafka,
}

impl Store {
    pub const ALL: [Store; 3] = [Store::Redis, Store::Mysql, Store::Kafka];

    /// Component label and name suffix.
    pub fn component(self) -> &'static str {
        match self {
            Store::Redis => "redis",
            Store::Mysql => "mysql",
            Store::Kafka => "kafka",
        }
    }

    /// The spec field that configures it.
    pub fn field(self) -> &'static str {
        self.component()
    }

    pub fn port(self) -> i32 {
        match self {
            Store::Redis => 6379,
            Store::Mysql => 3306,
            Store::Kafka => 9092,
        }
    }

    /// Pinned default images (overridable per cell with `inCluster.image`).
    pub fn default_image(self) -> &'static str {
        match self {
            Store::Redis => "redis:7.4.2",
            Store::Mysql => "mariadb:11.4.5",
            Store::Kafka => "apache/kafka:3.9.0",
        }
    }

    /// Non-root uid the image runs as.
    pub fn uid(self) -> i64 {
        match self {
            Store::Redis | Store::Mysql => 999,
            Store::Kafka => 1000,
        }
    }

    /// Where the store keeps its data.
    pub fn data_path(self) -> &'static str {
        match self {
            Store::Redis => "/data",
            Store::Mysql => "/var/lib/mysql",
            Store::Kafka => "/var/lib/kafka/data",
        }
    }

    /// Name of the store's generated credentials Secret, if it has one.
    pub fn has_secret(self) -> bool {
        matches!(self, Store::Redis | Store::Mysql)
    }
}

pub fn app(cell: &str) -> String {
    format!("{cell}-app")
}
pub fn store(cell: &str, store: Store) -> String {
    format!("{cell}-{}", store.component())
}
pub fn headless(cell: &str, s: Store) -> String {
    format!("{cell}-{}-headless", s.component())
}
pub fn secret(cell: &str, s: Store) -> String {
    format!("{cell}-{}-credentials", s.component())
}
pub fn info_config_map(cell: &str) -> String {
    format!("{cell}-info")
}
pub fn store_config_map(cell: &str, s: Store) -> String {
    format!("{cell}-{}-config", s.component())
}
/// In-cluster DNS address of a store's client Service.
pub fn store_address(cell: &str, namespace: &str, s: Store) -> String {
    format!("{}.{namespace}.svc:{}", store(cell, s), s.port())
}
/// In-cluster DNS address of the app's Service.
pub fn app_address(cell: &str, namespace: &str, port: i32) -> String {
    format!("{}.{namespace}.svc:{port}", app(cell))
}
