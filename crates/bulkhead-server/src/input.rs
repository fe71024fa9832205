//! Request bodies and their parsing into checked values.
//!
//! Bodies are read as bytes (1 MiB at most), then parsed with unknown and duplicate fields
//! refused. Amounts are taken from their raw JSON text, so `"5.00"` and `5.00` are read exactly
//! and never pass through a float.

use std::collections::BTreeMap;
use std::fmt;

use axum::body::Bytes;
use axum::extract::{FromRequest, Request};
use bulkhead_core::money::AmountError;
use bulkhead_core::ratelimit::RateLimit;
use bulkhead_core::{Handle, Micros, Scope, ScopeSet, Span};
use bulkhead_store::{AgentSpec, BreakerOverride, Patch};
use serde::de::{DeserializeOwned, MapAccess, Visitor};
use serde::{Deserialize, Deserializer};
use serde_json::value::RawValue;
use utoipa::{IntoParams, ToSchema};

use crate::error::ApiError;

/// The largest API body accepted.
pub(crate) const BODY_BYTES_MAX: usize = 1024 * 1024;
/// The longest memo or revocation reason.
pub(crate) const NOTE_LEN_MAX: usize = 1000;
/// The most labels on one agent, and the longest label key or value.
pub(crate) const LABELS_MAX: usize = 64;
pub(crate) const LABEL_LEN_MAX: usize = 256;
/// The longest hold expiry.
pub(crate) const HOLD_EXPIRY_SECS_MAX: i64 = 24 * 3600;
/// The default hold expiry.
pub(crate) const HOLD_EXPIRY_SECS_DEFAULT: i64 = 300;

/// How long a client may take to send an API body (a body trickled slower is refused with 408).
pub const BODY_READ_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(30);

/// The raw bytes of a body within the size limit, read within [`BODY_READ_TIMEOUT`].
pub(crate) struct Body(pub Bytes);

impl<S: Send + Sync> FromRequest<S> for Body {
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &S) -> Result<Self, Self::Rejection> {
        let Ok(read) = tokio::time::timeout(BODY_READ_TIMEOUT, Bytes::from_request(req, state)).await else {
            return Err(ApiError::new(
                408,
                "request_timeout",
                format!("The request body did not arrive within {} seconds.", BODY_READ_TIMEOUT.as_secs()),
            ));
        };
        match read {
            Ok(b) => Ok(Body(b)),
            Err(r) if r.status() == axum::http::StatusCode::PAYLOAD_TOO_LARGE => Err(ApiError::new(
                413,
                "body_too_large",
                format!("The request body is larger than {BODY_BYTES_MAX} bytes."),
            )),
            Err(r) => Err(ApiError::invalid(format!("The request body could not be read: {r}"))),
        }
    }
}

impl Body {
    /// Parses JSON; an empty body parses as `{}`.
    pub(crate) fn json<T: DeserializeOwned>(&self) -> Result<T, ApiError> {
        let bytes: &[u8] = if self.0.iter().all(u8::is_ascii_whitespace) { b"{}" } else { &self.0 };
        // serde's derived structs also accept a JSON array of the fields in order; a body must
        // be an object.
        if bytes.iter().find(|b| !b.is_ascii_whitespace()) != Some(&b'{') {
            return Err(ApiError::invalid("The body must be a JSON object."));
        }
        serde_json::from_slice(bytes)
            .map_err(|e| ApiError::invalid(format!("The body is not valid JSON for this call: {e}")))
    }
}

/// An amount as written in the request: a JSON string or number, kept as raw text.
pub(crate) struct RawAmount(Box<RawValue>);

impl<'de> Deserialize<'de> for RawAmount {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        Box::<RawValue>::deserialize(d).map(RawAmount)
    }
}

/// `AmountInput` in the OpenAPI document: a decimal string or a JSON number.
impl utoipa::PartialSchema for RawAmount {
    fn schema() -> utoipa::openapi::RefOr<utoipa::openapi::schema::Schema> {
        use utoipa::openapi::schema::{ObjectBuilder, SchemaType, Type};
        ObjectBuilder::new()
            .schema_type([Type::String, Type::Number].into_iter().collect::<SchemaType>())
            .description(Some(
                "An amount in the currency's major unit: a decimal string (`\"5.00\"`) or a JSON number, \
                 read exactly from its text; at most 6 decimals, at most 10^12, no exponent.",
            ))
            .examples(["2.50"])
            .into()
    }
}

impl ToSchema for RawAmount {
    fn name() -> std::borrow::Cow<'static, str> {
        "AmountInput".into()
    }
}

