//! A platform of two regions on real nodes, as a platform engineer installs it: per region
//! a real node, the operator chart (`helm`, the operator as a pod under the chart's RBAC)
//! with the shared replication secret, local volumes, and one CellSet that stamps one cell
//! per region, each the other's standby, on real pods. Each cell's MySQL and app are
//! published on its node by a NodePort Service (`externalTrafficPolicy: Local`), registered
//! with `advertise`, and the other node admitted by `allowFrom`: how the other region
//! reaches them. The global etcd listens on the first region's side. Shared by the
//! real-node test and `make demo REAL=1`.

use crate::net::{Etcd, Reply};
use crate::real::{build_images, on_real_node, ready_pod_ip, through_port_forward, RealRegion};
use crate::{repo_root, test_dir, wait_for};
use anyhow::{Context as _, Result};
use bytes::Bytes;
use cellplane_cells::crd::Cell;
use k8s_openapi::api::core::v1::Pod;
use kube::api::Api;
use std::time::Duration;

/// The namespace of the cells.
pub const NS: &str = "shop";
/// The platform's name (and the CellSet's).
pub const PLATFORM: &str = "shop";
/// Where each cell's MySQL and app are published on its node for the other region.
pub const MYSQL_NODE_PORT: u16 = 30306;
pub const APP_NODE_PORT: u16 = 30080;
/// The Secret both operators derive the replication passwords from (same value).
const REPLICATION_SECRET: &str = "platform-replication";
/// The app's admin token (stock for the sale), set through `spec.app.env`.
const ADMIN_TOKEN: &str = "lab-admin-token-0123456789";
/// A wait for pods: a cell's Kafka on a busy node (CI builds beside the tests) can take
/// minutes to start; its startup probe allows 5. A warm CI run once saw one cell's app not
/// ready after 330 s while the other's was (cause not found: the same test on a quiet
/// machine has both Ready in 40 s); a green run never waits this long.
const T: Duration = Duration::from_secs(480);

pub struct TwoRegions {
    /// The regions, in the CellSet's order; the first holds the global etcd and the router.
    pub labs: Vec<RealRegion>,
    pub etcd: Etcd,
}

/// The cell the CellSet stamps in `region`.
pub fn cell_of(region: &str) -> String {
    format!("{PLATFORM}-{region}-0")
}

