//! The platform half of `make demo`, once the regions' control planes and operators are
//! up: every cell of the CellSet on its own real Redis, MariaDB and Kafka with the
//! reference app following the routing table in the global etcd; the CellSet applied in
//! every region with its cells on those stores; the platform leader writing the table; a
//! router fed from etcd; traffic through it the whole time; then a planned drain of one
//! region and its failback with `cellplane`, and the reports.
//!
//!   demo-platform CELLSET.yaml --etcd URL --region NAME=KUBECONFIG... [--drain REGION]
//!                 [--users N] [--reports DIR] [--keep]

use anyhow::{bail, Context as _, Result};
use cellplane_cells::crd::CellSet;
use cellplane_e2e::cell::{overrides_yaml, CellApp, CellStores};
use cellplane_e2e::net::{send, RouterProc};
use cellplane_e2e::prometheus::{self, Prometheus};
use cellplane_e2e::{apply_yaml, wait_for, workspace_bin};
use kube::config::{KubeConfigOptions, Kubeconfig};
use mysql_async::prelude::Queryable;
use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

const T: Duration = Duration::from_secs(120);

fn say(msg: &str) {
    println!("\n\x1b[1m== {msg}\x1b[0m");
}

struct Args {
    cellset: String,
    etcd: String,
    regions: Vec<(String, PathBuf)>,
    drain: Option<String>,
    users: usize,
    reports: PathBuf,
    keep: bool,
    /// The operators' HTTP addresses (metrics, the topology page).
    operators: Vec<String>,
    console_token: Option<String>,
}

fn parse_args() -> Result<Args> {
    let usage = "usage: demo-platform CELLSET.yaml --etcd URL --region NAME=KUBECONFIG... [--drain REGION] [--users N] [--reports DIR] [--operators ADDR,...] [--console-token T] [--keep]";
    let mut it = std::env::args().skip(1);
    let cellset = it.next().context(usage)?;
    let mut a = Args {
        cellset,
        etcd: String::new(),
        regions: Vec::new(),
        drain: None,
        users: 200,
        reports: std::env::temp_dir().join("cellplane-demo-reports"),
        keep: false,
        operators: Vec::new(),
        console_token: None,
    };
    while let Some(flag) = it.next() {
        let mut value = || {
            it.next()
                .with_context(|| format!("{flag} needs a value; {usage}"))
        };
        match flag.as_str() {
            "--etcd" => a.etcd = value()?,
            "--region" => {
                let v = value()?;
                let (name, path) = v.split_once('=').context("--region NAME=KUBECONFIG")?;
                a.regions.push((name.into(), path.into()));
            }
            "--drain" => a.drain = Some(value()?),
            "--users" => a.users = value()?.parse()?,
            "--reports" => a.reports = value()?.into(),
            "--keep" => a.keep = true,
            "--operators" => {
                a.operators = value()?
                    .split(',')
                    .filter(|s| !s.is_empty())
                    .map(str::to_string)
                    .collect()
            }
            "--console-token" => a.console_token = Some(value()?),
            other => bail!("unknown argument {other}; {usage}"),
        }
    }
    if a.etcd.is_empty() || a.regions.is_empty() {
        bail!("{usage}");
    }
    Ok(a)
}

/// Runs `cellplane` against the demo platform, its output going to the terminal.
fn cellplane(etcd: &str, platform: &str, args: &[&str]) -> Result<i32> {
    let status = std::process::Command::new(workspace_bin("cellplane"))
        .args(["--etcd-endpoints", etcd, "--platform", platform])
        .args(args)
        .status()
        .context("running cellplane")?;
    Ok(status.code().unwrap_or(-1))
}

