//! The HTTP API: Konnect-compatible credits endpoints under `/v3/openmeter`, plus our charge
//! and void extensions, behind bearer tokens (see [`auth`]).

pub mod auth;
pub mod authorize;
pub mod balance;
pub mod body;
pub mod channels;
pub mod charges;
pub mod console;
pub mod customer_tx;
pub mod customers;
pub mod events;
pub mod fields;
pub mod gateway;
pub mod grants;
pub mod notification_events;
pub mod openapi;
pub mod problem;
pub mod request;
pub mod rules;
pub mod transactions;

use std::any::Any;
use std::sync::Arc;
use std::time::Instant;

use axum::extract::{DefaultBodyLimit, MatchedPath, Request, State};
use axum::http::{header, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{any, get, post};
use axum::Router;
use tower_http::catch_panic::CatchPanicLayer;

use crate::db::Db;
use crate::metrics::Metrics;
pub use auth::Auth;
use problem::Problem;

#[derive(Clone)]
pub struct AppState {
    pub db: Db,
    pub auth: Auth,
    pub metrics: Arc<Metrics>,
    /// The largest request body read (`--max-body-bytes`); larger ones are refused with 413.
    pub max_body_bytes: usize,
    /// Gateway syncs waiting to be served together.
    pub syncs: Arc<gateway::SyncQueue>,
    /// The books gateway syncs committed last.
    pub books: Arc<crate::book_cache::BookCache>,
}

async fn observe(State(state): State<AppState>, req: Request, next: Next) -> Response {
    let started = Instant::now();
    let method = req.method().to_string();
    let route =
        req.extensions().get::<MatchedPath>().map(|p| p.as_str().to_owned()).unwrap_or_else(|| "unmatched".into());
    let response = next.run(req).await;
    state.metrics.observe_request(&method, &route, response.status().as_u16(), started.elapsed());
    response
}

async fn healthz(State(state): State<AppState>) -> Response {
    match sqlx::query("SELECT 1").execute(state.db.pool()).await {
        Ok(_) => (StatusCode::OK, "ok\n").into_response(),
        Err(e) => {
            tracing::warn!(error = %e, "health check failed");
            Problem::new(StatusCode::SERVICE_UNAVAILABLE, "the database is not reachable").into_response()
        }
    }
}

async fn metrics(State(state): State<AppState>) -> Response {
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], state.metrics.render()).into_response()
}

async fn not_found() -> Problem {
    Problem::new(StatusCode::NOT_FOUND, "no such endpoint")
}

async fn method_not_allowed() -> Problem {
    Problem::new(StatusCode::METHOD_NOT_ALLOWED, "this endpoint does not support this method")
}

/// A panic in a handler (a bug) answers 500 with a problem and leaves the process serving: the
/// ledger is built with `panic = "unwind"` (see `main.rs`), and nothing was committed, since a
/// write transaction that is dropped unfinished rolls back.
fn panic_problem(panic: Box<dyn Any + Send + 'static>) -> Response {
    let message = panic
        .downcast_ref::<String>()
        .map(String::as_str)
        .or_else(|| panic.downcast_ref::<&str>().copied())
        .unwrap_or("(no message)");
    tracing::error!(panic = %message, "a request handler panicked; answered 500");
    Problem::new(StatusCode::INTERNAL_SERVER_ERROR, "the ledger failed on this request; nothing was booked")
        .into_response()
}

pub fn router(state: AppState) -> Router {
    router_with(state, Router::new())
}

/// The router with `extra` routes merged in, behind the same tokens and layers as every API route
/// (tests add routes that misbehave on purpose).
pub fn router_with(state: AppState, extra: Router<AppState>) -> Router {
    let customer = "/v3/openmeter/customers/{customerId}";
    let api = Router::new()
        .route("/v3/openmeter/customers", post(customers::create).get(customers::list))
        .route(customer, get(customers::get).put(customers::update).delete(customers::delete))
        .route(&format!("{customer}/credits/grants"), post(grants::create).get(grants::list))
        .route(&format!("{customer}/credits/grants/{{creditGrantId}}"), get(grants::get))
        .route(
            &format!("{customer}/credits/grants/{{creditGrantId}}/settlement/external"),
            post(grants::settle_external),
        )
        .route(&format!("{customer}/credits/grants/{{creditGrantId}}/void"), post(grants::void_request))
        .route(&format!("{customer}/credits/balance"), get(balance::get))
        .route(&format!("{customer}/credits/transactions"), get(transactions::list))
        .route(&format!("{customer}/credits/adjustments"), post(charges::adjust))
        .route(&format!("{customer}/credits/charges"), post(charges::charge))
        .route("/v3/openmeter/events", post(events::ingest).get(events::list))
        .route("/v3/openmeter/notification/channels", post(channels::create).get(channels::list))
        .route(
            "/v3/openmeter/notification/channels/{channelId}",
            get(channels::get).put(channels::update).delete(channels::delete),
        )
        .route("/v3/openmeter/notification/rules", post(rules::create).get(rules::list))
        .route("/v3/openmeter/notification/rules/{ruleId}", get(rules::get).put(rules::update).delete(rules::delete))
        .route("/v3/openmeter/notification/events", get(notification_events::list))
        .route("/v3/openmeter/notification/events/{eventId}", get(notification_events::get))
        .route("/v3/gateway/sync", post(gateway::sync))
        .route("/v3/gateway/authorize", any(authorize::authorize))
        .route("/v3/gateway/authorize/{*path}", any(authorize::authorize))
        .merge(extra)
        // Layers added later run first: the token is checked before any body is read.
        .route_layer(middleware::from_fn_with_state(state.clone(), body::bounded))
        .route_layer(middleware::from_fn_with_state(state.clone(), auth::require_token));
    Router::new()
        .merge(api)
        .merge(console::routes())
        .route("/healthz", get(healthz))
        .route("/metrics", get(metrics))
        .route("/v3/openapi.json", get(openapi::document))
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .layer(middleware::from_fn_with_state(state.clone(), observe))
        .layer(DefaultBodyLimit::max(state.max_body_bytes))
        .layer(middleware::map_response(problem::ensure_problem))
        .layer(CatchPanicLayer::custom(panic_problem))
        .with_state(state)
}
