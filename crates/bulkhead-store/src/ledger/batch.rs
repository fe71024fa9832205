//! One batch: its transaction, the root locks (PostgreSQL), the row cache every command of the
//! batch reads and changes, the prefetch that fills it in a few queries, and the dispatch of
//! each command to the file that carries it out. It writes nothing itself (see `rows.rs`).

use std::collections::{BTreeSet, HashMap};
use std::sync::Arc;

use bulkhead_core::runaway::Breaker;
use bulkhead_core::{DenyReason, KeyHash};
use rand::rngs::StdRng;
use sqlx::any::AnyArguments;
use sqlx::{Any, Arguments, Transaction};

use super::Command;
use super::writer::BatchError;
use crate::alerts::{AlertRules, NewAlert};
use crate::answer::{Answer, HoldEnd, Reply};
use crate::audit::NewEvent;
use crate::view::{AGENT_COLUMNS, AgentRow, AgentStatus};
use crate::{Backend, StoreError};

/// How a new hold ends if nobody settles it.
#[derive(Clone, Copy, Debug)]
pub(super) struct HoldTerms {
    pub(super) expires_at: i64,
    /// `release` (API holds) or `capture` (gateway holds).
    pub(super) on_expiry: &'static str,
}

/// Builds `prefix ($1, $2, …) suffix` binding every item.
pub(super) fn in_list<T>(prefix: &str, items: &[T], suffix: &str) -> Result<(String, AnyArguments), StoreError>
where
    T: Clone + for<'q> sqlx::Encode<'q, Any> + sqlx::Type<Any> + 'static,
{
    let mut args = AnyArguments::default();
    let mut sql = String::from(prefix);
    sql.push('(');
    for (i, item) in items.iter().enumerate() {
        if i > 0 {
            sql.push_str(", ");
        }
        sql.push_str(&format!("${}", i + 1));
        args.add(item.clone()).map_err(|e| StoreError::Corrupt(e.to_string()))?;
    }
    sql.push(')');
    sql.push_str(suffix);
    Ok((sql, args))
}

pub(super) fn in_list_str(prefix: &str, items: &[&str], suffix: &str) -> Result<(String, AnyArguments), StoreError> {
    let owned: Vec<String> = items.iter().map(|s| s.to_string()).collect();
    in_list(prefix, &owned, suffix)
}

/// How a hold that is no longer open ended; one still marked open has expired.
pub(super) fn hold_end(status: HoldStatus) -> HoldEnd {
    match status {
        HoldStatus::Captured => HoldEnd::Captured,
        HoldStatus::Released => HoldEnd::Released,
        HoldStatus::Open | HoldStatus::Expired => HoldEnd::Expired,
    }
}

/// A hold's status, as stored in `holds.status`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum HoldStatus {
    Open,
    Captured,
    Released,
    Expired,
}

impl HoldStatus {
    pub(super) fn as_str(self) -> &'static str {
        match self {
            HoldStatus::Open => "open",
            HoldStatus::Captured => "captured",
            HoldStatus::Released => "released",
            HoldStatus::Expired => "expired",
        }
    }
}

impl TryFrom<String> for HoldStatus {
    type Error = String;

    fn try_from(s: String) -> Result<HoldStatus, String> {
        match s.as_str() {
            "open" => Ok(HoldStatus::Open),
            "captured" => Ok(HoldStatus::Captured),
            "released" => Ok(HoldStatus::Released),
            "expired" => Ok(HoldStatus::Expired),
            _ => Err(format!("unknown hold status {s:?}")),
        }
    }
}

#[derive(Clone, sqlx::FromRow)]
pub(super) struct HoldRow {
    pub(super) id: String,
    pub(super) agent_id: i64,
    pub(super) path: String,
    pub(super) scope: String,
    /// What the hold still holds (a lease's settled slots are gone from it).
    pub(super) amount: i64,
    /// What was captured of it so far (a lease is captured call by call while open).
    pub(super) captured: i64,
    /// The last `LeaseSettle` applied to it (its gateway numbers them 1, 2, …).
    pub(super) settled_seq: i64,
    #[sqlx(try_from = "String")]
    pub(super) status: HoldStatus,
    pub(super) expires_at: i64,
    pub(super) on_expiry: String,
}

