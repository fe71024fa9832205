//! Refusals that cost no transaction (contract §12, "refusals cost the server almost nothing").
//!
//! Once the ledger has refused a key for good — unknown, its agent (or an ancestor) revoked, or
//! expired — that key can never be good again: keys are made by the server, never re-issued,
//! revocation and expiry are final. Such keys are answered from memory from then on, without the
//! writer's queue, a transaction or a row update. A suspended agent's key is answered from memory
//! too, but only for a second and only while the authorization epoch has not moved (a resume
//! moves it), and never for a capture or release, which a suspended agent may still make.
//!
//! Refusals answered from memory are audited coalesced: one `refused` event per agent and reason
//! for all of them in an interval, with their count (written by [`Command::RecordRefusals`],
//! which the sweeper submits). Unknown keys have no agent and no trail.
//!
//! The memory is bounded: past [`KEYS_MAX`] keys it starts afresh.

use std::collections::HashMap;
use std::sync::Mutex;

use bulkhead_core::{DenyReason, KeyHash};

use super::Command;
use crate::answer::{Outcome, Refusal, Reply};

/// The most keys remembered.
pub const KEYS_MAX: usize = 65_536;
/// How long a suspended agent's key is answered from memory.
const SUSPENDED_FOR_MS: i64 = 1_000;

/// What is known about one refused key.
#[derive(Clone, Debug)]
struct Known {
    reason: DenyReason,
    /// The agent, when the key belongs to one.
    agent: Option<String>,
    /// For a suspension: until when, and under which epoch.
    lapses: Option<(i64, u64)>,
}

/// Refusals answered from memory and not yet audited, per agent and reason.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Tally {
    pub agent: String,
    pub reason: DenyReason,
    pub count: i64,
    pub first_ms: i64,
    pub last_ms: i64,
}

#[derive(Default)]
pub(crate) struct Refusals {
    inner: Mutex<Inner>,
}

#[derive(Default)]
struct Inner {
    keys: HashMap<String, Known>,
    tally: HashMap<(String, &'static str), Tally>,
}

/// Whether a command is refused for a suspension (captures and releases are not).
fn suspension_applies(cmd: &Command) -> bool {
    matches!(
        cmd,
        Command::Spend { .. }
            | Command::Hold { .. }
            | Command::MeteredHold { .. }
            | Command::Lease { .. }
            | Command::CreateAgent { .. }
            | Command::AuditRefusedCall { .. }
    )
}

fn lasting(reason: DenyReason) -> bool {
    matches!(reason, DenyReason::InvalidCredentials | DenyReason::CredentialRevoked | DenyReason::CredentialExpired)
}

impl Refusals {
    /// The answer for `cmd` when its key is known to be refused, counted for the audit.
    pub(crate) fn for_command(&self, cmd: &Command, now_ms: i64, epoch: u64) -> Option<Reply> {
        self.answer(cmd.key()?, suspension_applies(cmd), now_ms, epoch)
    }

    /// The answer for a call with `key` when it is known to be refused, counted for the audit;
    /// `spends`: the call would spend or hold (a suspension refuses it).
    pub(crate) fn answer(&self, key: &KeyHash, spends: bool, now_ms: i64, epoch: u64) -> Option<Reply> {
        let mut inner = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        let known = inner.keys.get(key.as_str())?.clone();
        if let Some((until, at_epoch)) = known.lapses {
            if now_ms >= until || epoch != at_epoch {
                inner.keys.remove(key.as_str());
                return None;
            }
            if !spends {
                return None;
            }
        }
        let reply = Reply::refuse(Refusal::Deny(known.reason));
        let Some(agent) = known.agent else {
            return Some(reply);
        };
        let t = inner.tally.entry((agent.clone(), known.reason.code())).or_insert_with(|| Tally {
            agent: agent.clone(),
            reason: known.reason,
            count: 0,
            first_ms: now_ms,
            last_ms: now_ms,
        });
        t.count += 1;
        t.last_ms = now_ms;
        Some(reply.with_outcome(Outcome { agent, allowed: false, reason: known.reason.code(), spent: 0 }))
    }

    /// Learns from a committed answer to `cmd`: a key refused for good, or for its suspension.
    pub(crate) fn learn(&self, key: &KeyHash, reply: &Reply, now_ms: i64, epoch: u64) {
        let Err(Refusal::Deny(reason)) = reply.answer else {
            return;
        };
        let lapses = match reason {
            r if lasting(r) => None,
            DenyReason::AgentSuspended => Some((now_ms + SUSPENDED_FOR_MS, epoch)),
            _ => return,
        };
        let agent = reply.outcome.as_ref().map(|o| o.agent.clone());
        let mut inner = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        if inner.keys.len() >= KEYS_MAX {
            inner.keys.clear();
        }
        inner.keys.insert(key.as_str().to_owned(), Known { reason, agent, lapses });
    }

    /// Takes the refusals answered from memory since the last call.
    pub(crate) fn drain(&self) -> Vec<Tally> {
        let mut inner = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        let mut out: Vec<Tally> = inner.tally.drain().map(|(_, t)| t).collect();
        out.sort_by(|a, b| (a.first_ms, &a.agent).cmp(&(b.first_ms, &b.agent)));
        out
    }
}
