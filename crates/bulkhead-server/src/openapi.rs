//! The OpenAPI 3.1 document of the JSON API, served at `GET /openapi.json`.
//!
//! Nothing here is written by hand that the code already knows: each operation comes from the
//! `#[utoipa::path]` on its handler, registered in `api::api_routes` with the same call that gives
//! the router its route (so a route cannot exist undocumented, nor a documented one unrouted), and
//! every schema from the type the handler renders its answer with (`bodies.rs`, the store's
//! public shapes, `ErrorBody`). This module adds what is the API's as a whole: `info`, the two
//! security schemes, and the error answers that many operations share.

use utoipa::openapi::header::HeaderBuilder;
use utoipa::openapi::response::ResponseBuilder;
use utoipa::openapi::schema::{ObjectBuilder, Type};
use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityScheme};
use utoipa::openapi::{ContentBuilder, Ref, RefOr, Response};
use utoipa::{Modify, OpenApi, ToResponse, ToSchema};

use crate::error::ErrorBody;

/// The name of the admin token's security scheme.
pub(crate) const ADMIN_TOKEN: &str = "admin_token";
/// The name of the agent key's security scheme.
pub(crate) const AGENT_KEY: &str = "agent_key";

const DESCRIPTION: &str = "\
Bulkhead gives every AI agent its own key, spending caps, scopes, revocation and audit trail.

Two credentials, both sent as `Authorization: Bearer …`: the **admin token** (`admin_token`) for \
managing agents and reading the fleet, and an **agent key** (`agent_key`, `bk_…`) for an agent's \
own calls. Each operation names the ones it takes.

Amounts travel as decimal strings in the currency's major unit (`\"5.00\"`, `\"0.000150\"`, at \
most 6 decimals); requests may also send JSON numbers, read exactly from their text. Times are RFC \
3339. Lists page with `limit` (default 100, clamped to 1000) and `after`.

Every non-2xx answer has the body `Error`: `{\"error\": {\"code\", \"message\"}}`. Checks run in this \
order and the first that fails answers: credentials (401), suspension and scope (403), rate limit \
(429), limits (402). Any route not listed here answers 404 `not_found`, and a listed route asked \
with a method it does not take answers 405 `method_not_allowed`.

Not described here: the agent gateway `ANY /proxy/{upstream}/{path}` (it forwards to the \
configured upstream with the agent's key checked and its cost held; its own refusals use the \
`Error` body), the MCP gateway under `/mcp/`, and the web console under `/console`.";

/// The document's fixed parts; the operations and their schemas are added by the router.
#[derive(OpenApi)]
#[openapi(
    info(title = "Bulkhead", description = DESCRIPTION, license(name = "Apache-2.0")),
    modifiers(&Security),
    components(
        schemas(ErrorBody),
        responses(
            InvalidRequest,
            Unauthorized,
            LimitExceeded,
            Forbidden,
            NotFound,
            RequestTimeout,
            Conflict,
            BodyTooLarge,
            IdempotencyKeyReused,
            RateLimited,
            InternalError,
            StoreUnavailable
        )
    ),
    tags(
        (name = "agents", description = "Create, read, change, suspend, resume and revoke agents (contract §4)."),
        (name = "spending", description = "An agent's own spends and holds (contract §5)."),
        (name = "audit", description = "The hash-chained audit trail and history (contract §6)."),
        (name = "monitoring", description = "Health, metrics, blast radius and alerts (contract §1, §7)."),
        (name = "meta", description = "This document.")
    )
)]
pub(crate) struct ApiDoc;

/// The document as JSON, with what utoipa cannot say about optional inputs: an optional request
/// body (`Option<T>` in `request_body`) may be left out but is never a JSON `null` (the server
/// takes an object or nothing), and an optional header is absent, not null.
pub(crate) fn to_json(doc: &utoipa::openapi::OpenApi) -> serde_json::Value {
    let mut v = serde_json::to_value(doc).unwrap_or_default();
    for item in v.get_mut("paths").and_then(|p| p.as_object_mut()).into_iter().flat_map(|p| p.values_mut()) {
        for op in item.as_object_mut().into_iter().flat_map(|i| i.values_mut()) {
            if let Some(schema) = op.pointer_mut("/requestBody/content/application~1json/schema") {
                not_null(schema);
            }
            for p in op.get_mut("parameters").and_then(|p| p.as_array_mut()).into_iter().flatten() {
                if p["in"] == "header" {
                    not_null(&mut p["schema"]);
                }
            }
        }
    }
    v
}

