//! The ledger: every write, decided by the core and committed in groups.
//!
//! One writer task per process takes the commands waiting in its queue (up to `batch_max`),
//! runs them one after another inside a single transaction and commits once. Each command's
//! reply is sent only after that commit, so a 2xx always means "on disk". While one batch
//! commits, the next one fills up: under load, the cost of an fsync is shared by many requests.
//!
//! Within a batch, agent rows are read once into a cache, changed in memory and written back
//! once before the commit. That is safe because the batch holds the write lock for every row
//! it touches: SQLite has one writer, and on PostgreSQL the batch locks each touched tree's root
//! row (`FOR UPDATE`, in id order) before reading anything of that tree.
//!
//! The files of this folder, in the order a command meets them:
//! - `command.rs`: the commands and their checked inputs (what the server hands in);
//! - `writer.rs`: the writer task and group commit (batch, commit, answer; the epoch's wait);
//! - `epoch.rs`: the authorization epoch, both halves of its protocol stated once, and
//!   `EpochReader`, the epoch as it stands after a call arrived (what the gateways check);
//! - `batch.rs`: one batch: root locks, the row cache, prefetch, and the dispatch of commands;
//! - `money.rs`: money movements: credentials and idempotency, spends and holds, their denials
//!   and the breaker, captures and releases, the cap assertion and alert thresholds;
//! - `expiry.rs`: holds that expire (lazily per tree, and by the sweeper);
//! - `lease.rs`: the gateway's leases and their settlement;
//! - `admin.rs`: agents created, patched, resumed, given a new key and revoked;
//! - `rows.rs`: the SQL that writes a batch's changed rows back (agents, holds, alerts).
//!
//! It never renders an answer (that is the server's) and never decides on its own: every rule
//! is the core's.

mod admin;
mod batch;
mod command;
mod epoch;
mod expiry;
mod lease;
mod money;
mod refusals;
mod rows;
mod writer;

use std::sync::Arc;
use std::sync::atomic::AtomicU64;
use std::time::Duration;

use bulkhead_core::Clock;
use bulkhead_core::runaway::Breaker;
use rand::SeedableRng;
use rand::rngs::StdRng;
use tokio::sync::{mpsc, oneshot};

pub use self::command::{AgentSpec, Caller, Command, Idem, LeaseAudit, Patch};
pub use self::epoch::{EPOCH_SETTLE, EPOCH_TRUSTED_FOR, EpochReader};
use self::refusals::Refusals;
pub use self::refusals::{KEYS_MAX as REFUSED_KEYS_MAX, Tally};
use self::writer::{Cache, Writer};
use crate::alerts::AlertRules;
use crate::answer::Reply;
use crate::{Store, StoreError};

/// How long an idempotency record is replayed.
pub(crate) const IDEMPOTENCY_TTL_MS: i64 = 24 * 3600 * 1000;
/// The deepest tree of agents (a root is depth 0).
pub(crate) const AGENT_DEPTH_MAX: i64 = 8;
/// The most children one agent may spawn.
pub(crate) const CHILDREN_PER_AGENT_MAX: i64 = 1000;
/// Limits on what agents may grow (contract §12, "everything has a limit").
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Limits {
    /// The most agents in one tree (a root and all its descendants).
    pub agents_per_tree: i64,
    /// The most open holds (`POST /v1/holds`) one agent may have at once.
    pub open_holds_per_agent: i64,
    /// The most holds of revoked agents one revocation (or one sweep) releases; the sweeper
    /// releases the rest, a chunk a second, so that a revocation never stalls other decisions.
    pub revoked_holds_chunk: i64,
}

impl Default for Limits {
    fn default() -> Self {
        Limits { agents_per_tree: 10_000, open_holds_per_agent: 1_000, revoked_holds_chunk: 1_000 }
    }
}

/// The most holds one sweep expires.
const SWEEP_HOLDS_MAX: i64 = 1000;

/// Settings of the ledger.
#[derive(Clone, Debug)]
pub struct LedgerConfig {
    pub breaker: Breaker,
    /// The most commands in one transaction.
    pub batch_max: usize,
    /// Which alerts to raise, and for which webhooks.
    pub alerts: AlertRules,
    pub limits: Limits,
    /// The seed of the generator the ledger draws its ids from (spends, holds, alerts); `None`:
    /// a random one (logged at debug; a configured one at info). The same seed gives the same ids
    /// to the same commands committed in the same batches (a sequential run: each batch draws from
    /// a generator seeded by the ledger's). Secrets (keys, the audit key, session seals) never
    /// come from it.
    pub seed: Option<u64>,
}

