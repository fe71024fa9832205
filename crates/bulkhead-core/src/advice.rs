//! Least-privilege advice: from what an agent actually did, what it needs.
//!
//! The store feeds an agent's audit events (and its descendants' money events) one at a time
//! into a [`Tally`]; [`Tally::finish`] compares what was used with what is granted and proposes
//! narrower scopes, a spending cap and a per-transaction limit. Pure: no I/O, no clock (the end of
//! the observed period is an argument), exact integer money throughout.
//!
//! The rules:
//! - **Scopes.** A scope is *used* when one of the agent's own events names it (a `spend` or
//!   `hold`, allowed or denied; a refused child creation names [`SPAWN_SCOPE`]; the store reports
//!   each child the agent created as an allowed use of [`SPAWN_SCOPE`]) and its current grant
//!   covers it. The proposal is exactly the used scopes:
//!   a concrete pattern nobody used is removable, a wildcard pattern is replaced by the concrete
//!   scopes seen under it (or removed when none was). Scopes the agent asked for that its grant
//!   does not cover (the `scope_not_granted` denials) are listed apart, never proposed.
//! - **Spend per window.** The windows are the agent's own, anchored at its creation
//!   (`[created + k·window, created + (k+1)·window)`), from the first to the one holding the end
//!   of the observed period, the current (still open) window included; a window without spend
//!   counts as zero. A window's spend is the sum of its allowed `spend` amounts plus `capture`
//!   amounts (a hold's captured part counts in the window it is captured in), of the agent and
//!   of its descendants, because an agent's cap covers its descendants' spending too.
//!   Percentiles are nearest-rank over those integer sums.
//! - **Figures.** `nice(x)` is the smallest amount `m × 10^k` micro-units (`m` in
//!   [`NICE_MANTISSAS`]: 1, 1.2, 1.5, 2, 2.5, 3, 4, 5, 6, 8 times a power of ten, the smallest being
//!   0.00001) that is at least `x × 1.2` (20 % headroom). The proposed per-transaction limit is
//!   `nice(largest single allowed spend or hold)` (a hold is checked against the per-transaction
//!   limit too); the proposed cap is `nice(max per window)`, raised to the proposed
//!   per-transaction limit if that is higher. Neither is ever proposed above what is granted, and
//!   the per-transaction limit never above the proposed cap. With no money movement recorded,
//!   nothing is proposed.
//! - **Denials.** The agent's own denied decisions, counted by reason.

use std::collections::BTreeMap;

use serde::Serialize;

use crate::duration::window_at;
use crate::money::{AMOUNT_MAX_MICROS, Micros};
use crate::scope::{Scope, ScopeSet};

/// The scope an agent needs to create children.
pub const SPAWN_SCOPE: &str = "spawn:agents";
/// The significant digits of "nice" amounts: 1.0, 1.2, 1.5, 2.0, 2.5, 3.0, 4.0, 5.0, 6.0, 8.0.
pub const NICE_MANTISSAS: [i64; 10] = [10, 12, 15, 20, 25, 30, 40, 50, 60, 80];
/// Headroom over the observed maximum, as a fraction: 6/5 = 1.2.
pub const HEADROOM: (i64, i64) = (6, 5);
/// The rule, in one sentence, for humans and for the JSON output.
pub const RULE: &str = "proposed = the smallest amount of the form m × 10^k (m in 1, 1.2, 1.5, 2, 2.5, 3, 4, 5, 6, 8) \
    that is at least 1.2 × the observed maximum (per window for the cap, per request for the \
    per-transaction limit), the cap at least the per-transaction limit, never above what is granted";

