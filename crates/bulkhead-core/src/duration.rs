//! Durations and windows written as `<n>s|m|h|d` (`"24h"`, `"60s"`, `"30d"`).

use std::fmt;

/// The longest duration accepted anywhere: 100 years, so that `now + span` never overflows.
pub const SPAN_SECS_MAX: i64 = 100 * 365 * 86_400;

/// A positive whole number of seconds, remembered with the unit it was written in.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Span {
    count: i64,
    unit: char,
}

impl Span {
    pub fn parse(s: &str) -> Result<Span, String> {
        let err = || format!("{s:?} is not a duration such as \"30s\", \"5m\", \"24h\" or \"30d\"");
        let unit = s.chars().last().ok_or_else(err)?;
        if !matches!(unit, 's' | 'm' | 'h' | 'd') {
            return Err(err());
        }
        let digits = &s[..s.len() - 1];
        if digits.is_empty() || digits.len() > 12 || !digits.bytes().all(|b| b.is_ascii_digit()) {
            return Err(err());
        }
        let count: i64 = digits.parse().map_err(|_| err())?;
        let span = Span { count, unit };
        if count == 0 {
            return Err(format!("{s:?} must be longer than zero"));
        }
        if span.secs() > SPAN_SECS_MAX {
            return Err(format!("{s:?} is longer than 100 years"));
        }
        Ok(span)
    }

    /// Builds the written form of a number of seconds: the largest unit that divides it, except
    /// that a count of one is written in the next smaller unit (`86400` → `24h`, `60` → `60s`,
    /// `172800` → `2d`).
    pub fn from_secs(secs: i64) -> Option<Span> {
        if secs <= 0 || secs > SPAN_SECS_MAX {
            return None;
        }
        for (unit, mul) in [('d', 86_400), ('h', 3_600), ('m', 60)] {
            if secs % mul == 0 && secs / mul > 1 {
                return Some(Span { count: secs / mul, unit });
            }
        }
        // Exactly one of some unit: write it in the unit below.
        let (count, unit) = match secs {
            86_400 => (24, 'h'),
            3_600 => (60, 'm'),
            _ => (secs, 's'),
        };
        Some(Span { count, unit })
    }

    pub fn secs(self) -> i64 {
        self.count
            * match self.unit {
                's' => 1,
                'm' => 60,
                'h' => 3_600,
                _ => 86_400,
            }
    }

    pub fn millis(self) -> i64 {
        self.secs() * 1000
    }
}

impl fmt::Display for Span {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}{}", self.count, self.unit)
    }
}

/// The fixed window containing `now_ms` for an agent created at `anchor_ms`:
/// `[anchor + k·len, anchor + (k+1)·len)`. Returns `(k, start_ms, end_ms)`.
pub fn window_at(anchor_ms: i64, len_ms: i64, now_ms: i64) -> (i64, i64, i64) {
    debug_assert!(len_ms > 0);
    let k = (now_ms - anchor_ms).max(0) / len_ms;
    let start = anchor_ms + k * len_ms;
    (k, start, start + len_ms)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spans() {
        assert_eq!(Span::parse("24h").unwrap().secs(), 86_400);
        assert_eq!(Span::parse("60s").unwrap().to_string(), "60s");
        assert_eq!(Span::parse("30d").unwrap().secs(), 30 * 86_400);
        for bad in ["", "h", "0s", "-1h", "1.5h", "1w", "24", " 1h", "1H", "99999999999999d"] {
            assert!(Span::parse(bad).is_err(), "{bad:?}");
        }
        assert_eq!(Span::from_secs(86_400).unwrap().to_string(), "24h");
        assert_eq!(Span::from_secs(172_800).unwrap().to_string(), "2d");
        assert_eq!(Span::from_secs(60).unwrap().to_string(), "60s");
        assert_eq!(Span::from_secs(3_600).unwrap().to_string(), "60m");
        assert_eq!(Span::from_secs(300).unwrap().to_string(), "5m");
        assert_eq!(Span::from_secs(90).unwrap().to_string(), "90s");
    }

    #[test]
    fn windows_are_anchored_at_creation() {
        assert_eq!(window_at(1_000, 100, 1_000), (0, 1_000, 1_100));
        assert_eq!(window_at(1_000, 100, 1_099), (0, 1_000, 1_100));
        assert_eq!(window_at(1_000, 100, 1_100), (1, 1_100, 1_200));
        assert_eq!(window_at(1_000, 100, 1_350), (3, 1_300, 1_400));
    }
}
