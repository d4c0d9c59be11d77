//! The region side of the platform on real parts: two region control planes, each with its
//! operator, one cell per region on real stores (`e2e/bin/stores`, declared as `external`),
//! and a real etcd. The test plays the leader: it writes intents, and each region's
//! operator must carry out its own cell's on the real MariaDB and report it in the cell's
//! registration: replication from the home with a password derived from the platform secret
//! (none in etcd), the fence (read_only, the app's writes refused), the unfence, and
//! stopping replication.

use cellplane_cells::etcd_keys::{intent_key, Intent, Registration};
use cellplane_e2e::cell::CellStores;
use cellplane_e2e::net::Etcd;
use cellplane_e2e::{apply_yaml, test_dir, wait_for, Operator, Region};
use mysql_async::prelude::Queryable;
use std::time::Duration;

const T: Duration = Duration::from_secs(120);

fn cell_yaml(name: &str, region: &str, standby: (&str, &str), s: &CellStores) -> String {
    format!(
        r#"
apiVersion: cellplane.io/v1alpha1
kind: Cell
metadata: {{name: {name}, namespace: default}}
spec:
  region: {region}
  platform: shop
  standby: {{cell: {}, region: {}}}
  app: {{image: "example/shop:1", replicas: 1}}
  redis: {{external: {{endpoint: "{}", secretRef: {{name: {name}-store}}}}}}
  mysql: {{external: {{endpoint: "{}", secretRef: {{name: {name}-store}}, adminSecretRef: {{name: {name}-admin}}}}}}
  kafka: {{external: {{endpoint: "{}", secretRef: {{name: {name}-store}}}}}}
"#,
        standby.0,
        standby.1,
        s.var("REDIS_ADDR"),
        s.var("MYSQL_ADDR"),
        s.var("KAFKA_BOOTSTRAP"),
    )
}

/// Waits until `cell`'s registration satisfies `ok`.
async fn wait_reg(
    etcd: &Etcd,
    cell: &str,
    what: &str,
    ok: impl Fn(&Registration) -> bool,
) -> anyhow::Result<Registration> {
    wait_for(&format!("{cell}: {what}"), T, || async {
        Ok(etcd.registration(cell).await?.filter(&ok))
    })
    .await
}

async fn put_intent(
    etcd: &Etcd,
    cell: &str,
    generation: u64,
    writable: bool,
    from: &[&str],
) -> anyhow::Result<()> {
    let intent = Intent {
        generation,
        writable,
        replicate_from: from.iter().map(|s| s.to_string()).collect(),
        ..Intent::default()
    };
    etcd.put(&intent_key("shop", cell), serde_json::to_vec(&intent)?)
        .await
}

