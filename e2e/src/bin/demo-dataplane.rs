//! The data-plane half of `make demo`: the cells a CellSet stamps out, each running the
//! reference app on its own real Redis, MariaDB and Kafka; the router in front on a static
//! routing table with the same placement the control plane computes; a short load through
//! the router; a summary that shows every user pinned to one cell.
//!
//!   demo-dataplane CELLSET.yaml [--users N] [--keep]

use anyhow::{bail, Context as _, Result};
use cellplane_cells::crd::CellSet;
use cellplane_cells::routing::{CellEntry, RoutingTable};
use cellplane_e2e::cell::{CellApp, CellStores};
use cellplane_e2e::net::{send, RouterProc};
use cellplane_e2e::wait_for;
use mysql_async::prelude::Queryable;
use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

const STOCK_PER_CELL: i64 = 50;

fn say(msg: &str) {
    println!("\n\x1b[1m== {msg}\x1b[0m");
}

#[derive(Default)]
struct Seen {
    cells: BTreeMap<String, BTreeSet<String>>,
    statuses: BTreeMap<(String, u16), u64>,
    orders_accepted: BTreeMap<String, u64>,
    orders_sold_out: BTreeMap<String, u64>,
}

#[tokio::main]
async fn main() -> Result<()> {
    let mut args = std::env::args().skip(1);
    let path = args
        .next()
        .context("usage: demo-dataplane CELLSET.yaml [--users N] [--keep]")?;
    let rest: Vec<String> = args.collect();
    let users: usize = rest
        .iter()
        .position(|a| a == "--users")
        .and_then(|i| rest.get(i + 1))
        .map(|n| n.parse())
        .transpose()?
        .unwrap_or(400);
    let keep = rest.iter().any(|a| a == "--keep");
    let set: CellSet = serde_yaml::from_str(&std::fs::read_to_string(&path)?)
        .with_context(|| format!("{path} is not a CellSet"))?;
    let set_name = set.metadata.name.clone().unwrap_or_else(|| "shop".into());
    let stamped = set.spec.stamp(&set_name);

    say(&format!(
        "stores for {} cells: Redis, MariaDB (own mariadbd), Kafka KRaft, each on its own ports",
        stamped.len()
    ));
    let started = Instant::now();
    let mut handles = Vec::new();
    for cell in &stamped {
        let name = cell.name.clone();
        handles.push(std::thread::spawn(move || CellStores::up(&name)));
    }
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

    say("the reference app in every cell");
    let dir = std::env::temp_dir().join(format!("cellplane-demo-dataplane-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let table_file = dir.join("table.json");
    let mut apps = Vec::new();
    for s in &stores {
        apps.push(CellApp::start(s, &table_file, &[]).await?);
    }
    let entries = stamped
        .iter()
        .zip(&apps)
        .map(|(cell, app)| {
            let mut e = CellEntry::active(&cell.name, &cell.spec.region, vec![app.addr.clone()]);
            e.standby = cell.spec.standby.as_ref().map(|s| s.cell.clone());
            (e, cell.spec.capacity_weight)
        })
        .collect();
    let table = RoutingTable::placed(&set.spec.platform, 1, 16384, entries)?;
    std::fs::write(&table_file, table.encode())?;
    for (app, cell) in apps.iter().zip(&stamped) {
        wait_for(
            &format!("{} ready", cell.name),
            Duration::from_secs(60),
            || async { Ok((app.get("/readyz").await?.status == 200).then_some(())) },
        )
        .await?;
        app.set_stock("flash-1", STOCK_PER_CELL).await?;
        println!(
            "  {:<18} {} ready, {} slots, flash sale open with {STOCK_PER_CELL} units",
            cell.name,
            app.addr,
            table.slot_count(&cell.name)
        );
    }

    say("the router in front (static table, same placement as the control plane)");
    let router = RouterProc::start(
        &format!("table: {{file: {}}}\n", table_file.display()),
        &dir,
    )
    .await?;
    println!(
        "  router on {} (metrics on {})",
        router.addr, router.metrics_addr
    );

    say(&format!(
        "load: {users} users, each: update profile, read it 3 times, buy one flash-sale unit"
    ));
    let seen = Arc::new(parking_lot::Mutex::new(Seen::default()));
    let gate = Arc::new(tokio::sync::Semaphore::new(32));
    let started = Instant::now();
    let mut tasks = tokio::task::JoinSet::new();
    for i in 0..users {
        let (seen, gate, addr) = (seen.clone(), gate.clone(), router.addr.clone());
        tasks.spawn(async move {
            let _permit = gate.acquire().await?;
            let user = format!("user-{i:04}");
            let calls: Vec<(&str, String, String)> = vec![
                (
                    "PUT",
                    format!("/users/{user}/profile"),
                    format!(r#"{{"name":"{user}","email":"{user}@example.com"}}"#),
                ),
                ("GET", format!("/users/{user}/profile"), String::new()),
                ("GET", format!("/users/{user}/profile"), String::new()),
                ("GET", format!("/users/{user}/profile"), String::new()),
                (
                    "POST",
                    format!("/users/{user}/orders"),
                    r#"{"sku":"flash-1"}"#.into(),
                ),
            ];
            for (method, path, body) in calls {
                let r = send(
                    method,
                    &format!("http://{addr}{path}"),
                    &[("x-user-id", &user), ("content-type", "application/json")],
                    body.into(),
                )
                .await?;
                let cell = r
                    .headers
                    .get("x-cellplane-served-by")
                    .and_then(|v| v.to_str().ok())
                    .unwrap_or("router")
                    .to_string();
                let mut s = seen.lock();
                s.cells
                    .entry(user.clone())
                    .or_default()
                    .insert(cell.clone());
                *s.statuses.entry((cell.clone(), r.status)).or_default() += 1;
                if method == "POST" {
                    match r.status {
                        202 => *s.orders_accepted.entry(cell).or_default() += 1,
                        409 => *s.orders_sold_out.entry(cell).or_default() += 1,
                        _ => {}
                    }
                }
            }
            Ok::<_, anyhow::Error>(())
        });
    }
    while let Some(r) = tasks.join_next().await {
        r??;
    }
    let elapsed = started.elapsed();
    let seen = Arc::try_unwrap(seen).ok().expect("tasks done").into_inner();
    println!("  {} requests in {:.1}s", users * 5, elapsed.as_secs_f64());

    say("orders persisted (Kafka -> MySQL, exactly once per order)");
    for (s, cell) in stores.iter().zip(&stamped) {
        let accepted = seen.orders_accepted.get(&cell.name).copied().unwrap_or(0);
        let pool = s.mysql_admin()?;
        let persisted = wait_for(
            &format!("{} orders persisted", cell.name),
            Duration::from_secs(60),
            || async {
                let n: Option<u64> = pool
                    .get_conn()
                    .await?
                    .query_first("SELECT COUNT(*) FROM orders")
                    .await?;
                Ok(n.filter(|n| *n >= accepted))
            },
        )
        .await?;
        println!(
            "  {:<18} accepted {accepted:>3}  persisted {persisted:>3}",
            cell.name
        );
    }

    say("summary");
    println!(
        "  {:<18} {:<8} {:<18} {:>6} {:>6} {:>9} {:>8} {:>8} {:>11}",
        "cell", "region", "standby", "slots", "users", "requests", "sold", "soldout", "cache hits"
    );
    for (app, cell) in apps.iter().zip(&stamped) {
        let users_here = seen
            .cells
            .values()
            .filter(|c| c.len() == 1 && c.contains(&cell.name))
            .count();
        let requests: u64 = seen
            .statuses
            .iter()
            .filter(|((c, _), _)| *c == cell.name)
            .map(|(_, n)| n)
            .sum();
        let mut hits = 0.0;
        for source in ["local", "cache"] {
            hits += app
                .metric(&format!(
                    "cellplane_app_profile_reads_total{{source=\"{source}\"}}"
                ))
                .await?;
        }
        println!(
            "  {:<18} {:<8} {:<18} {:>6} {:>6} {:>9} {:>8} {:>8} {:>11}",
            cell.name,
            cell.spec.region,
            cell.spec
                .standby
                .as_ref()
                .map(|s| s.cell.as_str())
                .unwrap_or("-"),
            table.slot_count(&cell.name),
            users_here,
            requests,
            seen.orders_accepted.get(&cell.name).copied().unwrap_or(0),
            seen.orders_sold_out.get(&cell.name).copied().unwrap_or(0),
            hits
        );
    }
    let split: Vec<_> = seen.cells.iter().filter(|(_, c)| c.len() != 1).collect();
    let misplaced: Vec<_> = seen
        .cells
        .iter()
        .filter(|(u, c)| {
            c.iter().next().map(String::as_str) != Some(table.route(u).1.name.as_str())
        })
        .collect();
    let not_ok: u64 = seen
        .statuses
        .iter()
        .filter(|((_, st), _)| !matches!(st, 200 | 202 | 409))
        .map(|(_, n)| n)
        .sum();
    println!("\n  users served by more than one cell: {}", split.len());
    println!(
        "  users served by a cell other than their slot's home: {}",
        misplaced.len()
    );
    println!("  answers other than 200/202/409: {not_ok}");
    if !split.is_empty() || !misplaced.is_empty() || not_ok > 0 {
        bail!(
            "pinning broken: split {split:?} misplaced {misplaced:?} statuses {:?}",
            seen.statuses
        );
    }
    println!("  every user was pinned to exactly one cell, its slot's home.");

    if keep {
        println!(
            "\nStill running (Ctrl-C stops it all). Router: http://{}. Try one:",
            router.addr
        );
        println!("    curl -s -H 'x-user-id: user-0001' http://{}/users/user-0001/profile -D - | grep -i x-cellplane", router.addr);
        tokio::signal::ctrl_c().await?;
    } else {
        // Everything stops with this process: only suggest what will still answer.
        println!("  To try requests yourself, run it with KEEP=1 (make demo), then curl the router it prints.");
    }
    drop(router);
    drop(apps);
    drop(stores);
    let _ = std::fs::remove_dir_all(&dir);
    Ok(())
}
