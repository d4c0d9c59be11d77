//! The platform controller across regions, on real parts: a global etcd of three members,
//! two region control planes (us, eu) each with its operator campaigning for the platform,
//! one CellSet applied in both, and two real routers following the table from etcd and
//! acknowledging it. One lab for the whole binary: the phases run in order on it.
//!
//! The cells' app Services are exposed as `LoadBalancer`; no cloud runs here, so the test
//! writes the load balancer address into the Service status as a load-balancer controller
//! would (MetalLB does the same on bare metal). Behind each address a real HTTP backend
//! answers with its cell's name.

use cellplane_cells::etcd_keys::{router_key, RouterAck};
use cellplane_cells::routing::RoutingTable;
use cellplane_cells::slot::slot_for_key;
use cellplane_e2e::net::{metric_value, Backend, Etcd, RouterProc};
use cellplane_e2e::{apply_yaml, free_port, test_dir, wait_for, Operator, Region};
use cellplane_table::write::{self, Fence, Swap};
use std::time::Duration;

const T: Duration = Duration::from_secs(120);

fn cellset(per_region_us: u32, port: u16) -> String {
    format!(
        r#"
apiVersion: cellplane.io/v1alpha1
kind: CellSet
metadata: {{name: shop, namespace: default}}
spec:
  platform: shop
  regions:
  - {{name: us, cells: {per_region_us}}}
  - {{name: eu, cells: 1}}
  template:
    app: {{image: "example/shop:1", replicas: 1, port: {port}, expose: LoadBalancer}}
    redis: {{inCluster: {{ephemeral: true}}}}
    mysql: {{inCluster: {{ephemeral: true}}}}
    kafka: {{inCluster: {{ephemeral: true}}}}
"#
    )
}

/// The load balancer address of each cell in the lab: its own loopback address.
fn lb_ip(cell: &str) -> &'static str {
    match cell {
        "shop-us-0" => "127.0.1.1",
        "shop-us-1" => "127.0.1.2",
        "shop-eu-0" => "127.0.2.1",
        other => panic!("no address planned for {other}"),
    }
}

/// Plays the load balancer controller: gives the cell's app Service its address.
fn assign_lb(region: &Region, cell: &str) -> anyhow::Result<()> {
    let svc = format!("{cell}-app");
    wait_for_sync(&format!("Service {svc}"), || {
        region.kubectl(&["get", "svc", &svc, "-o", "name"]).is_ok()
    })?;
    let patch = format!(
        r#"{{"status":{{"loadBalancer":{{"ingress":[{{"ip":"{}"}}]}}}}}}"#,
        lb_ip(cell)
    );
    region.kubectl(&[
        "patch",
        "svc",
        &svc,
        "--subresource=status",
        "--type=merge",
        "-p",
        &patch,
    ])?;
    Ok(())
}

fn wait_for_sync(what: &str, mut ok: impl FnMut() -> bool) -> anyhow::Result<()> {
    let start = std::time::Instant::now();
    while !ok() {
        if start.elapsed() > T {
            anyhow::bail!("timed out waiting for {what}");
        }
        std::thread::sleep(Duration::from_millis(300));
    }
    Ok(())
}

/// Waits until the table in etcd satisfies `ok`.
async fn wait_table(
    etcd: &Etcd,
    what: &str,
    ok: impl Fn(&RoutingTable) -> bool,
) -> anyhow::Result<RoutingTable> {
    wait_for(what, T, || async {
        Ok(etcd.routing_table().await?.filter(&ok))
    })
    .await
}

fn platform_leader(op: &Operator) -> anyhow::Result<f64> {
    metric_value(&op.metrics()?, "cellplane_operator_platform_leader")
}

fn operator(region: &Region, etcd: &Etcd) -> anyhow::Result<Operator> {
    region.platform_operator(&etcd.endpoints_flag(), &["--registration-ttl", "5"])
}

async fn router(
    etcd: &Etcd,
    id: &str,
    region: &str,
    dir: &std::path::Path,
) -> anyhow::Result<RouterProc> {
    let endpoints = etcd
        .endpoints()
        .iter()
        .map(|e| format!("'{e}'"))
        .collect::<Vec<_>>()
        .join(", ");
    RouterProc::start(
        &format!(
            "table: {{etcd: {{endpoints: [{endpoints}], platform: shop, routerId: {id}, region: {region}, ackTtlSecs: 3}}}}\n"
        ),
        dir,
    )
    .await
}

/// The user keys `user-0..n` that the table homes on `cell`.
fn users_of(t: &RoutingTable, cell: &str, n: usize) -> Vec<String> {
    (0..10_000)
        .map(|i| format!("user-{i}"))
        .filter(|u| t.route(u).1.name == cell)
        .take(n)
        .collect()
}

