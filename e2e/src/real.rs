//! A region with a real node (`e2e/bin/node`): containerd, the kubelet, kube-proxy and
//! CoreDNS in a network namespace of their own, beside the region's kwok nodes. Its API
//! server and the global etcd listen on the host's end of the node's veth, so pods reach
//! them as they would a real control plane; the host reaches the pods' addresses through
//! the node. Images are imported from `target/images`, nothing is pulled.

use crate::net::{send_over, Reply};
use crate::netlab::Place;
use crate::{repo_root, tools_bin, Region};
use anyhow::{bail, Context as _, Result};
use bytes::Bytes;
use k8s_openapi::api::core::v1::Pod;
use kube::api::{Api, ListParams};
use std::path::PathBuf;
use std::process::{Command, Stdio};

/// The label and taint that keep everything but what asks for it off the real node.
pub const NODE_LABEL: (&str, &str) = ("cellplane.io/node", "real");
pub const NODE_TAINT: &str = "cellplane.io/real-node";

/// `nodeSelector` and `tolerations` (YAML, indented by `indent` spaces) that put a pod on
/// the real node.
pub fn on_real_node(indent: usize) -> String {
    let pad = " ".repeat(indent);
    format!(
        "{pad}nodeSelector: {{\"{}\": \"{}\"}}\n{pad}tolerations: [{{key: \"{NODE_TAINT}\", operator: Exists, effect: NoSchedule}}]",
        NODE_LABEL.0, NODE_LABEL.1
    )
}

/// A region whose control plane listens where its real node's pods reach it.
pub struct RealRegion {
    /// The node's name (also its network namespace's suffix).
    pub node: String,
    /// The host's end of the node's veth: the API server's and the global etcd's address.
    pub host: String,
    /// The node's own address (its kubelet, CoreDNS, NodePorts).
    pub node_ip: String,
    pub region: Region,
}

fn node_script() -> PathBuf {
    repo_root().join("e2e/bin/node")
}

fn run(cmd: &mut Command, what: &str) -> Result<String> {
    let out = cmd
        .stderr(Stdio::piped())
        .output()
        .with_context(|| format!("running {what}"))?;
    if !out.status.success() {
        bail!("{what} failed: {}", String::from_utf8_lossy(&out.stderr));
    }
    Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
}

/// The first veth index whose addresses no other lab on this machine holds.
fn free_index() -> Result<u8> {
    let addrs = run(Command::new("ip").args(["-o", "addr", "show"]), "ip addr")?;
    (1..=200u8)
        .find(|i| !addrs.contains(&format!(" 10.199.{i}.1/")))
        .context("every real-node address (10.199.1-200.1) is taken")
}

impl RealRegion {
    /// Region `name` with one real node, Ready. The node's name carries the process id,
    /// so runs never share one.
    pub fn up(name: &str) -> Result<Self> {
        // The node's own servers are built on first use (`make tools` builds the rest);
        // a build already running, e.g. CI's in the background, is waited for.
        crate::build_tools("--node")?;
        let node = format!(
            "{}{}",
            &name[..name.len().min(4)],
            std::process::id() % 100_000
        );
        // Regions brought up side by side must not pick the same free index.
        static ADDRESSES: parking_lot::Mutex<()> = parking_lot::Mutex::new(());
        let host = {
            let _taking = ADDRESSES.lock();
            let index = free_index()?;
            run(
                Command::new(node_script()).args(["net", &node, &index.to_string()]),
                "e2e/bin/node net",
            )?
        };
        let place = Place {
            netns: None,
            host: host.clone(),
        };
        let region = match Region::up_in(name, place) {
            Ok(r) => r,
            Err(e) => {
                let _ = Command::new(node_script()).args(["down", &node]).status();
                return Err(e);
            }
        };
        let real = Self {
            node_ip: format!("{}.2", host.rsplit_once('.').map_or("", |(net, _)| net)),
            node,
            host,
            region,
        };
        let kubeconfig = real.region.kubeconfig();
        run(
            Command::new(node_script())
                .args(["up", &real.node, "--region", name, "--kubeconfig"])
                .arg(&kubeconfig),
            "e2e/bin/node up",
        )?;
        Ok(real)
    }

    /// Imports OCI archives into the node's containerd (pods use them as present).
    pub fn import(&self, archives: &[PathBuf]) -> Result<()> {
        let mut cmd = Command::new(node_script());
        cmd.args(["import", &self.node]).args(archives);
        run(&mut cmd, "e2e/bin/node import").map(|_| ())
    }

    /// The node's logs directory (containerd, kubelet, kube-proxy, CoreDNS).
    pub fn logs(&self) -> PathBuf {
        nodes_dir().join(&self.node).join("logs")
    }

