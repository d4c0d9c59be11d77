//! The app's one error type; each variant maps to one HTTP status.

use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};

#[derive(Debug, thiserror::Error)]
pub enum AppError {
    #[error("{0}")]
    BadRequest(String),

    #[error("{0} not found")]
    NotFound(String),

    #[error("sold out: {sku} has {left} left, {wanted} wanted")]
    SoldOut { sku: String, left: i64, wanted: i64 },

    #[error("no sale is open for {0}; an operator sets its stock first")]
    NoSale(String),

    /// The order id was voided (its delivery was in doubt and refused); it never persists.
    #[error("order {0} was refused (its delivery to the order queue timed out) and voided; place it again with a new orderId")]
    Voided(String),

    /// A store the request needs is down or slow; the request is refused, nothing is lost.
    #[error("{what} unavailable: {reason}")]
    Unavailable { what: &'static str, reason: String },

    #[error("forbidden: {0}")]
    Forbidden(String),

    /// Settings the app cannot start with (at start only, never for a request).
    #[error("configuration: {0}")]
    Config(String),
}

impl AppError {
    pub fn unavailable(what: &'static str, reason: impl ToString) -> Self {
        AppError::Unavailable {
            what,
            reason: reason.to_string(),
        }
    }

    pub fn status(&self) -> StatusCode {
        match self {
            AppError::BadRequest(_) => StatusCode::BAD_REQUEST,
            AppError::NotFound(_) => StatusCode::NOT_FOUND,
            AppError::SoldOut { .. } | AppError::NoSale(_) | AppError::Voided(_) => {
                StatusCode::CONFLICT
            }
            AppError::Unavailable { .. } => StatusCode::SERVICE_UNAVAILABLE,
            AppError::Forbidden(_) => StatusCode::FORBIDDEN,
            AppError::Config(_) => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }
}

impl IntoResponse for AppError {
    fn into_response(self) -> Response {
        let status = self.status();
        let body = serde_json::json!({ "error": self.to_string() }).to_string();
        let mut resp = (status, [(header::CONTENT_TYPE, "application/json")], body).into_response();
        if status == StatusCode::SERVICE_UNAVAILABLE {
            resp.headers_mut()
                .insert(header::RETRY_AFTER, header::HeaderValue::from_static("1"));
        }
        resp
    }
}

pub type AppResult<T> = Result<T, AppError>;
