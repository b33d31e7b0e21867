//! Validation and formatting of the fields that many resources share.

use chrono::{DateTime, SecondsFormat, Utc};

use super::problem::Problem;
use crate::store::Labels;

/// RFC 3339 in UTC, with as many fractional digits as needed.
pub fn timestamp(at: DateTime<Utc>) -> String {
    at.to_rfc3339_opts(SecondsFormat::AutoSi, true)
}

pub fn parse_timestamp(field: &str, text: &str) -> Result<DateTime<Utc>, Problem> {
    DateTime::parse_from_rfc3339(text)
        .map(|t| t.with_timezone(&Utc))
        .map_err(|_| Problem::bad_request(field, format!("{field} must be an RFC 3339 date-time, got {text:?}")))
}

pub fn name(field: &str, value: &str) -> Result<(), Problem> {
    let len = value.chars().count();
    if (1..=256).contains(&len) {
        Ok(())
    } else {
        Err(Problem::bad_request(field, format!("{field} must have between 1 and 256 characters")))
    }
}

pub fn description(field: &str, value: Option<&str>) -> Result<(), Problem> {
    match value {
        Some(v) if v.chars().count() > 1024 => {
            Err(Problem::bad_request(field, format!("{field} must have at most 1024 characters")))
        }
        _ => Ok(()),
    }
}

/// Konnect labels: at most 50; keys of 1..63 characters that do not start with `kong`,
/// `konnect`, `mesh`, `kic` or `_`; values of 1..63 characters, alphanumeric at both ends, `-`,
/// `_` and `.` inside.
pub fn labels(field: &str, labels: &Labels) -> Result<(), Problem> {
    if labels.len() > 50 {
        return Err(Problem::bad_request(field, "at most 50 labels"));
    }
    let valid_value = |s: &str| {
        let b = s.as_bytes();
        !b.is_empty()
            && b.len() <= 63
            && b[0].is_ascii_alphanumeric()
            && b[b.len() - 1].is_ascii_alphanumeric()
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
    let len = value.chars().count();
    if (1..=256).contains(&len) {
        Ok(())
    } else {
        Err(Problem::bad_request(field, format!("{field} must have between 1 and 256 characters")))
    }
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
