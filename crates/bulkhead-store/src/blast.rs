//! Blast radius: for every live agent, the most it can spend per period (through its ancestors'
//! caps too), its scopes, and how fast it can be revoked; and the most the fleet can spend a day.

use std::collections::HashMap;
use std::time::Instant;

use bulkhead_core::Micros;
use bulkhead_core::decision::max_spend_per_day;
use serde::Serialize;

use crate::view::{AGENT_COLUMNS, AgentRow, AgentStatus};
use crate::{Store, StoreError};

/// One agent's blast radius.
#[derive(Clone, Debug, Serialize, utoipa::ToSchema)]
pub struct AgentBlast {
    pub handle: String,
    #[schema(required = true)]
    pub parent: Option<String>,
    #[schema(schema_with = crate::view::status_schema)]
    pub status: String,
    pub max_spend_per_period: Micros,
    pub window: String,
    /// The least of the agent's and its ancestors' caps.
    pub effective_max_spend_per_period: Micros,
    /// The most it can spend in a day, through its ancestors' limits too.
    pub effective_max_spend_per_day: Micros,
    pub per_tx_limit: Micros,
    #[schema(required = true)]
    pub lifetime_cap: Option<Micros>,
    pub scopes: Vec<String>,
    pub wildcard_scopes: bool,
    pub no_expiry: bool,
    pub no_lifetime_cap: bool,
    /// Shadow mode: decisions are recorded, not enforced; the caps above do not bind it.
    pub shadow_mode: bool,
    pub revocation_ms: f64,
    pub children: i64,
    pub descendants: i64,
    /// The MCP tools the agent's scopes reach, `server:tool` (`server:*` for a whole server);
    /// filled in by the server, which knows the configured MCP servers.
    pub mcp_tools: Vec<String>,
}

/// The fleet's blast radius.
#[derive(Clone, Debug, Serialize, utoipa::ToSchema)]
pub struct BlastRadius {
    pub agents: Vec<AgentBlast>,
    /// The sum over root agents of their per-day maximum (a child's spend always counts against
    /// its root, so children add nothing beyond their root's cap).
    pub fleet_max_spend_per_day: Micros,
    pub revocation_ms: f64,
    /// Where `revocation_ms` comes from: "measured" (p99 of real revocations) or "expected"
    /// (one store commit, timed now, plus, on PostgreSQL, the wait that lets every replica
    /// see it: `EPOCH_SETTLE`).
    #[schema(value_type = String, examples("measured", "expected"))]
    pub revocation_source: &'static str,
}

impl Store {
    /// Times one no-op write commit: what a revocation costs the store, at least.
    pub async fn probe_commit_ms(&self) -> Result<f64, StoreError> {
        let t = Instant::now();
        let mut tx = self.pool.begin().await?;
        sqlx::query("UPDATE audit_head SET seq = seq WHERE id = 1").execute(&mut *tx).await?;
        tx.commit().await?;
        Ok(t.elapsed().as_secs_f64() * 1000.0)
    }

    /// The blast radius of every agent that is not revoked. `measured_revocation_ms` is the p99
    /// of observed revocations when there are any.
    pub async fn blast_radius(&self, measured_revocation_ms: Option<f64>) -> Result<BlastRadius, StoreError> {
        let rows: Vec<AgentRow> =
            sqlx::query_as(dsql!("SELECT {AGENT_COLUMNS} FROM agents ORDER BY handle")).fetch_all(&self.pool).await?;
        let (revocation_ms, revocation_source) = match measured_revocation_ms {
            Some(ms) => (ms, "measured"),
            None => {
                let settle = match self.backend {
                    crate::Backend::Postgres => crate::EPOCH_SETTLE.as_secs_f64() * 1000.0,
                    crate::Backend::Sqlite => 0.0,
                };
                (self.probe_commit_ms().await? + settle, "expected")
            }
        };
        let by_id: HashMap<i64, &AgentRow> = rows.iter().map(|r| (r.id, r)).collect();
        let mut children: HashMap<i64, i64> = HashMap::new();
        let mut descendants: HashMap<i64, i64> = HashMap::new();
        for r in rows.iter().filter(|r| r.status != AgentStatus::Revoked) {
            if let Some(p) = r.parent_id {
                *children.entry(p).or_default() += 1;
            }
            for a in r.path_ids().into_iter().filter(|a| *a != r.id) {
                *descendants.entry(a).or_default() += 1;
            }
        }
        // Summed exactly in i128 and saturated once at the end: a sum clamped on the way could
        // come out smaller than it was before the clamp.
        let mut fleet: i128 = 0;
        let mut agents = Vec::new();
        for r in rows.iter().filter(|r| r.status != AgentStatus::Revoked) {
            let limits = r.limits();
            let mut effective = limits.spending_cap;
            let mut effective_day = max_spend_per_day(&limits);
            for a in r.path_ids() {
                if let Some(anc) = by_id.get(&a) {
                    let l = anc.limits();
                    effective = effective.min(l.spending_cap);
                    effective_day = effective_day.min(max_spend_per_day(&l));
                }
            }
            if r.parent_id.is_none() {
                fleet += i128::from(effective_day.micros());
            }
            let view = r.view(None, crate::view::Swept::default(), 0);
            let scopes = r.scope_set();
            agents.push(AgentBlast {
                handle: r.handle.clone(),
                parent: r.parent_id.and_then(|p| by_id.get(&p)).map(|p| p.handle.clone()),
                status: r.status.as_str().to_owned(),
                max_spend_per_period: limits.spending_cap,
                window: view.window,
                effective_max_spend_per_period: effective,
                effective_max_spend_per_day: effective_day,
                per_tx_limit: limits.per_tx_limit,
                lifetime_cap: limits.lifetime_cap,
                wildcard_scopes: scopes.has_wildcard(),
                scopes: scopes.to_strings(),
                no_expiry: r.key_expires_at.is_none(),
                no_lifetime_cap: limits.lifetime_cap.is_none(),
                shadow_mode: r.enforce == 0,
                revocation_ms,
                children: children.get(&r.id).copied().unwrap_or(0),
                descendants: descendants.get(&r.id).copied().unwrap_or(0),
                mcp_tools: Vec::new(),
            });
        }
        let fleet = i64::try_from(fleet).ok().and_then(Micros::from_micros).map_or(Micros::MAX, |f| f.min(Micros::MAX));
        Ok(BlastRadius { agents, fleet_max_spend_per_day: fleet, revocation_ms, revocation_source })
    }
}
