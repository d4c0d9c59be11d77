//! Real HTTP pieces for router tests (I/O): an etcd server, backend cells that report who
//! answered and can fence by epoch, a router process, and a small HTTP client.

use crate::netlab::Place;
use crate::{free_port, free_ports, tools_bin, wait_for, workspace_bin};
use anyhow::{bail, Context as _, Result};
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

/// A real etcd (the binary built by `e2e/bin/tools`): one member, or a cluster of several
/// on loopback (the global etcd of a multi-region lab); killed on drop.
pub struct Etcd {
    members: Vec<Option<Child>>,
    /// The first member's client URL.
    pub endpoint: String,
    endpoints: Vec<String>,
    dir: PathBuf,
}

impl Etcd {
    pub async fn start() -> Result<Self> {
        Self::cluster(1).await
    }

    /// Starts `n` members that form one cluster, and waits until it is healthy.
    pub async fn cluster(n: usize) -> Result<Self> {
        Self::cluster_at(&vec![Place::local(); n]).await
    }

    /// One member at each place (a netlab region each: one member per region).
    pub async fn cluster_at(places: &[Place]) -> Result<Self> {
        let dir = std::env::temp_dir().join(format!(
            "cellplane-etcd-{}-{}",
            std::process::id(),
            free_port()?
        ));
        let ports: Vec<[u16; 2]> = places.iter().map(|_| free_ports()).collect::<Result<_>>()?;
        let initial = ports
            .iter()
            .zip(places)
            .enumerate()
            .map(|(i, ([_, peer], p))| format!("m{i}=http://{}", p.addr(*peer)))
            .collect::<Vec<_>>()
            .join(",");
        let mut members = Vec::new();
        let mut endpoints = Vec::new();
        for (i, ([client, peer], place)) in ports.iter().zip(places).enumerate() {
            let child = place
                .command(tools_bin().join("etcd"))
                .args(["--name", &format!("m{i}"), "--data-dir"])
                .arg(dir.join(format!("m{i}")))
                .args([
                    "--listen-client-urls",
                    &format!("http://{}", place.addr(*client)),
                    "--advertise-client-urls",
                    &format!("http://{}", place.addr(*client)),
                    "--listen-peer-urls",
                    &format!("http://{}", place.addr(*peer)),
                    "--initial-advertise-peer-urls",
                    &format!("http://{}", place.addr(*peer)),
                    "--initial-cluster",
                    &initial,
                    "--initial-cluster-token",
                    "cellplane-e2e",
                    "--unsafe-no-fsync",
                ])
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .context("starting etcd (run e2e/bin/tools first)")?;
            members.push(Some(child));
            endpoints.push(format!("http://{}", place.addr(*client)));
        }
        let etcd = Self {
            members,
            endpoint: endpoints[0].clone(),
            endpoints,
            dir,
        };
        for endpoint in &etcd.endpoints {
            let health = format!("{endpoint}/health");
            // A member answers 200 once the cluster has a leader; on a loaded machine (a cold
            // CI run compiles beside the tests) the election alone can take tens of seconds.
            wait_for("etcd health", Duration::from_secs(120), || {
                let url = health.clone();
                async move {
                    Ok(get(&url, &[])
                        .await
                        .ok()
                        .filter(|r| r.status == 200)
                        .map(|_| ()))
                }
            })
            .await?;
        }
        Ok(etcd)
    }

    /// Every member's client URL.
    pub fn endpoints(&self) -> &[String] {
        &self.endpoints
    }

    /// The client URLs joined with commas, as flags take them.
    pub fn endpoints_flag(&self) -> String {
        self.endpoints.join(",")
    }

    /// The client URLs starting at member `i` (a region's own member first: the lab puts
    /// member i in region i), as flags take them.
    pub fn endpoints_from(&self, i: usize) -> String {
        let n = self.endpoints.len();
        (0..n)
            .map(|k| self.endpoints[(i + k) % n].as_str())
            .collect::<Vec<_>>()
            .join(",")
    }

    /// A client on a member of the majority (a member cut off by the netlab is skipped).
    pub async fn client(&self) -> Result<etcd_client::Client> {
        Ok(cellplane_table::etcd::connect(&self.endpoints, Duration::from_secs(2)).await?)
    }

    pub async fn put(&self, key: &str, value: impl Into<Vec<u8>>) -> Result<()> {
        self.client().await?.put(key, value.into(), None).await?;
        Ok(())
    }

    /// The value under `key`, if any.
    pub async fn get(&self, key: &str) -> Result<Option<Vec<u8>>> {
        let resp = self.client().await?.get(key, None).await?;
        Ok(resp.kvs().first().map(|kv| kv.value().to_vec()))
    }