/// The smallest nice amount `>= x` (see [`NICE_MANTISSAS`]); zero for zero. Amounts above the
/// largest nice amount that fits the money range come back as [`Micros::MAX`] (itself nice: 10^12).
pub fn nice_at_least(x: Micros) -> Micros {
    if x.is_zero() {
        return Micros::ZERO;
    }
    let mut scale: i64 = 1;
    loop {
        for m in NICE_MANTISSAS {
            match m.checked_mul(scale) {
                Some(v) if v > AMOUNT_MAX_MICROS => return Micros::MAX,
                Some(v) if v >= x.micros() => return Micros::from_micros(v).unwrap_or(Micros::MAX),
                Some(_) => {}
                None => return Micros::MAX,
            }
        }
        scale = match scale.checked_mul(10) {
            Some(s) => s,
            None => return Micros::MAX,
        };
    }
}

/// `ceil(x × 1.2)`, exact (computed in 128 bits), at most [`Micros::MAX`].
pub fn with_headroom(x: Micros) -> Micros {
    let (num, den) = HEADROOM;
    let v = (i128::from(x.micros()) * i128::from(num) + i128::from(den) - 1) / i128::from(den);
    i64::try_from(v).ok().and_then(Micros::from_micros).map_or(Micros::MAX, |m| m.min(Micros::MAX))
}

/// The figure proposed for an observed maximum: `nice(max × 1.2)`.
pub fn propose(max: Micros) -> Micros {
    nice_at_least(with_headroom(max))
}

/// The nearest-rank `p`-th percentile (`1..=100`) of a multiset made of `zeros` zeros and the
/// values of `sorted` (ascending): the value at rank `ceil(p·n/100)` (1-based) of all `n` values.
/// `None` when the multiset is empty.
pub fn percentile(sorted: &[Micros], zeros: u64, p: u32) -> Option<Micros> {
    debug_assert!((1..=100).contains(&p), "percentile out of range");
    debug_assert!(sorted.windows(2).all(|w| w[0] <= w[1]), "values not sorted");
    let n = u128::from(zeros) + sorted.len() as u128;
    if n == 0 {
        return None;
    }
    let rank = (u128::from(p.clamp(1, 100)) * n).div_ceil(100).max(1);
    if rank <= u128::from(zeros) {
        return Some(Micros::ZERO);
    }
    let idx = usize::try_from(rank - u128::from(zeros) - 1).ok()?;
    sorted.get(idx).copied()
}

/// One audit event, reduced to what the advice needs.
#[derive(Clone, Copy, Debug)]
pub struct Observation<'a> {
    /// When it was recorded (Unix ms).
    pub at_ms: i64,
    /// Recorded for the agent itself (false: for one of its descendants).
    pub own: bool,
    /// `spend`, `hold`, `capture`, `release`, `agent.update`, …
    pub action: &'a str,
    /// `outcome == "allowed"`.
    pub allowed: bool,
    pub reason: Option<&'a str>,
    pub scope: Option<&'a str>,
    pub amount: Option<Micros>,
    /// Allowed only because the agent is in shadow mode: `reason` says what would have denied it.
    pub shadow: bool,
}

/// What an agent holds now.
#[derive(Clone, Debug)]
pub struct Grant {
    pub scopes: ScopeSet,
    pub spending_cap: Micros,
    pub per_tx_limit: Micros,
    pub created_ms: i64,
    pub window_ms: i64,
}

/// Money arithmetic left the range of `i64` micro-units (only a corrupt history can do that).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Overflow;

impl std::fmt::Display for Overflow {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("the recorded amounts add up beyond the representable range")
    }
}

impl std::error::Error for Overflow {}

#[derive(Clone, Copy, Debug, Default)]
struct Requests {
    allowed: u64,
    denied: u64,
}

/// Accumulates observations; memory grows with distinct scopes and windows with spend, not
/// with the number of events.
#[derive(Clone, Debug)]
pub struct Tally {
    created_ms: i64,
    window_ms: i64,
    events: u64,
    last_at: Option<i64>,
    /// Concrete scopes the agent's own events named.
    requested: BTreeMap<String, Requests>,
    /// Window index → spend in it (only windows with money movement).
    windows: BTreeMap<i64, Micros>,
    largest_single: Micros,
    total_spent: Micros,
    money_events: u64,
    denials: BTreeMap<String, u64>,
}

