//! ISO-8601 durations (`P30D`, `PT1H`, `P1M`, `P1Y2M3DT4H5M6.5S`) applied on the calendar.

use std::fmt;
use std::str::FromStr;

use chrono::{DateTime, Days, Months, TimeDelta, Utc};
use serde::{Deserialize, Deserializer, Serialize, Serializer};

use crate::error::ModelError;

/// A calendar duration. Years and months are added as calendar months (Jan 31 + P1M = Feb 28/29),
/// weeks and days as calendar days, the time part as exact elapsed time.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct IsoDuration {
    pub months: u32,
    pub days: u64,
    pub nanos: u128,
}

const NANOS_PER_SECOND: u128 = 1_000_000_000;
/// Bounds keep every duration addable to any date chrono can represent without overflow.
const MAX_MONTHS: u32 = 12 * 10_000;
const MAX_DAYS: u64 = 366 * 10_000;
const MAX_NANOS: u128 = 10_000 * 366 * 86_400 * NANOS_PER_SECOND;

impl IsoDuration {
    pub fn parse(text: &str) -> Result<Self, ModelError> {
        let invalid = || ModelError::InvalidDuration(text.to_owned());
        let rest = text.strip_prefix('P').ok_or_else(invalid)?;
        let (date_part, time_part) = match rest.split_once('T') {
            Some((d, t)) if !t.is_empty() => (d, Some(t)),
            Some(_) => return Err(invalid()),
            None => (rest, None),
        };
        if date_part.is_empty() && time_part.is_none() {
            return Err(invalid());
        }
        let mut out = IsoDuration::default();
        for (value, unit) in components(date_part, "YMWD").ok_or_else(invalid)? {
            let whole = whole_number(value).ok_or_else(invalid)?;
            // Checked sums: repeated or huge components must be refused, not overflow.
            match unit {
                'Y' | 'M' => {
                    let months = if unit == 'Y' { whole.checked_mul(12).ok_or_else(invalid)? } else { whole };
                    let months = u32::try_from(months).map_err(|_| invalid())?;
                    out.months = out.months.checked_add(months).ok_or_else(invalid)?;
                }
                _ => {
                    let days = if unit == 'W' { whole.checked_mul(7).ok_or_else(invalid)? } else { whole };
                    out.days = out.days.checked_add(days).ok_or_else(invalid)?;
                }
            }
        }
        if let Some(time) = time_part {
            for (value, unit) in components(time, "HMS").ok_or_else(invalid)? {
                // Elapsed time, so a fraction of an hour or minute is exact (to the nanosecond, as
                // seconds are).
                let seconds_per_unit = match unit {
                    'H' => 3600,
                    'M' => 60,
                    _ => 1,
                };
                let nanos =
                    seconds_to_nanos(value).and_then(|n| n.checked_mul(seconds_per_unit)).ok_or_else(invalid)?;
                out.nanos = out.nanos.checked_add(nanos).ok_or_else(invalid)?;
            }
        }
        if out.months > MAX_MONTHS || out.days > MAX_DAYS || out.nanos > MAX_NANOS {
            return Err(invalid());
        }
        if out == IsoDuration::default() {
            return Err(invalid());
        }
        Ok(out)
    }

    /// `start + self`, calendar-aware. `None` only if the result leaves chrono's range.
    pub fn add_to(&self, start: DateTime<Utc>) -> Option<DateTime<Utc>> {
        let nanos = i64::try_from(self.nanos).ok()?;
        start
            .checked_add_months(Months::new(self.months))?
            .checked_add_days(Days::new(self.days))?
            .checked_add_signed(TimeDelta::nanoseconds(nanos))
    }
}

/// Splits `12D3W` style text into (number, unit) pairs; units must appear in `order`, at most once.
fn components<'a>(text: &'a str, order: &str) -> Option<Vec<(&'a str, char)>> {
    let mut out = Vec::new();
    let mut start = 0;
    let mut next_unit = 0;
    for (i, c) in text.char_indices() {
        if c.is_ascii_digit() || c == '.' {
            continue;
        }
        let pos = order[next_unit..].find(c)?.checked_add(next_unit)?;
        let value = &text[start..i];
        if value.is_empty() {
            return None;
        }
        out.push((value, c));
        next_unit = pos.checked_add(1)?;
        start = i.checked_add(c.len_utf8())?;
    }
    (start == text.len()).then_some(out)
}

fn whole_number(value: &str) -> Option<u64> {
    if !value.bytes().all(|b| b.is_ascii_digit()) {
        return None; // fractional years, months, weeks and days are refused: they are calendar units
    }
    value.parse().ok()
}

