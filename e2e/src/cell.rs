//! A cell's data plane for tests: its real stores (started by `e2e/bin/stores`) and the
//! reference app as a separate process. Everything stops on drop, also when a test fails.

use crate::net::{get, metric_value, send, wait_ok, Reply};
use crate::netlab::Place;
use crate::{free_port, repo_root, workspace_bin};
use anyhow::{bail, Context as _, Result};
use bytes::Bytes;
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Stdio};
use std::time::Duration;

/// Redis, MariaDB and Kafka of one cell, on free loopback ports.
pub struct CellStores {
    pub cell: String,
    pub dir: PathBuf,
    root: PathBuf,
    /// Where the stores run (MariaDB is reached on its host by other regions).
    pub place: Place,
    /// The env file's variables (what the operator would inject).
    pub env: HashMap<String, String>,
}

impl CellStores {
    pub fn up(cell: &str) -> Result<Self> {
        Self::up_in(cell, Place::local())
    }

    /// The stores of `cell` at `place` (a netlab region).
    pub fn up_in(cell: &str, place: Place) -> Result<Self> {
        let root = std::env::temp_dir().join(format!("cellplane-stores-{}", std::process::id()));
        std::fs::create_dir_all(&root)?;
        let status = place
            .command(repo_root().join("e2e/bin/stores"))
            .args(["up", cell, "--address", &place.host])
            .env("CELLPLANE_STORES_DIR", &root)
            .stdout(Stdio::null())
            .status()
            .context("running e2e/bin/stores up")?;
        let dir = root.join(cell);
        if !status.success() {
            bail!(
                "stores of {cell} failed to start; logs under {}",
                dir.join("logs").display()
            );
        }
        let env = read_env(&dir.join("env"))?;
        Ok(Self {
            cell: cell.into(),
            dir,
            root,
            place,
            env,
        })
    }

    fn run(&self, args: &[&str]) -> Result<()> {
        let status = self
            .place
            .command(repo_root().join("e2e/bin/stores"))
            .args(args)
            .env("CELLPLANE_STORES_DIR", &self.root)
            .stdout(Stdio::null())
            .status()?;
        if !status.success() {
            bail!(
                "e2e/bin/stores {args:?} failed; logs under {}",
                self.dir.join("logs").display()
            );
        }
        Ok(())
    }

    /// `kill -9`, as a crash.
    pub fn kill(&self, store: &str) -> Result<()> {
        self.run(&["kill", &self.cell, store])
    }

    /// Freezes a store (SIGSTOP): alive, connections open, no answers.
    pub fn pause(&self, store: &str) -> Result<()> {
        self.run(&["pause", &self.cell, store])
    }

    /// Lets a paused store go on (SIGCONT).
    pub fn resume(&self, store: &str) -> Result<()> {
        self.run(&["resume", &self.cell, store])
    }

    /// Starts a killed store again on the same port with the same data.
    pub fn start(&self, store: &str) -> Result<()> {
        self.run(&["start", &self.cell, store])
    }

    pub fn var(&self, name: &str) -> &str {
        self.env.get(name).map(String::as_str).unwrap_or_default()
    }

    /// The Secrets a Cell declaring these stores as `external` names, in namespace
    /// `default`: `<cell>-store` (the app's account) and `<cell>-admin` (root, what
    /// `adminSecretRef` names for the region's operator).
    pub async fn apply_secrets(&self, client: &kube::Client) -> Result<()> {
        let cell = &self.cell;
        for (name, user, password) in [
            (
                format!("{cell}-store"),
                self.var("MYSQL_USER"),
                self.var("MYSQL_PASSWORD"),
            ),
            (
                format!("{cell}-admin"),
                "root",
                self.var("MYSQL_ROOT_PASSWORD"),
            ),
        ] {
            let yaml = crate::credentials_secret_yaml(&name, user, password);
            crate::apply_yaml(client, "default", &yaml).await?;
        }
        Ok(())
    }

    /// A pool on the cell's MariaDB as root (for checks and replication control).
    pub fn mysql_admin(&self) -> Result<mysql_async::Pool> {
        Ok(mysql_async::Pool::new(self.mysql_admin_opts()?))
    }

    /// Root's connection options on the cell's MariaDB, in the cell's schema.
    pub fn mysql_admin_opts(&self) -> Result<mysql_async::Opts> {
        Ok(mysql_async::OptsBuilder::default()
            .ip_or_hostname(self.place.host.clone())
            .tcp_port(self.var("MYSQL_PORT").parse()?)
            .user(Some("root"))
            .pass(Some(self.var("MYSQL_ROOT_PASSWORD")))
            .db_name(Some(self.var("MYSQL_DATABASE")))
            .into())
    }

    /// A pool with the app's own (non-admin) account, from the settings the app reads.
    pub fn mysql_app(&self) -> Result<mysql_async::Pool> {
        let settings = cellplane_cell_sdk::settings::CellSettings::from_vars(&self.env)?;
        Ok(mysql_async::Pool::new(settings.mysql_opts()))
    }
}

impl Drop for CellStores {
    fn drop(&mut self) {
        let _ = self.run(&["down", &self.cell]);
    }
}