impl RawAmount {
    fn text(&self) -> Result<String, AmountError> {
        let raw = self.0.get();
        if raw.starts_with('"') {
            serde_json::from_str::<String>(raw).map_err(|_| AmountError::NotDecimal)
        } else if raw.starts_with(|c: char| c.is_ascii_digit() || c == '-') {
            Ok(raw.to_owned())
        } else {
            Err(AmountError::NotDecimal)
        }
    }

    /// Any amount from 0 up (caps, captures).
    pub(crate) fn parse(&self, field: &str) -> Result<Micros, ApiError> {
        self.text()
            .and_then(|t| Micros::parse(&t))
            .map_err(|e| ApiError::bad("invalid_amount", format!("{field}: {e}.")))
    }

    /// A spend or hold amount: above zero.
    pub(crate) fn parse_positive(&self, field: &str) -> Result<Micros, ApiError> {
        self.text()
            .and_then(|t| Micros::parse_positive(&t))
            .map_err(|e| ApiError::bad("invalid_amount", format!("{field}: {e}.")))
    }
}

/// A JSON object of string labels, refusing duplicate keys.
pub(crate) struct Labels(BTreeMap<String, String>);

impl<'de> Deserialize<'de> for Labels {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = Labels;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("an object of string labels")
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Labels, A::Error> {
                let mut out = BTreeMap::new();
                while let Some((k, v)) = map.next_entry::<String, String>()? {
                    if out.insert(k.clone(), v).is_some() {
                        return Err(serde::de::Error::custom(format!("duplicate label `{k}`")));
                    }
                }
                Ok(Labels(out))
            }
        }
        d.deserialize_map(V)
    }
}

impl Labels {
    fn checked(self) -> Result<serde_json::Map<String, serde_json::Value>, ApiError> {
        if self.0.len() > LABELS_MAX {
            return Err(ApiError::invalid(format!("An agent has at most {LABELS_MAX} labels.")));
        }
        let mut m = serde_json::Map::new();
        for (k, v) in self.0 {
            if k.is_empty() || k.len() > LABEL_LEN_MAX || v.len() > LABEL_LEN_MAX {
                return Err(ApiError::invalid(format!(
                    "Label keys are 1 to {LABEL_LEN_MAX} characters and values at most {LABEL_LEN_MAX}."
                )));
            }
            m.insert(k, serde_json::Value::String(v));
        }
        Ok(m)
    }
}

/// A nested object that must be written as a JSON object (serde's derived structs would also take
/// a JSON array of the fields in order). Duplicate keys inside it are still refused.
pub(crate) struct Obj<T>(pub T);

impl<'de, T: DeserializeOwned> Deserialize<'de> for Obj<T> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let raw = Box::<RawValue>::deserialize(d)?;
        if !raw.get().trim_start().starts_with('{') {
            return Err(serde::de::Error::custom("expected a JSON object"));
        }
        serde_json::from_str(raw.get()).map(Obj).map_err(serde::de::Error::custom)
    }
}

/// `Some(None)` for an explicit `null`, `None` when the field is absent.
fn double_option<'de, D: Deserializer<'de>, T: Deserialize<'de>>(d: D) -> Result<Option<Option<T>>, D::Error> {
    Option::<T>::deserialize(d).map(Some)
}

#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
#[schema(as = RateLimitRequest)]
pub(crate) struct RateLimitReq {
    /// 1 to 1000000.
    requests: i64,
    /// The period, `<n>s|m|h|d`.
    per: String,
}

impl RateLimitReq {
    fn checked(self) -> Result<RateLimit, ApiError> {
        if !(1..=1_000_000).contains(&self.requests) {
            return Err(ApiError::invalid("rate_limit.requests must be between 1 and 1000000."));
        }
        let per = span(&self.per, "rate_limit.per", "invalid_window")?;
        Ok(RateLimit { requests: self.requests, per_ms: per.millis() })
    }
}

/// A per-agent `breaker` object: each field given overrides the config's, each left out follows it.
#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
#[schema(as = BreakerRequest)]
pub(crate) struct BreakerReq {
    denials: Option<i64>,
    window: Option<String>,
    max_requests: Option<i64>,
    rate_window: Option<String>,
    repeats: Option<i64>,
    repeat_window: Option<String>,
}

impl BreakerReq {
    fn checked(self) -> Result<BreakerOverride, ApiError> {
        if self.denials.is_some_and(|d| !(0..=10_000).contains(&d)) {
            return Err(ApiError::invalid("breaker.denials must be between 0 (off) and 10000."));
        }
        bulkhead_core::runaway::check_counts(self.max_requests, self.repeats)
            .map_err(|e| ApiError::invalid(format!("breaker.{e}.")))?;
        let ms = |s: Option<String>, field: &str| {
            s.map(|s| span(&s, field, "invalid_window").map(|w| w.millis())).transpose()
        };
        Ok(BreakerOverride {
            denials: self.denials,
            window_ms: ms(self.window, "breaker.window")?,
            max_requests: self.max_requests,
            rate_window_ms: ms(self.rate_window, "breaker.rate_window")?,
            repeats: self.repeats,
            repeat_window_ms: ms(self.repeat_window, "breaker.repeat_window")?,
        })
    }
}

