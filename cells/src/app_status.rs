//! The cell app's `/status`: a contract between the app, which serves it, and its region's
//! agent, which reads it (every 50 ms while an operation moves the cell) to report the
//! order backlog and the request rate in the cell's registration. Pure.

use serde::{Deserialize, Serialize};

/// `GET /status` on a cell app.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct AppStatus {
    pub cell: String,
    /// The routing table's epoch the app applied.
    #[serde(default)]
    pub table_epoch: Option<u64>,
    /// The order persister's position on the order topic.
    pub orders: Measured<OrderBacklog>,
    /// The cell MySQL's own position.
    pub mysql: Measured<MysqlPosition>,
    #[serde(default)]
    pub hot_cache_entries: u64,
    /// The app's user request counter (the agent derives the request rate from it).
    #[serde(default)]
    pub user_requests_total: u64,
}

/// A measurement, or why it could not be taken (`{"error": "..."}` on the wire).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum Measured<T> {
    Ok(T),
    Failed { error: String },
}

impl<T> Default for Measured<T> {
    fn default() -> Self {
        Measured::Failed {
            error: "not measured".into(),
        }
    }
}

impl<T> Measured<T> {
    pub fn ok(&self) -> Option<&T> {
        match self {
            Measured::Ok(v) => Some(v),
            Measured::Failed { .. } => None,
        }
    }
}

impl<T, E: std::fmt::Display> From<Result<T, E>> for Measured<T> {
    fn from(r: Result<T, E>) -> Self {
        match r {
            Ok(v) => Measured::Ok(v),
            Err(e) => Measured::Failed {
                error: e.to_string(),
            },
        }
    }
}

/// The order persister on the order topic: accepted orders not yet persisted are `lag`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct OrderBacklog {
    /// Next offset to be written (the partition's high watermark).
    pub high: i64,
    /// Next offset the persister will read (its committed offset).
    pub committed: i64,
    pub lag: i64,
}

/// A MySQL server's own position: what it has written (binlog) and whether it accepts
/// writes.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct MysqlPosition {
    pub gtid_binlog_pos: String,
    pub read_only: bool,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_status_reads_back_with_each_measurement_or_its_error() {
        let status = AppStatus {
            cell: "shop-us-0".into(),
            table_epoch: Some(7),
            orders: Measured::Ok(OrderBacklog {
                high: 10,
                committed: 7,
                lag: 3,
            }),
            mysql: Err::<MysqlPosition, _>("no answer within 1s").into(),
            hot_cache_entries: 2,
            user_requests_total: 99,
        };
        let json = serde_json::to_value(&status).unwrap();
        assert_eq!(json["orders"]["lag"], 3);
        assert_eq!(json["mysql"]["error"], "no answer within 1s");
        assert_eq!(json["userRequestsTotal"], 99);
        let back: AppStatus = serde_json::from_value(json).unwrap();
        assert_eq!(back, status);
        assert_eq!(back.orders.ok().map(|o| o.lag), Some(3));
        assert!(back.mysql.ok().is_none());
    }
}
