//! The customer-facing history: movements, newest first, with stable cursors.

use chrono::{DateTime, Utc};
use credits::{Amount, Currency, Entry, FeatureKey, GrantId, Movement, MovementKind};
use sqlx::any::AnyRow;
use sqlx::Row;

use super::customers::string_condition;
use super::{amount, currency, feature, labels, Labels, StoreError, StoreResult};
use crate::db::{from_micros, micros, opt, Backend};
use crate::query::{CursorPage, CursorPosition, StringFilter};

#[derive(Clone, Debug)]
pub struct MovementRecord {
    pub seq: i64,
    pub id: String,
    pub kind: MovementKind,
    pub amount: Amount,
    pub currency: Currency,
    pub grant_id: Option<String>,
    pub feature: Option<FeatureKey>,
    pub balance_before: Amount,
    pub balance_after: Amount,
    pub booked_at: DateTime<Utc>,
    pub created_at: DateTime<Utc>,
    pub name: String,
    pub description: Option<String>,
    pub labels: Labels,
}

fn kind(text: String) -> StoreResult<MovementKind> {
    MovementKind::parse(&text).ok_or(StoreError::Corrupt { table: "movements", column: "kind", value: text })
}

fn from_row(row: &AnyRow) -> StoreResult<MovementRecord> {
    Ok(MovementRecord {
        seq: row.try_get("seq")?,
        id: row.try_get("id")?,
        kind: kind(row.try_get("kind")?)?,
        amount: amount("movements", "amount", row.try_get("amount")?)?,
        currency: currency("movements", "currency", row.try_get("currency")?)?,
        grant_id: opt(row, "grant_id")?,
        feature: feature("movements", "feature", opt(row, "feature")?)?,
        balance_before: amount("movements", "balance_before", row.try_get("balance_before")?)?,
        balance_after: amount("movements", "balance_after", row.try_get("balance_after")?)?,
        booked_at: from_micros(row.try_get("booked_at")?),
        created_at: from_micros(row.try_get("created_at")?),
        name: row.try_get("name")?,
        description: opt(row, "description")?,
        labels: labels("movements", row.try_get("labels")?)?,
    })
}

/// The Konnect transaction types: adjustments show as funded or consumed by their sign, voids
/// as expired (credit removed without use).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TransactionType {
    Funded,
    Consumed,
    Expired,
}

impl TransactionType {
    pub fn parse(text: &str) -> Option<Self> {
        match text {
            "funded" => Some(TransactionType::Funded),
            "consumed" => Some(TransactionType::Consumed),
            "expired" => Some(TransactionType::Expired),
            _ => None,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            TransactionType::Funded => "funded",
            TransactionType::Consumed => "consumed",
            TransactionType::Expired => "expired",
        }
    }

    pub fn of(kind: MovementKind, amount: Amount) -> Self {
        match kind {
            MovementKind::Funded => TransactionType::Funded,
            MovementKind::Consumed => TransactionType::Consumed,
            MovementKind::Expired | MovementKind::Voided => TransactionType::Expired,
            MovementKind::Adjusted if amount.is_negative() => TransactionType::Consumed,
            MovementKind::Adjusted => TransactionType::Funded,
        }
    }

    fn condition(self) -> &'static str {
        match self {
            TransactionType::Funded => "(kind = 'funded' OR (kind = 'adjusted' AND amount NOT LIKE '-%'))",
            TransactionType::Consumed => "(kind = 'consumed' OR (kind = 'adjusted' AND amount LIKE '-%'))",
            TransactionType::Expired => "kind IN ('expired', 'voided')",
        }
    }
}

pub struct MovementFilters {
    pub kind: Option<TransactionType>,
    pub currency: Option<Currency>,
    pub feature: Option<FeatureMovements>,
}

/// The movements of credit usable for a feature: those of grants in its scope, and usage that no
/// grant covered whose feature matches (or that has none, as balances count it).
pub struct FeatureMovements {
    pub grant_ids: Vec<String>,
    pub filter: StringFilter,
}

impl FeatureMovements {
    fn condition(&self, backend: Backend, binds: &mut Vec<String>) -> String {
        let mut parts = Vec::new();
        if !self.grant_ids.is_empty() {
            let list: Vec<String> = self
                .grant_ids
                .iter()
                .map(|g| {
                    binds.push(g.clone());
                    format!("${}", binds.len())
                })
                .collect();
            parts.push(format!("grant_id IN ({})", list.join(", ")));
        }
        let feature = string_condition(backend, "feature", &self.filter, binds);
        parts.push(format!("(grant_id IS NULL AND (feature IS NULL OR {feature}))"));
        format!("({})", parts.join(" OR "))
    }
}

/// One page, newest first, and whether older / newer items exist beyond it.
pub struct MovementPage {
    pub items: Vec<MovementRecord>,
    pub has_older: bool,
    pub has_newer: bool,
    /// Cursors for the next (older) and previous (newer) pages.
    pub older_than: Option<i64>,
    pub newer_than: Option<i64>,
}

