//! CRD types of API group `cellplane.io/v1alpha1`: `Cell` and `CellSet`. Pure data.
//!
//! Validation lives in the schema (bounds) and in CEL rules (`x-kubernetes-validations`),
//! so the API server rejects bad objects at admission; every message names the field and
//! the fix.

// kube's `printcolumn(...)` repeats `type_ = ...` per column, which clippy misreads as
// a duplicated attribute.
#![allow(clippy::duplicated_attributes)]

use crate::admission as rules;
use kube::{CustomResource, KubeSchema};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

pub const GROUP: &str = "cellplane.io";
pub const VERSION: &str = "v1alpha1";
/// Highest allowed `capacityWeight`.
pub const MAX_WEIGHT: u32 = 100;
/// Default platform name (the etcd prefix `/cellplane/<platform>/`).
pub const DEFAULT_PLATFORM: &str = "default";

/// One self-contained cell in one region: the app's pods plus the cell's own Redis,
/// MySQL shard and Kafka.
#[derive(CustomResource, KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[kube(
    group = "cellplane.io",
    version = "v1alpha1",
    kind = "Cell",
    namespaced,
    status = "CellStatus",
    shortname = "cell",
    category = "cellplane",
    printcolumn(name = "Region", type_ = "string", json_path = ".spec.region"),
    printcolumn(name = "Phase", type_ = "string", json_path = ".status.phase"),
    printcolumn(name = "Slots", type_ = "integer", json_path = ".status.slots"),
    printcolumn(
        name = "Ready",
        type_ = "string",
        json_path = ".status.conditions[?(@.type==\"Ready\")].status"
    ),
    printcolumn(
        name = "Age",
        type_ = "date",
        json_path = ".metadata.creationTimestamp"
    ),
    validation = rules::cell_name()[0].clone(),
    validation = rules::cell_name()[1].clone(),
    validation = rules::standby_not_self()
)]
#[x_kube(cel, validation = Rule::new("!has(self.standby) || self.standby.region != self.region").message("spec.standby.region must differ from spec.region: a standby protects against the loss of a whole region, so pair the cell with one in another region"))]
#[serde(rename_all = "camelCase")]
pub struct CellSpec {
    /// Region (one Kubernetes cluster in one data center). Immutable.
    #[x_kube(validation = Rule::new("self == oldSelf").message("spec.region is immutable: create a new Cell in the other region and drain this one"))]
    #[x_kube(validation = rules::dns_label("spec.region", "eu-west"))]
    #[schemars(length(min = 1, max = 63))]
    pub region: String,

    /// Zone inside the region, used for pod topology (a label value).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 63))]
    #[x_kube(validation = rules::label_value("spec.zone"))]
    pub zone: Option<String>,

    /// Relative capacity: the share of slots placed on this cell is proportional to it.
    #[serde(default = "default_weight")]
    #[schemars(range(min = 1, max = 100), with = "i32")]
    pub capacity_weight: u32,

    /// Platform this cell belongs to (etcd prefix `/cellplane/<platform>/`).
    #[serde(default = "default_platform")]
    #[x_kube(validation = rules::dns_label("spec.platform", "shop"))]
    #[schemars(length(min = 1, max = 63))]
    pub platform: String,

    /// The cell in another region that holds a replica and takes over this cell's slots.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub standby: Option<StandbyRef>,

    /// Which nodes run the cell's pods (the app's and the in-cluster stores'), besides
    /// the zone: a node pool for cells, nodes tainted for them.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub scheduling: Option<Scheduling>,

    /// The application that runs in the cell.
    pub app: AppSpec,
    /// The cell's cache.
    pub redis: StoreSpec,
    /// The cell's MySQL shard, source of truth for its users.
    pub mysql: StoreSpec,
    /// The cell's Kafka (async writes, events).
    pub kafka: StoreSpec,
}

fn default_weight() -> u32 {
    10
}
fn default_platform() -> String {
    DEFAULT_PLATFORM.to_string()
}

/// Names the standby cell in another region.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
pub struct StandbyRef {
    /// Name of the standby Cell (in the other region); its MySQL replicates this cell's
    /// and it takes this cell's users in a switchover or failover.
    #[schemars(length(min = 1, max = 253))]
    pub cell: String,
    /// Region of the standby Cell; must differ from `spec.region`.
    #[schemars(length(min = 1, max = 63))]
    pub region: String,
}