impl Tally {
    pub fn new(created_ms: i64, window_ms: i64) -> Tally {
        Tally {
            created_ms,
            window_ms: window_ms.max(1),
            events: 0,
            last_at: None,
            requested: BTreeMap::new(),
            windows: BTreeMap::new(),
            largest_single: Micros::ZERO,
            total_spent: Micros::ZERO,
            money_events: 0,
            denials: BTreeMap::new(),
        }
    }

    pub fn observe(&mut self, e: &Observation<'_>) -> Result<(), Overflow> {
        self.events += 1;
        self.last_at = Some(self.last_at.map_or(e.at_ms, |t| t.max(e.at_ms)));
        let request = matches!(e.action, "spend" | "hold");
        // An expiry names its hold's scope but is not a request: the hold was counted when made.
        if e.own
            && e.action != "hold.expire"
            && let Some(scope) = e.scope
        {
            let r = self.requested.entry(scope.to_owned()).or_default();
            if e.allowed {
                r.allowed += 1;
            } else {
                r.denied += 1;
            }
        }
        if e.own && !e.allowed {
            *self.denials.entry(e.reason.unwrap_or("unknown").to_owned()).or_default() += 1;
        }
        if e.own && e.shadow {
            // Shadow mode: what enforcement would have refused, listed apart from real denials.
            *self.denials.entry(format!("shadow:{}", e.reason.unwrap_or("unknown"))).or_default() += 1;
        }
        if let (true, Some(amount)) = (e.allowed, e.amount) {
            if request {
                self.largest_single = self.largest_single.max(amount);
            }
            if matches!(e.action, "spend" | "capture") {
                let (k, _, _) = window_at(self.created_ms, self.window_ms, e.at_ms);
                let w = self.windows.entry(k).or_default();
                *w = w.checked_add(amount).ok_or(Overflow)?;
                self.total_spent = self.total_spent.checked_add(amount).ok_or(Overflow)?;
                self.money_events += 1;
            }
        }
        Ok(())
    }

    /// The advice, for a history observed up to `until_ms` (or its last event, if later).
    pub fn finish(self, grant: &Grant, until_ms: i64) -> Advice {
        let until = self.last_at.map_or(until_ms, |t| t.max(until_ms));
        let (k_last, _, _) = window_at(self.created_ms, self.window_ms, until);
        let window_count = u64::try_from(k_last).unwrap_or(0) + 1;
        let mut sums: Vec<Micros> = self.windows.values().copied().collect();
        sums.sort_unstable();
        let zeros = window_count.saturating_sub(sums.len() as u64);
        let spend = spend_advice(grant, &sums, zeros, window_count, &self);
        let mut by_reason: Vec<DenialCount> =
            self.denials.into_iter().map(|(reason, count)| DenialCount { reason, count }).collect();
        by_reason.sort_by(|a, b| b.count.cmp(&a.count).then_with(|| a.reason.cmp(&b.reason)));
        Advice {
            events: self.events,
            until_ms: until,
            scopes: narrow_scopes(&grant.scopes, &self.requested),
            spend,
            denials: Denials { total: by_reason.iter().map(|d| d.count).sum(), by_reason },
        }
    }
}

fn spend_advice(grant: &Grant, sorted: &[Micros], zeros: u64, windows: u64, t: &Tally) -> SpendAdvice {
    let largest_single = t.largest_single;
    let max = sorted.last().copied().unwrap_or(Micros::ZERO);
    let moved = !sorted.is_empty() || !largest_single.is_zero();
    let (proposed_cap, proposed_per_tx_limit) = if moved {
        let per_tx = propose(largest_single);
        let cap = propose(max).max(per_tx).min(grant.spending_cap);
        (Some(cap), Some(per_tx.min(grant.per_tx_limit).min(cap)))
    } else {
        (None, None)
    };
    SpendAdvice {
        windows,
        windows_with_spend: sorted.iter().filter(|s| !s.is_zero()).count() as u64,
        money_events: t.money_events,
        total: t.total_spent,
        per_window: Percentiles {
            p50: percentile(sorted, zeros, 50).unwrap_or(Micros::ZERO),
            p99: percentile(sorted, zeros, 99).unwrap_or(Micros::ZERO),
            max,
        },
        largest_single,
        granted_cap: grant.spending_cap,
        proposed_cap,
        granted_per_tx_limit: grant.per_tx_limit,
        proposed_per_tx_limit,
        rule: RULE,
    }
}

