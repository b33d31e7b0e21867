//! `/v3/openmeter/notification/rules`: what fires a notification event and where it goes.

use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use chrono::{DateTime, Utc};
use serde::Serialize;
use utoipa::ToSchema;

use super::customers::{PageMeta, PaginatedMeta};
use super::fields::{self, timestamp};
use super::problem::{ApiResult, Problem};
use super::request::{ulid_param, Json, Query};
use super::AppState;
use crate::rule::threshold::ThresholdKind;
use crate::rule::{RuleKind, RuleSpec};
use crate::store::rules::{self, RuleRecord};
use crate::store::{channels, new_id};

#[derive(Serialize, ToSchema)]
pub struct RuleView {
    pub id: String,
    #[serde(flatten)]
    #[schema(value_type = Object)]
    pub spec: RuleSpec,
    pub created_at: String,
    pub updated_at: String,
}

#[derive(Serialize, ToSchema)]
pub struct RulePage {
    pub data: Vec<RuleView>,
    pub meta: PaginatedMeta,
}

impl From<RuleRecord> for RuleView {
    fn from(r: RuleRecord) -> Self {
        RuleView { id: r.id, spec: r.spec, created_at: timestamp(r.created_at), updated_at: timestamp(r.updated_at) }
    }
}

pub const MAX_CHANNELS: usize = 10;
pub const MAX_THRESHOLDS: usize = 20;
pub const MAX_CUSTOMERS: usize = 1000;

/// ULIDs, none twice, at most `max`.
fn ids(field: &str, ids: &[String], max: usize) -> ApiResult<()> {
    if ids.len() > max {
        return Err(Problem::bad_request(field, format!("at most {max} {field}")));
    }
    for (i, id) in ids.iter().enumerate() {
        let item = format!("{field}[{i}]");
        ulid_param(&item, id)?;
        if ids[..i].contains(id) {
            return Err(Problem::bad_request(item, format!("{id} is listed twice")));
        }
    }
    Ok(())
}

fn thresholds(spec: &RuleSpec) -> ApiResult<()> {
    if spec.currency.is_none() {
        return Err(Problem::bad_request("currency", "a threshold rule watches one currency"));
    }
    if spec.before.is_some() {
        return Err(Problem::bad_request("before", "before belongs to credits.grant.expiring rules"));
    }
    if spec.thresholds.is_empty() || spec.thresholds.len() > MAX_THRESHOLDS {
        return Err(Problem::bad_request("thresholds", format!("give 1 to {MAX_THRESHOLDS} thresholds")));
    }
    for (i, t) in spec.thresholds.iter().enumerate() {
        let percent_out_of_range = t.kind == ThresholdKind::Percent
            && (t.value.is_negative() || t.value.decimal() > rust_decimal::Decimal::ONE_HUNDRED);
        if percent_out_of_range {
            return Err(Problem::bad_request(format!("thresholds[{i}].value"), "a percent is between 0 and 100"));
        }
        if spec.thresholds[..i].iter().any(|o| o.key() == t.key()) {
            return Err(Problem::bad_request(format!("thresholds[{i}]"), "this threshold is listed twice"));
        }
    }
    Ok(())
}

fn validate(spec: &RuleSpec) -> ApiResult<()> {
    fields::name("name", &spec.name)?;
    if spec.channels.is_empty() {
        return Err(Problem::bad_request("channels", "a rule delivers to at least one channel"));
    }
    ids("channels", &spec.channels, MAX_CHANNELS)?;
    ids("customer_ids", &spec.customer_ids, MAX_CUSTOMERS)?;
    match spec.kind {
        RuleKind::BalanceThreshold => thresholds(spec),
        RuleKind::GrantExpiring if spec.before.is_none() => {
            Err(Problem::bad_request("before", "an expiring rule needs before, e.g. P3D"))
        }
        RuleKind::GrantExpiring if !spec.thresholds.is_empty() => {
            Err(Problem::bad_request("thresholds", "thresholds belong to credits.balance.threshold rules"))
        }
        RuleKind::GrantExpiring => Ok(()),
    }
}

/// Every channel of a rule must exist (checked in the transaction that writes the rule).
async fn channels_exist(conn: &mut sqlx::AnyConnection, spec: &RuleSpec) -> ApiResult<()> {
    let live = channels::by_ids(conn, &spec.channels).await?;
    for (i, id) in spec.channels.iter().enumerate() {
        if live.get(id).is_none_or(|c| c.deleted_at.is_some()) {
            return Err(Problem::bad_request(format!("channels[{i}]"), format!("channel [{id}] was not found")));
        }
    }
    Ok(())
}

