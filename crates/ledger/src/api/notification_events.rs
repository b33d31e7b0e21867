//! `GET /v3/openmeter/notification/events`: what the rules fired and how each channel's
//! delivery stands, newest first, cursor-paginated.

use axum::extract::{Path, State};
use serde::Serialize;
use serde_json::Value;
use utoipa::ToSchema;

use super::fields::timestamp;
use super::problem::{ApiResult, Problem};
use super::request::{ulid_param, Query};
use super::transactions::{page_link, CursorMeta, CursorMetaPage};
use super::AppState;
use crate::store::outbox::{self, DeliveryRecord, EventFilters, EventRecord, PENDING};

#[derive(Serialize, ToSchema)]
pub struct DeliveryView {
    pub channel_id: String,
    /// `pending`, `success` or `failed`.
    pub status: String,
    pub attempts: i64,
    /// The receiver's HTTP status on the last attempt, if it answered.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub last_status: Option<i64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub last_error: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub last_attempt_at: Option<String>,
    /// When a pending delivery is tried next.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub next_attempt_at: Option<String>,
}

#[derive(Serialize, ToSchema)]
pub struct NotificationEventView {
    pub id: String,
    #[serde(rename = "type")]
    pub kind: String,
    pub created_at: String,
    pub rule_id: String,
    pub customer_id: String,
    /// The body every delivery posts.
    #[schema(value_type = Object)]
    pub payload: Value,
    pub deliveries: Vec<DeliveryView>,
}

#[derive(Serialize, ToSchema)]
pub struct NotificationEventPage {
    pub data: Vec<NotificationEventView>,
    pub meta: CursorMeta,
}

impl From<DeliveryRecord> for DeliveryView {
    fn from(d: DeliveryRecord) -> Self {
        let pending = d.status == PENDING;
        DeliveryView {
            channel_id: d.channel_id,
            status: d.status,
            attempts: d.attempts,
            last_status: d.last_status,
            last_error: d.last_error,
            last_attempt_at: d.last_attempt_at.map(timestamp),
            next_attempt_at: pending.then(|| timestamp(d.next_attempt_at)),
        }
    }
}

fn view(e: EventRecord) -> NotificationEventView {
    NotificationEventView {
        payload: serde_json::from_str(&e.payload).unwrap_or(Value::String(e.payload)),
        id: e.id,
        kind: e.kind,
        created_at: timestamp(e.created_at),
        rule_id: e.rule_id,
        customer_id: e.customer_id,
        deliveries: e.deliveries.into_iter().map(DeliveryView::from).collect(),
    }
}

fn id_filter(query: &Query, name: &str) -> ApiResult<Option<String>> {
    query.get(name).map(|v| ulid_param(name, v).map_err(Problem::in_query)).transpose()
}

#[utoipa::path(get, path = "/v3/openmeter/notification/events",
    params(("page[size]" = Option<i64>, Query), ("page[after]" = Option<String>, Query), ("page[before]" = Option<String>, Query),
        ("filter[type]" = Option<String>, Query), ("filter[rule_id]" = Option<String>, Query), ("filter[customer_id]" = Option<String>, Query)),
    responses((status = 200, body = NotificationEventPage), (status = 400), (status = 401), (status = 403)))]
pub async fn list(State(state): State<AppState>, query: Query) -> ApiResult<axum::Json<NotificationEventPage>> {
    query.only(&[
        "page[size]",
        "page[after]",
        "page[before]",
        "filter[type]",
        "filter[rule_id]",
        "filter[customer_id]",
    ])?;
    let page = query.cursor()?;
    let filters = EventFilters {
        kind: query.get("filter[type]").map(str::to_owned),
        rule_id: id_filter(&query, "filter[rule_id]")?,
        customer_id: id_filter(&query, "filter[customer_id]")?,
        id: None,
    };
    let mut conn = state.db.pool().acquire().await?;
    let (events, has_older, has_newer) = outbox::list(&mut conn, &filters, page).await?;
    let path = "/v3/openmeter/notification/events";
    let next = match (has_older, events.last()) {
        (true, Some(last)) => Some(page_link(path, &query, page.size, ("page[after]", last.seq))),
        _ => None,
    };
    let previous = match (has_newer, events.first()) {
        (true, Some(first)) => Some(page_link(path, &query, page.size, ("page[before]", first.seq))),
        _ => None,
    };
    Ok(axum::Json(NotificationEventPage {
        data: events.into_iter().map(view).collect(),
        meta: CursorMeta { page: CursorMetaPage { size: page.size, next, previous } },
    }))
}

#[utoipa::path(get, path = "/v3/openmeter/notification/events/{eventId}", params(("eventId" = String, Path)),
    responses((status = 200, body = NotificationEventView), (status = 400), (status = 401), (status = 403), (status = 404)))]
pub async fn get(
    State(state): State<AppState>,
    Path(id): Path<String>,
) -> ApiResult<axum::Json<NotificationEventView>> {
    let id = ulid_param("eventId", &id).map_err(|p| Problem { source: Some("path"), ..p })?;
    let filters = EventFilters { kind: None, rule_id: None, customer_id: None, id: Some(id.clone()) };
    let page = crate::query::CursorPage { size: 1, position: crate::query::CursorPosition::Start };
    let mut conn = state.db.pool().acquire().await?;
    let (mut events, _, _) = outbox::list(&mut conn, &filters, page).await?;
    let event = events.pop().ok_or_else(|| Problem::not_found("notification event", &id))?;
    Ok(axum::Json(view(event)))
}
