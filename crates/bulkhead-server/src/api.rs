//! Routes and handlers. `app(state)` is the whole HTTP surface; tests drive it in-process with
//! `tower::ServiceExt::oneshot` and through real sockets.
//!
//! Here: the state, the router and its one route table (`api_routes`), the middleware and
//! fallbacks, and what handlers share (who is calling, `admin`, [`MoneyKey`], `idem`). The
//! handlers: `agents.rs` (the admin API over agents, the blast radius), `money.rs` (the agent's
//! money calls and `/v1/me`), `health.rs` (`/healthz`, `/metrics`); `history.rs` (the console's
//! reads) beside this file.

mod agents;
mod health;
mod money;

use std::sync::Arc;

use axum::extract::{DefaultBodyLimit, State};
use axum::http::{HeaderMap, Method, header};
use axum::response::{IntoResponse, Response};
use axum::{Extension, Router};
use bulkhead_core::key::secret_eq;
use bulkhead_core::{ApiKey, KeyHash};
use bulkhead_store::{Idem, Ledger, Store};
use metrics_exporter_prometheus::PrometheusHandle;
use sha2::{Digest, Sha256};
use utoipa::OpenApi;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use crate::auth::{agent_key, bearer};
use crate::error::ApiError;
use crate::input::BODY_BYTES_MAX;
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
        .routes(routes!(health::healthz))
        .routes(routes!(health::metrics))
        .routes(routes!(openapi_json))
        .routes(routes!(agents::create_agent, agents::list_agents))
        .routes(routes!(agents::get_agent, agents::patch_agent))
        .routes(routes!(agents::revoke))
        .routes(routes!(agents::rotate_key))
        .routes(routes!(agents::suspend))
        .routes(routes!(agents::resume))
        .routes(routes!(agents::agent_audit))
        .routes(routes!(money::spend))
        .routes(routes!(money::hold))
        .routes(routes!(money::capture))
        .routes(routes!(money::release))
        .routes(routes!(agents::blast_radius))
        .routes(routes!(money::me))
        .routes(routes!(money::me_audit))
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
