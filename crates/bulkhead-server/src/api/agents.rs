//! The admin API over agents: create (an agent's key may create its children), list, get,
//! change, revoke, rotate a key, suspend, resume, an agent's audit trail, and the fleet's blast
//! radius.

use std::time::Instant;

use axum::Json;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use bulkhead_core::ApiKey;
use bulkhead_store::{AgentView, Answer, BlastRadius, Caller, Command};

use super::{AppState, Who, admin, who};
use crate::bodies::{AgentList, AuditPage, NewAgent, NewKey, Revoked};
use crate::error::ApiError;
use crate::input::{Body, CreateAgentReq, EmptyReq, P, PageQuery, PatchReq, Q, RevokeReq};
use crate::openapi::{
    BodyTooLarge, Conflict, Forbidden, InternalError, InvalidRequest, NotFound, RequestTimeout, StoreUnavailable,
    Unauthorized,
};
use crate::reply::respond;

/// Create an agent.
///
/// With the admin token, a root agent; with an agent's key holding `spawn:agents`, a child of that
/// agent, whose scopes and caps its own must cover. The answer carries the key, shown this once.
#[utoipa::path(
    post,
    path = "/v1/agents",
    tag = "agents",
    security(("admin_token" = []), ("agent_key" = [])),
    request_body = CreateAgentReq,
    responses(
        (status = 201, description = "The agent, with its key.", body = NewAgent),
        (status = 400, response = InvalidRequest),
        (status = 401, response = Unauthorized),
        (status = 403, response = Forbidden),
        (status = 408, response = RequestTimeout),
        (status = 413, response = BodyTooLarge),
        (status = 409, response = Conflict),
        (status = 500, response = InternalError),
        (status = 503, response = StoreUnavailable),
    )
)]
pub(super) async fn create_agent(
    State(state): State<AppState>,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, ApiError> {
    let caller = match who(&state, &headers)? {
        Who::Admin => Caller::Admin,
        Who::Agent(k) => Caller::Agent(k),
    };
    let spec = body.json::<CreateAgentReq>()?.checked()?;
    let key = ApiKey::generate(&mut rand::rng());
    let reply = state.ledger.submit(Command::CreateAgent { caller, spec, key_hash: key.hash() }).await?;
    let Ok(Answer::Created(agent)) = &reply.answer else {
        return Ok(respond(reply));
    };
    let body = NewAgent { agent: (**agent).clone(), key: key.expose().to_owned() };
    Ok((StatusCode::CREATED, Json(body)).into_response())
}

/// List agents.
///
/// In handle order, after `after`.
#[utoipa::path(
    get,
    path = "/v1/agents",
    tag = "agents",
    security(("admin_token" = [])),
    params(PageQuery),
    responses(
        (status = 200, description = "A page of agents.", body = AgentList),
        (status = 400, response = InvalidRequest),
        (status = 401, response = Unauthorized),
        (status = 500, response = InternalError),
        (status = 503, response = StoreUnavailable),
    )
)]
pub(super) async fn list_agents(
    State(state): State<AppState>,
    headers: HeaderMap,
    Q(q): Q<PageQuery>,
) -> Result<Json<AgentList>, ApiError> {
    admin(&state, &headers)?;
    let agents = state.store().list_agents(q.after.as_deref(), q.limit()?, state.ledger.now_ms()).await?;
    Ok(Json(AgentList { agents }))
}

/// Get an agent.
///
/// Its usage includes the spends and holds of all its descendants.
#[utoipa::path(
    get,
    path = "/v1/agents/{handle}",
    tag = "agents",
    security(("admin_token" = [])),
    params(("handle" = String, Path, description = "The agent's handle.")),
    responses(
        (status = 200, description = "The agent.", body = AgentView),
        (status = 401, response = Unauthorized),
        (status = 404, response = NotFound),
        (status = 500, response = InternalError),
        (status = 503, response = StoreUnavailable),
    )
)]
pub(super) async fn get_agent(
    State(state): State<AppState>,
    headers: HeaderMap,
    P(handle): P<String>,
) -> Result<Json<AgentView>, ApiError> {
    admin(&state, &headers)?;
    let agent = state.store().get_agent(&handle, state.ledger.now_ms()).await?;
    agent.map(Json).ok_or_else(|| ApiError::not_found("No agent with that handle exists."))
}

