//! Ingested CloudEvents, stored durably and idempotently by (source, id).

use chrono::{DateTime, Utc};
use sqlx::Row;

use super::customers::string_condition;
use super::StoreResult;
use crate::db::{from_micros, micros, Backend, Tx};
use crate::query::{CursorPage, CursorPosition, StringFilter};

pub struct NewEvent<'a> {
    pub source: &'a str,
    pub id: &'a str,
    pub kind: &'a str,
    pub subject: &'a str,
    pub time: Option<DateTime<Utc>>,
    /// The event exactly as received.
    pub body: String,
}

/// Stores an event unless one with the same (source, id) exists; `true` if it was new.
pub async fn insert(tx: &mut Tx, event: &NewEvent<'_>, now: DateTime<Utc>) -> StoreResult<bool> {
    let done = sqlx::query(
        "INSERT INTO events (source, id, type, subject, time, body, ingested_at) VALUES ($1, $2, $3, $4, $5, $6, $7) \
         ON CONFLICT (source, id) DO NOTHING",
    )
    .bind(event.source)
    .bind(event.id)
    .bind(event.kind)
    .bind(event.subject)
    .bind(event.time.map(micros))
    .bind(&event.body)
    .bind(micros(now))
    .execute(&mut **tx)
    .await?;
    Ok(done.rows_affected() == 1)
}

pub struct StoredEvent {
    pub seq: i64,
    pub body: String,
    pub subject: String,
    pub ingested_at: DateTime<Utc>,
}

pub struct EventFilters {
    pub id: Option<StringFilter>,
    pub source: Option<StringFilter>,
    pub subject: Option<StringFilter>,
    pub kind: Option<StringFilter>,
}

/// A page of events, newest ingested first, and whether older / newer matching events exist
/// beyond it.
pub async fn list(
    conn: &mut sqlx::AnyConnection,
    backend: Backend,
    filters: &EventFilters,
    page: CursorPage,
) -> StoreResult<(Vec<StoredEvent>, bool, bool)> {
    let mut binds = Vec::new();
    let mut conditions = vec!["1 = 1".to_owned()];
    for (column, filter) in
        [("id", &filters.id), ("source", &filters.source), ("subject", &filters.subject), ("type", &filters.kind)]
    {
        if let Some(f) = filter {
            conditions.push(string_condition(backend, column, f, &mut binds));
        }
    }
    let (position, order) = match page.position {
        CursorPosition::Start => (String::new(), "DESC"),
        CursorPosition::After(seq) => (format!(" AND seq < {seq}"), "DESC"),
        CursorPosition::Before(seq) => (format!(" AND seq > {seq}"), "ASC"),
    };
    let base = conditions.join(" AND ");
    let sql = format!(
        "SELECT seq, body, subject, ingested_at FROM events WHERE {base}{position} ORDER BY seq {order} LIMIT {}",
        page.size
    );
    let mut query = sqlx::query(&sql);
    for b in &binds {
        query = query.bind(b.clone());
    }
    let rows = query.fetch_all(&mut *conn).await?;
    let mut out = Vec::new();
    for r in &rows {
        out.push(StoredEvent {
            seq: r.try_get("seq")?,
            body: r.try_get("body")?,
            subject: r.try_get("subject")?,
            ingested_at: from_micros(r.try_get("ingested_at")?),
        });
    }
    if order == "ASC" {
        out.reverse();
    }
    // Both directions, whichever way this page was reached (a page reached backwards still has
    // older events after it).
    let (has_older, has_newer) = match (out.first(), out.last()) {
        (Some(newest), Some(oldest)) => (
            exists_beyond(conn, &base, &binds, "<", oldest.seq).await?,
            exists_beyond(conn, &base, &binds, ">", newest.seq).await?,
        ),
        _ => (false, false),
    };
    Ok((out, has_older, has_newer))
}

async fn exists_beyond(
    conn: &mut sqlx::AnyConnection,
    base: &str,
    binds: &[String],
    cmp: &str,
    seq: i64,
) -> StoreResult<bool> {
    let sql = format!("SELECT 1 FROM events WHERE {base} AND seq {cmp} {seq} LIMIT 1");
    let mut q = sqlx::query(&sql);
    for b in binds {
        q = q.bind(b.clone());
    }
    Ok(q.fetch_optional(&mut *conn).await?.is_some())
}
