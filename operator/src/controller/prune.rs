//! Pruning a Cell's children that its spec no longer renders (I/O around a pure choice):
//! a store switched from `inCluster` to `external` leaves its StatefulSet, Services, PDB
//! and ConfigMap behind otherwise. As Stackable's `ClusterResources` does it: every child
//! the operator applies carries the cell's label and an owner reference to the Cell; after
//! an apply, whatever of this Cell's children is not in the desired set is deleted (with
//! the child's uid as a precondition, so a child recreated meanwhile is left alone).
//!
//! Generated Secrets are never pruned: they hold the credentials a store's volumes were
//! initialised with (a StatefulSet's PersistentVolumeClaims outlive it), so switching a
//! store back to `inCluster` finds its data and its password together. They outlive the
//! Cell too (no owner reference), as its volumes do.

use super::owned::{Ledger, OwnedStores};
use crate::build::Desired;
use crate::Result;
use cellplane_cells::crd::Cell;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use k8s_openapi::NamespaceResourceScope;
use kube::api::{Api, DeleteParams, Preconditions};
use kube::runtime::reflector::Store;
use kube::{Resource, ResourceExt};
use serde::de::DeserializeOwned;
use std::collections::BTreeSet;
use std::fmt::Debug;

/// The children of the Cell `cell_uid` (by controller owner reference, in `namespace`)
/// whose names `desired` does not hold: name and uid.
pub fn stale<'a>(
    cell_uid: &str,
    namespace: &str,
    children: impl IntoIterator<Item = &'a ObjectMeta>,
    desired: &BTreeSet<String>,
) -> Vec<(String, String)> {
    let mut out: Vec<(String, String)> = children
        .into_iter()
        .filter(|m| m.namespace.as_deref() == Some(namespace))
        .filter(|m| m.deletion_timestamp.is_none())
        .filter(|m| {
            m.owner_references.iter().flatten().any(|o| {
                o.uid == cell_uid && o.controller == Some(true) && o.kind == Cell::kind(&())
            })
        })
        .filter_map(|m| {
            let name = m.name.clone()?;
            (!desired.contains(&name)).then(|| (name, m.uid.clone().unwrap_or_default()))
        })
        .collect();
    out.sort();
    out
}

/// Deletes what `cell`'s current spec no longer renders; returns `Kind/name` of each.
/// The scan is skipped while the cell's desired set is the one last pruned for (within
/// [`super::owned::REAPPLY_AFTER`]): the re-reconciles a cell's pods cause cost nothing.
pub async fn prune(
    client: &kube::Client,
    ledger: &Ledger,
    owned: &OwnedStores,
    cell: &Cell,
    desired: &Desired,
) -> Result<Vec<String>> {
    let key = (cell.namespace().unwrap_or_default(), cell.name_any());
    let shape = desired_names_hash(desired);
    if ledger.pruned_recently(&key, shape) {
        return Ok(Vec::new());
    }
    let mut gone = Vec::new();
    gone.extend(
        prune_kind(
            client,
            ledger,
            &owned.deployments,
            cell,
            &desired.deployments,
        )
        .await?,
    );
    gone.extend(
        prune_kind(
            client,
            ledger,
            &owned.statefulsets,
            cell,
            &desired.statefulsets,
        )
        .await?,
    );
    gone.extend(prune_kind(client, ledger, &owned.services, cell, &desired.services).await?);
    gone.extend(
        prune_kind(
            client,
            ledger,
            &owned.config_maps,
            cell,
            &desired.config_maps,
        )
        .await?,
    );
    gone.extend(prune_kind(client, ledger, &owned.pdbs, cell, &desired.pdbs).await?);
    gone.extend(
        prune_kind(
            client,
            ledger,
            &owned.network_policies,
            cell,
            &desired.network_policies,
        )
        .await?,
    );
    ledger.mark_pruned(key, shape);
    Ok(gone)
}

