//! Test support (I/O): real local regions started by `e2e/bin/region`, the operator as a
//! separate process, and condition waits. Everything started here stops on drop, also
//! when a test fails.

pub mod browser;
pub mod cell;
pub mod lab;
pub mod net;
pub mod netlab;
pub mod pki;
pub mod prometheus;
pub mod real;
pub mod real_platform;

use netlab::Place;

use anyhow::{bail, Context as _, Result};
use kube::api::{Api, DynamicObject, Patch, PatchParams};
use kube::config::{KubeConfigOptions, Kubeconfig};
use kube::core::GroupVersionKind;
use kube::discovery::ApiResource;
use kube::{Client, Config};
use std::future::Future;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// The repository root.
pub fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("e2e/ sits in the repo")
        .to_path_buf()
}

/// Directory of the cached real servers (built by `e2e/bin/tools`).
pub fn tools_bin() -> PathBuf {
    let out = Command::new(repo_root().join("e2e/bin/tools"))
        .arg("--print")
        .output()
        .expect("e2e/bin/tools runs");
    PathBuf::from(String::from_utf8_lossy(&out.stdout).trim())
}

/// Builds a group of the test servers that `make tools` leaves to their first user
/// (`--node`: the real node's; `--tofu`: OpenTofu and its providers): cached ones are
/// skipped, and a build already running (CI's in the background) is waited for.
pub fn build_tools(group: &str) -> Result<()> {
    let out = Command::new(repo_root().join("e2e/bin/tools"))
        .arg(group)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .output()
        .with_context(|| format!("running e2e/bin/tools {group}"))?;
    if !out.status.success() {
        bail!(
            "e2e/bin/tools {group} failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(())
}

/// A built workspace binary: the debug build (`make test` builds them before the tests
/// run), or with `CELLPLANE_PROFILE=release` the release build (`make bench-drill`: what
/// a benchmark measures is what production runs).
pub fn workspace_bin(name: &str) -> PathBuf {
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| repo_root().join("target"));
    let release = std::env::var("CELLPLANE_PROFILE").is_ok_and(|p| p == "release");
    let path = target
        .join(if release { "release" } else { "debug" })
        .join(name);
    assert!(
        path.exists(),
        "{} is missing: run `cargo build{} -p {name}`",
        path.display(),
        if release { " --release" } else { "" }
    );
    path
}

/// One real region: etcd, kube-apiserver, controller-manager, scheduler, kwok, fake nodes.
pub struct Region {
    pub name: String,
    pub dir: PathBuf,
    state_root: PathBuf,
    /// Where its control plane and operators run.
    pub place: Place,
}

impl Region {
    /// Starts region `name` in its own state directory (unique per process, so test
    /// runs never collide).
    pub fn up(name: &str) -> Result<Self> {
        Self::up_in(name, Place::local())
    }

    /// Starts region `name` at `place` (a netlab region's namespace and address).
    pub fn up_in(name: &str, place: Place) -> Result<Self> {
        sweep_dead_test_dirs();
        let state_root =
            std::env::temp_dir().join(format!("cellplane-e2e-{}-{name}", std::process::id()));
        std::fs::create_dir_all(&state_root)?;
        let status = place
            .command(repo_root().join("e2e/bin/region"))
            .args(["up", name, "--address", &place.host])
            .env("CELLPLANE_REGIONS_DIR", &state_root)
            .stdout(Stdio::null())
            .status()
            .context("running e2e/bin/region up")?;
        let region = Self {
            name: name.into(),
            dir: state_root.join(name),
            state_root,
            place,
        };
        if !status.success() {
            bail!(
                "region {name} failed to start; logs under {}",
                region.dir.join("logs").display()
            );
        }
        Ok(region)
    }

    pub fn kubeconfig(&self) -> PathBuf {
        self.dir.join("kubeconfig")
    }

    /// The region's own etcd (the one its API server uses), for registration tests.
    pub fn etcd_endpoint(&self) -> String {
        std::fs::read_to_string(self.dir.join("etcd-endpoint"))
            .expect("region wrote its etcd endpoint")
            .trim()
            .into()
    }

    pub async fn client(&self) -> Result<Client> {
        let kc = Kubeconfig::read_from(self.kubeconfig())?;
        let config = Config::from_custom_kubeconfig(kc, &KubeConfigOptions::default()).await?;
        Ok(Client::try_from(config)?)
    }

    /// Runs the region's kubectl and returns stdout; fails with stderr on a non-zero exit.
    pub fn kubectl(&self, args: &[&str]) -> Result<String> {
        let out = Command::new(tools_bin().join("kubectl"))
            .arg("--kubeconfig")
            .arg(self.kubeconfig())
            .args(args)
            .output()?;
        if !out.status.success() {
            bail!(
                "kubectl {}: {}",
                args.join(" "),
                String::from_utf8_lossy(&out.stderr)
            );
        }
        Ok(String::from_utf8_lossy(&out.stdout).into())
    }

    /// `kubectl auth can-i VERB RESOURCE --as USER [-n NS]` (no namespace: a cluster-scoped
    /// resource): Ok(true) for "yes", Ok(false)
    /// for a plain "no", and an error for anything else (a resource the API server does
    /// not know, a failed call), so a misspelt resource never passes as "not allowed".
    pub fn can_i(&self, user: &str, verb: &str, resource: &str, ns: Option<&str>) -> Result<bool> {
        let mut args = vec!["auth", "can-i", verb, resource, "--as", user];
        if let Some(ns) = ns {
            args.extend(["-n", ns]);
        }
        let out = Command::new(tools_bin().join("kubectl"))
            .arg("--kubeconfig")
            .arg(self.kubeconfig())
            .args(&args)
            .output()?;
        let (stdout, stderr) = (
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr),
        );
        // kubectl notes that a cluster-scoped resource ignores the context's namespace;
        // that is not a problem with the question.
        let stderr: String = stderr
            .lines()
            .filter(|l| !l.contains("is not namespace scoped"))
            .collect();
        match (stdout.trim(), stderr.trim()) {
            ("yes", "") if out.status.success() => Ok(true),
            ("no", "") if out.status.code() == Some(1) => Ok(false),
            _ => bail!("kubectl {}: {stdout} {stderr}", args.join(" ")),
        }
    }

    /// Installs `crds/` and waits until the API server serves them.
    pub fn install_crds(&self) -> Result<()> {
        let crds = repo_root().join("crds/cellplane.yaml");
        self.kubectl(&["apply", "-f", crds.to_str().unwrap()])?;
        self.kubectl(&[
            "wait",
            "--for=condition=Established",
            "--timeout=60s",
            "crd/cells.cellplane.io",
            "crd/cellsets.cellplane.io",
        ])?;
        Ok(())
    }

    /// Kills the API server like a crash and starts it again on the same port.
    pub fn restart_apiserver(&self) -> Result<()> {
        let status = self
            .place
            .command(repo_root().join("e2e/bin/region"))
            .args(["restart-apiserver", &self.name])
            .env("CELLPLANE_REGIONS_DIR", &self.state_root)
            .stdout(Stdio::null())
            .status()?;
        if !status.success() {
            bail!("restarting the API server of {} failed", self.name);
        }
        Ok(())
    }

    /// Starts an operator of this region that takes part in platform `shop` through the
    /// global etcd at `etcd_endpoints` (campaigns for the platform, carries out its cells'
    /// intents), with a short platform lease so takeovers are quick in tests.
    pub fn platform_operator(&self, etcd_endpoints: &str, extra: &[&str]) -> Result<Operator> {
        let mut args = vec![
            "--region",
            &self.name,
            "--platform",
            "shop",
            "--etcd-endpoints",
            etcd_endpoints,
            "--platform-lease",
            "3",
        ];
        args.extend_from_slice(extra);
        self.operator(&format!("op-{}", self.name), &args)
    }

    /// Starts a `cellplane-operator run` against this region.
    pub fn operator(&self, identity: &str, extra: &[&str]) -> Result<Operator> {
        let log_path = self
            .dir
            .join("logs")
            .join(format!("operator-{identity}.log"));
        let log = std::fs::File::create(&log_path)?;
        let port = free_port()?;
        let child = self
            .place
            .command(workspace_bin("cellplane-operator"))
            .args([
                "run",
                "--identity",
                identity,
                "--http-addr",
                &self.place.addr(port),
                "--lease-duration",
                "6",
            ])
            .args(extra)
            .env("KUBECONFIG", self.kubeconfig())
            .env("CELLPLANE_EXPORT_DIR", self.dir.join("exports"))
            .env("RUST_LOG", "info,kube=warn")
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .context("starting cellplane-operator")?;
        Ok(Operator {
            child,
            port,
            host: self.place.host.clone(),
            log: log_path,
        })
    }
}

