//! `/v3/openmeter/events`: Konnect-compatible CloudEvents ingest, stored durably and
//! idempotently by (source, id).

use axum::extract::{Request, State};
use axum::http::{header, StatusCode};
use chrono::{DateTime, Utc};
use credits::limits::{MAX_EVENTS_PER_BATCH, MAX_EVENT_ID_LEN};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use utoipa::ToSchema;

use super::fields::{parse_timestamp, timestamp};
use super::problem::{ApiResult, Problem};
use super::request::{parse_json_with_nul, read_body, refuse_nul_in_value, ulid_param, Query, StringFilter};
use super::transactions::{page_link, CursorMeta, CursorMetaPage};
use super::AppState;
use crate::store::customers;
use crate::store::events::{self, EventClock, EventFilters, EventOrder, NewEvent, TimeBound};

#[derive(Deserialize, Serialize, ToSchema, Clone)]
#[serde(deny_unknown_fields)]
pub struct MeteringEvent {
    pub id: String,
    pub source: String,
    pub specversion: String,
    #[serde(rename = "type")]
    pub kind: String,
    /// Nullable in the schema, but its `enum` lists no `null` (OpenAPI 3.0.3: then `null` is not
    /// a valid value).
    #[serde(default, deserialize_with = "super::fields::non_null", skip_serializing_if = "Option::is_none")]
    pub datacontenttype: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub dataschema: Option<String>,
    pub subject: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Option<String>)]
    pub time: Option<DateTime<Utc>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub data: Option<serde_json::Map<String, Value>>,
}

#[derive(Deserialize)]
#[serde(untagged)]
enum OneOrMany {
    Many(Vec<Value>),
    One(Value),
}

fn validate(index: Option<usize>, event: &MeteringEvent) -> ApiResult<()> {
    let field = |name: &str| match index {
        Some(i) => format!("[{i}].{name}"),
        None => name.to_owned(),
    };
    for (name, value) in [
        ("id", &event.id),
        ("source", &event.source),
        ("specversion", &event.specversion),
        ("type", &event.kind),
        ("subject", &event.subject),
    ] {
        if value.is_empty() {
            return Err(Problem::bad_request(field(name), format!("{name} must not be empty")));
        }
    }
    for (name, value) in [("id", &event.id), ("source", &event.source)] {
        if value.len() > MAX_EVENT_ID_LEN {
            let detail = format!("{name} must have at most {MAX_EVENT_ID_LEN} bytes");
            return Err(Problem::bad_request(field(name), detail));
        }
    }
    if event.datacontenttype.as_deref().is_some_and(|c| c != "application/json") {
        return Err(Problem::bad_request(field("datacontenttype"), "datacontenttype must be application/json"));
    }
    if event.dataschema.as_deref().is_some_and(|s| !is_absolute_uri(s)) {
        return Err(Problem::bad_request(field("dataschema"), "dataschema must be an absolute URI"));
    }
    Ok(())
}

/// RFC 3986 `scheme ":" …` without spaces or control characters (CloudEvents' `dataschema` and
/// the schema's `format: uri` are absolute URIs).
fn is_absolute_uri(text: &str) -> bool {
    let Some((scheme, rest)) = text.split_once(':') else { return false };
    let mut chars = scheme.chars();
    chars.next().is_some_and(|c| c.is_ascii_alphabetic())
        && chars.all(|c| c.is_ascii_alphanumeric() || matches!(c, '+' | '-' | '.'))
        && !rest.is_empty()
        && !text.chars().any(|c| c.is_whitespace() || c.is_control())
}

