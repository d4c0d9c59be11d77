//! cellplane-operator: turns `Cell` and `CellSet` objects into running cells.
//!
//! Pipeline per Cell (zookeeper-operator shape): fetch -> validate -> build (pure,
//! [`build`]) -> apply (server-side apply) -> status (pure aggregation, [`status`]).

pub mod build;
pub mod controller;
pub mod leader;
pub mod metrics;
pub mod registration;
pub mod status;

/// Errors of the operator; `metric_label` counts them by kind.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("invalid spec: {0}")]
    InvalidSpec(String),

    #[error("object lacks {0}; was it read from the API server?")]
    MissingField(&'static str),

    #[error("kubernetes API: {0}")]
    Kube(#[source] kube::Error),

    #[error("etcd: {0}")]
    Etcd(#[source] etcd_client::Error),

    #[error("finalizer: {0}")]
    Finalizer(String),

    #[error("serialization: {0}")]
    Serialization(#[source] serde_json::Error),
}

impl From<kube::Error> for Error {
    fn from(e: kube::Error) -> Self {
        Error::Kube(e)
    }
}

impl From<etcd_client::Error> for Error {
    fn from(e: etcd_client::Error) -> Self {
        Error::Etcd(e)
    }
}

impl Error {
    /// A low-cardinality label for the errors metric.
    pub fn metric_label(&self) -> &'static str {
        match self {
            Error::InvalidSpec(_) => "invalid_spec",
            Error::MissingField(_) => "missing_field",
            Error::Kube(_) => "kube",
            Error::Etcd(_) => "etcd",
            Error::Finalizer(_) => "finalizer",
            Error::Serialization(_) => "serialization",
        }
    }

    /// Invalid input waits for the user to change it; everything else is retried.
    pub fn is_permanent(&self) -> bool {
        matches!(self, Error::InvalidSpec(_))
    }
}

pub type Result<T, E = Error> = std::result::Result<T, E>;