/// The columns of a [`HoldRow`].
pub(super) const HOLD_COLUMNS: &str =
    "id, agent_id, path, scope, amount, COALESCE(captured, 0) AS captured, status, expires_at, on_expiry, settled_seq";

pub(super) fn path_ids(path: &str) -> Vec<i64> {
    path.split(',').filter_map(|s| s.parse().ok()).collect()
}

pub(super) struct Batch {
    pub(super) tx: Transaction<'static, Any>,
    pub(super) backend: Backend,
    pub(super) now: i64,
    pub(super) breaker: Breaker,
    pub(super) limits: super::Limits,
    pub(super) rules: Arc<AlertRules>,
    /// Alerts raised by this batch, written to the outbox before the commit.
    pub(super) alerts: Vec<NewAlert>,
    pub(super) agents: HashMap<i64, AgentRow>,
    pub(super) by_key: HashMap<String, i64>,
    pub(super) by_handle: HashMap<String, i64>,
    pub(super) dirty: BTreeSet<i64>,
    /// Trees whose expired holds this batch has already closed.
    pub(super) swept: BTreeSet<i64>,
    pub(super) events: Vec<NewEvent>,
    /// Hold rows this batch read or made, as they stand in the batch.
    pub(super) holds: HashMap<String, HoldRow>,
    /// Holds made by this batch and not yet written.
    pub(super) new_holds: Vec<NewHold>,
    /// Holds closed by this batch and not yet written: (id, status, captured, closed_at).
    pub(super) closed_holds: Vec<(String, HoldStatus, i64, i64)>,
    /// Open leases this batch settled calls of (their `amount` and `captured` to write).
    pub(super) touched_holds: BTreeSet<String>,
    /// This batch changed what some credential may do (a revocation, a patch, a new key, a
    /// suspension): the ledger's authorization epoch moves on once it commits.
    pub(super) authz: bool,
    /// Where the batch's ids come from (seeded by the writer's generator; never for secrets).
    pub(super) rng: StdRng,
}

/// A hold to insert.
pub(super) struct NewHold {
    pub(super) id: String,
    pub(super) agent_id: i64,
    pub(super) root_id: i64,
    pub(super) path: String,
    pub(super) scope: String,
    pub(super) amount: i64,
    pub(super) created_at: i64,
    pub(super) expires_at: i64,
    pub(super) on_expiry: &'static str,
}

pub(super) type R<T> = Result<T, BatchError>;

pub(super) fn corrupt(msg: &str) -> BatchError {
    BatchError::Before(StoreError::Corrupt(msg.to_owned()))
}

impl Batch {
    /// Finds the root of every tree the batch will touch. Roots never change, so this may read
    /// before the locks are taken.
    pub(super) async fn resolve_roots(&mut self, cmds: &[&Command]) -> R<Vec<i64>> {
        let mut keys: Vec<&str> = Vec::new();
        let mut handles: Vec<&str> = Vec::new();
        let mut holds: Vec<&str> = Vec::new();
        for c in cmds {
            if let Some(k) = c.key() {
                keys.push(k.as_str());
            }
            match c {
                Command::PatchAgent { handle, .. }
                | Command::Revoke { handle, .. }
                | Command::RotateKey { handle, .. }
                | Command::Resume { handle }
                | Command::Suspend { handle, .. } => handles.push(handle),
                _ => {}
            }
            if let Some(h) = c.hold_id() {
                holds.push(h);
            }
        }
        let mut roots = BTreeSet::new();
        for (prefix, items) in [
            ("SELECT root_id FROM agents WHERE key_hash IN ", &keys),
            ("SELECT root_id FROM agents WHERE handle IN ", &handles),
            ("SELECT root_id FROM holds WHERE id IN ", &holds),
        ] {
            if items.is_empty() {
                continue;
            }
            let mut uniq: Vec<&str> = items.clone();
            uniq.sort_unstable();
            uniq.dedup();
            let (sql, args) = in_list_str(prefix, &uniq, "")?;
            let rows: Vec<(i64,)> =
                sqlx::query_as_with(sqlx::AssertSqlSafe(sql), args).fetch_all(&mut *self.tx).await?;
            roots.extend(rows.into_iter().map(|r| r.0));
        }
        Ok(roots.into_iter().collect())
    }

