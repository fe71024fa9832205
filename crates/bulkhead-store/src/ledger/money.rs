//! Money movements: the frame of every agent money call (credentials, then idempotency), spends
//! and holds decided by the core, their denials and the breaker, captures and releases, and the
//! allowed movement with its cap assertion and alert thresholds. It never writes SQL of its own
//! beyond the idempotency record.

use bulkhead_core::decision::{Movement, SpendCheck, Verdict, verdict};
use bulkhead_core::key::random_base62;
use bulkhead_core::runaway::denial_step;
use bulkhead_core::{DenyReason, Micros, Scope};
use serde_json::json;

use super::Command;
use super::IDEMPOTENCY_TTL_MS;
use super::batch::{Batch, HoldRow, HoldStatus, HoldTerms, NewHold, R, corrupt, hold_end, path_ids};
use crate::alerts::NewAlert;
use crate::answer::{
    AmountProblem, Answer, Held, Missing, Outcome, OverLimit, RECORD_TYPED, Recorded, Refusal, Remaining, Reply,
    Settled, Spent,
};
use crate::audit::NewEvent;
use crate::format::fmt_time;
use crate::view::AgentStatus;

/// The utilization alert thresholds are compared with: a zero cap with something used is past
/// every threshold.
fn utilization(m: &bulkhead_core::ChainMember) -> f64 {
    bulkhead_core::utilization(m.counters.window_spent, m.counters.held, m.limits.spending_cap).unwrap_or(f64::INFINITY)
}

impl Batch {
    /// Applies a movement to the counters of every agent of a chain (or hold path).
    pub(super) fn move_chain(&mut self, ids: &[i64], m: Movement) -> R<()> {
        let now = self.now;
        for id in ids {
            let row = self.row_mut(*id)?;
            let c = row.member(now).counters;
            let next = c.apply(m).ok_or_else(|| corrupt("counter arithmetic out of range"))?;
            row.set_counters(next);
        }
        Ok(())
    }

    /// Applies an allowed movement to `chain` (whose `members` are as they stood before it) and
    /// raises the alerts of the thresholds it crosses. Unless `may_break` (a shadow agent's spend),
    /// asserts, TigerBeetle-style, that it left no cap of the chain broken.
    pub(super) fn move_allowed(
        &mut self,
        chain: &[i64],
        members: &[bulkhead_core::ChainMember],
        m: Movement,
        may_break: bool,
    ) -> R<()> {
        let now = self.now;
        let before: Vec<f64> = members.iter().map(utilization).collect();
        self.move_chain(chain, m)?;
        for (a, before) in chain.iter().zip(before) {
            let after = utilization(&self.row(*a)?.member(now));
            self.raise_crossings(*a, before, after)?;
        }
        for a in chain.iter().filter(|_| !may_break) {
            let m = self.row(*a)?.member(now);
            let used = m.counters.window_spent.checked_add(m.counters.held);
            assert!(used.is_some_and(|u| u <= m.limits.spending_cap), "allowed movement broke a spending cap");
        }
        Ok(())
    }

    /// Raises an alert (when webhooks are configured): `{"id", "type", "agent", "at", …extra}`.
    pub(super) fn raise(&mut self, kind: &str, agent: &str, extra: serde_json::Value) {
        if self.rules.webhooks.is_empty() {
            return;
        }
        let id = format!("al_{}", random_base62(&mut self.rng, 22));
        let mut body = json!({"id": id, "type": kind, "agent": agent, "at": fmt_time(self.now)});
        if let (Some(b), serde_json::Value::Object(extra)) = (body.as_object_mut(), extra) {
            b.extend(extra);
        }
        self.alerts.push(NewAlert { id, body: body.to_string() });
    }

    /// Raises `threshold_crossed` for every configured threshold that `after` reached and
    /// `before` had not, and `cap_reached` when the agent's window is now full.
    pub(super) fn raise_crossings(&mut self, id: i64, before: f64, after: f64) -> R<()> {
        if self.rules.webhooks.is_empty() {
            return Ok(());
        }
        let now = self.now;
        let row = self.row(id)?;
        let (handle, window_index) = (row.handle.clone(), row.member(now).counters.window_index);
        let already = row.cap_alerted_window == window_index;
        let thresholds = self.rules.thresholds.clone();
        for t in thresholds {
            if before < t && after >= t {
                self.raise("threshold_crossed", &handle, json!({"threshold": t, "utilization": after}));
            }
        }
        if after >= 1.0 && !already {
            self.row_mut(id)?.cap_alerted_window = window_index;
            self.raise("cap_reached", &handle, json!({"cap": "spending_cap", "utilization": after}));
        }
        Ok(())
    }

