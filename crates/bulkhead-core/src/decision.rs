//! The spend decision: may this amount be spent (or held) by this agent now?
//!
//! The store loads an agent's chain (the agent, then each ancestor up to the root) inside its
//! transaction, calls [`decide`] and, on `Allow`, applies the matching counter change from this
//! module. Checks run in the contract's order: credentials, suspension and scope, rate limit,
//! limits.

use crate::duration::window_at;
use crate::money::Micros;
use crate::ratelimit::{RateLimit, gcra};
use crate::scope::{Scope, ScopeSet};

/// An agent's configured limits.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AgentLimits {
    pub spending_cap: Micros,
    pub window_ms: i64,
    pub per_tx_limit: Micros,
    pub lifetime_cap: Option<Micros>,
    /// Window anchor: the agent's creation time.
    pub created_ms: i64,
}

/// An agent's running totals. `window_spent` belongs to window `window_index`; `held` is the sum of
/// the open, unexpired holds of the agent and all its descendants; `lifetime_spent` never resets.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Counters {
    pub window_index: i64,
    pub window_spent: Micros,
    pub held: Micros,
    pub lifetime_spent: Micros,
}

/// One agent of a chain: its limits and its counters.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ChainMember {
    pub limits: AgentLimits,
    pub counters: Counters,
}

/// Why a request was denied. Every variant maps to one public error code.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
#[non_exhaustive]
pub enum DenyReason {
    /// The key is unknown or malformed.
    InvalidCredentials,
    /// The agent or one of its ancestors was revoked.
    CredentialRevoked,
    /// The agent's key expired.
    CredentialExpired,
    /// The agent is suspended.
    AgentSuspended,
    /// The key does not hold the requested scope.
    ScopeNotGranted,
    /// The agent's request rate limit was hit; retry after this many milliseconds.
    RateLimited { retry_after_ms: i64 },
    /// The amount is above the agent's per-transaction limit.
    PerTxLimit,
    /// The amount would take the agent past its window cap.
    SpendingCap,
    /// The amount would take the agent past its lifetime cap.
    LifetimeCap,
    /// The amount would take an ancestor past one of its limits.
    AncestorCap,
}

impl DenyReason {
    pub fn code(self) -> &'static str {
        match self {
            DenyReason::InvalidCredentials => "invalid_credentials",
            DenyReason::CredentialRevoked => "credential_revoked",
            DenyReason::CredentialExpired => "credential_expired",
            DenyReason::AgentSuspended => "agent_suspended",
            DenyReason::ScopeNotGranted => "scope_not_granted",
            DenyReason::RateLimited { .. } => "rate_limited",
            DenyReason::PerTxLimit => "per_tx_limit_exceeded",
            DenyReason::SpendingCap => "spending_cap_exceeded",
            DenyReason::LifetimeCap => "lifetime_cap_exceeded",
            DenyReason::AncestorCap => "ancestor_cap_exceeded",
        }
    }

    pub fn message(self) -> &'static str {
        match self {
            DenyReason::InvalidCredentials => "The key is missing, malformed or unknown.",
            DenyReason::CredentialRevoked => "This agent's credential was revoked.",
            DenyReason::CredentialExpired => "This agent's credential has expired.",
            DenyReason::AgentSuspended => "This agent is suspended until an operator resumes it.",
            DenyReason::ScopeNotGranted => "The key does not hold the requested scope.",
            DenyReason::RateLimited { .. } => "The agent's request rate limit was reached; retry later.",
            DenyReason::PerTxLimit => "The amount is above the agent's per-transaction limit; nothing was charged.",
            DenyReason::SpendingCap => {
                "The amount would exceed the agent's spending cap for this window; nothing was charged."
            }
            DenyReason::LifetimeCap => "The amount would exceed the agent's lifetime cap; nothing was charged.",
            DenyReason::AncestorCap => {
                "The amount would exceed a limit of one of the agent's ancestors; nothing was charged."
            }
        }
    }

    /// Parses a stored code back (for audit reads and idempotent replays).
    pub fn from_code(code: &str) -> Option<DenyReason> {
        Some(match code {
            "invalid_credentials" => DenyReason::InvalidCredentials,
            "credential_revoked" => DenyReason::CredentialRevoked,
            "credential_expired" => DenyReason::CredentialExpired,
            "agent_suspended" => DenyReason::AgentSuspended,
            "scope_not_granted" => DenyReason::ScopeNotGranted,
            "rate_limited" => DenyReason::RateLimited { retry_after_ms: 1000 },
            "per_tx_limit_exceeded" => DenyReason::PerTxLimit,
            "spending_cap_exceeded" => DenyReason::SpendingCap,
            "lifetime_cap_exceeded" => DenyReason::LifetimeCap,
            "ancestor_cap_exceeded" => DenyReason::AncestorCap,
            _ => return None,
        })
    }
}

