//! What the operator renders, run for real: a region with a real node (containerd, the
//! kubelet, kube-proxy, CoreDNS), the project's images and the lab's store images
//! imported, both charts installed with `helm` (the operator as a pod under the chart's
//! ServiceAccount and RBAC), and a CellSet whose cell runs on real pods: Redis, MariaDB and
//! Kafka from the operator's StatefulSets on the node's volumes, the app from its
//! Deployment. Users are served through the router pod; a store pod killed costs no order
//! that got 202. One lab for the binary (it takes minutes to build).

use anyhow::{Context as _, Result};
use bytes::Bytes;
use cellplane_e2e::net::{send, send_over, Etcd, Reply};
use cellplane_e2e::real::{build_images, on_real_node, RealRegion};
use cellplane_e2e::{apply_yaml, wait_for};
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::Pod;
use kube::api::{Api, DeleteParams, ListParams};
use std::time::{Duration, Instant};

const NS: &str = "shop";
/// A namespace of neither the cell nor the platform: what must not reach the cell.
const OUTSIDER_NS: &str = "outsider";
const CELL: &str = "shop-rn-0";
/// The app's admin token (stock for the sale), set through `spec.app.env`.
const ADMIN_TOKEN: &str = "lab-admin-token-0123456789";

/// One request as a user: the router finds the user's cell by the X-User-Id header.
async fn as_user(addr: &str, method: &str, path: &str, user: &str, body: &str) -> Result<Reply> {
    send(
        method,
        &format!("http://{addr}{path}"),
        &[("x-user-id", user), ("content-type", "application/json")],
        Bytes::from(body.to_string()),
    )
    .await
}

fn values_yaml(etcd: &str) -> String {
    format!(
        r#"
region: rn
replicas: 1
etcd: {{endpoints: ["{etcd}"]}}
platform: {{name: shop}}
{placement}
"#,
        placement = on_real_node(0)
    )
}

fn router_values_yaml(etcd: &str) -> String {
    format!(
        r#"
replicas: 1
table: {{etcd: {{endpoints: ["{etcd}"]}}, platform: shop}}
resources: {{requests: {{cpu: 50m, memory: 64Mi}}}}
{placement}
"#,
        placement = on_real_node(0)
    )
}

/// Local volumes on the node, one per store: what a cluster's volume provisioner would
/// hand out (the lab has none), bound when the pod is scheduled.
fn volumes_yaml(node: &str, dir: &std::path::Path) -> Vec<String> {
    let mut docs = vec![r#"
apiVersion: storage.k8s.io/v1
kind: StorageClass
metadata: {name: lab-local}
provisioner: kubernetes.io/no-provisioner
volumeBindingMode: WaitForFirstConsumer
"#
    .to_string()];
    for i in 0..3 {
        let path = dir.join(format!("pv-{i}"));
        std::fs::create_dir_all(&path).expect("volume dir");
        // The stores run as their own non-root users; a hostPath volume is not chowned
        // by fsGroup.
        std::process::Command::new("chmod")
            .arg("0777")
            .arg(&path)
            .status()
            .expect("chmod");
        docs.push(format!(
            r#"
apiVersion: v1
kind: PersistentVolume
metadata: {{name: lab-{node}-{i}}}
spec:
  capacity: {{storage: 5Gi}}
  accessModes: [ReadWriteOnce]
  storageClassName: lab-local
  persistentVolumeReclaimPolicy: Delete
  hostPath: {{path: "{path}", type: Directory}}
  nodeAffinity:
    required:
      nodeSelectorTerms: [{{matchExpressions: [{{key: kubernetes.io/hostname, operator: In, values: ["{node}"]}}]}}]
"#,
            path = path.display()
        ));
    }
    docs
}

fn cellset_yaml() -> String {
    format!(
        r#"
apiVersion: cellplane.io/v1alpha1
kind: CellSet
metadata: {{name: shop, namespace: {NS}}}
spec:
  platform: shop
  regions: [{{name: rn, cells: 1}}]
  template:
    scheduling:
{placement}
    app:
      image: "ghcr.io/cellplane/shop:0.1.0"
      replicas: 1
      env: [{{name: CELL_ADMIN_TOKEN, value: "{ADMIN_TOKEN}"}}]
    redis: {{inCluster: {{storage: 1Gi, storageClassName: lab-local}}}}
    mysql: {{inCluster: {{storage: 1Gi, storageClassName: lab-local}}}}
    kafka: {{inCluster: {{storage: 1Gi, storageClassName: lab-local}}}}
"#,
        placement = on_real_node(6)
    )
}

