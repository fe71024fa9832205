//! The audit trail: one hash-chained sequence of events per store.
//!
//! Each event's hash covers every stored field and the previous event's hash, so changing,
//! removing or reordering any stored event breaks the chain at that point. Events are appended
//! by the ledger inside the same transaction as the decision they describe.

use serde::Serialize;
use sha2::{Digest, Sha256};
use sqlx::any::AnyArguments;
use sqlx::{Any, Arguments, Transaction};

use crate::view::{fmt_time, micros};
use crate::{Backend, Store, StoreError};

/// The hash that stands before the first event.
pub const GENESIS_HASH: &str = "0000000000000000000000000000000000000000000000000000000000000000";
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

/// The hash of one event: SHA-256 over a JSON array of every field and the previous hash.
fn event_hash(seq: i64, e: &NewEvent, prev_hash: &str) -> String {
    let canonical = serde_json::json!([
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
    ]);
    bulkhead_core::key::hex_lower(&Sha256::digest(canonical.to_string().as_bytes()))
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

    pub fn public(&self) -> AuditEvent {
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
            let hash = event_hash(seq, e, &prev);
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
    /// Every event checks out.
    Intact { events: i64 },
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
    /// match the last event, so removing events from the end is caught too.
    pub async fn verify_audit(&self, mut progress: impl FnMut(i64)) -> Result<VerifyReport, StoreError> {
        let (head_seq, head_hash): (i64, String) =
            sqlx::query_as("SELECT seq, hash FROM audit_head WHERE id = 1").fetch_one(&self.pool).await?;
        let mut prev = GENESIS_HASH.to_owned();
        let mut expected_seq = 1;
        let mut after = 0;
        loop {
            let rows = page(self, None, after, 5_000).await?;
            if rows.is_empty() {
                break;
            }
            for r in &rows {
                if r.seq != expected_seq {
                    return Ok(VerifyReport::Broken {
                        seq: expected_seq,
                        problem: format!("event {expected_seq} is missing (next stored event is {})", r.seq),
                    });
                }
                if r.prev_hash != prev {
                    return Ok(VerifyReport::Broken {
                        seq: r.seq,
                        problem: "its prev_hash does not match the previous event's hash".into(),
                    });
                }
                if event_hash(r.seq, &r.as_new(), &prev) != r.hash {
                    return Ok(VerifyReport::Broken {
                        seq: r.seq,
                        problem: "its contents do not match its hash (a field was changed)".into(),
                    });
                }
                prev = r.hash.clone();
                expected_seq += 1;
            }
            after = rows.last().map(|r| r.seq).unwrap_or(after);
            progress(after);
        }
        let count = expected_seq - 1;
        if count != head_seq || prev != head_hash {
            // The head records the last appended event: a shorter chain lost its tail, a longer
            // one has events appended behind the store's back, and a last event whose hash is not
            // the head's was changed (and rehashed).
            let (seq, problem) = match count.cmp(&head_seq) {
                std::cmp::Ordering::Less => {
                    (count + 1, format!("the chain ends at event {count}, but {head_seq} events were appended"))
                }
                std::cmp::Ordering::Greater => {
                    (head_seq + 1, format!("events after the last appended one ({head_seq}) were added"))
                }
                std::cmp::Ordering::Equal => {
                    (count.max(1), "its hash is not the one recorded for the last appended event".to_owned())
                }
            };
            return Ok(VerifyReport::Broken { seq, problem });
        }
        Ok(VerifyReport::Intact { events: count })
    }

    /// Events in `seq` order, optionally for one agent.
    pub async fn audit_page(&self, agent: Option<&str>, after: i64, limit: i64) -> Result<Vec<AuditEvent>, StoreError> {
        Ok(page(self, agent, after, limit).await?.iter().map(EventRow::public).collect())
    }
}