    /// The shared frame of every agent money call: credentials, then idempotency, then the call.
    pub(super) async fn money(&mut self, cmd: &Command) -> R<Reply> {
        let (Some(key), idem) = (cmd.key(), cmd.idem()) else {
            return Err(corrupt("money call without a key"));
        };
        let Some(id) = self.agent_by_key(key).await? else {
            return Ok(Reply::deny(DenyReason::InvalidCredentials));
        };
        // Credentials come first, even before a replay: a revoked or expired key never gets an
        // earlier 2xx back (the call below denies it), and its denial is not stored.
        let key_good = self.chain_credential(id)?.is_ok();
        let idem = idem.filter(|_| key_good);
        if let Some(idem) = idem {
            let prior: Option<(String, i64, String, i64)> = sqlx::query_as(
                "SELECT request_hash, status, body, created_at FROM idempotency WHERE agent_id = $1 AND key = $2",
            )
            .bind(id)
            .bind(&idem.key)
            .fetch_optional(&mut *self.tx)
            .await?;
            if let Some((hash, status, body, created)) = prior
                && created > self.now - IDEMPOTENCY_TTL_MS
            {
                if hash != idem.request_hash {
                    return Ok(Reply::refuse(Refusal::IdempotencyKeyReused));
                }
                return Ok(Reply { answer: Recorded::replay(status, body)?, replayed: true, outcome: None });
            }
        }
        let reply = match cmd {
            Command::Spend { scope, amount, memo, .. } => {
                self.spend_or_hold(id, scope, *amount, None, memo.as_deref()).await?
            }
            Command::Hold { scope, amount, expires_ms, .. } => {
                let terms = HoldTerms { expires_at: self.now.saturating_add(*expires_ms), on_expiry: "release" };
                self.spend_or_hold(id, scope, *amount, Some(terms), None).await?
            }
            Command::MeteredHold { scope, amount, expires_ms, .. } => {
                let terms = HoldTerms { expires_at: self.now.saturating_add(*expires_ms), on_expiry: "capture" };
                self.spend_or_hold(id, scope, *amount, Some(terms), None).await?
            }
            Command::Lease { scope, unit, slots, expires_ms, .. } => {
                self.lease(id, scope, *unit, *slots, *expires_ms).await?
            }
            Command::Capture { hold_id, amount, .. } => self.settle(id, hold_id, Some(*amount)).await?,
            Command::Release { hold_id, .. } => self.settle(id, hold_id, None).await?,
            _ => return Err(corrupt("not a money call")),
        };
        if let Some(idem) = idem {
            sqlx::query(
                "INSERT INTO idempotency (agent_id, key, request_hash, status, body, created_at) \
                 VALUES ($1, $2, $3, $4, $5, $6) ON CONFLICT (agent_id, key) DO UPDATE SET \
                 request_hash = excluded.request_hash, status = excluded.status, body = excluded.body, \
                 created_at = excluded.created_at",
            )
            .bind(id)
            .bind(&idem.key)
            .bind(&idem.request_hash)
            .bind(RECORD_TYPED)
            .bind(Recorded::of(&reply.answer)?)
            .bind(self.now)
            .execute(&mut *self.tx)
            .await?;
        }
        Ok(reply)
    }

    /// Counts a denial of agent `id` and, when `feeds_breaker` and the agent is active, steps its
    /// breaker's denial window: whether the breaker tripped (the caller suspends the agent once
    /// its event is written).
    pub(super) fn count_denial(&mut self, id: i64, feeds_breaker: bool) -> R<bool> {
        let (now, default_breaker) = (self.now, self.breaker);
        let row = self.row_mut(id)?;
        row.denied_count += 1;
        if !feeds_breaker || row.status != AgentStatus::Active {
            return Ok(false);
        }
        let b = row.breaker(default_breaker);
        if b.denials == 0 {
            return Ok(false);
        }
        let recent: Vec<i64> = row.breaker_recent.split(',').filter_map(|t| t.parse().ok()).collect();
        let (recent, tripped) = denial_step(&recent, b.denials, b.window_ms, now);
        row.breaker_recent = recent.iter().map(i64::to_string).collect::<Vec<_>>().join(",");
        Ok(tripped)
    }

