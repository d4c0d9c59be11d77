//! Pieces shared by every pod the operator renders: security context, resources, volumes. Pure.

use cellplane_cells::crd::Resources;
use k8s_openapi::api::core::v1::{
    Capabilities, ConfigMapKeySelector, EmptyDirVolumeSource, EnvVar, EnvVarSource,
    PodSecurityContext, ResourceRequirements, SeccompProfile, SecretKeySelector, SecurityContext,
    Volume, VolumeMount,
};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use std::collections::BTreeMap;

/// Pod-level: non-root, the given uid/gid, RuntimeDefault seccomp.
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
