//! Stored rows and the public shapes they are rendered into.

use crate::format::{fmt_time, micros, span_text};
use bulkhead_core::decision::{AgentLimits, ChainMember, Counters};
use bulkhead_core::duration::window_at;
use bulkhead_core::ratelimit::RateLimit;
use bulkhead_core::runaway::{Breaker, BreakerOverride};
use bulkhead_core::{Micros, ScopeSet, Span};
use serde::Serialize;
use sqlx::Arguments;
use sqlx::any::AnyArguments;
use sqlx::error::BoxDynError;

/// One row of `agents`, as stored.
#[derive(Clone, Debug, sqlx::FromRow)]
pub(crate) struct AgentRow {
    pub id: i64,
    pub handle: String,
    pub parent_id: Option<i64>,
    pub root_id: i64,
    pub path: String,
    pub depth: i64,
    #[sqlx(try_from = "String")]
    pub status: AgentStatus,
    pub key_hash: String,
    pub key_expires_at: Option<i64>,
    pub scopes: String,
    pub spending_cap: i64,
    pub window_ms: i64,
    pub per_tx_limit: i64,
    pub lifetime_cap: Option<i64>,
    pub rate_requests: Option<i64>,
    pub rate_per_ms: Option<i64>,
    pub rate_tat: i64,
    pub breaker_denials: Option<i64>,
    pub breaker_window_ms: Option<i64>,
    /// Times (ms) of the agent's recent denials that feed the breaker, comma-separated, oldest
    /// first; at most `denials` of them.
    pub breaker_recent: String,
    /// Per-agent overrides of the optional triggers (NULL: the config's value).
    pub breaker_max_requests: Option<i64>,
    pub breaker_rate_window_ms: Option<i64>,
    pub breaker_repeats: Option<i64>,
    pub breaker_repeat_window_ms: Option<i64>,
    /// The request-rate trigger's GCRA TAT, in microseconds (0: empty bucket).
    pub breaker_rate_tat_us: i64,
    /// The repeat trigger: the last request's fingerprint, its run length and the run's start.
    pub breaker_repeat_hash: String,
    pub breaker_repeat_count: i64,
    pub breaker_repeat_since: i64,
    /// The window in which a cap_reached alert was last raised (-1: never).
    pub cap_alerted_window: i64,
    /// 1 enforces decisions; 0 is shadow mode (decisions recorded, never enforced).
    pub enforce: i64,
    pub labels: String,
    pub created_at: i64,
    pub revoked_at: Option<i64>,
    pub revoke_reason: Option<String>,
    pub suspended_at: Option<i64>,
    pub window_index: i64,
    pub window_spent: i64,
    pub held: i64,
    pub lifetime_spent: i64,
    pub tx_count: i64,
    pub denied_count: i64,
}

/// An agent's status, as stored in `agents.status`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum AgentStatus {
    Active,
    /// By an operator or by the breaker, until resumed.
    Suspended,
    /// For good, with its subtree.
    Revoked,
}

impl AgentStatus {
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            AgentStatus::Active => "active",
            AgentStatus::Suspended => "suspended",
            AgentStatus::Revoked => "revoked",
        }
    }
}

impl TryFrom<String> for AgentStatus {
    type Error = String;

    fn try_from(s: String) -> Result<AgentStatus, String> {
        match s.as_str() {
            "active" => Ok(AgentStatus::Active),
            "suspended" => Ok(AgentStatus::Suspended),
            "revoked" => Ok(AgentStatus::Revoked),
            _ => Err(format!("unknown agent status {s:?}")),
        }
    }
}

/// A value of the agent row bound to a generated statement.
trait Bind {
    fn bind(&self, args: &mut AnyArguments) -> Result<(), BoxDynError>;
}

impl Bind for i64 {
    fn bind(&self, args: &mut AnyArguments) -> Result<(), BoxDynError> {
        args.add(*self)
    }
}

impl Bind for Option<i64> {
    fn bind(&self, args: &mut AnyArguments) -> Result<(), BoxDynError> {
        args.add(*self)
    }
}

impl Bind for String {
    fn bind(&self, args: &mut AnyArguments) -> Result<(), BoxDynError> {
        args.add(self.clone())
    }
}

impl Bind for Option<String> {
    fn bind(&self, args: &mut AnyArguments) -> Result<(), BoxDynError> {
        args.add(self.clone())
    }
}

