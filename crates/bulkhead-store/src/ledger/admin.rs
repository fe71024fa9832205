//! Admin commands: agents created (by the admin or a parent, with the child checks), patched,
//! resumed, given a new key, and revoked with their subtree. Each moves the authorization epoch
//! where it changes what a credential may do. No money moves here except the holds a
//! revocation releases.

use bulkhead_core::decision::{Bounds, Escalation, SpendCheck, bounds_check, child_check, earliest_expiry, precheck};
use bulkhead_core::runaway::BreakerOverride;
use bulkhead_core::{DenyReason, KeyHash, Micros, Scope};
use serde_json::json;
use sqlx::any::AnyArguments;

use super::batch::{Batch, HOLD_COLUMNS, HoldRow, R, corrupt};
use super::{AGENT_DEPTH_MAX, AgentSpec, CHILDREN_PER_AGENT_MAX, Caller, Patch};
use crate::answer::{Answer, Missing, Refusal, Reply, Revived};
use crate::view::{AGENT_COLUMNS, AGENT_INSERTED, AgentRow, AgentStatus};

impl Batch {
    pub(super) async fn rotate_key(&mut self, handle: &str, key_hash: &KeyHash) -> R<Reply> {
        let Some(id) = self.agent_by_handle(handle).await? else {
            return Ok(Reply::refuse(Refusal::NotFound(Missing::Agent)));
        };
        if self.row(id)?.status == AgentStatus::Revoked {
            return Ok(Reply::refuse(Refusal::AgentRevoked(Revived::RotateKey)));
        }
        let old = self.row(id)?.key_hash.clone();
        self.by_key.remove(&old);
        self.by_key.insert(key_hash.as_str().to_owned(), id);
        self.row_mut(id)?.key_hash = key_hash.as_str().to_owned();
        self.authz = true;
        let h = self.row(id)?.handle.clone();
        self.event(&h, "agent.rotate_key", "allowed");
        Ok(Reply::ok(Answer::KeyRotated))
    }

    /// Resumes a suspended agent (an active one is answered as it is); every breaker trigger
    /// starts afresh.
    pub(super) async fn resume(&mut self, handle: &str) -> R<Reply> {
        let Some(id) = self.agent_by_handle(handle).await? else {
            return Ok(Reply::refuse(Refusal::NotFound(Missing::Agent)));
        };
        match self.row(id)?.status {
            AgentStatus::Revoked => {
                return Ok(Reply::refuse(Refusal::AgentRevoked(Revived::Resume)));
            }
            AgentStatus::Suspended => {
                let r = self.row_mut(id)?;
                r.status = AgentStatus::Active;
                r.suspended_at = None;
                r.clear_breaker_state();
                let h = r.handle.clone();
                // Refusals of the suspension remembered in memory lapse with the epoch.
                self.authz = true;
                self.event(&h, "agent.resume", "allowed");
            }
            AgentStatus::Active => {}
        }
        self.agent_reply(id, false)
    }

    /// An operator's suspension (contract §4): the agent, and through the chain checks its whole
    /// subtree, is refused with `agent_suspended` until resumed. A suspended agent is answered as
    /// it is. Like a revocation, it moves the authorization epoch, so every server sees it once
    /// answered.
    pub(super) async fn suspend_agent(&mut self, handle: &str, reason: Option<&str>) -> R<Reply> {
        let Some(id) = self.agent_by_handle(handle).await? else {
            return Ok(Reply::refuse(Refusal::NotFound(Missing::Agent)));
        };
        match self.row(id)?.status {
            AgentStatus::Revoked => return Ok(Reply::refuse(Refusal::AgentRevoked(Revived::Suspend))),
            AgentStatus::Suspended => {}
            AgentStatus::Active => {
                let now = self.now;
                let r = self.row_mut(id)?;
                r.status = AgentStatus::Suspended;
                r.suspended_at = Some(now);
                r.clear_breaker_state();
                self.authz = true;
                let reason = reason.unwrap_or("operator");
                self.raise("agent_suspended", handle, json!({"reason": reason, "by": "admin"}));
                let e = self.event(handle, "agent.suspend", "allowed");
                e.reason = Some(reason.to_owned());
                e.detail = Some(json!({"by": "admin"}).to_string());
            }
        }
        self.agent_reply(id, false)
    }

