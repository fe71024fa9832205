//! The authorization epoch: how a decision taken once for many calls (a gateway lease, a key
//! check the MCP gateway remembers) is known to be still good for the next call, in one process
//! or across replicas, without asking the ledger again.
//!
//! The epoch is a number that moves on with every commit that revokes, suspends, resumes or
//! patches an agent or gives one a new key; what was decided under an older epoch must be
//! decided again. The protocol has two halves, and a revocation stops the next call everywhere
//! only because both hold:
//!
//! - **The writer** (`writer.rs`): such a commit moves the store's `authz_epoch` row in its own
//!   transaction, and this process's epoch ([`Ledger::authz_epoch`]) right after the commit,
//!   before any answer goes out. On a shared store (PostgreSQL) its answer goes out
//!   [`EPOCH_SETTLE`] after the commit; so does every revocation's, even one that found the
//!   agent already revoked (the one that revoked it may not have answered yet).
//! - **The reader** ([`EpochReader`]): a call is checked against an epoch that was current
//!   *after the call arrived*, and nothing decided under an older epoch is used for it (the
//!   epoch only grows, so a decision taken under an epoch at least the call's has seen everything
//!   the call must see). When this process's ledger is the store's only writer (SQLite: one
//!   `serve` per data directory) that is the ledger's own epoch, exact at every instant. On a
//!   shared store it is a read of the row, trusted for [`EPOCH_TRUSTED_FOR`] from when it was
//!   *sent*.
//!
//! Why a trusted read is enough: say a command that moves the epoch commits at `c` and is
//! answered at `a >= c + EPOCH_SETTLE`. A call arriving at `r >= a` is checked against a read
//! sent at `t > r - EPOCH_TRUSTED_FOR >= c + (EPOCH_SETTLE - EPOCH_TRUSTED_FOR)`, 5 ms after the
//! commit: the read saw it. Both margins are measured on each process's monotonic clock, so
//! wall-clock skew between replicas does not matter; the one assumption is that each monotonic
//! clock keeps pace with real time to within 5 ms over 25 ms, as every time-based lease assumes.
//!
//! Reads cost the store little: under load a read is sent in the background once the last one
//! is half-way through its trust, so calls do not wait for one (about one read every 10 ms, not
//! one per call); a call that finds no trusted read (the first after a quiet spell) waits for
//! the first read that *starts* after it arrived, and every call arriving while that read is
//! under way shares the next one.

use std::future::Future;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use tokio::sync::Notify;

use super::Ledger;
use crate::{Backend, Store, StoreError};

/// How long a process may go on trusting an authorization epoch it read from a shared store
/// (PostgreSQL), counted from when the read was sent. See [`EPOCH_SETTLE`].
pub const EPOCH_TRUSTED_FOR: Duration = Duration::from_millis(20);

/// On a shared store, an answer to a command that moved the authorization epoch (a revocation,
/// suspension, patch or new key) goes out this long after its commit: by then every read of the
/// older epoch, by any replica, is older than [`EPOCH_TRUSTED_FOR`], so once the answer is out no
/// replica lets a call through on what was decided before it.
pub const EPOCH_SETTLE: Duration = EPOCH_TRUSTED_FOR.saturating_add(Duration::from_millis(5));

impl Ledger {
    /// The authorization epoch: it moves on, before the answer goes out, after every commit
    /// that revoked, suspended or patched an agent or gave one a new key through this ledger.
    /// What was decided under an older epoch (a gateway lease) must be decided again.
    pub fn authz_epoch(&self) -> u64 {
        self.epoch.load(Ordering::SeqCst)
    }
}

/// The reader half of the protocol (see the module doc): the authorization epoch as it stands
/// after a call arrived. Cheap to clone; its clones share their reads. It does not keep the
/// ledger's writer running.
#[derive(Clone)]
pub struct EpochReader {
    origin: Origin,
}

