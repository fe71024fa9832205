//! One error type for every failure the API reports, rendered as the contract's error body.

use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use bulkhead_core::DenyReason;
use bulkhead_store::StoreError;
use serde_json::json;

/// A failure with its public status, code and message. The internal cause (if any) goes to the
/// log, never into the answer.
#[derive(Debug)]
pub struct ApiError {
    pub status: StatusCode,
    pub code: &'static str,
    pub message: String,
    pub retry_after: Option<i64>,
}

impl ApiError {
    pub fn new(status: u16, code: &'static str, message: impl Into<String>) -> ApiError {
        ApiError {
            status: StatusCode::from_u16(status).unwrap_or(StatusCode::BAD_REQUEST),
            code,
            message: message.into(),
            retry_after: None,
        }
    }

    pub fn bad(code: &'static str, message: impl Into<String>) -> ApiError {
        ApiError::new(400, code, message)
    }

    pub fn invalid(message: impl Into<String>) -> ApiError {
        ApiError::bad("invalid_request", message)
    }

    pub fn not_found(message: impl Into<String>) -> ApiError {
        ApiError::new(404, "not_found", message)
    }

    pub fn deny(reason: DenyReason) -> ApiError {
        let mut e = ApiError::new(reason.status(), reason.code(), reason.message());
        if let DenyReason::RateLimited { retry_after_ms } = reason {
            e.retry_after = Some(((retry_after_ms + 999) / 1000).max(1));
        }
        e
    }

    pub fn admin_required() -> ApiError {
        ApiError::new(401, "invalid_credentials", "This call needs the admin token.")
    }
}

impl From<StoreError> for ApiError {
    fn from(e: StoreError) -> ApiError {
        match e {
            StoreError::Corrupt(_) => {
                tracing::error!(error = %e, "store invariant broken");
                ApiError::new(500, "internal_error", "The server hit an internal error; nothing was charged.")
            }
            _ => {
                tracing::warn!(error = %e, "store unavailable");
                let mut e = ApiError::new(503, "store_unavailable", "The store is unavailable; retry shortly.");
                e.retry_after = Some(1);
                e
            }
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut body = json!({"error": {"code": self.code, "message": self.message}});
        if let Some(r) = self.retry_after {
            body["error"]["retry_after"] = json!(r);
        }
        let mut resp = (self.status, axum::Json(body)).into_response();
        if let Some(r) = self.retry_after
            && let Ok(v) = HeaderValue::from_str(&r.to_string())
        {
            resp.headers_mut().insert(header::RETRY_AFTER, v);
        }
        resp
    }
}

impl From<axum::extract::rejection::QueryRejection> for ApiError {
    fn from(r: axum::extract::rejection::QueryRejection) -> ApiError {
        ApiError::invalid(format!("The query string is not valid for this call: {}", r.body_text()))
    }
}

impl From<axum::extract::rejection::PathRejection> for ApiError {
    fn from(r: axum::extract::rejection::PathRejection) -> ApiError {
        ApiError::invalid(format!("The path is not valid: {}", r.body_text()))
    }
}
