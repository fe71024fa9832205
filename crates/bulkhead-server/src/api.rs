//! Routes and handlers. `app(state)` is the whole HTTP surface; tests drive it in-process with
//! `tower::ServiceExt::oneshot` and through real sockets.

use std::sync::Arc;
use std::time::Instant;

use axum::extract::{DefaultBodyLimit, State};
use axum::http::{HeaderMap, Method, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use bulkhead_core::key::secret_eq;
use bulkhead_core::{ApiKey, KeyHash, Micros};
use bulkhead_store::{Answer, Caller, Command, Idem, Ledger, Store};
use metrics_exporter_prometheus::PrometheusHandle;
use serde_json::{Value, json};
use sha2::{Digest, Sha256};

use crate::error::ApiError;
use crate::input::{
    BODY_BYTES_MAX, Body, CaptureReq, CreateAgentReq, EmptyReq, HOLD_EXPIRY_SECS_DEFAULT, HOLD_EXPIRY_SECS_MAX,
    HoldReq, P, PageQuery, PatchReq, Q, RevokeReq, SpendReq,
};
use crate::reply::respond;

/// The longest `Idempotency-Key`.
pub const IDEMPOTENCY_KEY_LEN_MAX: usize = 255;

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
    Router::new()
        .route("/healthz", get(healthz))
        .route("/metrics", get(metrics))
        .route("/v1/agents", post(create_agent).get(list_agents))
        .route("/v1/agents/{handle}", get(get_agent).patch(patch_agent))
        .route("/v1/agents/{handle}/revoke", post(revoke))
        .route("/v1/agents/{handle}/keys", post(rotate_key))
        .route("/v1/agents/{handle}/resume", post(resume))
        .route("/v1/agents/{handle}/audit", get(agent_audit))
        .route("/v1/spend", post(spend))
        .route("/v1/holds", post(hold))
        .route("/v1/holds/{id}/capture", post(capture))
        .route("/v1/holds/{id}/release", post(release))
        .route("/v1/blast-radius", get(blast_radius))
        .route("/v1/me", get(me))
        .route("/v1/me/audit", get(me_audit))
        .route("/v1/agents/{handle}/usage", get(crate::history::usage))
        .route("/v1/audit", get(crate::history::audit))
        .route("/v1/alerts", get(crate::history::alerts))
        .merge(crate::console::routes())
        .fallback(fallback)
        .method_not_allowed_fallback(method_not_allowed)
        .layer(DefaultBodyLimit::max(BODY_BYTES_MAX))
        .layer(axum::middleware::from_fn(crate::metrics::track_requests))
        .with_state(state)
}

async fn fallback() -> ApiError {
    ApiError::not_found("No such route.")
}

async fn method_not_allowed() -> ApiError {
    ApiError::new(405, "method_not_allowed", "This route does not take that method.")
}

/// The bearer token of a request, if the header is well-formed.
fn bearer(headers: &HeaderMap) -> Result<&str, ApiError> {
    let bad = || ApiError::new(401, "invalid_credentials", "Send `Authorization: Bearer <key>`.");
    let v = headers.get(header::AUTHORIZATION).ok_or_else(bad)?;
    let v = v.to_str().map_err(|_| bad())?;
    // The scheme is case-insensitive (RFC 7235): `Bearer`, `bearer` and `BEARER` are one.
    let (scheme, token) = v.trim_start().split_once(' ').ok_or_else(bad)?;
    if !scheme.eq_ignore_ascii_case("bearer") {
        return Err(bad());
    }
    let token = token.trim();
    if token.is_empty() {
        return Err(bad());
    }
    Ok(token)
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

pub(crate) fn agent_key(headers: &HeaderMap) -> Result<KeyHash, ApiError> {
    let token = bearer(headers)?;
    ApiKey::parse(token).map(|k| k.hash()).ok_or_else(|| ApiError::deny(bulkhead_core::DenyReason::InvalidCredentials))
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

async fn healthz(State(state): State<AppState>) -> Result<Json<Value>, ApiError> {
    state.store().ping().await?;
    Ok(Json(json!({"status": "ok"})))
}

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
    let mut v = serde_json::to_value(agent).map_err(|_| ApiError::new(500, "internal_error", "bad reply"))?;
    v["key"] = json!(key.expose());
    Ok((StatusCode::CREATED, Json(v)).into_response())
}

async fn list_agents(
    State(state): State<AppState>,
    headers: HeaderMap,
    Q(q): Q<PageQuery>,
) -> Result<Json<Value>, ApiError> {
    admin(&state, &headers)?;
    let agents = state.store().list_agents(q.after.as_deref(), q.limit()?, state.ledger.now_ms()).await?;
    Ok(Json(json!({"agents": agents})))
}

async fn get_agent(
    State(state): State<AppState>,
    headers: HeaderMap,
    P(handle): P<String>,
) -> Result<Json<Value>, ApiError> {
    admin(&state, &headers)?;
    let agent = state.store().get_agent(&handle, state.ledger.now_ms()).await?;
    agent.map(|a| Json(json!(a))).ok_or_else(|| ApiError::not_found("No agent with that handle exists."))
}

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
    Ok((StatusCode::CREATED, Json(json!({"key": key.expose()}))).into_response())
}

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

