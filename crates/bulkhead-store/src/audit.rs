//! The audit trail: one hash-chained sequence of events per store.
//!
//! Each event's hash covers every stored field and the previous event's hash, so changing,
//! removing or reordering any stored event breaks the chain at that point. Events are appended
//! by the ledger inside the same transaction as the decision they describe.
//!
//! The chain is keyed (contract §12): a server with an audit key (kept outside the database)
//! hashes each new event with HMAC-SHA-256 under it, stored as `k1:<hex>`, so write access to
//! the database alone cannot rewrite history and recompute the chain. Events written before a
//! key was in use keep their plain SHA-256 (`<hex>`) and still verify; once the chain holds a
//! keyed event, every later one must be keyed, so a rewritten tail cannot fall back to plain
//! hashes.

use hmac::{Hmac, Mac};
use serde::Serialize;
use sha2::{Digest, Sha256};
use sqlx::any::AnyArguments;
use sqlx::{Any, Arguments, Transaction};

use crate::format::{fmt_time, micros};
use crate::{Backend, Store, StoreError};

/// The hash that stands before the first event.
pub(crate) const GENESIS_HASH: &str = "0000000000000000000000000000000000000000000000000000000000000000";
/// Rows per multi-row INSERT.
const INSERT_CHUNK: usize = 200;

/// An event the ledger is about to append.
#[derive(Clone, Debug)]
pub(crate) struct NewEvent {
    pub at: i64,
    pub agent: String,
    pub action: String,
    pub outcome: String,
    pub reason: Option<String>,
    pub scope: Option<String>,
    pub amount: Option<i64>,
    pub reference: Option<String>,
    pub detail: Option<String>,
}

/// A stored event, as stored.
#[derive(Clone, Debug, sqlx::FromRow)]
pub(crate) struct EventRow {
    pub seq: i64,
    pub at: i64,
    pub agent: String,
    pub action: String,
    pub outcome: String,
    pub reason: Option<String>,
    pub scope: Option<String>,
    pub amount: Option<i64>,
    #[sqlx(rename = "ref")]
    pub reference: Option<String>,
    pub detail: Option<String>,
    pub prev_hash: String,
    pub hash: String,
}

pub(crate) const EVENT_COLUMNS: &str =
    "seq, at, agent, action, outcome, reason, scope, amount, ref, detail, prev_hash, hash";

/// The prefix of a keyed event hash.
const KEYED: &str = "k1:";

/// The key audit events are hashed under: 32 bytes, kept outside the database.
pub struct AuditKey([u8; 32]);

impl AuditKey {
    /// A fresh random key.
    pub fn generate() -> AuditKey {
        AuditKey(rand::random())
    }

    /// Reads a key as written by [`AuditKey::to_hex`]: 64 hex digits (surrounding whitespace
    /// ignored).
    pub fn from_hex(text: &str) -> Result<AuditKey, String> {
        let t = text.trim();
        if t.len() != 64 || !t.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err("an audit key is 64 hex digits".into());
        }
        let mut k = [0u8; 32];
        for (i, byte) in k.iter_mut().enumerate() {
            *byte = u8::from_str_radix(&t[2 * i..2 * i + 2], 16).map_err(|e| e.to_string())?;
        }
        Ok(AuditKey(k))
    }

    pub fn to_hex(&self) -> String {
        bulkhead_core::key::hex_lower(&self.0)
    }

    /// A key of its own for `purpose` (HMAC-SHA-256 of the purpose under this key): what other
    /// parts of the server may sign with, so that the audit key itself never leaves the store.
    pub fn derive(&self, purpose: &str) -> [u8; 32] {
        let mut mac = <Hmac<Sha256> as Mac>::new_from_slice(&self.0).expect("HMAC takes any key length");
        mac.update(b"bulkhead/");
        mac.update(purpose.as_bytes());
        mac.finalize().into_bytes().into()
    }
}

impl std::fmt::Debug for AuditKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("AuditKey(…)")
    }
}

