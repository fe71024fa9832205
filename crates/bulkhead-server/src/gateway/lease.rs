//! Leases of call slots: a call may go upstream only with a slot.
//!
//! A slot is `max_cost_per_request` held, under every check of the contract, by a committed
//! `Command::Lease`. A lease is one durable hold of `n` slots that the ledger grants as a
//! `MeteredHold` of one slot plus as many more as fit under every cap of the agent's chain and
//! its rate limit right now. Calls of the same key to the same upstream take slots from the
//! current lease in memory, so a busy agent's calls do not each wait for a commit before they
//! are forwarded; the money they may spend is held all the same. Each call's slot travels in a
//! [`Bill`] (see `bill.rs`), and the flusher settles what the bills record (see `settle.rs`).
//!
//! A lease stops taking calls when its slots are gone, after [`ACCEPT_FOR`], when the
//! authorization epoch moves on (a revocation, suspension, patch or new key was committed), or
//! when its key expires; it is then *retired*: its unused slots are released (and
//! their rate-limit tokens given back) and it closes once its last call is settled. A new lease
//! is taken only after the old one's unused slots went back, so an agent near its cap gets
//! exactly the calls that a hold per call would have given it.
//!
//! A lease whose process dies before settling is captured in full when it expires: calls are
//! never free, and what a crash can overcharge is bounded by the lease, which is sized to cover
//! about [`TARGET_LIFETIME`] of the agent's calls.
//!
//! The epoch a call is checked against is one that was current after the call arrived, as the
//! store's [`EpochReader`] gives it (its doc says why a revocation answered by any replica then
//! stops the next call everywhere); a lease is used only by calls whose epoch is not newer than
//! the one read before the lease was granted.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use bulkhead_core::{KeyHash, Micros, Scope};
use bulkhead_store::{Answer, Command, EpochReader, LeaseAudit, Ledger, Reply, StoreError};
use tokio::sync::Notify;
use tokio::time::Instant;

use super::bill::{Bill, Taken};
use super::settle::{flusher, settle};
use crate::metrics::{GATEWAY_LEASE_SLOTS, GATEWAY_LEASES};

/// How long a lease takes new calls.
pub const ACCEPT_FOR: Duration = Duration::from_secs(1);
/// The lifetime a lease's size aims at: a lease used up sooner grows, one that lasts longer shrinks.
pub const TARGET_LIFETIME: Duration = Duration::from_millis(50);
/// The most slots one lease asks for.
pub const SLOTS_MAX: u32 = 4096;
/// How long a call that needs a new lease waits for the old one's unused slots to go back
/// before it asks anyway (the store is then in trouble, and the grant fails fast or fits).
const REFILL_WAIT: Duration = Duration::from_secs(2);

pub(super) fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// The leases of one gateway, and the flusher that settles their calls. Cheap to clone.
#[derive(Clone)]
pub struct Leases {
    pub(super) shared: Arc<Shared>,
}

pub(super) struct Shared {
    pub(super) ledger: Ledger,
    /// How settlements audit their calls: one event per settlement (the proxy gateway) or one
    /// per call (the MCP gateway).
    pub(super) audit: LeaseAudit,
    /// The runtime that outlives every HTTP worker: background work (settlements, epoch reads,
    /// giving back a lease nobody waits for) runs there, so that no worker's end cuts it short.
    pub(super) rt: tokio::runtime::Handle,
    /// The authorization epoch as it stands after a call arrived (its reads run on `rt`).
    epochs: EpochReader,
    pub(super) slots: Mutex<HashMap<SlotKey, Arc<Slot>>>,
    /// Leases with something to settle, for the flusher.
    pub(super) queue: Mutex<Vec<Arc<Lease>>>,
    pub(super) wake: Notify,
    pub(super) closing: std::sync::atomic::AtomicBool,
    /// Grants under way: closing waits for them, as each may put a lease on a slot.
    pub(super) granting: std::sync::atomic::AtomicUsize,
    pub(super) stopped: Notify,
}

/// A key (its hash) and an upstream.
type SlotKey = (String, Arc<str>);

/// The lease of one key for one upstream.
pub(super) struct Slot {
    pub(super) current: Mutex<Option<Arc<Lease>>>,
    /// Held while a new lease is taken (until it is on the slot, even if the call that asked
    /// for it is gone); guards the size the next lease asks for.
    refill: Arc<tokio::sync::Mutex<u32>>,
}

/// One granted lease: its hold, its terms, and what its calls did.
pub(super) struct Lease {
    pub(super) hold_id: String,
    pub(super) unit: Micros,
    slots: u32,
    epoch: u64,
    granted: Instant,
    accept_until: Instant,
    key_expires_ms: Option<i64>,
    pub(super) state: Mutex<State>,
    /// Settlements of one lease go to the ledger one after another, in order.
    pub(super) settling: tokio::sync::Mutex<()>,
}