    /// The agent as it stands in the batch: a new one (`created`) or a changed one.
    pub(super) fn agent_reply(&self, id: i64, created: bool) -> R<Reply> {
        let row = self.row(id)?;
        let parent = match row.parent_id {
            Some(p) => Some(self.row(p)?.handle.clone()),
            None => None,
        };
        let view = Box::new(row.view(parent, crate::view::Swept::default(), self.now));
        Ok(Reply::ok(if created { Answer::Created(view) } else { Answer::Agent(view) }))
    }

    /// A parent's attempt to give a child more than it has: refused (403) and audited on the
    /// parent's trail (it feeds neither `denied_count` nor the breaker).
    pub(super) fn refuse_child(&mut self, parent: &str, spec: &AgentSpec, refusal: Refusal, code: &str) -> Reply {
        let e = self.event(parent, "agent.create", "denied");
        e.reason = Some(code.to_owned());
        e.detail = Some(json!({"child": spec.handle.as_str()}).to_string());
        Reply::refuse(refusal)
    }

    /// The parent an agent's key may create `spec` under: its chain's credentials, suspension,
    /// `spawn:agents` scope and rate limits (in the contract's order), then the child checks
    /// (scopes and caps no wider than its own; rate limit, key expiry and breaker no looser, a
    /// child that names none taking its parent's) and the tree's limits. `Ok`: the parent and
    /// the spec as the child gets it; `Err`: the refusal to answer.
    async fn spawning_parent(&mut self, key: &KeyHash, spec: &AgentSpec) -> R<Result<Spawn, Reply>> {
        let Some(pid) = self.agent_by_key(key).await? else {
            return Ok(Err(Reply::deny(DenyReason::InvalidCredentials)));
        };
        let spawn = Scope::parse("spawn:agents").map_err(|e| corrupt(&e))?;
        let links = self.links(pid)?;
        let chain = self.chain(pid)?;
        match precheck(&SpendCheck { chain: &links, scope: Some(&spawn) }, self.now) {
            Ok(taken) => self.store_taken(&chain, &taken)?,
            Err(reason) => return Ok(Err(self.deny(pid, "agent.create", reason, Some(&spawn), None)?)),
        }
        let p = self.row(pid)?;
        let scopes = p.scope_set();
        let per_tx = spec.per_tx_limit.unwrap_or(spec.spending_cap);
        let mut spec = spec.clone();
        // What the child does not name, it takes from its parent.
        let parent_expiry = earliest_expiry(&links);
        spec.rate_limit = spec.rate_limit.or(p.rate_limit());
        let expires_at = match spec.expires_in {
            Some(d) => Some(self.now.saturating_add(d.millis())),
            None => parent_expiry,
        };
        spec.breaker = match (spec.breaker, p.breaker_override()) {
            (Some(c), Some(parent)) => Some(c.or(parent)),
            (c, parent) => c.or(parent),
        };
        let parent_bounds =
            Bounds { rate: p.rate_limit(), expires_ms: parent_expiry, breaker: p.breaker(self.breaker) };
        let child_bounds = Bounds {
            rate: spec.rate_limit,
            expires_ms: expires_at,
            breaker: spec.breaker.map_or(self.breaker, |o| o.over(self.breaker)),
        };
        let escalation = child_check(&scopes, &p.limits(), &spec.scopes, spec.spending_cap, per_tx, spec.lifetime_cap)
            .and_then(|()| bounds_check(&parent_bounds, &child_bounds))
            .err();
        if let Some(e) = escalation {
            let (refusal, code) = match e {
                Escalation::Scope => (Refusal::ScopeEscalation, "scope_escalation"),
                Escalation::Cap => (Refusal::CapEscalation(None), "cap_escalation"),
                Escalation::Looser(what) => (Refusal::CapEscalation(Some(what)), "cap_escalation"),
            };
            let h = p.handle.clone();
            return Ok(Err(self.refuse_child(&h, &spec, refusal, code)));
        }
        let root_id = p.root_id;
        if p.depth + 1 > AGENT_DEPTH_MAX {
            return Ok(Err(Reply::refuse(Refusal::TreeTooDeep { depth_max: AGENT_DEPTH_MAX })));
        }
        let (n,): (i64,) = sqlx::query_as("SELECT COUNT(*) FROM agents WHERE parent_id = $1")
            .bind(pid)
            .fetch_one(&mut *self.tx)
            .await?;
        if n >= CHILDREN_PER_AGENT_MAX {
            return Ok(Err(Reply::refuse(Refusal::TooManyChildren { children_max: CHILDREN_PER_AGENT_MAX })));
        }
        let (n,): (i64,) = sqlx::query_as("SELECT COUNT(*) FROM agents WHERE root_id = $1")
            .bind(root_id)
            .fetch_one(&mut *self.tx)
            .await?;
        let agents_max = self.limits.agents_per_tree;
        if n >= agents_max {
            return Ok(Err(Reply::refuse(Refusal::TreeTooLarge { agents_max })));
        }
        Ok(Ok(Spawn { parent: pid, spec, key_expires_at: expires_at }))
    }

