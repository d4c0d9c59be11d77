//! A two-region platform on real parts, shared by the failover test and the drill
//! benchmark: a global etcd of three members, two region control planes with their
//! operators (both campaign for the platform leadership and carry out their own cells'
//! intents), one cell per region on real Redis, MariaDB and Kafka declared through the
//! CellSet's `overrides`, the real reference app of each cell following the table in etcd,
//! and a router fed from etcd. Plus the load the failovers run under, and the `cellplane`
//! command as an SRE runs it.

use crate::cell::{overrides_yaml, CellApp, CellStores};
use crate::net::{send, Etcd, Reply, RouterProc};
use crate::netlab::{NetLab, Place};
use crate::{apply_yaml, test_dir, wait_for, workspace_bin, Operator, Region};
use anyhow::{Context as _, Result};
use cellplane_cells::etcd_keys::drill_key;
use cellplane_cells::routing::RoutingTable;
use cellplane_operator::platform::operations::batch::BatchOutcome;
use cellplane_operator::platform::operations::Operation;
use cellplane_operator::platform::operations::Switchover;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

pub const HOME: &str = "shop-us-0";
pub const STANDBY: &str = "shop-eu-0";
const T: Duration = Duration::from_secs(120);

/// The platform: `HOME` in region us, `STANDBY` in region eu, each the other's standby.
pub struct PairLab {
    pub etcd: Etcd,
    pub home: CellStores,
    pub standby: CellStores,
    pub home_app: CellApp,
    pub standby_app: CellApp,
    pub router: RouterProc,
    /// The table the platform converged on.
    pub table: RoutingTable,
    pub dir: PathBuf,
    pub operators: Vec<Operator>,
    /// Routers inside the cells' regions besides `router` (the netlab: us's own router,
    /// which its clients keep reaching when the region is cut off).
    pub local_routers: Vec<RouterProc>,
    // Kept for their drop (they stop the control planes); declared last so they go last.
    pub regions: Vec<Region>,
    /// The netlab the regions run in (None: everything on the host's loopback); removed
    /// after everything else.
    pub net: Option<NetLab>,
}

fn cellset(cells: &[(&str, &CellStores, &str)]) -> String {
    format!(
        r#"
apiVersion: cellplane.io/v1alpha1
kind: CellSet
metadata: {{name: shop, namespace: default}}
spec:
  platform: shop
  regions: [{{name: us, cells: 1}}, {{name: eu, cells: 1}}]
  template:
    app: {{image: "example/shop:1", replicas: 1}}
    redis: {{inCluster: {{ephemeral: true}}}}
    mysql: {{inCluster: {{ephemeral: true}}}}
    kafka: {{inCluster: {{ephemeral: true}}}}
{}"#,
        overrides_yaml(cells)
    )
}

/// The bearer token of the lab operators' topology page (`/console#token=...`).
pub const CONSOLE_TOKEN: &str = "lab-console-token-0123456789";

/// The lab's stabilization window before an automatic failback (after an unplanned
/// failover only: planned moves are failed back by the tests).
pub const FAILBACK_STABILIZATION_SECS: u64 = 15;

/// Region `i`'s operator as the lab runs it: platform leadership, replication, a fast agent,
/// its own etcd member first, automatic failback after a short stabilization window.
fn platform_operator(
    i: usize,
    region: &Region,
    etcd: &Etcd,
    dir: &std::path::Path,
) -> Result<Operator> {
    let secret = dir.join("platform-secret");
    let console = dir.join("console-token");
    region.platform_operator(
        &etcd.endpoints_from(i),
        &[
            "--replication-secret-file",
            secret.to_str().context("path")?,
            "--agent-interval-ms",
            "100",
            "--console-token-file",
            console.to_str().context("path")?,
            "--auto-failback=true",
            "--failback-stabilization-secs",
            &FAILBACK_STABILIZATION_SECS.to_string(),
        ],
    )
}

