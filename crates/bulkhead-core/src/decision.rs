//! The spend decision: may this amount be spent (or held) by this agent now?
//!
//! The store loads an agent's chain (the agent, then each ancestor up to the root) inside its
//! transaction, calls [`decide`] and, on `Allow`, applies the matching counter change from this
//! module. Checks run in the contract's order: credentials, suspension and scope, rate limit,
//! limits.

use crate::duration::window_at;
use crate::money::Micros;
use crate::ratelimit::{RateLimit, gcra};
use crate::runaway::Breaker;
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
    /// The agent already has as many open holds as one agent may have.
    TooManyOpenHolds,
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
            DenyReason::TooManyOpenHolds => "too_many_open_holds",
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
            DenyReason::TooManyOpenHolds => {
                "The agent has as many open holds as it may have; capture or release one first."
            }
            DenyReason::AncestorCap => {
                "The amount would exceed a limit of one of the agent's ancestors; nothing was charged."
            }
        }
    }

    /// Whether this denial counts towards the runaway-loop breaker's denials: refused
    /// credentials and suspension do not (they are not the agent looping on a limit).
    pub fn feeds_breaker(self) -> bool {
        !matches!(
            self,
            DenyReason::InvalidCredentials
                | DenyReason::CredentialRevoked
                | DenyReason::CredentialExpired
                | DenyReason::AgentSuspended
        )
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
            "too_many_open_holds" => DenyReason::TooManyOpenHolds,
            _ => return None,
        })
    }
}

impl Counters {
    /// The counters as they stand at `now_ms`: a new window starts with nothing spent. Windows
    /// only move forward: a clock that steps back into an earlier window (or a replica whose
    /// clock is behind) finds the latest window's spend, never an empty earlier one.
    pub fn at(self, limits: &AgentLimits, now_ms: i64) -> Counters {
        let (k, _, _) = window_at(limits.created_ms, limits.window_ms, now_ms);
        if k > self.window_index { Counters { window_index: k, window_spent: Micros::ZERO, ..self } } else { self }
    }
}

/// One agent of a chain as the ordered checks see it. A chain lists the calling agent first,
/// then each ancestor up to the root: an ancestor's revocation, key expiry, suspension, scopes
/// and rate limit bind every descendant (contract §12).
#[derive(Clone, Debug)]
pub struct Link {
    pub revoked: bool,
    pub key_expires_ms: Option<i64>,
    pub suspended: bool,
    pub scopes: ScopeSet,
    /// The agent's rate limit and its stored TAT.
    pub rate: Option<(RateLimit, i64)>,
}

/// Everything the ordered checks need to know about the calling agent and its ancestors.
#[derive(Clone, Debug)]
pub struct SpendCheck<'a> {
    /// The agent first, then each ancestor.
    pub chain: &'a [Link],
    /// The scope the request names; `None` for calls that need no scope (capture, release).
    pub scope: Option<&'a Scope>,
}

/// New rate-limiter states to store, as `(index in the chain, TAT)`.
pub type Taken = Vec<(usize, i64)>;

/// The credential check, the first of the contract's checks and the one every caller makes
/// (a money call before its idempotent replay, a settlement, a parent's revocation, the
/// breaker's triggers, `GET /v1/me`): no agent of the chain is revoked, and no key of the chain
/// has expired at `now_ms` (`key_expires_ms`: the earliest expiry of the chain).
pub fn credential(revoked: bool, key_expires_ms: Option<i64>, now_ms: i64) -> Result<(), DenyReason> {
    if revoked {
        return Err(DenyReason::CredentialRevoked);
    }
    if key_expires_ms.is_some_and(|t| now_ms >= t) {
        return Err(DenyReason::CredentialExpired);
    }
    Ok(())
}

/// [`credential`] over a whole chain.
pub fn chain_credential(chain: &[Link], now_ms: i64) -> Result<(), DenyReason> {
    credential(chain.iter().any(|l| l.revoked), earliest_expiry(chain), now_ms)
}

/// The earliest key expiry of a chain: when the agent's credential stops working.
pub fn earliest_expiry(chain: &[Link]) -> Option<i64> {
    chain.iter().filter_map(|l| l.key_expires_ms).min()
}

