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

/// Checks one request at `now_ms` against the stored TAT.
///
/// `Ok(new_tat)` admits it; `Err(retry_after_ms)` refuses it and leaves the TAT as it was.
pub fn gcra(limit: RateLimit, tat_ms: i64, now_ms: i64) -> Result<i64, i64> {
    let interval = (limit.per_ms / limit.requests.max(1)).max(1);
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
