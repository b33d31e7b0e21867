//! `/v3/openmeter/customers`: customers and the subject keys the gateway knows them by.

use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use credits::limits::{MAX_SUBJECT_KEYS_PER_CUSTOMER, MAX_SUBJECT_LEN};
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use super::fields::{self, timestamp};
use super::problem::{ApiResult, Problem};
use super::request::{ulid_param, Json, Query, StringFilter};
use super::AppState;
use crate::store::customers::{self, Clash, CustomerFilters, CustomerRecord, SortBy};
use crate::store::{new_id, Labels};

#[derive(Deserialize, Serialize, ToSchema, Clone, Default)]
#[serde(deny_unknown_fields)]
pub struct UsageAttribution {
    pub subject_keys: Vec<String>,
}

#[derive(Deserialize, Serialize, ToSchema, Clone)]
#[serde(deny_unknown_fields)]
pub struct BillingAddress {
    #[serde(skip_serializing_if = "Option::is_none")]
    #[serde(default, deserialize_with = "fields::non_null")]
    pub country: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    #[serde(default, deserialize_with = "fields::non_null")]
    pub postal_code: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    #[serde(default, deserialize_with = "fields::non_null")]
    pub state: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    #[serde(default, deserialize_with = "fields::non_null")]
    pub city: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    #[serde(default, deserialize_with = "fields::non_null")]
    pub line1: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    #[serde(default, deserialize_with = "fields::non_null")]
    pub line2: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    #[serde(default, deserialize_with = "fields::non_null")]
    pub phone_number: Option<String>,
}

/// Create (`key` required) and replace (`key` absent) requests share these fields.
#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CustomerRequest {
    pub name: String,
    #[serde(default, deserialize_with = "fields::non_null")]
    pub description: Option<String>,
    #[serde(default)]
    pub labels: Labels,
    #[serde(default, deserialize_with = "fields::non_null")]
    pub key: Option<String>,
    #[serde(default, deserialize_with = "fields::non_null")]
    pub usage_attribution: Option<UsageAttribution>,
    #[serde(default, deserialize_with = "fields::non_null")]
    pub primary_email: Option<String>,
    #[serde(default, deserialize_with = "fields::non_null")]
    pub currency: Option<String>,
    #[serde(default, deserialize_with = "fields::non_null")]
    pub billing_address: Option<BillingAddress>,
}

#[derive(Serialize, ToSchema)]
pub struct Customer {
    pub id: String,
    pub name: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub description: Option<String>,
    pub labels: Labels,
    pub created_at: String,
    pub updated_at: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub deleted_at: Option<String>,
    pub key: String,
    pub usage_attribution: UsageAttribution,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub primary_email: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub currency: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub billing_address: Option<serde_json::Value>,
}

#[derive(Serialize, ToSchema)]
pub struct PageMeta {
    pub number: i64,
    pub size: i64,
    pub total: i64,
}

#[derive(Serialize, ToSchema)]
pub struct PaginatedMeta {
    pub page: PageMeta,
}

#[derive(Serialize, ToSchema)]
pub struct CustomerPage {
    pub data: Vec<Customer>,
    pub meta: PaginatedMeta,
}

impl From<CustomerRecord> for Customer {
    fn from(c: CustomerRecord) -> Self {
        Customer {
            id: c.id,
            name: c.name,
            description: c.description,
            labels: c.labels,
            created_at: timestamp(c.created_at),
            updated_at: timestamp(c.updated_at),
            deleted_at: c.deleted_at.map(timestamp),
            key: c.key,
            usage_attribution: UsageAttribution { subject_keys: c.subject_keys },
            primary_email: c.primary_email,
            currency: c.currency,
            billing_address: c.billing_address,
        }
    }
}

fn validate(req: &CustomerRequest) -> ApiResult<()> {
    fields::name("name", &req.name)?;
    fields::description("description", req.description.as_deref())?;
    fields::labels("labels", &req.labels)?;
    if let Some(key) = &req.key {
        fields::key("key", key)?;
    }
    if let Some(c) = &req.currency {
        credits::Currency::parse(c).map_err(|e| Problem::bad_request("currency", e.to_string()))?;
    }
    if let Some(country) = req.billing_address.as_ref().and_then(|a| a.country.as_deref()) {
        if country.len() != 2 || !country.bytes().all(|b| b.is_ascii_uppercase()) {
            return Err(Problem::bad_request("billing_address.country", "country must be an ISO 3166-1 alpha-2 code"));
        }
    }
    let subjects = req.usage_attribution.as_ref().map(|u| u.subject_keys.as_slice()).unwrap_or_default();
    if subjects.len() > MAX_SUBJECT_KEYS_PER_CUSTOMER {
        return Err(Problem::bad_request(
            "usage_attribution.subject_keys",
            format!("at most {MAX_SUBJECT_KEYS_PER_CUSTOMER} subject keys per customer"),
        ));
    }
    for (i, s) in subjects.iter().enumerate() {
        if s.is_empty() || s.len() > MAX_SUBJECT_LEN {
            return Err(Problem::bad_request(
                format!("usage_attribution.subject_keys[{i}]"),
                format!("subject keys have 1..{MAX_SUBJECT_LEN} characters"),
            ));
        }
    }
    Ok(())
}