impl PairLab {
    /// Starts region `i`'s operator again (after a kill), with the same settings.
    pub fn restart_operator(&mut self, i: usize) -> Result<()> {
        self.operators[i] = platform_operator(i, &self.regions[i], &self.etcd, &self.dir)?;
        Ok(())
    }

    /// Which operator leads the platform now (by its metrics), if exactly one does.
    pub fn leader(&self) -> Option<usize> {
        let leading: Vec<usize> = (0..self.operators.len())
            .filter(|&i| {
                self.operators[i].metrics().ok().and_then(|m| {
                    crate::net::metric_value(&m, "cellplane_operator_platform_leader").ok()
                }) == Some(1.0)
            })
            .collect();
        (leading.len() == 1).then(|| leading[0])
    }

    /// Everything up and converged: the table holds both cells, each replicates the other,
    /// both apps are ready with a flash sale open, the router follows the table.
    pub async fn up(name: &str) -> Result<Self> {
        Self::up_at(name, None).await
    }

    /// The same platform with each region in its own netlab namespace (us, eu and ap; ap
    /// holds the third member of the global etcd only), so a region can be cut off: a
    /// router in each cell's region, the one in eu as `router` (the test reaches it over
    /// the bridge), the one in us in `local_routers`.
    pub async fn up_cuttable(name: &str) -> Result<Self> {
        let net = NetLab::up(&["us", "eu", "ap"])?;
        Self::up_at(name, Some(net)).await
    }

    async fn up_at(name: &str, net: Option<NetLab>) -> Result<Self> {
        let place = |region: &str| match &net {
            Some(n) => n.place(region),
            None => Ok(Place::local()),
        };
        let (us_at, eu_at, ap_at) = (place("us")?, place("eu")?, place("ap")?);
        let ((us, eu), (home, standby)) = std::thread::scope(|s| {
            let us = s.spawn(|| Region::up_in("us", us_at.clone()));
            let eu = s.spawn(|| Region::up_in("eu", eu_at.clone()));
            let home = s.spawn(|| CellStores::up_in(HOME, us_at.clone()));
            let standby = s.spawn(|| CellStores::up_in(STANDBY, eu_at.clone()));
            (
                (us.join().expect("region us"), eu.join().expect("region eu")),
                (
                    home.join().expect("stores"),
                    standby.join().expect("stores"),
                ),
            )
        });
        let (us, eu, home, standby) = (us?, eu?, home?, standby?);
        let etcd = Etcd::cluster_at(&[us_at.clone(), eu_at.clone(), ap_at]).await?;
        let dir = test_dir(name);
        let secret_file = dir.join("platform-secret");
        std::fs::write(&secret_file, "fedcba9876543210fedcba9876543210")?;
        std::fs::write(dir.join("console-token"), CONSOLE_TOKEN)?;
        // The real apps, following the table in etcd as operator-made pods do.
        let home_app = CellApp::start_on_etcd(&home, &etcd.endpoints_from(0), "shop", &[]).await?;
        let standby_app =
            CellApp::start_on_etcd(&standby, &etcd.endpoints_from(1), "shop", &[]).await?;
        let set = cellset(&[
            (HOME, &home, &home_app.addr),
            (STANDBY, &standby, &standby_app.addr),
        ]);
        let mut operators = Vec::new();
        for (i, (region, stores)) in [(&us, &home), (&eu, &standby)].into_iter().enumerate() {
            region.install_crds()?;
            let client = region.client().await?;
            stores.apply_secrets(&client).await?;
            apply_yaml(&client, "default", &set).await?;
            operators.push(platform_operator(i, region, &etcd, &dir)?);
        }
        let table = wait_for("a table with both cells", T, || async {
            Ok(etcd.routing_table().await?.filter(|t| t.cells.len() == 2))
        })
        .await?;
        // In the netlab a router gives up on a cell after 2.5 s (the lab's clients wait 3 s):
        // a request in flight to a region that was cut off fails in time for its client to
        // ask again where the users went (the default, 15 s, outlasts the clients).
        let timeouts = if net.is_some() {
            "timeouts: {requestMs: 2500}\n"
        } else {
            ""
        };
        let router_config = |id: &str, region: &str, member: usize| {
            format!(
                "table: {{etcd: {{endpoints: [{}], platform: shop, routerId: {id}, region: {region}, ackTtlSecs: 3}}}}\n{timeouts}",
                etcd.endpoints_from(member).split(',').map(|e| format!("'{e}'")).collect::<Vec<_>>().join(", ")
            )
        };
        // One router on the host for the loopback lab; one per cell region in the netlab.
        let (router, local_routers) = match &net {
            None => (
                RouterProc::start(&router_config("r-us", "us", 0), &dir).await?,
                Vec::new(),
            ),
            Some(_) => (
                RouterProc::start_at(&router_config("r-eu", "eu", 1), &dir, "/readyz", &eu.place)
                    .await?,
                vec![
                    RouterProc::start_at(
                        &router_config("r-us", "us", 0),
                        &dir,
                        "/readyz",
                        &us.place,
                    )
                    .await?,
                ],
            ),
        };
        let lab = Self {
            router,
            local_routers,
            etcd,
            home,
            standby,
            home_app,
            standby_app,
            table,
            dir,
            operators,
            regions: vec![us, eu],
            net,
        };
        for (cell, source) in [(STANDBY, HOME), (HOME, STANDBY)] {
            lab.wait_replicating(cell, source).await?;
        }
        for (cell, app) in [(HOME, &lab.home_app), (STANDBY, &lab.standby_app)] {
            wait_for("the app ready", T, || async {
                Ok((app.get("/readyz").await?.status == 200).then_some(()))
            })
            .await?;
            // Writes need the cell's ownership lease, taken once the table lists it.
            wait_for(&format!("{cell}'s ownership lease"), T, || async {
                Ok((!lab.etcd.owner_leases(cell).await?.is_empty()).then_some(()))
            })
            .await?;
            app.set_stock("flash", 1_000_000).await?;
        }
        Ok(lab)
    }

