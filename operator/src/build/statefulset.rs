//! A StatefulSet per in-cluster store: Redis, MariaDB (the MySQL shard, binlog + GTID on)
//! and Kafka in KRaft mode (one node per cell). Pure.

use super::names::{self, Store};
use super::{pod, CellContext};
use base64::Engine;
use cellplane_cells::crd::InClusterStore;
use k8s_openapi::api::apps::v1::{StatefulSet, StatefulSetSpec};
use k8s_openapi::api::core::v1::{
    ConfigMapVolumeSource, Container, ContainerPort, EnvVar, PersistentVolumeClaim,
    PersistentVolumeClaimSpec, PodSpec, PodTemplateSpec, Probe, TCPSocketAction, Volume,
    VolumeMount, VolumeResourceRequirements,
};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{LabelSelector, ObjectMeta};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use std::collections::BTreeMap;

const DATA: &str = "data";
const CONFIG: &str = "config";

/// KRaft cluster id: 16 bytes, base64url without padding, stable per cell.
pub fn kafka_cluster_id(cell: &str) -> String {
    let id = xxhash_rust::xxh3::xxh3_128(cell.as_bytes()).to_be_bytes();
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(id)
}

/// Store-specific container parts: args, env, extra mounts, and whether the image can
/// run with a read-only root filesystem.
struct StoreProcess {
    args: Vec<String>,
    env: Vec<EnvVar>,
    mounts: Vec<(Volume, VolumeMount)>,
    read_only_root: bool,
    default_cpu: &'static str,
    default_memory: &'static str,
}

fn config_volume(ctx: &CellContext, store: Store, path: &str) -> (Volume, VolumeMount) {
    (
        Volume {
            name: CONFIG.into(),
            config_map: Some(ConfigMapVolumeSource {
                name: names::store_config_map(ctx.name, store),
                ..Default::default()
            }),
            ..Default::default()
        },
        VolumeMount {
            name: CONFIG.into(),
            mount_path: path.into(),
            read_only: Some(true),
            ..Default::default()
        },
    )
}

fn process(ctx: &CellContext, store: Store) -> StoreProcess {
    let secret = names::secret(ctx.name, store);
    match store {
        Store::Redis => StoreProcess {
            // $(VAR) is expanded by the kubelet from the container env.
            args: vec![
                "redis-server".into(),
                "/etc/redis/redis.conf".into(),
                "--requirepass".into(),
                "$(REDIS_PASSWORD)".into(),
            ],
            env: vec![pod::env_from_secret("REDIS_PASSWORD", &secret, "password")],
            mounts: vec![
                config_volume(ctx, store, "/etc/redis"),
                pod::scratch("tmp", "/tmp"),
            ],
            read_only_root: true,
            default_cpu: "100m",
            default_memory: "256Mi",
        },
        Store::Mysql => StoreProcess {
            args: vec![],
            env: vec![
                pod::env_from_secret("MARIADB_ROOT_PASSWORD", &secret, "root-password"),
                pod::env_value("MARIADB_USER", super::secret::MYSQL_APP_USER),
                pod::env_from_secret("MARIADB_PASSWORD", &secret, "app-password"),
                pod::env_value(
                    "MARIADB_DATABASE",
                    cellplane_cells::env::mysql_database(ctx.name),
                ),
                pod::env_value("MARIADB_AUTO_UPGRADE", "1"),
            ],
            mounts: vec![
                config_volume(ctx, store, "/etc/mysql/conf.d"),
                pod::scratch("run", "/run/mysqld"),
                pod::scratch("tmp", "/tmp"),
            ],
            read_only_root: true,
            default_cpu: "250m",
            default_memory: "512Mi",
        },
        Store::Kafka => {
            let advertised = format!(
                "PLAINTEXT://{}.{}.svc:{}",
                names::store(ctx.name, store),
                ctx.namespace,
                store.port()
            );
            StoreProcess {
                args: vec![],
                env: vec![
                    pod::env_value("KAFKA_NODE_ID", "1"),
                    pod::env_value("KAFKA_PROCESS_ROLES", "broker,controller"),
                    pod::env_value("KAFKA_LISTENERS", "PLAINTEXT://:9092,CONTROLLER://:9093"),
                    pod::env_value("KAFKA_ADVERTISED_LISTENERS", advertised),
                    pod::env_value("KAFKA_CONTROLLER_LISTENER_NAMES", "CONTROLLER"),
                    pod::env_value(
                        "KAFKA_LISTENER_SECURITY_PROTOCOL_MAP",
                        "CONTROLLER:PLAINTEXT,PLAINTEXT:PLAINTEXT",
                    ),
                    pod::env_value("KAFKA_CONTROLLER_QUORUM_VOTERS", "1@localhost:9093"),
                    pod::env_value("KAFKA_OFFSETS_TOPIC_REPLICATION_FACTOR", "1"),
                    pod::env_value("KAFKA_TRANSACTION_STATE_LOG_REPLICATION_FACTOR", "1"),
                    pod::env_value("KAFKA_TRANSACTION_STATE_LOG_MIN_ISR", "1"),
                    pod::env_value("KAFKA_LOG_DIRS", store.data_path()),
                    pod::env_value("CLUSTER_ID", kafka_cluster_id(ctx.name)),
                    // A capped heap so several cells fit on one node.
                    pod::env_value("KAFKA_HEAP_OPTS", "-Xms256m -Xmx512m"),
                ],
                mounts: vec![pod::scratch("tmp", "/tmp")],
                // The image writes its generated server.properties under /opt/kafka.
                read_only_root: false,
                default_cpu: "250m",
                default_memory: "1Gi",
            }
        }
    }
}

