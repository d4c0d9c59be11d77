//! The operator's Helm chart: lints, refuses bad values naming the field, installs into a
//! real region (kwok runs the pod), and its RBAC grants only what the operator needs.

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

fn chart() -> String {
    repo_root()
        .join("charts/cellplane-operator")
        .display()
        .to_string()
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
            .kubectl(&["auth", "can-i", verb, resource, "--as", sa, "-n", ns])
            .map(|o| o.trim() == "yes")
            .unwrap_or(false)
    };
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