/// `{"oneOf": [X, {"type": "null"}]}` → `X`; `{"type": [T, "null"]}` → `{"type": T}`.
fn not_null(schema: &mut serde_json::Value) {
    let null = serde_json::json!({"type": "null"});
    if let Some(one_of) = schema.get("oneOf").and_then(|o| o.as_array())
        && one_of.len() == 2
        && one_of.contains(&null)
        && let Some(other) = one_of.iter().find(|s| **s != null).cloned()
    {
        *schema = other;
    }
    if let Some(types) = schema.get_mut("type").and_then(|t| t.as_array_mut()) {
        types.retain(|t| t != "null");
        if types.len() == 1 {
            schema["type"] = types[0].clone();
        }
    }
}

/// The two bearer credentials.
struct Security;

impl Modify for Security {
    fn modify(&self, doc: &mut utoipa::openapi::OpenApi) {
        let components = doc.components.get_or_insert_with(Default::default);
        components.add_security_scheme(
            ADMIN_TOKEN,
            SecurityScheme::Http(
                HttpBuilder::new()
                    .scheme(HttpAuthScheme::Bearer)
                    .description(Some(
                        "The admin token (`BULKHEAD_ADMIN_TOKEN`, or the one the first start wrote to \
                         `DIR/admin-token`).",
                    ))
                    .build(),
            ),
        );
        components.add_security_scheme(
            AGENT_KEY,
            SecurityScheme::Http(
                HttpBuilder::new()
                    .scheme(HttpAuthScheme::Bearer)
                    .bearer_format("bk_…")
                    .description(Some("An agent's own key, `bk_` + base62, shown once when it is made."))
                    .build(),
            ),
        );
    }
}

/// An error answer with the `Error` body, optionally with a `Retry-After` header.
fn error_response(description: &str, retry_after: bool) -> RefOr<Response> {
    let content = ContentBuilder::new().schema(Some(Ref::from_schema_name(ErrorBody::name()))).build();
    let mut r = ResponseBuilder::new().description(description).content("application/json", content);
    if retry_after {
        r = r.header(
            "Retry-After",
            HeaderBuilder::new()
                .schema(Some(ObjectBuilder::new().schema_type(Type::Integer).minimum(Some(0))))
                .description(Some("Seconds to wait before retrying."))
                .build(),
        );
    }
    r.build().into()
}

/// The error answers operations share, each a `components.responses` entry named after its type
/// and referred to as `(status = …, response = Type)` in the operations.
macro_rules! error_responses {
    ($($(#[$doc:meta])* $name:ident = $description:literal, retry_after: $retry:literal;)*) => {$(
        $(#[$doc])*
        pub(crate) struct $name;

        impl<'r> ToResponse<'r> for $name {
            fn response() -> (&'r str, RefOr<Response>) {
                (stringify!($name), error_response($description, $retry))
            }
        }
    )*};
}

error_responses! {
    /// 400.
    InvalidRequest = "Malformed input: `invalid_request` (the body, query or path; also duplicate \
        JSON keys and unknown fields), `invalid_amount`, `invalid_scope`, `invalid_handle`, \
        `invalid_window`.", retry_after: false;
    /// 401.
    Unauthorized = "`invalid_credentials` (missing, malformed or unknown key or token, or the \
        wrong one of the two), `credential_revoked`, `credential_expired`.", retry_after: false;
    /// 402.
    LimitExceeded = "The spend or hold would break a limit; nothing was charged: \
        `per_tx_limit_exceeded`, `spending_cap_exceeded`, `lifetime_cap_exceeded`, \
        `ancestor_cap_exceeded`. The body adds `remaining` and `window_resets_at` beside `error`; \
        a window cap's denial sets `Retry-After` (seconds until the window resets).", retry_after: true;
    /// 403.
    Forbidden = "`agent_suspended`, `scope_not_granted`; for a child, `scope_escalation` or \
        `cap_escalation`.", retry_after: false;
    /// 404.
    NotFound = "`not_found`: no such agent or hold, or not the caller's.", retry_after: false;
    /// 408.
    RequestTimeout = "`request_timeout`: the body did not arrive within 30 seconds.", retry_after: false;
    /// 409.
    Conflict = "`handle_taken`, `hold_closed` (already captured, released or expired), \
        `agent_revoked` (a revoked agent cannot get a key, be suspended or be resumed), \
        `too_many_open_holds` (the agent has as many open holds as it may: 1,000 by default).", retry_after: false;
    /// 413.
    BodyTooLarge = "`body_too_large`: the body is over 1 MiB.", retry_after: false;
    /// 422.
    IdempotencyKeyReused = "`idempotency_key_reused`: this `Idempotency-Key` came before with a \
        different request.", retry_after: false;
    /// 429.
    RateLimited = "`rate_limited`: the agent's request rate limit.", retry_after: true;
    /// 500.
    InternalError = "`internal_error`: a broken invariant; nothing was charged.", retry_after: false;
    /// 503.
    StoreUnavailable = "`store_unavailable`: the store could not be reached; retry shortly.", retry_after: true;
}
