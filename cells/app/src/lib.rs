//! The reference cell app: an e-commerce service that runs on its cell's own Redis, MySQL
//! shard and Kafka, and shows the platform's patterns per user.
//!
//! - `profiles`: cache-aside reads (hot keys in process, Redis, MySQL), updates that write
//!   MySQL and then invalidate without the stale-fill race (`cache`); misses read MySQL
//!   in batches across users (`batch`).
//! - `orders` + `consumer`: flash sale stock in Redis, orders queued on Kafka, persisted to
//!   MySQL exactly once per order id; `replay`: a failed-over cell's acknowledged orders
//!   forwarded (through the global etcd) to the cell serving its users.
//! - `sql`: statement shapes padded to powers of two (few prepared statements).
//! - `http`: routes behind the slot-ownership fence, health, lag and replication status.

pub mod batch;
pub mod cache;
pub mod config;
pub mod consumer;
pub mod error;
pub mod http;
pub mod landing;
pub mod metrics;
pub mod orders;
pub mod profiles;
pub mod replay;
pub mod schema;
pub mod sql;
pub mod stores;
