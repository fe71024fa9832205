//! Reads over what already happened, for the operator's console: an agent's usage over time in
//! buckets, the audit trail searched newest first, and the recent alerts in the outbox.
//!
//! Like every read, these go straight to the pool and never through the ledger, and every one is
//! bounded by a `limit` its caller has clamped.

use bulkhead_core::Micros;
use serde::Serialize;
use sqlx::any::AnyArguments;
use sqlx::{Arguments, FromRow};

use crate::audit::{EVENT_COLUMNS, EventRow};
use crate::format::{fmt_time, micros};
use crate::{AuditEvent, Store, StoreError};

/// One bucket of an agent's usage: what it and its descendants spent, and their decisions.
#[derive(Clone, Debug, PartialEq, Serialize, utoipa::ToSchema)]
pub struct UsageBucket {
    /// The bucket's start (RFC 3339); buckets are aligned to multiples of their length since
    /// the Unix epoch.
    #[schema(format = DateTime)]
    pub start: String,
    /// Allowed spends plus captured holds.
    pub spent: Micros,
    /// Spends and holds allowed.
    pub allowed: i64,
    /// Requests denied, whatever they asked for.
    pub denied: i64,
}

/// Which audit events to return. With `before`, the newest first; otherwise in `seq` order
/// after `after`.
#[derive(Clone, Debug, Default)]
pub struct AuditQuery {
    pub agent: Option<String>,
    pub outcome: Option<String>,
    pub action: Option<String>,
    /// Only events whose detail names this caller (`"gateway"`): the gateway's calls.
    pub by: Option<String>,
    pub after: i64,
    pub before: Option<i64>,
    pub limit: i64,
}

/// One alert as raised, with how far its delivery got.
#[derive(Clone, Debug, Serialize, utoipa::ToSchema)]
pub struct AlertRecord {
    pub id: String,
    /// The alert as it is POSTed: `{"id", "type", "agent", "at", …}`.
    #[schema(value_type = Object)]
    pub alert: serde_json::Value,
    /// Every webhook acknowledged it.
    pub delivered: bool,
    /// Delivery attempts over all webhooks.
    pub attempts: i64,
}

#[derive(FromRow)]
struct BucketRow {
    b: i64,
    spent: i64,
    allowed: i64,
    denied: i64,
}

#[derive(FromRow)]
struct AlertRow {
    id: String,
    body: String,
    delivered: i64,
    attempts: i64,
}

impl Store {
    /// `count` buckets of `bucket_ms` each, the last one holding `until_ms`, oldest first and
    /// zero-filled; `None` when no agent has this handle. Counts the agent's own events and its
    /// descendants', like the usage figures of the agent object.
    pub async fn usage_buckets(
        &self,
        handle: &str,
        bucket_ms: i64,
        count: i64,
        until_ms: i64,
    ) -> Result<Option<Vec<UsageBucket>>, StoreError> {
        let id: Option<(i64,)> =
            sqlx::query_as("SELECT id FROM agents WHERE handle = $1").bind(handle).fetch_optional(&self.pool).await?;
        let Some((id,)) = id else { return Ok(None) };
        let bucket_ms = bucket_ms.max(1);
        let last = until_ms.div_euclid(bucket_ms);
        let first = last - (count.max(1) - 1);
        // `at / bucket` is integer division on both backends; SUM of BIGINT is NUMERIC on
        // PostgreSQL, hence the casts.
        let rows: Vec<BucketRow> = sqlx::query_as(
            "SELECT at / $1 AS b, \
             CAST(COALESCE(SUM(CASE WHEN outcome = 'allowed' AND action IN ('spend', 'capture') \
                  THEN amount ELSE 0 END), 0) AS BIGINT) AS spent, \
             CAST(SUM(CASE WHEN outcome = 'allowed' AND action IN ('spend', 'hold') THEN 1 ELSE 0 END) AS BIGINT) AS allowed, \
             CAST(SUM(CASE WHEN outcome = 'denied' THEN 1 ELSE 0 END) AS BIGINT) AS denied \
             FROM audit_events \
             WHERE agent IN (SELECT handle FROM agents WHERE path LIKE $2) AND at >= $3 AND at < $4 \
             GROUP BY 1",
        )
        .bind(bucket_ms)
        .bind(format!("%,{id},%"))
        .bind(first.saturating_mul(bucket_ms))
        .bind((last + 1).saturating_mul(bucket_ms))
        .fetch_all(&self.pool)
        .await?;
        let mut out: Vec<UsageBucket> = (first..=last)
            .map(|b| UsageBucket { start: fmt_time(b * bucket_ms), spent: Micros::ZERO, allowed: 0, denied: 0 })
            .collect();
        for r in rows {
            if let Some(slot) = usize::try_from(r.b - first).ok().and_then(|i| out.get_mut(i)) {
                slot.spent = micros(r.spent);
                slot.allowed = r.allowed;
                slot.denied = r.denied;
            }
        }
        Ok(Some(out))
    }

