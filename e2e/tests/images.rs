//! The images `e2e/bin/images` builds, run under a real OCI runtime (Debian's `runc`, the
//! runtime containerd drives for a kubelet): each image's archive is unpacked the way a
//! runtime reads it (index -> manifest -> config -> layer), each runs as the non-root user
//! its config names with a read-only root filesystem and answers `--version`, and the
//! router's image serves `/readyz` from a mounted routing table. The images are built from
//! the debug binaries `make test` already has (`make images` builds the release ones).

use anyhow::{bail, Context as _};
use cellplane_e2e::net::{one_cell_table, wait_ok};
use cellplane_e2e::{free_port, repo_root, test_dir};
use serde_json::{json, Value};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

const VERSION: &str = env!("CARGO_PKG_VERSION");
const UID: u64 = 65532;

/// An unpacked image: its rootfs and its config's `config` object.
struct Unpacked {
    bundle: PathBuf,
    config: Value,
}

fn blob(layout: &Path, digest: &str) -> anyhow::Result<PathBuf> {
    let hex = digest
        .strip_prefix("sha256:")
        .with_context(|| format!("digest {digest}"))?;
    Ok(layout.join("blobs/sha256").join(hex))
}

fn json_file(path: &Path) -> anyhow::Result<Value> {
    Ok(serde_json::from_slice(&std::fs::read(path)?)?)
}

