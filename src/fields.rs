//! Configuration errors and the validators of single fields, shared by every part of the
//! configuration (`config`, `pricing`). A leaf: it knows no configuration type.

use std::fmt;

use credits::Amount;

/// A configuration that cannot be used, naming the offending field.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ConfigError {
    pub field: String,
    pub message: String,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "invalid configuration at {}: {}", self.field, self.message)
    }
}

pub fn error(field: &str, message: impl Into<String>) -> ConfigError {
    ConfigError { field: field.to_owned(), message: message.into() }
}

pub fn bounded(field: &str, value: Option<u64>, default: u64, min: u64, max: u64) -> Result<u64, ConfigError> {
    let v = value.unwrap_or(default);
    if (min..=max).contains(&v) {
        Ok(v)
    } else {
        Err(error(field, format!("must be between {min} and {max}, got {v}")))
    }
}

pub fn to_u32(v: u64) -> u32 {
    u32::try_from(v).unwrap_or(u32::MAX)
}

/// Header names are lower-case tokens (HTTP/2 and proxy-wasm hosts use lower case).
pub fn header_name(field: &str, name: &str) -> Result<String, ConfigError> {
    let ok = !name.is_empty()
        && name.len() <= 128
        && name.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'_');
    if ok {
        Ok(name.to_owned())
    } else {
        Err(error(field, format!("{name:?} is not a lower-case header name")))
    }
}

pub fn status(field: &str, value: Option<u64>, default: u16) -> Result<u16, ConfigError> {
    let v = bounded(field, value, u64::from(default), 400, 499)?;
    Ok(u16::try_from(v).unwrap_or(default))
}

/// A non-negative amount within the bound every edge enforces (`credits::limits::MAX_AMOUNT`,
/// at most `MAX_AMOUNT_SCALE` decimal places): what the ledger would refuse, the filter refuses
/// when it is configured.
pub fn amount(field: &str, text: &str) -> Result<Amount, ConfigError> {
    let a = Amount::parse_bounded(text).map_err(|e| error(field, e.to_string()))?;
    if a.is_negative() {
        return Err(error(field, "must not be negative"));
    }
    Ok(a)
}
