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
    /// On the id of the customer the event's subject belongs to.
    pub customer_id: Option<StringFilter>,
    pub times: Vec<TimeBound>,
}

/// Which instant of an event a bound or the order is about.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum EventClock {
    /// When it happened (its `time`, or when it was ingested if it has none).
    Time,
    /// When the ledger ingested (and stored) it.
    Ingested,
}

impl EventClock {
    fn column(self) -> &'static str {
        match self {
            EventClock::Time => "COALESCE(time, ingested_at)",
            EventClock::Ingested => "ingested_at",
        }
    }
}

/// `clock op at`, with `op` one of `=`, `<`, `<=`, `>`, `>=`.
pub struct TimeBound {
    pub clock: EventClock,
    pub op: &'static str,
    pub at: DateTime<Utc>,
}

/// The order of a list: by one clock, then by ingestion order.
#[derive(Clone, Copy, Debug)]
pub struct EventOrder {
    pub clock: EventClock,
    pub descending: bool,
}

fn conditions(backend: Backend, filters: &EventFilters, binds: &mut Vec<String>) -> String {
    let mut conditions = vec!["1 = 1".to_owned()];
    for (column, filter) in
        [("id", &filters.id), ("source", &filters.source), ("subject", &filters.subject), ("type", &filters.kind)]
    {
        if let Some(f) = filter {
            conditions.push(string_condition(backend, column, f, binds));
        }
    }
    if let Some(f) = &filters.customer_id {
        let customer = "(SELECT s.customer_id FROM customer_subjects s WHERE s.subject_key = events.subject)";
        conditions.push(string_condition(backend, customer, f, binds));
    }
    for b in &filters.times {
        conditions.push(format!("{} {} {}", b.clock.column(), b.op, micros(b.at)));
    }
    conditions.join(" AND ")
}

/// A page of events in `order`, and whether matching events exist after / before it in that order.
pub async fn list(
    conn: &mut sqlx::AnyConnection,
    backend: Backend,
    filters: &EventFilters,
    order: EventOrder,
    page: CursorPage,
) -> StoreResult<(Vec<StoredEvent>, bool, bool)> {
    let mut binds = Vec::new();
    let base = conditions(backend, filters, &mut binds);
    let key = format!("{}, seq", order.clock.column());
    // Row values compare (clock, seq) with the cursor's row: the same on both databases.
    let beyond = |seq: i64, later: bool| {
        let cmp = if later == order.descending { "<" } else { ">" };
        format!("({key}) {cmp} (SELECT {key} FROM events WHERE seq = {seq})")
    };
    let (position, backwards) = match page.position {
        CursorPosition::Start => (String::new(), false),
        CursorPosition::After(seq) => (format!(" AND {}", beyond(seq, true)), false),
        CursorPosition::Before(seq) => (format!(" AND {}", beyond(seq, false)), true),
    };
    let direction = if order.descending != backwards { "DESC" } else { "ASC" };
    let column = order.clock.column();
    let sql = format!(
        "SELECT seq, body, subject, ingested_at FROM events WHERE {base}{position}          ORDER BY {column} {direction}, seq {direction} LIMIT {}",
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
    if backwards {
        out.reverse();
    }
    // Both directions, whichever way this page was reached.
    let (has_next, has_previous) = match (out.first(), out.last()) {
        (Some(first), Some(last)) => (
            exists(conn, &format!("{base} AND {}", beyond(last.seq, true)), &binds).await?,
            exists(conn, &format!("{base} AND {}", beyond(first.seq, false)), &binds).await?,
        ),
        _ => (false, false),
    };
    Ok((out, has_next, has_previous))
}

async fn exists(conn: &mut sqlx::AnyConnection, condition: &str, binds: &[String]) -> StoreResult<bool> {
    let sql = format!("SELECT 1 FROM events WHERE {condition} LIMIT 1");
    let mut q = sqlx::query(&sql);
    for b in binds {
        q = q.bind(b.clone());
    }
    Ok(q.fetch_optional(&mut *conn).await?.is_some())
}
