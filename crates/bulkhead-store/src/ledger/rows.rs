//! The SQL that writes a batch back before its commit: every changed agent row in one multi-row
//! `UPDATE` per chunk, the holds made (one multi-row `INSERT`) and closed or settled (multi-row
//! `UPDATE`s that must find each hold still open), and the alert outbox. It decides nothing.

use sqlx::Arguments;
use sqlx::any::AnyArguments;

use super::batch::{Batch, R, corrupt};

impl Batch {
    pub(super) async fn write_alerts(&mut self) -> R<()> {
        let alerts = std::mem::take(&mut self.alerts);
        for a in &alerts {
            for hook in &self.rules.webhooks {
                sqlx::query(
                    "INSERT INTO alert_outbox (id, webhook, body, created_at, attempts, next_at) \
                     VALUES ($1, $2, $3, $4, 0, $4)",
                )
                .bind(&a.id)
                .bind(hook)
                .bind(&a.body)
                .bind(self.now)
                .execute(&mut *self.tx)
                .await?;
            }
        }
        Ok(())
    }

    /// Writes every changed agent row back, in one multi-row `UPDATE … FROM (VALUES …)` per
    /// chunk (the same SQL on SQLite and PostgreSQL; `VALUES` columns are named column1…N on both).
    /// Writes the holds this batch made (one multi-row INSERT) and closed (one multi-row UPDATE
    /// that must find every one of them still open).
    pub(super) async fn flush_holds(&mut self) -> R<()> {
        const CHUNK: usize = 100;
        let bad = |e: sqlx::error::BoxDynError| corrupt(&e.to_string());
        let new_holds = std::mem::take(&mut self.new_holds);
        for chunk in new_holds.chunks(CHUNK) {
            let mut sql = String::from(
                "INSERT INTO holds (id, agent_id, root_id, path, scope, amount, status, created_at, expires_at, on_expiry) VALUES ",
            );
            let mut args = AnyArguments::default();
            for (k, h) in chunk.iter().enumerate() {
                if k > 0 {
                    sql.push_str(", ");
                }
                sql.push_str(&self.backend.values_row(k * 10 + 1, &[None; 10]));
                args.add(h.id.clone()).map_err(bad)?;
                args.add(h.agent_id).map_err(bad)?;
                args.add(h.root_id).map_err(bad)?;
                args.add(h.path.clone()).map_err(bad)?;
                args.add(h.scope.clone()).map_err(bad)?;
                args.add(h.amount).map_err(bad)?;
                args.add("open".to_owned()).map_err(bad)?;
                args.add(h.created_at).map_err(bad)?;
                args.add(h.expires_at).map_err(bad)?;
                args.add(h.on_expiry.to_owned()).map_err(bad)?;
            }
            sqlx::query_with(sqlx::AssertSqlSafe(sql), args).execute(&mut *self.tx).await?;
        }
        let touched: Vec<(String, i64, i64, i64)> = std::mem::take(&mut self.touched_holds)
            .into_iter()
            .filter_map(|id| self.holds.get(&id).map(|h| (id, h.amount, h.captured, h.settled_seq)))
            .collect();
        let types = [Some("TEXT"), Some("BIGINT"), Some("BIGINT"), Some("BIGINT")];
        self.update_open_holds(
            "amount = v.column2, captured = v.column3, settled_seq = v.column4",
            &types,
            &touched,
            |args, (id, amount, captured, seq)| {
                args.add(id.clone())?;
                args.add(*amount)?;
                args.add(*captured)?;
                args.add(*seq)
            },
            "a lease was settled after it closed",
        )
        .await?;
        let closed = std::mem::take(&mut self.closed_holds);
        let types = [Some("TEXT"), Some("TEXT"), Some("BIGINT"), Some("BIGINT")];
        self.update_open_holds(
            "status = v.column2, captured = v.column3, closed_at = v.column4",
            &types,
            &closed,
            |args, (id, status, captured, at)| {
                args.add(id.clone())?;
                args.add(status.clone())?;
                args.add(*captured)?;
                args.add(*at)
            },
            "a hold was closed twice",
        )
        .await?;
        Ok(())
    }

    /// `UPDATE holds SET {set} FROM (VALUES …) AS v WHERE holds.id = v.column1 AND holds.status =
    /// 'open'`, one multi-row statement per chunk of `rows` (the id first, then the columns `set`
    /// names, typed as `types`); every row must find its hold still open, else `why` is corrupt.
    pub(super) async fn update_open_holds<T>(
        &mut self,
        set: &str,
        types: &[Option<&str>],
        rows: &[T],
        add: impl Fn(&mut AnyArguments, &T) -> Result<(), sqlx::error::BoxDynError>,
        why: &str,
    ) -> R<()> {
        const CHUNK: usize = 100;
        let n = types.len();
        for chunk in rows.chunks(CHUNK) {
            let mut sql = format!("UPDATE holds SET {set} FROM (VALUES ");
            let mut args = AnyArguments::default();
            for (k, row) in chunk.iter().enumerate() {
                if k > 0 {
                    sql.push_str(", ");
                }
                sql.push_str(&self.backend.values_row(k * n + 1, types));
                add(&mut args, row).map_err(|e| corrupt(&e.to_string()))?;
            }
            sql.push_str(") AS v WHERE holds.id = v.column1 AND holds.status = 'open'");
            let done = sqlx::query_with(sqlx::AssertSqlSafe(sql), args).execute(&mut *self.tx).await?;
            if done.rows_affected() != chunk.len() as u64 {
                return Err(corrupt(why));
            }
        }
        Ok(())
    }

