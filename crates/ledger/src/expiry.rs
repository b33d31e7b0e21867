//! The background job that books expiries and fundings as they fall due and closes leases whose
//! TTL passed. Queries see all of these at once anyway; the job makes the store catch up. Each
//! customer is handled under its lock, so several ledger instances running the job book every
//! expiry (and close every lease) exactly once.

use std::time::Duration;

use crate::api::customer_tx::settle_due;
use crate::api::AppState;
use crate::store::{grants, leases};

/// How many customers one pass books at most before the next pass.
const BATCH: i64 = 200;

pub async fn run(state: AppState, interval: Duration) {
    let mut ticker = tokio::time::interval(interval);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        ticker.tick().await;
        if let Err(e) = pass(&state).await {
            tracing::warn!(error = %e, "expiry pass failed; retrying on the next tick");
        }
    }
}

/// One pass: every customer with something due. Returns the entries booked.
pub async fn pass(state: &AppState) -> anyhow::Result<usize> {
    let mut conn = state.db.pool().acquire().await?;
    let now = state.db.now(&mut conn).await?;
    let mut due = grants::customers_with_due_events(&mut conn, now, BATCH).await?;
    due.extend(leases::customers_with_expired(&mut conn, now, BATCH).await?);
    due.sort();
    due.dedup();
    drop(conn);
    let mut booked: usize = 0;
    for customer_id in due {
        match settle_due(&state.db, &customer_id, &state.metrics).await {
            Ok(n) => booked = booked.saturating_add(n),
            Err(p) => tracing::warn!(customer = %customer_id, detail = %p.detail, "could not book due entries"),
        }
    }
    if booked > 0 {
        tracing::info!(entries = booked, "booked due expiries and fundings");
    }
    Ok(booked)
}