impl Counters {
    /// The counters as they stand at `now_ms`: a new window starts with nothing spent.
    pub fn at(self, limits: &AgentLimits, now_ms: i64) -> Counters {
        let (k, _, _) = window_at(limits.created_ms, limits.window_ms, now_ms);
        if k != self.window_index { Counters { window_index: k, window_spent: Micros::ZERO, ..self } } else { self }
    }
}

/// Everything the ordered checks need to know about the calling agent.
#[derive(Clone, Debug)]
pub struct SpendCheck<'a> {
    /// The agent or an ancestor is revoked.
    pub revoked: bool,
    pub key_expires_ms: Option<i64>,
    pub suspended: bool,
    pub scopes: &'a ScopeSet,
    /// The scope the request names; `None` for calls that need no scope (capture, release).
    pub scope: Option<&'a Scope>,
    /// The agent's rate limit and its stored TAT.
    pub rate: Option<(RateLimit, i64)>,
}

/// Checks credentials, suspension, scope and rate limit, in that order.
/// `Ok(Some(tat))` carries the rate limiter's new state to store.
pub fn precheck(c: &SpendCheck<'_>, now_ms: i64) -> Result<Option<i64>, DenyReason> {
    if c.revoked {
        return Err(DenyReason::CredentialRevoked);
    }
    if c.key_expires_ms.is_some_and(|t| now_ms >= t) {
        return Err(DenyReason::CredentialExpired);
    }
    if c.suspended {
        return Err(DenyReason::AgentSuspended);
    }
    if let Some(scope) = c.scope
        && !c.scopes.grants(scope)
    {
        return Err(DenyReason::ScopeNotGranted);
    }
    match c.rate {
        None => Ok(None),
        Some((limit, tat)) => {
            gcra(limit, tat, now_ms).map(Some).map_err(|retry_after_ms| DenyReason::RateLimited { retry_after_ms })
        }
    }
}

fn fits(m: &ChainMember, amount: Micros) -> Result<(), DenyReason> {
    if amount > m.limits.per_tx_limit {
        return Err(DenyReason::PerTxLimit);
    }
    let committed = m.counters.window_spent.checked_add(m.counters.held);
    let after = committed.and_then(|c| c.checked_add(amount));
    if after.is_none_or(|a| a > m.limits.spending_cap) {
        return Err(DenyReason::SpendingCap);
    }
    if let Some(cap) = m.limits.lifetime_cap {
        let after = m.counters.lifetime_spent.checked_add(m.counters.held).and_then(|c| c.checked_add(amount));
        if after.is_none_or(|a| a > cap) {
            return Err(DenyReason::LifetimeCap);
        }
    }
    // Lifetime totals of agents without a lifetime cap must still never wrap.
    if m.counters.lifetime_spent.checked_add(amount).is_none() {
        return Err(DenyReason::LifetimeCap);
    }
    Ok(())
}

/// May `amount` be spent or held by `chain[0]`, given every ancestor in `chain[1..]`?
///
/// The counters must already be brought to `now` with [`Counters::at`].
pub fn authorize(chain: &[ChainMember], amount: Micros) -> Result<(), DenyReason> {
    let (agent, ancestors) = chain.split_first().expect("a chain holds at least the agent");
    fits(agent, amount)?;
    for a in ancestors {
        fits(a, amount).map_err(|_| DenyReason::AncestorCap)?;
    }
    Ok(())
}