    /// Platform `shop`'s routing table, if one was written.
    pub async fn routing_table(&self) -> Result<Option<cellplane_cells::routing::RoutingTable>> {
        Ok(
            match self
                .get(&cellplane_cells::etcd_keys::routing_key("shop"))
                .await?
            {
                Some(b) => Some(cellplane_cells::routing::RoutingTable::decode(&b)?),
                None => None,
            },
        )
    }

    /// `cell`'s registration in platform `shop`, if it is registered.
    pub async fn registration(
        &self,
        cell: &str,
    ) -> Result<Option<cellplane_cells::etcd_keys::Registration>> {
        Ok(
            match self
                .get(&cellplane_cells::etcd_keys::cell_key("shop", cell))
                .await?
            {
                Some(b) => Some(serde_json::from_slice(&b)?),
                None => None,
            },
        )
    }

    /// Makes member `i` the etcd leader (moved by the current leader) and waits until it
    /// leads: a test that cuts a region off keeps the leader elsewhere, since a leader
    /// change renews every lease by a full TTL.
    /// Waits until `cell`'s region reports its MySQL running the replication connection
    /// from `source` (the registration's report).
    pub async fn wait_replicating(
        &self,
        cell: &str,
        source: &str,
        timeout: Duration,
    ) -> Result<()> {
        wait_for(&format!("{cell} replicates {source}"), timeout, || async {
            Ok(self.registration(cell).await?.filter(|r| {
                r.mysql
                    .as_ref()
                    .and_then(|m| m.replicas.get(source))
                    .is_some_and(|c| c.running)
            }))
        })
        .await
        .map(|_| ())
    }

    pub async fn move_leader_to(&self, i: usize) -> Result<()> {
        let target = self.endpoints[i].clone();
        let id_of = |e: String| async move {
            let mut c = etcd_client::Client::connect([e], None).await?;
            let st = c.status().await?;
            let me = st.header().map(|h| h.member_id()).unwrap_or_default();
            anyhow::Ok((me, st.leader()))
        };
        let (target_id, leader) = id_of(target).await?;
        if target_id == leader {
            return Ok(());
        }
        for e in &self.endpoints {
            let (me, _) = id_of(e.clone()).await?;
            if me == leader {
                let mut c = etcd_client::Client::connect([e.clone()], None).await?;
                c.move_leader(target_id).await?;
            }
        }
        wait_for("the etcd leader moved", Duration::from_secs(20), || async {
            let (_, leader) = id_of(self.endpoints[i].clone()).await?;
            Ok((leader == target_id).then_some(()))
        })
        .await
    }

    /// Live ownership leases of `cell` in platform `shop` (one per app process holding one),
    /// with what each publishes (how far its process has drained).
    pub async fn owner_leases(
        &self,
        cell: &str,
    ) -> Result<Vec<cellplane_cells::etcd_keys::OwnerLeaseValue>> {
        let prefix = cellplane_cells::etcd_keys::owners_prefix("shop", cell);
        let opts = etcd_client::GetOptions::new().with_prefix();
        let resp = self.client().await?.get(prefix, Some(opts)).await?;
        Ok(resp
            .kvs()
            .iter()
            .map(|kv| cellplane_cells::etcd_keys::OwnerLeaseValue::decode(kv.value()))
            .collect())
    }

    /// Kills every member like a crash.
    pub fn kill(&mut self) {
        for i in 0..self.members.len() {
            self.kill_member(i);
        }
    }

