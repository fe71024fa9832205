//! The runaway-loop breaker's two optional triggers, each with O(1) state kept in the agent row:
//!
//! - **request rate**: more than `max_requests` requests within `window_ms` — a GCRA (leaky
//!   bucket, as in [`crate::ratelimit`]) whose overflow trips the breaker instead of refusing;
//! - **repeats**: the same request `repeats` times in a row within `window_ms` of the first —
//!   a short fingerprint of the last request, how many times in a row it came, and since when.
//!
//! Both are pure: the caller hands in `now_ms` and the stored state and keeps what comes back.
//! The settings of all three triggers (the denial window among them) are [`Breaker`], with an
//! agent's own [`BreakerOverride`] over the configured defaults.

use sha2::{Digest, Sha256};

/// The runaway-loop breaker: `denials` denials within `window_ms` suspend the agent; so do,
/// when turned on, more than `max_requests` spend/hold requests within `rate_window_ms`, and
/// the same request `repeats` times in a row within `repeat_window_ms`. A count of 0 turns its
/// trigger off; the two optional triggers are off by default.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Breaker {
    pub denials: i64,
    pub window_ms: i64,
    pub max_requests: i64,
    pub rate_window_ms: i64,
    pub repeats: i64,
    pub repeat_window_ms: i64,
}

impl Default for Breaker {
    fn default() -> Self {
        Breaker {
            denials: 50,
            window_ms: 60_000,
            max_requests: 0,
            rate_window_ms: 60_000,
            repeats: 0,
            repeat_window_ms: 60_000,
        }
    }
}

/// One agent's breaker settings: each field set overrides the config's, each `None` follows it.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct BreakerOverride {
    pub denials: Option<i64>,
    pub window_ms: Option<i64>,
    pub max_requests: Option<i64>,
    pub rate_window_ms: Option<i64>,
    pub repeats: Option<i64>,
    pub repeat_window_ms: Option<i64>,
}

impl BreakerOverride {
    /// These settings, each unset one taken from `other`.
    pub fn or(self, other: BreakerOverride) -> BreakerOverride {
        BreakerOverride {
            denials: self.denials.or(other.denials),
            window_ms: self.window_ms.or(other.window_ms),
            max_requests: self.max_requests.or(other.max_requests),
            rate_window_ms: self.rate_window_ms.or(other.rate_window_ms),
            repeats: self.repeats.or(other.repeats),
            repeat_window_ms: self.repeat_window_ms.or(other.repeat_window_ms),
        }
    }

    /// These settings over `default`.
    pub fn over(self, default: Breaker) -> Breaker {
        Breaker {
            denials: self.denials.unwrap_or(default.denials),
            window_ms: self.window_ms.unwrap_or(default.window_ms),
            max_requests: self.max_requests.unwrap_or(default.max_requests),
            rate_window_ms: self.rate_window_ms.unwrap_or(default.rate_window_ms),
            repeats: self.repeats.unwrap_or(default.repeats),
            repeat_window_ms: self.repeat_window_ms.unwrap_or(default.repeat_window_ms),
        }
    }
}

/// One denial fed to the breaker's denial trigger, a true sliding window: `recent` holds the
/// times of the agent's last denials (oldest first, at most `denials` of them). Returns the new
/// list and whether all `denials` of them now fall within `window_ms` of this one (it trips).
/// `denials` must be positive (0 turns the trigger off: do not call this).
pub fn denial_step(recent: &[i64], denials: i64, window_ms: i64, now_ms: i64) -> (Vec<i64>, bool) {
    let mut kept: std::collections::VecDeque<i64> = recent.iter().copied().collect();
    kept.push_back(now_ms);
    while kept.front().is_some_and(|t| now_ms - *t >= window_ms) {
        kept.pop_front();
    }
    while kept.len() as i64 > denials {
        kept.pop_front();
    }
    let tripped = kept.len() as i64 >= denials;
    (kept.into(), tripped)
}

/// The largest `max_requests` accepted (0 turns the rate trigger off).
pub const MAX_REQUESTS_MAX: i64 = 1_000_000;
/// The largest `repeats` accepted (0 turns the repeat trigger off; 1 would trip on anything).
pub const REPEATS_MAX: i64 = 10_000;