/// Change an agent.
///
/// Caps, window, scopes, rate limit, labels, breaker settings, enforcement: each field given
/// replaces the agent's.
#[utoipa::path(
    patch,
    path = "/v1/agents/{handle}",
    tag = "agents",
    security(("admin_token" = [])),
    params(("handle" = String, Path, description = "The agent's handle.")),
    request_body = PatchReq,
    responses(
        (status = 200, description = "The agent as changed.", body = AgentView),
        (status = 400, response = InvalidRequest),
        (status = 401, response = Unauthorized),
        (status = 403, response = Forbidden),
        (status = 404, response = NotFound),
        (status = 408, response = RequestTimeout),
        (status = 413, response = BodyTooLarge),
        (status = 500, response = InternalError),
        (status = 503, response = StoreUnavailable),
    )
)]
pub(super) async fn patch_agent(
    State(state): State<AppState>,
    headers: HeaderMap,
    P(handle): P<String>,
    body: Body,
) -> Result<Response, ApiError> {
    admin(&state, &headers)?;
    let patch = body.json::<PatchReq>()?.checked()?;
    Ok(respond(state.ledger.submit(Command::PatchAgent { handle, patch }).await?))
}

/// Revoke an agent and its descendants.
///
/// Idempotent. Once answered, no request with any of their keys is allowed, on any server sharing
/// the store; their open holds are released. An agent's key may revoke its own descendants only.
#[utoipa::path(
    post,
    path = "/v1/agents/{handle}/revoke",
    tag = "agents",
    security(("admin_token" = []), ("agent_key" = [])),
    params(("handle" = String, Path, description = "The agent's handle.")),
    request_body = Option<RevokeReq>,
    responses(
        (status = 200, description = "Every handle revoked.", body = Revoked),
        (status = 400, response = InvalidRequest),
        (status = 401, response = Unauthorized),
        (status = 403, response = Forbidden),
        (status = 404, response = NotFound),
        (status = 408, response = RequestTimeout),
        (status = 413, response = BodyTooLarge),
        (status = 500, response = InternalError),
        (status = 503, response = StoreUnavailable),
    )
)]
pub(super) async fn revoke(
    State(state): State<AppState>,
    headers: HeaderMap,
    P(handle): P<String>,
    body: Body,
) -> Result<Response, ApiError> {
    let started = Instant::now();
    let caller = match who(&state, &headers)? {
        Who::Admin => Caller::Admin,
        Who::Agent(k) => Caller::Agent(k),
    };
    let req = body.json::<RevokeReq>()?;
    let reason = crate::input::note(req.reason, "reason")?;
    let reply = state.ledger.submit(Command::Revoke { caller, handle, reason }).await?;
    if matches!(reply.answer, Ok(Answer::Revoked { .. })) {
        crate::metrics::record_revocation(started.elapsed().as_secs_f64());
    }
    Ok(respond(reply))
}

/// Rotate an agent's key.
///
/// The old key stops working at once.
#[utoipa::path(
    post,
    path = "/v1/agents/{handle}/keys",
    tag = "agents",
    security(("admin_token" = [])),
    params(("handle" = String, Path, description = "The agent's handle.")),
    request_body = Option<EmptyReq>,
    responses(
        (status = 201, description = "The new key, shown this once.", body = NewKey),
        (status = 400, response = InvalidRequest),
        (status = 401, response = Unauthorized),
        (status = 404, response = NotFound),
        (status = 408, response = RequestTimeout),
        (status = 413, response = BodyTooLarge),
        (status = 409, response = Conflict),
        (status = 500, response = InternalError),
        (status = 503, response = StoreUnavailable),
    )
)]
pub(super) async fn rotate_key(
    State(state): State<AppState>,
    headers: HeaderMap,
    P(handle): P<String>,
    body: Body,
) -> Result<Response, ApiError> {
    admin(&state, &headers)?;
    body.json::<EmptyReq>()?;
    let key = ApiKey::generate(&mut rand::rng());
    let reply = state.ledger.submit(Command::RotateKey { handle, key_hash: key.hash() }).await?;
    if !matches!(reply.answer, Ok(Answer::KeyRotated)) {
        return Ok(respond(reply));
    }
    Ok((StatusCode::CREATED, Json(NewKey { key: key.expose().to_owned() })).into_response())
}