    /// Kills member `i` like a crash.
    pub fn kill_member(&mut self, i: usize) {
        if let Some(mut c) = self.members.get_mut(i).and_then(Option::take) {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Drop for Etcd {
    fn drop(&mut self) {
        self.kill();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// A backend cell endpoint: answers `<name>` with the routing headers echoed, and 421
/// when the router's epoch is older than `min_epoch` (the cell's fencing). A mock of the
/// cell app for router and platform tests: `/status` reports an order backlog of 0.
pub struct Backend {
    pub name: String,
    pub addr: String,
    pub min_epoch: Arc<AtomicU64>,
    pub hits: Arc<AtomicU64>,
    /// Milliseconds to wait before answering (a slow cell).
    pub delay_ms: Arc<AtomicU64>,
    /// Requests that arrived (counted before any delay).
    pub arrived: Arc<AtomicU64>,
    task: tokio::task::JoinHandle<()>,
}

impl Backend {
    pub async fn start(name: &str) -> Result<Self> {
        Self::start_on(name, "127.0.0.1:0").await
    }

    /// A backend on `addr` (a killed backend's address brings it back at the same place).
    pub async fn start_on(name: &str, addr: &str) -> Result<Self> {
        let listener = tokio::net::TcpListener::bind(addr).await?;
        let addr = listener.local_addr()?.to_string();
        let min_epoch = Arc::new(AtomicU64::new(0));
        let hits = Arc::new(AtomicU64::new(0));
        let delay_ms = Arc::new(AtomicU64::new(0));
        let arrived = Arc::new(AtomicU64::new(0));
        let (n, me, h, dl, ar) = (
            name.to_string(),
            min_epoch.clone(),
            hits.clone(),
            delay_ms.clone(),
            arrived.clone(),
        );
        let task = tokio::spawn(async move {
            // Connections live in this set: killing the backend aborts them all, as the
            // death of a real process would.
            let mut connections = tokio::task::JoinSet::new();
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    break;
                };
                let (n, me, h, dl, ar) = (n.clone(), me.clone(), h.clone(), dl.clone(), ar.clone());
                connections.spawn(async move {
                    let svc = service_fn(move |req: http::Request<hyper::body::Incoming>| {
                        let (n, me, h, dl, ar) =
                            (n.clone(), me.clone(), h.clone(), dl.clone(), ar.clone());
                        async move {
                            if matches!(req.uri().path(), "/healthz" | "/livez" | "/readyz") {
                                // Health checks (the router's, the region agent's):
                                // answered at once, not counted.
                                return Ok(http::Response::new(Full::new(Bytes::from("ok"))));
                            }
                            if req.uri().path() == "/status" {
                                // Stands in for the reference app's /status (a mock: no
                                // order persister runs here, so its backlog is always 0).
                                return Ok(http::Response::new(Full::new(Bytes::from(
                                    r#"{"orders":{"lag":0}}"#,
                                ))));
                            }
                            ar.fetch_add(1, Ordering::SeqCst);
                            let delay = dl.load(Ordering::SeqCst);
                            if delay > 0 {
                                tokio::time::sleep(Duration::from_millis(delay)).await;
                            }
                            let epoch: u64 = req
                                .headers()
                                .get("x-cellplane-epoch")
                                .and_then(|v| v.to_str().ok())
                                .and_then(|v| v.parse().ok())
                                .unwrap_or(0);
                            let proto = req
                                .headers()
                                .get("x-forwarded-proto")
                                .cloned()
                                .unwrap_or(http::HeaderValue::from_static("-"));
                            let slot = req
                                .headers()
                                .get("x-cellplane-slot")
                                .and_then(|v| v.to_str().ok())
                                .unwrap_or("-")
                                .to_string();
                            let body = req
                                .into_body()
                                .collect()
                                .await
                                .map(|c| c.to_bytes().len())
                                .unwrap_or(0);
                            let resp = if epoch < me.load(Ordering::SeqCst) {
                                http::Response::builder()
                                    .status(421)
                                    .body(Full::new(Bytes::from("misdirected")))
                            } else {
                                h.fetch_add(1, Ordering::SeqCst);
                                http::Response::builder()
                                    .header("x-backend", n.as_str())
                                    .header("x-seen-slot", slot)
                                    .header("x-seen-proto", proto)
                                    .body(Full::new(Bytes::from(format!("{n} {body}"))))
                            };
                            Ok::<_, std::convert::Infallible>(resp.expect("valid"))
                        }
                    });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), svc)
                        .await;
                });
            }
        });
        Ok(Self {
            name: name.into(),
            addr,
            min_epoch,
            hits,
            delay_ms,
            arrived,
            task,
        })
    }

    /// Stops listening (connections are refused from now on).
    pub fn kill(&self) {
        self.task.abort();
    }
}

impl Drop for Backend {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// A routing table (platform `shop`, epoch 1) whose one active cell `a` owns every slot,
/// served at `addr`.
pub fn one_cell_table(addr: &str) -> cellplane_cells::routing::RoutingTable {
    use cellplane_cells::routing::{CellEntry, RoutingTable};
    RoutingTable::placed(
        "shop",
        1,
        16384,
        vec![(CellEntry::active("a", "us", vec![addr.into()]), 1)],
    )
    .expect("one cell owning every slot is a valid table")
}

/// A `cellplane-router` process, killed on drop.
pub struct RouterProc {
    child: Child,
    pub addr: String,
    pub metrics_addr: String,
    pub log: PathBuf,
}

impl RouterProc {
    /// Starts the router with `config_yaml` (listen addresses are filled in) and waits
    /// until it has a table (`/readyz`).
    pub async fn start(config_yaml: &str, dir: &std::path::Path) -> Result<Self> {
        Self::start_waiting_for(config_yaml, dir, "/readyz").await
    }