/// Checks `max_requests` and `repeats` as written in a config or request body.
pub fn check_counts(max_requests: Option<i64>, repeats: Option<i64>) -> Result<(), String> {
    if max_requests.is_some_and(|m| !(0..=MAX_REQUESTS_MAX).contains(&m)) {
        return Err(format!("max_requests must be between 0 (off) and {MAX_REQUESTS_MAX}"));
    }
    if repeats.is_some_and(|r| r != 0 && !(2..=REPEATS_MAX).contains(&r)) {
        return Err(format!("repeats must be 0 (off) or between 2 and {REPEATS_MAX}"));
    }
    Ok(())
}

/// One step of the request-rate trigger at `now_ms`, given the stored TAT in **microseconds**
/// (0 for a fresh bucket). Returns the new TAT and whether this request overflowed the bucket.
///
/// The bucket holds `max_requests` requests and drains at `max_requests` per `window_ms`, so a
/// burst of exactly `max_requests` never trips and the one after it does. Microseconds keep
/// the drain interval exact enough for any `max_requests` up to a million per second.
pub fn rate_step(max_requests: i64, window_ms: i64, tat_us: i64, now_ms: i64) -> (i64, bool) {
    let max = max_requests.max(1);
    let interval = (window_ms.max(1).saturating_mul(1000) / max).max(1);
    let tolerance = interval.saturating_mul(max);
    let now_us = now_ms.saturating_mul(1000);
    let new_tat = tat_us.max(now_us).saturating_add(interval);
    let tripped = new_tat - tolerance > now_us;
    (new_tat, tripped)
}

/// The repeat trigger's state: the last request's fingerprint, how many times in a row it came
/// (within the window) and when the first of them came.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Repeats {
    pub hash: String,
    pub count: i64,
    pub since_ms: i64,
}

/// One step of the repeat trigger: `fingerprint` arrives at `now_ms`. A different request, or
/// one more than `window_ms` after the first of the run, starts a new run of one. Trips when the
/// run reaches `repeats`.
pub fn repeat_step(repeats: i64, window_ms: i64, state: &Repeats, fingerprint: &str, now_ms: i64) -> (Repeats, bool) {
    let next = if state.count > 0 && state.hash == fingerprint && now_ms - state.since_ms < window_ms {
        Repeats { hash: state.hash.clone(), count: state.count.saturating_add(1), since_ms: state.since_ms }
    } else {
        Repeats { hash: fingerprint.to_owned(), count: 1, since_ms: now_ms }
    };
    let tripped = next.count >= repeats.max(1);
    (next, tripped)
}

/// A short (64-bit, hex) fingerprint of a money request: action, scope, amount and memo.
pub fn fingerprint(action: &str, scope: &str, amount_micros: i64, memo: Option<&str>) -> String {
    // Action, scope and amount never contain a newline; the memo comes last, marked present or
    // absent, so no two distinct requests encode alike.
    let memo = match memo {
        Some(m) => format!("+{m}"),
        None => "-".to_owned(),
    };
    let digest = Sha256::digest(format!("{action}\n{scope}\n{amount_micros}\n{memo}").as_bytes());
    hex::encode(&digest[..8])
}

#[cfg(test)]
mod tests {
    use super::*;

    const T: i64 = 1_700_000_000_000;

    #[test]
    fn the_denial_window_slides() {
        // Three denials within 10 s trip; older ones fall out of the window.
        let (recent, trip) = denial_step(&[], 3, 10_000, T);
        assert_eq!((recent.as_slice(), trip), (&[T][..], false));
        let (recent, trip) = denial_step(&recent, 3, 10_000, T + 9_000);
        assert!(!trip);
        let (recent, trip) = denial_step(&recent, 3, 10_000, T + 10_000);
        assert_eq!((recent.as_slice(), trip), (&[T + 9_000, T + 10_000][..], false), "the first fell out");
        let (recent, trip) = denial_step(&recent, 3, 10_000, T + 12_000);
        assert_eq!((recent.as_slice(), trip), (&[T + 9_000, T + 10_000, T + 12_000][..], true));
        // At most `denials` times are kept.
        let (recent, _) = denial_step(&recent, 3, 10_000, T + 13_000);
        assert_eq!(recent.len(), 3);
        assert!(denial_step(&[], 1, 10_000, T).1, "one denial trips a breaker of one");
    }

    fn burst(max: i64, window: i64, n: usize, at: i64, mut tat: i64) -> (i64, Vec<bool>) {
        let mut trips = Vec::new();
        for _ in 0..n {
            let (t, tripped) = rate_step(max, window, tat, at);
            tat = t;
            trips.push(tripped);
        }
        (tat, trips)
    }