impl Drop for Region {
    fn drop(&mut self) {
        let _ = Command::new(repo_root().join("e2e/bin/region"))
            .args(["down", &self.name])
            .env("CELLPLANE_REGIONS_DIR", &self.state_root)
            .stderr(Stdio::null())
            .status();
        let _ = std::fs::remove_dir_all(&self.state_root);
    }
}

/// An operator process; killed on drop.
pub struct Operator {
    child: Child,
    pub port: u16,
    /// The address its HTTP port listens on.
    pub host: String,
    pub log: PathBuf,
}

impl Operator {
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Asks for a graceful stop (SIGTERM) without waiting.
    pub fn terminate(&self) -> Result<()> {
        sigterm(&self.child)
    }

    /// Waits up to `timeout` for the process to exit; its exit status.
    pub async fn exited(&mut self, timeout: Duration) -> Result<std::process::ExitStatus> {
        exited(&mut self.child, "operator", timeout).await
    }

    /// Its /metrics text.
    pub fn metrics(&self) -> Result<String> {
        let out = Command::new("curl")
            .args([
                "-sf",
                "--max-time",
                "2",
                &format!("http://{}:{}/metrics", self.host, self.port),
            ])
            .output()?;
        Ok(String::from_utf8_lossy(&out.stdout).into())
    }
}

