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

use std::collections::{BTreeSet, HashMap};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use bulkhead_core::decision::{Movement, SpendCheck, authorize, precheck};
use bulkhead_core::key::random_base62;
use bulkhead_core::ratelimit::RateLimit;
use bulkhead_core::{Clock, DenyReason, Handle, KeyHash, Micros, Scope, ScopeSet, Span};
use serde_json::json;
use sqlx::any::AnyArguments;
use sqlx::{Any, Arguments, Transaction};
use tokio::sync::{mpsc, oneshot};

use crate::alerts::{AlertRules, NewAlert};
use crate::answer::{
    AmountProblem, Answer, Held, HoldEnd, LeaseGrant, LeaseSettled, Missing, Outcome, RECORD_TYPED, Recorded, Refusal,
    Remaining, Reply, Revived, Settled, Spent,
};
use crate::audit::{NewEvent, append_events};
use crate::view::{AGENT_COLUMNS, AgentRow, fmt_time};
use crate::{Backend, Store, StoreError};

/// How long an idempotency record is replayed.
pub const IDEMPOTENCY_TTL_MS: i64 = 24 * 3600 * 1000;
/// The deepest tree of agents (a root is depth 0).
pub const AGENT_DEPTH_MAX: i64 = 8;
/// The most children one agent may spawn.
pub const CHILDREN_PER_AGENT_MAX: i64 = 1000;
/// The most holds one sweep expires.
const SWEEP_HOLDS_MAX: i64 = 1000;

/// The runaway-loop breaker: `denials` denials within `window_ms` suspend the agent; so do,
/// when turned on, more than `max_requests` spend/hold requests within `rate_window_ms`, and
/// the same request `repeats` times in a row within `repeat_window_ms`. A count of 0 turns its
/// trigger off; the two optional triggers are off by default.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Breaker {
    pub denials: i64,
    pub window_ms: i64,
    pub max_requests: i64,
    pub rate_window_ms: i64,
    pub repeats: i64,
    pub repeat_window_ms: i64,
}

impl Default for Breaker {
    fn default() -> Self {
        Breaker {
            denials: 50,
            window_ms: 60_000,
            max_requests: 0,
            rate_window_ms: 60_000,
            repeats: 0,
            repeat_window_ms: 60_000,
        }
    }
}

/// One agent's breaker settings: each field set overrides the config's, each `None` follows it.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct BreakerOverride {
    pub denials: Option<i64>,
    pub window_ms: Option<i64>,
    pub max_requests: Option<i64>,
    pub rate_window_ms: Option<i64>,
    pub repeats: Option<i64>,
    pub repeat_window_ms: Option<i64>,
}

impl BreakerOverride {
    /// These settings over `default`.
    pub fn over(self, default: Breaker) -> Breaker {
        Breaker {
            denials: self.denials.unwrap_or(default.denials),
            window_ms: self.window_ms.unwrap_or(default.window_ms),
            max_requests: self.max_requests.unwrap_or(default.max_requests),
            rate_window_ms: self.rate_window_ms.unwrap_or(default.rate_window_ms),
            repeats: self.repeats.unwrap_or(default.repeats),
            repeat_window_ms: self.repeat_window_ms.unwrap_or(default.repeat_window_ms),
        }
    }

    fn to_json(self) -> serde_json::Value {
        json!({
            "denials": self.denials, "window_ms": self.window_ms,
            "max_requests": self.max_requests, "rate_window_ms": self.rate_window_ms,
            "repeats": self.repeats, "repeat_window_ms": self.repeat_window_ms,
        })
    }
}

/// Settings of the ledger.
#[derive(Clone, Debug)]
pub struct LedgerConfig {
    pub breaker: Breaker,
    /// The most commands in one transaction.
    pub batch_max: usize,
    /// Which alerts to raise, and for which webhooks.
    pub alerts: AlertRules,
}

impl Default for LedgerConfig {
    fn default() -> Self {
        LedgerConfig { breaker: Breaker::default(), batch_max: 512, alerts: AlertRules::default() }
    }
}

/// Who is making an admin-style call.
#[derive(Clone, Debug)]
pub enum Caller {
    Admin,
    Agent(KeyHash),
}

/// An `Idempotency-Key` and the hash of the request it came with.
#[derive(Clone, Debug)]
pub struct Idem {
    pub key: String,
    pub request_hash: String,
}

/// A checked request to create an agent.
#[derive(Clone, Debug)]
pub struct AgentSpec {
    pub handle: Handle,
    pub scopes: ScopeSet,
    pub spending_cap: Micros,
    pub window: Span,
    pub per_tx_limit: Option<Micros>,
    pub lifetime_cap: Option<Micros>,
    pub rate_limit: Option<RateLimit>,
    pub expires_in: Option<Span>,
    pub labels: serde_json::Map<String, serde_json::Value>,
    pub breaker: Option<BreakerOverride>,
    /// `false`: shadow mode (root agents only).
    pub enforce: bool,
}

/// A checked change to an agent. `None` leaves a field alone; `Some(None)` clears it.
#[derive(Clone, Debug, Default)]
pub struct Patch {
    pub spending_cap: Option<Micros>,
    pub window: Option<Span>,
    pub per_tx_limit: Option<Micros>,
    pub lifetime_cap: Option<Option<Micros>>,
    pub scopes: Option<ScopeSet>,
    pub rate_limit: Option<Option<RateLimit>>,
    pub labels: Option<serde_json::Map<String, serde_json::Value>>,
    pub breaker: Option<Option<BreakerOverride>>,
    pub enforce: Option<bool>,
}

/// One write for the ledger.
#[derive(Clone, Debug)]
pub enum Command {
    CreateAgent {
        caller: Caller,
        spec: AgentSpec,
        key_hash: KeyHash,
    },
    PatchAgent {
        handle: String,
        patch: Patch,
    },
    Revoke {
        caller: Caller,
        handle: String,
        reason: Option<String>,
    },
    RotateKey {
        handle: String,
        key_hash: KeyHash,
    },
    Resume {
        handle: String,
    },
    Spend {
        key: KeyHash,
        scope: Scope,
        amount: Micros,
        memo: Option<String>,
        idem: Option<Idem>,
    },
    Hold {
        key: KeyHash,
        scope: Scope,
        amount: Micros,
        expires_ms: i64,
        idem: Option<Idem>,
    },
    /// The gateway's hold before forwarding a call: like `Hold`, but captured in full if it
    /// expires unsettled, so a call whose settlement never came (a crash) is not free.
    MeteredHold {
        key: KeyHash,
        scope: Scope,
        amount: Micros,
        expires_ms: i64,
    },
    /// The gateway's settlement of its own hold: no key (it may have been rotated mid-call);
    /// `amount` is captured and the rest released (zero releases it all).
    Settle {
        hold_id: String,
        amount: Micros,
    },
    /// The gateway's lease: every check of a `MeteredHold` of `unit` (the first call's hold,
    /// decided and audited like one), then as many more `unit` slots, up to `slots` in all, as
    /// every cap of the chain and the rate limit allow right now. One hold carries them all and
    /// is captured in full if it expires unsettled. Agents in shadow mode, not active, or with a
    /// runaway trigger get one slot: each of their calls is decided on its own.
    Lease {
        key: KeyHash,
        scope: Scope,
        unit: Micros,
        slots: u32,
        expires_ms: i64,
    },
    /// Settles calls made under a lease: each of `costs` (at most `unit`) is captured from one
    /// slot and the rest of that slot released; `release` unused slots are released (and their
    /// rate-limit tokens given back); `close` releases what is left and closes the lease.
    LeaseSettle {
        hold_id: String,
        /// The settlement's number, from 1 up, per lease: one already applied (a retry after a
        /// commit whose outcome was unknown) is answered without being applied again.
        seq: i64,
        unit: Micros,
        costs: Vec<Micros>,
        release: u32,
        close: bool,
    },
    Capture {
        key: KeyHash,
        hold_id: String,
        amount: Micros,
        idem: Option<Idem>,
    },
    Release {
        key: KeyHash,
        hold_id: String,
        idem: Option<Idem>,
    },
    /// Expires holds past their expiry (run periodically).
    SweepExpired,
}

impl Command {
    fn idem(&self) -> Option<&Idem> {
        match self {
            Command::Spend { idem, .. }
            | Command::Hold { idem, .. }
            | Command::Capture { idem, .. }
            | Command::Release { idem, .. } => idem.as_ref(),
            _ => None,
        }
    }

    /// The hold a command names, if any.
    fn hold_id(&self) -> Option<&str> {
        match self {
            Command::Capture { hold_id, .. }
            | Command::Release { hold_id, .. }
            | Command::Settle { hold_id, .. }
            | Command::LeaseSettle { hold_id, .. } => Some(hold_id),
            _ => None,
        }
    }

    fn key(&self) -> Option<&KeyHash> {
        match self {
            Command::Spend { key, .. }
            | Command::Hold { key, .. }
            | Command::MeteredHold { key, .. }
            | Command::Lease { key, .. }
            | Command::Capture { key, .. }
            | Command::Release { key, .. } => Some(key),
            Command::CreateAgent { caller: Caller::Agent(k), .. }
            | Command::Revoke { caller: Caller::Agent(k), .. } => Some(k),
            _ => None,
        }
    }
}

/// How long a process may go on trusting an authorization epoch it read from a shared store
/// (PostgreSQL), counted from when the read was sent. See [`EPOCH_SETTLE`].
pub const EPOCH_TRUSTED_FOR: Duration = Duration::from_millis(20);

/// On a shared store, an answer to a command that moved the authorization epoch (a revocation,
/// suspension, patch or new key) goes out this long after its commit: by then every read of the
/// older epoch, by any replica, is older than [`EPOCH_TRUSTED_FOR`], so once the answer is out no
/// replica lets a call through on what was decided before it.
pub const EPOCH_SETTLE: Duration = EPOCH_TRUSTED_FOR.saturating_add(Duration::from_millis(5));

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
}

