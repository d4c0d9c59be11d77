//! A client of the lab's platform that can run inside a netlab region (`ip netns exec`):
//! it writes users' profiles (and, with `--orders SKU`, places an order every other time,
//! its id the written value) through a router for a while and records every answer, one
//! JSON line each, so a test can tell which cell took which write and when (wall clock,
//! shared by every process of the machine).
//!
//!   lab-client --router ADDR --users u1,u2 --secs N --tag T --out FILE [--workers N] [--orders SKU]

use anyhow::{bail, Context as _, Result};
use cellplane_e2e::lab::router_send;
use std::io::Write as _;
use std::time::{Duration, Instant};

fn now_ms() -> u64 {
    cellplane_table::store::now_ms()
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> Result<()> {
    let mut args = std::env::args().skip(1);
    let (mut router, mut users, mut secs, mut tag, mut out, mut workers) =
        (None, Vec::new(), 10u64, "w".to_string(), None, 2usize);
    let mut orders: Option<String> = None;
    while let Some(flag) = args.next() {
        let value = args
            .next()
            .with_context(|| format!("{flag} needs a value"))?;
        match flag.as_str() {
            "--router" => router = Some(value),
            "--users" => users = value.split(',').map(str::to_string).collect(),
            "--secs" => secs = value.parse()?,
            "--tag" => tag = value,
            "--out" => out = Some(value),
            "--workers" => workers = value.parse()?,
            "--orders" => orders = Some(value),
            other => bail!("unknown flag {other}"),
        }
    }
    let router = router.context("--router")?;
    let out = out.context("--out")?;
    anyhow::ensure!(!users.is_empty(), "--users");
    let deadline = Instant::now() + Duration::from_secs(secs);
    let mut tasks = Vec::new();
    for w in 0..workers {
        let (router, users, tag, orders) =
            (router.clone(), users.clone(), tag.clone(), orders.clone());
        tasks.push(tokio::spawn(async move {
            let mut lines = Vec::new();
            let mut n = 0usize;
            while Instant::now() < deadline {
                let user = &users[(n * workers + w) % users.len()];
                n += 1;
                let value = format!("{tag}-{w}-{n}");
                let (kind, method, what, body) = match &orders {
                    Some(sku) if n.is_multiple_of(2) => (
                        "order",
                        "POST",
                        "orders",
                        serde_json::json!({"sku": sku, "orderId": value}),
                    ),
                    _ => (
                        "profile",
                        "PUT",
                        "profile",
                        serde_json::json!({"name": value, "email": format!("{user}@example.com")}),
                    ),
                };
                let sent_ms = now_ms();
                let attempt = tokio::time::timeout(
                    Duration::from_secs(3),
                    router_send(&router, method, user, what, Some(body)),
                )
                .await;
                let (status, served_by, epoch, body) = match attempt {
                    Ok(Ok(r)) => {
                        // The epoch the cell served it at (its ownership layer says).
                        let epoch = r
                            .headers
                            .get("x-cellplane-epoch")
                            .and_then(|v| v.to_str().ok()?.parse::<u64>().ok());
                        (r.status, r.served_by(), epoch, r.body)
                    }
                    Ok(Err(e)) => (0, String::new(), None, e.to_string()),
                    Err(_) => (0, String::new(), None, "no answer in 3 s".into()),
                };
                let ok = (200..300).contains(&status);
                lines.push(serde_json::json!({
                    "kind": kind, "user": user, "value": value, "sentMs": sent_ms, "answeredMs": now_ms(),
                    "status": status, "servedBy": served_by, "epoch": epoch, "body": body.chars().take(200).collect::<String>(),
                }));
                if !ok {
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            }
            lines
        }));
    }
    let mut file = std::fs::File::create(&out).with_context(|| format!("creating {out}"))?;
    for t in tasks {
        for line in t.await? {
            writeln!(file, "{line}")?;
        }
    }
    Ok(())
}
