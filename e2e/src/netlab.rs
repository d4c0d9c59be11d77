//! Regions you can cut (I/O): `e2e/bin/netlab` puts each region in its own network
//! namespace on a bridge; a [`Place`] says where a process runs and which address it
//! listens on. The lab only uses addresses inside the namespaces it made (10.77.0.0/24).

use crate::repo_root;
use anyhow::{bail, Context as _, Result};
use std::ffi::OsStr;
use std::path::PathBuf;
use std::process::{Command, Stdio};

/// Where a process runs: the host's loopback, or inside a lab region's namespace on its
/// address.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Place {
    pub netns: Option<String>,
    /// The address its servers listen on and are reached at.
    pub host: String,
}

impl Place {
    pub fn local() -> Self {
        Self {
            netns: None,
            host: "127.0.0.1".into(),
        }
    }

    /// A command that runs `program` here.
    pub fn command(&self, program: impl AsRef<OsStr>) -> Command {
        match &self.netns {
            None => Command::new(program),
            Some(ns) => {
                let mut c = Command::new("ip");
                c.args(["netns", "exec", ns]).arg(program);
                c
            }
        }
    }

    /// `host:port` here.
    pub fn addr(&self, port: u16) -> String {
        format!("{}:{port}", self.host)
    }
}

/// The lab's regions; removed (every process in them killed) on drop.
pub struct NetLab {
    dir: PathBuf,
    regions: Vec<String>,
}

impl NetLab {
    /// Creates one namespace per region (needs root).
    pub fn up(regions: &[&str]) -> Result<Self> {
        let dir = std::env::temp_dir().join(format!("cellplane-netlab-{}", std::process::id()));
        let lab = Self {
            dir,
            regions: regions.iter().map(|r| r.to_string()).collect(),
        };
        lab.run(&[&["up"], regions].concat())?;
        Ok(lab)
    }

    fn run(&self, args: &[&str]) -> Result<String> {
        let out = Command::new(repo_root().join("e2e/bin/netlab"))
            .args(args)
            .env("CELLPLANE_NETLAB_DIR", &self.dir)
            .stderr(Stdio::piped())
            .output()
            .context("running e2e/bin/netlab")?;
        if !out.status.success() {
            bail!(
                "e2e/bin/netlab {}: {}",
                args.join(" "),
                String::from_utf8_lossy(&out.stderr)
            );
        }
        Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
    }

    /// Region `region`'s place.
    pub fn place(&self, region: &str) -> Result<Place> {
        Ok(Place {
            netns: Some(self.run(&["ns", region])?),
            host: self.run(&["addr", region])?,
        })
    }

    /// Isolates `region` (its processes keep running and reach each other).
    pub fn cut(&self, region: &str) -> Result<()> {
        self.run(&["cut", region]).map(|_| ())
    }

    pub fn heal(&self, region: &str) -> Result<()> {
        self.run(&["heal", region]).map(|_| ())
    }

    /// `kill -9` every process of `region`.
    pub fn kill(&self, region: &str) -> Result<()> {
        self.run(&["kill", region]).map(|_| ())
    }

    pub fn regions(&self) -> &[String] {
        &self.regions
    }
}

impl Drop for NetLab {
    fn drop(&mut self) {
        let _ = self.run(&["down"]);
    }
}