/// The canonical text of one event: a JSON array of every field and the previous hash.
fn canonical(seq: i64, e: &NewEvent, prev_hash: &str) -> String {
    serde_json::json!([
        seq,
        e.at,
        e.agent,
        e.action,
        e.outcome,
        e.reason,
        e.scope,
        e.amount,
        e.reference,
        e.detail,
        prev_hash
    ])
    .to_string()
}

/// The hash of one event: `k1:` + HMAC-SHA-256 under `key`, or plain SHA-256 without one.
fn hash_with(key: Option<&AuditKey>, seq: i64, e: &NewEvent, prev_hash: &str) -> String {
    let text = canonical(seq, e, prev_hash);
    match key {
        Some(k) => {
            let mut mac = <Hmac<Sha256> as Mac>::new_from_slice(&k.0).expect("HMAC takes any key length");
            mac.update(text.as_bytes());
            format!("{KEYED}{}", bulkhead_core::key::hex_lower(&mac.finalize().into_bytes()))
        }
        None => bulkhead_core::key::hex_lower(&Sha256::digest(text.as_bytes())),
    }
}

impl EventRow {
    fn as_new(&self) -> NewEvent {
        NewEvent {
            at: self.at,
            agent: self.agent.clone(),
            action: self.action.clone(),
            outcome: self.outcome.clone(),
            reason: self.reason.clone(),
            scope: self.scope.clone(),
            amount: self.amount,
            reference: self.reference.clone(),
            detail: self.detail.clone(),
        }
    }

    pub(crate) fn public(&self) -> AuditEvent {
        AuditEvent {
            seq: self.seq,
            at: fmt_time(self.at),
            agent: self.agent.clone(),
            action: self.action.clone(),
            outcome: self.outcome.clone(),
            reason: self.reason.clone(),
            scope: self.scope.clone(),
            amount: self.amount.map(|a| micros(a).to_string()),
            reference: self.reference.clone(),
            detail: self.detail.as_deref().and_then(|d| serde_json::from_str(d).ok()),
            hash: self.hash.clone(),
            prev_hash: self.prev_hash.clone(),
        }
    }
}

/// The public shape of an audit event (contract §6).
#[derive(Clone, Debug, Serialize, utoipa::ToSchema)]
pub struct AuditEvent {
    pub seq: i64,
    #[schema(format = DateTime)]
    pub at: String,
    pub agent: String,
    pub action: String,
    /// `allowed` or `denied`.
    pub outcome: String,
    /// The error code of a denial.
    #[schema(required = true)]
    pub reason: Option<String>,
    #[schema(required = true)]
    pub scope: Option<String>,
    #[schema(value_type = Option<bulkhead_core::Micros>, required = true)]
    pub amount: Option<String>,
    /// The spend, hold or agent the event is about.
    #[serde(rename = "ref")]
    #[schema(required = true)]
    pub reference: Option<String>,
    #[schema(value_type = Option<Object>, required = true)]
    pub detail: Option<serde_json::Value>,
    pub hash: String,
    pub prev_hash: String,
}