impl Drop for Operator {
    fn drop(&mut self) {
        self.kill();
    }
}

/// A Secret with `username` and `password` (what external stores' `secretRef` and
/// `adminSecretRef` name), in namespace `default`.
pub fn credentials_secret_yaml(name: &str, user: &str, password: &str) -> String {
    format!(
        "apiVersion: v1\nkind: Secret\nmetadata: {{name: {name}, namespace: default}}\nstringData: {{username: \"{user}\", password: \"{password}\"}}\n"
    )
}

/// Sends SIGTERM to a child process (a graceful stop).
pub fn sigterm(child: &Child) -> Result<()> {
    let status = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()?;
    anyhow::ensure!(status.success(), "kill -TERM {} failed", child.id());
    Ok(())
}

/// Waits up to `timeout` for `child` to exit; its exit status.
pub async fn exited(
    child: &mut Child,
    what: &str,
    timeout: Duration,
) -> Result<std::process::ExitStatus> {
    wait_for(&format!("{what} to exit"), timeout, || {
        let status = child.try_wait();
        async move { Ok(status?) }
    })
    .await
}

/// A fresh directory for one test's files (unique per test process). Left behind for a
/// look after a failure; removed by the next test process once this one has exited.
pub fn test_dir(name: &str) -> PathBuf {
    sweep_dead_test_dirs();
    let d = std::env::temp_dir().join(format!("cellplane-test-{}-{name}", std::process::id()));
    std::fs::create_dir_all(&d).expect("temp dir is writable");
    d
}