fn narrow_scopes(granted: &ScopeSet, requested: &BTreeMap<String, Requests>) -> ScopeAdvice {
    let mut used = Vec::new();
    let mut asked_not_granted = Vec::new();
    for (name, r) in requested {
        let covered = Scope::parse(name).is_ok_and(|s| granted.grants(&s));
        if covered {
            used.push(UsedScope { scope: name.clone(), allowed: r.allowed, denied: r.denied });
        } else {
            asked_not_granted.push(AskedScope { scope: name.clone(), requests: r.allowed + r.denied });
        }
    }
    let concrete_granted: Vec<&str> =
        granted.patterns().iter().filter(|p| !p.is_wildcard()).map(|p| p.as_str()).collect();
    let mut changes = Vec::new();
    for p in granted.patterns() {
        let under: Vec<String> = used
            .iter()
            .filter(|u| Scope::parse(&u.scope).is_ok_and(|s| p.matches(&s)))
            .filter(|u| !p.is_wildcard() || !concrete_granted.contains(&u.scope.as_str()))
            .map(|u| u.scope.clone())
            .collect();
        let action = match (p.is_wildcard(), under.is_empty()) {
            (_, true) => ScopeAction::Remove,
            (false, false) => ScopeAction::Keep,
            (true, false) => ScopeAction::Narrow,
        };
        let to = if action == ScopeAction::Narrow { under } else { Vec::new() };
        changes.push(PatternChange { pattern: p.as_str().to_owned(), action, to });
    }
    ScopeAdvice {
        granted: granted.to_strings(),
        proposed: used.iter().map(|u| u.scope.clone()).collect(),
        removable: changes.iter().filter(|c| c.action == ScopeAction::Remove).map(|c| c.pattern.clone()).collect(),
        changes,
        used,
        asked_not_granted,
    }
}

/// The advice for one agent.
#[derive(Clone, Debug, Serialize)]
pub struct Advice {
    /// Events read.
    pub events: u64,
    /// The end of the observed period (Unix ms).
    #[serde(skip)]
    pub until_ms: i64,
    pub scopes: ScopeAdvice,
    pub spend: SpendAdvice,
    pub denials: Denials,
}

