//! The writer task and group commit: it takes the commands waiting in its queue, runs them in
//! one transaction (a [`Batch`]), commits once and answers each command after the commit, late
//! by [`EPOCH_SETTLE`] when a shared store's authorization epoch moved. It never decides a
//! command itself.

use std::collections::{BTreeSet, HashMap};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

use bulkhead_core::Clock;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use tokio::sync::mpsc;

use super::batch::{Batch, in_list};
use super::{Command, EPOCH_SETTLE, Job, LedgerConfig};
use crate::alerts::AlertRules;
use crate::answer::Reply;
use crate::audit::append_events;
use crate::view::{AGENT_COLUMNS, AgentRow};
use crate::{Backend, Store, StoreError};

pub(super) struct Writer {
    pub(super) store: Store,
    pub(super) clock: Arc<dyn Clock>,
    pub(super) cfg: LedgerConfig,
    pub(super) rules: Arc<AlertRules>,
    pub(super) cache: Cache,
    pub(super) epoch: Arc<AtomicU64>,
    /// Answers waiting for the authorization epoch to settle; the writer ends only after them.
    pub(super) settling: tokio::task::JoinSet<()>,
    /// Seeded by `LedgerConfig::seed`; each batch draws its ids from a generator seeded from it.
    pub(super) rng: StdRng,
}

/// Rows the SQLite writer keeps between batches. It is the only writer of its file, so what it
/// committed is exactly what is stored; on PostgreSQL other replicas write too, so every batch
/// starts empty and reads under its locks. Any failed batch empties it.
#[derive(Default)]
pub(super) struct Cache {
    pub(super) agents: HashMap<i64, AgentRow>,
    pub(super) by_key: HashMap<String, i64>,
    pub(super) by_handle: HashMap<String, i64>,
    /// The audit chain head (seq, hash) as last committed.
    pub(super) head: Option<(i64, String)>,
}

/// The most agent rows the SQLite writer keeps between batches.
pub(super) const CACHE_AGENTS_MAX: usize = 10_000;

/// A batch failed either before COMMIT was sent (nothing happened; safe to retry each command
/// alone) or at COMMIT (the outcome is unknown; nothing may be retried).
pub(super) enum BatchError {
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
    pub(super) async fn run(mut self, mut rx: mpsc::Receiver<Job>) {
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
    pub(super) fn answer(&mut self, job: Job, reply: Result<Reply, StoreError>, settle: bool, committed: Instant) {
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
    pub(super) async fn exec(&mut self, cmds: &[&Command]) -> Result<Vec<(Reply, bool)>, BatchError> {
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

    /// Runs one batch in one transaction: begin, lock the touched trees' roots (PostgreSQL),
    /// prefetch, apply each command, write the rows back with the alerts, move the
    /// authorization epoch when a command changed what a key may do, append the audit events,
    /// commit.
    pub(super) async fn exec_with(
        &mut self,
        cmds: &[&Command],
        cache: Cache,
    ) -> Result<(Vec<(Reply, bool)>, Cache), BatchError> {
        let head = cache.head.clone();
        let mut b = self.begin(cache).await?;
        if b.backend == Backend::Postgres {
            b.lock_roots(cmds).await?;
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
        let key = self.store.audit_key.as_deref();
        let head = append_events(&mut b.tx, b.backend, key, events, head).await?;
        let authz = b.authz;
        let committed = b.tx.commit().await;
        if authz {
            // Even when the commit's outcome is unknown: deciding again costs only time.
            self.epoch.fetch_add(1, Ordering::SeqCst);
        }
        committed.map_err(|e| BatchError::AtCommit(StoreError::Unavailable(e)))?;
        Ok((replies, Cache { agents: b.agents, by_key: b.by_key, by_handle: b.by_handle, head }))
    }
    /// A new batch over `cache`, its transaction begun.
    async fn begin(&mut self, cache: Cache) -> Result<Batch, BatchError> {
        let now = self.clock.now_ms();
        // Every attempt, committed or not, moves the writer's generator on: a batch whose COMMIT
        // failed may have stored its ids, so the next one never draws them again.
        let rng = StdRng::seed_from_u64(self.rng.random());
        // SQLite: take the write lock when the transaction begins. A deferred transaction that
        // read first could not upgrade while another connection (alert delivery, the hourly
        // sweep, an offline command) was writing: SQLite refuses the upgrade at once, without
        // waiting out the busy timeout. Taken up front, the lock is waited for.
        let tx = match self.store.backend {
            Backend::Sqlite => self.store.pool.begin_with("BEGIN IMMEDIATE").await?,
            Backend::Postgres => self.store.pool.begin().await?,
        };
        Ok(Batch {
            tx,
            backend: self.store.backend,
            now,
            breaker: self.cfg.breaker,
            limits: self.cfg.limits,
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
            rng,
        })
    }
}

impl Batch {
    /// PostgreSQL: locks every touched tree's root, in id order, before anything of it is read;
    /// the roots' rows come with their locks (read under them, so current).
    async fn lock_roots(&mut self, cmds: &[&Command]) -> Result<(), BatchError> {
        let roots = self.resolve_roots(cmds).await?;
        if roots.is_empty() {
            return Ok(());
        }
        let (sql, args) =
            in_list(&format!("SELECT {AGENT_COLUMNS} FROM agents WHERE id IN "), &roots, " ORDER BY id FOR UPDATE")?;
        let rows: Vec<AgentRow> = sqlx::query_as_with(sqlx::AssertSqlSafe(sql), args).fetch_all(&mut *self.tx).await?;
        for r in rows {
            self.cache(r);
        }
        Ok(())
    }
}