/// Checks credentials, suspension, scope and rate limit, in that order, over the whole chain:
/// the request passes each check only when every agent of the chain does. A request takes a
/// token from every rate limit of the chain, or from none when one of them refuses it.
pub fn precheck(c: &SpendCheck<'_>, now_ms: i64) -> Result<Taken, DenyReason> {
    chain_credential(c.chain, now_ms)?;
    if c.chain.iter().any(|l| l.suspended) {
        return Err(DenyReason::AgentSuspended);
    }
    if let Some(scope) = c.scope
        && !c.chain.iter().all(|l| l.scopes.grants(scope))
    {
        return Err(DenyReason::ScopeNotGranted);
    }
    let mut taken = Vec::new();
    let mut wait: Option<i64> = None;
    for (i, l) in c.chain.iter().enumerate() {
        if let Some((limit, tat)) = l.rate {
            match gcra(limit, tat, now_ms) {
                Ok(t) => taken.push((i, t)),
                Err(ms) => wait = Some(wait.map_or(ms, |w| w.max(ms))),
            }
        }
    }
    match wait {
        Some(retry_after_ms) => Err(DenyReason::RateLimited { retry_after_ms }),
        None => Ok(taken),
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

/// Full decision: prechecks, then limits. Returns the new rate-limiter states on `Allow`.
pub fn decide(c: &SpendCheck<'_>, chain: &[ChainMember], amount: Micros, now_ms: i64) -> Result<Taken, DenyReason> {
    let taken = precheck(c, now_ms)?;
    authorize(chain, amount)?;
    Ok(taken)
}

/// What a spend or hold comes to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Verdict {
    Allow,
    /// A shadow agent's movement that enforcement would deny: let through, and recorded as the
    /// denial it would have been.
    ShadowAllow(DenyReason),
    Deny(DenyReason),
}

/// Decides a spend or hold of `amount` by `chain[0]` (counters brought to `now_ms`): the
/// ordered checks, then every limit of the chain. A shadow agent is let through whatever they
/// say, except a revoked or expired credential, which is refused all the same.
///
/// Also returns the rate limiters' new states when the request took tokens: it keeps them even
/// when a limit then denies the request.
pub fn verdict(
    c: &SpendCheck<'_>,
    chain: &[ChainMember],
    amount: Micros,
    shadow: bool,
    now_ms: i64,
) -> (Verdict, Taken) {
    let credential_refused = |r: DenyReason| matches!(r, DenyReason::CredentialRevoked | DenyReason::CredentialExpired);
    let taken = match precheck(c, now_ms) {
        Ok(taken) => taken,
        Err(r) if shadow && !credential_refused(r) => return (Verdict::ShadowAllow(r), Vec::new()),
        Err(r) => return (Verdict::Deny(r), Vec::new()),
    };
    match authorize(chain, amount) {
        Ok(()) => (Verdict::Allow, taken),
        Err(r) if shadow => (Verdict::ShadowAllow(r), taken),
        Err(r) => (Verdict::Deny(r), taken),
    }
}

/// Why a parent may not create the child it asked for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Escalation {
    /// A scope of the child is not covered by the parent's.
    Scope,
    /// A cap or the per-transaction limit of the child is above the parent's (compared as
    /// amounts, whatever the windows), or the parent has a lifetime cap and the child none or a
    /// larger one.
    Cap,
    /// The child's rate limit, key expiry or breaker is looser than its parent's.
    Looser(Bound),
}

/// A setting a child may not have looser than its parent.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Bound {
    RateLimit,
    KeyExpiry,
    Breaker,
}

impl Bound {
    pub fn name(self) -> &'static str {
        match self {
            Bound::RateLimit => "rate limit",
            Bound::KeyExpiry => "key expiry",
            Bound::Breaker => "breaker",
        }
    }
}

/// What a child's settings may not loosen beside its scopes and caps (contract §12): a rate
/// limit, the key's expiry (the earliest of the parent's chain), the breaker.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Bounds {
    pub rate: Option<RateLimit>,
    pub expires_ms: Option<i64>,
    pub breaker: Breaker,
}

