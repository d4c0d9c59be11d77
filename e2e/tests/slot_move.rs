//! The data half of a slot move on two real MariaDB servers (two cells' stores): a quarter
//! of the slots' rows of the reference app's tables are copied from one cell's schema to
//! the other's, the source read with the replication account alone, while a client keeps
//! writing to the source, caught up from the source's
//! binary log, and verified per table and slot at one consistent position. A row changed
//! behind the mover's back is found by the verification, and a change to a moved table's
//! definition stops the move.

use cellplane_cell_app::schema::{STATEMENTS, USER_TABLES};
use cellplane_cell_sdk::mover::{Side, SlotMover, Throttle, Until, UserTable};
use cellplane_cell_sdk::replication;
use cellplane_cells::slot::slot_for_key;
use cellplane_cells::slot_set::SlotSet;
use cellplane_e2e::cell::CellStores;
use cellplane_e2e::lab::{
    router_send, run_cellplane, started_id, Answer, Load, PairLab, HOME, STANDBY,
};
use cellplane_e2e::wait_for;
use cellplane_operator::platform::operations::{Outcome, SlotMove, Step};
use mysql_async::prelude::Queryable;
use mysql_async::Pool;
use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

const T: Duration = Duration::from_secs(180);

const SLOTS: u32 = 16384;
const USERS: usize = 3000;

fn user(i: usize) -> String {
    format!("user-{i}")
}

/// A quarter of the slots move.
fn moving() -> SlotSet {
    SlotSet::parse(SLOTS, "0-4095").expect("valid")
}

fn moves(key: &str) -> bool {
    moving().contains(slot_for_key(key, SLOTS))
}

async fn create_tables(pool: &Pool) -> anyhow::Result<()> {
    let mut c = pool.get_conn().await?;
    for s in STATEMENTS {
        c.query_drop(*s).await?;
    }
    Ok(())
}

/// Every user's profile and two orders each.
async fn fill(pool: &Pool) -> anyhow::Result<()> {
    let mut c = pool.get_conn().await?;
    for chunk in (0..USERS).collect::<Vec<_>>().chunks(500) {
        let profiles: Vec<String> = chunk
            .iter()
            .map(|&i| format!("('{}', 'User {i}', 'u{i}@example.com', 1)", user(i)))
            .collect();
        c.query_drop(format!(
            "INSERT INTO profiles (user_id, name, email, version) VALUES {}",
            profiles.join(",")
        ))
        .await?;
        let orders: Vec<String> = chunk
            .iter()
            .flat_map(|&i| {
                (0..2).map(move |n| format!("('o-{i}-{n}', '{}', 'sku-{n}', 1, {i}, {n})", user(i)))
            })
            .collect();
        c.query_drop(format!(
            "INSERT INTO orders (order_id, user_id, sku, qty, accepted_at_ms, kafka_offset) VALUES {}",
            orders.join(",")
        ))
        .await?;
    }
    Ok(())
}

/// Writes to the source until `stop`: profile updates, new orders, deleted orders, and
/// transactions doing two of these, for users in every slot. Returns how many it made.
async fn write_until(pool: Pool, stop: Arc<AtomicBool>) -> anyhow::Result<u64> {
    let mut c = pool.get_conn().await?;
    let mut n = 0u64;
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
    while !stop.load(Ordering::Relaxed) {
        // xorshift: enough randomness to touch users all over.
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        let who = user((x % USERS as u64) as usize);
        match x % 10 {
            0..=4 => {
                c.exec_drop(
                    "UPDATE profiles SET name = ?, version = version + 1 WHERE user_id = ?",
                    (format!("renamed {n}"), &who),
                )
                .await?
            }
            5..=7 => {
                c.exec_drop(
                    "INSERT INTO orders (order_id, user_id, sku, qty, accepted_at_ms, kafka_offset) \
                     VALUES (?, ?, 'sku-live', 2, ?, ?)",
                    (format!("live-{n}"), &who, n, n),
                )
                .await?
            }
            8 => {
                c.exec_drop("DELETE FROM orders WHERE user_id = ? LIMIT 1", (&who,))
                    .await?
            }
            _ => {
                let mut tx = c.start_transaction(Default::default()).await?;
                tx.exec_drop(
                    "UPDATE profiles SET email = ?, version = version + 1 WHERE user_id = ?",
                    (format!("t{n}@example.com"), &who),
                )
                .await?;
                tx.exec_drop(
                    "INSERT INTO orders (order_id, user_id, sku, qty, accepted_at_ms, kafka_offset) \
                     VALUES (?, ?, 'sku-tx', 1, ?, ?)",
                    (format!("tx-{n}"), &who, n, n),
                )
                .await?;
                tx.commit().await?;
            }
        }
        n += 1;
    }
    Ok(n)
}