/// The app's Deployment.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct AppSpec {
    /// Container image, e.g. `ghcr.io/acme/shop:1.4.2`.
    #[schemars(length(min = 1, max = 512))]
    #[x_kube(validation = rules::image())]
    pub image: String,
    /// Pods of the app's Deployment (default 2; at most one may be unavailable at a time).
    #[serde(default = "default_app_replicas")]
    #[schemars(range(min = 1, max = 1000))]
    pub replicas: i32,
    /// TCP port the app serves HTTP on, in the container and on its Service (default 8080).
    #[serde(default = "default_app_port")]
    #[schemars(range(min = 1, max = 65535))]
    pub port: i32,
    /// CPU and memory of each app container (Kubernetes quantities); none set by default.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resources: Option<Resources>,
    /// Extra environment for the app (the cell's connection settings are added by the
    /// operator; naming one of those is refused).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 128))]
    #[x_kube(validation = rules::reserved_env())]
    pub env: Vec<EnvVar>,
    /// HTTP paths of the app's readiness and liveness probes.
    #[serde(default)]
    pub probes: Probes,
    /// `host:port` that routers in every region can dial (a load balancer, a node port, a
    /// routable pod network). Registered in etcd instead of the in-cluster Service name,
    /// which other regions cannot resolve.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 3, max = 261))]
    #[x_kube(validation = rules::host_port("spec.app.advertise"))]
    pub advertise: Option<String>,
    /// Address ranges (IPv4 CIDR) outside the cluster's pods that the app's NetworkPolicy
    /// admits on its port: where the other regions' routers connect from (a cell's users
    /// are served from its standby's region after a switchover). Empty: only the cell's
    /// pods, this region's routers and the operator.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 16), inner(length(max = 18)))]
    #[x_kube(validation = rules::cidr_list("spec.app.allowFrom"))]
    pub allow_from: Vec<String>,
    /// How the app's Service is exposed. `LoadBalancer`: the cell registers the load
    /// balancer's address (and registers only once it has one), which is how routers in
    /// other regions reach a cell whose `advertise` is not set, e.g. in a CellSet.
    #[serde(default)]
    pub expose: Expose,
}

/// The app Service's type.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq, JsonSchema)]
pub enum Expose {
    /// Reachable inside the region only (routers in the same cluster).
    #[default]
    ClusterIP,
    /// A load balancer address that every region's routers can dial.
    LoadBalancer,
}

fn default_app_replicas() -> i32 {
    2
}
fn default_app_port() -> i32 {
    8080
}

/// A plain environment variable.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
pub struct EnvVar {
    /// Variable name; not one of the cell's own settings (`REDIS_ADDR`, `MYSQL_*`, ...).
    #[schemars(length(min = 1, max = 256))]
    pub name: String,
    /// Value, as is (default empty). Put secrets in a Secret, not here.
    #[serde(default)]
    pub value: String,
}

/// HTTP probes of the app.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct Probes {
    /// Path of the readiness probe, starting with `/` (default `/readyz`: the reference
    /// app answers 200 there once its three stores and a table are usable).
    #[serde(default = "default_readiness_path")]
    #[schemars(length(min = 1, max = 256))]
    #[x_kube(validation = rules::http_path("spec.app.probes.readinessPath", "/readyz"))]
    pub readiness_path: String,
    /// Path of the liveness probe, starting with `/` (default `/livez`).
    #[serde(default = "default_liveness_path")]
    #[schemars(length(min = 1, max = 256))]
    #[x_kube(validation = rules::http_path("spec.app.probes.livenessPath", "/livez"))]
    pub liveness_path: String,
}

impl Default for Probes {
    fn default() -> Self {
        Self {
            readiness_path: default_readiness_path(),
            liveness_path: default_liveness_path(),
        }
    }
}
fn default_readiness_path() -> String {
    "/readyz".into()
}
fn default_liveness_path() -> String {
    "/livez".into()
}

