//! Throwaway stores: a SQLite file in a directory the test owns, or a fresh database on a
//! PostgreSQL server.
//!
//! PostgreSQL tests run when `BULKHEAD_TEST_DATABASE_URL` names a server (an admin URL, e.g.
//! `postgres://postgres:postgres@127.0.0.1:5432/postgres`; `scripts/test.sh` sets it): each test
//! creates a database of its own there (`bh_t_…`). When it is unset, a PostgreSQL test writes
//! `skipped <test>: set BULKHEAD_TEST_DATABASE_URL to run the PostgreSQL tests` to stderr and
//! returns; under CI (`CI` set and not `false` or `0`) it fails instead, so that CI never counts
//! a skip as a pass. When it is set but the server cannot be reached, the test fails.

use std::io::Write;
use std::str::FromStr;

use sqlx::ConnectOptions;
use sqlx::any::AnyConnectOptions;

/// The store a test runs on: the conformance suite and the server's tests run each of theirs on
/// both.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Db {
    Sqlite,
    Postgres,
}

impl Db {
    /// Whether a test on this store runs here: `false` for PostgreSQL without
    /// `BULKHEAD_TEST_DATABASE_URL` (the test returns; [`pg_admin_url`] said that it skipped).
    pub fn available(self) -> bool {
        match self {
            Db::Sqlite => true,
            Db::Postgres => pg_admin_url().is_some(),
        }
    }
}

/// The variable naming the PostgreSQL server the tests create their databases on.
pub const DATABASE_URL_VAR: &str = "BULKHEAD_TEST_DATABASE_URL";

/// The admin URL of the PostgreSQL server to create test databases on, or `None` when
/// `BULKHEAD_TEST_DATABASE_URL` is unset: then the test must return at once (this has said that
/// it skipped). Under CI an unset variable fails the test here.
///
/// The skip line goes to the process's stderr directly, past the test harness's capture, so that
/// every run shows which PostgreSQL tests did not run.
pub fn pg_admin_url() -> Option<String> {
    match std::env::var(DATABASE_URL_VAR) {
        Ok(url) if !url.trim().is_empty() => Some(url),
        _ => {
            let test = std::thread::current().name().filter(|n| *n != "main").map(|n| format!(" {n}"));
            let test = test.unwrap_or_default();
            if in_ci() {
                panic!("under CI a PostgreSQL test may not skip: set {DATABASE_URL_VAR} to run{test}");
            }
            let _ = writeln!(std::io::stderr(), "skipped{test}: set {DATABASE_URL_VAR} to run the PostgreSQL tests");
            None
        }
    }
}

/// Whether this runs under CI: `CI` is set, and not to `false` or `0`.
fn in_ci() -> bool {
    std::env::var("CI").is_ok_and(|v| !matches!(v.trim(), "" | "false" | "0"))
}

/// A database made for one test.
#[derive(Clone, Debug)]
pub struct PgDb {
    /// Its URL.
    pub url: String,
    /// Its name, to drop it with [`drop_pg`].
    pub name: String,
}

async fn admin_connection(admin: &str) -> sqlx::AnyConnection {
    sqlx::any::install_default_drivers();
    AnyConnectOptions::from_str(admin)
        .unwrap_or_else(|e| panic!("{DATABASE_URL_VAR}={admin} is not a valid URL: {e}"))
        .connect()
        .await
        .unwrap_or_else(|e| {
            panic!("PostgreSQL is not reachable at {admin} ({e}): start it, or unset {DATABASE_URL_VAR}")
        })
}

/// Creates an empty PostgreSQL database; `None` (the test returns) as [`pg_admin_url`] says.
pub async fn fresh_pg() -> Option<PgDb> {
    let admin = pg_admin_url()?;
    let mut conn = admin_connection(&admin).await;
    let name = format!("bh_t_{}", bulkhead_core::key::random_base62(&mut rand::rng(), 12).to_lowercase());
    sqlx::query(sqlx::AssertSqlSafe(format!("CREATE DATABASE {name}")))
        .execute(&mut conn)
        .await
        .unwrap_or_else(|e| panic!("create test database {name}: {e}"));
    let base = admin.rsplit_once('/').map(|(b, _)| b.to_owned()).unwrap_or(admin.clone());
    Some(PgDb { url: format!("{base}/{name}"), name })
}

/// The URL of an empty PostgreSQL database; `None` (the test returns) as [`pg_admin_url`] says.
pub async fn fresh_pg_url() -> Option<String> {
    fresh_pg().await.map(|db| db.url)
}

/// Drops a database made by [`fresh_pg`], closing its connections.
pub async fn drop_pg(name: &str) {
    let admin = std::env::var(DATABASE_URL_VAR).expect("a test database exists only when its server is named");
    let mut conn = admin_connection(&admin).await;
    sqlx::query(sqlx::AssertSqlSafe(format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)")))
        .execute(&mut conn)
        .await
        .unwrap_or_else(|e| panic!("drop test database {name}: {e}"));
}

/// A SQLite store's URL: `bulkhead.db` inside `dir`, created on first open.
pub fn sqlite_url(dir: &std::path::Path) -> String {
    format!("sqlite://{}?mode=rwc", dir.join("bulkhead.db").display())
}
