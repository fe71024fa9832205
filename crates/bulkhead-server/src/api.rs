//! Routes and handlers. `app(state)` is the whole HTTP surface; tests drive it in-process with
//! `tower::ServiceExt::oneshot` and through real sockets.

use std::sync::Arc;
use std::time::Instant;

use axum::extract::{DefaultBodyLimit, State};
use axum::http::{HeaderMap, Method, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::{Extension, Json, Router};
use bulkhead_core::key::secret_eq;
use bulkhead_core::{ApiKey, KeyHash, Micros};
use bulkhead_store::{AgentView, BlastRadius};
use bulkhead_store::{Answer, Caller, Command, Idem, Ledger, Store};
use metrics_exporter_prometheus::PrometheusHandle;
use sha2::{Digest, Sha256};
use utoipa::OpenApi;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use crate::auth::{agent_key, bearer};
use crate::bodies::{
    AgentList, AuditPage, Captured, Health, HoldReceipt, NewAgent, NewKey, Released, Revoked, SpendReceipt,
};
use crate::error::ApiError;
use crate::input::{
    BODY_BYTES_MAX, Body, CaptureReq, CreateAgentReq, EmptyReq, HOLD_EXPIRY_SECS_DEFAULT, HOLD_EXPIRY_SECS_MAX,
    HoldReq, P, PageQuery, PatchReq, Q, RevokeReq, SpendReq,
};
use crate::openapi::{
    BodyTooLarge, Conflict, Forbidden, IdempotencyKeyReused, InternalError, InvalidRequest, LimitExceeded, NotFound,
    RateLimited, RequestTimeout, StoreUnavailable, Unauthorized,
};
use crate::reply::respond;

/// The longest `Idempotency-Key`.
pub(crate) const IDEMPOTENCY_KEY_LEN_MAX: usize = 255;

/// Everything a handler needs.
#[derive(Clone)]
pub struct AppState {
    pub ledger: Ledger,
    pub admin_token: Arc<str>,
    pub metrics: PrometheusHandle,
    /// `/metrics` answers without credentials (the server listens on loopback only); otherwise
    /// it needs the admin token.
    pub metrics_open: bool,
}

impl AppState {
    pub(crate) fn store(&self) -> &Store {
        self.ledger.store()
    }
}

/// The whole API as one router.
pub fn app(state: AppState) -> Router {
    let (api, doc) = api_routes().split_for_parts();
    let doc = Document(serde_json::to_vec(&crate::openapi::to_json(&doc)).unwrap_or_else(|_| b"{}".to_vec()).into());
    let api = api.layer(axum::middleware::from_fn_with_state(state.clone(), credentials_first));
    api.merge(crate::console::routes())
        .layer(Extension(doc))
        .fallback(fallback)
        .method_not_allowed_fallback(method_not_allowed)
        .layer(DefaultBodyLimit::max(BODY_BYTES_MAX))
        .layer(axum::middleware::from_fn(crate::metrics::track_requests))
        .with_state(state)
}

/// Every route of the JSON API, each registered together with its OpenAPI operation (the
/// handler's `#[utoipa::path]`, whose path and method are the route's): the one place routes are
/// listed, so the document and the router cannot disagree. Register new routes here, through
/// `routes!`, never with a bare `.route(…)`.
pub(crate) fn api_routes() -> OpenApiRouter<AppState> {
    OpenApiRouter::with_openapi(crate::openapi::ApiDoc::openapi())
        .routes(routes!(healthz))
        .routes(routes!(metrics))
        .routes(routes!(openapi_json))
        .routes(routes!(create_agent, list_agents))
        .routes(routes!(get_agent, patch_agent))
        .routes(routes!(revoke))
        .routes(routes!(rotate_key))
        .routes(routes!(suspend))
        .routes(routes!(resume))
        .routes(routes!(agent_audit))
        .routes(routes!(spend))
        .routes(routes!(hold))
        .routes(routes!(capture))
        .routes(routes!(release))
        .routes(routes!(blast_radius))
        .routes(routes!(me))
        .routes(routes!(me_audit))
        .routes(routes!(crate::history::usage))
        .routes(routes!(crate::history::audit))
        .routes(routes!(crate::history::alerts))
}

/// A call that sends a body (`POST`, `PATCH`, …) to the JSON API must first show credentials of
/// the right form: the admin token, or an agent key with a good checksum. Anything else is
/// refused before its body is read (contract §12); the handler checks the rest.
async fn credentials_first(
    State(state): State<AppState>,
    req: axum::extract::Request,
    next: axum::middleware::Next,
) -> Response {
    let has_body = !matches!(*req.method(), Method::GET | Method::HEAD | Method::OPTIONS);
    if has_body
        && req.uri().path().starts_with("/v1/")
        && let Err(e) = who(&state, req.headers())
    {
        return e.into_response();
    }
    next.run(req).await
}

/// The OpenAPI document as JSON, made once per router.
#[derive(Clone)]
struct Document(axum::body::Bytes);

/// This OpenAPI 3.1 document.
///
/// Generated from the server's own routes and types. No credentials needed.
#[utoipa::path(
    get,
    path = "/openapi.json",
    tag = "meta",
    responses((status = 200, description = "The OpenAPI document.", body = Object))
)]
async fn openapi_json(Extension(doc): Extension<Document>) -> Response {
    ([(header::CONTENT_TYPE, "application/json")], doc.0).into_response()
}