    pub(super) async fn load_ids(&mut self, ids: &[i64]) -> R<()> {
        let missing: Vec<i64> = ids.iter().copied().filter(|id| !self.agents.contains_key(id)).collect();
        if missing.is_empty() {
            return Ok(());
        }
        let (sql, args) = in_list(&format!("SELECT {AGENT_COLUMNS} FROM agents WHERE id IN "), &missing, "")?;
        let rows: Vec<AgentRow> = sqlx::query_as_with(sqlx::AssertSqlSafe(sql), args).fetch_all(&mut *self.tx).await?;
        for r in rows {
            self.cache(r);
        }
        Ok(())
    }

    pub(super) fn cache(&mut self, r: AgentRow) {
        self.by_key.insert(r.key_hash.clone(), r.id);
        self.by_handle.insert(r.handle.clone(), r.id);
        self.agents.entry(r.id).or_insert(r);
    }

    pub(super) fn row(&self, id: i64) -> R<&AgentRow> {
        self.agents.get(&id).ok_or_else(|| corrupt("agent row missing from batch"))
    }

    pub(super) fn row_mut(&mut self, id: i64) -> R<&mut AgentRow> {
        self.dirty.insert(id);
        self.agents.get_mut(&id).ok_or_else(|| corrupt("agent row missing from batch"))
    }

    /// The agent holding this key, with its whole chain loaded. `None`: no such (current) key.
    pub(super) async fn agent_by_key(&mut self, key: &KeyHash) -> R<Option<i64>> {
        let id = match self.by_key.get(key.as_str()) {
            Some(id) => Some(*id),
            None => {
                let row: Option<AgentRow> =
                    sqlx::query_as(dsql!("SELECT {AGENT_COLUMNS} FROM agents WHERE key_hash = $1"))
                        .bind(key.as_str())
                        .fetch_optional(&mut *self.tx)
                        .await?;
                row.map(|r| {
                    let id = r.id;
                    self.cache(r);
                    id
                })
            }
        };
        let Some(id) = id else { return Ok(None) };
        // The cache may know this key from before a rotation in this same batch.
        let row = self.row(id)?;
        if !KeyHash::from_stored(row.key_hash.clone()).ct_eq(key) {
            return Ok(None);
        }
        let ids = row.path_ids();
        self.load_ids(&ids).await?;
        Ok(Some(id))
    }

    pub(super) async fn agent_by_handle(&mut self, handle: &str) -> R<Option<i64>> {
        if let Some(id) = self.by_handle.get(handle) {
            let id = *id;
            let ids = self.row(id)?.path_ids();
            self.load_ids(&ids).await?;
            return Ok(Some(id));
        }
        let row: Option<AgentRow> = sqlx::query_as(dsql!("SELECT {AGENT_COLUMNS} FROM agents WHERE handle = $1"))
            .bind(handle)
            .fetch_optional(&mut *self.tx)
            .await?;
        match row {
            None => Ok(None),
            Some(r) => {
                let (id, ids) = (r.id, r.path_ids());
                self.cache(r);
                self.load_ids(&ids).await?;
                Ok(Some(id))
            }
        }
    }

    /// The agent first, then each ancestor up to the root.
    pub(super) fn chain(&self, id: i64) -> R<Vec<i64>> {
        let mut ids = self.row(id)?.path_ids();
        ids.reverse();
        Ok(ids)
    }

    /// A hold as this batch knows it, else as stored.
    pub(super) async fn hold_by_id(&mut self, hold_id: &str) -> R<Option<HoldRow>> {
        if let Some(h) = self.holds.get(hold_id) {
            return Ok(Some(h.clone()));
        }
        Ok(sqlx::query_as(dsql!("SELECT {HOLD_COLUMNS} FROM holds WHERE id = $1"))
            .bind(hold_id)
            .fetch_optional(&mut *self.tx)
            .await?)
    }

    /// The chain as the core's ordered checks see it: the agent first, then each ancestor.
    pub(super) fn links(&self, id: i64) -> R<Vec<bulkhead_core::Link>> {
        self.chain(id)?
            .into_iter()
            .map(|a| {
                let r = self.row(a)?;
                Ok(bulkhead_core::Link {
                    revoked: r.status == AgentStatus::Revoked,
                    key_expires_ms: r.key_expires_at,
                    suspended: r.status == AgentStatus::Suspended,
                    scopes: r.scope_set(),
                    rate: r.rate_limit().map(|l| (l, r.rate_tat)),
                })
            })
            .collect()
    }

