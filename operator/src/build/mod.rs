//! Cell -> desired Kubernetes objects. Pure: no client, no clock, no randomness (generated
//! secrets come in as arguments), so every object is unit-tested as a plain function.

pub mod cellset;
pub mod config_map;
pub mod deployment;
pub mod names;
pub mod network_policy;
pub mod pdb;
pub mod pod;
pub mod secret;
pub mod service;
pub mod statefulset;

use crate::{Error, Result};
use cellplane_cells::crd::{Cell, CellSpec, Expose, StoreSpec};
use cellplane_cells::failover_timing::FailoverTimings;
use k8s_openapi::api::apps::v1::{Deployment, StatefulSet};
use k8s_openapi::api::core::v1::{ConfigMap, Secret, Service};
use k8s_openapi::api::networking::v1::NetworkPolicy;
use k8s_openapi::api::policy::v1::PodDisruptionBudget;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ObjectMeta, OwnerReference};
use kube::Resource;
use std::collections::BTreeMap;

pub use names::Store;

/// Who applies our objects (server-side apply field manager).
pub const FIELD_MANAGER: &str = "cellplane-operator";
/// Finalizer that removes a cell's etcd registration before the Cell goes away.
pub const CELL_FINALIZER: &str = "cellplane.io/registration";

/// What a Cell is rendered from: its identity plus its validated spec.
#[derive(Clone, Debug)]
pub struct CellContext<'a> {
    pub name: &'a str,
    pub namespace: &'a str,
    pub owner: OwnerReference,
    pub spec: &'a CellSpec,
    /// The global etcd the app follows the routing table in (the operator's own
    /// `--etcd-endpoints`); empty: the app gets no table source from the operator.
    pub etcd_endpoints: &'a [String],
    /// The ownership lease timings the app must use (the platform leader's); passed with
    /// the table source.
    pub timings: FailoverTimings,
}

impl<'a> CellContext<'a> {
    /// Reads identity from a Cell fetched from the API server (needs name, namespace, uid).
    pub fn from_cell(cell: &'a Cell) -> Result<Self> {
        let name = cell
            .metadata
            .name
            .as_deref()
            .ok_or(Error::MissingField("metadata.name"))?;
        let namespace = cell
            .metadata
            .namespace
            .as_deref()
            .ok_or(Error::MissingField("metadata.namespace"))?;
        let owner = cell
            .controller_owner_ref(&())
            .ok_or(Error::MissingField("metadata.uid"))?;
        Ok(Self {
            name,
            namespace,
            owner,
            spec: &cell.spec,
            etcd_endpoints: &[],
            timings: FailoverTimings::default(),
        })
    }

    /// Tells the app where its routing table lives, and the ownership lease timings it
    /// must keep there.
    pub fn with_etcd(mut self, endpoints: &'a [String], timings: &FailoverTimings) -> Self {
        self.etcd_endpoints = endpoints;
        self.timings = timings.clone();
        self
    }

    /// Metadata every child carries: name, namespace, labels, owner (so deletion cascades).
    pub fn meta(&self, name: String, component: &str) -> ObjectMeta {
        ObjectMeta {
            name: Some(name),
            namespace: Some(self.namespace.to_string()),
            labels: Some(self.labels(component)),
            owner_references: Some(vec![self.owner.clone()]),
            ..ObjectMeta::default()
        }
    }

    /// Labels of a child object and of its pods.
    pub fn labels(&self, component: &str) -> BTreeMap<String, String> {
        let mut l = self.selector(component);
        l.insert("app.kubernetes.io/managed-by".into(), FIELD_MANAGER.into());
        l.insert("app.kubernetes.io/part-of".into(), "cellplane".into());
        l.insert(names::LABEL_REGION.into(), self.spec.region.clone());
        l
    }

    /// The stable subset of labels used in selectors (selectors are immutable).
    pub fn selector(&self, component: &str) -> BTreeMap<String, String> {
        BTreeMap::from([
            ("app.kubernetes.io/name".to_string(), component.to_string()),
            (
                "app.kubernetes.io/instance".to_string(),
                self.name.to_string(),
            ),
            (names::LABEL_CELL.to_string(), self.name.to_string()),
            (names::LABEL_COMPONENT.to_string(), component.to_string()),
        ])
    }