/// `a` per `a_ms` is at most `b` per `b_ms`, compared exactly.
fn rate_at_most(a: i64, a_ms: i64, b: i64, b_ms: i64) -> bool {
    i128::from(a) * i128::from(b_ms.max(1)) <= i128::from(b) * i128::from(a_ms.max(1))
}

/// A child's bounds against its parent's: a rate limit no faster and with no larger burst, an
/// expiry no later, and each breaker trigger the parent has on, on in the child and no more
/// lenient (no more events needed to trip, over no shorter a window).
pub fn bounds_check(parent: &Bounds, child: &Bounds) -> Result<(), Escalation> {
    if let Some(p) = parent.rate {
        let ok = child
            .rate
            .is_some_and(|c| c.requests <= p.requests && rate_at_most(c.requests, c.per_ms, p.requests, p.per_ms));
        if !ok {
            return Err(Escalation::Looser(Bound::RateLimit));
        }
    }
    if let Some(p) = parent.expires_ms
        && child.expires_ms.is_none_or(|c| c > p)
    {
        return Err(Escalation::Looser(Bound::KeyExpiry));
    }
    let (p, c) = (parent.breaker, child.breaker);
    let trigger_ok = |pn: i64, pw: i64, cn: i64, cw: i64| pn <= 0 || (cn > 0 && cn <= pn && cw >= pw);
    let rate_ok = p.max_requests <= 0
        || (c.max_requests > 0 && rate_at_most(c.max_requests, c.rate_window_ms, p.max_requests, p.rate_window_ms));
    if !trigger_ok(p.denials, p.window_ms, c.denials, c.window_ms)
        || !trigger_ok(p.repeats, p.repeat_window_ms, c.repeats, c.repeat_window_ms)
        || !rate_ok
    {
        return Err(Escalation::Looser(Bound::Breaker));
    }
    Ok(())
}

/// The child checks: a child gets no scope and no limit its parent does not have. Scopes are
/// checked first.
pub fn child_check(
    parent_scopes: &ScopeSet,
    parent: &AgentLimits,
    scopes: &ScopeSet,
    spending_cap: Micros,
    per_tx_limit: Micros,
    lifetime_cap: Option<Micros>,
) -> Result<(), Escalation> {
    if !parent_scopes.covers_all(scopes) {
        return Err(Escalation::Scope);
    }
    let lifetime_ok = match (parent.lifetime_cap, lifetime_cap) {
        (None, _) => true,
        (Some(_), None) => false,
        (Some(p), Some(c)) => c <= p,
    };
    if spending_cap > parent.spending_cap || per_tx_limit > parent.per_tx_limit || !lifetime_ok {
        return Err(Escalation::Cap);
    }
    Ok(())
}

/// How many slots a gateway lease adds to its first (which was decided like any hold): the
/// `slots - 1` asked for, at most as many `unit`s as `room` holds (all of them for a free
/// `unit`), and none when each call must be decided on its own (`one_by_one`: shadow agents,
/// agents not active, agents with a runaway trigger). The rate limit may cut it further.
pub fn lease_extra_slots(slots: u32, one_by_one: bool, room: Micros, unit: Micros) -> u64 {
    let extra = if one_by_one { 0 } else { u64::from(slots.saturating_sub(1)) };
    if extra == 0 || unit.is_zero() {
        return extra;
    }
    extra.min(u64::try_from(room.micros() / unit.micros()).unwrap_or(0))
}