/// Reads an ingest body as its content type says: one event or a batch; a 400 names the event and
/// field at fault.
pub fn parse_events(content_type: &str, bytes: &[u8]) -> ApiResult<Vec<MeteringEvent>> {
    let essence = content_type.split(';').next().unwrap_or("").trim().to_ascii_lowercase();
    let values = match essence.as_str() {
        "application/cloudevents+json" => vec![parse_json_with_nul::<Value>(bytes)?],
        "application/cloudevents-batch+json" => parse_json_with_nul::<Vec<Value>>(bytes)?,
        "application/json" => match parse_json_with_nul::<OneOrMany>(bytes)? {
            OneOrMany::Many(v) => v,
            OneOrMany::One(v) => vec![v],
        },
        _ => {
            return Err(Problem::bad_request(
                "Content-Type",
                "use application/cloudevents+json, application/cloudevents-batch+json or application/json",
            )
            .in_header())
        }
    };
    // An empty batch is valid by the schema (no minimum) and stores nothing.
    if values.len() > MAX_EVENTS_PER_BATCH {
        return Err(Problem::bad_request("body", format!("at most {MAX_EVENTS_PER_BATCH} events per request")));
    }
    let batch = values.len() > 1 || essence != "application/cloudevents+json";
    values
        .into_iter()
        .enumerate()
        .map(|(i, v)| {
            let index = batch.then_some(i);
            let in_event = |mut p: Problem| {
                if let (Some(i), Some(f)) = (index, p.field.as_deref()) {
                    // "body" means the element as a whole.
                    p.field = Some(if f == "body" { format!("[{i}]") } else { format!("[{i}].{f}") });
                }
                p
            };
            // `data` is stored as JSON text, where a NUL is escaped and kept; every other
            // attribute is a column of its own.
            if memchr::memmem::find(bytes, br"\u0000").is_some() {
                let mut attributes = v.clone();
                if let Some(map) = attributes.as_object_mut() {
                    map.remove("data");
                }
                refuse_nul_in_value(&attributes).map_err(in_event)?;
            }
            let event: MeteringEvent = parse_json_with_nul(v.to_string().as_bytes()).map_err(in_event)?;
            validate(index, &event)?;
            Ok(event)
        })
        .collect()
}

#[utoipa::path(post, path = "/v3/openmeter/events", request_body(content = MeteringEvent, content_type = "application/cloudevents+json",
        description = "one event; also accepted: application/cloudevents-batch+json (an array) and application/json (either)"),
    responses((status = 202, description = "stored; an event already seen by (source, id) is not stored again"), (status = 400), (status = 401)))]
pub async fn ingest(State(state): State<AppState>, req: Request) -> ApiResult<StatusCode> {
    let content_type = req.headers().get(header::CONTENT_TYPE).and_then(|v| v.to_str().ok()).unwrap_or("").to_owned();
    let bytes = read_body(req, &state).await?;
    let events = parse_events(&content_type, &bytes)?;
    let mut w = state.db.begin_write().await?;
    let now = state.db.now(&mut w.tx).await?;
    let mut stored = 0u64;
    for e in &events {
        let new = NewEvent {
            source: &e.source,
            id: &e.id,
            kind: &e.kind,
            subject: &e.subject,
            time: e.time,
            body: serde_json::to_string(e).unwrap_or_default(),
        };
        stored = stored.saturating_add(u64::from(events::insert(&mut w.tx, &new, now).await?));
    }
    w.commit().await?;
    state.metrics.add("events_stored", stored);
    state.metrics.add("events_duplicate", (events.len() as u64).saturating_sub(stored));
    Ok(StatusCode::ACCEPTED)
}

#[derive(Serialize, ToSchema)]
pub struct CustomerRef {
    pub id: String,
}

#[derive(Serialize, ToSchema)]
pub struct IngestedEvent {
    pub event: MeteringEvent,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub customer: Option<CustomerRef>,
    pub ingested_at: String,
    pub stored_at: String,
}

#[derive(Serialize, ToSchema)]
pub struct IngestedEventPage {
    pub data: Vec<IngestedEvent>,
    pub meta: CursorMeta,
}

#[utoipa::path(get, path = "/v3/openmeter/events",
    params(("page[size]" = Option<i64>, Query), ("page[after]" = Option<String>, Query), ("page[before]" = Option<String>, Query),
        ("filter[subject][eq]" = Option<String>, Query), ("filter[type][eq]" = Option<String>, Query),
        ("filter[customer_id][eq]" = Option<String>, Query), ("filter[time][gte]" = Option<String>, Query),
        ("sort" = Option<String>, Query, description = "time (default), ingested_at or stored_at; desc unless asc is given")),
    responses((status = 200, body = IngestedEventPage), (status = 400), (status = 401)))]
