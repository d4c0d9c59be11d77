//! A cell's children as this operator last saw them (I/O), and what it last applied.
//!
//! One watch per kind (labelled `app.kubernetes.io/managed-by=cellplane-operator`) feeds
//! both the controller's triggers (a changed child re-reconciles its cell) and a store the
//! reconcile reads instead of asking the API server. Workloads and Services are kept whole
//! (their status decides readiness and the load-balancer address); ConfigMaps, PDBs,
//! NetworkPolicies and Secrets as metadata only, so no Secret data is ever cached.
//!
//! The ledger remembers, per object, a hash of the desired object last applied and the
//! object's marker right after (its `generation` where the API server keeps one, else its
//! `resourceVersion`). An object whose desired hash and marker are unchanged is not sent
//! again: the re-reconciles that a cell's pods starting cause (each moves its workloads'
//! status, never their generation) cost no writes. A deleted or edited child changes the
//! marker and is applied again; every entry expires after [`REAPPLY_AFTER`], so drift the
//! marker cannot show (a label edited on a Deployment) is corrected within it.

use crate::Result;
use futures::Stream;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use k8s_openapi::NamespaceResourceScope;
use kube::api::{Api, PartialObjectMeta};
use kube::runtime::reflector::{self, reflector, ObjectRef, Store};
use kube::runtime::{watcher, WatchStreamExt};
use kube::{Resource, ResourceExt};
use serde::de::DeserializeOwned;
use serde::Serialize;
use std::collections::HashMap;
use std::fmt::Debug;
use std::time::{Duration, Instant};

/// Every object is applied again at least this often, changed or not.
pub const REAPPLY_AFTER: Duration = Duration::from_secs(600);

/// A watch of one kind: its store, and the stream the controller polls (which keeps the
/// store current). With `Api<PartialObjectMeta<K>>` it is a metadata-only watch.
pub fn watch<K>(
    api: Api<K>,
    config: watcher::Config,
) -> (
    Store<K>,
    impl Stream<Item = Result<K, watcher::Error>> + Send + 'static,
)
where
    K: Resource<DynamicType = ()> + Clone + DeserializeOwned + Debug + Send + Sync + 'static,
{
    let (store, writer) = reflector::store();
    // managedFields are often half an object and nothing here reads them.
    let events = watcher(api, config).modify(|o| o.managed_fields_mut().clear());
    let stream = reflector(writer, events)
        .default_backoff()
        .touched_objects();
    (store, stream)
}

/// The stores of every child kind.
pub struct OwnedStores {
    pub deployments: Store<k8s_openapi::api::apps::v1::Deployment>,
    pub statefulsets: Store<k8s_openapi::api::apps::v1::StatefulSet>,
    pub services: Store<k8s_openapi::api::core::v1::Service>,
    pub config_maps: Store<PartialObjectMeta<k8s_openapi::api::core::v1::ConfigMap>>,
    pub pdbs: Store<PartialObjectMeta<k8s_openapi::api::policy::v1::PodDisruptionBudget>>,
    pub network_policies: Store<PartialObjectMeta<k8s_openapi::api::networking::v1::NetworkPolicy>>,
    pub secrets: Store<PartialObjectMeta<k8s_openapi::api::core::v1::Secret>>,
}

impl OwnedStores {
    /// Waits until every store has listed once (before that, "absent" means "not known").
    pub async fn ready(&self) {
        let _ = tokio::join!(
            self.deployments.wait_until_ready(),
            self.statefulsets.wait_until_ready(),
            self.services.wait_until_ready(),
            self.config_maps.wait_until_ready(),
            self.pdbs.wait_until_ready(),
            self.network_policies.wait_until_ready(),
            self.secrets.wait_until_ready(),
        );
    }
}

/// The object's state as far as "did it change since we applied it" goes.
pub fn marker(meta: &ObjectMeta) -> String {
    match meta.generation {
        Some(g) => format!("g{g}"),
        None => format!("rv{}", meta.resource_version.as_deref().unwrap_or("")),
    }
}

