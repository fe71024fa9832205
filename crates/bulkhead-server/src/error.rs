//! One error type for every failure the API reports, rendered as the contract's error body.

use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use bulkhead_core::DenyReason;
use bulkhead_store::{AmountProblem, Missing, Refusal, Revived, StoreError};
use serde::Serialize;
use utoipa::ToSchema;

/// A failure with its public status, code and message. The internal cause (if any) goes to the
/// log, never into the answer.
#[derive(Debug)]
pub struct ApiError {
    pub status: StatusCode,
    pub code: &'static str,
    pub message: String,
    pub retry_after: Option<i64>,
    /// A 402's recovery fields, beside `error`: `remaining` and `window_resets_at`.
    pub recovery: Option<(bulkhead_store::Remaining, i64)>,
}

impl ApiError {
    pub fn new(status: u16, code: &'static str, message: impl Into<String>) -> ApiError {
        ApiError {
            status: StatusCode::from_u16(status).unwrap_or(StatusCode::BAD_REQUEST),
            code,
            message: message.into(),
            retry_after: None,
            recovery: None,
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
        let mut e = ApiError::new(deny_status(reason), reason.code(), reason.message());
        if let DenyReason::RateLimited { retry_after_ms } = reason {
            e.retry_after = Some(((retry_after_ms + 999) / 1000).max(1));
        }
        e
    }

    pub fn admin_required() -> ApiError {
        ApiError::new(401, "invalid_credentials", "This call needs the admin token.")
    }

    /// The contract's error body: `{"error": {"code", "message"}}`, `retry_after` on a 429 or a
    /// window cap's 402, and a 402's `remaining` and `window_resets_at` beside `error`.
    pub(crate) fn body(&self) -> ErrorBody {
        ErrorBody {
            error: ErrorDetail { code: self.code, message: self.message.clone(), retry_after: self.retry_after },
            remaining: self.recovery.map(|(r, _)| r.into()),
            window_resets_at: self.recovery.map(|(_, at)| bulkhead_store::fmt_time(at)),
        }
    }
}

/// Every non-2xx answer of the API (contract §3); `Error` in the OpenAPI document.
#[derive(Serialize, ToSchema)]
#[schema(as = Error)]
pub(crate) struct ErrorBody {
    pub error: ErrorDetail,
    /// A 402 only: what the agent may still spend under every cap of its chain (contract §5).
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schema(value_type = crate::bodies::Remaining)]
    pub remaining: Option<crate::bodies::Remaining>,
    /// A 402 only: when the agent's window resets (contract §5).
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schema(value_type = String, format = DateTime)]
    pub window_resets_at: Option<String>,
}

#[derive(Serialize, ToSchema)]
pub(crate) struct ErrorDetail {
    /// The error's snake_case code, e.g. `spending_cap_exceeded`.
    #[schema(value_type = String, examples("spending_cap_exceeded"))]
    pub code: &'static str,
    /// One human sentence.
    pub message: String,
    /// Seconds to wait before retrying (429, 503 and a window cap's 402, which also set
    /// `Retry-After`).
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schema(value_type = i64)]
    pub retry_after: Option<i64>,
}

/// The status of a denial: credentials 401, suspension and scope 403, rate limit 429, limits 402.
fn deny_status(reason: DenyReason) -> u16 {
    match reason {
        DenyReason::InvalidCredentials | DenyReason::CredentialRevoked | DenyReason::CredentialExpired => 401,
        DenyReason::AgentSuspended | DenyReason::ScopeNotGranted => 403,
        DenyReason::RateLimited { .. } => 429,
        DenyReason::TooManyOpenHolds => 409,
        _ => 402,
    }
}

/// Every refusal of the ledger, with its public status, code and message: one arm per refusal,
/// kept in one table (so as long as the list of refusals) to be read and checked at once.
impl From<Refusal> for ApiError {
    fn from(r: Refusal) -> ApiError {
        match r {
            Refusal::Deny(reason) => ApiError::deny(reason),
            Refusal::OverLimit(o) => {
                let mut e = ApiError::deny(o.reason);
                e.recovery = Some((o.remaining, o.window_resets_at));
                e.retry_after = o.retry_after_ms.map(|ms| ((ms + 999) / 1000).max(1));
                e
            }
            Refusal::NotFound(what) => {
                let what = match what {
                    Missing::Agent => "agent",
                    Missing::Descendant => "agent among your descendants",
                    Missing::Hold => "hold",
                    Missing::Lease => "lease",
                };
                ApiError::not_found(format!("No {what} with that identifier exists."))
            }
            Refusal::HoldClosed { lease, was } => ApiError::new(
                409,
                "hold_closed",
                format!("The {} was already {}.", if lease { "lease" } else { "hold" }, was.as_str()),
            ),
            Refusal::InvalidAmount(problem) => ApiError::bad(
                "invalid_amount",
                match problem {
                    AmountProblem::CaptureAboveHold { held } => {
                        format!("The capture amount is more than the {held} held.")
                    }
                    AmountProblem::CostAboveSlot => "A call's cost is above its slot.".into(),
                    AmountProblem::SlotsAboveLease => "More slots were settled than the lease holds.".into(),
                },
            ),
            Refusal::AgentRevoked(Revived::RotateKey) => {
                ApiError::new(409, "agent_revoked", "A revoked agent cannot get a new key.")
            }
            Refusal::AgentRevoked(Revived::Resume) => {
                ApiError::new(409, "agent_revoked", "A revoked agent cannot be resumed.")
            }
            Refusal::AgentRevoked(Revived::Suspend) => {
                ApiError::new(409, "agent_revoked", "A revoked agent cannot be suspended.")
            }
            Refusal::HandleTaken => ApiError::new(409, "handle_taken", "An agent with this handle already exists."),
            Refusal::ScopeEscalation => {
                ApiError::new(403, "scope_escalation", "A child's scopes must be covered by its parent's scopes.")
            }
            Refusal::CapEscalation(None) => ApiError::new(
                403,
                "cap_escalation",
                "A child's caps and per-transaction limit may not exceed its parent's.",
            ),
            Refusal::CapEscalation(Some(what)) => ApiError::new(
                403,
                "cap_escalation",
                format!("A child's {} may not be looser than its parent's.", what.name()),
            ),
            Refusal::ShadowNotRoot => ApiError::invalid("Shadow mode (enforce: false) is for root agents only."),
            Refusal::TreeTooDeep { depth_max } => {
                ApiError::invalid(format!("Agent trees are at most {depth_max} levels deep."))
            }
            Refusal::TreeTooLarge { agents_max } => {
                ApiError::invalid(format!("An agent tree holds at most {agents_max} agents."))
            }
            Refusal::TooManyChildren { children_max } => {
                ApiError::invalid(format!("An agent may spawn at most {children_max} children."))
            }
            Refusal::IdempotencyKeyReused => {
                ApiError::new(422, "idempotency_key_reused", "This Idempotency-Key was used with a different request.")
            }
        }
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
        let mut resp = (self.status, axum::Json(self.body())).into_response();
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