#[derive(Default)]
pub(super) struct State {
    pub(super) free: u32,
    /// Slots taken by calls so far (what the next lease's size is judged by).
    pub(super) taken: u32,
    pub(super) in_flight: u32,
    /// The costs recorded by calls whose answer is over, not yet settled.
    pub(super) done: Vec<Micros>,
    pub(super) retired: bool,
    pub(super) closed: bool,
    /// On the flusher's queue.
    pub(super) queued: bool,
    pub(super) last_call: Option<Instant>,
    /// The number of the last settlement sent (the ledger applies each number once).
    pub(super) seq: i64,
    /// A settlement was given up or refused: its calls' slots are still held, so the lease must
    /// never be closed (a close would release them); it is captured in full when it expires.
    pub(super) lost: bool,
}

/// The size the next lease of a key and upstream asks for, once the last one (which asked for
/// `want` slots, had `used` of them taken, all of them if `exhausted`) retires at `age`: twice as
/// many when they were used up within [`TARGET_LIFETIME`], half of those used when it lasted over
/// twice that or was not used up, else the same.
fn next_size(want: u32, used: u32, exhausted: bool, age: Duration) -> u32 {
    if exhausted && age < TARGET_LIFETIME {
        want.saturating_mul(2).min(SLOTS_MAX)
    } else if age > TARGET_LIFETIME * 2 || !exhausted {
        (used / 2).max(1)
    } else {
        want
    }
}

/// What [`Leases::acquire`] got for a call.
pub enum Acquired {
    /// A slot: forward the call, then settle its bill.
    Go(Bill),
    /// The ledger's denial, to answer as it is.
    Denied(Reply),
}

impl Leases {
    /// Starts the flusher, its settlements audited as `audit` says; must be called inside the
    /// runtime.
    pub fn start(ledger: Ledger, audit: LeaseAudit) -> Leases {
        let shared = Arc::new(Shared {
            epochs: EpochReader::new(&ledger),
            ledger,
            audit,
            rt: tokio::runtime::Handle::current(),
            slots: Mutex::new(HashMap::new()),
            queue: Mutex::new(Vec::new()),
            wake: Notify::new(),
            closing: std::sync::atomic::AtomicBool::new(false),
            granting: std::sync::atomic::AtomicUsize::new(0),
            stopped: Notify::new(),
        });
        shared.rt.spawn(flusher(shared.clone()));
        Leases { shared }
    }

    /// A slot for one call of `key` to `upstream`, or the ledger's denial.
    pub async fn acquire(
        &self,
        key: &KeyHash,
        upstream: &Arc<str>,
        scope: &Scope,
        unit: Micros,
        hold_ms: i64,
        abandoned: Micros,
    ) -> Result<Acquired, StoreError> {
        let sh = &self.shared;
        let grant = |slots: u32| Command::Lease {
            key: key.clone(),
            scope: scope.clone(),
            unit,
            slots,
            expires_ms: i64::try_from(ACCEPT_FOR.as_millis()).unwrap_or(i64::MAX).saturating_add(hold_ms),
        };
        // The epoch as it stands now, read after this call arrived: a lease granted under it
        // has seen every revocation answered before this call.
        let now_epoch = sh.epochs.current().await?;
        let slot = lock(&sh.slots)
            .entry((key.as_str().to_owned(), upstream.clone()))
            .or_insert_with(|| {
                Arc::new(Slot { current: Mutex::new(None), refill: Arc::new(tokio::sync::Mutex::new(1)) })
            })
            .clone();
        if let Some(lease) = self.take(&slot, now_epoch) {
            return Ok(Acquired::Go(self.bill(lease, abandoned, upstream)));
        }
        let mut want = slot.refill.clone().lock_owned().await;
        if let Some(lease) = self.take(&slot, now_epoch) {
            return Ok(Acquired::Go(self.bill(lease, abandoned, upstream)));
        }
        let old = lock(&slot.current).take();
        if let Some(old) = old {
            let (used, exhausted) = {
                let mut st = lock(&old.state);
                st.retired = true;
                (st.taken, st.taken >= old.slots)
            };
            *want = next_size(*want, used, exhausted, old.granted.elapsed());
            // The old lease's unused slots (and settled calls) are back before the new one is
            // sized, so that no call is refused that they would have let through. One commit per
            // new lease, which is sized to last about TARGET_LIFETIME. It runs in a task of its
            // own, which finishes even if this call is dropped; while the store does not answer,
            // the call goes on after a while (its grant then fails fast) rather than wait.
            let task = sh.rt.spawn({
                let (sh, old) = (sh.clone(), old.clone());
                async move { settle(&sh, &old).await }
            });
            let _ = tokio::time::timeout(REFILL_WAIT, task).await;
        }
        // Read before the grant: a revocation committed after it makes the lease outdated.
        let epoch = sh.epochs.current().await?;
        let cmd = grant(*want);
        match self.grant(&slot, want, cmd, unit, epoch).await? {
            Ok(mut taken) => match taken.lease.take() {
                Some(lease) => Ok(Acquired::Go(self.bill(lease, abandoned, upstream))),
                None => Err(StoreError::Failed("a granted lease went missing".into())),
            },
            Err(denied) => Ok(Acquired::Denied(denied)),
        }
    }