    /// Records a denial: counts it, feeds the breaker, writes the audit event.
    pub(super) fn deny(
        &mut self,
        id: i64,
        action: &str,
        reason: DenyReason,
        scope: Option<&Scope>,
        amount: Option<Micros>,
    ) -> R<Reply> {
        let now = self.now;
        let alerting = !self.rules.webhooks.is_empty();
        let suspended = self.count_denial(id, reason.feeds_breaker())?;
        let row = self.row_mut(id)?;
        let handle = row.handle.clone();
        let window_index = row.member(now).counters.window_index;
        let cap_hit = matches!(reason, DenyReason::SpendingCap | DenyReason::LifetimeCap)
            && row.cap_alerted_window != window_index
            && alerting;
        if cap_hit {
            row.cap_alerted_window = window_index;
            let cap = if reason == DenyReason::SpendingCap { "spending_cap" } else { "lifetime_cap" };
            self.raise("cap_reached", &handle, json!({"cap": cap, "denied_amount": amount}));
        }
        let e = self.event(&handle, action, "denied");
        e.reason = Some(reason.code().to_owned());
        e.scope = scope.map(|s| s.as_str().to_owned());
        e.amount = amount.map(Micros::micros);
        if suspended {
            self.suspend(id, "runaway_loop_breaker")?;
        }
        let reply = match reason {
            DenyReason::PerTxLimit | DenyReason::SpendingCap | DenyReason::LifetimeCap | DenyReason::AncestorCap => {
                Reply::refuse(Refusal::OverLimit(self.over_limit(id, reason)?))
            }
            _ => Reply::deny(reason),
        };
        Ok(reply.with_outcome(Outcome { agent: handle, allowed: false, reason: reason.code(), spent: 0 }))
    }

    /// How an agent denied by a limit can recover: what it may still spend under every cap of its
    /// chain (its window and lifetime caps and each ancestor's), when its window resets and, when
    /// its own window cap refused, how long until then.
    fn over_limit(&self, id: i64, reason: DenyReason) -> R<OverLimit> {
        let now = self.now;
        let mut window: Option<Micros> = None;
        let mut lifetime: Option<Micros> = None;
        for a in self.chain(id)? {
            let m = self.row(a)?.member(now);
            let used = m.counters.window_spent.checked_add(m.counters.held).unwrap_or(Micros::MAX);
            let w = m.limits.spending_cap.saturating_sub(used);
            window = Some(window.map_or(w, |x| x.min(w)));
            if let Some(cap) = m.limits.lifetime_cap {
                let used = m.counters.lifetime_spent.checked_add(m.counters.held).unwrap_or(Micros::MAX);
                let l = cap.saturating_sub(used);
                lifetime = Some(lifetime.map_or(l, |x| x.min(l)));
            }
        }
        let m = self.row(id)?.member(now);
        let resets = m.limits.created_ms + (m.counters.window_index + 1) * m.limits.window_ms;
        Ok(OverLimit {
            reason,
            remaining: Remaining { window: window.unwrap_or(Micros::ZERO), lifetime },
            window_resets_at: resets,
            retry_after_ms: (reason == DenyReason::SpendingCap).then(|| (resets - now).max(0)),
        })
    }

    /// Suspends an active agent by its breaker: status, `suspended_at`, the audit event and the
    /// `agent_suspended` alert. Every trigger's state starts afresh.
    pub(super) fn suspend(&mut self, id: i64, reason: &str) -> R<()> {
        let now = self.now;
        let row = self.row_mut(id)?;
        if row.status != AgentStatus::Active {
            return Ok(());
        }
        row.status = AgentStatus::Suspended;
        row.suspended_at = Some(now);
        self.authz = true;
        let row = self.row_mut(id)?;
        row.clear_breaker_state();
        let handle = row.handle.clone();
        self.raise("agent_suspended", &handle, json!({"reason": reason}));
        let e = self.event(&handle, "agent.suspend", "allowed");
        e.reason = Some(reason.to_owned());
        Ok(())
    }

