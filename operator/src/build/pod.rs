//! Pieces shared by every pod the operator renders: security context, resources, volumes. Pure.

use cellplane_cells::crd::{CellSpec, Resources, TaintEffect, TolerationOperator};
use k8s_openapi::api::core::v1::{
    Capabilities, ConfigMapKeySelector, EmptyDirVolumeSource, EnvVar, EnvVarSource,
    PodSecurityContext, PodSpec, Probe, ResourceRequirements, SeccompProfile, SecretKeySelector,
    SecurityContext, Toleration, Volume, VolumeMount,
};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use std::collections::BTreeMap;

/// Where every pod of the cell runs: the zone's nodes, narrowed by `spec.scheduling`'s
/// selector, with its tolerations. The app and the stores share it, so a cell's pods land
/// together (one zone, one node pool).
pub fn place(cell: &CellSpec, pod: &mut PodSpec) {
    let mut selector = BTreeMap::new();
    if let Some(zone) = &cell.zone {
        selector.insert("topology.kubernetes.io/zone".to_string(), zone.clone());
    }
    let scheduling = cell.scheduling.clone().unwrap_or_default();
    selector.extend(scheduling.node_selector);
    pod.node_selector = (!selector.is_empty()).then_some(selector);
    let tolerations: Vec<Toleration> = scheduling
        .tolerations
        .into_iter()
        .map(|t| Toleration {
            key: Some(t.key),
            operator: Some(
                match t.operator {
                    TolerationOperator::Equal => "Equal",
                    TolerationOperator::Exists => "Exists",
                }
                .into(),
            ),
            value: t.value,
            effect: t.effect.map(|e| {
                match e {
                    TaintEffect::NoSchedule => "NoSchedule",
                    TaintEffect::PreferNoSchedule => "PreferNoSchedule",
                    TaintEffect::NoExecute => "NoExecute",
                }
                .into()
            }),
            toleration_seconds: None,
        })
        .collect();
    pod.tolerations = (!tolerations.is_empty()).then_some(tolerations);
}

/// Pod-level: non-root, the given uid/gid, RuntimeDefault seccomp.
/// How long a container may take to start before its liveness probe applies: a JVM
/// broker on a busy node can take minutes to open its port, and a liveness probe that
/// fires before that restarts it over and over.
pub const STARTUP_GRACE_SECONDS: i32 = 300;

/// `probe`'s check as a startup probe: every 5 s for [`STARTUP_GRACE_SECONDS`], after
/// which the liveness and readiness probes take over.
pub fn startup(probe: &Probe) -> Probe {
    Probe {
        period_seconds: Some(5),
        failure_threshold: Some(STARTUP_GRACE_SECONDS / 5),
        ..probe.clone()
    }
}

pub fn pod_security(uid: i64) -> PodSecurityContext {
    PodSecurityContext {
        run_as_non_root: Some(true),
        run_as_user: Some(uid),
        run_as_group: Some(uid),
        fs_group: Some(uid),
        seccomp_profile: Some(SeccompProfile {
            type_: "RuntimeDefault".into(),
            ..Default::default()
        }),
        ..Default::default()
    }
}

/// Container-level: read-only root filesystem, no privilege escalation, no capabilities.
pub fn container_security() -> SecurityContext {
    SecurityContext {
        allow_privilege_escalation: Some(false),
        read_only_root_filesystem: Some(true),
        run_as_non_root: Some(true),
        capabilities: Some(Capabilities {
            drop: Some(vec!["ALL".into()]),
            ..Default::default()
        }),
        ..Default::default()
    }
}