impl Bind for AgentStatus {
    fn bind(&self, args: &mut AnyArguments) -> Result<(), BoxDynError> {
        args.add(self.as_str().to_owned())
    }
}

/// The columns of `agents`, stated once. From this list come [`AGENT_COLUMNS`] (every column,
/// for each `SELECT`), [`AGENT_WRITTEN`] with [`AgentRow::bind_written`] (the columns a batch
/// writes back, with the SQL types a `VALUES` list needs, in one order) and
/// [`AGENT_INSERTED`] with [`AgentRow::bind_inserted`] (every column but the generated `id`).
/// A column is *fixed* when it never changes after the agent is created.
macro_rules! agent_columns {
    (fixed: [$($fixed:ident),* $(,)?], written: [$($col:ident: $ty:literal),* $(,)?] $(,)?) => {
        /// Every column of `agents`, for `SELECT`.
        pub(crate) const AGENT_COLUMNS: &str =
            concat!("id" $(, ", ", stringify!($fixed))* $(, ", ", stringify!($col))*);
        /// The columns a batch writes back, with their SQL types, in [`AgentRow::bind_written`]'s order.
        pub(crate) const AGENT_WRITTEN: &[(&str, &str)] = &[$((stringify!($col), $ty)),*];
        /// The columns of a new agent, in [`AgentRow::bind_inserted`]'s order.
        pub(crate) const AGENT_INSERTED: &[&str] = &[$(stringify!($fixed),)* $(stringify!($col)),*];

        impl AgentRow {
            /// Binds the [`AGENT_WRITTEN`] columns of this row, in their order.
            pub(crate) fn bind_written(&self, args: &mut AnyArguments) -> Result<(), BoxDynError> {
                $( Bind::bind(&self.$col, args)?; )*
                Ok(())
            }

            /// Binds the [`AGENT_INSERTED`] columns of this row, in their order.
            pub(crate) fn bind_inserted(&self, args: &mut AnyArguments) -> Result<(), BoxDynError> {
                $( Bind::bind(&self.$fixed, args)?; )*
                self.bind_written(args)
            }
        }
    };
}

agent_columns! {
    fixed: [handle, parent_id, depth, created_at],
    written: [
        status: "TEXT",
        key_hash: "TEXT",
        key_expires_at: "BIGINT",
        scopes: "TEXT",
        spending_cap: "BIGINT",
        window_ms: "BIGINT",
        per_tx_limit: "BIGINT",
        lifetime_cap: "BIGINT",
        rate_requests: "BIGINT",
        rate_per_ms: "BIGINT",
        rate_tat: "BIGINT",
        breaker_denials: "BIGINT",
        breaker_window_ms: "BIGINT",
        breaker_recent: "TEXT",
        breaker_max_requests: "BIGINT",
        breaker_rate_window_ms: "BIGINT",
        breaker_repeats: "BIGINT",
        breaker_repeat_window_ms: "BIGINT",
        breaker_rate_tat_us: "BIGINT",
        breaker_repeat_hash: "TEXT",
        breaker_repeat_count: "BIGINT",
        breaker_repeat_since: "BIGINT",
        labels: "TEXT",
        revoked_at: "BIGINT",
        revoke_reason: "TEXT",
        suspended_at: "BIGINT",
        window_index: "BIGINT",
        window_spent: "BIGINT",
        held: "BIGINT",
        lifetime_spent: "BIGINT",
        tx_count: "BIGINT",
        denied_count: "BIGINT",
        root_id: "BIGINT",
        path: "TEXT",
        cap_alerted_window: "BIGINT",
        enforce: "BIGINT",
    ],
}

impl AgentRow {
    pub(crate) fn limits(&self) -> AgentLimits {
        AgentLimits {
            spending_cap: micros(self.spending_cap),
            window_ms: self.window_ms.max(1),
            per_tx_limit: micros(self.per_tx_limit),
            lifetime_cap: self.lifetime_cap.map(micros),
            created_ms: self.created_at,
        }
    }

    pub(crate) fn counters(&self) -> Counters {
        Counters {
            window_index: self.window_index,
            window_spent: micros(self.window_spent),
            held: micros(self.held),
            lifetime_spent: micros(self.lifetime_spent),
        }
    }

    pub(crate) fn set_counters(&mut self, c: Counters) {
        self.window_index = c.window_index;
        self.window_spent = c.window_spent.micros();
        self.held = c.held.micros();
        self.lifetime_spent = c.lifetime_spent.micros();
    }

