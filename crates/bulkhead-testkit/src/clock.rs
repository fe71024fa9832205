//! Clock fixtures: every test clock starts at [`T0`], and moves only when the test says so.

use std::sync::Arc;

use bulkhead_core::ManualClock;

/// Where every test's clock starts: 2023-11-14T22:13:20Z, in Unix milliseconds.
pub const T0: i64 = 1_700_000_000_000;
pub const SEC: i64 = 1_000;
pub const MIN: i64 = 60 * SEC;
pub const HOUR: i64 = 60 * MIN;

/// A manual clock at [`T0`].
pub fn manual_clock() -> Arc<ManualClock> {
    Arc::new(ManualClock::new(T0))
}
