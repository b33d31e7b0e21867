//! `/v3/openmeter/customers/{customerId}/credits/grants`: credit given to a customer.

use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use chrono::{DateTime, Utc};
use credits::limits::MAX_FEATURES_PER_GRANT;
use credits::{
    Amount, Currency, FeatureFilter, FeatureKey, FundingMethod, Grant, GrantId, GrantSpec, GrantStatus, IsoDuration,
    Priority, PurchaseTerms, SettlementStatus,
};
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use super::customers::{PageMeta, PaginatedMeta};
use super::fields::{self, timestamp};
use super::problem::{ApiResult, Problem};
use super::request::{is_json, parse_json, read_body, ulid_param, Json, Query};
use super::AppState;
use crate::api::customer_tx::CustomerTx;
use crate::store::books::Operation;
use crate::store::grants::{self, settlement_status_text, GrantRecord};
use crate::store::{new_id, Labels};

#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct PurchaseRequest {
    #[schema(value_type = String, example = "USD")]
    pub currency: Currency,
    #[schema(value_type = Option<String>, example = "1.0")]
    #[serde(default, deserialize_with = "fields::non_null")]
    pub per_unit_cost_basis: Option<Amount>,
    #[serde(default, deserialize_with = "fields::non_null")]
    pub availability_policy: Option<AvailabilityPolicy>,
}

#[derive(Deserialize, Serialize, ToSchema, Clone, Copy, Default)]
#[serde(rename_all = "snake_case")]
pub enum AvailabilityPolicy {
    #[default]
    OnCreation,
}

/// Konnect's tax configuration of a grant: kept and shown, not acted on by this ledger.
#[derive(Deserialize, Serialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct TaxConfig {
    #[serde(default, deserialize_with = "fields::non_null", skip_serializing_if = "Option::is_none")]
    pub behavior: Option<TaxBehavior>,
    #[serde(default, deserialize_with = "fields::non_null", skip_serializing_if = "Option::is_none")]
    pub tax_code: Option<TaxCode>,
}

#[derive(Deserialize, Serialize, ToSchema, Clone, Copy)]
#[serde(rename_all = "snake_case")]
pub enum TaxBehavior {
    Inclusive,
    Exclusive,
}

#[derive(Deserialize, Serialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct TaxCode {
    /// A ULID.
    pub id: String,
}

#[derive(Deserialize, Serialize, ToSchema, Default)]
#[serde(deny_unknown_fields)]
pub struct GrantFilters {
    #[serde(default)]
    #[schema(value_type = Vec<String>)]
    pub features: Vec<FeatureKey>,
}

#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateGrantRequest {
    pub name: String,
    #[serde(default, deserialize_with = "fields::non_null")]
    pub description: Option<String>,
    #[serde(default)]
    pub labels: Labels,
    #[schema(value_type = String, example = "none")]
    pub funding_method: FundingMethod,
    #[schema(value_type = String, example = "USD")]
    pub currency: Currency,
    #[schema(value_type = String, example = "100.00")]
    pub amount: Amount,
    #[serde(default, deserialize_with = "fields::non_null")]
    pub purchase: Option<PurchaseRequest>,
    #[serde(default, deserialize_with = "fields::non_null")]
    pub tax_config: Option<TaxConfig>,
    #[serde(default, deserialize_with = "fields::non_null")]
    pub filters: Option<GrantFilters>,
    #[serde(default, deserialize_with = "fields::non_null")]
    pub priority: Option<i64>,
    #[schema(value_type = Option<String>)]
    #[serde(default, deserialize_with = "fields::non_null")]
    pub effective_at: Option<DateTime<Utc>>,
    #[schema(value_type = Option<String>, example = "P30D")]
    #[serde(default, deserialize_with = "fields::non_null")]
    pub expires_after: Option<IsoDuration>,
    #[serde(default, deserialize_with = "fields::non_null")]
    pub key: Option<String>,
}

#[derive(Serialize, ToSchema)]
pub struct PurchaseView {
    pub currency: String,
    pub per_unit_cost_basis: String,
    pub amount: String,
    pub availability_policy: AvailabilityPolicy,
    pub settlement_status: String,
}

#[derive(Serialize, ToSchema)]
pub struct GrantView {
    pub id: String,
    pub name: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub description: Option<String>,
    pub labels: Labels,
    pub created_at: String,
    pub updated_at: String,
    pub funding_method: String,
    pub currency: String,
    pub amount: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub purchase: Option<PurchaseView>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tax_config: Option<serde_json::Value>,
    pub filters: GrantFilters,
    pub priority: u16,
    pub effective_at: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub key: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub expires_at: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub voided_at: Option<String>,
    #[schema(value_type = String, example = "active")]
    pub status: GrantStatus,
}

