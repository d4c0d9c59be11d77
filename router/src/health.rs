//! Active health checks (I/O): every interval, `GET <path>` on each endpoint of the current
//! table; consecutive failures take an endpoint out of rotation, consecutive passes bring
//! it back. Passive ejection (endpoints.rs) covers what happens between checks.

use crate::state::Router;
use bytes::Bytes;
use http_body_util::Empty;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

pub async fn run(router: Arc<Router>) {
    let hc = router.config.health_check.clone();
    if !hc.enabled {
        return;
    }
    let client: Client<_, Empty<Bytes>> = Client::builder(TokioExecutor::new()).build_http();
    let timeout = Duration::from_millis(hc.timeout_ms.max(1));
    let mut tick = tokio::time::interval(Duration::from_millis(hc.interval_ms));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let Some(table) = router.tables.get() else {
            continue;
        };
        let addrs: HashSet<String> = table
            .cells
            .iter()
            .flat_map(|c| c.endpoints.iter().cloned())
            .collect();
        let checks = addrs.into_iter().map(|addr| {
            let client = client.clone();
            let uri = format!("http://{addr}{}", hc.path);
            async move {
                let ok = match uri.parse::<http::Uri>() {
                    Ok(uri) => matches!(tokio::time::timeout(timeout, client.get(uri)).await, Ok(Ok(r)) if r.status().is_success()),
                    Err(_) => false,
                };
                (addr, ok)
            }
        });
        for (addr, ok) in join_spawned(checks).await {
            let state = router.endpoints.state(&addr);
            if let Some(down) = router.endpoints.record_check(
                &state,
                ok,
                hc.unhealthy_threshold,
                hc.healthy_threshold,
            ) {
                router
                    .metrics
                    .health_transitions
                    .get_or_create(&crate::metrics::ReasonLabel {
                        reason: if down { "down" } else { "up" },
                    })
                    .inc();
                tracing::warn!(%addr, healthy = !down, "active health check changed endpoint state");
            }
        }
    }
}

/// Runs the checks concurrently (a handful of endpoints per router; no extra dependency).
async fn join_spawned<F>(futs: impl Iterator<Item = F>) -> Vec<F::Output>
where
    F: std::future::Future + Send + 'static,
    F::Output: Send + 'static,
{
    let handles: Vec<_> = futs.map(tokio::spawn).collect();
    let mut out = Vec::with_capacity(handles.len());
    for h in handles {
        if let Ok(v) = h.await {
            out.push(v);
        }
    }
    out
}