    /// The cell's store spec for `store`.
    pub fn store(&self, store: Store) -> &'a StoreSpec {
        match store {
            Store::Redis => &self.spec.redis,
            Store::Mysql => &self.spec.mysql,
            Store::Kafka => &self.spec.kafka,
        }
    }
}

/// Everything a Cell should have: its objects, and the endpoints it registers.
#[derive(Clone, Debug, Default)]
pub struct Desired {
    /// Only the Secrets that do not exist yet: a Secret is created once and never
    /// overwritten (see [`secret`]).
    pub secrets: Vec<Secret>,
    pub deployments: Vec<Deployment>,
    pub statefulsets: Vec<StatefulSet>,
    pub services: Vec<Service>,
    pub config_maps: Vec<ConfigMap>,
    pub pdbs: Vec<PodDisruptionBudget>,
    pub network_policies: Vec<NetworkPolicy>,
    /// Where the app and each store are reached: `app`, `redis`, `mysql`, `kafka`.
    pub endpoints: BTreeMap<String, String>,
}

/// Checks what the schema cannot express; the API server already enforced the rest.
pub fn validate(spec: &CellSpec) -> Result<()> {
    for store in Store::ALL {
        let s = match store {
            Store::Redis => &spec.redis,
            Store::Mysql => &spec.mysql,
            Store::Kafka => &spec.kafka,
        };
        if s.in_cluster.is_some() == s.external.is_some() {
            return Err(Error::InvalidSpec(format!(
                "spec.{}: set exactly one of inCluster or external",
                store.field()
            )));
        }
    }
    if spec
        .standby
        .as_ref()
        .is_some_and(|s| s.region == spec.region)
    {
        return Err(Error::InvalidSpec(
            "spec.standby.region must differ from spec.region".into(),
        ));
    }
    Ok(())
}

/// The stores whose credentials Secret is missing (`existing`: the cell's Secrets by
/// name): the caller generates passwords for exactly these.
pub fn missing_secrets(
    ctx: &CellContext,
    existing: &std::collections::BTreeSet<String>,
) -> Vec<Store> {
    Store::ALL
        .into_iter()
        .filter(|s| s.has_secret() && ctx.store(*s).in_cluster.is_some())
        .filter(|s| !existing.contains(&names::secret(ctx.name, *s)))
        .collect()
}

/// Where the app and each store of the cell are reached.
pub fn endpoints(ctx: &CellContext) -> BTreeMap<String, String> {
    // Until a load balancer has an address, the in-cluster name is shown.
    let app = app_address(ctx, None)
        .unwrap_or_else(|| names::app_address(ctx.name, ctx.namespace, ctx.spec.app.port));
    let mut endpoints = BTreeMap::from([("app".to_string(), app)]);
    for store in Store::ALL {
        endpoints.insert(
            store.component().into(),
            config_map::registered_address(ctx, store),
        );
    }
    endpoints
}

/// The address routers dial for the app: `spec.app.advertise`; else, exposed through a
/// load balancer, its first ingress (None until it has one); else the in-cluster Service
/// name (reachable by routers in the same cluster only). `app_service` is the app Service
/// as the API server returned it.
pub fn app_address(ctx: &CellContext, app_service: Option<&Service>) -> Option<String> {
    if let Some(a) = &ctx.spec.app.advertise {
        return Some(a.clone());
    }
    if ctx.spec.app.expose == Expose::ClusterIP {
        return Some(names::app_address(
            ctx.name,
            ctx.namespace,
            ctx.spec.app.port,
        ));
    }
    let ingress = app_service?
        .status
        .as_ref()?
        .load_balancer
        .as_ref()?
        .ingress
        .as_ref()?
        .iter()
        .find_map(|i| i.ip.clone().or_else(|| i.hostname.clone()))?;
    Some(format!("{ingress}:{}", ctx.spec.app.port))
}

