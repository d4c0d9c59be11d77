//! The router's failure paths against real processes: a cell that does not answer in time
//! (504, never retried), no table yet (503 until one arrives), a cell whose only endpoint
//! is dead (503 no_endpoint after the one retry), an exhausted retry budget, requests
//! without a key routed by client address, ejection that expires, and a cell whose every
//! endpoint is ejected still tried (fail open).

use cellplane_cells::routing::{CellEntry, RoutingTable};
use cellplane_e2e::net::{get, one_cell_table, Backend, RouterProc};
use cellplane_e2e::{test_dir, wait_for};
use std::sync::atomic::Ordering;
use std::time::Duration;

const T: Duration = Duration::from_secs(30);
const NO_CHECKS: &str = "healthCheck: {enabled: false}\n";

/// One cell `a` owning every slot, served by `endpoints`.
fn one_cell(endpoints: &[&Backend]) -> RoutingTable {
    let eps = endpoints.iter().map(|b| b.addr.clone()).collect();
    RoutingTable::placed(
        "shop",
        1,
        16384,
        vec![(CellEntry::active("a", "us", eps), 1)],
    )
    .unwrap()
}

async fn retries(r: &RouterProc, reason: &str) -> anyhow::Result<f64> {
    r.metric(&format!(
        "cellplane_router_retries_total{{reason=\"{reason}\"}}"
    ))
    .await
}

async fn rejected(r: &RouterProc, reason: &str) -> anyhow::Result<f64> {
    r.metric(&format!(
        "cellplane_router_rejected_total{{reason=\"{reason}\"}}"
    ))
    .await
}