async fn agent_audit(
    State(state): State<AppState>,
    headers: HeaderMap,
    P(handle): P<String>,
    Q(q): Q<PageQuery>,
) -> Result<Json<Value>, ApiError> {
    admin(&state, &headers)?;
    if state.store().get_agent(&handle, state.ledger.now_ms()).await?.is_none() {
        return Err(ApiError::not_found("No agent with that handle exists."));
    }
    let events = state.store().audit_page(Some(&handle), q.after_seq()?, q.limit()?).await?;
    Ok(Json(json!({"events": events})))
}

async fn spend(
    State(state): State<AppState>,
    method: Method,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, ApiError> {
    let key = agent_key(&headers)?;
    let idem = idem(&headers, &method, "/v1/spend", &body.0)?;
    let req = body.json::<SpendReq>()?;
    let scope = crate::input::scope(&req.scope)?;
    let amount = req.amount.parse_positive("amount")?;
    let memo = crate::input::note(req.memo, "memo")?;
    Ok(respond(state.ledger.submit(Command::Spend { key, scope, amount, memo, idem }).await?))
}

async fn hold(
    State(state): State<AppState>,
    method: Method,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, ApiError> {
    let key = agent_key(&headers)?;
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

async fn capture(
    State(state): State<AppState>,
    method: Method,
    headers: HeaderMap,
    P(id): P<String>,
    body: Body,
) -> Result<Response, ApiError> {
    let key = agent_key(&headers)?;
    let idem = idem(&headers, &method, &format!("/v1/holds/{id}/capture"), &body.0)?;
    let amount: Micros = body.json::<CaptureReq>()?.amount.parse("amount")?;
    Ok(respond(state.ledger.submit(Command::Capture { key, hold_id: id, amount, idem }).await?))
}

async fn release(
    State(state): State<AppState>,
    method: Method,
    headers: HeaderMap,
    P(id): P<String>,
    body: Body,
) -> Result<Response, ApiError> {
    let key = agent_key(&headers)?;
    let idem = idem(&headers, &method, &format!("/v1/holds/{id}/release"), &body.0)?;
    body.json::<EmptyReq>()?;
    Ok(respond(state.ledger.submit(Command::Release { key, hold_id: id, idem }).await?))
}

async fn me(State(state): State<AppState>, headers: HeaderMap) -> Result<Json<Value>, ApiError> {
    let key = agent_key(&headers)?;
    match state.store().agent_for_key(&key, state.ledger.now_ms()).await? {
        Ok(a) => Ok(Json(json!(a))),
        Err(reason) => Err(ApiError::deny(reason)),
    }
}

async fn me_audit(
    State(state): State<AppState>,
    headers: HeaderMap,
    Q(q): Q<PageQuery>,
) -> Result<Json<Value>, ApiError> {
    let key = agent_key(&headers)?;
    let agent = match state.store().agent_for_key(&key, state.ledger.now_ms()).await? {
        Ok(a) => a,
        Err(reason) => return Err(ApiError::deny(reason)),
    };
    let events = state.store().audit_page(Some(&agent.handle), q.after_seq()?, q.limit()?).await?;
    Ok(Json(json!({"events": events})))
}

async fn blast_radius(
    State(state): State<AppState>,
    catalog: Option<axum::Extension<crate::mcp::McpCatalog>>,
    headers: HeaderMap,
    Q(q): Q<PageQuery>,
) -> Result<Json<Value>, ApiError> {
    admin(&state, &headers)?;
    let limit = q.limit()? as usize;
    let mut b = state.store().blast_radius(crate::metrics::revocation_p99_ms()).await?;
    // The fleet total covers every agent; the list pages by handle like every other list.
    let after = q.after.clone().unwrap_or_default();
    b.agents.retain(|a| a.handle > after);
    b.agents.truncate(limit);
    let mut out = json!(b);
    // The MCP tools each agent can reach (`server:tool`, `server:*` for a whole server).
    let catalog = catalog.map(|c| c.0).unwrap_or_default();
    if let Some(agents) = out["agents"].as_array_mut() {
        for (a, b) in agents.iter_mut().zip(&b.agents) {
            a["mcp_tools"] = json!(catalog.reachable(&b.scopes));
        }
    }
    Ok(Json(out))
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