/// CPU/memory requests and limits as Kubernetes quantities (`"250m"`, `"512Mi"`).
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq)]
pub struct Resources {
    /// What the scheduler reserves, by resource name (`cpu`, `memory`,
    /// `ephemeral-storage`, `hugepages-<size>`): e.g. `{cpu: 250m, memory: 512Mi}`.
    /// Not more than the limit of the same resource.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    #[schemars(with = "BTreeMap<String, QuantitySchema>", extend("maxProperties" = rules::MAX_RESOURCES))]
    #[x_kube(validation = rules::resource_names(), validation = rules::quantities())]
    pub requests: BTreeMap<String, String>,
    /// The most a container may use, by resource name: e.g. `{cpu: "1", memory: 1Gi}`
    /// (memory beyond it gets the container killed; CPU beyond it is throttled).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    #[schemars(with = "BTreeMap<String, QuantitySchema>", extend("maxProperties" = rules::MAX_RESOURCES))]
    #[x_kube(validation = rules::resource_names(), validation = rules::quantities())]
    pub limits: BTreeMap<String, String>,
}

/// The schema of one quantity string: bounded, so the API server can bound the cost of
/// the rules that parse it.
#[derive(JsonSchema)]
#[schemars(transparent)]
#[allow(dead_code)] // schema only
struct QuantitySchema(#[schemars(length(min = 1, max = rules::MAX_QUANTITY_LEN))] String);

/// Which nodes run a cell's pods.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct Scheduling {
    /// Node labels every pod of the cell requires (added to the zone's).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    #[schemars(extend("maxProperties" = 16))]
    pub node_selector: BTreeMap<String, String>,
    /// Taints the cell's pods tolerate.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 16))]
    pub tolerations: Vec<CellToleration>,
}

/// A taint the cell's pods tolerate (as a pod's toleration).
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
#[x_kube(cel, validation = Rule::new("self.operator != 'Exists' || !has(self.value)").message("spec.scheduling.tolerations[]: operator Exists matches any value; drop value or use operator Equal"))]
#[serde(rename_all = "camelCase")]
pub struct CellToleration {
    /// The taint's key.
    #[schemars(length(min = 1, max = 253))]
    pub key: String,
    /// `Equal` (the value must match) or `Exists` (any value).
    #[serde(default)]
    pub operator: TolerationOperator,
    /// The taint's value, with operator `Equal`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 63))]
    pub value: Option<String>,
    /// `NoSchedule`, `PreferNoSchedule` or `NoExecute`; every effect when left out.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub effect: Option<TaintEffect>,
}

#[derive(Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq, JsonSchema)]
pub enum TolerationOperator {
    #[default]
    Equal,
    Exists,
}

#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, JsonSchema)]
pub enum TaintEffect {
    NoSchedule,
    PreferNoSchedule,
    NoExecute,
}

/// A backing store: run inside the cell (`inCluster`) or use a managed service (`external`).
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[x_kube(cel, validation = Rule::new("has(self.inCluster) != has(self.external)").message("set exactly one of inCluster (run the store in the cell) or external (endpoint + secretRef of a managed service)"))]
#[serde(rename_all = "camelCase")]
pub struct StoreSpec {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub in_cluster: Option<InClusterStore>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub external: Option<ExternalStore>,
}

impl StoreSpec {
    /// An in-cluster store with defaults for everything.
    pub fn in_cluster() -> Self {
        Self {
            in_cluster: Some(InClusterStore::default()),
            external: None,
        }
    }
}

/// A store run by the operator as a StatefulSet in the cell.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct InClusterStore {
    /// Image override; the operator picks a pinned default per store otherwise.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image: Option<String>,
    /// Pods of the store. One per cell for now: a cell scales by adding cells, and its
    /// replica lives in the standby cell of another region.
    #[serde(default = "default_store_replicas")]
    #[schemars(range(min = 1, max = 1))]
    pub replicas: i32,
    /// PersistentVolume size, e.g. `10Gi`.
    #[serde(default = "default_storage")]
    #[x_kube(validation = rules::storage_size())]
    #[schemars(length(max = 16))]
    pub storage: String,
    /// StorageClass of the volume; the cluster default when unset.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 63))]
    #[x_kube(validation = rules::dns_label("storageClassName", "fast-ssd"))]
    pub storage_class_name: Option<String>,
    /// Keep data in an `emptyDir` instead of a PersistentVolume: data is lost with the
    /// pod. For demos and tests only.
    #[serde(default)]
    pub ephemeral: bool,
    /// CPU and memory of the store's container (Kubernetes quantities); none set by default.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resources: Option<Resources>,
    /// `host:port` other regions reach this store at (a load balancer, a node port): the
    /// endpoint the cell registers for it. A standby in another region replicates the
    /// home's MySQL from there. Unset: the in-cluster Service name, which only this
    /// cluster resolves.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 3, max = 261))]
    #[x_kube(validation = rules::host_port("inCluster.advertise"))]
    pub advertise: Option<String>,
    /// Address ranges (IPv4 CIDR) outside the cell that the store's NetworkPolicy admits
    /// on its port: where the other regions' standbys connect from. Empty: only the cell's
    /// own pods (and, for MySQL, the operator).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 16), inner(length(max = 18)))]
    #[x_kube(validation = rules::cidr_list("inCluster.allowFrom"))]
    pub allow_from: Vec<String>,
}

