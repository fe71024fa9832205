//! The agent's own API: the money calls (spend, hold, capture, release), each behind its
//! [`MoneyKey`] and with its `Idempotency-Key`, and what an agent may read of itself (`/v1/me`,
//! its audit trail).

use axum::Json;
use axum::extract::State;
use axum::http::{HeaderMap, Method};
use axum::response::Response;
use bulkhead_core::Micros;
use bulkhead_store::{AgentView, Command};

use super::{AppState, MoneyKey, idem};
use crate::auth::agent_key;
use crate::bodies::{AuditPage, Captured, HoldReceipt, Released, SpendReceipt};
use crate::error::ApiError;
use crate::input::{
    Body, CaptureReq, EmptyReq, HOLD_EXPIRY_SECS_DEFAULT, HOLD_EXPIRY_SECS_MAX, HoldReq, P, PageQuery, Q, SpendReq,
};
use crate::openapi::{
    BodyTooLarge, Conflict, Forbidden, IdempotencyKeyReused, InternalError, InvalidRequest, LimitExceeded, NotFound,
    RateLimited, RequestTimeout, StoreUnavailable, Unauthorized,
};
use crate::reply::respond;

/// Spend.
///
/// Charged at once against the agent's caps and every ancestor's, if all allow it.
#[utoipa::path(
    post,
    path = "/v1/spend",
    tag = "spending",
    security(("agent_key" = [])),
    params(("Idempotency-Key" = Option<String>, Header, description = "Up to 255 visible ASCII characters: the first answer to this key and body is stored for 24 h per credential and replayed (`Idempotent-Replayed: true`); the same key with another body is 422.")),
    request_body = SpendReq,
    responses(
        (status = 200, description = "Charged.", body = SpendReceipt, headers(("Idempotent-Replayed" = String, description = "`true` when this is the stored answer to an earlier request with the same `Idempotency-Key`."))),
        (status = 400, response = InvalidRequest),
        (status = 401, response = Unauthorized),
        (status = 402, response = LimitExceeded),
        (status = 403, response = Forbidden),
        (status = 408, response = RequestTimeout),
        (status = 413, response = BodyTooLarge),
        (status = 422, response = IdempotencyKeyReused),
        (status = 429, response = RateLimited),
        (status = 500, response = InternalError),
        (status = 503, response = StoreUnavailable),
    )
)]
pub(super) async fn spend(
    State(state): State<AppState>,
    method: Method,
    headers: HeaderMap,
    MoneyKey(key): MoneyKey<true>,
    body: Body,
) -> Result<Response, ApiError> {
    let idem = idem(&headers, &method, "/v1/spend", &body.0)?;
    let req = body.json::<SpendReq>()?;
    let scope = crate::input::scope(&req.scope)?;
    let amount = req.amount.parse_positive("amount")?;
    let memo = crate::input::note(req.memo, "memo")?;
    Ok(respond(state.ledger.submit(Command::Spend { key, scope, amount, memo, idem }).await?))
}

/// Place a hold.
///
/// Counts against every cap from the moment it is granted until it is captured, released or
/// expires.
#[utoipa::path(
    post,
    path = "/v1/holds",
    tag = "spending",
    security(("agent_key" = [])),
    params(("Idempotency-Key" = Option<String>, Header, description = "Up to 255 visible ASCII characters: the first answer to this key and body is stored for 24 h per credential and replayed (`Idempotent-Replayed: true`); the same key with another body is 422.")),
    request_body = HoldReq,
    responses(
        (status = 201, description = "Held.", body = HoldReceipt, headers(("Idempotent-Replayed" = String, description = "`true` when this is the stored answer to an earlier request with the same `Idempotency-Key`."))),
        (status = 400, response = InvalidRequest),
        (status = 401, response = Unauthorized),
        (status = 402, response = LimitExceeded),
        (status = 403, response = Forbidden),
        (status = 409, response = Conflict),
        (status = 408, response = RequestTimeout),
        (status = 413, response = BodyTooLarge),
        (status = 422, response = IdempotencyKeyReused),
        (status = 429, response = RateLimited),
        (status = 500, response = InternalError),
        (status = 503, response = StoreUnavailable),
    )
)]
pub(super) async fn hold(
    State(state): State<AppState>,
    method: Method,
    headers: HeaderMap,
    MoneyKey(key): MoneyKey<true>,
    body: Body,
) -> Result<Response, ApiError> {
    let idem = idem(&headers, &method, "/v1/holds", &body.0)?;
    let req = body.json::<HoldReq>()?;
    let scope = crate::input::scope(&req.scope)?;
    let amount = req.amount.parse_positive("amount")?;
    crate::input::note(req.memo, "memo")?;
    let expires_secs = match &req.expires_in {
        None => HOLD_EXPIRY_SECS_DEFAULT,
        Some(s) => crate::input::span(s, "expires_in", "invalid_request")?.secs(),
    };
    if expires_secs > HOLD_EXPIRY_SECS_MAX {
        return Err(ApiError::invalid("expires_in is at most 24h."));
    }
    Ok(respond(state.ledger.submit(Command::Hold { key, scope, amount, expires_ms: expires_secs * 1000, idem }).await?))
}