    /// The `seq` of the newest audit event (0 before any).
    pub async fn audit_head_seq(&self) -> Result<i64, StoreError> {
        let (seq,): (i64,) = sqlx::query_as("SELECT seq FROM audit_head WHERE id = 1").fetch_one(&self.pool).await?;
        Ok(seq)
    }

    /// Audit events matching `q`, across the fleet or for one agent.
    pub async fn audit_search(&self, q: &AuditQuery) -> Result<Vec<AuditEvent>, StoreError> {
        let mut sql = format!("SELECT {EVENT_COLUMNS} FROM audit_events WHERE ");
        let mut args = AnyArguments::default();
        let mut n = 0;
        let bad = |e: sqlx::error::BoxDynError| StoreError::Corrupt(e.to_string());
        let mut cond = |sql: &mut String, args: &mut AnyArguments, clause: &str, v: Bind| -> Result<(), StoreError> {
            n += 1;
            if n > 1 {
                sql.push_str(" AND ");
            }
            sql.push_str(&clause.replace('?', &format!("${n}")));
            match v {
                Bind::Int(i) => args.add(i).map_err(bad),
                Bind::Text(s) => args.add(s).map_err(bad),
            }
        };
        match q.before {
            Some(b) => cond(&mut sql, &mut args, "seq < ?", Bind::Int(b))?,
            None => cond(&mut sql, &mut args, "seq > ?", Bind::Int(q.after))?,
        }
        if let Some(a) = &q.agent {
            cond(&mut sql, &mut args, "agent = ?", Bind::Text(a.clone()))?;
        }
        if let Some(o) = &q.outcome {
            cond(&mut sql, &mut args, "outcome = ?", Bind::Text(o.clone()))?;
        }
        if let Some(a) = &q.action {
            cond(&mut sql, &mut args, "action = ?", Bind::Text(a.clone()))?;
        }
        if let Some(by) = &q.by {
            // Details are stored as compact JSON written by the ledger: `{"by":"gateway",…}`.
            cond(&mut sql, &mut args, "detail LIKE ?", Bind::Text(format!("%\"by\":\"{by}\"%")))?;
        }
        sql.push_str(if q.before.is_some() { " ORDER BY seq DESC" } else { " ORDER BY seq" });
        sql.push_str(&format!(" LIMIT {}", q.limit.max(1)));
        let rows: Vec<EventRow> = sqlx::query_as_with(sqlx::AssertSqlSafe(sql), args).fetch_all(&self.pool).await?;
        Ok(rows.iter().map(EventRow::public).collect())
    }

    /// Alerts raised, newest first, after (that is, older than) the alert `after`.
    pub async fn recent_alerts(&self, after: Option<&str>, limit: i64) -> Result<Vec<AlertRecord>, StoreError> {
        let rows: Vec<AlertRow> = sqlx::query_as(
            "SELECT id, MIN(body) AS body, \
             CAST(MIN(CASE WHEN delivered_at IS NULL THEN 0 ELSE 1 END) AS BIGINT) AS delivered, \
             CAST(SUM(attempts) AS BIGINT) AS attempts \
             FROM alert_outbox \
             WHERE $1 = '' OR created_at < (SELECT MIN(created_at) FROM alert_outbox WHERE id = $1) \
                OR (created_at = (SELECT MIN(created_at) FROM alert_outbox WHERE id = $1) AND id < $1) \
             GROUP BY id ORDER BY MIN(created_at) DESC, id DESC LIMIT $2",
        )
        .bind(after.unwrap_or(""))
        .bind(limit.max(1))
        .fetch_all(&self.pool)
        .await?;
        Ok(rows
            .into_iter()
            .map(|r| AlertRecord {
                id: r.id,
                alert: serde_json::from_str(&r.body).unwrap_or(serde_json::Value::Null),
                delivered: r.delivered == 1,
                attempts: r.attempts,
            })
            .collect())
    }
}

enum Bind {
    Int(i64),
    Text(String),
}
