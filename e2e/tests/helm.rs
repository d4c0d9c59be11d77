//! The Helm charts: they lint, refuse bad values naming the field, and install into a real
//! region (kwok runs the pods). The operator's RBAC grants only what it needs; the router's
//! rendered config is accepted by the router binary itself, and its admin token survives
//! upgrades.

use cellplane_e2e::{repo_root, tools_bin, wait_for, Region};
use k8s_openapi::api::apps::v1::Deployment;
use kube::api::Api;
use std::process::Command;
use std::time::Duration;

fn helm(args: &[&str], kubeconfig: Option<&std::path::Path>) -> (bool, String) {
    let mut cmd = Command::new(tools_bin().join("helm"));
    cmd.args(args);
    if let Some(kc) = kubeconfig {
        cmd.env("KUBECONFIG", kc);
    }
    let out = cmd.output().expect("helm runs");
    (
        out.status.success(),
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    )
}

fn chart_dir(name: &str) -> String {
    repo_root().join("charts").join(name).display().to_string()
}

fn chart() -> String {
    chart_dir("cellplane-operator")
}

/// `make install` puts `cellplane` and `kubectl-cellplane` on PATH; the real kubectl finds
/// the plugin and runs it.
#[test]
fn make_install_puts_the_cli_on_path_as_a_kubectl_plugin() {
    let prefix = cellplane_e2e::test_dir("install");
    let out = Command::new("make")
        .current_dir(repo_root())
        .args([
            "--no-print-directory",
            "install",
            "PROFILE=debug",
            &format!("PREFIX={}", prefix.display()),
        ])
        .output()
        .expect("make runs");
    assert!(
        out.status.success(),
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let bin = prefix.join("bin");
    let path = format!(
        "{}:{}",
        bin.display(),
        std::env::var("PATH").unwrap_or_default()
    );
    let plugins = Command::new(tools_bin().join("kubectl"))
        .args(["plugin", "list"])
        .env("PATH", &path)
        .output()
        .unwrap();
    let listed = String::from_utf8_lossy(&plugins.stdout);
    assert!(listed.contains("kubectl-cellplane"), "{listed}");
    let help = Command::new(tools_bin().join("kubectl"))
        .args(["cellplane", "--help"])
        .env("PATH", &path)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&help.stdout);
    assert!(help.status.success(), "{text}");
    assert!(
        text.contains("switchover") && text.contains("Exit codes"),
        "{text}"
    );
    let version = Command::new(bin.join("cellplane"))
        .arg("--version")
        .output()
        .unwrap();
    assert!(String::from_utf8_lossy(&version.stdout).starts_with("cellplane "));
}