    /// The credential check over the agent's chain: no agent of it revoked, no key of it expired.
    pub(super) fn chain_credential(&self, id: i64) -> R<Result<(), DenyReason>> {
        let mut revoked = false;
        for a in self.chain(id)? {
            revoked |= self.row(a)?.status == AgentStatus::Revoked;
        }
        Ok(bulkhead_core::credential(revoked, self.chain_expiry(id)?, self.now))
    }

    /// When the agent's credential expires: the earliest key expiry of its chain.
    pub(super) fn chain_expiry(&self, id: i64) -> R<Option<i64>> {
        let mut expiry = None::<i64>;
        for a in self.chain(id)? {
            if let Some(k) = self.row(a)?.key_expires_at {
                expiry = Some(expiry.map_or(k, |e| e.min(k)));
            }
        }
        Ok(expiry)
    }

    /// Stores the rate limiters' states a decision took tokens from (`chain`: as `links` gave it).
    pub(super) fn store_taken(&mut self, chain: &[i64], taken: &[(usize, i64)]) -> R<()> {
        for (i, tat) in taken {
            let id = *chain.get(*i).ok_or_else(|| corrupt("a rate limiter outside the chain"))?;
            self.row_mut(id)?.rate_tat = *tat;
        }
        Ok(())
    }

    pub(super) fn event(&mut self, agent: &str, action: &str, outcome: &str) -> &mut NewEvent {
        self.events.push(NewEvent {
            at: self.now,
            agent: agent.to_owned(),
            action: action.to_owned(),
            outcome: outcome.to_owned(),
            reason: None,
            scope: None,
            amount: None,
            reference: None,
            detail: None,
        });
        self.events.last_mut().expect("just pushed")
    }

    /// Loads, in one query each, the rows of every key and handle the batch names and of their
    /// ancestors, so that commands on many agents do not cost one round trip each.
    pub(super) async fn prefetch(&mut self, cmds: &[&Command]) -> R<()> {
        let mut keys: Vec<&str> = Vec::new();
        let mut handles: Vec<&str> = Vec::new();
        for c in cmds {
            if let Some(k) = c.key()
                && !self.by_key.contains_key(k.as_str())
            {
                keys.push(k.as_str());
            }
            match c {
                Command::PatchAgent { handle, .. }
                | Command::Revoke { handle, .. }
                | Command::RotateKey { handle, .. }
                | Command::Resume { handle }
                | Command::Suspend { handle, .. }
                    if !self.by_handle.contains_key(handle.as_str()) =>
                {
                    handles.push(handle)
                }
                _ => {}
            }
        }
        let mut ancestors: BTreeSet<i64> = BTreeSet::new();
        for (prefix, items) in [
            (format!("SELECT {AGENT_COLUMNS} FROM agents WHERE key_hash IN "), &mut keys),
            (format!("SELECT {AGENT_COLUMNS} FROM agents WHERE handle IN "), &mut handles),
        ] {
            if items.is_empty() {
                continue;
            }
            items.sort_unstable();
            items.dedup();
            let (sql, args) = in_list_str(&prefix, items, "")?;
            let rows: Vec<AgentRow> =
                sqlx::query_as_with(sqlx::AssertSqlSafe(sql), args).fetch_all(&mut *self.tx).await?;
            for r in rows {
                ancestors.extend(r.path_ids());
                self.cache(r);
            }
        }
        // The holds that captures, releases and settlements name, in one query.
        let mut hold_ids: Vec<&str> =
            cmds.iter().filter_map(|c| c.hold_id()).filter(|id| !self.holds.contains_key(*id)).collect();
        if !hold_ids.is_empty() {
            hold_ids.sort_unstable();
            hold_ids.dedup();
            let (sql, args) = in_list_str(&format!("SELECT {HOLD_COLUMNS} FROM holds WHERE id IN "), &hold_ids, "")?;
            let rows: Vec<HoldRow> =
                sqlx::query_as_with(sqlx::AssertSqlSafe(sql), args).fetch_all(&mut *self.tx).await?;
            for h in rows {
                ancestors.extend(path_ids(&h.path));
                self.holds.insert(h.id.clone(), h);
            }
        }
        // Rows cached before this batch came with their ancestors; only the new ones need theirs.
        let missing: Vec<i64> = ancestors.into_iter().filter(|id| !self.agents.contains_key(id)).collect();
        self.load_ids(&missing).await
    }

