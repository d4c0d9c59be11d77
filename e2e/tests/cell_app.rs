//! The reference cell app on its cell's real Redis, MariaDB and Kafka (started by
//! `e2e/bin/stores`): cache-aside without stale reads, a flash sale that sells exactly its
//! stock, orders that survive crashes and redeliveries once, the ownership fence, and the
//! documented behaviour with each store killed in turn.

use cellplane_cells::routing::{CellEntry, RoutingTable};
use cellplane_e2e::cell::{CellApp, CellStores};
use cellplane_e2e::wait_for;
use mysql_async::prelude::Queryable;
use parking_lot::Mutex;
use serde_json::{json, Value};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

const T: Duration = Duration::from_secs(60);

fn table_file(dir: &Path, t: &RoutingTable) -> PathBuf {
    let file = dir.join("table.json");
    std::fs::write(&file, t.encode()).unwrap();
    file
}

/// A table of the given cells (equal weights); each stands by for the next.
fn table(epoch: u64, cells: &[&str]) -> RoutingTable {
    let entries = cells
        .iter()
        .enumerate()
        .map(|(i, c)| {
            let standby = cells[(i + 1) % cells.len()];
            let mut e = CellEntry::active(c, &format!("r{i}"), vec!["127.0.0.1:1".into()]);
            e.standby = (standby != *c).then(|| standby.to_string());
            (e, 1)
        })
        .collect();
    RoutingTable::placed("shop", epoch, 16384, entries).unwrap()
}

/// `t` with real endpoints for the named cells (what a router dials).
fn with_endpoints(t: &RoutingTable, endpoints: &[(&str, &str)]) -> RoutingTable {
    let mut t = t.clone();
    for c in &mut t.cells {
        if let Some((_, addr)) = endpoints.iter().find(|(name, _)| *name == c.name) {
            c.endpoints = vec![addr.to_string()];
        }
    }
    t.validate().expect("still a valid table");
    t
}

/// Stores + app of a cell that owns every slot.
async fn lone_cell(name: &str) -> anyhow::Result<(CellStores, CellApp)> {
    let stores = CellStores::up(name)?;
    let file = table_file(&stores.dir, &table(1, &[name]));
    let app = CellApp::start(&stores, &file, &[]).await?;
    Ok((stores, app))
}

fn body(r: &cellplane_e2e::net::Reply) -> Value {
    serde_json::from_str(&r.body).unwrap_or(Value::Null)
}