    /// Waits until `cell`'s MySQL runs its replication connection from `source`.
    pub async fn wait_replicating(&self, cell: &str, source: &str) -> Result<()> {
        self.etcd.wait_replicating(cell, source, T).await
    }

    /// `n` users whose slots `cell` owned when the platform converged.
    pub fn users_of(&self, cell: &str, n: usize) -> Vec<String> {
        (0..100_000)
            .map(|i| format!("user-{i}"))
            .filter(|u| self.table.route(u).1.name == cell)
            .take(n)
            .collect()
    }

    /// Runs `cellplane` against the platform; returns its exit code and output.
    pub async fn cellplane(&self, args: &[&str]) -> Result<(i32, String)> {
        run_cellplane(&self.etcd.endpoints_flag(), "shop", args).await
    }

    pub async fn record(&self, id: &str) -> Result<Operation> {
        let bytes = self
            .etcd
            .get(&drill_key("shop", id))
            .await?
            .with_context(|| format!("no record {id}"))?;
        Ok(serde_json::from_slice(&bytes)?)
    }

    /// The switchover or failback an operation ran (the single member of a one-cell batch).
    pub async fn member(&self, id: &str) -> Result<Switchover> {
        match self.record(id).await? {
            Operation::Switchover(s) => Ok(s),
            Operation::Batch(b) => {
                anyhow::ensure!(
                    b.outcome == Some(BatchOutcome::Succeeded) && b.members.len() == 1,
                    "batch {id}: {b:?}"
                );
                match self.record(&b.members[0]).await? {
                    Operation::Switchover(s) => Ok(s),
                    other => anyhow::bail!("{other:?}"),
                }
            }
            Operation::SlotMove(m) => anyhow::bail!("{id} is a slot move: {m:?}"),
        }
    }

    /// Sets every user's profile through the router.
    pub async fn put_profiles(&self, users: &[String]) -> Result<()> {
        for user in users {
            let body = serde_json::json!({"name": user, "email": format!("{user}@example.com")});
            let r = router_send(&self.router.addr, "PUT", user, "profile", Some(body)).await?;
            anyhow::ensure!(
                r.status == 200,
                "profile of {user}: {} {}",
                r.status,
                r.body
            );
        }
        Ok(())
    }
}

