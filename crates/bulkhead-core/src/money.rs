//! Exact money: integer micro-units of the currency's major unit.
//!
//! Amounts are parsed from their decimal text (never through a float) and rendered back with at
//! least two decimals. All arithmetic is checked; nothing wraps or rounds silently.

use std::fmt;

/// Micro-units per major unit (1.000000).
pub const MICROS_PER_UNIT: i64 = 1_000_000;
/// The largest amount accepted anywhere: 10^12 major units.
pub const AMOUNT_MAX_UNITS: i64 = 1_000_000_000_000;
/// `AMOUNT_MAX_UNITS` in micro-units (10^18, fits in i64).
pub const AMOUNT_MAX_MICROS: i64 = AMOUNT_MAX_UNITS * MICROS_PER_UNIT;

/// A non-negative amount of money in micro-units.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Micros(i64);

/// Why an amount's text was refused.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AmountError {
    Empty,
    NotDecimal,
    Negative,
    TooManyDecimals,
    TooLarge,
    Zero,
}

impl fmt::Display for AmountError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            AmountError::Empty => "the amount is empty",
            AmountError::NotDecimal => {
                "the amount must be a plain decimal number such as \"5.00\" (no exponent, sign or spaces)"
            }
            AmountError::Negative => "the amount must not be negative",
            AmountError::TooManyDecimals => "the amount has more than 6 decimal places",
            AmountError::TooLarge => "the amount is above the maximum of 1000000000000",
            AmountError::Zero => "the amount must be greater than zero",
        })
    }
}

impl Micros {
    pub const ZERO: Micros = Micros(0);
    pub const MAX: Micros = Micros(AMOUNT_MAX_MICROS);

    /// Builds from raw micro-units; `None` when negative.
    pub const fn from_micros(m: i64) -> Option<Micros> {
        if m < 0 { None } else { Some(Micros(m)) }
    }

    pub const fn micros(self) -> i64 {
        self.0
    }

    pub const fn is_zero(self) -> bool {
        self.0 == 0
    }

    /// Parses a decimal amount such as `"5"`, `"5.00"` or `"0.000150"` (zero allowed).
    ///
    /// Accepted form: one or more ASCII digits, optionally `.` and 1–6 digits. Everything else
    /// (signs, exponents, spaces, `NaN`, `Infinity`, empty) is refused, and so is anything above
    /// 10^12.
    pub fn parse(text: &str) -> Result<Micros, AmountError> {
        if text.is_empty() {
            return Err(AmountError::Empty);
        }
        if text.starts_with('-') {
            return Err(AmountError::Negative);
        }
        let (int, frac) = match text.split_once('.') {
            Some((i, f)) => (i, Some(f)),
            None => (text, None),
        };
        if int.is_empty() || !int.bytes().all(|b| b.is_ascii_digit()) {
            return Err(AmountError::NotDecimal);
        }
        let frac = frac.unwrap_or("");
        if text.contains('.') && frac.is_empty() {
            return Err(AmountError::NotDecimal);
        }
        if !frac.bytes().all(|b| b.is_ascii_digit()) {
            return Err(AmountError::NotDecimal);
        }
        if frac.len() > 6 {
            return Err(AmountError::TooManyDecimals);
        }
        let int_trimmed = int.trim_start_matches('0');
        // 10^12 has 13 digits; anything longer is too large before we even multiply.
        if int_trimmed.len() > 13 {
            return Err(AmountError::TooLarge);
        }
        let units: i64 =
            if int_trimmed.is_empty() { 0 } else { int_trimmed.parse().map_err(|_| AmountError::TooLarge)? };
        let mut frac_micros: i64 = 0;
        for (i, b) in frac.bytes().enumerate() {
            frac_micros += i64::from(b - b'0') * 10_i64.pow(5 - i as u32);
        }
        let total =
            units.checked_mul(MICROS_PER_UNIT).and_then(|u| u.checked_add(frac_micros)).ok_or(AmountError::TooLarge)?;
        if total > AMOUNT_MAX_MICROS {
            return Err(AmountError::TooLarge);
        }
        Ok(Micros(total))
    }

    /// Like [`Micros::parse`], but zero is refused: the form for spends and holds.
    pub fn parse_positive(text: &str) -> Result<Micros, AmountError> {
        let m = Micros::parse(text)?;
        if m.is_zero() {
            return Err(AmountError::Zero);
        }
        Ok(m)
    }

    pub fn checked_add(self, other: Micros) -> Option<Micros> {
        self.0.checked_add(other.0).map(Micros)
    }

    pub fn checked_sub(self, other: Micros) -> Option<Micros> {
        match self.0.checked_sub(other.0) {
            Some(v) if v >= 0 => Some(Micros(v)),
            _ => None,
        }
    }

    /// `self - other`, floored at zero (for "remaining" figures only, never for balances).
    pub fn saturating_sub(self, other: Micros) -> Micros {
        Micros((self.0 - other.0).max(0))
    }

    /// `ceil(count × price_per_million / 10^6)`: token prices round up, never in the agent's favour.
    pub fn per_million_ceil(count: u64, price_per_million: Micros) -> Option<Micros> {
        let product = i128::from(count).checked_mul(i128::from(price_per_million.0))?;
        let v = (product + 999_999) / 1_000_000;
        i64::try_from(v).ok().map(Micros)
    }
}

