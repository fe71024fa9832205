//! Reads: straight from the pool, never through the ledger. What they return is as of the last
//! committed batch.

use std::collections::HashMap;

use bulkhead_core::{DenyReason, KeyHash};

use crate::view::{AGENT_COLUMNS, AgentRow, AgentView, Swept};
use crate::{Store, StoreError};

impl Store {
    /// Renders rows, subtracting holds past expiry that the sweeper has not closed yet.
    async fn views(&self, rows: Vec<AgentRow>, now_ms: i64) -> Result<Vec<AgentView>, StoreError> {
        if rows.is_empty() {
            return Ok(Vec::new());
        }
        let due: Vec<(String, i64, String)> =
            sqlx::query_as("SELECT path, amount, on_expiry FROM holds WHERE status = 'open' AND expires_at <= $1")
                .bind(now_ms)
                .fetch_all(&self.pool)
                .await?;
        let mut parents: HashMap<i64, String> = HashMap::new();
        for r in &rows {
            parents.insert(r.id, r.handle.clone());
        }
        let mut out = Vec::with_capacity(rows.len());
        for r in &rows {
            let parent = match r.parent_id {
                None => None,
                Some(p) => match parents.get(&p) {
                    Some(h) => Some(h.clone()),
                    None => {
                        let h: Option<(String,)> = sqlx::query_as("SELECT handle FROM agents WHERE id = $1")
                            .bind(p)
                            .fetch_optional(&self.pool)
                            .await?;
                        let h = h.map(|h| h.0);
                        if let Some(h) = &h {
                            parents.insert(p, h.clone());
                        }
                        h
                    }
                },
            };
            let needle = format!(",{},", r.id);
            let mine = || due.iter().filter(|(path, _, _)| path.contains(&needle));
            let expired: i64 = mine().map(|(_, a, _)| *a).sum();
            // A gateway hold is captured in full at its expiry: it counts as spent from then on.
            let captured: i64 = mine().filter(|(_, _, on)| on == "capture").map(|(_, a, _)| *a).sum();
            out.push(r.view(parent, Swept { held: expired, captured }, now_ms));
        }
        Ok(out)
    }

    pub async fn get_agent(&self, handle: &str, now_ms: i64) -> Result<Option<AgentView>, StoreError> {
        let row: Option<AgentRow> = sqlx::query_as(dsql!("SELECT {AGENT_COLUMNS} FROM agents WHERE handle = $1"))
            .bind(handle)
            .fetch_optional(&self.pool)
            .await?;
        Ok(self.views(row.into_iter().collect(), now_ms).await?.pop())
    }

    /// One page of agents in handle order, after `after`.
    pub async fn list_agents(
        &self,
        after: Option<&str>,
        limit: i64,
        now_ms: i64,
    ) -> Result<Vec<AgentView>, StoreError> {
        let rows: Vec<AgentRow> =
            sqlx::query_as(dsql!("SELECT {AGENT_COLUMNS} FROM agents WHERE handle > $1 ORDER BY handle LIMIT $2"))
                .bind(after.unwrap_or(""))
                .bind(limit)
                .fetch_all(&self.pool)
                .await?;
        self.views(rows, now_ms).await
    }

    /// The agent holding this key, if its credential is currently good.
    pub async fn agent_for_key(&self, key: &KeyHash, now_ms: i64) -> Result<Result<AgentView, DenyReason>, StoreError> {
        let row: Option<AgentRow> = sqlx::query_as(dsql!("SELECT {AGENT_COLUMNS} FROM agents WHERE key_hash = $1"))
            .bind(key.as_str())
            .fetch_optional(&self.pool)
            .await?;
        let Some(row) = row.filter(|r| KeyHash::from_stored(r.key_hash.clone()).ct_eq(key)) else {
            return Ok(Err(DenyReason::InvalidCredentials));
        };
        // The chain binds: any agent of it revoked, or any key of it expired.
        let (revoked, expires): (i64, Option<i64>) = sqlx::query_as(
            "SELECT COUNT(CASE WHEN status = 'revoked' THEN 1 END), MIN(key_expires_at) FROM agents \
             WHERE root_id = $1 AND $2 LIKE '%,' || id || ',%'",
        )
        .bind(row.root_id)
        .bind(&row.path)
        .fetch_one(&self.pool)
        .await?;
        if let Err(reason) = bulkhead_core::credential(revoked > 0, expires, now_ms) {
            return Ok(Err(reason));
        }
        Ok(Ok(self.views(vec![row], now_ms).await?.remove(0)))
    }
}

impl Store {
    /// `(handle, utilization)` of every agent, for the metrics endpoint. Holds past expiry that
    /// the one-second sweeper has not closed yet still count here.
    pub async fn utilizations(&self, now_ms: i64) -> Result<Vec<(String, f64)>, StoreError> {
        let rows: Vec<AgentRow> =
            sqlx::query_as(dsql!("SELECT {AGENT_COLUMNS} FROM agents")).fetch_all(&self.pool).await?;
        Ok(rows.iter().map(|r| (r.handle.clone(), r.view(None, Swept::default(), now_ms).usage.utilization)).collect())
    }
}