/// Renders every object of the cell; `new_secrets` are the passwords of the Secrets to
/// create (those [`missing_secrets`] named).
pub fn render(ctx: &CellContext, new_secrets: &[(Store, secret::Passwords)]) -> Result<Desired> {
    validate(ctx.spec)?;
    let mut d = Desired {
        secrets: new_secrets
            .iter()
            .filter_map(|(store, pw)| secret::store(ctx, *store, pw))
            .collect(),
        endpoints: endpoints(ctx),
        ..Desired::default()
    };
    d.deployments.push(deployment::app(ctx));
    d.services.push(service::app(ctx));
    d.pdbs.push(pdb::app(ctx));
    d.config_maps.push(config_map::cell_info(ctx));
    d.network_policies.push(network_policy::app(ctx));
    let mut any_store_in_cluster = false;
    for store in Store::ALL {
        if let Some(in_cluster) = &ctx.store(store).in_cluster {
            any_store_in_cluster = true;
            d.statefulsets
                .push(statefulset::store(ctx, store, in_cluster));
            d.services.push(service::headless(ctx, store));
            d.services.push(service::client(ctx, store));
            d.pdbs.push(pdb::store(ctx, store));
            if let Some(cm) = config_map::store(ctx, store) {
                d.config_maps.push(cm);
            }
        }
    }
    if any_store_in_cluster {
        d.network_policies.push(network_policy::stores(ctx));
    }
    Ok(d)
}

#[cfg(test)]
pub(crate) mod fixtures {
    use super::*;
    use cellplane_cells::crd::{AppSpec, Probes, StandbyRef};

    pub fn spec() -> CellSpec {
        CellSpec {
            region: "us-east".into(),
            zone: Some("us-east-1a".into()),
            capacity_weight: 10,
            platform: "shop".into(),
            standby: Some(StandbyRef {
                cell: "shop-eu-0".into(),
                region: "eu-west".into(),
            }),
            scheduling: None,
            app: AppSpec {
                image: "example/shop:1.0".into(),
                replicas: 3,
                port: 8080,
                resources: None,
                env: vec![cellplane_cells::crd::EnvVar {
                    name: "MODE".into(),
                    value: "demo".into(),
                }],
                probes: Probes::default(),
                advertise: None,
                allow_from: vec![],
                expose: Default::default(),
            },
            redis: StoreSpec::in_cluster(),
            mysql: StoreSpec::in_cluster(),
            kafka: StoreSpec::in_cluster(),
        }
    }