    /// Creates an agent: the parent's checks, then the new row (the bulk of its length: a literal
    /// naming every column, so that none is left to a default by oversight) inserted through the
    /// column list of `view.rs`, its place in the tree, and the audit event.
    pub(super) async fn create_agent(&mut self, caller: &Caller, spec: &AgentSpec, key_hash: &KeyHash) -> R<Reply> {
        let now = self.now;
        if !spec.enforce && matches!(caller, Caller::Agent(_)) {
            return Ok(Reply::refuse(Refusal::ShadowNotRoot));
        }
        let (parent, spec, expires) = match caller {
            Caller::Admin => (None, spec.clone(), spec.expires_in.map(|s| now.saturating_add(s.millis()))),
            Caller::Agent(key) => match self.spawning_parent(key, spec).await? {
                Ok(s) => (Some(s.parent), s.spec, s.key_expires_at),
                Err(refused) => return Ok(refused),
            },
        };
        let spec = &spec;
        let per_tx = spec.per_tx_limit.unwrap_or(spec.spending_cap);
        let (rate_requests, rate_per_ms) =
            spec.rate_limit.map(|r| (Some(r.requests), Some(r.per_ms))).unwrap_or((None, None));
        let scopes = spec.scopes.to_strings().join(" ");
        let labels = serde_json::Value::Object(spec.labels.clone()).to_string();
        // Every column of the new row, each as its column's default would have it where the
        // spec says nothing; its place in the tree (root, path, depth) follows once it has an id.
        let mut new = AgentRow {
            id: 0,
            handle: spec.handle.as_str().to_owned(),
            parent_id: parent,
            root_id: 0,
            path: String::new(),
            depth: 0,
            status: AgentStatus::Active,
            key_hash: key_hash.as_str().to_owned(),
            key_expires_at: expires,
            scopes,
            spending_cap: spec.spending_cap.micros(),
            window_ms: spec.window.millis(),
            per_tx_limit: per_tx.micros(),
            lifetime_cap: spec.lifetime_cap.map(Micros::micros),
            rate_requests,
            rate_per_ms,
            rate_tat: 0,
            breaker_denials: None,
            breaker_window_ms: None,
            breaker_recent: String::new(),
            breaker_max_requests: None,
            breaker_rate_window_ms: None,
            breaker_repeats: None,
            breaker_repeat_window_ms: None,
            breaker_rate_tat_us: 0,
            breaker_repeat_hash: String::new(),
            breaker_repeat_count: 0,
            breaker_repeat_since: 0,
            cap_alerted_window: -1,
            enforce: i64::from(spec.enforce),
            labels,
            created_at: now,
            revoked_at: None,
            revoke_reason: None,
            suspended_at: None,
            window_index: 0,
            window_spent: 0,
            held: 0,
            lifetime_spent: 0,
            tx_count: 0,
            denied_count: 0,
        };
        new.set_breaker_override(spec.breaker);
        let params: Vec<String> = (1..=AGENT_INSERTED.len()).map(|i| format!("${i}")).collect();
        let sql = format!(
            "INSERT INTO agents ({}) VALUES ({}) ON CONFLICT DO NOTHING RETURNING id",
            AGENT_INSERTED.join(", "),
            params.join(", ")
        );
        let mut args = AnyArguments::default();
        new.bind_inserted(&mut args).map_err(|e| corrupt(&e.to_string()))?;
        let row: Option<(i64,)> =
            sqlx::query_as_with(sqlx::AssertSqlSafe(sql), args).fetch_optional(&mut *self.tx).await?;
        let Some((id,)) = row else {
            return Ok(Reply::refuse(Refusal::HandleTaken));
        };
        let (root_id, path, depth) = match parent {
            None => (id, format!(",{id},"), 0),
            Some(pid) => {
                let p = self.row(pid)?;
                (p.root_id, format!("{}{id},", p.path), p.depth + 1)
            }
        };
        sqlx::query("UPDATE agents SET root_id = $1, path = $2, depth = $3 WHERE id = $4")
            .bind(root_id)
            .bind(&path)
            .bind(depth)
            .bind(id)
            .execute(&mut *self.tx)
            .await?;
        let row: AgentRow = sqlx::query_as(dsql!("SELECT {AGENT_COLUMNS} FROM agents WHERE id = $1"))
            .bind(id)
            .fetch_one(&mut *self.tx)
            .await?;
        self.cache(row);
        let by = match parent {
            None => "admin".to_owned(),
            Some(p) => self.row(p)?.handle.clone(),
        };
        let e = self.event(spec.handle.as_str(), "agent.create", "allowed");
        e.detail =
            Some(json!({"by": by, "scopes": spec.scopes.to_strings(), "spending_cap": spec.spending_cap}).to_string());
        self.agent_reply(id, true)
    }