#[tokio::test(flavor = "multi_thread")]
async fn an_upstream_timeout_is_504_and_never_retried_even_for_a_get() -> anyhow::Result<()> {
    let dir = test_dir("fail-timeout");
    let (a1, a2) = (Backend::start("a1").await?, Backend::start("a2").await?);
    for b in [&a1, &a2] {
        b.delay_ms.store(3000, Ordering::SeqCst);
    }
    let cfg = format!("{NO_CHECKS}timeouts: {{requestMs: 300}}\n");
    let (r, _) = RouterProc::start_on_file(&one_cell(&[&a1, &a2]), "", &cfg, &dir).await?;
    let started = std::time::Instant::now();
    let reply = r.request("alice").await?;
    assert_eq!(reply.status, 504, "{}", reply.body);
    assert!(reply.body.contains("upstream_timeout"), "{}", reply.body);
    assert!(
        started.elapsed() < Duration::from_millis(2500),
        "answered at requestMs"
    );
    let arrived = a1.arrived.load(Ordering::SeqCst) + a2.arrived.load(Ordering::SeqCst);
    assert_eq!(arrived, 1, "sent once: the cell may have acted on it");
    assert_eq!(rejected(&r, "upstream_timeout").await?, 1.0);
    let retries = retries(&r, "idempotent").await?;
    assert_eq!(retries, 0.0);
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn without_a_table_requests_get_503_until_one_arrives() -> anyhow::Result<()> {
    let dir = test_dir("fail-no-table");
    let a = Backend::start("a").await?;
    let file = dir.join("table.json");
    let cfg = format!(
        "{NO_CHECKS}table: {{file: {}, pollMs: 100}}\n",
        file.display()
    );
    let r = RouterProc::start_without_table(&cfg, &dir).await?;
    let ready = get(&format!("http://{}/readyz", r.metrics_addr), &[]).await?;
    assert_eq!(ready.status, 503, "not ready without a table");
    let reply = r.request("alice").await?;
    assert_eq!(reply.status, 503, "{}", reply.body);
    assert!(reply.body.contains("no_table"), "{}", reply.body);
    assert_eq!(reply.headers["retry-after"], "1");
    assert_eq!(rejected(&r, "no_table").await?, 1.0);
    std::fs::write(&file, one_cell_table(&a.addr).encode())?;
    wait_for("the table to be picked up", T, || async {
        Ok((r.request("alice").await?.status == 200).then_some(()))
    })
    .await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn a_dead_only_endpoint_is_retried_once_then_503_no_endpoint() -> anyhow::Result<()> {
    let dir = test_dir("fail-no-endpoint");
    let a = Backend::start("a").await?;
    let (r, _) = RouterProc::start_on_file(&one_cell(&[&a]), "", NO_CHECKS, &dir).await?;
    a.kill();
    let reply = r.request("alice").await?;
    assert_eq!(reply.status, 503, "{}", reply.body);
    assert!(reply.body.contains("no_endpoint"), "{}", reply.body);
    let retries = retries(&r, "connect").await?;
    assert_eq!(
        retries, 1.0,
        "the connect failure was retried, with nowhere else to go"
    );
    assert_eq!(rejected(&r, "no_endpoint").await?, 1.0);
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn an_exhausted_retry_budget_stops_retries() -> anyhow::Result<()> {
    let dir = test_dir("fail-budget");
    let (a1, a2) = (Backend::start("a1").await?, Backend::start("a2").await?);
    // No budget beyond the one token every budget starts with; no ejection, so the dead
    // endpoint keeps being chosen.
    let cfg = format!(
        "{NO_CHECKS}limits: {{retryBudgetRatio: 0, retryBudgetMinPerSec: 0}}\nejection: {{consecutiveFailures: 100000}}\n"
    );
    let (r, _) = RouterProc::start_on_file(&one_cell(&[&a1, &a2]), "", &cfg, &dir).await?;
    a1.kill();
    let mut unreachable = 0;
    for i in 0..60 {
        let reply = r.request(&format!("user-{i}")).await?;
        match reply.status {
            200 => assert_eq!(reply.backend(), Some("a2")),
            502 => {
                assert!(
                    reply.body.contains("upstream_unreachable"),
                    "{}",
                    reply.body
                );
                unreachable += 1;
            }
            other => panic!("unexpected {other}: {}", reply.body),
        }
    }
    let retries = retries(&r, "connect").await?;
    assert_eq!(
        retries, 1.0,
        "the budget's one starting token, then no more"
    );
    assert!(
        unreachable >= 1,
        "requests to the dead endpoint fail once the budget is spent"
    );
    assert_eq!(
        rejected(&r, "upstream_unreachable").await?,
        unreachable as f64
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn without_a_key_the_client_address_picks_the_cell() -> anyhow::Result<()> {
    let dir = test_dir("fail-nokey");
    let (a, b) = (Backend::start("a").await?, Backend::start("b").await?);
    let t = RoutingTable::placed(
        "shop",
        1,
        16384,
        vec![
            (CellEntry::active("a", "us", vec![a.addr.clone()]), 10),
            (CellEntry::active("b", "eu", vec![b.addr.clone()]), 10),
        ],
    )?;
    let cfg = format!("{NO_CHECKS}noKey: clientAddress\n");
    let (r, _) = RouterProc::start_on_file(&t, "", &cfg, &dir).await?;
    let expected = t.route("127.0.0.1").1.name.clone();
    for _ in 0..5 {
        let reply = get(&format!("http://{}/anything", r.addr), &[]).await?;
        assert_eq!(reply.status, 200, "{}", reply.body);
        assert_eq!(reply.headers["x-cellplane-cell"], expected.as_str());
    }
    // The default policy refuses, naming the key source.
    let dir = test_dir("fail-nokey-reject");
    let (strict, _) = RouterProc::start_on_file(&t, "", NO_CHECKS, &dir).await?;
    let reply = get(&format!("http://{}/anything", strict.addr), &[]).await?;
    assert_eq!(reply.status, 400);
    assert!(reply.body.contains("no_user_key"), "{}", reply.body);
    assert!(
        reply
            .body
            .contains("no user key: send the x-user-id header"),
        "{}",
        reply.body
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn ejection_expires_and_a_cell_with_every_endpoint_ejected_fails_open() -> anyhow::Result<()>
{
    let dir = test_dir("fail-eject");
    let (a1, a2) = (Backend::start("a1").await?, Backend::start("a2").await?);
    let (addr1, addr2) = (a1.addr.clone(), a2.addr.clone());
    let cfg = format!(
        "{NO_CHECKS}ejection: {{consecutiveFailures: 1, baseEjectionMs: 400, maxEjectionMs: 400, maxEjectionPercent: 100}}\n"
    );
    let (r, _) = RouterProc::start_on_file(&one_cell(&[&a1, &a2]), "", &cfg, &dir).await?;
    let ejections = || r.metric(r#"cellplane_router_ejections_total{cell="a"}"#);

    // a1 dies: the first request that picks it ejects it (and is retried on a2).
    a1.kill();
    wait_for("a1 ejected", T, || async {
        let reply = r.request("alice").await?;
        assert_eq!(reply.status, 200, "{}", reply.body);
        Ok((ejections().await? >= 1.0).then_some(()))
    })
    .await?;
    // a1 comes back at the same address: once its ejection expires it gets traffic again.
    let a1 = Backend::start_on("a1", &addr1).await?;
    wait_for(
        "a1 back in rotation after its ejection expired",
        T,
        || async {
            assert_eq!(r.request("alice").await?.status, 200);
            Ok((a1.hits.load(Ordering::SeqCst) > 0).then_some(()))
        },
    )
    .await?;

    // Both die and both get ejected (for a long time now).
    drop(r);
    let dir = test_dir("fail-eject-open");
    let cfg = format!(
        "{NO_CHECKS}ejection: {{consecutiveFailures: 1, baseEjectionMs: 120000, maxEjectionMs: 120000, maxEjectionPercent: 100}}\n"
    );
    let (r, _) = RouterProc::start_on_file(&one_cell(&[&a1, &a2]), "", &cfg, &dir).await?;
    a1.kill();
    a2.kill();
    wait_for("both endpoints ejected", T, || async {
        let reply = r.request("alice").await?;
        assert_ne!(reply.status, 200);
        let n = r
            .metric(r#"cellplane_router_ejections_total{cell="a"}"#)
            .await?;
        Ok((n >= 2.0).then_some(()))
    })
    .await?;
    // Both come back: although both are still ejected, the cell is tried (fail open) and
    // answers at once, instead of 503 until the ejections expire.
    let _a1 = Backend::start_on("a1", &addr1).await?;
    let _a2 = Backend::start_on("a2", &addr2).await?;
    let reply = r.request("alice").await?;
    assert_eq!(reply.status, 200, "fail open: {}", reply.body);
    Ok(())
}
