//! Router configuration: a YAML file, overridable by flags/env in `main`. Every field has
//! a sane default except the table source; `validate` names the field and the fix.

use crate::endpoints::EjectionPolicy;
use crate::key::{default_sources, KeySource};
use crate::limits::rate::Rate;
use crate::{Error, Result};
use serde::Deserialize;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

#[derive(Clone, Debug, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Config {
    #[serde(default = "default_listen")]
    pub listen: SocketAddr,
    /// `/metrics`, `/healthz`, `/readyz`.
    #[serde(default = "default_metrics_listen")]
    pub metrics_listen: SocketAddr,
    /// Where the user key comes from, tried in order.
    #[serde(default = "default_sources")]
    pub keys: Vec<KeySource>,
    /// What to do with requests that carry no key.
    #[serde(default)]
    pub no_key: NoKeyPolicy,
    pub table: TableConfig,
    #[serde(default)]
    pub timeouts: Timeouts,
    #[serde(default)]
    pub limits: Limits,
    #[serde(default)]
    pub ejection: Ejection,
    #[serde(default)]
    pub health_check: HealthCheck,
    /// Serve HTTPS (HTTP/1.1 and HTTP/2 by ALPN) instead of plain HTTP on `listen`.
    #[serde(default)]
    pub tls: Option<TlsConfig>,
    /// The gRPC admin API; off unless set.
    #[serde(default)]
    pub admin: Option<AdminConfig>,
    /// Serve plain HTTP/1.1 requests on the router's own direct path (see `h1`); false
    /// sends every request through hyper. On by default; HTTP/2, upgrades and streamed
    /// bodies always go through hyper.
    #[serde(default = "default_true")]
    pub direct_http1: bool,
}

fn default_true() -> bool {
    true
}

#[derive(Clone, Debug, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct AdminConfig {
    pub listen: SocketAddr,
    /// A file holding the bearer token (e.g. a mounted Secret); at least 16 characters.
    pub token_file: PathBuf,
    /// Mutual TLS: callers must also present a client certificate issued by `clientCaFile`.
    #[serde(default)]
    pub tls: Option<AdminTlsConfig>,
}

/// The admin API's own certificate and key (PEM) and the CA its callers' certificates must
/// chain to.
#[derive(Clone, Debug, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct AdminTlsConfig {
    pub cert_file: PathBuf,
    pub key_file: PathBuf,
    pub client_ca_file: PathBuf,
}

/// PEM files: the certificate chain (leaf first) and its private key.
#[derive(Clone, Debug, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct TlsConfig {
    pub cert_file: PathBuf,
    pub key_file: PathBuf,
}

/// Active health checks: `GET <path>` on every endpoint of the table.
#[derive(Clone, Debug, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields, default)]
pub struct HealthCheck {
    pub enabled: bool,
    pub path: String,
    pub interval_ms: u64,
    pub timeout_ms: u64,
    pub unhealthy_threshold: u32,
    pub healthy_threshold: u32,
}

impl Default for HealthCheck {
    fn default() -> Self {
        Self {
            enabled: true,
            path: "/livez".into(),
            interval_ms: 2000,
            timeout_ms: 1000,
            unhealthy_threshold: 2,
            healthy_threshold: 2,
        }
    }
}

#[derive(Clone, Copy, Debug, Default, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub enum NoKeyPolicy {
    /// 400 with a message naming the key source.
    #[default]
    Reject,
    /// Route by the client's address (anonymous traffic still sticks to one cell).
    ClientAddress,
}

#[derive(Clone, Debug, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct TableConfig {
    /// Static mode: a routing-table JSON file, re-read when it changes.
    pub file: Option<PathBuf>,
    /// etcd mode: watch `/cellplane/<platform>/routing`.
    pub etcd: Option<EtcdConfig>,
    /// Where the last good table is saved, so a restart without etcd still routes.
    pub cache_file: Option<PathBuf>,
    /// Static mode: how often the file is checked for changes.
    #[serde(default = "default_poll_ms")]
    pub poll_ms: u64,
}

fn default_poll_ms() -> u64 {
    1000
}

#[derive(Clone, Debug, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct EtcdConfig {
    pub endpoints: Vec<String>,
    pub platform: String,
    /// This router's id among the platform's routers, under which it acknowledges the
    /// epoch it applied (`/cellplane/<platform>/routers/<id>`); default host name and pid.
    #[serde(default)]
    pub router_id: Option<String>,
    /// The region this router serves in (reported with its acknowledgement).
    #[serde(default)]
    pub region: Option<String>,
    /// Lease of the acknowledgement: a router that died stops being waited for after this.
    #[serde(default = "default_ack_ttl_secs")]
    pub ack_ttl_secs: u64,
}

