//! Test support: throwaway databases for the conformance suite and integration tests.
//!
//! PostgreSQL tests use `BULKHEAD_TEST_PG` (default `postgres://postgres@127.0.0.1:5432/test`)
//! to create a fresh database per test. If the server is unreachable, the test fails with a clear
//! message instead of being skipped.

use std::str::FromStr;

use sqlx::ConnectOptions;
use sqlx::any::AnyConnectOptions;

/// The admin URL tests create databases from.
pub fn pg_admin_url() -> String {
    std::env::var("BULKHEAD_TEST_PG").unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/test".into())
}

/// Creates an empty PostgreSQL database and returns its URL.
pub async fn fresh_pg_url() -> String {
    sqlx::any::install_default_drivers();
    let admin = pg_admin_url();
    let name = format!("bh_t_{}", crate::ledger_random_suffix());
    let mut conn =
        AnyConnectOptions::from_str(&admin).expect("BULKHEAD_TEST_PG is a valid URL").connect().await.unwrap_or_else(
            |e| panic!("PostgreSQL is not reachable at {admin} ({e}); start it or set BULKHEAD_TEST_PG"),
        );
    sqlx::query(sqlx::AssertSqlSafe(format!("CREATE DATABASE {name}")))
        .execute(&mut conn)
        .await
        .expect("create test database");
    let base = admin.rsplit_once('/').map(|(b, _)| b.to_owned()).unwrap_or(admin.clone());
    format!("{base}/{name}")
}

/// A fresh SQLite URL inside `dir`.
pub fn sqlite_url(dir: &std::path::Path) -> String {
    format!("sqlite://{}?mode=rwc", dir.join("bulkhead.db").display())
}
