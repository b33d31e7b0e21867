//! Grant rows: the grant itself, its metadata, and its state snapshot (funded, used, expired,
//! voided), which `credits-ledger check` verifies against the journal.

use chrono::{DateTime, Utc};
use credits::{
    FeatureFilter, FeatureKey, Funding, Grant, GrantId, GrantState, IsoDuration, Priority, Purchase, SettlementStatus,
};
use sqlx::any::AnyRow;
use sqlx::Row;

use super::{amount, currency, labels, labels_json, Labels, StoreError, StoreResult};
use crate::db::rows::{self, Rows, Value};
use crate::db::{from_micros, micros, opt, Tx};

/// A grant as the API shows it.
#[derive(Clone, Debug)]
pub struct GrantRecord {
    pub state: GrantState,
    pub customer_id: String,
    pub key: Option<String>,
    pub name: String,
    pub description: Option<String>,
    pub labels: Labels,
    pub tax_config: Option<serde_json::Value>,
    pub updated_at: DateTime<Utc>,
}

const COLUMNS: &str = "seq, id, customer_id, key, name, description, labels, currency, amount, funding_method, \
    purchase_currency, purchase_cost_basis, purchase_amount, settlement_status, priority, effective_at, expires_after, \
    expires_at, features, tax_config, created_at, updated_at, voided_at, funded, used, expired, expiry_booked, voided";

fn corrupt(column: &'static str, value: impl Into<String>) -> StoreError {
    StoreError::Corrupt { table: "grants", column, value: value.into() }
}

fn settlement_status(text: &str) -> StoreResult<SettlementStatus> {
    serde_json::from_value(serde_json::Value::String(text.to_owned())).map_err(|_| corrupt("settlement_status", text))
}

pub fn settlement_status_text(status: SettlementStatus) -> &'static str {
    match status {
        SettlementStatus::Pending => "pending",
        SettlementStatus::Authorized => "authorized",
        SettlementStatus::Settled => "settled",
    }
}

/// The columns [`state_from_row`] reads: what the credit model needs of a grant (the gateway's
/// sync, which loads a thousand books at once, leaves names, labels and tax details unread).
const STATE_READ_COLUMNS: &str = "seq, id, customer_id, currency, amount, funding_method, purchase_currency, \
    purchase_cost_basis, purchase_amount, settlement_status, priority, effective_at, expires_after, expires_at, \
    features, created_at, voided_at, funded, used, expired, expiry_booked, voided";

fn from_row(row: &AnyRow) -> StoreResult<GrantRecord> {
    let state = state_from_row(row)?;
    Ok(GrantRecord {
        state,
        customer_id: row.try_get("customer_id")?,
        key: opt(row, "key")?,
        name: row.try_get("name")?,
        description: opt(row, "description")?,
        labels: labels("grants", row.try_get("labels")?)?,
        tax_config: match opt::<String>(row, "tax_config")? {
            Some(text) => Some(serde_json::from_str(&text).map_err(|_| corrupt("tax_config", text))?),
            None => None,
        },
        updated_at: from_micros(row.try_get("updated_at")?),
    })
}

fn state_from_row(row: &AnyRow) -> StoreResult<GrantState> {
    let funding_method: String = row.try_get("funding_method")?;
    let funding = match funding_method.as_str() {
        "none" => Funding::None,
        method => {
            let purchase = Purchase {
                currency: currency("grants", "purchase_currency", row.try_get("purchase_currency")?)?,
                per_unit_cost_basis: amount("grants", "purchase_cost_basis", row.try_get("purchase_cost_basis")?)?,
                amount: amount("grants", "purchase_amount", row.try_get("purchase_amount")?)?,
                settlement_status: settlement_status(&row.try_get::<String, _>("settlement_status")?)?,
            };
            match method {
                "invoice" => Funding::Invoice(purchase),
                "external" => Funding::External(purchase),
                other => return Err(corrupt("funding_method", other)),
            }
        }
    };
    let features_text: String = row.try_get("features")?;
    let features: Vec<String> =
        serde_json::from_str(&features_text).map_err(|_| corrupt("features", features_text.clone()))?;
    let features = features
        .iter()
        .map(|f| FeatureKey::parse(f).map_err(|_| corrupt("features", features_text.clone())))
        .collect::<StoreResult<Vec<_>>>()?;
    let expires_after = match opt::<String>(row, "expires_after")? {
        Some(text) => Some(IsoDuration::parse(&text).map_err(|_| corrupt("expires_after", text))?),
        None => None,
    };
    let priority: i64 = row.try_get("priority")?;
    let grant = Grant {
        id: GrantId(row.try_get("id")?),
        currency: currency("grants", "currency", row.try_get("currency")?)?,
        amount: amount("grants", "amount", row.try_get("amount")?)?,
        funding,
        priority: Priority::new(priority).map_err(|_| corrupt("priority", priority.to_string()))?,
        effective_at: from_micros(row.try_get("effective_at")?),
        expires_after,
        expires_at: opt::<i64>(row, "expires_at")?.map(from_micros),
        features: FeatureFilter::only(features),
        created_at: from_micros(row.try_get("created_at")?),
        seq: row.try_get("seq")?,
        voided_at: opt::<i64>(row, "voided_at")?.map(from_micros),
    };
    Ok(GrantState {
        grant,
        funded: row.try_get::<i64, _>("funded")? != 0,
        used: amount("grants", "used", row.try_get("used")?)?,
        expired: amount("grants", "expired", row.try_get("expired")?)?,
        expiry_booked: row.try_get::<i64, _>("expiry_booked")? != 0,
        voided: amount("grants", "voided", row.try_get("voided")?)?,
    })
}

