//! Bulkhead's test support, shared by the tests of every crate of the workspace. It is a
//! dev-dependency only: nothing that ships depends on it, and it is never published.
//!
//! - [`db`]: throwaway stores: a SQLite file in a temporary directory, or a fresh database on
//!   the PostgreSQL server named by `BULKHEAD_TEST_DATABASE_URL`. Without that variable a
//!   PostgreSQL test says on stderr that it skipped, and under CI (`CI` set) it fails instead.
//! - [`clock`]: the instant every test clock starts at, and a `ManualClock` standing there.
//! - [`seed`]: the seed of a test's ledger (its ids), printed so that a failing run replays.
//! - [`upstream`]: the `mock-upstream` binary (this crate's `src/bin/mock-upstream.rs`, an
//!   OpenAI/Anthropic-compatible server), found or built, and started as a process of its own.

pub mod clock;
pub mod db;
pub mod seed;
pub mod upstream;

pub use clock::{HOUR, MIN, SEC, T0, manual_clock};
pub use db::{DATABASE_URL_VAR, Db, PgDb, drop_pg, fresh_pg, fresh_pg_url, pg_admin_url, sqlite_url};
pub use seed::{SEED_VAR, seed};
pub use upstream::{mock_upstream_bin, start_mock_upstream};
