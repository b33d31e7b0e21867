//! The notification outbox: events written in the transaction of the booking (or scan) that
//! caused them, one delivery row per channel, claimed by one ledger instance at a time.

use std::collections::{HashMap, HashSet};

use chrono::{DateTime, Utc};
use sqlx::Row;

use super::StoreResult;
use crate::db::rows::{self, Rows, Value};
use crate::db::{from_micros, micros, opt, Backend, Tx};
use crate::query::{CursorPage, CursorPosition};

/// An event to deliver to `channels`.
pub struct NewEvent {
    pub id: String,
    pub kind: &'static str,
    pub rule_id: String,
    pub customer_id: String,
    /// The exact body every delivery posts.
    pub payload: String,
    pub channels: Vec<String>,
}

pub const PENDING: &str = "pending";
pub const SUCCESS: &str = "success";
pub const FAILED: &str = "failed";

/// Writes events and their pending deliveries (due at once) in this transaction.
pub async fn insert(tx: &mut Tx, events: &[NewEvent], now: DateTime<Utc>) -> StoreResult<()> {
    let (mut event_rows, mut delivery_rows) = (Rows::new(6), Rows::new(5));
    for e in events {
        event_rows.push([
            Value::from(e.id.as_str()),
            Value::from(e.kind),
            Value::from(e.rule_id.as_str()),
            Value::from(e.customer_id.as_str()),
            Value::from(e.payload.as_str()),
            Value::from(micros(now)),
        ]);
        for channel in &e.channels {
            delivery_rows.push([
                Value::from(e.id.as_str()),
                Value::from(channel.as_str()),
                Value::from(PENDING),
                Value::from(0),
                Value::from(micros(now)),
            ]);
        }
    }
    let head = "INSERT INTO notification_events (id, type, rule_id, customer_id, payload, created_at)";
    event_rows.execute(tx, head, "").await?;
    let head = "INSERT INTO notification_deliveries (event_id, channel_id, status, attempts, next_attempt_at)";
    delivery_rows.execute(tx, head, "").await?;
    Ok(())
}

/// (rule, customer, threshold) that fired and have not re-armed, for these customers.
pub type Fired = HashSet<(String, String, String)>;

pub async fn fired(conn: &mut sqlx::AnyConnection, customer_ids: &[String]) -> StoreResult<Fired> {
    let sql = "SELECT rule_id, customer_id, threshold FROM notification_thresholds_fired WHERE customer_id IN ({list})";
    let mut out = Fired::new();
    for r in rows::fetch_by_ids(conn, sql, customer_ids).await? {
        out.insert((r.try_get(0)?, r.try_get(1)?, r.try_get(2)?));
    }
    Ok(out)
}

/// Records thresholds that fired and forgets those that re-armed.
pub async fn set_fired(
    tx: &mut Tx,
    fire: &[(String, String, String)],
    rearm: &[(String, String, String)],
    now: DateTime<Utc>,
) -> StoreResult<()> {
    let mut fired = Rows::new(4);
    for (rule, customer, threshold) in fire {
        fired.push([
            Value::from(rule.as_str()),
            Value::from(customer.as_str()),
            Value::from(threshold.as_str()),
            Value::from(micros(now)),
        ]);
    }
    let head = "INSERT INTO notification_thresholds_fired (rule_id, customer_id, threshold, fired_at)";
    fired.execute(tx, head, "").await?;
    for (rule, customer, threshold) in rearm {
        sqlx::query(
            "DELETE FROM notification_thresholds_fired WHERE rule_id = $1 AND customer_id = $2 AND threshold = $3",
        )
        .bind(rule)
        .bind(customer)
        .bind(threshold)
        .execute(&mut **tx)
        .await?;
    }
    Ok(())
}

/// Claims a grant's expiry notice for a rule; `false` if it was claimed before (by any instance).
pub async fn claim_grant_notice(tx: &mut Tx, rule_id: &str, grant_id: &str, now: DateTime<Utc>) -> StoreResult<bool> {
    let done = sqlx::query(
        "INSERT INTO notification_grant_notices (rule_id, grant_id, noticed_at) VALUES ($1, $2, $3) \
         ON CONFLICT (rule_id, grant_id) DO NOTHING",
    )
    .bind(rule_id)
    .bind(grant_id)
    .bind(micros(now))
    .execute(&mut **tx)
    .await?;
    Ok(done.rows_affected() == 1)
}

/// A delivery attempt this instance claimed.
#[derive(Clone, Debug)]
pub struct Claimed {
    pub seq: i64,
    pub event_id: String,
    pub channel_id: String,
    /// This attempt's number (1 for the first).
    pub attempt: i64,
}

