//! The cellplane cell domain model. Pure logic, no I/O: CRD types, the slot hash,
//! placement of slots onto cells, the routing table and its etcd encoding.

pub mod admission;
pub mod app_status;
pub mod auth;
pub mod crd;
pub mod env;
pub mod error;
pub mod etcd_keys;
pub mod failover_timing;
pub mod gtid;
pub mod ownership;
pub mod placement;
pub mod routing;
pub mod slot;
pub mod slot_move;
pub mod slot_set;
pub mod user_key;

pub use error::{Error, Result};
