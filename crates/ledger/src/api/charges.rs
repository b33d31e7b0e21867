//! `POST …/credits/charges` (our extension: any backend spends credit directly) and
//! `POST …/credits/adjustments` (manual corrections). Both are idempotent by key.

use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use credits::{
    Amount, ChargeError, Currency, FeatureFilter, FeatureKey, FundingMethod, Grant, GrantId, GrantSpec, Priority,
    SettlementMode, Spend,
};
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use super::fields::{self, timestamp};
use super::problem::{ApiResult, Problem};
use super::request::{ulid_param, Json};
use super::AppState;
use crate::api::customer_tx::CustomerTx;
use crate::store::books::Operation;
use crate::store::grants::{self, GrantRecord};
use crate::store::idempotency::{self, Record};
use crate::store::{new_id, Labels};

#[derive(Deserialize, Serialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ChargeRequest {
    #[schema(value_type = String, example = "0.25")]
    pub amount: Amount,
    #[schema(value_type = String, example = "USD")]
    pub currency: Currency,
    #[schema(value_type = Option<String>, example = "api_requests")]
    pub feature_key: Option<FeatureKey>,
    #[schema(value_type = String, example = "credit_only")]
    pub settlement_mode: SettlementMode,
    /// Idempotency key: a retry with the same key returns the original answer.
    pub key: String,
    pub name: Option<String>,
    pub description: Option<String>,
    #[serde(default)]
    pub labels: Labels,
}

#[derive(Serialize, Deserialize, ToSchema)]
pub struct Consumption {
    pub grant_id: String,
    pub amount: String,
}

#[derive(Serialize, Deserialize, ToSchema)]
pub struct BalanceAfter {
    pub currency: String,
    pub settled: String,
    pub live: String,
}

#[derive(Serialize, Deserialize, ToSchema)]
pub struct ChargeResult {
    pub id: String,
    pub key: String,
    pub customer_id: String,
    pub amount: String,
    pub currency: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub feature_key: Option<String>,
    pub settlement_mode: String,
    /// Credit drawn per grant, in draw-down order.
    pub consumed: Vec<Consumption>,
    /// The part left to invoice (`credit_then_invoice`).
    pub overage: String,
    pub balance: BalanceAfter,
    pub labels: Labels,
    pub created_at: String,
}

/// Answers a replayed request from its idempotency record, or a conflict if the key was used
/// for something else.
fn replay(recorded: idempotency::Recorded, request: &str, key_field: &str) -> ApiResult<Response> {
    if recorded.request != request {
        return Err(Problem::conflict(key_field, "this key was already used with a different request"));
    }
    let status = StatusCode::from_u16(recorded.status).unwrap_or(StatusCode::OK);
    let body: serde_json::Value = serde_json::from_str(&recorded.response).unwrap_or_default();
    Ok((status, axum::Json(body)).into_response())
}

#[utoipa::path(post, path = "/v3/openmeter/customers/{customerId}/credits/charges", params(("customerId" = String, Path)),
    request_body = ChargeRequest,
    responses((status = 201, body = ChargeResult), (status = 400), (status = 401), (status = 402, description = "credit_only charge not covered; nothing booked"), (status = 404), (status = 409)))]
pub async fn charge(
    State(state): State<AppState>,
    Path(customer_id): Path<String>,
    Json(req): Json<ChargeRequest>,
) -> ApiResult<Response> {
    let customer_id = ulid_param("customerId", &customer_id)?;
    book_charge(&state, &customer_id, &req).await
}