/// Subject keys in the order given, each once: the schema lets a list repeat one (no
/// `uniqueItems`), and a customer holds a subject or does not.
fn distinct(keys: Vec<String>) -> Vec<String> {
    let mut seen = std::collections::HashSet::new();
    keys.into_iter().filter(|k| seen.insert(k.clone())).collect()
}

/// A key or subject another customer holds: 409, as Konnect's engine answers (its customer service
/// reports a key conflict, which its API encodes as 409 Conflict), naming the field. The public
/// schema lists no 409 for these operations; `scripts/konnect_compat_hooks.py` says why that is
/// accepted.
fn clash_problem(clash: Clash) -> Problem {
    match clash {
        Clash::Key => Problem::conflict("key", "another customer has this key"),
        Clash::Subject(s) => Problem::conflict(
            "usage_attribution.subject_keys",
            format!("subject key [{s}] belongs to another customer"),
        ),
    }
}

#[utoipa::path(post, path = "/v3/openmeter/customers", request_body = CustomerRequest,
    responses((status = 201, body = Customer), (status = 400), (status = 401), (status = 409)))]
pub async fn create(State(state): State<AppState>, Json(req): Json<CustomerRequest>) -> ApiResult<Response> {
    validate(&req)?;
    let key = req.key.clone().ok_or_else(|| Problem::bad_request("key", "missing field `key`"))?;
    let mut w = state.db.begin_write().await?;
    let now = state.db.now(&mut w.tx).await?;
    let record = CustomerRecord {
        id: new_id(),
        key,
        name: req.name,
        description: req.description,
        labels: req.labels,
        subject_keys: distinct(req.usage_attribution.unwrap_or_default().subject_keys),
        primary_email: req.primary_email,
        currency: req.currency,
        billing_address: req.billing_address.map(|a| serde_json::to_value(a).unwrap_or_default()),
        created_at: now,
        updated_at: now,
        deleted_at: None,
    };
    customers::insert(&mut w.tx, &record).await?.map_err(clash_problem)?;
    w.commit().await?;
    Ok((StatusCode::CREATED, axum::Json(Customer::from(record))).into_response())
}

#[utoipa::path(get, path = "/v3/openmeter/customers",
    params(("page[size]" = Option<i64>, Query), ("page[number]" = Option<i64>, Query), ("sort" = Option<String>, Query),
        ("filter[key]" = Option<String>, Query), ("filter[usage_attribution_subject_key]" = Option<String>, Query)),
    responses((status = 200, body = CustomerPage), (status = 400), (status = 401)))]
pub async fn list(State(state): State<AppState>, query: Query) -> ApiResult<axum::Json<CustomerPage>> {
    query.only(&[
        "page[size]",
        "page[number]",
        "sort",
        "filter[key][*]",
        "filter[name][*]",
        "filter[primary_email][*]",
        "filter[usage_attribution_subject_key][*]",
        "filter[plan_key][*]",
        "filter[billing_profile_id][*]",
    ])?;
    let ops = ["eq", "oeq", "neq", "contains", "ocontains"];
    let page = query.page()?;
    let (sort, descending) = sort_order(query.get("sort"))?;
    let filters = CustomerFilters {
        key: query.string_filter("key", &ops)?,
        name: query.string_filter("name", &ops)?,
        primary_email: query.string_filter("primary_email", &ops)?,
        subject: query.string_filter("usage_attribution_subject_key", &ops)?,
    };
    // This ledger has no plans or billing profiles: a customer has neither, and the filters say
    // whether "none" matches.
    let plan = query.string_filter("plan_key", &ops)?;
    let profile = query.string_filter("billing_profile_id", &["eq", "oeq", "neq"])?;
    profile.as_ref().map(|f| ulid_values("filter[billing_profile_id]", f)).transpose()?;
    if !plan.is_none_or(|f| f.matches(None)) || !profile.is_none_or(|f| f.matches(None)) {
        let meta = PaginatedMeta { page: PageMeta { number: page.number, size: page.size, total: 0 } };
        return Ok(axum::Json(CustomerPage { data: Vec::new(), meta }));
    }
    let mut conn = state.db.pool().acquire().await?;
    let (items, total) =
        customers::list(&mut conn, state.db.backend(), &filters, sort, descending, page.size, page.offset()).await?;
    Ok(axum::Json(CustomerPage {
        data: items.into_iter().map(Customer::from).collect(),
        meta: PaginatedMeta { page: PageMeta { number: page.number, size: page.size, total } },
    }))
}

