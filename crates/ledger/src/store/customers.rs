//! Customer rows and their usage-attribution subject keys (unique across live customers).

use std::collections::HashMap;

use chrono::{DateTime, Utc};
use sqlx::any::AnyRow;
use sqlx::Row;

use super::{labels, labels_json, Labels, StoreError, StoreResult};
use crate::db::{from_micros, micros, opt, rows, Backend, Tx};
use crate::query::StringFilter;

#[derive(Clone, Debug)]
pub struct CustomerRecord {
    pub id: String,
    pub key: String,
    pub name: String,
    pub description: Option<String>,
    pub labels: Labels,
    pub subject_keys: Vec<String>,
    pub primary_email: Option<String>,
    pub currency: Option<String>,
    pub billing_address: Option<serde_json::Value>,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
    pub deleted_at: Option<DateTime<Utc>>,
}

const COLUMNS: &str =
    "id, key, name, description, labels, primary_email, currency, billing_address, created_at, updated_at, deleted_at";

fn from_row(row: &AnyRow) -> StoreResult<CustomerRecord> {
    let billing_address = match opt::<String>(row, "billing_address")? {
        Some(text) => Some(serde_json::from_str(&text).map_err(|_| StoreError::Corrupt {
            table: "customers",
            column: "billing_address",
            value: text,
        })?),
        None => None,
    };
    Ok(CustomerRecord {
        id: row.try_get("id")?,
        key: row.try_get("key")?,
        name: row.try_get("name")?,
        description: opt(row, "description")?,
        labels: labels("customers", row.try_get("labels")?)?,
        subject_keys: Vec::new(),
        primary_email: opt(row, "primary_email")?,
        currency: opt(row, "currency")?,
        billing_address,
        created_at: from_micros(row.try_get("created_at")?),
        updated_at: from_micros(row.try_get("updated_at")?),
        deleted_at: opt::<i64>(row, "deleted_at")?.map(from_micros),
    })
}

async fn with_subjects(conn: &mut sqlx::AnyConnection, mut c: CustomerRecord) -> StoreResult<CustomerRecord> {
    let rows = sqlx::query("SELECT subject_key FROM customer_subjects WHERE customer_id = $1 ORDER BY position")
        .bind(&c.id)
        .fetch_all(&mut *conn)
        .await?;
    c.subject_keys = rows.iter().map(|r| r.try_get::<String, _>(0)).collect::<Result<_, _>>()?;
    Ok(c)
}

pub async fn get(conn: &mut sqlx::AnyConnection, id: &str) -> StoreResult<Option<CustomerRecord>> {
    let row = sqlx::query(&format!("SELECT {COLUMNS} FROM customers WHERE id = $1"))
        .bind(id)
        .fetch_optional(&mut *conn)
        .await?;
    match row {
        Some(r) => Ok(Some(with_subjects(conn, from_row(&r)?).await?)),
        None => Ok(None),
    }
}

/// The live customer a usage-attribution subject key maps to.
pub async fn by_subject(conn: &mut sqlx::AnyConnection, subject: &str) -> StoreResult<Option<String>> {
    Ok(by_subjects(conn, &[subject.to_owned()]).await?.remove(subject))
}

/// The live customers usage-attribution subject keys map to, by subject key (unknown keys are
/// absent).
pub async fn by_subjects(conn: &mut sqlx::AnyConnection, subjects: &[String]) -> StoreResult<HashMap<String, String>> {
    let sql = "SELECT subject_key, customer_id FROM customer_subjects WHERE subject_key IN ({list})";
    let columns = [("subject_key", rows::Kind::Text), ("customer_id", rows::Kind::Text)];
    let rows = rows::fetch_small_rows_by_ids(conn, sql, &columns, subjects).await?;
    let pair = |row: &Vec<rows::Value>| match row.as_slice() {
        [subject, customer] => Ok((subject.text()?.to_owned(), customer.text()?.to_owned())),
        _ => Err(rows::wrong_columns(row)),
    };
    Ok(rows.iter().map(pair).collect::<sqlx::Result<_>>()?)
}

/// Why a customer could not be written.
pub enum Clash {
    Key,
    Subject(String),
}