    pub fn ctx(spec: &CellSpec) -> CellContext<'_> {
        CellContext {
            name: "shop-us-0",
            namespace: "shop",
            owner: OwnerReference {
                api_version: "cellplane.io/v1alpha1".into(),
                kind: "Cell".into(),
                name: "shop-us-0".into(),
                uid: "1234".into(),
                controller: Some(true),
                block_owner_deletion: Some(true),
            },
            etcd_endpoints: &[],
            timings: FailoverTimings::default(),
            spec,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use cellplane_cells::crd::{ExternalStore, SecretRef};

    /// The longest name admission allows leaves every derived name and label within 63
    /// characters, counting what Kubernetes adds (a StatefulSet's pods are labelled
    /// `<statefulset>-<10-character revision hash>`, a Deployment's ReplicaSets get a hash).
    #[test]
    fn the_longest_admitted_cell_name_fits_every_derived_name() {
        use cellplane_cells::admission::MAX_CELL_NAME_LEN;
        let spec = fixtures::spec();
        let name = "c".repeat(MAX_CELL_NAME_LEN);
        let mut ctx = fixtures::ctx(&spec);
        ctx.name = &name;
        let d = render(&ctx, &[]).unwrap();
        let mut names: Vec<(String, usize)> = vec![];
        let mut add = |meta: &k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta,
                       added: usize| {
            names.push((meta.name.clone().unwrap(), added));
            for value in meta.labels.iter().flat_map(|l| l.values()) {
                names.push((value.clone(), 0));
            }
        };
        d.statefulsets
            .iter()
            .for_each(|o| add(&o.metadata, "-0123456789".len()));
        d.deployments
            .iter()
            .for_each(|o| add(&o.metadata, "-0123456789".len()));
        d.services.iter().for_each(|o| add(&o.metadata, 0));
        d.config_maps.iter().for_each(|o| add(&o.metadata, 0));
        d.pdbs.iter().for_each(|o| add(&o.metadata, 0));
        d.network_policies.iter().for_each(|o| add(&o.metadata, 0));
        assert!(names.len() > 20);
        for (n, added) in &names {
            assert!(n.len() + added <= 63, "{n} (+{added}) is longer than 63");
        }
        assert!(
            names.iter().any(|(n, added)| n.len() + added == 63),
            "the limit is tight: one more character would not fit"
        );
    }

    #[test]
    fn full_in_cluster_cell_renders_every_object() {
        let spec = fixtures::spec();
        let d = render(&fixtures::ctx(&spec), &[]).unwrap();
        assert_eq!(d.deployments.len(), 1);
        assert_eq!(d.statefulsets.len(), 3);
        assert_eq!(d.services.len(), 7, "app + headless and client per store");
        assert_eq!(d.pdbs.len(), 4);
        assert_eq!(d.network_policies.len(), 2);
        assert_eq!(d.config_maps.len(), 3, "cell info + redis + mysql config");
        assert!(
            d.secrets.is_empty(),
            "no passwords given: no Secret to create"
        );
        assert_eq!(d.endpoints.len(), 4, "{:?}", d.endpoints);
        assert_eq!(d.endpoints["app"], "shop-us-0-app.shop.svc:8080");
        let app_env = |d: &Desired| {
            d.deployments[0]
                .spec
                .template
                .spec
                .as_ref()
                .unwrap()
                .containers[0]
                .env
                .clone()
                .unwrap_or_default()
        };
        let env = |d: &Desired| -> Vec<String> { app_env(d).into_iter().map(|e| e.name).collect() };
        assert!(!env(&d).contains(&"CELL_ETCD".to_string()));

        // With a global etcd and an advertised address: the app follows the table there,
        // and routers are told an address they can dial.
        let mut spec = fixtures::spec();
        spec.app.advertise = Some("10.1.2.3:31080".into());
        let etcd = vec![
            "http://10.0.0.1:2379".to_string(),
            "http://10.0.0.2:2379".into(),
        ];
        let timings = FailoverTimings {
            owner_lease_ttl_ms: 3_000,
            fence_after_ms: 1_800,
            ..FailoverTimings::default()
        };
        let d = render(&fixtures::ctx(&spec).with_etcd(&etcd, &timings), &[]).unwrap();
        assert_eq!(d.endpoints["app"], "10.1.2.3:31080");
        assert!(env(&d).contains(&"CELL_ETCD".to_string()));
        // The app keeps its ownership lease with the platform's timings, not its defaults.
        let app = app_env(&d);
        let value = |name: &str| {
            app.iter()
                .find(|e| e.name == name)
                .and_then(|e| e.value.clone())
        };
        assert_eq!(value("CELL_OWNER_LEASE_TTL_MS").as_deref(), Some("3000"));
        assert_eq!(value("CELL_FENCE_AFTER_MS").as_deref(), Some("1800"));
        assert_eq!(value("CELL_OWNER_RENEW_EVERY_MS").as_deref(), Some("250"));
        let info = d
            .config_maps
            .iter()
            .find(|c| c.data.as_ref().unwrap().contains_key("cell"))
            .unwrap();
        assert_eq!(
            info.data.as_ref().unwrap()["etcdEndpoints"],
            "http://10.0.0.1:2379,http://10.0.0.2:2379"
        );
        // Every object is owned by the Cell, so deleting the Cell cascades.
        let metas = d
            .deployments
            .iter()
            .map(|o| &o.metadata)
            .chain(d.statefulsets.iter().map(|o| &o.metadata))
            .chain(d.services.iter().map(|o| &o.metadata))
            .chain(d.pdbs.iter().map(|o| &o.metadata))
            .chain(d.network_policies.iter().map(|o| &o.metadata))
            .chain(d.config_maps.iter().map(|o| &o.metadata));
        for m in metas {
            assert_eq!(
                m.owner_references.as_ref().unwrap()[0].uid,
                "1234",
                "{:?}",
                m.name
            );
            assert_eq!(m.namespace.as_deref(), Some("shop"));
            assert_eq!(m.labels.as_ref().unwrap()[names::LABEL_CELL], "shop-us-0");
        }
    }

    #[test]
    fn a_load_balanced_app_registers_the_load_balancer_address_once_it_has_one() {
        use k8s_openapi::api::core::v1::{LoadBalancerIngress, LoadBalancerStatus, ServiceStatus};
        let mut spec = fixtures::spec();
        spec.app.expose = Expose::LoadBalancer;
        let ctx = fixtures::ctx(&spec);
        let mut svc = service::app(&ctx);
        assert_eq!(
            svc.spec.as_ref().unwrap().type_.as_deref(),
            Some("LoadBalancer")
        );
        assert_eq!(app_address(&ctx, Some(&svc)), None, "no address yet");
        svc.status = Some(ServiceStatus {
            load_balancer: Some(LoadBalancerStatus {
                ingress: Some(vec![LoadBalancerIngress {
                    ip: Some("127.0.1.1".into()),
                    ..Default::default()
                }]),
            }),
            ..Default::default()
        });
        assert_eq!(
            app_address(&ctx, Some(&svc)).as_deref(),
            Some("127.0.1.1:8080")
        );
        // An explicit address wins; a ClusterIP app is reached by its in-cluster name.
        spec.app.advertise = Some("edge.example:443".into());
        assert_eq!(
            app_address(&fixtures::ctx(&spec), Some(&svc)).as_deref(),
            Some("edge.example:443")
        );
        let plain = fixtures::spec();
        assert_eq!(
            app_address(&fixtures::ctx(&plain), None).as_deref(),
            Some("shop-us-0-app.shop.svc:8080")
        );
    }

    #[test]
    fn secrets_are_created_only_for_missing_in_cluster_stores() {
        let spec = fixtures::spec();
        let ctx = fixtures::ctx(&spec);
        let none = std::collections::BTreeSet::new();
        assert_eq!(missing_secrets(&ctx, &none), [Store::Redis, Store::Mysql]);
        let redis_exists = [names::secret("shop-us-0", Store::Redis)].into();
        let missing = missing_secrets(&ctx, &redis_exists);
        assert_eq!(missing, [Store::Mysql]);
        let pw = secret::Passwords(vec!["r".into(), "a".into(), "p".into()]);
        let d = render(&ctx, &[(Store::Mysql, pw)]).unwrap();
        assert_eq!(d.secrets.len(), 1);
        assert_eq!(
            d.secrets[0].metadata.name.as_deref(),
            Some(names::secret("shop-us-0", Store::Mysql).as_str())
        );
        let mut ext = spec.clone();
        ext.mysql = StoreSpec {
            in_cluster: None,
            external: Some(ExternalStore {
                endpoint: "db.example:3306".into(),
                secret_ref: SecretRef { name: "rds".into() },
                admin_secret_ref: None,
            }),
        };
        assert_eq!(missing_secrets(&fixtures::ctx(&ext), &none), [Store::Redis]);
    }

    #[test]
    fn external_stores_render_no_workloads() {
        let mut spec = fixtures::spec();
        let ext = StoreSpec {
            in_cluster: None,
            external: Some(ExternalStore {
                endpoint: "db.example:3306".into(),
                secret_ref: SecretRef { name: "rds".into() },
                admin_secret_ref: None,
            }),
        };
        spec.redis = ext.clone();
        spec.mysql = ext.clone();
        spec.kafka = ext;
        let d = render(&fixtures::ctx(&spec), &[]).unwrap();
        assert!(d.statefulsets.is_empty());
        assert_eq!(d.services.len(), 1);
        assert_eq!(
            d.network_policies.len(),
            1,
            "no store policy without in-cluster stores"
        );
    }

    #[test]
    fn invalid_specs_name_the_field() {
        let mut spec = fixtures::spec();
        spec.mysql.external = Some(ExternalStore {
            endpoint: "x:1".into(),
            secret_ref: SecretRef { name: "s".into() },
            admin_secret_ref: None,
        });
        let e = render(&fixtures::ctx(&spec), &[]).unwrap_err().to_string();
        assert!(e.contains("spec.mysql"), "{e}");
        let mut spec = fixtures::spec();
        spec.standby.as_mut().unwrap().region = "us-east".into();
        assert!(render(&fixtures::ctx(&spec), &[])
            .unwrap_err()
            .to_string()
            .contains("spec.standby.region"));
    }
}