pub async fn list(State(state): State<AppState>, query: Query) -> ApiResult<axum::Json<IngestedEventPage>> {
    query.only(&[
        "page[size]",
        "page[after]",
        "page[before]",
        "sort",
        "filter[id][*]",
        "filter[source][*]",
        "filter[subject][*]",
        "filter[type][*]",
        "filter[customer_id][*]",
        "filter[time][*]",
        "filter[ingested_at][*]",
        "filter[stored_at][*]",
    ])?;
    let ops = ["eq", "oeq", "neq", "contains", "ocontains"];
    let filters = EventFilters {
        id: query.string_filter("id", &ops)?,
        source: query.string_filter("source", &ops)?,
        subject: query.string_filter("subject", &ops)?,
        kind: query.string_filter("type", &ops)?,
        customer_id: customer_filter(&query)?,
        times: time_bounds(&query)?,
    };
    let order = sort(query.get("sort"))?;
    let page = query.cursor()?;
    let mut conn = state.db.pool().acquire().await?;
    let (stored, has_older, has_newer) = events::list(&mut conn, state.db.backend(), &filters, order, page).await?;
    let mut data = Vec::with_capacity(stored.len());
    for e in &stored {
        let event: MeteringEvent = serde_json::from_str(&e.body).map_err(|err| {
            tracing::error!(error = %err, "stored event does not parse");
            Problem::new(StatusCode::INTERNAL_SERVER_ERROR, "a stored event could not be read")
        })?;
        let customer = customers::by_subject(&mut conn, &e.subject).await?.map(|id| CustomerRef { id });
        data.push(IngestedEvent {
            event,
            customer,
            ingested_at: timestamp(e.ingested_at),
            stored_at: timestamp(e.ingested_at),
        });
    }
    let path = "/v3/openmeter/events";
    let next = match (has_older, stored.last()) {
        (true, Some(last)) => Some(page_link(path, &query, page.size, ("page[after]", last.seq))),
        _ => None,
    };
    let previous = match (has_newer, stored.first()) {
        (true, Some(first)) => Some(page_link(path, &query, page.size, ("page[before]", first.seq))),
        _ => None,
    };
    Ok(axum::Json(IngestedEventPage {
        data,
        meta: CursorMeta { page: CursorMetaPage { size: page.size, next, previous } },
    }))
}

/// `sort`: `time` (default), `ingested_at` or `stored_at` (the same instant here), descending
/// unless `asc` follows. Of a comma-separated list the first attribute decides.
fn sort(value: Option<&str>) -> ApiResult<EventOrder> {
    let first = value.and_then(|v| v.split(',').next()).map(str::trim).unwrap_or("");
    let mut words = first.split_whitespace();
    let clock = match words.next() {
        None | Some("time") => EventClock::Time,
        Some("ingested_at") | Some("stored_at") => EventClock::Ingested,
        Some(other) => {
            return Err(Problem::bad_request(
                "sort",
                format!("cannot sort by {other:?}; use time, ingested_at or stored_at"),
            ))
        }
    };
    let descending = match (words.next(), words.next()) {
        (None | Some("desc"), None) => true,
        (Some("asc"), None) => false,
        _ => return Err(Problem::bad_request("sort", format!("sort {first:?} is not `attribute [asc|desc]`"))),
    };
    Ok(EventOrder { clock, descending })
}

/// `filter[customer_id]`: ULIDs with `eq`, `oeq` or `neq` (`oeq` is plain text in the schema: a
/// value that is no ULID matches nothing).
fn customer_filter(query: &Query) -> ApiResult<Option<StringFilter>> {
    let filter = query.string_filter("customer_id", &["eq", "oeq", "neq"])?;
    fn check(f: &StringFilter) -> ApiResult<()> {
        match f {
            // An empty value is how a client's empty filter object arrives in a deepObject query.
            StringFilter::Eq(v) | StringFilter::Neq(v) if v.is_empty() => Ok(()),
            StringFilter::Eq(v) | StringFilter::Neq(v) => ulid_param("filter[customer_id]", v).map(|_| ()),
            StringFilter::All(fs) => fs.iter().try_for_each(check),
            _ => Ok(()),
        }
    }
    filter.as_ref().map(check).transpose().map_err(Problem::in_query)?;
    Ok(filter)
}

/// `filter[time|ingested_at|stored_at]` = an instant, or `[eq|lt|lte|gt|gte]` = an instant.
fn time_bounds(query: &Query) -> ApiResult<Vec<TimeBound>> {
    let mut bounds = Vec::new();
    for (name, value) in &query.0 {
        let Some(rest) = name.strip_prefix("filter[") else { continue };
        let Some((field, op)) = rest.split_once(']') else { continue };
        let clock = match field {
            "time" => EventClock::Time,
            "ingested_at" | "stored_at" => EventClock::Ingested,
            _ => continue,
        };
        let op = match op {
            "" | "[eq]" => "=",
            "[lt]" => "<",
            "[lte]" => "<=",
            "[gt]" => ">",
            "[gte]" => ">=",
            _ => return Err(Problem::bad_request(name.clone(), "use eq, lt, lte, gt or gte").in_query()),
        };
        let at = parse_timestamp(name, value).map_err(Problem::in_query)?;
        bounds.push(TimeBound { clock, op, at });
    }
    Ok(bounds)
}
