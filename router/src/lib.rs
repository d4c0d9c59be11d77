//! cellplane-router: the data-plane entry.
//!
//! Pure: `key` (user key extraction), `decision` (slot -> cell, power of two choices),
//! `http_rules` (hop-by-hop headers, idempotency, the upstream request, rejections),
//! `h1::wire` (the direct path's HTTP/1.1 on the wire), `config`.
//! A request: `driver` (admit, route, send, after; one loop for both serving paths), with
//! `limits` (rate, retry budget, breaker, holds) and `endpoints` (health and ejection).
//! Serving paths: `h1` (direct HTTP/1.1) and `hyper_path` (everything else), over
//! `upstream` (connections, the idle pool, hyper's clients). Shared state: `state`.
//! Beside them: `health` (active checks), `admin` (gRPC), `metrics`, `tls`.

pub mod admin;
pub mod config;
pub mod decision;
pub mod driver;
pub mod endpoints;
pub mod h1;
pub mod health;
pub mod http_rules;
pub mod hyper_path;
pub mod key;
pub mod limits;
pub mod metrics;
pub mod outage;
pub mod state;
pub mod tls;
pub mod upstream;

/// Errors of the router; user-facing ones name the field and the fix.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("config {field}: {problem}")]
    Config { field: String, problem: String },

    #[error(transparent)]
    Table(#[from] cellplane_table::Error),
}

pub type Result<T, E = Error> = std::result::Result<T, E>;
