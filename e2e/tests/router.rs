//! The router binary against real etcd and real HTTP backends: pinning across restarts
//! and routers, outlier ejection, table flips, 421 refresh, etcd loss, bad tables, limits.

use anyhow::Context as _;
use cellplane_cells::crd::CellPhase;
use cellplane_cells::etcd_keys::routing_key;
use cellplane_cells::routing::{CellEntry, RoutingTable};
use cellplane_e2e::net::{send, Backend, Etcd, RouterProc};
use cellplane_e2e::{test_dir, wait_for};
use std::sync::atomic::Ordering;
use std::time::Duration;

const T: Duration = Duration::from_secs(30);

/// Cells `a` (endpoints a1, a2) and `b` (b1), each the other's standby.
fn table(epoch: u64, a: &[&Backend], b: &[&Backend]) -> RoutingTable {
    let entry = |name: &str, region: &str, eps: &[&Backend], standby: &str| CellEntry {
        standby: Some(standby.into()),
        ..CellEntry::active(name, region, eps.iter().map(|b| b.addr.clone()).collect())
    };
    let cells = vec![
        (entry("a", "us", a, "b"), 10),
        (entry("b", "eu", b, "a"), 10),
    ];
    RoutingTable::placed("shop", epoch, 16384, cells).unwrap()
}

/// Publishes `t` in etcd and starts a router watching it.
async fn router_on_etcd(
    etcd: &Etcd,
    t: &RoutingTable,
    dir: &std::path::Path,
) -> anyhow::Result<RouterProc> {
    etcd.put(&routing_key("shop"), t.encode()).await?;
    let cfg = format!(
        "table: {{etcd: {{endpoints: ['{}'], platform: shop}}}}\n",
        etcd.endpoint
    );
    RouterProc::start(&cfg, dir).await
}

fn users(n: usize) -> Vec<String> {
    (0..n).map(|i| format!("user-{i}")).collect()
}

async fn wait_epoch(r: &RouterProc, epoch: u64) -> anyhow::Result<()> {
    wait_for(&format!("router at epoch {epoch}"), T, || async {
        Ok((r.metric("cellplane_router_table_epoch").await? as u64 == epoch).then_some(()))
    })
    .await
}