fn rule_param(id: &str) -> ApiResult<String> {
    ulid_param("ruleId", id).map_err(|p| Problem { source: Some("path"), ..p })
}

fn record(id: String, spec: RuleSpec, created_at: DateTime<Utc>, now: DateTime<Utc>) -> RuleRecord {
    RuleRecord { id, spec, created_at, updated_at: now }
}

#[utoipa::path(post, path = "/v3/openmeter/notification/rules", request_body(content = Object, description = "rule::RuleSpec"),
    responses((status = 201, body = RuleView), (status = 400), (status = 401), (status = 403)))]
pub async fn create(State(state): State<AppState>, Json(spec): Json<RuleSpec>) -> ApiResult<Response> {
    validate(&spec)?;
    let mut w = state.db.begin_write().await?;
    channels_exist(&mut w.tx, &spec).await?;
    let now = state.db.now(&mut w.tx).await?;
    let rule = record(new_id(), spec, now, now);
    rules::insert(&mut w.tx, &rule).await?;
    w.commit().await?;
    Ok((StatusCode::CREATED, axum::Json(RuleView::from(rule))).into_response())
}

#[utoipa::path(get, path = "/v3/openmeter/notification/rules",
    params(("page[size]" = Option<i64>, Query), ("page[number]" = Option<i64>, Query)),
    responses((status = 200, body = RulePage), (status = 400), (status = 401), (status = 403)))]
pub async fn list(State(state): State<AppState>, query: Query) -> ApiResult<axum::Json<RulePage>> {
    query.only(&["page[size]", "page[number]"])?;
    let page = query.page()?;
    let mut conn = state.db.pool().acquire().await?;
    let (items, total) = rules::list(&mut conn, page.size, page.offset()).await?;
    Ok(axum::Json(RulePage {
        data: items.into_iter().map(RuleView::from).collect(),
        meta: PaginatedMeta { page: PageMeta { number: page.number, size: page.size, total } },
    }))
}

#[utoipa::path(get, path = "/v3/openmeter/notification/rules/{ruleId}", params(("ruleId" = String, Path)),
    responses((status = 200, body = RuleView), (status = 400), (status = 401), (status = 403), (status = 404)))]
pub async fn get(State(state): State<AppState>, Path(id): Path<String>) -> ApiResult<axum::Json<RuleView>> {
    let id = rule_param(&id)?;
    let mut conn = state.db.pool().acquire().await?;
    let rule = rules::get(&mut conn, &id).await?.ok_or_else(|| Problem::not_found("rule", &id))?;
    Ok(axum::Json(rule.into()))
}

#[utoipa::path(put, path = "/v3/openmeter/notification/rules/{ruleId}", params(("ruleId" = String, Path)),
    request_body(content = Object, description = "rule::RuleSpec"),
    responses((status = 200, body = RuleView), (status = 400), (status = 401), (status = 403), (status = 404)))]
pub async fn update(
    State(state): State<AppState>,
    Path(id): Path<String>,
    Json(spec): Json<RuleSpec>,
) -> ApiResult<axum::Json<RuleView>> {
    let id = rule_param(&id)?;
    validate(&spec)?;
    let mut w = state.db.begin_write().await?;
    let current = rules::get(&mut w.tx, &id).await?.ok_or_else(|| Problem::not_found("rule", &id))?;
    channels_exist(&mut w.tx, &spec).await?;
    let now = state.db.now(&mut w.tx).await?;
    let rule = record(id, spec, current.created_at, now);
    rules::update(&mut w.tx, &rule).await?;
    w.commit().await?;
    Ok(axum::Json(rule.into()))
}

#[utoipa::path(delete, path = "/v3/openmeter/notification/rules/{ruleId}", params(("ruleId" = String, Path)),
    responses((status = 204), (status = 400), (status = 401), (status = 403), (status = 404)))]
pub async fn delete(State(state): State<AppState>, Path(id): Path<String>) -> ApiResult<StatusCode> {
    let id = rule_param(&id)?;
    let mut w = state.db.begin_write().await?;
    let now = state.db.now(&mut w.tx).await?;
    rules::get(&mut w.tx, &id).await?.ok_or_else(|| Problem::not_found("rule", &id))?;
    rules::delete(&mut w.tx, &id, now).await?;
    w.commit().await?;
    Ok(StatusCode::NO_CONTENT)
}