/// Claims up to `limit` due deliveries until `lease_until`, marking each with `token` and
/// counting the attempt. On PostgreSQL `FOR UPDATE SKIP LOCKED` keeps instances that claim at
/// the same time from taking the same row; on SQLite the statement runs alone.
pub async fn claim(
    conn: &mut sqlx::AnyConnection,
    backend: Backend,
    now: DateTime<Utc>,
    lease_until: DateTime<Utc>,
    token: &str,
    max_attempts: i64,
    limit: i64,
) -> StoreResult<Vec<Claimed>> {
    let lock = if backend == Backend::Postgres { " FOR UPDATE SKIP LOCKED" } else { "" };
    let sql = format!(
        "UPDATE notification_deliveries SET attempts = attempts + 1, lease_until = $1, claim = $2 \
         WHERE seq IN (SELECT seq FROM notification_deliveries WHERE status = 'pending' AND next_attempt_at <= $3 \
         AND (lease_until IS NULL OR lease_until <= $3) AND attempts < $4 ORDER BY next_attempt_at, seq LIMIT $5{lock}) \
         RETURNING seq, event_id, channel_id, attempts"
    );
    let rows = sqlx::query(&sql)
        .bind(micros(lease_until))
        .bind(token)
        .bind(micros(now))
        .bind(max_attempts)
        .bind(limit)
        .fetch_all(&mut *conn)
        .await?;
    rows.iter()
        .map(|r| {
            Ok(Claimed {
                seq: r.try_get("seq")?,
                event_id: r.try_get("event_id")?,
                channel_id: r.try_get("channel_id")?,
                attempt: r.try_get("attempts")?,
            })
        })
        .collect()
}

/// How an attempt ended.
pub struct Attempted<'a> {
    pub status: &'static str,
    pub next_attempt_at: DateTime<Utc>,
    /// The receiver's HTTP status, if it answered.
    pub response_status: Option<u16>,
    pub error: Option<&'a str>,
    pub at: DateTime<Utc>,
}

/// Records an attempt's outcome, unless the claim was lost (its lease ran out and another
/// instance claimed the delivery again).
pub async fn record(conn: &mut sqlx::AnyConnection, c: &Claimed, token: &str, a: &Attempted<'_>) -> StoreResult<()> {
    sqlx::query(
        "UPDATE notification_deliveries SET status = $1, next_attempt_at = $2, lease_until = NULL, claim = NULL, \
         last_status = $3, last_error = $4, last_attempt_at = $5 WHERE seq = $6 AND claim = $7",
    )
    .bind(a.status)
    .bind(micros(a.next_attempt_at))
    .bind(a.response_status.map(i64::from))
    .bind(a.error)
    .bind(micros(a.at))
    .bind(c.seq)
    .bind(token)
    .execute(&mut *conn)
    .await?;
    Ok(())
}

/// Deliveries whose last attempt was claimed but never recorded (the instance died) and that
/// have no attempts left: failed.
pub async fn fail_abandoned(conn: &mut sqlx::AnyConnection, now: DateTime<Utc>, max_attempts: i64) -> StoreResult<u64> {
    let done = sqlx::query(
        "UPDATE notification_deliveries SET status = 'failed', lease_until = NULL, claim = NULL, \
         last_error = COALESCE(last_error, 'the attempt was lost') \
         WHERE status = 'pending' AND attempts >= $1 AND (lease_until IS NULL OR lease_until <= $2)",
    )
    .bind(max_attempts)
    .bind(micros(now))
    .execute(&mut *conn)
    .await?;
    Ok(done.rows_affected())
}

/// The payloads of events.
pub async fn payloads(conn: &mut sqlx::AnyConnection, event_ids: &[String]) -> StoreResult<HashMap<String, String>> {
    let sql = "SELECT id, payload FROM notification_events WHERE id IN ({list})";
    let mut out = HashMap::new();
    for r in rows::fetch_by_ids(conn, sql, event_ids).await? {
        out.insert(r.try_get(0)?, r.try_get(1)?);
    }
    Ok(out)
}

/// One channel's delivery of an event.
#[derive(Clone, Debug)]
pub struct DeliveryRecord {
    pub channel_id: String,
    pub status: String,
    pub attempts: i64,
    pub next_attempt_at: DateTime<Utc>,
    pub last_status: Option<i64>,
    pub last_error: Option<String>,
    pub last_attempt_at: Option<DateTime<Utc>>,
}