    pub(crate) fn member(&self, now_ms: i64) -> ChainMember {
        let limits = self.limits();
        let counters = self.counters().at(&limits, now_ms);
        ChainMember { limits, counters }
    }

    pub(crate) fn scope_set(&self) -> ScopeSet {
        let v: Vec<&str> = self.scopes.split(' ').filter(|s| !s.is_empty()).collect();
        ScopeSet::parse(&v).unwrap_or_default()
    }

    /// This agent's per-agent breaker settings (`None` fields: the config's).
    pub(crate) fn breaker_override(&self) -> Option<BreakerOverride> {
        let o = BreakerOverride {
            denials: self.breaker_denials,
            window_ms: self.breaker_window_ms,
            max_requests: self.breaker_max_requests,
            rate_window_ms: self.breaker_rate_window_ms,
            repeats: self.breaker_repeats,
            repeat_window_ms: self.breaker_repeat_window_ms,
        };
        (o != BreakerOverride::default()).then_some(o)
    }

    pub(crate) fn set_breaker_override(&mut self, o: Option<BreakerOverride>) {
        let o = o.unwrap_or_default();
        self.breaker_denials = o.denials;
        self.breaker_window_ms = o.window_ms;
        self.breaker_max_requests = o.max_requests;
        self.breaker_rate_window_ms = o.rate_window_ms;
        self.breaker_repeats = o.repeats;
        self.breaker_repeat_window_ms = o.repeat_window_ms;
    }

    /// The breaker settings in force for this agent: its overrides over `default`.
    pub(crate) fn breaker(&self, default: Breaker) -> Breaker {
        self.breaker_override().map_or(default, |o| o.over(default))
    }

    /// Forgets the state of every breaker trigger (on suspension and on resume).
    pub(crate) fn clear_breaker_state(&mut self) {
        self.breaker_recent.clear();
        self.breaker_rate_tat_us = 0;
        self.breaker_repeat_hash.clear();
        self.breaker_repeat_count = 0;
        self.breaker_repeat_since = 0;
    }

    pub(crate) fn rate_limit(&self) -> Option<RateLimit> {
        match (self.rate_requests, self.rate_per_ms) {
            (Some(requests), Some(per_ms)) => Some(RateLimit { requests, per_ms }),
            _ => None,
        }
    }

    /// Ids from the root down to this agent, parsed from `path` (",1,5,9,").
    pub(crate) fn path_ids(&self) -> Vec<i64> {
        self.path.split(',').filter_map(|s| s.parse().ok()).collect()
    }

    /// Renders the public agent object, as the sweeper will leave it: `swept` is what the holds
    /// past their expiry but not yet swept come to.
    pub(crate) fn view(&self, parent: Option<String>, swept: Swept, now_ms: i64) -> AgentView {
        let mut m = self.member(now_ms);
        let held = micros(self.held - swept.held);
        let captured = micros(swept.captured);
        m.counters.window_spent = m.counters.window_spent.checked_add(captured).unwrap_or(Micros::MAX);
        m.counters.lifetime_spent = m.counters.lifetime_spent.checked_add(captured).unwrap_or(Micros::MAX);
        let (_, start, end) = window_at(self.created_at, self.window_ms.max(1), now_ms);
        // A zero cap with something used shows as full.
        let utilization =
            bulkhead_core::utilization(m.counters.window_spent, held, m.limits.spending_cap).unwrap_or(1.0);
        AgentView {
            handle: self.handle.clone(),
            parent,
            status: self.status.as_str().to_owned(),
            scopes: self.scope_set().to_strings(),
            spending_cap: m.limits.spending_cap,
            window: Span::from_secs(self.window_ms / 1000).map(|s| s.to_string()).unwrap_or_default(),
            per_tx_limit: m.limits.per_tx_limit,
            lifetime_cap: m.limits.lifetime_cap,
            rate_limit: self.rate_limit().map(|r| RateLimitView {
                requests: r.requests,
                per: Span::from_secs(r.per_ms / 1000).map(|s| s.to_string()).unwrap_or_default(),
            }),
            breaker: self.breaker_override().map(|o| BreakerView {
                denials: o.denials,
                window: o.window_ms.map(span_text),
                max_requests: o.max_requests,
                rate_window: o.rate_window_ms.map(span_text),
                repeats: o.repeats,
                repeat_window: o.repeat_window_ms.map(span_text),
            }),
            enforce: self.enforce != 0,
            labels: serde_json::from_str(&self.labels).unwrap_or_default(),
            created_at: fmt_time(self.created_at),
            expires_at: self.key_expires_at.map(fmt_time),
            revoked_at: self.revoked_at.map(fmt_time),
            suspended_at: self.suspended_at.map(fmt_time),
            usage: Usage {
                window_spent: m.counters.window_spent,
                window_held: held,
                window_started_at: fmt_time(start),
                window_resets_at: fmt_time(end),
                lifetime_spent: m.counters.lifetime_spent,
                utilization: (utilization * 10_000.0).round() / 10_000.0,
                tx_count: self.tx_count,
                denied_count: self.denied_count,
            },
        }
    }
}

