//! Alerts: raised inside ledger batches, kept in a durable outbox, delivered by the server.
//!
//! An alert row is written in the same transaction as the decision that raised it, once per
//! configured webhook, with a stable id; delivery marks it done only after a 2xx. Delivery is
//! at least once: a receiver de-duplicates by `id`.

use serde::Serialize;

use crate::{Store, StoreError};

/// What raises alerts: the webhooks to tell and the utilization thresholds to watch.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct AlertRules {
    pub webhooks: Vec<String>,
    /// Fractions of the spending cap in (0, 1], e.g. `[0.8]`.
    pub thresholds: Vec<f64>,
}

/// One pending delivery.
#[derive(Clone, Debug, sqlx::FromRow, Serialize)]
pub struct OutboxRow {
    pub id: String,
    pub webhook: String,
    pub body: String,
    pub attempts: i64,
}

/// An alert the batch raised, to be written to the outbox.
#[derive(Clone, Debug)]
pub(crate) struct NewAlert {
    pub id: String,
    pub body: String,
}

/// Delay before retry number `attempts` (1-based): 0.5 s, 1 s, 2 s, … at most 30 s.
pub fn retry_delay_ms(attempts: i64) -> i64 {
    let exp = attempts.clamp(1, 16) - 1;
    (500_i64 << exp).min(30_000)
}

impl Store {
    /// Deliveries due at `now`, oldest first.
    pub async fn due_alerts(&self, now_ms: i64, limit: i64) -> Result<Vec<OutboxRow>, StoreError> {
        Ok(sqlx::query_as(
            "SELECT id, webhook, body, attempts FROM alert_outbox \
             WHERE delivered_at IS NULL AND next_at <= $1 ORDER BY next_at, id LIMIT $2",
        )
        .bind(now_ms)
        .bind(limit)
        .fetch_all(&self.pool)
        .await?)
    }

    /// Takes a delivery for `lease_ms` so that other replicas leave it alone; false when another
    /// replica got it first.
    pub async fn claim_alert(&self, id: &str, webhook: &str, now_ms: i64, lease_ms: i64) -> Result<bool, StoreError> {
        let r = sqlx::query(
            "UPDATE alert_outbox SET next_at = $1 \
             WHERE id = $2 AND webhook = $3 AND delivered_at IS NULL AND next_at <= $4",
        )
        .bind(now_ms + lease_ms)
        .bind(id)
        .bind(webhook)
        .bind(now_ms)
        .execute(&self.pool)
        .await?;
        Ok(r.rows_affected() == 1)
    }

    /// Records a delivery's outcome: done, or failed with the next attempt scheduled.
    pub async fn finish_alert(
        &self,
        id: &str,
        webhook: &str,
        now_ms: i64,
        result: Result<(), String>,
    ) -> Result<(), StoreError> {
        match result {
            Ok(()) => {
                sqlx::query(
                    "UPDATE alert_outbox SET delivered_at = $1, attempts = attempts + 1, last_error = NULL \
                     WHERE id = $2 AND webhook = $3",
                )
                .bind(now_ms)
                .bind(id)
                .bind(webhook)
                .execute(&self.pool)
                .await?;
            }
            Err(e) => {
                let (attempts,): (i64,) =
                    sqlx::query_as("SELECT attempts FROM alert_outbox WHERE id = $1 AND webhook = $2")
                        .bind(id)
                        .bind(webhook)
                        .fetch_one(&self.pool)
                        .await?;
                sqlx::query(
                    "UPDATE alert_outbox SET attempts = $1, next_at = $2, last_error = $3 \
                     WHERE id = $4 AND webhook = $5 AND delivered_at IS NULL",
                )
                .bind(attempts + 1)
                .bind(now_ms + retry_delay_ms(attempts + 1))
                .bind(e)
                .bind(id)
                .bind(webhook)
                .execute(&self.pool)
                .await?;
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_starts_under_a_second_and_caps_at_thirty() {
        assert_eq!(retry_delay_ms(1), 500);
        assert_eq!(retry_delay_ms(2), 1_000);
        assert_eq!(retry_delay_ms(3), 2_000);
        assert_eq!(retry_delay_ms(7), 30_000);
        assert_eq!(retry_delay_ms(1_000), 30_000);
    }
}
