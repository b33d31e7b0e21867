//! Usage reported by gateways, recorded by idempotency key so a retried range books nothing
//! (`books::Writes::usage` writes the records).

use std::collections::HashSet;

use credits::sync::UsageRange;
use credits::{Currency, FeatureKey};
use sqlx::Row;

use super::StoreResult;
use crate::db::rows;

pub struct UsageRecord<'a> {
    pub key: &'a str,
    pub customer_id: &'a str,
    pub node: &'a str,
    pub subject: &'a str,
    pub currency: Currency,
    pub feature: Option<&'a FeatureKey>,
    pub range: &'a UsageRange,
}

/// The keys among `keys` recorded before.
pub async fn recorded(conn: &mut sqlx::AnyConnection, keys: &[String]) -> StoreResult<HashSet<String>> {
    let rows = rows::fetch_by_ids(conn, "SELECT key FROM usage_records WHERE key IN ({list})", keys).await?;
    Ok(rows.iter().map(|r| r.try_get::<String, _>(0)).collect::<Result<_, _>>()?)
}
