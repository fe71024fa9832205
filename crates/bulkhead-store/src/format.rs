//! How stored numbers read: times as RFC 3339, amounts as `Micros`, durations as `Span`s. A leaf:
//! it imports nothing of this crate, so every module may use it.

use bulkhead_core::{Micros, Span};
use time::OffsetDateTime;
use time::format_description::well_known::Rfc3339;

/// Renders Unix milliseconds as RFC 3339 (UTC, millisecond precision).
pub fn fmt_time(ms: i64) -> String {
    let t = OffsetDateTime::from_unix_timestamp_nanos(i128::from(ms) * 1_000_000).unwrap_or(OffsetDateTime::UNIX_EPOCH);
    let t = t.replace_nanosecond((ms.rem_euclid(1000) as u32) * 1_000_000).unwrap_or(t);
    t.format(&Rfc3339).unwrap_or_default()
}

pub(crate) fn micros(v: i64) -> Micros {
    // Stored amounts are written only from `Micros`; a negative one is a corrupt row, shown as 0
    // here and refused by the ledger's arithmetic.
    Micros::from_micros(v).unwrap_or(Micros::ZERO)
}

/// Milliseconds written as a `Span` (`60000` → `"60s"`).
pub(crate) fn span_text(ms: i64) -> String {
    Span::from_secs(ms / 1000).map(|s| s.to_string()).unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn times_render_rfc3339_utc() {
        assert_eq!(fmt_time(0), "1970-01-01T00:00:00Z");
        assert_eq!(fmt_time(1_700_000_000_123), "2023-11-14T22:13:20.123Z");
    }
}