/// The most `chain[0]` may still spend or hold right now under every cap of its chain (window
/// and lifetime caps of the agent and of each ancestor; the per-transaction limit is not a cap
/// on the total). The counters must be brought to `now` first.
pub fn room(chain: &[ChainMember]) -> Micros {
    chain
        .iter()
        .map(|m| {
            let c = m.counters;
            let left = |cap: Micros, used: Option<Micros>| used.map_or(Micros::ZERO, |u| cap.saturating_sub(u));
            let window = left(m.limits.spending_cap, c.window_spent.checked_add(c.held));
            match m.limits.lifetime_cap {
                Some(cap) => window.min(left(cap, c.lifetime_spent.checked_add(c.held))),
                None => window,
            }
        })
        .min()
        .unwrap_or(Micros::ZERO)
}

/// Full decision: prechecks, then limits. Returns the new rate-limiter state on `Allow`.
pub fn decide(
    c: &SpendCheck<'_>,
    chain: &[ChainMember],
    amount: Micros,
    now_ms: i64,
) -> Result<Option<i64>, DenyReason> {
    let tat = precheck(c, now_ms)?;
    authorize(chain, amount)?;
    Ok(tat)
}

/// A change to apply to every member of a chain once a decision allowed it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Movement {
    /// A plain spend: hold and capture at once.
    Spend(Micros),
    /// A new hold.
    Hold(Micros),
    /// A hold of `held` closed with `captured` of it spent and the rest released.
    Settle { held: Micros, captured: Micros },
}

