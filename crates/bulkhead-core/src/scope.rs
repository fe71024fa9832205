//! Scopes: `resource:action` strings of `a-z 0-9 _ - .`, where `*` may stand for a whole segment.
//!
//! A request names one concrete scope; an agent holds patterns. Nothing is inherited: a request is
//! granted only when one of the agent's own patterns matches it.

use std::fmt;

/// The longest scope accepted.
pub const SCOPE_LEN_MAX: usize = 128;
/// The most scopes one agent may hold.
pub const SCOPES_PER_AGENT_MAX: usize = 64;

fn check_segment(seg: &str, wildcard_ok: bool) -> bool {
    if wildcard_ok && seg == "*" {
        return true;
    }
    !seg.is_empty()
        && seg.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || matches!(b, b'_' | b'-' | b'.'))
}

/// A granted scope pattern: `payments:write`, `read:*`, `*:read` or `*`.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ScopePattern(String);

/// A concrete scope named by a request (no wildcards).
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Scope(String);

impl ScopePattern {
    pub fn parse(s: &str) -> Result<ScopePattern, String> {
        if s == "*" {
            return Ok(ScopePattern(s.into()));
        }
        if s.len() > SCOPE_LEN_MAX {
            return Err(format!("a scope has at most {SCOPE_LEN_MAX} characters"));
        }
        match s.split_once(':') {
            Some((r, a)) if check_segment(r, true) && check_segment(a, true) => Ok(ScopePattern(s.into())),
            _ => {
                Err(format!("{s:?} is not a scope of the form resource:action (a-z 0-9 _ - ., '*' as a whole segment)"))
            }
        }
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    pub fn is_wildcard(&self) -> bool {
        self.0.contains('*')
    }

    fn segments(&self) -> (&str, &str) {
        if self.0 == "*" { ("*", "*") } else { self.0.split_once(':').unwrap_or(("", "")) }
    }

    /// Does this pattern grant the concrete scope?
    pub fn matches(&self, scope: &Scope) -> bool {
        let (pr, pa) = self.segments();
        let (r, a) = scope.segments();
        (pr == "*" || pr == r) && (pa == "*" || pa == a)
    }

    /// Does this pattern grant everything `other` grants? (Used to stop scope escalation.)
    pub fn covers(&self, other: &ScopePattern) -> bool {
        let (pr, pa) = self.segments();
        let (or, oa) = other.segments();
        (pr == "*" || pr == or) && (pa == "*" || pa == oa)
    }
}

impl Scope {
    pub fn parse(s: &str) -> Result<Scope, String> {
        if s.len() > SCOPE_LEN_MAX {
            return Err(format!("a scope has at most {SCOPE_LEN_MAX} characters"));
        }
        match s.split_once(':') {
            Some((r, a)) if check_segment(r, false) && check_segment(a, false) => Ok(Scope(s.into())),
            _ => Err(format!("{s:?} is not a scope of the form resource:action (a-z 0-9 _ - .)")),
        }
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    fn segments(&self) -> (&str, &str) {
        self.0.split_once(':').unwrap_or(("", ""))
    }
}

impl fmt::Display for Scope {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// The set of patterns an agent holds.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ScopeSet(Vec<ScopePattern>);

impl ScopeSet {
    /// Parses and de-duplicates a list of patterns, keeping the order they were given in.
    pub fn parse<S: AsRef<str>>(items: &[S]) -> Result<ScopeSet, String> {
        if items.len() > SCOPES_PER_AGENT_MAX {
            return Err(format!("an agent holds at most {SCOPES_PER_AGENT_MAX} scopes"));
        }
        let mut v: Vec<ScopePattern> = Vec::with_capacity(items.len());
        for item in items {
            let p = ScopePattern::parse(item.as_ref())?;
            if !v.contains(&p) {
                v.push(p);
            }
        }
        Ok(ScopeSet(v))
    }

    pub fn grants(&self, scope: &Scope) -> bool {
        self.0.iter().any(|p| p.matches(scope))
    }

    /// Every pattern of `child` is covered by some pattern of `self`.
    pub fn covers_all(&self, child: &ScopeSet) -> bool {
        child.0.iter().all(|c| self.0.iter().any(|p| p.covers(c)))
    }

    pub fn patterns(&self) -> &[ScopePattern] {
        &self.0
    }

    pub fn has_wildcard(&self) -> bool {
        self.0.iter().any(ScopePattern::is_wildcard)
    }

    pub fn to_strings(&self) -> Vec<String> {
        self.0.iter().map(|p| p.0.clone()).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn set(v: &[&str]) -> ScopeSet {
        ScopeSet::parse(v).unwrap()
    }
    fn s(v: &str) -> Scope {
        Scope::parse(v).unwrap()
    }

    #[test]
    fn matching() {
        let cases: &[(&[&str], &str, bool)] = &[
            (&["payments:write"], "payments:write", true),
            (&["payments:write"], "payments:read", false),
            (&["read:*"], "read:external-apis", true),
            (&["read:*"], "write:x", false),
            (&["*:read"], "invoices:read", true),
            (&["*"], "anything:at-all", true),
            (&[], "a:b", false),
        ];
        for (granted, req, want) in cases {
            assert_eq!(set(granted).grants(&s(req)), *want, "{granted:?} {req}");
        }
    }

    #[test]
    fn covering() {
        assert!(set(&["read:*"]).covers_all(&set(&["read:x", "read:*"])));
        assert!(!set(&["read:x"]).covers_all(&set(&["read:*"])));
        assert!(set(&["*"]).covers_all(&set(&["*:read", "a:b"])));
        assert!(!set(&["*:read"]).covers_all(&set(&["*"])));
        assert!(set(&["a:b"]).covers_all(&set(&[])));
    }

    #[test]
    fn parsing() {
        for bad in ["", "a", "a:", ":b", "A:b", "a:b:c", "a b:c", "re*:x", "a:*x", "*:", "**"] {
            assert!(ScopePattern::parse(bad).is_err(), "{bad:?}");
        }
        assert!(Scope::parse("read:*").is_err());
        assert!(Scope::parse("*").is_err());
        assert_eq!(set(&["b:c", "a:b", "b:c"]).to_strings(), vec!["b:c", "a:b"]);
    }

    proptest::proptest! {
        #[test]
        fn parsers_never_panic(s in "\\PC{0,80}") {
            let _ = ScopePattern::parse(&s);
            let _ = Scope::parse(&s);
        }

        #[test]
        fn a_pattern_grants_what_it_covers(r in "[a-z*]{1,3}", a in "[a-z*]{1,3}", r2 in "[a-z]{1,3}", a2 in "[a-z]{1,3}") {
            // Whenever a pattern covers a concrete scope (as a pattern), it also grants it.
            if let (Ok(p), Ok(c)) = (ScopePattern::parse(&format!("{r}:{a}")), Scope::parse(&format!("{r2}:{a2}"))) {
                let as_pattern = ScopePattern::parse(c.as_str()).unwrap();
                proptest::prop_assert_eq!(p.covers(&as_pattern), p.matches(&c));
            }
        }
    }
}
