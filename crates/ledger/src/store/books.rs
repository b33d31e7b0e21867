//! Loading a customer's book from the store and writing back what an operation changed.

use chrono::{DateTime, Utc};
use credits::{Book, Debt, Entry, GrantState, Hold, HoldId, MovementKind};
use sqlx::Row;

use super::grants::{self, GrantRecord};
use super::{amount, currency, feature, labels_json, new_id, Labels, StoreResult};
use crate::db::{from_micros, micros, opt, Tx};

/// A book with the grant metadata the API needs.
pub struct LoadedBook {
    pub book: Book,
    pub grants: Vec<GrantRecord>,
}

/// What caused the entries an operation books: it names and labels the movements.
pub struct Operation<'a> {
    /// e.g. `charge:01J…`, `usage:KEY`, `grant:01J…`, `expiry`.
    pub reference: String,
    /// The name of consumed and adjusted movements (other kinds have fixed names).
    pub name: &'a str,
    pub description: Option<&'a str>,
    pub labels: &'a Labels,
}

impl<'a> Operation<'a> {
    pub fn system(reference: &str, labels: &'a Labels) -> Self {
        Operation { reference: reference.to_owned(), name: "Credits booked", description: None, labels }
    }
}

pub async fn load(conn: &mut sqlx::AnyConnection, customer_id: &str) -> StoreResult<LoadedBook> {
    let clock: i64 = sqlx::query("SELECT clock FROM customers WHERE id = $1")
        .bind(customer_id)
        .fetch_one(&mut *conn)
        .await?
        .try_get(0)?;
    let grants = grants::of_customer(&mut *conn, customer_id).await?;
    let debts =
        sqlx::query("SELECT currency, feature, amount FROM debts WHERE customer_id = $1 ORDER BY currency, feature")
            .bind(customer_id)
            .fetch_all(&mut *conn)
            .await?
            .into_iter()
            .map(|r| {
                Ok(Debt {
                    currency: currency("debts", "currency", r.try_get("currency")?)?,
                    feature: feature("debts", "feature", r.try_get("feature")?)?,
                    amount: amount("debts", "amount", r.try_get("amount")?)?,
                })
            })
            .collect::<StoreResult<Vec<_>>>()?;
    let holds = sqlx::query(
        "SELECT id, currency, feature, amount, created_at, expires_at FROM holds \
         WHERE customer_id = $1 AND released_at IS NULL ORDER BY created_at, id",
    )
    .bind(customer_id)
    .fetch_all(&mut *conn)
    .await?
    .iter()
    .map(hold_from_row)
    .collect::<StoreResult<Vec<_>>>()?;
    let states: Vec<GrantState> = grants.iter().map(|g| g.state.clone()).collect();
    Ok(LoadedBook { book: Book::from_parts(states, debts, holds, from_micros(clock)), grants })
}

/// The ids given to the entries written, in order (movements and overages; covers have none).
pub async fn save(
    tx: &mut Tx,
    customer_id: &str,
    before: &Book,
    after: &Book,
    entries: &[Entry],
    op: &Operation<'_>,
    now: DateTime<Utc>,
) -> StoreResult<Vec<Option<String>>> {
    for state in after.grants() {
        if before.grant(&state.grant.id) != Some(state) {
            grants::save_state(tx, state, now).await?;
        }
    }
    if before.debts() != after.debts() {
        sqlx::query("DELETE FROM debts WHERE customer_id = $1").bind(customer_id).execute(&mut **tx).await?;
        for d in after.debts() {
            sqlx::query("INSERT INTO debts (customer_id, currency, feature, amount) VALUES ($1, $2, $3, $4)")
                .bind(customer_id)
                .bind(d.currency.as_str())
                .bind(d.feature.as_ref().map(|f| f.as_str()).unwrap_or(""))
                .bind(d.amount.to_string())
                .execute(&mut **tx)
                .await?;
        }
    }
    for hold in after.holds() {
        if before.hold(&hold.id) != Some(hold) {
            save_hold(tx, customer_id, hold, now).await?;
        }
    }
    sqlx::query("UPDATE customers SET clock = $1 WHERE id = $2")
        .bind(micros(after.clock()))
        .bind(customer_id)
        .execute(&mut **tx)
        .await?;
    let mut ids = Vec::with_capacity(entries.len());
    for entry in entries {
        ids.push(write_entry(tx, customer_id, entry, op, now).await?);
    }
    Ok(ids)
}

async fn save_hold(tx: &mut Tx, customer_id: &str, hold: &Hold, now: DateTime<Utc>) -> StoreResult<()> {
    sqlx::query(
        "INSERT INTO holds (id, customer_id, currency, feature, amount, created_at, expires_at, released_at) \
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8) \
         ON CONFLICT (id) DO UPDATE SET amount = excluded.amount, created_at = excluded.created_at, \
         expires_at = excluded.expires_at, released_at = excluded.released_at",
    )
    .bind(&hold.id.0)
    .bind(customer_id)
    .bind(hold.currency.as_str())
    .bind(hold.feature.as_ref().map(|f| f.as_str().to_owned()))
    .bind(hold.amount.to_string())
    .bind(micros(hold.created_at))
    .bind(micros(hold.expires_at))
    .bind(hold.released.then_some(micros(now)))
    .execute(&mut **tx)
    .await?;
    Ok(())
}