impl Default for LedgerConfig {
    fn default() -> Self {
        LedgerConfig {
            breaker: Breaker::default(),
            batch_max: 512,
            alerts: AlertRules::default(),
            limits: Limits::default(),
            seed: None,
        }
    }
}

struct Job {
    cmd: Command,
    reply: oneshot::Sender<Result<Reply, StoreError>>,
}

/// The write side of the store. Cheap to clone; the writer stops when the last clone is dropped.
#[derive(Clone)]
pub struct Ledger {
    tx: mpsc::Sender<Job>,
    store: Store,
    clock: Arc<dyn Clock>,
    epoch: Arc<AtomicU64>,
    refusals: Arc<Refusals>,
    seed: u64,
}

/// How often refusals answered from memory are written to the audit trail, coalesced.
pub const REFUSALS_AUDITED_EVERY: Duration = Duration::from_secs(10);

impl Ledger {
    /// Starts the writer task. `handle` lets the caller wait for it to drain at shutdown.
    pub fn start(store: Store, clock: Arc<dyn Clock>, cfg: LedgerConfig) -> (Ledger, tokio::task::JoinHandle<()>) {
        let (tx, rx) = mpsc::channel(cfg.batch_max * 4);
        let rules = Arc::new(cfg.alerts.clone());
        let epoch = Arc::new(AtomicU64::new(0));
        // A configured seed is said plainly; a random one only at debug: ids drawn from a seed in
        // the log could be foreseen by whoever reads it (they are not credentials, but need not
        // be guessable either).
        let seed = match cfg.seed {
            Some(seed) => {
                tracing::info!(seed, "the ledger draws its ids from this seed (a sequential run replays them)");
                seed
            }
            None => {
                let seed = rand::random();
                tracing::debug!(seed, "the ledger draws its ids from this seed");
                seed
            }
        };
        let writer = Writer {
            rng: StdRng::seed_from_u64(seed),
            store: store.clone(),
            clock: clock.clone(),
            cfg,
            rules,
            cache: Cache::default(),
            epoch: epoch.clone(),
            settling: tokio::task::JoinSet::new(),
        };
        // The writer gets a thread and a runtime of its own: the commit path never waits in the
        // queue behind request handlers.
        let (done_tx, done_rx) = oneshot::channel::<()>();
        let spawned = std::thread::Builder::new().name("bulkhead-ledger".into()).spawn(move || {
            match tokio::runtime::Builder::new_current_thread().enable_all().build() {
                Ok(rt) => rt.block_on(writer.run(rx)),
                Err(e) => tracing::error!(error = %e, "cannot start the ledger's runtime"),
            }
            let _ = done_tx.send(());
        });
        if let Err(e) = spawned {
            tracing::error!(error = %e, "cannot start the ledger's thread");
        }
        let handle = tokio::spawn(async move {
            let _ = done_rx.await;
        });
        (Ledger { tx, store, clock, epoch, refusals: Arc::default(), seed }, handle)
    }

    /// Runs one command and waits until it is committed (or failed). A command whose key is
    /// known to be refused is answered at once (see `refusals.rs`).
    pub async fn submit(&self, cmd: Command) -> Result<Reply, StoreError> {
        if let Some(r) = self.refusals.for_command(&cmd, self.clock.now_ms(), self.authz_epoch()) {
            return Ok(r);
        }
        let key = cmd.key().cloned();
        let (reply, rx) = oneshot::channel();
        self.tx.send(Job { cmd, reply }).await.map_err(|_| StoreError::ShutDown)?;
        let reply = rx.await.map_err(|_| StoreError::ShutDown)??;
        if let Some(k) = key {
            self.refusals.learn(&k, &reply, self.clock.now_ms(), self.authz_epoch());
        }
        Ok(reply)
    }

    /// The answer to a call with `key` when that key is known to be refused (unknown, revoked,
    /// expired, or for `spends`, suspended): what a handler sends before reading the body.
    pub fn known_refusal(&self, key: &bulkhead_core::KeyHash, spends: bool) -> Option<Reply> {
        self.refusals.answer(key, spends, self.clock.now_ms(), self.authz_epoch())
    }

    pub fn store(&self) -> &Store {
        &self.store
    }

    /// The seed the ledger's ids are drawn from ([`LedgerConfig::seed`], or the random one).
    pub fn seed(&self) -> u64 {
        self.seed
    }

    pub fn now_ms(&self) -> i64 {
        self.clock.now_ms()
    }

