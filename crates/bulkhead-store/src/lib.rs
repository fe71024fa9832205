//! Bulkhead's store: the one place that speaks SQL.
//!
//! One set of SQL runs on both backends through sqlx's `Any` driver: an embedded SQLite file for
//! one process, or a shared PostgreSQL database for several replicas. The few dialect differences
//! (row locks, DDL) live in [`Backend`] and the per-backend migration folders.
//!
//! Every write goes through the [`Ledger`]: a single writer task per process that groups the
//! commands waiting for it into one transaction (group commit), so durability costs one fsync per
//! batch, not per request. Reads go straight to the pool.
//!
//! Architecture invariants:
//! - The core decides; the store commits. Balances change only inside a ledger batch, after
//!   [`bulkhead_core::decide`] allowed the movement.
//! - A decision, its counter changes, its audit event and its idempotency record commit in one
//!   transaction, or none of them does. A command is answered only after its batch committed.
//! - On PostgreSQL, a batch first locks the root agent row of every tree it touches, in id
//!   order; every chain contains its root, so all writes to one tree are serialised across
//!   replicas and batches cannot deadlock.

/// A SQL string assembled from constants and `$n` placeholders only (never from input).
macro_rules! dsql {
    ($($t:tt)*) => { sqlx::AssertSqlSafe(format!($($t)*)) };
}

mod advice;
mod alerts;
mod answer;
mod audit;
mod blast;
mod format;
mod history;
mod ledger;
mod read;
mod view;

pub use advice::AgentAdvice;
pub use alerts::{AlertRules, OutboxRow, retry_delay_ms};
pub use answer::{
    AmountProblem, Answer, Held, HoldEnd, LeaseGrant, LeaseSettled, Missing, Outcome, OverLimit, Refusal, Remaining,
    Reply, Revived, Settled, Spent,
};
pub use audit::{AuditEvent, AuditKey, VerifyReport};
pub use blast::{AgentBlast, BlastRadius};
pub use bulkhead_core::runaway::{Breaker, BreakerOverride};
pub use format::fmt_time;
pub use history::{AlertRecord, AuditQuery, UsageBucket};
pub use ledger::{
    AgentSpec, Caller, Command, EPOCH_SETTLE, EPOCH_TRUSTED_FOR, EpochReader, Idem, LeaseAudit, Ledger, LedgerConfig,
    Limits, Patch, REFUSALS_AUDITED_EVERY, REFUSED_KEYS_MAX, Tally,
};
pub use view::{AgentView, Usage};

use std::str::FromStr;
use std::time::Duration;

use sqlx::any::{AnyConnectOptions, AnyPoolOptions};
use sqlx::{AnyPool, ConnectOptions, Executor};

/// Which database sits behind the store.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Backend {
    Sqlite,
    Postgres,
}