async fn fallback() -> ApiError {
    ApiError::not_found("No such route.")
}

async fn method_not_allowed() -> ApiError {
    ApiError::new(405, "method_not_allowed", "This route does not take that method.")
}

enum Who {
    Admin,
    Agent(KeyHash),
}

/// Tells the admin token from an agent key. A key with a bad checksum is refused here, before
/// any store lookup.
fn who(state: &AppState, headers: &HeaderMap) -> Result<Who, ApiError> {
    let token = bearer(headers)?;
    if ApiKey::looks_like_key(token) {
        let key = ApiKey::parse(token).ok_or_else(|| ApiError::deny(bulkhead_core::DenyReason::InvalidCredentials))?;
        return Ok(Who::Agent(key.hash()));
    }
    if secret_eq(token, &state.admin_token) {
        Ok(Who::Admin)
    } else {
        Err(ApiError::deny(bulkhead_core::DenyReason::InvalidCredentials))
    }
}

pub(crate) fn admin(state: &AppState, headers: &HeaderMap) -> Result<(), ApiError> {
    match who(state, headers)? {
        Who::Admin => Ok(()),
        Who::Agent(_) => Err(ApiError::admin_required()),
    }
}

/// An agent's key for a money call, checked before the body is read: a key the ledger has
/// refused for good (or, for a spend or hold, suspended) is answered at once, from memory
/// (contract §12). `SPENDS`: the call spends or holds.
pub(crate) struct MoneyKey<const SPENDS: bool>(pub KeyHash);

impl<const SPENDS: bool> axum::extract::FromRequestParts<AppState> for MoneyKey<SPENDS> {
    type Rejection = Response;

    async fn from_request_parts(parts: &mut axum::http::request::Parts, state: &AppState) -> Result<Self, Response> {
        let key = agent_key(&parts.headers).map_err(IntoResponse::into_response)?;
        match state.ledger.known_refusal(&key, SPENDS) {
            Some(reply) => Err(respond(reply)),
            None => Ok(MoneyKey(key)),
        }
    }
}

fn idem(headers: &HeaderMap, method: &Method, path: &str, body: &[u8]) -> Result<Option<Idem>, ApiError> {
    let Some(v) = headers.get("idempotency-key") else {
        return Ok(None);
    };
    let key = v
        .to_str()
        .ok()
        .filter(|k| !k.is_empty() && k.len() <= IDEMPOTENCY_KEY_LEN_MAX && k.bytes().all(|b| (0x21..0x7f).contains(&b)))
        .ok_or_else(|| {
            ApiError::invalid(format!(
                "Idempotency-Key must be 1 to {IDEMPOTENCY_KEY_LEN_MAX} visible ASCII characters."
            ))
        })?;
    let mut h = Sha256::new();
    h.update(method.as_str().as_bytes());
    h.update(b" ");
    h.update(path.as_bytes());
    h.update(b"\n");
    h.update(body);
    Ok(Some(Idem { key: key.to_owned(), request_hash: hex::encode(h.finalize()) }))
}