    /// Feeds a spend or hold request (allowed or denied) to the breaker's optional triggers and
    /// returns the one it trips, if any. Shadow agents, agents not active and refused
    /// credentials never feed them.
    pub(super) fn runaway_step(
        &mut self,
        id: i64,
        action: &str,
        scope: &Scope,
        amount: Micros,
        memo: Option<&str>,
    ) -> R<Option<&'static str>> {
        use bulkhead_core::runaway::{Repeats, fingerprint, rate_step, repeat_step};
        let now = self.now;
        let default_breaker = self.breaker;
        let credential_bad = self.chain_credential(id)?.is_err();
        let row = self.row(id)?;
        let b = row.breaker(default_breaker);
        if row.enforce == 0
            || row.status != AgentStatus::Active
            || credential_bad
            || (b.max_requests <= 0 && b.repeats <= 0)
        {
            return Ok(None);
        }
        let row = self.row_mut(id)?;
        let mut tripped = None;
        if b.max_requests > 0 {
            let (tat, trip) = rate_step(b.max_requests, b.rate_window_ms, row.breaker_rate_tat_us, now);
            row.breaker_rate_tat_us = tat;
            if trip {
                tripped = Some("runaway_rate");
            }
        }
        if b.repeats > 0 {
            let state = Repeats {
                hash: std::mem::take(&mut row.breaker_repeat_hash),
                count: row.breaker_repeat_count,
                since_ms: row.breaker_repeat_since,
            };
            let f = fingerprint(action, scope.as_str(), amount.micros(), memo);
            let (next, trip) = repeat_step(b.repeats, b.repeat_window_ms, &state, &f, now);
            row.breaker_repeat_hash = next.hash;
            row.breaker_repeat_count = next.count;
            row.breaker_repeat_since = next.since_ms;
            if trip && tripped.is_none() {
                tripped = Some("runaway_repeat");
            }
        }
        Ok(tripped)
    }

    /// A spend or a hold. The breaker's optional triggers see the request first; one that trips
    /// suspends the agent after the request was decided as usual.
    pub(super) async fn spend_or_hold(
        &mut self,
        id: i64,
        scope: &Scope,
        amount: Micros,
        hold_expires: Option<HoldTerms>,
        memo: Option<&str>,
    ) -> R<Reply> {
        let action = if hold_expires.is_some() { "hold" } else { "spend" };
        let tripped = self.runaway_step(id, action, scope, amount, memo)?;
        let reply = self.decide_movement(id, scope, amount, hold_expires, memo).await?;
        if let Some(reason) = tripped {
            self.suspend(id, reason)?;
        }
        Ok(reply)
    }

    pub(super) async fn decide_movement(
        &mut self,
        id: i64,
        scope: &Scope,
        amount: Micros,
        hold_expires: Option<HoldTerms>,
        memo: Option<&str>,
    ) -> R<Reply> {
        let now = self.now;
        let action = if hold_expires.is_some() { "hold" } else { "spend" };
        let chain = self.chain(id)?;
        self.expire_for_chain(&chain).await?;
        let links = self.links(id)?;
        let check = SpendCheck { chain: &links, scope: Some(scope) };
        // Shadow mode (root agents only) records what would have been denied and lets it through.
        let shadow = self.row(id)?.enforce == 0;
        let members = chain.iter().map(|a| self.row(*a).map(|r| r.member(now))).collect::<R<Vec<_>>>()?;
        let (verdict, taken) = verdict(&check, &members, amount, shadow, now);
        self.store_taken(&chain, &taken)?;
        let would_deny = match verdict {
            Verdict::Allow => None,
            Verdict::ShadowAllow(reason) => Some(reason),
            Verdict::Deny(reason) => return self.deny(id, action, reason, Some(scope), Some(amount)),
        };
        if hold_expires.is_some_and(|t| t.on_expiry == "release")
            && self.open_holds_of(id).await? >= self.limits.open_holds_per_agent
        {
            return self.deny(id, action, DenyReason::TooManyOpenHolds, Some(scope), Some(amount));
        }
        let movement = if hold_expires.is_some() { Movement::Hold(amount) } else { Movement::Spend(amount) };
        // A shadow agent's over-cap spend is the one movement that may break a cap, by design.
        self.move_allowed(&chain, &members, movement, would_deny.is_some())?;
        self.record_allowed(id, scope, amount, hold_expires, memo, would_deny)
    }

    /// How many API holds (`on_expiry = release`) `id` has open: those in the table, as this
    /// batch last saw them, and those it opened. Nothing held on the agent's subtree means none.
    async fn open_holds_of(&mut self, id: i64) -> R<i64> {
        let row = self.row(id)?;
        if row.held == 0 {
            return Ok(0);
        }
        let root = row.root_id;
        let stored: Vec<(String,)> = sqlx::query_as(
            "SELECT id FROM holds WHERE root_id = $1 AND agent_id = $2 AND status = 'open' AND on_expiry = 'release'",
        )
        .bind(root)
        .bind(id)
        .fetch_all(&mut *self.tx)
        .await?;
        let in_table = stored.iter().filter(|(h,)| !self.holds.contains_key(h)).count();
        let in_batch = self
            .holds
            .values()
            .filter(|h| h.agent_id == id && h.status == HoldStatus::Open && h.on_expiry == "release")
            .count();
        Ok(i64::try_from(in_table + in_batch).unwrap_or(i64::MAX))
    }

    /// After an allowed spend or hold was applied: counts it, opens the hold, writes the audit
    /// event (marked when a shadow agent's movement would have been denied) and answers.
    fn record_allowed(
        &mut self,
        id: i64,
        scope: &Scope,
        amount: Micros,
        hold_expires: Option<HoldTerms>,
        memo: Option<&str>,
        would_deny: Option<DenyReason>,
    ) -> R<Reply> {
        let now = self.now;
        let row = self.row_mut(id)?;
        row.tx_count += 1;
        let handle = row.handle.clone();
        let m = row.member(now);
        let remaining = Remaining {
            window: m.limits.spending_cap.saturating_sub(m.counters.window_spent).saturating_sub(m.counters.held),
            lifetime: m
                .limits
                .lifetime_cap
                .map(|c| c.saturating_sub(m.counters.lifetime_spent).saturating_sub(m.counters.held)),
        };
        let resets = m.limits.created_ms + (m.counters.window_index + 1) * m.limits.window_ms;
        let reply = match hold_expires {
            None => {
                let sid = format!("sp_{}", random_base62(&mut self.rng, 22));
                let e = self.event(&handle, "spend", "allowed");
                e.scope = Some(scope.as_str().to_owned());
                e.amount = Some(amount.micros());
                e.reference = Some(sid.clone());
                e.detail = memo.map(|m| json!({"memo": m}).to_string());
                shadow_mark(e, would_deny);
                Reply::ok(Answer::Spent(Spent {
                    id: sid,
                    amount,
                    remaining,
                    window_resets_at: resets,
                    shadow_denied: would_deny,
                }))
            }
            Some(terms) => {
                let hid = self.open_hold(id, scope, amount, terms)?;
                let e = self.event(&handle, "hold", "allowed");
                e.scope = Some(scope.as_str().to_owned());
                e.amount = Some(amount.micros());
                e.reference = Some(hid.clone());
                shadow_mark(e, would_deny);
                let expires_at = terms.expires_at;
                Reply::ok(Answer::Held(Held { id: hid, amount, expires_at, remaining, shadow_denied: would_deny }))
            }
        };
        let spent = if hold_expires.is_some() { 0 } else { amount.micros() };
        Ok(reply.with_outcome(Outcome { agent: handle, allowed: true, reason: "", spent }))
    }

    /// Opens a hold of `amount` for agent `id` in the batch (written with the batch's other
    /// rows); returns its id.
    fn open_hold(&mut self, id: i64, scope: &Scope, amount: Micros, terms: HoldTerms) -> R<String> {
        let hid = format!("hold_{}", random_base62(&mut self.rng, 22));
        let row = self.row(id)?;
        let (root_id, path) = (row.root_id, row.path.clone());
        let HoldTerms { expires_at, on_expiry } = terms;
        self.holds.insert(
            hid.clone(),
            HoldRow {
                id: hid.clone(),
                agent_id: id,
                path: path.clone(),
                scope: scope.as_str().to_owned(),
                amount: amount.micros(),
                captured: 0,
                settled_seq: 0,
                status: HoldStatus::Open,
                expires_at,
                on_expiry: on_expiry.into(),
            },
        );
        self.new_holds.push(NewHold {
            id: hid.clone(),
            agent_id: id,
            root_id,
            path,
            scope: scope.as_str().to_owned(),
            amount: amount.micros(),
            created_at: self.now,
            expires_at,
            on_expiry,
        });
        Ok(hid)
    }

    /// Captures `amount` of a hold (releasing the rest), or releases it whole when `None`.
    pub(super) async fn settle(&mut self, id: i64, hold_id: &str, amount: Option<Micros>) -> R<Reply> {
        let action = if amount.is_some() { "capture" } else { "release" };
        // Settling an existing hold is allowed while suspended and is not rate limited: refusing
        // it would only keep money reserved longer. Only the credentials are checked.
        if let Err(reason) = self.chain_credential(id)? {
            return self.deny(id, action, reason, None, amount);
        }
        self.settle_hold(Some(id), hold_id, amount).await
    }

    /// Captures `amount` of an open hold (releasing the rest), or releases it whole when `None`.
    /// `owner`: the calling agent, whose hold it must be; `None` for the gateway's own settlement
    /// of a call it forwarded, which needs no key (the key may have been rotated mid-call).
    pub(super) async fn settle_hold(&mut self, owner: Option<i64>, hold_id: &str, amount: Option<Micros>) -> R<Reply> {
        let action = if amount.is_some() { "capture" } else { "release" };
        let hold = self.hold_by_id(hold_id).await?;
        // An agent settles only its own holds, never a gateway's (that would make forwarded
        // calls free); the gateway settles those by id.
        let Some(hold) = hold.filter(|h| owner.is_none_or(|o| h.agent_id == o && h.on_expiry != "capture")) else {
            return Ok(Reply::refuse(Refusal::NotFound(Missing::Hold)));
        };
        let ids = path_ids(&hold.path);
        self.load_ids(&ids).await?;
        let handle = self.row(hold.agent_id)?.handle.clone();
        if hold.status != HoldStatus::Open || hold.expires_at <= self.now {
            return Ok(Reply::refuse(Refusal::HoldClosed { lease: false, was: hold_end(hold.status) }));
        }
        let held = Micros::from_micros(hold.amount).ok_or_else(|| corrupt("negative hold"))?;
        let captured = amount.unwrap_or(Micros::ZERO);
        if captured > held {
            return Ok(Reply::refuse(Refusal::InvalidAmount(AmountProblem::CaptureAboveHold { held })));
        }
        let released = held.checked_sub(captured).ok_or_else(|| corrupt("capture above hold"))?;
        self.close_hold(
            &hold,
            captured,
            if amount.is_some() { HoldStatus::Captured } else { HoldStatus::Released },
            self.now,
        )
        .await?;
        let e = self.event(&handle, action, "allowed");
        e.amount = Some(if amount.is_some() { captured.micros() } else { released.micros() });
        e.reference = Some(hold.id.clone());
        if owner.is_none() {
            e.detail = Some(json!({"by": "gateway"}).to_string());
        }
        let reply =
            Reply::ok(Answer::Settled(Settled { id: hold.id.clone(), captured: amount.map(|_| captured), released }));
        Ok(reply.with_outcome(Outcome { agent: handle, allowed: true, reason: "", spent: captured.micros() }))
    }
}

/// Marks the audit event of a shadow agent's movement that enforcement would have denied.
fn shadow_mark(e: &mut NewEvent, would_deny: Option<DenyReason>) {
    if let Some(r) = would_deny {
        e.reason = Some(r.code().to_owned());
        let mut d: serde_json::Value =
            e.detail.as_deref().and_then(|d| serde_json::from_str(d).ok()).unwrap_or_else(|| json!({}));
        d["shadow"] = json!("would_deny");
        e.detail = Some(d.to_string());
    }
}