#[tokio::test(flavor = "multi_thread")]
async fn pins_users_across_routers_and_restarts_and_survives_etcd_loss() -> anyhow::Result<()> {
    let dir = test_dir("pin");
    let mut etcd = Etcd::start().await?;
    let (a1, a2, b1) = (
        Backend::start("a1").await?,
        Backend::start("a2").await?,
        Backend::start("b1").await?,
    );
    let t = table(1, &[&a1, &a2], &[&b1]);
    etcd.put(&routing_key("shop"), t.encode()).await?;
    let endpoint = etcd.endpoint.clone();
    let cfg = |cache: &str| {
        format!(
            "table: {{etcd: {{endpoints: ['{endpoint}'], platform: shop}}, cacheFile: {}}}\n",
            dir.join(cache).display()
        )
    };
    let r1 = RouterProc::start(&cfg("r1.json"), &dir).await?;
    let mut r2 = RouterProc::start(&cfg("r2.json"), &dir).await?;

    let mut placed = Vec::new();
    for u in users(200) {
        let want = t.route(&u).1.name.clone();
        let (x, y) = (r1.request(&u).await?, r2.request(&u).await?);
        assert_eq!(x.status, 200, "{}", x.body);
        let cell = |r: &cellplane_e2e::net::Reply| r.backend().unwrap()[..1].to_string();
        assert_eq!(cell(&x), want, "{u} on router 1");
        assert_eq!(cell(&y), want, "{u} on router 2");
        assert_eq!(x.headers.get("x-cellplane-cell").unwrap(), want.as_str());
        assert_eq!(
            x.headers.get("x-seen-slot").unwrap().to_str()?,
            t.route(&u).0.to_string()
        );
        placed.push((u, want));
    }
    assert!(placed.iter().any(|(_, c)| c == "a") && placed.iter().any(|(_, c)| c == "b"));

    // etcd dies: routing continues on the last table.
    etcd.kill();
    for (u, want) in placed.iter().take(50) {
        assert_eq!(&r1.request(u).await?.backend().unwrap()[..1], want.as_str());
    }
    // A router restarted while etcd is down routes from its disk cache, identically.
    r2.kill();
    let r2 = RouterProc::start(&cfg("r2.json"), &dir).await?;
    for (u, want) in &placed {
        assert_eq!(
            &r2.request(u).await?.backend().unwrap()[..1],
            want.as_str(),
            "{u} after restart"
        );
    }
    assert_eq!(r2.metric("cellplane_router_etcd_watch_up").await?, 0.0);
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn killed_endpoint_is_ejected_and_traffic_stays_healthy() -> anyhow::Result<()> {
    let dir = test_dir("eject");
    let etcd = Etcd::start().await?;
    let (a1, a2, b1) = (
        Backend::start("a1").await?,
        Backend::start("a2").await?,
        Backend::start("b1").await?,
    );
    let t = table(1, &[&a1, &a2], &[&b1]);
    let r = router_on_etcd(&etcd, &t, &dir).await?;
    let a_users: Vec<String> = users(400)
        .into_iter()
        .filter(|u| t.route(u).1.name == "a")
        .take(60)
        .collect();

    a1.kill();
    for u in &a_users {
        let reply = r.request(u).await?;
        assert_eq!(
            reply.status, 200,
            "connect failures are retried on the healthy endpoint: {}",
            reply.body
        );
        assert_eq!(reply.backend(), Some("a2"));
    }
    assert!(
        r.metric("cellplane_router_ejections_total{cell=\"a\"}")
            .await?
            >= 1.0,
        "a1 was ejected"
    );
    let retries = r
        .metric("cellplane_router_retries_total{reason=\"connect\"}")
        .await?;
    assert!(
        retries >= 1.0 && retries < a_users.len() as f64,
        "ejection stops the retries: {retries}"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn a_table_flip_moves_exactly_the_flipped_slots_and_bad_tables_are_refused(
) -> anyhow::Result<()> {
    let dir = test_dir("flip");
    let etcd = Etcd::start().await?;
    let (a1, b1) = (Backend::start("a1").await?, Backend::start("b1").await?);
    let t1 = table(1, &[&a1], &[&b1]);
    let r = router_on_etcd(&etcd, &t1, &dir).await?;

    // A bad table (a slot owned by a FailedOver cell) is refused; the last good one stays.
    let mut bad = t1.clone();
    bad.epoch = 5;
    bad.cells[0].state = CellPhase::FailedOver;
    etcd.put(&routing_key("shop"), bad.encode()).await?;
    etcd.put(&routing_key("shop"), b"{not json".to_vec())
        .await?;
    wait_for("two refused tables", T, || async {
        Ok((r.metric("cellplane_router_tables_refused_total").await? >= 2.0).then_some(()))
    })
    .await?;
    assert_eq!(r.metric("cellplane_router_table_epoch").await?, 1.0);

    // Fail cell a over to b: every a-slot moves to b, no b-slot moves.
    let t2 = t1.failed_over("a")?;
    etcd.put(&routing_key("shop"), t2.encode()).await?;
    wait_epoch(&r, 2).await?;
    let mut moved = 0;
    for u in users(300) {
        let before = t1.route(&u).1.name.clone();
        let got = r.request(&u).await?;
        assert_eq!(got.backend(), Some("b1"), "{u}");
        assert_eq!(got.headers.get("x-cellplane-cell").unwrap(), "b");
        moved += usize::from(before == "a");
    }
    assert!(moved > 0);
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn a_421_refreshes_the_table_and_retries_once() -> anyhow::Result<()> {
    let dir = test_dir("421");
    let (a1, b1) = (Backend::start("a1").await?, Backend::start("b1").await?);
    let t1 = table(1, &[&a1], &[&b1]);
    // Poll rarely: only the 421 path can pick up the new table in time.
    let (r, file) = RouterProc::start_on_file(&t1, ", pollMs: 600000", "", &dir).await?;
    let user = users(100)
        .into_iter()
        .find(|u| t1.route(u).1.name == "a")
        .unwrap();
    assert_eq!(r.request(&user).await?.backend(), Some("a1"));

    // Ownership moves at epoch 2; the old home fences requests routed at epoch 1.
    std::fs::write(&file, t1.failed_over("a")?.encode())?;
    a1.min_epoch.store(2, Ordering::SeqCst);
    let reply = r.request(&user).await?;
    assert_eq!(reply.status, 200);
    assert_eq!(
        reply.backend(),
        Some("b1"),
        "re-routed to the new home after the refresh"
    );
    assert_eq!(
        r.metric("cellplane_router_retries_total{reason=\"misdirected\"}")
            .await?,
        1.0
    );
    assert_eq!(r.metric("cellplane_router_table_epoch").await?, 2.0);
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn bad_requests_get_4xx_with_the_reason() -> anyhow::Result<()> {
    let dir = test_dir("4xx");
    let (a1, b1) = (Backend::start("a1").await?, Backend::start("b1").await?);
    // One failure would eject an endpoint: a client's bad body must never be one.
    let limits = "limits: {perKeyRps: 1, perKeyBurst: 2, maxBodyBytes: 1024, replayBufferBytes: 512}\ntimeouts: {headerReadMs: 800}\nejection: {consecutiveFailures: 1}\n";
    let (r, _) = RouterProc::start_on_file(&table(1, &[&a1], &[&b1]), "", limits, &dir).await?;
    let url = format!("http://{}/x", r.addr);
    let no_key = send("GET", &url, &[], bytes::Bytes::new()).await?;
    assert_eq!(no_key.status, 400);
    // The answer names the configured key source (the default: the x-user-id header).
    assert!(
        no_key
            .body
            .contains("no user key: send the x-user-id header"),
        "{}",
        no_key.body
    );

    let big = send(
        "POST",
        &url,
        &[("x-user-id", "big")],
        bytes::Bytes::from(vec![b'x'; 2048]),
    )
    .await?;
    assert_eq!(big.status, 413);
    let ok = send(
        "POST",
        &url,
        &[("x-user-id", "small")],
        bytes::Bytes::from(vec![b'x'; 100]),
    )
    .await?;
    assert_eq!(ok.status, 200);
    assert!(
        ok.body.ends_with(" 100"),
        "the body reached the cell: {}",
        ok.body
    );

    // A body streamed past maxBodyBytes without a length (chunked) is 413 as well, and
    // counts against no endpoint, however often a client sends one.
    for user in ["stream-1", "stream-2", "stream-3"] {
        let (status, answer) = chunked_post(&r.addr, user, 4096).await?;
        assert_eq!(status, 413, "{answer}");
        assert!(
            answer.contains("request body exceeds 1024 bytes"),
            "{answer}"
        );
    }
    let (status, answer) = chunked_post(&r.addr, "stream-ok", 900).await?;
    assert_eq!(
        status, 200,
        "a streamed body under the limit reaches the cell: {answer}"
    );
    assert!(answer.ends_with(" 900"), "{answer}");
    for cell in ["a", "b"] {
        assert_eq!(
            r.metric(&format!(
                "cellplane_router_ejections_total{{cell=\"{cell}\"}}"
            ))
            .await
            .unwrap_or(0.0),
            0.0,
            "client bodies ejected an endpoint of {cell}"
        );
    }
    assert_eq!(
        r.metric("cellplane_router_rejected_total{reason=\"body_too_large\"}")
            .await?,
        4.0,
        "the Content-Length one and three streamed"
    );

    // A client that announces a body and then stalls gets 408, and nothing reaches a cell.
    let hits_before = a1.hits.load(Ordering::SeqCst) + b1.hits.load(Ordering::SeqCst);
    let mut slow = tokio::net::TcpStream::connect(&r.addr).await?;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    slow.write_all(
        b"POST /x HTTP/1.1\r\nhost: x\r\nx-user-id: slow\r\ncontent-length: 100\r\n\r\nonly-a-few",
    )
    .await?;
    let mut answer = vec![0u8; 512];
    let n = tokio::time::timeout(T, slow.read(&mut answer)).await??;
    let answer = String::from_utf8_lossy(&answer[..n]);
    assert!(answer.starts_with("HTTP/1.1 408"), "{answer}");
    assert_eq!(
        a1.hits.load(Ordering::SeqCst) + b1.hits.load(Ordering::SeqCst),
        hits_before
    );

    let mut statuses = vec![];
    for _ in 0..4 {
        statuses.push(send("GET", &url, &[("x-user-id", "hot")], bytes::Bytes::new()).await?);
    }
    assert_eq!(
        statuses.iter().filter(|s| s.status == 200).count(),
        2,
        "burst of 2"
    );
    let limited = statuses
        .iter()
        .find(|s| s.status == 429)
        .expect("429 after the burst");
    assert!(limited.headers.contains_key("retry-after"));
    assert_eq!(
        send("GET", &url, &[("x-user-id", "other")], bytes::Bytes::new())
            .await?
            .status,
        200,
        "other users unaffected"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn a_saturated_cell_fails_fast_while_other_cells_serve() -> anyhow::Result<()> {
    let dir = test_dir("breaker");
    let (a1, b1) = (Backend::start("a1").await?, Backend::start("b1").await?);
    let t = table(1, &[&a1], &[&b1]);
    let (r, _) =
        RouterProc::start_on_file(&t, "", "limits: {maxInFlightPerCell: 2}\n", &dir).await?;
    a1.delay_ms.store(1500, Ordering::SeqCst);
    let a_user = users(100)
        .into_iter()
        .find(|u| t.route(u).1.name == "a")
        .unwrap();
    let b_user = users(100)
        .into_iter()
        .find(|u| t.route(u).1.name == "b")
        .unwrap();
    let url = format!("http://{}/slow", r.addr);
    let mut calls = Vec::new();
    for _ in 0..2 {
        let (url, user) = (url.clone(), a_user.clone());
        calls.push(tokio::spawn(async move {
            send("GET", &url, &[("x-user-id", &user)], bytes::Bytes::new()).await
        }));
    }
    // Both slow requests are in flight once the cell has seen them.
    wait_for("two requests in flight at cell a", T, || async {
        Ok((a1.arrived.load(Ordering::SeqCst) >= 2).then_some(()))
    })
    .await?;
    let refused = r.request(&a_user).await?;
    assert_eq!(
        refused.status, 503,
        "third request to the saturated cell fails fast: {}",
        refused.body
    );
    assert!(refused.body.contains("cell_overloaded"));
    assert!(refused.headers.contains_key("retry-after"));
    assert_eq!(
        r.request(&b_user).await?.status,
        200,
        "other cells are unaffected"
    );
    for c in calls {
        assert_eq!(c.await??.status, 200);
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn requests_for_a_frozen_cell_are_held_and_released_to_the_new_home() -> anyhow::Result<()> {
    let dir = test_dir("hold");
    let etcd = Etcd::start().await?;
    let (a1, b1) = (Backend::start("a1").await?, Backend::start("b1").await?);
    let t1 = table(1, &[&a1], &[&b1]);
    etcd.put(&routing_key("shop"), t1.encode()).await?;
    let cfg = format!(
        "table: {{etcd: {{endpoints: ['{}'], platform: shop}}}}\ntimeouts: {{holdMs: 3000}}\n",
        etcd.endpoint
    );
    let r = RouterProc::start(&cfg, &dir).await?;
    let a_user = users(100)
        .into_iter()
        .find(|u| t1.route(u).1.name == "a")
        .unwrap();
    let b_user = users(100)
        .into_iter()
        .find(|u| t1.route(u).1.name == "b")
        .unwrap();

    // Planned failover of a: freeze its slots first.
    let t2 = t1.frozen("a")?;
    etcd.put(&routing_key("shop"), t2.encode()).await?;
    wait_epoch(&r, 2).await?;
    let url = format!("http://{}/cart", r.addr);
    let held = {
        let (url, user) = (url.clone(), a_user.clone());
        tokio::spawn(async move {
            send(
                "POST",
                &url,
                &[("x-user-id", &user)],
                bytes::Bytes::from_static(b"order"),
            )
            .await
        })
    };
    wait_for("request held", T, || async {
        Ok((r.metric("cellplane_router_held_total").await? >= 1.0).then_some(()))
    })
    .await?;
    assert_eq!(
        a1.arrived.load(Ordering::SeqCst),
        0,
        "nothing reaches the frozen cell"
    );
    assert_eq!(
        r.request(&b_user).await?.status,
        200,
        "other cells are not held"
    );

    // The flip: a's slots move to b in one new epoch; the held request goes to b.
    etcd.put(&routing_key("shop"), t2.failed_over("a")?.encode())
        .await?;
    let reply = held.await??;
    assert_eq!(reply.status, 200, "{}", reply.body);
    assert_eq!(reply.backend(), Some("b1"));
    assert_eq!(
        a1.arrived.load(Ordering::SeqCst),
        0,
        "never sent to the cell that lost ownership"
    );

    // A freeze that is never resolved ends in 503 + Retry-After after the hold time.
    etcd.put(
        &routing_key("shop"),
        t2.failed_over("a")?.frozen("b")?.encode(),
    )
    .await?;
    wait_epoch(&r, 4).await?;
    let timed_out = r.request(&b_user).await?;
    assert_eq!(timed_out.status, 503);
    assert!(timed_out.body.contains("hold_timeout"));
    assert!(timed_out.headers.contains_key("retry-after"));
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn active_health_checks_take_a_dead_endpoint_out_before_requests_hit_it() -> anyhow::Result<()>
{
    let dir = test_dir("health");
    let (a1, a2, b1) = (
        Backend::start("a1").await?,
        Backend::start("a2").await?,
        Backend::start("b1").await?,
    );
    let t = table(1, &[&a1, &a2], &[&b1]);
    let checks = "healthCheck: {intervalMs: 100, unhealthyThreshold: 2, healthyThreshold: 1}\n";
    let (r, _) = RouterProc::start_on_file(&t, "", checks, &dir).await?;
    a1.kill();
    wait_for("a1 marked down by active checks", T, || async {
        Ok((r
            .metric("cellplane_router_health_transitions_total{reason=\"down\"}")
            .await?
            >= 1.0)
            .then_some(()))
    })
    .await?;
    for u in users(300)
        .into_iter()
        .filter(|u| t.route(u).1.name == "a")
        .take(40)
    {
        let reply = r.request(&u).await?;
        assert_eq!(reply.backend(), Some("a2"), "{}", reply.body);
    }
    assert_eq!(
        r.metric("cellplane_router_retries_total{reason=\"connect\"}")
            .await?,
        0.0,
        "no request had to fail over"
    );
    Ok(())
}

/// A router tells the platform leader which cells it sees down (every endpoint ejected by
/// its health checks) in its acknowledgement: with two other regions' routers agreeing, a
/// cell holding no ownership lease counts as lost. A cell with one endpoint alive is not
/// down.
#[tokio::test(flavor = "multi_thread")]
async fn a_router_acknowledges_the_cells_it_sees_down() -> anyhow::Result<()> {
    let dir = test_dir("down");
    let etcd = Etcd::start().await?;
    let (a1, a2, b1) = (
        Backend::start("a1").await?,
        Backend::start("a2").await?,
        Backend::start("b1").await?,
    );
    etcd.put(&routing_key("shop"), table(1, &[&a1, &a2], &[&b1]).encode())
        .await?;
    let cfg = format!(
        "table: {{etcd: {{endpoints: ['{}'], platform: shop, routerId: r-eu, region: eu, ackTtlSecs: 3}}}}\nhealthCheck: {{intervalMs: 100, unhealthyThreshold: 2, healthyThreshold: 1}}\n",
        etcd.endpoint
    );
    let _r = RouterProc::start(&cfg, &dir).await?;
    let ack = || async {
        let bytes = etcd
            .get(&cellplane_cells::etcd_keys::router_key("shop", "r-eu"))
            .await?
            .context("no acknowledgement")?;
        anyhow::Ok(serde_json::from_slice::<
            cellplane_cells::etcd_keys::RouterAck,
        >(&bytes)?)
    };
    wait_for("the first acknowledgement", T, || async {
        Ok(ack().await.ok().filter(|a| a.applied_epoch == 1))
    })
    .await?;
    assert!(ack().await?.down.is_empty());
    a1.kill();
    b1.kill();
    let seen = wait_for("b acknowledged down", T, || async {
        Ok(ack().await.ok().filter(|a| !a.down.is_empty()))
    })
    .await?;
    assert_eq!(seen.down, ["b"], "a still has a2");
    Ok(())
}

/// One raw HTTP/1.1 request (its head as bytes, so header values may carry any byte) on a
/// fresh connection; the status and the head and body as text.
async fn raw_request(
    addr: &str,
    target: &str,
    header: Option<&[u8]>,
) -> anyhow::Result<(u16, String)> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut head =
        format!("GET {target} HTTP/1.1\r\nhost: x\r\nconnection: close\r\n").into_bytes();
    if let Some(value) = header {
        head.extend_from_slice(b"x-user-id: ");
        head.extend_from_slice(value);
        head.extend_from_slice(b"\r\n");
    }
    head.extend_from_slice(b"\r\n");
    let mut stream = tokio::net::TcpStream::connect(addr).await?;
    stream.write_all(&head).await?;
    let mut answer = vec![];
    tokio::time::timeout(T, stream.read_to_end(&mut answer)).await??;
    let answer = String::from_utf8_lossy(&answer).into_owned();
    let status = answer.get(9..12).and_then(|s| s.parse().ok()).unwrap_or(0);
    Ok((status, answer))
}

/// The user-key contract (README, "User keys") on both serving paths: header keys are
/// their raw UTF-8 bytes, path and query keys are percent-decoded, the longest key passes
/// and a longer one, bytes that are not UTF-8 or a broken percent-encoding get 400 naming
/// the rule; the slot of every key is the one an independent XXH3 (Python's `xxhash`,
/// `cells/testdata/slot-vectors.tsv`) gives.
#[tokio::test(flavor = "multi_thread")]
async fn user_keys_follow_one_contract_on_both_serving_paths() -> anyhow::Result<()> {
    let vectors: std::collections::HashMap<String, u32> = std::fs::read_to_string(
        cellplane_e2e::repo_root().join("cells/testdata/slot-vectors.tsv"),
    )?
    .lines()
    .filter(|l| !l.starts_with('#'))
    .filter_map(|l| l.split_once('\t'))
    .map(|(k, s)| (k.to_string(), s.parse().expect("slot")))
    .collect();
    let cell = Backend::start("a").await?;
    let keys = "keys: [{from: header, name: x-user-id}, {from: pathSegment, name: 1}, {from: query, name: user}]\n";
    let table = cellplane_e2e::net::one_cell_table(&cell.addr);
    let (direct, _) = RouterProc::start_on_file(&table, "", keys, &test_dir("keys-direct")).await?;
    let (hyper, _) = RouterProc::start_on_file(
        &table,
        "",
        &format!("{keys}directHttp1: false\n"),
        &test_dir("keys-hyper"),
    )
    .await?;

    let longest = "k".repeat(256);
    let routed: Vec<(&str, String, Option<Vec<u8>>)> = vec![
        (
            "Ünïcødé",
            "/users".into(),
            Some("Ünïcødé".as_bytes().to_vec()),
        ),
        (
            "用户42",
            "/users".into(),
            Some("用户42".as_bytes().to_vec()),
        ),
        (
            "😀 emoji",
            "/users".into(),
            Some("😀 emoji".as_bytes().to_vec()),
        ),
        (&longest, "/users".into(), Some(longest.as_bytes().to_vec())),
        ("é", "/users/%C3%A9/profile".into(), None),
        ("é", "/users/%c3%a9/profile".into(), None),
        ("用户42", "/users/%E7%94%A8%E6%88%B742/cart".into(), None),
        ("a/b", "/users/a%2Fb/cart".into(), None),
        ("100%", "/users/100%25/cart".into(), None),
        (
            "café au lait",
            "/search?user=caf%C3%A9%20au%20lait".into(),
            None,
        ),
        (&longest, format!("/users/{}/x", "%6B".repeat(256)), None),
        ("alice", "/users/alice/profile".into(), None),
    ];
    let refused: Vec<(String, Option<Vec<u8>>, &str)> = vec![
        (
            "/users".into(),
            Some(vec![b'k'; 257]),
            "the user key is 257 bytes long; the limit is 256 bytes",
        ),
        (
            format!("/users/{}/x", "%6B".repeat(257)),
            None,
            "the user key is 257 bytes long",
        ),
        (
            "/users".into(),
            Some(b"J\xf6rg".to_vec()),
            "in the x-user-id header: the user key is not valid UTF-8",
        ),
        (
            "/users/%FF/x".into(),
            None,
            "in path segment 1 (0-based): the user key is not valid UTF-8",
        ),
        ("/users/50%/x".into(), None, "malformed percent-encoding"),
        (
            "/x?user=%G1".into(),
            None,
            "in the user query parameter: the user key has a malformed percent-encoding",
        ),
    ];
    let mut failures = vec![];
    for (path, router) in [("direct", &direct), ("hyper", &hyper)] {
        for (key, target, header) in &routed {
            let want = vectors[*key];
            let (status, answer) = raw_request(&router.addr, target, header.as_deref()).await?;
            let seen = answer
                .lines()
                .find_map(|l| l.strip_prefix("x-seen-slot: "))
                .and_then(|s| s.trim().parse::<u32>().ok());
            if status != 200 || seen != Some(want) {
                failures.push(format!(
                    "{path} {target} ({key}): {status}, slot {seen:?}, want {want}"
                ));
            }
        }
        for (target, header, why) in &refused {
            let (status, answer) = raw_request(&router.addr, target, header.as_deref()).await?;
            if status != 400 || !answer.contains(why) || answer.contains("no user key") {
                failures.push(format!(
                    "{path} {target}: {status} {answer:?}, want 400 with {why:?}"
                ));
            }
        }
        // "No user key" only when no source holds one.
        let (status, answer) = raw_request(&router.addr, "/", None).await?;
        if status != 400 || !answer.contains("no user key: send the x-user-id header or path segment 1 (0-based) or the user query parameter") {
            failures.push(format!("{path} no key: {status} {answer:?}"));
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
    assert_eq!(
        direct
            .metric("cellplane_router_rejected_total{reason=\"bad_user_key\"}")
            .await?,
        refused.len() as f64
    );
    Ok(())
}

/// POSTs `size` bytes as a chunked body (no Content-Length, in 256-byte chunks) as `user`;
/// the status and the whole answer.
async fn chunked_post(addr: &str, user: &str, size: usize) -> anyhow::Result<(u16, String)> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = tokio::net::TcpStream::connect(addr).await?;
    let head = format!(
        "POST /upload HTTP/1.1\r\nhost: x\r\nx-user-id: {user}\r\ntransfer-encoding: chunked\r\nconnection: close\r\n\r\n"
    );
    stream.write_all(head.as_bytes()).await?;
    let mut sent = 0;
    while sent < size {
        let n = 256.min(size - sent);
        let chunk = format!("{n:x}\r\n{}\r\n", "x".repeat(n));
        // The router may answer and close before the whole body is sent.
        if stream.write_all(chunk.as_bytes()).await.is_err() {
            break;
        }
        sent += n;
    }
    let _ = stream.write_all(b"0\r\n\r\n").await;
    let mut answer = vec![];
    let _ = tokio::time::timeout(T, stream.read_to_end(&mut answer)).await?;
    let answer = String::from_utf8_lossy(&answer).into_owned();
    let status = answer.get(9..12).and_then(|s| s.parse().ok()).unwrap_or(0);
    Ok((status, answer))
}
