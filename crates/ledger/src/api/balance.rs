//! `GET …/credits/balance`: settled, live and pending credit per currency, at any instant and
//! in any feature scope.

use axum::extract::{Path, State};
use chrono::{DateTime, Utc};
use credits::{Amount, AmountOverflow, Currency, CurrencyBalance, FeatureKey, FeatureScope, GrantStatus};
use serde::Serialize;
use utoipa::ToSchema;

use super::fields::{parse_timestamp, timestamp};
use super::problem::{ApiResult, Problem};
use super::request::{ulid_param, Query, StringFilter};
use super::AppState;
use crate::store::{books, movements};

#[derive(Serialize, ToSchema)]
pub struct BalanceView {
    pub currency: String,
    pub settled: String,
    pub live: String,
    pub pending: String,
}

#[derive(Serialize, ToSchema)]
pub struct Balances {
    pub retrieved_at: String,
    pub balances: Vec<BalanceView>,
}

impl From<&CurrencyBalance> for BalanceView {
    fn from(b: &CurrencyBalance) -> Self {
        BalanceView {
            currency: b.currency.to_string(),
            settled: b.settled.to_string(),
            live: b.live.to_string(),
            pending: b.pending.to_string(),
        }
    }
}

/// `filter[feature_key][…]` as a credit scope.
pub fn feature_scope(query: &Query) -> ApiResult<Option<FeatureScope>> {
    Ok(query.string_filter("feature_key", &["eq", "oeq", "neq", "contains", "ocontains"])?.map(scope_of))
}

/// The schema takes any text: a value that is no feature key matches no feature (so `eq` leaves
/// unrestricted credit only, and `neq` every feature).
fn scope_of(filter: StringFilter) -> FeatureScope {
    let key = |v: &str| FeatureKey::parse(v).ok();
    match filter {
        StringFilter::Eq(v) => key(&v).map_or(FeatureScope::OneOf(Vec::new()), FeatureScope::Eq),
        StringFilter::Neq(v) => key(&v).map_or(FeatureScope::Contains(String::new()), FeatureScope::Neq),
        StringFilter::OneOf(vs) => FeatureScope::OneOf(vs.iter().filter_map(|v| key(v)).collect()),
        StringFilter::Contains(v) => FeatureScope::Contains(v),
        StringFilter::ContainsAny(vs) => FeatureScope::ContainsAny(vs),
        StringFilter::All(fs) => FeatureScope::All(fs.into_iter().map(scope_of).collect()),
    }
}

/// `filter[currency][…]`: the schema takes any text, so a value that is no currency code simply
/// matches nothing.
fn currency_filter(query: &Query) -> ApiResult<Option<StringFilter>> {
    query.string_filter("currency", &["eq", "oeq", "neq"])
}

#[utoipa::path(get, path = "/v3/openmeter/customers/{customerId}/credits/balance",
    params(("customerId" = String, Path), ("timestamp" = Option<String>, Query),
        ("filter[currency][eq]" = Option<String>, Query), ("filter[feature_key][eq]" = Option<String>, Query)),
    responses((status = 200, body = Balances), (status = 400), (status = 401), (status = 404)))]
pub async fn get(
    State(state): State<AppState>,
    Path(customer_id): Path<String>,
    query: Query,
) -> ApiResult<axum::Json<Balances>> {
    let customer_id = ulid_param("customerId", &customer_id)?;
    query.only(&["timestamp", "filter[currency][*]", "filter[feature_key][*]"])?;
    let at = query.get("timestamp").map(|t| parse_timestamp("timestamp", t)).transpose()?;
    let scope = feature_scope(&query)?;
    let currencies = currency_filter(&query)?;
    let mut tx = state.db.begin_read().await?;
    let customer = crate::store::customers::get(&mut tx, &customer_id).await?;
    if customer.is_none_or(|c| c.deleted_at.is_some()) {
        return Err(Problem::not_found("customer", &customer_id));
    }
    let now = state.db.now(&mut tx).await?;
    let at = at.unwrap_or(now);
    let loaded = books::load(&mut tx, &customer_id).await?;
    let balances = if at >= loaded.book.clock() {
        loaded.book.try_balances(at, scope.as_ref()).map_err(|e| Problem::model("timestamp", e))?
    } else {
        past_balances(&mut tx, &customer_id, &loaded, at, scope.as_ref()).await?
    };
    tx.commit().await?;
    let balances = balances
        .iter()
        .filter(|b| currencies.as_ref().is_none_or(|f| f.matches(Some(b.currency.as_str()))))
        .map(BalanceView::from)
        .collect();
    Ok(axum::Json(Balances { retrieved_at: timestamp(now), balances }))
}

/// Before the book's clock everything due has been booked, so the journal answers exactly:
/// settled is the sum of movements booked by then; pending the grants not yet effective; live
/// subtracts the holds open at that instant.
async fn past_balances(
    conn: &mut sqlx::AnyConnection,
    customer_id: &str,
    loaded: &books::LoadedBook,
    at: DateTime<Utc>,
    scope: Option<&FeatureScope>,
) -> ApiResult<Vec<CurrencyBalance>> {
    let entries = movements::history(conn, customer_id, at).await?;
    let held = crate::store::books::holds_open_at(conn, customer_id, at).await?;
    let grants = loaded.book.grants();
    let mut currencies: Vec<Currency> =
        grants.iter().filter(|g| g.grant.created_at <= at).map(|g| g.grant.currency).collect();
    currencies.extend(entries.iter().filter_map(|e| match e {
        credits::Entry::Movement(m) => Some(m.currency),
        _ => None,
    }));
    currencies.sort();
    currencies.dedup();
    let past = PastJournal { entries: &entries, held: &held, grants: loaded.book.grants(), at, scope };
    currencies.into_iter().map(|c| past.balance(c).map_err(|e| Problem::model("timestamp", e))).collect()
}

/// What the journal says about one past instant.
struct PastJournal<'a> {
    entries: &'a [credits::Entry],
    held: &'a [credits::Hold],
    grants: &'a [credits::GrantState],
    at: DateTime<Utc>,
    scope: Option<&'a FeatureScope>,
}

impl PastJournal<'_> {
    fn balance(&self, currency: Currency) -> Result<CurrencyBalance, AmountOverflow> {
        let (at, scope) = (self.at, self.scope);
        let features_of =
            |id: &credits::GrantId| self.grants.iter().find(|g| &g.grant.id == id).map(|g| &g.grant.features);
        let settled = credits::history::settled_at(self.entries.iter(), features_of, currency, at, scope)?;
        let pending = self.grants.iter().filter(|g| {
            g.grant.currency == currency
                && g.grant.created_at <= at
                && g.grant.status_at(at) == GrantStatus::Pending
                && scope.is_none_or(|s| s.includes(&g.grant.features))
        });
        let pending = Amount::try_sum(pending.map(|g| g.grant.amount))?;
        let holds = self.held.iter().filter(|h| {
            h.currency == currency && scope.is_none_or(|s| h.feature.as_ref().is_none_or(|f| s.matches(f)))
        });
        let live = settled.try_sub(Amount::try_sum(holds.map(|h| h.amount))?)?;
        Ok(CurrencyBalance { currency, settled, live, pending })
    }
}
