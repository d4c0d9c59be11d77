//! A planned switchover on real parts: a global etcd, two region control planes with their
//! operators (one leads the platform, both carry out their own cells' intents), one cell per
//! region whose MySQL is a real MariaDB (`e2e/bin/stores`, declared per cell through the
//! CellSet's `overrides`), two real routers, and `cellplane switchover` run by the test as an
//! SRE would. The cells' apps are HTTP backends that say who answered (a mock of the app,
//! whose `/status` reports an order backlog of 0): the app's own fence path is tested in
//! `cell_app.rs`.
//!
//! While it runs, a writer commits rows to the home's MySQL with the app's account as fast
//! as it can, and clients send requests through a router. Proven: the switchover succeeds;
//! every row whose commit was acknowledged is on the new home (zero loss); the old home is
//! read-only and replicates the new home; no request reaches the old home after the flip;
//! requests sent during the freeze are held and answered, not failed.

use cellplane_cells::etcd_keys::drill_key;
use cellplane_e2e::cell::CellStores;
use cellplane_e2e::net::{Backend, Etcd, RouterProc};
use cellplane_e2e::{apply_yaml, free_port, test_dir, wait_for, workspace_bin, Operator, Region};
use cellplane_operator::platform::switchover::{Outcome, Switchover};
use mysql_async::prelude::Queryable;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

const T: Duration = Duration::from_secs(120);

fn store(kind: &str, endpoint: &str, cell: &str, admin: bool) -> String {
    let admin = if admin {
        format!(", adminSecretRef: {{name: {cell}-admin}}")
    } else {
        String::new()
    };
    format!("{kind}: {{external: {{endpoint: \"{endpoint}\", secretRef: {{name: {cell}-store}}{admin}}}}}")
}

fn cellset(cells: &[(&str, &CellStores, &str)]) -> String {
    let overrides: Vec<String> = cells
        .iter()
        .map(|(cell, s, app)| {
            format!(
                "    {cell}: {{advertise: \"{app}\", {}, {}, {}}}",
                store("redis", s.var("REDIS_ADDR"), cell, false),
                store("mysql", s.var("MYSQL_ADDR"), cell, true),
                store("kafka", s.var("KAFKA_BOOTSTRAP"), cell, false),
            )
        })
        .collect();
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
  overrides:
{}
"#,
        overrides.join("\n")
    )
}