/// Infrastructure failures. Denials are never errors: they are [`Refusal`]s.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StoreError {
    /// The database could not be reached or failed the statement.
    #[error("the store is unavailable: {0}")]
    Unavailable(#[from] sqlx::Error),
    /// Migrations failed.
    #[error("the store could not be migrated: {0}")]
    Migrate(#[from] sqlx::migrate::MigrateError),
    /// Stored data broke an invariant (a corrupt row, an arithmetic overflow).
    #[error("the store holds inconsistent data: {0}")]
    Corrupt(String),
    /// The batch this command was part of failed; nothing of it was committed, or (when the
    /// failure came at COMMIT) its outcome is unknown.
    #[error("the store failed the write: {0}")]
    Failed(String),
    /// The ledger's writer has stopped (the process is shutting down).
    #[error("the ledger is shut down")]
    ShutDown,
    /// The given URL or path is not usable.
    #[error("{0}")]
    Config(String),
}

impl Backend {
    /// The `n`th (1-based) bind placeholder of a generated statement. SQLite gets anonymous `?`:
    /// looking up a numbered one costs time linear in the statement's parameter count, which
    /// makes large multi-row statements quadratic.
    pub(crate) fn placeholder(self, n: usize) -> String {
        match self {
            Backend::Sqlite => "?".to_owned(),
            Backend::Postgres => format!("${n}"),
        }
    }
}

impl Backend {
    /// One row of a generated multi-row statement: `(p, p, …)` for parameters `first..`, each
    /// wrapped in `CAST(p AS type)` when its type is given (PostgreSQL needs the types of
    /// parameters that are NULL in every row of a `VALUES` list).
    pub(crate) fn values_row(self, first: usize, types: &[Option<&str>]) -> String {
        let cells: Vec<String> = types
            .iter()
            .enumerate()
            .map(|(i, ty)| {
                let p = self.placeholder(first + i);
                match ty {
                    Some(ty) => format!("CAST({p} AS {ty})"),
                    None => p,
                }
            })
            .collect();
        format!("({})", cells.join(", "))
    }
}

impl StoreError {
    /// The database answered and refused a statement (as opposed to being unreachable).
    pub fn is_statement_error(&self) -> bool {
        matches!(self, StoreError::Unavailable(sqlx::Error::Database(_)) | StoreError::Corrupt(_))
    }
}

/// A handle on the database. Cheap to clone.
#[derive(Clone, Debug)]
pub struct Store {
    pool: AnyPool,
    backend: Backend,
    /// The key new audit events are hashed under (contract §12); `None`: plain SHA-256.
    audit_key: Option<std::sync::Arc<audit::AuditKey>>,
}

static SQLITE_MIGRATIONS: sqlx::migrate::Migrator = sqlx::migrate!("./migrations/sqlite");
static POSTGRES_MIGRATIONS: sqlx::migrate::Migrator = sqlx::migrate!("./migrations/postgres");

impl Store {
    /// Connects to `url` (`sqlite://…` or `postgres://…`) without migrating.
    pub async fn connect(url: &str) -> Result<Store, StoreError> {
        sqlx::any::install_default_drivers();
        let backend = if url.starts_with("sqlite:") {
            Backend::Sqlite
        } else if url.starts_with("postgres:") || url.starts_with("postgresql:") {
            Backend::Postgres
        } else {
            return Err(StoreError::Config("the database URL must start with postgres:// (or sqlite://)".into()));
        };
        let opts = AnyConnectOptions::from_str(url)?.disable_statement_logging();
        let pool = match backend {
            Backend::Sqlite => {
                AnyPoolOptions::new()
                    .max_connections(8)
                    .acquire_timeout(Duration::from_secs(10))
                    .after_connect(|conn, _| {
                        Box::pin(async move {
                            // WAL lets readers (and offline commands) run beside the writer;
                            // FULL syncs the WAL at every commit, which is what makes a 2xx durable.
                            conn.execute(
                                "PRAGMA journal_mode = WAL; PRAGMA synchronous = FULL; \
                                 PRAGMA busy_timeout = 10000; PRAGMA foreign_keys = ON;",
                            )
                            .await?;
                            Ok(())
                        })
                    })
                    .connect_with(opts)
                    .await?
            }
            Backend::Postgres => {
                AnyPoolOptions::new()
                    .max_connections(16)
                    .acquire_timeout(Duration::from_secs(3))
                    .connect_with(opts)
                    .await?
            }
        };
        Ok(Store { pool, backend, audit_key: None })
    }

    /// Opens (creating if needed) the SQLite store inside a data directory.
    pub async fn open_dir(dir: &std::path::Path) -> Result<Store, StoreError> {
        std::fs::create_dir_all(dir)
            .map_err(|e| StoreError::Config(format!("cannot create data dir {}: {e}", dir.display())))?;
        let file = dir.join("bulkhead.db");
        let url = format!("sqlite://{}?mode=rwc", file.display());
        let store = Store::connect(&url).await?;
        store.migrate().await?;
        Ok(store)
    }

    /// Opens an existing SQLite store read-only-ish (no creation) for offline commands.
    pub async fn open_existing_dir(dir: &std::path::Path) -> Result<Store, StoreError> {
        let file = dir.join("bulkhead.db");
        if !file.exists() {
            return Err(StoreError::Config(format!("no Bulkhead store at {}", file.display())));
        }
        Store::connect(&format!("sqlite://{}", file.display())).await
    }

    /// Connects and applies pending migrations.
    pub async fn open(url: &str) -> Result<Store, StoreError> {
        let store = Store::connect(url).await?;
        store.migrate().await?;
        Ok(store)
    }

    /// Applies pending migrations (idempotent; safe from several replicas at once).
    pub async fn migrate(&self) -> Result<(), StoreError> {
        match self.backend {
            Backend::Sqlite => SQLITE_MIGRATIONS.run(&self.pool).await?,
            Backend::Postgres => POSTGRES_MIGRATIONS.run(&self.pool).await?,
        }
        Ok(())
    }

    pub fn backend(&self) -> Backend {
        self.backend
    }

    /// The store-wide authorization epoch as committed now (see `authz_epoch` in the
    /// migrations): it moves on with every commit that revokes, suspends or patches an agent or
    /// gives one a new key, on any replica.
    pub async fn authz_epoch(&self) -> Result<i64, StoreError> {
        let (n,): (i64,) = sqlx::query_as("SELECT n FROM authz_epoch WHERE id = 1").fetch_one(&self.pool).await?;
        Ok(n)
    }

    /// `SELECT 1`: is the store reachable?
    pub async fn ping(&self) -> Result<(), StoreError> {
        sqlx::query("SELECT 1").execute(&self.pool).await?;
        Ok(())
    }

    pub async fn close(&self) {
        self.pool.close().await;
    }
}