    pub(super) async fn flush(&mut self) -> R<()> {
        self.flush_holds().await?;
        const COLS: [(&str, &str); 37] = [
            ("status", "TEXT"),
            ("key_hash", "TEXT"),
            ("key_expires_at", "BIGINT"),
            ("scopes", "TEXT"),
            ("spending_cap", "BIGINT"),
            ("window_ms", "BIGINT"),
            ("per_tx_limit", "BIGINT"),
            ("lifetime_cap", "BIGINT"),
            ("rate_requests", "BIGINT"),
            ("rate_per_ms", "BIGINT"),
            ("rate_tat", "BIGINT"),
            ("breaker_denials", "BIGINT"),
            ("breaker_window_ms", "BIGINT"),
            ("breaker_recent", "TEXT"),
            ("breaker_max_requests", "BIGINT"),
            ("breaker_rate_window_ms", "BIGINT"),
            ("breaker_repeats", "BIGINT"),
            ("breaker_repeat_window_ms", "BIGINT"),
            ("breaker_rate_tat_us", "BIGINT"),
            ("breaker_repeat_hash", "TEXT"),
            ("breaker_repeat_count", "BIGINT"),
            ("breaker_repeat_since", "BIGINT"),
            ("labels", "TEXT"),
            ("revoked_at", "BIGINT"),
            ("revoke_reason", "TEXT"),
            ("suspended_at", "BIGINT"),
            ("window_index", "BIGINT"),
            ("window_spent", "BIGINT"),
            ("held", "BIGINT"),
            ("lifetime_spent", "BIGINT"),
            ("tx_count", "BIGINT"),
            ("denied_count", "BIGINT"),
            ("root_id", "BIGINT"),
            ("path", "TEXT"),
            ("cap_alerted_window", "BIGINT"),
            ("enforce", "BIGINT"),
            ("id", "BIGINT"),
        ];
        const CHUNK: usize = 100;
        let dirty: Vec<i64> = std::mem::take(&mut self.dirty).into_iter().collect();
        for ids in dirty.chunks(CHUNK) {
            let mut sql = String::from("UPDATE agents SET ");
            for (n, (col, _)) in COLS[..COLS.len() - 1].iter().enumerate() {
                if n > 0 {
                    sql.push_str(", ");
                }
                sql.push_str(&format!("{col} = v.column{}", n + 1));
            }
            sql.push_str(" FROM (VALUES ");
            let mut args = AnyArguments::default();
            let bad = |e: sqlx::error::BoxDynError| corrupt(&e.to_string());
            for (k, id) in ids.iter().enumerate() {
                if k > 0 {
                    sql.push_str(", ");
                }
                let types: Vec<Option<&str>> = COLS.iter().map(|(_, ty)| Some(*ty)).collect();
                sql.push_str(&self.backend.values_row(k * COLS.len() + 1, &types));
                let r = self.row(*id)?.clone();
                args.add(r.status).map_err(bad)?;
                args.add(r.key_hash).map_err(bad)?;
                args.add(r.key_expires_at).map_err(bad)?;
                args.add(r.scopes).map_err(bad)?;
                args.add(r.spending_cap).map_err(bad)?;
                args.add(r.window_ms).map_err(bad)?;
                args.add(r.per_tx_limit).map_err(bad)?;
                args.add(r.lifetime_cap).map_err(bad)?;
                args.add(r.rate_requests).map_err(bad)?;
                args.add(r.rate_per_ms).map_err(bad)?;
                args.add(r.rate_tat).map_err(bad)?;
                args.add(r.breaker_denials).map_err(bad)?;
                args.add(r.breaker_window_ms).map_err(bad)?;
                args.add(r.breaker_recent).map_err(bad)?;
                args.add(r.breaker_max_requests).map_err(bad)?;
                args.add(r.breaker_rate_window_ms).map_err(bad)?;
                args.add(r.breaker_repeats).map_err(bad)?;
                args.add(r.breaker_repeat_window_ms).map_err(bad)?;
                args.add(r.breaker_rate_tat_us).map_err(bad)?;
                args.add(r.breaker_repeat_hash).map_err(bad)?;
                args.add(r.breaker_repeat_count).map_err(bad)?;
                args.add(r.breaker_repeat_since).map_err(bad)?;
                args.add(r.labels).map_err(bad)?;
                args.add(r.revoked_at).map_err(bad)?;
                args.add(r.revoke_reason).map_err(bad)?;
                args.add(r.suspended_at).map_err(bad)?;
                args.add(r.window_index).map_err(bad)?;
                args.add(r.window_spent).map_err(bad)?;
                args.add(r.held).map_err(bad)?;
                args.add(r.lifetime_spent).map_err(bad)?;
                args.add(r.tx_count).map_err(bad)?;
                args.add(r.denied_count).map_err(bad)?;
                args.add(r.root_id).map_err(bad)?;
                args.add(r.path).map_err(bad)?;
                args.add(r.cap_alerted_window).map_err(bad)?;
                args.add(r.enforce).map_err(bad)?;
                args.add(r.id).map_err(bad)?;
            }
            sql.push_str(&format!(") AS v WHERE agents.id = v.column{}", COLS.len()));
            let done = sqlx::query_with(sqlx::AssertSqlSafe(sql), args).execute(&mut *self.tx).await?;
            if done.rows_affected() != ids.len() as u64 {
                return Err(corrupt("an agent row vanished during its batch"));
            }
        }
        Ok(())
    }
}