#[test]
fn chart_lints_and_rejects_bad_values() {
    let ci_values = format!("{}/ci-values.yaml", chart());
    let (ok, out) = helm(&["lint", "--strict", &chart(), "-f", &ci_values], None);
    assert!(ok, "{out}");
    let (ok, out) = helm(&["lint", &chart()], None);
    assert!(!ok, "an empty region must fail lint");
    assert!(out.contains("/region"), "the error names the field: {out}");
    let (ok, out) = helm(
        &[
            "template",
            "t",
            &chart(),
            "--set",
            "region=us-east",
            "--set",
            "replicas=0",
        ],
        None,
    );
    assert!(!ok && out.contains("/replicas"), "{out}");
    let chart_str = chart();
    let template = |extra: &[&str]| {
        let mut args = vec!["template", "t", &chart_str, "--set", "region=us-east"];
        args.extend_from_slice(extra);
        helm(&args, None)
    };
    // The platform controller needs the global etcd, and a platform name is a DNS label.
    let (ok, out) = template(&["--set", "platform.name=shop"]);
    assert!(
        !ok && out.contains("platform.name needs etcd.endpoints"),
        "{out}"
    );
    let (ok, out) = template(&["--set", "platform.name=Shop_1"]);
    assert!(!ok && out.contains("/platform/name"), "{out}");
    let (ok, out) = template(&[
        "--set",
        "platform.name=shop",
        "--set",
        "etcd.endpoints={http://etcd:2379}",
    ]);
    assert!(
        ok && out.contains("--platform=shop") && out.contains("--platform-lease=5"),
        "{out}"
    );
    assert!(
        !out.contains("replication-secret"),
        "no replication secret unless named"
    );
    let (ok, out) = template(&[
        "--set",
        "platform.name=shop",
        "--set",
        "etcd.endpoints={http://etcd:2379}",
        "--set",
        "platform.replicationSecretName=platform-repl",
    ]);
    assert!(
        ok && out.contains("--replication-secret-file=/etc/cellplane/replication/secret")
            && out.contains("secretName: platform-repl"),
        "{out}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn chart_installs_into_a_region_with_least_privilege() -> anyhow::Result<()> {
    let region = Region::up("helm")?;
    let kc = region.kubeconfig();
    let (ok, out) = helm(
        &[
            "install",
            "cp",
            &chart(),
            "--namespace",
            "cellplane",
            "--create-namespace",
            "--set",
            "region=helm",
            "--wait",
            "--timeout",
            "120s",
        ],
        Some(&kc),
    );
    assert!(ok, "{out}");
    region.kubectl(&[
        "wait",
        "--for=condition=Established",
        "--timeout=60s",
        "crd/cells.cellplane.io",
    ])?;
    let client = region.client().await?;
    let deployments: Api<Deployment> = Api::namespaced(client, "cellplane");
    wait_for(
        "operator Deployment available",
        Duration::from_secs(90),
        || async {
            let d = deployments.get("cp-cellplane-operator").await?;
            Ok(d.status
                .and_then(|s| s.available_replicas)
                .filter(|n| *n >= 2))
        },
    )
    .await?;

    let sa = "system:serviceaccount:cellplane:cp-cellplane-operator";
    let can = |verb: &str, resource: &str, ns: &str| -> bool {
        region
            .can_i(sa, verb, resource, Some(ns))
            .unwrap_or_else(|e| panic!("{e}"))
    };
    // The check itself can fail: an unknown resource is an error, not a "no".
    let misspelt = region.can_i(sa, "get", "secretz", Some("default"));
    assert!(
        misspelt.is_err(),
        "a misspelt resource must not read as not allowed: {misspelt:?}"
    );
    for (verb, res) in [
        ("create", "cells.cellplane.io"),
        ("patch", "deployments.apps"),
        ("create", "secrets"),
        ("update", "cells.cellplane.io/status"),
    ] {
        assert!(can(verb, res, "default"), "operator needs {verb} {res}");
    }
    assert!(can("update", "leases.coordination.k8s.io", "cellplane"));
    for (verb, res) in [
        ("update", "secrets"),
        ("delete", "secrets"),
        ("get", "pods"),
        ("delete", "namespaces"),
        ("create", "clusterroles.rbac.authorization.k8s.io"),
    ] {
        assert!(!can(verb, res, "default"), "operator must not {verb} {res}");
    }
    assert!(
        !can("update", "leases.coordination.k8s.io", "default"),
        "leases only in its own namespace"
    );
    Ok(())
}

/// The router's config as the chart renders it, checked by `cellplane-router --check`.
fn router_config_is_valid(extra: &[&str]) -> anyhow::Result<()> {
    let router_chart = chart_dir("cellplane-router");
    let ci_values = format!("{router_chart}/ci-values.yaml");
    let mut args = vec![
        "template",
        "t",
        &router_chart,
        "-f",
        &ci_values,
        "--show-only",
        "templates/configmap.yaml",
    ];
    args.extend_from_slice(extra);
    let (ok, out) = helm(&args, None);
    anyhow::ensure!(ok, "{out}");
    let cm: serde_yaml::Value = serde_yaml::from_str(&out)?;
    let config = cm["data"]["router.yaml"]
        .as_str()
        .expect("router.yaml in the ConfigMap");
    let file = cellplane_e2e::test_dir("router-chart").join(format!("router-{}.yaml", extra.len()));
    std::fs::write(&file, config)?;
    let check = Command::new(cellplane_e2e::workspace_bin("cellplane-router"))
        .arg("--config")
        .arg(&file)
        .arg("--check")
        .output()?;
    anyhow::ensure!(
        check.status.success(),
        "the router refuses the chart's config: {}",
        String::from_utf8_lossy(&check.stderr)
    );
    Ok(())
}

#[test]
fn router_chart_lints_refuses_bad_values_and_renders_a_config_the_router_accepts(
) -> anyhow::Result<()> {
    let router_chart = chart_dir("cellplane-router");
    let ci_values = format!("{router_chart}/ci-values.yaml");
    let (ok, out) = helm(&["lint", "--strict", &router_chart, "-f", &ci_values], None);
    assert!(ok, "{out}");
    let (ok, out) = helm(&["lint", &router_chart], None);
    assert!(
        !ok && out.contains("/table/etcd/endpoints") && out.contains("/table/platform"),
        "{out}"
    );
    let (ok, out) = helm(
        &[
            "template",
            "t",
            &router_chart,
            "-f",
            &ci_values,
            "--set",
            "noKey=maybe",
        ],
        None,
    );
    assert!(!ok && out.contains("/noKey"), "{out}");
    router_config_is_valid(&[])?;
    router_config_is_valid(&[
        "--set",
        "tls.secretName=edge-tls",
        "--set",
        "admin.enabled=false",
        "--set",
        "noKey=clientAddress",
    ])?;
    router_config_is_valid(&["--set", "admin.mtls.secretName=admin-mtls"])?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn router_chart_installs_and_keeps_its_admin_token_across_upgrades() -> anyhow::Result<()> {
    let region = Region::up("helm-router")?;
    let kc = region.kubeconfig();
    let router_chart = chart_dir("cellplane-router");
    let ci_values = format!("{router_chart}/ci-values.yaml");
    let install = |verb: &str| {
        helm(
            &[
                verb,
                "edge",
                &router_chart,
                "--namespace",
                "edge",
                "--create-namespace",
                "-f",
                &ci_values,
                "--wait",
                "--timeout",
                "120s",
            ],
            Some(&kc),
        )
    };
    let (ok, out) = install("install");
    assert!(ok, "{out}");
    let client = region.client().await?;
    let deployments: Api<Deployment> = Api::namespaced(client.clone(), "edge");
    let d = deployments.get("edge-cellplane-router").await?;
    let pod = d.spec.template.spec.expect("pod spec");
    assert_eq!(
        pod.automount_service_account_token,
        Some(false),
        "no API token in router pods"
    );
    assert_eq!(
        pod.security_context.and_then(|s| s.run_as_non_root),
        Some(true)
    );
    wait_for(
        "router Deployment available",
        Duration::from_secs(90),
        || async {
            let d = deployments.get("edge-cellplane-router").await?;
            Ok(d.status
                .and_then(|s| s.available_replicas)
                .filter(|n| *n >= 2))
        },
    )
    .await?;
    let token = || {
        region.kubectl(&[
            "-n",
            "edge",
            "get",
            "secret",
            "edge-cellplane-router-admin",
            "-o",
            "jsonpath={.data.token}",
        ])
    };
    let first = token()?;
    assert!(first.len() >= 40, "a generated token: {first:?}");
    let (ok, out) = install("upgrade");
    assert!(ok, "{out}");
    assert_eq!(token()?, first, "an upgrade keeps the admin token");
    Ok(())
}
