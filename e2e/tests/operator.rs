//! The operator against real regions (kube-apiserver + etcd + controller-manager +
//! scheduler + kwok): cells converge, edits roll, deletions cascade, CellSets stamp and
//! scale, the operator survives an API-server crash, and leadership fails over.

use cellplane_cells::crd::{Cell, CellSet};
use cellplane_e2e::{apply_yaml, wait_for, Region};
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::{Secret, Service};
use kube::api::{Api, DeleteParams, ListParams};
use kube::Client;
use std::time::Duration;

const T: Duration = Duration::from_secs(90);

fn cell_yaml(name: &str, image: &str) -> String {
    format!(
        r#"
apiVersion: cellplane.io/v1alpha1
kind: Cell
metadata: {{name: {name}, namespace: default}}
spec:
  region: e2e
  platform: shop
  standby: {{cell: {name}-standby, region: other}}
  app: {{image: "{image}", replicas: 2}}
  redis: {{inCluster: {{ephemeral: true}}}}
  mysql: {{inCluster: {{ephemeral: true}}}}
  kafka: {{inCluster: {{ephemeral: true}}}}
"#
    )
}

fn is_ready(cell: &Cell) -> bool {
    let Some(st) = &cell.status else { return false };
    st.observed_generation == cell.metadata.generation
        && st
            .conditions
            .iter()
            .any(|c| c.type_ == "Ready" && c.status == "True")
}

async fn wait_ready(cells: &Api<Cell>, name: &str) -> anyhow::Result<Cell> {
    wait_for(
        &format!("Cell {name} Ready with current observedGeneration"),
        T,
        || async { Ok(cells.get_opt(name).await?.filter(is_ready)) },
    )
    .await
}

async fn setup(region_name: &str) -> anyhow::Result<(Region, Client)> {
    let region = Region::up(region_name)?;
    region.install_crds()?;
    let client = region.client().await?;
    Ok((region, client))
}

