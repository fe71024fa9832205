//! What the ledger answers: an [`Answer`] when a command went through, a [`Refusal`] when it
//! did not, as typed values.
//!
//! This module owns the vocabulary of the ledger's answers and the format in which a money
//! call's answer is kept for idempotent replays. It never speaks HTTP: statuses, error codes
//! and messages are the server's to choose (`From<Refusal> for ApiError`), and so is the JSON
//! an answer is rendered into. Because a replay is rendered from the same typed value as the
//! first answer, by the same code, the two are byte-for-byte the same.

use bulkhead_core::{DenyReason, Micros};
use serde::{Deserialize, Serialize};

use crate::StoreError;
use crate::view::AgentView;

/// A committed answer to one command.
#[derive(Clone, Debug, PartialEq)]
pub struct Reply {
    pub answer: Result<Answer, Refusal>,
    /// This answer is a replay of an earlier one (`Idempotency-Key`).
    pub replayed: bool,
    /// The decision this reply carries, when it was a spend-type decision (for metrics).
    pub outcome: Option<Outcome>,
}

/// What a spend-type decision was, for metrics.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Outcome {
    pub agent: String,
    pub allowed: bool,
    pub reason: &'static str,
    pub spent: i64,
}

/// A command that went through. Not `#[non_exhaustive]`, nor is [`Refusal`]: the server maps
/// every variant, and a new one must fail its build until it does.
#[derive(Clone, Debug, PartialEq)]
pub enum Answer {
    /// A spend was charged.
    Spent(Spent),
    /// A hold was granted (an API hold or a gateway's metered hold).
    Held(Held),
    /// A hold was captured in part or released whole.
    Settled(Settled),
    /// A gateway lease of call slots was granted.
    LeaseGrant(LeaseGrant),
    /// Calls under a gateway lease were settled (or had been, by an earlier attempt).
    LeaseSettled(LeaseSettled),
    /// A new agent (boxed: the agent object is many times the size of any other answer).
    Created(Box<AgentView>),
    /// An agent as it stands after a change (patch, resume).
    Agent(Box<AgentView>),
    /// An agent and its descendants are revoked.
    Revoked { handles: Vec<String>, revoked_at: i64 },
    /// An agent has a new key (the server shows the key; the ledger only knows its hash).
    KeyRotated,
    /// The sweep of expired holds ran.
    Swept,
    /// An event was written to the audit trail (`Command::AuditRefusedCall`).
    Audited,
    /// A replay of an answer recorded, already rendered, by a version of Bulkhead from before
    /// answers were typed: it is sent again exactly as it was.
    Rendered { status: u16, body: String },
}

/// The amounts an agent may still spend after a decision.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Remaining {
    pub window: Micros,
    pub lifetime: Option<Micros>,
}

/// A limit's denial and how to recover from it: what may still be spent under every cap of the
/// agent's chain, when its window resets and, for the window cap, how long until then.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct OverLimit {
    pub reason: DenyReason,
    pub remaining: Remaining,
    /// Milliseconds since the epoch.
    pub window_resets_at: i64,
    /// Set for a window cap: milliseconds until the window resets.
    pub retry_after_ms: Option<i64>,
}

/// An allowed spend.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Spent {
    pub id: String,
    pub amount: Micros,
    pub remaining: Remaining,
    /// Milliseconds since the epoch.
    pub window_resets_at: i64,
    /// A shadow agent's spend that enforcement would have denied.
    pub shadow_denied: Option<DenyReason>,
}

/// A granted hold.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Held {
    pub id: String,
    pub amount: Micros,
    /// Milliseconds since the epoch.
    pub expires_at: i64,
    pub remaining: Remaining,
    pub shadow_denied: Option<DenyReason>,
}

/// A settled hold: `captured` is `None` for a release.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Settled {
    pub id: String,
    pub captured: Option<Micros>,
    pub released: Micros,
}

/// A gateway lease: one hold of `slots` slots.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LeaseGrant {
    pub hold_id: String,
    pub slots: u64,
    pub amount: Micros,
    /// Milliseconds since the epoch.
    pub expires_at: i64,
    pub key_expires_at: Option<i64>,
    /// What the agent's chain could still take after the grant.
    pub room: Micros,
    pub shadow_denied: Option<DenyReason>,
}

/// A settlement of calls under a lease.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum LeaseSettled {
    /// This settlement (by its number) was applied before: nothing was done again.
    Before {
        hold_id: String,
        seq: i64,
    },
    Applied {
        hold_id: String,
        captured: Micros,
        released: Micros,
        closed: bool,
    },
}

/// Why a command was not carried out. Denials of the contract's ordered checks are
/// [`Refusal::Deny`]; every other variant is a request the ledger cannot carry out as asked.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Refusal {
    /// A decision's denial: credentials, suspension, scope, rate limit or a limit.
    Deny(DenyReason),
    /// A denial by a limit (a 402), with what the agent needs to recover (contract §5).
    OverLimit(OverLimit),
    /// The named thing does not exist (or is not the caller's to name).
    NotFound(Missing),
    /// The hold (or lease) was already captured, released or expired.
    HoldClosed { lease: bool, was: HoldEnd },
    /// An amount the hold or lease cannot take.
    InvalidAmount(AmountProblem),
    /// A revoked agent cannot be given a new key or resumed.
    AgentRevoked(Revived),
    /// An agent with this handle exists.
    HandleTaken,
    /// A parent tried to give a child scopes it does not hold.
    ScopeEscalation,
    /// A parent tried to give a child caps above its own, or (named) a rate limit, key expiry or
    /// breaker looser than its own.
    CapEscalation(Option<bulkhead_core::decision::Bound>),
    /// Shadow mode was asked for an agent that is not a root.
    ShadowNotRoot,
    /// The tree already holds `agents_max` agents.
    TreeTooLarge { agents_max: i64 },
    /// The child would be deeper than `depth_max`.
    TreeTooDeep { depth_max: i64 },
    /// The parent has `children_max` children already.
    TooManyChildren { children_max: i64 },
    /// The `Idempotency-Key` came before with a different request.
    IdempotencyKeyReused,
}

