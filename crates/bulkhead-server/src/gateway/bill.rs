//! Paying for proxied calls: leases of call slots, and the bill each call settles.
//!
//! A call may go upstream only with a **slot**: `max_cost_per_request` held, under every check
//! of the contract, by a committed `Command::Lease`. A lease is one durable hold of `n` slots
//! that the ledger grants as a `MeteredHold` of one slot plus as many more as fit under every cap
//! of the agent's chain and its rate limit right now. Calls of the same key to the same upstream
//! take slots from the current lease in memory, so a busy agent's calls do not each wait for a
//! commit before they are forwarded; the money they may spend is held all the same.
//!
//! When a call's answer is over, its [`Bill`] records the cost in its lease (at most the slot;
//! the rest of the slot is released). A flusher task settles recorded costs in the background
//! (`Command::LeaseSettle`, one per lease per round, every [`GATHER_FOR`] or so, group-committed
//! with everything else), so the agent never waits for the settlement either. Its audit trail
//! gets one `capture` event per settlement, with each call's cost in it (the proxy gateway's
//! leases), or one `capture` event per call under the lease's scope (the MCP gateway's: contract
//! §11 wants an event per `tools/call`), written in the settlement's transaction either way.
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

use crate::metrics::{GATEWAY_COST_CAPPED, GATEWAY_LEASE_SLOTS, GATEWAY_LEASES, GATEWAY_SETTLEMENTS};

/// How long a lease takes new calls.
pub const ACCEPT_FOR: Duration = Duration::from_secs(1);
/// The lifetime a lease's size aims at: a lease used up sooner grows, one that lasts longer shrinks.
pub const TARGET_LIFETIME: Duration = Duration::from_millis(50);
/// The most slots one lease asks for.
pub const SLOTS_MAX: u32 = 4096;
/// A lease with no new call for this long is retired by the flusher.
const IDLE_AFTER: Duration = Duration::from_millis(200);
/// How long a call that needs a new lease waits for the old one's unused slots to go back
/// before it asks anyway (the store is then in trouble, and the grant fails fast or fits).
const REFILL_WAIT: Duration = Duration::from_secs(2);
/// How long the flusher gathers recorded calls before it settles them: a call is settled about
/// this long (plus a commit) after its answer ended.
const GATHER_FOR: Duration = Duration::from_millis(25);
/// How often the flusher looks for idle, old or outdated leases.
const SWEEP_EVERY: Duration = Duration::from_millis(100);
/// The attempts at one settlement while shutting down with the store unavailable.
const SETTLE_ATTEMPTS_AT_SHUTDOWN: u32 = 6;

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// The leases of one gateway, and the flusher that settles their calls. Cheap to clone.
#[derive(Clone)]
pub struct Leases {
    shared: Arc<Shared>,
}

struct Shared {
    ledger: Ledger,
    /// How settlements audit their calls: one event per settlement (the proxy gateway) or one
    /// per call (the MCP gateway).
    audit: LeaseAudit,
    /// The runtime that outlives every HTTP worker: background work (settlements, epoch reads,
    /// giving back a lease nobody waits for) runs there, so that no worker's end cuts it short.
    rt: tokio::runtime::Handle,
    /// The authorization epoch as it stands after a call arrived (its reads run on `rt`).
    epochs: EpochReader,
    slots: Mutex<HashMap<SlotKey, Arc<Slot>>>,
    /// Leases with something to settle, for the flusher.
    queue: Mutex<Vec<Arc<Lease>>>,
    wake: Notify,
    closing: std::sync::atomic::AtomicBool,
    /// Grants under way: closing waits for them, as each may put a lease on a slot.
    granting: std::sync::atomic::AtomicUsize,
    stopped: Notify,
}

/// A key (its hash) and an upstream.
type SlotKey = (String, Arc<str>);

/// The lease of one key for one upstream.
struct Slot {
    current: Mutex<Option<Arc<Lease>>>,
    /// Held while a new lease is taken (until it is on the slot, even if the call that asked
    /// for it is gone); guards the size the next lease asks for.
    refill: Arc<tokio::sync::Mutex<u32>>,
}

struct Lease {
    hold_id: String,
    unit: Micros,
    slots: u32,
    epoch: u64,
    granted: Instant,
    accept_until: Instant,
    key_expires_ms: Option<i64>,
    state: Mutex<State>,
    /// Settlements of one lease go to the ledger one after another, in order.
    settling: tokio::sync::Mutex<()>,
}

#[derive(Default)]
struct State {
    free: u32,
    /// Slots taken by calls so far (what the next lease's size is judged by).
    taken: u32,
    in_flight: u32,
    done: Vec<Micros>,
    retired: bool,
    closed: bool,
    queued: bool,
    last_call: Option<Instant>,
    /// The number of the last settlement sent (the ledger applies each number once).
    seq: i64,
    /// A settlement was given up or refused: its calls' slots are still held, so the lease must
    /// never be closed (a close would release them); it is captured in full when it expires.
    lost: bool,
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