/// The states of all grants of the customers, with their customer, each customer's in creation
/// order.
pub async fn states_of_customers(
    conn: &mut sqlx::AnyConnection,
    customer_ids: &[String],
) -> StoreResult<Vec<(String, GrantState)>> {
    let sql =
        format!("SELECT {STATE_READ_COLUMNS} FROM grants WHERE customer_id IN ({{list}}) ORDER BY customer_id, seq");
    rows::fetch_by_ids(conn, &sql, customer_ids)
        .await?
        .iter()
        .map(|r| Ok((r.try_get("customer_id")?, state_from_row(r)?)))
        .collect()
}

/// All grants of a customer in creation order.
pub async fn of_customer(conn: &mut sqlx::AnyConnection, customer_id: &str) -> StoreResult<Vec<GrantRecord>> {
    of_customers(conn, &[customer_id.to_owned()]).await
}

/// All grants of the customers, by customer, each customer's in creation order.
pub async fn of_customers(conn: &mut sqlx::AnyConnection, customer_ids: &[String]) -> StoreResult<Vec<GrantRecord>> {
    let sql = format!("SELECT {COLUMNS} FROM grants WHERE customer_id IN ({{list}}) ORDER BY customer_id, seq");
    rows::fetch_by_ids(conn, &sql, customer_ids).await?.iter().map(from_row).collect()
}

pub async fn get(
    conn: &mut sqlx::AnyConnection,
    customer_id: &str,
    grant_id: &str,
) -> StoreResult<Option<GrantRecord>> {
    let row = sqlx::query(&format!("SELECT {COLUMNS} FROM grants WHERE customer_id = $1 AND id = $2"))
        .bind(customer_id)
        .bind(grant_id)
        .fetch_optional(&mut *conn)
        .await?;
    row.as_ref().map(from_row).transpose()
}

pub async fn by_key(conn: &mut sqlx::AnyConnection, customer_id: &str, key: &str) -> StoreResult<Option<GrantRecord>> {
    let row = sqlx::query(&format!("SELECT {COLUMNS} FROM grants WHERE customer_id = $1 AND key = $2"))
        .bind(customer_id)
        .bind(key)
        .fetch_optional(&mut *conn)
        .await?;
    row.as_ref().map(from_row).transpose()
}

/// The next creation sequence number is assigned by the database on insert; the returned
/// record carries it.
pub async fn insert(tx: &mut Tx, record: &GrantRecord) -> StoreResult<i64> {
    let g = &record.state.grant;
    let purchase = g.funding.purchase();
    let features: Vec<&str> = g.features.features().iter().map(FeatureKey::as_str).collect();
    let row = sqlx::query(
        "INSERT INTO grants (id, customer_id, key, name, description, labels, currency, amount, funding_method, \
         purchase_currency, purchase_cost_basis, purchase_amount, settlement_status, priority, effective_at, expires_after, \
         expires_at, features, tax_config, created_at, updated_at, voided_at, funded, used, expired, expiry_booked, voided) \
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15, $16, $17, $18, $19, $20, $21, NULL, 0, '0', '0', 0, '0') \
         RETURNING seq",
    )
    .bind(&g.id.0)
    .bind(&record.customer_id)
    .bind(&record.key)
    .bind(&record.name)
    .bind(&record.description)
    .bind(labels_json(&record.labels))
    .bind(g.currency.as_str())
    .bind(g.amount.to_string())
    .bind(g.funding.method().as_str())
    .bind(purchase.map(|p| p.currency.as_str().to_owned()))
    .bind(purchase.map(|p| p.per_unit_cost_basis.to_string()))
    .bind(purchase.map(|p| p.amount.to_string()))
    .bind(purchase.map(|p| settlement_status_text(p.settlement_status)))
    .bind(i64::from(g.priority.get()))
    .bind(micros(g.effective_at))
    .bind(g.expires_after.map(|d| d.to_string()))
    .bind(g.expires_at.map(micros))
    .bind(serde_json::to_string(&features).unwrap_or_else(|_| "[]".into()))
    .bind(record.tax_config.as_ref().map(|v| v.to_string()))
    .bind(micros(g.created_at))
    .bind(micros(record.updated_at))
    .fetch_one(&mut **tx)
    .await?;
    Ok(row.try_get(0)?)
}

