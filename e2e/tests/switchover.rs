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

use cellplane_e2e::browser;
use cellplane_e2e::lab::{
    router_send, started_id, Answer, Load, PairLab, CONSOLE_TOKEN, HOME, STANDBY,
};
use cellplane_e2e::prometheus::{self, Prometheus};
use cellplane_e2e::wait_for;
use cellplane_operator::platform::operations::{Outcome, Step, Switchover};
use mysql_async::prelude::Queryable;
use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

const T: Duration = Duration::from_secs(120);

fn freeze_acked_ms(op: &Switchover) -> u64 {
    op.steps
        .iter()
        .find(|s| s.step == Step::Freeze)
        .map(|s| s.ended_ms)
        .expect("a freeze step")
}

fn header(r: &cellplane_e2e::net::Reply, name: &str) -> String {
    r.headers
        .get(name)
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_string()
}

#[tokio::test(flavor = "multi_thread")]
async fn switchover_failback_and_region_drain_lose_no_order() -> anyhow::Result<()> {
    let mut lab = PairLab::up("switchover").await?;
    let (etcd, router) = (&lab.etcd, &lab.router);
    let (us_users, eu_users) = (lab.users_of(HOME, 8), lab.users_of(STANDBY, 8));
    let all_users: Vec<String> = us_users.iter().chain(&eu_users).cloned().collect();
    lab.put_profiles(&all_users).await?;

    // The topology page as a person's browser shows it: both cells Active, the routers.
    let operator = &lab.operators[0];
    let console = format!("http://{}:{}/console", operator.host, operator.port);
    let page = format!("{console}#token={CONSOLE_TOKEN}");
    let artifacts =
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/e2e-artifacts");
    std::fs::create_dir_all(&artifacts)?;
    let states = |want: [(&'static str, &'static str); 2]| {
        let page = page.clone();
        move || {
            let page = page.clone();
            async move {
                let dom = tokio::task::spawn_blocking(move || browser::dom(&page)).await??;
                Ok(want
                    .iter()
                    .all(|(cell, state)| {
                        browser::attr_of(&dom, "data-cell", cell, "data-state").as_deref()
                            == Some(*state)
                    })
                    .then_some(dom))
            }
        }
    };
    let dom = wait_for(
        "the page shows both cells Active",
        T,
        states([(HOME, "Active"), (STANDBY, "Active")]),
    )
    .await?;
    assert!(dom.contains(r#"data-router="r-us""#), "{dom}");
    assert!(
        dom.contains("shop-eu-0  \u{21c4}  shop-us-0"),
        "the standby pair is drawn: {dom}"
    );
    let shot = artifacts.join("topology-active.png");
    let (p, s) = (page.clone(), shot.clone());
    tokio::task::spawn_blocking(move || browser::screenshot(&p, &s)).await??;
    // Its data needs the token; the page without one says how to open it.
    let denied = cellplane_e2e::net::get(&format!("{console}/state"), &[]).await?;
    assert_eq!(denied.status, 401, "{}", denied.body);
    let bare = console.clone();
    let dom = tokio::task::spawn_blocking(move || browser::dom(&bare)).await??;
    assert!(dom.contains("Open this page as /console#token="), "{dom}");

    // A standby that cannot take users is a preflight refusal: its Redis down, its app
    // not ready, its region reports it unhealthy.
    lab.standby.kill("redis")?;
    let unhealthy = |want: bool| {
        let etcd = &lab.etcd;
        move || async move {
            let reg = etcd.registration(STANDBY).await?;
            Ok(reg.filter(|r| r.healthy == want).map(|_| ()))
        }
    };
    wait_for("the standby reported unhealthy", T, unhealthy(false)).await?;
    let (code, out) = lab.cellplane(&["switchover", HOME, "--dry-run"]).await?;
    assert_eq!(code, 3, "{out}");
    assert!(
        out.contains("refused by the standby gate")
            && out.contains("shop-eu-0 is not registered and healthy"),
        "{out}"
    );
    lab.standby.start("redis")?;
    wait_for("the standby healthy again", T, unhealthy(true)).await?;
    // The restarted Redis (no persistence in the lab) lost the sale's stock: open it again.
    lab.standby_app.set_stock("flash", 1_000_000).await?;

    // Load for the whole run: four clients, each reading a profile and placing an order
    // per round, for users of both cells.
    let load = Load::start(&router.addr, &all_users, 4);
    tokio::time::sleep(Duration::from_millis(800)).await;

    // Preflight refusals change nothing and exit 2, naming the gate.
    let epoch_before = etcd.routing_table().await?.unwrap().epoch;
    // The gate below (1 request/s per unit of weight, 80% at most) refuses once the
    // target's rate plus the moving one is over 80% of its weight; the rates are averages
    // over the last minute, so they take a moment to get there under this load.
    wait_for(
        "the cells' request rates over the capacity gate",
        T,
        || async {
            let (Some(source), Some(target)) = (
                etcd.registration("shop-us-0").await?,
                etcd.registration(STANDBY).await?,
            ) else {
                return Ok(None);
            };
            let projected =
                source.requests_per_sec.unwrap_or(0) + target.requests_per_sec.unwrap_or(0);
            Ok((projected * 100 > u64::from(target.capacity_weight) * 80).then_some(()))
        },
    )
    .await?;
    let (code, out) = lab
        .cellplane(&["switchover", "shop-us-0", "--capacity-rps-per-weight", "1"])
        .await?;
    assert_eq!(code, 3, "{out}");
    assert!(
        out.contains("refused by the capacity gate") && out.contains("requests/s"),
        "{out}"
    );
    let (code, out) = wait_for("an RPO refusal under load", T, || async {
        let (code, out) = lab
            .cellplane(&["switchover", "shop-us-0", "--dry-run", "--max-lag", "0"])
            .await?;
        Ok((code == 3).then_some((code, out)))
    })
    .await?;
    assert!(
        out.contains("refused by the rpo gate") && out.contains("behind"),
        "{code} {out}"
    );
    let (code, out) = lab.cellplane(&["switchover", "shop-nowhere-9"]).await?;
    assert_eq!(code, 1, "{out}");
    assert!(
        out.contains("unknown cell \"shop-nowhere-9\"; the table has shop-eu-0, shop-us-0"),
        "{out}"
    );
    let (code, out) = lab.cellplane(&["failback", "shop-us-0"]).await?;
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
            let (code, out) = lab.cellplane(&no_wait).await?;
            assert_eq!(code, 0, "{out}");
            let id = started_id(&out).expect("the CLI names the operation");
            let (code, refused) = lab.cellplane(&["switchover", "shop-eu-0"]).await?;
            assert_eq!(code, 3, "{refused}");
            assert!(
                refused.contains("refused by the concurrent gate"),
                "{refused}"
            );
            let (code, out) = wait_for("the drain to finish", T, || async {
                let (code, out) = lab.cellplane(&["drills", &id]).await?;
                Ok((!out.contains("result: running")).then_some((code, out)))
            })
            .await?;
            assert_eq!(code, 0, "{out}");
            (id, out)
        } else {
            let (code, out) = lab.cellplane(args).await?;
            assert_eq!(code, 0, "cellplane {args:?}:\n{out}");
            (started_id(&out).expect("the CLI names the operation"), out)
        };
        assert!(out.contains("result: succeeded"), "{out}");
        let op = lab.member(&id).await?;
        assert!(
            matches!(op.outcome, Some(Outcome::Succeeded { ref warnings }) if warnings.is_empty()),
            "{:?}",
            op.outcome
        );
        println!("cellplane {}:\n{out}", args.join(" "));
        if args[0] == "switchover" {
            // The app serving the users now says, under its ownership lease, that it has
            // drained to the flip's epoch (what a slot move's final catch-up waits for).
            let flip = op.flip_epoch.expect("a switchover flips");
            wait_for("the serving app drained to the flip", T, || async {
                let leases = lab.etcd.owner_leases(STANDBY).await?;
                Ok(
                    (!leases.is_empty() && leases.iter().all(|l| l.drained_epoch >= flip))
                        .then_some(()),
                )
            })
            .await?;
            // The page follows: shop-us-0 failed over, the operation among the last ones.
            let dom = wait_for(
                "the page shows the switchover",
                T,
                states([(HOME, "FailedOver"), (STANDBY, "Active")]),
            )
            .await?;
            assert_eq!(
                browser::attr_of(&dom, "data-operation", &id, "data-outcome").as_deref(),
                Some("succeeded"),
                "{dom}"
            );
            // The users' traffic, as the routers saw it, on the cell now serving them.
            let auth = format!("Bearer {CONSOLE_TOKEN}");
            let rps = wait_for("the page shows the edge traffic", T, || async {
                let r = cellplane_e2e::net::get(
                    &format!("{console}/state"),
                    &[("authorization", auth.as_str())],
                )
                .await?;
                let s: serde_json::Value = serde_json::from_str(&r.body)?;
                let cell = s["regions"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .flat_map(|r| r["cells"].as_array().into_iter().flatten())
                    .find(|c| c["name"] == STANDBY)
                    .cloned()
                    .unwrap_or_default();
                Ok(cell["edgeRequestsPerSec"]
                    .as_f64()
                    .filter(|rps| *rps > 0.0)
                    .map(|rps| (rps, cell["edgeErrorPercent"].as_f64())))
            })
            .await?;
            println!("edge traffic of {STANDBY} on the page: {rps:?} (req/s, % 5xx)");
            assert!(rps.1.is_some_and(|pct| (0.0..=100.0).contains(&pct)));
            let shot = artifacts.join("topology-failed-over.png");
            let (p, s) = (page.clone(), shot.clone());
            tokio::task::spawn_blocking(move || browser::screenshot(&p, &s)).await??;
            println!("topology page screenshots: {}", artifacts.display());
        }
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
        // A profile updated while its user is away is what the old home shows on return:
        // the update went to the standby (the user's schema there, replicated back), and the
        // old home's cache entry from before the switchover must not be served.
        let moved = format!("moved-{}@example.com", us_users[0]);
        match records.len() {
            1 => {
                // A planned switchover leaves nothing to replay: the old home kept its
                // ownership lease and drained its orders before the flip, so it forwards
                // none of its log through etcd (its replayer looks once a second).
                tokio::time::sleep(Duration::from_secs(3)).await;
                let m = lab.home_app.get("/metrics").await?;
                assert_eq!(
                    cellplane_e2e::net::metric_value(
                        &m.body,
                        "cellplane_app_orders_replay_forwarded_total"
                    )?,
                    0.0,
                    "the old home forwarded orders after a planned switchover"
                );
                assert!(etcd
                    .get(&cellplane_cells::etcd_keys::replay_sent_key("shop", HOME))
                    .await?
                    .is_none());
                let body = serde_json::json!({"name": us_users[0], "email": moved});
                let r =
                    router_send(&router.addr, "PUT", &us_users[0], "profile", Some(body)).await?;
                assert_eq!(
                    (r.status, header(&r, "x-cellplane-served-by")),
                    (200, STANDBY.to_string()),
                    "{}",
                    r.body
                );
            }
            2 => {
                let r = router_send(&router.addr, "GET", &us_users[0], "profile", None).await?;
                assert_eq!(header(&r, "x-cellplane-served-by"), HOME);
                assert!(
                    r.body.contains(&moved),
                    "the old home served a stale profile: {}",
                    r.body
                );
            }
            _ => {}
        }
        // The next operation's preflight needs the new standby replicating its new home.
        let t = etcd.routing_table().await?.unwrap();
        if t.cell(HOME).unwrap().state == cellplane_cells::crd::CellPhase::Active {
            lab.wait_replicating(STANDBY, HOME).await?;
        } else {
            lab.wait_replicating(HOME, STANDBY).await?;
        }
    }
    let answers = load.stop().await?;

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

    // Zero loss: every order that got 202 is in its data home's MySQL, and nothing else
    // is (every request was answered, so every order sent was accepted): the orders
    // shop-eu-0 took for shop-us-0's users went to shop-us-0's schema, none to its own.
    // (An order twice cannot be: order_id is the key the persister writes by.)
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
        (&lab.home, "cell_shop_us_0", &us_users),
        (&lab.standby, "cell_shop_eu_0", &eu_users),
    ] {
        let want = accepted(users);
        assert!(want.len() > 10, "{schema}: {} orders accepted", want.len());
        let pool = stores.mysql_admin()?;
        let have: BTreeSet<String> =
            wait_for(&format!("{} orders in {schema}", want.len()), T, || async {
                let mut c = pool.get_conn().await?;
                let have: BTreeSet<String> = c
                    .query::<String, _>(format!("SELECT order_id FROM {schema}.orders"))
                    .await?
                    .into_iter()
                    .collect();
                Ok(want.is_subset(&have).then_some(have))
            })
            .await?;
        let extra: Vec<&String> = have.difference(&want).collect();
        assert!(
            extra.is_empty(),
            "{schema}: orders persisted that its users were not answered 202 for: {:?}",
            &extra[..extra.len().min(5)]
        );
        println!(
            "{schema}: exactly the {} accepted orders persisted",
            want.len()
        );
    }
    let mut c = lab.standby.mysql_admin()?.get_conn().await?;
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
    // Requests sent during the freezes were held and then answered (the load never
    // stopped; every answer above is a success).
    let held = router.metric("cellplane_router_held_total").await?;
    println!("router held {held} requests over the four freezes");
    assert!(
        held > 0.0,
        "no request was held during four freezes under load"
    );
    // The router's default health check asks the real app for a path it serves: no
    // endpoint was ever taken down (a wrong path marks every endpoint down and the router
    // fails open, which passes everything else).
    let downs = router
        .metric("cellplane_router_health_transitions_total{reason=\"down\"}")
        .await?;
    assert_eq!(
        downs, 0.0,
        "the router's health checks took the real app's endpoints down"
    );

    // Leadership: the leader's operator dies in the middle of a switchover (it is started
    // with --no-wait and the leader killed as soon as it left the preflight). The other
    // region's operator takes the platform over and finishes the operation (or rolls it
    // back); the dead one, restarted, does not lead while the other holds the lease.
    let load = Load::start(&lab.router.addr, &all_users, 2);
    let mut handed_over = None;
    for attempt in 0..3 {
        let leader = wait_for("one platform leader", T, || async { Ok(lab.leader()) }).await?;
        let (code, out) = lab.cellplane(&["switchover", HOME, "--no-wait"]).await?;
        assert_eq!(code, 0, "{out}");
        let id = started_id(&out).expect("the CLI names the operation");
        let step = wait_for("the operation past its preflight", T, || async {
            Ok(match lab.record(&id).await? {
                cellplane_operator::platform::operations::Operation::Switchover(op) => {
                    (op.step != Step::Preflight).then_some(op.step)
                }
                _ => None,
            })
        })
        .await?;
        lab.operators[leader].kill();
        let caught = lab.member(&id).await?;
        println!(
            "attempt {attempt}: leader {leader} killed at {step:?} (record at {:?})",
            caught.step
        );
        let survivor = 1 - leader;
        wait_for("the other region's operator leads", T, || async {
            Ok((lab.leader() == Some(survivor)).then_some(()))
        })
        .await?;
        lab.restart_operator(leader)?;
        let op = wait_for("the operation finished by the new leader", T, || async {
            let op = lab.member(&id).await?;
            Ok(op.finished().then_some(op))
        })
        .await?;
        for _ in 0..20 {
            assert_eq!(
                lab.leader(),
                Some(survivor),
                "the restarted operator does not take over"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let t = lab.etcd.routing_table().await?.unwrap();
        match &op.outcome {
            Some(Outcome::Succeeded { .. }) => {
                assert_eq!(
                    t.cell(HOME).unwrap().state,
                    cellplane_cells::crd::CellPhase::FailedOver
                );
                lab.wait_replicating(HOME, STANDBY).await?;
                let (code, out) = lab.cellplane(&["failback", HOME]).await?;
                assert_eq!(code, 0, "{out}");
            }
            Some(Outcome::RolledBack { .. }) => {
                assert!(t.slot_count(HOME) > 0 && !t.cell(HOME).unwrap().frozen);
            }
            other => panic!("{other:?}"),
        }
        lab.wait_replicating(STANDBY, HOME).await?;
        if caught.finished() {
            continue; // it ended before the kill: no handover to prove, try again
        }
        println!(
            "handed over at {:?}:\n{}",
            caught.step,
            cellplane_operator::platform::operations::report::text(&op)
        );
        // The record names both leaders: the killed one ended the first steps, the other
        // region's operator the rest.
        let leaders: BTreeSet<&str> = op
            .steps
            .iter()
            .map(|s| s.by.as_str())
            .filter(|b| !b.is_empty())
            .collect();
        assert_eq!(leaders.len(), 2, "{leaders:?}");
        handed_over = Some(op);
        break;
    }
    assert!(
        handed_over.is_some(),
        "three attempts ended before the leader could be killed"
    );
    // A real Prometheus scraping the lab's operators, router and apps: every alert rule
    // and dashboard query runs without error and names only metrics a component exports.
    let prom = Prometheus::start(
        &cellplane_e2e::test_dir("switchover-prometheus"),
        &[
            (
                "operator",
                lab.operators
                    .iter()
                    .map(|o| format!("{}:{}", o.host, o.port))
                    .collect(),
            ),
            ("router", vec![lab.router.metrics_addr.clone()]),
            (
                "app",
                vec![lab.home_app.addr.clone(), lab.standby_app.addr.clone()],
            ),
        ],
    )
    .await?;
    let queries: Vec<(String, String)> = prometheus::rule_exprs(&prometheus::rules_file())?
        .into_iter()
        .chain(prometheus::dashboard_exprs(&prometheus::dashboard_file())?)
        .collect();
    let wanted: BTreeSet<String> = queries
        .iter()
        .flat_map(|(_, q)| prometheus::metric_names(q))
        .collect();
    let names = wait_for("every metric the queries name scraped", T, || async {
        let names: BTreeSet<String> = prom.names().await?.into_iter().collect();
        Ok(wanted.is_subset(&names).then_some(names))
    })
    .await
    .inspect_err(|_| {
        eprintln!(
            "wanted {wanted:?}; prometheus log: {}",
            std::fs::read_to_string(&prom.log).unwrap_or_default()
        )
    })?;
    for (what, q) in &queries {
        prom.query(q)
            .await
            .map_err(|e| anyhow::anyhow!("{what}: {e:#}"))?;
    }
    println!(
        "{} rule and dashboard queries ran on a real Prometheus ({} metric names scraped)",
        queries.len(),
        names.len()
    );

    let answers = load.stop().await?;
    let failed: Vec<&Answer> = answers
        .iter()
        .filter(|a| a.status >= 500 || a.status == 0)
        .collect();
    println!(
        "{} requests around the handover, {} failed",
        answers.len(),
        failed.len()
    );
    // The handover stretches the freeze to the old leader's lease (about 4 s), longer than
    // a router holds a request: those requests fail fast by design (503 hold_timeout, the
    // client retries). Nothing else may fail.
    let other: Vec<(u16, &String)> = failed
        .iter()
        .filter(|a| !(a.status == 503 && a.body.contains("hold_timeout")))
        .map(|a| (a.status, &a.body))
        .collect();
    assert!(
        other.is_empty(),
        "requests failed around the leader's handover other than by a hold's timeout: {:?}",
        &other[..other.len().min(5)]
    );
    Ok(())
}
