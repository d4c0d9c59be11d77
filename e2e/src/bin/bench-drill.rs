//! The drill benchmark (`make bench`, not a timed test): planned switchovers under load on
//! the two-region lab (`cellplane_e2e::lab`), alternating a switchover of the home cell to
//! its standby and its failback, each run by `cellplane` as an SRE would. Prints the write
//! freeze (median, worst), how fast routers applied each table the leader wrote (p50, p99,
//! worst), the requests held, and the acknowledged orders lost (must be 0; the process
//! fails otherwise).
//!
//!   DRILLS=20 bench-drill

use anyhow::{bail, Context as _, Result};
use cellplane_cells::etcd_keys::{platform_prefix, routers_prefix, routing_key, RouterAck};
use cellplane_cells::routing::RoutingTable;
use cellplane_e2e::lab::{started_id, Load, PairLab, HOME, STANDBY};
use mysql_async::prelude::Queryable;
use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::Duration;

/// A MySQL server's queries per second over `window` (its `Questions` counter).
async fn queries_per_sec(pool: &mysql_async::Pool, window: Duration) -> Result<f64> {
    let questions = || async {
        let mut c = pool.get_conn().await?;
        let v: Option<(String, u64)> = c.query_first("SHOW GLOBAL STATUS LIKE 'Questions'").await?;
        anyhow::Ok(v.map_or(0, |(_, n)| n))
    };
    let (first, started) = (questions().await?, std::time::Instant::now());
    tokio::time::sleep(window).await;
    let last = questions().await?;
    Ok(last.saturating_sub(first) as f64 / started.elapsed().as_secs_f64())
}

