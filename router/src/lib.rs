//! cellplane-router: the data-plane entry. The decision (key extraction, slot -> cell,
//! endpoint choice) is pure and benchmarked; table watching, limits and proxying wrap it.

pub mod admin;
pub mod config;
pub mod decision;
pub mod endpoints;
pub mod h1;
pub mod health;
pub mod holds;
pub mod key;
pub mod limit;
pub mod metrics;
pub mod proxy;
pub mod tls;

/// Errors of the router; user-facing ones name the field and the fix.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("config {field}: {problem}")]
    Config { field: String, problem: String },

    #[error(transparent)]
    Cell(#[from] cellplane_cell_sdk::Error),
}

pub type Result<T, E = Error> = std::result::Result<T, E>;
