//! `ANY /v3/gateway/authorize/…`: a per-call charge shaped for Envoy's `ext_authz` (HTTP
//! service) — the naive design where the gateway asks the ledger on every call. The gateway
//! forwards the call's method and path under this prefix plus the subject and request-id headers,
//! and adds the charge terms as headers of its own; the ledger books the call's price through the
//! public charge path and answers 200 (allow) or a problem (refuse). The benchmarks compare the
//! filter against it; the filter itself never calls it.

use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use credits::{Amount, Currency, FeatureKey, SettlementMode};

use super::charges::{book_charge, ChargeRequest};
use super::problem::{ApiResult, Problem};
use super::AppState;
use crate::store::{customers, new_id, Labels};

/// Header naming the header that carries the subject (default `x-consumer-username`).
pub const SUBJECT_HEADER: &str = "x-credits-subject-header";
pub const PRICE: &str = "x-credits-price";
pub const CURRENCY: &str = "x-credits-currency";
pub const FEATURE_KEY: &str = "x-credits-feature-key";
pub const SETTLEMENT_MODE: &str = "x-credits-settlement-mode";
/// Makes a retried authorization of the same call book nothing again.
pub const REQUEST_ID: &str = "x-request-id";

fn header<'h>(headers: &'h HeaderMap, name: &str) -> ApiResult<Option<&'h str>> {
    match headers.get(name) {
        None => Ok(None),
        Some(v) => v
            .to_str()
            .map(|s| Some(s.trim()).filter(|s| !s.is_empty()))
            .map_err(|_| Problem::bad_request(name, format!("the {name} header must be text"))),
    }
}

fn required<'h>(headers: &'h HeaderMap, name: &str) -> ApiResult<&'h str> {
    header(headers, name)?.ok_or_else(|| Problem::bad_request(name, format!("the {name} header is required")))
}

/// The charge terms the gateway sends with every authorization request.
fn terms(headers: &HeaderMap) -> ApiResult<(Amount, Currency, Option<FeatureKey>, SettlementMode)> {
    let price = required(headers, PRICE)?;
    let price = Amount::parse_bounded(price).map_err(|e| Problem::bad_request(PRICE, e.to_string()))?;
    let currency = required(headers, CURRENCY)?;
    let currency = Currency::parse(currency).map_err(|e| Problem::bad_request(CURRENCY, e.to_string()))?;
    let feature = header(headers, FEATURE_KEY)?
        .map(|f| FeatureKey::parse(f).map_err(|e| Problem::bad_request(FEATURE_KEY, e.to_string())))
        .transpose()?;
    let mode = match header(headers, SETTLEMENT_MODE)? {
        None | Some("credit_only") => SettlementMode::CreditOnly,
        Some("credit_then_invoice") => SettlementMode::CreditThenInvoice,
        Some(_) => {
            return Err(Problem::bad_request(
                SETTLEMENT_MODE,
                "settlement mode must be credit_only or credit_then_invoice",
            ))
        }
    };
    Ok((price, currency, feature, mode))
}

#[utoipa::path(post, path = "/v3/gateway/authorize/{path}", params(("path" = String, Path, description = "the call's own path (any method is accepted)"),
        ("x-credits-price" = String, Header), ("x-credits-currency" = String, Header),
        ("x-credits-feature-key" = Option<String>, Header), ("x-credits-settlement-mode" = Option<String>, Header),
        ("x-credits-subject-header" = Option<String>, Header, description = "header with the subject; default x-consumer-username"),
        ("x-request-id" = Option<String>, Header, description = "idempotency: the same id books once")),
    responses((status = 200, description = "allowed; the call's price was charged"), (status = 400), (status = 401, description = "no subject"),
        (status = 402, description = "credit does not cover the price; nothing booked"), (status = 403, description = "no customer has this subject")))]
pub async fn authorize(State(state): State<AppState>, headers: HeaderMap) -> ApiResult<Response> {
    let (amount, currency, feature_key, settlement_mode) = terms(&headers)?;
    let subject_header = header(&headers, SUBJECT_HEADER)?.unwrap_or("x-consumer-username");
    let Some(subject) = header(&headers, subject_header)? else {
        return Err(Problem::new(StatusCode::UNAUTHORIZED, format!("the call has no {subject_header} header")));
    };
    let customer_id = {
        let mut conn = state.db.pool().acquire().await?;
        customers::by_subject(&mut conn, subject).await?
    };
    let Some(customer_id) = customer_id else {
        return Err(Problem::new(StatusCode::FORBIDDEN, format!("no customer has the subject [{subject}]"))
            .with("subject", subject));
    };
    let key = match header(&headers, REQUEST_ID)? {
        Some(id) => format!("authorize:{id}"),
        None => format!("authorize:{}", new_id()),
    };
    let req = ChargeRequest {
        amount,
        currency,
        feature_key,
        settlement_mode,
        key,
        name: Some("Gateway call".to_owned()),
        description: None,
        labels: Labels::new(),
    };
    let answer = book_charge(&state, &customer_id, &req).await?;
    // ext_authz treats any 2xx as allow; the body is not forwarded, so none is sent.
    if answer.status().is_success() {
        Ok(StatusCode::OK.into_response())
    } else {
        Ok(answer)
    }
}
