//! Settling the hold of a proxied call: capture the cost (at most the hold), release the rest.
//!
//! A [`Bill`] is made as soon as the hold is granted and owns the duty to settle it. Settling
//! always runs in a task of its own, so it completes even when the request that started it is
//! dropped (the agent hung up). A bill dropped without being settled settles itself for its
//! `abandoned` amount: the whole hold when the cost is metered from the answer (the usage was
//! never read), the price for a fixed-price upstream.

use std::sync::Arc;
use std::time::Duration;

use bulkhead_core::Micros;
use bulkhead_store::{Command, Ledger, StoreError};
use tokio::task::JoinHandle;

use crate::metrics::GATEWAY_COST_CAPPED;

/// The attempts at one settlement when the store is unavailable.
const SETTLE_ATTEMPTS: u32 = 6;

pub struct Bill {
    ledger: Ledger,
    hold_id: String,
    held: Micros,
    abandoned: Micros,
    upstream: Arc<str>,
    rt: tokio::runtime::Handle,
    armed: bool,
}

impl Bill {
    /// Must be made inside the runtime (it keeps a handle to spawn from `Drop`).
    pub fn new(ledger: Ledger, hold_id: String, held: Micros, abandoned: Micros, upstream: Arc<str>) -> Bill {
        Bill { ledger, hold_id, held, abandoned, upstream, rt: tokio::runtime::Handle::current(), armed: true }
    }

    pub fn held(&self) -> Micros {
        self.held
    }

    /// Settles for `cost` and waits until it is committed (or has failed for good).
    pub async fn settle(self, cost: Micros) {
        let task = self.spawn(cost);
        // The settlement runs to its end even if this wait is dropped.
        let _ = task.await;
    }

    /// Starts settling for `cost` without waiting.
    pub fn spawn(mut self, cost: Micros) -> JoinHandle<()> {
        self.armed = false;
        self.start(cost)
    }

    fn start(&self, cost: Micros) -> JoinHandle<()> {
        let (ledger, hold_id, held, upstream) =
            (self.ledger.clone(), self.hold_id.clone(), self.held, self.upstream.clone());
        self.rt.spawn(settle(ledger, hold_id, held, cost, upstream))
    }
}

impl Drop for Bill {
    fn drop(&mut self) {
        if self.armed {
            self.armed = false;
            tracing::debug!(upstream = %self.upstream, hold = %self.hold_id, "gateway call abandoned; settling");
            drop(self.start(self.abandoned));
        }
    }
}

async fn settle(ledger: Ledger, hold_id: String, held: Micros, cost: Micros, upstream: Arc<str>) {
    let cost = if cost > held {
        tracing::warn!(%upstream, hold = %hold_id, %cost, %held, "metered cost above max_cost_per_request; captured the hold");
        metrics::counter!(GATEWAY_COST_CAPPED, "upstream" => upstream.to_string()).increment(1);
        held
    } else {
        cost
    };
    let mut wait = Duration::from_millis(50);
    for attempt in 1..=SETTLE_ATTEMPTS {
        // Settled by hold id, not by key: a key rotated mid-call must not make the call free.
        let cmd = Command::Settle { hold_id: hold_id.clone(), amount: cost };
        match ledger.submit(cmd).await {
            Ok(reply) => {
                crate::api::record_outcome(&reply);
                if reply.status == 200 {
                    tracing::debug!(%upstream, hold = %hold_id, %cost, "gateway call settled");
                } else {
                    // A revoked agent's holds were released by the revocation.
                    tracing::warn!(%upstream, hold = %hold_id, status = reply.status, code = ?reply.code(), "gateway settlement refused");
                }
                return;
            }
            Err(StoreError::ShutDown) => {
                tracing::error!(%upstream, hold = %hold_id, "ledger shut down before a gateway call was settled; the hold will expire");
                return;
            }
            Err(e) if attempt < SETTLE_ATTEMPTS => {
                tracing::warn!(%upstream, hold = %hold_id, error = %e, attempt, "gateway settlement failed; retrying");
                tokio::time::sleep(wait).await;
                wait = (wait * 2).min(Duration::from_secs(2));
            }
            Err(e) => {
                tracing::error!(%upstream, hold = %hold_id, error = %e, "gateway settlement failed; the hold will expire");
            }
        }
    }
}