/// Runs `cellplane` and returns its standard output.
fn cellplane_output(etcd: &str, platform: &str, args: &[&str]) -> Result<String> {
    let out = std::process::Command::new(workspace_bin("cellplane"))
        .args(["--etcd-endpoints", etcd, "--platform", platform])
        .args(args)
        .output()
        .context("running cellplane")?;
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// What the load saw.
#[derive(Default)]
struct Seen {
    requests: u64,
    statuses: BTreeMap<u16, u64>,
    served_by: BTreeMap<String, u64>,
    /// Orders answered 202, by the cell whose users they belong to at the start.
    accepted: BTreeMap<String, BTreeSet<String>>,
    examples: Vec<String>,
}

#[tokio::main]
async fn main() -> Result<()> {
    let args = parse_args()?;
    let text = std::fs::read_to_string(&args.cellset)?;
    let set: CellSet = serde_yaml::from_str(&text)
        .with_context(|| format!("{} is not a CellSet", args.cellset))?;
    let set_name = set.metadata.name.clone().unwrap_or_else(|| "shop".into());
    let platform = set.spec.platform.clone();
    let stamped = set.spec.stamp(&set_name);
    let etcd = args.etcd.as_str();

    say(&format!(
        "stores for {} cells: Redis, MariaDB (own mariadbd), Kafka KRaft, each on its own ports",
        stamped.len()
    ));
    let started = Instant::now();
    let handles: Vec<_> = stamped
        .iter()
        .map(|c| {
            let name = c.name.clone();
            std::thread::spawn(move || CellStores::up(&name))
        })
        .collect();
    // Join every start before giving up on one, so the ones that did start are stopped.
    let results: Vec<Result<CellStores>> = handles
        .into_iter()
        .map(|h| h.join().expect("store thread"))
        .collect();
    let mut stores = Vec::new();
    for (r, cell) in results.into_iter().zip(&stamped) {
        let s = r?;
        println!(
            "  {:<18} redis :{}  mysql :{}  kafka :{}",
            cell.name,
            s.var("REDIS_PORT"),
            s.var("MYSQL_PORT"),
            s.var("KAFKA_PORT")
        );
        stores.push(s);
    }
    println!("  all up in {:.1}s", started.elapsed().as_secs_f64());

    say("the reference app in every cell, following the routing table in the global etcd");
    let mut apps = Vec::new();
    for s in &stores {
        apps.push(CellApp::start_on_etcd(s, etcd, &platform, &[]).await?);
    }
    for (app, cell) in apps.iter().zip(&stamped) {
        println!("  {:<18} app on {}", cell.name, app.addr);
    }

    say("the CellSet in every region, each cell declared on its stores (external) and its app's address");
    let cells: Vec<(&str, &CellStores, &str)> = stamped
        .iter()
        .zip(&stores)
        .zip(&apps)
        .map(|((c, s), a)| (c.name.as_str(), s, a.addr.as_str()))
        .collect();
    let manifest = format!("{}\n{}", text.trim_end(), overrides_yaml(&cells));
    for (region, kubeconfig) in &args.regions {
        let kc = Kubeconfig::read_from(kubeconfig)?;
        let config =
            kube::Config::from_custom_kubeconfig(kc, &KubeConfigOptions::default()).await?;
        let client = kube::Client::try_from(config)?;
        for (cell, s) in stamped.iter().zip(&stores) {
            if &cell.spec.region == region {
                s.apply_secrets(&client).await?;
            }
        }
        apply_yaml(&client, "default", &manifest).await?;
        println!(
            "  {region}: CellSet {set_name} applied with {} overrides",
            stamped.len()
        );
    }

    say("the platform leader writes the routing table from the cells; standbys replicate their homes");
    wait_for("a table with every cell", T, || async {
        let out = cellplane_output(etcd, &platform, &["table", "-o", "json"])?;
        let tables: Vec<serde_json::Value> = serde_json::from_str(&out).unwrap_or_default();
        let n = tables
            .first()
            .and_then(|t| t["cells"].as_array())
            .map_or(0, Vec::len);
        Ok((n == stamped.len()).then_some(()))
    })
    .await?;
    wait_for("every standby replicating its home", T, || async {
        let out = cellplane_output(etcd, &platform, &["cells", "-o", "json"])?;
        let rows: Vec<serde_json::Value> = serde_json::from_str(&out).unwrap_or_default();
        let standby_of: BTreeMap<&str, &str> = rows
            .iter()
            .filter_map(|r| Some((r["cell"].as_str()?, r["standby"].as_str()?)))
            .collect();
        let ok = standby_of.iter().all(|(home, standby)| {
            rows.iter().any(|r| {
                r["cell"].as_str() == Some(standby)
                    && r["replicates"]
                        .as_array()
                        .is_some_and(|a| a.iter().any(|c| c.as_str() == Some(home)))
            })
        });
        Ok((ok && !rows.is_empty()).then_some(()))
    })
    .await?;
    cellplane(etcd, &platform, &["cells"])?;
    for (app, cell) in apps.iter().zip(&stamped) {
        wait_for(&format!("{} ready", cell.name), T, || async {
            Ok((app.get("/readyz").await?.status == 200).then_some(()))
        })
        .await?;
        app.set_stock("flash-1", 100_000).await?;
    }

    say("a router in front, fed from the global etcd (acknowledging every epoch it applies)");
    let dir = std::env::temp_dir().join(format!("cellplane-demo-platform-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let router_region = args.regions[0].0.clone();
    let router = RouterProc::start(
        &format!(
            "table: {{etcd: {{endpoints: ['{etcd}'], platform: {platform}, routerId: demo-router, region: {router_region}, ackTtlSecs: 3}}}}\n"
        ),
        &dir,
    )
    .await?;
    println!(
        "  router on {} (metrics on {})",
        router.addr, router.metrics_addr
    );

    say("Prometheus (built from its Go module) scraping the operators, the router and the apps");
    let prom = Prometheus::start(
        &dir.join("prometheus"),
        &[
            ("operator", args.operators.clone()),
            ("router", vec![router.metrics_addr.clone()]),
            ("app", apps.iter().map(|a| a.addr.clone()).collect()),
        ],
    )
    .await?;
    println!("  Prometheus on http://{}", prom.addr);
    if let (Some(op), Some(token)) = (args.operators.first(), &args.console_token) {
        println!("  topology page: http://{op}/console#token={token}");
    }

    let users: Vec<String> = (0..args.users).map(|i| format!("user-{i:04}")).collect();
    let homes: BTreeMap<String, String> = {
        let out = cellplane_output(etcd, &platform, &["table", "-o", "json"])?;
        let tables: Vec<cellplane_cells::routing::RoutingTable> = serde_json::from_str(&out)?;
        let t = tables.first().context("no table")?;
        users
            .iter()
            .map(|u| (u.clone(), t.route(u).1.name.clone()))
            .collect()
    };
    for user in &users {
        let body = format!(r#"{{"name":"{user}","email":"{user}@example.com"}}"#);
        let r = send(
            "PUT",
            &format!("http://{}/users/{user}/profile", router.addr),
            &[("x-user-id", user), ("content-type", "application/json")],
            body.into(),
        )
        .await?;
        if r.status != 200 {
            bail!("profile of {user}: {} {}", r.status, r.body);
        }
    }

    say(&format!(
        "traffic for the rest of the demo: {} users reading profiles and buying flash-sale units",
        users.len()
    ));
    let seen = Arc::new(parking_lot::Mutex::new(Seen::default()));
    let stop = Arc::new(AtomicBool::new(false));
    let mut clients = tokio::task::JoinSet::new();
    for c in 0..8usize {
        let (seen, stop, addr, users, homes) = (
            seen.clone(),
            stop.clone(),
            router.addr.clone(),
            users.clone(),
            homes.clone(),
        );
        clients.spawn(async move {
            let mut n = 0usize;
            while !stop.load(Ordering::SeqCst) {
                let user = &users[(n * 8 + c) % users.len()];
                n += 1;
                let order = format!("demo-{c}-{n}");
                for (method, what, body) in [
                    ("GET", "profile", String::new()),
                    (
                        "POST",
                        "orders",
                        format!(r#"{{"sku":"flash-1","orderId":"{order}"}}"#),
                    ),
                ] {
                    let url = format!("http://{addr}/users/{user}/{what}");
                    let r = send(
                        method,
                        &url,
                        &[("x-user-id", user), ("content-type", "application/json")],
                        body.into(),
                    )
                    .await;
                    let mut s = seen.lock();
                    s.requests += 1;
                    match r {
                        Ok(r) => {
                            *s.statuses.entry(r.status).or_default() += 1;
                            let cell = r
                                .headers
                                .get("x-cellplane-served-by")
                                .and_then(|v| v.to_str().ok())
                                .unwrap_or("router")
                                .to_string();
                            *s.served_by.entry(cell).or_default() += 1;
                            if method == "POST" && r.status == 202 {
                                s.accepted
                                    .entry(homes[user].clone())
                                    .or_default()
                                    .insert(order.clone());
                            }
                            if r.status >= 300 && r.status != 409 && s.examples.len() < 5 {
                                s.examples.push(format!(
                                    "{method} {url}: {} {}",
                                    r.status,
                                    r.body.trim()
                                ));
                            }
                        }
                        Err(e) => {
                            *s.statuses.entry(0).or_default() += 1;
                            if s.examples.len() < 5 {
                                s.examples.push(format!("{method} {url}: {e}"));
                            }
                        }
                    }
                }
            }
        });
    }
    tokio::time::sleep(Duration::from_secs(3)).await;
    println!("  {} requests so far", seen.lock().requests);

    let drain = args
        .drain
        .clone()
        .unwrap_or_else(|| args.regions[0].0.clone());
    say(&format!("planned drain of region {drain}: every cell switches over to its standby, one wave at a time"));
    let drain_code = cellplane(etcd, &platform, &["drain", "region", &drain, "--wave", "1"])?;
    cellplane(etcd, &platform, &["cells"])?;
    tokio::time::sleep(Duration::from_secs(2)).await;
    say(&format!(
        "failback of region {drain}: the same steps back, zero loss again"
    ));
    let failback_code = cellplane(
        etcd,
        &platform,
        &["failback", "--region", &drain, "--wave", "1"],
    )?;
    cellplane(etcd, &platform, &["cells"])?;
    tokio::time::sleep(Duration::from_secs(1)).await;
    stop.store(true, Ordering::SeqCst);
    while clients.join_next().await.is_some() {}
    let seen = Arc::try_unwrap(seen)
        .ok()
        .expect("clients done")
        .into_inner();

    say("every accepted order persisted exactly once, in its home cell's MySQL");
    let mut lost = 0;
    for (s, cell) in stores.iter().zip(&stamped) {
        let want = seen.accepted.get(&cell.name).cloned().unwrap_or_default();
        let pool = s.mysql_admin()?;
        let schema = s.var("MYSQL_DATABASE").to_string();
        let found: BTreeSet<String> = wait_for(
            &format!("{} orders persisted", cell.name),
            Duration::from_secs(60),
            || async {
                let rows: Vec<String> = pool
                    .get_conn()
                    .await?
                    .query(format!(
                        "SELECT order_id FROM `{schema}`.orders WHERE order_id LIKE 'demo-%'"
                    ))
                    .await?;
                let have: BTreeSet<String> = rows.into_iter().collect();
                Ok(want.is_subset(&have).then_some(have))
            },
        )
        .await
        .unwrap_or_default();
        let missing = want.difference(&found).count();
        lost += missing;
        println!(
            "  {:<18} accepted {:>5}  persisted {:>5}  missing {missing}",
            cell.name,
            want.len(),
            found.intersection(&want).count()
        );
    }

    say("summary");
    println!("  requests: {}", seen.requests);
    println!("  answers by status: {:?} (409 = sold out)", seen.statuses);
    println!("  answers by cell: {:?}", seen.served_by);
    for e in &seen.examples {
        println!("  e.g. {e}");
    }
    std::fs::create_dir_all(&args.reports)?;
    let drills = cellplane_output(etcd, &platform, &["drills", "-o", "json"])?;
    let ops: Vec<serde_json::Value> = serde_json::from_str(&drills).unwrap_or_default();
    let mut written = Vec::new();
    for op in &ops {
        let Some(id) = op["id"].as_str().filter(|_| op["type"] == "batch") else {
            continue;
        };
        let md = cellplane_output(etcd, &platform, &["drills", id, "-o", "markdown"])?;
        let path = args.reports.join(format!("{id}.md"));
        std::fs::write(&path, md)?;
        written.push(path);
    }
    println!();
    cellplane(etcd, &platform, &["drills"])?;
    println!(
        "\n  reports: {}",
        written
            .iter()
            .map(|p| p.display().to_string())
            .collect::<Vec<_>>()
            .join(", ")
    );
    println!("  look around: cellplane --etcd-endpoints {etcd} --platform {platform} cells | table --history | drills ID");
    println!("  router metrics: http://{}/metrics", router.metrics_addr);
    // The shipped alert rules and dashboard, on what this demo's components export.
    let queries: Vec<(String, String)> = prometheus::rule_exprs(&prometheus::rules_file())?
        .into_iter()
        .chain(prometheus::dashboard_exprs(&prometheus::dashboard_file())?)
        .collect();
    let mut failed = Vec::new();
    for (what, q) in &queries {
        if let Err(e) = prom.query(q).await {
            failed.push(format!("{what}: {e:#}"));
        }
    }
    let firing = prom
        .query("ALERTS{alertstate=\"firing\"}")
        .await
        .ok()
        .and_then(|v| v["result"].as_array().map(|a| a.len()))
        .unwrap_or(0);
    println!(
        "  {} alert rule and dashboard queries ran on Prometheus ({} failed); {} alert(s) firing now",
        queries.len(),
        failed.len(),
        firing
    );
    for f in &failed {
        println!("    {f}");
    }
    if drain_code != 0 || failback_code != 0 || lost > 0 {
        bail!("the drain exited {drain_code}, the failback {failback_code}, {lost} accepted orders missing");
    }
    println!("  the drain and the failback lost no accepted order.");

    if args.keep {
        println!(
            "\nStill running (Ctrl-C stops it all). Router: http://{}. Try one:",
            router.addr
        );
        println!("    curl -s -H 'x-user-id: user-0001' http://{}/users/user-0001/profile -D - | grep -i x-cellplane", router.addr);
        println!(
            "  Prometheus: http://{} (try cellplane_router_requests_total)",
            prom.addr
        );
        tokio::signal::ctrl_c().await?;
    } else {
        // Everything stops with this process: only suggest what will still answer.
        println!(
            "  To try requests and cellplane commands yourself, run it with KEEP=1 (make demo)."
        );
    }
    drop(router);
    drop(apps);
    drop(stores);
    let _ = std::fs::remove_dir_all(&dir);
    Ok(())
}