impl Default for InClusterStore {
    fn default() -> Self {
        Self {
            image: None,
            replicas: 1,
            storage: default_storage(),
            storage_class_name: None,
            ephemeral: false,
            resources: None,
            advertise: None,
            allow_from: Vec::new(),
        }
    }
}
fn default_store_replicas() -> i32 {
    1
}
fn default_storage() -> String {
    "1Gi".into()
}

/// A managed store outside the cluster.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct ExternalStore {
    /// `host:port` of the service (Kafka: a comma-separated list of them).
    #[schemars(length(min = 3, max = rules::MAX_ENDPOINT_LEN))]
    #[x_kube(validation = rules::endpoint_list())]
    pub endpoint: String,
    /// Secret in the Cell's namespace holding the credentials (keys `username`, `password`).
    pub secret_ref: SecretRef,
    /// MySQL only: a Secret (keys `username`, `password`) of an account allowed to fence and
    /// to configure replication (`SUPER` or `READ_ONLY ADMIN`, `REPLICATION SLAVE ADMIN`,
    /// `CONNECTION ADMIN`), which the region's operator uses for switchovers. Without it, the
    /// cell cannot take part in one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub admin_secret_ref: Option<SecretRef>,
}

/// A Secret in the Cell's namespace.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub struct SecretRef {
    /// Name of the Secret (a DNS subdomain, in the Cell's namespace).
    #[schemars(length(min = 1, max = 253))]
    #[x_kube(validation = rules::secret_name())]
    pub name: String,
}

/// Observed state of a Cell.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct CellStatus {
    /// Where the cell is in its life: Pending until its objects are applied, Active,
    /// Draining/Drained, FailedOver, Standby, or Failed when it cannot be built.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub phase: Option<CellPhase>,
    /// `Ready` (all of the below), `AppReady`, `RedisReady`, `MySQLReady`, `KafkaReady`,
    /// `Registered` (in the global etcd), each with a reason and a message.
    #[serde(default)]
    pub conditions: Vec<Condition>,
    /// The `metadata.generation` of the spec this status describes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// Number of slots this cell is home for at `epoch`.
    #[serde(default)]
    #[schemars(with = "i32")]
    pub slots: u32,
    /// Routing-table epoch this status was computed at.
    #[serde(default)]
    #[schemars(with = "i64")]
    pub epoch: u64,
    /// In-cluster addresses of the cell's app and stores.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub endpoints: BTreeMap<String, String>,
}

/// Lifecycle of a cell (docs/architecture.md, "A cell's life").
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Hash, JsonSchema)]
pub enum CellPhase {
    Pending,
    Active,
    Draining,
    Drained,
    FailedOver,
    Standby,
    /// The cell cannot be built as specified: `Ready=False` says why (`InvalidSpec`, or
    /// `ApplyFailed` with the API server's message); cleared when the spec is fixed.
    Failed,
}

/// A status condition, shaped like `metav1.Condition`.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Condition {
    /// What the condition is about, e.g. `Ready`, `MySQLReady`.
    #[serde(rename = "type")]
    pub type_: String,
    /// "True", "False" or "Unknown".
    pub status: String,
    /// Why, in one CamelCase word (e.g. `ApplyFailed`, `StoreUnreachable`).
    pub reason: String,
    /// Why, for a person: what is wrong and what fixes it.
    #[serde(default)]
    pub message: String,
    /// RFC 3339 time of the last change of `status`.
    pub last_transition_time: String,
    /// The `metadata.generation` the condition was computed for.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
}

/// Condition types of a Cell.
pub mod condition {
    pub const READY: &str = "Ready";
    pub const APP_READY: &str = "AppReady";
    pub const REDIS_READY: &str = "RedisReady";
    pub const MYSQL_READY: &str = "MySQLReady";
    pub const KAFKA_READY: &str = "KafkaReady";
    pub const REGISTERED: &str = "Registered";
    /// Whether the platform leader can route users to the cell: its members come from
    /// CellSets, so a Cell outside one is never in the routing table.
    pub const ROUTABLE: &str = "Routable";
}