fn movement_name<'a>(kind: MovementKind, op: &Operation<'a>) -> &'a str {
    match kind {
        MovementKind::Funded => "Credits funded",
        MovementKind::Expired => "Credits expired",
        MovementKind::Voided => "Grant voided",
        MovementKind::Consumed | MovementKind::Adjusted => op.name,
    }
}

async fn write_entry(
    tx: &mut Tx,
    customer_id: &str,
    entry: &Entry,
    op: &Operation<'_>,
    now: DateTime<Utc>,
) -> StoreResult<Option<String>> {
    let id = match entry {
        Entry::Movement(m) => {
            let id = new_id();
            // Movements the passage of time books (fundings, expiries) carry no caller labels.
            let (description, labels) = match m.kind {
                MovementKind::Consumed | MovementKind::Adjusted => (op.description, op.labels.clone()),
                _ => (None, Labels::new()),
            };
            let name = movement_name(m.kind, op);
            sqlx::query(
                "INSERT INTO movements (id, customer_id, kind, amount, currency, grant_id, feature, balance_before, \
                 balance_after, booked_at, created_at, name, description, labels, operation) \
                 VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15)",
            )
            .bind(&id)
            .bind(customer_id)
            .bind(m.kind.as_str())
            .bind(m.amount.to_string())
            .bind(m.currency.as_str())
            .bind(m.grant_id.as_ref().map(|g| g.0.clone()))
            .bind(m.feature.as_ref().map(|f| f.as_str().to_owned()))
            .bind(m.balance_before.to_string())
            .bind(m.balance_after.to_string())
            .bind(micros(m.booked_at))
            .bind(micros(now))
            .bind(name)
            .bind(description)
            .bind(labels_json(&labels))
            .bind(&op.reference)
            .execute(&mut **tx)
            .await?;
            Some(id)
        }
        Entry::Overage { currency, feature, amount, at, .. } => {
            let id = new_id();
            sqlx::query(
                "INSERT INTO overages (id, customer_id, currency, feature, amount, at, operation) VALUES ($1, $2, $3, $4, $5, $6, $7)",
            )
            .bind(&id)
            .bind(customer_id)
            .bind(currency.as_str())
            .bind(feature.as_ref().map(|f| f.as_str().to_owned()))
            .bind(amount.to_string())
            .bind(micros(*at))
            .bind(&op.reference)
            .execute(&mut **tx)
            .await?;
            Some(id)
        }
        Entry::DebtCovered { grant_id, currency, feature, amount, at } => {
            sqlx::query(
                "INSERT INTO debt_covers (customer_id, grant_id, currency, feature, amount, at) VALUES ($1, $2, $3, $4, $5, $6)",
            )
            .bind(customer_id)
            .bind(&grant_id.0)
            .bind(currency.as_str())
            .bind(feature.as_ref().map(|f| f.as_str().to_owned()))
            .bind(amount.to_string())
            .bind(micros(*at))
            .execute(&mut **tx)
            .await?;
            None
        }
    };
    if let Some(entry_id) = &id {
        for p in entry.postings() {
            sqlx::query(
                "INSERT INTO postings (entry_id, customer_id, account, currency, amount) VALUES ($1, $2, $3, $4, $5)",
            )
            .bind(entry_id)
            .bind(customer_id)
            .bind(p.account.as_str())
            .bind(p.currency.as_str())
            .bind(p.amount.to_string())
            .execute(&mut **tx)
            .await?;
        }
    }
    Ok(id)
}

fn hold_from_row(r: &sqlx::any::AnyRow) -> StoreResult<Hold> {
    Ok(Hold {
        id: HoldId(r.try_get("id")?),
        currency: currency("holds", "currency", r.try_get("currency")?)?,
        feature: feature("holds", "feature", opt(r, "feature")?)?,
        amount: amount("holds", "amount", r.try_get("amount")?)?,
        created_at: from_micros(r.try_get("created_at")?),
        expires_at: from_micros(r.try_get("expires_at")?),
        released: false,
    })
}

/// Holds that were open at `at` (created by then, not yet expired or released), with what they
/// hold now.
pub async fn holds_open_at(
    conn: &mut sqlx::AnyConnection,
    customer_id: &str,
    at: DateTime<Utc>,
) -> StoreResult<Vec<Hold>> {
    let rows = sqlx::query(
        "SELECT id, currency, feature, amount, created_at, expires_at FROM holds WHERE customer_id = $1 \
         AND created_at <= $2 AND expires_at > $2 AND (released_at IS NULL OR released_at > $2)",
    )
    .bind(customer_id)
    .bind(micros(at))
    .fetch_all(&mut *conn)
    .await?;
    rows.iter().map(hold_from_row).collect()
}
