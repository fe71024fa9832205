//! Settling what leases recorded: the flusher.
//!
//! When a call's answer is over, its [`Bill`](super::bill::Bill) records the cost in its lease
//! (at most the slot; the rest of the slot is released). The flusher settles recorded costs in
//! the background (`Command::LeaseSettle`, one per lease per round, every [`GATHER_FOR`] or so,
//! group-committed with everything else), so the agent never waits for the settlement. Its audit
//! trail gets one `capture` event per settlement, with each call's cost in it (the proxy
//! gateway's leases), or one `capture` event per call under the lease's scope (the MCP gateway's:
//! contract §11 wants an event per `tools/call`), written in the settlement's transaction either
//! way. The flusher also retires leases that are idle, too old or outdated, and on close retires
//! every lease and settles everything.

use std::sync::Arc;
use std::time::Duration;

use bulkhead_core::Micros;
use bulkhead_store::{Command, StoreError};
use tokio::time::Instant;

use super::lease::{Lease, Leases, Shared, Slot, State, lock};
use crate::metrics::GATEWAY_SETTLEMENTS;

/// A lease with no new call for this long is retired by the flusher.
const IDLE_AFTER: Duration = Duration::from_millis(200);
/// How long the flusher gathers recorded calls before it settles them: a call is settled about
/// this long (plus a commit) after its answer ended.
const GATHER_FOR: Duration = Duration::from_millis(25);
/// How often the flusher looks for idle, old or outdated leases.
const SWEEP_EVERY: Duration = Duration::from_millis(100);
/// The attempts at one settlement while shutting down with the store unavailable.
const SETTLE_ATTEMPTS_AT_SHUTDOWN: u32 = 6;

/// One settlement of a lease: what [`State::due`] took off it.
struct Due {
    seq: i64,
    costs: Vec<Micros>,
    release: u32,
    close: bool,
}

impl State {
    /// Takes what is to settle now off the lease (off the flusher's queue too), numbered: the
    /// recorded costs, the unused slots once it is retired, and its closing once its last call
    /// is in (never after a lost settlement); `None` when there is nothing.
    fn due(&mut self) -> Option<Due> {
        self.queued = false;
        if self.closed {
            return None;
        }
        let costs = std::mem::take(&mut self.done);
        let release = if self.retired { std::mem::take(&mut self.free) } else { 0 };
        let close = self.retired && self.in_flight == 0 && !self.lost;
        if costs.is_empty() && release == 0 && !close {
            return None;
        }
        self.closed = close;
        self.seq += 1;
        Some(Due { seq: self.seq, costs, release, close })
    }
}

/// Settles what a lease has recorded: costs, unused slots of a retired lease, and its closing
/// once its last call is in. Waits until committed (retrying while the store is unavailable).
/// Settlements of one lease are sent one after another, so a close never overtakes a capture.
pub(super) async fn settle(sh: &Shared, lease: &Arc<Lease>) {
    let _order = lease.settling.lock().await;
    let Some(Due { seq, costs, release, close }) = lock(&lease.state).due() else { return };
    // The calls of a settlement that does not land stay held by the lease: it must then never be
    // closed (that would release them) and is captured in full when it expires.
    let lost = |why: &str| {
        let mut st = lock(&lease.state);
        st.lost = true;
        st.closed = false;
        tracing::error!(hold = %lease.hold_id, calls = costs.len(), "{why}; the lease will be captured in full when it expires");
        metrics::counter!(GATEWAY_SETTLEMENTS, "result" => "abandoned").increment(1);
    };
    let mut wait = Duration::from_millis(50);
    let mut attempt = 0;
    loop {
        attempt += 1;
        // The same number on every attempt: one that landed although its answer was lost is
        // not applied twice.
        let cmd = Command::LeaseSettle {
            hold_id: lease.hold_id.clone(),
            seq,
            unit: lease.unit,
            costs: costs.clone(),
            release,
            close,
            audit: sh.audit,
        };
        match sh.ledger.submit(cmd).await {
            Ok(reply) if reply.answer.is_ok() => {
                crate::reply::record_outcome(&reply);
                metrics::counter!(GATEWAY_SETTLEMENTS, "result" => "settled").increment(1);
                return;
            }
            Ok(reply) => {
                tracing::warn!(hold = %lease.hold_id, refusal = ?reply.answer.err(), "gateway settlement refused");
                metrics::counter!(GATEWAY_SETTLEMENTS, "result" => "refused").increment(1);
                lost("gateway settlement refused");
                return;
            }
            Err(StoreError::ShutDown) => {
                lost("the ledger shut down before gateway calls were settled");
                return;
            }
            // Retried until it lands (a lease past its expiry answers 409 and ends this), except
            // at shutdown, which waits only so long for a store that does not answer.
            Err(e)
                if attempt < SETTLE_ATTEMPTS_AT_SHUTDOWN || !sh.closing.load(std::sync::atomic::Ordering::SeqCst) =>
            {
                tracing::warn!(hold = %lease.hold_id, error = %e, attempt, "gateway settlement failed; retrying");
                metrics::counter!(GATEWAY_SETTLEMENTS, "result" => "retried").increment(1);
                tokio::time::sleep(wait).await;
                wait = (wait * 2).min(Duration::from_secs(2));
            }
            Err(e) => {
                tracing::warn!(hold = %lease.hold_id, error = %e, attempt, "gateway settlement failed at shutdown");
                lost("gateway settlement failed");
                return;
            }
        }
    }
}

