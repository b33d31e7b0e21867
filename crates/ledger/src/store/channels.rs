//! Notification channels: where events are delivered (webhooks) and how they are signed.

use std::collections::{BTreeMap, HashMap};

use chrono::{DateTime, Utc};
use sqlx::any::AnyRow;
use sqlx::Row;

use super::{StoreError, StoreResult};
use crate::db::{from_micros, micros, opt, rows, Tx};

pub type Headers = BTreeMap<String, String>;

#[derive(Clone, Debug)]
pub struct ChannelRecord {
    pub id: String,
    pub name: String,
    pub url: String,
    pub custom_headers: Headers,
    pub signing_secret: String,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
    pub deleted_at: Option<DateTime<Utc>>,
}

const COLUMNS: &str = "id, name, url, custom_headers, signing_secret, created_at, updated_at, deleted_at";

fn from_row(row: &AnyRow) -> StoreResult<ChannelRecord> {
    let headers: String = row.try_get("custom_headers")?;
    Ok(ChannelRecord {
        id: row.try_get("id")?,
        name: row.try_get("name")?,
        url: row.try_get("url")?,
        custom_headers: serde_json::from_str(&headers).map_err(|_| StoreError::Corrupt {
            table: "notification_channels",
            column: "custom_headers",
            value: headers,
        })?,
        signing_secret: row.try_get("signing_secret")?,
        created_at: from_micros(row.try_get("created_at")?),
        updated_at: from_micros(row.try_get("updated_at")?),
        deleted_at: opt::<i64>(row, "deleted_at")?.map(from_micros),
    })
}

fn headers_json(headers: &Headers) -> String {
    serde_json::to_string(headers).unwrap_or_else(|_| "{}".to_owned())
}

pub async fn insert(tx: &mut Tx, c: &ChannelRecord) -> StoreResult<()> {
    sqlx::query(
        "INSERT INTO notification_channels (id, type, name, url, custom_headers, signing_secret, created_at, \
         updated_at) VALUES ($1, 'webhook', $2, $3, $4, $5, $6, $7)",
    )
    .bind(&c.id)
    .bind(&c.name)
    .bind(&c.url)
    .bind(headers_json(&c.custom_headers))
    .bind(&c.signing_secret)
    .bind(micros(c.created_at))
    .bind(micros(c.updated_at))
    .execute(&mut **tx)
    .await?;
    Ok(())
}

pub async fn update(tx: &mut Tx, c: &ChannelRecord) -> StoreResult<()> {
    sqlx::query(
        "UPDATE notification_channels SET name = $1, url = $2, custom_headers = $3, signing_secret = $4, \
         updated_at = $5 WHERE id = $6",
    )
    .bind(&c.name)
    .bind(&c.url)
    .bind(headers_json(&c.custom_headers))
    .bind(&c.signing_secret)
    .bind(micros(c.updated_at))
    .bind(&c.id)
    .execute(&mut **tx)
    .await?;
    Ok(())
}

/// A live channel.
pub async fn get(conn: &mut sqlx::AnyConnection, id: &str) -> StoreResult<Option<ChannelRecord>> {
    let sql = format!("SELECT {COLUMNS} FROM notification_channels WHERE id = $1 AND deleted_at IS NULL");
    let row = sqlx::query(&sql).bind(id).fetch_optional(&mut *conn).await?;
    row.as_ref().map(from_row).transpose()
}

/// Channels by id, deleted ones included (a delivery queued before a deletion must learn of it).
pub async fn by_ids(conn: &mut sqlx::AnyConnection, ids: &[String]) -> StoreResult<HashMap<String, ChannelRecord>> {
    let sql = format!("SELECT {COLUMNS} FROM notification_channels WHERE id IN ({{list}})");
    let mut out = HashMap::new();
    for row in rows::fetch_by_ids(conn, &sql, ids).await? {
        let c = from_row(&row)?;
        out.insert(c.id.clone(), c);
    }
    Ok(out)
}

/// A page of live channels, oldest first, and how many there are.
pub async fn list(conn: &mut sqlx::AnyConnection, limit: i64, offset: i64) -> StoreResult<(Vec<ChannelRecord>, i64)> {
    let total: i64 = sqlx::query("SELECT COUNT(*) FROM notification_channels WHERE deleted_at IS NULL")
        .fetch_one(&mut *conn)
        .await?
        .try_get(0)?;
    let sql = format!(
        "SELECT {COLUMNS} FROM notification_channels WHERE deleted_at IS NULL ORDER BY created_at, id \
         LIMIT {limit} OFFSET {offset}"
    );
    let rows = sqlx::query(&sql).fetch_all(&mut *conn).await?;
    Ok((rows.iter().map(from_row).collect::<StoreResult<_>>()?, total))
}

/// Live rules that deliver to a channel.
pub async fn used_by(conn: &mut sqlx::AnyConnection, channel_id: &str) -> StoreResult<Vec<String>> {
    let rows = sqlx::query(
        "SELECT r.id FROM notification_rule_channels rc JOIN notification_rules r ON r.id = rc.rule_id \
         WHERE rc.channel_id = $1 AND r.deleted_at IS NULL ORDER BY r.id",
    )
    .bind(channel_id)
    .fetch_all(&mut *conn)
    .await?;
    Ok(rows.iter().map(|r| r.try_get::<String, _>(0)).collect::<Result<_, _>>()?)
}

pub async fn delete(tx: &mut Tx, id: &str, now: DateTime<Utc>) -> StoreResult<()> {
    sqlx::query("UPDATE notification_channels SET deleted_at = $1, updated_at = $1 WHERE id = $2")
        .bind(micros(now))
        .bind(id)
        .execute(&mut **tx)
        .await?;
    Ok(())
}
