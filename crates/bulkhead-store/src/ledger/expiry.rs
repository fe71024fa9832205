//! Holds that expire: before a decision on a tree whose chain holds money, and by the sweeper
//! everywhere. An API hold is released at expiry, a gateway hold captured in full. It never
//! waits for a tree's lock it did not take up front (PostgreSQL: `SKIP LOCKED`).

use std::collections::BTreeSet;

use bulkhead_core::Micros;
use bulkhead_core::decision::Movement;
use serde_json::json;
use sqlx::Arguments;

use super::SWEEP_HOLDS_MAX;
use super::batch::{Batch, HOLD_COLUMNS, HoldRow, HoldStatus, R, corrupt, in_list, path_ids};
use crate::Backend;

impl Batch {
    /// Before a decision on `id`'s chain: if any member has money held, close the tree's holds
    /// that are past their expiry, so that they stop counting exactly at `expires_at`. With
    /// nothing held anywhere on the chain there is nothing that could have expired.
    pub(super) async fn expire_for_chain(&mut self, chain: &[i64]) -> R<()> {
        let root = self.row(chain[chain.len() - 1])?.root_id;
        if self.swept.contains(&root) {
            return Ok(());
        }
        let mut any_held = false;
        for a in chain {
            any_held |= self.row(*a)?.held > 0;
        }
        if any_held {
            self.expire_holds(Some(&[root])).await?;
        }
        self.swept.insert(root);
        Ok(())
    }

    /// Expires open holds past their expiry, in the given trees (or everywhere).
    pub(super) async fn expire_holds(&mut self, roots: Option<&[i64]>) -> R<()> {
        // Scans read the table: what this batch changed must be in it first.
        self.flush_holds().await?;
        let rows: Vec<HoldRow> = match roots {
            Some([]) => return Ok(()),
            Some(roots) => {
                let (sql, mut args) = in_list(
                    &format!("SELECT {HOLD_COLUMNS} FROM holds WHERE status = 'open' AND root_id IN "),
                    roots,
                    "",
                )?;
                // At most a chunk per batch, oldest first, so that a tree with many holds expiring
                // at once never stalls the other decisions of the batch; the sweeper and the
                // tree's next decisions close the rest (until then they count, as held: stricter).
                let sql = format!(
                    "{sql} AND expires_at <= ${} ORDER BY expires_at LIMIT ${}",
                    roots.len() + 1,
                    roots.len() + 2
                );
                args.add(self.now).map_err(|e| corrupt(&e.to_string()))?;
                args.add(SWEEP_HOLDS_MAX).map_err(|e| corrupt(&e.to_string()))?;
                sqlx::query_as_with(sqlx::AssertSqlSafe(sql), args).fetch_all(&mut *self.tx).await?
            }
            None => {
                sqlx::query_as(dsql!(
                    "SELECT {HOLD_COLUMNS} FROM holds \
                     WHERE status = 'open' AND expires_at <= $1 ORDER BY expires_at LIMIT $2"
                ))
                .bind(self.now)
                .bind(SWEEP_HOLDS_MAX)
                .fetch_all(&mut *self.tx)
                .await?
            }
        };
        if rows.is_empty() {
            return Ok(());
        }
        let mut rows = rows;
        if roots.is_none() {
            self.keep_lockable(&mut rows).await?;
        }
        for h in rows {
            // A gateway hold nobody settled (the server died mid-call) is charged in full: a
            // call is never free.
            let captured = if h.on_expiry == "capture" { crate::format::micros(h.amount) } else { Micros::ZERO };
            self.close_hold(&h, captured, HoldStatus::Expired, h.expires_at).await?;
        }
        Ok(())
    }

    /// Of holds a global sweep found, keeps those whose tree it may change now. On PostgreSQL the
    /// sweep did not lock their trees up front, and waiting for the locks could deadlock with
    /// another replica's batch: only the free trees are taken; a busy one is swept next time.
    async fn keep_lockable(&mut self, rows: &mut Vec<HoldRow>) -> R<()> {
        if self.backend != Backend::Postgres || rows.is_empty() {
            return Ok(());
        }
        let mut rs: Vec<i64> = rows.iter().filter_map(|h| path_ids(&h.path).first().copied()).collect();
        rs.sort_unstable();
        rs.dedup();
        let (sql, args) = in_list("SELECT id FROM agents WHERE id IN ", &rs, " ORDER BY id FOR UPDATE SKIP LOCKED")?;
        let locked: Vec<(i64,)> = sqlx::query_as_with(sqlx::AssertSqlSafe(sql), args).fetch_all(&mut *self.tx).await?;
        let locked: BTreeSet<i64> = locked.into_iter().map(|r| r.0).collect();
        rows.retain(|h| path_ids(&h.path).first().is_some_and(|r| locked.contains(r)));
        Ok(())
    }

    /// Releases open API holds of revoked agents that their revocation left (it releases at
    /// most `revoked_holds_chunk` of them): a chunk per sweep.
    pub(super) async fn sweep_revoked_holds(&mut self) -> R<()> {
        self.flush_holds().await?;
        let mut rows: Vec<HoldRow> = sqlx::query_as(dsql!(
            "SELECT {HOLD_COLUMNS} FROM holds WHERE status = 'open' AND on_expiry = 'release' \
             AND agent_id IN (SELECT id FROM agents WHERE status = 'revoked') LIMIT $1"
        ))
        .bind(self.limits.revoked_holds_chunk)
        .fetch_all(&mut *self.tx)
        .await?;
        self.keep_lockable(&mut rows).await?;
        for h in rows {
            self.release_revoked(&h).await?;
        }
        Ok(())
    }

    /// Releases one open hold of a revoked agent, audited as the revocation's.
    pub(super) async fn release_revoked(&mut self, h: &HoldRow) -> R<()> {
        self.close_hold(h, Micros::ZERO, HoldStatus::Released, self.now).await?;
        let handle = self.row(h.agent_id)?.handle.clone();
        let e = self.event(&handle, "release", "allowed");
        e.amount = Some(h.amount);
        e.reference = Some(h.id.clone());
        e.reason = Some("agent_revoked".into());
        Ok(())
    }

    /// Closes an open hold: `captured` of it is spent, the rest released.
    pub(super) async fn close_hold(&mut self, h: &HoldRow, captured: Micros, status: HoldStatus, at: i64) -> R<()> {
        let ids = path_ids(&h.path);
        self.load_ids(&ids).await?;
        let held = Micros::from_micros(h.amount).ok_or_else(|| corrupt("negative hold"))?;
        let cached = self.holds.entry(h.id.clone()).or_insert_with(|| h.clone());
        if cached.status != HoldStatus::Open {
            return Err(corrupt("hold closed twice"));
        }
        cached.status = status;
        let total = cached.captured.checked_add(captured.micros()).ok_or_else(|| corrupt("capture overflow"))?;
        cached.captured = total;
        self.move_chain(&ids, Movement::Settle { held, captured })?;
        self.closed_holds.push((h.id.clone(), status, total, at));
        if status == HoldStatus::Expired {
            let handle = self.row(h.agent_id)?.handle.clone();
            let e = self.event(&handle, "hold.expire", "allowed");
            e.amount = Some(h.amount);
            // What it was held for: a gateway lease's calls whose settlement never came (a
            // crash) have no event of their own, and this one names their scope (for an MCP
            // tool, `mcp.{server}:{tool}`).
            e.scope = Some(h.scope.clone());
            if !captured.is_zero() {
                e.detail = Some(json!({"captured": captured}).to_string());
            }
            e.reference = Some(h.id.clone());
        }
        Ok(())
    }
}