    /// Writes the refusals answered from memory since the last time to the audit trail, one
    /// event per agent and reason. The sweeper does it every [`REFUSALS_AUDITED_EVERY`].
    pub async fn audit_refusals(&self) {
        let tallies = self.refusals.drain();
        if tallies.is_empty() {
            return;
        }
        if let Err(e) = self.submit(Command::RecordRefusals(tallies)).await {
            tracing::warn!(error = %e, "refusals could not be audited");
        }
    }

    /// Starts the periodic sweep of expired holds and old idempotency records.
    pub fn spawn_sweeper(&self, every: Duration) -> tokio::task::JoinHandle<()> {
        let ledger = self.clone();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(every);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            let mut audited = tokio::time::Instant::now();
            loop {
                tick.tick().await;
                if ledger.tx.is_closed() {
                    break;
                }
                if audited.elapsed() >= REFUSALS_AUDITED_EVERY {
                    audited = tokio::time::Instant::now();
                    ledger.audit_refusals().await;
                }
                if let Err(e) = ledger.submit(Command::SweepExpired).await {
                    tracing::warn!(error = %e, "hold sweep failed");
                }
                let cutoff = ledger.now_ms() - IDEMPOTENCY_TTL_MS;
                if let Err(e) = sqlx::query("DELETE FROM idempotency WHERE created_at < $1")
                    .bind(cutoff)
                    .execute(&ledger.store.pool)
                    .await
                {
                    tracing::warn!(error = %e, "idempotency sweep failed");
                }
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use bulkhead_core::{ApiKey, Handle, Micros, Scope, ScopeSet, Span};

    use super::*;
    use crate::answer::Answer;

    /// The ids a ledger seeded with `seed` gives a fixed run of commands: a spend, a hold and
    /// the alerts the spend raised.
    async fn ids_of_a_run(seed: u64) -> Vec<String> {
        let dir = tempfile::tempdir().expect("temp dir");
        let url = format!("sqlite://{}?mode=rwc", dir.path().join("bulkhead.db").display());
        let store = Store::open(&url).await.expect("store");
        let alerts = AlertRules { webhooks: vec!["http://127.0.0.1:9/hook".into()], thresholds: vec![0.5] };
        let cfg = LedgerConfig { seed: Some(seed), alerts, ..LedgerConfig::default() };
        let clock = Arc::new(bulkhead_core::ManualClock::new(1_700_000_000_000));
        let (ledger, writer) = Ledger::start(store.clone(), clock, cfg);
        assert_eq!(ledger.seed(), seed);
        let spec = AgentSpec {
            enforce: true,
            handle: Handle::parse("seeded").unwrap(),
            scopes: ScopeSet::parse(&["payments:write"]).unwrap(),
            spending_cap: Micros::parse("10").unwrap(),
            window: Span::parse("24h").unwrap(),
            per_tx_limit: None,
            lifetime_cap: None,
            rate_limit: None,
            expires_in: None,
            labels: Default::default(),
            breaker: None,
        };
        // The key is a secret: it comes from the OS generator, and the ids must not depend on it.
        let key = ApiKey::generate(&mut rand::rng()).hash();
        let created = ledger.submit(Command::CreateAgent { caller: Caller::Admin, spec, key_hash: key.clone() }).await;
        assert!(matches!(created.expect("create").answer, Ok(Answer::Created(_))));
        let scope = Scope::parse("payments:write").unwrap();
        let mut ids = Vec::new();
        let spend = Command::Spend {
            key: key.clone(),
            scope: scope.clone(),
            amount: Micros::parse("6").unwrap(),
            memo: None,
            idem: None,
        };
        match ledger.submit(spend).await.expect("spend").answer {
            Ok(Answer::Spent(s)) => ids.push(s.id),
            other => panic!("spend: {other:?}"),
        }
        let hold = Command::Hold { key, scope, amount: Micros::parse("1").unwrap(), expires_ms: 60_000, idem: None };
        match ledger.submit(hold).await.expect("hold").answer {
            Ok(Answer::Held(h)) => ids.push(h.id),
            other => panic!("hold: {other:?}"),
        }
        let due = store.due_alerts(i64::MAX, 100).await.expect("alerts");
        assert!(!due.is_empty(), "crossing half the cap raised an alert");
        ids.extend(due.into_iter().map(|a| a.id));
        drop(ledger);
        writer.await.expect("the writer ended");
        ids
    }

    #[tokio::test]
    async fn the_same_seed_gives_the_same_ids() {
        let a = ids_of_a_run(42).await;
        assert_eq!(a, ids_of_a_run(42).await);
        let b = ids_of_a_run(43).await;
        assert!(a.iter().zip(&b).all(|(x, y)| x != y), "another seed, other ids: {a:?} {b:?}");
    }
}
