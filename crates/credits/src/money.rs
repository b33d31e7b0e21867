//! Exact decimal money and currency codes, with the wire form the API uses.

use std::fmt;
use std::str::FromStr;

use rust_decimal::Decimal;
use serde::{Deserialize, Deserializer, Serialize, Serializer};

use crate::error::{AmountOverflow, ModelError};

/// An exact decimal amount. On the wire it is a string matching `^-?[0-9]+(\.[0-9]+)?$`:
/// no exponent, no sign other than a leading minus, no separators, no NaN.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Amount(Decimal);

impl Amount {
    pub const ZERO: Amount = Amount(Decimal::ZERO);

    pub fn new(value: Decimal) -> Self {
        Amount(value)
    }

    pub fn decimal(self) -> Decimal {
        self.0
    }

    pub fn is_zero(self) -> bool {
        self.0.is_zero()
    }

    pub fn is_positive(self) -> bool {
        self.0 > Decimal::ZERO
    }

    pub fn is_negative(self) -> bool {
        self.0 < Decimal::ZERO
    }

    /// `-self`. Negation only flips the sign of a decimal: it cannot overflow.
    #[allow(clippy::arithmetic_side_effects)]
    pub fn negated(self) -> Self {
        Amount(-self.0)
    }

    pub fn abs(self) -> Self {
        Amount(self.0.abs())
    }

    pub fn min(self, other: Self) -> Self {
        if self <= other {
            self
        } else {
            other
        }
    }

    pub fn max(self, other: Self) -> Self {
        if self >= other {
            self
        } else {
            other
        }
    }

    /// `self + other`, exact, or [`AmountOverflow`] when the sum would leave the range the model
    /// keeps ([`crate::limits::MAX_BALANCE`]) or could not be represented exactly.
    pub fn try_add(self, other: Self) -> Result<Self, AmountOverflow> {
        let sum = self.0.checked_add(other.0).ok_or(AmountOverflow)?;
        exact(keep_scale(sum, self.0, other.0), self.0.scale().max(other.0.scale()))
    }

    /// `self - other`, exact, or [`AmountOverflow`] (as [`Amount::try_add`]).
    pub fn try_sub(self, other: Self) -> Result<Self, AmountOverflow> {
        let difference = self.0.checked_sub(other.0).ok_or(AmountOverflow)?;
        exact(keep_scale(difference, self.0, other.0), self.0.scale().max(other.0.scale()))
    }

    /// The exact sum of `amounts`, or [`AmountOverflow`] (as [`Amount::try_add`]).
    pub fn try_sum(amounts: impl IntoIterator<Item = Amount>) -> Result<Self, AmountOverflow> {
        amounts.into_iter().try_fold(Amount::ZERO, Amount::try_add)
    }

    /// `self × other`, exact; `None` on overflow or when the product would have to be rounded.
    pub fn checked_mul(self, other: Decimal) -> Option<Self> {
        // The exact product needs the places of both factors (without trailing zeros); a decimal
        // has at most 28, and a product with fewer than it needs was rounded.
        let scale = self.0.scale().saturating_add(other.scale()).min(28);
        if self.0.is_zero() || other.is_zero() {
            // rust_decimal answers a zero product with scale 0: nothing was rounded.
            return Some(Amount(Decimal::new(0, scale)));
        }
        let needed = self.0.normalize().scale().saturating_add(other.normalize().scale());
        let mut product = self.0.checked_mul(other)?;
        if needed > 28 || product.scale() < needed {
            return None;
        }
        if product.scale() < scale {
            product.rescale(scale);
        }
        Some(Amount(product))
    }

    /// `self × n`, e.g. the price of `n` calls; `None` on overflow.
    pub fn times(self, n: u64) -> Option<Self> {
        self.checked_mul(Decimal::from(n))
    }

    /// `percent` % of `self`; `None` on overflow.
    pub fn percent(self, percent: u64) -> Option<Self> {
        self.0.checked_mul(Decimal::from(percent)).and_then(|v| v.checked_div(Decimal::ONE_HUNDRED)).map(Amount)
    }