fn default_ack_ttl_secs() -> u64 {
    5
}

#[derive(Clone, Debug, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields, default)]
pub struct Timeouts {
    pub connect_ms: u64,
    /// Until the upstream's response headers.
    pub request_ms: u64,
    pub idle_ms: u64,
    /// A client must send its request headers, and a body the router buffers, within this
    /// time (slow-client guard).
    pub header_read_ms: u64,
    /// Requests for a frozen cell (failover in progress) wait this long for the table to
    /// move its slots, then get 503 with Retry-After.
    pub hold_ms: u64,
}

impl Default for Timeouts {
    fn default() -> Self {
        Self {
            connect_ms: 1000,
            request_ms: 15_000,
            idle_ms: 60_000,
            header_read_ms: 10_000,
            hold_ms: 5_000,
        }
    }
}

#[derive(Clone, Debug, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields, default)]
pub struct Limits {
    pub max_body_bytes: u64,
    pub max_header_bytes: usize,
    /// Bodies up to this size are buffered so a request can be retried (connect failure,
    /// 421); larger ones stream and are not retried.
    pub replay_buffer_bytes: u64,
    pub per_key_rps: Option<f64>,
    pub per_key_burst: Option<f64>,
    pub global_rps: Option<f64>,
    pub global_burst: Option<f64>,
    pub max_tracked_keys: usize,
    /// Circuit breaker: requests in flight to one cell above this fail fast with 503.
    pub max_in_flight_per_cell: u32,
    /// Retry budget: retries may add at most this share of recent requests...
    pub retry_budget_ratio: f64,
    /// ...plus this many retries per second.
    pub retry_budget_min_per_sec: f64,
    /// Pause before a retry, jittered to 50%..150% so retries from many routers spread out.
    pub retry_backoff_ms: u64,
    /// Access log lines per second at most (a flood cannot fill a disk); 0 turns it off.
    pub access_log_per_sec: f64,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_body_bytes: 10 << 20,
            max_header_bytes: 64 << 10,
            replay_buffer_bytes: 64 << 10,
            per_key_rps: None,
            per_key_burst: None,
            global_rps: None,
            global_burst: None,
            max_tracked_keys: 100_000,
            max_in_flight_per_cell: 10_000,
            retry_budget_ratio: 0.2,
            retry_budget_min_per_sec: 10.0,
            retry_backoff_ms: 10,
            access_log_per_sec: 100.0,
        }
    }
}

#[derive(Clone, Debug, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields, default)]
pub struct Ejection {
    pub consecutive_failures: u32,
    pub base_ejection_ms: u64,
    pub max_ejection_ms: u64,
    pub max_ejection_percent: u32,
}

impl Default for Ejection {
    fn default() -> Self {
        let p = EjectionPolicy::default();
        Self {
            consecutive_failures: p.consecutive_failures,
            base_ejection_ms: p.base_ejection.as_millis() as u64,
            max_ejection_ms: p.max_ejection.as_millis() as u64,
            max_ejection_percent: p.max_ejection_percent,
        }
    }
}

fn default_listen() -> SocketAddr {
    "0.0.0.0:8080".parse().expect("literal")
}
fn default_metrics_listen() -> SocketAddr {
    "0.0.0.0:9090".parse().expect("literal")
}

fn bad(field: &str, problem: impl Into<String>) -> Error {
    Error::Config {
        field: field.into(),
        problem: problem.into(),
    }
}

fn rate(field: &str, rps: Option<f64>, burst: Option<f64>) -> Result<Option<Rate>> {
    match (rps, burst) {
        (None, None) => Ok(None),
        (None, Some(_)) => Err(bad(
            &format!("limits.{field}Burst"),
            format!("needs limits.{field}Rps as well"),
        )),
        (Some(r), b) => {
            if !(r > 0.0 && r.is_finite()) {
                return Err(bad(
                    &format!("limits.{field}Rps"),
                    "must be a positive number",
                ));
            }
            let burst = b.unwrap_or(r.max(1.0));
            if burst < 1.0 {
                return Err(bad(&format!("limits.{field}Burst"), "must be >= 1"));
            }
            Ok(Some(Rate {
                per_second: r,
                burst,
            }))
        }
    }
}

impl Config {
    pub fn from_yaml(text: &str) -> Result<Self> {
        let cfg: Config = serde_yaml::from_str(text).map_err(|e| bad("(file)", e.to_string()))?;
        cfg.validate()?;
        Ok(cfg)
    }

