//! Usage reported by gateways, and how the ledger knows it booked a range so that a retry books
//! nothing: one mark per stream ([`credits::usage_mark`]), and a key per range only for ranges
//! booked apart from their stream's mark (`books::Writes` writes both).

use std::collections::{HashMap, HashSet};

use credits::sync::UsageRange;
use credits::usage_mark::UsageMark;
use credits::{Currency, FeatureKey};
use sqlx::Row;

use super::{StoreError, StoreResult};
use crate::db::backfill;
use crate::db::rows::{self, Rows};

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
pub async fn marks(conn: &mut sqlx::AnyConnection, streams: &[&str]) -> StoreResult<HashMap<String, UsageMark>> {
    let sql = "SELECT stream, booked_to, keyed FROM usage_marks WHERE stream IN ({list})";
    let columns = [("stream", rows::Kind::Text), ("booked_to", rows::Kind::Int), ("keyed", rows::Kind::Int)];
    rows::fetch_small_rows_by_ids(conn, sql, &columns, streams)
        .await?
        .iter()
        .map(|r| {
            let [stream, booked_to, keyed] = r.as_slice() else { return Err(rows::wrong_columns(r).into()) };
            let stored = booked_to.int()?;
            // A negative mark would book every call of the stream again: refuse it.
            let booked_to = u64::try_from(stored).map_err(|_| StoreError::Corrupt {
                table: "usage_marks",
                column: "booked_to",
                value: stored.to_string(),
            })?;
            Ok((stream.text()?.to_owned(), UsageMark { booked_to, keyed: keyed.int()? != 0 }))
        })
        .collect()
}

pub use crate::db::backfill::MARK_COLUMNS;

/// A mark row for [`MARK_UPSERT`].
pub fn push_mark(rows: &mut Rows, stream: String, customer_id: String, mark: UsageMark, now: i64) {
    rows.push(backfill::mark_row(stream, customer_id, mark, now));
}

/// Writes marks; a mark never moves back (two ledgers serving one stream at once, which the
/// customer's lock prevents unless the subject changed hands in between).
pub const MARK_UPSERT: (&str, &str) = (
    "INSERT INTO usage_marks (stream, customer_id, booked_to, keyed, updated_at)",
    "ON CONFLICT (stream) DO UPDATE SET booked_to = excluded.booked_to, keyed = excluded.keyed, \
     updated_at = excluded.updated_at WHERE usage_marks.booked_to <= excluded.booked_to",
);