#[derive(Serialize, ToSchema)]
pub struct GrantPage {
    pub data: Vec<GrantView>,
    pub meta: PaginatedMeta,
}

pub fn view(record: &GrantRecord, now: DateTime<Utc>) -> GrantView {
    let g = &record.state.grant;
    GrantView {
        id: g.id.0.clone(),
        name: record.name.clone(),
        description: record.description.clone(),
        labels: record.labels.clone(),
        created_at: timestamp(g.created_at),
        updated_at: timestamp(record.updated_at),
        funding_method: g.funding.method().as_str().to_owned(),
        currency: g.currency.to_string(),
        amount: g.amount.to_string(),
        purchase: g.funding.purchase().map(|p| PurchaseView {
            currency: p.currency.to_string(),
            per_unit_cost_basis: p.per_unit_cost_basis.to_string(),
            amount: p.amount.to_string(),
            availability_policy: AvailabilityPolicy::OnCreation,
            settlement_status: settlement_status_text(p.settlement_status).to_owned(),
        }),
        tax_config: record.tax_config.clone(),
        filters: GrantFilters { features: g.features.features().to_vec() },
        priority: g.priority.get(),
        effective_at: timestamp(g.effective_at),
        key: record.key.clone(),
        expires_at: g.expires_at.map(timestamp),
        voided_at: g.voided_at.map(timestamp),
        status: g.status_at(now),
    }
}

fn validate(req: &CreateGrantRequest) -> ApiResult<Priority> {
    fields::name("name", &req.name)?;
    fields::description("description", req.description.as_deref())?;
    fields::labels("labels", &req.labels)?;
    if let Some(key) = &req.key {
        fields::key("key", key)?;
    }
    if let Some(code) = req.tax_config.as_ref().and_then(|t| t.tax_code.as_ref()) {
        ulid_param("tax_config.tax_code.id", &code.id)?;
    }
    if req.filters.as_ref().is_some_and(|f| f.features.len() > MAX_FEATURES_PER_GRANT) {
        return Err(Problem::bad_request(
            "filters.features",
            format!("at most {MAX_FEATURES_PER_GRANT} features per grant"),
        ));
    }
    if !fields::amount("amount", req.amount)?.is_positive() {
        return Err(Problem::bad_request("amount", "amount must be greater than zero"));
    }
    if let Some(basis) = req.purchase.as_ref().and_then(|p| p.per_unit_cost_basis) {
        fields::amount("purchase.per_unit_cost_basis", basis)?;
    }
    match (req.funding_method, &req.purchase) {
        (FundingMethod::None, Some(_)) => {
            Err(Problem::bad_request("purchase", "funding_method none takes no purchase terms"))
        }
        (FundingMethod::Invoice | FundingMethod::External, None) => Err(Problem::bad_request(
            "purchase",
            format!("funding_method {} requires purchase terms", req.funding_method.as_str()),
        )),
        (_, Some(p)) if p.per_unit_cost_basis.is_some_and(|b| !b.is_positive()) => {
            Err(Problem::bad_request("purchase.per_unit_cost_basis", "per_unit_cost_basis must be greater than zero"))
        }
        _ => Ok(()),
    }?;
    Priority::new(req.priority.unwrap_or(i64::from(Priority::DEFAULT.get())))
        .map_err(|e| Problem::bad_request("priority", e.to_string()))
}

fn customer_param(id: &str) -> ApiResult<String> {
    ulid_param("customerId", id)
}

#[utoipa::path(post, path = "/v3/openmeter/customers/{customerId}/credits/grants", params(("customerId" = String, Path)),
    request_body = CreateGrantRequest,
    responses((status = 201, body = GrantView), (status = 400), (status = 401), (status = 404), (status = 409)))]
