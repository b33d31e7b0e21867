//! Reading requests: JSON bodies that name the offending field, and Konnect's deepObject query
//! parameters (`filter[key][eq]=…`, `page[size]=…`).

use axum::extract::{FromRequest, FromRequestParts, Request};
use axum::http::request::Parts;
use axum::http::{header, StatusCode};
use base64::Engine as _;
use credits::limits::{DEFAULT_PAGE_SIZE, MAX_FILTER_VALUES, MAX_PAGE_SIZE};
use serde::de::DeserializeOwned;

use super::problem::Problem;
pub use crate::query::{CursorPage, CursorPosition, Page, StringFilter};

/// The largest request body the ledger reads unless `--max-body-bytes` says otherwise.
pub use credits::limits::DEFAULT_MAX_BODY_BYTES;

/// A JSON body; unknown fields and malformed values are a 400 naming the field.
pub struct Json<T>(pub T);

impl<S: Send + Sync, T: DeserializeOwned> FromRequest<S> for Json<T> {
    type Rejection = Problem;

    async fn from_request(req: Request, state: &S) -> Result<Self, Problem> {
        let content_type =
            req.headers().get(header::CONTENT_TYPE).and_then(|v| v.to_str().ok()).unwrap_or("").to_owned();
        let bytes = read_body(req, state).await?;
        if !is_json(&content_type) {
            // Konnect answers 400 (not 415) to a body that is not declared JSON.
            return Err(Problem::bad_request("Content-Type", "expected Content-Type: application/json").in_header());
        }
        parse_json(&bytes).map(Json)
    }
}

pub fn is_json(content_type: &str) -> bool {
    let essence = content_type.split(';').next().unwrap_or("").trim().to_ascii_lowercase();
    essence == "application/json" || (essence.starts_with("application/") && essence.ends_with("+json"))
}

pub async fn read_body<S: Send + Sync>(req: Request, state: &S) -> Result<bytes::Bytes, Problem> {
    bytes::Bytes::from_request(req, state).await.map_err(|e| {
        if e.status() == StatusCode::PAYLOAD_TOO_LARGE {
            Problem::new(
                StatusCode::PAYLOAD_TOO_LARGE,
                "the request body is larger than this ledger accepts (--max-body-bytes)",
            )
        } else {
            Problem::new(StatusCode::BAD_REQUEST, format!("could not read the request body: {e}"))
        }
    })
}

/// Deserialises JSON, reporting the path of the field that failed; a NUL in any text is refused.
pub fn parse_json<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, Problem> {
    refuse_nul_in_json(bytes)?;
    parse_json_with_nul(bytes)
}

/// [`parse_json`] for a body whose text may hold NUL where it is only stored as JSON (escaped);
/// the caller checks the other fields with [`refuse_nul_in_value`].
pub fn parse_json_with_nul<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, Problem> {
    let de = &mut serde_json::Deserializer::from_slice(bytes);
    serde_path_to_error::deserialize(de).map_err(|err| {
        let path = err.path().to_string();
        let message = err.inner().to_string();
        // The field at fault is x itself. For "unknown field `x`, expected …" the path already
        // ends with x (the key was read before it was refused); for "missing field `x`" the path
        // is the object that lacks it.
        let field = match message.split('`').nth(1) {
            // Broken JSON has no field to blame (the path would be a placeholder such as "?").
            _ if err.inner().is_syntax() || err.inner().is_eof() => "body".to_owned(),
            Some(name)
                if path == "." && (message.starts_with("unknown field") || message.starts_with("missing field")) =>
            {
                name.to_owned()
            }
            Some(name) if message.starts_with("missing field") => format!("{path}.{name}"),
            _ if path == "." => "body".to_owned(),
            _ => path,
        };
        let detail = message.split(" at line ").next().unwrap_or(&message).to_owned();
        Problem::bad_request(field, detail)
    })
}

const NUL_DETAIL: &str = "text must not contain the NUL character (U+0000)";