/// Validates and books a charge for a customer (also the per-call charge of
/// `/v3/gateway/authorize`): 201 with the result, the original answer for a replayed key, 402
/// when `credit_only` credit does not cover it.
pub async fn book_charge(state: &AppState, customer_id: &str, req: &ChargeRequest) -> ApiResult<Response> {
    fields::key("key", &req.key)?;
    fields::labels("labels", &req.labels)?;
    fields::description("description", req.description.as_deref())?;
    if let Some(name) = &req.name {
        fields::name("name", name)?;
    }
    if !fields::amount("amount", req.amount)?.is_positive() {
        return Err(Problem::bad_request("amount", "amount must be greater than zero"));
    }
    let customer_id = customer_id.to_owned();
    let request = serde_json::to_string(req).unwrap_or_default();
    let mut ctx = CustomerTx::begin(&state.db, &customer_id).await?;
    if let Some(recorded) = idempotency::find(&mut ctx.w.tx, &customer_id, "charge", &req.key).await? {
        return replay(recorded, &request, "key");
    }
    let now = ctx.now;
    let spend = Spend {
        currency: req.currency,
        amount: req.amount,
        feature: req.feature_key.clone(),
        mode: req.settlement_mode,
    };
    let id = new_id();
    let op = Operation {
        reference: format!("charge:{id}"),
        name: req.name.as_deref().unwrap_or("Charge"),
        description: req.description.as_deref(),
        labels: &req.labels,
    };
    let outcome = match ctx.book().charge(&spend, now) {
        Ok(outcome) => outcome,
        Err(e) => {
            // Credit that gateway leases hold is recalled: their holders give back what they do
            // not use within their next syncs, so the same charge retried then can be covered.
            if matches!(e, ChargeError::NotCovered(_)) && ctx.book().recall_holds(req.currency, None, now) > 0 {
                ctx.save(&[], &op, &state.metrics).await?;
                ctx.commit().await?;
            }
            return Err(not_booked(&customer_id, req.currency, e));
        }
    };
    ctx.save(&outcome.entries, &op, &state.metrics).await?;
    let balance = ctx.book().try_balances(now, None).map_err(|e| Problem::model("amount", e))?;
    let balance = balance.into_iter().find(|b| b.currency == req.currency);
    let result = ChargeResult {
        id,
        key: req.key.clone(),
        customer_id: customer_id.clone(),
        amount: req.amount.to_string(),
        currency: req.currency.to_string(),
        feature_key: req.feature_key.as_ref().map(|f| f.as_str().to_owned()),
        settlement_mode: req.settlement_mode.as_str().to_owned(),
        consumed: outcome
            .consumed
            .iter()
            .map(|(g, a)| Consumption { grant_id: g.0.clone(), amount: a.to_string() })
            .collect(),
        overage: outcome.overage.to_string(),
        balance: BalanceAfter {
            currency: req.currency.to_string(),
            settled: balance.as_ref().map(|b| b.settled).unwrap_or_default().to_string(),
            live: balance.as_ref().map(|b| b.live).unwrap_or_default().to_string(),
        },
        labels: req.labels.clone(),
        created_at: timestamp(now),
    };
    let response = serde_json::to_string(&result).unwrap_or_default();
    let record = Record {
        customer_id: &customer_id,
        operation: "charge",
        key: &req.key,
        request: &request,
        status: 201,
        response: &response,
    };
    idempotency::insert(&mut ctx.w.tx, &record, now).await?;
    ctx.commit().await?;
    Ok((StatusCode::CREATED, axum::Json(result)).into_response())
}

/// Why a charge was not booked: 402 when credit does not cover it, 422 when it cannot be summed.
fn not_booked(customer_id: &str, currency: Currency, err: ChargeError) -> Problem {
    let refusal = match err {
        ChargeError::NotCovered(refusal) => refusal,
        ChargeError::Model(e) => return Problem::model("amount", e),
    };
    Problem::new(
        StatusCode::PAYMENT_REQUIRED,
        format!(
            "customer [{customer_id}] has {} {currency} of credit available for this charge of {} {currency}",
            refusal.available, refusal.requested
        ),
    )
    .with("customer_id", customer_id)
    .with("currency", currency.to_string())
    .with("price", refusal.requested.to_string())
    .with("available", refusal.available.to_string())
}

#[derive(Deserialize, Serialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct AdjustmentRequest {
    pub name: String,
    #[serde(default, deserialize_with = "fields::non_null")]
    pub description: Option<String>,
    #[serde(default)]
    pub labels: Labels,
    #[schema(value_type = String, example = "USD")]
    pub currency: Currency,
    /// Signed: positive adds credit, negative removes it.
    #[schema(value_type = String, example = "-5.00")]
    pub amount: Amount,
}

#[derive(Serialize, Deserialize, ToSchema)]
pub struct AdjustmentResult {
    pub name: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub description: Option<String>,
    pub labels: Labels,
}