async fn answered_by(r: &RouterProc, user: &str) -> anyhow::Result<String> {
    let reply = r.request(user).await?;
    anyhow::ensure!(reply.status == 200, "{user}: status {}", reply.status);
    Ok(reply.backend().unwrap_or_default().to_string())
}

#[tokio::test(flavor = "multi_thread")]
async fn the_platform_leader_writes_the_table_from_the_cells_across_regions() -> anyhow::Result<()>
{
    // The lab: three etcd members and two regions, started side by side.
    let (us, eu) = std::thread::scope(|s| {
        let us = s.spawn(|| Region::up("us"));
        let eu = s.spawn(|| Region::up("eu"));
        (us.join().unwrap(), eu.join().unwrap())
    });
    let (us, eu) = (us?, eu?);
    let etcd = Etcd::cluster(3).await?;
    let dir = test_dir("platform");
    let port = free_port()?;
    let mut backends = Vec::new();
    for cell in ["shop-us-0", "shop-eu-0"] {
        backends.push(Backend::start_on(cell, &format!("{}:{port}", lb_ip(cell))).await?);
    }
    let mut ops = Vec::new();
    for region in [&us, &eu] {
        region.install_crds()?;
        ops.push(operator(region, &etcd)?);
        apply_yaml(&region.client().await?, "default", &cellset(1, port)).await?;
    }

    // 1. Nothing is routable before the cells registered addresses: no table yet. Once the
    //    load balancers have addresses, the leader writes epoch 1 with both cells.
    assign_lb(&us, "shop-us-0")?;
    assign_lb(&eu, "shop-eu-0")?;
    let t1 = wait_table(&etcd, "a table with both cells", |t| t.cells.len() == 2).await?;
    // One cell may have registered first (a table of one cell, epoch 1): epochs start at 1
    // and grow by one per change.
    assert!(t1.epoch <= 2, "epoch {}", t1.epoch);
    let e = t1.epoch;
    assert_eq!(
        t1.slot_count("shop-us-0") + t1.slot_count("shop-eu-0"),
        16384
    );
    let us0 = t1.cell("shop-us-0").unwrap();
    assert_eq!(us0.endpoints, vec![format!("127.0.1.1:{port}")]);
    assert_eq!(us0.standby.as_deref(), Some("shop-eu-0"));
    assert_eq!(us0.region, "us");
    let leaders: Vec<f64> = ops
        .iter()
        .map(platform_leader)
        .collect::<anyhow::Result<_>>()?;
    assert_eq!(
        leaders.iter().sum::<f64>(),
        1.0,
        "exactly one platform leader: {leaders:?}"
    );
    let history = write::history(&mut etcd.client().await?, "shop", 10).await?;
    assert!(
        history.last() == Some(&t1),
        "every table is kept in the history"
    );
    let epochs: Vec<u64> = history.iter().map(|t| t.epoch).collect();
    assert_eq!(epochs, (1..=e).collect::<Vec<_>>());

    // 2. Routers in both regions follow it, route users home and acknowledge the epoch.
    let r_us = router(&etcd, "r-us", "us", &dir).await?;
    let r_eu = router(&etcd, "r-eu", "eu", &dir).await?;
    for cell in ["shop-us-0", "shop-eu-0"] {
        for user in users_of(&t1, cell, 3) {
            assert_eq!(answered_by(&r_us, &user).await?, cell);
            assert_eq!(answered_by(&r_eu, &user).await?, cell);
        }
    }
    let acked = |id: &'static str, epoch: u64| {
        let etcd = &etcd;
        async move {
            wait_for(
                &format!("router {id} acknowledges epoch {epoch}"),
                T,
                || async {
                    Ok(etcd
                        .get(&router_key("shop", id))
                        .await?
                        .map(|b| serde_json::from_slice::<RouterAck>(&b))
                        .transpose()?
                        .filter(|a| a.applied_epoch == epoch))
                },
            )
            .await
        }
    };
    let ack = acked("r-eu", e).await?;
    assert_eq!(ack.region, "eu");
    assert!(ack.applied_at_ms > 0);
    acked("r-us", e).await?;

    // 3. A stale writer loses the compare-and-swap; a writer without the leader's key
    //    writes nothing either.
    let mut kv = etcd.client().await?;
    let stale = write::read(&mut kv, "shop").await?;
    let mut next = t1.clone();
    next.epoch += 1;
    let fake_fence = Fence {
        key: b"/cellplane/shop/leader/not-a-term".to_vec(),
        create_revision: 1,
    };
    assert_eq!(
        write::compare_and_swap(&mut kv, &stale, &next, Some(&fake_fence), 10).await?,
        Swap::NotLeader
    );
    // Someone else (the leader, here the test's own write) moves the table on first.
    let w = write::compare_and_swap(&mut kv, &stale, &next, None, 10).await?;
    assert!(matches!(w, Swap::Written { .. }), "{w:?}");
    let mut other = next.clone();
    other.epoch += 1;
    assert_eq!(
        write::compare_and_swap(&mut kv, &stale, &other, None, 10).await?,
        Swap::Stale,
        "a writer that read before the last write loses"
    );
    assert_eq!(etcd.routing_table().await?.unwrap().epoch, e + 1);

    // 4. A third cell joins the CellSet in us: it enters the table with no slots (no user
    //    is sent to a shard without their rows; slot moves give it some), and no user of
    //    the other cells moves.
    backends.push(Backend::start_on("shop-us-1", &format!("127.0.1.2:{port}")).await?);
    for region in [&us, &eu] {
        apply_yaml(&region.client().await?, "default", &cellset(2, port)).await?;
    }
    assign_lb(&us, "shop-us-1")?;
    let t3 = wait_table(&etcd, "a table with three cells", |t| t.cells.len() == 3).await?;
    assert_eq!(t3.epoch, e + 2);
    assert_eq!(t3.slot_count("shop-us-1"), 0);
    assert_eq!(t3.owners, t1.owners, "no slot moved without its rows");
    let newcomers = users_of(&t3, "shop-us-0", 3);
    acked("r-us", e + 2).await?;
    acked("r-eu", e + 2).await?;
    for user in &newcomers {
        assert_eq!(answered_by(&r_us, user).await?, "shop-us-0");
        assert_eq!(answered_by(&r_eu, user).await?, "shop-us-0");
    }

    // 5. A pin moves one user's slot on purpose (`cellplane pin`, which waits for the
    //    leader's table to carry it); the table says so.
    let cli = |args: &[&str]| -> anyhow::Result<(i32, String, String)> {
        let out = std::process::Command::new(cellplane_e2e::workspace_bin("cellplane"))
            .args([
                "--etcd-endpoints",
                &etcd.endpoints_flag(),
                "--platform",
                "shop",
            ])
            .args(args)
            .output()?;
        Ok((
            out.status.code().unwrap_or(-1),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        ))
    };
    let vip = &newcomers[0];
    let slot = slot_for_key(vip, 16384);
    let (code, stdout, stderr) = cli(&["pin", "--user", vip, "--cell", "shop-eu-0"])?;
    assert_eq!(code, 0, "{stdout}{stderr}");
    assert!(
        stdout.contains(&format!("slot {slot} pinned to shop-eu-0")),
        "{stdout}"
    );
    let (code, _, stderr) = cli(&["pin", "7", "--cell", "shop-nowhere"])?;
    assert_eq!(code, 1);
    assert!(stderr.contains("unknown cell \"shop-nowhere\""), "{stderr}");
    let (code, stdout, _) = cli(&["pin", "--list"])?;
    assert_eq!(code, 0);
    assert!(
        stdout.contains(&format!("slot {slot:>5} -> shop-eu-0")),
        "{stdout}"
    );
    let t4 = wait_table(&etcd, "the pin applied", |t| t.pinned(slot).is_some()).await?;
    assert_eq!(t4.epoch, e + 3);
    assert_eq!(t4.cell_for_slot(slot).name, "shop-eu-0");
    acked("r-us", e + 3).await?;
    assert_eq!(answered_by(&r_us, vip).await?, "shop-eu-0");

    // 6. The SRE's command reads the same state, and refuses what cannot work: a
    //    switchover needs the home's MySQL report (no region reports one in this lab),
    //    an unknown cell is an error. A record written behind the CLI's back is refused
    //    by the leader with the same gate, and nothing changes.
    let (code, stdout, _) = cli(&["route", vip, "-o", "json"])?;
    assert_eq!(code, 0);
    let routed: serde_json::Value = serde_json::from_str(&stdout)?;
    assert_eq!(routed["cell"], "shop-eu-0");
    assert_eq!(routed["pinned"], true);
    assert_eq!(routed["epoch"], t4.epoch);
    // Keys by the router's contract: an empty key is no key, and 256 bytes is the limit.
    let (code, _, stderr) = cli(&["route", ""])?;
    assert_eq!(code, 1, "{stderr}");
    assert!(stderr.contains("the user key is empty"), "{stderr}");
    let (code, _, stderr) = cli(&["route", &"k".repeat(300)])?;
    assert_eq!(code, 1, "{stderr}");
    assert!(
        stderr.contains("300 bytes long; the limit is 256"),
        "{stderr}"
    );
    let (code, _, _) = cli(&["route", &"k".repeat(256)])?;
    assert_eq!(code, 0);
    // A usage error exits 2, apart from a refused gate (3); an unreachable etcd is one
    // line naming the endpoints.
    let (code, _, stderr) = cli(&["switchover"])?;
    assert_eq!(code, 2, "{stderr}");
    let out = std::process::Command::new(cellplane_e2e::workspace_bin("cellplane"))
        .args(["--etcd-endpoints", "http://127.0.0.1:1", "cells"])
        .output()?;
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert_eq!(stderr.lines().count(), 1, "{stderr}");
    assert!(
        stderr.starts_with("error: cannot reach the global etcd at http://127.0.0.1:1"),
        "{stderr}"
    );
    assert_eq!(stderr.matches("grpc request error").count(), 1, "{stderr}");
    let (code, stdout, _) = cli(&["cells"])?;
    assert_eq!(code, 0);
    for cell in ["shop-us-0", "shop-us-1", "shop-eu-0"] {
        assert!(stdout.contains(cell), "{stdout}");
    }
    // Not a terminal: plain text, no colour codes.
    assert!(!stdout.contains('\x1b'), "{stdout:?}");
    let (code, stdout, _) = cli(&["cells", "-o", "yaml"])?;
    assert_eq!(code, 0);
    let listed: Vec<serde_json::Value> = serde_yaml::from_str(&stdout)?;
    let names: Vec<&str> = listed.iter().filter_map(|c| c["cell"].as_str()).collect();
    assert_eq!(names.len(), t4.cells.len(), "{stdout}");
    assert!(names.contains(&"shop-eu-0"), "{stdout}");
    let (code, _, stderr) = cli(&["switchover", "shop-us-9"])?;
    assert_eq!(code, 1);
    assert!(stderr.contains("unknown cell \"shop-us-9\""), "{stderr}");
    let (code, _, stderr) = cli(&["switchover", "shop-us-0", "--dry-run"])?;
    assert_eq!(code, 3, "{stderr}");
    assert!(stderr.contains("home gate"), "{stderr}");
    let op = cellplane_operator::platform::operations::Switchover::new(
        "so-test",
        "shop-us-0",
        "shop-eu-0",
        "e2e",
        Default::default(),
        0,
    );
    etcd.put(
        &cellplane_cells::etcd_keys::drill_key("shop", "so-test"),
        serde_json::to_vec(&op)?,
    )
    .await?;
    let (code, stdout, _) = wait_for("the leader refuses the operation", T, || async {
        let (code, stdout, stderr) = cli(&["drills", "so-test"])?;
        let done = code != 0 || (stdout.contains("result") && !stdout.contains("result: running"));
        Ok(done.then_some((code, stdout, stderr)))
    })
    .await?;
    assert_eq!(code, 3, "{stdout}");
    assert!(stdout.contains("refused by the home gate"), "{stdout}");
    assert_eq!(
        etcd.routing_table().await?.unwrap().epoch,
        t4.epoch,
        "a refusal changes nothing"
    );

    // 7. The leader's operator dies: the other region's operator takes over within the
    //    lease and keeps the table following the inputs (the pin is lifted).
    let leader = ops
        .iter()
        .position(|op| platform_leader(op).ok() == Some(1.0))
        .expect("a leader");
    ops[leader].kill();
    let survivor = &ops[1 - leader];
    wait_for(
        "the other region's operator leads",
        Duration::from_secs(20),
        || async { Ok((platform_leader(survivor)? == 1.0).then_some(())) },
    )
    .await?;
    let (code, stdout, stderr) = cli(&["unpin", "--user", vip])?;
    assert_eq!(code, 0, "{stdout}{stderr}");
    let t5 = wait_table(&etcd, "the pin lifted by the new leader", |t| {
        t.pins.is_empty() && t.epoch > e + 3
    })
    .await?;
    assert_eq!(t5.epoch, e + 4);
    // The lifted pin's slot goes where the placement puts it; nothing else moves.
    let changed: Vec<usize> = (0..t3.owners.len())
        .filter(|&s| t5.cell_for_slot(s as u32).name != t3.cell_for_slot(s as u32).name)
        .collect();
    assert!(
        changed.iter().all(|&s| s == slot as usize),
        "only the pinned slot may change: {changed:?}"
    );
    assert!(t5.pinned(slot).is_none());
    assert!(
        metric_value(
            &survivor.metrics()?,
            "cellplane_operator_routing_table_writes_total"
        )? >= 1.0,
        "the new leader wrote it"
    );
    drop((r_us, r_eu, backends));
    Ok(())
}