impl fmt::Display for Micros {
    /// Renders with at least two decimals and no trailing zeros beyond them: `5.00`, `0.00015`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let units = self.0 / MICROS_PER_UNIT;
        let frac = self.0 % MICROS_PER_UNIT;
        let mut frac_s = format!("{frac:06}");
        while frac_s.len() > 2 && frac_s.ends_with('0') {
            frac_s.pop();
        }
        write!(f, "{units}.{frac_s}")
    }
}

impl serde::Serialize for Micros {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

/// Reads the decimal string [`Micros`] serializes to (a stored answer read back), exactly.
impl<'de> serde::Deserialize<'de> for Micros {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Micros, D::Error> {
        let text = <std::borrow::Cow<'de, str>>::deserialize(d)?;
        Micros::parse(&text).map_err(|e| serde::de::Error::custom(format!("{text:?}: {e}")))
    }
}

/// How an amount is rendered, as a regular expression (ECMA-262, as OpenAPI's `pattern`): the
/// decimal text [`Micros`] serializes to, with 2 to 6 decimals.
pub const AMOUNT_PATTERN: &str = r"^[0-9]+\.[0-9]{2,6}$";

/// `Amount` in the OpenAPI document: the decimal string [`Micros`] serializes to.
#[cfg(feature = "openapi")]
impl utoipa::PartialSchema for Micros {
    fn schema() -> utoipa::openapi::RefOr<utoipa::openapi::schema::Schema> {
        use utoipa::openapi::schema::{ObjectBuilder, Type};
        ObjectBuilder::new()
            .schema_type(Type::String)
            .pattern(Some(AMOUNT_PATTERN))
            .description(Some(
                "An amount in the currency's major unit, as a decimal string with 2 to 6 decimals \
                 (exact: never a float).",
            ))
            .examples(["5.00", "0.000150"])
            .into()
    }
}

#[cfg(feature = "openapi")]
impl utoipa::ToSchema for Micros {
    fn name() -> std::borrow::Cow<'static, str> {
        "Amount".into()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_and_renders() {
        let cases = [
            ("5", "5.00", 5_000_000),
            ("5.00", "5.00", 5_000_000),
            ("0.000150", "0.00015", 150),
            ("0.1", "0.10", 100_000),
            ("1000000000000", "1000000000000.00", AMOUNT_MAX_MICROS),
            ("0", "0.00", 0),
            ("007.5", "7.50", 7_500_000),
        ];
        for (input, rendered, micros) in cases {
            let m = Micros::parse(input).unwrap();
            assert_eq!(m.micros(), micros, "{input}");
            assert_eq!(m.to_string(), rendered, "{input}");
        }
    }

    #[test]
    fn refuses_hostile_amounts() {
        let cases = [
            ("", AmountError::Empty),
            ("-1", AmountError::Negative),
            ("1e3", AmountError::NotDecimal),
            ("NaN", AmountError::NotDecimal),
            ("Infinity", AmountError::NotDecimal),
            ("1.0000001", AmountError::TooManyDecimals),
            ("10000000000000", AmountError::TooLarge),
            ("1000000000000.000001", AmountError::TooLarge),
            ("99999999999999999999999999", AmountError::TooLarge),
            (" 1", AmountError::NotDecimal),
            ("1 ", AmountError::NotDecimal),
            ("+1", AmountError::NotDecimal),
            (".5", AmountError::NotDecimal),
            ("5.", AmountError::NotDecimal),
            ("1,5", AmountError::NotDecimal),
            ("٣", AmountError::NotDecimal),
        ];
        for (input, err) in cases {
            assert_eq!(Micros::parse(input), Err(err), "{input:?}");
        }
        assert_eq!(Micros::parse_positive("0.000000"), Err(AmountError::Zero));
    }

    #[test]
    fn token_prices_round_up() {
        let price = Micros::parse("2.50").unwrap();
        // 1 token at $2.50 per million = 2.5 micros -> 3 micros.
        assert_eq!(Micros::per_million_ceil(1, price), Some(Micros(3)));
        assert_eq!(Micros::per_million_ceil(0, price), Some(Micros(0)));
        assert_eq!(Micros::per_million_ceil(1_000_000, price), Some(Micros(2_500_000)));
    }

    proptest::proptest! {
        #[test]
        fn render_parse_roundtrip(m in 0..=AMOUNT_MAX_MICROS) {
            let a = Micros(m);
            proptest::prop_assert_eq!(Micros::parse(&a.to_string()), Ok(a));
        }

        #[test]
        fn parse_never_panics(s in "\\PC{0,40}") {
            let _ = Micros::parse(&s);
        }

        #[test]
        fn parse_accepts_only_canonical_shapes(s in "[0-9.eE+-]{0,20}") {
            if let Ok(m) = Micros::parse(&s) {
                proptest::prop_assert!(m.micros() >= 0 && m.micros() <= AMOUNT_MAX_MICROS);
                proptest::prop_assert!(!s.contains(['e', 'E', '+', '-']));
            }
        }
    }
}