#[tokio::test(flavor = "multi_thread")]
async fn cell_converges_rolls_restores_and_cascades() -> anyhow::Result<()> {
    let (region, client) = setup("e2e").await?;
    let operator = region.operator("solo", &[])?;
    let cells: Api<Cell> = Api::namespaced(client.clone(), "default");
    apply_yaml(&client, "default", &cell_yaml("c1", "example/shop:1")).await?;
    let cell = wait_ready(&cells, "c1").await?;
    assert_eq!(
        cell.status.as_ref().unwrap().phase,
        Some(cellplane_cells::crd::CellPhase::Active)
    );
    assert!(cell
        .metadata
        .finalizers
        .as_ref()
        .unwrap()
        .contains(&"cellplane.io/registration".to_string()));
    // A Cell outside a CellSet runs, but says it is never routed to, and why.
    let routable = cell
        .status
        .as_ref()
        .unwrap()
        .conditions
        .iter()
        .find(|c| c.type_ == "Routable")
        .cloned()
        .unwrap();
    assert_eq!(
        (routable.status.as_str(), routable.reason.as_str()),
        ("False", "NotInACellSet"),
        "{routable:?}"
    );

    // A Cell that cannot be built (admitted: that a request exceeds its limit is checked
    // by the API server on the Deployment) says so on itself: phase Failed, Ready=False
    // with the reason and the message, a Warning event; fixing the spec clears it.
    let bad = cell_yaml("c-bad", "example/shop:1").replace(
        "replicas: 2}",
        "replicas: 2, resources: {requests: {cpu: '2'}, limits: {cpu: '1'}}}",
    );
    apply_yaml(&client, "default", &bad).await?;
    let failed = wait_for("Cell c-bad Failed", T, || async {
        Ok(cells.get_opt("c-bad").await?.filter(|c| {
            c.status
                .as_ref()
                .is_some_and(|s| s.phase == Some(cellplane_cells::crd::CellPhase::Failed))
        }))
    })
    .await?;
    let ready = failed
        .status
        .unwrap()
        .conditions
        .into_iter()
        .find(|c| c.type_ == "Ready")
        .unwrap();
    assert_eq!(ready.status, "False");
    assert!(
        ready.reason == "ApplyFailed"
            && ready
                .message
                .contains("must be less than or equal to cpu limit")
            && ready.message.contains("fix the Cell's spec"),
        "{ready:?}"
    );
    apply_yaml(&client, "default", &cell_yaml("c-bad", "example/shop:1")).await?;
    let fixed = wait_ready(&cells, "c-bad").await?;
    assert_eq!(
        fixed.status.unwrap().phase,
        Some(cellplane_cells::crd::CellPhase::Active)
    );
    cells.delete("c-bad", &Default::default()).await?;

    // Every child exists.
    let count = |kind: &str| -> anyhow::Result<usize> {
        Ok(region
            .kubectl(&["get", kind, "-l", "cellplane.io/cell=c1", "-o", "name"])?
            .lines()
            .count())
    };
    assert_eq!(count("deployments")?, 1);
    assert_eq!(count("statefulsets")?, 3);
    assert_eq!(count("services")?, 7);
    assert_eq!(count("poddisruptionbudgets")?, 4);
    assert_eq!(count("networkpolicies")?, 2);
    assert_eq!(count("secrets")?, 2);
    assert_eq!(count("configmaps")?, 3);
    let pods = region.kubectl(&[
        "get",
        "pods",
        "-l",
        "cellplane.io/cell=c1",
        "-o",
        "jsonpath={.items[*].status.phase}",
    ])?;
    assert_eq!(
        pods.split_whitespace().filter(|p| *p == "Running").count(),
        5,
        "{pods}"
    );

    // Edit: a new image rolls the Deployment; generated Secrets survive untouched.
    let secrets: Api<Secret> = Api::namespaced(client.clone(), "default");
    let before = secrets.get("c1-mysql-credentials").await?;
    apply_yaml(&client, "default", &cell_yaml("c1", "example/shop:2")).await?;
    let deployments: Api<Deployment> = Api::namespaced(client.clone(), "default");
    wait_for("Deployment rolled to image :2", T, || async {
        let d = deployments.get("c1-app").await?;
        let image = d.spec.template.spec.as_ref().unwrap().containers[0]
            .image
            .clone();
        Ok((image.as_deref() == Some("example/shop:2")).then_some(()))
    })
    .await?;
    let cell = wait_ready(&cells, "c1").await?;
    assert_eq!(cell.status.unwrap().observed_generation, Some(2));
    let after = secrets.get("c1-mysql-credentials").await?;
    assert_eq!(
        before.metadata.resource_version,
        after.metadata.resource_version
    );
    assert_eq!(before.data, after.data);

    // A deleted child comes back.
    let services: Api<Service> = Api::namespaced(client.clone(), "default");
    let old_uid = services.get("c1-mysql").await?.metadata.uid;
    services
        .delete("c1-mysql", &DeleteParams::default())
        .await?;
    wait_for("Service c1-mysql restored", T, || async {
        Ok(services
            .get_opt("c1-mysql")
            .await?
            .filter(|s| s.metadata.uid != old_uid))
    })
    .await?;

    // A store switched to `external` leaves nothing of its in-cluster self behind but its
    // generated Secret (the credentials its volumes were made with); the others stay.
    let external = cell_yaml("c1", "example/shop:2").replace(
        "redis: {inCluster: {ephemeral: true}}",
        "redis: {external: {endpoint: \"127.0.0.1:6399\", secretRef: {name: c1-redis-managed}}}",
    );
    apply_yaml(&client, "default", &external).await?;
    let redis_children = || -> anyhow::Result<String> {
        region.kubectl(&[
            "get",
            "statefulsets,services,poddisruptionbudgets,configmaps,networkpolicies",
            "-l",
            "cellplane.io/cell=c1,cellplane.io/component=redis",
            "-o",
            "name",
        ])
    };
    wait_for("the in-cluster Redis pruned", T, || async {
        Ok(redis_children()?.trim().is_empty().then_some(()))
    })
    .await
    .inspect_err(|_| {
        let log = std::fs::read_to_string(&operator.log).unwrap_or_default();
        let tail: Vec<&str> = log.lines().rev().take(40).collect();
        eprintln!(
            "left: {:?}\noperator log (last lines, newest first):\n{}",
            redis_children(),
            tail.join("\n")
        );
    })?;
    assert_eq!(count("statefulsets")?, 2);
    assert_eq!(count("secrets")?, 2, "generated Secrets are never pruned");
    let events = region.kubectl(&[
        "get",
        "events",
        "--field-selector",
        "involvedObject.name=c1,reason=Pruned",
        "-o",
        "jsonpath={.items[*].message}",
    ])?;
    assert!(events.contains("StatefulSet/c1-redis"), "{events}");
    // Unchanged objects are not pruned on the next passes: the rest is still there.
    assert!(services.get_opt("c1-mysql").await?.is_some());

    // Deleting the Cell runs the finalizer, then the garbage collector removes children.
    cells.delete("c1", &DeleteParams::default()).await?;
    wait_for("Cell c1 gone", T, || async {
        Ok(cells.get_opt("c1").await?.is_none().then_some(()))
    })
    .await?;
    wait_for("children garbage-collected", T, || async {
        Ok((deployments.get_opt("c1-app").await?.is_none()
            && services.get_opt("c1-mysql").await?.is_none())
        .then_some(()))
    })
    .await?;
    // The credentials stay with the volumes the store was initialised with: the same
    // Secret, untouched, for a Cell created again under the name.
    let kept = secrets.get_opt("c1-mysql-credentials").await?;
    assert_eq!(
        kept.and_then(|s| s.metadata.uid),
        after.metadata.uid,
        "the MySQL credentials outlive the Cell"
    );
    Ok(())
}