impl Ledger {
    /// Starts the writer task. `handle` lets the caller wait for it to drain at shutdown.
    pub fn start(store: Store, clock: Arc<dyn Clock>, cfg: LedgerConfig) -> (Ledger, tokio::task::JoinHandle<()>) {
        let (tx, rx) = mpsc::channel(cfg.batch_max * 4);
        let rules = Arc::new(cfg.alerts.clone());
        let epoch = Arc::new(AtomicU64::new(0));
        let writer = Writer {
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
        (Ledger { tx, store, clock, epoch }, handle)
    }

    /// Runs one command and waits until it is committed (or failed).
    pub async fn submit(&self, cmd: Command) -> Result<Reply, StoreError> {
        let (reply, rx) = oneshot::channel();
        self.tx.send(Job { cmd, reply }).await.map_err(|_| StoreError::ShutDown)?;
        rx.await.map_err(|_| StoreError::ShutDown)?
    }

    pub fn store(&self) -> &Store {
        &self.store
    }

    /// The authorization epoch: it moves on, before the answer goes out, after every commit
    /// that revoked, suspended or patched an agent or gave one a new key through this ledger.
    /// What was decided under an older epoch (a gateway lease) must be decided again.
    pub fn authz_epoch(&self) -> u64 {
        self.epoch.load(Ordering::SeqCst)
    }

    pub fn now_ms(&self) -> i64 {
        self.clock.now_ms()
    }

    /// Starts the periodic sweep of expired holds and old idempotency records.
    pub fn spawn_sweeper(&self, every: Duration) -> tokio::task::JoinHandle<()> {
        let ledger = self.clone();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(every);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tick.tick().await;
                if ledger.tx.is_closed() {
                    break;
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

struct Writer {
    store: Store,
    clock: Arc<dyn Clock>,
    cfg: LedgerConfig,
    rules: Arc<AlertRules>,
    cache: Cache,
    epoch: Arc<AtomicU64>,
    /// Answers waiting for the authorization epoch to settle; the writer ends only after them.
    settling: tokio::task::JoinSet<()>,
}

/// Rows the SQLite writer keeps between batches. It is the only writer of its file, so what it
/// committed is exactly what is stored; on PostgreSQL other replicas write too, so every batch
/// starts empty and reads under its locks. Any failed batch empties it.
#[derive(Default)]
struct Cache {
    agents: HashMap<i64, AgentRow>,
    by_key: HashMap<String, i64>,
    by_handle: HashMap<String, i64>,
    /// The audit chain head (seq, hash) as last committed.
    head: Option<(i64, String)>,
}

/// The most agent rows the SQLite writer keeps between batches.
const CACHE_AGENTS_MAX: usize = 10_000;

/// A batch failed either before COMMIT was sent (nothing happened; safe to retry each command
/// alone) or at COMMIT (the outcome is unknown; nothing may be retried).
enum BatchError {
    Before(StoreError),
    AtCommit(StoreError),
}

impl From<sqlx::Error> for BatchError {
    fn from(e: sqlx::Error) -> Self {
        BatchError::Before(StoreError::Unavailable(e))
    }
}

impl From<StoreError> for BatchError {
    fn from(e: StoreError) -> Self {
        BatchError::Before(e)
    }
}

impl Writer {
    async fn run(mut self, mut rx: mpsc::Receiver<Job>) {
        let mut jobs = Vec::with_capacity(self.cfg.batch_max);
        while rx.recv_many(&mut jobs, self.cfg.batch_max).await > 0 {
            let batch: Vec<Job> = std::mem::take(&mut jobs);
            let cmds: Vec<&Command> = batch.iter().map(|j| &j.cmd).collect();
            match self.exec(&cmds).await {
                Ok(replies) => {
                    let committed = Instant::now();
                    for (job, (reply, moved)) in batch.into_iter().zip(replies) {
                        self.answer(job, Ok(reply), moved, committed);
                    }
                }
                // A statement the database refused may be one command's fault: retry each alone so
                // that the others still go through. A store that cannot be reached fails them all
                // at once (503 now, rather than one timeout per command).
                Err(BatchError::Before(e)) if batch.len() > 1 && e.is_statement_error() => {
                    tracing::warn!(error = %e, size = batch.len(), "batch failed; retrying its commands one by one");
                    for job in batch {
                        match self.exec(&[&job.cmd]).await {
                            Ok(mut v) => {
                                let (reply, moved) = v.remove(0);
                                self.answer(job, Ok(reply), moved, Instant::now());
                            }
                            Err(BatchError::Before(e) | BatchError::AtCommit(e)) => {
                                let _ = job.reply.send(Err(e));
                            }
                        }
                    }
                }
                Err(BatchError::Before(e) | BatchError::AtCommit(e)) => {
                    tracing::error!(error = %e, size = batch.len(), "batch failed");
                    let msg = e.to_string();
                    for job in batch {
                        let _ = job.reply.send(Err(StoreError::Failed(msg.clone())));
                    }
                }
            }
            while self.settling.try_join_next().is_some() {}
        }
        // Committed answers still waiting go out before the writer (and its runtime) ends.
        while self.settling.join_next().await.is_some() {}
    }

    /// Sends a committed command's answer: at once, or, when it moved the authorization epoch of
    /// a shared store (or is a revocation), [`EPOCH_SETTLE`] after `committed` (without holding
    /// up the writer).
    fn answer(&mut self, job: Job, reply: Result<Reply, StoreError>, settle: bool, committed: Instant) {
        if settle && self.store.backend == Backend::Postgres {
            self.settling.spawn(async move {
                tokio::time::sleep_until((committed + EPOCH_SETTLE).into()).await;
                let _ = job.reply.send(reply);
            });
        } else {
            let _ = job.reply.send(reply);
        }
    }

    /// Runs a batch in one transaction: each command's reply, and whether its answer must wait
    /// for the authorization epoch to settle (it moved the epoch, or it is a revocation).
    async fn exec(&mut self, cmds: &[&Command]) -> Result<Vec<(Reply, bool)>, BatchError> {
        let mut cache = std::mem::take(&mut self.cache);
        if self.store.backend != Backend::Sqlite || cache.agents.len() > CACHE_AGENTS_MAX {
            cache = Cache::default();
        }
        let result = self.exec_with(cmds, cache).await;
        match result {
            Ok((replies, cache)) => {
                self.cache = cache;
                Ok(replies)
            }
            // The cache went down with the failed batch; the next one reads afresh.
            Err(e) => Err(e),
        }
    }

    async fn exec_with(&self, cmds: &[&Command], cache: Cache) -> Result<(Vec<(Reply, bool)>, Cache), BatchError> {
        let now = self.clock.now_ms();
        let tx = self.store.pool.begin().await?;
        let mut b = Batch {
            tx,
            backend: self.store.backend,
            now,
            breaker: self.cfg.breaker,
            rules: self.rules.clone(),
            alerts: Vec::new(),
            agents: cache.agents,
            by_key: cache.by_key,
            by_handle: cache.by_handle,
            dirty: BTreeSet::new(),
            swept: BTreeSet::new(),
            events: Vec::new(),
            holds: HashMap::new(),
            new_holds: Vec::new(),
            closed_holds: Vec::new(),
            touched_holds: BTreeSet::new(),
            authz: false,
        };
        if b.backend == Backend::Postgres {
            // Lock every touched tree's root, in id order, before reading anything of it; the
            // roots' rows come with their locks (read under them, so current).
            let roots = b.resolve_roots(cmds).await?;
            if !roots.is_empty() {
                let (sql, args) = in_list(
                    &format!("SELECT {AGENT_COLUMNS} FROM agents WHERE id IN "),
                    &roots,
                    " ORDER BY id FOR UPDATE",
                )?;
                let rows: Vec<AgentRow> =
                    sqlx::query_as_with(sqlx::AssertSqlSafe(sql), args).fetch_all(&mut *b.tx).await?;
                for r in rows {
                    b.cache(r);
                }
            }
        }
        b.prefetch(cmds).await?;
        let mut replies = Vec::with_capacity(cmds.len());
        for cmd in cmds {
            let before = std::mem::take(&mut b.authz);
            let reply = b.apply(cmd).await?;
            // A revocation that found the agents already revoked waits too: the one that revoked
            // them may not have answered yet.
            replies.push((reply, b.authz || matches!(cmd, Command::Revoke { .. })));
            b.authz |= before;
        }
        b.flush().await?;
        b.write_alerts().await?;
        if b.authz {
            sqlx::query("UPDATE authz_epoch SET n = n + 1 WHERE id = 1").execute(&mut *b.tx).await?;
        }
        let events = std::mem::take(&mut b.events);
        let head = append_events(&mut b.tx, b.backend, events, cache.head).await?;
        let authz = b.authz;
        let committed = b.tx.commit().await;
        if authz {
            // Even when the commit's outcome is unknown: deciding again costs only time.
            self.epoch.fetch_add(1, Ordering::SeqCst);
        }
        committed.map_err(|e| BatchError::AtCommit(StoreError::Unavailable(e)))?;
        Ok((replies, Cache { agents: b.agents, by_key: b.by_key, by_handle: b.by_handle, head }))
    }
}

/// How a new hold ends if nobody settles it.
#[derive(Clone, Copy, Debug)]
struct HoldTerms {
    expires_at: i64,
    /// `release` (API holds) or `capture` (gateway holds).
    on_expiry: &'static str,
}

/// `(window_spent + held) / spending_cap` of a chain member (1.0 for a full zero cap).
fn utilization(m: &bulkhead_core::ChainMember) -> f64 {
    let used = m.counters.window_spent.micros().saturating_add(m.counters.held.micros()) as f64;
    let cap = m.limits.spending_cap.micros() as f64;
    if cap <= 0.0 { if used > 0.0 { f64::INFINITY } else { 0.0 } } else { used / cap }
}

/// Builds `prefix ($1, $2, …) suffix` binding every item.
fn in_list<T>(prefix: &str, items: &[T], suffix: &str) -> Result<(String, AnyArguments), StoreError>
where
    T: Clone + for<'q> sqlx::Encode<'q, Any> + sqlx::Type<Any> + 'static,
{
    let mut args = AnyArguments::default();
    let mut sql = String::from(prefix);
    sql.push('(');
    for (i, item) in items.iter().enumerate() {
        if i > 0 {
            sql.push_str(", ");
        }
        sql.push_str(&format!("${}", i + 1));
        args.add(item.clone()).map_err(|e| StoreError::Corrupt(e.to_string()))?;
    }
    sql.push(')');
    sql.push_str(suffix);
    Ok((sql, args))
}

fn in_list_str(prefix: &str, items: &[&str], suffix: &str) -> Result<(String, AnyArguments), StoreError> {
    let owned: Vec<String> = items.iter().map(|s| s.to_string()).collect();
    in_list(prefix, &owned, suffix)
}

#[derive(Clone, sqlx::FromRow)]
struct HoldRow {
    id: String,
    agent_id: i64,
    path: String,
    /// What the hold still holds (a lease's settled slots are gone from it).
    amount: i64,
    /// What was captured of it so far (a lease is captured call by call while open).
    captured: i64,
    /// The last `LeaseSettle` applied to it (its gateway numbers them 1, 2, …).
    settled_seq: i64,
    status: String,
    expires_at: i64,
    on_expiry: String,
}

/// The columns of a [`HoldRow`].
const HOLD_COLUMNS: &str =
    "id, agent_id, path, amount, COALESCE(captured, 0) AS captured, status, expires_at, on_expiry, settled_seq";

fn path_ids(path: &str) -> Vec<i64> {
    path.split(',').filter_map(|s| s.parse().ok()).collect()
}

struct Batch {
    tx: Transaction<'static, Any>,
    backend: Backend,
    now: i64,
    breaker: Breaker,
    rules: Arc<AlertRules>,
    /// Alerts raised by this batch, written to the outbox before the commit.
    alerts: Vec<NewAlert>,
    agents: HashMap<i64, AgentRow>,
    by_key: HashMap<String, i64>,
    by_handle: HashMap<String, i64>,
    dirty: BTreeSet<i64>,
    /// Trees whose expired holds this batch has already closed.
    swept: BTreeSet<i64>,
    events: Vec<NewEvent>,
    /// Hold rows this batch read or made, as they stand in the batch.
    holds: HashMap<String, HoldRow>,
    /// Holds made by this batch and not yet written.
    new_holds: Vec<NewHold>,
    /// Holds closed by this batch and not yet written: (id, status, captured, closed_at).
    closed_holds: Vec<(String, String, i64, i64)>,
    /// Open leases this batch settled calls of (their `amount` and `captured` to write).
    touched_holds: BTreeSet<String>,
    /// This batch changed what some credential may do (a revocation, a patch, a new key, a
    /// suspension): the ledger's authorization epoch moves on once it commits.
    authz: bool,
}

/// A hold to insert.
struct NewHold {
    id: String,
    agent_id: i64,
    root_id: i64,
    path: String,
    scope: String,
    amount: i64,
    created_at: i64,
    expires_at: i64,
    on_expiry: &'static str,
}

type R<T> = Result<T, BatchError>;

fn corrupt(msg: &str) -> BatchError {
    BatchError::Before(StoreError::Corrupt(msg.to_owned()))
}

impl Batch {
    /// Finds the root of every tree the batch will touch. Roots never change, so this may read
    /// before the locks are taken.
    async fn resolve_roots(&mut self, cmds: &[&Command]) -> R<Vec<i64>> {
        let mut keys: Vec<&str> = Vec::new();
        let mut handles: Vec<&str> = Vec::new();
        let mut holds: Vec<&str> = Vec::new();
        for c in cmds {
            if let Some(k) = c.key() {
                keys.push(k.as_str());
            }
            match c {
                Command::PatchAgent { handle, .. }
                | Command::Revoke { handle, .. }
                | Command::RotateKey { handle, .. }
                | Command::Resume { handle } => handles.push(handle),
                _ => {}
            }
            if let Some(h) = c.hold_id() {
                holds.push(h);
            }
        }
        let mut roots = BTreeSet::new();
        for (prefix, items) in [
            ("SELECT root_id FROM agents WHERE key_hash IN ", &keys),
            ("SELECT root_id FROM agents WHERE handle IN ", &handles),
            ("SELECT root_id FROM holds WHERE id IN ", &holds),
        ] {
            if items.is_empty() {
                continue;
            }
            let mut uniq: Vec<&str> = items.clone();
            uniq.sort_unstable();
            uniq.dedup();
            let (sql, args) = in_list_str(prefix, &uniq, "")?;
            let rows: Vec<(i64,)> =
                sqlx::query_as_with(sqlx::AssertSqlSafe(sql), args).fetch_all(&mut *self.tx).await?;
            roots.extend(rows.into_iter().map(|r| r.0));
        }
        Ok(roots.into_iter().collect())
    }

    async fn load_ids(&mut self, ids: &[i64]) -> R<()> {
        let missing: Vec<i64> = ids.iter().copied().filter(|id| !self.agents.contains_key(id)).collect();
        if missing.is_empty() {
            return Ok(());
        }
        let (sql, args) = in_list(&format!("SELECT {AGENT_COLUMNS} FROM agents WHERE id IN "), &missing, "")?;
        let rows: Vec<AgentRow> = sqlx::query_as_with(sqlx::AssertSqlSafe(sql), args).fetch_all(&mut *self.tx).await?;
        for r in rows {
            self.cache(r);
        }
        Ok(())
    }

    fn cache(&mut self, r: AgentRow) {
        self.by_key.insert(r.key_hash.clone(), r.id);
        self.by_handle.insert(r.handle.clone(), r.id);
        self.agents.entry(r.id).or_insert(r);
    }

    fn row(&self, id: i64) -> R<&AgentRow> {
        self.agents.get(&id).ok_or_else(|| corrupt("agent row missing from batch"))
    }

    fn row_mut(&mut self, id: i64) -> R<&mut AgentRow> {
        self.dirty.insert(id);
        self.agents.get_mut(&id).ok_or_else(|| corrupt("agent row missing from batch"))
    }

    /// The agent holding this key, with its whole chain loaded. `None`: no such (current) key.
    async fn agent_by_key(&mut self, key: &KeyHash) -> R<Option<i64>> {
        let id = match self.by_key.get(key.as_str()) {
            Some(id) => Some(*id),
            None => {
                let row: Option<AgentRow> =
                    sqlx::query_as(dsql!("SELECT {AGENT_COLUMNS} FROM agents WHERE key_hash = $1"))
                        .bind(key.as_str())
                        .fetch_optional(&mut *self.tx)
                        .await?;
                row.map(|r| {
                    let id = r.id;
                    self.cache(r);
                    id
                })
            }
        };
        let Some(id) = id else { return Ok(None) };
        // The cache may know this key from before a rotation in this same batch.
        let row = self.row(id)?;
        if !KeyHash::from_stored(row.key_hash.clone()).ct_eq(key) {
            return Ok(None);
        }
        let ids = row.path_ids();
        self.load_ids(&ids).await?;
        Ok(Some(id))
    }

    async fn agent_by_handle(&mut self, handle: &str) -> R<Option<i64>> {
        if let Some(id) = self.by_handle.get(handle) {
            let id = *id;
            let ids = self.row(id)?.path_ids();
            self.load_ids(&ids).await?;
            return Ok(Some(id));
        }
        let row: Option<AgentRow> = sqlx::query_as(dsql!("SELECT {AGENT_COLUMNS} FROM agents WHERE handle = $1"))
            .bind(handle)
            .fetch_optional(&mut *self.tx)
            .await?;
        match row {
            None => Ok(None),
            Some(r) => {
                let (id, ids) = (r.id, r.path_ids());
                self.cache(r);
                self.load_ids(&ids).await?;
                Ok(Some(id))
            }
        }
    }

    /// The agent first, then each ancestor up to the root.
    fn chain(&self, id: i64) -> R<Vec<i64>> {
        let mut ids = self.row(id)?.path_ids();
        ids.reverse();
        Ok(ids)
    }

    fn chain_revoked(&self, id: i64) -> R<bool> {
        for a in self.chain(id)? {
            if self.row(a)?.status == "revoked" {
                return Ok(true);
            }
        }
        Ok(false)
    }

    fn event(&mut self, agent: &str, action: &str, outcome: &str) -> &mut NewEvent {
        self.events.push(NewEvent {
            at: self.now,
            agent: agent.to_owned(),
            action: action.to_owned(),
            outcome: outcome.to_owned(),
            reason: None,
            scope: None,
            amount: None,
            reference: None,
            detail: None,
        });
        self.events.last_mut().expect("just pushed")
    }

    /// Applies a movement to the counters of every agent of a chain (or hold path).
    fn move_chain(&mut self, ids: &[i64], m: Movement) -> R<()> {
        let now = self.now;
        for id in ids {
            let row = self.row_mut(*id)?;
            let c = row.member(now).counters;
            let next = c.apply(m).ok_or_else(|| corrupt("counter arithmetic out of range"))?;
            row.set_counters(next);
        }
        Ok(())
    }

    /// Applies an allowed movement to `chain` (whose `members` are as they stood before it) and
    /// raises the alerts of the thresholds it crosses. Unless `may_break` (a shadow agent's spend),
    /// asserts, TigerBeetle-style, that it left no cap of the chain broken.
    fn move_allowed(
        &mut self,
        chain: &[i64],
        members: &[bulkhead_core::ChainMember],
        m: Movement,
        may_break: bool,
    ) -> R<()> {
        let now = self.now;
        let before: Vec<f64> = members.iter().map(utilization).collect();
        self.move_chain(chain, m)?;
        for (a, before) in chain.iter().zip(before) {
            let after = utilization(&self.row(*a)?.member(now));
            self.raise_crossings(*a, before, after)?;
        }
        for a in chain.iter().filter(|_| !may_break) {
            let m = self.row(*a)?.member(now);
            let used = m.counters.window_spent.checked_add(m.counters.held);
            assert!(used.is_some_and(|u| u <= m.limits.spending_cap), "allowed movement broke a spending cap");
        }
        Ok(())
    }

    /// Before a decision on `id`'s chain: if any member has money held, close the tree's holds
    /// that are past their expiry, so that they stop counting exactly at `expires_at`. With
    /// nothing held anywhere on the chain there is nothing that could have expired.
    async fn expire_for_chain(&mut self, chain: &[i64]) -> R<()> {
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
    async fn expire_holds(&mut self, roots: Option<&[i64]>) -> R<()> {
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
                let sql = format!("{sql} AND expires_at <= ${}", roots.len() + 1);
                args.add(self.now).map_err(|e| corrupt(&e.to_string()))?;
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
        if roots.is_none() && self.backend == Backend::Postgres {
            // A global sweep did not lock these trees up front. Waiting for their locks now
            // could deadlock with another replica's batch, so take only the free ones; a busy
            // tree is swept next time (and its own decisions expire its holds anyway).
            let mut rs: Vec<i64> = rows.iter().filter_map(|h| path_ids(&h.path).first().copied()).collect();
            rs.sort_unstable();
            rs.dedup();
            let (sql, args) =
                in_list("SELECT id FROM agents WHERE id IN ", &rs, " ORDER BY id FOR UPDATE SKIP LOCKED")?;
            let locked: Vec<(i64,)> =
                sqlx::query_as_with(sqlx::AssertSqlSafe(sql), args).fetch_all(&mut *self.tx).await?;
            let locked: BTreeSet<i64> = locked.into_iter().map(|r| r.0).collect();
            rows.retain(|h| path_ids(&h.path).first().is_some_and(|r| locked.contains(r)));
        }
        for h in rows {
            // A gateway hold nobody settled (the server died mid-call) is charged in full: a
            // call is never free.
            let captured = if h.on_expiry == "capture" { crate::view::micros(h.amount) } else { Micros::ZERO };
            self.close_hold(&h, captured, "expired", h.expires_at).await?;
        }
        Ok(())
    }

    /// Closes an open hold: `captured` of it is spent, the rest released.
    async fn close_hold(&mut self, h: &HoldRow, captured: Micros, status: &str, at: i64) -> R<()> {
        let ids = path_ids(&h.path);
        self.load_ids(&ids).await?;
        let held = Micros::from_micros(h.amount).ok_or_else(|| corrupt("negative hold"))?;
        let cached = self.holds.entry(h.id.clone()).or_insert_with(|| h.clone());
        if cached.status != "open" {
            return Err(corrupt("hold closed twice"));
        }
        cached.status = status.to_owned();
        let total = cached.captured.checked_add(captured.micros()).ok_or_else(|| corrupt("capture overflow"))?;
        cached.captured = total;
        self.move_chain(&ids, Movement::Settle { held, captured })?;
        self.closed_holds.push((h.id.clone(), status.to_owned(), total, at));
        if status == "expired" {
            let handle = self.row(h.agent_id)?.handle.clone();
            let e = self.event(&handle, "hold.expire", "allowed");
            e.amount = Some(h.amount);
            if !captured.is_zero() {
                e.detail = Some(json!({"captured": captured}).to_string());
            }
            e.reference = Some(h.id.clone());
        }
        Ok(())
    }

    /// Raises an alert (when webhooks are configured): `{"id", "type", "agent", "at", …extra}`.
    fn raise(&mut self, kind: &str, agent: &str, extra: serde_json::Value) {
        if self.rules.webhooks.is_empty() {
            return;
        }
        let id = format!("al_{}", random_base62(&mut rand::rng(), 22));
        let mut body = json!({"id": id, "type": kind, "agent": agent, "at": fmt_time(self.now)});
        if let (Some(b), serde_json::Value::Object(extra)) = (body.as_object_mut(), extra) {
            b.extend(extra);
        }
        self.alerts.push(NewAlert { id, body: body.to_string() });
    }

    /// Raises `threshold_crossed` for every configured threshold that `after` reached and
    /// `before` had not, and `cap_reached` when the agent's window is now full.
    fn raise_crossings(&mut self, id: i64, before: f64, after: f64) -> R<()> {
        if self.rules.webhooks.is_empty() {
            return Ok(());
        }
        let now = self.now;
        let row = self.row(id)?;
        let (handle, window_index) = (row.handle.clone(), row.member(now).counters.window_index);
        let already = row.cap_alerted_window == window_index;
        let thresholds = self.rules.thresholds.clone();
        for t in thresholds {
            if before < t && after >= t {
                self.raise("threshold_crossed", &handle, json!({"threshold": t, "utilization": after}));
            }
        }
        if after >= 1.0 && !already {
            self.row_mut(id)?.cap_alerted_window = window_index;
            self.raise("cap_reached", &handle, json!({"cap": "spending_cap", "utilization": after}));
        }
        Ok(())
    }

    async fn write_alerts(&mut self) -> R<()> {
        let alerts = std::mem::take(&mut self.alerts);
        for a in &alerts {
            for hook in &self.rules.webhooks {
                sqlx::query(
                    "INSERT INTO alert_outbox (id, webhook, body, created_at, attempts, next_at) \
                     VALUES ($1, $2, $3, $4, 0, $4)",
                )
                .bind(&a.id)
                .bind(hook)
                .bind(&a.body)
                .bind(self.now)
                .execute(&mut *self.tx)
                .await?;
            }
        }
        Ok(())
    }

    /// Writes every changed agent row back, in one multi-row `UPDATE … FROM (VALUES …)` per
    /// chunk (the same SQL on SQLite and PostgreSQL; `VALUES` columns are named column1…N on both).
    /// Writes the holds this batch made (one multi-row INSERT) and closed (one multi-row UPDATE
    /// that must find every one of them still open).
    async fn flush_holds(&mut self) -> R<()> {
        const CHUNK: usize = 100;
        let bad = |e: sqlx::error::BoxDynError| corrupt(&e.to_string());
        let new_holds = std::mem::take(&mut self.new_holds);
        for chunk in new_holds.chunks(CHUNK) {
            let mut sql = String::from(
                "INSERT INTO holds (id, agent_id, root_id, path, scope, amount, status, created_at, expires_at, on_expiry) VALUES ",
            );
            let mut args = AnyArguments::default();
            for (k, h) in chunk.iter().enumerate() {
                if k > 0 {
                    sql.push_str(", ");
                }
                sql.push_str(&self.backend.values_row(k * 10 + 1, &[None; 10]));
                args.add(h.id.clone()).map_err(bad)?;
                args.add(h.agent_id).map_err(bad)?;
                args.add(h.root_id).map_err(bad)?;
                args.add(h.path.clone()).map_err(bad)?;
                args.add(h.scope.clone()).map_err(bad)?;
                args.add(h.amount).map_err(bad)?;
                args.add("open".to_owned()).map_err(bad)?;
                args.add(h.created_at).map_err(bad)?;
                args.add(h.expires_at).map_err(bad)?;
                args.add(h.on_expiry.to_owned()).map_err(bad)?;
            }
            sqlx::query_with(sqlx::AssertSqlSafe(sql), args).execute(&mut *self.tx).await?;
        }
        let touched: Vec<(String, i64, i64, i64)> = std::mem::take(&mut self.touched_holds)
            .into_iter()
            .filter_map(|id| self.holds.get(&id).map(|h| (id, h.amount, h.captured, h.settled_seq)))
            .collect();
        let types = [Some("TEXT"), Some("BIGINT"), Some("BIGINT"), Some("BIGINT")];
        self.update_open_holds(
            "amount = v.column2, captured = v.column3, settled_seq = v.column4",
            &types,
            &touched,
            |args, (id, amount, captured, seq)| {
                args.add(id.clone())?;
                args.add(*amount)?;
                args.add(*captured)?;
                args.add(*seq)
            },
            "a lease was settled after it closed",
        )
        .await?;
        let closed = std::mem::take(&mut self.closed_holds);
        let types = [Some("TEXT"), Some("TEXT"), Some("BIGINT"), Some("BIGINT")];
        self.update_open_holds(
            "status = v.column2, captured = v.column3, closed_at = v.column4",
            &types,
            &closed,
            |args, (id, status, captured, at)| {
                args.add(id.clone())?;
                args.add(status.clone())?;
                args.add(*captured)?;
                args.add(*at)
            },
            "a hold was closed twice",
        )
        .await?;
        Ok(())
    }

    /// `UPDATE holds SET {set} FROM (VALUES …) AS v WHERE holds.id = v.column1 AND holds.status =
    /// 'open'`, one multi-row statement per chunk of `rows` (the id first, then the columns `set`
    /// names, typed as `types`); every row must find its hold still open, else `why` is corrupt.
    async fn update_open_holds<T>(
        &mut self,
        set: &str,
        types: &[Option<&str>],
        rows: &[T],
        add: impl Fn(&mut AnyArguments, &T) -> Result<(), sqlx::error::BoxDynError>,
        why: &str,
    ) -> R<()> {
        const CHUNK: usize = 100;
        let n = types.len();
        for chunk in rows.chunks(CHUNK) {
            let mut sql = format!("UPDATE holds SET {set} FROM (VALUES ");
            let mut args = AnyArguments::default();
            for (k, row) in chunk.iter().enumerate() {
                if k > 0 {
                    sql.push_str(", ");
                }
                sql.push_str(&self.backend.values_row(k * n + 1, types));
                add(&mut args, row).map_err(|e| corrupt(&e.to_string()))?;
            }
            sql.push_str(") AS v WHERE holds.id = v.column1 AND holds.status = 'open'");
            let done = sqlx::query_with(sqlx::AssertSqlSafe(sql), args).execute(&mut *self.tx).await?;
            if done.rows_affected() != chunk.len() as u64 {
                return Err(corrupt(why));
            }
        }
        Ok(())
    }

    async fn flush(&mut self) -> R<()> {
        self.flush_holds().await?;
        const COLS: [(&str, &str); 37] = [
            ("status", "TEXT"),
            ("key_hash", "TEXT"),
            ("key_expires_at", "BIGINT"),
            ("scopes", "TEXT"),
            ("spending_cap", "BIGINT"),
            ("window_ms", "BIGINT"),
            ("per_tx_limit", "BIGINT"),
            ("lifetime_cap", "BIGINT"),
            ("rate_requests", "BIGINT"),
            ("rate_per_ms", "BIGINT"),
            ("rate_tat", "BIGINT"),
            ("breaker_denials", "BIGINT"),
            ("breaker_window_ms", "BIGINT"),
            ("breaker_recent", "TEXT"),
            ("breaker_max_requests", "BIGINT"),
            ("breaker_rate_window_ms", "BIGINT"),
            ("breaker_repeats", "BIGINT"),
            ("breaker_repeat_window_ms", "BIGINT"),
            ("breaker_rate_tat_us", "BIGINT"),
            ("breaker_repeat_hash", "TEXT"),
            ("breaker_repeat_count", "BIGINT"),
            ("breaker_repeat_since", "BIGINT"),
            ("labels", "TEXT"),
            ("revoked_at", "BIGINT"),
            ("revoke_reason", "TEXT"),
            ("suspended_at", "BIGINT"),
            ("window_index", "BIGINT"),
            ("window_spent", "BIGINT"),
            ("held", "BIGINT"),
            ("lifetime_spent", "BIGINT"),
            ("tx_count", "BIGINT"),
            ("denied_count", "BIGINT"),
            ("root_id", "BIGINT"),
            ("path", "TEXT"),
            ("cap_alerted_window", "BIGINT"),
            ("enforce", "BIGINT"),
            ("id", "BIGINT"),
        ];
        const CHUNK: usize = 100;
        let dirty: Vec<i64> = std::mem::take(&mut self.dirty).into_iter().collect();
        for ids in dirty.chunks(CHUNK) {
            let mut sql = String::from("UPDATE agents SET ");
            for (n, (col, _)) in COLS[..COLS.len() - 1].iter().enumerate() {
                if n > 0 {
                    sql.push_str(", ");
                }
                sql.push_str(&format!("{col} = v.column{}", n + 1));
            }
            sql.push_str(" FROM (VALUES ");
            let mut args = AnyArguments::default();
            let bad = |e: sqlx::error::BoxDynError| corrupt(&e.to_string());
            for (k, id) in ids.iter().enumerate() {
                if k > 0 {
                    sql.push_str(", ");
                }
                let types: Vec<Option<&str>> = COLS.iter().map(|(_, ty)| Some(*ty)).collect();
                sql.push_str(&self.backend.values_row(k * COLS.len() + 1, &types));
                let r = self.row(*id)?.clone();
                args.add(r.status).map_err(bad)?;
                args.add(r.key_hash).map_err(bad)?;
                args.add(r.key_expires_at).map_err(bad)?;
                args.add(r.scopes).map_err(bad)?;
                args.add(r.spending_cap).map_err(bad)?;
                args.add(r.window_ms).map_err(bad)?;
                args.add(r.per_tx_limit).map_err(bad)?;
                args.add(r.lifetime_cap).map_err(bad)?;
                args.add(r.rate_requests).map_err(bad)?;
                args.add(r.rate_per_ms).map_err(bad)?;
                args.add(r.rate_tat).map_err(bad)?;
                args.add(r.breaker_denials).map_err(bad)?;
                args.add(r.breaker_window_ms).map_err(bad)?;
                args.add(r.breaker_recent).map_err(bad)?;
                args.add(r.breaker_max_requests).map_err(bad)?;
                args.add(r.breaker_rate_window_ms).map_err(bad)?;
                args.add(r.breaker_repeats).map_err(bad)?;
                args.add(r.breaker_repeat_window_ms).map_err(bad)?;
                args.add(r.breaker_rate_tat_us).map_err(bad)?;
                args.add(r.breaker_repeat_hash).map_err(bad)?;
                args.add(r.breaker_repeat_count).map_err(bad)?;
                args.add(r.breaker_repeat_since).map_err(bad)?;
                args.add(r.labels).map_err(bad)?;
                args.add(r.revoked_at).map_err(bad)?;
                args.add(r.revoke_reason).map_err(bad)?;
                args.add(r.suspended_at).map_err(bad)?;
                args.add(r.window_index).map_err(bad)?;
                args.add(r.window_spent).map_err(bad)?;
                args.add(r.held).map_err(bad)?;
                args.add(r.lifetime_spent).map_err(bad)?;
                args.add(r.tx_count).map_err(bad)?;
                args.add(r.denied_count).map_err(bad)?;
                args.add(r.root_id).map_err(bad)?;
                args.add(r.path).map_err(bad)?;
                args.add(r.cap_alerted_window).map_err(bad)?;
                args.add(r.enforce).map_err(bad)?;
                args.add(r.id).map_err(bad)?;
            }
            sql.push_str(&format!(") AS v WHERE agents.id = v.column{}", COLS.len()));
            let done = sqlx::query_with(sqlx::AssertSqlSafe(sql), args).execute(&mut *self.tx).await?;
            if done.rows_affected() != ids.len() as u64 {
                return Err(corrupt("an agent row vanished during its batch"));
            }
        }
        Ok(())
    }

    /// Loads, in one query each, the rows of every key and handle the batch names and of their
    /// ancestors, so that commands on many agents do not cost one round trip each.
    async fn prefetch(&mut self, cmds: &[&Command]) -> R<()> {
        let mut keys: Vec<&str> = Vec::new();
        let mut handles: Vec<&str> = Vec::new();
        for c in cmds {
            if let Some(k) = c.key()
                && !self.by_key.contains_key(k.as_str())
            {
                keys.push(k.as_str());
            }
            match c {
                Command::PatchAgent { handle, .. }
                | Command::Revoke { handle, .. }
                | Command::RotateKey { handle, .. }
                | Command::Resume { handle }
                    if !self.by_handle.contains_key(handle.as_str()) =>
                {
                    handles.push(handle)
                }
                _ => {}
            }
        }
        let mut ancestors: BTreeSet<i64> = BTreeSet::new();
        for (prefix, items) in [
            (format!("SELECT {AGENT_COLUMNS} FROM agents WHERE key_hash IN "), &mut keys),
            (format!("SELECT {AGENT_COLUMNS} FROM agents WHERE handle IN "), &mut handles),
        ] {
            if items.is_empty() {
                continue;
            }
            items.sort_unstable();
            items.dedup();
            let (sql, args) = in_list_str(&prefix, items, "")?;
            let rows: Vec<AgentRow> =
                sqlx::query_as_with(sqlx::AssertSqlSafe(sql), args).fetch_all(&mut *self.tx).await?;
            for r in rows {
                ancestors.extend(r.path_ids());
                self.cache(r);
            }
        }
        // The holds that captures, releases and settlements name, in one query.
        let mut hold_ids: Vec<&str> =
            cmds.iter().filter_map(|c| c.hold_id()).filter(|id| !self.holds.contains_key(*id)).collect();
        if !hold_ids.is_empty() {
            hold_ids.sort_unstable();
            hold_ids.dedup();
            let (sql, args) = in_list_str(&format!("SELECT {HOLD_COLUMNS} FROM holds WHERE id IN "), &hold_ids, "")?;
            let rows: Vec<HoldRow> =
                sqlx::query_as_with(sqlx::AssertSqlSafe(sql), args).fetch_all(&mut *self.tx).await?;
            for h in rows {
                ancestors.extend(path_ids(&h.path));
                self.holds.insert(h.id.clone(), h);
            }
        }
        // Rows cached before this batch came with their ancestors; only the new ones need theirs.
        let missing: Vec<i64> = ancestors.into_iter().filter(|id| !self.agents.contains_key(id)).collect();
        self.load_ids(&missing).await
    }

    async fn apply(&mut self, cmd: &Command) -> R<Reply> {
        match cmd {
            Command::SweepExpired => {
                self.expire_holds(None).await?;
                Ok(Reply::ok(Answer::Swept))
            }
            Command::CreateAgent { caller, spec, key_hash } => self.create_agent(caller, spec, key_hash).await,
            Command::PatchAgent { handle, patch } => self.patch_agent(handle, patch).await,
            Command::Revoke { caller, handle, reason } => self.revoke(caller, handle, reason.as_deref()).await,
            Command::RotateKey { handle, key_hash } => {
                let Some(id) = self.agent_by_handle(handle).await? else {
                    return Ok(Reply::refuse(Refusal::NotFound(Missing::Agent)));
                };
                if self.row(id)?.status == "revoked" {
                    return Ok(Reply::refuse(Refusal::AgentRevoked(Revived::RotateKey)));
                }
                let old = self.row(id)?.key_hash.clone();
                self.by_key.remove(&old);
                self.by_key.insert(key_hash.as_str().to_owned(), id);
                self.row_mut(id)?.key_hash = key_hash.as_str().to_owned();
                self.authz = true;
                let h = self.row(id)?.handle.clone();
                self.event(&h, "agent.rotate_key", "allowed");
                Ok(Reply::ok(Answer::KeyRotated))
            }
            Command::Resume { handle } => {
                let Some(id) = self.agent_by_handle(handle).await? else {
                    return Ok(Reply::refuse(Refusal::NotFound(Missing::Agent)));
                };
                match self.row(id)?.status.as_str() {
                    "revoked" => {
                        return Ok(Reply::refuse(Refusal::AgentRevoked(Revived::Resume)));
                    }
                    "suspended" => {
                        let r = self.row_mut(id)?;
                        r.status = "active".into();
                        r.suspended_at = None;
                        r.clear_breaker_state();
                        let h = r.handle.clone();
                        self.event(&h, "agent.resume", "allowed");
                    }
                    _ => {}
                }
                self.agent_reply(id, false)
            }
            Command::Settle { hold_id, amount } => {
                self.settle_hold(None, hold_id, if amount.is_zero() { None } else { Some(*amount) }).await
            }
            Command::LeaseSettle { hold_id, seq, unit, costs, release, close } => {
                self.lease_settle(hold_id, *seq, *unit, costs, *release, *close).await
            }
            Command::Spend { .. }
            | Command::Hold { .. }
            | Command::MeteredHold { .. }
            | Command::Lease { .. }
            | Command::Capture { .. }
            | Command::Release { .. } => self.money(cmd).await,
        }
    }

    /// The shared frame of every agent money call: credentials, then idempotency, then the call.
    async fn money(&mut self, cmd: &Command) -> R<Reply> {
        let (Some(key), idem) = (cmd.key(), cmd.idem()) else {
            return Err(corrupt("money call without a key"));
        };
        let Some(id) = self.agent_by_key(key).await? else {
            return Ok(Reply::deny(DenyReason::InvalidCredentials));
        };
        // Credentials come first, even before a replay: a revoked or expired key never gets an
        // earlier 2xx back (the call below denies it), and its denial is not stored.
        let key_good = !self.chain_revoked(id)? && self.row(id)?.key_expires_at.is_none_or(|t| self.now < t);
        let idem = idem.filter(|_| key_good);
        if let Some(idem) = idem {
            let prior: Option<(String, i64, String, i64)> = sqlx::query_as(
                "SELECT request_hash, status, body, created_at FROM idempotency WHERE agent_id = $1 AND key = $2",
            )
            .bind(id)
            .bind(&idem.key)
            .fetch_optional(&mut *self.tx)
            .await?;
            if let Some((hash, status, body, created)) = prior
                && created > self.now - IDEMPOTENCY_TTL_MS
            {
                if hash != idem.request_hash {
                    return Ok(Reply::refuse(Refusal::IdempotencyKeyReused));
                }
                return Ok(Reply { answer: Recorded::replay(status, body)?, replayed: true, outcome: None });
            }
        }
        let reply = match cmd {
            Command::Spend { scope, amount, memo, .. } => {
                self.spend_or_hold(id, scope, *amount, None, memo.as_deref()).await?
            }
            Command::Hold { scope, amount, expires_ms, .. } => {
                let terms = HoldTerms { expires_at: self.now.saturating_add(*expires_ms), on_expiry: "release" };
                self.spend_or_hold(id, scope, *amount, Some(terms), None).await?
            }
            Command::MeteredHold { scope, amount, expires_ms, .. } => {
                let terms = HoldTerms { expires_at: self.now.saturating_add(*expires_ms), on_expiry: "capture" };
                self.spend_or_hold(id, scope, *amount, Some(terms), None).await?
            }
            Command::Lease { scope, unit, slots, expires_ms, .. } => {
                self.lease(id, scope, *unit, *slots, *expires_ms).await?
            }
            Command::Capture { hold_id, amount, .. } => self.settle(id, hold_id, Some(*amount)).await?,
            Command::Release { hold_id, .. } => self.settle(id, hold_id, None).await?,
            _ => return Err(corrupt("not a money call")),
        };
        if let Some(idem) = idem {
            sqlx::query(
                "INSERT INTO idempotency (agent_id, key, request_hash, status, body, created_at) \
                 VALUES ($1, $2, $3, $4, $5, $6) ON CONFLICT (agent_id, key) DO UPDATE SET \
                 request_hash = excluded.request_hash, status = excluded.status, body = excluded.body, \
                 created_at = excluded.created_at",
            )
            .bind(id)
            .bind(&idem.key)
            .bind(&idem.request_hash)
            .bind(RECORD_TYPED)
            .bind(Recorded::of(&reply.answer)?)
            .bind(self.now)
            .execute(&mut *self.tx)
            .await?;
        }
        Ok(reply)
    }

    /// Records a denial: counts it, feeds the breaker, writes the audit event.
    fn deny(
        &mut self,
        id: i64,
        action: &str,
        reason: DenyReason,
        scope: Option<&Scope>,
        amount: Option<Micros>,
    ) -> R<Reply> {
        let now = self.now;
        let default_breaker = self.breaker;
        let alerting = !self.rules.webhooks.is_empty();
        let row = self.row_mut(id)?;
        row.denied_count += 1;
        let mut suspended = false;
        let counts_for_breaker = !matches!(
            reason,
            DenyReason::InvalidCredentials
                | DenyReason::CredentialRevoked
                | DenyReason::CredentialExpired
                | DenyReason::AgentSuspended
        );
        if counts_for_breaker && row.status == "active" {
            let b = row.breaker(default_breaker);
            if b.denials > 0 {
                // A sliding window: keep the times of the last `denials` denials and trip when
                // all of them fall within `window_ms` of this one.
                let mut recent: std::collections::VecDeque<i64> =
                    row.breaker_recent.split(',').filter_map(|t| t.parse().ok()).collect();
                recent.push_back(now);
                while recent.front().is_some_and(|t| now - *t >= b.window_ms) {
                    recent.pop_front();
                }
                while recent.len() as i64 > b.denials {
                    recent.pop_front();
                }
                suspended = recent.len() as i64 >= b.denials;
                row.breaker_recent = recent.iter().map(i64::to_string).collect::<Vec<_>>().join(",");
            }
        }
        let handle = row.handle.clone();
        let window_index = row.member(now).counters.window_index;
        let cap_hit = matches!(reason, DenyReason::SpendingCap | DenyReason::LifetimeCap)
            && row.cap_alerted_window != window_index
            && alerting;
        if cap_hit {
            row.cap_alerted_window = window_index;
            let cap = if reason == DenyReason::SpendingCap { "spending_cap" } else { "lifetime_cap" };
            self.raise("cap_reached", &handle, json!({"cap": cap, "denied_amount": amount}));
        }
        let e = self.event(&handle, action, "denied");
        e.reason = Some(reason.code().to_owned());
        e.scope = scope.map(|s| s.as_str().to_owned());
        e.amount = amount.map(Micros::micros);
        if suspended {
            self.suspend(id, "runaway_loop_breaker")?;
        }
        Ok(Reply::deny(reason).with_outcome(Outcome { agent: handle, allowed: false, reason: reason.code(), spent: 0 }))
    }

    /// Suspends an active agent by its breaker: status, `suspended_at`, the audit event and the
    /// `agent_suspended` alert. Every trigger's state starts afresh.
    fn suspend(&mut self, id: i64, reason: &str) -> R<()> {
        let now = self.now;
        let row = self.row_mut(id)?;
        if row.status != "active" {
            return Ok(());
        }
        row.status = "suspended".into();
        row.suspended_at = Some(now);
        self.authz = true;
        let row = self.row_mut(id)?;
        row.clear_breaker_state();
        let handle = row.handle.clone();
        self.raise("agent_suspended", &handle, json!({"reason": reason}));
        let e = self.event(&handle, "agent.suspend", "allowed");
        e.reason = Some(reason.to_owned());
        Ok(())
    }

    /// Feeds a spend or hold request (allowed or denied) to the breaker's optional triggers and
    /// returns the one it trips, if any. Shadow agents, agents not active and refused
    /// credentials never feed them.
    fn runaway_step(
        &mut self,
        id: i64,
        action: &str,
        scope: &Scope,
        amount: Micros,
        memo: Option<&str>,
    ) -> R<Option<&'static str>> {
        use bulkhead_core::runaway::{Repeats, fingerprint, rate_step, repeat_step};
        let now = self.now;
        let default_breaker = self.breaker;
        let revoked = self.chain_revoked(id)?;
        let row = self.row(id)?;
        let credential_bad = revoked || row.key_expires_at.is_some_and(|t| now >= t);
        let b = row.breaker(default_breaker);
        if row.enforce == 0 || row.status != "active" || credential_bad || (b.max_requests <= 0 && b.repeats <= 0) {
            return Ok(None);
        }
        let row = self.row_mut(id)?;
        let mut tripped = None;
        if b.max_requests > 0 {
            let (tat, trip) = rate_step(b.max_requests, b.rate_window_ms, row.breaker_rate_tat_us, now);
            row.breaker_rate_tat_us = tat;
            if trip {
                tripped = Some("runaway_rate");
            }
        }
        if b.repeats > 0 {
            let state = Repeats {
                hash: std::mem::take(&mut row.breaker_repeat_hash),
                count: row.breaker_repeat_count,
                since_ms: row.breaker_repeat_since,
            };
            let f = fingerprint(action, scope.as_str(), amount.micros(), memo);
            let (next, trip) = repeat_step(b.repeats, b.repeat_window_ms, &state, &f, now);
            row.breaker_repeat_hash = next.hash;
            row.breaker_repeat_count = next.count;
            row.breaker_repeat_since = next.since_ms;
            if trip && tripped.is_none() {
                tripped = Some("runaway_repeat");
            }
        }
        Ok(tripped)
    }

    /// A spend or a hold. The breaker's optional triggers see the request first; one that trips
    /// suspends the agent after the request was decided as usual.
    async fn spend_or_hold(
        &mut self,
        id: i64,
        scope: &Scope,
        amount: Micros,
        hold_expires: Option<HoldTerms>,
        memo: Option<&str>,
    ) -> R<Reply> {
        let action = if hold_expires.is_some() { "hold" } else { "spend" };
        let tripped = self.runaway_step(id, action, scope, amount, memo)?;
        let reply = self.decide_movement(id, scope, amount, hold_expires, memo).await?;
        if let Some(reason) = tripped {
            self.suspend(id, reason)?;
        }
        Ok(reply)
    }

    async fn decide_movement(
        &mut self,
        id: i64,
        scope: &Scope,
        amount: Micros,
        hold_expires: Option<HoldTerms>,
        memo: Option<&str>,
    ) -> R<Reply> {
        let now = self.now;
        let action = if hold_expires.is_some() { "hold" } else { "spend" };
        let chain = self.chain(id)?;
        self.expire_for_chain(&chain).await?;
        let revoked = self.chain_revoked(id)?;
        let agent = self.row(id)?;
        let scopes = agent.scope_set();
        let check = SpendCheck {
            revoked,
            key_expires_ms: agent.key_expires_at,
            suspended: agent.status == "suspended",
            scopes: &scopes,
            scope: Some(scope),
            rate: agent.rate_limit().map(|r| (r, agent.rate_tat)),
        };
        // Shadow mode (root agents only) records what would have been denied and lets it through;
        // a revoked or expired credential is refused all the same.
        let shadow = agent.enforce == 0;
        let mut would_deny: Option<DenyReason> = None;
        match precheck(&check, now) {
            Ok(Some(tat)) => self.row_mut(id)?.rate_tat = tat,
            Ok(None) => {}
            Err(reason)
                if shadow && !matches!(reason, DenyReason::CredentialRevoked | DenyReason::CredentialExpired) =>
            {
                would_deny = Some(reason)
            }
            Err(reason) => return self.deny(id, action, reason, Some(scope), Some(amount)),
        }
        let members = chain.iter().map(|a| self.row(*a).map(|r| r.member(now))).collect::<R<Vec<_>>>()?;
        if would_deny.is_none()
            && let Err(reason) = authorize(&members, amount)
        {
            if !shadow {
                return self.deny(id, action, reason, Some(scope), Some(amount));
            }
            would_deny = Some(reason);
        }
        let movement = if hold_expires.is_some() { Movement::Hold(amount) } else { Movement::Spend(amount) };
        // A shadow agent's over-cap spend is the one movement that may break a cap, by design.
        self.move_allowed(&chain, &members, movement, would_deny.is_some())?;
        let shadow_mark = |e: &mut NewEvent| {
            if let Some(r) = would_deny {
                e.reason = Some(r.code().to_owned());
                let mut d: serde_json::Value =
                    e.detail.as_deref().and_then(|d| serde_json::from_str(d).ok()).unwrap_or_else(|| json!({}));
                d["shadow"] = json!("would_deny");
                e.detail = Some(d.to_string());
            }
        };
        let row = self.row_mut(id)?;
        row.tx_count += 1;
        let handle = row.handle.clone();
        let m = row.member(now);
        let remaining = Remaining {
            window: m.limits.spending_cap.saturating_sub(m.counters.window_spent).saturating_sub(m.counters.held),
            lifetime: m
                .limits
                .lifetime_cap
                .map(|c| c.saturating_sub(m.counters.lifetime_spent).saturating_sub(m.counters.held)),
        };
        let resets = m.limits.created_ms + (m.counters.window_index + 1) * m.limits.window_ms;
        let (root_id, path) = (row.root_id, row.path.clone());
        let reply = match hold_expires {
            None => {
                let sid = format!("sp_{}", random_base62(&mut rand::rng(), 22));
                let e = self.event(&handle, "spend", "allowed");
                e.scope = Some(scope.as_str().to_owned());
                e.amount = Some(amount.micros());
                e.reference = Some(sid.clone());
                e.detail = memo.map(|m| json!({"memo": m}).to_string());
                shadow_mark(e);
                Reply::ok(Answer::Spent(Spent {
                    id: sid,
                    amount,
                    remaining,
                    window_resets_at: resets,
                    shadow_denied: would_deny,
                }))
            }
            Some(HoldTerms { expires_at, on_expiry }) => {
                let hid = format!("hold_{}", random_base62(&mut rand::rng(), 22));
                self.holds.insert(
                    hid.clone(),
                    HoldRow {
                        id: hid.clone(),
                        agent_id: id,
                        path: path.clone(),
                        amount: amount.micros(),
                        captured: 0,
                        settled_seq: 0,
                        status: "open".into(),
                        expires_at,
                        on_expiry: on_expiry.into(),
                    },
                );
                self.new_holds.push(NewHold {
                    id: hid.clone(),
                    agent_id: id,
                    root_id,
                    path,
                    scope: scope.as_str().to_owned(),
                    amount: amount.micros(),
                    created_at: now,
                    expires_at,
                    on_expiry,
                });
                let e = self.event(&handle, "hold", "allowed");
                e.scope = Some(scope.as_str().to_owned());
                e.amount = Some(amount.micros());
                e.reference = Some(hid.clone());
                shadow_mark(e);
                Reply::ok(Answer::Held(Held { id: hid, amount, expires_at, remaining, shadow_denied: would_deny }))
            }
        };
        let spent = if hold_expires.is_some() { 0 } else { amount.micros() };
        Ok(reply.with_outcome(Outcome { agent: handle, allowed: true, reason: "", spent }))
    }

    /// Captures `amount` of a hold (releasing the rest), or releases it whole when `None`.
    async fn settle(&mut self, id: i64, hold_id: &str, amount: Option<Micros>) -> R<Reply> {
        let action = if amount.is_some() { "capture" } else { "release" };
        let revoked = self.chain_revoked(id)?;
        let agent = self.row(id)?;
        let scopes = agent.scope_set();
        // Settling an existing hold is allowed while suspended and is not rate limited: refusing
        // it would only keep money reserved longer.
        let check = SpendCheck {
            revoked,
            key_expires_ms: agent.key_expires_at,
            suspended: false,
            scopes: &scopes,
            scope: None,
            rate: None,
        };
        if let Err(reason) = precheck(&check, self.now) {
            return self.deny(id, action, reason, None, amount);
        }
        self.settle_hold(Some(id), hold_id, amount).await
    }

    /// Captures `amount` of an open hold (releasing the rest), or releases it whole when `None`.
    /// `owner`: the calling agent, whose hold it must be; `None` for the gateway's own settlement
    /// of a call it forwarded, which needs no key (the key may have been rotated mid-call).
    async fn settle_hold(&mut self, owner: Option<i64>, hold_id: &str, amount: Option<Micros>) -> R<Reply> {
        let action = if amount.is_some() { "capture" } else { "release" };
        let hold: Option<HoldRow> = match self.holds.get(hold_id) {
            Some(h) => Some(h.clone()),
            None => {
                sqlx::query_as(dsql!("SELECT {HOLD_COLUMNS} FROM holds WHERE id = $1"))
                    .bind(hold_id)
                    .fetch_optional(&mut *self.tx)
                    .await?
            }
        };
        // An agent settles only its own holds, never a gateway's (that would make forwarded
        // calls free); the gateway settles those by id.
        let Some(hold) = hold.filter(|h| owner.is_none_or(|o| h.agent_id == o && h.on_expiry != "capture")) else {
            return Ok(Reply::refuse(Refusal::NotFound(Missing::Hold)));
        };
        let ids = path_ids(&hold.path);
        self.load_ids(&ids).await?;
        let handle = self.row(hold.agent_id)?.handle.clone();
        if hold.status != "open" || hold.expires_at <= self.now {
            return Ok(Reply::refuse(Refusal::HoldClosed { lease: false, was: hold_end(&hold.status) }));
        }
        let held = Micros::from_micros(hold.amount).ok_or_else(|| corrupt("negative hold"))?;
        let captured = amount.unwrap_or(Micros::ZERO);
        if captured > held {
            return Ok(Reply::refuse(Refusal::InvalidAmount(AmountProblem::CaptureAboveHold { held })));
        }
        let released = held.checked_sub(captured).ok_or_else(|| corrupt("capture above hold"))?;
        self.close_hold(&hold, captured, if amount.is_some() { "captured" } else { "released" }, self.now).await?;
        let e = self.event(&handle, action, "allowed");
        e.amount = Some(if amount.is_some() { captured.micros() } else { released.micros() });
        e.reference = Some(hold.id.clone());
        if owner.is_none() {
            e.detail = Some(json!({"by": "gateway"}).to_string());
        }
        let reply =
            Reply::ok(Answer::Settled(Settled { id: hold.id.clone(), captured: amount.map(|_| captured), released }));
        Ok(reply.with_outcome(Outcome { agent: handle, allowed: true, reason: "", spent: captured.micros() }))
    }

    /// A gateway lease: the first slot is a `MeteredHold` of `unit` in every respect; the hold
    /// then grows by as many more slots as fit now (see [`Command::Lease`]).
    async fn lease(&mut self, id: i64, scope: &Scope, unit: Micros, slots: u32, expires_ms: i64) -> R<Reply> {
        let terms = HoldTerms { expires_at: self.now.saturating_add(expires_ms), on_expiry: "capture" };
        let reply = self.spend_or_hold(id, scope, unit, Some(terms), None).await?;
        let shadow_denied = match &reply.answer {
            Ok(Answer::Held(h)) => h.shadow_denied,
            _ => return Ok(reply),
        };
        let now = self.now;
        let hid = self.new_holds.last().map(|h| h.id.clone()).ok_or_else(|| corrupt("a lease without its hold"))?;
        let chain = self.chain(id)?;
        let default_breaker = self.breaker;
        let row = self.row_mut(id)?;
        // Each call under the lease counts as it is settled, not the lease itself.
        row.tx_count -= 1;
        let b = row.breaker(default_breaker);
        let one_by_one = row.enforce == 0 || row.status != "active" || b.max_requests > 0 || b.repeats > 0;
        let mut extra = if one_by_one { 0 } else { u64::from(slots.saturating_sub(1)) };
        let members = chain.iter().map(|a| self.row(*a).map(|r| r.member(now))).collect::<R<Vec<_>>>()?;
        if extra > 0 && !unit.is_zero() {
            let fit = bulkhead_core::room(&members).micros() / unit.micros();
            extra = extra.min(u64::try_from(fit).unwrap_or(0));
        }
        if extra > 0
            && let Some(limit) = self.row(id)?.rate_limit()
        {
            let (got, tat) = bulkhead_core::ratelimit::take(limit, self.row(id)?.rate_tat, now, extra);
            self.row_mut(id)?.rate_tat = tat;
            extra = got;
        }
        if extra > 0 {
            let more = i64::try_from(extra)
                .ok()
                .and_then(|n| unit.micros().checked_mul(n))
                .and_then(Micros::from_micros)
                .ok_or_else(|| corrupt("lease arithmetic out of range"))?;
            self.move_allowed(&chain, &members, Movement::Hold(more), false)?;
            let h = self.holds.get_mut(&hid).ok_or_else(|| corrupt("a lease without its hold"))?;
            h.amount += more.micros();
            let amount = h.amount;
            if let Some(n) = self.new_holds.last_mut() {
                n.amount = amount;
            }
        }
        let n = extra + 1;
        let amount = self.holds.get(&hid).map(|h| h.amount).ok_or_else(|| corrupt("a lease without its hold"))?;
        if let Some(e) = self.events.iter_mut().rev().find(|e| e.reference.as_deref() == Some(hid.as_str())) {
            e.amount = Some(amount);
            // Keep what the hold's event says (a shadow agent's would-deny mark).
            let mut d: serde_json::Value =
                e.detail.as_deref().and_then(|d| serde_json::from_str(d).ok()).unwrap_or_else(|| json!({}));
            d["by"] = json!("gateway");
            d["slots"] = json!(n);
            e.detail = Some(d.to_string());
        }
        let members = chain.iter().map(|a| self.row(*a).map(|r| r.member(now))).collect::<R<Vec<_>>>()?;
        let grant = LeaseGrant {
            hold_id: hid,
            slots: n,
            amount: crate::view::micros(amount),
            expires_at: terms.expires_at,
            key_expires_at: self.row(id)?.key_expires_at,
            room: bulkhead_core::room(&members),
            shadow_denied,
        };
        Ok(Reply { answer: Ok(Answer::LeaseGrant(grant)), replayed: false, outcome: reply.outcome })
    }

    /// Settles calls made under a lease (see [`Command::LeaseSettle`]).
    async fn lease_settle(
        &mut self,
        hold_id: &str,
        seq: i64,
        unit: Micros,
        costs: &[Micros],
        release: u32,
        close: bool,
    ) -> R<Reply> {
        let hold: Option<HoldRow> = match self.holds.get(hold_id) {
            Some(h) => Some(h.clone()),
            None => {
                sqlx::query_as(dsql!("SELECT {HOLD_COLUMNS} FROM holds WHERE id = $1"))
                    .bind(hold_id)
                    .fetch_optional(&mut *self.tx)
                    .await?
            }
        };
        let Some(hold) = hold.filter(|h| h.on_expiry == "capture") else {
            return Ok(Reply::refuse(Refusal::NotFound(Missing::Lease)));
        };
        let ids = path_ids(&hold.path);
        self.load_ids(&ids).await?;
        let handle = self.row(hold.agent_id)?.handle.clone();
        if seq <= hold.settled_seq {
            return Ok(Reply::ok(Answer::LeaseSettled(LeaseSettled::Before { hold_id: hold.id, seq })));
        }
        if hold.status != "open" || hold.expires_at <= self.now {
            return Ok(Reply::refuse(Refusal::HoldClosed { lease: true, was: hold_end(&hold.status) }));
        }
        let slots = u64::try_from(costs.len()).unwrap_or(u64::MAX).saturating_add(u64::from(release));
        let held = i64::try_from(slots).ok().and_then(|n| unit.micros().checked_mul(n)).and_then(Micros::from_micros);
        let captured = costs.iter().try_fold(Micros::ZERO, |a, c| if *c > unit { None } else { a.checked_add(*c) });
        let (Some(held), Some(captured)) = (held, captured) else {
            return Ok(Reply::refuse(Refusal::InvalidAmount(AmountProblem::CostAboveSlot)));
        };
        if held.micros() > hold.amount {
            return Ok(Reply::refuse(Refusal::InvalidAmount(AmountProblem::SlotsAboveLease)));
        }
        self.move_chain(&ids, Movement::Settle { held, captured })?;
        let h = self.holds.entry(hold.id.clone()).or_insert_with(|| hold.clone());
        h.amount -= held.micros();
        h.captured += captured.micros();
        h.settled_seq = seq;
        let left = h.clone();
        self.touched_holds.insert(hold.id.clone());
        // Unused slots give their rate-limit tokens back, those released by `close` too.
        let closing_slots = if close && !unit.is_zero() { left.amount / unit.micros() } else { 0 };
        let unused_slots = u64::from(release).saturating_add(u64::try_from(closing_slots).unwrap_or(0));
        let row = self.row_mut(hold.agent_id)?;
        row.tx_count += i64::try_from(costs.len()).unwrap_or(i64::MAX);
        if unused_slots > 0
            && let Some(limit) = row.rate_limit()
        {
            row.rate_tat = bulkhead_core::ratelimit::refund(limit, row.rate_tat, unused_slots);
        }
        if !costs.is_empty() {
            // One event for the calls settled together, each call's cost in its detail.
            let e = self.event(&handle, "capture", "allowed");
            e.amount = Some(captured.micros());
            e.reference = Some(hold.id.clone());
            e.detail = Some(settled_calls(costs));
        }
        let unused = unit.micros().saturating_mul(i64::from(release));
        let remaining = if close { left.amount } else { 0 };
        if unused + remaining > 0 {
            let e = self.event(&handle, "release", "allowed");
            e.amount = Some(unused + remaining);
            e.reference = Some(hold.id.clone());
            e.detail = Some(json!({"by": "gateway", "slots": release}).to_string());
        }
        if close {
            let status = if left.captured > 0 { "captured" } else { "released" };
            self.close_hold(&left, Micros::ZERO, status, self.now).await?;
        }
        let reply = Reply::ok(Answer::LeaseSettled(LeaseSettled::Applied {
            hold_id: hold.id.clone(),
            captured,
            released: crate::view::micros(held.micros() - captured.micros() + remaining),
            closed: close,
        }));
        Ok(reply.with_outcome(Outcome { agent: handle, allowed: true, reason: "", spent: captured.micros() }))
    }

    /// The agent as it stands in the batch: a new one (`created`) or a changed one.
    fn agent_reply(&self, id: i64, created: bool) -> R<Reply> {
        let row = self.row(id)?;
        let parent = match row.parent_id {
            Some(p) => Some(self.row(p)?.handle.clone()),
            None => None,
        };
        let view = Box::new(row.view(parent, 0, self.now));
        Ok(Reply::ok(if created { Answer::Created(view) } else { Answer::Agent(view) }))
    }

    /// A parent's attempt to give a child more than it has: refused (403) and audited on the
    /// parent's trail (it feeds neither `denied_count` nor the breaker).
    fn refuse_child(&mut self, parent: &str, spec: &AgentSpec, refusal: Refusal, code: &str) -> Reply {
        let e = self.event(parent, "agent.create", "denied");
        e.reason = Some(code.to_owned());
        e.detail = Some(json!({"child": spec.handle.as_str()}).to_string());
        Reply::refuse(refusal)
    }

    async fn create_agent(&mut self, caller: &Caller, spec: &AgentSpec, key_hash: &KeyHash) -> R<Reply> {
        let now = self.now;
        if !spec.enforce && matches!(caller, Caller::Agent(_)) {
            return Ok(Reply::refuse(Refusal::ShadowNotRoot));
        }
        let parent = match caller {
            Caller::Admin => None,
            Caller::Agent(key) => {
                let Some(pid) = self.agent_by_key(key).await? else {
                    return Ok(Reply::deny(DenyReason::InvalidCredentials));
                };
                let revoked = self.chain_revoked(pid)?;
                let p = self.row(pid)?;
                let scopes = p.scope_set();
                let spawn = Scope::parse("spawn:agents").map_err(|e| corrupt(&e))?;
                let check = SpendCheck {
                    revoked,
                    key_expires_ms: p.key_expires_at,
                    suspended: p.status == "suspended",
                    scopes: &scopes,
                    scope: Some(&spawn),
                    rate: None,
                };
                if let Err(reason) = precheck(&check, now) {
                    return self.deny(pid, "agent.create", reason, Some(&spawn), None);
                }
                if !scopes.covers_all(&spec.scopes) {
                    let h = p.handle.clone();
                    return Ok(self.refuse_child(&h, spec, Refusal::ScopeEscalation, "scope_escalation"));
                }
                let per_tx = spec.per_tx_limit.unwrap_or(spec.spending_cap);
                let pl = p.limits();
                let lifetime_ok = match (pl.lifetime_cap, spec.lifetime_cap) {
                    (None, _) => true,
                    (Some(_), None) => false,
                    (Some(p), Some(c)) => c <= p,
                };
                if spec.spending_cap > pl.spending_cap || per_tx > pl.per_tx_limit || !lifetime_ok {
                    let h = p.handle.clone();
                    return Ok(self.refuse_child(&h, spec, Refusal::CapEscalation, "cap_escalation"));
                }
                if p.depth + 1 > AGENT_DEPTH_MAX {
                    return Ok(Reply::refuse(Refusal::TreeTooDeep { depth_max: AGENT_DEPTH_MAX }));
                }
                let (n,): (i64,) = sqlx::query_as("SELECT COUNT(*) FROM agents WHERE parent_id = $1")
                    .bind(pid)
                    .fetch_one(&mut *self.tx)
                    .await?;
                if n >= CHILDREN_PER_AGENT_MAX {
                    return Ok(Reply::refuse(Refusal::TooManyChildren { children_max: CHILDREN_PER_AGENT_MAX }));
                }
                Some(pid)
            }
        };
        let per_tx = spec.per_tx_limit.unwrap_or(spec.spending_cap);
        let (rate_requests, rate_per_ms) =
            spec.rate_limit.map(|r| (Some(r.requests), Some(r.per_ms))).unwrap_or((None, None));
        let scopes = spec.scopes.to_strings().join(" ");
        let labels = serde_json::Value::Object(spec.labels.clone()).to_string();
        let expires = spec.expires_in.map(|s| now.saturating_add(s.millis()));
        let row: Option<(i64,)> = sqlx::query_as(
            "INSERT INTO agents (handle, parent_id, root_id, path, depth, status, key_hash, key_expires_at, scopes, \
             spending_cap, window_ms, per_tx_limit, lifetime_cap, rate_requests, rate_per_ms, breaker_denials, \
             breaker_window_ms, breaker_max_requests, breaker_rate_window_ms, breaker_repeats, \
             breaker_repeat_window_ms, labels, created_at, enforce) \
             VALUES ($1, $2, 0, '', 0, 'active', $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15, $16, $17, \
             $18, $19, $20) \
             ON CONFLICT DO NOTHING RETURNING id",
        )
        .bind(spec.handle.as_str())
        .bind(parent)
        .bind(key_hash.as_str())
        .bind(expires)
        .bind(&scopes)
        .bind(spec.spending_cap.micros())
        .bind(spec.window.millis())
        .bind(per_tx.micros())
        .bind(spec.lifetime_cap.map(Micros::micros))
        .bind(rate_requests)
        .bind(rate_per_ms)
        .bind(spec.breaker.and_then(|b| b.denials))
        .bind(spec.breaker.and_then(|b| b.window_ms))
        .bind(spec.breaker.and_then(|b| b.max_requests))
        .bind(spec.breaker.and_then(|b| b.rate_window_ms))
        .bind(spec.breaker.and_then(|b| b.repeats))
        .bind(spec.breaker.and_then(|b| b.repeat_window_ms))
        .bind(&labels)
        .bind(now)
        .bind(i64::from(spec.enforce))
        .fetch_optional(&mut *self.tx)
        .await?;
        let Some((id,)) = row else {
            return Ok(Reply::refuse(Refusal::HandleTaken));
        };
        let (root_id, path, depth) = match parent {
            None => (id, format!(",{id},"), 0),
            Some(pid) => {
                let p = self.row(pid)?;
                (p.root_id, format!("{}{id},", p.path), p.depth + 1)
            }
        };
        sqlx::query("UPDATE agents SET root_id = $1, path = $2, depth = $3 WHERE id = $4")
            .bind(root_id)
            .bind(&path)
            .bind(depth)
            .bind(id)
            .execute(&mut *self.tx)
            .await?;
        let row: AgentRow = sqlx::query_as(dsql!("SELECT {AGENT_COLUMNS} FROM agents WHERE id = $1"))
            .bind(id)
            .fetch_one(&mut *self.tx)
            .await?;
        self.cache(row);
        let by = match parent {
            None => "admin".to_owned(),
            Some(p) => self.row(p)?.handle.clone(),
        };
        let e = self.event(spec.handle.as_str(), "agent.create", "allowed");
        e.detail =
            Some(json!({"by": by, "scopes": spec.scopes.to_strings(), "spending_cap": spec.spending_cap}).to_string());
        self.agent_reply(id, true)
    }

    async fn patch_agent(&mut self, handle: &str, p: &Patch) -> R<Reply> {
        let Some(id) = self.agent_by_handle(handle).await? else {
            return Ok(Reply::refuse(Refusal::NotFound(Missing::Agent)));
        };
        let now = self.now;
        if p.enforce == Some(false) && self.row(id)?.parent_id.is_some() {
            return Ok(Reply::refuse(Refusal::ShadowNotRoot));
        }
        self.authz = true;
        let row = self.row_mut(id)?;
        let mut changed = serde_json::Map::new();
        if let Some(e) = p.enforce {
            row.enforce = i64::from(e);
            changed.insert("enforce".into(), json!(e));
        }
        if let Some(c) = p.spending_cap {
            row.spending_cap = c.micros();
            changed.insert("spending_cap".into(), json!(c));
        }
        if let Some(w) = p.window {
            // Keep what was spent: re-anchor the counters to the window that contains `now`
            // under the new length, so changing the window never forgives spend.
            let c = row.member(now).counters;
            row.window_ms = w.millis();
            let (k, _, _) = bulkhead_core::duration::window_at(row.created_at, row.window_ms, now);
            row.set_counters(bulkhead_core::Counters { window_index: k, ..c });
            changed.insert("window".into(), json!(w.to_string()));
        }
        if let Some(t) = p.per_tx_limit {
            row.per_tx_limit = t.micros();
            changed.insert("per_tx_limit".into(), json!(t));
        }
        if let Some(l) = p.lifetime_cap {
            row.lifetime_cap = l.map(Micros::micros);
            changed.insert("lifetime_cap".into(), json!(l));
        }
        if let Some(s) = &p.scopes {
            row.scopes = s.to_strings().join(" ");
            changed.insert("scopes".into(), json!(s.to_strings()));
        }
        if let Some(r) = p.rate_limit {
            row.rate_requests = r.map(|r| r.requests);
            row.rate_per_ms = r.map(|r| r.per_ms);
            changed.insert("rate_limit".into(), json!(r.map(|r| json!({"requests": r.requests, "per_ms": r.per_ms}))));
        }
        if let Some(l) = &p.labels {
            row.labels = serde_json::Value::Object(l.clone()).to_string();
            changed.insert("labels".into(), serde_json::Value::Object(l.clone()));
        }
        if let Some(b) = p.breaker {
            row.set_breaker_override(b);
            changed.insert("breaker".into(), json!(b.map(BreakerOverride::to_json)));
        }
        let e = self.event(handle, "agent.update", "allowed");
        e.detail = Some(serde_json::Value::Object(changed).to_string());
        self.agent_reply(id, false)
    }

    async fn revoke(&mut self, caller: &Caller, handle: &str, reason: Option<&str>) -> R<Reply> {
        let now = self.now;
        if let Caller::Agent(key) = caller {
            let Some(cid) = self.agent_by_key(key).await? else {
                return Ok(Reply::deny(DenyReason::InvalidCredentials));
            };
            let revoked = self.chain_revoked(cid)?;
            let c = self.row(cid)?;
            if revoked {
                return Ok(Reply::deny(DenyReason::CredentialRevoked));
            }
            if c.key_expires_at.is_some_and(|t| now >= t) {
                return Ok(Reply::deny(DenyReason::CredentialExpired));
            }
            let Some(tid) = self.agent_by_handle(handle).await? else {
                return Ok(Reply::refuse(Refusal::NotFound(Missing::Agent)));
            };
            let t = self.row(tid)?;
            if tid == cid || !t.path_ids().contains(&cid) {
                return Ok(Reply::refuse(Refusal::NotFound(Missing::Descendant)));
            }
        }
        let Some(tid) = self.agent_by_handle(handle).await? else {
            return Ok(Reply::refuse(Refusal::NotFound(Missing::Agent)));
        };
        let (root_id, like) = {
            let t = self.row(tid)?;
            (t.root_id, format!("%,{tid},%"))
        };
        let subtree: Vec<AgentRow> =
            sqlx::query_as(dsql!("SELECT {AGENT_COLUMNS} FROM agents WHERE root_id = $1 AND path LIKE $2"))
                .bind(root_id)
                .bind(&like)
                .fetch_all(&mut *self.tx)
                .await?;
        let mut ids: Vec<(i64, i64, String)> = Vec::new();
        for r in subtree {
            ids.push((r.depth, r.id, r.handle.clone()));
            self.cache(r);
        }
        ids.sort();
        let by = match caller {
            Caller::Admin => "admin".to_owned(),
            Caller::Agent(k) => self
                .by_key
                .get(k.as_str())
                .and_then(|id| self.agents.get(id))
                .map(|r| r.handle.clone())
                .unwrap_or_default(),
        };
        for (_, id, h) in &ids {
            let row = self.row(*id)?;
            if row.status == "revoked" {
                continue;
            }
            self.authz = true;
            let r = self.row_mut(*id)?;
            r.status = "revoked".into();
            r.revoked_at = Some(now);
            r.revoke_reason = reason.map(str::to_owned);
            let e = self.event(h, "agent.revoke", "allowed");
            e.reason = reason.map(str::to_owned);
            e.detail = Some(json!({"by": by, "target": handle}).to_string());
            self.raise("agent_revoked", h, json!({"reason": reason, "by": by, "target": handle}));
        }
        // Holds already past their expiry (not swept yet) expired; they are not the revocation's.
        self.expire_holds(Some(&[root_id])).await?;
        self.flush_holds().await?;
        // The agents' own holds are released. A gateway lease stays open: it pays for calls
        // already forwarded, which its gateway settles at once (the revocation retires it), or
        // it is captured in full at expiry. Releasing it would make those calls free.
        let open: Vec<HoldRow> = sqlx::query_as(dsql!(
            "SELECT {HOLD_COLUMNS} FROM holds \
             WHERE root_id = $1 AND status = 'open' AND path LIKE $2 AND on_expiry = 'release'"
        ))
        .bind(root_id)
        .bind(&like)
        .fetch_all(&mut *self.tx)
        .await?;
        for h in open {
            self.close_hold(&h, Micros::ZERO, "released", now).await?;
            let handle = self.row(h.agent_id)?.handle.clone();
            let e = self.event(&handle, "release", "allowed");
            e.amount = Some(h.amount);
            e.reference = Some(h.id.clone());
            e.reason = Some("agent_revoked".into());
        }
        let revoked_at = self.row(tid)?.revoked_at.unwrap_or(now);
        let handles: Vec<String> = ids.into_iter().map(|(_, _, h)| h).collect();
        Ok(Reply::ok(Answer::Revoked { handles, revoked_at }))
    }
}

/// How a hold that is no longer open ended; one still marked open has expired.
fn hold_end(status: &str) -> HoldEnd {
    match status {
        "captured" => HoldEnd::Captured,
        "released" => HoldEnd::Released,
        _ => HoldEnd::Expired,
    }
}

/// The detail of a gateway `capture` event: how many calls it settles and what each cost
/// (`each` when they all cost the same, else `costs` in call order).
fn settled_calls(costs: &[Micros]) -> String {
    use std::fmt::Write;
    let mut out = format!(r#"{{"by":"gateway","calls":{}"#, costs.len());
    match costs.first() {
        Some(first) if costs.iter().all(|c| c == first) => {
            let _ = write!(out, r#","each":"{first}"}}"#);
        }
        _ => {
            out.push_str(r#","costs":["#);
            for (i, c) in costs.iter().enumerate() {
                let _ = write!(out, r#"{}"{c}""#, if i == 0 { "" } else { "," });
            }
            out.push_str("]}");
        }
    }
    out
}
