//! The seed of a test's ledger, so that a failing run replays.
//!
//! The ledger draws the ids it makes (spends, holds, alerts) from a generator seeded by
//! `LedgerConfig::seed`. A test passes [`seed()`]: `BULKHEAD_TEST_SEED` when set, else a fresh
//! random seed. Either way the seed is printed; the test harness shows what a failing test
//! printed, so its output says how to run it again with the same ids (the same ids for commands
//! sent one after another; concurrent ones may fall into other batches).

/// The variable that fixes the seed of every test ledger.
pub const SEED_VAR: &str = "BULKHEAD_TEST_SEED";

/// The seed for a test's ledger: `BULKHEAD_TEST_SEED`, else a random one; printed either way.
pub fn seed() -> u64 {
    let seed = match std::env::var(SEED_VAR) {
        Ok(v) => v.trim().parse().unwrap_or_else(|e| panic!("{SEED_VAR}={v:?} is not a u64: {e}")),
        Err(_) => rand::random(),
    };
    eprintln!("ledger seed {seed} (replay with {SEED_VAR}={seed})");
    seed
}
