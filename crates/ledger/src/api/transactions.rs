//! `GET …/credits/transactions`: the customer's movements, newest first, cursor-paginated.

use axum::extract::{Path, State};
use credits::Currency;
use serde::Serialize;
use utoipa::ToSchema;

use super::fields::timestamp;
use super::problem::{ApiResult, Problem};
use super::request::{encode_cursor, ulid_param, Query};
use super::AppState;
use crate::api::customer_tx::settle_due;
use crate::store::movements::{self, MovementFilters, MovementRecord, TransactionType};
use crate::store::Labels;

#[derive(Serialize, ToSchema)]
pub struct AvailableBalance {
    pub before: String,
    pub after: String,
}

#[derive(Serialize, ToSchema)]
pub struct Transaction {
    pub id: String,
    pub name: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub description: Option<String>,
    pub labels: Labels,
    pub created_at: String,
    pub booked_at: String,
    #[serde(rename = "type")]
    pub kind: String,
    pub currency: String,
    pub amount: String,
    pub available_balance: AvailableBalance,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub grant_id: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub feature_key: Option<String>,
}

#[derive(Serialize, ToSchema)]
pub struct CursorMetaPage {
    pub size: i64,
    pub next: Option<String>,
    pub previous: Option<String>,
}

#[derive(Serialize, ToSchema)]
pub struct CursorMeta {
    pub page: CursorMetaPage,
}

#[derive(Serialize, ToSchema)]
pub struct TransactionPage {
    pub data: Vec<Transaction>,
    pub meta: CursorMeta,
}

impl From<MovementRecord> for Transaction {
    fn from(m: MovementRecord) -> Self {
        Transaction {
            id: m.id,
            name: m.name,
            description: m.description,
            labels: m.labels,
            created_at: timestamp(m.created_at),
            booked_at: timestamp(m.booked_at),
            kind: TransactionType::of(m.kind, m.amount).as_str().to_owned(),
            currency: m.currency.to_string(),
            amount: m.amount.to_string(),
            available_balance: AvailableBalance {
                before: m.balance_before.to_string(),
                after: m.balance_after.to_string(),
            },
            grant_id: m.grant_id,
            feature_key: m.feature.map(|f| f.as_str().to_owned()),
        }
    }
}

/// The link to another page: the same query with a different cursor.
pub fn page_link(path: &str, query: &Query, size: i64, cursor: (&str, i64)) -> String {
    let mut s = form_urlencoded::Serializer::new(String::new());
    for (k, v) in query.0.iter().filter(|(k, _)| !k.starts_with("page[")) {
        s.append_pair(k, v);
    }
    s.append_pair("page[size]", &size.to_string());
    s.append_pair(cursor.0, &encode_cursor(cursor.1));
    format!("{path}?{}", s.finish())
}

#[utoipa::path(get, path = "/v3/openmeter/customers/{customerId}/credits/transactions",
    params(("customerId" = String, Path), ("page[size]" = Option<i64>, Query), ("page[after]" = Option<String>, Query),
        ("page[before]" = Option<String>, Query), ("filter[type]" = Option<String>, Query), ("filter[currency]" = Option<String>, Query),
        ("filter[feature_key][eq]" = Option<String>, Query)),
    responses((status = 200, body = TransactionPage), (status = 400), (status = 401), (status = 404)))]
pub async fn list(
    State(state): State<AppState>,
    Path(customer_id): Path<String>,
    query: Query,
) -> ApiResult<axum::Json<TransactionPage>> {
    let customer_id = ulid_param("customerId", &customer_id)?;
    query.only(&[
        "page[size]",
        "page[after]",
        "page[before]",
        "filter[type]",
        "filter[currency]",
        "filter[feature_key][*]",
    ])?;
    let page = query.cursor()?;
    let filters = MovementFilters {
        kind: query
            .get("filter[type]")
            .map(|t| {
                TransactionType::parse(t).ok_or_else(|| {
                    Problem::bad_request("filter[type]", format!("unknown type {t:?}; use funded, consumed or expired"))
                })
            })
            .transpose()?,
        currency: query
            .get("filter[currency]")
            .map(|c| Currency::parse(c).map_err(|e| Problem::bad_request("filter[currency]", e.to_string())))
            .transpose()?,
        feature: query.string_filter("feature_key", &["eq", "oeq", "neq", "contains", "ocontains"])?,
    };
    // Expiries that fell due are booked before anyone reads the history.
    settle_due(&state.db, &customer_id, &state.metrics).await?;
    let mut conn = state.db.pool().acquire().await?;
    let result = movements::list(&mut conn, state.db.backend(), &customer_id, &filters, page).await?;
    let path = format!("/v3/openmeter/customers/{customer_id}/credits/transactions");
    let next = (result.has_older)
        .then(|| result.older_than.map(|s| page_link(&path, &query, page.size, ("page[after]", s))))
        .flatten();
    let previous = (result.has_newer)
        .then(|| result.newer_than.map(|s| page_link(&path, &query, page.size, ("page[before]", s))))
        .flatten();
    Ok(axum::Json(TransactionPage {
        data: result.items.into_iter().map(Transaction::from).collect(),
        meta: CursorMeta { page: CursorMetaPage { size: page.size, next, previous } },
    }))
}
