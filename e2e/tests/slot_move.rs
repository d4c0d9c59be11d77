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
use mysql_async::prelude::Queryable;
use mysql_async::Pool;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

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
