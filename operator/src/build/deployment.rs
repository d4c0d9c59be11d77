//! The app's Deployment, with the cell's connection settings as env. Pure.

use super::names::{self, Store, APP};
use super::{pod, CellContext};
use k8s_openapi::api::apps::v1::{Deployment, DeploymentSpec};
use k8s_openapi::api::core::v1::{
    Container, ContainerPort, EnvVar, HTTPGetAction, PodSpec, PodTemplateSpec, Probe,
};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{LabelSelector, ObjectMeta};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;

/// Env variable names the app reads (the contract shared with the cell SDK).
pub use cellplane_cells::env;

/// The env the app gets: identity from the info ConfigMap, addresses, and credentials
/// straight from Secrets (never copied into the pod spec).
pub fn connection_env(ctx: &CellContext) -> Vec<EnvVar> {
    let info = names::info_config_map(ctx.name);
    let mut vars = vec![
        pod::env_from_config_map(env::CELL_NAME, &info, "cell"),
        pod::env_from_config_map(env::CELL_REGION, &info, "region"),
        pod::env_from_config_map(env::CELL_PLATFORM, &info, "platform"),
        pod::env_from_config_map(env::REDIS_ADDR, &info, "redisAddr"),
        pod::env_from_config_map(env::MYSQL_ADDR, &info, "mysqlAddr"),
        pod::env_from_config_map(env::KAFKA_BOOTSTRAP, &info, "kafkaBootstrap"),
        pod::env_value(env::MYSQL_DATABASE, env::mysql_database(ctx.name)),
        pod::env_value(env::CELL_LISTEN, format!("0.0.0.0:{}", ctx.spec.app.port)),
    ];
    if !ctx.etcd_endpoints.is_empty() {
        // Where the app follows the routing table (it fences by it: 421 for slots it
        // does not own).
        vars.push(pod::env_from_config_map(
            env::CELL_ETCD,
            &info,
            "etcdEndpoints",
        ));
        // The lease it takes there must expire exactly as the platform leader assumes.
        let t = &ctx.timings;
        for (var, ms) in [
            (env::CELL_OWNER_LEASE_TTL_MS, t.owner_lease_ttl_ms),
            (env::CELL_OWNER_RENEW_EVERY_MS, t.owner_renew_every_ms),
            (env::CELL_FENCE_AFTER_MS, t.fence_after_ms),
        ] {
            vars.push(pod::env_value(var, ms.to_string()));
        }
    }
    match &ctx.spec.redis.external {
        Some(ext) => vars.push(pod::env_from_secret(
            env::REDIS_PASSWORD,
            &ext.secret_ref.name,
            "password",
        )),
        None => vars.push(pod::env_from_secret(
            env::REDIS_PASSWORD,
            &names::secret(ctx.name, Store::Redis),
            "password",
        )),
    }
    match &ctx.spec.mysql.external {
        Some(ext) => {
            vars.push(pod::env_from_secret(
                env::MYSQL_USER,
                &ext.secret_ref.name,
                "username",
            ));
            vars.push(pod::env_from_secret(
                env::MYSQL_PASSWORD,
                &ext.secret_ref.name,
                "password",
            ));
        }
        None => {
            vars.push(pod::env_value(
                env::MYSQL_USER,
                super::secret::MYSQL_APP_USER,
            ));
            vars.push(pod::env_from_secret(
                env::MYSQL_PASSWORD,
                &names::secret(ctx.name, Store::Mysql),
                "app-password",
            ));
        }
    }
    vars
}

fn http_probe(path: &str, port: i32, period: i32) -> Probe {
    Probe {
        http_get: Some(HTTPGetAction {
            path: Some(path.into()),
            port: IntOrString::Int(port),
            ..Default::default()
        }),
        period_seconds: Some(period),
        timeout_seconds: Some(2),
        failure_threshold: Some(3),
        ..Default::default()
    }
}