#[derive(Clone)]
enum Origin {
    /// This process's ledger is the store's only writer: its epoch.
    Ledger(Arc<AtomicU64>),
    /// A shared store: the reads of its row, shared by the calls that need one, and the runtime
    /// they run on.
    Store(Store, Arc<Reads>, tokio::runtime::Handle),
}

impl EpochReader {
    /// A reader for `ledger`'s store. On a shared store its reads run in the background on the
    /// current runtime, so make it inside one that outlives the callers.
    pub fn new(ledger: &Ledger) -> EpochReader {
        let origin = match ledger.store.backend() {
            Backend::Sqlite => Origin::Ledger(ledger.epoch.clone()),
            Backend::Postgres => {
                Origin::Store(ledger.store.clone(), Arc::new(Reads::default()), tokio::runtime::Handle::current())
            }
        };
        EpochReader { origin }
    }

    /// The epoch without a read: this process's ledger's when it is the store's only writer
    /// (exact: it moves before any answer goes out); `None` on a shared store, whose epoch only
    /// [`EpochReader::current`] can tell.
    pub fn local(&self) -> Option<u64> {
        match &self.origin {
            Origin::Ledger(epoch) => Some(epoch.load(Ordering::SeqCst)),
            Origin::Store(..) => None,
        }
    }