/// Runs `cellplane` against platform `platform` in the etcd at `endpoints`, as an SRE
/// would: its exit code and its output (stdout, then stderr).
pub async fn run_cellplane(
    endpoints: &str,
    platform: &str,
    args: &[&str],
) -> Result<(i32, String)> {
    let mut all = vec![
        "--etcd-endpoints".to_string(),
        endpoints.to_string(),
        "--platform".into(),
        platform.to_string(),
    ];
    all.extend(args.iter().map(|a| a.to_string()));
    let out = tokio::task::spawn_blocking(move || {
        std::process::Command::new(workspace_bin("cellplane"))
            .args(&all)
            .output()
    })
    .await??;
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    Ok((out.status.code().unwrap_or(-1), text))
}

/// The operation the CLI started ("started <id>: ...").
pub fn started_id(out: &str) -> Option<String> {
    out.lines()
        .find_map(|l| l.strip_prefix("started ")?.split(':').next())
        .map(str::to_string)
}

/// One request through the router for `user` (`/users/<user>/<what>`).
pub async fn router_send(
    addr: &str,
    method: &str,
    user: &str,
    what: &str,
    body: Option<serde_json::Value>,
) -> Result<Reply> {
    let url = format!("http://{addr}/users/{user}/{what}");
    let body = body.map(|b| b.to_string()).unwrap_or_default();
    send(
        method,
        &url,
        &[("x-user-id", user), ("content-type", "application/json")],
        bytes::Bytes::from(body),
    )
    .await
}

/// One answer the load got.
#[derive(Clone, Debug)]
pub struct Answer {
    pub user: String,
    /// The order id, for an order.
    pub order: Option<String>,
    pub status: u16,
    pub served_by: String,
    pub sent_ms: u64,
    pub latency_ms: u64,
    pub body: String,
}

/// Clients that read a profile and place an order (with a fresh id) per round, through the
/// router, for the given users, until stopped.
pub struct Load {
    stop: Arc<AtomicBool>,
    clients: Vec<tokio::task::JoinHandle<Vec<Answer>>>,
}

impl Load {
    pub fn start(router: &str, users: &[String], clients: usize) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let clients = (0..clients)
            .map(|c| {
                let (addr, users, stop) = (router.to_string(), users.to_vec(), stop.clone());
                tokio::spawn(async move {
                    let mut answers = Vec::new();
                    let mut n = 0usize;
                    while !stop.load(Ordering::SeqCst) {
                        let user = users[(n * 7 + c) % users.len()].clone();
                        n += 1;
                        let order_id = format!("o-{c}-{n}");
                        for order in [None, Some(order_id)] {
                            let sent_ms = cellplane_table::store::now_ms();
                            let started = std::time::Instant::now();
                            let r = match &order {
                                None => router_send(&addr, "GET", &user, "profile", None).await,
                                Some(id) => {
                                    let body = serde_json::json!({"sku": "flash", "orderId": id});
                                    router_send(&addr, "POST", &user, "orders", Some(body)).await
                                }
                            };
                            let (status, served_by, body) = match r {
                                Ok(r) => (r.status, r.served_by(), r.body),
                                Err(e) => (0, String::new(), e.to_string()),
                            };
                            answers.push(Answer {
                                user: user.clone(),
                                order,
                                status,
                                served_by,
                                sent_ms,
                                latency_ms: started.elapsed().as_millis() as u64,
                                body,
                            });
                        }
                    }
                    answers
                })
            })
            .collect();
        Self { stop, clients }
    }

    /// Stops the clients and returns every answer they got.
    pub async fn stop(self) -> Result<Vec<Answer>> {
        self.stop.store(true, Ordering::SeqCst);
        let mut all = Vec::new();
        for c in self.clients {
            all.extend(c.await?);
        }
        Ok(all)
    }
}