#[tokio::test(flavor = "multi_thread")]
async fn a_planned_switchover_moves_a_cell_with_nothing_lost() -> anyhow::Result<()> {
    let ((us, eu), (home, standby)) = std::thread::scope(|s| {
        let us = s.spawn(|| Region::up("us"));
        let eu = s.spawn(|| Region::up("eu"));
        let home = s.spawn(|| CellStores::up("shop-us-0"));
        let standby = s.spawn(|| CellStores::up("shop-eu-0"));
        (
            (us.join().unwrap(), eu.join().unwrap()),
            (home.join().unwrap(), standby.join().unwrap()),
        )
    });
    let (us, eu, home, standby) = (us?, eu?, home?, standby?);
    let etcd = Etcd::cluster(3).await?;
    let dir = test_dir("switchover");
    let secret_file = dir.join("platform-secret");
    std::fs::write(&secret_file, "fedcba9876543210fedcba9876543210")?;
    let apps = [free_port()?, free_port()?].map(|p| format!("127.0.0.1:{p}"));
    let us_app = Backend::start_on("shop-us-0", &apps[0]).await?;
    let eu_app = Backend::start_on("shop-eu-0", &apps[1]).await?;
    let set = cellset(&[
        ("shop-us-0", &home, &apps[0]),
        ("shop-eu-0", &standby, &apps[1]),
    ]);
    let mut ops: Vec<Operator> = Vec::new();
    for (region, stores) in [(&us, &home), (&eu, &standby)] {
        region.install_crds()?;
        let client = region.client().await?;
        stores.apply_secrets(&client).await?;
        apply_yaml(&client, "default", &set).await?;
        ops.push(region.platform_operator(
            &etcd.endpoints_flag(),
            &[
                "--replication-secret-file",
                secret_file.to_str().unwrap(),
                "--agent-interval-ms",
                "100",
            ],
        )?);
    }

    // The platform converges: a table with both cells, and each standby replicating its
    // home (the two cells stand by for each other) with derived credentials.
    let t1 = wait_for("a table with both cells", T, || async {
        Ok(etcd.routing_table().await?.filter(|t| t.cells.len() == 2))
    })
    .await?;
    for (cell, home_of_it) in [("shop-eu-0", "shop-us-0"), ("shop-us-0", "shop-eu-0")] {
        wait_for(&format!("{cell} replicates {home_of_it}"), T, || async {
            Ok(etcd.registration(cell).await?.filter(|r| {
                r.mysql
                    .as_ref()
                    .and_then(|m| m.replicas.get(home_of_it))
                    .is_some_and(|c| c.running)
            }))
        })
        .await?;
    }
    let endpoints: Vec<String> = etcd.endpoints().iter().map(|e| format!("'{e}'")).collect();
    let router = RouterProc::start(
        &format!(
            "table: {{etcd: {{endpoints: [{}], platform: shop, routerId: r-us, region: us, ackTtlSecs: 3}}}}\n",
            endpoints.join(", ")
        ),
        &dir,
    )
    .await?;
    let users: Vec<String> = (0..5000)
        .map(|i| format!("user-{i}"))
        .filter(|u| t1.route(u).1.name == "shop-us-0")
        .take(20)
        .collect();
    assert_eq!(
        router.request(&users[0]).await?.backend(),
        Some("shop-us-0")
    );

    // Load: a writer on the home's MySQL (the app's account), clients through the router.
    let mut root = home.mysql_admin()?.get_conn().await?;
    root.query_drop("CREATE TABLE IF NOT EXISTS cell_shop_us_0.switch_probe (id INT PRIMARY KEY)")
        .await?;
    let stop = Arc::new(AtomicBool::new(false));
    let writer = {
        let (pool, stop) = (home.mysql_app()?, stop.clone());
        tokio::spawn(async move {
            let mut acked = Vec::new();
            let mut refused = 0u32;
            let mut id = 0i32;
            while !stop.load(Ordering::SeqCst) {
                id += 1;
                let ok = match pool.get_conn().await {
                    Ok(mut c) => c
                        .exec_drop("INSERT INTO cell_shop_us_0.switch_probe VALUES (?)", (id,))
                        .await
                        .is_ok(),
                    Err(_) => false,
                };
                if ok {
                    acked.push(id);
                } else {
                    refused += 1;
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
            }
            (acked, refused)
        })
    };
    let clients = {
        let (addr, users, stop) = (router.addr.clone(), users.clone(), stop.clone());
        tokio::spawn(async move {
            let mut answers: Vec<(u16, String)> = Vec::new();
            let mut i = 0;
            while !stop.load(Ordering::SeqCst) {
                let user = &users[i % users.len()];
                i += 1;
                let url = format!("http://{addr}/users/{user}/profile");
                match cellplane_e2e::net::get(&url, &[("x-user-id", user)]).await {
                    Ok(r) => answers.push((r.status, r.backend().unwrap_or_default().to_string())),
                    Err(e) => answers.push((0, e.to_string())),
                }
            }
            answers
        })
    };
    tokio::time::sleep(Duration::from_millis(500)).await;

    // The SRE's command: preflight, then the whole switchover, followed to the end.
    let out = tokio::task::spawn_blocking({
        let flag = etcd.endpoints_flag();
        move || {
            std::process::Command::new(workspace_bin("cellplane"))
                .args([
                    "--etcd-endpoints",
                    &flag,
                    "--platform",
                    "shop",
                    "switchover",
                    "shop-us-0",
                ])
                .output()
        }
    })
    .await??;
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert_eq!(out.status.code(), Some(0), "{stdout}{stderr}");
    for step in [
        "Freeze", "Drain", "Fence", "CatchUp", "Promote", "Flip", "Reverse",
    ] {
        assert!(stdout.contains(step), "{step} missing from\n{stdout}");
    }
    assert!(stdout.contains("result: succeeded"), "{stdout}");
    tokio::time::sleep(Duration::from_millis(300)).await;
    stop.store(true, Ordering::SeqCst);
    let (acked, refused) = writer.await?;
    let answers = clients.await?;

    // The record.
    let id = stdout
        .lines()
        .find_map(|l| l.strip_prefix("started ")?.split(':').next())
        .expect("the CLI names the operation")
        .to_string();
    let record: Switchover =
        serde_json::from_slice(&etcd.get(&drill_key("shop", &id)).await?.unwrap())?;
    assert!(
        matches!(record.outcome, Some(Outcome::Succeeded { .. })),
        "{:?}",
        record.outcome
    );
    let freeze = record.write_freeze_ms().expect("freeze measured");
    println!(
        "write freeze {freeze} ms; final position {:?}",
        record.final_gtid
    );

    // The table moved the cell; the router follows.
    let t = etcd.routing_table().await?.unwrap();
    assert_eq!(t.slot_count("shop-us-0"), 0);
    assert_eq!(t.slot_count("shop-eu-0"), 16384);
    assert_eq!(t.epoch, record.flip_epoch.unwrap());

    // Zero loss: every acknowledged commit on the old home is on the new home.
    assert!(
        acked.len() > 20,
        "the writer got {} commits in",
        acked.len()
    );
    assert!(refused > 0, "the fence refused the writer at some point");
    let mut s = standby.mysql_admin()?.get_conn().await?;
    let copied: Vec<i32> = s
        .query("SELECT id FROM cell_shop_us_0.switch_probe ORDER BY id")
        .await?;
    let missing: Vec<&i32> = acked
        .iter()
        .filter(|i| copied.binary_search(i).is_err())
        .collect();
    assert!(
        missing.is_empty(),
        "acknowledged but not on the new home: {missing:?}"
    );

    // Roles: the old home read-only and replicating the new home, which replicates nothing.
    let old = etcd.registration("shop-us-0").await?.unwrap();
    let old_mysql = old.mysql.unwrap();
    assert!(old_mysql.read_only);
    assert!(old_mysql
        .replicas
        .get("shop-eu-0")
        .is_some_and(|c| c.running));
    let new = etcd.registration("shop-eu-0").await?.unwrap();
    let new_mysql = new.mysql.unwrap();
    assert!(!new_mysql.read_only);
    assert!(!new_mysql.replicas.contains_key("shop-us-0"));

    // Requests: none failed; after the switchover the old home gets none.
    let failed: Vec<&(u16, String)> = answers.iter().filter(|(s, _)| *s != 200).collect();
    assert!(
        failed.is_empty(),
        "{} of {} requests failed: {:?}",
        failed.len(),
        answers.len(),
        &failed[..failed.len().min(5)]
    );
    assert!(
        answers.iter().any(|(_, b)| b == "shop-us-0")
            && answers.iter().any(|(_, b)| b == "shop-eu-0")
    );
    let before = us_app.hits.load(Ordering::SeqCst);
    for user in &users {
        assert_eq!(router.request(user).await?.backend(), Some("shop-eu-0"));
    }
    assert_eq!(
        us_app.hits.load(Ordering::SeqCst),
        before,
        "the old home gets nothing"
    );
    println!(
        "{} commits acknowledged, {refused} refused by the fence; {} requests, all answered",
        acked.len(),
        answers.len()
    );
    drop((ops, us, eu, eu_app));
    Ok(())
}
