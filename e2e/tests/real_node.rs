//! What the operator renders, run for real, in two regions: each region has a real node
//! (containerd, the kubelet, kube-proxy, CoreDNS, a NetworkPolicy enforcer), the project's
//! images and the lab's store images imported, and the operator chart installed with
//! `helm` (the operator as a pod under the chart's ServiceAccount and RBAC). One CellSet
//! stamps a cell per region, each the other's standby, running on real pods: Redis, MariaDB
//! and Kafka from the operator's StatefulSets on the node's volumes, the app from its
//! Deployment. Each cell's MySQL and app are reached from the other region through a
//! NodePort Service on its node (`advertise`, `allowFrom`), as a cluster would expose them.
//! Users are served through the router chart's pod; a store pod killed costs no order that
//! got 202, and neither does a switchover of the cell to its standby in the other region.
//! One lab for the binary (it takes minutes to build).

use anyhow::{Context as _, Result};
use bytes::Bytes;
use cellplane_cells::crd::Cell;
use cellplane_e2e::net::{send, Etcd, Reply};
use cellplane_e2e::real::{
    build_images, on_real_node, ready_pod_ip, through_port_forward, RealRegion,
};
use cellplane_e2e::{apply_yaml, wait_for, workspace_bin};
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::Pod;
use kube::api::{Api, DeleteParams};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

const NS: &str = "shop";
/// A namespace of neither the cell nor the platform: what must not reach the cell.
const OUTSIDER_NS: &str = "outsider";
/// The regions, and the cell each runs (the other's standby).
const REGIONS: [&str; 2] = ["rn", "rs"];
const HOME: &str = "shop-rn-0";
const STANDBY: &str = "shop-rs-0";
/// Where each cell's MySQL and app are published on its node for the other region.
const MYSQL_NODE_PORT: u16 = 30306;
const APP_NODE_PORT: u16 = 30080;
/// The Secret both operators derive the replication passwords from (same value).
const REPLICATION_SECRET: &str = "platform-replication";
/// The app's admin token (stock for the sale), set through `spec.app.env`.
const ADMIN_TOKEN: &str = "lab-admin-token-0123456789";
const T: Duration = Duration::from_secs(180);

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