pub fn store(ctx: &CellContext, store: Store, spec: &InClusterStore) -> StatefulSet {
    let p = process(ctx, store);
    let (mut volumes, mut mounts): (Vec<Volume>, Vec<VolumeMount>) = p.mounts.into_iter().unzip();
    mounts.push(VolumeMount {
        name: DATA.into(),
        mount_path: store.data_path().into(),
        ..Default::default()
    });
    let claim_templates = if spec.ephemeral {
        volumes.push(pod::scratch(DATA, store.data_path()).0);
        None
    } else {
        Some(vec![PersistentVolumeClaim {
            metadata: ObjectMeta {
                name: Some(DATA.into()),
                ..Default::default()
            },
            spec: Some(PersistentVolumeClaimSpec {
                access_modes: Some(vec!["ReadWriteOnce".into()]),
                storage_class_name: spec.storage_class_name.clone(),
                resources: Some(VolumeResourceRequirements {
                    requests: Some(BTreeMap::from([(
                        "storage".to_string(),
                        Quantity(spec.storage.clone()),
                    )])),
                    ..Default::default()
                }),
                ..Default::default()
            }),
            status: None,
        }])
    };
    let mut security = pod::container_security();
    security.read_only_root_filesystem = Some(p.read_only_root);
    let tcp_probe = |period| Probe {
        tcp_socket: Some(TCPSocketAction {
            port: IntOrString::Int(store.port()),
            ..Default::default()
        }),
        period_seconds: Some(period),
        timeout_seconds: Some(2),
        failure_threshold: Some(3),
        ..Default::default()
    };
    let container = Container {
        name: store.component().into(),
        image: Some(
            spec.image
                .clone()
                .unwrap_or_else(|| store.default_image().into()),
        ),
        args: (!p.args.is_empty()).then_some(p.args),
        env: Some(p.env),
        ports: Some(vec![ContainerPort {
            name: Some(store.component().into()),
            container_port: store.port(),
            ..Default::default()
        }]),
        readiness_probe: Some(tcp_probe(5)),
        liveness_probe: Some(tcp_probe(15)),
        startup_probe: Some(pod::startup(&tcp_probe(5))),
        resources: Some(pod::resources(
            spec.resources.as_ref(),
            p.default_cpu,
            p.default_memory,
        )),
        security_context: Some(security),
        volume_mounts: Some(mounts),
        ..Default::default()
    };
    let mut pod_spec = PodSpec {
        containers: vec![container],
        security_context: Some(pod::pod_security(store.uid())),
        automount_service_account_token: Some(false),
        volumes: Some(volumes),
        termination_grace_period_seconds: Some(60),
        ..Default::default()
    };
    pod::place(ctx.spec, &mut pod_spec);
    StatefulSet {
        metadata: ctx.meta(names::store(ctx.name, store), store.component()),
        spec: StatefulSetSpec {
            replicas: Some(spec.replicas),
            service_name: Some(names::headless(ctx.name, store)),
            selector: LabelSelector {
                match_labels: Some(ctx.selector(store.component())),
                ..Default::default()
            },
            template: PodTemplateSpec {
                metadata: Some(ObjectMeta {
                    labels: Some(ctx.labels(store.component())),
                    ..Default::default()
                }),
                spec: Some(pod_spec),
            },
            volume_claim_templates: claim_templates,
            ..Default::default()
        },
        status: None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::build::fixtures;

    fn render(s: Store, spec: &InClusterStore) -> StatefulSet {
        let cell = fixtures::spec();
        store(&fixtures::ctx(&cell), s, spec)
    }

    #[test]
    fn persistent_by_default_ephemeral_on_request() {
        let sts = render(Store::Mysql, &InClusterStore::default());
        let spec = sts.spec;
        let claim = &spec.volume_claim_templates.unwrap()[0];
        assert_eq!(
            claim
                .spec
                .as_ref()
                .unwrap()
                .resources
                .as_ref()
                .unwrap()
                .requests
                .as_ref()
                .unwrap()["storage"]
                .0,
            "1Gi"
        );
        let eph = render(
            Store::Mysql,
            &InClusterStore {
                ephemeral: true,
                ..Default::default()
            },
        )
        .spec;
        assert!(eph.volume_claim_templates.is_none());
        assert!(eph
            .template
            .spec
            .unwrap()
            .volumes
            .unwrap()
            .iter()
            .any(|v| v.name == DATA && v.empty_dir.is_some()));
    }

    #[test]
    fn stores_run_non_root_with_secrets_by_reference() {
        for s in Store::ALL {
            let sts = render(s, &InClusterStore::default());
            let pod = sts.spec.template.spec.unwrap();
            assert_eq!(
                pod.security_context.as_ref().unwrap().run_as_user,
                Some(s.uid())
            );
            let c = &pod.containers[0];
            assert_eq!(c.image.as_deref(), Some(s.default_image()));
            assert!(c
                .env
                .as_ref()
                .unwrap()
                .iter()
                .filter(|e| e.name.contains("PASSWORD"))
                .all(|e| e.value.is_none()));
        }
    }

    #[test]
    fn kafka_is_single_node_kraft_with_capped_heap() {
        let sts = render(Store::Kafka, &InClusterStore::default());
        let container = sts.spec.template.spec.unwrap().containers[0].clone();
        // A broker slow to open its port (a busy node) is waited for, not restarted.
        let startup = container.startup_probe.unwrap();
        assert!(startup.tcp_socket.is_some());
        assert_eq!(
            startup.period_seconds.unwrap() * startup.failure_threshold.unwrap(),
            pod::STARTUP_GRACE_SECONDS
        );
        let env = container.env.unwrap();
        let get = |n: &str| {
            env.iter()
                .find(|e| e.name == n)
                .and_then(|e| e.value.clone())
                .unwrap()
        };
        assert_eq!(get("KAFKA_PROCESS_ROLES"), "broker,controller");
        assert!(get("KAFKA_HEAP_OPTS").contains("-Xmx512m"));
        assert_eq!(get("CLUSTER_ID").len(), 22);
        assert_eq!(
            get("KAFKA_ADVERTISED_LISTENERS"),
            "PLAINTEXT://shop-us-0-kafka.shop.svc:9092"
        );
    }
}
