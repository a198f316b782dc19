//! Exact money and token quantities.
//!
//! Money is an `i128` count of pico-units (10^-12 of the currency unit). At
//! that scale every per-token price in use is a whole number (US$0.15 per
//! million tokens is 150,000 pico-units per token), so pricing is integer
//! multiplication and never rounds. All arithmetic is checked: an overflow is
//! an [`Overflow`] error, never a wrap. Tollgate never rounds money; the
//! only rounding anywhere is in converting weighted tokens to whole units
//! (see `draw`).

use std::fmt;
use std::str::FromStr;

/// Pico-units per currency unit.
pub const SCALE: i128 = 1_000_000_000_000;

/// An arithmetic result did not fit.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("arithmetic overflow")]
pub struct Overflow;

/// An exact, signed amount of money in pico-units.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Money(i128);

impl Money {
    /// Zero.
    pub const ZERO: Money = Money(0);

    /// An amount of `picos` pico-units.
    pub const fn from_picos(picos: i128) -> Money {
        Money(picos)
    }

    /// The amount in pico-units.
    pub const fn picos(self) -> i128 {
        self.0
    }

    /// Sum, or [`Overflow`].
    pub fn checked_add(self, other: Money) -> Result<Money, Overflow> {
        self.0.checked_add(other.0).map(Money).ok_or(Overflow)
    }

    /// Difference, or [`Overflow`].
    pub fn checked_sub(self, other: Money) -> Result<Money, Overflow> {
        self.0.checked_sub(other.0).map(Money).ok_or(Overflow)
    }

    /// `self * n`, or [`Overflow`].
    pub fn checked_mul(self, n: u64) -> Result<Money, Overflow> {
        self.0.checked_mul(i128::from(n)).map(Money).ok_or(Overflow)
    }

    /// True for amounts below zero.
    pub const fn is_negative(self) -> bool {
        self.0 < 0
    }

    /// True for amounts above zero.
    pub const fn is_positive(self) -> bool {
        self.0 > 0
    }

    /// Negation, or [`Overflow`] for the one value without one.
    pub fn checked_neg(self) -> Result<Money, Overflow> {
        self.0.checked_neg().map(Money).ok_or(Overflow)
    }
}

impl fmt::Display for Money {
    /// Exact decimal with all twelve fractional digits, e.g. `-1.500000000000`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let sign = if self.0 < 0 { "-" } else { "" };
        let abs = self.0.unsigned_abs();
        let scale = SCALE.unsigned_abs();
        write!(f, "{sign}{}.{:012}", abs / scale, abs % scale)
    }
}

/// Why a decimal string is not an amount of money.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ParseMoneyError {
    /// Not of the form `[-]digits[.digits]`.
    #[error("expected a decimal number such as \"12.50\", got {0:?}")]
    Syntax(String),
    /// More than twelve fractional digits.
    #[error("{0:?} has more than 12 decimal places")]
    TooPrecise(String),
    /// Too large.
    #[error("{0:?} is too large")]
    Overflow(String),
}

impl FromStr for Money {
    type Err = ParseMoneyError;

    /// Parses `[-]digits[.digits]` exactly; more than twelve decimal places
    /// is an error rather than a rounding.
    fn from_str(s: &str) -> Result<Money, ParseMoneyError> {
        let syntax = || ParseMoneyError::Syntax(s.to_owned());
        let (negative, body) = match s.strip_prefix('-') {
            Some(rest) => (true, rest),
            None => (false, s),
        };
        let (whole, frac) = body.split_once('.').unwrap_or((body, ""));
        let digits = |part: &str| !part.is_empty() && part.bytes().all(|b| b.is_ascii_digit());
        if !digits(whole) || (body.contains('.') && !digits(frac)) {
            return Err(syntax());
        }
        if frac.len() > 12 {
            return Err(ParseMoneyError::TooPrecise(s.to_owned()));
        }
        let overflow = || ParseMoneyError::Overflow(s.to_owned());
        let whole: i128 = whole.parse().map_err(|_| overflow())?;
        let frac_picos: i128 = if frac.is_empty() {
            0
        } else {
            let padded = format!("{frac:0<12}");
            padded.parse().map_err(|_| syntax())?
        };
        let abs = whole
            .checked_mul(SCALE)
            .and_then(|w| w.checked_add(frac_picos))
            .ok_or_else(overflow)?;
        Ok(Money(if negative { -abs } else { abs }))
    }
}

impl serde::Serialize for Money {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> serde::Deserialize<'de> for Money {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Money, D::Error> {
        let text = String::deserialize(d)?;
        text.parse().map_err(serde::de::Error::custom)
    }
}

/// The largest amount one operator operation may move (10^15 currency
/// units). Far above any real top-up, it keeps every running total of
/// credits inside `i128` for more than 10^11 operations.
pub const MAX_OPERATION: Money = Money(1_000_000_000_000_000 * SCALE);

/// The largest token count accepted in one field of one request. Real
/// requests are many orders of magnitude below; anything above is a bug or an
/// attack, and the bound keeps every price product far from overflow.
pub const MAX_TOKENS_PER_FIELD: u64 = 1_000_000_000;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_and_prints_exactly() {
        let m: Money = "0.15".parse().unwrap();
        assert_eq!(m.picos(), 150_000_000_000);
        assert_eq!(m.to_string(), "0.150000000000");
        let n: Money = "-12.000000000001".parse().unwrap();
        assert_eq!(n.picos(), -12_000_000_000_001);
        assert_eq!(n.to_string(), "-12.000000000001");
        assert_eq!("7".parse::<Money>().unwrap().picos(), 7 * SCALE);
    }

    #[test]
    fn rejects_rather_than_rounds() {
        assert!(matches!(
            "0.0000000000001".parse::<Money>(),
            Err(ParseMoneyError::TooPrecise(_))
        ));
        for bad in ["", "-", "1.", ".5", "1e3", "1,5", "+1", "１"] {
            assert!(bad.parse::<Money>().is_err(), "{bad:?}");
        }
        assert!(matches!(
            "999999999999999999999999999999".parse::<Money>(),
            Err(ParseMoneyError::Overflow(_))
        ));
    }

    #[test]
    fn arithmetic_is_checked() {
        let max = Money::from_picos(i128::MAX);
        assert_eq!(max.checked_add(Money::from_picos(1)), Err(Overflow));
        assert_eq!(Money::from_picos(i128::MIN).checked_neg(), Err(Overflow));
        assert_eq!(Money::from_picos(3).checked_mul(4), Ok(Money::from_picos(12)));
    }
}
