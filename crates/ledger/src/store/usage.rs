//! Usage reported by gateways, and how the ledger knows it booked a range so that a retry books
//! nothing: one mark per stream ([`credits::usage_mark`]), and a key per range only for ranges
//! booked apart from their stream's mark (`books::Writes` writes both).

use std::collections::{HashMap, HashSet};

use credits::sync::UsageRange;
use credits::usage_mark::UsageMark;
use credits::{Currency, FeatureKey};
use sqlx::Row;

use super::StoreResult;
use crate::db::rows::{self, Rows, Value};

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

/// The marks of `streams` (a stream never booked has none).
pub async fn marks(conn: &mut sqlx::AnyConnection, streams: &[String]) -> StoreResult<HashMap<String, UsageMark>> {
    let sql = "SELECT stream, booked_to, keyed FROM usage_marks WHERE stream IN ({list})";
    rows::fetch_by_ids(conn, sql, streams)
        .await?
        .iter()
        .map(|r| {
            let mark = UsageMark {
                booked_to: r.try_get::<i64, _>(1)?.try_into().unwrap_or(0),
                keyed: r.try_get::<i64, _>(2)? != 0,
            };
            Ok((r.try_get(0)?, mark))
        })
        .collect()
}

pub const MARK_COLUMNS: usize = 5;

/// A mark row for [`MARK_UPSERT`].
pub fn push_mark(rows: &mut Rows, stream: &str, customer_id: &str, mark: UsageMark, now: i64) {
    rows.push([
        Value::from(stream),
        Value::from(customer_id),
        Value::from(i64::try_from(mark.booked_to).unwrap_or(i64::MAX)),
        Value::from(i64::from(mark.keyed)),
        Value::from(now),
    ]);
}

/// Writes marks; a mark never moves back (two ledgers serving one stream at once, which the
/// customer's lock prevents unless the subject changed hands in between).
pub const MARK_UPSERT: (&str, &str) = (
    "INSERT INTO usage_marks (stream, customer_id, booked_to, keyed, updated_at)",
    "ON CONFLICT (stream) DO UPDATE SET booked_to = excluded.booked_to, keyed = excluded.keyed, \
     updated_at = excluded.updated_at WHERE usage_marks.booked_to <= excluded.booked_to",
);