/// Stamps out N cells per region from one template and pairs each with a standby in
/// the next region. Cells are named `<cellset>-<region>-<index>`.
#[derive(CustomResource, KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[kube(
    group = "cellplane.io",
    version = "v1alpha1",
    kind = "CellSet",
    namespaced,
    status = "CellSetStatus",
    shortname = "cellset",
    category = "cellplane",
    printcolumn(name = "Phase", type_ = "string", json_path = ".status.phase"),
    printcolumn(name = "Cells", type_ = "integer", json_path = ".status.cells"),
    printcolumn(name = "Ready", type_ = "integer", json_path = ".status.readyCells"),
    printcolumn(name = "Epoch", type_ = "integer", json_path = ".status.epoch"),
    printcolumn(
        name = "Age",
        type_ = "date",
        json_path = ".metadata.creationTimestamp"
    ),
    validation = rules::cellset_names()[0].clone(),
    validation = rules::cellset_names()[1].clone(),
    validation = rules::overrides_name_stamped_cells()
)]
#[serde(rename_all = "camelCase")]
pub struct CellSetSpec {
    /// Platform the cells belong to.
    #[serde(default = "default_platform")]
    #[x_kube(validation = rules::dns_label("spec.platform", "shop"))]
    #[schemars(length(min = 1, max = 63))]
    pub platform: String,

    /// Regions and how many cells each runs. With two or more regions every cell gets
    /// a standby: the cell with the same index in the next region (in list order).
    #[schemars(length(min = 1, max = 16))]
    #[x_kube(validation = Rule::new("self.all(r, self.exists_one(o, o.name == r.name))").message("spec.regions: each region may appear only once; merge the duplicate entries"))]
    pub regions: Vec<RegionCells>,

    /// The Cell spec every stamped cell gets (region and standby are filled in).
    pub template: CellTemplate,

    /// What differs from the template for single cells, by cell name
    /// (`<cellset>-<region>-<index>`): each cell's own external stores (a managed database
    /// per cell), or the address routers dial. A name the set does not stamp is refused.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    #[schemars(extend("maxProperties" = 64))]
    pub overrides: BTreeMap<String, CellOverride>,
}

/// Per-cell settings of a CellSet that replace the template's.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct CellOverride {
    /// `spec.app.advertise` of this cell.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 3, max = 261))]
    #[x_kube(validation = rules::host_port("spec.overrides[].advertise"))]
    pub advertise: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub redis: Option<StoreSpec>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mysql: Option<StoreSpec>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kafka: Option<StoreSpec>,
}

/// Cells of one region.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct RegionCells {
    /// Region name, as the region's operator is started with (`--region`); a DNS label.
    #[x_kube(validation = rules::dns_label("spec.regions[].name", "eu-west"))]
    #[schemars(length(min = 1, max = 63))]
    pub name: String,
    /// Number of cells in this region; scale by adding cells, not by growing them.
    #[schemars(range(min = 0, max = 256), with = "i32")]
    pub cells: u32,
    /// Zones to spread the region's cells over, round-robin (label values).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 16), with = "Vec<ZoneSchema>")]
    #[x_kube(validation = rules::label_values("spec.regions[].zones"))]
    pub zones: Vec<String>,
}

/// The schema of one zone name (bounded for the cost of its rule).
#[derive(JsonSchema)]
#[schemars(transparent)]
#[allow(dead_code)] // schema only
struct ZoneSchema(#[schemars(length(min = 1, max = 63))] String);

/// The per-cell template of a CellSet.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct CellTemplate {
    /// Each cell's share of the slots relative to the other cells' (1-100, default 10).
    #[serde(default = "default_weight")]
    #[schemars(range(min = 1, max = 100), with = "i32")]
    pub capacity_weight: u32,
    /// Each cell's `spec.scheduling`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub scheduling: Option<Scheduling>,
    pub app: AppSpec,
    pub redis: StoreSpec,
    pub mysql: StoreSpec,
    pub kafka: StoreSpec,
}