async fn orders_in_mysql(stores: &CellStores) -> anyhow::Result<u64> {
    let pool = stores.mysql_admin()?;
    let mut c = pool.get_conn().await?;
    let n: Option<u64> = c.query_first("SELECT COUNT(*) FROM orders").await?;
    Ok(n.unwrap_or(0))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn cache_aside_never_serves_a_stale_profile_to_a_read_that_starts_after_the_update(
) -> anyhow::Result<()> {
    let (_stores, app) = lone_cell("cache-aside").await?;
    let app = Arc::new(app);
    let put = |i: u32| {
        let app = app.clone();
        async move {
            let r = app
                .send_json(
                    "PUT",
                    "/users/alice/profile",
                    json!({"name": format!("v{i}"), "email": "a@example.com"}),
                )
                .await?;
            anyhow::ensure!(r.status == 200, "PUT: {} {}", r.status, r.body);
            Ok::<u64, anyhow::Error>(body(&r)["version"].as_u64().unwrap())
        }
    };
    put(1).await?;

    // Readers hammer the key (it becomes hot, so the in-process cache is in play too)
    // while updates land; every read records when it started and what it saw.
    let stop = Arc::new(AtomicBool::new(false));
    let reads = Arc::new(Mutex::new(Vec::<(Instant, u64)>::new()));
    let mut readers = tokio::task::JoinSet::new();
    for _ in 0..8 {
        let (app, stop, reads) = (app.clone(), stop.clone(), reads.clone());
        readers.spawn(async move {
            while !stop.load(Ordering::Relaxed) {
                let started = Instant::now();
                let r = app.get("/users/alice/profile").await.unwrap();
                assert_eq!(r.status, 200, "{}", r.body);
                let v = body(&r)["version"].as_u64().unwrap();
                reads.lock().push((started, v));
            }
        });
    }
    let mut updates = Vec::new();
    for i in 2..=40 {
        let version = put(i).await?;
        let done = Instant::now();
        let r = app.get("/users/alice/profile").await?;
        assert_eq!(
            body(&r)["version"].as_u64(),
            Some(version),
            "read right after update {i}: {}",
            r.body
        );
        assert_eq!(body(&r)["name"], format!("v{i}"));
        updates.push((done, version));
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    stop.store(true, Ordering::Relaxed);
    while let Some(r) = readers.join_next().await {
        r?;
    }
    let reads = std::mem::take(&mut *reads.lock());
    let mut stale = 0;
    for (done, version) in &updates {
        stale += reads
            .iter()
            .filter(|(s, v)| s > done && v < version)
            .count();
    }
    assert_eq!(
        stale, 0,
        "reads that started after an update saw an older version"
    );
    assert!(reads.len() > 200, "readers ran: {}", reads.len());
    // The caches were actually used, not bypassed.
    for source in ["local", "cache", "db"] {
        let n = app
            .metric(&format!(
                "cellplane_app_profile_reads_total{{source=\"{source}\"}}"
            ))
            .await?;
        assert!(n > 0.0, "no reads answered from {source}");
    }
    let r = app.get("/users/nobody/profile").await?;
    assert_eq!(r.status, 404);

    // A burst of misses for different users is read in batches: fewer MySQL queries than
    // reads, and every user still gets its own profile (or 404 when it has none).
    let burst: Vec<String> = (0..64).map(|i| format!("burst{i}")).collect();
    for u in burst.iter().step_by(2) {
        let r = app
            .send_json(
                "PUT",
                &format!("/users/{u}/profile"),
                json!({"name": u, "email": format!("{u}@example.com")}),
            )
            .await?;
        anyhow::ensure!(r.status == 200, "PUT {u}: {}", r.body);
    }
    let queries = || app.metric("cellplane_app_profile_db_queries_total");
    let queries_before = queries().await?;
    let paths: Vec<String> = burst
        .iter()
        .map(|u| format!("/users/{u}/profile"))
        .collect();
    let reads = futures::future::join_all(paths.iter().map(|p| app.get(p))).await;
    for (i, (u, r)) in burst.iter().zip(reads).enumerate() {
        let r = r?;
        if i % 2 == 0 {
            assert_eq!(
                (r.status, body(&r)["name"].as_str()),
                (200, Some(u.as_str())),
                "{}",
                r.body
            );
        } else {
            assert_eq!(r.status, 404, "{u} has no profile: {}", r.body);
        }
    }
    let made = queries().await? - queries_before;
    assert!(
        (1.0..64.0).contains(&made),
        "64 concurrent misses took {made} MySQL queries"
    );
    println!("64 concurrent misses: {made} MySQL queries");

    let r = app
        .send_json(
            "PUT",
            "/users/alice/profile",
            json!({"name": "", "email": "x"}),
        )
        .await?;
    assert_eq!(r.status, 400);
    assert!(r.body.contains("name"), "{}", r.body);
    Ok(())
}

async fn order(
    app: &CellApp,
    user: &str,
    sku: &str,
    id: Option<&str>,
) -> anyhow::Result<cellplane_e2e::net::Reply> {
    let mut b = json!({ "sku": sku });
    if let Some(id) = id {
        b["orderId"] = json!(id);
    }
    app.send_json("POST", &format!("/users/{user}/orders"), b)
        .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn flash_sale_sells_exactly_its_stock_and_orders_persist_once_through_crashes(
) -> anyhow::Result<()> {
    let (stores, app) = lone_cell("flash-sale").await?;
    app.set_stock("drop-1", 100).await?;
    let shared = Arc::new(app);
    let mut set = tokio::task::JoinSet::new();
    for i in 0..1000 {
        let app = shared.clone();
        set.spawn(async move {
            order(&app, &format!("u{i}"), "drop-1", None)
                .await
                .map(|r| r.status)
        });
    }
    let (mut accepted, mut sold_out, mut other) = (0, 0, Vec::new());
    while let Some(r) = set.join_next().await {
        match r?? {
            202 => accepted += 1,
            409 => sold_out += 1,
            s => other.push(s),
        }
    }
    assert_eq!(
        (accepted, sold_out),
        (100, 900),
        "unexpected answers: {other:?}"
    );
    assert_eq!(shared.stock("drop-1").await?, Some(0));
    wait_for("100 orders in MySQL", T, || async {
        Ok((orders_in_mysql(&stores).await? == 100).then_some(()))
    })
    .await?;
    let mut app = Arc::into_inner(shared).expect("no other handle");

    // Orders accepted just before a crash are persisted after the restart.
    app.set_stock("drop-2", 20).await?;
    for i in 0..20 {
        let r = order(
            &app,
            &format!("late{i}"),
            "drop-2",
            Some(&format!("late-{i}")),
        )
        .await?;
        assert_eq!(r.status, 202, "{}", r.body);
    }
    app.restart(&[]).await?;
    wait_for("120 orders in MySQL after the crash", T, || async {
        Ok((orders_in_mysql(&stores).await? == 120).then_some(()))
    })
    .await?;
    // A client retrying with the same order id is not sold twice.
    let r = order(&app, "late0", "drop-2", Some("late-0")).await?;
    assert_eq!(
        (r.status, body(&r)["status"].as_str()),
        (200, Some("persisted")),
        "{}",
        r.body
    );
    assert_eq!(app.stock("drop-2").await?, Some(0));

    // Kafka redelivers every order to a new consumer group: no duplicate rows.
    app.restart(&[("CELL_ORDERS_GROUP", "replay")]).await?;
    wait_for("every order redelivered", T, || async {
        Ok((app.metric("cellplane_app_orders_duplicates_total").await? >= 120.0).then_some(()))
    })
    .await?;
    assert_eq!(orders_in_mysql(&stores).await?, 120);
    // A log that is there already is persisted a fetched batch per transaction, not one
    // order per transaction (one per order could not keep up with a cell serving two).
    let transactions = app
        .metric("cellplane_app_orders_persist_transactions_total")
        .await?;
    assert!(
        (1.0..=30.0).contains(&transactions),
        "120 redelivered orders took {transactions} transactions"
    );
    let status = body(&app.get("/status").await?);
    assert_eq!(status["orders"]["lag"].as_i64(), Some(0), "{status}");
    assert_eq!(status["orders"]["high"].as_i64(), Some(120), "{status}");
    // Order status is per user.
    let r = app.get("/users/late3/orders/late-3").await?;
    assert_eq!(body(&r)["status"], "persisted");
    assert_eq!(
        app.get("/users/someone-else/orders/late-3").await?.status,
        404
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_fence_answers_421_for_foreign_slots_and_for_a_frozen_cell() -> anyhow::Result<()> {
    let stores = CellStores::up("fence-a")?;
    let t1 = table(1, &["fence-a", "fence-b"]);
    let file = table_file(&stores.dir, &t1);
    let app = CellApp::start(&stores, &file, &[]).await?;
    let user_of = |t: &RoutingTable, cell: &str| {
        (0..)
            .map(|i| format!("user{i}"))
            .find(|u| t.route(u).1.name == cell)
            .unwrap()
    };
    let (mine, theirs) = (user_of(&t1, "fence-a"), user_of(&t1, "fence-b"));
    wait_for("app ready", T, || async {
        Ok((app.get("/readyz").await?.status == 200).then_some(()))
    })
    .await?;

    assert_eq!(
        app.get(&format!("/users/{mine}/profile")).await?.status,
        404,
        "own user served (no profile yet)"
    );
    let r = app.get(&format!("/users/{theirs}/profile")).await?;
    assert_eq!(r.status, 421, "{}", r.body);
    assert_eq!(r.headers["x-cellplane-owner"], "fence-b");
    let r = order(&app, &theirs, "x", None).await?;
    assert_eq!(r.status, 421, "writes are fenced too");
    // A router that has seen a newer epoch than the cell: the cell cannot vouch, 503.
    let r = cellplane_e2e::net::get(
        &app.url(&format!("/users/{mine}/profile")),
        &[("x-cellplane-epoch", "2")],
    )
    .await?;
    assert_eq!(r.status, 503, "{}", r.body);

    // The real app behind a real router (same epoch): the user reaches its home cell.
    // The router only re-reads its table when a cell answers 421 (no polling here).
    let other = cellplane_e2e::net::Backend::start("fence-b").await?;
    let endpoints = [
        ("fence-a", app.addr.as_str()),
        ("fence-b", other.addr.as_str()),
    ];
    let dir = cellplane_e2e::test_dir("fence-router");
    let (router, router_file) = cellplane_e2e::net::RouterProc::start_on_file(
        &with_endpoints(&t1, &endpoints),
        ", pollMs: 600000",
        "healthCheck: {path: /readyz}\n",
        &dir,
    )
    .await?;
    let profile_via_router = || {
        let url = format!("http://{}/users/{mine}/profile", router.addr);
        let mine = mine.clone();
        async move { cellplane_e2e::net::get(&url, &[("x-user-id", &mine)]).await }
    };
    let r = profile_via_router().await?;
    assert_eq!(r.status, 404, "no profile yet: {}", r.body);
    assert_eq!(r.headers["x-cellplane-cell"], "fence-a");
    assert_eq!(
        r.headers["x-cellplane-served-by"], "fence-a",
        "the real app answered"
    );

    // The cell is frozen for a failover: it serves none of its users.
    let frozen = t1.frozen("fence-a")?;
    std::fs::write(&file, frozen.encode())?;
    wait_for("frozen table applied", T, || async {
        Ok((app.get(&format!("/users/{mine}/profile")).await?.status == 421).then_some(()))
    })
    .await?;
    // Health endpoints are not user data: never fenced.
    assert_eq!(app.get("/livez").await?.status, 200);
    // Requests are counted by route pattern (not raw path) and status class.
    let fenced = app
        .metric(r#"cellplane_app_requests_total{route="/users/{user}/profile",method="GET",class="4xx"}"#)
        .await?;
    assert!(fenced >= 2.0, "421s counted: {fenced}");

    // The whole fence path: the slots moved to fence-b (epoch 3) while the router still
    // routes by epoch 1. The app answers the router's request with 421, the router re-reads
    // its table once and sends the request to the new home; the old home wrote nothing.
    std::fs::write(
        &router_file,
        with_endpoints(&frozen.failed_over("fence-a")?, &endpoints).encode(),
    )?;
    let r = profile_via_router().await?;
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(r.headers["x-cellplane-cell"], "fence-b");
    assert_eq!(r.backend(), Some("fence-b"));
    let misdirected = router
        .metric(r#"cellplane_router_retries_total{reason="misdirected"}"#)
        .await?;
    assert_eq!(misdirected, 1.0, "one 421, one refresh, one retry");
    assert_eq!(router.metric("cellplane_router_table_epoch").await?, 3.0);
    Ok(())
}

/// The profiles read `(version, source)` by the app for `user`.
async fn profile_read(app: &CellApp, user: &str) -> anyhow::Result<(u64, String, String)> {
    let r = app.get(&format!("/users/{user}/profile")).await?;
    anyhow::ensure!(r.status == 200, "{user}: {} {}", r.status, r.body);
    let b = body(&r);
    Ok((
        b["version"].as_u64().unwrap_or(0),
        b["email"].as_str().unwrap_or_default().to_string(),
        b["source"].as_str().unwrap_or_default().to_string(),
    ))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_announced_flip_lands_on_a_warm_cache_that_missed_no_late_write() -> anyhow::Result<()> {
    // land-b stands by for land-a: its MySQL holds land-a's schema (here written directly,
    // as replication would).
    let stores = CellStores::up("land-b")?;
    let t1 = table(1, &["land-a", "land-b"]);
    let file = table_file(&stores.dir, &t1);
    let app = CellApp::start(&stores, &file, &[]).await?;
    wait_for("app ready", T, || async {
        Ok((app.get("/readyz").await?.status == 200).then_some(()))
    })
    .await?;
    let schema = cellplane_cells::env::mysql_database("land-a");
    let own = stores.var("MYSQL_DATABASE").to_string();
    let admin = stores.mysql_admin()?;
    let mut db = admin.get_conn().await?;
    db.query_drop(format!("CREATE DATABASE `{schema}`")).await?;
    db.query_drop(format!(
        "CREATE TABLE `{schema}`.profiles LIKE `{own}`.profiles"
    ))
    .await?;
    db.query_drop(format!(
        "GRANT SELECT, INSERT, UPDATE, DELETE ON `{schema}`.* TO 'app'@'127.0.0.1'"
    ))
    .await?;
    let users: Vec<String> = (0..)
        .map(|i| format!("lander{i}"))
        .filter(|u| t1.route(u).1.name == "land-a")
        .take(20)
        .collect();
    for u in &users {
        db.exec_drop(
            format!("INSERT INTO `{schema}`.profiles (user_id, name, email, version) VALUES (?, ?, ?, 1)"),
            (u, u, format!("{u}@example.com")),
        )
        .await?;
    }
    let prewarmed = || app.metric("cellplane_app_landing_cache_prewarmed_total");

    // A freeze of land-a announces the move: land-b warms land-a's profiles at once.
    let frozen = t1.frozen("land-a")?;
    std::fs::write(&file, frozen.encode())?;
    wait_for("the first pre-landing", T, || async {
        Ok((prewarmed().await? >= 20.0).then_some(()))
    })
    .await?;
    // Called off (the operation rolled back): the pre-landing is forgotten, so the next
    // freeze warms again.
    let mut lifted = frozen.clone();
    lifted.epoch += 1;
    lifted.cells.iter_mut().for_each(|c| c.frozen = false);
    std::fs::write(&file, lifted.encode())?;
    wait_for("the lifted freeze applied", T, || async {
        Ok((app.metric("cellplane_app_table_epoch").await? == 3.0).then_some(()))
    })
    .await?;
    let frozen = lifted.frozen("land-a")?;
    std::fs::write(&file, frozen.encode())?;
    wait_for("the second pre-landing", T, || async {
        Ok((prewarmed().await? >= 40.0).then_some(()))
    })
    .await?;

    // The old home's last write arrives after the warm-up (and before the flip, which the
    // leader writes only once this MySQL has the old home's final position).
    let late = &users[0];
    db.exec_drop(
        format!("UPDATE `{schema}`.profiles SET email = ?, version = 2 WHERE user_id = ?"),
        (format!("late-{late}@example.com"), late),
    )
    .await?;
    let mut flip = frozen.failed_over("land-a")?;
    flip.cells.iter_mut().for_each(|c| c.frozen = false);
    std::fs::write(&file, flip.encode())?;
    wait_for("the flip landed", T, || async {
        let refreshed = app
            .metric("cellplane_app_landing_cache_refreshed_total")
            .await?;
        let epoch = app.metric("cellplane_app_table_epoch").await?;
        Ok((epoch == flip.epoch as f64 && refreshed >= 1.0).then_some(refreshed))
    })
    .await
    .map(|refreshed| assert_eq!(refreshed, 1.0, "only the late write changed"))?;

    // Every user lands on a warm cache: no read goes to MySQL, and the late write is seen.
    assert_eq!(
        profile_read(&app, late).await?,
        (2, format!("late-{late}@example.com"), "cache".to_string())
    );
    for u in &users[1..] {
        assert_eq!(
            profile_read(&app, u).await?,
            (1, format!("{u}@example.com"), "cache".to_string())
        );
    }
    let db_reads = app
        .metric(r#"cellplane_app_profile_reads_total{source="db"}"#)
        .await?;
    assert_eq!(db_reads, 0.0, "a cold read after the flip");
    assert_eq!(
        app.metric("cellplane_app_landing_cache_warmed_total")
            .await?,
        0.0,
        "nothing left to warm after the flip"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_standby_replica_catches_up_reports_lag_and_is_promoted_after_the_primary_is_fenced(
) -> anyhow::Result<()> {
    use cellplane_cell_sdk::replication::{self, ReplicationSource};
    let home = CellStores::up("repl-home")?;
    let standby = CellStores::up("repl-standby")?;
    let (home_admin, standby_admin) = (home.mysql_admin()?, standby.mysql_admin()?);
    let source = ReplicationSource {
        host: "127.0.0.1".into(),
        port: home.var("MYSQL_PORT").parse()?,
        user: home.var("MYSQL_REPL_USER").into(),
        password: home.var("MYSQL_REPL_PASSWORD").into(),
    };
    replication::start_replica(&standby_admin, "repl-home", &source).await?;
    wait_for("replication threads running", T, || async {
        let s = replication::replica_status(&standby_admin, "repl-home").await?;
        Ok(s.filter(|s| s.io_running && s.sql_running).map(|_| ()))
    })
    .await?;

    // A burst of writes by the home cell's app account, from 8 connections at once.
    let app_pool = home.mysql_app()?;
    app_pool
        .get_conn()
        .await?
        .query_drop("CREATE TABLE burst (id INT PRIMARY KEY, v VARCHAR(64))")
        .await?;
    // Lag is measured exactly: with the standby's SQL thread stopped, 10 commits on the
    // home are 10 transactions behind, then none once it applies them.
    let primary = replication::position(&home_admin).await?;
    assert!(replication::wait_caught_up(&standby_admin, &primary.gtid_binlog_pos, T).await?);
    standby_admin
        .get_conn()
        .await?
        .query_drop("STOP SLAVE 'repl-home' SQL_THREAD")
        .await?;
    for i in 0..10 {
        app_pool
            .get_conn()
            .await?
            .exec_drop("INSERT INTO burst VALUES (?, 'held')", (100_000 + i,))
            .await?;
    }
    let primary = replication::position(&home_admin).await?;
    let s = replication::replica_status(&standby_admin, "repl-home")
        .await?
        .expect("connection exists");
    assert_eq!(
        replication::gtid_lag(&primary.gtid_binlog_pos, &s.gtid_slave_pos),
        10,
        "10 commits not applied: {s:?}"
    );
    standby_admin
        .get_conn()
        .await?
        .query_drop("START SLAVE 'repl-home' SQL_THREAD")
        .await?;
    assert!(replication::wait_caught_up(&standby_admin, &primary.gtid_binlog_pos, T).await?);

    let started = Instant::now();
    let mut writers = tokio::task::JoinSet::new();
    for w in 0..8 {
        let pool = app_pool.clone();
        writers.spawn(async move {
            let mut c = pool.get_conn().await?;
            for i in 0..250 {
                c.exec_drop("INSERT INTO burst VALUES (?, ?)", (w * 1000 + i, "x"))
                    .await?;
            }
            Ok::<_, mysql_async::Error>(())
        });
    }
    let mut max_lag = 0;
    while !writers.is_empty() {
        let primary = replication::position(&home_admin).await?;
        if let Some(s) = replication::replica_status(&standby_admin, "repl-home").await? {
            max_lag = max_lag.max(replication::gtid_lag(
                &primary.gtid_binlog_pos,
                &s.gtid_slave_pos,
            ));
        }
        if let Some(r) = writers.try_join_next() {
            r??;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let primary = replication::position(&home_admin).await?;
    assert!(replication::wait_caught_up(&standby_admin, &primary.gtid_binlog_pos, T).await?);
    let caught_up = started.elapsed();
    // Seconds_Behind_Master is computed from the last applied event's timestamp and may
    // still say 1 for a moment after the last GTID is applied; it must reach 0 while idle.
    let settle = Instant::now() + Duration::from_secs(10);
    let s = loop {
        let s = replication::replica_status(&standby_admin, "repl-home")
            .await?
            .expect("connection exists");
        if s.seconds_behind == Some(0) || Instant::now() > settle {
            break s;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert_eq!(
        replication::gtid_lag(&primary.gtid_binlog_pos, &s.gtid_slave_pos),
        0,
        "{s:?}"
    );
    assert_eq!(s.seconds_behind, Some(0), "{s:?}");
    let replicated: Option<u64> = standby_admin
        .get_conn()
        .await?
        .query_first("SELECT COUNT(*) FROM cell_repl_home.burst")
        .await?;
    assert_eq!(
        replicated,
        Some(2010),
        "the 10 held rows and the burst of 2000"
    );
    eprintln!("replication: 2000 writes caught up {caught_up:?} after the burst began; max lag seen {max_lag} transactions");

    // Failover order: fence the old primary, wait for its final position, promote.
    let fenced = replication::demote(&home_admin).await?;
    assert!(fenced.read_only);
    let err = app_pool
        .get_conn()
        .await?
        .query_drop("INSERT INTO burst VALUES (99999, 'after fence')")
        .await
        .expect_err("the fenced primary refuses the app's writes");
    assert!(
        matches!(&err, mysql_async::Error::Server(e) if e.code == 1290),
        "{err}"
    );
    // A replica that cannot reach a position is not promoted.
    let unreachable = format!("{}0", fenced.gtid_binlog_pos);
    let refused = replication::promote(
        &standby_admin,
        "repl-home",
        &unreachable,
        Duration::from_secs(1),
    )
    .await;
    assert!(refused.is_err(), "promoted a replica that is behind");
    replication::promote(&standby_admin, "repl-home", &fenced.gtid_binlog_pos, T).await?;
    assert_eq!(
        replication::replica_status(&standby_admin, "repl-home").await?,
        None
    );
    assert!(!replication::position(&standby_admin).await?.read_only);
    standby_admin
        .get_conn()
        .await?
        .query_drop("INSERT INTO cell_repl_home.burst VALUES (99999, 'on the new primary')")
        .await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn each_store_killed_in_turn_degrades_as_documented_and_loses_nothing_accepted(
) -> anyhow::Result<()> {
    let (stores, app) = lone_cell("degrade").await?;
    app.set_stock("sku-d", 1000).await?;
    for user in ["warm", "cold"] {
        let r = app
            .send_json(
                "PUT",
                &format!("/users/{user}/profile"),
                json!({"name": user, "email": "u@example.com"}),
            )
            .await?;
        assert_eq!(r.status, 200, "{}", r.body);
    }
    let mut accepted: Vec<String> = Vec::new();
    let n = std::sync::atomic::AtomicU32::new(0);
    // Each order gets a fresh id; the id and the answer come back.
    let place = |app: &CellApp| {
        let id = format!("ord-{}", n.fetch_add(1, Ordering::Relaxed));
        let (app_url, id2) = (app.url(""), id.clone());
        async move {
            let r = cellplane_e2e::net::send(
                "POST",
                &format!("{app_url}/users/buyer/orders"),
                &[("content-type", "application/json")],
                json!({"sku": "sku-d", "orderId": id2}).to_string().into(),
            )
            .await?;
            Ok::<_, anyhow::Error>((id, r))
        }
    };

    // Redis down: reads fall back to MySQL; updates and orders pause.
    stores.kill("redis")?;
    let r = app.get("/users/warm/profile").await?;
    assert_eq!(
        (r.status, body(&r)["source"].as_str()),
        (200, Some("db-degraded")),
        "{}",
        r.body
    );
    let r = app
        .send_json(
            "PUT",
            "/users/warm/profile",
            json!({"name": "x", "email": "x@example.com"}),
        )
        .await?;
    assert_eq!(r.status, 503, "{}", r.body);
    assert!(r.headers.contains_key("retry-after"));
    let (_, r) = place(&app).await?;
    assert_eq!(r.status, 503, "{}", r.body);
    let r = app.get("/readyz").await?;
    assert_eq!(r.status, 503);
    assert_eq!(body(&r)["redis"]["ok"], false);
    stores.start("redis")?;
    app.set_stock("sku-d", 1000).await?; // the cache restarts empty: the operator reopens the sale
    let (id, r) = wait_for("orders accepted again", T, || async {
        let (id, r) = place(&app).await?;
        Ok((r.status == 202).then_some((id, r)))
    })
    .await?;
    assert_eq!(body(&r)["status"], "queued");
    accepted.push(id);

    // Kafka down: new orders are refused and their stock given back.
    stores.kill("kafka")?;
    let before = app.stock("sku-d").await?;
    let (_, r) = place(&app).await?;
    assert_eq!(r.status, 503, "{}", r.body);
    assert_eq!(
        app.stock("sku-d").await?,
        before,
        "stock of a refused order is given back"
    );
    assert_eq!(
        app.get("/users/warm/profile").await?.status,
        200,
        "profiles unaffected"
    );
    stores.start("kafka")?;
    let id = wait_for("orders accepted after Kafka is back", T, || async {
        let (id, r) = place(&app).await?;
        Ok((r.status == 202).then_some(id))
    })
    .await?;
    accepted.push(id);

    // MySQL down: cached profiles are still served, orders are still accepted and wait in
    // Kafka; once MySQL is back every accepted order is persisted, exactly once.
    for _ in 0..2 {
        app.get("/users/warm/profile").await?;
    }
    stores.kill("mysql")?;
    let r = app.get("/users/warm/profile").await?;
    assert_eq!(r.status, 200, "{}", r.body);
    assert_ne!(body(&r)["source"], "db");
    assert_eq!(app.get("/users/cold/profile").await?.status, 503);
    for _ in 0..5 {
        let (id, r) = place(&app).await?;
        assert_eq!(r.status, 202, "{}", r.body);
        accepted.push(id);
    }
    let r = app
        .get(&format!("/users/buyer/orders/{}", accepted.last().unwrap()))
        .await?;
    assert_eq!(body(&r)["status"], "queued", "{}", r.body);
    // A queued order is shown to its own user only.
    let other = app
        .get(&format!(
            "/users/someone-else/orders/{}",
            accepted.last().unwrap()
        ))
        .await?;
    assert_eq!(other.status, 404, "{}", other.body);
    stores.start("mysql")?;
    wait_for("every accepted order persisted", T, || async {
        Ok((orders_in_mysql(&stores).await? >= accepted.len() as u64).then_some(()))
    })
    .await?;
    let pool = stores.mysql_admin()?;
    let ids: Vec<String> = pool
        .get_conn()
        .await?
        .query("SELECT order_id FROM orders ORDER BY order_id")
        .await?;
    let mut expected = accepted.clone();
    expected.sort();
    assert_eq!(
        ids, expected,
        "exactly the accepted orders, each once (refused ones never)"
    );
    wait_for("ready again", T, || async {
        Ok((app.get("/readyz").await?.status == 200).then_some(()))
    })
    .await?;
    Ok(())
}

/// Orders whose delivery to Kafka is in doubt. First the broker is frozen (SIGSTOP) while
/// orders are in flight: their deliveries time out, the clients are told "refused" (503)
/// and the orders are voided; then the broker goes on and stores them after all, and the
/// persister must not write a single one (the sale would oversell). Then the broker is
/// killed in the middle of a burst: every order is either accepted and persisted once, or
/// refused and never persisted, and units sold plus units left is the stock.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn orders_in_doubt_are_voided_and_never_persisted_when_the_broker_stored_them_after_all(
) -> anyhow::Result<()> {
    let (stores, app) = lone_cell("in-doubt").await?;
    let app = Arc::new(app);
    app.set_stock("doubt", 1_000).await?;
    // `n` orders, the i-th sent `pace * i` after the burst starts.
    let burst = |prefix: &'static str, n: usize, pace: Duration| {
        let mut set = tokio::task::JoinSet::new();
        for i in 0..n {
            let app = app.clone();
            set.spawn(async move {
                tokio::time::sleep(pace * i as u32).await;
                let id = format!("{prefix}-{i}");
                let r = order(&app, &format!("u{i}"), "doubt", Some(&id)).await?;
                anyhow::Ok((id, r.status, r.body))
            });
        }
        set
    };
    let settle = |mut set: tokio::task::JoinSet<anyhow::Result<(String, u16, String)>>| async move {
        let mut answers = Vec::new();
        while let Some(r) = set.join_next().await {
            answers.push(r??);
        }
        anyhow::Ok(answers)
    };
    let persisted = |stores: &CellStores| {
        let pool = stores.mysql_admin();
        async move {
            let mut c = pool?.get_conn().await?;
            let ids: Vec<String> = c.query("SELECT order_id FROM orders").await?;
            anyhow::Ok(ids)
        }
    };

    // 1. The broker frozen with 30 orders in flight (a produce times out after 3 s), once
    //    the producer is connected (so the orders are sent, not waiting for a connection).
    let r = order(&app, "warm", "doubt", Some("warm-up")).await?;
    assert_eq!(r.status, 202, "{}", r.body);
    stores.pause("kafka")?;
    let answers = settle(burst("frozen", 30, Duration::ZERO)).await?;
    stores.resume("kafka")?;
    assert!(
        answers
            .iter()
            .all(|(_, s, b)| *s == 503 && b.contains("did not take the order")),
        "{answers:?}"
    );
    assert_eq!(app.metric("cellplane_app_orders_voided_total").await?, 30.0);
    // The broker had them in its socket buffers: it stores them now, and the persister
    // finds every one voided.
    // (The consumer may have to rejoin its group after the pause: a longer wait.)
    let log = wait_for("the order log read to its end", T * 2, || async {
        let orders = body(&app.get("/status").await?)["orders"].clone();
        eprintln!("after the pause: {orders}");
        Ok((orders["lag"].as_i64() == Some(0)).then_some(orders))
    })
    .await?;
    let stored = log["high"].as_i64().unwrap_or_default() - 1;
    let skipped = app
        .metric("cellplane_app_orders_void_skipped_total")
        .await?;
    println!("broker frozen: 30 voided, {stored} stored after all, {skipped} skipped");
    assert!(
        stored > 0,
        "the frozen broker stored none of the 30 after all: the check below would be 0 == 0"
    );
    assert_eq!(
        skipped, stored as f64,
        "every voided order the broker stored was skipped"
    );
    let ids = persisted(&stores).await?;
    assert!(
        ids.iter().all(|id| !id.starts_with("frozen-")),
        "a voided order was persisted: {ids:?}"
    );
    assert_eq!(
        app.stock("doubt").await?,
        Some(999),
        "every unit back but the warm-up's"
    );
    // A retry with a voided id is told so, and takes nothing.
    let r = order(&app, "u0", "doubt", Some("frozen-0")).await?;
    assert_eq!(r.status, 409, "{}", r.body);
    assert!(r.body.contains("voided"), "{}", r.body);

    // 2. The broker killed in the middle of a burst of 300 orders, paced over 600 ms so
    //    that the kill lands in its middle on a fast machine too.
    let set = burst("burst", 300, Duration::from_millis(2));
    tokio::time::sleep(Duration::from_millis(150)).await;
    stores.kill("kafka")?;
    let answers = settle(set).await?;
    stores.start("kafka")?;
    let accepted: Vec<&String> = answers
        .iter()
        .filter(|(_, s, _)| *s == 202 || *s == 200)
        .map(|(id, _, _)| id)
        .collect();
    let refused: Vec<&String> = answers
        .iter()
        .filter(|(_, s, _)| *s == 503)
        .map(|(id, _, _)| id)
        .collect();
    assert_eq!(accepted.len() + refused.len(), 300, "{answers:?}");
    assert!(
        !accepted.is_empty() && !refused.is_empty(),
        "the kill did not land mid-burst: {} accepted, {} refused",
        accepted.len(),
        refused.len()
    );
    wait_for("every accepted order persisted", T, || async {
        let ids = persisted(&stores).await?;
        Ok(accepted.iter().all(|id| ids.contains(id)).then_some(ids))
    })
    .await?;
    // Whatever else the restarted broker had stored is read and settled too.
    wait_for("the order log read to its end", T, || async {
        let status = body(&app.get("/status").await?);
        Ok((status["orders"]["lag"].as_i64() == Some(0)).then_some(()))
    })
    .await?;
    // At most once per order id is the primary key's (a duplicate cannot be a row, so it
    // is not counted here); at least once is the wait above; the count below leaves no
    // room for anything else.
    let ids = persisted(&stores).await?;
    assert!(
        refused.iter().all(|id| !ids.contains(id)),
        "a refused order was persisted"
    );
    assert_eq!(
        ids.len(),
        accepted.len() + 1,
        "the accepted ones and the warm-up"
    );
    let left = app.stock("doubt").await?.unwrap_or_default();
    assert_eq!(
        left + ids.len() as i64,
        1_000,
        "sold {} + left {left}",
        ids.len()
    );
    println!(
        "broker killed mid-burst: {} accepted, {} refused ({} voided in all, {} found stored after all)",
        accepted.len(),
        refused.len(),
        app.metric("cellplane_app_orders_voided_total").await?,
        app.metric("cellplane_app_orders_void_skipped_total").await?
    );
    Ok(())
}

/// User keys are stored as the bytes they are: `Alice` and `alice` are two users, a
/// 256-byte key (the contract's longest) is stored whole, and tables an earlier version
/// made with a case-insensitive `VARCHAR(128)` are migrated in place, rows kept.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn user_keys_are_stored_as_their_bytes_and_old_tables_are_migrated() -> anyhow::Result<()> {
    let stores = CellStores::up("key-bytes")?;
    // The tables as the app made them before keys were bytes, with one user.
    {
        let pool = stores.mysql_admin()?;
        let mut c = pool.get_conn().await?;
        c.query_drop(
            "CREATE TABLE profiles (user_id VARCHAR(128) NOT NULL PRIMARY KEY, \
             name VARCHAR(256) NOT NULL, email VARCHAR(256) NOT NULL, \
             version BIGINT UNSIGNED NOT NULL, updated_at TIMESTAMP(3) NOT NULL \
             DEFAULT CURRENT_TIMESTAMP(3) ON UPDATE CURRENT_TIMESTAMP(3), KEY by_updated (updated_at))",
        )
        .await?;
        c.query_drop(
            "INSERT INTO profiles (user_id, name, email, version) VALUES ('alice', 'old', 'a@x', 1)",
        )
        .await?;
        c.query_drop(
            "CREATE TABLE orders (order_id VARCHAR(64) NOT NULL PRIMARY KEY, \
             user_id VARCHAR(128) NOT NULL, sku VARCHAR(64) NOT NULL, qty INT NOT NULL, \
             accepted_at_ms BIGINT NOT NULL, kafka_offset BIGINT NOT NULL, \
             persisted_at TIMESTAMP(3) NOT NULL DEFAULT CURRENT_TIMESTAMP(3), KEY by_user (user_id))",
        )
        .await?;
    }
    let file = table_file(&stores.dir, &table(1, &["key-bytes"]));
    let app = CellApp::start(&stores, &file, &[]).await?;
    let pool = stores.mysql_admin()?;
    let mut c = pool.get_conn().await?;
    let types: Vec<(String, String)> = c
        .query(
            "SELECT TABLE_NAME, LOWER(COLUMN_TYPE) FROM information_schema.COLUMNS \
             WHERE TABLE_SCHEMA = DATABASE() AND COLUMN_NAME = 'user_id' ORDER BY TABLE_NAME",
        )
        .await?;
    assert_eq!(
        types,
        [
            ("orders".to_string(), "varbinary(256)".to_string()),
            ("profiles".to_string(), "varbinary(256)".to_string())
        ]
    );
    let r = app.get("/users/alice/profile").await?;
    assert_eq!(body(&r)["name"], "old", "the migrated row: {}", r.body);

    let put = |user: String, name: &'static str| {
        let app = &app;
        async move {
            let r = app
                .send_json(
                    "PUT",
                    &format!("/users/{user}/profile"),
                    json!({"name": name, "email": "e@example.com"}),
                )
                .await?;
            anyhow::ensure!(r.status == 200, "PUT {user}: {} {}", r.status, r.body);
            Ok::<(), anyhow::Error>(())
        }
    };
    put("Alice".into(), "upper").await?;
    put("alice".into(), "lower").await?;
    let longest = "k".repeat(256);
    put(longest.clone(), "longest").await?;
    for (user, name) in [
        ("Alice", "upper"),
        ("alice", "lower"),
        (longest.as_str(), "longest"),
    ] {
        let r = app.get(&format!("/users/{user}/profile")).await?;
        assert_eq!(body(&r)["name"], name, "{user}: {}", r.body);
    }
    let rows: Option<u64> = c
        .query_first("SELECT COUNT(*) FROM profiles WHERE user_id IN ('Alice', 'alice')")
        .await?;
    assert_eq!(rows, Some(2), "Alice and alice are two rows");
    let stored: Option<u64> = c
        .exec_first(
            "SELECT LENGTH(user_id) FROM profiles WHERE user_id = ?",
            (longest.as_str(),),
        )
        .await?;
    assert_eq!(stored, Some(256), "stored whole");
    Ok(())
}