    /// `self + other` as [`Amount::try_add`]; `None` instead of the error.
    pub fn checked_add(self, other: Self) -> Option<Self> {
        self.try_add(other).ok()
    }

    /// Parses the strict wire form. Trailing zeros are kept (`"1.50"` stays `1.50`).
    pub fn parse(text: &str) -> Result<Self, ModelError> {
        if !is_wire_number(text) {
            return Err(ModelError::InvalidAmount(text.to_owned()));
        }
        Decimal::from_str_exact(text).map(Amount).map_err(|_| ModelError::InvalidAmount(text.to_owned()))
    }

    /// Parses the wire form of an amount that enters the system at an edge (a request, a gateway's
    /// configuration): within [`crate::limits::MAX_AMOUNT`] and [`crate::limits::MAX_AMOUNT_SCALE`].
    pub fn parse_bounded(text: &str) -> Result<Self, ModelError> {
        Amount::parse(text)?.bounded()
    }

    /// The amount, if it may enter the system at an edge: at most [`crate::limits::MAX_AMOUNT`]
    /// in magnitude and [`crate::limits::MAX_AMOUNT_SCALE`] decimal places (counted as written:
    /// `"1.0000000000"` has 10).
    pub fn bounded(self) -> Result<Amount, ModelError> {
        if self.0.scale() > crate::limits::MAX_AMOUNT_SCALE || magnitude_above(self.0, crate::limits::MAX_AMOUNT) {
            return Err(ModelError::AmountOutOfBounds(self.to_string()));
        }
        Ok(self)
    }

    /// The amount, if it can be a sum the ledger answered (a balance, a hold): at most
    /// [`crate::limits::MAX_BALANCE`] in magnitude. The filter reads ledger answers through it.
    pub fn within_balance_bound(self) -> Result<Amount, ModelError> {
        if magnitude_above(self.0, crate::limits::MAX_BALANCE) {
            return Err(ModelError::AmountOutOfBounds(self.to_string()));
        }
        Ok(self)
    }
}

/// `result` if it kept `scale` (an inexact result has fewer places) and lies within the bound.
fn exact(result: Amount, scale: u32) -> Result<Amount, AmountOverflow> {
    if result.0.scale() < scale || magnitude_above(result.0, crate::limits::MAX_BALANCE) {
        return Err(AmountOverflow);
    }
    Ok(result)
}

/// `10^i` for every scale a decimal can have.
const POWERS_OF_TEN: [u128; 29] = {
    let mut powers = [1u128; 29];
    let mut i = 1;
    while i < powers.len() {
        powers[i] = powers[i - 1] * 10;
        i += 1;
    }
    powers
};

/// `|value| > limit` for a whole `limit` (the bounds in `crate::limits`), compared on the
/// mantissas: `|m| > limit × 10^scale`. Decimal's own comparison rescales one side first, and the
/// filter checks every sum it keeps several times a call (bench/profile.sh).
fn magnitude_above(value: Decimal, limit: Decimal) -> bool {
    debug_assert!(limit.scale() == 0, "{limit}");
    let scaled =
        POWERS_OF_TEN.get(value.scale() as usize).and_then(|p| limit.mantissa().unsigned_abs().checked_mul(*p));
    // A limit beyond u128 once scaled is beyond every mantissa (at most 96 bits).
    scaled.is_some_and(|l| value.mantissa().unsigned_abs() > l)
}

/// `^-?[0-9]+(\.[0-9]+)?$`, checked by hand so the model needs no regex engine.
fn is_wire_number(text: &str) -> bool {
    let digits = text.strip_prefix('-').unwrap_or(text);
    let (int, frac) = match digits.split_once('.') {
        Some((int, frac)) => (int, Some(frac)),
        None => (digits, None),
    };
    let all_digits = |s: &str| !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit());
    all_digits(int) && frac.is_none_or(all_digits)
}

impl fmt::Display for Amount {
    /// Decimal's own form (never an exponent, the scale kept), a zero unsigned. Written by hand
    /// into a stack buffer: the filter prints two amounts per call (its response headers), and
    /// Decimal's `Display` cost more than the rest of a call's decision (bench/profile.sh).
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if f.width().is_some() || f.precision().is_some() {
            // Padding or rounding asked for: Decimal's own formatting honours both.
            let value = if self.0.is_zero() { self.0.abs() } else { self.0 };
            return fmt::Display::fmt(&value, f);
        }
        let mut buf = [0u8; WIDEST];
        f.write_str(plain(self.0, &mut buf))
    }
}

