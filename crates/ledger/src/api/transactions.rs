//! `GET …/credits/transactions`: the customer's movements, newest first, cursor-paginated.

use axum::extract::{Path, State};
use credits::Currency;
use serde::Serialize;
use utoipa::ToSchema;

use super::balance::feature_scope;
use super::fields::timestamp;
use super::problem::{ApiResult, Problem};
use super::request::{encode_cursor, ulid_param, Query};
use super::AppState;
use crate::api::customer_tx::settle_due;
use crate::store::grants;
use crate::store::movements::{self, FeatureMovements, MovementFilters, MovementRecord, TransactionType};
use crate::store::Labels;
use credits::book::in_scope;

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
    /// Only with `extensions=true`: Konnect's transaction has no other members.
    #[serde(flatten, skip_serializing_if = "Option::is_none")]
    pub extensions: Option<Extensions>,
}

/// What this ledger adds to a transaction when asked (`extensions=true`).
#[derive(Serialize, ToSchema)]
pub struct Extensions {
    /// The grant the movement drew from or funded; absent for usage no credit covered.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub grant_id: Option<String>,
    /// The feature the usage was metered as.
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

impl Transaction {
    fn of(m: MovementRecord, extensions: bool) -> Self {
        let ext = extensions.then(|| Extensions {
            grant_id: m.grant_id.clone(),
            feature_key: m.feature.as_ref().map(|f| f.as_str().to_owned()),
        });
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
            extensions: ext,
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
        ("filter[feature_key][eq]" = Option<String>, Query),
        ("extensions" = Option<bool>, Query, description = "true adds grant_id and feature_key to each item (not in Konnect's shape)")),
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
        "extensions",
    ])?;
    let page = query.cursor()?;
    let extensions = match query.get("extensions") {
        None | Some("false") => false,
        Some("true") => true,
        Some(_) => return Err(Problem::bad_request("extensions", "extensions is true or false").in_query()),
    };
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
        feature: None,
    };
    // Expiries that fell due are booked before anyone reads the history.
    settle_due(&state.db, &customer_id, &state.metrics).await?;
    let mut conn = state.db.pool().acquire().await?;
    let filters = MovementFilters { feature: feature_movements(&mut conn, &customer_id, &query).await?, ..filters };
    let result = movements::list(&mut conn, state.db.backend(), &customer_id, &filters, page).await?;
    let path = format!("/v3/openmeter/customers/{customer_id}/credits/transactions");
    let next = (result.has_older)
        .then(|| result.older_than.map(|s| page_link(&path, &query, page.size, ("page[after]", s))))
        .flatten();
    let previous = (result.has_newer)
        .then(|| result.newer_than.map(|s| page_link(&path, &query, page.size, ("page[before]", s))))
        .flatten();
    Ok(axum::Json(TransactionPage {
        data: result.items.into_iter().map(|m| Transaction::of(m, extensions)).collect(),
        meta: CursorMeta { page: CursorMetaPage { size: page.size, next, previous } },
    }))
}

/// `filter[feature_key]…`: the grants whose credit is usable in that scope, and the filter for
/// usage no grant covered.
async fn feature_movements(
    conn: &mut sqlx::AnyConnection,
    customer_id: &str,
    query: &Query,
) -> ApiResult<Option<FeatureMovements>> {
    let ops = ["eq", "oeq", "neq", "contains", "ocontains"];
    let (Some(filter), Some(scope)) = (query.string_filter("feature_key", &ops)?, feature_scope(query)?) else {
        return Ok(None);
    };
    let grant_ids = grants::of_customer(conn, customer_id)
        .await?
        .into_iter()
        .filter(|g| in_scope(&g.state.grant.features, Some(&scope)))
        .map(|g| g.state.grant.id.0)
        .collect();
    Ok(Some(FeatureMovements { grant_ids, filter }))
}