    /// Starts the router and waits only until it serves (`/healthz`): it may have no table.
    pub async fn start_without_table(config_yaml: &str, dir: &std::path::Path) -> Result<Self> {
        Self::start_waiting_for(config_yaml, dir, "/healthz").await
    }

    async fn start_waiting_for(
        config_yaml: &str,
        dir: &std::path::Path,
        path: &str,
    ) -> Result<Self> {
        Self::start_at(config_yaml, dir, path, &Place::local()).await
    }

    /// Starts the router at `place` (a netlab region) and waits until it answers `path`
    /// on its metrics port.
    pub async fn start_at(
        config_yaml: &str,
        dir: &std::path::Path,
        path: &str,
        place: &Place,
    ) -> Result<Self> {
        let [port, mport] = free_ports()?;
        let cfg = dir.join(format!("router-{port}.yaml"));
        std::fs::write(
            &cfg,
            format!(
                "listen: {}\nmetricsListen: {}\n{config_yaml}",
                place.addr(port),
                place.addr(mport)
            ),
        )?;
        let log = dir.join(format!("router-{port}.log"));
        let child = place
            .command(workspace_bin("cellplane-router"))
            .arg("--config")
            .arg(&cfg)
            .env("RUST_LOG", "info")
            .stdout(std::fs::File::create(&log)?)
            .stderr(Stdio::null())
            .spawn()?;
        let r = Self {
            child,
            addr: place.addr(port),
            metrics_addr: place.addr(mport),
            log,
        };
        let ready = format!("http://{}{path}", r.metrics_addr);
        wait_ok("router up", &ready, Duration::from_secs(30)).await?;
        Ok(r)
    }

    /// Writes `t` to `dir/table.json` and starts a router in file mode with `extra` config
    /// (`table_extra` goes inside the `table:` mapping). Returns the router and the file.
    pub async fn start_on_file(
        t: &cellplane_cells::routing::RoutingTable,
        table_extra: &str,
        extra: &str,
        dir: &std::path::Path,
    ) -> Result<(Self, std::path::PathBuf)> {
        let file = dir.join("table.json");
        std::fs::write(&file, t.encode())?;
        let cfg = format!("table: {{file: {}{table_extra}}}\n{extra}", file.display());
        Ok((Self::start(&cfg, dir).await?, file))
    }

    pub async fn metric(&self, name_and_labels: &str) -> Result<f64> {
        let text = get(&format!("http://{}/metrics", self.metrics_addr), &[])
            .await?
            .body;
        metric_value(&text, name_and_labels)
    }

    /// Runs the router on `config_yaml`, expecting it to refuse to start; returns what it
    /// printed on stderr.
    pub fn refuses(config_yaml: &str, dir: &std::path::Path) -> Result<String> {
        let cfg = dir.join("refused.yaml");
        std::fs::write(&cfg, config_yaml)?;
        let out = Command::new(workspace_bin("cellplane-router"))
            .arg("--config")
            .arg(&cfg)
            .output()?;
        if out.status.success() {
            bail!("the router accepted {config_yaml}");
        }
        Ok(String::from_utf8_lossy(&out.stderr).into_owned())
    }

    pub async fn request(&self, user: &str) -> Result<Reply> {
        get(
            &format!("http://{}/shop/cart", self.addr),
            &[("x-user-id", user)],
        )
        .await
    }

    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Asks for a graceful stop (SIGTERM) without waiting.
    pub fn terminate(&self) -> Result<()> {
        crate::sigterm(&self.child)
    }

    /// Waits up to `timeout` for the process to exit; its exit status.
    pub async fn exited(&mut self, timeout: Duration) -> Result<std::process::ExitStatus> {
        crate::exited(&mut self.child, "router", timeout).await
    }
}

impl Drop for RouterProc {
    fn drop(&mut self) {
        self.kill();
    }
}

#[derive(Debug)]
pub struct Reply {
    pub status: u16,
    pub headers: http::HeaderMap,
    pub body: String,
}

impl Reply {
    pub fn backend(&self) -> Option<&str> {
        self.headers.get("x-backend").and_then(|v| v.to_str().ok())
    }

