//! What a slot move says through the global etcd: the leader's orders to the regions (in
//! the cells' intents) and what the regions report back (in the cells' registrations).
//!
//! The target cell's region does the data work: it reads the source's rows and binary log
//! with the platform's replication account at the source's registered MySQL address and
//! writes the target's own schema with its admin account ([`MoveOrder`], [`MoveReport`]).
//! The source cell's region deletes the source's copies once the retention window passed
//! ([`RetireOrder`], [`RetireReport`]).

use serde::{Deserialize, Serialize};

/// A table that holds users' rows and the column with the user key (the contract for an
/// app's tables, docs/reference.md "Tables that move").
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
#[serde(rename_all = "camelCase")]
pub struct MovedTable {
    pub name: String,
    pub key_column: String,
}

impl MovedTable {
    pub fn new(name: &str, key_column: &str) -> Self {
        Self {
            name: name.into(),
            key_column: key_column.into(),
        }
    }

    /// `name:column` (the CLI's `--table`), or the error naming the fix.
    pub fn parse(text: &str) -> Result<Self, String> {
        match text.split_once(':') {
            Some((name, column)) if !name.is_empty() && !column.is_empty() => {
                Ok(Self::new(name, column))
            }
            _ => Err(format!(
                "table {text:?}: write it as NAME:KEY_COLUMN, e.g. profiles:user_id"
            )),
        }
    }
}

/// The reference app's user tables (`cells/app`): what a move carries when it is not told
/// otherwise.
pub fn reference_app_tables() -> Vec<MovedTable> {
    vec![
        MovedTable::new("profiles", "user_id"),
        MovedTable::new("orders", "user_id"),
    ]
}

/// How far the target's region may go.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub enum MovePhase {
    /// Copy the rows, verify them once, then keep applying the source's changes.
    Copy,
    /// The slots are frozen and the source drained: catch up to the source's position now
    /// and verify at it (every row must match).
    Final,
}

/// In the target cell's intent: move `slots` of `source`'s schema into the target's.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct MoveOrder {
    pub operation: String,
    pub source: String,
    /// The slots, as `SlotSet` prints them ("0-99,205").
    pub slots: String,
    /// The table's slot count (the hash's modulus).
    pub slot_count: u32,
    pub tables: Vec<MovedTable>,
    pub phase: MovePhase,
    /// The copy's pace (None: as fast as the source answers).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rows_per_sec: Option<u32>,
}

/// Where the target's region is with a move.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub enum MoveStage {
    /// Rows are being copied.
    #[default]
    Copying,
    /// Copied; the copy is being compared with the source.
    Verifying,
    /// Copied and verified once; the source's changes are applied as they come.
    Following,
    /// Caught up to the source's position after the freeze, and verified there.
    Synced,
    /// A verification found rows that differ (listed in `mismatches`).
    Mismatch,
    /// The move cannot go on (`error` says why); the region retries after a while.
    Failed,
}

/// In the target cell's registration: the last move its region carried out or carries out.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct MoveReport {
    pub operation: String,
    pub stage: MoveStage,
    /// The phase of the order this report answers.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub phase: Option<MovePhase>,
    /// Rows scanned on the source and rows of the moving slots copied.
    pub rows_scanned: u64,
    pub rows_copied: u64,
    /// Copy rate over the copy so far.
    pub rows_per_sec: u64,
    /// The source position applied to the target so far.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub position: String,
    /// Rows of the moving slots at the last verification.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub verified_rows: Option<u64>,
    /// The source position the last verification compared at.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub verified_at: String,
    /// What the last verification found different (table, slot, counts, checksums).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub mismatches: Vec<String>,
    /// Source transactions applied while following, and the rows they changed.
    #[serde(default)]
    pub transactions_applied: u64,
    #[serde(default)]
    pub rows_applied: u64,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub error: String,
}

/// In the source cell's intent: delete its copies of the moved slots (the retention window
/// after the move has passed and the slots are not its own again).
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct RetireOrder {
    pub operation: String,
    pub slots: String,
    pub slot_count: u32,
    pub tables: Vec<MovedTable>,
}

/// In the source cell's registration: how the deletion of its old copies went.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct RetireReport {
    pub operation: String,
    pub rows_deleted: u64,
    pub done: bool,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub error: String,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tables_parse_as_name_colon_column_and_bad_ones_name_the_form() {
        assert_eq!(
            MovedTable::parse("profiles:user_id").unwrap(),
            MovedTable::new("profiles", "user_id")
        );
        for bad in ["profiles", ":user_id", "profiles:", ""] {
            let err = MovedTable::parse(bad).unwrap_err();
            assert!(err.contains("NAME:KEY_COLUMN"), "{bad}: {err}");
        }
    }

    #[test]
    fn orders_and_reports_round_trip_in_camel_case() {
        let order = MoveOrder {
            operation: "mv-1".into(),
            source: "a".into(),
            slots: "0-9".into(),
            slot_count: 1024,
            tables: reference_app_tables(),
            phase: MovePhase::Final,
            rows_per_sec: Some(5000),
        };
        let json = serde_json::to_value(&order).unwrap();
        assert_eq!(json["slotCount"], 1024);
        assert_eq!(json["phase"], "final");
        assert_eq!(json["tables"][0]["keyColumn"], "user_id");
        assert_eq!(serde_json::from_value::<MoveOrder>(json).unwrap(), order);
        let report: MoveReport =
            serde_json::from_str(r#"{"operation":"mv-1","stage":"following","rowsScanned":3,"rowsCopied":2,"rowsPerSec":1}"#)
                .unwrap();
        assert_eq!(report.stage, MoveStage::Following);
        assert_eq!(report.verified_rows, None);
    }
}