pub(crate) fn span(s: &str, field: &str, code: &'static str) -> Result<Span, ApiError> {
    Span::parse(s).map_err(|e| ApiError::bad(code, format!("{field}: {e}.")))
}

pub(crate) fn handle(s: &str) -> Result<Handle, ApiError> {
    Handle::parse(s).map_err(|e| ApiError::bad("invalid_handle", format!("{s:?} is not a valid handle: {e}.")))
}

pub(crate) fn scopes(v: &[String]) -> Result<ScopeSet, ApiError> {
    ScopeSet::parse(v).map_err(|e| ApiError::bad("invalid_scope", e))
}

pub(crate) fn scope(s: &str) -> Result<Scope, ApiError> {
    Scope::parse(s).map_err(|e| ApiError::bad("invalid_scope", e))
}

pub(crate) fn note(s: Option<String>, field: &str) -> Result<Option<String>, ApiError> {
    match s {
        Some(s) if s.chars().count() > NOTE_LEN_MAX => {
            Err(ApiError::invalid(format!("{field} has at most {NOTE_LEN_MAX} characters.")))
        }
        other => Ok(other),
    }
}

/// `POST /v1/agents`.
#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
#[schema(as = CreateAgentRequest)]
pub(crate) struct CreateAgentReq {
    /// 1 to 64 of `a-z 0-9 . _ -`, starting with a letter or digit.
    #[schema(examples("invoice-processor-prod-01"))]
    handle: String,
    /// `resource:action` patterns; `*` may stand for a whole segment.
    #[schema(examples(json!(["payments:write", "invoices:read"])))]
    scopes: Vec<String>,
    spending_cap: RawAmount,
    /// The cap's reset period, `<n>s|m|h|d`; default `24h`.
    window: Option<String>,
    /// Default: the spending cap.
    per_tx_limit: Option<RawAmount>,
    /// Default: none.
    lifetime_cap: Option<RawAmount>,
    #[schema(value_type = Option<RateLimitReq>)]
    rate_limit: Option<Obj<RateLimitReq>>,
    /// The key's lifetime, `<n>s|m|h|d`; default: it never expires.
    expires_in: Option<String>,
    /// At most 64 string labels.
    #[schema(value_type = Option<BTreeMap<String, String>>)]
    labels: Option<Labels>,
    /// Overrides of the runaway-loop breaker's config, field by field.
    #[schema(value_type = Option<BreakerReq>)]
    breaker: Option<Obj<BreakerReq>>,
    /// `false`: shadow mode (root agents only), decisions recorded but never enforced.
    enforce: Option<bool>,
}

impl CreateAgentReq {
    pub(crate) fn checked(self) -> Result<AgentSpec, ApiError> {
        Ok(AgentSpec {
            handle: handle(&self.handle)?,
            scopes: scopes(&self.scopes)?,
            spending_cap: self.spending_cap.parse("spending_cap")?,
            window: span(self.window.as_deref().unwrap_or("24h"), "window", "invalid_window")?,
            per_tx_limit: self.per_tx_limit.map(|a| a.parse("per_tx_limit")).transpose()?,
            lifetime_cap: self.lifetime_cap.map(|a| a.parse("lifetime_cap")).transpose()?,
            rate_limit: self.rate_limit.map(|r| r.0.checked()).transpose()?,
            expires_in: self.expires_in.map(|s| span(&s, "expires_in", "invalid_request")).transpose()?,
            labels: self.labels.map(Labels::checked).transpose()?.unwrap_or_default(),
            breaker: self.breaker.map(|b| b.0.checked()).transpose()?,
            enforce: self.enforce.unwrap_or(true),
        })
    }
}

/// `PATCH /v1/agents/{handle}`: each field given replaces the agent's; `null` clears a lifetime
/// cap, rate limit or breaker override.
#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
#[schema(as = PatchAgentRequest)]
pub(crate) struct PatchReq {
    spending_cap: Option<RawAmount>,
    window: Option<String>,
    per_tx_limit: Option<RawAmount>,
    #[serde(default, deserialize_with = "double_option")]
    #[schema(value_type = Option<RawAmount>)]
    lifetime_cap: Option<Option<RawAmount>>,
    scopes: Option<Vec<String>>,
    #[serde(default, deserialize_with = "double_option")]
    #[schema(value_type = Option<RateLimitReq>)]
    rate_limit: Option<Option<Obj<RateLimitReq>>>,
    #[schema(value_type = Option<BTreeMap<String, String>>)]
    labels: Option<Labels>,
    #[serde(default, deserialize_with = "double_option")]
    #[schema(value_type = Option<BreakerReq>)]
    breaker: Option<Option<Obj<BreakerReq>>>,
    enforce: Option<bool>,
}