const CELLSET: &str = r#"
apiVersion: cellplane.io/v1alpha1
kind: CellSet
metadata: {name: shop, namespace: default}
spec:
  platform: shop
  regions:
  - {name: us, cells: PER}
  - {name: eu, cells: PER}
  template:
    app: {image: "example/shop:1", replicas: 1}
    redis: {inCluster: {ephemeral: true}}
    mysql: {inCluster: {ephemeral: true}}
    kafka: {inCluster: {ephemeral: true}}
"#;

#[tokio::test(flavor = "multi_thread")]
async fn cellset_stamps_pairs_and_scales_moving_slots_only_to_new_cells() -> anyhow::Result<()> {
    let (region, client) = setup("sets").await?;
    let _op = region.operator("solo", &[])?;
    let sets: Api<CellSet> = Api::namespaced(client.clone(), "default");
    let cells: Api<Cell> = Api::namespaced(client.clone(), "default");

    apply_yaml(&client, "default", &CELLSET.replace("PER", "3")).await?;
    let status = wait_for("CellSet with 6 ready cells", T, || async {
        Ok(sets
            .get("shop")
            .await?
            .status
            .filter(|s| s.cells == 6 && s.ready_cells == 6))
    })
    .await?;
    assert_eq!(status.epoch, 1);
    assert_eq!(status.slots.values().sum::<u32>(), 16384);
    let list = cells
        .list(&ListParams::default().labels("cellplane.io/cellset=shop"))
        .await?;
    assert_eq!(list.items.len(), 6);
    for c in &list.items {
        let sb = c.spec.standby.as_ref().expect("every cell has a standby");
        assert_ne!(sb.region, c.spec.region);
        assert!(
            list.items
                .iter()
                .any(|o| kube::ResourceExt::name_any(o) == sb.cell),
            "standby {} exists",
            sb.cell
        );
    }
    // Slots show on the cells themselves (kubectl get cells).
    let c0 = wait_for("cell slots published", T, || async {
        Ok(cells.get("shop-us-0").await?.status.filter(|s| s.slots > 0))
    })
    .await?;
    assert_eq!(c0.slots, status.slots["shop-us-0"]);

    // Scale to 4 per region: two new cells; old cells only lose slots.
    apply_yaml(&client, "default", &CELLSET.replace("PER", "4")).await?;
    let scaled = wait_for("CellSet with 8 ready cells", T, || async {
        Ok(sets
            .get("shop")
            .await?
            .status
            .filter(|s| s.cells == 8 && s.ready_cells == 8))
    })
    .await?;
    assert_eq!(scaled.epoch, 2, "ownership changed once");
    assert_eq!(scaled.slots.values().sum::<u32>(), 16384);
    for (cell, before) in &status.slots {
        assert!(
            scaled.slots[cell] <= *before,
            "{cell} gained slots: {before} -> {}",
            scaled.slots[cell]
        );
    }
    let moved: u32 = status.slots.iter().map(|(c, b)| b - scaled.slots[c]).sum();
    assert_eq!(
        moved,
        scaled.slots["shop-us-3"] + scaled.slots["shop-eu-3"],
        "moved slots went to the new cells"
    );
    assert!(
        f64::from(moved) <= 1.15 * 2.0 / 8.0 * 16384.0,
        "moved {moved}"
    );

    // Scale back down: the extra cells are deleted.
    apply_yaml(&client, "default", &CELLSET.replace("PER", "3")).await?;
    wait_for("shop-us-3 deleted", T, || async {
        Ok(cells.get_opt("shop-us-3").await?.is_none().then_some(()))
    })
    .await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn operator_survives_an_api_server_crash() -> anyhow::Result<()> {
    let (region, client) = setup("crash").await?;
    let mut op = region.operator("solo", &[])?;
    apply_yaml(&client, "default", &cell_yaml("c2", "example/shop:1")).await?;
    // Crash the API server while the first reconciles are in flight.
    region.restart_apiserver()?;
    let client = region.client().await?;
    let cells: Api<Cell> = Api::namespaced(client.clone(), "default");
    wait_ready(&cells, "c2").await?;
    // And changes made after the crash still converge.
    apply_yaml(&client, "default", &cell_yaml("c3", "example/shop:1")).await?;
    wait_ready(&cells, "c3").await?;
    let reconciles = cellplane_e2e::net::metric_value(
        &op.metrics()?,
        "cellplane_operator_reconciles_total{controller=\"cell\"}",
    )?;
    assert!(reconciles >= 2.0, "{reconciles}");

    // An operator scoped to region `us` (--region) stamps only us's cells of a CellSet and
    // leaves a Cell of another region alone: no workloads, no status.
    op.kill();
    let _scoped = region.operator("scoped", &["--region", "us", "--lease-name", "scoped"])?;
    apply_yaml(
        &client,
        "default",
        &cell_yaml("elsewhere", "example/shop:1"),
    )
    .await?;
    apply_yaml(&client, "default", &CELLSET.replace("PER", "1")).await?;
    let stamped = wait_ready(&cells, "shop-us-0").await?;
    assert!(
        stamped
            .status
            .unwrap()
            .conditions
            .iter()
            .any(|c| c.type_ == "Routable" && c.status == "True" && c.reason == "InCellSet"),
        "a CellSet's cell is routable"
    );
    assert!(
        cells.get_opt("shop-eu-0").await?.is_none(),
        "eu's cell is eu's operator's"
    );
    let deployments: Api<Deployment> = Api::namespaced(client.clone(), "default");
    assert!(
        deployments.get_opt("elsewhere-app").await?.is_none(),
        "a Cell of region e2e got workloads from the us operator"
    );
    let elsewhere = cells.get("elsewhere").await?;
    assert!(elsewhere.status.is_none(), "{:?}", elsewhere.status);
    Ok(())
}

/// The operator's `cellplane_operator_leader` gauge (the series itself, not its help text).
fn leading(metrics: &str) -> anyhow::Result<f64> {
    cellplane_e2e::net::metric_value(metrics, "cellplane_operator_leader")
}

#[tokio::test(flavor = "multi_thread")]
async fn leadership_moves_when_the_leader_dies() -> anyhow::Result<()> {
    let (region, client) = setup("leader").await?;
    let mut a = region.operator("op-a", &[])?;
    let mut b = region.operator("op-b", &[])?;
    let leases: Api<Lease> = Api::namespaced(client.clone(), "default");
    let holder = |leases: Api<Lease>| async move {
        let l = leases.get_opt("cellplane-operator").await?;
        Ok(l.and_then(|l| l.spec).and_then(|s| s.holder_identity))
    };
    let first = wait_for("a leader", T, || holder(leases.clone())).await?;
    let cells: Api<Cell> = Api::namespaced(client.clone(), "default");
    apply_yaml(&client, "default", &cell_yaml("l1", "example/shop:1")).await?;
    wait_ready(&cells, "l1").await?;

    // Exactly one leads: the follower's metrics say leader 0.
    let (leader, follower) = if first == "op-a" {
        (&mut a, &mut b)
    } else {
        (&mut b, &mut a)
    };
    assert_eq!(leading(&leader.metrics()?)?, 1.0);
    assert_eq!(leading(&follower.metrics()?)?, 0.0);

    leader.kill();
    let second = wait_for("a new leader", T, || {
        let leases = leases.clone();
        let first = first.clone();
        async move { Ok(holder(leases).await?.filter(|h| *h != first)) }
    })
    .await?;
    assert_ne!(first, second);
    apply_yaml(&client, "default", &cell_yaml("l2", "example/shop:1")).await?;
    wait_ready(&cells, "l2").await?;
    assert_eq!(leading(&follower.metrics()?)?, 1.0);

    // Someone else takes the Lease: the leader's next renewal finds it gone, so it steps
    // down (stops reconciling) without exiting, and leads again once the thief's lease
    // has expired.
    let now = k8s_openapi::jiff::Timestamp::now().strftime("%Y-%m-%dT%H:%M:%S.%6fZ");
    let stolen = format!(
        r#"{{"spec":{{"holderIdentity":"thief","renewTime":"{now}","leaseDurationSeconds":6}}}}"#
    );
    region.kubectl(&[
        "patch",
        "lease",
        "cellplane-operator",
        "-n",
        "default",
        "--type",
        "merge",
        "-p",
        &stolen,
    ])?;
    wait_for("the leader to step down", T, || {
        let m = follower.metrics();
        async move { Ok((leading(&m?)? == 0.0).then_some(())) }
    })
    .await?;
    wait_for("leading again after the stolen lease expired", T, || {
        let m = follower.metrics();
        async move { Ok((leading(&m?)? == 1.0).then_some(())) }
    })
    .await?;

    // SIGTERM: the Lease is released at once (a standby need not wait out its duration),
    // and the process exits cleanly.
    follower.terminate()?;
    let status = follower.exited(T).await?;
    assert!(status.success(), "{status:?}");
    let after = holder(leases.clone()).await?;
    let log = std::fs::read_to_string(&follower.log).unwrap_or_default();
    assert_eq!(
        after, None,
        "the Lease was released on SIGTERM; operator log:\n{log}"
    );
    Ok(())
}

/// Waits until `key` is in etcd (`present`) or gone.
async fn wait_registered(kv: &etcd_client::Client, key: &str, present: bool) -> anyhow::Result<()> {
    let what = format!("{key} {}", if present { "registered" } else { "gone" });
    wait_for(&what, T, || {
        let mut kv = kv.clone();
        async move {
            let found = !kv.get(key, None).await?.kvs().is_empty();
            Ok((found == present).then_some(()))
        }
    })
    .await
}

#[tokio::test(flavor = "multi_thread")]
async fn ready_cells_register_in_etcd_and_the_finalizer_removes_them() -> anyhow::Result<()> {
    let (region, client) = setup("reg").await?;
    let etcd = region.etcd_endpoint();
    let mut op = region.operator(
        "solo",
        &["--etcd-endpoints", &etcd, "--registration-ttl", "5"],
    )?;
    let cells: Api<Cell> = Api::namespaced(client.clone(), "default");
    apply_yaml(&client, "default", &cell_yaml("r1", "example/shop:1")).await?;
    wait_for("Registered=True", T, || async {
        let c = cells.get("r1").await?;
        Ok(c.status.filter(|s| {
            s.conditions
                .iter()
                .any(|k| k.type_ == "Registered" && k.status == "True")
        }))
    })
    .await?;
    let mut kv = etcd_client::Client::connect([etcd.as_str()], None).await?;
    let key = cellplane_cells::etcd_keys::cell_key("shop", "r1");
    let got = kv.get(key.as_str(), None).await?;
    let reg: cellplane_cells::etcd_keys::Registration =
        serde_json::from_slice(got.kvs()[0].value())?;
    assert_eq!(reg.region, "e2e");
    assert_eq!(reg.standby.as_deref(), Some("r1-standby"));
    assert!(
        got.kvs()[0].lease() != 0,
        "registration is kept alive by a lease"
    );

    // A second cell; its operator then dies without a word (kill -9): the registration
    // lease expires within the TTL, so a dead region's cells stop being registered.
    apply_yaml(&client, "default", &cell_yaml("r2", "example/shop:1")).await?;
    let key2 = cellplane_cells::etcd_keys::cell_key("shop", "r2");
    wait_registered(&kv, &key2, true).await?;
    op.kill();
    let killed = std::time::Instant::now();
    wait_registered(&kv, &key2, false).await?;
    assert!(
        killed.elapsed() < Duration::from_secs(12),
        "expired within about the 5 s TTL: {:?}",
        killed.elapsed()
    );
    let _op = region.operator(
        "solo-again",
        &["--etcd-endpoints", &etcd, "--registration-ttl", "5"],
    )?;

    cells.delete("r1", &DeleteParams::default()).await?;
    wait_registered(&kv, &key, false).await?;
    Ok(())
}