/// `(window_spent + held) / spending_cap`. `None` for a zero cap with something used, which
/// has no finite ratio: its callers say what it counts as (the agent object shows 1.0; alert
/// thresholds see it as infinitely far past every threshold).
pub fn utilization(window_spent: Micros, held: Micros, spending_cap: Micros) -> Option<f64> {
    let used = window_spent.micros().saturating_add(held.micros());
    let cap = spending_cap.micros();
    if cap == 0 {
        return (used == 0).then_some(0.0);
    }
    Some(used as f64 / cap as f64)
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

    fn scopes(v: &[&str]) -> ScopeSet {
        ScopeSet::parse(v).unwrap()
    }

    fn link(set: &ScopeSet) -> Link {
        Link { revoked: false, key_expires_ms: None, suspended: false, scopes: set.clone(), rate: None }
    }

    #[test]
    fn credential_refuses_revoked_before_expired() {
        assert_eq!(credential(false, None, 10), Ok(()));
        assert_eq!(credential(false, Some(11), 10), Ok(()));
        assert_eq!(credential(false, Some(10), 10), Err(DenyReason::CredentialExpired));
        assert_eq!(credential(true, Some(10), 10), Err(DenyReason::CredentialRevoked));
    }

    #[test]
    fn verdicts_enforced_and_shadow() {
        let set = scopes(&["pay:write"]);
        let (pay, other) = (Scope::parse("pay:write").unwrap(), Scope::parse("read:x").unwrap());
        let chain = [member("10", "5", None)];
        let cases: [(&Scope, &str, bool, bool, Verdict); 8] = [
            (&pay, "5", false, false, Verdict::Allow),
            (&pay, "6", false, false, Verdict::Deny(DenyReason::PerTxLimit)),
            (&other, "1", false, false, Verdict::Deny(DenyReason::ScopeNotGranted)),
            (&pay, "1", false, true, Verdict::Deny(DenyReason::CredentialRevoked)),
            (&pay, "6", true, false, Verdict::ShadowAllow(DenyReason::PerTxLimit)),
            (&other, "6", true, false, Verdict::ShadowAllow(DenyReason::ScopeNotGranted)),
            (&pay, "1", true, false, Verdict::Allow),
            // A shadow agent's revoked credential is refused all the same.
            (&pay, "1", true, true, Verdict::Deny(DenyReason::CredentialRevoked)),
        ];
        for (scope, amount, shadow, revoked, want) in cases {
            let links = [Link { revoked, ..link(&set) }];
            let c = SpendCheck { chain: &links, scope: Some(scope) };
            assert_eq!(verdict(&c, &chain, m(amount), shadow, 0).0, want, "{scope:?} {amount} {shadow} {revoked}");
        }
    }

    #[test]
    fn a_denied_request_keeps_its_rate_token() {
        let set = scopes(&["pay:write"]);
        let pay = Scope::parse("pay:write").unwrap();
        let links = [Link { rate: Some((RateLimit { requests: 2, per_ms: 1_000 }, 0)), ..link(&set) }];
        let c = SpendCheck { chain: &links, scope: Some(&pay) };
        let (v, tat) = verdict(&c, &[member("1", "1", None)], m("2"), false, 100);
        assert_eq!(v, Verdict::Deny(DenyReason::PerTxLimit));
        assert_eq!(tat.len(), 1, "the request took a token");
        let revoked = [Link { revoked: true, ..links[0].clone() }];
        let c = SpendCheck { chain: &revoked, scope: Some(&pay) };
        let (v, tat) = verdict(&c, &[member("1", "1", None)], m("1"), false, 100);
        assert_eq!((v, tat), (Verdict::Deny(DenyReason::CredentialRevoked), vec![]));
    }

    #[test]
    fn children_get_nothing_their_parent_lacks() {
        let parent = member("10", "5", Some("100")).limits;
        let ps = scopes(&["read:*", "pay:write"]);
        let ok = |s: &[&str], cap: &str, tx: &str, life: Option<&str>| {
            child_check(&ps, &parent, &scopes(s), m(cap), m(tx), life.map(m))
        };
        assert_eq!(ok(&["read:x"], "10", "5", Some("100")), Ok(()));
        assert_eq!(ok(&["write:x"], "10", "5", Some("100")), Err(Escalation::Scope));
        assert_eq!(ok(&["write:x"], "11", "5", Some("100")), Err(Escalation::Scope), "scopes first");
        assert_eq!(ok(&["read:x"], "10.000001", "5", Some("100")), Err(Escalation::Cap));
        assert_eq!(ok(&["read:x"], "10", "5.000001", Some("100")), Err(Escalation::Cap));
        assert_eq!(ok(&["read:x"], "10", "5", None), Err(Escalation::Cap), "a lifetime cap binds the child");
        assert_eq!(ok(&["read:x"], "10", "5", Some("100.000001")), Err(Escalation::Cap));
        let free = member("10", "5", None).limits;
        assert_eq!(child_check(&ps, &free, &scopes(&["pay:write"]), m("1"), m("1"), None), Ok(()));
    }

    #[test]
    fn lease_sizes() {
        assert_eq!(lease_extra_slots(8, false, m("10"), m("1")), 7);
        assert_eq!(lease_extra_slots(8, false, m("3.5"), m("1")), 3);
        assert_eq!(lease_extra_slots(8, true, m("10"), m("1")), 0);
        assert_eq!(lease_extra_slots(0, false, m("10"), m("1")), 0);
        assert_eq!(lease_extra_slots(8, false, Micros::ZERO, Micros::ZERO), 7, "a free slot always fits");
    }

    #[test]
    fn utilization_of_zero_caps_has_no_ratio() {
        assert_eq!(utilization(m("1"), m("1"), m("4")), Some(0.5));
        assert_eq!(utilization(Micros::ZERO, Micros::ZERO, Micros::ZERO), Some(0.0));
        assert_eq!(utilization(m("1"), Micros::ZERO, Micros::ZERO), None);
        assert_eq!(utilization(Micros::ZERO, m("1"), Micros::ZERO), None);
    }

    /// Clocks (issue: tests that keep the promises): a wall clock that steps back into an earlier
    /// window never forgives what was spent in the later one.
    #[test]
    fn a_clock_stepping_back_never_reopens_a_window() {
        let mut a = member("10", "10", None);
        a.counters = Counters { window_index: 5, window_spent: m("9"), held: Micros::ZERO, lifetime_spent: m("9") };
        // 1,000 ms windows: now = 4,500 is window 4, before the one the counters are in.
        let back = a.counters.at(&a.limits, 4_500);
        assert_eq!(back, a.counters, "stepping back keeps the latest window's spend");
        a.counters = back;
        assert_eq!(authorize(&[a.clone()], m("2")), Err(DenyReason::SpendingCap));
        let forward = a.counters.at(&a.limits, 6_000);
        assert_eq!((forward.window_index, forward.window_spent), (6, Micros::ZERO), "forward, a new window");
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
        let mut l = Link {
            revoked: true,
            key_expires_ms: Some(0),
            suspended: true,
            scopes: scopes.clone(),
            rate: Some((rl, 10_000)),
        };
        let run = |l: &Link, scope: Option<&Scope>| precheck(&SpendCheck { chain: std::slice::from_ref(l), scope }, 5);
        assert_eq!(run(&l, Some(&want)), Err(DenyReason::CredentialRevoked));
        l.revoked = false;
        assert_eq!(run(&l, Some(&want)), Err(DenyReason::CredentialExpired));
        l.key_expires_ms = None;
        assert_eq!(run(&l, Some(&want)), Err(DenyReason::AgentSuspended));
        l.suspended = false;
        assert_eq!(run(&l, Some(&want)), Err(DenyReason::ScopeNotGranted));
        assert!(matches!(run(&l, None), Err(DenyReason::RateLimited { .. })));
        l.rate = Some((rl, 0));
        assert_eq!(run(&l, None), Ok(vec![(0, 1_005)]));
    }

    /// Finding 1 of the hardening review: whatever an ancestor may no longer do, its
    /// descendants may not do either.
    #[test]
    fn every_ancestor_binds_the_chain() {
        let wide = scopes(&["pay:write", "read:x"]);
        let pay = Scope::parse("pay:write").unwrap();
        let child = link(&wide);
        let check = |parent: Link| {
            let chain = [child.clone(), link(&wide), parent];
            precheck(&SpendCheck { chain: &chain, scope: Some(&pay) }, 100)
        };
        assert_eq!(check(link(&wide)), Ok(vec![]));
        assert_eq!(check(Link { suspended: true, ..link(&wide) }), Err(DenyReason::AgentSuspended));
        assert_eq!(check(Link { key_expires_ms: Some(100), ..link(&wide) }), Err(DenyReason::CredentialExpired));
        assert_eq!(check(Link { revoked: true, ..link(&wide) }), Err(DenyReason::CredentialRevoked));
        assert_eq!(check(link(&scopes(&["read:x"]))), Err(DenyReason::ScopeNotGranted));
        // The root's rate limit of 2 per minute admits two requests of the whole tree, then none.
        let rl = RateLimit { requests: 2, per_ms: 60_000 };
        let mut tat = 0;
        for _ in 0..2 {
            let taken = check(Link { rate: Some((rl, tat)), ..link(&wide) }).unwrap();
            assert_eq!(taken.len(), 1);
            assert_eq!(taken[0].0, 2, "the root's limiter took the token");
            tat = taken[0].1;
        }
        assert!(matches!(check(Link { rate: Some((rl, tat)), ..link(&wide) }), Err(DenyReason::RateLimited { .. })));
        assert_eq!(earliest_expiry(&[link(&wide), Link { key_expires_ms: Some(7), ..link(&wide) }]), Some(7));
    }

    #[test]
    fn a_child_is_bound_no_looser_than_its_parent() {
        let b = Breaker::default();
        let rl = |requests, per_ms| Some(RateLimit { requests, per_ms });
        let parent = Bounds { rate: rl(10, 60_000), expires_ms: Some(1_000), breaker: b };
        let ok = Bounds { rate: rl(5, 60_000), expires_ms: Some(900), breaker: b };
        assert_eq!(bounds_check(&parent, &ok), Ok(()));
        assert_eq!(bounds_check(&parent, &parent), Ok(()), "as tight as the parent is allowed");
        let looser = |c: Bounds| bounds_check(&parent, &c).unwrap_err();
        assert_eq!(looser(Bounds { rate: None, ..ok }), Escalation::Looser(Bound::RateLimit));
        assert_eq!(looser(Bounds { rate: rl(11, 60_000), ..ok }), Escalation::Looser(Bound::RateLimit));
        assert_eq!(looser(Bounds { rate: rl(10, 59_999), ..ok }), Escalation::Looser(Bound::RateLimit));
        assert_eq!(
            looser(Bounds { rate: rl(20, 120_000), ..ok }),
            Escalation::Looser(Bound::RateLimit),
            "a larger burst"
        );
        assert_eq!(looser(Bounds { expires_ms: None, ..ok }), Escalation::Looser(Bound::KeyExpiry));
        assert_eq!(looser(Bounds { expires_ms: Some(1_001), ..ok }), Escalation::Looser(Bound::KeyExpiry));
        let off = Breaker { denials: 0, ..b };
        assert_eq!(looser(Bounds { breaker: off, ..ok }), Escalation::Looser(Bound::Breaker));
        assert_eq!(looser(Bounds { breaker: Breaker { denials: 51, ..b }, ..ok }), Escalation::Looser(Bound::Breaker));
        assert_eq!(
            looser(Bounds { breaker: Breaker { window_ms: 59_999, ..b }, ..ok }),
            Escalation::Looser(Bound::Breaker)
        );
        let strict = Breaker { denials: 5, window_ms: 120_000, max_requests: 10, repeats: 3, ..b };
        assert_eq!(bounds_check(&parent, &Bounds { breaker: strict, ..ok }), Ok(()));
        let p2 = Bounds { breaker: strict, ..parent };
        assert_eq!(
            bounds_check(&p2, &Bounds { breaker: Breaker { max_requests: 0, ..strict }, ..ok }),
            Err(Escalation::Looser(Bound::Breaker))
        );
        assert_eq!(
            bounds_check(&p2, &Bounds { breaker: Breaker { repeats: 4, ..strict }, ..ok }),
            Err(Escalation::Looser(Bound::Breaker))
        );
        // A parent without limits binds nothing.
        let free = Bounds { rate: None, expires_ms: None, breaker: off };
        assert_eq!(bounds_check(&free, &Bounds { rate: None, expires_ms: None, breaker: off }), Ok(()));
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
    // Never above the largest amount: a per-day figure past it is shown as that, saturated.
    let per_day = i64::try_from(per_day).unwrap_or(i64::MAX);
    let per_day = Micros::from_micros(per_day).unwrap_or(Micros::ZERO).min(Micros::MAX);
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
