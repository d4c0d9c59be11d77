//! Planned switchover, failback, and the drain and failback of a region, on real parts: a
//! global etcd of three members, two region control planes with their operators (one
//! leads the platform, both carry out their own cells' intents), one cell per region on
//! real Redis, MariaDB and Kafka (`e2e/bin/stores`, declared per cell through the CellSet's
//! `overrides`), the real reference app of each cell following the table in etcd, a real
//! router, and the `cellplane` command run as an SRE would.
//!
//! Load runs the whole time: clients read profiles and place orders through the router for
//! users of both cells. Proven for every operation: it succeeds; every order that got 202
//! is in its data home's MySQL exactly once at the end (orders taken by the standby land in
//! the failed-over cell's replicated schema and flow back on failback); no request sent
//! after the freeze reached the old home until the slots came back; requests sent during a
//! freeze are held and answered; every answer that is not a success is counted and shown.

use cellplane_cells::etcd_keys::drill_key;
use cellplane_e2e::cell::{overrides_yaml, CellApp, CellStores};
use cellplane_e2e::net::{Etcd, RouterProc};
use cellplane_e2e::{apply_yaml, test_dir, wait_for, workspace_bin, Operator, Region};
use cellplane_operator::platform::batch::{BatchOutcome, Operation};
use cellplane_operator::platform::switchover::{Outcome, Step, Switchover};
use mysql_async::prelude::Queryable;
use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

const T: Duration = Duration::from_secs(120);

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

/// One answer the load got.
#[derive(Clone, Debug)]
struct Answer {
    user: String,
    order: Option<String>,
    status: u16,
    served_by: String,
    sent_ms: u64,
    body: String,
}

fn now_ms() -> u64 {
    cellplane_table::store::now_ms()
}