fn percentile(sorted: &[u64], p: f64) -> u64 {
    if sorted.is_empty() {
        return 0;
    }
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

/// Where a write freeze went: each step inside it (freeze written -> slots released) and
/// its milliseconds, e.g. `freeze 31, drain 102, fence 140, ...`.
fn freeze_steps(op: &cellplane_operator::platform::operations::Switchover) -> String {
    let (Some(from), Some(to)) = (op.frozen_at_ms, op.released_at_ms) else {
        return String::new();
    };
    op.steps
        .iter()
        .filter(|s| s.ended_ms > from && s.started_ms < to)
        .map(|s| {
            let ms = s.ended_ms.min(to).saturating_sub(s.started_ms.max(from));
            format!("{} {ms}", format!("{:?}", s.step).to_lowercase())
        })
        .collect::<Vec<_>>()
        .join(", ")
}

/// When each epoch was written (as seen by a watcher on the same machine) and when each
/// router applied it (its own acknowledgement).
#[derive(Default)]
struct Propagation {
    written_ms: BTreeMap<u64, u64>,
    applied_ms: BTreeMap<(String, u64), u64>,
}

#[tokio::main]
async fn main() -> Result<()> {
    let drills: usize = std::env::var("DRILLS")
        .ok()
        .map(|v| v.parse())
        .transpose()
        .context("DRILLS must be a number")?
        .unwrap_or(20);
    println!("drill benchmark: {drills} planned operations under load (two regions, real stores and apps)");
    let lab = PairLab::up("bench-drill").await?;
    let users: Vec<String> = lab
        .users_of(HOME, 8)
        .into_iter()
        .chain(lab.users_of(STANDBY, 8))
        .collect();
    lab.put_profiles(&users).await?;

    // Watch the table and the routers' acknowledgements.
    let seen = Arc::new(parking_lot::Mutex::new(Propagation::default()));
    let watcher = {
        let (seen, mut client) = (seen.clone(), lab.etcd.client().await?);
        let (routing, routers) = (routing_key("shop"), routers_prefix("shop"));
        let mut stream = client
            .watch(
                platform_prefix("shop"),
                Some(etcd_client::WatchOptions::new().with_prefix()),
            )
            .await?;
        tokio::spawn(async move {
            while let Ok(Some(msg)) = stream.message().await {
                let now = cellplane_table::store::now_ms();
                for kv in msg.events().iter().filter_map(|e| e.kv()) {
                    let key = String::from_utf8_lossy(kv.key()).into_owned();
                    let mut s = seen.lock();
                    if key == routing {
                        if let Ok(t) = RoutingTable::decode(kv.value()) {
                            s.written_ms.entry(t.epoch).or_insert(now);
                        }
                    } else if let Some(id) = key.strip_prefix(&routers) {
                        if let Ok(a) = serde_json::from_slice::<RouterAck>(kv.value()) {
                            s.applied_ms
                                .entry((id.to_string(), a.applied_epoch))
                                .or_insert(a.applied_at_ms);
                        }
                    }
                }
            }
        })
    };

    let load = Load::start(&lab.router.addr, &users, 4);
    tokio::time::sleep(Duration::from_secs(2)).await;
    // The standby's MySQL before it takes the home's users: 10 s of the load as it is.
    let standby_sql = lab.standby.mysql_admin()?;
    let before_started = cellplane_table::store::now_ms();
    let before = queries_per_sec(&standby_sql, Duration::from_secs(10)).await?;
    let mut landing = None;
    let mut freezes = Vec::new();
    let (mut held, mut timeouts) = (0, 0);
    for i in 0..drills {
        let args: &[&str] = if i % 2 == 0 {
            &["switchover", HOME]
        } else {
            &["failback", HOME]
        };
        let (code, out) = lab.cellplane(args).await?;
        if code != 0 {
            bail!("cellplane {args:?} exited {code}:\n{out}");
        }
        let id = started_id(&out).context("the CLI names the operation")?;
        let op = lab.member(&id).await?;
        let freeze = op.write_freeze_ms().context("write freeze measured")?;
        held += op.held_requests.unwrap_or(0);
        timeouts += op.hold_timeouts.unwrap_or(0);
        println!(
            "  {:>2}. {:<10} write freeze {freeze:>5} ms   {}",
            i + 1,
            args[0],
            freeze_steps(&op)
        );
        if i == 0 {
            // The landing: the new home's MySQL and the users' latency over 10 s after it.
            let released = op.released_at_ms.context("released")?;
            let misses = r#"cellplane_app_profile_reads_total{source="db"}"#;
            let misses_before = lab.standby_app.metric(misses).await?;
            let after = queries_per_sec(&standby_sql, Duration::from_secs(10)).await?;
            let missed = lab.standby_app.metric(misses).await? - misses_before;
            let warmed = lab
                .standby_app
                .metric("cellplane_app_landing_cache_prewarmed_total")
                .await?;
            landing = Some((released, after, missed, warmed));
        }
        freezes.push(freeze);
        // The next operation's preflight wants the new standby replicating.
        if i % 2 == 0 {
            lab.wait_replicating(HOME, STANDBY).await?;
        } else {
            lab.wait_replicating(STANDBY, HOME).await?;
        }
    }
    let answers = load.stop().await?;
    watcher.abort();

    // Acknowledged orders lost: every 202 must be in its home's schema once the
    // persisters caught up (the last operation may leave the home failed over: its
    // standby's copy of the home's schema is then the place to look).
    let accepted = |cells: &[String]| -> BTreeSet<String> {
        answers
            .iter()
            .filter(|a| a.status == 202 && cells.contains(&a.user))
            .filter_map(|a| a.order.clone())
            .collect()
    };
    let home_users = lab.users_of(HOME, 8);
    let standby_users = lab.users_of(STANDBY, 8);
    let table = lab.etcd.routing_table().await?.context("a table")?;
    let home_serves = table
        .cell(HOME)
        .is_some_and(|c| c.state == cellplane_cells::crd::CellPhase::Active);
    let mut lost = 0;
    let mut total = 0;
    for (stores, schema, want) in [
        (
            if home_serves { &lab.home } else { &lab.standby },
            "cell_shop_us_0",
            accepted(&home_users),
        ),
        (&lab.standby, "cell_shop_eu_0", accepted(&standby_users)),
    ] {
        let pool = stores.mysql_admin()?;
        let mut found = BTreeSet::new();
        for _ in 0..100 {
            let rows: Vec<String> = pool
                .get_conn()
                .await?
                .query(format!("SELECT order_id FROM {schema}.orders"))
                .await?;
            found = rows.into_iter().collect();
            if want.is_subset(&found) {
                break;
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        total += want.len();
        lost += want.difference(&found).count();
    }

    let s = seen.lock();
    let mut propagation: Vec<u64> = s
        .applied_ms
        .iter()
        .filter_map(|((_, epoch), applied)| {
            let written = s.written_ms.get(epoch)?;
            Some(applied.saturating_sub(*written))
        })
        .collect();
    propagation.sort_unstable();
    freezes.sort_unstable();
    let not_ok: BTreeMap<u16, usize> = answers
        .iter()
        .filter(|a| a.status >= 300 || a.status == 0)
        .fold(BTreeMap::new(), |mut m, a| {
            *m.entry(a.status).or_default() += 1;
            m
        });
    println!(
        "\nresults ({drills} operations, {} requests under load)",
        answers.len()
    );
    println!(
        "  write freeze        median {:>5} ms   worst {:>5} ms   (goal: under 1000 ms)",
        percentile(&freezes, 0.5),
        freezes.last().copied().unwrap_or(0)
    );
    println!(
        "  router ack          p50 {:>5} ms   p99 {:>5} ms   worst {:>5} ms over {} table writes   (goal: p99 under 50 ms)",
        percentile(&propagation, 0.5),
        percentile(&propagation, 0.99),
        propagation.last().copied().unwrap_or(0),
        propagation.len()
    );
    println!("  requests held       {held} ({timeouts} timed out)");
    println!("  answers not 2xx     {not_ok:?}");
    println!("  acknowledged orders {total}, lost {lost}   (must be 0)");
    if let Some((released, after, missed, warmed)) = landing {
        let p99 = |from: u64, to: u64| {
            let mut l: Vec<u64> = answers
                .iter()
                .filter(|a| a.sent_ms >= from && a.sent_ms < to && a.status < 300)
                .map(|a| a.latency_ms)
                .collect();
            l.sort_unstable();
            percentile(&l, 0.99)
        };
        println!(
            "  landing (1st switchover): {STANDBY}'s MySQL {before:.0} queries/s in 10 s before, {after:.0} in the 10 s after the flip; users' p99 {} ms before, {} ms after",
            p99(before_started, before_started + 10_000),
            p99(released, released + 10_000)
        );
        println!(
            "  landing cache: {warmed:.0} profiles warmed before the flip; {missed:.0} profile reads went to MySQL in the 10 s after it"
        );
    }
    if lost > 0 {
        bail!("{lost} acknowledged orders lost");
    }
    Ok(())
}