/// Tries TCP connections from a pod in another namespace (not the cell's, not a router
/// or operator): "ADDR open" or "ADDR closed" per target.
async fn connect_from_outsider(client: &kube::Client, targets: &[String]) -> Result<String> {
    let pods: Api<Pod> = Api::namespaced(client.clone(), OUTSIDER_NS);
    let args = targets
        .iter()
        .map(|t| format!("\"{t}\""))
        .collect::<Vec<_>>()
        .join(", ");
    let name = format!("probe-{}", targets.len());
    let pod = format!(
        r#"
apiVersion: v1
kind: Pod
metadata: {{name: {name}, namespace: {OUTSIDER_NS}}}
spec:
  restartPolicy: Never
{placement}
  securityContext: {{runAsNonRoot: true, runAsUser: 999}}
  containers:
  - name: probe
    image: redis:7.4.2
    imagePullPolicy: Never
    command: [bash, -c, 'for t in "$@"; do if timeout 3 bash -c "</dev/tcp/${{t%:*}}/${{t#*:}}" 2>/dev/null; then echo "$t open"; else echo "$t closed"; fi; done', probe]
    args: [{args}]
"#,
        placement = on_real_node(2)
    );
    apply_yaml(client, OUTSIDER_NS, &pod).await?;
    wait_for("the probe pod done", Duration::from_secs(60), || async {
        let p = pods.get(&name).await?;
        Ok(p.status
            .and_then(|s| s.phase)
            .filter(|phase| phase == "Succeeded" || phase == "Failed"))
    })
    .await?;
    Ok(pods.logs(&name, &Default::default()).await?)
}

/// With CELLPLANE_KEEP_LAB=1 a failed run leaves its region, node and etcd running.
fn keep_for_debugging(lab: RealRegion, etcd: Etcd) {
    if std::env::var("CELLPLANE_KEEP_LAB").is_ok_and(|v| v == "1") {
        eprintln!(
            "keeping the lab: KUBECONFIG={}",
            lab.region.kubeconfig().display()
        );
        std::mem::forget(lab);
        std::mem::forget(etcd);
    }
}

async fn pod_ip(pods: &Api<Pod>, selector: &str) -> Result<Option<String>> {
    let list = pods.list(&ListParams::default().labels(selector)).await?;
    Ok(list.items.into_iter().find_map(|p| {
        let s = p.status?;
        let ready = s
            .conditions?
            .iter()
            .any(|c| c.type_ == "Ready" && c.status == "True");
        ready.then_some(s.pod_ip?)
    }))
}

#[tokio::test(flavor = "multi_thread")]
async fn a_cell_runs_on_real_pods_from_the_built_images_and_keeps_every_order_through_a_store_crash(
) -> Result<()> {
    let started = Instant::now();
    let archives = build_images()?;
    let lab = RealRegion::up("rn")?;
    println!("real node {} up after {:?}", lab.node, started.elapsed());
    lab.import(&archives)?;
    let etcd = Etcd::cluster_at(&[cellplane_e2e::netlab::Place {
        netns: None,
        host: lab.host.clone(),
    }])
    .await?;
    let result = scenario(&lab, &etcd).await;
    if result.is_err() {
        eprintln!(
            "{}",
            lab.region.kubectl(&["get", "pods", "-A", "-o", "wide"])?
        );
        eprintln!("the node's logs: {}", lab.logs().display());
        keep_for_debugging(lab, etcd);
    }
    result
}

