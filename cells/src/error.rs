//! The one error type of this crate; every variant names the field and the fix.

/// Errors of the cell model. Messages are meant for users: they name the field and the fix.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum Error {
    #[error("slots: must be between 1 and {max}, got {got}; the slot count is fixed for the life of a platform (default 16384)")]
    SlotCount { got: u32, max: u32 },

    #[error(
        "placement: no active cell with capacityWeight >= 1; activate a cell before placing slots"
    )]
    NoActiveCells,

    #[error("cells[{cell}].capacityWeight: must be between 1 and {max}, got {got}")]
    Weight { cell: String, got: u32, max: u32 },

    #[error("routing table {field}: {problem}")]
    InvalidTable { field: String, problem: String },

    #[error("failover timing {field}: {problem}")]
    Timing { field: String, problem: String },

    #[error("slots: {0}")]
    SlotSet(String),

    #[error("routing table: cannot decode: {0}")]
    Decode(String),
}

pub type Result<T, E = Error> = std::result::Result<T, E>;
