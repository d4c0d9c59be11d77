//! The connection settings the operator injects into a cell's pods (names in
//! `cellplane_cells::env`; `e2e/bin/stores` writes the same for local cells). Parsing is
//! pure: `from_vars` takes any variable source, so errors are tested without touching the
//! process environment.

use crate::{Error, Result};
use cellplane_cells::env;
use std::collections::HashMap;
use std::fmt;

/// Where a cell's stores are and how to log in. Debug output hides the passwords.
#[derive(Clone, PartialEq, Eq)]
pub struct CellSettings {
    pub cell: String,
    pub redis_addr: String,
    /// Empty when Redis has no password.
    pub redis_password: String,
    pub mysql_addr: String,
    pub mysql_user: String,
    pub mysql_password: String,
    pub mysql_database: String,
    /// Comma-separated `host:port` list.
    pub kafka_bootstrap: String,
}

fn problem(var: &str, problem: String) -> Error {
    Error::Setting {
        var: var.into(),
        problem,
    }
}

/// `host:port` with a non-empty host and a numeric port.
fn split_addr(var: &str, value: &str) -> Result<(String, u16)> {
    value
        .rsplit_once(':')
        .and_then(|(h, p)| Some((h.to_string(), p.parse().ok()?)))
        .filter(|(h, _)| !h.is_empty())
        .ok_or_else(|| problem(var, format!("{value:?} is not host:port")))
}

impl CellSettings {
    pub fn from_env() -> Result<Self> {
        Self::from_vars(&std::env::vars().collect())
    }

    pub fn from_vars(vars: &HashMap<String, String>) -> Result<Self> {
        let get = |var: &str, example: &str| -> Result<String> {
            match vars.get(var).map(|v| v.trim()) {
                Some(v) if !v.is_empty() => Ok(v.to_string()),
                _ => Err(problem(
                    var,
                    format!("is not set; the operator injects it into cell pods, or set it by hand, e.g. {var}={example}"),
                )),
            }
        };
        let s = Self {
            cell: get(env::CELL_NAME, "shop-eu-0")?,
            redis_addr: get(env::REDIS_ADDR, "127.0.0.1:6379")?,
            redis_password: vars.get(env::REDIS_PASSWORD).cloned().unwrap_or_default(),
            mysql_addr: get(env::MYSQL_ADDR, "127.0.0.1:3306")?,
            mysql_user: get(env::MYSQL_USER, "app")?,
            mysql_password: get(env::MYSQL_PASSWORD, "<from the cell's Secret>")?,
            mysql_database: get(env::MYSQL_DATABASE, "cell_shop_eu_0")?,
            kafka_bootstrap: get(env::KAFKA_BOOTSTRAP, "127.0.0.1:9092")?,
        };
        split_addr(env::REDIS_ADDR, &s.redis_addr)?;
        split_addr(env::MYSQL_ADDR, &s.mysql_addr)?;
        for broker in s.kafka_bootstrap.split(',') {
            split_addr(env::KAFKA_BOOTSTRAP, broker.trim())?;
        }
        Ok(s)
    }

    /// `redis://[:password@]host:port/0`, the password percent-encoded.
    pub fn redis_url(&self) -> String {
        if self.redis_password.is_empty() {
            format!("redis://{}/0", self.redis_addr)
        } else {
            format!(
                "redis://:{}@{}/0",
                percent_encode(&self.redis_password),
                self.redis_addr
            )
        }
    }

    /// Connection options for the app's MySQL account (no URL: passwords need no escaping).
    pub fn mysql_opts(&self) -> mysql_async::Opts {
        let (host, port) = split_addr(env::MYSQL_ADDR, &self.mysql_addr)
            .unwrap_or_else(|_| (self.mysql_addr.clone(), 3306));
        mysql_async::OptsBuilder::default()
            .ip_or_hostname(host)
            .tcp_port(port)
            .user(Some(self.mysql_user.clone()))
            .pass(Some(self.mysql_password.clone()))
            .db_name(Some(self.mysql_database.clone()))
            .into()
    }
}

/// Percent-encodes everything but RFC 3986 unreserved characters (for a URL's user,
/// password or query value).
pub fn percent_encode(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'.' | b'_' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

impl fmt::Debug for CellSettings {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CellSettings")
            .field("cell", &self.cell)
            .field("redis_addr", &self.redis_addr)
            .field("mysql_addr", &self.mysql_addr)
            .field("mysql_user", &self.mysql_user)
            .field("mysql_database", &self.mysql_database)
            .field("kafka_bootstrap", &self.kafka_bootstrap)
            .finish_non_exhaustive()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percent_encoding_keeps_only_unreserved_characters() {
        assert_eq!(
            percent_encode("a b{c=\"d\"}~-._"),
            "a%20b%7Bc%3D%22d%22%7D~-._"
        );
    }

    fn vars() -> HashMap<String, String> {
        [
            (env::CELL_NAME, "c1"),
            (env::REDIS_ADDR, "127.0.0.1:6379"),
            (env::REDIS_PASSWORD, "s3cret/+"),
            (env::MYSQL_ADDR, "127.0.0.1:3306"),
            (env::MYSQL_USER, "app"),
            (env::MYSQL_PASSWORD, "s3cret"),
            (env::MYSQL_DATABASE, "cell_c1"),
            (env::KAFKA_BOOTSTRAP, "127.0.0.1:9092,k2:9092"),
        ]
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .into()
    }

    #[test]
    fn complete_settings_parse_and_debug_hides_secrets() {
        let s = CellSettings::from_vars(&vars()).unwrap();
        assert_eq!(s.cell, "c1");
        assert_eq!(s.redis_url(), "redis://:s3cret%2F%2B@127.0.0.1:6379/0");
        let opts = s.mysql_opts();
        assert_eq!((opts.tcp_port(), opts.db_name()), (3306, Some("cell_c1")));
        let shown = format!("{s:?}");
        assert!(!shown.contains("s3cret"), "{shown}");
    }

    #[test]
    fn each_missing_or_bad_variable_is_named() {
        for var in [
            env::CELL_NAME,
            env::REDIS_ADDR,
            env::MYSQL_ADDR,
            env::MYSQL_USER,
            env::MYSQL_PASSWORD,
            env::MYSQL_DATABASE,
            env::KAFKA_BOOTSTRAP,
        ] {
            let mut v = vars();
            v.remove(var);
            let err = CellSettings::from_vars(&v).unwrap_err().to_string();
            assert!(err.contains(var) && err.contains("is not set"), "{err}");
        }
        let mut v = vars();
        v.remove(env::REDIS_PASSWORD);
        let s = CellSettings::from_vars(&v).unwrap();
        assert_eq!(
            s.redis_url(),
            "redis://127.0.0.1:6379/0",
            "Redis without a password"
        );
        let mut v = vars();
        v.insert(env::KAFKA_BOOTSTRAP.into(), "127.0.0.1:9092,nohost".into());
        let err = CellSettings::from_vars(&v).unwrap_err().to_string();
        assert!(
            err.contains("KAFKA_BOOTSTRAP") && err.contains("nohost"),
            "{err}"
        );
        let mut v = vars();
        v.insert(env::MYSQL_ADDR.into(), "db:notaport".into());
        let err = CellSettings::from_vars(&v).unwrap_err().to_string();
        assert!(
            err.contains("MYSQL_ADDR") && err.contains("host:port"),
            "{err}"
        );
    }
}
