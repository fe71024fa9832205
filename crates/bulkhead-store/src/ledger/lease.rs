//! The gateway's leases: a grant (a metered hold of one slot, decided like any hold, grown by as
//! many more slots as fit) and the settlement of the calls made under it, applied once per
//! settlement number. It never forwards or prices a call (that is the server's gateway).

use bulkhead_core::Micros;
use bulkhead_core::Scope;
use bulkhead_core::decision::Movement;
use serde_json::json;

use super::LeaseAudit;
use super::batch::{Batch, HoldStatus, HoldTerms, R, corrupt, hold_end, path_ids};
use crate::answer::{AmountProblem, Answer, LeaseGrant, LeaseSettled, Missing, Outcome, Refusal, Reply};
use crate::view::AgentStatus;

impl Batch {
    /// A gateway lease: the first slot is a `MeteredHold` of `unit` in every respect; the hold
    /// then grows by as many more slots as fit now (see [`Command::Lease`]). Sizing, rate-limit
    /// tokens, the hold's growth and the amended audit event are one sequence over the same
    /// rows, kept together so that its order is read at a glance.
    pub(super) async fn lease(
        &mut self,
        id: i64,
        scope: &Scope,
        unit: Micros,
        slots: u32,
        expires_ms: i64,
    ) -> R<Reply> {
        let terms = HoldTerms { expires_at: self.now.saturating_add(expires_ms), on_expiry: "capture" };
        let reply = self.spend_or_hold(id, scope, unit, Some(terms), None).await?;
        let shadow_denied = match &reply.answer {
            Ok(Answer::Held(h)) => h.shadow_denied,
            _ => return Ok(reply),
        };
        let now = self.now;
        let hid = self.new_holds.last().map(|h| h.id.clone()).ok_or_else(|| corrupt("a lease without its hold"))?;
        let chain = self.chain(id)?;
        let default_breaker = self.breaker;
        let row = self.row_mut(id)?;
        // Each call under the lease counts as it is settled, not the lease itself.
        row.tx_count -= 1;
        let b = row.breaker(default_breaker);
        let one_by_one = row.enforce == 0 || row.status != AgentStatus::Active || b.max_requests > 0 || b.repeats > 0;
        let members = chain.iter().map(|a| self.row(*a).map(|r| r.member(now))).collect::<R<Vec<_>>>()?;
        let mut extra = bulkhead_core::lease_extra_slots(slots, one_by_one, bulkhead_core::room(&members), unit);
        // Every rate limit of the chain binds the lease: it gets as many slots as the tightest
        // admits, and each limiter gives exactly that many tokens.
        for a in &chain {
            if let Some(limit) = self.row(*a)?.rate_limit() {
                extra = bulkhead_core::ratelimit::take(limit, self.row(*a)?.rate_tat, now, extra).0;
            }
        }
        if extra > 0 {
            for a in &chain {
                if let Some(limit) = self.row(*a)?.rate_limit() {
                    let (_, tat) = bulkhead_core::ratelimit::take(limit, self.row(*a)?.rate_tat, now, extra);
                    self.row_mut(*a)?.rate_tat = tat;
                }
            }
        }
        if extra > 0 {
            let more = i64::try_from(extra)
                .ok()
                .and_then(|n| unit.micros().checked_mul(n))
                .and_then(Micros::from_micros)
                .ok_or_else(|| corrupt("lease arithmetic out of range"))?;
            self.move_allowed(&chain, &members, Movement::Hold(more), false)?;
            let h = self.holds.get_mut(&hid).ok_or_else(|| corrupt("a lease without its hold"))?;
            h.amount += more.micros();
            let amount = h.amount;
            if let Some(n) = self.new_holds.last_mut() {
                n.amount = amount;
            }
        }
        let n = extra + 1;
        let amount = self.holds.get(&hid).map(|h| h.amount).ok_or_else(|| corrupt("a lease without its hold"))?;
        if let Some(e) = self.events.iter_mut().rev().find(|e| e.reference.as_deref() == Some(hid.as_str())) {
            e.amount = Some(amount);
            // Keep what the hold's event says (a shadow agent's would-deny mark).
            let mut d: serde_json::Value =
                e.detail.as_deref().and_then(|d| serde_json::from_str(d).ok()).unwrap_or_else(|| json!({}));
            d["by"] = json!("gateway");
            d["slots"] = json!(n);
            e.detail = Some(d.to_string());
        }
        let members = chain.iter().map(|a| self.row(*a).map(|r| r.member(now))).collect::<R<Vec<_>>>()?;
        let grant = LeaseGrant {
            hold_id: hid,
            slots: n,
            amount: crate::format::micros(amount),
            expires_at: terms.expires_at,
            key_expires_at: self.chain_expiry(id)?,
            room: bulkhead_core::room(&members),
            shadow_denied,
        };
        Ok(Reply { answer: Ok(Answer::LeaseGrant(grant)), replayed: false, outcome: reply.outcome })
    }

