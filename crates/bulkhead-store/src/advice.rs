//! Least-privilege advice (`bulkhead suggest`): pages through an agent's audit trail, and its
//! descendants' (their spending counts against the agent's cap), and hands every event to
//! [`bulkhead_core::advice::Tally`], which does the arithmetic.

use bulkhead_core::Span;
use bulkhead_core::advice::{Advice, Grant, Observation, SPAWN_SCOPE, Tally};
use serde::Serialize;

use crate::audit::{EventRow, page};
use crate::format::{fmt_time, micros};
use crate::view::{AGENT_COLUMNS, AgentRow};
use crate::{Store, StoreError};

/// Events per page read.
const PAGE: i64 = 5_000;

/// The advice for one agent, with what it was computed from.
#[derive(Clone, Debug, Serialize)]
pub struct AgentAdvice {
    pub handle: String,
    pub status: String,
    pub window: String,
    pub created_at: String,
    /// The end of the observed period: now, or the revocation for a revoked agent (or the last
    /// event, if later).
    pub observed_until: String,
    /// Descendants whose money events were counted.
    pub descendants: u64,
    #[serde(flatten)]
    pub advice: Advice,
}

/// One stored event as the advice sees it. `agent` is the handle advised on; `own` says whether
/// the event is recorded for it. A child's allowed `agent.create` event (recorded for the child,
/// `detail.by` naming its creator) is the creator's use of [`SPAWN_SCOPE`].
fn observation<'a>(r: &'a EventRow, agent: &str, own: bool) -> Observation<'a> {
    let mut o = Observation {
        at_ms: r.at,
        own,
        action: &r.action,
        allowed: r.outcome == "allowed",
        reason: r.reason.as_deref(),
        scope: r.scope.as_deref(),
        amount: r.amount.map(micros),
        shadow: r.outcome == "allowed" && r.detail.as_deref().is_some_and(|d| d.contains("\"shadow\":\"would_deny\"")),
    };
    // A gateway lease holds many calls' slots at once; the largest single request it stands for
    // is one slot.
    if r.action == "hold"
        && let (Some(amount), Some(d)) = (r.amount, r.detail.as_deref())
        && d.contains("\"by\":\"gateway\"")
        && let Some(slots) = serde_json::from_str::<serde_json::Value>(d).ok().and_then(|v| v["slots"].as_i64())
        && slots > 0
    {
        o.amount = Some(micros(amount / slots));
    }
    if !own && o.allowed && r.action == "agent.create" {
        let by = r.detail.as_deref().and_then(|d| serde_json::from_str::<serde_json::Value>(d).ok());
        if by.as_ref().and_then(|d| d["by"].as_str()) == Some(agent) {
            o.own = true;
            o.scope = Some(SPAWN_SCOPE);
        }
    }
    o
}

impl Store {
    /// Least-privilege advice for `handle` from its recorded history up to `now_ms`; `None` for
    /// an unknown handle.
    pub async fn advice(&self, handle: &str, now_ms: i64) -> Result<Option<AgentAdvice>, StoreError> {
        let row: Option<AgentRow> = sqlx::query_as(dsql!("SELECT {AGENT_COLUMNS} FROM agents WHERE handle = $1"))
            .bind(handle)
            .fetch_optional(&self.pool)
            .await?;
        let Some(row) = row else { return Ok(None) };
        let limits = row.limits();
        let grant = Grant {
            scopes: row.scope_set(),
            spending_cap: limits.spending_cap,
            per_tx_limit: limits.per_tx_limit,
            created_ms: limits.created_ms,
            window_ms: limits.window_ms,
        };
        let descendants: Vec<(String,)> = sqlx::query_as(
            "SELECT handle FROM agents WHERE root_id = $1 AND id <> $2 AND path LIKE '%,' || $3 || ',%' ORDER BY handle",
        )
        .bind(row.root_id)
        .bind(row.id)
        .bind(row.id.to_string())
        .fetch_all(&self.pool)
        .await?;
        let mut tally = Tally::new(grant.created_ms, grant.window_ms);
        let own = std::iter::once((row.handle.clone(), true));
        for (h, is_own) in own.chain(descendants.iter().map(|(h,)| (h.clone(), false))) {
            let mut after = 0;
            loop {
                let rows = page(self, Some(&h), after, PAGE).await?;
                let Some(last) = rows.last() else { break };
                after = last.seq;
                for r in &rows {
                    tally
                        .observe(&observation(r, &row.handle, is_own))
                        .map_err(|e| StoreError::Corrupt(e.to_string()))?;
                }
            }
        }
        let until = row.revoked_at.map_or(now_ms, |t| t.min(now_ms));
        let advice = tally.finish(&grant, until);
        Ok(Some(AgentAdvice {
            handle: row.handle.clone(),
            status: row.status.as_str().to_owned(),
            window: Span::from_secs(row.window_ms / 1000).map(|s| s.to_string()).unwrap_or_default(),
            created_at: fmt_time(row.created_at),
            observed_until: fmt_time(advice.until_ms),
            descendants: descendants.len() as u64,
            advice,
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(action: &str, amount: i64, detail: Option<&str>) -> EventRow {
        EventRow {
            seq: 1,
            at: 1_000,
            agent: "a".into(),
            action: action.into(),
            outcome: "allowed".into(),
            reason: None,
            scope: Some("llm:x".into()),
            amount: Some(amount),
            reference: Some("hold_1".into()),
            detail: detail.map(str::to_owned),
            prev_hash: String::new(),
            hash: String::new(),
        }
    }

    #[test]
    fn a_gateway_lease_stands_for_one_slot_per_request() {
        let lease = row("hold", 50_000, Some(r#"{"by":"gateway","slots":5}"#));
        assert_eq!(observation(&lease, "a", true).amount, Some(micros(10_000)));
        // An agent's own hold is one request, whatever it holds.
        let own = row("hold", 50_000, None);
        assert_eq!(observation(&own, "a", true).amount, Some(micros(50_000)));
        let capture = row("capture", 30_000, Some(r#"{"by":"gateway","calls":3,"each":"0.01"}"#));
        assert_eq!(observation(&capture, "a", true).amount, Some(micros(30_000)));
    }
}