    pub(super) async fn apply(&mut self, cmd: &Command) -> R<Reply> {
        match cmd {
            Command::SweepExpired => {
                self.expire_holds(None).await?;
                self.sweep_revoked_holds().await?;
                Ok(Reply::ok(Answer::Swept))
            }
            Command::RecordRefusals(tallies) => {
                for t in tallies {
                    let Some(id) = self.agent_by_handle(&t.agent).await? else { continue };
                    self.row_mut(id)?.denied_count += t.count;
                    let e = self.event(&t.agent, "refused", "denied");
                    e.reason = Some(t.reason.code().to_owned());
                    e.detail = Some(
                        serde_json::json!({"count": t.count, "first_at": crate::format::fmt_time(t.first_ms),
                            "last_at": crate::format::fmt_time(t.last_ms), "coalesced": true})
                        .to_string(),
                    );
                }
                Ok(Reply::ok(Answer::Swept))
            }
            Command::AuditRefusedCall { key, server, tool, reason } => {
                self.audit_refused_call(key, server, tool, reason).await
            }
            Command::CreateAgent { caller, spec, key_hash } => self.create_agent(caller, spec, key_hash).await,
            Command::PatchAgent { handle, patch } => self.patch_agent(handle, patch).await,
            Command::Revoke { caller, handle, reason } => self.revoke(caller, handle, reason.as_deref()).await,
            Command::RotateKey { handle, key_hash } => self.rotate_key(handle, key_hash).await,
            Command::Resume { handle } => self.resume(handle).await,
            Command::Suspend { handle, reason } => self.suspend_agent(handle, reason.as_deref()).await,
            Command::Settle { hold_id, amount } => {
                self.settle_hold(None, hold_id, if amount.is_zero() { None } else { Some(*amount) }).await
            }
            Command::LeaseSettle { hold_id, seq, unit, costs, release, close, audit } => {
                self.lease_settle(hold_id, *seq, *unit, costs, *release, *close, *audit).await
            }
            Command::Spend { .. }
            | Command::Hold { .. }
            | Command::MeteredHold { .. }
            | Command::Lease { .. }
            | Command::Capture { .. }
            | Command::Release { .. } => self.money(cmd).await,
        }
    }
}

impl Batch {
    /// A call refused before any decision (see [`Command::AuditRefusedCall`]), checked as far
    /// as a call can be without naming a scope: a key refused for good, or a suspended agent, is
    /// answered so without a write (and from then on from memory, coalesced, like every such
    /// refusal); otherwise one denied event, one more denial, and a step of the breaker, which a
    /// loop of such calls trips like any loop of denials.
    async fn audit_refused_call(&mut self, key: &KeyHash, server: &str, tool: &str, reason: &str) -> R<Reply> {
        let Some(id) = self.agent_by_key(key).await? else {
            return Ok(Reply::deny(DenyReason::InvalidCredentials));
        };
        if let Err(denied) = self.chain_credential(id)? {
            return Ok(Reply::deny(denied));
        }
        if self.chain(id)?.iter().any(|a| self.row(*a).is_ok_and(|r| r.status == AgentStatus::Suspended)) {
            return Ok(Reply::deny(DenyReason::AgentSuspended));
        }
        let tripped = self.count_denial(id, true)?;
        let handle = self.row(id)?.handle.clone();
        let tool: String = tool.chars().take(super::command::TOOL_NAME_AUDITED_MAX).collect();
        let e = self.event(&handle, "hold", "denied");
        e.reason = Some(reason.to_owned());
        e.detail = Some(serde_json::json!({"mcp_server": server, "tool": tool}).to_string());
        if tripped {
            self.suspend(id, "runaway_loop_breaker")?;
        }
        Ok(Reply::ok(Answer::Audited))
    }
}