/// The spec's resources as Kubernetes quantities; sane defaults when unset.
pub fn resources(
    spec: Option<&Resources>,
    default_cpu: &str,
    default_memory: &str,
) -> ResourceRequirements {
    let q = |m: &BTreeMap<String, String>| -> BTreeMap<String, Quantity> {
        m.iter()
            .map(|(k, v)| (k.clone(), Quantity(v.clone())))
            .collect()
    };
    match spec {
        Some(r) => ResourceRequirements {
            requests: (!r.requests.is_empty()).then(|| q(&r.requests)),
            limits: (!r.limits.is_empty()).then(|| q(&r.limits)),
            ..Default::default()
        },
        None => ResourceRequirements {
            requests: Some(BTreeMap::from([
                ("cpu".to_string(), Quantity(default_cpu.into())),
                ("memory".to_string(), Quantity(default_memory.into())),
            ])),
            limits: Some(BTreeMap::from([(
                "memory".to_string(),
                Quantity(default_memory.into()),
            )])),
            ..Default::default()
        },
    }
}

/// A writable scratch directory under a read-only root filesystem.
pub fn scratch(name: &str, path: &str) -> (Volume, VolumeMount) {
    (
        Volume {
            name: name.into(),
            empty_dir: Some(EmptyDirVolumeSource::default()),
            ..Default::default()
        },
        VolumeMount {
            name: name.into(),
            mount_path: path.into(),
            ..Default::default()
        },
    )
}

/// A literal environment variable.
pub fn env_value(name: &str, value: impl Into<String>) -> EnvVar {
    EnvVar {
        name: name.into(),
        value: Some(value.into()),
        ..Default::default()
    }
}

/// An environment variable read from a Secret key (credentials never appear in specs).
pub fn env_from_secret(name: &str, secret: &str, key: &str) -> EnvVar {
    EnvVar {
        name: name.into(),
        value_from: Some(EnvVarSource {
            secret_key_ref: Some(SecretKeySelector {
                name: secret.into(),
                key: key.into(),
                optional: Some(false),
            }),
            ..Default::default()
        }),
        ..Default::default()
    }
}

/// An environment variable read from a ConfigMap key.
pub fn env_from_config_map(name: &str, config_map: &str, key: &str) -> EnvVar {
    EnvVar {
        name: name.into(),
        value_from: Some(EnvVarSource {
            config_map_key_ref: Some(ConfigMapKeySelector {
                name: config_map.into(),
                key: key.into(),
                optional: Some(false),
            }),
            ..Default::default()
        }),
        ..Default::default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::build::{deployment, fixtures, names::Store, statefulset};
    use cellplane_cells::crd::{CellToleration, InClusterStore, Scheduling};

    #[test]
    fn the_app_and_the_stores_run_on_the_zones_nodes_of_the_cells_pool() {
        let mut cell = fixtures::spec();
        cell.scheduling = Some(Scheduling {
            node_selector: [("pool".to_string(), "cells".to_string())].into(),
            tolerations: vec![CellToleration {
                key: "dedicated".into(),
                operator: TolerationOperator::Exists,
                value: None,
                effect: Some(TaintEffect::NoSchedule),
            }],
        });
        let ctx = fixtures::ctx(&cell);
        let app = deployment::app(&ctx).spec.template.spec.unwrap();
        let redis = statefulset::store(&ctx, Store::Redis, &InClusterStore::default())
            .spec
            .template
            .spec
            .unwrap();
        for pod in [app, redis] {
            let selector = pod.node_selector.unwrap();
            assert_eq!(selector["topology.kubernetes.io/zone"], "us-east-1a");
            assert_eq!(selector["pool"], "cells");
            let t = &pod.tolerations.unwrap()[0];
            assert_eq!(
                (t.key.as_deref(), t.operator.as_deref(), t.effect.as_deref()),
                (Some("dedicated"), Some("Exists"), Some("NoSchedule"))
            );
            assert_eq!(t.value, None);
        }

        // Without zone or scheduling, no selector and no tolerations at all.
        let mut bare = fixtures::spec();
        bare.zone = None;
        let pod = deployment::app(&fixtures::ctx(&bare))
            .spec
            .template
            .spec
            .unwrap();
        assert_eq!((pod.node_selector, pod.tolerations), (None, None));
    }
}
