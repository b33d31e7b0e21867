//! Errors as `application/problem+json` (RFC 9457), shaped like Konnect's: status, title, type,
//! instance, detail, and for bad requests the offending parameters.

use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use serde::Serialize;
use serde_json::Value;

use crate::store::StoreError;

#[derive(Clone, Debug)]
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

    /// A request that is well formed but whose booking cannot be kept exactly (its amounts would
    /// overflow what the ledger sums): 422, nothing booked.
    pub fn overflow(err: impl std::fmt::Display) -> Self {
        Problem::new(StatusCode::UNPROCESSABLE_ENTITY, format!("nothing was booked: {err}"))
    }

    /// A credit model error of an operation: an overflow is a 422, anything else a 400 naming
    /// `field`.
    pub fn model(field: &str, err: impl Into<credits::ModelError>) -> Self {
        match err.into() {
            credits::ModelError::AmountOverflow(e) => Problem::overflow(e),
            other => Problem::bad_request(field, other.to_string()),
        }
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

/// Every error answer is a problem: one that axum wrote itself (a path parameter that is not
/// UTF-8 once percent-decoded, say) is rewritten as one, naming the parameter axum names.
pub async fn ensure_problem(response: Response) -> Response {
    let status = response.status();
    let content_type = response.headers().get(header::CONTENT_TYPE).and_then(|v| v.to_str().ok()).unwrap_or("");
    if !(status.is_client_error() || status.is_server_error()) || content_type == "application/problem+json" {
        return response;
    }
    let bytes = axum::body::to_bytes(response.into_body(), 64 * 1024).await.unwrap_or_default();
    let text = String::from_utf8_lossy(&bytes).trim().to_owned();
    let detail = if text.is_empty() { status.canonical_reason().unwrap_or("error").to_owned() } else { text };
    // axum names the parameter in backticks: "Invalid URL: Invalid UTF-8 in `customerId`".
    let field = detail.split('`').nth(1).filter(|_| status == StatusCode::BAD_REQUEST).map(str::to_owned);
    Problem { field, ..Problem::new(status, detail) }.into_response()
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