impl Leases {
    /// Retires every lease, settles every recorded call and stops the flusher. Calls still in
    /// flight settle on their own lease's expiry (captured in full), so call this after the
    /// server stopped taking and answering requests.
    pub async fn close(&self) {
        let stopped = self.shared.stopped.notified();
        self.shared.closing.store(true, std::sync::atomic::Ordering::SeqCst);
        self.shared.wake.notify_one();
        stopped.await;
    }

    /// Puts `lease` on the flusher's queue (once until it is settled) and wakes the flusher.
    pub(super) fn enqueue(&self, lease: &Arc<Lease>) {
        let mut st = lock(&lease.state);
        if !st.queued {
            st.queued = true;
            drop(st);
            lock(&self.shared.queue).push(lease.clone());
            self.shared.wake.notify_one();
        }
    }
}

/// Settles queued leases round after round, and retires leases that are idle, too old or
/// outdated. Settlements run as tasks of their own (one lease whose store trouble lasts does not
/// hold up the others); those of one lease still go one after another. On close: retires every
/// lease, settles everything and stops.
pub(super) async fn flusher(sh: Arc<Shared>) {
    let leases = Leases { shared: sh.clone() };
    let mut sweep = tokio::time::interval(SWEEP_EVERY);
    sweep.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut running = tokio::task::JoinSet::new();
    loop {
        let closing = sh.closing.load(std::sync::atomic::Ordering::SeqCst);
        if closing {
            retire_where(&leases, |_| true);
        } else {
            tokio::select! {
                _ = sh.wake.notified() => {
                    // Gather a little more: fewer, larger commits cost the store far less.
                    tokio::time::sleep(GATHER_FOR).await;
                }
                _ = sweep.tick() => {
                    let now = Instant::now();
                    retire_where(&leases, |l| {
                        !leases.usable(l)
                            || lock(&l.state).last_call.is_none_or(|t| now.duration_since(t) >= IDLE_AFTER)
                    });
                }
            }
        }
        while running.try_join_next().is_some() {}
        for l in std::mem::take(&mut *lock(&sh.queue)) {
            let sh = sh.clone();
            running.spawn(async move { settle(&sh, &l).await });
        }
        if closing {
            while running.join_next().await.is_some() {}
            if lock(&sh.queue).is_empty() {
                if sh.granting.load(std::sync::atomic::Ordering::SeqCst) == 0 {
                    lock(&sh.slots).clear();
                    break;
                }
                // A grant still under way puts its lease on a slot; the next round retires it.
                tokio::time::sleep(GATHER_FOR).await;
            }
        }
    }
    sh.stopped.notify_waiters();
}

/// Retires (and queues for settlement) the current leases that `stale` picks. A retired lease
/// stays on its slot until it is settled, so that the next lease of its key is sized only after
/// its unused slots went back; then it is dropped, and slots left without a lease are forgotten.
fn retire_where(leases: &Leases, stale: impl Fn(&Lease) -> bool) {
    let slots: Vec<Arc<Slot>> = {
        let mut map = lock(&leases.shared.slots);
        map.retain(|_, s| lock(&s.current).is_some() || Arc::strong_count(s) > 1);
        map.values().cloned().collect()
    };
    for slot in slots {
        let mut current = lock(&slot.current);
        let Some(l) = current.as_ref() else { continue };
        let (retired, settled) = {
            let st = lock(&l.state);
            (st.retired, st.closed || (st.lost && st.in_flight == 0 && st.done.is_empty() && st.free == 0))
        };
        if retired {
            if settled {
                *current = None;
            }
        } else if stale(l) {
            lock(&l.state).retired = true;
            leases.enqueue(l);
        }
    }
}
