//! Router control-plane timings on real processes (not a timed test; `make bench`):
//! - table propagation: one etcd write -> the new epoch applied by each of 10 routers;
//! - failure detection: an endpoint's process killed -> the router sends it nothing more.
//!
//! Prints p50/p99 over the runs.

use cellplane_cells::etcd_keys::routing_key;
use cellplane_cells::routing::{CellEntry, RoutingTable};
use cellplane_e2e::net::{Backend, Etcd, RouterProc};
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

fn percentile(sorted: &[f64], p: f64) -> f64 {
    sorted[((sorted.len() as f64 - 1.0) * p).round() as usize]
}

fn table(epoch: u64, endpoints: Vec<String>) -> RoutingTable {
    RoutingTable::placed(
        "shop",
        epoch,
        16384,
        vec![(CellEntry::active("a", "r", endpoints), 10)],
    )
    .unwrap()
}

async fn epoch_of(r: &RouterProc) -> u64 {
    r.metric("cellplane_router_table_epoch")
        .await
        .unwrap_or(0.0) as u64
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let dir = std::env::temp_dir().join(format!("cellplane-bench-prop-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let etcd = Etcd::start().await?;
    let backend = Backend::start("a1").await?;
    etcd.put(
        &routing_key("shop"),
        table(1, vec![backend.addr.clone()]).encode(),
    )
    .await?;
    let cfg = format!("table: {{etcd: {{endpoints: ['{}'], platform: shop}}}}\nhealthCheck: {{intervalMs: 200, unhealthyThreshold: 2}}\n", etcd.endpoint);
    let mut routers = Vec::new();
    for _ in 0..10 {
        routers.push(RouterProc::start(&cfg, &dir).await?);
    }

    // Propagation: write epoch N, poll every router until it reports N.
    let mut samples = Vec::new();
    for epoch in 2..=21u64 {
        let start = Instant::now();
        etcd.put(
            &routing_key("shop"),
            table(epoch, vec![backend.addr.clone()]).encode(),
        )
        .await?;
        let mut pending: Vec<&RouterProc> = routers.iter().collect();
        while !pending.is_empty() {
            let mut still = Vec::new();
            for r in pending {
                if epoch_of(r).await >= epoch {
                    samples.push(start.elapsed().as_secs_f64() * 1000.0);
                } else {
                    still.push(r);
                }
            }
            pending = still;
            anyhow::ensure!(
                start.elapsed() < Duration::from_secs(30),
                "epoch {epoch} did not propagate"
            );
        }
    }
    samples.sort_by(f64::total_cmp);
    println!(
        "table propagation, etcd write -> applied, 10 routers x 20 writes: p50 {:.1} ms, p99 {:.1} ms (includes ~1 ms metric polling)",
        percentile(&samples, 0.5),
        percentile(&samples, 0.99)
    );

    // Failure detection: two endpoints; kill one; time until no request reaches it.
    let mut detect = Vec::new();
    for round in 0..5u64 {
        let (x, y) = (Backend::start("x").await?, Backend::start("y").await?);
        etcd.put(
            &routing_key("shop"),
            table(100 + round, vec![x.addr.clone(), y.addr.clone()]).encode(),
        )
        .await?;
        let r = &routers[0];
        let applied = Instant::now();
        while epoch_of(r).await < 100 + round {
            anyhow::ensure!(
                applied.elapsed() < Duration::from_secs(30),
                "table {} not applied",
                100 + round
            );
        }
        let killed = Instant::now();
        x.kill();
        // Traffic keeps flowing; detection is when the router stops dialing the dead endpoint
        // (no connect retries over 20 consecutive requests).
        let mut clean = 0;
        while clean < 20 {
            let before = r
                .metric("cellplane_router_retries_total{reason=\"connect\"}")
                .await?;
            r.request(&format!("user-{}", rand_user(clean))).await?;
            let after = r
                .metric("cellplane_router_retries_total{reason=\"connect\"}")
                .await?;
            clean = if after > before { 0 } else { clean + 1 };
            anyhow::ensure!(
                killed.elapsed() < Duration::from_secs(30),
                "dead endpoint never left rotation"
            );
        }
        detect.push(killed.elapsed().as_secs_f64() * 1000.0);
        assert!(y.hits.load(Ordering::SeqCst) > 0);
    }
    detect.sort_by(f64::total_cmp);
    println!(
        "failure detection, endpoint killed -> no more requests to it (active checks 200 ms x 2 + passive ejection), 5 runs: p50 {:.0} ms, max {:.0} ms",
        percentile(&detect, 0.5),
        detect[detect.len() - 1]
    );
    let _ = std::fs::remove_dir_all(dir);
    Ok(())
}

fn rand_user(i: u32) -> u32 {
    i.wrapping_mul(2654435761) % 10_000
}