/// What an agent's holds past their expiry, not yet closed by the sweeper, come to: all of it
/// (`held`) no longer counts as held, and the gateway's part (`captured`) counts as spent.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(crate) struct Swept {
    pub held: i64,
    pub captured: i64,
}

/// The public agent object (contract §4). Its OpenAPI schema (`Agent`) is derived from this type,
/// so the document and the wire are one.
#[derive(Clone, Debug, PartialEq, Serialize, utoipa::ToSchema)]
#[schema(as = Agent)]
pub struct AgentView {
    pub handle: String,
    /// The parent's handle; `null` for a root agent.
    #[schema(required = true)]
    pub parent: Option<String>,
    #[schema(schema_with = status_schema)]
    pub status: String,
    pub scopes: Vec<String>,
    pub spending_cap: Micros,
    /// The cap's fixed reset period, `<n>s|m|h|d`, anchored at `created_at`.
    pub window: String,
    pub per_tx_limit: Micros,
    #[schema(required = true)]
    pub lifetime_cap: Option<Micros>,
    #[schema(required = true)]
    pub rate_limit: Option<RateLimitView>,
    /// Only when the agent has breaker settings of its own.
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schema(value_type = BreakerView)]
    pub breaker: Option<BreakerView>,
    /// `false`: shadow mode, every decision is recorded as it would have been but none enforced.
    pub enforce: bool,
    #[schema(value_type = std::collections::BTreeMap<String, String>)]
    pub labels: serde_json::Map<String, serde_json::Value>,
    #[schema(format = DateTime)]
    pub created_at: String,
    /// When the key expires; `null`: never.
    #[schema(format = DateTime, required = true)]
    pub expires_at: Option<String>,
    #[schema(format = DateTime, required = true)]
    pub revoked_at: Option<String>,
    #[schema(format = DateTime, required = true)]
    pub suspended_at: Option<String>,
    pub usage: Usage,
}

/// The `status` of the agent object: one of [`AgentStatus`]'s names.
pub(crate) fn status_schema() -> utoipa::openapi::schema::Object {
    utoipa::openapi::schema::ObjectBuilder::new()
        .schema_type(utoipa::openapi::schema::Type::String)
        .enum_values(Some([AgentStatus::Active, AgentStatus::Suspended, AgentStatus::Revoked].map(AgentStatus::as_str)))
        .build()
}

#[derive(Clone, Debug, PartialEq, Serialize, utoipa::ToSchema)]
#[schema(as = RateLimit)]
pub struct RateLimitView {
    pub requests: i64,
    pub per: String,
}

/// An agent's own breaker settings; a field left out follows the config.
#[derive(Clone, Debug, PartialEq, Serialize, utoipa::ToSchema)]
#[schema(as = Breaker)]
pub struct BreakerView {
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schema(value_type = i64)]
    pub denials: Option<i64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schema(value_type = String)]
    pub window: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schema(value_type = i64)]
    pub max_requests: Option<i64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schema(value_type = String)]
    pub rate_window: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schema(value_type = i64)]
    pub repeats: Option<i64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schema(value_type = String)]
    pub repeat_window: Option<String>,
}

/// Usage figures of an agent, its descendants included.
#[derive(Clone, Debug, PartialEq, Serialize, utoipa::ToSchema)]
pub struct Usage {
    pub window_spent: Micros,
    pub window_held: Micros,
    #[schema(format = DateTime)]
    pub window_started_at: String,
    #[schema(format = DateTime)]
    pub window_resets_at: String,
    pub lifetime_spent: Micros,
    /// (window_spent + window_held) / spending_cap, to 4 decimals.
    pub utilization: f64,
    pub tx_count: i64,
    pub denied_count: i64,
}