/// The optional `Idempotency-Key` header of an adjustment.
fn idempotency_key(headers: &HeaderMap) -> ApiResult<Option<String>> {
    let Some(value) = headers.get("idempotency-key") else { return Ok(None) };
    let key = value
        .to_str()
        .map_err(|_| Problem::bad_request("Idempotency-Key", "the Idempotency-Key header must be text"))?
        .to_owned();
    fields::key("Idempotency-Key", &key)?;
    Ok(Some(key))
}

#[utoipa::path(post, path = "/v3/openmeter/customers/{customerId}/credits/adjustments", params(("customerId" = String, Path),
        ("Idempotency-Key" = Option<String>, Header, description = "a retry with the same key books nothing and returns the original answer")),
    request_body = AdjustmentRequest,
    responses((status = 201, body = AdjustmentResult), (status = 400), (status = 401), (status = 404), (status = 409)))]
pub async fn adjust(
    State(state): State<AppState>,
    Path(customer_id): Path<String>,
    headers: HeaderMap,
    Json(req): Json<AdjustmentRequest>,
) -> ApiResult<Response> {
    let customer_id = ulid_param("customerId", &customer_id)?;
    fields::name("name", &req.name)?;
    fields::description("description", req.description.as_deref())?;
    fields::labels("labels", &req.labels)?;
    // Within the amount bound; zero is valid by the schema (it books nothing).
    fields::amount("amount", req.amount)?;
    let key = idempotency_key(&headers)?;
    let request = serde_json::to_string(&req).unwrap_or_default();
    let mut ctx = CustomerTx::begin(&state.db, &customer_id).await?;
    if let Some(k) = &key {
        if let Some(recorded) = idempotency::find(&mut ctx.w.tx, &customer_id, "adjustment", k).await? {
            return replay(recorded, &request, "Idempotency-Key");
        }
    }
    let now = ctx.now;
    // Added credit is an unrestricted, never-expiring grant so it has a place in the draw-down order.
    let grant = if req.amount.is_positive() { Some(adjustment_grant(&mut ctx, &req).await?) } else { None };
    // A correction of zero is valid by the schema; it books nothing (the journal holds no empty
    // movements) and is answered like any other.
    let entries = if req.amount.is_zero() {
        Vec::new()
    } else {
        ctx.book().adjust(req.currency, req.amount, grant, now).map_err(|e| Problem::model("amount", e))?
    };
    let op = Operation {
        reference: format!("adjustment:{}", new_id()),
        name: &req.name,
        description: req.description.as_deref(),
        labels: &req.labels,
    };
    ctx.save(&entries, &op, &state.metrics).await?;
    let result =
        AdjustmentResult { name: req.name.clone(), description: req.description.clone(), labels: req.labels.clone() };
    if let Some(k) = &key {
        let response = serde_json::to_string(&result).unwrap_or_default();
        let record = Record {
            customer_id: &customer_id,
            operation: "adjustment",
            key: k,
            request: &request,
            status: 201,
            response: &response,
        };
        idempotency::insert(&mut ctx.w.tx, &record, now).await?;
    }
    ctx.commit().await?;
    Ok((StatusCode::CREATED, axum::Json(result)).into_response())
}

/// Added credit is an unrestricted, never-expiring grant so it has a place in the draw-down order.
async fn adjustment_grant(ctx: &mut CustomerTx, req: &AdjustmentRequest) -> ApiResult<Grant> {
    let now = ctx.now;
    let spec = GrantSpec {
        currency: req.currency,
        amount: req.amount,
        funding_method: FundingMethod::None,
        purchase: None,
        priority: Priority::DEFAULT,
        effective_at: Some(now),
        expires_after: None,
        features: FeatureFilter::unrestricted(),
    };
    let grant =
        Grant::new(spec, GrantId(new_id()), now, 0).map_err(|e| Problem::bad_request("amount", e.to_string()))?;
    let mut record = GrantRecord {
        state: credits::GrantState::new(grant),
        customer_id: ctx.customer_id.clone(),
        key: None,
        name: req.name.clone(),
        description: req.description.clone(),
        labels: req.labels.clone(),
        tax_config: None,
        updated_at: now,
    };
    record.state.grant.seq = grants::insert(&mut ctx.w.tx, &record).await?;
    Ok(record.state.grant)
}
