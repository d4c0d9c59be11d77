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
use cellplane_cells::crd::Cell;
use cellplane_e2e::net::Reply;
use cellplane_e2e::real::{on_real_node, ready_pod_ip, RealRegion};
use cellplane_e2e::real_platform::{as_user, cell_condition, TwoRegions, NS};
use cellplane_e2e::{apply_yaml, wait_for};
use k8s_openapi::api::core::v1::Pod;
use kube::api::{Api, DeleteParams};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// A namespace of neither the cell nor the platform: what must not reach the cell.
const OUTSIDER_NS: &str = "outsider";
/// The regions; the first's cell is the one killed and switched over.
const REGIONS: [&str; 2] = ["rn", "rs"];
const HOME: &str = "shop-rn-0";
const STANDBY: &str = "shop-rs-0";
const T: Duration = Duration::from_secs(180);

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

#[tokio::test(flavor = "multi_thread")]
async fn cells_run_on_real_pods_and_keep_every_order_through_a_store_crash_and_a_switchover(
) -> Result<()> {
    let started = Instant::now();
    let platform = TwoRegions::up(REGIONS).await?;
    println!(
        "real nodes up with the images after {:?}",
        started.elapsed()
    );
    let result = scenario(&platform).await;
    if result.is_err() {
        eprintln!("{}", platform.describe());
        // With CELLPLANE_KEEP_LAB=1 a failed run leaves its regions, nodes and etcd up.
        if std::env::var("CELLPLANE_KEEP_LAB").is_ok_and(|v| v == "1") {
            platform.keep();
        }
    }
    result
}

/// The cells' life on the real nodes, from the operators' install to a switchover.
async fn scenario(platform: &TwoRegions) -> Result<()> {
    anyhow::ensure!(
        platform.cells() == [HOME, STANDBY],
        "{:?}",
        platform.cells()
    );
    let etcd = &platform.etcd;
    let applied = Instant::now();
    platform.install()?;
    for (i, cell) in [HOME, STANDBY].into_iter().enumerate() {
        platform.wait_ready(i).await?;
        println!(
            "{cell} Ready {:?} after the operators' install began",
            applied.elapsed()
        );
    }
    let home = platform.labs[0].region.client().await?;
    outsiders_are_kept_out(&platform.labs[0], &home).await?;
    region_agents_report(platform).await?;

    // Users through the router pod: it follows the table in etcd and dials each cell's
    // advertised address.
    let router = platform.install_router().await?;
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
    platform.set_stock("sku-1", 1000).await?;

    let orders = Orders { router, user };
    let mut accepted = mysql_crash(&home, &orders).await?;
    // The standby's connection to the restarted MySQL is back before the switchover (its
    // replication gate refuses until it is).
    platform.wait_replicating(STANDBY, HOME).await?;
    accepted.extend(switchover(platform, &orders).await?);
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
async fn region_agents_report(platform: &TwoRegions) -> Result<()> {
    let etcd = &platform.etcd;
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
        platform.wait_replicating(cell, source).await?;
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
async fn switchover(platform: &TwoRegions, orders: &Orders) -> Result<Vec<usize>> {
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
    let started = Instant::now();
    let (ok, text) = platform.cellplane(&["switchover", HOME]).await?;
    let took = started.elapsed();
    tokio::time::sleep(Duration::from_secs(2)).await;
    stop.store(true, Ordering::SeqCst);
    let answers = client.await?;
    println!("cellplane switchover {HOME} ({took:?}):\n{text}");
    anyhow::ensure!(ok, "the switchover: {text}");
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
