//! Notification rules: what fires an event and which channels it goes to.

use chrono::{DateTime, Utc};
use sqlx::any::AnyRow;
use sqlx::Row;

use super::{StoreError, StoreResult};
use crate::db::rows::{Rows, Value};
use crate::db::{from_micros, micros, Tx};
use crate::rule::{RuleKind, RuleSpec};

#[derive(Clone, Debug)]
pub struct RuleRecord {
    pub id: String,
    pub spec: RuleSpec,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
}

const COLUMNS: &str = "id, definition, created_at, updated_at";

fn from_row(row: &AnyRow) -> StoreResult<RuleRecord> {
    let definition: String = row.try_get("definition")?;
    Ok(RuleRecord {
        id: row.try_get("id")?,
        spec: serde_json::from_str(&definition).map_err(|_| StoreError::Corrupt {
            table: "notification_rules",
            column: "definition",
            value: definition,
        })?,
        created_at: from_micros(row.try_get("created_at")?),
        updated_at: from_micros(row.try_get("updated_at")?),
    })
}

fn definition(spec: &RuleSpec) -> String {
    serde_json::to_string(spec).unwrap_or_default()
}

async fn link_channels(tx: &mut Tx, r: &RuleRecord) -> StoreResult<()> {
    sqlx::query("DELETE FROM notification_rule_channels WHERE rule_id = $1").bind(&r.id).execute(&mut **tx).await?;
    let mut links = Rows::new(2);
    for c in &r.spec.channels {
        links.push([Value::from(r.id.as_str()), Value::from(c.as_str())]);
    }
    links.execute(tx, "INSERT INTO notification_rule_channels (rule_id, channel_id)", "").await?;
    Ok(())
}

/// Forgets which thresholds of a rule fired: a changed rule starts armed.
async fn rearm_all(tx: &mut Tx, rule_id: &str) -> StoreResult<()> {
    sqlx::query("DELETE FROM notification_thresholds_fired WHERE rule_id = $1")
        .bind(rule_id)
        .execute(&mut **tx)
        .await?;
    Ok(())
}

pub async fn insert(tx: &mut Tx, r: &RuleRecord) -> StoreResult<()> {
    sqlx::query(
        "INSERT INTO notification_rules (id, type, name, definition, created_at, updated_at) \
         VALUES ($1, $2, $3, $4, $5, $6)",
    )
    .bind(&r.id)
    .bind(r.spec.kind.as_str())
    .bind(&r.spec.name)
    .bind(definition(&r.spec))
    .bind(micros(r.created_at))
    .bind(micros(r.updated_at))
    .execute(&mut **tx)
    .await?;
    link_channels(tx, r).await
}

pub async fn update(tx: &mut Tx, r: &RuleRecord) -> StoreResult<()> {
    sqlx::query("UPDATE notification_rules SET type = $1, name = $2, definition = $3, updated_at = $4 WHERE id = $5")
        .bind(r.spec.kind.as_str())
        .bind(&r.spec.name)
        .bind(definition(&r.spec))
        .bind(micros(r.updated_at))
        .bind(&r.id)
        .execute(&mut **tx)
        .await?;
    link_channels(tx, r).await?;
    rearm_all(tx, &r.id).await
}

pub async fn delete(tx: &mut Tx, id: &str, now: DateTime<Utc>) -> StoreResult<()> {
    sqlx::query("UPDATE notification_rules SET deleted_at = $1, updated_at = $1 WHERE id = $2")
        .bind(micros(now))
        .bind(id)
        .execute(&mut **tx)
        .await?;
    sqlx::query("DELETE FROM notification_rule_channels WHERE rule_id = $1").bind(id).execute(&mut **tx).await?;
    rearm_all(tx, id).await
}

/// A live rule.
pub async fn get(conn: &mut sqlx::AnyConnection, id: &str) -> StoreResult<Option<RuleRecord>> {
    let sql = format!("SELECT {COLUMNS} FROM notification_rules WHERE id = $1 AND deleted_at IS NULL");
    let row = sqlx::query(&sql).bind(id).fetch_optional(&mut *conn).await?;
    row.as_ref().map(from_row).transpose()
}

/// A page of live rules, oldest first, and how many there are.
pub async fn list(conn: &mut sqlx::AnyConnection, limit: i64, offset: i64) -> StoreResult<(Vec<RuleRecord>, i64)> {
    let total: i64 = sqlx::query("SELECT COUNT(*) FROM notification_rules WHERE deleted_at IS NULL")
        .fetch_one(&mut *conn)
        .await?
        .try_get(0)?;
    let sql = format!(
        "SELECT {COLUMNS} FROM notification_rules WHERE deleted_at IS NULL ORDER BY created_at, id \
         LIMIT {limit} OFFSET {offset}"
    );
    let rows = sqlx::query(&sql).fetch_all(&mut *conn).await?;
    Ok((rows.iter().map(from_row).collect::<StoreResult<_>>()?, total))
}

/// Every live rule of one kind (a booking evaluates them all).
pub async fn of_kind(conn: &mut sqlx::AnyConnection, kind: RuleKind) -> StoreResult<Vec<RuleRecord>> {
    let sql = format!("SELECT {COLUMNS} FROM notification_rules WHERE type = $1 AND deleted_at IS NULL ORDER BY id");
    let rows = sqlx::query(&sql).bind(kind.as_str()).fetch_all(&mut *conn).await?;
    rows.iter().map(from_row).collect()
}