/// Appends events at the head of the chain (locking the head row on PostgreSQL).
/// Appends events at the head of the chain and returns the new head. `known_head` is the head as
/// the caller last committed it (the SQLite writer, the only writer of its file); without it the
/// head is read, and on PostgreSQL locked.
pub(crate) async fn append_events(
    tx: &mut Transaction<'static, Any>,
    backend: Backend,
    key: Option<&AuditKey>,
    events: Vec<NewEvent>,
    known_head: Option<(i64, String)>,
) -> Result<Option<(i64, String)>, StoreError> {
    if events.is_empty() {
        return Ok(known_head);
    }
    let (mut seq, mut prev): (i64, String) = match known_head {
        Some(h) if backend == Backend::Sqlite => h,
        _ => {
            let lock = if backend == Backend::Postgres { " FOR UPDATE" } else { "" };
            sqlx::query_as(dsql!("SELECT seq, hash FROM audit_head WHERE id = 1{lock}")).fetch_one(&mut **tx).await?
        }
    };
    for chunk in events.chunks(INSERT_CHUNK) {
        let mut sql = String::from(
            "INSERT INTO audit_events (seq, at, agent, action, outcome, reason, scope, amount, ref, detail, prev_hash, hash) VALUES ",
        );
        let mut args = AnyArguments::default();
        for (i, e) in chunk.iter().enumerate() {
            seq += 1;
            let hash = hash_with(key, seq, e, &prev);
            if i > 0 {
                sql.push_str(", ");
            }
            sql.push_str(&backend.values_row(i * 12 + 1, &[None; 12]));
            let bad = |e: sqlx::error::BoxDynError| StoreError::Corrupt(e.to_string());
            args.add(seq).map_err(bad)?;
            args.add(e.at).map_err(bad)?;
            args.add(e.agent.clone()).map_err(bad)?;
            args.add(e.action.clone()).map_err(bad)?;
            args.add(e.outcome.clone()).map_err(bad)?;
            args.add(e.reason.clone()).map_err(bad)?;
            args.add(e.scope.clone()).map_err(bad)?;
            args.add(e.amount).map_err(bad)?;
            args.add(e.reference.clone()).map_err(bad)?;
            args.add(e.detail.clone()).map_err(bad)?;
            args.add(prev.clone()).map_err(bad)?;
            args.add(hash.clone()).map_err(bad)?;
            prev = hash;
        }
        sqlx::query_with(sqlx::AssertSqlSafe(sql), args).execute(&mut **tx).await?;
    }
    sqlx::query("UPDATE audit_head SET seq = $1, hash = $2 WHERE id = 1")
        .bind(seq)
        .bind(&prev)
        .execute(&mut **tx)
        .await?;
    Ok(Some((seq, prev)))
}

/// The result of `audit verify`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum VerifyReport {
    /// Every event checks out; `unkeyed` of them (the first ones) were written before an audit
    /// key was in use and are checked by their plain hash.
    Intact { events: i64, unkeyed: i64 },
    /// The chain is keyed from event `seq` on, and no audit key was given to check it.
    KeyNeeded { seq: i64 },
    /// The first event at which the chain breaks, and why.
    Broken { seq: i64, problem: String },
}

/// Pages through stored events in `seq` order.
pub(crate) async fn page(
    store: &Store,
    agent: Option<&str>,
    after: i64,
    limit: i64,
) -> Result<Vec<EventRow>, StoreError> {
    let rows = match agent {
        Some(a) => {
            sqlx::query_as(dsql!(
                "SELECT {EVENT_COLUMNS} FROM audit_events WHERE agent = $1 AND seq > $2 ORDER BY seq LIMIT $3"
            ))
            .bind(a)
            .bind(after)
            .bind(limit)
            .fetch_all(&store.pool)
            .await?
        }
        None => {
            sqlx::query_as(dsql!("SELECT {EVENT_COLUMNS} FROM audit_events WHERE seq > $1 ORDER BY seq LIMIT $2"))
                .bind(after)
                .bind(limit)
                .fetch_all(&store.pool)
                .await?
        }
    };
    Ok(rows)
}

impl Store {
    /// Walks the whole chain and checks every link and every hash. The chain head row must
    /// match the last event, so removing events from the end is caught too. Keyed events are
    /// checked under this store's audit key ([`Store::with_audit_key`]); a keyed chain without
    /// the key is reported, not passed.
    pub async fn verify_audit(&self, mut progress: impl FnMut(i64)) -> Result<VerifyReport, StoreError> {
        let (head_seq, head_hash): (i64, String) =
            sqlx::query_as("SELECT seq, hash FROM audit_head WHERE id = 1").fetch_one(&self.pool).await?;
        let mut walk =
            Walk { key: self.audit_key.as_deref(), prev: GENESIS_HASH.to_owned(), next: 1, keyed_since: None };
        let mut after = 0;
        loop {
            let rows = page(self, None, after, 5_000).await?;
            if rows.is_empty() {
                break;
            }
            for r in &rows {
                if let Err(report) = walk.step(r) {
                    return Ok(report);
                }
            }
            after = rows.last().map(|r| r.seq).unwrap_or(after);
            progress(after);
        }
        let count = walk.next - 1;
        if count != head_seq || walk.prev != head_hash {
            let (seq, problem) = head_mismatch(count, head_seq);
            return Ok(VerifyReport::Broken { seq, problem });
        }
        let unkeyed = match walk.keyed_since {
            Some(first) => first - 1,
            None => count,
        };
        Ok(VerifyReport::Intact { events: count, unkeyed })
    }