    pub(super) async fn patch_agent(&mut self, handle: &str, p: &Patch) -> R<Reply> {
        let Some(id) = self.agent_by_handle(handle).await? else {
            return Ok(Reply::refuse(Refusal::NotFound(Missing::Agent)));
        };
        let now = self.now;
        if p.enforce == Some(false) && self.row(id)?.parent_id.is_some() {
            return Ok(Reply::refuse(Refusal::ShadowNotRoot));
        }
        self.authz = true;
        let row = self.row_mut(id)?;
        let mut changed = serde_json::Map::new();
        if let Some(e) = p.enforce {
            row.enforce = i64::from(e);
            changed.insert("enforce".into(), json!(e));
        }
        if let Some(c) = p.spending_cap {
            row.spending_cap = c.micros();
            changed.insert("spending_cap".into(), json!(c));
        }
        if let Some(w) = p.window {
            // Keep what was spent: re-anchor the counters to the window that contains `now`
            // under the new length, so changing the window never forgives spend.
            let c = row.member(now).counters;
            row.window_ms = w.millis();
            let (k, _, _) = bulkhead_core::duration::window_at(row.created_at, row.window_ms, now);
            row.set_counters(bulkhead_core::Counters { window_index: k, ..c });
            changed.insert("window".into(), json!(w.to_string()));
        }
        if let Some(t) = p.per_tx_limit {
            row.per_tx_limit = t.micros();
            changed.insert("per_tx_limit".into(), json!(t));
        }
        if let Some(l) = p.lifetime_cap {
            row.lifetime_cap = l.map(Micros::micros);
            changed.insert("lifetime_cap".into(), json!(l));
        }
        if let Some(s) = &p.scopes {
            row.scopes = s.to_strings().join(" ");
            changed.insert("scopes".into(), json!(s.to_strings()));
        }
        if let Some(r) = p.rate_limit {
            row.rate_requests = r.map(|r| r.requests);
            row.rate_per_ms = r.map(|r| r.per_ms);
            changed.insert("rate_limit".into(), json!(r.map(|r| json!({"requests": r.requests, "per_ms": r.per_ms}))));
        }
        if let Some(l) = &p.labels {
            row.labels = serde_json::Value::Object(l.clone()).to_string();
            changed.insert("labels".into(), serde_json::Value::Object(l.clone()));
        }
        if let Some(b) = p.breaker {
            row.set_breaker_override(b);
            changed.insert("breaker".into(), json!(b.map(breaker_json)));
        }
        let e = self.event(handle, "agent.update", "allowed");
        e.detail = Some(serde_json::Value::Object(changed).to_string());
        self.agent_reply(id, false)
    }