pub async fn create(
    State(state): State<AppState>,
    Path(customer_id): Path<String>,
    Json(req): Json<CreateGrantRequest>,
) -> ApiResult<Response> {
    let customer_id = customer_param(&customer_id)?;
    let priority = validate(&req)?;
    let mut ctx = CustomerTx::begin(&state.db, &customer_id).await?;
    let now = ctx.now;
    if let Some(key) = &req.key {
        if grants::by_key(&mut ctx.w.tx, &customer_id, key).await?.is_some() {
            return Err(Problem::conflict("key", format!("a grant with key [{key}] already exists")));
        }
    }
    let spec = GrantSpec {
        currency: req.currency,
        amount: req.amount,
        funding_method: req.funding_method,
        purchase: req
            .purchase
            .map(|p| PurchaseTerms { currency: p.currency, per_unit_cost_basis: p.per_unit_cost_basis }),
        priority,
        effective_at: req.effective_at,
        expires_after: req.expires_after,
        features: FeatureFilter::only(req.filters.unwrap_or_default().features),
    };
    let grant = Grant::new(spec, GrantId(new_id()), now, 0).map_err(|e| match e {
        credits::ModelError::PurchaseOverflow => Problem::bad_request("purchase.per_unit_cost_basis", e.to_string()),
        e => Problem::bad_request("body", e.to_string()),
    })?;
    if grant.expires_at.is_some_and(|e| e <= now) {
        return Err(Problem::bad_request("expires_after", "the grant would already have expired"));
    }
    // RFC 3339 has four-digit years: an instant after 9999 could not be written back.
    if grant.expires_at.is_some_and(|e| chrono::Datelike::year(&e) > 9999) {
        return Err(Problem::bad_request("expires_after", "the grant would expire after the year 9999"));
    }
    let mut record = GrantRecord {
        state: credits::GrantState::new(grant),
        customer_id: customer_id.clone(),
        key: req.key,
        name: req.name,
        description: req.description,
        labels: req.labels,
        tax_config: req.tax_config.map(|t| serde_json::to_value(t).unwrap_or_default()),
        updated_at: now,
    };
    record.state.grant.seq = grants::insert(&mut ctx.w.tx, &record).await?;
    let entries = ctx.book().add_grant(record.state.grant.clone(), now).map_err(|e| Problem::model("body", e))?;
    let op = Operation::system(&format!("grant:{}", record.state.grant.id), &record.labels);
    ctx.save(&entries, &op, &state.metrics).await?;
    let saved = grants::get(&mut ctx.w.tx, &customer_id, &record.state.grant.id.0)
        .await?
        .ok_or_else(|| Problem::not_found("grant", &record.state.grant.id.0))?;
    ctx.commit().await?;
    Ok((StatusCode::CREATED, axum::Json(view(&saved, now))).into_response())
}

#[utoipa::path(get, path = "/v3/openmeter/customers/{customerId}/credits/grants",
    params(("customerId" = String, Path), ("page[size]" = Option<i64>, Query), ("page[number]" = Option<i64>, Query),
        ("filter[status]" = Option<String>, Query), ("filter[currency]" = Option<String>, Query), ("filter[key]" = Option<String>, Query)),
    responses((status = 200, body = GrantPage), (status = 400), (status = 401), (status = 404)))]
pub async fn list(
    State(state): State<AppState>,
    Path(customer_id): Path<String>,
    query: Query,
) -> ApiResult<axum::Json<GrantPage>> {
    let customer_id = customer_param(&customer_id)?;
    query.only(&["page[size]", "page[number]", "filter[status]", "filter[currency]", "filter[key][*]"])?;
    let page = query.page()?;
    let status = match query.get("filter[status]") {
        Some(s) => {
            Some(serde_json::from_value::<GrantStatus>(serde_json::Value::String(s.to_owned())).map_err(|_| {
                Problem::bad_request(
                    "filter[status]",
                    format!("unknown status {s:?}; use pending, active, expired or voided"),
                )
            })?)
        }
        None => None,
    };
    let currency = query
        .get("filter[currency]")
        .map(|c| Currency::parse(c).map_err(|e| Problem::bad_request("filter[currency]", e.to_string())))
        .transpose()?;
    let key = query.string_filter("key", &["eq", "oeq", "neq", "contains", "ocontains"])?;
    let mut conn = state.db.pool().acquire().await?;
    let customer = crate::store::customers::get(&mut conn, &customer_id).await?;
    if customer.is_none_or(|c| c.deleted_at.is_some()) {
        return Err(Problem::not_found("customer", &customer_id));
    }
    let now = state.db.now(&mut conn).await?;
    let all = grants::of_customer(&mut conn, &customer_id).await?;
    let matching: Vec<&GrantRecord> = all
        .iter()
        .filter(|g| status.is_none_or(|s| g.state.grant.status_at(now) == s))
        .filter(|g| currency.is_none_or(|c| g.state.grant.currency == c))
        .filter(|g| key.as_ref().is_none_or(|k| k.matches(g.key.as_deref())))
        .collect();
    let total = matching.len() as i64;
    let data =
        matching.into_iter().skip(page.offset() as usize).take(page.size as usize).map(|g| view(g, now)).collect();
    Ok(axum::Json(GrantPage {
        data,
        meta: PaginatedMeta { page: PageMeta { number: page.number, size: page.size, total } },
    }))
}

async fn fetch(state: &AppState, customer_id: &str, grant_id: &str) -> ApiResult<(GrantRecord, DateTime<Utc>)> {
    let mut conn = state.db.pool().acquire().await?;
    let now = state.db.now(&mut conn).await?;
    let record =
        grants::get(&mut conn, customer_id, grant_id).await?.ok_or_else(|| Problem::not_found("grant", grant_id))?;
    Ok((record, now))
}