/// Observed state of a CellSet.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct CellSetStatus {
    /// `Active` once its cells are applied; `Failed` when they cannot be (see `Ready`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub phase: Option<CellSetPhase>,
    /// `Ready`: False with `InvalidSpec` (the operator refused the spec) or `ApplyFailed`
    /// (the API server refused a stamped Cell, with its message); cleared when fixed.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub conditions: Vec<Condition>,
    /// Cells the set stamps (over all its regions).
    #[serde(default)]
    #[schemars(with = "i32")]
    pub cells: u32,
    /// Of those, the Cells whose `Ready` condition is True.
    #[serde(default)]
    #[schemars(with = "i32")]
    pub ready_cells: u32,
    /// Placement epoch: bumped whenever slot ownership changes.
    #[serde(default)]
    #[schemars(with = "i64")]
    pub epoch: u64,
    /// Slots per cell at `epoch` (the full table lives in etcd).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    #[schemars(with = "BTreeMap<String, i32>")]
    pub slots: BTreeMap<String, u32>,
    /// The `metadata.generation` of the spec this status describes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
}

/// Where a CellSet stands.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, JsonSchema)]
pub enum CellSetPhase {
    /// Every wanted Cell is applied.
    Active,
    /// The set's Cells cannot be applied as specified; the `Ready` condition says why.
    Failed,
}

/// A cell a CellSet wants: its name and full spec.
#[derive(Clone, Debug, PartialEq)]
pub struct StampedCell {
    pub name: String,
    pub spec: CellSpec,
}

/// Name of cell `index` of `region` in CellSet `set`.
pub fn stamped_cell_name(set: &str, region: &str, index: u32) -> String {
    format!("{set}-{region}-{index}")
}

impl CellSetSpec {
    /// Override keys that name no cell this set stamps (a typo would silently do nothing).
    pub fn unknown_overrides(&self, set_name: &str) -> Vec<String> {
        let stamped: Vec<String> = self.stamp(set_name).into_iter().map(|c| c.name).collect();
        self.overrides
            .keys()
            .filter(|k| !stamped.contains(k))
            .cloned()
            .collect()
    }

    /// The cells this set stamps out, in region order then index. Pure: the same spec
    /// always gives the same names and pairs.
    pub fn stamp(&self, set_name: &str) -> Vec<StampedCell> {
        let regions = &self.regions;
        let mut out = Vec::new();
        for (ri, region) in regions.iter().enumerate() {
            for index in 0..region.cells {
                // The standby is the same index in the next region, if that region has it.
                let standby = (regions.len() > 1)
                    .then(|| &regions[(ri + 1) % regions.len()])
                    .filter(|next| index < next.cells)
                    .map(|next| StandbyRef {
                        cell: stamped_cell_name(set_name, &next.name, index),
                        region: next.name.clone(),
                    });
                let zone = (!region.zones.is_empty())
                    .then(|| region.zones[index as usize % region.zones.len()].clone());
                let t = &self.template;
                let name = stamped_cell_name(set_name, &region.name, index);
                let o = self.overrides.get(&name).cloned().unwrap_or_default();
                let mut app = t.app.clone();
                if o.advertise.is_some() {
                    app.advertise = o.advertise;
                }
                out.push(StampedCell {
                    name,
                    spec: CellSpec {
                        region: region.name.clone(),
                        zone,
                        capacity_weight: t.capacity_weight,
                        platform: self.platform.clone(),
                        standby,
                        scheduling: t.scheduling.clone(),
                        app,
                        redis: o.redis.unwrap_or_else(|| t.redis.clone()),
                        mysql: o.mysql.unwrap_or_else(|| t.mysql.clone()),
                        kafka: o.kafka.unwrap_or_else(|| t.kafka.clone()),
                    },
                });
            }
        }
        out
    }
}

#[cfg(test)]
pub(crate) mod fixtures {
    use super::*;

    /// A minimal valid Cell spec.
    pub fn cell_spec(region: &str) -> CellSpec {
        CellSpec {
            region: region.into(),
            zone: None,
            capacity_weight: 10,
            platform: DEFAULT_PLATFORM.into(),
            standby: None,
            scheduling: None,
            app: AppSpec {
                image: "example/shop:1".into(),
                replicas: 2,
                port: 8080,
                resources: None,
                env: vec![],
                probes: Probes::default(),
                advertise: None,
                allow_from: vec![],
                expose: Expose::ClusterIP,
            },
            redis: StoreSpec::in_cluster(),
            mysql: StoreSpec::in_cluster(),
            kafka: StoreSpec::in_cluster(),
        }
    }
}

#[cfg(test)]
#[path = "crd_tests.rs"]
mod tests;
