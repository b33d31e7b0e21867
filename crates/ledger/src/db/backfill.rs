//! Data migrations: rows a schema migration derives from what is already stored, in the
//! migration's transaction.

use std::collections::HashMap;

use credits::limits::MAX_CALL_NUMBER;
use credits::usage_mark::{self, UsageMark};
use sqlx::Row;

use super::rows::{Rows, Value};
use super::Tx;

/// Gives every stream with ranges booked by key a mark (a ledger upgraded from one that kept a
/// key per range, schema migration 7): the ranges that follow each other from 0 make the mark, any
/// other leaves the stream keyed, so none of them books again.
pub async fn usage_marks(tx: &mut Tx, now: i64) -> sqlx::Result<()> {
    let rows = sqlx::query("SELECT key, customer_id FROM usage_records").fetch_all(&mut **tx).await?;
    let mut streams: HashMap<String, (String, Vec<(u64, u64)>)> = HashMap::new();
    for r in &rows {
        let (key, customer_id): (String, String) = (r.try_get(0)?, r.try_get(1)?);
        match usage_mark::parse_key(&key) {
            Some((stream, from, to)) => {
                streams.entry(stream.to_owned()).or_insert_with(|| (customer_id, Vec::new())).1.push((from, to))
            }
            // Not a key the ledger writes: no range it books can have it.
            None => tracing::warn!(%key, "usage record with an unreadable key left without a mark"),
        }
    }
    let mut marks = Rows::new(MARK_COLUMNS);
    for (stream, (customer_id, mut ranges)) in streams {
        // A range beyond what a mark can hold (no longer accepted) stays known by its key only.
        let all = ranges.len();
        ranges.retain(|&(_, to)| to <= MAX_CALL_NUMBER);
        let beyond = ranges.len() < all;
        let mut mark = UsageMark::of_keyed_ranges(ranges);
        mark.keyed |= beyond;
        marks.push(mark_row(stream, customer_id, mark, now));
    }
    marks
        .execute(
            tx,
            "INSERT INTO usage_marks (stream, customer_id, booked_to, keyed, updated_at)",
            "ON CONFLICT (stream) DO NOTHING",
        )
        .await
}

pub const MARK_COLUMNS: usize = 5;

/// A `usage_marks` row (`stream, customer_id, booked_to, keyed, updated_at`), as every writer of
/// the table writes it. `booked_to` never exceeds [`MAX_CALL_NUMBER`]: ranges beyond it are refused.
pub fn mark_row(
    stream: impl Into<Value>,
    customer_id: impl Into<Value>,
    mark: UsageMark,
    now: i64,
) -> [Value; MARK_COLUMNS] {
    [
        stream.into(),
        customer_id.into(),
        Value::from(i64::try_from(mark.booked_to).unwrap_or(i64::MAX)),
        Value::from(i64::from(mark.keyed)),
        Value::from(now),
    ]
}