    /// Asks the ledger for a lease in a task of its own, which also puts the lease on its slot.
    /// A lease granted after its call was dropped (the agent hung up meanwhile) is on its slot
    /// all the same, for the next calls (or retired when idle), and the dropped call's slot
    /// goes back to it.
    async fn grant(
        &self,
        slot: &Arc<Slot>,
        refill: tokio::sync::OwnedMutexGuard<u32>,
        cmd: Command,
        unit: Micros,
        epoch: u64,
    ) -> Result<Result<Taken, Reply>, StoreError> {
        let (tx, rx) = tokio::sync::oneshot::channel();
        let (me, slot) = (self.clone(), slot.clone());
        me.shared.granting.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        self.shared.rt.spawn(async move {
            let granted = me.shared.ledger.submit(cmd).await.and_then(|reply| {
                Ok(me.lease_from(reply, unit, epoch)?.map(|lease| {
                    me.install(&slot, lease.clone());
                    Taken { leases: me.clone(), lease: Some(lease) }
                }))
            });
            // Unsent (the call is gone), the slot goes back as the answer is dropped, before the
            // next call of the key may look at the lease.
            let _ = tx.send(granted);
            drop(refill);
            me.shared.granting.fetch_sub(1, std::sync::atomic::Ordering::SeqCst);
        });
        rx.await.unwrap_or(Err(StoreError::ShutDown))
    }

    /// Makes `lease` its slot's current lease. The grant held the slot's refill lock and the
    /// old lease was taken off first, so none should be there; one that is, is retired.
    fn install(&self, slot: &Slot, lease: Arc<Lease>) {
        let replaced = lock(&slot.current).replace(lease);
        if let Some(old) = replaced {
            lock(&old.state).retired = true;
            self.enqueue(&old);
        }
    }

    /// Takes a slot of the slot's current lease, if it is still good at `epoch`.
    fn take(&self, slot: &Slot, epoch: u64) -> Option<Arc<Lease>> {
        let current = lock(&slot.current);
        let lease = current.as_ref()?;
        // A lease granted after a read at least as new as the call's own has seen everything
        // the call must see (the epoch only grows).
        if lease.epoch < epoch || !self.usable(lease) {
            return None;
        }
        let mut st = lock(&lease.state);
        if st.retired || st.free == 0 {
            return None;
        }
        st.free -= 1;
        st.taken += 1;
        st.in_flight += 1;
        st.last_call = Some(Instant::now());
        Some(lease.clone())
    }

    /// Still taking calls, as far as this process can tell without the store: not too old, the
    /// key not expired, and (when this process is the store's only writer) the epoch unchanged.
    pub(super) fn usable(&self, lease: &Lease) -> bool {
        self.shared.epochs.local().is_none_or(|epoch| lease.epoch == epoch)
            && Instant::now() < lease.accept_until
            && lease.key_expires_ms.is_none_or(|t| self.shared.ledger.now_ms() < t)
    }

    /// A granted lease with its first slot taken, or the denial.
    fn lease_from(&self, reply: Reply, unit: Micros, epoch: u64) -> Result<Result<Arc<Lease>, Reply>, StoreError> {
        let grant = match &reply.answer {
            Ok(Answer::LeaseGrant(g)) => g,
            Err(_) => return Ok(Err(reply)),
            Ok(other) => return Err(StoreError::Corrupt(format!("a lease was answered with {other:?}"))),
        };
        crate::reply::record_outcome(&reply);
        let slots = u32::try_from(grant.slots).unwrap_or(u32::MAX);
        metrics::counter!(GATEWAY_LEASES).increment(1);
        metrics::counter!(GATEWAY_LEASE_SLOTS).increment(u64::from(slots));
        let now = Instant::now();
        Ok(Ok(Arc::new(Lease {
            hold_id: grant.hold_id.clone(),
            unit,
            slots,
            epoch,
            granted: now,
            accept_until: now + ACCEPT_FOR,
            key_expires_ms: grant.key_expires_at,
            state: Mutex::new(State {
                free: slots.saturating_sub(1),
                taken: 1,
                in_flight: 1,
                last_call: Some(now),
                ..State::default()
            }),
            settling: tokio::sync::Mutex::new(()),
        })))
    }

    fn bill(&self, lease: Arc<Lease>, abandoned: Micros, upstream: &Arc<str>) -> Bill {
        Bill::new(self.clone(), lease, abandoned, upstream.clone())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_lease_grows_when_used_up_quickly_and_shrinks_when_it_lasts() {
        let quick = TARGET_LIFETIME / 2;
        assert_eq!(next_size(8, 8, true, quick), 16);
        assert_eq!(next_size(SLOTS_MAX, SLOTS_MAX, true, quick), SLOTS_MAX);
        assert_eq!(next_size(8, 8, true, TARGET_LIFETIME * 3 / 2), 8, "about right: kept");
        assert_eq!(next_size(8, 8, true, TARGET_LIFETIME * 3), 4);
        assert_eq!(next_size(8, 3, false, quick), 1, "half of what was used");
        assert_eq!(next_size(8, 0, false, quick), 1, "never less than one");
    }
}