#[tokio::test(flavor = "multi_thread")]
async fn each_region_carries_out_its_cells_intents_on_real_mysql() -> anyhow::Result<()> {
    let ((us, eu), (home, standby)) = std::thread::scope(|s| {
        let us = s.spawn(|| Region::up("us"));
        let eu = s.spawn(|| Region::up("eu"));
        let home = s.spawn(|| CellStores::up("db-us-0"));
        let standby = s.spawn(|| CellStores::up("db-eu-0"));
        (
            (us.join().unwrap(), eu.join().unwrap()),
            (home.join().unwrap(), standby.join().unwrap()),
        )
    });
    let (us, eu, home, standby) = (us?, eu?, home?, standby?);
    let etcd = Etcd::start().await?;
    let dir = test_dir("region-agent");
    let secret_file = dir.join("platform-secret");
    std::fs::write(&secret_file, "0123456789abcdef0123456789abcdef")?;
    let mut ops: Vec<Operator> = Vec::new();
    for (region, cell, stores, pair) in [
        (&us, "db-us-0", &home, ("db-eu-0", "eu")),
        (&eu, "db-eu-0", &standby, ("db-us-0", "us")),
    ] {
        region.install_crds()?;
        let client = region.client().await?;
        stores.apply_secrets(&client).await?;
        apply_yaml(
            &client,
            "default",
            &cell_yaml(cell, &region.name, pair, stores),
        )
        .await?;
        ops.push(region.platform_operator(
            &etcd.endpoint,
            &[
                "--replication-secret-file",
                secret_file.to_str().unwrap(),
                "--agent-interval-ms",
                "200",
            ],
        )?);
    }

    // Both cells register, with their MySQL measured by their own region.
    for cell in ["db-us-0", "db-eu-0"] {
        let reg = wait_reg(&etcd, cell, "MySQL reported", |r| r.mysql.is_some()).await?;
        assert!(!reg.mysql.unwrap().read_only);
    }

    // 1. The standby's region sets up replication from the home, with the password both
    //    regions derive from the platform secret; the home's region made the account.
    put_intent(&etcd, "db-us-0", 1, true, &[]).await?;
    put_intent(&etcd, "db-eu-0", 1, true, &["db-us-0"]).await?;
    wait_reg(&etcd, "db-eu-0", "replicating db-us-0", |r| {
        r.intent_generation == 1
            && r.mysql
                .as_ref()
                .and_then(|m| m.replicas.get("db-us-0"))
                .is_some_and(|c| c.running)
    })
    .await?;
    let etcd_dump = etcd.get(&intent_key("shop", "db-eu-0")).await?.unwrap();
    assert!(!String::from_utf8_lossy(&etcd_dump).contains("password"));
    let home_root = home.mysql_admin()?;
    let mut h = home_root.get_conn().await?;
    let accounts: Vec<String> = h
        .query("SELECT User FROM mysql.user WHERE User = 'cellplane_repl'")
        .await?;
    assert_eq!(accounts, ["cellplane_repl"]);
    h.query_drop("CREATE TABLE IF NOT EXISTS cell_db_us_0.agent_probe (id INT PRIMARY KEY)")
        .await?;
    for i in 0..50 {
        h.exec_drop("INSERT INTO cell_db_us_0.agent_probe VALUES (?)", (i,))
            .await?;
    }
    let pos: String = h
        .query_first("SELECT @@GLOBAL.gtid_binlog_pos")
        .await?
        .unwrap();
    wait_reg(&etcd, "db-eu-0", "caught up with the home", |r| {
        r.mysql
            .as_ref()
            .and_then(|m| m.replicas.get("db-us-0"))
            .is_some_and(|c| cellplane_cells::gtid::reached(&c.gtid_slave_pos, &pos))
    })
    .await?;
    let mut s = standby.mysql_admin()?.get_conn().await?;
    let copied: Option<i64> = s
        .query_first("SELECT COUNT(*) FROM cell_db_us_0.agent_probe")
        .await?;
    assert_eq!(copied, Some(50), "the standby has every row");
    // The home's own report follows within a pass of its region's agent.
    wait_reg(&etcd, "db-us-0", "reporting its position", |r| {
        r.mysql.as_ref().is_some_and(|m| m.gtid_binlog_pos == pos)
    })
    .await?;

    // 2. The fence: read_only, and the app's account can no longer write.
    put_intent(&etcd, "db-us-0", 2, false, &[]).await?;
    wait_reg(&etcd, "db-us-0", "fenced", |r| {
        r.intent_generation == 2 && r.mysql.as_ref().is_some_and(|m| m.read_only)
    })
    .await?;
    let mut app = home.mysql_app()?.get_conn().await?;
    let refused = app
        .query_drop("CREATE TABLE IF NOT EXISTS fenced_probe (id INT)")
        .await
        .unwrap_err();
    assert!(
        refused.to_string().contains("read-only") || refused.to_string().contains("1290"),
        "{refused}"
    );
    drop(app);

    // 3. Unfenced: the app writes again.
    put_intent(&etcd, "db-us-0", 3, true, &[]).await?;
    wait_reg(&etcd, "db-us-0", "writable", |r| {
        r.intent_generation == 3 && r.mysql.as_ref().is_some_and(|m| !m.read_only)
    })
    .await?;
    let mut app = home.mysql_app()?.get_conn().await?;
    app.query_drop("CREATE TABLE IF NOT EXISTS unfenced_probe (id INT)")
        .await?;

    // 4. The standby stops replicating when its intent no longer names the home.
    put_intent(&etcd, "db-eu-0", 2, true, &[]).await?;
    wait_reg(&etcd, "db-eu-0", "no replication", |r| {
        r.intent_generation == 2 && r.mysql.as_ref().is_some_and(|m| m.replicas.is_empty())
    })
    .await?;
    drop((ops, us, eu));
    Ok(())
}