/// An amount's plain form (what `Display` writes without options) on the stack: the filter sets
/// two amounts per call as response headers, and a `String` each was two allocations.
#[derive(Clone, Copy)]
pub struct Printed {
    buf: [u8; WIDEST],
    start: usize,
}

impl Printed {
    pub fn as_str(&self) -> &str {
        // Only ASCII digits, a point and a minus were written there.
        self.buf.get(self.start..).and_then(|b| std::str::from_utf8(b).ok()).unwrap_or_default()
    }
}

impl Amount {
    pub fn printed(self) -> Printed {
        let mut buf = [0u8; WIDEST];
        let len = plain(self.0, &mut buf).len();
        Printed { buf, start: WIDEST.saturating_sub(len) }
    }
}

/// The longest plain form: a minus, 29 digits (a mantissa has at most 96 bits; a scale of at
/// most 28 needs 29 with the zero before the point) and the point.
const WIDEST: usize = 1 + 29 + 1;

/// `value` as Decimal's `Display` writes it without options, a zero unsigned, in `buf`'s tail.
// Digit printing, not money arithmetic: every count and index is bounded by the 29 digits.
#[allow(clippy::arithmetic_side_effects, clippy::cast_possible_truncation)]
fn plain(value: Decimal, buf: &mut [u8; WIDEST]) -> &str {
    // Two base-10^19 limbs, each divided as a u64: a 128-bit division (a call into the
    // runtime) only for a mantissa beyond 64 bits, instead of one a digit.
    const LIMB: u128 = 10_000_000_000_000_000_000;
    let magnitude = value.mantissa().unsigned_abs();
    let (mut high, mut low) = match u64::try_from(magnitude) {
        Ok(small) if u128::from(small) < LIMB => (0, small),
        _ => ((magnitude / LIMB) as u64, (magnitude % LIMB) as u64),
    };
    // The mantissa's digits, least significant first.
    let mut digits = [0u8; 29];
    let mut n = 0;
    while low > 0 || high > 0 {
        digits[n] = (low % 10) as u8;
        low /= 10;
        n += 1;
        if n == 19 {
            (low, high) = (high, 0);
        }
    }
    let scale = value.scale() as usize;
    let mut at = WIDEST;
    // At least one digit before the point: zeros where the mantissa is shorter than the scale
    // (`digits` is zero past the mantissa's, and holds scale + 1 ≤ 29).
    for (i, digit) in digits.iter().enumerate().take(n.max(scale + 1)) {
        if i == scale && scale > 0 {
            at -= 1;
            buf[at] = b'.';
        }
        at -= 1;
        buf[at] = b'0' + digit;
    }
    if value.is_sign_negative() && magnitude != 0 {
        at -= 1;
        buf[at] = b'-';
    }
    // Only ASCII digits, a point and a minus were written.
    std::str::from_utf8(&buf[at..]).unwrap_or_default()
}

/// Sums and differences keep the larger scale of their operands (1.00 − 1.00 = 0.00, not 0),
/// so amounts print with the precision they were given in.
fn keep_scale(result: Decimal, a: Decimal, b: Decimal) -> Amount {
    let scale = a.scale().max(b.scale());
    let mut r = result;
    if r.scale() < scale {
        r.rescale(scale);
    }
    Amount(r)
}

impl FromStr for Amount {
    type Err = ModelError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Amount::parse(s)
    }
}

impl From<Decimal> for Amount {
    fn from(value: Decimal) -> Self {
        Amount(value)
    }
}

/// A whole count (e.g. of units a call used).
impl From<u64> for Amount {
    fn from(value: u64) -> Self {
        Amount(Decimal::from(value))
    }
}