/// The cell's life on the real node, from the operator's install to a store's crash.
async fn scenario(lab: &RealRegion, etcd: &Etcd) -> Result<()> {
    let client = lab.region.client().await?;
    let dir = cellplane_e2e::test_dir("real-node");

    // The operator, as its chart installs it: a pod on the real node under the chart's
    // ServiceAccount (a permission the chart lacks fails the Cell below).
    let values = dir.join("operator-values.yaml");
    std::fs::write(&values, values_yaml(&etcd.endpoint))?;
    let chart = cellplane_e2e::repo_root().join("charts/cellplane-operator");
    let chart = chart.to_str().context("chart path")?;
    let out = lab.helm(&[
        "install",
        "cp",
        chart,
        "-n",
        "cellplane",
        "--create-namespace",
        "-f",
        values.to_str().context("path")?,
        "--wait",
        "--timeout",
        "180s",
    ])?;
    println!("{out}");
    let deployments: Api<Deployment> = Api::namespaced(client.clone(), "cellplane");
    let op = deployments.get("cp-cellplane-operator").await?;
    let ready_replicas = op.status.and_then(|s| s.ready_replicas);
    anyhow::ensure!(
        ready_replicas == Some(1),
        "the operator pod Ready: {ready_replicas:?}"
    );

    let volumes = dir.join("volumes.yaml");
    std::fs::write(
        &volumes,
        volumes_yaml(&lab.node, &dir.join("volumes")).join("\n---\n"),
    )?;
    lab.region
        .kubectl(&["apply", "-f", volumes.to_str().context("path")?])?;
    lab.region.kubectl(&["create", "namespace", NS])?;
    let applied = Instant::now();
    apply_yaml(&client, NS, &cellset_yaml()).await?;
    let cells: Api<cellplane_cells::crd::Cell> = Api::namespaced(client.clone(), NS);
    let ready = wait_for(
        "the cell Ready on real pods",
        Duration::from_secs(180),
        || async {
            let c = cells.get_opt(CELL).await?;
            Ok(c.and_then(|c| c.status)
                .filter(|s| {
                    s.conditions
                        .iter()
                        .any(|c| c.type_ == "Ready" && c.status == "True")
                })
                .map(|_| ()))
        },
    )
    .await;
    if ready.is_err() {
        eprintln!(
            "{}",
            lab.region
                .kubectl(&["-n", NS, "get", "cell", CELL, "-o", "yaml"])?
        );
    }
    ready?;
    println!(
        "cell Ready {:?} after the CellSet was applied",
        applied.elapsed()
    );

    // NetworkPolicies, enforced on this node: a pod in another namespace reaches a server
    // no policy covers, but neither the cell's MySQL nor its app (the cell's own app, the
    // router and the operator reach them: the cell is Ready, users are served below).
    lab.region.kubectl(&["create", "namespace", OUTSIDER_NS])?;
    let outsider_pods: Api<Pod> = Api::namespaced(client.clone(), OUTSIDER_NS);
    apply_yaml(
        &client,
        OUTSIDER_NS,
        &format!(
            r#"
apiVersion: v1
kind: Pod
metadata: {{name: open-server, namespace: {OUTSIDER_NS}, labels: {{role: open-server}}}}
spec:
{placement}
  securityContext: {{runAsNonRoot: true, runAsUser: 999}}
  containers:
  - {{name: redis, image: "redis:7.4.2", imagePullPolicy: Never, args: [redis-server, --protected-mode, "no"],
     readinessProbe: {{tcpSocket: {{port: 6379}}, periodSeconds: 1}}}}
"#,
            placement = on_real_node(2)
        ),
    )
    .await?;
    let open_ip = wait_for("the open server Ready", Duration::from_secs(60), || {
        pod_ip(&outsider_pods, "role=open-server")
    })
    .await?;
    let cell_pods: Api<Pod> = Api::namespaced(client.clone(), NS);
    let mysql_ip = pod_ip(&cell_pods, "app.kubernetes.io/name=mysql")
        .await?
        .context("MySQL's pod")?;
    let app_ip = pod_ip(&cell_pods, "app.kubernetes.io/name=app")
        .await?
        .context("the app's pod")?;
    let verdicts = connect_from_outsider(
        &client,
        &[
            format!("{open_ip}:6379"),
            format!("{mysql_ip}:3306"),
            format!("{app_ip}:8080"),
        ],
    )
    .await?;
    println!("from another namespace:\n{verdicts}");
    anyhow::ensure!(
        verdicts.contains(&format!("{open_ip}:6379 open")),
        "the probe works: {verdicts}"
    );
    anyhow::ensure!(
        verdicts.contains(&format!("{mysql_ip}:3306 closed")),
        "MySQL is the cell's: {verdicts}"
    );
    anyhow::ensure!(
        verdicts.contains(&format!("{app_ip}:8080 closed")),
        "the app is the cell's and the router's: {verdicts}"
    );

    // The operator's region agent reached the cell's MySQL through the policy (its
    // report is in the cell's registration: writable, with a GTID position).
    let report = wait_for(
        "the agent's MySQL report",
        Duration::from_secs(60),
        || async { Ok(etcd.registration(CELL).await?.and_then(|r| r.mysql)) },
    )
    .await?;
    anyhow::ensure!(
        !report.read_only,
        "the home's MySQL is writable: {report:?}"
    );
    println!(
        "the region agent measured MySQL at {}",
        report.gtid_binlog_pos
    );
    // The app pod took its ownership lease in the global etcd, from the environment the
    // operator rendered (CELL_ETCD, the lease's timings): the leader marks the cell leased.
    let leased = wait_for(
        "the cell marked leased",
        Duration::from_secs(30),
        || async {
            let key = cellplane_cells::etcd_keys::leased_key("shop", CELL);
            Ok(etcd.get(&key).await?.map(|_| ()))
        },
    )
    .await;
    anyhow::ensure!(
        leased.is_ok(),
        "the app pod holds {CELL}'s ownership lease: {leased:?}"
    );

    // Users through the router pod: it follows the table in etcd and dials the cell's
    // Service by its cluster DNS name.
    let router_values = dir.join("router-values.yaml");
    std::fs::write(&router_values, router_values_yaml(&etcd.endpoint))?;
    let router_chart = cellplane_e2e::repo_root().join("charts/cellplane-router");
    lab.helm(&[
        "install",
        "edge",
        router_chart.to_str().context("path")?,
        "-n",
        "cellplane",
        "-f",
        router_values.to_str().context("path")?,
        "--wait",
        "--timeout",
        "120s",
    ])?;
    let pods: Api<Pod> = Api::namespaced(client.clone(), "cellplane");
    let router_ip = wait_for("the router pod's address", Duration::from_secs(60), || {
        pod_ip(&pods, "app.kubernetes.io/name=cellplane-router")
    })
    .await?;
    let router = format!("{router_ip}:8080");
    let put = as_user(
        &router,
        "PUT",
        "/users/alice/profile",
        "alice",
        r#"{"name":"Alice","email":"alice@example.com"}"#,
    )
    .await?;
    anyhow::ensure!(
        put.status < 300,
        "profile write through the router: {} {}",
        put.status,
        put.body
    );
    let got = as_user(&router, "GET", "/users/alice/profile", "alice", "").await?;
    anyhow::ensure!(got.status == 200, "{} {}", got.status, got.body);
    anyhow::ensure!(got.body.contains("Alice"), "{}", got.body);

    // A sale: stock set through the app pod's admin API.
    let app_pods: Api<Pod> = Api::namespaced(client.clone(), NS);
    // The app's NetworkPolicy keeps the host out: the admin API is reached as an SRE
    // reaches it, through the API server's port-forward.
    let app_pod = app_pods
        .list(&ListParams::default().labels("app.kubernetes.io/name=app"))
        .await?
        .items
        .into_iter()
        .next()
        .and_then(|p| p.metadata.name)
        .context("the app's pod")?;
    let mut forward = app_pods.portforward(&app_pod, &[8080]).await?;
    let stream = forward.take_stream(8080).context("port 8080 forwarded")?;
    let auth = format!("Bearer {ADMIN_TOKEN}");
    let r = send_over(
        stream,
        "localhost",
        "PUT",
        "/admin/stock/sku-1",
        &[
            ("content-type", "application/json"),
            ("authorization", &auth),
        ],
        Bytes::from_static(br#"{"stock":1000}"#),
    )
    .await?;
    anyhow::ensure!(r.status == 204, "setting stock: {} {}", r.status, r.body);

    // Orders through the router while MariaDB's pod is killed: every 202 is persisted
    // once it is back (the orders wait in Kafka).
    let store_pods: Api<Pod> = Api::namespaced(client.clone(), NS);
    let mut accepted = Vec::new();
    let order = |i: usize| {
        let router = router.clone();
        async move {
            let body = format!(r#"{{"sku":"sku-1","qty":1,"orderId":"o-{i}"}}"#);
            as_user(&router, "POST", "/users/alice/orders", "alice", &body).await
        }
    };
    for i in 0..5 {
        let r = order(i).await?;
        if r.status == 202 {
            accepted.push(i);
        }
    }
    store_pods
        .delete(
            &format!("{CELL}-mysql-0"),
            &DeleteParams {
                grace_period_seconds: Some(0),
                ..Default::default()
            },
        )
        .await?;
    let killed = Instant::now();
    let not_ready = wait_for(
        "the cell not Ready, naming MySQL",
        Duration::from_secs(60),
        || async {
            let c = cells.get(CELL).await?;
            Ok(c.status.and_then(|s| {
                s.conditions
                    .iter()
                    .find(|c| c.type_ == "MySQLReady" && c.status == "False")
                    .map(|c| c.message.clone())
            }))
        },
    )
    .await?;
    println!("MySQLReady False after {:?}: {not_ready}", killed.elapsed());
    for i in 5..15 {
        if let Ok(r) = order(i).await {
            if r.status == 202 {
                accepted.push(i);
            }
        }
    }
    wait_for("the cell Ready again", Duration::from_secs(180), || async {
        let c = cells.get(CELL).await?;
        Ok(c.status
            .filter(|s| {
                s.conditions
                    .iter()
                    .any(|c| c.type_ == "Ready" && c.status == "True")
            })
            .map(|_| ()))
    })
    .await?;
    println!(
        "cell Ready again {:?} after the kill; {} orders got 202",
        killed.elapsed(),
        accepted.len()
    );
    anyhow::ensure!(
        accepted.len() >= 5,
        "orders accepted before the kill: {accepted:?}"
    );
    for i in &accepted {
        let path = format!("/users/alice/orders/o-{i}");
        wait_for(
            "every accepted order persisted",
            Duration::from_secs(120),
            || {
                let (router, path) = (router.clone(), path.clone());
                async move {
                    let r = as_user(&router, "GET", &path, "alice", "").await?;
                    Ok((r.status == 200 && r.body.contains("persisted")).then_some(()))
                }
            },
        )
        .await?;
    }
    Ok(())
}