#[derive(Clone, Debug, Serialize)]
pub struct ScopeAdvice {
    /// What the agent holds now.
    pub granted: Vec<String>,
    /// Concrete scopes it used (sorted): the proposal.
    pub proposed: Vec<String>,
    /// Granted patterns nothing used.
    pub removable: Vec<String>,
    /// What to do with each granted pattern.
    pub changes: Vec<PatternChange>,
    /// Used scopes with their request counts (sorted by scope).
    pub used: Vec<UsedScope>,
    /// Scopes the agent asked for that its grant does not cover.
    pub asked_not_granted: Vec<AskedScope>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum ScopeAction {
    /// A concrete scope that was used.
    Keep,
    /// A wildcard replaced by the concrete scopes used under it.
    Narrow,
    /// Never used.
    Remove,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct PatternChange {
    pub pattern: String,
    pub action: ScopeAction,
    /// For `narrow`: the concrete scopes to grant instead.
    pub to: Vec<String>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct UsedScope {
    pub scope: String,
    pub allowed: u64,
    pub denied: u64,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct AskedScope {
    pub scope: String,
    pub requests: u64,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub struct Percentiles {
    pub p50: Micros,
    pub p99: Micros,
    pub max: Micros,
}

#[derive(Clone, Debug, Serialize)]
pub struct SpendAdvice {
    /// Windows observed (the current one included).
    pub windows: u64,
    pub windows_with_spend: u64,
    /// Allowed spends and captures counted.
    pub money_events: u64,
    pub total: Micros,
    pub per_window: Percentiles,
    /// The largest single allowed spend or hold.
    pub largest_single: Micros,
    pub granted_cap: Micros,
    pub proposed_cap: Option<Micros>,
    pub granted_per_tx_limit: Micros,
    pub proposed_per_tx_limit: Option<Micros>,
    pub rule: &'static str,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct DenialCount {
    pub reason: String,
    pub count: u64,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Denials {
    pub total: u64,
    /// Most frequent first.
    pub by_reason: Vec<DenialCount>,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn m(s: &str) -> Micros {
        Micros::parse(s).unwrap()
    }

    fn ms(v: &[&str]) -> Vec<Micros> {
        v.iter().map(|s| m(s)).collect()
    }

    fn grant(scopes: &[&str], cap: &str, per_tx: &str, window_ms: i64) -> Grant {
        Grant {
            scopes: ScopeSet::parse(scopes).unwrap(),
            spending_cap: m(cap),
            per_tx_limit: m(per_tx),
            created_ms: 1_000,
            window_ms,
        }
    }

    fn ev<'a>(at_ms: i64, action: &'a str, allowed: bool, scope: Option<&'a str>, amount: &str) -> Observation<'a> {
        Observation {
            at_ms,
            own: true,
            action,
            allowed,
            reason: None,
            scope,
            amount: if amount.is_empty() { None } else { Some(m(amount)) },
            shadow: false,
        }
    }

    #[test]
    fn nice_amounts() {
        let cases = [
            ("0", "0.00"),
            ("0.000001", "0.00001"),
            ("0.00001", "0.00001"),
            ("0.000011", "0.000012"),
            ("1", "1.00"),
            ("1.000001", "1.20"),
            ("1.2", "1.20"),
            ("1.21", "1.50"),
            ("2.01", "2.50"),
            ("3.01", "4.00"),
            ("8.01", "10.00"),
            ("21", "25.00"),
            ("50.000001", "60.00"),
            ("999", "1000.00"),
            ("1000000000000", "1000000000000.00"),
        ];
        for (x, want) in cases {
            assert_eq!(nice_at_least(m(x)).to_string(), want, "nice({x})");
        }
    }

    #[test]
    fn headroom_is_exact_and_rounds_up() {
        assert_eq!(with_headroom(m("17.50")), m("21.00"));
        assert_eq!(with_headroom(Micros::from_micros(1).unwrap()).micros(), 2); // 1.2 → 2
        assert_eq!(with_headroom(Micros::from_micros(5).unwrap()).micros(), 6);
        assert_eq!(with_headroom(Micros::MAX), Micros::MAX);
        assert_eq!(propose(m("17.50")), m("25.00"));
        assert_eq!(propose(m("6.00")), m("8.00"));
        assert_eq!(propose(m("50.00")), m("60.00"));
        assert_eq!(propose(Micros::MAX), Micros::MAX);
    }

    proptest::proptest! {
        #[test]
        fn proposals_have_headroom_and_are_tight(x in 0..=crate::money::AMOUNT_MAX_MICROS / 2) {
            let x = Micros::from_micros(x).unwrap();
            let p = propose(x);
            // At least 1.2 × x (exactly: 5p >= 6x), and at most one nice step above it (the
            // widest step of the series is 3 → 4, so p < 1.2 × 4/3 × x + the 0.00001 floor).
            proptest::prop_assert!(i128::from(p.micros()) * 5 >= i128::from(x.micros()) * 6);
            proptest::prop_assert!(i128::from(p.micros()) * 10 <= i128::from(x.micros()) * 16 + 100);
        }
    }

    #[test]
    fn nearest_rank_percentiles() {
        let v = ms(&["1", "2", "3", "4", "5", "6", "7", "8", "9", "10"]);
        assert_eq!(percentile(&v, 0, 50), Some(m("5")));
        assert_eq!(percentile(&v, 0, 99), Some(m("10")));
        assert_eq!(percentile(&v, 0, 1), Some(m("1")));
        assert_eq!(percentile(&v, 0, 100), Some(m("10")));
        // Implicit zeros come first: [0, 0, 0, 1, 2] → p50 is rank 3 → 0; p99 is rank 5 → 2.
        assert_eq!(percentile(&ms(&["1", "2"]), 3, 50), Some(Micros::ZERO));
        assert_eq!(percentile(&ms(&["1", "2"]), 3, 99), Some(m("2")));
        // [0, 1, 2, 3] → p50 is rank 2 → 1.
        assert_eq!(percentile(&ms(&["1", "2", "3"]), 1, 50), Some(m("1")));
        assert_eq!(percentile(&[], 0, 50), None);
        assert_eq!(percentile(&[], 4, 50), Some(Micros::ZERO));
        // p99 of 200 values is rank 198, not the maximum.
        let big: Vec<Micros> = (1..=200).map(|i| Micros::from_micros(i).unwrap()).collect();
        assert_eq!(percentile(&big, 0, 99), Micros::from_micros(198));
    }

    #[test]
    fn spend_is_bucketed_into_windows_anchored_at_creation() {
        // Created at 1_000, window 100: windows [1000,1100), [1100,1200), …
        let g = grant(&["a:b"], "100.00", "100.00", 100);
        let mut t = Tally::new(g.created_ms, g.window_ms);
        let events = [
            ev(1_000, "spend", true, Some("a:b"), "1.00"),
            ev(1_099, "spend", true, Some("a:b"), "2.00"), // still window 0: 3.00
            ev(1_100, "hold", true, Some("a:b"), "9.00"),  // a hold is no spend
            ev(1_150, "capture", true, None, "4.00"),      // window 1: 4.00
            ev(1_160, "release", true, None, "5.00"),      // a release is no spend
            ev(1_170, "spend", false, Some("a:b"), "50.00"), // denied: no spend
            // window 2 empty
            ev(1_305, "spend", true, Some("a:b"), "0.50"), // window 3: 0.50
        ];
        for e in &events {
            t.observe(e).unwrap();
        }
        // Observed up to 1_450: windows 0..=4, the last two without spend.
        let a = t.finish(&g, 1_450);
        let s = &a.spend;
        assert_eq!(s.windows, 5);
        assert_eq!(s.windows_with_spend, 3);
        assert_eq!(s.money_events, 4);
        assert_eq!(s.total, m("7.50"));
        // Sorted: [0, 0, 0.50, 3.00, 4.00]: p50 = rank 3.
        assert_eq!(s.per_window, Percentiles { p50: m("0.50"), p99: m("4.00"), max: m("4.00") });
        // The largest request is the 9.00 hold (per-tx limits apply to holds).
        assert_eq!(s.largest_single, m("9.00"));
        // per-tx: nice(10.80) = 12; cap: nice(4.80) = 5, raised to the per-tx limit.
        assert_eq!(s.proposed_per_tx_limit, Some(m("12.00")));
        assert_eq!(s.proposed_cap, Some(m("12.00")));
        assert_eq!(a.events, 7);
    }

    #[test]
    fn later_events_extend_the_observed_period() {
        let g = grant(&["a:b"], "10.00", "10.00", 100);
        let mut t = Tally::new(g.created_ms, g.window_ms);
        t.observe(&ev(1_250, "spend", true, Some("a:b"), "1.00")).unwrap();
        // A clock behind the store's: the period still reaches the last event.
        let a = t.finish(&g, 1_010);
        assert_eq!(a.spend.windows, 3);
        assert_eq!(a.until_ms, 1_250);
        assert_eq!(a.spend.per_window.p50, Micros::ZERO);
    }

    #[test]
    fn proposals_never_exceed_the_grant() {
        let g = grant(&["a:b"], "10.00", "3.00", 1_000);
        let mut t = Tally::new(g.created_ms, g.window_ms);
        t.observe(&ev(1_000, "spend", true, Some("a:b"), "3.00")).unwrap();
        t.observe(&ev(1_001, "spend", true, Some("a:b"), "3.00")).unwrap();
        t.observe(&ev(1_002, "spend", true, Some("a:b"), "3.00")).unwrap();
        let s = t.finish(&g, 1_500).spend;
        // nice(9 × 1.2) = 12 > 10 granted; nice(3 × 1.2) = 4 > 3 granted.
        assert_eq!(s.proposed_cap, Some(m("10.00")));
        assert_eq!(s.proposed_per_tx_limit, Some(m("3.00")));
        assert_eq!(s.granted_cap, m("10.00"));
    }

    #[test]
    fn no_spend_no_proposal() {
        let g = grant(&["a:b"], "10.00", "10.00", 1_000);
        let mut t = Tally::new(g.created_ms, g.window_ms);
        t.observe(&ev(1_000, "agent.create", true, None, "")).unwrap();
        let s = t.finish(&g, 5_500).spend;
        assert_eq!(s.windows, 5);
        assert_eq!(s.proposed_cap, None);
        assert_eq!(s.proposed_per_tx_limit, None);
        assert_eq!(s.per_window, Percentiles { p50: Micros::ZERO, p99: Micros::ZERO, max: Micros::ZERO });
    }

    #[test]
    fn a_hold_and_its_expiry_are_one_request() {
        let g = grant(&["a:b"], "100.00", "100.00", 1_000);
        let mut t = Tally::new(g.created_ms, g.window_ms);
        t.observe(&ev(1_000, "hold", true, Some("a:b"), "2.00")).unwrap();
        t.observe(&ev(1_500, "hold.expire", true, Some("a:b"), "2.00")).unwrap();
        let a = t.finish(&g, 2_000);
        let used: Vec<(&str, u64)> = a.scopes.used.iter().map(|u| (u.scope.as_str(), u.allowed)).collect();
        assert_eq!(used, [("a:b", 1)]);
    }

    #[test]
    fn descendants_count_for_money_but_not_for_scopes_or_denials() {
        let g = grant(&["a:b"], "100.00", "100.00", 1_000);
        let mut t = Tally::new(g.created_ms, g.window_ms);
        t.observe(&ev(1_000, "spend", true, Some("a:b"), "1.00")).unwrap();
        let child = Observation { own: false, ..ev(1_001, "spend", true, Some("c:d"), "7.00") };
        t.observe(&child).unwrap();
        let child_denied = Observation {
            own: false,
            reason: Some("spending_cap_exceeded"),
            ..ev(1_002, "spend", false, Some("c:d"), "500.00")
        };
        t.observe(&child_denied).unwrap();
        let a = t.finish(&g, 1_003);
        assert_eq!(a.spend.total, m("8.00"));
        assert_eq!(a.spend.largest_single, m("7.00"));
        assert_eq!(a.scopes.proposed, vec!["a:b"]);
        assert!(a.scopes.asked_not_granted.is_empty());
        assert_eq!(a.denials.total, 0);
    }

    #[test]
    fn scopes_are_narrowed_to_what_was_used() {
        let g = grant(&["read:*", "payments:write", "write:reports", "*:docs", "admin:*"], "100.00", "100.00", 1_000);
        let mut t = Tally::new(g.created_ms, g.window_ms);
        let denied =
            |scope, reason| Observation { reason: Some(reason), ..ev(1_010, "spend", false, Some(scope), "1.00") };
        let events = [
            ev(1_001, "spend", true, Some("read:web"), "1.00"),
            ev(1_002, "hold", true, Some("read:docs"), "1.00"),
            ev(1_003, "spend", true, Some("read:docs"), "1.00"),
            ev(1_004, "spend", true, Some("write:reports"), "1.00"),
            // Denied for money, but the scope was granted and asked for: used.
            denied("read:news", "spending_cap_exceeded"),
            denied("delete:everything", "scope_not_granted"),
            denied("delete:everything", "scope_not_granted"),
            denied("admin:root", "agent_suspended"),
            // A refused child creation names the spawn scope; the grant does not cover it.
            Observation { action: "agent.create", ..denied(SPAWN_SCOPE, "scope_not_granted") },
            // Captures carry no scope.
            ev(1_020, "capture", true, None, "1.00"),
        ];
        for e in &events {
            t.observe(e).unwrap();
        }
        let s = t.finish(&g, 1_100).scopes;
        assert_eq!(s.proposed, vec!["admin:root", "read:docs", "read:news", "read:web", "write:reports"]);
        assert_eq!(s.removable, vec!["payments:write"]);
        let change = |p: &str| s.changes.iter().find(|c| c.pattern == p).unwrap().clone();
        assert_eq!(change("read:*").action, ScopeAction::Narrow);
        assert_eq!(change("read:*").to, vec!["read:docs", "read:news", "read:web"]);
        assert_eq!(change("write:reports").action, ScopeAction::Keep);
        assert!(change("write:reports").to.is_empty());
        assert_eq!(change("*:docs").to, vec!["read:docs"]);
        assert_eq!(change("admin:*").to, vec!["admin:root"]);
        assert_eq!(s.changes.len(), 5);
        assert_eq!(s.used[1], UsedScope { scope: "read:docs".into(), allowed: 2, denied: 0 });
        assert_eq!(s.used[2], UsedScope { scope: "read:news".into(), allowed: 0, denied: 1 });
        assert_eq!(
            s.asked_not_granted,
            vec![
                AskedScope { scope: "delete:everything".into(), requests: 2 },
                AskedScope { scope: SPAWN_SCOPE.into(), requests: 1 },
            ]
        );
    }

    #[test]
    fn a_wildcard_over_a_granted_concrete_scope_is_removable() {
        let g = grant(&["read:docs", "read:*"], "10.00", "10.00", 1_000);
        let mut t = Tally::new(g.created_ms, g.window_ms);
        t.observe(&ev(1_001, "spend", true, Some("read:docs"), "1.00")).unwrap();
        let s = t.finish(&g, 1_002).scopes;
        assert_eq!(s.proposed, vec!["read:docs"]);
        assert_eq!(s.removable, vec!["read:*"]);
        assert_eq!(s.changes[0].action, ScopeAction::Keep);
    }

    #[test]
    fn denials_are_counted_by_reason_most_frequent_first() {
        let g = grant(&["a:b"], "10.00", "10.00", 1_000);
        let mut t = Tally::new(g.created_ms, g.window_ms);
        for (reason, n) in [("spending_cap_exceeded", 1), ("scope_not_granted", 3), ("rate_limited", 1)] {
            for _ in 0..n {
                let e = Observation { reason: Some(reason), ..ev(1_001, "spend", false, Some("a:b"), "1.00") };
                t.observe(&e).unwrap();
            }
        }
        t.observe(&Observation { reason: Some("scope_escalation"), ..ev(1_002, "agent.create", false, None, "") })
            .unwrap();
        let d = t.finish(&g, 1_003).denials;
        assert_eq!(d.total, 6);
        let got: Vec<(&str, u64)> = d.by_reason.iter().map(|r| (r.reason.as_str(), r.count)).collect();
        assert_eq!(
            got,
            vec![("scope_not_granted", 3), ("rate_limited", 1), ("scope_escalation", 1), ("spending_cap_exceeded", 1)]
        );
    }

    #[test]
    fn overflowing_history_is_an_error() {
        let mut t = Tally::new(0, 1_000);
        let big = Observation { amount: Some(Micros::MAX), ..ev(1, "spend", true, Some("a:b"), "") };
        for _ in 0..9 {
            t.observe(&big).unwrap();
        }
        assert_eq!(t.observe(&big), Err(Overflow));
    }
}