/// Health.
///
/// 200 once the store is open and migrated and answers.
#[utoipa::path(
    get,
    path = "/healthz",
    tag = "monitoring",
    responses(
        (status = 200, description = "The store answers.", body = Health),
        (status = 500, response = InternalError),
        (status = 503, response = StoreUnavailable),
    )
)]
async fn healthz(State(state): State<AppState>) -> Result<Json<Health>, ApiError> {
    state.store().ping().await?;
    Ok(Json(Health { status: "ok" }))
}

/// Prometheus metrics.
///
/// The text exposition format: decisions, spend, cap utilization per agent, revocation times.
/// Without the admin token only to a loopback peer that addressed a loopback host, on a server
/// listening on loopback.
#[utoipa::path(
    get,
    path = "/metrics",
    tag = "monitoring",
    security((), ("admin_token" = [])),
    responses(
        (status = 200, description = "Prometheus text exposition.", body = String, content_type = "text/plain; version=0.0.4"),
        (status = 401, response = Unauthorized),
        (status = 500, response = InternalError),
        (status = 503, response = StoreUnavailable),
    )
)]
async fn metrics(
    State(state): State<AppState>,
    peer: Option<axum::Extension<axum::extract::ConnectInfo<std::net::SocketAddr>>>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    if !(state.metrics_open && loopback_request(peer.map(|p| p.0.0), &headers)) {
        admin(&state, &headers)?;
    }
    // Utilization is read from the store at scrape time, so it is right for every agent
    // (ancestors included) whichever replica made the decisions.
    for (agent, u) in state.store().utilizations(state.ledger.now_ms()).await? {
        metrics::gauge!(crate::metrics::UTILIZATION, "agent" => agent).set(u);
    }
    Ok(([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], state.metrics.render()).into_response())
}

/// Whether a request without credentials may read `/metrics` on a loopback listener: its peer is
/// on loopback, and it addressed a loopback host (`Host` names `localhost` or a loopback IP), so a
/// web page whose DNS name was rebound to 127.0.0.1 cannot read it through a local browser. A
/// request that came in without a connection (in-process, as embedding tests do) has no peer; it
/// passes if any `Host` it names is a loopback one.
fn loopback_request(peer: Option<std::net::SocketAddr>, headers: &HeaderMap) -> bool {
    let host = headers.get(header::HOST).and_then(|h| h.to_str().ok());
    let host_ok = match host {
        Some(h) => is_loopback_host(h),
        None => peer.is_none(),
    };
    host_ok && peer.is_none_or(|p| p.ip().is_loopback() || p.ip().to_canonical().is_loopback())
}

/// `localhost`, `127.x.y.z` or `[::1]`, with or without a port.
fn is_loopback_host(host: &str) -> bool {
    let name = match host.strip_prefix('[') {
        Some(v6) => v6.split_once(']').map_or("", |(ip, _)| ip),
        None => host
            .rsplit_once(':')
            .map_or(host, |(name, port)| if port.bytes().all(|b| b.is_ascii_digit()) { name } else { host }),
    };
    name.eq_ignore_ascii_case("localhost")
        || name.parse::<std::net::IpAddr>().is_ok_and(|ip| ip.is_loopback() || ip.to_canonical().is_loopback())
}

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
async fn create_agent(State(state): State<AppState>, headers: HeaderMap, body: Body) -> Result<Response, ApiError> {
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
async fn list_agents(
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
async fn get_agent(
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
async fn patch_agent(
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
async fn revoke(
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
async fn rotate_key(
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
async fn suspend(
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
async fn resume(
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
async fn agent_audit(
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
async fn spend(
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
async fn hold(
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
async fn capture(
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
async fn release(
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
async fn me(State(state): State<AppState>, headers: HeaderMap) -> Result<Json<AgentView>, ApiError> {
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
async fn me_audit(
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
async fn blast_radius(
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

#[cfg(test)]
mod tests {
    use super::is_loopback_host;

    #[test]
    fn loopback_hosts() {
        for h in ["localhost", "LOCALHOST:8080", "127.0.0.1", "127.0.0.1:8080", "127.9.9.9:1", "[::1]", "[::1]:8080"] {
            assert!(is_loopback_host(h), "{h}");
        }
        for h in [
            "evil.example",
            "evil.example:8080",
            "localhost.evil.example",
            "10.0.0.1:8080",
            "[::2]:80",
            "",
            "127.0.0.1.nip.io",
        ] {
            assert!(!is_loopback_host(h), "{h}");
        }
    }
}