/// The object in `store` named like `obj`.
pub fn find<K, S>(store: &Store<S>, obj: &K) -> Option<std::sync::Arc<S>>
where
    K: Resource,
    S: Resource<DynamicType = ()> + Clone + 'static,
{
    let r = ObjectRef::<S>::new(&obj.name_any());
    store.get(&match obj.namespace() {
        Some(ns) => r.within(&ns),
        None => r,
    })
}

struct Entry {
    desired: u64,
    marker: String,
    at: Instant,
}

/// What this operator applied last, per object (kind, namespace, name), and for which
/// desired set of children each cell (namespace, name) was last pruned.
#[derive(Default)]
pub struct Ledger {
    entries: parking_lot::Mutex<HashMap<(&'static str, String, String), Entry>>,
    pruned: parking_lot::Mutex<HashMap<(String, String), (u64, Instant)>>,
}

impl Ledger {
    fn key<K: Resource<DynamicType = ()>>(obj: &K) -> (&'static str, String, String) {
        (
            leak_kind::<K>(),
            obj.namespace().unwrap_or_default(),
            obj.name_any(),
        )
    }

    /// Forgets one object (it was deleted).
    pub fn forget<K: Resource<DynamicType = ()>>(&self, namespace: &str, name: &str) {
        self.entries
            .lock()
            .remove(&(leak_kind::<K>(), namespace.to_string(), name.to_string()));
    }

    /// Forgets a cell's objects (it is being deleted).
    pub fn forget_namespace_prefix(&self, namespace: &str, prefix: &str) {
        self.entries
            .lock()
            .retain(|(_, ns, name), _| !(ns == namespace && name.starts_with(prefix)));
        self.pruned
            .lock()
            .retain(|(ns, name), _| !(ns == namespace && name.starts_with(prefix)));
    }

    /// Whether `cell` was pruned for the desired set `shape` within [`REAPPLY_AFTER`].
    pub fn pruned_recently(&self, cell: &(String, String), shape: u64) -> bool {
        self.pruned
            .lock()
            .get(cell)
            .is_some_and(|(s, at)| *s == shape && at.elapsed() < REAPPLY_AFTER)
    }

    pub fn mark_pruned(&self, cell: (String, String), shape: u64) {
        self.pruned.lock().insert(cell, (shape, Instant::now()));
    }
}

/// `K::KIND` as a `'static` str (kinds are compile-time constants of k8s-openapi types).
fn leak_kind<K: Resource<DynamicType = ()>>() -> &'static str {
    match K::kind(&()) {
        std::borrow::Cow::Borrowed(k) => k,
        std::borrow::Cow::Owned(_) => "dynamic",
    }
}

fn hash<K: Serialize>(obj: &K) -> u64 {
    xxhash_rust::xxh3::xxh3_64(&serde_json::to_vec(obj).unwrap_or_default())
}

/// Server-side applies `obj` unless the ledger says this exact object was applied and the
/// object is still as we left it (`current`: its metadata from the watch). Returns the
/// object the API server returned, or None when nothing was sent.
pub async fn apply_if_changed<K>(
    client: &kube::Client,
    ledger: &Ledger,
    obj: &K,
    current: Option<&ObjectMeta>,
) -> Result<Option<K>>
where
    K: Resource<Scope = NamespaceResourceScope, DynamicType = ()>
        + Clone
        + Debug
        + Serialize
        + DeserializeOwned,
{
    let key = Ledger::key(obj);
    let desired = hash(obj);
    if let Some(cur) = current {
        let entries = ledger.entries.lock();
        if let Some(e) = entries.get(&key) {
            if e.desired == desired && e.marker == marker(cur) && e.at.elapsed() < REAPPLY_AFTER {
                return Ok(None);
            }
        }
    }
    let applied = super::apply(client, obj).await?;
    ledger.entries.lock().insert(
        key,
        Entry {
            desired,
            marker: marker(applied.meta()),
            at: Instant::now(),
        },
    );
    Ok(Some(applied))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_marker_is_the_generation_where_there_is_one() {
        let mut m = ObjectMeta {
            resource_version: Some("41".into()),
            ..Default::default()
        };
        assert_eq!(marker(&m), "rv41");
        m.generation = Some(3);
        assert_eq!(
            marker(&m),
            "g3",
            "status updates move the version, not the generation"
        );
    }
}