/// Removes what test processes that no longer run left in the temp directory (their test
/// dirs, regions, etcd and stores, named with their process id), once per process: a
/// machine that runs the suite again and again does not fill its disk.
fn sweep_dead_test_dirs() {
    static SWEPT: std::sync::Once = std::sync::Once::new();
    SWEPT.call_once(|| {
        let Ok(entries) = std::fs::read_dir(std::env::temp_dir()) else {
            return;
        };
        for entry in entries.flatten() {
            let name = entry.file_name();
            let Some(pid) = name.to_str().and_then(test_dir_owner) else {
                continue;
            };
            if pid != std::process::id() && !Path::new(&format!("/proc/{pid}")).exists() {
                let _ = std::fs::remove_dir_all(entry.path());
            }
        }
    });
}

/// The process id in a name the lab gives its temp dirs (`cellplane-test-<pid>-...`).
fn test_dir_owner(name: &str) -> Option<u32> {
    let rest = [
        "cellplane-test-",
        "cellplane-e2e-",
        "cellplane-etcd-",
        "cellplane-stores-",
    ]
    .iter()
    .find_map(|p| name.strip_prefix(p))?;
    let digits = rest.split('-').next()?;
    digits.parse().ok()
}

pub fn free_port() -> Result<u16> {
    Ok(free_ports::<1>()?[0])
}

/// `N` distinct free ports, from the ledger the region and store scripts share
/// (`e2e/bin/free-ports`): a port handed to any caller on this machine stays reserved for
/// 10 minutes, so tests, regions and stores started in parallel never pick the same one
/// before they bind it.
pub fn free_ports<const N: usize>() -> Result<[u16; N]> {
    let out = Command::new(repo_root().join("e2e/bin/free-ports"))
        .arg(N.to_string())
        .output()
        .context("running e2e/bin/free-ports")?;
    if !out.status.success() {
        bail!(
            "e2e/bin/free-ports: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let picked: Vec<u16> = String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .map(str::parse)
        .collect::<std::result::Result<_, _>>()
        .context("e2e/bin/free-ports printed something other than ports")?;
    picked.try_into().map_err(|p: Vec<u16>| {
        anyhow::anyhow!("e2e/bin/free-ports gave {} ports, not {N}", p.len())
    })
}

/// Polls `check` until it returns Some or `timeout` passes; the error names `what`.
pub async fn wait_for<T, F, Fut>(what: &str, timeout: Duration, mut check: F) -> Result<T>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<Option<T>>>,
{
    let start = Instant::now();
    let mut last_err = None;
    loop {
        match check().await {
            Ok(Some(v)) => return Ok(v),
            Ok(None) => {}
            Err(e) => last_err = Some(e),
        }
        if start.elapsed() > timeout {
            bail!("timed out after {timeout:?} waiting for {what} (last error: {last_err:?})");
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Server-side applies a YAML document (any kind) as the test's field manager.
pub async fn apply_yaml(
    client: &Client,
    namespace: &str,
    yaml: &str,
) -> Result<DynamicObject, kube::Error> {
    let obj: DynamicObject = serde_yaml::from_str(yaml).expect("test YAML parses");
    let tm = obj.types.clone().expect("YAML has apiVersion and kind");
    let (group, version) = tm
        .api_version
        .split_once('/')
        .unwrap_or(("", &tm.api_version));
    let ar = ApiResource::from_gvk(&GroupVersionKind::gvk(group, version, &tm.kind));
    let api: Api<DynamicObject> = Api::namespaced_with(client.clone(), namespace, &ar);
    let name = obj.metadata.name.clone().expect("YAML has a name");
    api.patch(
        &name,
        &PatchParams::apply("cellplane-e2e"),
        &Patch::Apply(&obj),
    )
    .await
}

#[cfg(test)]
mod tests {
    #[test]
    fn lab_dirs_name_their_process() {
        assert_eq!(
            super::test_dir_owner("cellplane-test-123-images"),
            Some(123)
        );
        assert_eq!(super::test_dir_owner("cellplane-stores-77"), Some(77));
        assert_eq!(super::test_dir_owner("cellplane-e2e-9-us"), Some(9));
        assert_eq!(super::test_dir_owner("cellplane-nodes"), None);
        assert_eq!(super::test_dir_owner("cellplane-test-x-1"), None);
    }
}
