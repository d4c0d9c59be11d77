//! `make demo REAL=1`: the demo with its cells as real pods. Two regions (us-east,
//! eu-west), each with a real node (containerd, the kubelet, kube-proxy, CoreDNS, a
//! NetworkPolicy enforcer) beside its kwok nodes; the operator chart installed with `helm`
//! in each, one CellSet whose cell per region runs Redis, MariaDB, Kafka and the reference
//! app as real pods built from this repository, each cell the other's standby, its MySQL
//! and app published on its node for the other region; the router chart's pod; traffic
//! through it the whole time; a planned switchover of the us-east cell to eu-west and its
//! failback with `cellplane`; every accepted order read back; the times.
//!
//!   demo-real [--keep]    (run as root: the nodes are network namespaces)

use anyhow::{Context as _, Result};
use cellplane_e2e::lab::Load;
use cellplane_e2e::real_platform::{as_user, TwoRegions};
use cellplane_e2e::wait_for;
use cellplane_table::store::now_ms;
use std::collections::BTreeMap;
use std::time::{Duration, Instant};

const REGIONS: [&str; 2] = ["us-east", "eu-west"];
const USERS_PER_CELL: usize = 8;

fn say(msg: &str) {
    println!("\n\x1b[1m== {msg}\x1b[0m");
}

#[tokio::main]
async fn main() -> Result<()> {
    let keep = match std::env::args().nth(1).as_deref() {
        None => false,
        Some("--keep") => true,
        Some(other) => anyhow::bail!("unknown argument {other}; usage: demo-real [--keep]"),
    };
    let started = Instant::now();
    say("two regions, each with a real node beside its kwok nodes; the images built here and imported");
    let platform = TwoRegions::up(REGIONS).await?;
    println!("  up after {:.0?}", started.elapsed());
    let result = run(&platform, started).await;
    if let Err(e) = &result {
        eprintln!("demo failed: {e:#}\n{}", platform.describe());
    }
    if keep {
        println!(
            "\nEverything stays up: kubectl --kubeconfig <below> get pods -A; stop with e2e/bin/node down <node> for each node"
        );
        for lab in &platform.labs {
            println!("  node {} of region {}", lab.node, lab.region.name);
        }
        platform.keep();
    }
    result
}

async fn run(platform: &TwoRegions, started: Instant) -> Result<()> {
    let cells = platform.cells();
    say("in each region: the operator chart (helm), local volumes, the cell's published ports, the CellSet");
    let applied = Instant::now();
    platform.install()?;
    for (i, cell) in cells.iter().enumerate() {
        platform.wait_ready(i).await?;
        println!(
            "  {cell} Ready on real pods {:.1?} after the install began",
            applied.elapsed()
        );
    }
    for lab in &platform.labs {
        println!(
            "{}",
            lab.region
                .kubectl(&["get", "pods", "-n", "shop", "-o", "wide"])?
        );
    }
    say("replication across the regions (each MySQL from the other's published port)");
    platform.wait_replicating(&cells[1], &cells[0]).await?;
    platform.wait_replicating(&cells[0], &cells[1]).await?;
    println!("  {} <-> {}", cells[0], cells[1]);

    say(&format!("the router chart's pod in {}", REGIONS[0]));
    let router = platform.install_router().await?;
    platform.set_stock("flash", 1_000_000).await?;
    let table = platform
        .etcd
        .routing_table()
        .await?
        .context("a routing table")?;
    let users: Vec<String> = cells
        .iter()
        .flat_map(|cell| {
            (0..100_000)
                .map(|i| format!("user-{i}"))
                .filter(|u| table.route(u).1.name == *cell)
                .take(USERS_PER_CELL)
                .collect::<Vec<_>>()
        })
        .collect();
    for user in &users {
        let body = format!(r#"{{"name":"{user}","email":"{user}@example.com"}}"#);
        let path = format!("/users/{user}/profile");
        let r = as_user(&router, "PUT", &path, user, &body).await?;
        anyhow::ensure!(
            r.status == 200,
            "profile of {user}: {} {}",
            r.status,
            r.body
        );
    }
    println!(
        "  router at {router}; {} users' profiles written",
        users.len()
    );

    say("traffic: 4 clients reading profiles and ordering through the router pod");
    let load = Load::start(&router, &users, 4);
    tokio::time::sleep(Duration::from_secs(5)).await;
    say(&format!(
        "cellplane switchover {} (planned: freeze, fence, catch up, promote, flip)",
        cells[0]
    ));
    let mut marks = vec![("switchover asked", now_ms())];
    let (ok, text) = platform.cellplane(&["switchover", &cells[0]]).await?;
    marks.push(("switchover done", now_ms()));
    println!("{text}");
    anyhow::ensure!(ok, "the switchover failed");
    tokio::time::sleep(Duration::from_secs(5)).await;
    say(&format!("cellplane failback {}", cells[0]));
    platform.wait_replicating(&cells[0], &cells[1]).await?;
    marks.push(("failback asked", now_ms()));
    let (ok, text) = platform.cellplane(&["failback", &cells[0]]).await?;
    marks.push(("failback done", now_ms()));
    println!("{text}");
    anyhow::ensure!(ok, "the failback failed");
    tokio::time::sleep(Duration::from_secs(5)).await;
    let answers = load.stop().await?;

    say("what the clients saw");
    let mut statuses = BTreeMap::<u16, usize>::new();
    let mut served_by = BTreeMap::<String, usize>::new();
    for a in &answers {
        *statuses.entry(a.status).or_default() += 1;
        *served_by.entry(a.served_by.clone()).or_default() += 1;
    }
    println!(
        "  {} requests; by status {statuses:?}; by cell {served_by:?}",
        answers.len()
    );
    let first_ms = answers.iter().map(|a| a.sent_ms).min().unwrap_or_default();
    for a in answers.iter().filter(|a| a.status >= 300).take(5) {
        println!(
            "  e.g. {} at +{} ms ({} ms): {}",
            a.status,
            a.sent_ms - first_ms,
            a.latency_ms,
            a.body.trim()
        );
    }
    for (what, ms) in &marks {
        println!("  {what} at +{} ms", ms.saturating_sub(first_ms));
    }
    let accepted: Vec<_> = answers
        .iter()
        .filter(|a| a.status == 202)
        .filter_map(|a| Some((a.user.clone(), a.order.clone()?)))
        .collect();
    for (user, order) in &accepted {
        let path = format!("/users/{user}/orders/{order}");
        wait_for(
            &format!("order {order} persisted"),
            Duration::from_secs(60),
            || async {
                let r = as_user(&router, "GET", &path, user, "").await?;
                Ok((r.status == 200 && r.body.contains("persisted")).then_some(()))
            },
        )
        .await?;
    }
    println!(
        "  every one of the {} orders that got 202 is persisted in its data home",
        accepted.len()
    );
    say(&format!(
        "done in {:.0?} (from nothing to two regions of real pods, a switchover and a failback)",
        started.elapsed()
    ));
    Ok(())
}
