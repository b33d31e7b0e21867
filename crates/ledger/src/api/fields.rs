//! Validation and formatting of the fields that many resources share.

use chrono::{DateTime, Utc};
use credits::limits::{MAX_DESCRIPTION_CHARS, MAX_KEY_CHARS, MAX_LABELS, MAX_LABEL_LEN, MAX_NAME_CHARS};
use credits::Amount;

use super::problem::Problem;
use crate::store::Labels;

pub use crate::db::timestamp;

pub fn parse_timestamp(field: &str, text: &str) -> Result<DateTime<Utc>, Problem> {
    DateTime::parse_from_rfc3339(text)
        .map(|t| t.with_timezone(&Utc))
        .map_err(|_| Problem::bad_request(field, format!("{field} must be an RFC 3339 date-time, got {text:?}")))
}

/// An amount that enters the ledger (a request body or header): within the bounds every edge
/// enforces ([`credits::Amount::bounded`]), else a 400 naming the field.
pub fn amount(field: &str, value: Amount) -> Result<Amount, Problem> {
    value.bounded().map_err(|e| Problem::bad_request(field, e.to_string()))
}

pub fn name(field: &str, value: &str) -> Result<(), Problem> {
    chars_between(field, value, MAX_NAME_CHARS)
}

/// 1..=`max` characters.
fn chars_between(field: &str, value: &str, max: usize) -> Result<(), Problem> {
    let len = value.chars().count();
    if (1..=max).contains(&len) {
        Ok(())
    } else {
        Err(Problem::bad_request(field, format!("{field} must have between 1 and {max} characters")))
    }
}

pub fn description(field: &str, value: Option<&str>) -> Result<(), Problem> {
    match value {
        Some(v) if v.chars().count() > MAX_DESCRIPTION_CHARS => {
            Err(Problem::bad_request(field, format!("{field} must have at most {MAX_DESCRIPTION_CHARS} characters")))
        }
        _ => Ok(()),
    }
}

/// Konnect labels: at most 50; keys of 1..63 characters that do not start with `kong`,
/// `konnect`, `mesh`, `kic` or `_`; values of 1..63 characters, alphanumeric at both ends, `-`,
/// `_` and `.` inside.
pub fn labels(field: &str, labels: &Labels) -> Result<(), Problem> {
    if labels.len() > MAX_LABELS {
        return Err(Problem::bad_request(field, format!("at most {MAX_LABELS} labels")));
    }
    let valid_value = |s: &str| {
        let b = s.as_bytes();
        !b.is_empty()
            && b.len() <= MAX_LABEL_LEN
            && b.first().is_some_and(u8::is_ascii_alphanumeric)
            && b.last().is_some_and(u8::is_ascii_alphanumeric)
            && b.iter().all(|c| c.is_ascii_alphanumeric() || matches!(c, b'-' | b'_' | b'.'))
    };
    let valid_key = |k: &str| {
        (1..=63).contains(&k.chars().count())
            && !["kong", "konnect", "mesh", "kic", "_"].iter().any(|p| k.to_ascii_lowercase().starts_with(p))
    };
    for (k, v) in labels {
        if !valid_key(k) {
            return Err(Problem::bad_request(format!("{field}.{k}"), format!("label key {k:?} is not valid")));
        }
        if !valid_value(v) {
            return Err(Problem::bad_request(format!("{field}.{k}"), format!("label value {v:?} is not valid")));
        }
    }
    Ok(())
}

/// An idempotency or resource key: 1..256 characters.
pub fn key(field: &str, value: &str) -> Result<(), Problem> {
    chars_between(field, value, MAX_KEY_CHARS)
}

/// For an optional member that Konnect's schema does not mark nullable: absent is `None`, `null`
/// is refused like any other wrong type (use with `#[serde(default, deserialize_with = …)]`).
pub fn non_null<'de, D, T>(deserializer: D) -> Result<Option<T>, D::Error>
where
    D: serde::Deserializer<'de>,
    T: serde::Deserialize<'de>,
{
    T::deserialize(deserializer).map(Some)
}
