//! Admin reads over history, for the web console and any operator tooling: an agent's usage
//! over time in buckets, the fleet's audit trail (filtered, either direction) and recent alerts.
//! Every one is admin-only and bounded: at most [`PAGE_LIMIT_MAX`] rows or buckets per answer.

use axum::Json;
use axum::extract::State;
use axum::http::HeaderMap;
use bulkhead_core::Span;
use bulkhead_store::AuditQuery;
use serde::Deserialize;
use time::OffsetDateTime;
use time::format_description::well_known::Rfc3339;

use crate::api::{AppState, admin};
use crate::bodies::{AlertList, AuditSearch, UsageSeries};
use crate::error::ApiError;
use crate::input::{P, PAGE_LIMIT_MAX, PageQuery, Q};
use crate::openapi::{InternalError, InvalidRequest, NotFound, StoreUnavailable, Unauthorized};

/// The shortest usage bucket.
pub(crate) const USAGE_BUCKET_SECS_MIN: i64 = 60;
/// The longest usage bucket.
pub(crate) const USAGE_BUCKET_SECS_MAX: i64 = 30 * 86_400;
/// Buckets returned when `limit` is not given.
pub(crate) const USAGE_BUCKETS_DEFAULT: i64 = 48;

/// `?bucket=1h&limit=48&until=RFC3339`
#[derive(Deserialize, utoipa::IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub(crate) struct UsageQuery {
    /// The bucket length, `<n>s|m|h|d`, from 1m to 30d; default `1h`.
    bucket: Option<String>,
    /// How many buckets: default 48, clamped to 1000.
    #[param(value_type = Option<u32>)]
    limit: Option<String>,
    /// The end of the last bucket, RFC 3339; default now.
    #[param(format = DateTime)]
    until: Option<String>,
}

/// An agent's usage over time.
///
/// The last `limit` buckets up to `until` (default now), aligned to multiples of their length
/// since the Unix epoch: what the agent and its descendants spent, and their decisions.
#[utoipa::path(
    get,
    path = "/v1/agents/{handle}/usage",
    tag = "audit",
    security(("admin_token" = [])),
    params(("handle" = String, Path, description = "The agent's handle."), UsageQuery),
    responses(
        (status = 200, description = "The buckets, oldest first.", body = UsageSeries),
        (status = 400, response = InvalidRequest),
        (status = 401, response = Unauthorized),
        (status = 404, response = NotFound),
        (status = 500, response = InternalError),
        (status = 503, response = StoreUnavailable),
    )
)]
pub(crate) async fn usage(
    State(state): State<AppState>,
    headers: HeaderMap,
    P(handle): P<String>,
    Q(q): Q<UsageQuery>,
) -> Result<Json<UsageSeries>, ApiError> {
    admin(&state, &headers)?;
    let bucket = match &q.bucket {
        None => Span::from_secs(3600).ok_or_else(|| ApiError::invalid("bad default bucket"))?,
        Some(b) => crate::input::span(b, "bucket", "invalid_request")?,
    };
    if !(USAGE_BUCKET_SECS_MIN..=USAGE_BUCKET_SECS_MAX).contains(&bucket.secs()) {
        return Err(ApiError::invalid("bucket must be between 1m and 30d."));
    }
    let limit = match &q.limit {
        None => USAGE_BUCKETS_DEFAULT,
        some => PageQuery { limit: some.clone(), after: None }.limit()?,
    };
    let until = match &q.until {
        None => state.ledger.now_ms(),
        Some(t) => {
            let t =
                OffsetDateTime::parse(t, &Rfc3339).map_err(|_| ApiError::invalid("until must be an RFC 3339 time."))?;
            i64::try_from(t.unix_timestamp_nanos() / 1_000_000)
                .map_err(|_| ApiError::invalid("until is out of range."))?
        }
    };
    let buckets = state
        .store()
        .usage_buckets(&handle, bucket.millis(), limit, until)
        .await?
        .ok_or_else(|| ApiError::not_found("No agent with that handle exists."))?;
    Ok(Json(UsageSeries { agent: handle, bucket: bucket.to_string(), buckets }))
}