/// Grant states an operation changed, gathered for one flush. A grant whose only change is the
/// credit used from it (what usage and charges do) is written apart, setting `used` alone: an
/// UPDATE that sets a column a partial index's WHERE clause reads (`funded`, `expiry_booked`,
/// `voided_at`, read by the due-funding and due-expiry indexes) makes SQLite rewrite that index's
/// entry even where the value is unchanged, two index writes per grant that usage never needs.
pub struct StateWrites {
    /// Whole snapshots: `id, funded, used, expired, expiry_booked, voided, voided_at, updated_at`.
    states: Rows,
    /// Credit used only: `id, used, updated_at`.
    uses: Rows,
}

impl Default for StateWrites {
    fn default() -> Self {
        Self::new()
    }
}

impl StateWrites {
    pub fn new() -> Self {
        StateWrites { states: Rows::new(8), uses: Rows::new(3) }
    }

    /// Adds `after` if it differs from `before` (`None`: the grant is new to the book).
    pub fn changed(&mut self, before: Option<&GrantState>, after: &GrantState, now: DateTime<Utc>) {
        match before {
            Some(before) if before == after => {}
            Some(before) if only_use_changed(before, after) => self.uses.push([
                Value::from(after.grant.id.0.clone()),
                Value::from(after.used.to_string()),
                Value::from(micros(now)),
            ]),
            _ => self.states.push([
                Value::from(after.grant.id.0.clone()),
                Value::from(i64::from(after.funded)),
                Value::from(after.used.to_string()),
                Value::from(after.expired.to_string()),
                Value::from(i64::from(after.expiry_booked)),
                Value::from(after.voided.to_string()),
                Value::from(after.grant.voided_at.map(micros)),
                Value::from(micros(now)),
            ]),
        }
    }

    /// Writes the states gathered.
    pub async fn save(self, tx: &mut Tx) -> StoreResult<()> {
        self.states
            .execute(
                tx,
                "UPDATE grants SET funded = CAST(v.column2 AS BIGINT), used = v.column3, expired = v.column4, \
                 expiry_booked = CAST(v.column5 AS BIGINT), voided = v.column6, voided_at = CAST(v.column7 AS BIGINT), \
                 updated_at = CAST(v.column8 AS BIGINT) FROM (",
                ") AS v WHERE grants.id = v.column1",
            )
            .await?;
        self.uses
            .execute(
                tx,
                "UPDATE grants SET used = v.column2, updated_at = CAST(v.column3 AS BIGINT) FROM (",
                ") AS v WHERE grants.id = v.column1",
            )
            .await?;
        Ok(())
    }

    /// How many grants go out as whole snapshots and as credit used only.
    #[cfg(test)]
    fn counts(&self) -> (usize, usize) {
        (self.states.len(), self.uses.len())
    }
}

/// Whether `after` differs from `before` in the credit used alone (the grant itself, its funding,
/// expiry and voiding unchanged). Destructured so that a new field must be considered here.
fn only_use_changed(before: &GrantState, after: &GrantState) -> bool {
    let GrantState { grant, funded, used: _, expired, expiry_booked, voided } = before;
    *grant == after.grant
        && *funded == after.funded
        && *expired == after.expired
        && *expiry_booked == after.expiry_booked
        && *voided == after.voided
}

pub async fn save_settlement(tx: &mut Tx, grant: &Grant, now: DateTime<Utc>) -> StoreResult<()> {
    let status = grant.funding.purchase().map(|p| settlement_status_text(p.settlement_status));
    sqlx::query("UPDATE grants SET settlement_status = $1, updated_at = $2 WHERE id = $3")
        .bind(status)
        .bind(micros(now))
        .bind(&grant.id.0)
        .execute(&mut **tx)
        .await?;
    Ok(())
}