impl TwoRegions {
    /// Both regions' nodes and control planes, side by side, with the project's and the
    /// stores' images imported; the global etcd.
    pub async fn up(regions: [&str; 2]) -> Result<Self> {
        let archives = build_images()?;
        let labs = std::thread::scope(|s| {
            let archives = &archives;
            let ups: Vec<_> = regions
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
        // On the first region's side: the other region's pods reach it through the host,
        // as they would reach a member across data centers.
        let etcd = Etcd::cluster_at(&[crate::netlab::Place {
            netns: None,
            host: labs[0].host.clone(),
        }])
        .await?;
        Ok(Self { labs, etcd })
    }

    pub fn regions(&self) -> Vec<String> {
        self.labs.iter().map(|l| l.region.name.clone()).collect()
    }

    pub fn cells(&self) -> Vec<String> {
        self.regions().iter().map(|r| cell_of(r)).collect()
    }

    pub fn etcd_endpoint(&self) -> &str {
        &self.etcd.endpoints()[0]
    }

    /// The operator chart, the volumes, the published ports and the CellSet, in both
    /// regions at once.
    pub fn install(&self) -> Result<()> {
        let node_ips: Vec<&str> = self.labs.iter().map(|l| l.node_ip.as_str()).collect();
        let set = cellset_yaml(&self.regions(), &node_ips);
        std::thread::scope(|s| {
            let installs: Vec<_> = self
                .labs
                .iter()
                .map(|lab| s.spawn(|| install_region(lab, self.etcd_endpoint(), &set)))
                .collect();
            installs
                .into_iter()
                .try_for_each(|h| h.join().expect("an install's thread"))
        })
    }

    /// Waits until the cell of region `i` is Ready (on failure, prints the Cell).
    pub async fn wait_ready(&self, i: usize) -> Result<()> {
        let lab = &self.labs[i];
        let cell = cell_of(&lab.region.name);
        let cells: Api<Cell> = Api::namespaced(lab.region.client().await?, NS);
        let ready = wait_for(&format!("{cell} Ready on real pods"), T, || {
            cell_condition(&cells, &cell, "Ready", "True")
        })
        .await;
        if ready.is_err() {
            eprintln!(
                "{}",
                lab.region
                    .kubectl(&["-n", NS, "get", "cell", &cell, "-o", "yaml"])?
            );
        }
        ready.map(|_| ())
    }

    /// Waits until `cell`'s region reports its MySQL replicating `source`'s.
    pub async fn wait_replicating(&self, cell: &str, source: &str) -> Result<()> {
        self.etcd.wait_replicating(cell, source, T).await
    }

    /// The router chart in the first region; returns the router pod's `ip:port` once it
    /// is Ready.
    pub async fn install_router(&self) -> Result<String> {
        let lab = &self.labs[0];
        let dir = test_dir("real-platform-router");
        let values = dir.join("router-values.yaml");
        std::fs::write(
            &values,
            format!(
                "replicas: 1\ntable: {{etcd: {{endpoints: [\"{}\"]}}, platform: {PLATFORM}}}\nresources: {{requests: {{cpu: 50m, memory: 64Mi}}}}\n{}\n",
                self.etcd_endpoint(),
                on_real_node(0)
            ),
        )?;
        helm_install(lab, "edge", "cellplane-router", &values)?;
        let pods: Api<Pod> = Api::namespaced(lab.region.client().await?, "cellplane");
        let ip = wait_for("the router pod's address", T, || {
            ready_pod_ip(&pods, "app.kubernetes.io/name=cellplane-router")
        })
        .await?;
        Ok(format!("{ip}:8080"))
    }

    /// Opens a sale of `sku` in every cell, through each app pod's admin API (the app's
    /// NetworkPolicy keeps the host out: reached as an SRE reaches it, by port-forward).
    pub async fn set_stock(&self, sku: &str, stock: u64) -> Result<()> {
        let auth = format!("Bearer {ADMIN_TOKEN}");
        let headers = [
            ("content-type", "application/json"),
            ("authorization", auth.as_str()),
        ];
        for lab in &self.labs {
            let pods: Api<Pod> = Api::namespaced(lab.region.client().await?, NS);
            let r = through_port_forward(
                &pods,
                "app.kubernetes.io/name=app",
                8080,
                (
                    "PUT",
                    &format!("/admin/stock/{sku}"),
                    &headers,
                    Bytes::from(format!(r#"{{"stock":{stock}}}"#)),
                ),
            )
            .await?;
            anyhow::ensure!(r.status == 204, "setting stock: {} {}", r.status, r.body);
        }
        Ok(())
    }

    /// Runs `cellplane` against the platform: whether it succeeded, and its output.
    pub async fn cellplane(&self, args: &[&str]) -> Result<(bool, String)> {
        let (code, text) = crate::lab::run_cellplane(self.etcd_endpoint(), PLATFORM, args).await?;
        Ok((code == 0, text))
    }

    /// Every region's nodes, pods and recent events (why a pod is Pending, restarted or was
    /// evicted), and where the nodes' logs are: what to look at after a failure.
    pub fn describe(&self) -> String {
        let kubectl = |lab: &RealRegion, args: &[&str]| {
            lab.region.kubectl(args).unwrap_or_else(|e| e.to_string())
        };
        self.labs
            .iter()
            .map(|lab| {
                format!(
                    "{}\n{}\n{}\nthe node's logs: {}\n",
                    kubectl(lab, &["get", "nodes", "-o", "wide"]),
                    kubectl(lab, &["get", "pods", "-A", "-o", "wide"]),
                    kubectl(lab, &["get", "events", "-A", "--sort-by=.lastTimestamp"]),
                    lab.logs().display()
                )
            })
            .collect()
    }

    /// Leaves the regions, nodes and etcd running (for a look, or the demo's KEEP=1).
    pub fn keep(self) {
        for lab in self.labs {
            eprintln!(
                "kept region {}: KUBECONFIG={}",
                lab.region.name,
                lab.region.kubeconfig().display()
            );
            std::mem::forget(lab);
        }
        eprintln!("kept the global etcd at {}", self.etcd.endpoint);
        std::mem::forget(self.etcd);
    }
}

/// `cell`'s condition `type_`'s message once its status is `status`.
pub async fn cell_condition(
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

/// One request as a user: the router finds the user's cell by the X-User-Id header.
pub async fn as_user(
    router: &str,
    method: &str,
    path: &str,
    user: &str,
    body: &str,
) -> Result<Reply> {
    crate::net::send(
        method,
        &format!("http://{router}{path}"),
        &[("x-user-id", user), ("content-type", "application/json")],
        Bytes::from(body.to_string()),
    )
    .await
}

/// The CellSet both regions apply: each cell advertises its own node's ports and admits
/// the other node (where the other region's pods come from once their node masquerades
/// them).
fn cellset_yaml(regions: &[String], node_ips: &[&str]) -> String {
    let store = |published: Option<(&str, &str)>| match published {
        None => "{inCluster: {storage: 1Gi, storageClassName: lab-local}}".to_string(),
        Some((own, other)) => format!(
            r#"{{inCluster: {{storage: 1Gi, storageClassName: lab-local, advertise: "{own}:{MYSQL_NODE_PORT}", allowFrom: ["{other}/32"]}}}}"#
        ),
    };
    let overrides: String = (0..2)
        .map(|i| {
            let (own, other) = (node_ips[i], node_ips[1 - i]);
            format!(
                "    {}:\n      advertise: \"{own}:{APP_NODE_PORT}\"\n      mysql: {}\n",
                cell_of(&regions[i]),
                store(Some((own, other)))
            )
        })
        .collect();
    format!(
        r#"
apiVersion: cellplane.io/v1alpha1
kind: CellSet
metadata: {{name: {PLATFORM}, namespace: {NS}}}
spec:
  platform: {PLATFORM}
  regions: [{{name: {a}, cells: 1}}, {{name: {b}, cells: 1}}]
  template:
    scheduling:
{placement}
    app:
      image: "ghcr.io/cellplane/shop:0.1.0"
      replicas: 1
      env: [{{name: CELL_ADMIN_TOKEN, value: "{ADMIN_TOKEN}"}}]
      allowFrom: ["{ip_a}/32", "{ip_b}/32"]
    redis: {store}
    mysql: {store}
    kafka: {store}
  overrides:
{overrides}"#,
        a = regions[0],
        b = regions[1],
        placement = on_real_node(6),
        ip_a = node_ips[0],
        ip_b = node_ips[1],
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

/// `helm install RELEASE charts/CHART -n cellplane -f VALUES`, waiting for its pods.
fn helm_install(
    lab: &RealRegion,
    release: &str,
    chart: &str,
    values: &std::path::Path,
) -> Result<()> {
    let chart = repo_root().join("charts").join(chart);
    lab.helm(&[
        "install",
        release,
        chart.to_str().context("chart path")?,
        "-n",
        "cellplane",
        "-f",
        values.to_str().context("values path")?,
        "--wait",
        "--timeout",
        "180s",
    ])
    .map(|_| ())
}

/// One region's platform: the operator chart (with the replication secret), the node's
/// volumes, the cell's published ports, and the CellSet.
fn install_region(lab: &RealRegion, etcd: &str, cellset: &str) -> Result<()> {
    let region = &lab.region;
    let dir = test_dir(&format!("real-platform-{}", region.name));
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
        format!(
            "region: {}\nreplicas: 1\netcd: {{endpoints: [\"{etcd}\"]}}\nplatform: {{name: {PLATFORM}, replicationSecretName: {REPLICATION_SECRET}}}\n{}\n",
            region.name,
            on_real_node(0)
        ),
    )?;
    // The operator as its chart installs it: a pod on the real node under the chart's
    // ServiceAccount (a permission the chart lacks fails the Cell).
    helm_install(lab, "cp", "cellplane-operator", &values)?;
    lab.add_local_volumes(&dir.join("volumes"), 3)?;
    region.kubectl(&["create", "namespace", NS])?;
    let cell = cell_of(&region.name);
    let published = dir.join("published.yaml");
    std::fs::write(
        &published,
        [
            node_port_yaml(&cell, "mysql", 3306, MYSQL_NODE_PORT),
            node_port_yaml(&cell, "app", 8080, APP_NODE_PORT),
        ]
        .join("\n---\n"),
    )?;
    region.kubectl(&["apply", "-f", published.to_str().context("path")?])?;
    let set = dir.join("cellset.yaml");
    std::fs::write(&set, cellset)?;
    region.kubectl(&["apply", "-f", set.to_str().context("path")?])?;
    Ok(())
}