async fn find_clash(tx: &mut Tx, id: &str, key: Option<&str>, subjects: &[String]) -> StoreResult<Option<Clash>> {
    if let Some(key) = key {
        let taken = sqlx::query("SELECT id FROM customers WHERE key = $1 AND deleted_at IS NULL AND id <> $2")
            .bind(key)
            .bind(id)
            .fetch_optional(&mut **tx)
            .await?;
        if taken.is_some() {
            return Ok(Some(Clash::Key));
        }
    }
    for s in subjects {
        let owner =
            sqlx::query("SELECT customer_id FROM customer_subjects WHERE subject_key = $1 AND customer_id <> $2")
                .bind(s)
                .bind(id)
                .fetch_optional(&mut **tx)
                .await?;
        if owner.is_some() {
            return Ok(Some(Clash::Subject(s.clone())));
        }
    }
    Ok(None)
}

/// A write refused by a unique index: another transaction took the key or subject since
/// `find_clash` looked (PostgreSQL runs writers side by side; SQLite never gets here).
fn taken_meanwhile(result: sqlx::Result<sqlx::any::AnyQueryResult>) -> StoreResult<bool> {
    match result {
        Err(e) if e.as_database_error().is_some_and(|d| d.is_unique_violation()) => Ok(true),
        other => other.map(|_| false).map_err(Into::into),
    }
}

async fn write_subjects(tx: &mut Tx, id: &str, subjects: &[String]) -> StoreResult<Result<(), Clash>> {
    sqlx::query("DELETE FROM customer_subjects WHERE customer_id = $1").bind(id).execute(&mut **tx).await?;
    for (position, s) in subjects.iter().enumerate() {
        let inserted =
            sqlx::query("INSERT INTO customer_subjects (subject_key, customer_id, position) VALUES ($1, $2, $3)")
                .bind(s)
                .bind(id)
                .bind(position as i64)
                .execute(&mut **tx)
                .await;
        if taken_meanwhile(inserted)? {
            return Ok(Err(Clash::Subject(s.clone())));
        }
    }
    Ok(Ok(()))
}

/// Inserts a customer; a taken key or subject is reported, not written.
pub async fn insert(tx: &mut Tx, c: &CustomerRecord) -> StoreResult<Result<(), Clash>> {
    if let Some(clash) = find_clash(tx, &c.id, Some(&c.key), &c.subject_keys).await? {
        return Ok(Err(clash));
    }
    let inserted = sqlx::query(
        "INSERT INTO customers (id, key, name, description, labels, primary_email, currency, billing_address, created_at, \
         updated_at, deleted_at, clock, lock_version) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, NULL, $11, 0)",
    )
    .bind(&c.id)
    .bind(&c.key)
    .bind(&c.name)
    .bind(&c.description)
    .bind(labels_json(&c.labels))
    .bind(&c.primary_email)
    .bind(&c.currency)
    .bind(c.billing_address.as_ref().map(|v| v.to_string()))
    .bind(micros(c.created_at))
    .bind(micros(c.updated_at))
    .bind(micros(c.created_at))
    .execute(&mut **tx)
    .await;
    if taken_meanwhile(inserted)? {
        return Ok(Err(Clash::Key));
    }
    write_subjects(tx, &c.id, &c.subject_keys).await
}

/// Replaces the editable fields of a live customer.
pub async fn update(tx: &mut Tx, c: &CustomerRecord) -> StoreResult<Result<(), Clash>> {
    if let Some(clash) = find_clash(tx, &c.id, None, &c.subject_keys).await? {
        return Ok(Err(clash));
    }
    sqlx::query(
        "UPDATE customers SET name = $1, description = $2, labels = $3, primary_email = $4, currency = $5, \
         billing_address = $6, updated_at = $7 WHERE id = $8",
    )
    .bind(&c.name)
    .bind(&c.description)
    .bind(labels_json(&c.labels))
    .bind(&c.primary_email)
    .bind(&c.currency)
    .bind(c.billing_address.as_ref().map(|v| v.to_string()))
    .bind(micros(c.updated_at))
    .bind(&c.id)
    .execute(&mut **tx)
    .await?;
    write_subjects(tx, &c.id, &c.subject_keys).await
}

