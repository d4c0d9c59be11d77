//! The connection settings the operator injects into a cell's pods (and `e2e/bin/stores`
//! writes for local cells). Parsing is pure: `from_vars` takes any variable source, so the
//! errors are tested without touching the process environment.

use crate::{Error, Result};
use std::collections::HashMap;
use std::fmt;

/// Where a cell's stores are. Debug output redacts the credentials in the URLs.
#[derive(Clone, PartialEq, Eq)]
pub struct CellSettings {
    /// `CELL_NAME`: this cell, as named in the routing table.
    pub cell: String,
    /// `REDIS_URL`: `redis://[:password@]host:port[/db]`.
    pub redis_url: String,
    /// `MYSQL_URL`: `mysql://user:password@host:port/database`, the app's own account.
    pub mysql_url: String,
    /// `KAFKA_BROKERS`: comma-separated `host:port` list.
    pub kafka_brokers: String,
}

impl CellSettings {
    pub fn from_env() -> Result<Self> {
        Self::from_vars(&std::env::vars().collect())
    }

    pub fn from_vars(vars: &HashMap<String, String>) -> Result<Self> {
        let get = |var: &str, example: &str| -> Result<String> {
            match vars.get(var).map(|v| v.trim()) {
                Some(v) if !v.is_empty() => Ok(v.to_string()),
                _ => Err(Error::Setting {
                    var: var.into(),
                    problem: format!("is not set; the operator injects it into cell pods, or set it by hand, e.g. {var}={example}"),
                }),
            }
        };
        let settings = Self {
            cell: get("CELL_NAME", "shop-eu-0")?,
            redis_url: get("REDIS_URL", "redis://:password@127.0.0.1:6379/0")?,
            mysql_url: get(
                "MYSQL_URL",
                "mysql://app:password@127.0.0.1:3306/cell_shop_eu_0",
            )?,
            kafka_brokers: get("KAFKA_BROKERS", "127.0.0.1:9092")?,
        };
        let scheme = |var: &str, value: &str, scheme: &str| -> Result<()> {
            if value.starts_with(scheme) {
                Ok(())
            } else {
                Err(Error::Setting {
                    var: var.into(),
                    problem: format!("must start with {scheme}"),
                })
            }
        };
        scheme("REDIS_URL", &settings.redis_url, "redis://")?;
        scheme("MYSQL_URL", &settings.mysql_url, "mysql://")?;
        for broker in settings.kafka_brokers.split(',') {
            let ok = broker
                .rsplit_once(':')
                .is_some_and(|(host, port)| !host.is_empty() && port.parse::<u16>().is_ok());
            if !ok {
                return Err(Error::Setting {
                    var: "KAFKA_BROKERS".into(),
                    problem: format!("{broker:?} is not host:port"),
                });
            }
        }
        Ok(settings)
    }
}

/// `scheme://user:secret@host` -> `scheme://user:***@host`.
pub fn redact_url(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(s), Some(at)) if at > s => {
            let userinfo = &url[s + 3..at];
            let user = userinfo.split(':').next().unwrap_or("");
            format!("{}{user}:***{}", &url[..s + 3], &url[at..])
        }
        _ => url.to_string(),
    }
}

impl fmt::Debug for CellSettings {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CellSettings")
            .field("cell", &self.cell)
            .field("redis_url", &redact_url(&self.redis_url))
            .field("mysql_url", &redact_url(&self.mysql_url))
            .field("kafka_brokers", &self.kafka_brokers)
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn vars() -> HashMap<String, String> {
        [
            ("CELL_NAME", "c1"),
            ("REDIS_URL", "redis://:s3cret@127.0.0.1:6379/0"),
            ("MYSQL_URL", "mysql://app:s3cret@127.0.0.1:3306/cell_c1"),
            ("KAFKA_BROKERS", "127.0.0.1:9092"),
        ]
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .into()
    }

    #[test]
    fn complete_settings_parse_and_debug_hides_secrets() {
        let s = CellSettings::from_vars(&vars()).unwrap();
        assert_eq!(s.cell, "c1");
        let shown = format!("{s:?}");
        assert!(!shown.contains("s3cret"), "{shown}");
        assert!(shown.contains("app:***@127.0.0.1"), "{shown}");
    }

    #[test]
    fn each_missing_or_bad_variable_is_named() {
        for var in ["CELL_NAME", "REDIS_URL", "MYSQL_URL", "KAFKA_BROKERS"] {
            let mut v = vars();
            v.remove(var);
            let err = CellSettings::from_vars(&v).unwrap_err().to_string();
            assert!(err.contains(var) && err.contains("is not set"), "{err}");
        }
        let mut v = vars();
        v.insert("KAFKA_BROKERS".into(), "127.0.0.1:9092,nohost".into());
        let err = CellSettings::from_vars(&v).unwrap_err().to_string();
        assert!(
            err.contains("KAFKA_BROKERS") && err.contains("nohost"),
            "{err}"
        );
        let mut v = vars();
        v.insert("MYSQL_URL".into(), "postgres://x".into());
        let err = CellSettings::from_vars(&v).unwrap_err().to_string();
        assert!(err.contains("MYSQL_URL: must start with mysql://"), "{err}");
    }
}
