//! A real Prometheus (built from its Go module by `e2e/bin/tools`) scraping the lab's
//! components, and the queries the project ships: every alert rule and dashboard panel
//! is run against it.

use crate::{free_port, tools_bin, wait_for};
use anyhow::{bail, Context, Result};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

pub struct Prometheus {
    child: Child,
    pub addr: String,
    pub log: PathBuf,
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The repository's alert rules file and dashboard.
pub fn rules_file() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../charts/cellplane-operator/files/alerts.yaml")
}

pub fn dashboard_file() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../charts/cellplane-operator/files/dashboard.json")
}

/// Every expression of the rules file.
pub fn rule_exprs(path: &Path) -> Result<Vec<(String, String)>> {
    let doc: serde_yaml::Value = serde_yaml::from_str(&std::fs::read_to_string(path)?)?;
    let mut out = Vec::new();
    for group in doc["groups"].as_sequence().context("groups")? {
        for rule in group["rules"].as_sequence().context("rules")? {
            let name = rule["alert"].as_str().unwrap_or("record").to_string();
            out.push((name, rule["expr"].as_str().context("expr")?.to_string()));
        }
    }
    Ok(out)
}

/// Every query of the dashboard's panels.
pub fn dashboard_exprs(path: &Path) -> Result<Vec<(String, String)>> {
    let doc: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(path)?)?;
    let mut out = Vec::new();
    for panel in doc["panels"].as_array().context("panels")? {
        let title = panel["title"].as_str().unwrap_or("").to_string();
        for t in panel["targets"].as_array().context("targets")? {
            out.push((
                title.clone(),
                t["expr"].as_str().context("expr")?.to_string(),
            ));
        }
    }
    Ok(out)
}

/// The metric names an expression uses (the project's own, `cellplane_*`), with the
/// suffixes Prometheus adds to a histogram's series.
pub fn metric_names(expr: &str) -> Vec<String> {
    let mut out = Vec::new();
    let bytes = expr.as_bytes();
    let mut i = 0;
    while let Some(at) = expr[i..].find("cellplane_") {
        let start = i + at;
        let mut end = start;
        while end < bytes.len() && (bytes[end].is_ascii_alphanumeric() || bytes[end] == b'_') {
            end += 1;
        }
        out.push(expr[start..end].to_string());
        i = end;
    }
    out.sort();
    out.dedup();
    out
}

impl Prometheus {
    /// Starts Prometheus scraping each job's targets (`host:port`, path `/metrics`) every
    /// second, evaluating the shipped alert rules, and waits until it answers.
    pub async fn start(dir: &Path, jobs: &[(&str, Vec<String>)]) -> Result<Self> {
        let port = free_port()?;
        let mut cfg = format!(
            "global: {{scrape_interval: 1s, evaluation_interval: 1s}}\nrule_files: ['{}']\nscrape_configs:\n",
            rules_file().display()
        );
        for (job, targets) in jobs {
            let list = targets
                .iter()
                .map(|t| format!("'{t}'"))
                .collect::<Vec<_>>()
                .join(", ");
            cfg.push_str(&format!(
                "  - job_name: {job}\n    static_configs: [{{targets: [{list}]}}]\n"
            ));
        }
        std::fs::create_dir_all(dir)?;
        let file = dir.join("prometheus.yml");
        std::fs::write(&file, cfg)?;
        let log = dir.join("prometheus.log");
        let child = Command::new(tools_bin().join("prometheus"))
            .arg(format!("--config.file={}", file.display()))
            .arg(format!(
                "--storage.tsdb.path={}",
                dir.join("data").display()
            ))
            .arg(format!("--web.listen-address=127.0.0.1:{port}"))
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log)?)
            .spawn()
            .context("starting prometheus (e2e/bin/tools builds it)")?;
        let p = Self {
            child,
            addr: format!("127.0.0.1:{port}"),
            log,
        };
        let ready = format!("http://{}/-/ready", p.addr);
        wait_for("prometheus ready", Duration::from_secs(30), || async {
            Ok(crate::net::get(&ready, &[])
                .await
                .ok()
                .filter(|r| r.status == 200))
        })
        .await?;
        Ok(p)
    }

    async fn api(&self, path: &str) -> Result<serde_json::Value> {
        let r = crate::net::get(&format!("http://{}{path}", self.addr), &[]).await?;
        let v: serde_json::Value = serde_json::from_str(&r.body)
            .with_context(|| format!("prometheus answered {}: {}", r.status, r.body))?;
        if v["status"] != "success" {
            bail!("{}", v);
        }
        Ok(v["data"].clone())
    }

    /// The metric names it has scraped.
    pub async fn names(&self) -> Result<Vec<String>> {
        let d = self.api("/api/v1/label/__name__/values").await?;
        Ok(d.as_array()
            .context("names")?
            .iter()
            .filter_map(|n| n.as_str().map(str::to_string))
            .collect())
    }

    /// Runs `expr` now; an error names the expression.
    pub async fn query(&self, expr: &str) -> Result<serde_json::Value> {
        let q = cellplane_cell_sdk::settings::percent_encode(expr);
        self.api(&format!("/api/v1/query?query={q}"))
            .await
            .with_context(|| format!("query {expr}"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn metric_names_are_found_in_expressions() {
        assert_eq!(
            metric_names(
                r#"sum(rate(cellplane_router_requests_total{class="5xx"}[5m])) / scalar(max(cellplane_operator_routing_table_epoch))"#
            ),
            [
                "cellplane_operator_routing_table_epoch",
                "cellplane_router_requests_total"
            ]
        );
    }

    #[test]
    fn the_shipped_rules_and_dashboard_have_queries() {
        assert!(rule_exprs(&rules_file()).unwrap().len() >= 7);
        assert!(dashboard_exprs(&dashboard_file()).unwrap().len() >= 10);
    }
}