    pub fn validate(&self) -> Result<()> {
        match (&self.table.file, &self.table.etcd) {
            (Some(_), Some(_)) | (None, None) => {
                return Err(bad(
                    "table",
                    "set exactly one of table.file (static mode) or table.etcd (watch etcd)",
                ))
            }
            (None, Some(e)) if e.endpoints.is_empty() => {
                return Err(bad(
                    "table.etcd.endpoints",
                    "list at least one etcd endpoint, e.g. http://127.0.0.1:2379",
                ))
            }
            (None, Some(e)) if e.platform.is_empty() => {
                return Err(bad("table.etcd.platform", "name the platform, e.g. shop"))
            }
            (None, Some(e))
                if e.router_id.as_ref().is_some_and(|id| {
                    id.is_empty()
                        || !id
                            .chars()
                            .all(|c| c.is_ascii_alphanumeric() || "._-".contains(c))
                }) =>
            {
                return Err(bad(
                    "table.etcd.routerId",
                    "use letters, digits, '.', '_' and '-' only (it is an etcd key segment)",
                ))
            }
            _ => {}
        }
        if self.keys.is_empty() {
            return Err(bad(
                "keys",
                "list at least one key source, e.g. {from: header, name: X-User-Id}",
            ));
        }
        for (field, v) in [
            ("timeouts.connectMs", self.timeouts.connect_ms),
            ("timeouts.requestMs", self.timeouts.request_ms),
            ("timeouts.headerReadMs", self.timeouts.header_read_ms),
        ] {
            if v == 0 {
                return Err(bad(field, "must be > 0 milliseconds"));
            }
        }
        if self.limits.max_header_bytes < 8192 {
            return Err(bad("limits.maxHeaderBytes", "must be at least 8192"));
        }
        if self.limits.max_in_flight_per_cell == 0 {
            return Err(bad("limits.maxInFlightPerCell", "must be >= 1"));
        }
        if !(0.0..=1.0).contains(&self.limits.retry_budget_ratio) {
            return Err(bad(
                "limits.retryBudgetRatio",
                "must be between 0 and 1 (0.2 = retries up to 20% of requests)",
            ));
        }
        if self.limits.retry_budget_min_per_sec < 0.0 || self.limits.access_log_per_sec < 0.0 {
            return Err(bad(
                "limits.retryBudgetMinPerSec / accessLogPerSec",
                "must be >= 0",
            ));
        }
        if self.health_check.enabled
            && (self.health_check.interval_ms == 0 || !self.health_check.path.starts_with('/'))
        {
            return Err(bad(
                "healthCheck",
                "intervalMs must be > 0 and path must start with '/'",
            ));
        }
        if self.ejection.max_ejection_percent > 100 {
            return Err(bad("ejection.maxEjectionPercent", "must be 0..100"));
        }
        self.global_rate()?;
        self.per_key_rate()?;
        Ok(())
    }

    pub fn global_rate(&self) -> Result<Option<Rate>> {
        rate("global", self.limits.global_rps, self.limits.global_burst)
    }

    pub fn per_key_rate(&self) -> Result<Option<Rate>> {
        rate("perKey", self.limits.per_key_rps, self.limits.per_key_burst)
    }

    pub fn ejection_policy(&self) -> EjectionPolicy {
        EjectionPolicy {
            consecutive_failures: self.ejection.consecutive_failures.max(1),
            base_ejection: Duration::from_millis(self.ejection.base_ejection_ms),
            max_ejection: Duration::from_millis(self.ejection.max_ejection_ms),
            max_ejection_percent: self.ejection.max_ejection_percent,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn minimal_file_config_gets_defaults() {
        let c = Config::from_yaml("table: {file: /tmp/t.json}").unwrap();
        assert_eq!(c.keys, default_sources());
        assert_eq!(c.no_key, NoKeyPolicy::Reject);
        assert_eq!(c.timeouts.connect_ms, 1000);
    }

    #[test]
    fn errors_name_the_field() {
        let e = |y: &str| Config::from_yaml(y).unwrap_err().to_string();
        assert!(e("table: {}").contains("config table:"));
        assert!(e("table: {etcd: {endpoints: [], platform: p}}").contains("table.etcd.endpoints"));
        assert!(
            e("table: {etcd: {endpoints: [e:1], platform: p, routerId: a/b}}")
                .contains("table.etcd.routerId")
        );
        assert!(e("table: {file: f}\nlimits: {perKeyRps: -1}").contains("limits.perKeyRps"));
        assert!(e("table: {file: f}\nlimits: {globalBurst: 5}").contains("limits.globalRps"));
        assert!(e("table: {file: f}\ntimeouts: {connectMs: 0}").contains("timeouts.connectMs"));
        assert!(e("table: {file: f}\nlisten: nowhere").contains("listen"));
        assert!(e("table: {file: f}\nbogus: 1").contains("bogus"));
        assert!(e("table: {file: f}\nkeys: [{from: header, name: X-User-Id}, {from: pathSegment, name: 1}, {from: smoke}]").contains("smoke"));
    }
}