/// The `spec.overrides` block of a CellSet (indented for `spec:`) that puts each named
/// cell on its local stores, declared `external` with the Secrets of
/// [`CellStores::apply_secrets`], and advertises its app's address to routers.
pub fn overrides_yaml(cells: &[(&str, &CellStores, &str)]) -> String {
    let store = |kind: &str, endpoint: &str, cell: &str, admin: bool| {
        let admin = if admin {
            format!(", adminSecretRef: {{name: {cell}-admin}}")
        } else {
            String::new()
        };
        format!("{kind}: {{external: {{endpoint: \"{endpoint}\", secretRef: {{name: {cell}-store}}{admin}}}}}")
    };
    let mut out = String::from("  overrides:\n");
    for (cell, s, app) in cells {
        out.push_str(&format!(
            "    {cell}: {{advertise: \"{app}\", {}, {}, {}}}\n",
            store("redis", s.var("REDIS_ADDR"), cell, false),
            store("mysql", s.var("MYSQL_ADDR"), cell, true),
            store("kafka", s.var("KAFKA_BOOTSTRAP"), cell, false),
        ));
    }
    out
}

fn read_env(path: &Path) -> Result<HashMap<String, String>> {
    Ok(std::fs::read_to_string(path)?
        .lines()
        .filter_map(|l| l.split_once('='))
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect())
}

/// The reference app of one cell as a process.
pub struct CellApp {
    child: Option<Child>,
    pub addr: String,
    pub admin_token: String,
    pub log: PathBuf,
    env: Vec<(String, String)>,
    place: Place,
}

impl CellApp {
    /// Starts the app on `stores` following the table in `table_file`, and waits until it
    /// answers /livez. `extra_env` overrides (e.g. `CELL_ORDERS_GROUP`).
    pub async fn start(
        stores: &CellStores,
        table_file: &Path,
        extra_env: &[(&str, &str)],
    ) -> Result<Self> {
        let table = table_file.display().to_string();
        Self::start_with(stores, &[("CELL_TABLE_FILE", &table)], extra_env).await
    }

    /// Starts the app following the platform's table in the global etcd (what the
    /// operator injects into app pods), and waits until it answers /livez.
    pub async fn start_on_etcd(
        stores: &CellStores,
        etcd_endpoints: &str,
        platform: &str,
        extra_env: &[(&str, &str)],
    ) -> Result<Self> {
        let source = [("CELL_ETCD", etcd_endpoints), ("CELL_PLATFORM", platform)];
        Self::start_with(stores, &source, extra_env).await
    }

    async fn start_with(
        stores: &CellStores,
        table_source: &[(&str, &str)],
        extra_env: &[(&str, &str)],
    ) -> Result<Self> {
        let port = free_port()?;
        let mut env: Vec<(String, String)> = stores
            .env
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        let admin_token = format!("t-{}-{port}", std::process::id());
        env.push(("CELL_ADMIN_TOKEN".into(), admin_token.clone()));
        let place = stores.place.clone();
        env.push(("CELL_LISTEN".into(), place.addr(port)));
        env.push((
            "RUST_LOG".into(),
            "info,librdkafka=error,rdkafka=error".into(),
        ));
        for (k, v) in table_source.iter().chain(extra_env) {
            env.push((k.to_string(), v.to_string()));
        }
        let mut app = Self {
            child: None,
            addr: place.addr(port),
            place,
            admin_token,
            log: stores.dir.join(format!("logs/app-{port}.log")),
            env,
        };
        app.spawn().await?;
        Ok(app)
    }

    async fn spawn(&mut self) -> Result<()> {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)?;
        let child = self
            .place
            .command(workspace_bin("cellplane-cell-app"))
            .envs(self.env.iter().map(|(k, v)| (k, v)))
            .stdout(log)
            .stderr(Stdio::null())
            .spawn()?;
        self.child = Some(child);
        wait_ok("cell app up", &self.url("/livez"), Duration::from_secs(60)).await
    }

    /// `kill -9` (a crash), then start again with the same settings and port.
    pub async fn restart(&mut self, extra_env: &[(&str, &str)]) -> Result<()> {
        self.kill();
        for (k, v) in extra_env {
            self.env.push((k.to_string(), v.to_string()));
        }
        self.spawn().await
    }

    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    pub async fn get(&self, path: &str) -> Result<Reply> {
        get(&self.url(path), &[]).await
    }

    pub async fn send_json(
        &self,
        method: &str,
        path: &str,
        body: serde_json::Value,
    ) -> Result<Reply> {
        send(
            method,
            &self.url(path),
            &[("content-type", "application/json")],
            Bytes::from(body.to_string()),
        )
        .await
    }

    pub async fn set_stock(&self, sku: &str, stock: i64) -> Result<()> {
        let auth = format!("Bearer {}", self.admin_token);
        let r = send(
            "PUT",
            &self.url(&format!("/admin/stock/{sku}")),
            &[
                ("content-type", "application/json"),
                ("authorization", &auth),
            ],
            Bytes::from(serde_json::json!({ "stock": stock }).to_string()),
        )
        .await?;
        if r.status != 204 {
            bail!("setting stock: {} {}", r.status, r.body);
        }
        Ok(())
    }

    pub async fn stock(&self, sku: &str) -> Result<Option<i64>> {
        let auth = format!("Bearer {}", self.admin_token);
        let r = get(
            &self.url(&format!("/admin/stock/{sku}")),
            &[("authorization", &auth)],
        )
        .await?;
        if r.status != 200 {
            bail!("reading stock: {} {}", r.status, r.body);
        }
        let v: serde_json::Value = serde_json::from_str(&r.body)?;
        Ok(v["stock"].as_i64())
    }

    /// A counter or gauge from /metrics (0 when absent).
    pub async fn metric(&self, name_and_labels: &str) -> Result<f64> {
        metric_value(&self.get("/metrics").await?.body, name_and_labels)
    }
}

impl Drop for CellApp {
    fn drop(&mut self) {
        self.kill();
    }
}
