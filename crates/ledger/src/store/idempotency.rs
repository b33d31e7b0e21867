//! Idempotency records: a write retried with the same key returns the original answer and
//! books nothing; the same key with a different request is a conflict.

use chrono::{DateTime, Utc};
use sqlx::Row;

use super::StoreResult;
use crate::db::{micros, Tx};

pub struct Recorded {
    pub request: String,
    pub status: u16,
    pub response: String,
}

pub async fn find(
    conn: &mut sqlx::AnyConnection,
    customer_id: &str,
    operation: &str,
    key: &str,
) -> StoreResult<Option<Recorded>> {
    let row = sqlx::query("SELECT request, status, response FROM idempotency_records WHERE customer_id = $1 AND operation = $2 AND key = $3")
        .bind(customer_id)
        .bind(operation)
        .bind(key)
        .fetch_optional(&mut *conn)
        .await?;
    match row {
        Some(r) => Ok(Some(Recorded {
            request: r.try_get(0)?,
            status: u16::try_from(r.try_get::<i64, _>(1)?).unwrap_or(200),
            response: r.try_get(2)?,
        })),
        None => Ok(None),
    }
}

pub struct Record<'a> {
    pub customer_id: &'a str,
    pub operation: &'a str,
    pub key: &'a str,
    pub request: &'a str,
    pub status: u16,
    pub response: &'a str,
}

pub async fn insert(tx: &mut Tx, record: &Record<'_>, now: DateTime<Utc>) -> StoreResult<()> {
    sqlx::query(
        "INSERT INTO idempotency_records (customer_id, operation, key, request, status, response, created_at) \
         VALUES ($1, $2, $3, $4, $5, $6, $7)",
    )
    .bind(record.customer_id)
    .bind(record.operation)
    .bind(record.key)
    .bind(record.request)
    .bind(i64::from(record.status))
    .bind(record.response)
    .bind(micros(now))
    .execute(&mut **tx)
    .await?;
    Ok(())
}