    /// The same store, hashing new audit events under `key` and verifying keyed ones with it.
    pub fn with_audit_key(mut self, key: AuditKey) -> Store {
        self.audit_key = Some(std::sync::Arc::new(key));
        self
    }

    /// A key for `purpose` derived from the audit key ([`AuditKey::derive`]): the same on every
    /// replica and across restarts; `None` for a store opened without an audit key.
    pub fn derived_key(&self, purpose: &str) -> Option<[u8; 32]> {
        self.audit_key.as_deref().map(|k| k.derive(purpose))
    }

    /// Events in `seq` order, optionally for one agent.
    pub async fn audit_page(&self, agent: Option<&str>, after: i64, limit: i64) -> Result<Vec<AuditEvent>, StoreError> {
        Ok(page(self, agent, after, limit).await?.iter().map(EventRow::public).collect())
    }
}

/// A walk along the chain, event by event: the number and the `prev_hash` the next event must
/// have, and where keyed hashes began.
struct Walk<'k> {
    key: Option<&'k AuditKey>,
    prev: String,
    next: i64,
    keyed_since: Option<i64>,
}

impl Walk<'_> {
    /// Checks one event: its number, its link, its kind of hash (no plain hash after a keyed
    /// one; a keyed one needs the key) and the hash itself.
    fn step(&mut self, r: &EventRow) -> Result<(), VerifyReport> {
        let broken = |seq: i64, problem: &str| VerifyReport::Broken { seq, problem: problem.to_owned() };
        if r.seq != self.next {
            let problem = format!("event {} is missing (next stored event is {})", self.next, r.seq);
            return Err(broken(self.next, &problem));
        }
        if r.prev_hash != self.prev {
            return Err(broken(r.seq, "its prev_hash does not match the previous event's hash"));
        }
        let keyed = r.hash.starts_with(KEYED);
        if keyed && self.key.is_none() {
            return Err(VerifyReport::KeyNeeded { seq: r.seq });
        }
        if !keyed && self.keyed_since.is_some() {
            return Err(broken(r.seq, "it has a plain hash after keyed events (the chain was rewritten)"));
        }
        if keyed {
            self.keyed_since.get_or_insert(r.seq);
        }
        let want = hash_with(if keyed { self.key } else { None }, r.seq, &r.as_new(), &self.prev);
        if want != r.hash {
            return Err(broken(
                r.seq,
                if keyed {
                    "its contents do not match its keyed hash (a field was changed, or this is not the store's audit key)"
                } else {
                    "its contents do not match its hash (a field was changed)"
                },
            ));
        }
        self.prev = r.hash.clone();
        self.next += 1;
        Ok(())
    }
}

/// Where and how a chain of `count` events disagrees with a head that recorded `head_seq`: a
/// shorter chain lost its tail, a longer one has events appended behind the store's back, and a
/// last event whose hash is not the head's was changed (and rehashed).
fn head_mismatch(count: i64, head_seq: i64) -> (i64, String) {
    match count.cmp(&head_seq) {
        std::cmp::Ordering::Less => {
            (count + 1, format!("the chain ends at event {count}, but {head_seq} events were appended"))
        }
        std::cmp::Ordering::Greater => {
            (head_seq + 1, format!("events after the last appended one ({head_seq}) were added"))
        }
        std::cmp::Ordering::Equal => {
            (count.max(1), "its hash is not the one recorded for the last appended event".to_owned())
        }
    }
}
