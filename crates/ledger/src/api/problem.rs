//! Errors as `application/problem+json` (RFC 9457), shaped like Konnect's: status, title, type,
//! instance, detail, and for bad requests the offending parameters.

use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use serde::Serialize;
use serde_json::Value;

use crate::store::StoreError;

#[derive(Debug)]
pub struct Problem {
    pub status: StatusCode,
    pub detail: String,
    /// The request field or parameter at fault, if one is.
    pub field: Option<String>,
    /// Extra members of the problem object (e.g. the balance a charge could not use).
    pub extra: serde_json::Map<String, Value>,
    /// Where `field` was sent (`query`, `path`, `body`) when its name does not tell.
    pub source: Option<&'static str>,
}

#[derive(Serialize, utoipa::ToSchema)]
pub struct InvalidParameter {
    pub field: String,
    pub reason: String,
    pub source: String,
}

impl Problem {
    pub fn new(status: StatusCode, detail: impl Into<String>) -> Self {
        Problem { status, detail: detail.into(), field: None, extra: serde_json::Map::new(), source: None }
    }

    /// A bad query parameter (whatever its name).
    pub fn in_query(mut self) -> Self {
        self.source = Some("query");
        self
    }

    /// A bad request header.
    pub fn in_header(mut self) -> Self {
        self.source = Some("header");
        self
    }

    pub fn bad_request(field: impl Into<String>, detail: impl Into<String>) -> Self {
        Problem { field: Some(field.into()), ..Problem::new(StatusCode::BAD_REQUEST, detail) }
    }

    pub fn not_found(what: &str, id: &str) -> Self {
        Problem::new(StatusCode::NOT_FOUND, format!("{what} [{id}] was not found"))
    }

    pub fn conflict(field: impl Into<String>, detail: impl Into<String>) -> Self {
        Problem { field: Some(field.into()), ..Problem::new(StatusCode::CONFLICT, detail) }
    }

    pub fn with(mut self, key: &str, value: impl Into<Value>) -> Self {
        self.extra.insert(key.to_owned(), value.into());
        self
    }

    pub fn body(&self) -> Value {
        let title = self.status.canonical_reason().unwrap_or("Error");
        let mut body = serde_json::json!({
            "type": format!("https://httpstatuses.com/{}", self.status.as_u16()),
            "status": self.status.as_u16(),
            "title": title,
            "detail": self.detail,
            "instance": format!("urn:credits-ledger:problem:{}", ulid::Ulid::new()),
        });
        if let (Some(field), Value::Object(map)) = (&self.field, &mut body) {
            map.insert("field".into(), Value::String(field.clone()));
            if self.status == StatusCode::BAD_REQUEST {
                let source = if let Some(source) = self.source {
                    source
                } else if field.starts_with("filter[")
                    || field.starts_with("page[")
                    || field == "timestamp"
                    || field == "sort"
                {
                    "query"
                } else if field == "customerId" || field == "creditGrantId" {
                    "path"
                } else {
                    "body"
                };
                map.insert(
                    "invalid_parameters".into(),
                    serde_json::json!([{ "field": field, "reason": self.detail, "source": source }]),
                );
            }
        }
        if let Value::Object(map) = &mut body {
            map.extend(self.extra.clone());
        }
        body
    }
}

impl IntoResponse for Problem {
    fn into_response(self) -> Response {
        let mut response = (self.status, self.body().to_string()).into_response();
        response.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static("application/problem+json"));
        response
    }
}

impl From<StoreError> for Problem {
    fn from(err: StoreError) -> Self {
        tracing::error!(error = %err, "store error");
        Problem::new(StatusCode::INTERNAL_SERVER_ERROR, "the ledger could not complete the request; nothing was booked")
    }
}

impl From<sqlx::Error> for Problem {
    fn from(err: sqlx::Error) -> Self {
        Problem::from(StoreError::Sql(err))
    }
}

pub type ApiResult<T> = Result<T, Problem>;