/// Live customers with an expiry or a funding that has fallen due by `now` and is not yet booked
/// (a deleted customer cannot be locked, so it must not fill the batch).
pub async fn customers_with_due_events(
    conn: &mut sqlx::AnyConnection,
    now: DateTime<Utc>,
    limit: i64,
) -> StoreResult<Vec<String>> {
    let rows = sqlx::query(
        "SELECT DISTINCT g.customer_id FROM grants g JOIN customers c ON c.id = g.customer_id \
         WHERE g.voided_at IS NULL AND c.deleted_at IS NULL AND ((g.funded = 1 AND g.expiry_booked = 0 \
         AND g.expires_at <= $1) OR (g.funded = 0 AND g.effective_at <= $1)) LIMIT $2",
    )
    .bind(micros(now))
    .bind(limit)
    .fetch_all(&mut *conn)
    .await?;
    rows.iter().map(|r| r.try_get::<String, _>(0).map_err(StoreError::from)).collect()
}

/// Funded, unvoided grants of live customers whose expiry falls in `(from, to]` and that rule
/// `rule_id` has not looked at yet, soonest first.
pub async fn expiring_unnoticed(
    conn: &mut sqlx::AnyConnection,
    rule_id: &str,
    from: DateTime<Utc>,
    to: DateTime<Utc>,
    limit: i64,
) -> StoreResult<Vec<GrantRecord>> {
    let sql = format!(
        "SELECT {COLUMNS} FROM grants WHERE voided_at IS NULL AND funded = 1 AND expiry_booked = 0 \
         AND expires_at > $1 AND expires_at <= $2 \
         AND customer_id IN (SELECT id FROM customers WHERE deleted_at IS NULL) \
         AND NOT EXISTS (SELECT 1 FROM notification_grant_notices n WHERE n.rule_id = $3 AND n.grant_id = grants.id) \
         ORDER BY expires_at, seq LIMIT $4"
    );
    let rows =
        sqlx::query(&sql).bind(micros(from)).bind(micros(to)).bind(rule_id).bind(limit).fetch_all(&mut *conn).await?;
    rows.iter().map(from_row).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use credits::{Amount, Currency, FundingMethod, GrantSpec};

    fn at(s: &str) -> DateTime<Utc> {
        DateTime::parse_from_rfc3339(s).expect("time").to_utc()
    }

    fn amount(s: &str) -> Amount {
        Amount::parse(s).expect("amount")
    }

    fn state() -> GrantState {
        let spec = GrantSpec {
            currency: Currency::parse("USD").expect("currency"),
            amount: amount("100"),
            funding_method: FundingMethod::None,
            purchase: None,
            priority: Priority::DEFAULT,
            effective_at: None,
            expires_after: Some(IsoDuration::parse("P1D").expect("duration")),
            features: FeatureFilter::only(Vec::new()),
        };
        let grant = Grant::new(spec, GrantId("g".into()), at("2030-01-01T00:00:00Z"), 0).expect("grant");
        let mut state = GrantState::new(grant);
        state.funded = true;
        state
    }

    #[test]
    fn a_grant_whose_only_change_is_credit_used_is_written_apart() {
        let now = at("2030-01-01T12:00:00Z");
        let before = state();
        let mut used = before.clone();
        used.used = amount("30");
        let mut unfunded = before.clone();
        unfunded.funded = false;
        let mut expired = used.clone();
        expired.expired = amount("70");
        expired.expiry_booked = true;
        let mut voided = used.clone();
        voided.voided = amount("70");
        voided.grant.voided_at = Some(now);

        let mut writes = StateWrites::new();
        writes.changed(Some(&before), &before, now);
        assert_eq!(writes.counts(), (0, 0), "unchanged: nothing to write");
        writes.changed(Some(&before), &used, now);
        assert_eq!(writes.counts(), (0, 1), "credit used only");
        writes.changed(Some(&unfunded), &used, now);
        assert_eq!(writes.counts(), (1, 1), "funded and used");
        writes.changed(Some(&used), &expired, now);
        assert_eq!(writes.counts(), (2, 1), "expired");
        writes.changed(Some(&used), &voided, now);
        assert_eq!(writes.counts(), (3, 1), "voided");
        writes.changed(None, &used, now);
        assert_eq!(writes.counts(), (4, 1), "new to the book");
    }
}