/// The databases cannot store U+0000 in text (PostgreSQL refuses it): a body that carries one,
/// in any string or key, is a 400 naming where, not a failed transaction. Valid JSON can only
/// spell it `\u0000`, so a body without that byte sequence (every real one) is not parsed twice.
fn refuse_nul_in_json(bytes: &[u8]) -> Result<(), Problem> {
    if memchr::memmem::find(bytes, br"\u0000").is_none() {
        return Ok(());
    }
    // Broken JSON is reported by the parse that follows.
    let Ok(value) = serde_json::from_slice::<serde_json::Value>(bytes) else { return Ok(()) };
    refuse_nul_in_value(&value)
}

/// [`parse_json`]'s NUL check on a parsed value.
pub fn refuse_nul_in_value(value: &serde_json::Value) -> Result<(), Problem> {
    match path_of_nul(value, String::new()) {
        Some(path) => Err(Problem::bad_request(if path.is_empty() { "body".to_owned() } else { path }, NUL_DETAIL)),
        // The sequence was text (an escaped backslash followed by "u0000").
        None => Ok(()),
    }
}

/// Where the first NUL is, spelt as serde_path_to_error spells paths (`subjects[0].subject`).
fn path_of_nul(value: &serde_json::Value, at: String) -> Option<String> {
    use serde_json::Value;
    let member = |key: &str| if at.is_empty() { key.to_owned() } else { format!("{at}.{key}") };
    match value {
        Value::String(s) => s.contains('\0').then_some(at),
        Value::Array(items) => items.iter().enumerate().find_map(|(i, v)| path_of_nul(v, format!("{at}[{i}]"))),
        Value::Object(map) => {
            map.iter().find_map(|(k, v)| if k.contains('\0') { Some(member(k)) } else { path_of_nul(v, member(k)) })
        }
        _ => None,
    }
}

/// The raw query parameters, in order.
pub struct Query(pub Vec<(String, String)>);

impl<S: Send + Sync> FromRequestParts<S> for Query {
    type Rejection = Problem;

    async fn from_request_parts(parts: &mut Parts, _state: &S) -> Result<Self, Problem> {
        let raw = parts.uri.query().unwrap_or("");
        let params: Vec<(String, String)> = form_urlencoded::parse(raw.as_bytes()).into_owned().collect();
        if let Some((name, _)) = params.iter().find(|(n, v)| n.contains('\0') || v.contains('\0')) {
            return Err(Problem::bad_request(name.clone(), NUL_DETAIL).in_query());
        }
        Ok(Query(params))
    }
}

impl Query {
    /// Rejects parameters other than `allowed` (exact names such as `filter[key][eq]`; a name
    /// ending in `[*]` admits any operator of that filter).
    pub fn only(&self, allowed: &[&str]) -> Result<(), Problem> {
        for (name, _) in &self.0 {
            let ok = allowed.iter().any(|a| match a.strip_suffix("[*]") {
                Some(prefix) => name == prefix || (name.starts_with(prefix) && name[prefix.len()..].starts_with('[')),
                None => a == name,
            });
            if !ok {
                return Err(Problem::bad_request(name.clone(), format!("unknown query parameter {name}")).in_query());
            }
        }
        Ok(())
    }

    pub fn get(&self, name: &str) -> Option<&str> {
        self.0.iter().rev().find(|(n, _)| n == name).map(|(_, v)| v.as_str())
    }

    /// `filter[field]…` as a string filter, if given (several operators combine with AND).
    pub fn string_filter(&self, field: &str, operators: &[&str]) -> Result<Option<StringFilter>, Problem> {
        let base = format!("filter[{field}]");
        let mut found = None;
        for (name, value) in &self.0 {
            let op = if *name == base {
                "eq"
            } else if let Some(op) =
                name.strip_prefix(&base).and_then(|r| r.strip_prefix('[')).and_then(|r| r.strip_suffix(']'))
            {
                op
            } else {
                continue;
            };
            if !operators.contains(&op) {
                return Err(Problem::bad_request(
                    name.clone(),
                    format!("unsupported operator {op:?}; use one of {operators:?}"),
                ));
            }
            let filter = match op {
                "eq" => StringFilter::Eq(value.clone()),
                "oeq" => StringFilter::OneOf(values_of(name, value)?),
                "neq" => StringFilter::Neq(value.clone()),
                "contains" => StringFilter::Contains(value.clone()),
                _ => StringFilter::ContainsAny(values_of(name, value)?),
            };
            // The schema lets a client combine operators on one field; all of them must hold.
            found = Some(match found {
                None => filter,
                Some(StringFilter::All(mut all)) => {
                    all.push(filter);
                    StringFilter::All(all)
                }
                Some(first) => StringFilter::All(vec![first, filter]),
            });
        }
        Ok(found)
    }