#[utoipa::path(get, path = "/v3/openmeter/customers/{customerId}/credits/grants/{creditGrantId}",
    params(("customerId" = String, Path), ("creditGrantId" = String, Path)),
    responses((status = 200, body = GrantView), (status = 400), (status = 401), (status = 404)))]
pub async fn get(
    State(state): State<AppState>,
    Path((customer_id, grant_id)): Path<(String, String)>,
) -> ApiResult<axum::Json<GrantView>> {
    let customer_id = customer_param(&customer_id)?;
    let grant_id = ulid_param("creditGrantId", &grant_id)?;
    let (record, now) = fetch(&state, &customer_id, &grant_id).await?;
    Ok(axum::Json(view(&record, now)))
}

#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct SettlementRequest {
    #[schema(value_type = String, example = "settled")]
    pub status: SettlementStatus,
}

#[utoipa::path(post, path = "/v3/openmeter/customers/{customerId}/credits/grants/{creditGrantId}/settlement/external",
    params(("customerId" = String, Path), ("creditGrantId" = String, Path)), request_body = SettlementRequest,
    responses((status = 200, body = GrantView), (status = 400), (status = 401), (status = 404)))]
pub async fn settle_external(
    State(state): State<AppState>,
    Path((customer_id, grant_id)): Path<(String, String)>,
    Json(req): Json<SettlementRequest>,
) -> ApiResult<axum::Json<GrantView>> {
    let customer_id = customer_param(&customer_id)?;
    let grant_id = ulid_param("creditGrantId", &grant_id)?;
    let mut ctx = CustomerTx::begin(&state.db, &customer_id).await?;
    let now = ctx.now;
    let mut record = grants::get(&mut ctx.w.tx, &customer_id, &grant_id)
        .await?
        .ok_or_else(|| Problem::not_found("grant", &grant_id))?;
    let changed = record
        .state
        .grant
        .set_settlement_status(req.status)
        .map_err(|e| Problem::bad_request("funding_method", e.to_string()))?;
    // The same status again (a retry) writes nothing and answers the grant as it is.
    if changed {
        grants::save_settlement(&mut ctx.w.tx, &record.state.grant, now).await?;
        record.updated_at = now;
        ctx.commit().await?;
    }
    Ok(axum::Json(view(&record, now)))
}

/// What a void may carry: nothing, or an empty JSON object. A void takes the whole unused
/// remainder, so a member (an `amount`, as if part of a grant could be voided) is refused rather
/// than ignored.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct VoidRequest {}

#[utoipa::path(post, path = "/v3/openmeter/customers/{customerId}/credits/grants/{creditGrantId}/void", operation_id = "void",
    params(("customerId" = String, Path), ("creditGrantId" = String, Path)),
    responses((status = 200, body = GrantView), (status = 400, description = "a body with any member, or not declared JSON"), (status = 401), (status = 404)))]
pub async fn void_request(
    State(state): State<AppState>,
    path: Path<(String, String)>,
    request: axum::extract::Request,
) -> ApiResult<axum::Json<GrantView>> {
    let content_type =
        request.headers().get(axum::http::header::CONTENT_TYPE).and_then(|v| v.to_str().ok()).unwrap_or("").to_owned();
    let body = read_body(request, &state).await?;
    if !body.trim_ascii().is_empty() {
        if !is_json(&content_type) {
            return Err(Problem::bad_request("Content-Type", "expected Content-Type: application/json").in_header());
        }
        parse_json::<VoidRequest>(&body)?;
    }
    void(State(state), path).await
}

/// Voids a grant's unused remainder (the request's body checked by [`void_request`]).
pub async fn void(
    State(state): State<AppState>,
    Path((customer_id, grant_id)): Path<(String, String)>,
) -> ApiResult<axum::Json<GrantView>> {
    let customer_id = customer_param(&customer_id)?;
    let grant_id = ulid_param("creditGrantId", &grant_id)?;
    let mut ctx = CustomerTx::begin(&state.db, &customer_id).await?;
    let now = ctx.now;
    let entries =
        ctx.book().void(&GrantId(grant_id.clone()), now).map_err(|_| Problem::not_found("grant", &grant_id))?;
    let labels = Labels::new();
    ctx.save(&entries, &Operation::system(&format!("void:{grant_id}"), &labels), &state.metrics).await?;
    let record = grants::get(&mut ctx.w.tx, &customer_id, &grant_id)
        .await?
        .ok_or_else(|| Problem::not_found("grant", &grant_id))?;
    ctx.commit().await?;
    Ok(axum::Json(view(&record, now)))
}
