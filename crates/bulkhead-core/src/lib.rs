//! Bulkhead's pure core: money, handles, scopes, durations, keys, rate limiting and the spend
//! decision.
//!
//! Architecture invariant: nothing in this crate does I/O, reads the clock or draws randomness on
//! its own. Time arrives as an argument (`now_ms`, Unix milliseconds) and randomness as an
//! `&mut impl Rng`, so every decision can be replayed exactly in tests.

pub mod advice;
pub mod clock;
pub mod decision;
pub mod duration;
pub mod handle;
pub mod key;
pub mod money;
pub mod ratelimit;
pub mod runaway;
pub mod scope;

pub use clock::{Clock, ManualClock};
pub use decision::{
    AgentLimits, Bound, Bounds, ChainMember, Counters, DenyReason, Escalation, Link, Movement, SpendCheck, Verdict,
    authorize, bounds_check, chain_credential, child_check, credential, decide, lease_extra_slots, precheck, room,
    utilization, verdict,
};
pub use duration::Span;
pub use handle::Handle;
pub use key::{ApiKey, KeyHash};
pub use money::Micros;
pub use scope::{Scope, ScopePattern, ScopeSet};