    #[test]
    fn rate_trips_on_the_request_after_max_and_not_before() {
        for (max, window) in [(1, 1_000), (3, 3_000), (7, 1_000), (100, 60_000), (5_000, 1_000)] {
            let (_, trips) = burst(max, window, max as usize + 1, T, 0);
            assert!(trips[..max as usize].iter().all(|t| !t), "{max}/{window}: tripped early");
            assert!(trips[max as usize], "{max}/{window}: request {} did not trip", max + 1);
        }
    }

    #[test]
    fn rate_drains_at_max_per_window() {
        // 10 per 10 s: a full bucket frees one slot per second.
        let (tat, trips) = burst(10, 10_000, 10, T, 0);
        assert!(trips.iter().all(|t| !t));
        assert!(rate_step(10, 10_000, tat, T + 999).1);
        let (tat, tripped) = rate_step(10, 10_000, tat, T + 1_000);
        assert!(!tripped);
        assert!(rate_step(10, 10_000, tat, T + 1_000).1);
        // A steady max per window, forever, never trips.
        let mut tat = 0;
        for i in 0..1_000 {
            let (t, tripped) = rate_step(10, 10_000, tat, T + i * 1_000);
            assert!(!tripped, "request {i}");
            tat = t;
        }
        // After a quiet window the bucket is empty again.
        let (_, trips) = burst(10, 10_000, 10, T + 2_000_000, tat);
        assert!(trips.iter().all(|t| !t));
    }

    #[test]
    fn repeats_trip_on_n_identical_in_a_row_within_the_window() {
        let a = fingerprint("spend", "pay:x", 1_000_000, None);
        let mut s = Repeats::default();
        for i in 1..=4 {
            let (n, tripped) = repeat_step(5, 60_000, &s, &a, T + i);
            assert_eq!((n.count, tripped), (i, false));
            s = n;
        }
        let (n, tripped) = repeat_step(5, 60_000, &s, &a, T + 5);
        assert!(tripped);
        assert_eq!((n.count, n.since_ms), (5, T + 1));
    }

    #[test]
    fn a_different_request_or_an_old_run_starts_over() {
        let a = fingerprint("spend", "pay:x", 1, None);
        let b = fingerprint("spend", "pay:x", 2, None);
        let mut s = Repeats::default();
        for i in 0..20 {
            let f = if i % 2 == 0 { &a } else { &b };
            let (n, tripped) = repeat_step(2, 60_000, &s, f, T + i);
            assert!(!tripped && n.count == 1);
            s = n;
        }
        let (s, _) = repeat_step(3, 60_000, &Repeats::default(), &a, T);
        let (s, _) = repeat_step(3, 60_000, &s, &a, T + 59_999);
        assert_eq!(s.count, 2);
        let (s, tripped) = repeat_step(3, 60_000, &s, &a, T + 60_000);
        assert_eq!((s.count, s.since_ms, tripped), (1, T + 60_000, false));
    }

    #[test]
    fn counts_are_checked() {
        assert!(check_counts(None, None).is_ok());
        assert!(check_counts(Some(0), Some(0)).is_ok());
        assert!(check_counts(Some(MAX_REQUESTS_MAX), Some(2)).is_ok());
        assert!(check_counts(Some(-1), None).is_err());
        assert!(check_counts(Some(MAX_REQUESTS_MAX + 1), None).is_err());
        assert!(check_counts(None, Some(1)).is_err());
        assert!(check_counts(None, Some(REPEATS_MAX + 1)).is_err());
    }

    #[test]
    fn fingerprints_tell_every_field_apart() {
        let base = fingerprint("spend", "pay:x", 1, Some("m"));
        assert_eq!(base.len(), 16);
        assert_eq!(base, fingerprint("spend", "pay:x", 1, Some("m")));
        for other in [
            fingerprint("hold", "pay:x", 1, Some("m")),
            fingerprint("spend", "pay:y", 1, Some("m")),
            fingerprint("spend", "pay:x", 2, Some("m")),
            fingerprint("spend", "pay:x", 1, Some("n")),
            fingerprint("spend", "pay:x", 1, None),
            fingerprint("spend", "pay:x", 1, Some("")),
        ] {
            assert_ne!(base, other);
        }
        assert_ne!(fingerprint("spend", "pay:x", 1, None), fingerprint("spend", "pay:x", 1, Some("")));
    }
}