pub async fn list(
    conn: &mut sqlx::AnyConnection,
    backend: Backend,
    customer_id: &str,
    filters: &MovementFilters,
    page: CursorPage,
) -> StoreResult<MovementPage> {
    let mut binds = vec![customer_id.to_owned()];
    let mut conditions = vec!["customer_id = $1".to_owned()];
    if let Some(t) = filters.kind {
        conditions.push(t.condition().to_owned());
    }
    if let Some(c) = filters.currency {
        binds.push(c.as_str().to_owned());
        conditions.push(format!("currency = ${}", binds.len()));
    }
    if let Some(f) = &filters.feature {
        conditions.push(f.condition(backend, &mut binds));
    }
    let base = conditions.join(" AND ");
    let (position, order) = match page.position {
        CursorPosition::Start => (String::new(), "DESC"),
        CursorPosition::After(seq) => (format!(" AND seq < {seq}"), "DESC"),
        CursorPosition::Before(seq) => (format!(" AND seq > {seq}"), "ASC"),
    };
    let sql = format!(
        "SELECT seq, id, kind, amount, currency, grant_id, feature, balance_before, balance_after, booked_at, created_at, \
         name, description, labels FROM movements WHERE {base}{position} ORDER BY seq {order} LIMIT {}",
        page.size.saturating_add(1)
    );
    let mut query = sqlx::query(&sql);
    for b in &binds {
        query = query.bind(b.clone());
    }
    let rows = query.fetch_all(&mut *conn).await?;
    let mut items = rows.iter().take(page.size as usize).map(from_row).collect::<StoreResult<Vec<_>>>()?;
    if order == "ASC" {
        items.reverse();
    }
    // The bounds of what is beyond this page, in each direction (newest first).
    let (older_than, newer_than) = match (items.first(), items.last(), page.position) {
        (Some(first), Some(last), _) => (Some(last.seq), Some(first.seq)),
        (_, _, CursorPosition::After(seq)) => (None, Some(seq.saturating_sub(1))),
        (_, _, CursorPosition::Before(seq)) => (Some(seq.saturating_add(1)), None),
        _ => (None, None),
    };
    let has_older = exists_beyond(conn, &base, &binds, "<", older_than).await?;
    let has_newer = exists_beyond(conn, &base, &binds, ">", newer_than).await?;
    Ok(MovementPage { items, has_older, has_newer, older_than, newer_than })
}

async fn exists_beyond(
    conn: &mut sqlx::AnyConnection,
    base: &str,
    binds: &[String],
    cmp: &str,
    seq: Option<i64>,
) -> StoreResult<bool> {
    let Some(seq) = seq else { return Ok(false) };
    let sql = format!("SELECT 1 FROM movements WHERE {base} AND seq {cmp} {seq} LIMIT 1");
    let mut q = sqlx::query(&sql);
    for b in binds {
        q = q.bind(b.clone());
    }
    Ok(q.fetch_optional(&mut *conn).await?.is_some())
}

/// Movements and debt covers booked at or before `at`, as journal entries, for point-in-time
/// balances.
pub async fn history(conn: &mut sqlx::AnyConnection, customer_id: &str, at: DateTime<Utc>) -> StoreResult<Vec<Entry>> {
    let rows = sqlx::query(
        "SELECT kind, amount, currency, grant_id, feature, booked_at FROM movements \
         WHERE customer_id = $1 AND booked_at <= $2 ORDER BY seq",
    )
    .bind(customer_id)
    .bind(micros(at))
    .fetch_all(&mut *conn)
    .await?;
    let mut entries = Vec::with_capacity(rows.len());
    for r in &rows {
        let amount = amount("movements", "amount", r.try_get("amount")?)?;
        entries.push(Entry::Movement(Movement {
            kind: kind(r.try_get("kind")?)?,
            amount,
            currency: currency("movements", "currency", r.try_get("currency")?)?,
            grant_id: opt::<String>(r, "grant_id")?.map(GrantId),
            feature: feature("movements", "feature", opt(r, "feature")?)?,
            balance_before: Amount::ZERO,
            balance_after: Amount::ZERO,
            booked_at: from_micros(r.try_get("booked_at")?),
            postings: Vec::new(),
        }));
    }
    let covers = sqlx::query(
        "SELECT grant_id, currency, feature, amount, at FROM debt_covers WHERE customer_id = $1 AND at <= $2",
    )
    .bind(customer_id)
    .bind(micros(at))
    .fetch_all(&mut *conn)
    .await?;
    for r in &covers {
        entries.push(Entry::DebtCovered {
            grant_id: GrantId(r.try_get("grant_id")?),
            currency: currency("debt_covers", "currency", r.try_get("currency")?)?,
            feature: feature("debt_covers", "feature", opt(r, "feature")?)?,
            amount: amount("debt_covers", "amount", r.try_get("amount")?)?,
            at: from_micros(r.try_get("at")?),
        });
    }
    Ok(entries)
}