pub fn app(ctx: &CellContext) -> Deployment {
    let spec = &ctx.spec.app;
    let mut env = connection_env(ctx);
    // The user's env comes last so it can override a default deliberately.
    env.extend(
        spec.env
            .iter()
            .map(|e| pod::env_value(&e.name, e.value.clone())),
    );
    let (tmp, tmp_mount) = pod::scratch("tmp", "/tmp");
    let container = Container {
        name: APP.into(),
        image: Some(spec.image.clone()),
        ports: Some(vec![ContainerPort {
            name: Some("http".into()),
            container_port: spec.port,
            ..Default::default()
        }]),
        env: Some(env),
        readiness_probe: Some(http_probe(&spec.probes.readiness_path, spec.port, 5)),
        liveness_probe: Some(http_probe(&spec.probes.liveness_path, spec.port, 10)),
        startup_probe: Some(pod::startup(&http_probe(
            &spec.probes.liveness_path,
            spec.port,
            5,
        ))),
        resources: Some(pod::resources(spec.resources.as_ref(), "100m", "256Mi")),
        security_context: Some(pod::container_security()),
        volume_mounts: Some(vec![tmp_mount]),
        ..Default::default()
    };
    let mut pod_labels = ctx.labels(APP);
    if let Some(zone) = &ctx.spec.zone {
        pod_labels.insert("cellplane.io/zone".into(), zone.clone());
    }
    let mut pod_spec = PodSpec {
        containers: vec![container],
        security_context: Some(pod::pod_security(10001)),
        automount_service_account_token: Some(false),
        volumes: Some(vec![tmp]),
        ..Default::default()
    };
    pod::place(ctx.spec, &mut pod_spec);
    Deployment {
        metadata: ctx.meta(names::app(ctx.name), APP),
        spec: DeploymentSpec {
            replicas: Some(spec.replicas),
            selector: LabelSelector {
                match_labels: Some(ctx.selector(APP)),
                ..Default::default()
            },
            template: PodTemplateSpec {
                metadata: Some(ObjectMeta {
                    labels: Some(pod_labels),
                    ..Default::default()
                }),
                spec: Some(pod_spec),
            },
            ..Default::default()
        },
        status: None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::build::fixtures;

    fn env_of(d: &Deployment) -> Vec<EnvVar> {
        d.spec.template.spec.as_ref().unwrap().containers[0]
            .env
            .clone()
            .unwrap()
    }

    #[test]
    fn app_gets_identity_addresses_and_secret_refs() {
        let spec = fixtures::spec();
        let d = app(&fixtures::ctx(&spec));
        let env = env_of(&d);
        let get = |n: &str| {
            env.iter()
                .find(|e| e.name == n)
                .unwrap_or_else(|| panic!("missing {n}"))
                .clone()
        };
        assert_eq!(
            get(env::CELL_NAME)
                .value_from
                .unwrap()
                .config_map_key_ref
                .unwrap()
                .key,
            "cell"
        );
        let pw = get(env::MYSQL_PASSWORD)
            .value_from
            .unwrap()
            .secret_key_ref
            .unwrap();
        assert_eq!(pw.name, "shop-us-0-mysql-credentials");
        // No credential is ever written into the pod spec as a literal.
        assert!(env
            .iter()
            .filter(|e| e.name.contains("PASSWORD"))
            .all(|e| e.value.is_none()));
        assert_eq!(get("MODE").value.as_deref(), Some("demo"));
        assert_eq!(d.spec.replicas, Some(3));
    }

    #[test]
    fn app_pods_are_locked_down() {
        let spec = fixtures::spec();
        let d = app(&fixtures::ctx(&spec));
        let pod = d.spec.template.spec.unwrap();
        assert_eq!(pod.security_context.unwrap().run_as_non_root, Some(true));
        let c = &pod.containers[0];
        let sc = c.security_context.as_ref().unwrap();
        assert_eq!(sc.read_only_root_filesystem, Some(true));
        assert_eq!(sc.allow_privilege_escalation, Some(false));
        assert_eq!(
            c.readiness_probe
                .as_ref()
                .unwrap()
                .http_get
                .as_ref()
                .unwrap()
                .path
                .as_deref(),
            Some("/readyz")
        );
        // A slow start is waited for (5 min) before liveness may restart the app.
        let startup = c.startup_probe.as_ref().unwrap();
        assert_eq!(
            startup.http_get.as_ref().unwrap().path.as_deref(),
            Some("/livez")
        );
        assert_eq!(
            startup.period_seconds.unwrap() * startup.failure_threshold.unwrap(),
            pod::STARTUP_GRACE_SECONDS
        );
        assert_eq!(pod.automount_service_account_token, Some(false));
    }

    #[test]
    fn external_mysql_credentials_come_from_the_referenced_secret() {
        let mut spec = fixtures::spec();
        spec.mysql = cellplane_cells::crd::StoreSpec {
            in_cluster: None,
            external: Some(cellplane_cells::crd::ExternalStore {
                endpoint: "rds.example:3306".into(),
                secret_ref: cellplane_cells::crd::SecretRef {
                    name: "rds-creds".into(),
                },
                admin_secret_ref: None,
            }),
        };
        let env = env_of(&app(&fixtures::ctx(&spec)));
        let user = env.iter().find(|e| e.name == env::MYSQL_USER).unwrap();
        assert_eq!(
            user.value_from
                .as_ref()
                .unwrap()
                .secret_key_ref
                .as_ref()
                .unwrap()
                .name,
            "rds-creds"
        );
    }
}