/// `sort`: `id`, `name` (default) or `created_at`, ascending unless `desc` follows.
fn sort_order(value: Option<&str>) -> ApiResult<(SortBy, bool)> {
    Ok(match value.map(str::trim) {
        None | Some("name") | Some("name asc") => (SortBy::Name, false),
        Some("name desc") => (SortBy::Name, true),
        Some("id") | Some("id asc") => (SortBy::Id, false),
        Some("id desc") => (SortBy::Id, true),
        Some("created_at") | Some("created_at asc") => (SortBy::CreatedAt, false),
        Some("created_at desc") => (SortBy::CreatedAt, true),
        Some(other) => {
            return Err(Problem::bad_request(
                "sort",
                format!("cannot sort by {other:?}; use id, name or created_at, optionally with desc"),
            )
            .in_query())
        }
    })
}

/// The values of a ULID filter's `eq` and `neq` (and `filter[x]=…`) must be ULIDs, as the schema's
/// pattern says; an empty value is how a client's empty filter object arrives in a deepObject
/// query. (`oeq` is plain text in the schema: a value that is no ULID matches nothing.)
fn ulid_values(field: &str, filter: &StringFilter) -> ApiResult<()> {
    match filter {
        StringFilter::Eq(v) | StringFilter::Neq(v) if v.is_empty() => Ok(()),
        StringFilter::Eq(v) | StringFilter::Neq(v) => ulid_param(field, v).map(|_| ()),
        StringFilter::All(fs) => fs.iter().try_for_each(|f| ulid_values(field, f)),
        StringFilter::OneOf(_) | StringFilter::Contains(_) | StringFilter::ContainsAny(_) => Ok(()),
    }
    .map_err(Problem::in_query)
}

#[utoipa::path(get, path = "/v3/openmeter/customers/{customerId}", params(("customerId" = String, Path)),
    responses((status = 200, body = Customer), (status = 400), (status = 401), (status = 404)))]
pub async fn get(State(state): State<AppState>, Path(id): Path<String>) -> ApiResult<axum::Json<Customer>> {
    let id = ulid_param("customerId", &id)?;
    let mut conn = state.db.pool().acquire().await?;
    let record = customers::get(&mut conn, &id).await?.ok_or_else(|| Problem::not_found("customer", &id))?;
    Ok(axum::Json(record.into()))
}

#[utoipa::path(put, path = "/v3/openmeter/customers/{customerId}", params(("customerId" = String, Path)), request_body = CustomerRequest,
    responses((status = 200, body = Customer), (status = 400), (status = 401), (status = 404), (status = 409), (status = 410)))]
pub async fn update(
    State(state): State<AppState>,
    Path(id): Path<String>,
    Json(req): Json<CustomerRequest>,
) -> ApiResult<axum::Json<Customer>> {
    let id = ulid_param("customerId", &id)?;
    validate(&req)?;
    if req.key.is_some() {
        return Err(Problem::bad_request("key", "the key of a customer cannot be changed"));
    }
    let mut w = state.db.begin_write().await?;
    let now = state.db.now(&mut w.tx).await?;
    let mut record = customers::get(&mut w.tx, &id).await?.ok_or_else(|| Problem::not_found("customer", &id))?;
    if record.deleted_at.is_some() {
        return Err(Problem::new(StatusCode::GONE, format!("customer [{id}] was deleted")));
    }
    crate::db::lock_customer(&mut w.tx, &id).await?;
    record.name = req.name;
    record.description = req.description;
    record.labels = req.labels;
    record.subject_keys = distinct(req.usage_attribution.unwrap_or_default().subject_keys);
    record.primary_email = req.primary_email;
    record.currency = req.currency;
    record.billing_address = req.billing_address.map(|a| serde_json::to_value(a).unwrap_or_default());
    record.updated_at = now;
    customers::update(&mut w.tx, &record).await?.map_err(clash_problem)?;
    w.commit().await?;
    Ok(axum::Json(record.into()))
}

#[utoipa::path(delete, path = "/v3/openmeter/customers/{customerId}", params(("customerId" = String, Path)),
    responses((status = 204), (status = 400), (status = 401), (status = 404)))]
pub async fn delete(State(state): State<AppState>, Path(id): Path<String>) -> ApiResult<StatusCode> {
    let id = ulid_param("customerId", &id)?;
    let mut w = state.db.begin_write().await?;
    let now = state.db.now(&mut w.tx).await?;
    if crate::db::lock_customer(&mut w.tx, &id).await?.is_none() {
        return Err(Problem::not_found("customer", &id));
    }
    customers::delete(&mut w.tx, &id, now).await?;
    w.commit().await?;
    Ok(StatusCode::NO_CONTENT)
}