    /// Settles calls made under a lease (see [`Command::LeaseSettle`]): the checks in their
    /// order (unknown, already applied, closed, amounts), then the movement, the hold and the
    /// rate-limit refund, kept in one function because each step reads what the last changed.
    #[allow(clippy::too_many_arguments)]
    pub(super) async fn lease_settle(
        &mut self,
        hold_id: &str,
        seq: i64,
        unit: Micros,
        costs: &[Micros],
        release: u32,
        close: bool,
        audit: LeaseAudit,
    ) -> R<Reply> {
        let hold = self.hold_by_id(hold_id).await?;
        let Some(hold) = hold.filter(|h| h.on_expiry == "capture") else {
            return Ok(Reply::refuse(Refusal::NotFound(Missing::Lease)));
        };
        let ids = path_ids(&hold.path);
        self.load_ids(&ids).await?;
        let handle = self.row(hold.agent_id)?.handle.clone();
        if seq <= hold.settled_seq {
            return Ok(Reply::ok(Answer::LeaseSettled(LeaseSettled::Before { hold_id: hold.id, seq })));
        }
        if hold.status != HoldStatus::Open || hold.expires_at <= self.now {
            return Ok(Reply::refuse(Refusal::HoldClosed { lease: true, was: hold_end(hold.status) }));
        }
        let slots = u64::try_from(costs.len()).unwrap_or(u64::MAX).saturating_add(u64::from(release));
        let held = i64::try_from(slots).ok().and_then(|n| unit.micros().checked_mul(n)).and_then(Micros::from_micros);
        let captured = costs.iter().try_fold(Micros::ZERO, |a, c| if *c > unit { None } else { a.checked_add(*c) });
        let (Some(held), Some(captured)) = (held, captured) else {
            return Ok(Reply::refuse(Refusal::InvalidAmount(AmountProblem::CostAboveSlot)));
        };
        if held.micros() > hold.amount {
            return Ok(Reply::refuse(Refusal::InvalidAmount(AmountProblem::SlotsAboveLease)));
        }
        self.move_chain(&ids, Movement::Settle { held, captured })?;
        let h = self.holds.entry(hold.id.clone()).or_insert_with(|| hold.clone());
        h.amount -= held.micros();
        h.captured += captured.micros();
        h.settled_seq = seq;
        let left = h.clone();
        self.touched_holds.insert(hold.id.clone());
        // Unused slots give their rate-limit tokens back, those released by `close` too.
        let closing_slots = if close && !unit.is_zero() { left.amount / unit.micros() } else { 0 };
        let unused_slots = u64::from(release).saturating_add(u64::try_from(closing_slots).unwrap_or(0));
        let row = self.row_mut(hold.agent_id)?;
        row.tx_count += i64::try_from(costs.len()).unwrap_or(i64::MAX);
        if unused_slots > 0
            && let Some(limit) = row.rate_limit()
        {
            row.rate_tat = bulkhead_core::ratelimit::refund(limit, row.rate_tat, unused_slots);
        }
        let remaining = if close { left.amount } else { 0 };
        let settled = SettledCalls {
            hold_id: &hold.id,
            scope: &hold.scope,
            costs,
            captured,
            released: unit.micros().saturating_mul(i64::from(release)) + remaining,
            release,
        };
        self.settlement_events(&handle, &settled, audit);
        if close {
            let status = if left.captured > 0 { HoldStatus::Captured } else { HoldStatus::Released };
            self.close_hold(&left, Micros::ZERO, status, self.now).await?;
        }
        let reply = Reply::ok(Answer::LeaseSettled(LeaseSettled::Applied {
            hold_id: hold.id.clone(),
            captured,
            released: crate::format::micros(held.micros() - captured.micros() + remaining),
            closed: close,
        }));
        Ok(reply.with_outcome(Outcome { agent: handle, allowed: true, reason: "", spent: captured.micros() }))
    }

    /// The audit events of a lease settlement: the calls' `capture` events (one for them all, each
    /// call's cost in its detail, or one per call under the lease's scope, see [`LeaseAudit`]),
    /// then one `release` for what went back.
    fn settlement_events(&mut self, handle: &str, s: &SettledCalls<'_>, audit: LeaseAudit) {
        match audit {
            LeaseAudit::Settlement if !s.costs.is_empty() => {
                let e = self.event(handle, "capture", "allowed");
                e.amount = Some(s.captured.micros());
                e.reference = Some(s.hold_id.to_owned());
                e.detail = Some(settled_calls(s.costs));
            }
            LeaseAudit::Settlement => {}
            LeaseAudit::EachCall => {
                for cost in s.costs {
                    let e = self.event(handle, "capture", "allowed");
                    e.scope = Some(s.scope.to_owned());
                    e.amount = Some(cost.micros());
                    e.reference = Some(s.hold_id.to_owned());
                    e.detail = Some(settled_calls(std::slice::from_ref(cost)));
                }
            }
        }
        if s.released > 0 {
            let e = self.event(handle, "release", "allowed");
            e.amount = Some(s.released);
            e.reference = Some(s.hold_id.to_owned());
            e.detail = Some(json!({"by": "gateway", "slots": s.release}).to_string());
        }
    }
}

/// What one lease settlement moved, for its audit events.
struct SettledCalls<'a> {
    hold_id: &'a str,
    /// The lease's scope (every call under it was made in it).
    scope: &'a str,
    costs: &'a [Micros],
    captured: Micros,
    /// What went back: unused slots, and what a close released.
    released: i64,
    /// The unused slots released.
    release: u32,
}

/// The detail of a gateway `capture` event: how many calls it settles and what each cost
/// (`each` when they all cost the same, else `costs` in call order).
fn settled_calls(costs: &[Micros]) -> String {
    use std::fmt::Write;
    let mut out = format!(r#"{{"by":"gateway","calls":{}"#, costs.len());
    match costs.first() {
        Some(first) if costs.iter().all(|c| c == first) => {
            let _ = write!(out, r#","each":"{first}"}}"#);
        }
        _ => {
            out.push_str(r#","costs":["#);
            for (i, c) in costs.iter().enumerate() {
                let _ = write!(out, r#"{}"{c}""#, if i == 0 { "" } else { "," });
            }
            out.push_str("]}");
        }
    }
    out
}
