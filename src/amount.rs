//! Taler amounts: `CURRENCY:VALUE[.FRACTION]`.
//!
//! The merchant API carries amounts as strings (`"KUDOS:1.5"`). The currency is 1 to 11
//! ASCII letters (upper case by convention; we require upper case so that `kudos:1` and
//! `KUDOS:1` can never be two prices), the value an integer no larger than 2^52, and the
//! fraction at most 8 decimal digits. Amounts are kept as an integer count of 10^-8 units so
//! that comparison and addition are exact.

use std::fmt;
use std::str::FromStr;

/// Units of the fraction per whole unit of currency (8 decimal digits).
pub const FRACTION_BASE: u64 = 100_000_000;
/// The largest value part the Taler protocol allows (2^52).
pub const MAX_VALUE: u64 = 1 << 52;

/// A Taler amount: a currency and a non-negative quantity with 8 fractional digits.
#[derive(Clone, PartialEq, Eq, Hash)]
pub struct Amount {
    currency: String,
    value: u64,
    fraction: u32,
}

/// Why a string is not a Taler amount.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AmountError {
    /// No `:` between currency and value.
    #[error("an amount is CURRENCY:VALUE, e.g. \"KUDOS:1.5\"")]
    MissingColon,
    /// Currency empty, too long or not upper-case ASCII letters.
    #[error("the currency must be 1 to 11 upper-case letters A-Z")]
    BadCurrency,
    /// Value part is not a decimal number.
    #[error("the value must be digits, optionally followed by '.' and up to 8 digits")]
    BadValue,
    /// More than 8 fraction digits.
    #[error("an amount has at most 8 fraction digits")]
    TooPrecise,
    /// Value larger than 2^52.
    #[error("the value is larger than the protocol allows (2^52)")]
    TooLarge,
}

impl Amount {
    /// The zero amount in `currency`.
    ///
    /// # Errors
    /// Fails if `currency` is not a valid currency code.
    pub fn zero(currency: &str) -> Result<Self, AmountError> {
        check_currency(currency)?;
        Ok(Amount {
            currency: currency.to_owned(),
            value: 0,
            fraction: 0,
        })
    }

    /// The currency code, e.g. `KUDOS`.
    pub fn currency(&self) -> &str {
        &self.currency
    }

    /// The whole-unit part.
    pub fn value(&self) -> u64 {
        self.value
    }

    /// The fraction in units of 10^-8.
    pub fn fraction(&self) -> u32 {
        self.fraction
    }

    /// Whether this amount is zero.
    pub fn is_zero(&self) -> bool {
        self.value == 0 && self.fraction == 0
    }

    /// The amount as an integer count of 10^-8 units.
    pub fn units(&self) -> u128 {
        u128::from(self.value) * u128::from(FRACTION_BASE) + u128::from(self.fraction)
    }

    /// Adds two amounts of the same currency; `None` on a currency mismatch or overflow.
    pub fn checked_add(&self, other: &Amount) -> Option<Amount> {
        if self.currency != other.currency {
            return None;
        }
        let units = self.units() + other.units();
        let value = u64::try_from(units / u128::from(FRACTION_BASE)).ok()?;
        if value > MAX_VALUE {
            return None;
        }
        let fraction = u32::try_from(units % u128::from(FRACTION_BASE)).ok()?;
        Some(Amount {
            currency: self.currency.clone(),
            value,
            fraction,
        })
    }
}

fn check_currency(c: &str) -> Result<(), AmountError> {
    if c.is_empty() || c.len() > 11 || !c.bytes().all(|b| b.is_ascii_uppercase()) {
        return Err(AmountError::BadCurrency);
    }
    Ok(())
}

impl FromStr for Amount {
    type Err = AmountError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let (currency, number) = s.split_once(':').ok_or(AmountError::MissingColon)?;
        check_currency(currency)?;
        let (int, frac) = match number.split_once('.') {
            Some((i, f)) => (i, Some(f)),
            None => (number, None),
        };
        if int.is_empty() || !int.bytes().all(|b| b.is_ascii_digit()) || int.len() > 20 {
            return Err(AmountError::BadValue);
        }
        let value: u64 = int.parse().map_err(|_| AmountError::TooLarge)?;
        if value > MAX_VALUE {
            return Err(AmountError::TooLarge);
        }
        let fraction = match frac {
            None => 0,
            Some(f) => {
                if f.is_empty() || !f.bytes().all(|b| b.is_ascii_digit()) {
                    return Err(AmountError::BadValue);
                }
                if f.len() > 8 {
                    return Err(AmountError::TooPrecise);
                }
                let mut digits = f.to_owned();
                while digits.len() < 8 {
                    digits.push('0');
                }
                digits.parse::<u32>().map_err(|_| AmountError::BadValue)?
            }
        };
        Ok(Amount {
            currency: currency.to_owned(),
            value,
            fraction,
        })
    }
}

impl fmt::Display for Amount {
    /// Formats as the protocol does: `KUDOS:1.5`, `KUDOS:0`, no trailing zeros.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.currency, self.value)?;
        if self.fraction != 0 {
            let digits = format!("{:08}", self.fraction);
            write!(f, ".{}", digits.trim_end_matches('0'))?;
        }
        Ok(())
    }
}

impl fmt::Debug for Amount {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Amount({self})")
    }
}

impl serde::Serialize for Amount {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> serde::Deserialize<'de> for Amount {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_and_formats_canonically() {
        let rows = [
            ("KUDOS:1.5", "KUDOS:1.5"),
            ("KUDOS:1.50000000", "KUDOS:1.5"),
            ("EUR:0", "EUR:0"),
            ("EUR:0.01", "EUR:0.01"),
            ("TESTKUDOS:4503599627370496", "TESTKUDOS:4503599627370496"),
            ("X:0.00000001", "X:0.00000001"),
        ];
        for (input, shown) in rows {
            let a: Amount = input.parse().unwrap_or_else(|e| panic!("{input}: {e}"));
            assert_eq!(a.to_string(), shown, "{input}");
        }
    }

    #[test]
    fn rejects_malformed_amounts() {
        let rows = [
            ("1.5", AmountError::MissingColon),
            (":1", AmountError::BadCurrency),
            ("kudos:1", AmountError::BadCurrency),
            ("ABCDEFGHIJKL:1", AmountError::BadCurrency),
            ("KUDOS:", AmountError::BadValue),
            ("KUDOS:1.", AmountError::BadValue),
            ("KUDOS:.5", AmountError::BadValue),
            ("KUDOS:-1", AmountError::BadValue),
            ("KUDOS:1,5", AmountError::BadValue),
            ("KUDOS: 1", AmountError::BadValue),
            ("KUDOS:1.123456789", AmountError::TooPrecise),
            ("KUDOS:4503599627370497", AmountError::TooLarge),
        ];
        for (input, err) in rows {
            assert_eq!(input.parse::<Amount>(), Err(err), "{input}");
        }
    }

    #[test]
    fn adds_within_currency_only() {
        let a: Amount = "EUR:0.7".parse().unwrap();
        let b: Amount = "EUR:0.4".parse().unwrap();
        assert_eq!(a.checked_add(&b).unwrap().to_string(), "EUR:1.1");
        let c: Amount = "KUDOS:1".parse().unwrap();
        assert!(a.checked_add(&c).is_none());
        assert!(Amount::zero("EUR").unwrap().is_zero());
    }
}
