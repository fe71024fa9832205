//! The SQL that writes a batch back before its commit: every changed agent row in one multi-row
//! `UPDATE` per chunk, the holds made (one multi-row `INSERT`) and closed or settled (multi-row
//! `UPDATE`s that must find each hold still open), and the alert outbox. It decides nothing.

use sqlx::Arguments;
use sqlx::any::AnyArguments;

use super::batch::{Batch, HoldStatus, R, corrupt};
use crate::view::AGENT_WRITTEN;

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
                args.add(HoldStatus::Open.as_str().to_owned()).map_err(bad)?;
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
                args.add(status.as_str().to_owned())?;
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
        const CHUNK: usize = 100;
        // Every column a batch writes, then the id its row is found by.
        let n = AGENT_WRITTEN.len() + 1;
        let types: Vec<Option<&str>> =
            AGENT_WRITTEN.iter().map(|(_, ty)| Some(*ty)).chain(std::iter::once(Some("BIGINT"))).collect();
        let dirty: Vec<i64> = std::mem::take(&mut self.dirty).into_iter().collect();
        for ids in dirty.chunks(CHUNK) {
            let mut sql = String::from("UPDATE agents SET ");
            for (k, (col, _)) in AGENT_WRITTEN.iter().enumerate() {
                if k > 0 {
                    sql.push_str(", ");
                }
                sql.push_str(&format!("{col} = v.column{}", k + 1));
            }
            sql.push_str(" FROM (VALUES ");
            let mut args = AnyArguments::default();
            for (k, id) in ids.iter().enumerate() {
                if k > 0 {
                    sql.push_str(", ");
                }
                sql.push_str(&self.backend.values_row(k * n + 1, &types));
                let r = self.row(*id)?;
                r.bind_written(&mut args).and_then(|()| args.add(r.id)).map_err(|e| corrupt(&e.to_string()))?;
            }
            sql.push_str(&format!(") AS v WHERE agents.id = v.column{n}"));
            let done = sqlx::query_with(sqlx::AssertSqlSafe(sql), args).execute(&mut *self.tx).await?;
            if done.rows_affected() != ids.len() as u64 {
                return Err(corrupt("an agent row vanished during its batch"));
            }
        }
        Ok(())
    }
}