/// A hash of every child's kind and name the spec renders (what pruning compares with).
fn desired_names_hash(d: &Desired) -> u64 {
    fn names<K: Resource<DynamicType = ()>>(out: &mut String, objs: &[K]) {
        for o in objs {
            out.push_str(&K::kind(&()));
            out.push('/');
            out.push_str(&o.name_any());
            out.push('\n');
        }
    }
    let mut all = String::new();
    names(&mut all, &d.deployments);
    names(&mut all, &d.statefulsets);
    names(&mut all, &d.services);
    names(&mut all, &d.config_maps);
    names(&mut all, &d.pdbs);
    names(&mut all, &d.network_policies);
    xxhash_rust::xxh3::xxh3_64(all.as_bytes())
}

/// One kind: `store` holds the watched children (whole or metadata only), `desired` what
/// the spec renders of that kind.
async fn prune_kind<K, S>(
    client: &kube::Client,
    ledger: &Ledger,
    store: &Store<S>,
    cell: &Cell,
    desired: &[K],
) -> Result<Vec<String>>
where
    K: Resource<Scope = NamespaceResourceScope, DynamicType = ()>
        + Clone
        + DeserializeOwned
        + Debug,
    S: Resource<DynamicType = ()> + Clone,
{
    let (Some(uid), Some(namespace)) = (cell.uid(), cell.namespace()) else {
        return Ok(Vec::new());
    };
    let wanted: BTreeSet<String> = desired.iter().map(|o| o.name_any()).collect();
    let children = store.state();
    let stale = stale(&uid, &namespace, children.iter().map(|c| c.meta()), &wanted);
    let api: Api<K> = Api::namespaced(client.clone(), &namespace);
    let mut gone = Vec::new();
    for (name, child_uid) in stale {
        let params = DeleteParams {
            preconditions: Some(Preconditions {
                uid: Some(child_uid),
                resource_version: None,
            }),
            ..DeleteParams::background()
        };
        match api.delete(&name, &params).await {
            Ok(_) => {}
            // Gone already, or a new object of that name (its uid differs): leave it.
            Err(kube::Error::Api(e)) if e.code == 404 || e.code == 409 => continue,
            Err(e) => return Err(e.into()),
        }
        ledger.forget::<K>(&namespace, &name);
        tracing::info!(cell = %cell.name_any(), kind = %K::kind(&()), %name, "pruned: the spec no longer renders it");
        gone.push(format!("{}/{name}", K::kind(&())));
    }
    Ok(gone)
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::OwnerReference;

    fn child(name: &str, owner: &str, controller: bool) -> ObjectMeta {
        ObjectMeta {
            name: Some(name.into()),
            namespace: Some("default".into()),
            uid: Some(format!("uid-{name}")),
            owner_references: Some(vec![OwnerReference {
                api_version: "cellplane.io/v1alpha1".into(),
                kind: "Cell".into(),
                name: "c1".into(),
                uid: owner.into(),
                controller: Some(controller),
                ..Default::default()
            }]),
            ..Default::default()
        }
    }

    #[test]
    fn only_this_cells_children_that_are_no_longer_rendered_go() {
        let desired: BTreeSet<String> = ["c1-mysql".to_string()].into();
        let mut elsewhere = child("c1-kafka", "cell-uid", true);
        elsewhere.namespace = Some("other".into());
        let mut leaving = child("c1-old", "cell-uid", true);
        leaving.deletion_timestamp = Some(k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(
            k8s_openapi::jiff::Timestamp::now(),
        ));
        let children = [
            child("c1-mysql", "cell-uid", true),
            child("c1-redis", "cell-uid", true),
            child("c2-redis", "other-cell", true),
            child("c1-shared", "cell-uid", false),
            elsewhere,
            leaving,
        ];
        assert_eq!(
            stale("cell-uid", "default", children.iter(), &desired),
            [("c1-redis".to_string(), "uid-c1-redis".to_string())]
        );
    }
}
