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
use serde::Serialize;
use serde_json::Value;

use crate::bodies::{
    Empty, HoldReceipt, LeaseGrantBody, LeaseSettledBefore, LeaseSettledNow, Revoked, Settlement, SpendReceipt,
};
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
            (e.status.as_u16(), json(&e.body()), e.retry_after)
        }
    };
    Rendered { status, body, retry_after, replayed: reply.replayed }
}

/// The status and JSON body of an answer that went through, rendered through the types of
/// [`crate::bodies`] (the ones the OpenAPI document describes).
fn answer_body(answer: &Answer) -> (u16, String) {
    match answer {
        Answer::Rendered { status, body } => (*status, body.clone()),
        Answer::Spent(s) => (200, json(&SpendReceipt::from(s))),
        Answer::Held(h) => (201, json(&HoldReceipt::from(h))),
        Answer::Settled(s) => match Settlement::from(s) {
            Settlement::Captured(c) => (200, json(&c)),
            Settlement::Released(r) => (200, json(&r)),
        },
        Answer::LeaseGrant(g) => (201, json(&LeaseGrantBody::from(g))),
        Answer::LeaseSettled(LeaseSettled::Before { hold_id, seq }) => {
            (200, json(&LeaseSettledBefore { id: hold_id, seq: *seq, applied: "before" }))
        }
        Answer::LeaseSettled(LeaseSettled::Applied { hold_id, captured, released, closed }) => {
            (200, json(&LeaseSettledNow { id: hold_id, captured: *captured, released: *released, closed: *closed }))
        }
        Answer::Created(view) => (201, json(view)),
        Answer::Agent(view) => (200, json(view)),
        Answer::Revoked { handles, revoked_at } => {
            (200, json(&Revoked { revoked: handles.clone(), revoked_at: fmt_time(*revoked_at) }))
        }
        Answer::KeyRotated => (201, json(&Empty {})),
        Answer::Swept | Answer::Audited => (200, json(&Empty {})),
    }
}

/// A body as JSON text. Serializing these types cannot fail (string keys, no non-finite floats
/// but `utilization`, which is finite); `{}` is the fallback all the same.
fn json<T: Serialize + ?Sized>(body: &T) -> String {
    serde_json::to_string(body).unwrap_or_else(|_| "{}".into())
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

#[cfg(test)]
mod tests {
    use bulkhead_core::{DenyReason, Micros};
    use bulkhead_store::{Held, LeaseGrant, Remaining, Settled, Spent};

    use super::*;

    fn m(s: &str) -> Micros {
        Micros::parse(s).unwrap()
    }

    /// The typed bodies render exactly the bytes the contract's shapes had when they were
    /// written as `json!` literals: same fields, same order, amounts as strings, explicit nulls.
    #[test]
    fn answers_render_byte_for_byte() {
        let remaining = Remaining { window: m("47.5"), lifetime: None };
        let cases = [
            (
                Answer::Spent(Spent {
                    id: "sp_1".into(),
                    amount: m("2.5"),
                    remaining,
                    window_resets_at: 0,
                    shadow_denied: None,
                }),
                200,
                r#"{"id":"sp_1","amount":"2.50","remaining":{"window":"47.50","lifetime":null},"window_resets_at":"1970-01-01T00:00:00Z"}"#,
            ),
            (
                Answer::Spent(Spent {
                    id: "sp_2".into(),
                    amount: m("2.5"),
                    remaining: Remaining { window: m("0"), lifetime: Some(m("1.000001")) },
                    window_resets_at: 0,
                    shadow_denied: Some(DenyReason::SpendingCap),
                }),
                200,
                r#"{"id":"sp_2","amount":"2.50","remaining":{"window":"0.00","lifetime":"1.000001"},"window_resets_at":"1970-01-01T00:00:00Z","shadow_denied":"spending_cap_exceeded"}"#,
            ),
            (
                Answer::Held(Held {
                    id: "hold_1".into(),
                    amount: m("1"),
                    expires_at: 1000,
                    remaining,
                    shadow_denied: None,
                }),
                201,
                r#"{"id":"hold_1","amount":"1.00","expires_at":"1970-01-01T00:00:01Z","remaining":{"window":"47.50","lifetime":null}}"#,
            ),
            (
                Answer::Settled(Settled { id: "hold_1".into(), captured: Some(m("0.4")), released: m("0.6") }),
                200,
                r#"{"id":"hold_1","captured":"0.40","released":"0.60"}"#,
            ),
            (
                Answer::Settled(Settled { id: "hold_1".into(), captured: None, released: m("1") }),
                200,
                r#"{"id":"hold_1","released":"1.00"}"#,
            ),
            (
                Answer::Revoked { handles: vec!["a".into(), "b".into()], revoked_at: 0 },
                200,
                r#"{"revoked":["a","b"],"revoked_at":"1970-01-01T00:00:00Z"}"#,
            ),
            (
                Answer::LeaseGrant(LeaseGrant {
                    hold_id: "hold_2".into(),
                    slots: 3,
                    amount: m("1.5"),
                    expires_at: 0,
                    key_expires_at: None,
                    room: m("10"),
                    shadow_denied: None,
                }),
                201,
                r#"{"id":"hold_2","slots":3,"amount":"1.50","expires_at":"1970-01-01T00:00:00Z","key_expires_at":null,"room":"10.00"}"#,
            ),
            (
                Answer::LeaseSettled(LeaseSettled::Before { hold_id: "hold_2".into(), seq: 4 }),
                200,
                r#"{"id":"hold_2","seq":4,"applied":"before"}"#,
            ),
            (
                Answer::LeaseSettled(LeaseSettled::Applied {
                    hold_id: "hold_2".into(),
                    captured: m("0.5"),
                    released: m("1"),
                    closed: true,
                }),
                200,
                r#"{"id":"hold_2","captured":"0.50","released":"1.00","closed":true}"#,
            ),
            (Answer::KeyRotated, 201, "{}"),
            (Answer::Swept, 200, "{}"),
            (Answer::Audited, 200, "{}"),
        ];
        for (answer, status, body) in cases {
            assert_eq!(answer_body(&answer), (status, body.to_owned()), "{answer:?}");
        }
        let over = bulkhead_store::OverLimit {
            reason: DenyReason::SpendingCap,
            remaining: Remaining { window: m("0.5"), lifetime: Some(m("3")) },
            window_resets_at: 3_600_000,
            retry_after_ms: Some(1001),
        };
        let r =
            render(&Reply { answer: Err(bulkhead_store::Refusal::OverLimit(over)), replayed: false, outcome: None });
        assert_eq!((r.status, r.retry_after), (402, Some(2)));
        assert_eq!(
            r.body,
            r#"{"error":{"code":"spending_cap_exceeded","message":"The amount would exceed the agent's spending cap for this window; nothing was charged.","retry_after":2},"remaining":{"window":"0.50","lifetime":"3.00"},"window_resets_at":"1970-01-01T01:00:00Z"}"#
        );
        let denied = Reply {
            answer: Err(bulkhead_store::Refusal::Deny(DenyReason::RateLimited { retry_after_ms: 1500 })),
            replayed: false,
            outcome: None,
        };
        let r = render(&denied);
        assert_eq!(r.status, 429);
        assert_eq!(
            r.body,
            r#"{"error":{"code":"rate_limited","message":"The agent's request rate limit was reached; retry later.","retry_after":2}}"#
        );
    }
}
