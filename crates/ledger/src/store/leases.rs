//! What the ledger remembers about gateway leases beyond the hold itself: who owns the id and
//! which top-up request was applied last.

use std::collections::HashMap;

use chrono::{DateTime, Utc};
use sqlx::Row;

use super::StoreResult;
use crate::db::{micros, rows};

pub struct LeaseRecord {
    pub customer_id: String,
    pub closed: bool,
    pub last_seq: i64,
}

/// The leases among `lease_ids` that ever existed, by id.
pub async fn find_many(
    conn: &mut sqlx::AnyConnection,
    lease_ids: &[String],
) -> StoreResult<HashMap<String, LeaseRecord>> {
    let sql = "SELECT id, customer_id, released_at, last_seq FROM holds WHERE id IN ({list})";
    let mut found = HashMap::new();
    let columns = [
        ("id", rows::Kind::Text),
        ("customer_id", rows::Kind::Text),
        ("released_at", rows::Kind::Int),
        ("last_seq", rows::Kind::Int),
    ];
    for r in rows::fetch_small_rows_by_ids(conn, sql, &columns, lease_ids).await? {
        let [id, customer_id, released_at, last_seq] = r.as_slice() else { return Err(rows::wrong_columns(&r).into()) };
        let record = LeaseRecord {
            customer_id: customer_id.text()?.to_owned(),
            closed: released_at.opt_int()?.is_some(),
            last_seq: last_seq.int()?,
        };
        found.insert(id.text()?.to_owned(), record);
    }
    Ok(found)
}

/// Live customers with leases whose TTL passed by `now` and that are not yet closed (a deleted
/// customer cannot be locked, so its leases stay as they are and must not fill the batch).
pub async fn customers_with_expired(
    conn: &mut sqlx::AnyConnection,
    now: DateTime<Utc>,
    limit: i64,
) -> StoreResult<Vec<String>> {
    let rows = sqlx::query(
        "SELECT DISTINCT h.customer_id FROM holds h JOIN customers c ON c.id = h.customer_id \
         WHERE h.released_at IS NULL AND h.expires_at <= $1 AND c.deleted_at IS NULL LIMIT $2",
    )
    .bind(micros(now))
    .bind(limit)
    .fetch_all(&mut *conn)
    .await?;
    Ok(rows.iter().map(|r| r.try_get::<String, _>(0)).collect::<Result<_, _>>()?)
}
