//! `/v3/openmeter/notification/channels`: webhook endpoints that notification events are
//! delivered to, signed with the channel's secret (Standard Webhooks).

use axum::extract::{Path, State};
use axum::http::{HeaderName, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use super::customers::{PageMeta, PaginatedMeta};
use super::fields::{self, timestamp};
use super::problem::{ApiResult, Problem};
use super::request::{ulid_param, Json, Query};
use super::AppState;
use crate::notify::signature;
use crate::store::channels::{self, ChannelRecord, Headers};
use crate::store::new_id;

#[derive(Deserialize, Serialize, ToSchema, Clone, Copy, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum ChannelType {
    Webhook,
}

#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ChannelRequest {
    #[serde(rename = "type")]
    pub kind: ChannelType,
    pub name: String,
    /// `http` or `https`, without credentials.
    pub url: String,
    #[serde(default)]
    pub custom_headers: Headers,
    /// `whsec_` + base64 of 24..64 bytes; generated on create when absent, kept on replace.
    pub signing_secret: Option<String>,
}

#[derive(Serialize, ToSchema)]
pub struct ChannelView {
    pub id: String,
    #[serde(rename = "type")]
    pub kind: ChannelType,
    pub name: String,
    pub url: String,
    pub custom_headers: Headers,
    pub signing_secret: String,
    pub created_at: String,
    pub updated_at: String,
}

#[derive(Serialize, ToSchema)]
pub struct ChannelPage {
    pub data: Vec<ChannelView>,
    pub meta: PaginatedMeta,
}

impl From<ChannelRecord> for ChannelView {
    fn from(c: ChannelRecord) -> Self {
        ChannelView {
            id: c.id,
            kind: ChannelType::Webhook,
            name: c.name,
            url: c.url,
            custom_headers: c.custom_headers,
            signing_secret: c.signing_secret,
            created_at: timestamp(c.created_at),
            updated_at: timestamp(c.updated_at),
        }
    }
}

/// Custom headers per channel, and the longest value.
const MAX_HEADERS: usize = 20;
const MAX_HEADER_VALUE: usize = 1024;
const MAX_URL: usize = 2048;
/// Headers the ledger sets itself (or HTTP owns): a channel cannot override them.
const RESERVED_HEADERS: &[&str] = &[
    "webhook-id",
    "webhook-timestamp",
    "webhook-signature",
    "content-type",
    "content-length",
    "host",
    "transfer-encoding",
    "connection",
    "te",
    "trailer",
    "upgrade",
    "keep-alive",
    "proxy-connection",
];

/// An `http` or `https` URL with a host and no user name, password or fragment.
pub fn webhook_url(field: &str, text: &str) -> ApiResult<String> {
    let bad = |why: &str| Problem::bad_request(field, format!("{field} {why}"));
    if text.len() > MAX_URL {
        return Err(bad(&format!("must have at most {MAX_URL} characters")));
    }
    let url = reqwest::Url::parse(text).map_err(|e| bad(&format!("is not a URL: {e}")))?;
    if !matches!(url.scheme(), "http" | "https") {
        return Err(bad("must use http or https"));
    }
    if url.host_str().is_none_or(str::is_empty) {
        return Err(bad("must name a host"));
    }
    if !url.username().is_empty() || url.password().is_some() {
        return Err(bad("must not carry credentials (put them in custom_headers)"));
    }
    if url.fragment().is_some() {
        return Err(bad("must not have a fragment"));
    }
    Ok(url.to_string())
}

/// Header names in lower case, each a valid HTTP header that the ledger does not set itself.
fn custom_headers(headers: Headers) -> ApiResult<Headers> {
    if headers.len() > MAX_HEADERS {
        return Err(Problem::bad_request("custom_headers", format!("at most {MAX_HEADERS} custom headers")));
    }
    let mut out = Headers::new();
    for (name, value) in headers {
        let field = format!("custom_headers.{name}");
        let parsed = HeaderName::from_bytes(name.as_bytes())
            .map_err(|_| Problem::bad_request(&field, format!("{name:?} is not an HTTP header name")))?;
        if RESERVED_HEADERS.contains(&parsed.as_str()) {
            return Err(Problem::bad_request(&field, format!("the ledger sets {} itself", parsed.as_str())));
        }
        if value.len() > MAX_HEADER_VALUE
            || HeaderValue::from_str(&value).is_err()
            || value.chars().any(char::is_control)
        {
            return Err(Problem::bad_request(
                &field,
                format!("header values are visible text of at most {MAX_HEADER_VALUE} characters"),
            ));
        }
        if out.insert(parsed.as_str().to_owned(), value).is_some() {
            return Err(Problem::bad_request(&field, format!("{name:?} is given twice")));
        }
    }
    Ok(out)
}

fn secret(given: Option<String>, current: Option<String>) -> ApiResult<String> {
    match (given, current) {
        (Some(s), _) => {
            signature::key(&s).map_err(|e| Problem::bad_request("signing_secret", format!("signing_secret {e}")))?;
            Ok(s)
        }
        (None, Some(current)) => Ok(current),
        (None, None) => signature::generate().map_err(|e| {
            tracing::error!(error = %e, "no random source for a signing secret");
            Problem::new(StatusCode::INTERNAL_SERVER_ERROR, "could not generate a signing secret")
        }),
    }
}