fn sh(cmd: &mut Command) -> anyhow::Result<String> {
    let out = cmd.output().with_context(|| format!("{cmd:?}"))?;
    if !out.status.success() {
        bail!(
            "{cmd:?}: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Reads `archive` as a runtime does and unpacks its layer into `<dir>/rootfs`.
fn unpack(archive: &Path, dir: &Path, ref_name: &str) -> anyhow::Result<Unpacked> {
    let layout = dir.join("oci");
    std::fs::create_dir_all(&layout)?;
    sh(Command::new("tar")
        .arg("-xf")
        .arg(archive)
        .arg("-C")
        .arg(&layout))?;
    assert_eq!(
        json_file(&layout.join("oci-layout"))?["imageLayoutVersion"],
        "1.0.0"
    );
    let index = json_file(&layout.join("index.json"))?;
    let entry = &index["manifests"][0];
    assert_eq!(
        entry["annotations"]["io.containerd.image.name"], ref_name,
        "named as the chart expects"
    );
    let manifest = json_file(&blob(&layout, entry["digest"].as_str().unwrap())?)?;
    let config = json_file(&blob(
        &layout,
        manifest["config"]["digest"].as_str().unwrap(),
    )?)?;
    let layer = blob(&layout, manifest["layers"][0]["digest"].as_str().unwrap())?;
    let rootfs = dir.join("rootfs");
    std::fs::create_dir_all(&rootfs)?;
    sh(Command::new("tar")
        .arg("-xzf")
        .arg(&layer)
        .arg("-C")
        .arg(&rootfs))?;
    Ok(Unpacked {
        bundle: dir.to_path_buf(),
        config: config["config"].clone(),
    })
}

/// Writes the bundle's `config.json` (from `runc spec`): the image's entrypoint with
/// `args`, its user, a read-only root; `host_network` shares the host's network (so the
/// test can reach the process), `mounts` adds read-only bind mounts.
fn runtime_config(
    img: &Unpacked,
    args: &[&str],
    host_network: bool,
    mounts: &[(&Path, &str)],
) -> anyhow::Result<()> {
    sh(Command::new("runc").arg("spec").current_dir(&img.bundle))?;
    let path = img.bundle.join("config.json");
    let mut spec = json_file(&path)?;
    let mut argv: Vec<Value> = img.config["Entrypoint"].as_array().unwrap().clone();
    argv.extend(args.iter().map(|a| json!(a)));
    let (uid, gid) = img.config["User"]
        .as_str()
        .and_then(|u| u.split_once(':'))
        .context("the image names its user as uid:gid")?;
    spec["process"]["terminal"] = json!(false);
    spec["process"]["args"] = json!(argv);
    spec["process"]["env"] = img.config["Env"].clone();
    spec["process"]["cwd"] = img.config["WorkingDir"].clone();
    spec["process"]["user"] = json!({"uid": uid.parse::<u64>()?, "gid": gid.parse::<u64>()?});
    spec["root"] = json!({"path": "rootfs", "readonly": true});
    if host_network {
        let namespaces = spec["linux"]["namespaces"].as_array_mut().unwrap();
        namespaces.retain(|n| n["type"] != "network");
    }
    let all_mounts = spec["mounts"].as_array_mut().unwrap();
    for (source, target) in mounts {
        all_mounts.push(json!({
            "destination": target, "type": "bind", "source": source,
            "options": ["rbind", "ro"],
        }));
    }
    std::fs::write(&path, serde_json::to_vec_pretty(&spec)?)?;
    Ok(())
}

/// Kills and removes a container when dropped.
struct Container(String);

impl Drop for Container {
    fn drop(&mut self) {
        let _ = Command::new("runc")
            .args(["delete", "--force", &self.0])
            .output();
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn every_image_runs_as_non_root_and_answers() -> anyhow::Result<()> {
    if Command::new("runc").arg("--version").output().is_err() {
        bail!("runc is missing: run e2e/bin/setup (it installs Debian's runc)");
    }
    let dir = test_dir("images");
    let out = dir.join("images");
    let built = sh(Command::new(repo_root().join("e2e/bin/images"))
        .args(["--profile", "debug", "--out"])
        .arg(&out))?;
    println!("{built}");
    let images = [
        ("cellplane-operator", "cellplane-operator"),
        ("cellplane-router", "cellplane-router"),
        ("shop", "cellplane-cell-app"),
        ("cellplane", "cellplane"),
    ];
    for (name, binary) in images {
        let archive = out.join(format!("{name}-{VERSION}.oci.tar"));
        let img = unpack(
            &archive,
            &dir.join(name),
            &format!("ghcr.io/cellplane/{name}:{VERSION}"),
        )?;
        assert_eq!(
            img.config["User"],
            format!("{UID}:{UID}"),
            "{name} runs as non-root"
        );
        runtime_config(&img, &["--version"], false, &[])?;
        let id = format!("cellplane-e2e-{}-{name}", std::process::id());
        let _container = Container(id.clone());
        let printed = sh(Command::new("runc")
            .args(["run", "--bundle"])
            .arg(&img.bundle)
            .arg(&id))?;
        assert_eq!(printed.trim(), format!("{binary} {VERSION}"), "{name}");
    }

    // The router's image serves: a table mounted read-only, its /readyz answered on the
    // host's loopback, its process owned by the image's user.
    let img = unpack(
        &out.join(format!("cellplane-router-{VERSION}.oci.tar")),
        &dir.join("router-serving"),
        &format!("ghcr.io/cellplane/cellplane-router:{VERSION}"),
    )?;
    let tables = dir.join("tables");
    std::fs::create_dir_all(&tables)?;
    std::fs::write(
        tables.join("table.json"),
        one_cell_table("127.0.0.1:9").encode(),
    )?;
    let (listen, metrics) = (free_port()?, free_port()?);
    let (listen_arg, metrics_arg) = (
        format!("127.0.0.1:{listen}"),
        format!("127.0.0.1:{metrics}"),
    );
    runtime_config(
        &img,
        &[
            "--table-file",
            "/etc/cellplane/table.json",
            "--listen",
            &listen_arg,
            "--metrics-listen",
            &metrics_arg,
        ],
        true,
        &[(&tables, "/etc/cellplane")],
    )?;
    let id = format!("cellplane-e2e-{}-router", std::process::id());
    let container = Container(id.clone());
    let log = std::fs::File::create(dir.join("router.log"))?;
    let mut child = Command::new("runc")
        .args(["run", "--bundle"])
        .arg(&img.bundle)
        .arg(&id)
        .stdout(log.try_clone()?)
        .stderr(log)
        .spawn()?;
    let ready = wait_ok(
        "the router's image ready",
        &format!("http://127.0.0.1:{metrics}/readyz"),
        Duration::from_secs(30),
    )
    .await;
    let state: Value = serde_json::from_str(&sh(Command::new("runc").args(["state", &id]))?)?;
    let pid = state["pid"]
        .as_u64()
        .context("a running container has a pid")?;
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let uid_line = status.lines().find(|l| l.starts_with("Uid:")).unwrap_or("");
    drop(container);
    let _ = child.wait();
    ready.with_context(|| std::fs::read_to_string(dir.join("router.log")).unwrap_or_default())?;
    assert!(
        uid_line
            .split_whitespace()
            .skip(1)
            .all(|u| u == UID.to_string()),
        "the router runs as {UID}: {uid_line}"
    );
    Ok(())
}