/// Soft-deletes: the record and its journal stay; its key and subjects become free.
pub async fn delete(tx: &mut Tx, id: &str, now: DateTime<Utc>) -> StoreResult<()> {
    sqlx::query("UPDATE customers SET deleted_at = $1, updated_at = $1 WHERE id = $2")
        .bind(micros(now))
        .bind(id)
        .execute(&mut **tx)
        .await?;
    sqlx::query("DELETE FROM customer_subjects WHERE customer_id = $1").bind(id).execute(&mut **tx).await?;
    Ok(())
}

pub struct CustomerFilters {
    pub key: Option<StringFilter>,
    pub name: Option<StringFilter>,
    pub primary_email: Option<StringFilter>,
    pub subject: Option<StringFilter>,
}

#[derive(Clone, Copy)]
pub enum SortBy {
    Id,
    Name,
    CreatedAt,
}

/// Adds `filter` on `column` to a WHERE clause, binding values in order.
pub fn string_condition(backend: Backend, column: &str, filter: &StringFilter, binds: &mut Vec<String>) -> String {
    let mut bind = |v: &str| {
        binds.push(v.to_owned());
        format!("${}", binds.len())
    };
    let contains = |col: &str, p: String| match backend {
        Backend::Sqlite => format!("instr({col}, {p}) > 0"),
        Backend::Postgres => format!("strpos({col}, {p}) > 0"),
    };
    match filter {
        StringFilter::Eq(v) => format!("{column} = {}", bind(v)),
        StringFilter::Neq(v) => format!("({column} IS NULL OR {column} <> {})", bind(v)),
        StringFilter::OneOf(vs) if vs.is_empty() => "1 = 0".to_owned(),
        StringFilter::OneOf(vs) => {
            format!("{column} IN ({})", vs.iter().map(|v| bind(v)).collect::<Vec<_>>().join(", "))
        }
        StringFilter::Contains(v) => contains(column, bind(v)),
        StringFilter::ContainsAny(vs) if vs.is_empty() => "1 = 0".to_owned(),
        StringFilter::ContainsAny(vs) => {
            let parts: Vec<String> = vs.iter().map(|v| contains(column, bind(v))).collect();
            format!("({})", parts.join(" OR "))
        }
        StringFilter::All(filters) => {
            let parts: Vec<String> = filters.iter().map(|f| string_condition(backend, column, f, binds)).collect();
            format!("({})", parts.join(" AND "))
        }
    }
}

/// A page of live customers and the total that match.
pub async fn list(
    conn: &mut sqlx::AnyConnection,
    backend: Backend,
    filters: &CustomerFilters,
    sort: SortBy,
    descending: bool,
    limit: i64,
    offset: i64,
) -> StoreResult<(Vec<CustomerRecord>, i64)> {
    let mut binds = Vec::new();
    let mut conditions = vec!["deleted_at IS NULL".to_owned()];
    for (column, filter) in [("key", &filters.key), ("name", &filters.name), ("primary_email", &filters.primary_email)]
    {
        if let Some(f) = filter {
            conditions.push(string_condition(backend, column, f, &mut binds));
        }
    }
    if let Some(f) = &filters.subject {
        let inner = string_condition(backend, "s.subject_key", f, &mut binds);
        conditions
            .push(format!("EXISTS (SELECT 1 FROM customer_subjects s WHERE s.customer_id = customers.id AND {inner})"));
    }
    let where_clause = conditions.join(" AND ");
    let order = match sort {
        SortBy::Id => "id",
        SortBy::Name => "name",
        SortBy::CreatedAt => "created_at",
    };
    let direction = if descending { "DESC" } else { "ASC" };
    let count_sql = format!("SELECT COUNT(*) FROM customers WHERE {where_clause}");
    let mut count = sqlx::query(&count_sql);
    for b in &binds {
        count = count.bind(b.clone());
    }
    let total: i64 = count.fetch_one(&mut *conn).await?.try_get(0)?;
    let sql = format!(
        "SELECT {COLUMNS} FROM customers WHERE {where_clause} ORDER BY {order} {direction}, id {direction} LIMIT {limit} OFFSET {offset}"
    );
    let mut query = sqlx::query(&sql);
    for b in &binds {
        query = query.bind(b.clone());
    }
    let rows = query.fetch_all(&mut *conn).await?;
    let mut out = Vec::with_capacity(rows.len());
    for r in &rows {
        out.push(with_subjects(conn, from_row(r)?).await?);
    }
    Ok((out, total))
}
