//! The JSON bodies the API answers with, as types. Every handler renders its answer through one
//! of these (or through a public shape of the store, such as the agent object), and the OpenAPI
//! document takes its schemas from the same types, so the document and the wire cannot disagree.
//!
//! Field order is the order on the wire. Amounts are [`Micros`] (decimal strings), times RFC 3339
//! strings. Nothing here decides anything: the ledger's typed answers come in, JSON goes out.

use bulkhead_core::{DenyReason, Micros};
use bulkhead_store::{AgentView, AlertRecord, AuditEvent, Held, LeaseGrant, Settled, Spent, UsageBucket, fmt_time};
use serde::Serialize;
use utoipa::ToSchema;

/// `GET /healthz`.
#[derive(Serialize, ToSchema)]
pub(crate) struct Health {
    #[schema(value_type = String, examples("ok"))]
    pub status: &'static str,
}

/// What the agent may still spend after a decision.
#[derive(Serialize, ToSchema)]
pub(crate) struct Remaining {
    /// Left of the window cap (holds counted).
    pub window: Micros,
    /// Left of the lifetime cap; `null` when the agent has none.
    #[schema(required = true)]
    pub lifetime: Option<Micros>,
}

impl From<bulkhead_store::Remaining> for Remaining {
    fn from(r: bulkhead_store::Remaining) -> Remaining {
        Remaining { window: r.window, lifetime: r.lifetime }
    }
}

/// The code a shadow agent's allowed call would have been denied with (never on enforcing agents).
fn shadow(d: Option<DenyReason>) -> Option<&'static str> {
    d.map(DenyReason::code)
}

/// `POST /v1/spend` → 200.
#[derive(Serialize, ToSchema)]
pub(crate) struct SpendReceipt {
    pub id: String,
    pub amount: Micros,
    pub remaining: Remaining,
    #[schema(format = DateTime)]
    pub window_resets_at: String,
    /// Shadow mode only: the error code enforcement would have denied this spend with.
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schema(value_type = String)]
    pub shadow_denied: Option<&'static str>,
}

impl From<&Spent> for SpendReceipt {
    fn from(s: &Spent) -> SpendReceipt {
        SpendReceipt {
            id: s.id.clone(),
            amount: s.amount,
            remaining: s.remaining.into(),
            window_resets_at: fmt_time(s.window_resets_at),
            shadow_denied: shadow(s.shadow_denied),
        }
    }
}

/// `POST /v1/holds` → 201.
#[derive(Serialize, ToSchema)]
pub(crate) struct HoldReceipt {
    pub id: String,
    pub amount: Micros,
    #[schema(format = DateTime)]
    pub expires_at: String,
    pub remaining: Remaining,
    /// Shadow mode only: the error code enforcement would have denied this hold with.
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schema(value_type = String)]
    pub shadow_denied: Option<&'static str>,
}

impl From<&Held> for HoldReceipt {
    fn from(h: &Held) -> HoldReceipt {
        HoldReceipt {
            id: h.id.clone(),
            amount: h.amount,
            expires_at: fmt_time(h.expires_at),
            remaining: h.remaining.into(),
            shadow_denied: shadow(h.shadow_denied),
        }
    }
}

/// `POST /v1/holds/{id}/capture` → 200: `captured` charged, the rest of the hold released.
#[derive(Serialize, ToSchema)]
pub(crate) struct Captured {
    pub id: String,
    pub captured: Micros,
    pub released: Micros,
}

/// `POST /v1/holds/{id}/release` → 200: the whole hold released.
#[derive(Serialize, ToSchema)]
pub(crate) struct Released {
    pub id: String,
    pub released: Micros,
}

/// A settled hold: a capture, or a release when nothing was captured.
pub(crate) enum Settlement {
    Captured(Captured),
    Released(Released),
}

impl From<&Settled> for Settlement {
    fn from(s: &Settled) -> Settlement {
        match s.captured {
            Some(captured) => Settlement::Captured(Captured { id: s.id.clone(), captured, released: s.released }),
            None => Settlement::Released(Released { id: s.id.clone(), released: s.released }),
        }
    }
}

/// `POST /v1/agents` → 201: the agent object and its key, shown this once.
#[derive(Serialize, ToSchema)]
pub(crate) struct NewAgent {
    #[serde(flatten)]
    pub agent: AgentView,
    /// The agent's credential (`bk_…`): shown in this answer only, stored only as a hash.
    pub key: String,
}

/// `POST /v1/agents/{handle}/keys` → 201.
#[derive(Serialize, ToSchema)]
pub(crate) struct NewKey {
    /// The new credential; the old one stopped working when this was answered.
    pub key: String,
}

/// `POST /v1/agents/{handle}/revoke` → 200.
#[derive(Serialize, ToSchema)]
pub(crate) struct Revoked {
    /// The agent and every descendant.
    pub revoked: Vec<String>,
    #[schema(format = DateTime)]
    pub revoked_at: String,
}

/// `GET /v1/agents`.
#[derive(Serialize, ToSchema)]
pub(crate) struct AgentList {
    pub agents: Vec<AgentView>,
}

/// `GET /v1/agents/{handle}/audit`, `GET /v1/me/audit`: events in `seq` order after `after`.
#[derive(Serialize, ToSchema)]
pub(crate) struct AuditPage {
    pub events: Vec<AuditEvent>,
}

/// `GET /v1/audit`.
#[derive(Serialize, ToSchema)]
pub(crate) struct AuditSearch {
    pub events: Vec<AuditEvent>,
    /// The newest event's `seq`.
    pub head: i64,
}

/// `GET /v1/agents/{handle}/usage`.
#[derive(Serialize, ToSchema)]
pub(crate) struct UsageSeries {
    pub agent: String,
    /// The bucket length, `<n>s|m|h|d`.
    pub bucket: String,
    pub buckets: Vec<UsageBucket>,
}

/// `GET /v1/alerts`.
#[derive(Serialize, ToSchema)]
pub(crate) struct AlertList {
    pub alerts: Vec<AlertRecord>,
}

/// Answers of the gateway's own ledger calls (leases). They never leave the process as HTTP and
/// are not in the API document; they are typed so that every answer renders one way.
#[derive(Serialize)]
pub(crate) struct LeaseGrantBody {
    pub id: String,
    pub slots: u64,
    pub amount: Micros,
    pub expires_at: String,
    pub key_expires_at: Option<i64>,
    pub room: Micros,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub shadow_denied: Option<&'static str>,
}

impl From<&LeaseGrant> for LeaseGrantBody {
    fn from(g: &LeaseGrant) -> LeaseGrantBody {
        LeaseGrantBody {
            id: g.hold_id.clone(),
            slots: g.slots,
            amount: g.amount,
            expires_at: fmt_time(g.expires_at),
            key_expires_at: g.key_expires_at,
            room: g.room,
            shadow_denied: shadow(g.shadow_denied),
        }
    }
}

/// A lease settlement that an earlier attempt had applied.
#[derive(Serialize)]
pub(crate) struct LeaseSettledBefore<'a> {
    pub id: &'a str,
    pub seq: i64,
    pub applied: &'static str,
}

/// A lease settlement applied now.
#[derive(Serialize)]
pub(crate) struct LeaseSettledNow<'a> {
    pub id: &'a str,
    pub captured: Micros,
    pub released: Micros,
    pub closed: bool,
}

/// `{}`.
#[derive(Serialize)]
pub(crate) struct Empty {}