impl PatchReq {
    pub(crate) fn checked(self) -> Result<Patch, ApiError> {
        Ok(Patch {
            spending_cap: self.spending_cap.map(|a| a.parse("spending_cap")).transpose()?,
            window: self.window.map(|w| span(&w, "window", "invalid_window")).transpose()?,
            per_tx_limit: self.per_tx_limit.map(|a| a.parse("per_tx_limit")).transpose()?,
            lifetime_cap: self.lifetime_cap.map(|o| o.map(|a| a.parse("lifetime_cap")).transpose()).transpose()?,
            scopes: self.scopes.map(|s| scopes(&s)).transpose()?,
            rate_limit: self.rate_limit.map(|o| o.map(|r| r.0.checked()).transpose()).transpose()?,
            labels: self.labels.map(Labels::checked).transpose()?,
            breaker: self.breaker.map(|o| o.map(|b| b.0.checked()).transpose()).transpose()?,
            enforce: self.enforce,
        })
    }
}

/// `POST /v1/spend`.
#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
#[schema(as = SpendRequest)]
pub(crate) struct SpendReq {
    /// The scope the spend is made under; the key must hold it.
    #[schema(examples("payments:write"))]
    pub scope: String,
    /// Above zero.
    pub amount: RawAmount,
    /// At most 1000 characters, kept in the audit trail.
    pub memo: Option<String>,
}

/// `POST /v1/holds`.
#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
#[schema(as = HoldRequest)]
pub(crate) struct HoldReq {
    #[schema(examples("payments:write"))]
    pub scope: String,
    /// Above zero.
    pub amount: RawAmount,
    /// `<n>s|m|h|d`, default `5m`, at most `24h`; an expired hold releases itself.
    pub expires_in: Option<String>,
    pub memo: Option<String>,
}

/// `POST /v1/holds/{id}/capture`.
#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
#[schema(as = CaptureRequest)]
pub(crate) struct CaptureReq {
    /// At most what the hold holds; the rest is released.
    pub amount: RawAmount,
}

/// No fields: an empty body or `{}`.
#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
#[schema(as = EmptyRequest)]
pub(crate) struct EmptyReq {}

/// `POST /v1/agents/{handle}/revoke` and `…/suspend`.
#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
#[schema(as = RevokeRequest)]
pub(crate) struct RevokeReq {
    /// At most 1000 characters, kept in the audit trail.
    pub reason: Option<String>,
}

/// A query string parsed into `T`, with rejections in the contract's error shape.
#[derive(axum::extract::FromRequestParts)]
#[from_request(via(axum::extract::Query), rejection(ApiError))]
pub(crate) struct Q<T>(pub T);

/// A path parameter, with rejections in the contract's error shape.
#[derive(axum::extract::FromRequestParts)]
#[from_request(via(axum::extract::Path), rejection(ApiError))]
pub(crate) struct P<T>(pub T);

/// `?limit=&after=` of every list.
#[derive(Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub(crate) struct PageQuery {
    /// The most items to return: default 100; larger values are clamped to 1000.
    #[param(value_type = Option<u32>)]
    pub limit: Option<String>,
    /// Return the items after this one: the last `seq` seen (audit events), handle (agents, blast
    /// radius) or alert id (alerts).
    pub after: Option<String>,
}

/// The largest page any list returns.
pub(crate) const PAGE_LIMIT_MAX: i64 = 1000;

impl PageQuery {
    pub(crate) fn limit(&self) -> Result<i64, ApiError> {
        match &self.limit {
            None => Ok(100),
            Some(s) => {
                let digits = s.bytes().all(|b| b.is_ascii_digit()) && !s.is_empty();
                if !digits {
                    return Err(ApiError::invalid("limit must be a positive whole number."));
                }
                // Larger values are clamped, never rejected (contract §4).
                Ok(s.parse::<i64>().unwrap_or(PAGE_LIMIT_MAX).clamp(1, PAGE_LIMIT_MAX))
            }
        }
    }

    pub(crate) fn after_seq(&self) -> Result<i64, ApiError> {
        match &self.after {
            None => Ok(0),
            Some(s) => s.parse::<i64>().map_err(|_| ApiError::invalid("after must be the seq of the last event seen.")),
        }
    }
}