fn seconds_to_nanos(value: &str) -> Option<u128> {
    let (int, frac) = value.split_once('.').unwrap_or((value, ""));
    if int.is_empty()
        || frac.len() > 9
        || !frac.bytes().all(|b| b.is_ascii_digit())
        || (value.contains('.') && frac.is_empty())
    {
        return None;
    }
    let whole: u128 = u128::from(whole_number(int)?);
    let frac_nanos: u128 = if frac.is_empty() { 0 } else { format!("{frac:0<9}").parse().ok()? };
    whole.checked_mul(NANOS_PER_SECOND)?.checked_add(frac_nanos)
}

impl fmt::Display for IsoDuration {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("P")?;
        if self.months > 0 {
            write!(f, "{}M", self.months)?;
        }
        if self.days > 0 {
            write!(f, "{}D", self.days)?;
        }
        if self.nanos > 0 {
            let secs = self.nanos / NANOS_PER_SECOND;
            let frac = self.nanos % NANOS_PER_SECOND;
            if frac == 0 {
                write!(f, "T{secs}S")?;
            } else {
                let frac = format!("{frac:09}");
                write!(f, "T{secs}.{}S", frac.trim_end_matches('0'))?;
            }
        }
        Ok(())
    }
}

impl FromStr for IsoDuration {
    type Err = ModelError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        IsoDuration::parse(s)
    }
}

impl Serialize for IsoDuration {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for IsoDuration {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let text = <std::borrow::Cow<'de, str>>::deserialize(deserializer)?;
        IsoDuration::parse(&text).map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::TimeZone;

    fn at(y: i32, m: u32, d: u32) -> DateTime<Utc> {
        Utc.with_ymd_and_hms(y, m, d, 12, 0, 0).unwrap()
    }

    #[test]
    fn days_hours_and_weeks() {
        let start = at(2026, 1, 1);
        assert_eq!(IsoDuration::parse("P30D").unwrap().add_to(start), Some(at(2026, 1, 31)));
        assert_eq!(IsoDuration::parse("P2W").unwrap().add_to(start), Some(at(2026, 1, 15)));
        assert_eq!(IsoDuration::parse("PT1H").unwrap().add_to(start), Some(start + TimeDelta::hours(1)));
        assert_eq!(IsoDuration::parse("PT1.5S").unwrap().add_to(start), Some(start + TimeDelta::milliseconds(1500)));
        // The schema's pattern allows a fraction in every component; hours and minutes are
        // elapsed time, so theirs are exact.
        assert_eq!(IsoDuration::parse("PT1.5H").unwrap().add_to(start), Some(start + TimeDelta::minutes(90)));
        assert_eq!(IsoDuration::parse("PT0.5M").unwrap().add_to(start), Some(start + TimeDelta::seconds(30)));
        assert_eq!(
            IsoDuration::parse("PT0.000000001H").unwrap().add_to(start),
            Some(start + TimeDelta::nanoseconds(3600))
        );
    }

    #[test]
    fn months_are_calendar_months() {
        assert_eq!(IsoDuration::parse("P1M").unwrap().add_to(at(2026, 1, 31)), Some(at(2026, 2, 28)));
        assert_eq!(IsoDuration::parse("P1M").unwrap().add_to(at(2028, 1, 31)), Some(at(2028, 2, 29)));
        assert_eq!(IsoDuration::parse("P1Y").unwrap().add_to(at(2026, 3, 1)), Some(at(2027, 3, 1)));
        assert_eq!(
            IsoDuration::parse("P1Y2M3DT4H").unwrap().add_to(at(2026, 1, 1)),
            Some(Utc.with_ymd_and_hms(2027, 3, 4, 16, 0, 0).unwrap())
        );
    }

    #[test]
    fn components_whose_sum_overflows_are_refused() {
        // Found by fuzzing (fuzz/fuzz_targets/ledger_values.rs): the sums overflowed.
        for huge in ["P357913941Y4294967295M", "P2635249153387078802W18446744073709551615D"] {
            assert!(IsoDuration::parse(huge).is_err(), "{huge}");
        }
    }

    #[test]
    fn malformed_durations_are_refused() {
        for bad in
            ["", "P", "PT", "30D", "P1.5M", "PT1.H", "P-1D", "P1D2D", "PT1S1H", "P1H", "PXD", "P0D", "P99999999999Y"]
        {
            assert!(IsoDuration::parse(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn display_parses_back() {
        for text in ["P30D", "PT1H", "P1M", "P1Y2M3DT4H5M6.5S"] {
            let d = IsoDuration::parse(text).unwrap();
            assert_eq!(IsoDuration::parse(&d.to_string()).unwrap(), d);
        }
    }
}