    /// Page pagination: `page[size]` (default 100, at most 1000) and `page[number]` (default 1).
    /// As Konnect's engine does, a size or number below 1 means the default and a size above the
    /// largest is the largest (the schema bounds neither); text that is no integer is a 400.
    pub fn page(&self) -> Result<Page, Problem> {
        let size = page_size(self.get("page[size]"))?;
        Ok(Page { size, number: integer_or(self.get("page[number]"), "page[number]", 1)? })
    }

    /// Cursor pagination: `page[size]` and at most one of `page[after]` / `page[before]`.
    pub fn cursor(&self) -> Result<CursorPage, Problem> {
        let size = page_size(self.get("page[size]"))?;
        // An empty cursor is no cursor (a client's unset member, serialised).
        let cursor = |name: &str| self.get(name).filter(|c| !c.is_empty()).map(|c| decode_cursor(name, c)).transpose();
        let (after, before) = (cursor("page[after]")?, cursor("page[before]")?);
        let position = match (after, before) {
            (Some(_), Some(_)) => {
                return Err(Problem::bad_request("page[before]", "give page[after] or page[before], not both"))
            }
            (Some(a), None) => CursorPosition::After(a),
            (None, Some(b)) => CursorPosition::Before(b),
            (None, None) => CursorPosition::Start,
        };
        Ok(CursorPage { size, position })
    }
}

/// The values of a list filter (`a,b,c`): at most [`MAX_FILTER_VALUES`], each bound to a query.
fn values_of(name: &str, value: &str) -> Result<Vec<String>, Problem> {
    let values: Vec<String> = value.split(',').map(str::trim).filter(|s| !s.is_empty()).map(str::to_owned).collect();
    if values.len() > MAX_FILTER_VALUES {
        return Err(Problem::bad_request(name, format!("{name} takes at most {MAX_FILTER_VALUES} values")));
    }
    Ok(values)
}

fn page_size(value: Option<&str>) -> Result<i64, Problem> {
    Ok(integer_or(value, "page[size]", DEFAULT_PAGE_SIZE)?.min(MAX_PAGE_SIZE))
}

/// An integer query parameter; absent or below 1 it is `default`. The schema's integers have no
/// bounds: one beyond i64 is i64::MAX (or, negative, the default) rather than a refusal.
fn integer_or(value: Option<&str>, field: &str, default: i64) -> Result<i64, Problem> {
    let Some(text) = value else { return Ok(default) };
    let digits = text.strip_prefix(['-', '+']).unwrap_or(text);
    if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return Err(Problem::bad_request(field, format!("{field} must be an integer, got {text:?}")));
    }
    let n = text.parse::<i64>().unwrap_or(if text.starts_with('-') { i64::MIN } else { i64::MAX });
    Ok(if n >= 1 { n } else { default })
}

/// Cursors are opaque: base64url of `c1:<sequence number>`.
pub fn encode_cursor(seq: i64) -> String {
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(format!("c1:{seq}"))
}

fn decode_cursor(field: &str, cursor: &str) -> Result<i64, Problem> {
    base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(cursor)
        .ok()
        .and_then(|b| String::from_utf8(b).ok())
        .and_then(|s| s.strip_prefix("c1:").and_then(|n| n.parse::<i64>().ok()))
        .filter(|n| *n >= 0)
        .ok_or_else(|| Problem::bad_request(field, format!("{field} is not a cursor this API issued")))
}

/// A path or query identifier that must be a ULID.
pub fn ulid_param(field: &str, value: &str) -> Result<String, Problem> {
    let valid = value.len() == 26
        && value.as_bytes()[0] <= b'7'
        && value
            .bytes()
            .all(|b| b.is_ascii_digit() || (b.is_ascii_uppercase() && !matches!(b, b'I' | b'L' | b'O' | b'U')));
    if valid {
        Ok(value.to_owned())
    } else {
        Err(Problem::bad_request(field, format!("{field} must be a ULID, got {value:?}")))
    }
}