    /// The cell that answered (`x-cellplane-served-by`; empty when none did).
    pub fn served_by(&self) -> String {
        self.headers
            .get("x-cellplane-served-by")
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default()
            .to_string()
    }
}

/// One HTTP/1.1 request on a fresh connection.
pub async fn send(method: &str, url: &str, headers: &[(&str, &str)], body: Bytes) -> Result<Reply> {
    let uri: http::Uri = url.parse()?;
    let host = uri.authority().context("url has a host")?.to_string();
    let stream = tokio::net::TcpStream::connect(&host).await?;
    let path = uri.path_and_query().map(|p| p.as_str()).unwrap_or("/");
    send_over(stream, &host, method, path, headers, body).await
}

/// One HTTP/1.1 request over a connection already made (a TCP stream, a pod's port
/// forwarded through the API server).
pub async fn send_over(
    stream: impl tokio::io::AsyncRead + tokio::io::AsyncWrite + Send + Unpin + 'static,
    host: &str,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: Bytes,
) -> Result<Reply> {
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream)).await?;
    tokio::spawn(conn);
    let mut req = http::Request::builder()
        .method(method)
        .uri(path)
        .header("host", host);
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    let resp = tokio::time::timeout(
        Duration::from_secs(20),
        sender.send_request(req.body(Full::new(body))?),
    )
    .await??;
    let status = resp.status().as_u16();
    let headers = resp.headers().clone();
    let body = String::from_utf8_lossy(&resp.into_body().collect().await?.to_bytes()).into_owned();
    if status == 0 {
        bail!("no status");
    }
    Ok(Reply {
        status,
        headers,
        body,
    })
}

/// Waits until `url` answers 200.
pub async fn wait_ok(what: &str, url: &str, timeout: Duration) -> Result<()> {
    wait_for(what, timeout, || async {
        Ok(get(url, &[])
            .await
            .ok()
            .filter(|r| r.status == 200)
            .map(|_| ()))
    })
    .await
}

/// One sample from Prometheus text exposition (0 when absent).
/// The value of one series (`name{labels}` exactly as exposed) in a Prometheus text
/// exposition. A series not exposed yet counts 0, but only when its metric family is
/// exposed at all: a misspelt name is an error, so `== 0` checks cannot pass on it.
pub fn metric_value(text: &str, name_and_labels: &str) -> Result<f64> {
    let found = text.lines().find_map(|l| {
        l.strip_prefix(name_and_labels)?
            .strip_prefix(' ')?
            .trim()
            .parse()
            .ok()
    });
    if let Some(v) = found {
        return Ok(v);
    }
    let name = name_and_labels.split('{').next().unwrap_or_default();
    let family = ["_total", "_bucket", "_sum", "_count"]
        .iter()
        .find_map(|suffix| name.strip_suffix(suffix))
        .unwrap_or(name);
    let exposed = text
        .lines()
        .any(|l| l.strip_prefix("# TYPE ").and_then(|t| t.split(' ').next()) == Some(family));
    anyhow::ensure!(
        exposed,
        "no metric family {family:?} is exposed (is {name_and_labels:?} misspelt?)"
    );
    // A family without labels always has its sample: a miss means a wrong sample name
    // (a counter's sample ends in _total). A labelled series may not exist yet: 0.
    anyhow::ensure!(
        name_and_labels.contains('{'),
        "{family:?} is exposed but has no sample {name_and_labels:?} (counters end in _total)"
    );
    Ok(0.0)
}

pub async fn get(url: &str, headers: &[(&str, &str)]) -> Result<Reply> {
    send("GET", url, headers, Bytes::new()).await
}

#[cfg(test)]
mod tests {
    use super::metric_value;

    const TEXT: &str = "# HELP x_requests Requests.\n# TYPE x_requests counter\nx_requests_total{cell=\"a\"} 3\n# TYPE x_up gauge\nx_up 1\n";

    #[test]
    fn series_values_absent_series_and_misspelt_names() {
        assert_eq!(
            metric_value(TEXT, "x_requests_total{cell=\"a\"}").unwrap(),
            3.0
        );
        assert_eq!(metric_value(TEXT, "x_up").unwrap(), 1.0);
        assert_eq!(
            metric_value(TEXT, "x_requests_total{cell=\"b\"}").unwrap(),
            0.0
        );
        assert!(metric_value(TEXT, "x_request_total{cell=\"a\"}").is_err());
        assert!(metric_value(TEXT, "x_upp").is_err());
        // A counter read without its _total suffix is a wrong name, not 0.
        let counter = "# TYPE x_writes counter\nx_writes_total 2\n";
        assert_eq!(metric_value(counter, "x_writes_total").unwrap(), 2.0);
        assert!(metric_value(counter, "x_writes").is_err());
    }
}
