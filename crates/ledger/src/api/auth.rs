//! Who may call the API: bearer tokens in two scopes. An admin token may do everything; a gateway
//! token only what a gateway node needs (look up customers, read balances, report usage and
//! leases), so a token copied out of a gateway's configuration cannot mint credit or rewrite
//! customers. Several tokens per scope may be valid at once, for rotation.

use std::sync::Arc;

use axum::extract::{MatchedPath, Request, State};
use axum::http::{header, HeaderValue, Method, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use subtle::{Choice, ConstantTimeEq};

use super::problem::Problem;
use super::AppState;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Scope {
    Admin,
    Gateway,
}

/// Who may call the API.
#[derive(Clone)]
pub enum Auth {
    Tokens(Arc<Tokens>),
    /// Only with `--insecure-no-auth`: every caller is an admin.
    Open,
}

/// The valid tokens of each scope. Never printed: `Debug` is deliberately not derived.
pub struct Tokens {
    admin: Vec<Vec<u8>>,
    gateway: Vec<Vec<u8>>,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum TokenError {
    #[error("no admin token: pass --token or CREDITS_LEDGER_TOKEN")]
    NoAdminToken,
    #[error("a token must not be empty or contain whitespace")]
    Malformed,
    #[error("the same token is given as an admin and as a gateway token")]
    SharedByScopes,
}

impl Auth {
    /// Admin and gateway tokens; at least one admin token, none empty, none in both scopes.
    pub fn tokens<A: AsRef<str>, G: AsRef<str>>(admin: &[A], gateway: &[G]) -> Result<Auth, TokenError> {
        let (admin, gateway) = (token_bytes(admin)?, token_bytes(gateway)?);
        if admin.is_empty() {
            return Err(TokenError::NoAdminToken);
        }
        if gateway.iter().any(|g| admin.contains(g)) {
            return Err(TokenError::SharedByScopes);
        }
        Ok(Auth::Tokens(Arc::new(Tokens { admin, gateway })))
    }

    /// The scope the `Authorization` header grants, if any.
    pub fn scope(&self, authorization: Option<&str>) -> Option<Scope> {
        let tokens = match self {
            Auth::Open => return Some(Scope::Admin),
            Auth::Tokens(tokens) => tokens,
        };
        // The scheme is case-insensitive (RFC 7235 §2.1); the token is not.
        let given = authorization
            .and_then(|h| h.split_once(' '))
            .filter(|(scheme, _)| scheme.eq_ignore_ascii_case("bearer"))
            .map(|(_, token)| token.as_bytes())?;
        // Every token is compared, matching or not, so the time taken tells nothing about which.
        let any = |list: &[Vec<u8>]| list.iter().fold(Choice::from(0), |found, t| found | given.ct_eq(t));
        let (admin, gateway) = (any(&tokens.admin), any(&tokens.gateway));
        if bool::from(admin) {
            Some(Scope::Admin)
        } else if bool::from(gateway) {
            Some(Scope::Gateway)
        } else {
            None
        }
    }
}

fn token_bytes<T: AsRef<str>>(tokens: &[T]) -> Result<Vec<Vec<u8>>, TokenError> {
    tokens
        .iter()
        .map(|t| {
            let t = t.as_ref();
            if t.is_empty() || t.chars().any(char::is_whitespace) {
                Err(TokenError::Malformed)
            } else {
                Ok(t.as_bytes().to_vec())
            }
        })
        .collect()
}

/// What a gateway token may call (HEAD goes with GET): exactly what the filter and a
/// Konnect-style gateway use.
fn gateway_may(method: &Method, route: &str) -> bool {
    let read = *method == Method::GET || *method == Method::HEAD;
    match route {
        "/v3/gateway/sync" | "/v3/openmeter/events" => *method == Method::POST,
        // Envoy's ext_authz asks with the method of the call it checks.
        "/v3/gateway/authorize" | "/v3/gateway/authorize/{*path}" => true,
        "/v3/openmeter/customers"
        | "/v3/openmeter/customers/{customerId}"
        | "/v3/openmeter/customers/{customerId}/credits/balance" => read,
        _ => false,
    }
}

/// Refuses a request without a valid token (401) or whose token's scope does not cover the
/// route (403). Neither answer repeats what the client sent.
pub async fn require_token(State(state): State<AppState>, req: Request, next: Next) -> Response {
    let authorization = req.headers().get(header::AUTHORIZATION).and_then(|v| v.to_str().ok());
    match state.auth.scope(authorization) {
        Some(Scope::Admin) => next.run(req).await,
        Some(Scope::Gateway) => {
            let route = req.extensions().get::<MatchedPath>().map(MatchedPath::as_str).unwrap_or("");
            if gateway_may(req.method(), route) {
                next.run(req).await
            } else {
                Problem::new(
                    StatusCode::FORBIDDEN,
                    "a gateway token may only look up customers, read balances and report usage; this needs an admin token",
                )
                .into_response()
            }
        }
        None => {
            let mut response =
                Problem::new(StatusCode::UNAUTHORIZED, "a valid bearer token is required").into_response();
            response.headers_mut().insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
            response
        }
    }
}