/// The record a request describes; `current` is the channel it replaces, if any.
fn record(
    req: ChannelRequest,
    current: Option<ChannelRecord>,
    now: chrono::DateTime<chrono::Utc>,
) -> ApiResult<ChannelRecord> {
    fields::name("name", &req.name)?;
    let url = webhook_url("url", &req.url)?;
    let custom_headers = custom_headers(req.custom_headers)?;
    let signing_secret = secret(req.signing_secret, current.as_ref().map(|c| c.signing_secret.clone()))?;
    Ok(ChannelRecord {
        id: current.as_ref().map_or_else(new_id, |c| c.id.clone()),
        name: req.name,
        url,
        custom_headers,
        signing_secret,
        created_at: current.as_ref().map_or(now, |c| c.created_at),
        updated_at: now,
        deleted_at: None,
    })
}

fn channel_param(id: &str) -> ApiResult<String> {
    ulid_param("channelId", id).map_err(|p| Problem { source: Some("path"), ..p })
}

#[utoipa::path(post, path = "/v3/openmeter/notification/channels", request_body = ChannelRequest,
    responses((status = 201, body = ChannelView), (status = 400), (status = 401), (status = 403)))]
pub async fn create(State(state): State<AppState>, Json(req): Json<ChannelRequest>) -> ApiResult<Response> {
    let mut w = state.db.begin_write().await?;
    let now = state.db.now(&mut w.tx).await?;
    let channel = record(req, None, now)?;
    channels::insert(&mut w.tx, &channel).await?;
    w.commit().await?;
    Ok((StatusCode::CREATED, axum::Json(ChannelView::from(channel))).into_response())
}

#[utoipa::path(get, path = "/v3/openmeter/notification/channels",
    params(("page[size]" = Option<i64>, Query), ("page[number]" = Option<i64>, Query)),
    responses((status = 200, body = ChannelPage), (status = 400), (status = 401), (status = 403)))]
pub async fn list(State(state): State<AppState>, query: Query) -> ApiResult<axum::Json<ChannelPage>> {
    query.only(&["page[size]", "page[number]"])?;
    let page = query.page()?;
    let mut conn = state.db.pool().acquire().await?;
    let (items, total) = channels::list(&mut conn, page.size, page.offset()).await?;
    Ok(axum::Json(ChannelPage {
        data: items.into_iter().map(ChannelView::from).collect(),
        meta: PaginatedMeta { page: PageMeta { number: page.number, size: page.size, total } },
    }))
}

#[utoipa::path(get, path = "/v3/openmeter/notification/channels/{channelId}", params(("channelId" = String, Path)),
    responses((status = 200, body = ChannelView), (status = 400), (status = 401), (status = 403), (status = 404)))]
pub async fn get(State(state): State<AppState>, Path(id): Path<String>) -> ApiResult<axum::Json<ChannelView>> {
    let id = channel_param(&id)?;
    let mut conn = state.db.pool().acquire().await?;
    let channel = channels::get(&mut conn, &id).await?.ok_or_else(|| Problem::not_found("channel", &id))?;
    Ok(axum::Json(channel.into()))
}

#[utoipa::path(put, path = "/v3/openmeter/notification/channels/{channelId}", params(("channelId" = String, Path)),
    request_body = ChannelRequest,
    responses((status = 200, body = ChannelView), (status = 400), (status = 401), (status = 403), (status = 404)))]
pub async fn update(
    State(state): State<AppState>,
    Path(id): Path<String>,
    Json(req): Json<ChannelRequest>,
) -> ApiResult<axum::Json<ChannelView>> {
    let id = channel_param(&id)?;
    let mut w = state.db.begin_write().await?;
    let now = state.db.now(&mut w.tx).await?;
    let current = channels::get(&mut w.tx, &id).await?.ok_or_else(|| Problem::not_found("channel", &id))?;
    let channel = record(req, Some(current), now)?;
    channels::update(&mut w.tx, &channel).await?;
    w.commit().await?;
    Ok(axum::Json(channel.into()))
}

#[utoipa::path(delete, path = "/v3/openmeter/notification/channels/{channelId}", params(("channelId" = String, Path)),
    responses((status = 204), (status = 400), (status = 401), (status = 403), (status = 404),
        (status = 409, description = "rules still deliver to the channel")))]
pub async fn delete(State(state): State<AppState>, Path(id): Path<String>) -> ApiResult<StatusCode> {
    let id = channel_param(&id)?;
    let mut w = state.db.begin_write().await?;
    let now = state.db.now(&mut w.tx).await?;
    channels::get(&mut w.tx, &id).await?.ok_or_else(|| Problem::not_found("channel", &id))?;
    let rules = channels::used_by(&mut w.tx, &id).await?;
    if !rules.is_empty() {
        return Err(Problem::new(
            StatusCode::CONFLICT,
            format!("rules [{}] deliver to this channel", rules.join(", ")),
        )
        .with("rules", rules));
    }
    channels::delete(&mut w.tx, &id, now).await?;
    w.commit().await?;
    Ok(StatusCode::NO_CONTENT)
}