/// Runs the `cellplane` command; returns its exit code and output.
async fn cellplane(etcd: &Etcd, args: &[&str]) -> anyhow::Result<(i32, String)> {
    let mut all = vec![
        "--etcd-endpoints".to_string(),
        etcd.endpoints_flag(),
        "--platform".into(),
        "shop".into(),
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
fn started_id(out: &str) -> String {
    out.lines()
        .find_map(|l| l.strip_prefix("started ")?.split(':').next())
        .unwrap_or_else(|| panic!("the CLI names the operation:\n{out}"))
        .to_string()
}

async fn record(etcd: &Etcd, id: &str) -> anyhow::Result<Operation> {
    let bytes = etcd
        .get(&drill_key("shop", id))
        .await?
        .ok_or_else(|| anyhow::anyhow!("no record {id}"))?;
    Ok(serde_json::from_slice(&bytes)?)
}

/// The switchover (or the single member of a one-cell batch) an operation ran.
async fn member(etcd: &Etcd, id: &str) -> anyhow::Result<Switchover> {
    match record(etcd, id).await? {
        Operation::Switchover(s) => Ok(s),
        Operation::Batch(b) => {
            assert_eq!(b.outcome, Some(BatchOutcome::Succeeded), "{b:?}");
            assert_eq!(b.members.len(), 1, "one cell per region here");
            match record(etcd, &b.members[0]).await? {
                Operation::Switchover(s) => Ok(s),
                other => panic!("{other:?}"),
            }
        }
    }
}

fn freeze_acked_ms(op: &Switchover) -> u64 {
    op.steps
        .iter()
        .find(|s| s.step == Step::Freeze)
        .map(|s| s.ended_ms)
        .expect("a freeze step")
}

#[tokio::test(flavor = "multi_thread")]
async fn switchover_failback_and_region_drain_lose_no_order() -> anyhow::Result<()> {
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
    // The real apps, following the table in etcd as operator-made pods do.
    let endpoints = etcd.endpoints().join(",");
    let us_app = CellApp::start_on_etcd(&home, &endpoints, "shop", &[]).await?;
    let eu_app = CellApp::start_on_etcd(&standby, &endpoints, "shop", &[]).await?;
    let set = cellset(&[
        ("shop-us-0", &home, &us_app.addr),
        ("shop-eu-0", &standby, &eu_app.addr),
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

    // The platform converges: a table with both cells, each standby replicating its home
    // (the two cells stand by for each other), both apps ready on the table.
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
    for app in [&us_app, &eu_app] {
        wait_for("the app ready", T, || async {
            Ok((app.get("/readyz").await?.status == 200).then_some(()))
        })
        .await?;
        app.set_stock("flash", 1_000_000).await?;
    }
    let quoted: Vec<String> = etcd.endpoints().iter().map(|e| format!("'{e}'")).collect();
    let router = RouterProc::start(
        &format!(
            "table: {{etcd: {{endpoints: [{}], platform: shop, routerId: r-us, region: us, ackTtlSecs: 3}}}}\n",
            quoted.join(", ")
        ),
        &dir,
    )
    .await?;
    let users_of = |cell: &str| -> Vec<String> {
        (0..5000)
            .map(|i| format!("user-{i}"))
            .filter(|u| t1.route(u).1.name == cell)
            .take(8)
            .collect()
    };
    let (us_users, eu_users) = (users_of("shop-us-0"), users_of("shop-eu-0"));
    let all_users: Vec<String> = us_users.iter().chain(&eu_users).cloned().collect();
    for user in &all_users {
        let body = serde_json::json!({"name": user, "email": format!("{user}@example.com")});
        let r = router_send(&router.addr, "PUT", user, "profile", Some(body)).await?;
        assert_eq!(r.status, 200, "{}", r.body);
    }

    // Load for the whole run: four clients, each reading a profile and placing an order
    // per round, for users of both cells.
    let stop = Arc::new(AtomicBool::new(false));
    let mut clients = Vec::new();
    for c in 0..4 {
        let (addr, users, stop) = (router.addr.clone(), all_users.clone(), stop.clone());
        clients.push(tokio::spawn(async move {
            let mut answers: Vec<Answer> = Vec::new();
            let mut n = 0usize;
            while !stop.load(Ordering::SeqCst) {
                let user = users[(n * 4 + c) % users.len()].clone();
                n += 1;
                let order_id = format!("o-{c}-{n}");
                for order in [None, Some(order_id)] {
                    let sent_ms = now_ms();
                    let r = match &order {
                        None => router_send(&addr, "GET", &user, "profile", None).await,
                        Some(id) => {
                            let body = serde_json::json!({"sku": "flash", "orderId": id});
                            router_send(&addr, "POST", &user, "orders", Some(body)).await
                        }
                    };
                    answers.push(match r {
                        Ok(r) => Answer {
                            user: user.clone(),
                            order,
                            status: r.status,
                            served_by: r
                                .headers
                                .get("x-cellplane-served-by")
                                .and_then(|v| v.to_str().ok())
                                .unwrap_or_default()
                                .to_string(),
                            sent_ms,
                            body: r.body,
                        },
                        Err(e) => Answer {
                            user: user.clone(),
                            order,
                            status: 0,
                            served_by: String::new(),
                            sent_ms,
                            body: e.to_string(),
                        },
                    });
                }
            }
            answers
        }));
    }
    tokio::time::sleep(Duration::from_millis(800)).await;

    // Preflight refusals change nothing and exit 2, naming the gate.
    let epoch_before = etcd.routing_table().await?.unwrap().epoch;
    wait_for("the cells' request rates measured", T, || async {
        let rate = etcd
            .registration("shop-us-0")
            .await?
            .and_then(|r| r.requests_per_sec);
        Ok(rate.filter(|r| *r > 0))
    })
    .await?;
    let (code, out) = cellplane(
        &etcd,
        &["switchover", "shop-us-0", "--capacity-rps-per-weight", "1"],
    )
    .await?;
    assert_eq!(code, 2, "{out}");
    assert!(
        out.contains("refused by the capacity gate") && out.contains("requests/s"),
        "{out}"
    );
    let (code, out) = wait_for("an RPO refusal under load", T, || async {
        let (code, out) = cellplane(
            &etcd,
            &["switchover", "shop-us-0", "--dry-run", "--max-lag", "0"],
        )
        .await?;
        Ok((code == 2).then_some((code, out)))
    })
    .await?;
    assert!(
        out.contains("refused by the rpo gate") && out.contains("behind"),
        "{code} {out}"
    );
    let (code, out) = cellplane(&etcd, &["switchover", "shop-nowhere-9"]).await?;
    assert_eq!(code, 1, "{out}");
    assert!(
        out.contains("unknown cell \"shop-nowhere-9\"; the table has shop-eu-0, shop-us-0"),
        "{out}"
    );
    let (code, out) = cellplane(&etcd, &["failback", "shop-us-0"]).await?;
    assert_eq!(code, 1, "{out}");
    assert!(out.contains("not failed over"), "{out}");
    assert_eq!(
        etcd.routing_table().await?.unwrap().epoch,
        epoch_before,
        "refusals change nothing"
    );

    // 1. Switchover of shop-us-0 to its standby; 2. failback; 3. drain of region us;
    // 4. failback of region us. Each followed to the end by the CLI.
    let phases: [&[&str]; 4] = [
        &["switchover", "shop-us-0"],
        &["failback", "shop-us-0"],
        &["drain", "region", "us"],
        &["failback", "--region", "us"],
    ];
    let mut records = Vec::new();
    for args in phases {
        let (id, out) = if args[0] == "drain" {
            // While a drain runs, another operation on its cells is refused; the drain is
            // followed with `cellplane drills ID`.
            let mut no_wait = args.to_vec();
            no_wait.push("--no-wait");
            let (code, out) = cellplane(&etcd, &no_wait).await?;
            assert_eq!(code, 0, "{out}");
            let id = started_id(&out);
            let (code, refused) = cellplane(&etcd, &["switchover", "shop-eu-0"]).await?;
            assert_eq!(code, 2, "{refused}");
            assert!(
                refused.contains("refused by the concurrent gate"),
                "{refused}"
            );
            let (code, out) = wait_for("the drain to finish", T, || async {
                let (code, out) = cellplane(&etcd, &["drills", &id]).await?;
                Ok((!out.contains("result: running")).then_some((code, out)))
            })
            .await?;
            assert_eq!(code, 0, "{out}");
            (id, out)
        } else {
            let (code, out) = cellplane(&etcd, args).await?;
            assert_eq!(code, 0, "cellplane {args:?}:\n{out}");
            (started_id(&out), out)
        };
        assert!(out.contains("result: succeeded"), "{out}");
        let op = member(&etcd, &id).await?;
        assert!(
            matches!(op.outcome, Some(Outcome::Succeeded { ref warnings }) if warnings.is_empty()),
            "{:?}",
            op.outcome
        );
        println!("cellplane {}:\n{out}", args.join(" "));
        // Where the users are now.
        let t = etcd.routing_table().await?.unwrap();
        let us_home = &t.route(&us_users[0]).1.name;
        assert_eq!(
            us_home, &op.target,
            "{args:?} moved shop-us-0's users to {}",
            op.target
        );
        for user in &us_users {
            let r = router_send(&router.addr, "GET", user, "profile", None).await?;
            assert_eq!(
                (r.status, header(&r, "x-cellplane-served-by")),
                (200, op.target.clone()),
                "{}",
                r.body
            );
            assert!(
                r.body.contains(&format!("{user}@example.com")),
                "{}",
                r.body
            );
        }
        records.push(op);
        // The next operation's preflight needs the new standby replicating its new home.
        let t = etcd.routing_table().await?.unwrap();
        let (serving, standby_of_it) =
            if t.cell("shop-us-0").unwrap().state == cellplane_cells::crd::CellPhase::Active {
                ("shop-us-0", "shop-eu-0")
            } else {
                ("shop-eu-0", "shop-us-0")
            };
        wait_for(
            &format!("{standby_of_it} replicates {serving}"),
            T,
            || async {
                let reg = etcd.registration(standby_of_it).await?;
                let r = reg
                    .as_ref()
                    .and_then(|r| r.mysql.as_ref()?.replicas.get(serving).cloned());
                Ok(r.filter(|r| r.running))
            },
        )
        .await?;
    }
    stop.store(true, Ordering::SeqCst);
    let mut answers = Vec::new();
    for c in clients {
        answers.extend(c.await?);
    }

    // No request sent after a freeze of shop-us-0 was acknowledged reached it until its
    // users came back (the release of the following failback).
    for pair in records.chunks(2) {
        let (away, back) = (&pair[0], &pair[1]);
        // From the moment every router holds the old home's requests, to just before the
        // failback freezes its standby (requests sent from then on may be held and
        // released to the old home once it is home again, or be refused by the frozen
        // standby with 421 and retried there).
        let from = freeze_acked_ms(away);
        let until = back.frozen_at_ms.expect("frozen") - 200;
        let leaked: Vec<&Answer> = answers
            .iter()
            .filter(|a| a.served_by == "shop-us-0" && (200..300).contains(&a.status))
            .filter(|a| a.sent_ms > from && a.sent_ms < until)
            .collect();
        assert!(
            leaked.is_empty(),
            "reached the old home: {:?}",
            &leaked[..leaked.len().min(3)]
        );
        // Requests for shop-us-0's users sent meanwhile were served by its standby.
        assert!(answers.iter().any(|a| a.sent_ms > from
            && a.sent_ms < until
            && us_users.contains(&a.user)
            && a.served_by == "shop-eu-0"
            && a.status < 300));
    }

    // Every answer that is not a success, counted and shown.
    let failed: Vec<&Answer> = answers
        .iter()
        .filter(|a| a.status >= 300 || a.status == 0)
        .collect();
    let mut by_status: BTreeMap<u16, usize> = BTreeMap::new();
    for a in &failed {
        *by_status.entry(a.status).or_default() += 1;
    }
    println!(
        "{} requests, {} not successful {by_status:?}; first: {:?}",
        answers.len(),
        failed.len(),
        failed
            .iter()
            .take(3)
            .map(|a| (a.status, &a.body))
            .collect::<Vec<_>>()
    );
    assert!(
        answers.len() > 200,
        "the load ran ({} answers)",
        answers.len()
    );
    assert!(
        failed.is_empty(),
        "every request is answered with success, also during freezes: {:?}",
        &failed[..failed.len().min(5)]
    );

    // Zero loss: every order that got 202 is in its data home's MySQL, exactly once; the
    // orders shop-eu-0 took for shop-us-0's users went to shop-us-0's schema.
    let accepted = |users: &[String]| -> BTreeSet<String> {
        answers
            .iter()
            .filter(|a| a.status == 202 && users.contains(&a.user))
            .filter_map(|a| a.order.clone())
            .collect()
    };
    let taken_by_standby = answers
        .iter()
        .filter(|a| a.status == 202 && us_users.contains(&a.user) && a.served_by == "shop-eu-0")
        .count();
    assert!(
        taken_by_standby > 0,
        "the standby took orders for the home's users"
    );
    for (stores, schema, users) in [
        (&home, "cell_shop_us_0", &us_users),
        (&standby, "cell_shop_eu_0", &eu_users),
    ] {
        let want = accepted(users);
        assert!(want.len() > 10, "{schema}: {} orders accepted", want.len());
        let pool = stores.mysql_admin()?;
        let rows: Vec<(String, u64)> =
            wait_for(&format!("{} orders in {schema}", want.len()), T, || async {
                let mut c = pool.get_conn().await?;
                let rows: Vec<(String, u64)> = c
                    .query(format!(
                        "SELECT order_id, COUNT(*) FROM {schema}.orders GROUP BY order_id"
                    ))
                    .await?;
                let have: BTreeSet<&String> = rows.iter().map(|(id, _)| id).collect();
                Ok(want.iter().all(|id| have.contains(id)).then_some(rows))
            })
            .await?;
        assert!(
            rows.iter().all(|(_, n)| *n == 1),
            "{schema}: an order twice"
        );
        println!(
            "{schema}: {} accepted orders all persisted once ({} rows)",
            want.len(),
            rows.len()
        );
    }
    let mut c = standby.mysql_admin()?.get_conn().await?;
    let misplaced: Vec<String> = c
        .query("SELECT order_id FROM cell_shop_eu_0.orders WHERE user_id IN (SELECT user_id FROM cell_shop_us_0.orders)")
        .await?;
    assert!(
        misplaced.is_empty(),
        "shop-us-0's orders in shop-eu-0's schema: {misplaced:?}"
    );

    // Both cells serve and replicate each other again.
    for (cell, other) in [("shop-us-0", "shop-eu-0"), ("shop-eu-0", "shop-us-0")] {
        let m = etcd.registration(cell).await?.unwrap().mysql.unwrap();
        assert!(!m.read_only, "{cell} writable");
        assert!(
            m.replicas.get(other).is_some_and(|r| r.running),
            "{cell} replicates {other}"
        );
    }
    let held = router
        .metric("cellplane_router_held_total")
        .await
        .unwrap_or(-1.0);
    println!("router held {held} requests over the four freezes");
    drop((ops, us, eu, us_app, eu_app));
    Ok(())
}

fn header(r: &cellplane_e2e::net::Reply, name: &str) -> String {
    r.headers
        .get(name)
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_string()
}

/// One request through the router for `user` (`/users/<user>/<what>`).
async fn router_send(
    addr: &str,
    method: &str,
    user: &str,
    what: &str,
    body: Option<serde_json::Value>,
) -> anyhow::Result<cellplane_e2e::net::Reply> {
    let url = format!("http://{addr}/users/{user}/{what}");
    let body = body.map(|b| b.to_string()).unwrap_or_default();
    cellplane_e2e::net::send(
        method,
        &url,
        &[("x-user-id", user), ("content-type", "application/json")],
        bytes::Bytes::from(body),
    )
    .await
}