impl Counters {
    /// Applies a movement. `None` means the arithmetic would break (a bug or a corrupt store):
    /// the caller must fail the request rather than write.
    pub fn apply(self, m: Movement) -> Option<Counters> {
        let mut c = self;
        match m {
            Movement::Spend(a) => {
                c.window_spent = c.window_spent.checked_add(a)?;
                c.lifetime_spent = c.lifetime_spent.checked_add(a)?;
            }
            Movement::Hold(a) => c.held = c.held.checked_add(a)?,
            Movement::Settle { held, captured } => {
                if captured > held {
                    return None;
                }
                c.held = c.held.checked_sub(held)?;
                c.window_spent = c.window_spent.checked_add(captured)?;
                c.lifetime_spent = c.lifetime_spent.checked_add(captured)?;
            }
        }
        Some(c)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn m(s: &str) -> Micros {
        Micros::parse(s).unwrap()
    }

    fn member(cap: &str, per_tx: &str, lifetime: Option<&str>) -> ChainMember {
        ChainMember {
            limits: AgentLimits {
                spending_cap: m(cap),
                window_ms: 1_000,
                per_tx_limit: m(per_tx),
                lifetime_cap: lifetime.map(m),
                created_ms: 0,
            },
            counters: Counters::default(),
        }
    }

    #[test]
    fn limits_in_order() {
        let mut a = member("10", "5", Some("12"));
        assert_eq!(authorize(&[a.clone()], m("5.000001")), Err(DenyReason::PerTxLimit));
        a.counters.window_spent = m("6");
        a.counters.lifetime_spent = m("6");
        assert_eq!(authorize(&[a.clone()], m("4")), Ok(()));
        assert_eq!(authorize(&[a.clone()], m("4.000001")), Err(DenyReason::SpendingCap));
        a.counters.held = m("1");
        assert_eq!(authorize(&[a.clone()], m("3.000001")), Err(DenyReason::SpendingCap));
        // A new window forgets window spend but not lifetime spend or holds.
        let next = Counters { ..a.counters }.at(&a.limits, 1_000);
        assert_eq!(next.window_spent, Micros::ZERO);
        a.counters = next;
        assert_eq!(authorize(&[a.clone()], m("5")), Ok(()));
        a.counters.lifetime_spent = m("7");
        assert_eq!(authorize(&[a.clone()], m("4.5")), Err(DenyReason::LifetimeCap));
    }

    #[test]
    fn room_is_the_most_that_still_fits() {
        let mut a = member("10", "100", Some("12"));
        let mut parent = member("20", "100", None);
        a.counters.window_spent = m("3");
        a.counters.lifetime_spent = m("5");
        a.counters.held = m("1");
        parent.counters.window_spent = m("13.5");
        parent.counters.held = m("1");
        for (chain, want) in [(vec![a.clone()], m("6")), (vec![a.clone(), parent.clone()], m("5.5"))] {
            let r = room(&chain);
            assert_eq!(r, want);
            assert_eq!(authorize(&chain, r), Ok(()));
            assert!(authorize(&chain, r.checked_add(m("0.000001")).unwrap()).is_err());
        }
        a.counters.held = m("11");
        assert_eq!(room(&[a]), Micros::ZERO);
    }

    #[test]
    fn ancestors_bound_children() {
        let child = member("10", "10", None);
        let mut parent = member("10", "10", None);
        parent.counters.window_spent = m("9");
        assert_eq!(authorize(&[child.clone(), parent.clone()], m("2")), Err(DenyReason::AncestorCap));
        assert_eq!(authorize(&[child, parent], m("1")), Ok(()));
    }

    #[test]
    fn prechecks_in_contract_order() {
        let scopes = ScopeSet::parse(&["a:b"]).unwrap();
        let want = Scope::parse("a:c").unwrap();
        let rl = RateLimit { requests: 1, per_ms: 1_000 };
        let mut c = SpendCheck {
            revoked: true,
            key_expires_ms: Some(0),
            suspended: true,
            scopes: &scopes,
            scope: Some(&want),
            rate: Some((rl, 10_000)),
        };
        assert_eq!(precheck(&c, 5), Err(DenyReason::CredentialRevoked));
        c.revoked = false;
        assert_eq!(precheck(&c, 5), Err(DenyReason::CredentialExpired));
        c.key_expires_ms = None;
        assert_eq!(precheck(&c, 5), Err(DenyReason::AgentSuspended));
        c.suspended = false;
        assert_eq!(precheck(&c, 5), Err(DenyReason::ScopeNotGranted));
        c.scope = None;
        assert!(matches!(precheck(&c, 5), Err(DenyReason::RateLimited { .. })));
        c.rate = Some((rl, 0));
        assert_eq!(precheck(&c, 5), Ok(Some(1_005)));
    }

    #[test]
    fn settle_moves_held_to_spent() {
        let c = Counters { held: m("1"), ..Default::default() };
        let s = c.apply(Movement::Settle { held: m("1"), captured: m("0.4") }).unwrap();
        assert_eq!((s.held, s.window_spent, s.lifetime_spent), (Micros::ZERO, m("0.4"), m("0.4")));
        assert_eq!(c.apply(Movement::Settle { held: m("1"), captured: m("2") }), None);
        assert_eq!(Counters::default().apply(Movement::Settle { held: m("1"), captured: m("0") }), None);
    }
}

/// The most an agent with these limits can spend in one day: its cap once per window, a window
/// of a day or more counting as one cap per day (rounded up, never in the agent's favour), and
/// never more than its lifetime cap.
pub fn max_spend_per_day(limits: &AgentLimits) -> Micros {
    const DAY_MS: i128 = 86_400_000;
    let cap = i128::from(limits.spending_cap.micros());
    let window = i128::from(limits.window_ms.max(1));
    let per_day = if window >= DAY_MS { cap } else { (cap * DAY_MS + window - 1) / window };
    let per_day = i64::try_from(per_day).unwrap_or(i64::MAX);
    let per_day = Micros::from_micros(per_day).unwrap_or(Micros::ZERO);
    match limits.lifetime_cap {
        Some(l) if l < per_day => l,
        _ => per_day,
    }
}

#[cfg(test)]
mod blast_tests {
    use super::*;

    fn limits(cap: i64, window_ms: i64, lifetime: Option<i64>) -> AgentLimits {
        AgentLimits {
            spending_cap: Micros::from_micros(cap).unwrap(),
            window_ms,
            per_tx_limit: Micros::from_micros(cap).unwrap(),
            lifetime_cap: lifetime.map(|l| Micros::from_micros(l).unwrap()),
            created_ms: 0,
        }
    }

    #[test]
    fn per_day_normalisation() {
        assert_eq!(max_spend_per_day(&limits(2_000_000, 86_400_000, None)).micros(), 2_000_000);
        assert_eq!(max_spend_per_day(&limits(2_000_000, 3_600_000, None)).micros(), 48_000_000);
        assert_eq!(max_spend_per_day(&limits(2_000_000, 7 * 86_400_000, None)).micros(), 2_000_000);
        assert_eq!(max_spend_per_day(&limits(2_000_000, 3_600_000, Some(5_000_000))).micros(), 5_000_000);
        // 1 micro per 7 hours: rounds up.
        assert_eq!(max_spend_per_day(&limits(1, 7 * 3_600_000, None)).micros(), 4);
    }
}