/// `?agent=&outcome=&action=&by=&after=&before=&limit=`
#[derive(Deserialize, utoipa::IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub(crate) struct AuditParams {
    /// Only this agent's events.
    agent: Option<String>,
    /// `allowed` or `denied`.
    #[param(inline, value_type = Option<OutcomeFilter>)]
    outcome: Option<String>,
    /// Only this action (`spend`, `hold`, `capture`, `agent.create`, …).
    action: Option<String>,
    /// Only events made by this caller (`gateway`: the gateway's calls).
    by: Option<String>,
    /// Events after this `seq`, oldest first.
    #[param(value_type = Option<u64>)]
    after: Option<String>,
    /// Events before this `seq`, newest first (any seq above `head` for the newest).
    #[param(value_type = Option<u64>)]
    before: Option<String>,
    /// The most events to return: default 100, clamped to 1000.
    #[param(value_type = Option<u32>)]
    limit: Option<String>,
}

/// The values of the `outcome` filter.
#[derive(utoipa::ToSchema)]
#[schema(rename_all = "snake_case")]
#[allow(dead_code)] // Only its schema is used: the filter is read as a string.
enum OutcomeFilter {
    Allowed,
    Denied,
}

fn seq(s: &Option<String>, field: &str) -> Result<Option<i64>, ApiError> {
    s.as_deref()
        .map(|v| {
            v.parse::<i64>()
                .ok()
                .filter(|n| *n >= 0)
                .ok_or_else(|| ApiError::invalid(format!("{field} must be a seq.")))
        })
        .transpose()
}

fn word(s: &Option<String>, field: &str, extra: &[u8]) -> Result<Option<String>, ApiError> {
    match s.as_deref() {
        None => Ok(None),
        Some(v)
            if (1..=64).contains(&v.len())
                && v.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || extra.contains(&b)) =>
        {
            Ok(Some(v.to_owned()))
        }
        Some(_) => Err(ApiError::invalid(format!("{field} is not a valid {field}."))),
    }
}

/// The fleet's audit trail, filtered.
///
/// With `before`, newest first (pass any seq above `head` for the newest events); otherwise in
/// order after `after`. `head` is the newest seq.
#[utoipa::path(
    get,
    path = "/v1/audit",
    tag = "audit",
    security(("admin_token" = [])),
    params(AuditParams),
    responses(
        (status = 200, description = "The events and the chain's head.", body = AuditSearch),
        (status = 400, response = InvalidRequest),
        (status = 401, response = Unauthorized),
        (status = 500, response = InternalError),
        (status = 503, response = StoreUnavailable),
    )
)]
pub(crate) async fn audit(
    State(state): State<AppState>,
    headers: HeaderMap,
    Q(p): Q<AuditParams>,
) -> Result<Json<AuditSearch>, ApiError> {
    admin(&state, &headers)?;
    let agent = p.agent.as_deref().map(|a| crate::input::handle(a).map(|h| h.as_str().to_owned())).transpose()?;
    let outcome = match p.outcome.as_deref() {
        None => None,
        Some(o @ ("allowed" | "denied")) => Some(o.to_owned()),
        Some(_) => return Err(ApiError::invalid("outcome is allowed or denied.")),
    };
    let q = AuditQuery {
        agent,
        outcome,
        action: word(&p.action, "action", b"._")?,
        by: word(&p.by, "by", b"_")?,
        after: seq(&p.after, "after")?.unwrap_or(0),
        before: seq(&p.before, "before")?,
        limit: PageQuery { limit: p.limit, after: None }.limit()?,
    };
    let head = state.store().audit_head_seq().await?;
    let events = state.store().audit_search(&q).await?;
    Ok(Json(AuditSearch { events, head }))
}

/// Recent alerts.
///
/// Alerts raised (with `[alerts]` webhooks configured), newest first, with how far their delivery
/// got; `after` is the id of the last alert seen.
#[utoipa::path(
    get,
    path = "/v1/alerts",
    tag = "monitoring",
    security(("admin_token" = [])),
    params(PageQuery),
    responses(
        (status = 200, description = "The alerts, newest first.", body = AlertList),
        (status = 400, response = InvalidRequest),
        (status = 401, response = Unauthorized),
        (status = 500, response = InternalError),
        (status = 503, response = StoreUnavailable),
    )
)]
pub(crate) async fn alerts(
    State(state): State<AppState>,
    headers: HeaderMap,
    Q(q): Q<PageQuery>,
) -> Result<Json<AlertList>, ApiError> {
    admin(&state, &headers)?;
    let limit = q.limit()?.min(PAGE_LIMIT_MAX);
    let alerts = state.store().recent_alerts(q.after.as_deref(), limit).await?;
    Ok(Json(AlertList { alerts }))
}