#[derive(Clone, Debug)]
pub struct EventRecord {
    pub seq: i64,
    pub id: String,
    pub kind: String,
    pub rule_id: String,
    pub customer_id: String,
    pub payload: String,
    pub created_at: DateTime<Utc>,
    pub deliveries: Vec<DeliveryRecord>,
}

pub struct EventFilters {
    pub kind: Option<String>,
    pub rule_id: Option<String>,
    pub customer_id: Option<String>,
    pub id: Option<String>,
}

/// A page of events, newest first, and whether older / newer matching events exist beyond it.
pub async fn list(
    conn: &mut sqlx::AnyConnection,
    filters: &EventFilters,
    page: CursorPage,
) -> StoreResult<(Vec<EventRecord>, bool, bool)> {
    let mut binds = Vec::new();
    let mut conditions = vec!["1 = 1".to_owned()];
    for (column, value) in [
        ("type", &filters.kind),
        ("rule_id", &filters.rule_id),
        ("customer_id", &filters.customer_id),
        ("id", &filters.id),
    ] {
        if let Some(v) = value {
            binds.push(v.clone());
            conditions.push(format!("{column} = ${}", binds.len()));
        }
    }
    let base = conditions.join(" AND ");
    let (position, order) = match page.position {
        CursorPosition::Start => (String::new(), "DESC"),
        CursorPosition::After(seq) => (format!(" AND seq < {seq}"), "DESC"),
        CursorPosition::Before(seq) => (format!(" AND seq > {seq}"), "ASC"),
    };
    let sql = format!(
        "SELECT seq, id, type, rule_id, customer_id, payload, created_at FROM notification_events \
         WHERE {base}{position} ORDER BY seq {order} LIMIT {}",
        page.size
    );
    let mut query = sqlx::query(&sql);
    for b in &binds {
        query = query.bind(b.clone());
    }
    let mut events = Vec::new();
    for r in query.fetch_all(&mut *conn).await? {
        events.push(EventRecord {
            seq: r.try_get("seq")?,
            id: r.try_get("id")?,
            kind: r.try_get("type")?,
            rule_id: r.try_get("rule_id")?,
            customer_id: r.try_get("customer_id")?,
            payload: r.try_get("payload")?,
            created_at: from_micros(r.try_get("created_at")?),
            deliveries: Vec::new(),
        });
    }
    if order == "ASC" {
        events.reverse();
    }
    with_deliveries(conn, &mut events).await?;
    let (has_older, has_newer) = match (events.first(), events.last()) {
        (Some(newest), Some(oldest)) => (
            exists_beyond(conn, &base, &binds, "<", oldest.seq).await?,
            exists_beyond(conn, &base, &binds, ">", newest.seq).await?,
        ),
        _ => (false, false),
    };
    Ok((events, has_older, has_newer))
}

async fn with_deliveries(conn: &mut sqlx::AnyConnection, events: &mut [EventRecord]) -> StoreResult<()> {
    let ids: Vec<String> = events.iter().map(|e| e.id.clone()).collect();
    let sql = "SELECT event_id, channel_id, status, attempts, next_attempt_at, last_status, last_error, \
               last_attempt_at FROM notification_deliveries WHERE event_id IN ({list}) ORDER BY seq";
    let mut by_event: HashMap<String, Vec<DeliveryRecord>> = HashMap::new();
    for r in rows::fetch_by_ids(conn, sql, &ids).await? {
        by_event.entry(r.try_get("event_id")?).or_default().push(DeliveryRecord {
            channel_id: r.try_get("channel_id")?,
            status: r.try_get("status")?,
            attempts: r.try_get("attempts")?,
            next_attempt_at: from_micros(r.try_get("next_attempt_at")?),
            last_status: opt(&r, "last_status")?,
            last_error: opt(&r, "last_error")?,
            last_attempt_at: opt::<i64>(&r, "last_attempt_at")?.map(from_micros),
        });
    }
    for e in events {
        e.deliveries = by_event.remove(&e.id).unwrap_or_default();
    }
    Ok(())
}

async fn exists_beyond(
    conn: &mut sqlx::AnyConnection,
    base: &str,
    binds: &[String],
    cmp: &str,
    seq: i64,
) -> StoreResult<bool> {
    let sql = format!("SELECT 1 FROM notification_events WHERE {base} AND seq {cmp} {seq} LIMIT 1");
    let mut q = sqlx::query(&sql);
    for b in binds {
        q = q.bind(b.clone());
    }
    Ok(q.fetch_optional(&mut *conn).await?.is_some())
}