    /// An epoch that was current after this call: the ledger's own on the store's only writer;
    /// on a shared store, a read of the store sent at most [`EPOCH_TRUSTED_FOR`] ago, or the
    /// first read that starts after this call (shared with the calls that arrive meanwhile).
    pub async fn current(&self) -> Result<u64, StoreError> {
        match &self.origin {
            Origin::Ledger(epoch) => Ok(epoch.load(Ordering::SeqCst)),
            Origin::Store(store, reads, rt) => reads.read(rt, store).await,
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// Where reads of the epoch go: the store's row (a stand-in in the tests).
trait Source: Clone + Send + Sync + 'static {
    fn read(&self) -> impl Future<Output = Result<u64, String>> + Send;
}

impl Source for Store {
    async fn read(&self) -> Result<u64, String> {
        self.authz_epoch().await.map(i64::cast_unsigned).map_err(|e| e.to_string())
    }
}

/// Reads of a shared store's epoch, shared by the calls that need one (see the module doc).
#[derive(Default)]
struct Reads {
    state: Mutex<ReadState>,
    done: Notify,
}

#[derive(Default)]
struct ReadState {
    /// Generation of the last read started, and whether it is still under way.
    started: u64,
    running: bool,
    /// The highest generation some call waits for.
    wanted: u64,
    /// The last read finished: its generation and what it read.
    last: Option<(u64, Result<u64, String>)>,
    /// The latest successful read: when it was sent and what it read.
    trusted: Option<(Instant, u64)>,
}

/// What a call does when it arrives (see [`ReadState::arrive`]).
#[derive(Debug, PartialEq, Eq)]
enum Arrival {
    /// Goes on with this epoch, read within its trust.
    Trusted(u64),
    /// Waits for the read of this generation (or of a later one).
    Wait(u64),
}

impl ReadState {
    /// A call arriving at `now`: what it goes on with or waits for, and the generation of a read
    /// to start, if one must start.
    fn arrive(&mut self, now: Instant) -> (Arrival, Option<u64>) {
        if let Some((sent, epoch)) = self.trusted {
            let age = now.saturating_duration_since(sent);
            if age < EPOCH_TRUSTED_FOR {
                let mut start = None;
                if age >= EPOCH_TRUSTED_FOR / 2 && !self.running {
                    self.started += 1;
                    self.wanted = self.wanted.max(self.started);
                    self.running = true;
                    start = Some(self.started);
                }
                return (Arrival::Trusted(epoch), start);
            }
        }
        // Under way or not, the read this call needs is the next one to start.
        let target = self.started + 1;
        self.wanted = self.wanted.max(target);
        let mut start = None;
        if !self.running {
            self.running = true;
            self.started = target;
            start = Some(target);
        }
        (Arrival::Wait(target), start)
    }

    /// The read of generation `g`, sent at `sent`, found `r`: the generation to read next (some
    /// call waits for a later one), or `None` when reads stop for now.
    fn finished(&mut self, g: u64, sent: Instant, r: Result<u64, String>) -> Option<u64> {
        if let Ok(epoch) = r {
            self.trusted = Some((sent, epoch));
        }
        self.last = Some((g, r));
        if self.wanted > g {
            self.started = g + 1;
            Some(g + 1)
        } else {
            self.running = false;
            None
        }
    }

    /// What the read of generation `target` (or of a later one) found, once one has finished.
    fn found(&self, target: u64) -> Option<Result<u64, String>> {
        match &self.last {
            Some((g, r)) if *g >= target => Some(r.clone()),
            _ => None,
        }
    }
}

impl Reads {
    async fn read<S: Source>(self: &Arc<Self>, rt: &tokio::runtime::Handle, source: &S) -> Result<u64, StoreError> {
        let target = {
            let mut st = lock(&self.state);
            let (arrival, start) = st.arrive(Instant::now());
            if let Some(g) = start {
                rt.spawn(Self::rounds(self.clone(), source.clone(), g));
            }
            match arrival {
                Arrival::Trusted(epoch) => return Ok(epoch),
                Arrival::Wait(target) => target,
            }
        };
        loop {
            let notified = self.done.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            if let Some(r) = lock(&self.state).found(target) {
                return r.map_err(StoreError::Failed);
            }
            notified.await;
        }
    }

    /// Reads `first`, then one more round at a time while calls wait for a later one.
    async fn rounds<S: Source>(me: Arc<Self>, source: S, first: u64) {
        let mut g = first;
        loop {
            let sent = Instant::now();
            let r = source.read().await;
            let next = lock(&me.state).finished(g, sent, r);
            me.done.notify_waiters();
            match next {
                Some(n) => g = n,
                None => break,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::AtomicUsize;

    use super::*;

    const HALF: Duration = Duration::from_millis(10);

    #[test]
    fn the_first_call_waits_for_a_read_and_those_arriving_meanwhile_for_the_next() {
        let (mut st, t0) = (ReadState::default(), Instant::now());
        assert_eq!(st.arrive(t0), (Arrival::Wait(1), Some(1)));
        // Read 1 is under way: it may have been sent before these calls arrived.
        assert_eq!(st.arrive(t0), (Arrival::Wait(2), None));
        assert_eq!(st.arrive(t0), (Arrival::Wait(2), None));
        assert_eq!(st.found(1), None);
        assert_eq!(st.finished(1, t0, Ok(7)), Some(2), "someone waits for read 2");
        assert_eq!(st.found(1), Some(Ok(7)));
        assert_eq!(st.found(2), None);
        assert_eq!(st.finished(2, t0, Ok(8)), None, "nobody waits for read 3");
        assert_eq!(st.found(2), Some(Ok(8)));
        assert!(!st.running);
    }

    #[test]
    fn a_read_is_trusted_from_when_it_was_sent_and_refreshed_half_way() {
        let (mut st, sent) = (ReadState::default(), Instant::now());
        assert_eq!(st.arrive(sent), (Arrival::Wait(1), Some(1)));
        assert_eq!(st.finished(1, sent, Ok(3)), None);
        // Young: used as it is, nothing read.
        assert_eq!(st.arrive(sent + HALF - Duration::from_millis(1)), (Arrival::Trusted(3), None));
        // Half-way: still used, and a read starts in the background, once.
        assert_eq!(st.arrive(sent + HALF), (Arrival::Trusted(3), Some(2)));
        assert_eq!(st.arrive(sent + HALF), (Arrival::Trusted(3), None));
        // Past its trust: the call waits for a read that starts after it.
        assert_eq!(st.arrive(sent + EPOCH_TRUSTED_FOR), (Arrival::Wait(3), None));
        assert_eq!(st.finished(2, sent + HALF, Ok(4)), Some(3));
        assert_eq!(st.found(3), None, "read 2 may have been sent before the call arrived");
        let later = sent + EPOCH_TRUSTED_FOR + Duration::from_millis(1);
        assert_eq!(st.finished(3, later, Ok(5)), None);
        assert_eq!(st.found(3), Some(Ok(5)));
        assert_eq!(st.arrive(later), (Arrival::Trusted(5), None));
    }

    #[test]
    fn a_failed_read_is_never_trusted() {
        let (mut st, t0) = (ReadState::default(), Instant::now());
        assert_eq!(st.arrive(t0), (Arrival::Wait(1), Some(1)));
        assert_eq!(st.finished(1, t0, Err("down".into())), None);
        assert_eq!(st.found(1), Some(Err("down".into())), "its waiters get the error");
        assert_eq!(st.arrive(t0), (Arrival::Wait(2), Some(2)), "the next call reads again");
        assert_eq!(st.finished(2, t0, Ok(1)), None);
        assert_eq!(st.arrive(t0 + HALF), (Arrival::Trusted(1), Some(3)));
        assert_eq!(st.finished(3, t0 + HALF, Err("down".into())), None);
        // Trusted from when the last good read was sent, not from the failed one.
        assert_eq!(st.arrive(t0 + HALF), (Arrival::Trusted(1), Some(4)));
        assert_eq!(st.arrive(t0 + EPOCH_TRUSTED_FOR), (Arrival::Wait(5), None));
    }

    /// A store whose reads wait for the test to let them finish, each finding the epoch as it
    /// was when the read was sent.
    #[derive(Clone)]
    struct Gated {
        epoch: Arc<AtomicU64>,
        sent: Arc<AtomicUsize>,
        gate: Arc<tokio::sync::Semaphore>,
    }

    impl Default for Gated {
        fn default() -> Gated {
            Gated { epoch: Arc::default(), sent: Arc::default(), gate: Arc::new(tokio::sync::Semaphore::new(0)) }
        }
    }

    impl Source for Gated {
        async fn read(&self) -> Result<u64, String> {
            let epoch = self.epoch.load(Ordering::SeqCst);
            self.sent.fetch_add(1, Ordering::SeqCst);
            self.gate.acquire().await.map_err(|e| e.to_string())?.forget();
            Ok(epoch)
        }
    }

    async fn until(what: impl Fn() -> bool) {
        while !what() {
            tokio::task::yield_now().await;
        }
    }

    #[tokio::test]
    async fn calls_that_arrive_during_a_read_share_one_sent_after_them() {
        let (reads, src, rt) = (Arc::new(Reads::default()), Gated::default(), tokio::runtime::Handle::current());
        let arrived = Arc::new(AtomicUsize::new(0));
        let call = |reads: &Arc<Reads>| {
            let (reads, src, rt, arrived) = (reads.clone(), src.clone(), rt.clone(), arrived.clone());
            // One thread: a call has arrived (and waits) once its task counted itself.
            tokio::spawn(async move {
                arrived.fetch_add(1, Ordering::SeqCst);
                reads.read(&rt, &src).await.expect("read")
            })
        };
        let first = call(&reads);
        until(|| src.sent.load(Ordering::SeqCst) == 1).await;
        // Committed after read 1 was sent, and answered: the calls arriving now must see it.
        src.epoch.store(1, Ordering::SeqCst);
        let later: Vec<_> = (0..8).map(|_| call(&reads)).collect();
        until(|| arrived.load(Ordering::SeqCst) == 9).await;
        src.gate.add_permits(1);
        assert_eq!(first.await.expect("first"), 0);
        src.gate.add_permits(1);
        for c in later {
            assert_eq!(c.await.expect("later"), 1);
        }
        assert_eq!(src.sent.load(Ordering::SeqCst), 2, "nine calls, two reads");
    }
}