/// What a [`Refusal::NotFound`] looked for.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Missing {
    Agent,
    /// An agent among the caller's descendants (a parent revoking outside its subtree).
    Descendant,
    Hold,
    Lease,
}

/// How a hold ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum HoldEnd {
    Captured,
    Released,
    Expired,
}

impl HoldEnd {
    pub fn as_str(self) -> &'static str {
        match self {
            HoldEnd::Captured => "captured",
            HoldEnd::Released => "released",
            HoldEnd::Expired => "expired",
        }
    }
}

/// Why an amount was refused by a settlement.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum AmountProblem {
    /// A capture above what the hold holds.
    CaptureAboveHold { held: Micros },
    /// A gateway call's cost above its slot.
    CostAboveSlot,
    /// More slots settled than the lease holds.
    SlotsAboveLease,
}

/// What a revoked agent was asked to do again.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Revived {
    RotateKey,
    Resume,
    Suspend,
}

impl Reply {
    pub(crate) fn ok(answer: Answer) -> Reply {
        Reply { answer: Ok(answer), replayed: false, outcome: None }
    }

    pub(crate) fn refuse(refusal: Refusal) -> Reply {
        Reply { answer: Err(refusal), replayed: false, outcome: None }
    }

    pub(crate) fn deny(reason: DenyReason) -> Reply {
        Reply::refuse(Refusal::Deny(reason))
    }

    pub(crate) fn with_outcome(mut self, o: Outcome) -> Reply {
        self.outcome = Some(o);
        self
    }
}

/// The `status` an idempotency record has when its `body` holds a typed answer ([`Recorded`]).
/// Records written before answers were typed hold a rendered answer: an HTTP status (never 0)
/// and the JSON sent.
pub(crate) const RECORD_TYPED: i64 = 0;

/// The answer of a money call as it is kept for replays: JSON, one variant per answer a money
/// call can have.
#[derive(Debug, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub(crate) enum Recorded {
    Spent(Spent),
    Held(Held),
    Settled(Settled),
    Refused(Refusal),
}

impl Recorded {
    /// The record of a money call's answer.
    pub(crate) fn of(answer: &Result<Answer, Refusal>) -> Result<String, StoreError> {
        let r = match answer {
            Ok(Answer::Spent(s)) => Recorded::Spent(s.clone()),
            Ok(Answer::Held(h)) => Recorded::Held(h.clone()),
            Ok(Answer::Settled(s)) => Recorded::Settled(s.clone()),
            Err(r) => Recorded::Refused(*r),
            Ok(other) => return Err(StoreError::Corrupt(format!("a money call answered {other:?}"))),
        };
        serde_json::to_string(&r).map_err(|e| StoreError::Corrupt(e.to_string()))
    }

    /// The answer an idempotency record replays.
    pub(crate) fn replay(status: i64, body: String) -> Result<Result<Answer, Refusal>, StoreError> {
        if status != RECORD_TYPED {
            let status = u16::try_from(status).map_err(|_| StoreError::Corrupt("an idempotency status".into()))?;
            return Ok(Ok(Answer::Rendered { status, body }));
        }
        let r: Recorded = serde_json::from_str(&body).map_err(|e| StoreError::Corrupt(e.to_string()))?;
        Ok(match r {
            Recorded::Spent(s) => Ok(Answer::Spent(s)),
            Recorded::Held(h) => Ok(Answer::Held(h)),
            Recorded::Settled(s) => Ok(Answer::Settled(s)),
            Recorded::Refused(r) => Err(r),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_record_replays_its_answer() {
        let m = |s: &str| Micros::parse(s).unwrap();
        let answers = [
            Ok(Answer::Spent(Spent {
                id: "sp_1".into(),
                amount: m("2.5"),
                remaining: Remaining { window: m("47.5"), lifetime: None },
                window_resets_at: 1_700_086_400_000,
                shadow_denied: Some(DenyReason::SpendingCap),
            })),
            Ok(Answer::Held(Held {
                id: "hold_1".into(),
                amount: m("1"),
                expires_at: 7,
                remaining: Remaining { window: m("0.000001"), lifetime: Some(m("3")) },
                shadow_denied: None,
            })),
            Ok(Answer::Settled(Settled { id: "hold_1".into(), captured: None, released: m("1") })),
            Err(Refusal::Deny(DenyReason::RateLimited { retry_after_ms: 1234 })),
            Err(Refusal::HoldClosed { lease: false, was: HoldEnd::Expired }),
            Err(Refusal::InvalidAmount(AmountProblem::CaptureAboveHold { held: m("0.4") })),
        ];
        for a in answers {
            let body = Recorded::of(&a).unwrap();
            assert_eq!(Recorded::replay(RECORD_TYPED, body).unwrap(), a);
        }
    }

    #[test]
    fn a_rendered_record_replays_as_it_was() {
        let body = r#"{"id":"sp_x","amount":"1.00"}"#.to_owned();
        assert_eq!(Recorded::replay(200, body.clone()).unwrap(), Ok(Answer::Rendered { status: 200, body }));
    }
}