// The operators below panic when rust_decimal overflows. The credit model and the ledger never
// use them (`clippy::arithmetic_side_effects` is denied in both): they use `try_add`, `try_sub`
// and `try_sum`. They stay for the filter's existing code until it moves to the checked forms.
#[allow(clippy::arithmetic_side_effects)]
impl std::ops::Add for Amount {
    type Output = Amount;
    fn add(self, rhs: Amount) -> Amount {
        keep_scale(self.0 + rhs.0, self.0, rhs.0)
    }
}

#[allow(clippy::arithmetic_side_effects)]
impl std::ops::AddAssign for Amount {
    fn add_assign(&mut self, rhs: Amount) {
        *self = *self + rhs;
    }
}

#[allow(clippy::arithmetic_side_effects)]
impl std::ops::Sub for Amount {
    type Output = Amount;
    fn sub(self, rhs: Amount) -> Amount {
        keep_scale(self.0 - rhs.0, self.0, rhs.0)
    }
}

#[allow(clippy::arithmetic_side_effects)]
impl std::ops::SubAssign for Amount {
    fn sub_assign(&mut self, rhs: Amount) {
        *self = *self - rhs;
    }
}

impl std::ops::Neg for Amount {
    type Output = Amount;
    fn neg(self) -> Amount {
        self.negated()
    }
}

#[allow(clippy::arithmetic_side_effects)]
impl std::iter::Sum for Amount {
    fn sum<I: Iterator<Item = Amount>>(iter: I) -> Amount {
        iter.fold(Amount::ZERO, |a, b| a + b)
    }
}

impl Serialize for Amount {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for Amount {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let text = <std::borrow::Cow<'de, str>>::deserialize(deserializer)?;
        Amount::parse(&text).map_err(serde::de::Error::custom)
    }
}

/// A three-letter upper-case currency code (ISO 4217 or a custom credit unit such as `CRD`).
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Currency([u8; 3]);

impl Currency {
    pub fn parse(text: &str) -> Result<Self, ModelError> {
        match text.as_bytes() {
            [a, b, c] if [a, b, c].iter().all(|x| x.is_ascii_uppercase()) => Ok(Currency([*a, *b, *c])),
            _ => Err(ModelError::InvalidCurrency(text.to_owned())),
        }
    }

    pub fn as_str(&self) -> &str {
        // Only ASCII upper-case letters are ever stored.
        std::str::from_utf8(&self.0).unwrap_or("???")
    }
}

impl fmt::Display for Currency {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl fmt::Debug for Currency {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Currency({})", self.as_str())
    }
}

impl FromStr for Currency {
    type Err = ModelError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Currency::parse(s)
    }
}

impl Serialize for Currency {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(self.as_str())
    }
}

impl<'de> Deserialize<'de> for Currency {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let text = <std::borrow::Cow<'de, str>>::deserialize(deserializer)?;
        Currency::parse(&text).map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wire_amounts_round_trip_without_loss() {
        for text in ["0", "1", "-1", "1.50", "0.000000001", "123456789012345678.123456789", "-0.10"] {
            assert_eq!(Amount::parse(text).map(|a| a.to_string()).as_deref(), Ok(text));
        }
    }

    /// Decimal's own `Display`, a zero unsigned: what `Amount` printed before it printed by hand.
    fn decimals_own(value: Decimal) -> String {
        if value.is_zero() {
            value.abs().to_string()
        } else {
            value.to_string()
        }
    }

    #[test]
    fn amounts_print_like_decimal_at_the_edges() {
        let edges = [
            Decimal::MAX,
            Decimal::MIN,
            Decimal::ZERO,
            Decimal::from_i128_with_scale(0, 28),
            Decimal::from_i128_with_scale(-1, 28),
            Decimal::from_i128_with_scale(10_000_000_000_000_000_000, 19),
            Decimal::from_i128_with_scale(10_000_000_000_000_000_000, 0),
            Decimal::from_i128_with_scale(9_999_999_999_999_999_999, 20),
            Decimal::from_i128_with_scale(-(1 << 95), 3),
        ];
        for value in edges {
            assert_eq!(Amount(value).to_string(), decimals_own(value), "{value:?}");
            let printed = Amount(value).printed();
            assert_eq!(printed.as_str(), decimals_own(value), "{value:?}");
        }
        let mut zero = Decimal::ZERO;
        zero.set_sign_negative(true);
        assert_eq!(Amount(zero).to_string(), "0");
        let (a, b) = (Amount::parse("1.5").unwrap(), Amount::parse("1.25").unwrap());
        assert_eq!(format!("{a:>6}|{b:.1}"), format!("{:>6}|{:.1}", a.0, b.0), "padding and rounding as Decimal's");
    }

