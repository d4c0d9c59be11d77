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
use cellplane_cells::crd::{Cell, CellSpec, StoreSpec};
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
        })
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
    let mut endpoints = BTreeMap::from([(
        "app".to_string(),
        names::app_address(ctx.name, ctx.namespace, ctx.spec.app.port),
    )]);
    for store in Store::ALL {
        endpoints.insert(
            store.component().into(),
            config_map::store_address(ctx, store),
        );
    }
    endpoints
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
    use cellplane_cells::crd::{AppSpec, DesiredState, Probes, StandbyRef};

    pub fn spec() -> CellSpec {
        CellSpec {
            region: "us-east".into(),
            zone: Some("us-east-1a".into()),
            capacity_weight: 10,
            desired_state: DesiredState::Active,
            platform: "shop".into(),
            standby: Some(StandbyRef {
                cell: "shop-eu-0".into(),
                region: "eu-west".into(),
            }),
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
            spec,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use cellplane_cells::crd::{ExternalStore, SecretRef};

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