    /// Helm against this region.
    pub fn helm(&self, args: &[&str]) -> Result<String> {
        run(
            Command::new(tools_bin().join("helm"))
                .args(args)
                .env("KUBECONFIG", self.region.kubeconfig()),
            &format!("helm {}", args.first().unwrap_or(&"")),
        )
    }
}

impl Drop for RealRegion {
    fn drop(&mut self) {
        let _ = Command::new(node_script())
            .args(["down", &self.node])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
    }
}

fn nodes_dir() -> PathBuf {
    std::env::var_os("CELLPLANE_NODES_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/tmp/cellplane-nodes"))
}

/// The project's images (debug builds of this workspace) and the lab's store images,
/// built once and cached by content: every archive under `target/images`.
pub fn build_images() -> Result<Vec<PathBuf>> {
    let images = repo_root().join("e2e/bin/images");
    run(
        Command::new("python3")
            .arg(&images)
            .args(["--profile", "debug"]),
        "e2e/bin/images",
    )?;
    let stores = run(
        &mut Command::new(repo_root().join("e2e/bin/store-images")),
        "e2e/bin/store-images",
    )?;
    let mut archives: Vec<PathBuf> = stores.lines().map(PathBuf::from).collect();
    let out = repo_root().join("target/images");
    for entry in std::fs::read_dir(&out)? {
        let path = entry?.path();
        let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("");
        if name.ends_with(".oci.tar") && !name.starts_with("store-") && name != "pause.oci.tar" {
            archives.push(path);
        }
    }
    Ok(archives)
}

impl RealRegion {
    /// `count` local PersistentVolumes on the node (StorageClass `lab-local`, bound when a
    /// pod is scheduled): what a cluster's volume provisioner would hand out (the lab has
    /// none). Their directories are under `dir`.
    pub fn add_local_volumes(&self, dir: &std::path::Path, count: usize) -> Result<()> {
        let mut docs = vec![r#"
apiVersion: storage.k8s.io/v1
kind: StorageClass
metadata: {name: lab-local}
provisioner: kubernetes.io/no-provisioner
volumeBindingMode: WaitForFirstConsumer
"#
        .to_string()];
        for i in 0..count {
            let path = dir.join(format!("pv-{i}"));
            std::fs::create_dir_all(&path)?;
            // The stores run as their own non-root users; a hostPath volume is not chowned
            // by fsGroup.
            std::fs::set_permissions(&path, std::os::unix::fs::PermissionsExt::from_mode(0o777))?;
            docs.push(format!(
                r#"
apiVersion: v1
kind: PersistentVolume
metadata: {{name: lab-{node}-{i}}}
spec:
  capacity: {{storage: 5Gi}}
  accessModes: [ReadWriteOnce]
  storageClassName: lab-local
  persistentVolumeReclaimPolicy: Delete
  hostPath: {{path: "{path}", type: Directory}}
  nodeAffinity:
    required:
      nodeSelectorTerms: [{{matchExpressions: [{{key: kubernetes.io/hostname, operator: In, values: ["{node}"]}}]}}]
"#,
                node = self.node,
                path = path.display()
            ));
        }
        let file = dir.join("volumes.yaml");
        std::fs::write(&file, docs.join("\n---\n"))?;
        self.region
            .kubectl(&["apply", "-f", file.to_str().context("path")?])
            .map(|_| ())
    }
}

/// The address of a Ready pod matching `selector`, if one is.
pub async fn ready_pod_ip(pods: &Api<Pod>, selector: &str) -> Result<Option<String>> {
    let list = pods.list(&ListParams::default().labels(selector)).await?;
    Ok(list.items.into_iter().find_map(|p| {
        let s = p.status?;
        let ready = s
            .conditions?
            .iter()
            .any(|c| c.type_ == "Ready" && c.status == "True");
        ready.then_some(s.pod_ip?)
    }))
}

/// One HTTP request to `port` of the first pod matching `selector`, through the API
/// server's port-forward: how an SRE reaches a port a NetworkPolicy keeps the host from.
pub async fn through_port_forward(
    pods: &Api<Pod>,
    selector: &str,
    port: u16,
    request: (&str, &str, &[(&str, &str)], Bytes),
) -> Result<Reply> {
    let pod = pods
        .list(&ListParams::default().labels(selector))
        .await?
        .items
        .into_iter()
        .next()
        .and_then(|p| p.metadata.name)
        .with_context(|| format!("no pod matches {selector}"))?;
    let mut forward = pods.portforward(&pod, &[port]).await?;
    let stream = forward
        .take_stream(port)
        .with_context(|| format!("port {port} of {pod} forwarded"))?;
    let (method, path, headers, body) = request;
    send_over(stream, "localhost", method, path, headers, body).await
}
