//! Per-agent request rate limiting with GCRA (the generic cell rate algorithm).
//!
//! The whole state of a limiter is one number, the theoretical arrival time (TAT), which the store
//! keeps in the agent's row so that every replica enforces one shared limit.

/// `requests` per `per_ms`, with a burst of `requests`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RateLimit {
    pub requests: i64,
    pub per_ms: i64,
}

impl RateLimit {
    /// The time one request takes out of the bucket.
    pub fn interval_ms(self) -> i64 {
        (self.per_ms / self.requests.max(1)).max(1)
    }
}

/// Takes up to `n` requests at once at `now_ms` (as `n` calls of [`gcra`] would): returns how
/// many were admitted and the new TAT.
pub fn take(limit: RateLimit, tat_ms: i64, now_ms: i64, n: u64) -> (u64, i64) {
    let mut tat = tat_ms;
    let mut got = 0;
    while got < n {
        match gcra(limit, tat, now_ms) {
            Ok(t) => {
                tat = t;
                got += 1;
            }
            Err(_) => break,
        }
    }
    (got, tat)
}

/// Gives back `n` requests that were taken and never made. A TAT at or before now already
/// means a full bucket, so the bucket never holds more than its burst.
pub fn refund(limit: RateLimit, tat_ms: i64, n: u64) -> i64 {
    let back = limit.interval_ms().saturating_mul(i64::try_from(n).unwrap_or(i64::MAX));
    tat_ms.saturating_sub(back)
}

/// Checks one request at `now_ms` against the stored TAT.
///
/// `Ok(new_tat)` admits it; `Err(retry_after_ms)` refuses it and leaves the TAT as it was.
pub fn gcra(limit: RateLimit, tat_ms: i64, now_ms: i64) -> Result<i64, i64> {
    let interval = limit.interval_ms();
    let burst = limit.per_ms;
    let tat = tat_ms.max(now_ms);
    let new_tat = tat + interval;
    let allow_at = new_tat - burst;
    if allow_at <= now_ms { Ok(new_tat) } else { Err(allow_at - now_ms) }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn take_admits_what_the_bucket_holds_and_refund_gives_it_back() {
        let l = RateLimit { requests: 10, per_ms: 1_000 };
        let (got, tat) = take(l, 0, 5_000, 25);
        assert_eq!(got, 10, "the burst is the limit");
        assert!(gcra(l, tat, 5_000).is_err());
        // Seven never used: exactly seven more are admitted at once.
        let back = refund(l, tat, 7);
        let (again, _) = take(l, back, 5_000, 25);
        assert_eq!(again, 7);
        // Refunding more than was taken never makes the bucket larger than its burst.
        let (full, _) = take(l, refund(l, back, 1_000), 5_000, 25);
        assert_eq!(full, 10);
    }

    #[test]
    fn burst_then_steady_rate() {
        let l = RateLimit { requests: 3, per_ms: 3_000 };
        let mut tat = 0;
        for _ in 0..3 {
            tat = gcra(l, tat, 10_000).unwrap();
        }
        let retry = gcra(l, tat, 10_000).unwrap_err();
        assert_eq!(retry, 1_000);
        assert!(gcra(l, tat, 10_999).is_err());
        assert!(gcra(l, tat, 11_000).is_ok());
    }
}