fn operator_values_yaml(region: &str, etcd: &str) -> String {
    format!(
        r#"
region: {region}
replicas: 1
etcd: {{endpoints: ["{etcd}"]}}
platform: {{name: shop, replicationSecretName: {REPLICATION_SECRET}}}
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

/// The CellSet both regions apply. `node_ips` are the nodes of `REGIONS`, in order: each
/// cell advertises its own node's ports and admits the other node (where the other
/// region's pods come from once their node masquerades them).
fn cellset_yaml(node_ips: [&str; 2]) -> String {
    let store = |advertise: Option<(&str, &str)>| match advertise {
        None => "{inCluster: {storage: 1Gi, storageClassName: lab-local}}".to_string(),
        Some((own, other)) => format!(
            r#"{{inCluster: {{storage: 1Gi, storageClassName: lab-local, advertise: "{own}:{MYSQL_NODE_PORT}", allowFrom: ["{other}/32"]}}}}"#
        ),
    };
    let overrides: String = [(HOME, 0), (STANDBY, 1)]
        .into_iter()
        .map(|(cell, i)| {
            let (own, other) = (node_ips[i], node_ips[1 - i]);
            format!(
                "    {cell}:\n      advertise: \"{own}:{APP_NODE_PORT}\"\n      mysql: {}\n",
                store(Some((own, other)))
            )
        })
        .collect();
    format!(
        r#"
apiVersion: cellplane.io/v1alpha1
kind: CellSet
metadata: {{name: shop, namespace: {NS}}}
spec:
  platform: shop
  regions: [{{name: {rn}, cells: 1}}, {{name: {rs}, cells: 1}}]
  template:
    scheduling:
{placement}
    app:
      image: "ghcr.io/cellplane/shop:0.1.0"
      replicas: 1
      env: [{{name: CELL_ADMIN_TOKEN, value: "{ADMIN_TOKEN}"}}]
      allowFrom: ["{a}/32", "{b}/32"]
    redis: {store}
    mysql: {store}
    kafka: {store}
  overrides:
{overrides}"#,
        rn = REGIONS[0],
        rs = REGIONS[1],
        placement = on_real_node(6),
        a = node_ips[0],
        b = node_ips[1],
        store = store(None),
    )
}

/// A NodePort Service for one component of `cell` on `port` (traffic policy Local: the
/// pod sees where a connection came from, which its NetworkPolicy's ranges judge).
fn node_port_yaml(cell: &str, component: &str, port: u16, node_port: u16) -> String {
    format!(
        r#"
apiVersion: v1
kind: Service
metadata: {{name: {cell}-{component}-published, namespace: {NS}}}
spec:
  type: NodePort
  externalTrafficPolicy: Local
  selector: {{cellplane.io/cell: {cell}, cellplane.io/component: {component}}}
  ports: [{{port: {port}, targetPort: {port}, nodePort: {node_port}}}]
"#
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

/// With CELLPLANE_KEEP_LAB=1 a failed run leaves its regions, nodes and etcd running.
fn keep_for_debugging(labs: Vec<RealRegion>, etcd: Etcd) {
    if std::env::var("CELLPLANE_KEEP_LAB").is_ok_and(|v| v == "1") {
        for lab in labs {
            eprintln!(
                "keeping the lab: KUBECONFIG={}",
                lab.region.kubeconfig().display()
            );
            std::mem::forget(lab);
        }
        std::mem::forget(etcd);
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn cells_run_on_real_pods_and_keep_every_order_through_a_store_crash_and_a_switchover(
) -> Result<()> {
    let started = Instant::now();
    let archives = build_images()?;
    // Both regions side by side: nodes, control planes and the images imported.
    let labs = std::thread::scope(|s| {
        let archives = &archives;
        let ups: Vec<_> = REGIONS
            .into_iter()
            .map(|name| {
                s.spawn(move || -> Result<RealRegion> {
                    let lab = RealRegion::up(name)?;
                    lab.import(archives)?;
                    Ok(lab)
                })
            })
            .collect();
        ups.into_iter()
            .map(|h| h.join().expect("a region's thread"))
            .collect::<Result<Vec<_>>>()
    })?;
    println!(
        "real nodes up with the images after {:?}",
        started.elapsed()
    );
    // The global etcd, on the first region's side (the other region's pods reach it
    // through the host, as they would reach a member across data centers).
    let etcd = Etcd::cluster_at(&[cellplane_e2e::netlab::Place {
        netns: None,
        host: labs[0].host.clone(),
    }])
    .await?;
    let result = scenario(&labs, &etcd).await;
    if result.is_err() {
        for lab in &labs {
            eprintln!(
                "{}",
                lab.region.kubectl(&["get", "pods", "-A", "-o", "wide"])?
            );
            eprintln!("the node's logs: {}", lab.logs().display());
        }
        keep_for_debugging(labs, etcd);
    }
    result
}

/// The cells' life on the real nodes, from the operators' install to a switchover.
async fn scenario(labs: &[RealRegion], etcd: &Etcd) -> Result<()> {
    let node_ips = [labs[0].node_ip.as_str(), labs[1].node_ip.as_str()];
    let applied = Instant::now();
    std::thread::scope(|s| {
        let installs: Vec<_> = labs
            .iter()
            .map(|lab| s.spawn(|| install_platform(lab, etcd, node_ips)))
            .collect();
        installs
            .into_iter()
            .try_for_each(|h| h.join().expect("an install's thread"))
    })?;
    for (lab, cell) in labs.iter().zip([HOME, STANDBY]) {
        let client = lab.region.client().await?;
        wait_cell_ready(lab, &client, cell).await?;
        println!(
            "{cell} Ready {:?} after the operators' install began",
            applied.elapsed()
        );
    }
    let home = labs[0].region.client().await?;
    let standby = labs[1].region.client().await?;
    outsiders_are_kept_out(&labs[0], &home).await?;
    region_agents_report(etcd).await?;

    // Users through the router pod: it follows the table in etcd and dials each cell's
    // advertised address.
    install_router(&labs[0], etcd)?;
    let router = wait_for("the router pod's address", T, || async {
        let pods: Api<Pod> = Api::namespaced(home.clone(), "cellplane");
        ready_pod_ip(&pods, "app.kubernetes.io/name=cellplane-router").await
    })
    .await?;
    let router = format!("{router}:8080");
    let table = etcd.routing_table().await?.context("a routing table")?;
    let user = (0..10_000)
        .map(|i| format!("user-{i}"))
        .find(|u| table.route(u).1.name == HOME)
        .context("a user of the home cell")?;
    let put = as_user(
        &router,
        "PUT",
        &format!("/users/{user}/profile"),
        &user,
        r#"{"name":"Alice","email":"alice@example.com"}"#,
    )
    .await?;
    anyhow::ensure!(
        put.status < 300,
        "profile write through the router: {} {}",
        put.status,
        put.body
    );
    let got = as_user(&router, "GET", &format!("/users/{user}/profile"), &user, "").await?;
    anyhow::ensure!(got.status == 200, "{} {}", got.status, got.body);
    anyhow::ensure!(got.body.contains("Alice"), "{}", got.body);
    // A sale in both cells (the standby's stock serves the home's users after the
    // switchover).
    for client in [&home, &standby] {
        set_stock(client).await?;
    }

    let orders = Orders {
        router: router.clone(),
        user,
    };
    let mut accepted = mysql_crash(&home, &orders).await?;
    // The standby's connection to the restarted MySQL is back before the switchover (its
    // replication gate refuses until it is).
    replicating(etcd, STANDBY, HOME).await?;
    accepted.extend(switchover(etcd, &orders).await?);
    for i in &accepted {
        wait_for(
            &format!("order o-{i} persisted"),
            Duration::from_secs(120),
            || async {
                let r = orders.get(*i).await?;
                Ok((r.status == 200 && r.body.contains("persisted")).then_some(()))
            },
        )
        .await?;
    }
    println!("all {} accepted orders persisted", accepted.len());
    Ok(())
}

/// One region's platform: the operator chart (with the replication secret), the node's
/// volumes, the cell's published ports, and the CellSet.
fn install_platform(lab: &RealRegion, etcd: &Etcd, node_ips: [&str; 2]) -> Result<()> {
    let region = &lab.region;
    let dir = cellplane_e2e::test_dir(&format!("real-node-{}", region.name));
    region.kubectl(&["create", "namespace", "cellplane"])?;
    region.kubectl(&[
        "-n",
        "cellplane",
        "create",
        "secret",
        "generic",
        REPLICATION_SECRET,
        "--from-literal=secret=fedcba9876543210fedcba9876543210",
    ])?;
    let values = dir.join("operator-values.yaml");
    std::fs::write(
        &values,
        operator_values_yaml(&region.name, &etcd.endpoints()[0]),
    )?;
    let chart = cellplane_e2e::repo_root().join("charts/cellplane-operator");
    // The operator as its chart installs it: a pod on the real node under the chart's
    // ServiceAccount (a permission the chart lacks fails a Cell below).
    let out = lab.helm(&[
        "install",
        "cp",
        chart.to_str().context("chart path")?,
        "-n",
        "cellplane",
        "-f",
        values.to_str().context("path")?,
        "--wait",
        "--timeout",
        "180s",
    ])?;
    println!("{out}");
    lab.add_local_volumes(&dir.join("volumes"), 3)?;
    region.kubectl(&["create", "namespace", NS])?;
    let cell = if region.name == REGIONS[0] {
        HOME
    } else {
        STANDBY
    };
    let published = dir.join("published.yaml");
    std::fs::write(
        &published,
        [
            node_port_yaml(cell, "mysql", 3306, MYSQL_NODE_PORT),
            node_port_yaml(cell, "app", 8080, APP_NODE_PORT),
        ]
        .join("\n---\n"),
    )?;
    region.kubectl(&["apply", "-f", published.to_str().context("path")?])?;
    let set = dir.join("cellset.yaml");
    std::fs::write(&set, cellset_yaml(node_ips))?;
    region.kubectl(&["apply", "-f", set.to_str().context("path")?])?;
    Ok(())
}

async fn wait_cell_ready(lab: &RealRegion, client: &kube::Client, cell: &str) -> Result<()> {
    let deployments: Api<Deployment> = Api::namespaced(client.clone(), "cellplane");
    let op = deployments.get("cp-cellplane-operator").await?;
    let ready_replicas = op.status.and_then(|s| s.ready_replicas);
    anyhow::ensure!(
        ready_replicas == Some(1),
        "the operator pod Ready: {ready_replicas:?}"
    );
    let cells: Api<Cell> = Api::namespaced(client.clone(), NS);
    let ready = wait_for(&format!("{cell} Ready on real pods"), T, || {
        cell_condition(&cells, cell, "Ready", "True")
    })
    .await;
    if ready.is_err() {
        eprintln!(
            "{}",
            lab.region
                .kubectl(&["-n", NS, "get", "cell", cell, "-o", "yaml"])?
        );
    }
    ready.map(|_| ())
}

/// `cell`'s condition `type_`'s message once its status is `status`.
async fn cell_condition(
    cells: &Api<Cell>,
    cell: &str,
    type_: &str,
    status: &str,
) -> Result<Option<String>> {
    let c = cells.get_opt(cell).await?;
    Ok(c.and_then(|c| c.status).and_then(|s| {
        s.conditions
            .iter()
            .find(|c| c.type_ == type_ && c.status == status)
            .map(|c| c.message.clone())
    }))
}

/// NetworkPolicies, enforced on this node: a pod in another namespace reaches a server no
/// policy covers, but neither the cell's MySQL nor its app (the cell's own app, the
/// router, the operator and the other region reach them: the cell is Ready, users are
/// served, the standby replicates).
async fn outsiders_are_kept_out(lab: &RealRegion, client: &kube::Client) -> Result<()> {
    lab.region.kubectl(&["create", "namespace", OUTSIDER_NS])?;
    let outsider_pods: Api<Pod> = Api::namespaced(client.clone(), OUTSIDER_NS);
    apply_yaml(
        client,
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
        ready_pod_ip(&outsider_pods, "role=open-server")
    })
    .await?;
    let cell_pods: Api<Pod> = Api::namespaced(client.clone(), NS);
    let mysql_ip = ready_pod_ip(&cell_pods, "app.kubernetes.io/name=mysql")
        .await?
        .context("MySQL's pod")?;
    let app_ip = ready_pod_ip(&cell_pods, "app.kubernetes.io/name=app")
        .await?
        .context("the app's pod")?;
    let verdicts = connect_from_outsider(
        client,
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
        "the app is the cell's and the routers': {verdicts}"
    );
    Ok(())
}

/// Each region's agent reached its cell's MySQL through the policy (the report in the
/// cell's registration), each cell's MySQL replicates the other's across the regions (from
/// the advertised node port), and the home's app pod took its ownership lease from the
/// environment the operator rendered (CELL_ETCD, the lease's timings).
async fn region_agents_report(etcd: &Etcd) -> Result<()> {
    let report = wait_for("the agent's MySQL report", T, || async {
        Ok(etcd.registration(HOME).await?.and_then(|r| r.mysql))
    })
    .await?;
    anyhow::ensure!(
        !report.read_only,
        "the home's MySQL is writable: {report:?}"
    );
    println!(
        "the region agent measured MySQL at {}",
        report.gtid_binlog_pos
    );
    for (cell, source) in [(STANDBY, HOME), (HOME, STANDBY)] {
        replicating(etcd, cell, source).await?;
    }
    let leased = wait_for("the cell marked leased", T, || async {
        let key = cellplane_cells::etcd_keys::leased_key("shop", HOME);
        Ok(etcd.get(&key).await?.map(|_| ()))
    })
    .await;
    anyhow::ensure!(
        leased.is_ok(),
        "the app pod holds {HOME}'s ownership lease: {leased:?}"
    );
    Ok(())
}

/// Waits until `cell`'s region reports its MySQL replicating `source`'s.
async fn replicating(etcd: &Etcd, cell: &str, source: &str) -> Result<()> {
    wait_for(&format!("{cell} replicates {source}"), T, || async {
        Ok(etcd.registration(cell).await?.filter(|r| {
            r.mysql
                .as_ref()
                .and_then(|m| m.replicas.get(source))
                .is_some_and(|c| c.running)
        }))
    })
    .await
    .map(|_| ())
}

fn install_router(lab: &RealRegion, etcd: &Etcd) -> Result<()> {
    let dir = cellplane_e2e::test_dir("real-node-router");
    let values = dir.join("router-values.yaml");
    std::fs::write(&values, router_values_yaml(&etcd.endpoints()[0]))?;
    let chart = cellplane_e2e::repo_root().join("charts/cellplane-router");
    lab.helm(&[
        "install",
        "edge",
        chart.to_str().context("path")?,
        "-n",
        "cellplane",
        "-f",
        values.to_str().context("path")?,
        "--wait",
        "--timeout",
        "120s",
    ])
    .map(|_| ())
}

/// Opens the sale in the cell of `client`'s region, through its app pod's admin API (the
/// app's NetworkPolicy keeps the host out: reached as an SRE reaches it, by port-forward).
async fn set_stock(client: &kube::Client) -> Result<()> {
    let pods: Api<Pod> = Api::namespaced(client.clone(), NS);
    let auth = format!("Bearer {ADMIN_TOKEN}");
    let headers = [
        ("content-type", "application/json"),
        ("authorization", auth.as_str()),
    ];
    let r = through_port_forward(
        &pods,
        "app.kubernetes.io/name=app",
        8080,
        (
            "PUT",
            "/admin/stock/sku-1",
            &headers,
            Bytes::from_static(br#"{"stock":1000}"#),
        ),
    )
    .await?;
    anyhow::ensure!(r.status == 204, "setting stock: {} {}", r.status, r.body);
    Ok(())
}

/// One user's orders through the router, by number.
#[derive(Clone)]
struct Orders {
    router: String,
    user: String,
}

impl Orders {
    async fn place(&self, i: usize) -> Result<Reply> {
        let body = format!(r#"{{"sku":"sku-1","qty":1,"orderId":"o-{i}"}}"#);
        let path = format!("/users/{}/orders", self.user);
        as_user(&self.router, "POST", &path, &self.user, &body).await
    }

    async fn get(&self, i: usize) -> Result<Reply> {
        let path = format!("/users/{}/orders/o-{i}", self.user);
        as_user(&self.router, "GET", &path, &self.user, "").await
    }
}

/// Orders through the router while the home's MariaDB pod is killed: the cell goes not
/// Ready naming MySQL and recovers. Returns the orders that got 202 (they wait in Kafka
/// while MySQL is gone).
async fn mysql_crash(client: &kube::Client, orders: &Orders) -> Result<Vec<usize>> {
    let cells: Api<Cell> = Api::namespaced(client.clone(), NS);
    let store_pods: Api<Pod> = Api::namespaced(client.clone(), NS);
    let mut accepted = Vec::new();
    for i in 0..5 {
        if orders.place(i).await?.status == 202 {
            accepted.push(i);
        }
    }
    store_pods
        .delete(
            &format!("{HOME}-mysql-0"),
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
        || cell_condition(&cells, HOME, "MySQLReady", "False"),
    )
    .await?;
    println!("MySQLReady False after {:?}: {not_ready}", killed.elapsed());
    for i in 5..15 {
        if let Ok(r) = orders.place(i).await {
            if r.status == 202 {
                accepted.push(i);
            }
        }
    }
    wait_for("the cell Ready again", T, || {
        cell_condition(&cells, HOME, "Ready", "True")
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
    Ok(accepted)
}

/// `cellplane switchover` of the home cell to its standby in the other region while one
/// client keeps ordering: it succeeds, every order is answered 202 (held during the
/// freeze), and the orders after it are served by the standby's pods. Returns the
/// accepted orders.
async fn switchover(etcd: &Etcd, orders: &Orders) -> Result<Vec<usize>> {
    let stop = Arc::new(AtomicBool::new(false));
    let client = {
        let (stop, orders) = (stop.clone(), orders.clone());
        tokio::spawn(async move {
            let mut answers = Vec::new();
            for i in 100.. {
                if stop.load(Ordering::SeqCst) {
                    break;
                }
                let r = orders.place(i).await;
                answers.push((i, r));
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            answers
        })
    };
    tokio::time::sleep(Duration::from_secs(1)).await;
    let etcd_endpoint = etcd.endpoints()[0].clone();
    let started = Instant::now();
    let out = tokio::task::spawn_blocking(move || {
        std::process::Command::new(workspace_bin("cellplane"))
            .args(["--etcd-endpoints", &etcd_endpoint, "--platform", "shop"])
            .args(["switchover", HOME])
            .output()
    })
    .await??;
    let took = started.elapsed();
    tokio::time::sleep(Duration::from_secs(2)).await;
    stop.store(true, Ordering::SeqCst);
    let answers = client.await?;
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    println!("cellplane switchover {HOME} ({took:?}):\n{text}");
    anyhow::ensure!(out.status.success(), "the switchover: {text}");
    let mut accepted = Vec::new();
    let mut failed = Vec::new();
    let mut served_by = std::collections::BTreeMap::<String, usize>::new();
    for (i, r) in answers {
        match r {
            Ok(r) if r.status == 202 => {
                accepted.push(i);
                *served_by.entry(r.served_by()).or_default() += 1;
            }
            Ok(r) => failed.push(format!("o-{i}: {} {}", r.status, r.body)),
            Err(e) => failed.push(format!("o-{i}: {e}")),
        }
    }
    println!(
        "orders during the switchover: {} got 202, served by {served_by:?}",
        accepted.len()
    );
    anyhow::ensure!(failed.is_empty(), "every order answered 202: {failed:?}");
    anyhow::ensure!(
        served_by.contains_key(HOME) && served_by.contains_key(STANDBY),
        "orders served by the home, then by the standby's pods: {served_by:?}"
    );
    let last = orders.place(99).await?;
    anyhow::ensure!(
        last.status == 202 && last.served_by() == STANDBY,
        "an order after the switchover goes to {STANDBY}: {} {:?} {}",
        last.status,
        last.served_by(),
        last.body
    );
    accepted.push(99);
    Ok(accepted)
}
