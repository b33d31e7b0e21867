//! Usage reported by gateways, recorded by idempotency key so a retried range books nothing.

use chrono::{DateTime, Utc};
use credits::sync::UsageRange;
use credits::{Currency, FeatureKey};

use super::StoreResult;
use crate::db::{micros, Tx};

pub struct UsageRecord<'a> {
    pub key: &'a str,
    pub customer_id: &'a str,
    pub node: &'a str,
    pub subject: &'a str,
    pub currency: Currency,
    pub feature: Option<&'a FeatureKey>,
    pub range: &'a UsageRange,
}

/// Was this range's key recorded before?
pub async fn exists(tx: &mut Tx, key: &str) -> StoreResult<bool> {
    Ok(sqlx::query("SELECT 1 FROM usage_records WHERE key = $1").bind(key).fetch_optional(&mut **tx).await?.is_some())
}

/// Records a range; `false` if its key was recorded before (nothing to book).
pub async fn record(tx: &mut Tx, r: &UsageRecord<'_>, now: DateTime<Utc>) -> StoreResult<bool> {
    let done = sqlx::query(
        "INSERT INTO usage_records (key, customer_id, node, subject, currency, feature, amount, calls, settlement_mode, booked_at) \
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10) ON CONFLICT (key) DO NOTHING",
    )
    .bind(r.key)
    .bind(r.customer_id)
    .bind(r.node)
    .bind(r.subject)
    .bind(r.currency.as_str())
    .bind(r.feature.map(|f| f.as_str().to_owned()))
    .bind(r.range.amount.to_string())
    .bind(i64::try_from(r.range.calls()).unwrap_or(i64::MAX))
    .bind(r.range.settlement_mode.as_str())
    .bind(micros(now))
    .execute(&mut **tx)
    .await?;
    Ok(done.rows_affected() == 1)
}