    pub(super) async fn revoke(&mut self, caller: &Caller, handle: &str, reason: Option<&str>) -> R<Reply> {
        let now = self.now;
        if let Caller::Agent(key) = caller
            && let Some(refused) = self.parent_may_revoke(key, handle).await?
        {
            return Ok(refused);
        }
        let Some(tid) = self.agent_by_handle(handle).await? else {
            return Ok(Reply::refuse(Refusal::NotFound(Missing::Agent)));
        };
        let (root_id, like) = {
            let t = self.row(tid)?;
            (t.root_id, format!("%,{tid},%"))
        };
        let subtree: Vec<AgentRow> =
            sqlx::query_as(dsql!("SELECT {AGENT_COLUMNS} FROM agents WHERE root_id = $1 AND path LIKE $2"))
                .bind(root_id)
                .bind(&like)
                .fetch_all(&mut *self.tx)
                .await?;
        let mut ids: Vec<(i64, i64, String)> = Vec::new();
        for r in subtree {
            ids.push((r.depth, r.id, r.handle.clone()));
            self.cache(r);
        }
        ids.sort();
        let by = match caller {
            Caller::Admin => "admin".to_owned(),
            Caller::Agent(k) => self
                .by_key
                .get(k.as_str())
                .and_then(|id| self.agents.get(id))
                .map(|r| r.handle.clone())
                .unwrap_or_default(),
        };
        for (_, id, h) in &ids {
            let row = self.row(*id)?;
            if row.status == AgentStatus::Revoked {
                continue;
            }
            self.authz = true;
            let r = self.row_mut(*id)?;
            r.status = AgentStatus::Revoked;
            r.revoked_at = Some(now);
            r.revoke_reason = reason.map(str::to_owned);
            let e = self.event(h, "agent.revoke", "allowed");
            e.reason = reason.map(str::to_owned);
            e.detail = Some(json!({"by": by, "target": handle}).to_string());
            self.raise("agent_revoked", h, json!({"reason": reason, "by": by, "target": handle}));
        }
        // Holds already past their expiry (not swept yet) expired; they are not the revocation's.
        self.expire_holds(Some(&[root_id])).await?;
        self.flush_holds().await?;
        self.release_revoked_holds(root_id, &like).await?;
        let revoked_at = self.row(tid)?.revoked_at.unwrap_or(now);
        let handles: Vec<String> = ids.into_iter().map(|(_, _, h)| h).collect();
        Ok(Reply::ok(Answer::Revoked { handles, revoked_at }))
    }

    /// A parent may revoke only its own descendants, and only with a good credential.
    /// `Some`: the refusal to answer.
    async fn parent_may_revoke(&mut self, key: &KeyHash, handle: &str) -> R<Option<Reply>> {
        let Some(cid) = self.agent_by_key(key).await? else {
            return Ok(Some(Reply::deny(DenyReason::InvalidCredentials)));
        };
        if let Err(reason) = self.chain_credential(cid)? {
            return Ok(Some(Reply::deny(reason)));
        }
        // An unknown handle and someone else's agent get the same answer: an agent learns
        // nothing about agents outside its subtree.
        let Some(tid) = self.agent_by_handle(handle).await? else {
            return Ok(Some(Reply::refuse(Refusal::NotFound(Missing::Descendant))));
        };
        let t = self.row(tid)?;
        if tid == cid || !t.path_ids().contains(&cid) {
            return Ok(Some(Reply::refuse(Refusal::NotFound(Missing::Descendant))));
        }
        Ok(None)
    }

    /// Releases the open API holds of a revoked subtree (`like`: its path pattern).
    async fn release_revoked_holds(&mut self, root_id: i64, like: &str) -> R<()> {
        // The agents' own holds are released. A gateway lease stays open: it pays for calls
        // already forwarded, which its gateway settles at once (the revocation retires it), or
        // it is captured in full at expiry. Releasing it would make those calls free.
        // At most a chunk here, so that a revocation of many holds never stalls the other
        // decisions of its batch; the sweeper releases the rest, a chunk a second.
        let open: Vec<HoldRow> = sqlx::query_as(dsql!(
            "SELECT {HOLD_COLUMNS} FROM holds \
             WHERE root_id = $1 AND status = 'open' AND path LIKE $2 AND on_expiry = 'release' LIMIT $3"
        ))
        .bind(root_id)
        .bind(like)
        .bind(self.limits.revoked_holds_chunk)
        .fetch_all(&mut *self.tx)
        .await?;
        for h in open {
            self.release_revoked(&h).await?;
        }
        Ok(())
    }
}

/// A parent's go-ahead for a child: the child's spec as it gets it (what it did not name taken
/// from its parent) and its key's expiry.
struct Spawn {
    parent: i64,
    spec: AgentSpec,
    key_expires_at: Option<i64>,
}

/// A breaker override as the audit event of a patch shows it.
fn breaker_json(b: BreakerOverride) -> serde_json::Value {
    json!({
        "denials": b.denials, "window_ms": b.window_ms,
        "max_requests": b.max_requests, "rate_window_ms": b.rate_window_ms,
        "repeats": b.repeats, "repeat_window_ms": b.repeat_window_ms,
    })
}