/// Suspend an agent and its subtree.
///
/// Refused with 403 `agent_suspended` (it and its descendants) until resumed. Takes effect like a
/// revocation: once answered, on every server sharing the store.
#[utoipa::path(
    post,
    path = "/v1/agents/{handle}/suspend",
    tag = "agents",
    security(("admin_token" = [])),
    params(("handle" = String, Path, description = "The agent's handle.")),
    request_body = Option<RevokeReq>,
    responses(
        (status = 200, description = "The agent, suspended.", body = AgentView),
        (status = 400, response = InvalidRequest),
        (status = 401, response = Unauthorized),
        (status = 404, response = NotFound),
        (status = 408, response = RequestTimeout),
        (status = 409, response = Conflict),
        (status = 413, response = BodyTooLarge),
        (status = 500, response = InternalError),
        (status = 503, response = StoreUnavailable),
    )
)]
pub(super) async fn suspend(
    State(state): State<AppState>,
    headers: HeaderMap,
    P(handle): P<String>,
    body: Body,
) -> Result<Response, ApiError> {
    admin(&state, &headers)?;
    let req = body.json::<RevokeReq>()?;
    let reason = crate::input::note(req.reason, "reason")?;
    Ok(respond(state.ledger.submit(Command::Suspend { handle, reason }).await?))
}

/// Resume a suspended agent.
///
/// Lifts a suspension by an operator or by the runaway-loop breaker.
#[utoipa::path(
    post,
    path = "/v1/agents/{handle}/resume",
    tag = "agents",
    security(("admin_token" = [])),
    params(("handle" = String, Path, description = "The agent's handle.")),
    request_body = Option<EmptyReq>,
    responses(
        (status = 200, description = "The agent, active again.", body = AgentView),
        (status = 400, response = InvalidRequest),
        (status = 401, response = Unauthorized),
        (status = 404, response = NotFound),
        (status = 408, response = RequestTimeout),
        (status = 413, response = BodyTooLarge),
        (status = 409, response = Conflict),
        (status = 500, response = InternalError),
        (status = 503, response = StoreUnavailable),
    )
)]
pub(super) async fn resume(
    State(state): State<AppState>,
    headers: HeaderMap,
    P(handle): P<String>,
    body: Body,
) -> Result<Response, ApiError> {
    admin(&state, &headers)?;
    body.json::<EmptyReq>()?;
    Ok(respond(state.ledger.submit(Command::Resume { handle }).await?))
}

/// An agent's audit trail.
///
/// Its events in `seq` order after `after`: every decision, allowed or denied, and every admin
/// action, hash-chained.
#[utoipa::path(
    get,
    path = "/v1/agents/{handle}/audit",
    tag = "audit",
    security(("admin_token" = [])),
    params(("handle" = String, Path, description = "The agent's handle."), PageQuery),
    responses(
        (status = 200, description = "A page of events.", body = AuditPage),
        (status = 400, response = InvalidRequest),
        (status = 401, response = Unauthorized),
        (status = 404, response = NotFound),
        (status = 500, response = InternalError),
        (status = 503, response = StoreUnavailable),
    )
)]
pub(super) async fn agent_audit(
    State(state): State<AppState>,
    headers: HeaderMap,
    P(handle): P<String>,
    Q(q): Q<PageQuery>,
) -> Result<Json<AuditPage>, ApiError> {
    admin(&state, &headers)?;
    if state.store().get_agent(&handle, state.ledger.now_ms()).await?.is_none() {
        return Err(ApiError::not_found("No agent with that handle exists."));
    }
    let events = state.store().audit_page(Some(&handle), q.after_seq()?, q.limit()?).await?;
    Ok(Json(AuditPage { events }))
}

/// The fleet's blast radius.
///
/// Per agent: the most it can spend per period and per day, through its ancestors' caps too, its
/// scopes, and how fast a revocation takes effect; and the fleet's per-day total. The list pages
/// by handle; the total covers every agent.
#[utoipa::path(
    get,
    path = "/v1/blast-radius",
    tag = "monitoring",
    security(("admin_token" = [])),
    params(PageQuery),
    responses(
        (status = 200, description = "The blast radius.", body = BlastRadius),
        (status = 400, response = InvalidRequest),
        (status = 401, response = Unauthorized),
        (status = 500, response = InternalError),
        (status = 503, response = StoreUnavailable),
    )
)]
pub(super) async fn blast_radius(
    State(state): State<AppState>,
    catalog: Option<axum::Extension<crate::mcp::McpCatalog>>,
    headers: HeaderMap,
    Q(q): Q<PageQuery>,
) -> Result<Json<BlastRadius>, ApiError> {
    admin(&state, &headers)?;
    let limit = q.limit()? as usize;
    let mut b = state.store().blast_radius(crate::metrics::revocation_p99_ms()).await?;
    // The fleet total covers every agent; the list pages by handle like every other list.
    let after = q.after.clone().unwrap_or_default();
    b.agents.retain(|a| a.handle > after);
    b.agents.truncate(limit);
    // The MCP tools each agent can reach.
    let catalog = catalog.map(|c| c.0).unwrap_or_default();
    for a in &mut b.agents {
        a.mcp_tools = catalog.reachable(&a.scopes);
    }
    Ok(Json(b))
}