    proptest::proptest! {
        #[test]
        fn amounts_print_like_decimal(mantissa in -(1i128 << 96) + 1..(1i128 << 96), scale in 0u32..=28) {
            let value = Decimal::from_i128_with_scale(mantissa, scale);
            proptest::prop_assert_eq!(Amount(value).to_string(), decimals_own(value));
            let printed = Amount(value).printed();
            proptest::prop_assert_eq!(printed.as_str(), decimals_own(value));
        }
    }

    /// Decimal's own comparison, which `magnitude_above` replaces in the bounds.
    fn decimals_above(value: Decimal, limit: Decimal) -> bool {
        value.abs() > limit
    }

    #[test]
    fn magnitudes_compare_like_decimal_at_the_bounds() {
        use crate::limits::{MAX_AMOUNT, MAX_BALANCE};
        for limit in [MAX_AMOUNT, MAX_BALANCE, Decimal::ZERO, Decimal::ONE] {
            for scale in 0u32..=28 {
                let Some(at) = limit.mantissa().checked_mul(10i128.pow(scale)).filter(|m| *m < 1 << 96) else {
                    continue;
                };
                for delta in -2i128..=2 {
                    for sign in [1, -1] {
                        let value = Decimal::from_i128_with_scale(sign * (at + delta).max(0), scale);
                        assert_eq!(magnitude_above(value, limit), decimals_above(value, limit), "{value} vs {limit}");
                    }
                }
            }
            for edge in [Decimal::MAX, Decimal::MIN, Decimal::from_i128_with_scale(1, 28)] {
                assert_eq!(magnitude_above(edge, limit), decimals_above(edge, limit), "{edge} vs {limit}");
            }
        }
    }

    proptest::proptest! {
        #[test]
        fn magnitudes_compare_like_decimal(mantissa in -(1i128 << 96) + 1..(1i128 << 96), scale in 0u32..=28) {
            use crate::limits::{MAX_AMOUNT, MAX_BALANCE};
            let value = Decimal::from_i128_with_scale(mantissa, scale);
            for limit in [MAX_AMOUNT, MAX_BALANCE] {
                proptest::prop_assert_eq!(magnitude_above(value, limit), decimals_above(value, limit));
            }
        }
    }

    #[test]
    fn malformed_amounts_are_refused() {
        for text in ["", "1e3", "1,5", "NaN", "+1", "1.", ".5", " 1", "1 ", "--1", "0x10", "inf", "1.2.3"] {
            assert!(Amount::parse(text).is_err(), "{text:?} must be refused");
        }
    }

    #[test]
    fn arithmetic_keeps_the_scale_and_zero_has_no_sign() {
        let a = Amount::parse("1.00").unwrap();
        assert_eq!((a - a).to_string(), "0.00");
        assert_eq!((Amount::ZERO + (a - a)).to_string(), "0.00");
        assert_eq!((-(a - a)).to_string(), "0.00");
        assert_eq!((a + Amount::parse("0.125").unwrap()).to_string(), "1.125");
        let total: Amount = [a, a].into_iter().sum();
        assert_eq!(total.to_string(), "2.00");
    }

    #[test]
    fn amounts_serialize_as_strings() {
        let a: Amount = serde_json::from_str("\"2.50\"").unwrap();
        assert_eq!(serde_json::to_string(&a).unwrap(), "\"2.50\"");
        assert!(serde_json::from_str::<Amount>("2.5").is_err());
    }

    #[test]
    fn currencies_are_three_upper_case_letters() {
        assert_eq!(Currency::parse("USD").unwrap().as_str(), "USD");
        for bad in ["usd", "US", "USDT", "U$D", "", "ÜSD"] {
            assert!(Currency::parse(bad).is_err(), "{bad:?}");
        }
    }
}