    /// Retires every lease, settles every recorded call and stops the flusher. Calls still in
    /// flight settle on their own lease's expiry (captured in full), so call this after the
    /// server stopped taking and answering requests.
    pub async fn close(&self) {
        let stopped = self.shared.stopped.notified();
        self.shared.closing.store(true, std::sync::atomic::Ordering::SeqCst);
        self.shared.wake.notify_one();
        stopped.await;
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
            let age = old.granted.elapsed();
            *want = if exhausted && age < TARGET_LIFETIME {
                want.saturating_mul(2).min(SLOTS_MAX)
            } else if age > TARGET_LIFETIME * 2 || !exhausted {
                (used / 2).max(1)
            } else {
                *want
            };
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
    fn usable(&self, lease: &Lease) -> bool {
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
        Bill { leases: self.clone(), lease, abandoned, upstream: upstream.clone(), armed: true }
    }

    fn enqueue(&self, lease: &Arc<Lease>) {
        let mut st = lock(&lease.state);
        if !st.queued {
            st.queued = true;
            drop(st);
            lock(&self.shared.queue).push(lease.clone());
            self.shared.wake.notify_one();
        }
    }
}

/// The first slot of a new lease on its way to the call that asked for it: if the call is gone
/// before it takes it, the slot goes back to the lease.
struct Taken {
    leases: Leases,
    lease: Option<Arc<Lease>>,
}

impl Drop for Taken {
    fn drop(&mut self) {
        if let Some(lease) = self.lease.take() {
            {
                let mut st = lock(&lease.state);
                st.free += 1;
                st.taken = st.taken.saturating_sub(1);
                st.in_flight = st.in_flight.saturating_sub(1);
            }
            // A lease retired meanwhile is settled (and closed) by the flusher.
            self.leases.enqueue(&lease);
        }
    }
}

/// The duty to pay for one forwarded call. Dropped without [`Bill::finish`], it pays its
/// `abandoned` amount: the whole slot when the cost is metered from the answer (the usage was
/// never read), the price for a fixed-price upstream.
pub struct Bill {
    leases: Leases,
    lease: Arc<Lease>,
    abandoned: Micros,
    upstream: Arc<str>,
    armed: bool,
}

impl Bill {
    /// What the call's slot holds (`max_cost_per_request`).
    pub fn held(&self) -> Micros {
        self.lease.unit
    }

    /// Records the call's cost; the flusher settles it.
    pub fn finish(mut self, cost: Micros) {
        self.armed = false;
        self.record(cost);
    }

    fn record(&self, cost: Micros) {
        let unit = self.lease.unit;
        let cost = if cost > unit {
            tracing::warn!(upstream = %self.upstream, %cost, held = %unit, "metered cost above max_cost_per_request; captured the slot");
            metrics::counter!(GATEWAY_COST_CAPPED, "upstream" => self.upstream.to_string()).increment(1);
            unit
        } else {
            cost
        };
        {
            let mut st = lock(&self.lease.state);
            st.in_flight = st.in_flight.saturating_sub(1);
            st.done.push(cost);
        }
        self.leases.enqueue(&self.lease);
    }
}

impl Drop for Bill {
    fn drop(&mut self) {
        if self.armed {
            self.armed = false;
            tracing::debug!(upstream = %self.upstream, "gateway call abandoned; charging it");
            self.record(self.abandoned);
        }
    }
}

/// Settles what a lease has recorded: costs, unused slots of a retired lease, and its closing
/// once its last call is in. Waits until committed (retrying while the store is unavailable).
/// Settlements of one lease are sent one after another, so a close never overtakes a capture.
async fn settle(sh: &Shared, lease: &Arc<Lease>) {
    let _order = lease.settling.lock().await;
    let (seq, costs, release, close) = {
        let mut st = lock(&lease.state);
        st.queued = false;
        if st.closed {
            return;
        }
        let costs = std::mem::take(&mut st.done);
        let release = if st.retired { std::mem::take(&mut st.free) } else { 0 };
        let close = st.retired && st.in_flight == 0 && !st.lost;
        if costs.is_empty() && release == 0 && !close {
            return;
        }
        st.closed = close;
        st.seq += 1;
        (st.seq, costs, release, close)
    };
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

/// Settles queued leases round after round, and retires leases that are idle, too old or
/// outdated. Settlements run as tasks of their own (one lease whose store trouble lasts does not
/// hold up the others); those of one lease still go one after another. On close: retires every
/// lease, settles everything and stops.
async fn flusher(sh: Arc<Shared>) {
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
