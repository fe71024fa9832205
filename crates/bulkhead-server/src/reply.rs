//! The ledger's answers as HTTP: the one place that gives each [`Answer`] its status and JSON
//! (a [`Refusal`] gets its status, code and message from `From<Refusal> for ApiError`), and that
//! records a decision's metrics.
//!
//! Rendering is a pure function of the typed answer, so an idempotent replay, rendered from the
//! answer the ledger kept, is byte-for-byte the first answer. It never parses a ledger answer
//! back, except an answer recorded already rendered by an earlier version of Bulkhead, which is
//! sent again as it was.

use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use bulkhead_store::{Answer, LeaseSettled, Reply, fmt_time};
use serde_json::{Value, json};

use crate::error::ApiError;
use crate::metrics::{DECISIONS, SPENT};

/// A reply as it goes out: status, JSON body and the `Retry-After` seconds of a 429.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Rendered {
    pub status: u16,
    pub body: String,
    pub retry_after: Option<i64>,
    /// The answer is a replay of an earlier one (`Idempotent-Replayed: true`).
    pub replayed: bool,
}

/// The status and JSON body of a committed reply.
pub fn render(reply: &Reply) -> Rendered {
    let (status, body, retry_after) = match &reply.answer {
        Ok(answer) => {
            let (status, body) = answer_body(answer);
            // Only an answer recorded already rendered (before answers were typed) can be a 429;
            // its wait is in its body.
            let retry_after = (status == 429).then(|| {
                serde_json::from_str::<Value>(&body).ok().and_then(|v| v["error"]["retry_after"].as_i64()).unwrap_or(1)
            });
            (status, body, retry_after)
        }
        Err(refusal) => {
            let e = ApiError::from(*refusal);
            (e.status.as_u16(), e.body().to_string(), e.retry_after)
        }
    };
    Rendered { status, body, retry_after, replayed: reply.replayed }
}

/// The status and JSON body of an answer that went through.
fn answer_body(answer: &Answer) -> (u16, String) {
    let shadow = |mut body: Value, denied: Option<bulkhead_core::DenyReason>| {
        if let Some(r) = denied {
            body["shadow_denied"] = json!(r.code());
        }
        body
    };
    let (status, body) = match answer {
        Answer::Rendered { status, body } => return (*status, body.clone()),
        Answer::Spent(s) => (
            200,
            shadow(
                json!({"id": s.id, "amount": s.amount, "remaining": {"window": s.remaining.window, "lifetime": s.remaining.lifetime}, "window_resets_at": fmt_time(s.window_resets_at)}),
                s.shadow_denied,
            ),
        ),
        Answer::Held(h) => (
            201,
            shadow(
                json!({"id": h.id, "amount": h.amount, "expires_at": fmt_time(h.expires_at), "remaining": {"window": h.remaining.window, "lifetime": h.remaining.lifetime}}),
                h.shadow_denied,
            ),
        ),
        Answer::Settled(s) => match s.captured {
            Some(c) => (200, json!({"id": s.id, "captured": c, "released": s.released})),
            None => (200, json!({"id": s.id, "released": s.released})),
        },
        Answer::LeaseGrant(g) => (
            201,
            shadow(
                json!({"id": g.hold_id, "slots": g.slots, "amount": g.amount, "expires_at": fmt_time(g.expires_at), "key_expires_at": g.key_expires_at, "room": g.room}),
                g.shadow_denied,
            ),
        ),
        Answer::LeaseSettled(LeaseSettled::Before { hold_id, seq }) => {
            (200, json!({"id": hold_id, "seq": seq, "applied": "before"}))
        }
        Answer::LeaseSettled(LeaseSettled::Applied { hold_id, captured, released, closed }) => {
            (200, json!({"id": hold_id, "captured": captured, "released": released, "closed": closed}))
        }
        Answer::Created(view) => return (201, agent_json(view)),
        Answer::Agent(view) => return (200, agent_json(view)),
        Answer::Revoked { handles, revoked_at } => {
            (200, json!({"revoked": handles, "revoked_at": fmt_time(*revoked_at)}))
        }
        Answer::KeyRotated => (201, json!({})),
        Answer::Swept => (200, json!({})),
    };
    (status, body.to_string())
}

fn agent_json(view: &bulkhead_store::AgentView) -> String {
    serde_json::to_string(view).unwrap_or_else(|_| "{}".into())
}

/// Records the decision metrics of a committed reply.
pub(crate) fn record_outcome(reply: &Reply) {
    if let Some(o) = &reply.outcome {
        let outcome = if o.allowed { "allowed" } else { "denied" };
        let reason = if o.allowed { "none" } else { o.reason };
        metrics::counter!(DECISIONS, "agent" => o.agent.clone(), "outcome" => outcome, "reason" => reason).increment(1);
        if o.spent > 0 {
            metrics::counter!(SPENT, "agent" => o.agent.clone()).increment(o.spent as u64);
        }
    }
}

/// Turns a committed reply into HTTP, recording its decision metrics.
pub(crate) fn respond(reply: Reply) -> Response {
    record_outcome(&reply);
    let r = render(&reply);
    let status = StatusCode::from_u16(r.status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    let mut resp = (status, [(header::CONTENT_TYPE, "application/json")], r.body).into_response();
    if let Some(secs) = r.retry_after
        && let Ok(v) = HeaderValue::from_str(&secs.to_string())
    {
        resp.headers_mut().insert(header::RETRY_AFTER, v);
    }
    if r.replayed {
        resp.headers_mut().insert("idempotent-replayed", HeaderValue::from_static("true"));
    }
    resp
}