/// Capture a hold.
///
/// Charges `amount` (at most what is held) and releases the rest. Allowed while suspended.
#[utoipa::path(
    post,
    path = "/v1/holds/{id}/capture",
    tag = "spending",
    security(("agent_key" = [])),
    params(("id" = String, Path, description = "The hold's id, as `POST /v1/holds` answered it."), ("Idempotency-Key" = Option<String>, Header, description = "Up to 255 visible ASCII characters: the first answer to this key and body is stored for 24 h per credential and replayed (`Idempotent-Replayed: true`); the same key with another body is 422.")),
    request_body = CaptureReq,
    responses(
        (status = 200, description = "Captured.", body = Captured, headers(("Idempotent-Replayed" = String, description = "`true` when this is the stored answer to an earlier request with the same `Idempotency-Key`."))),
        (status = 400, response = InvalidRequest),
        (status = 401, response = Unauthorized),
        (status = 404, response = NotFound),
        (status = 408, response = RequestTimeout),
        (status = 413, response = BodyTooLarge),
        (status = 409, response = Conflict),
        (status = 422, response = IdempotencyKeyReused),
        (status = 500, response = InternalError),
        (status = 503, response = StoreUnavailable),
    )
)]
pub(super) async fn capture(
    State(state): State<AppState>,
    method: Method,
    headers: HeaderMap,
    MoneyKey(key): MoneyKey<false>,
    P(id): P<String>,
    body: Body,
) -> Result<Response, ApiError> {
    let idem = idem(&headers, &method, &format!("/v1/holds/{id}/capture"), &body.0)?;
    let amount: Micros = body.json::<CaptureReq>()?.amount.parse("amount")?;
    Ok(respond(state.ledger.submit(Command::Capture { key, hold_id: id, amount, idem }).await?))
}

/// Release a hold.
///
/// Nothing is charged. Allowed while suspended.
#[utoipa::path(
    post,
    path = "/v1/holds/{id}/release",
    tag = "spending",
    security(("agent_key" = [])),
    params(("id" = String, Path, description = "The hold's id, as `POST /v1/holds` answered it."), ("Idempotency-Key" = Option<String>, Header, description = "Up to 255 visible ASCII characters: the first answer to this key and body is stored for 24 h per credential and replayed (`Idempotent-Replayed: true`); the same key with another body is 422.")),
    request_body = Option<EmptyReq>,
    responses(
        (status = 200, description = "Released.", body = Released, headers(("Idempotent-Replayed" = String, description = "`true` when this is the stored answer to an earlier request with the same `Idempotency-Key`."))),
        (status = 400, response = InvalidRequest),
        (status = 401, response = Unauthorized),
        (status = 404, response = NotFound),
        (status = 408, response = RequestTimeout),
        (status = 413, response = BodyTooLarge),
        (status = 409, response = Conflict),
        (status = 422, response = IdempotencyKeyReused),
        (status = 500, response = InternalError),
        (status = 503, response = StoreUnavailable),
    )
)]
pub(super) async fn release(
    State(state): State<AppState>,
    method: Method,
    headers: HeaderMap,
    MoneyKey(key): MoneyKey<false>,
    P(id): P<String>,
    body: Body,
) -> Result<Response, ApiError> {
    let idem = idem(&headers, &method, &format!("/v1/holds/{id}/release"), &body.0)?;
    body.json::<EmptyReq>()?;
    Ok(respond(state.ledger.submit(Command::Release { key, hold_id: id, idem }).await?))
}

/// The caller's agent.
#[utoipa::path(
    get,
    path = "/v1/me",
    tag = "agents",
    security(("agent_key" = [])),
    responses(
        (status = 200, description = "The agent whose key this is.", body = AgentView),
        (status = 401, response = Unauthorized),
        (status = 500, response = InternalError),
        (status = 503, response = StoreUnavailable),
    )
)]
pub(super) async fn me(State(state): State<AppState>, headers: HeaderMap) -> Result<Json<AgentView>, ApiError> {
    let key = agent_key(&headers)?;
    match state.store().agent_for_key(&key, state.ledger.now_ms()).await? {
        Ok(a) => Ok(Json(a)),
        Err(reason) => Err(ApiError::deny(reason)),
    }
}

/// The caller's audit trail.
#[utoipa::path(
    get,
    path = "/v1/me/audit",
    tag = "audit",
    security(("agent_key" = [])),
    params(PageQuery),
    responses(
        (status = 200, description = "A page of the caller's events.", body = AuditPage),
        (status = 400, response = InvalidRequest),
        (status = 401, response = Unauthorized),
        (status = 500, response = InternalError),
        (status = 503, response = StoreUnavailable),
    )
)]
pub(super) async fn me_audit(
    State(state): State<AppState>,
    headers: HeaderMap,
    Q(q): Q<PageQuery>,
) -> Result<Json<AuditPage>, ApiError> {
    let key = agent_key(&headers)?;
    let agent = match state.store().agent_for_key(&key, state.ledger.now_ms()).await? {
        Ok(a) => a,
        Err(reason) => return Err(ApiError::deny(reason)),
    };
    let events = state.store().audit_page(Some(&agent.handle), q.after_seq()?, q.limit()?).await?;
    Ok(Json(AuditPage { events }))
}
