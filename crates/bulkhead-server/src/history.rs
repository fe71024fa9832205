//! Admin reads over history, for the web console and any operator tooling: an agent's usage
//! over time in buckets, the fleet's audit trail (filtered, either direction) and recent alerts.
//! Every one is admin-only and bounded: at most [`PAGE_LIMIT_MAX`] rows or buckets per answer.

use axum::Json;
use axum::extract::State;
use axum::http::HeaderMap;
use bulkhead_core::Span;
use bulkhead_store::AuditQuery;
use serde::Deserialize;
use serde_json::{Value, json};
use time::OffsetDateTime;
use time::format_description::well_known::Rfc3339;

use crate::api::{AppState, admin};
use crate::error::ApiError;
use crate::input::{P, PAGE_LIMIT_MAX, PageQuery, Q};

/// The shortest usage bucket.
pub const USAGE_BUCKET_SECS_MIN: i64 = 60;
/// The longest usage bucket.
pub const USAGE_BUCKET_SECS_MAX: i64 = 30 * 86_400;
/// Buckets returned when `limit` is not given.
pub const USAGE_BUCKETS_DEFAULT: i64 = 48;

/// `?bucket=1h&limit=48&until=RFC3339`
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UsageQuery {
    bucket: Option<String>,
    limit: Option<String>,
    until: Option<String>,
}

/// `GET /v1/agents/{handle}/usage`: the last `limit` buckets up to `until` (default now).
pub async fn usage(
    State(state): State<AppState>,
    headers: HeaderMap,
    P(handle): P<String>,
    Q(q): Q<UsageQuery>,
) -> Result<Json<Value>, ApiError> {
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
    Ok(Json(json!({"agent": handle, "bucket": bucket.to_string(), "buckets": buckets})))
}

/// `?agent=&outcome=&action=&by=&after=&before=&limit=`
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AuditParams {
    agent: Option<String>,
    outcome: Option<String>,
    action: Option<String>,
    by: Option<String>,
    after: Option<String>,
    before: Option<String>,
    limit: Option<String>,
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

/// `GET /v1/audit`: the fleet's audit trail. With `before`, newest first (pass any seq above
/// `head` for the newest events); otherwise in order after `after`. `head` is the newest seq.
pub async fn audit(
    State(state): State<AppState>,
    headers: HeaderMap,
    Q(p): Q<AuditParams>,
) -> Result<Json<Value>, ApiError> {
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
    Ok(Json(json!({"events": events, "head": head})))
}

/// `GET /v1/alerts`: alerts raised (with `[alerts]` webhooks configured), newest first; `after`
/// is the id of the last alert seen.
pub async fn alerts(
    State(state): State<AppState>,
    headers: HeaderMap,
    Q(q): Q<PageQuery>,
) -> Result<Json<Value>, ApiError> {
    admin(&state, &headers)?;
    let limit = q.limit()?.min(PAGE_LIMIT_MAX);
    let alerts = state.store().recent_alerts(q.after.as_deref(), limit).await?;
    Ok(Json(json!({"alerts": alerts})))
}