/// Rows of `table` in `pool`'s schema whose user is (or is not) in a moving slot.
async fn count(pool: &Pool, table: &str, in_moving: bool) -> anyhow::Result<usize> {
    let users: Vec<Vec<u8>> = pool
        .get_conn()
        .await?
        .query(format!("SELECT user_id FROM {table}"))
        .await?;
    Ok(users
        .iter()
        .filter(|u| moves(std::str::from_utf8(u).expect("utf-8 keys")) == in_moving)
        .count())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_slots_rows_are_copied_caught_up_and_verified_while_the_source_takes_writes(
) -> anyhow::Result<()> {
    let (a, b) = std::thread::scope(|s| {
        let a = s.spawn(|| CellStores::up("move-a"));
        let b = s.spawn(|| CellStores::up("move-b"));
        (a.join().expect("start"), b.join().expect("start"))
    });
    let (a, b) = (a?, b?);
    let (a_pool, b_pool) = (a.mysql_admin()?, b.mysql_admin()?);
    create_tables(&a_pool).await?;
    create_tables(&b_pool).await?;
    fill(&a_pool).await?;
    let tables: Vec<UserTable> = USER_TABLES
        .iter()
        .map(|(t, k)| UserTable::new(t, k))
        .collect();
    // The source is read with the platform's replication account alone (what the target
    // region's agent holds for another region's MySQL: the binary log and SELECT on the
    // cell schemas); the target is written as its own region writes it.
    replication::ensure_replication_account(&a_pool, "cellplane_repl", "mover-secret-1").await?;
    let source_opts = mysql_async::OptsBuilder::from_opts(a.mysql_admin_opts()?)
        .user(Some("cellplane_repl"))
        .pass(Some("mover-secret-1"));
    let source = Side {
        opts: source_opts.into(),
        schema: a.var("MYSQL_DATABASE").into(),
    };
    let target = Side {
        opts: b.mysql_admin_opts()?,
        schema: b.var("MYSQL_DATABASE").into(),
    };
    let mover = SlotMover::new(source, target, &tables, moving()).await?;

    // What an earlier move left on the target: a stale profile in a moving slot goes, the
    // target's own user (not moving) stays.
    let ghost = (0..)
        .map(|i| format!("ghost-{i}"))
        .find(|k| moves(k))
        .expect("some");
    let own = (0..)
        .map(|i| format!("own-{i}"))
        .find(|k| !moves(k))
        .expect("some");
    for key in [&ghost, &own] {
        b_pool
            .get_conn()
            .await?
            .exec_drop(
                "INSERT INTO profiles (user_id, name, email, version) VALUES (?, 'x', 'x@x', 1)",
                (key,),
            )
            .await?;
    }

    let stop = Arc::new(AtomicBool::new(false));
    let writer = tokio::spawn(write_until(a_pool.clone(), stop.clone()));
    let from = mover.start_position().await?;
    assert_eq!(
        mover.clear_target(Throttle::default()).await?,
        1,
        "the ghost"
    );
    let mut batches = 0;
    let copy = mover
        .copy(
            Throttle {
                batch: 200,
                rows_per_sec: Some(4000),
            },
            |_| batches += 1,
        )
        .await?;
    println!("copy: {copy:?} in {batches} batches");
    assert!(copy.scanned >= (USERS * 3) as u64 - 100, "{copy:?}");
    assert!(
        copy.copied > 0 && copy.copied < copy.scanned / 2,
        "{copy:?}"
    );
    let caught = mover.catch_up(&from, Until::End).await?;
    println!("catch-up: {caught:?}");
    assert!(
        caught.applied > 0,
        "the writer changed moving slots meanwhile: {caught:?}"
    );

    // Verified while the source still takes writes: both sides at one snapshot.
    let live = mover.verify(&caught.position).await?;
    println!(
        "verified live at {}: {} rows, {} mismatches",
        live.position,
        live.rows,
        live.mismatches.len()
    );
    assert!(
        live.mismatches.is_empty(),
        "{:?}",
        &live.mismatches[..live.mismatches.len().min(5)]
    );
    stop.store(true, Ordering::Relaxed);
    let writes = writer.await??;
    let last = mover.catch_up(&live.position, Until::End).await?;
    let done = mover.verify(&last.position).await?;
    println!(
        "writes: {writes}; final catch-up {last:?}; verified {} rows",
        done.rows
    );
    assert!(done.mismatches.is_empty(), "{:?}", done.mismatches);
    assert!(writes > 50, "the writer ran ({writes} writes)");

    // The target holds exactly the moving slots' rows, plus its own user.
    for table in ["profiles", "orders"] {
        let source = count(&a_pool, table, true).await?;
        assert_eq!(count(&b_pool, table, true).await?, source, "{table}");
        assert!(source > 0);
    }
    assert_eq!(count(&b_pool, "profiles", false).await?, 1, "only its own");
    assert_eq!(count(&b_pool, "orders", false).await?, 0);

    // Behind the mover's back: a profile changed on the target, an order deleted on the
    // source without its binary log. Both slots are reported.
    let changed = (0..USERS).map(user).find(|u| moves(u)).expect("some");
    b_pool
        .get_conn()
        .await?
        .exec_drop(
            "UPDATE profiles SET name = 'tampered' WHERE user_id = ?",
            (&changed,),
        )
        .await?;
    let (order, owner): (String, Vec<u8>) = {
        let rows: Vec<(String, Vec<u8>)> = a_pool
            .get_conn()
            .await?
            .query("SELECT order_id, user_id FROM orders ORDER BY order_id")
            .await?;
        rows.into_iter()
            .find(|(_, u)| moves(std::str::from_utf8(u).expect("utf-8")))
            .expect("a moving order")
    };
    let mut c = a_pool.get_conn().await?;
    c.query_drop("SET SESSION sql_log_bin = 0").await?;
    c.exec_drop("DELETE FROM orders WHERE order_id = ?", (&order,))
        .await?;
    c.query_drop("SET SESSION sql_log_bin = 1").await?;
    drop(c);
    let caught_out = mover.verify(&done.position).await?;
    let found: Vec<(String, u32)> = caught_out
        .mismatches
        .iter()
        .map(|m| (m.table.clone(), m.slot))
        .collect();
    let owner = String::from_utf8(owner)?;
    assert_eq!(
        found,
        [
            ("orders".to_string(), slot_for_key(&owner, SLOTS)),
            ("profiles".to_string(), slot_for_key(&changed, SLOTS)),
        ]
        .into_iter()
        .collect::<std::collections::BTreeSet<_>>()
        .into_iter()
        .collect::<Vec<_>>(),
        "{:?}",
        caught_out.mismatches
    );
    println!("caught: {}", caught_out.mismatches[0]);

    // A moved table's definition changes on the source: the move stops, saying why.
    a_pool
        .get_conn()
        .await?
        .query_drop("ALTER TABLE orders ADD COLUMN note VARCHAR(16) NULL")
        .await?;
    let err = mover
        .catch_up(&caught_out.position, Until::End)
        .await
        .expect_err("a schema change stops the move")
        .to_string();
    assert!(err.contains("schema changed during the move"), "{err}");
    mover.close().await?;
    Ok(())
}

/// Profile writes for `users` through the router, one client, until stopped: each user's
/// name is set to a counter in turn; returns the last value each got a 200 for.
fn write_profiles(
    router: String,
    users: Vec<String>,
    stop: Arc<AtomicBool>,
) -> tokio::task::JoinHandle<anyhow::Result<BTreeMap<String, String>>> {
    tokio::spawn(async move {
        let mut acked = BTreeMap::new();
        let mut n = 0usize;
        while !stop.load(Ordering::SeqCst) {
            let user = &users[n % users.len()];
            n += 1;
            let name = format!("v{n}");
            let body = serde_json::json!({"name": name, "email": format!("{user}@example.com")});
            match router_send(&router, "PUT", user, "profile", Some(body)).await {
                Ok(r) if r.status == 200 => {
                    acked.insert(user.clone(), name);
                }
                Ok(r) => anyhow::bail!("PUT profile of {user}: {} {}", r.status, r.body),
                Err(e) => anyhow::bail!("PUT profile of {user}: {e}"),
            }
        }
        Ok(acked)
    })
}

/// A slot move on the platform, under load: some of one cell's slots move to the other
/// cell in the other region with their rows while clients read profiles, place orders and
/// write profiles through the router; the leader's operator is killed once the copy is
/// done and a new leader finishes the move. Afterwards every acknowledged order and every
/// user's last acknowledged profile is where the table sends its user, the source's old
/// copies are deleted after the retention window, and no user outside the moving slots saw
/// a pause or an error.
#[tokio::test(flavor = "multi_thread")]
async fn slots_move_to_another_cell_under_load_with_every_acknowledged_write() -> anyhow::Result<()>
{
    let mut lab = PairLab::up("slotmove").await?;
    let table = lab.etcd.routing_table().await?.expect("a table");
    let us_users = lab.users_of(HOME, 24);
    // Half of the home's users move: their slots (and every other user in them).
    let slots = SlotSet::of(table.slots, us_users[..12].iter().map(|u| table.route(u).0))?;
    let (moving, staying): (Vec<String>, Vec<String>) = us_users
        .iter()
        .cloned()
        .partition(|u| slots.contains(table.route(u).0));
    let eu_users = lab.users_of(STANDBY, 4);
    let all: Vec<String> = us_users.iter().chain(&eu_users).cloned().collect();
    lab.put_profiles(&all).await?;

    let load = Load::start(&lab.router.addr, &all, 3);
    let stop_writes = Arc::new(AtomicBool::new(false));
    let writer = write_profiles(lab.router.addr.clone(), moving.clone(), stop_writes.clone());
    tokio::time::sleep(Duration::from_millis(800)).await;

    // Bad requests are refused before anything changes, naming the fix.
    let (code, out) = lab.cellplane(&["move", "0-16383", "--to", STANDBY]).await?;
    assert_eq!(code, 1, "{out}");
    assert!(out.contains("move one cell's slots at a time"), "{out}");
    let (code, out) = lab
        .cellplane(&[
            "move",
            &slots.to_string(),
            "--to",
            STANDBY,
            "--table",
            "profiles",
        ])
        .await?;
    assert_eq!(code, 1, "{out}");
    assert!(out.contains("NAME:KEY_COLUMN"), "{out}");
    let (code, out) = lab
        .cellplane(&["move", &slots.to_string(), "--to", STANDBY, "--dry-run"])
        .await?;
    assert_eq!(code, 0, "{out}");

    let (code, out) = lab
        .cellplane(&[
            "move",
            &slots.to_string(),
            "--to",
            STANDBY,
            "--retention-secs",
            "3",
            "--no-wait",
        ])
        .await?;
    assert_eq!(code, 0, "{out}");
    let id = started_id(&out).expect("the CLI names the operation");
    let record = |lab: &PairLab| {
        let id = id.clone();
        let etcd = lab.etcd.endpoints_flag();
        async move {
            let (_, out) = run_cellplane(&etcd, "shop", &["drills", &id, "-o", "json"]).await?;
            Ok::<SlotMove, anyhow::Error>(serde_json::from_str(&out)?)
        }
    };
    // The copy is done: the leader's operator dies; the other region's leads on.
    let at = wait_for("the copy done", T, || async {
        let m = record(&lab).await?;
        Ok((!matches!(m.step, Step::Preflight | Step::Copy)).then_some(m.step))
    })
    .await?;
    let leader = lab.leader().expect("one leader");
    lab.operators[leader].kill();
    println!("leader {leader} killed at {at:?}");
    tokio::time::sleep(Duration::from_secs(2)).await;
    lab.restart_operator(leader)?;
    let finished = wait_for("the move finished", T, || async {
        let m = record(&lab).await?;
        Ok(m.finished().then_some(m))
    })
    .await;
    let m = match finished {
        Ok(m) => m,
        Err(e) => {
            let (_, report) = lab.cellplane(&["drills", &id]).await?;
            for r in &lab.regions {
                let _ = std::process::Command::new("cp")
                    .arg("-r")
                    .arg(r.dir.join("logs"))
                    .arg(format!("/tmp/mvlogs-{}", r.name))
                    .status();
            }
            anyhow::bail!("{e}\n{report}");
        }
    };
    stop_writes.store(true, Ordering::SeqCst);
    let profiles = writer.await??;
    let answers = load.stop().await?;
    let (_, report) = lab.cellplane(&["drills", &id]).await?;
    println!("{report}");
    assert_eq!(
        m.outcome,
        Some(Outcome::Succeeded { warnings: vec![] }),
        "{report}"
    );
    let handed_over = m.steps.iter().any(|s| s.by != m.steps[0].by);
    println!(
        "write freeze of the moving slots: {:?} ms; rows copied {:?}, verified {:?}; held requests {:?}; leader handover: {handed_over}",
        m.write_freeze_ms(),
        m.copied_rows,
        m.verified_rows,
        m.held_requests
    );
    assert!(m.copied_rows.unwrap_or(0) >= moving.len() as u64, "{m:?}");

    // The table sends the moved users to the target, from its own data.
    let t = lab.etcd.routing_table().await?.expect("a table");
    for s in slots.iter() {
        assert_eq!(t.cell_for_slot(s).name, STANDBY, "slot {s}");
        assert_eq!(t.data_home(s).name, STANDBY, "slot {s}'s data");
    }
    assert!(t.frozen_slots.is_empty());

    // Every request was answered with success; users outside the moving slots never
    // waited for the move.
    let failed: Vec<&Answer> = answers
        .iter()
        .filter(|a| !(200..300).contains(&a.status))
        .collect();
    assert!(
        failed.is_empty(),
        "every request answered with success: {:?}",
        &failed[..failed.len().min(5)]
    );
    let slowest_staying = answers
        .iter()
        .filter(|a| !moving.contains(&a.user))
        .map(|a| a.latency_ms)
        .max()
        .unwrap_or(0);
    let slowest_moving = answers
        .iter()
        .filter(|a| moving.contains(&a.user))
        .map(|a| a.latency_ms)
        .max()
        .unwrap_or(0);
    println!(
        "{} answers; slowest of the users that stayed {slowest_staying} ms, of the moved users {slowest_moving} ms",
        answers.len()
    );

    // Every acknowledged order is in the schema of its user's cell now, and nowhere else.
    let accepted = |users: &[String]| -> BTreeSet<String> {
        answers
            .iter()
            .filter(|a| a.status == 202 && users.contains(&a.user))
            .filter_map(|a| a.order.clone())
            .collect()
    };
    for (stores, schema, users) in [
        (&lab.standby, "cell_shop_eu_0", &moving),
        (&lab.home, "cell_shop_us_0", &staying),
    ] {
        let want = accepted(users);
        assert!(!want.is_empty(), "{schema}: orders accepted");
        let pool = stores.mysql_admin()?;
        let keys: Vec<String> = users.iter().map(|u| format!("'{u}'")).collect();
        let query = format!(
            "SELECT order_id FROM {schema}.orders WHERE user_id IN ({})",
            keys.join(",")
        );
        let have: BTreeSet<String> = wait_for(&format!("orders in {schema}"), T, || async {
            let have: BTreeSet<String> = pool
                .get_conn()
                .await?
                .query::<String, _>(query.clone())
                .await?
                .into_iter()
                .collect();
            Ok(want.is_subset(&have).then_some(have))
        })
        .await?;
        assert_eq!(have, want, "{schema}: exactly the accepted orders");
        println!("{schema}: the {} accepted orders of its users", want.len());
    }
    // The source's copies of the moved slots are gone after the retention window.
    let keys: Vec<String> = moving.iter().map(|u| format!("'{u}'")).collect();
    let left: Option<u64> = lab
        .home
        .mysql_admin()?
        .get_conn()
        .await?
        .query_first(format!(
            "SELECT (SELECT COUNT(*) FROM cell_shop_us_0.orders WHERE user_id IN ({0})) + \
             (SELECT COUNT(*) FROM cell_shop_us_0.profiles WHERE user_id IN ({0}))",
            keys.join(",")
        ))
        .await?;
    assert_eq!(left, Some(0), "the source's old copies deleted");
    assert!(m.retired_rows.unwrap_or(0) > 0, "{m:?}");

    // Every moved user's last acknowledged profile, read through the router from the target.
    assert!(profiles.len() == moving.len(), "{profiles:?}");
    let read_back = |cell: &'static str| {
        let (router, profiles) = (lab.router.addr.clone(), profiles.clone());
        async move {
            for (user, name) in &profiles {
                let r = router_send(&router, "GET", user, "profile", None).await?;
                anyhow::ensure!(r.status == 200, "{user}: {}", r.body);
                anyhow::ensure!(r.served_by() == cell, "{user} served by {}", r.served_by());
                let got: serde_json::Value = serde_json::from_str(&r.body)?;
                anyhow::ensure!(got["name"] == name.as_str(), "{user}: {}", r.body);
            }
            Ok::<(), anyhow::Error>(())
        }
    };
    read_back(STANDBY).await?;

    // The table is now those slots off the placement: a rebalance moves them back, in
    // waves of at most 8 slots, one after the other.
    let waves = slots.len().div_ceil(8);
    let (code, out) = lab
        .cellplane(&["rebalance", "--dry-run", "--max-slots", "8"])
        .await?;
    assert_eq!(code, 0, "{out}");
    assert!(
        out.contains(&format!("{waves} moves, {} of 16384 slots", slots.len())),
        "{out}"
    );
    let (code, out) = lab
        .cellplane(&["rebalance", "--max-slots", "8", "--retention-secs", "1"])
        .await?;
    assert_eq!(code, 0, "{out}");
    let done = wait_for("the rebalance's moves finished", T, || async {
        let (_, out) = lab.cellplane(&["drills", "-o", "json"]).await?;
        let all: Vec<serde_json::Value> = serde_json::from_str(&out)?;
        let waves: Vec<serde_json::Value> = all
            .into_iter()
            .filter(|o| {
                o["id"]
                    .as_str()
                    .is_some_and(|id| id.starts_with("rebalance-"))
            })
            .collect();
        Ok(waves.iter().all(|w| w["step"] == "Done").then_some(waves))
    })
    .await?;
    assert_eq!(done.len(), waves, "{done:?}");
    for w in &done {
        assert_eq!(w["outcome"]["result"], "succeeded", "{w}");
    }
    let t = lab.etcd.routing_table().await?.expect("a table");
    assert!(slots.iter().all(|s| t.cell_for_slot(s).name == HOME));
    read_back(HOME).await?;
    let (code, out) = lab.cellplane(&["rebalance", "--dry-run"]).await?;
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("nothing to move"), "{out}");
    Ok(())
}
