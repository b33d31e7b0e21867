//! The central credit ledger: a Konnect-compatible credits API over SQLite or PostgreSQL, with
//! every credit decision taken by the `credits` crate.
#![deny(clippy::arithmetic_side_effects)]

pub mod api;
pub mod book_cache;
pub mod check;
pub mod db;
pub mod expiry;
pub mod metrics;
pub mod notify;
pub mod query;
pub mod rule;
pub mod store;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use api::{AppState, Auth};

/// How the service runs.
pub struct ServeConfig {
    pub listen: SocketAddr,
    pub database: String,
    pub auth: Auth,
    pub expiry_interval: Duration,
}

/// Connects, migrates, and builds the application state.
pub async fn state(database: &str, auth: Auth) -> anyhow::Result<AppState> {
    let db = db::Db::connect(database).await?;
    let metrics = Arc::new(metrics::Metrics::default());
    let max_body_bytes = api::request::DEFAULT_MAX_BODY_BYTES;
    Ok(AppState { db, auth, metrics, max_body_bytes, syncs: Default::default(), books: Default::default() })
}

/// Serves until the listener fails or the process is told to stop, with webhooks delivered as
/// by default.
pub async fn serve(
    listener: tokio::net::TcpListener,
    state: AppState,
    expiry_interval: Duration,
) -> anyhow::Result<()> {
    serve_with(listener, state, Jobs { expiry_interval, webhooks: notify::delivery::WebhookConfig::default() }).await
}

/// The background jobs of a serving ledger.
pub struct Jobs {
    /// How often due expiries and fundings are booked.
    pub expiry_interval: Duration,
    pub webhooks: notify::delivery::WebhookConfig,
}

/// Serves with the given background jobs until the listener fails or the process is told to stop.
pub async fn serve_with(listener: tokio::net::TcpListener, state: AppState, jobs: Jobs) -> anyhow::Result<()> {
    let expiry = tokio::spawn(expiry::run(state.clone(), jobs.expiry_interval));
    let delivery = tokio::spawn(notify::delivery::run(state.db.clone(), state.metrics.clone(), jobs.webhooks));
    let app = api::router(state);
    let result = axum::serve(listener, app).with_graceful_shutdown(shutdown_signal()).await;
    expiry.abort();
    delivery.abort();
    Ok(result?)
}

async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        if let Ok(mut s) = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            s.recv().await;
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        _ = ctrl_c => {},
        _ = term => {},
    }
}
