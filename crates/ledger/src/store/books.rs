//! Loading a customer's book from the store and writing back what an operation changed.

use chrono::{DateTime, Utc};
use credits::usage_mark::UsageMark;
use credits::{Book, Debt, Entry, GrantState, Hold, HoldBacking, HoldId, MovementKind};
use sqlx::Row;

use std::collections::{BTreeMap, HashMap};

use super::grants::{self, GrantRecord};
use super::usage::{self, UsageRecord};
use super::{amount, currency, feature, labels_json, new_id, Labels, StoreError, StoreResult};
use crate::db::rows::{self, Rows, Value};
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
    load_many(conn, &[customer_id.to_owned()])
        .await?
        .remove(customer_id)
        .ok_or(StoreError::Sql(sqlx::Error::RowNotFound))
}

/// The books of the customers (a missing customer has none), with their grants' metadata, with a
/// few statements whatever their number.
pub async fn load_many(
    conn: &mut sqlx::AnyConnection,
    customer_ids: &[String],
) -> StoreResult<HashMap<String, LoadedBook>> {
    let mut grants_of: HashMap<String, Vec<GrantRecord>> = HashMap::new();
    for g in grants::of_customers(&mut *conn, customer_ids).await? {
        grants_of.entry(g.customer_id.clone()).or_default().push(g);
    }
    let states = grants_of.iter().map(|(c, g)| (c.clone(), g.iter().map(|g| g.state.clone()).collect())).collect();
    Ok(assemble(conn, customer_ids, states)
        .await?
        .into_iter()
        .map(|(id, book)| {
            let grants = grants_of.remove(&id).unwrap_or_default();
            (id, LoadedBook { book, grants })
        })
        .collect())
}

/// The books of the customers (a missing customer has none), without their grants' metadata.
pub async fn load_books(conn: &mut sqlx::AnyConnection, customer_ids: &[String]) -> StoreResult<HashMap<String, Book>> {
    let mut states: HashMap<String, Vec<GrantState>> = HashMap::new();
    for (customer_id, state) in grants::states_of_customers(&mut *conn, customer_ids).await? {
        states.entry(customer_id).or_default().push(state);
    }
    assemble(conn, customer_ids, states).await
}

/// The books of the customers from their grants' states: reads their clocks, debts and open holds.
async fn assemble(
    conn: &mut sqlx::AnyConnection,
    customer_ids: &[String],
    mut states_of: HashMap<String, Vec<GrantState>>,
) -> StoreResult<HashMap<String, Book>> {
    let clocks = rows::fetch_by_ids(&mut *conn, "SELECT id, clock FROM customers WHERE id IN ({list})", customer_ids)
        .await?
        .iter()
        .map(|r| Ok((r.try_get::<String, _>(0)?, r.try_get::<i64, _>(1)?)))
        .collect::<StoreResult<Vec<_>>>()?;
    let mut debts_of: HashMap<String, Vec<Debt>> = HashMap::new();
    let sql = "SELECT customer_id, currency, feature, amount FROM debts WHERE customer_id IN ({list}) \
               ORDER BY customer_id, currency, feature";
    for r in rows::fetch_by_ids(&mut *conn, sql, customer_ids).await? {
        debts_of.entry(r.try_get("customer_id")?).or_default().push(Debt {
            currency: currency("debts", "currency", r.try_get("currency")?)?,
            feature: feature("debts", "feature", r.try_get("feature")?)?,
            amount: amount("debts", "amount", r.try_get("amount")?)?,
        });
    }
    let mut holds_of: HashMap<String, Vec<Hold>> = HashMap::new();
    let sql =
        "SELECT customer_id, id, currency, feature, amount, backing, created_at, expires_at, recalled FROM holds \
               WHERE customer_id IN ({list}) AND released_at IS NULL ORDER BY customer_id, created_at, id";
    for r in rows::fetch_by_ids(&mut *conn, sql, customer_ids).await? {
        holds_of.entry(r.try_get("customer_id")?).or_default().push(hold_from_row(&r)?);
    }
    Ok(clocks
        .into_iter()
        .map(|(id, clock)| {
            let states = states_of.remove(&id).unwrap_or_default();
            let debts = debts_of.remove(&id).unwrap_or_default();
            let holds = holds_of.remove(&id).unwrap_or_default();
            let book = Book::from_parts(states, debts, holds, from_micros(clock));
            (id, book)
        })
        .collect())
}

/// Writes what an operation changed and the entries it booked, in this transaction. The ids are
/// those given to the entries, in order (movements and overages; covers have none).
pub async fn save(
    tx: &mut Tx,
    customer_id: &str,
    before: &Book,
    after: &Book,
    entries: &[Entry],
    op: &Operation<'_>,
    now: DateTime<Utc>,
) -> StoreResult<Vec<Option<String>>> {
    let mut writes = Writes::new();
    writes.changes(customer_id, before, after, now);
    let ids = writes.entries(customer_id, entries, op, now);
    writes.flush(tx).await?;
    Ok(ids)
}

/// The rows that operations on one or many books write, gathered so that they go out in a few
/// multi-row statements (a gateway sync books a thousand customers at once). Each book's
/// changes are added once per flush, after all its operations.
pub struct Writes {
    /// Grants an operation created (credit a gateway sync gives back), inserted before any state.
    new_grants: Vec<GrantRecord>,
    grant_states: grants::StateWrites,
    debt_owners: Vec<String>,
    debts: Rows,
    holds: Rows,
    /// Each book's clock, by customer.
    clocks: BTreeMap<String, i64>,
    /// New revisions `db::lock_customers` left to this flush, by customer.
    revisions: HashMap<String, i64>,
    movements: Rows,
    overages: Rows,
    covers: Rows,
    postings: Rows,
    usage: Rows,
    /// Each stream's mark and customer, as the last range booked or found left it.
    usage_marks: BTreeMap<String, (String, UsageMark, i64)>,
    lease_seqs: BTreeMap<String, i64>,
}

impl Default for Writes {
    fn default() -> Self {
        Self::new()
    }
}

impl Writes {
    pub fn new() -> Self {
        Writes {
            new_grants: Vec::new(),
            grant_states: grants::StateWrites::new(),
            debt_owners: Vec::new(),
            debts: Rows::new(4),
            holds: Rows::new(10),
            clocks: BTreeMap::new(),
            revisions: HashMap::new(),
            movements: Rows::new(15),
            overages: Rows::new(7),
            covers: Rows::new(6),
            postings: Rows::new(5),
            usage: Rows::new(10),
            usage_marks: BTreeMap::new(),
            lease_seqs: BTreeMap::new(),
        }
    }

    /// What changed in a book between `before` and `after`: grant states, debts, holds (holds are
    /// not journal entries) and the book's clock.
    pub fn changes(&mut self, customer_id: &str, before: &Book, after: &Book, now: DateTime<Utc>) {
        for state in after.grants() {
            self.grant_states.changed(before.grant(&state.grant.id), state, now);
        }
        if before.debts() != after.debts() {
            self.debt_owners.push(customer_id.to_owned());
            for d in after.debts() {
                self.debts.push([
                    Value::from(customer_id),
                    Value::from(d.currency.as_str()),
                    Value::from(d.feature.as_ref().map_or("", |f| f.as_str())),
                    Value::from(d.amount.to_string()),
                ]);
            }
        }
        for hold in after.holds() {
            if before.hold(&hold.id) != Some(hold) {
                self.holds.push([
                    Value::from(hold.id.0.clone()),
                    Value::from(customer_id),
                    Value::from(hold.currency.as_str()),
                    Value::from(hold.feature.as_ref().map(|f| f.as_str().to_owned())),
                    Value::from(hold.amount.to_string()),
                    Value::from(backing_json(&hold.backing)),
                    Value::from(micros(hold.created_at)),
                    Value::from(micros(hold.expires_at)),
                    Value::from(hold.released.then_some(micros(now))),
                    Value::from(i64::from(hold.recalled)),
                ]);
            }
        }
        self.clocks.insert(customer_id.to_owned(), micros(after.clock()));
    }

    /// A grant the operation created; its state is written by `changes` like any other's. The
    /// book that holds it knows it without the sequence number the database gives it, so that
    /// book must be read again before it serves another transaction.
    pub fn new_grant(&mut self, record: GrantRecord) {
        self.new_grants.push(record);
    }

    /// The new revisions `db::lock_customers` read: each is written with its book's clock, so
    /// every customer whose revision is answered must have its book's changes added. (One locked
    /// but not served keeps its revision: nobody was told the new one.)
    pub fn revisions(&mut self, revisions: HashMap<String, i64>) {
        self.revisions = revisions;
    }

    /// Journal entries an operation booked; returns the ids given to them, in order (movements
    /// and overages; covers have none).
    pub fn entries(
        &mut self,
        customer_id: &str,
        entries: &[Entry],
        op: &Operation<'_>,
        now: DateTime<Utc>,
    ) -> Vec<Option<String>> {
        entries.iter().map(|e| self.entry(customer_id, e, op, now)).collect()
    }

    /// Where a usage stream's mark is now.
    pub fn usage_mark(&mut self, stream: String, customer_id: &str, mark: UsageMark, now: DateTime<Utc>) {
        self.usage_marks.insert(stream, (customer_id.to_owned(), mark, micros(now)));
    }

    /// A gateway usage range booked apart from its stream's mark, recorded by its key so that a
    /// retry books nothing.
    pub fn usage(&mut self, r: &UsageRecord<'_>, now: DateTime<Utc>) {
        self.usage.push([
            Value::from(r.key),
            Value::from(r.customer_id),
            Value::from(r.node),
            Value::from(r.subject),
            Value::from(r.currency.as_str()),
            Value::from(r.feature.map(|f| f.as_str().to_owned())),
            Value::from(r.range.amount.to_string()),
            Value::from(i64::try_from(r.range.calls()).unwrap_or(i64::MAX)),
            Value::from(r.range.settlement_mode.as_str()),
            Value::from(micros(now)),
        ]);
    }

    /// The last top-up request number applied to a lease (its hold is written by `changes`).
    pub fn lease_seq(&mut self, lease_id: &str, seq: i64) {
        self.lease_seqs.insert(lease_id.to_owned(), seq);
    }

    fn entry(&mut self, customer_id: &str, entry: &Entry, op: &Operation<'_>, now: DateTime<Utc>) -> Option<String> {
        let id = match entry {
            Entry::Movement(m) => {
                let id = new_id();
                // Movements the passage of time books (fundings, expiries) carry no caller labels.
                let (description, labels) = match m.kind {
                    MovementKind::Consumed | MovementKind::Adjusted => (op.description, labels_json(op.labels)),
                    _ => (None, labels_json(&Labels::new())),
                };
                self.movements.push([
                    Value::from(id.clone()),
                    Value::from(customer_id),
                    Value::from(m.kind.as_str()),
                    Value::from(m.amount.to_string()),
                    Value::from(m.currency.as_str()),
                    Value::from(m.grant_id.as_ref().map(|g| g.0.clone())),
                    Value::from(m.feature.as_ref().map(|f| f.as_str().to_owned())),
                    Value::from(m.balance_before.to_string()),
                    Value::from(m.balance_after.to_string()),
                    Value::from(micros(m.booked_at)),
                    Value::from(micros(now)),
                    Value::from(movement_name(m.kind, op)),
                    Value::from(description.map(str::to_owned)),
                    Value::from(labels),
                    Value::from(op.reference.as_str()),
                ]);
                Some(id)
            }
            Entry::Overage { currency, feature, amount, at, .. } => {
                let id = new_id();
                self.overages.push([
                    Value::from(id.clone()),
                    Value::from(customer_id),
                    Value::from(currency.as_str()),
                    Value::from(feature.as_ref().map(|f| f.as_str().to_owned())),
                    Value::from(amount.to_string()),
                    Value::from(micros(*at)),
                    Value::from(op.reference.as_str()),
                ]);
                Some(id)
            }
            Entry::DebtCovered { grant_id, currency, feature, amount, at } => {
                self.covers.push([
                    Value::from(customer_id),
                    Value::from(grant_id.0.as_str()),
                    Value::from(currency.as_str()),
                    Value::from(feature.as_ref().map(|f| f.as_str().to_owned())),
                    Value::from(amount.to_string()),
                    Value::from(micros(*at)),
                ]);
                None
            }
        };
        if let Some(entry_id) = &id {
            for p in entry.postings() {
                self.postings.push([
                    Value::from(entry_id.as_str()),
                    Value::from(customer_id),
                    Value::from(p.account.as_str()),
                    Value::from(p.currency.as_str()),
                    Value::from(p.amount.to_string()),
                ]);
            }
        }
        id
    }

    /// Writes every row gathered, in this transaction.
    pub async fn flush(self, tx: &mut Tx) -> StoreResult<()> {
        for record in &self.new_grants {
            grants::insert(tx, record).await?;
        }
        self.grant_states.save(tx).await?;
        if !self.debt_owners.is_empty() {
            rows::fetch_by_ids(tx, "DELETE FROM debts WHERE customer_id IN ({list})", &self.debt_owners).await?;
            self.debts.execute(tx, "INSERT INTO debts (customer_id, currency, feature, amount)", "").await?;
        }
        self.holds
            .execute(
                tx,
                "INSERT INTO holds (id, customer_id, currency, feature, amount, backing, created_at, expires_at, \
                 released_at, recalled)",
                "ON CONFLICT (id) DO UPDATE SET amount = excluded.amount, backing = excluded.backing, \
                 created_at = excluded.created_at, expires_at = excluded.expires_at, \
                 released_at = excluded.released_at, recalled = excluded.recalled",
            )
            .await?;
        let mut lease_seqs = Rows::new(2);
        for (id, seq) in self.lease_seqs {
            lease_seqs.push([Value::from(id), Value::from(seq)]);
        }
        lease_seqs
            .execute(
                tx,
                "UPDATE holds SET last_seq = CAST(v.column2 AS BIGINT) FROM (",
                ") AS v WHERE holds.id = v.column1",
            )
            .await?;
        let mut clocks = Rows::new(3);
        for (customer_id, clock) in self.clocks {
            let revision = self.revisions.get(&customer_id).copied();
            clocks.push([Value::from(customer_id), Value::from(clock), Value::from(revision)]);
        }
        clocks
            .execute(
                tx,
                "UPDATE customers SET clock = CAST(v.column2 AS BIGINT), \
                 lock_version = COALESCE(CAST(v.column3 AS BIGINT), lock_version) FROM (",
                ") AS v WHERE customers.id = v.column1",
            )
            .await?;
        self.movements
            .execute(
                tx,
                "INSERT INTO movements (id, customer_id, kind, amount, currency, grant_id, feature, balance_before, \
                 balance_after, booked_at, created_at, name, description, labels, operation)",
                "",
            )
            .await?;
        self.overages
            .execute(tx, "INSERT INTO overages (id, customer_id, currency, feature, amount, at, operation)", "")
            .await?;
        self.covers
            .execute(tx, "INSERT INTO debt_covers (customer_id, grant_id, currency, feature, amount, at)", "")
            .await?;
        self.postings
            .execute(tx, "INSERT INTO postings (entry_id, customer_id, account, currency, amount)", "")
            .await?;
        let mut marks = Rows::new(usage::MARK_COLUMNS);
        for (stream, (customer_id, mark, at)) in self.usage_marks {
            usage::push_mark(&mut marks, stream, customer_id, mark, at);
        }
        marks.execute(tx, usage::MARK_UPSERT.0, usage::MARK_UPSERT.1).await?;
        self.usage
            .execute(
                tx,
                "INSERT INTO usage_records (key, customer_id, node, subject, currency, feature, amount, calls, \
                 settlement_mode, booked_at)",
                "ON CONFLICT (key) DO NOTHING",
            )
            .await?;
        Ok(())
    }
}

fn movement_name<'a>(kind: MovementKind, op: &Operation<'a>) -> &'a str {
    match kind {
        MovementKind::Funded => "Credits funded",
        MovementKind::Expired => "Credits expired",
        MovementKind::Voided => "Grant voided",
        MovementKind::Consumed | MovementKind::Adjusted => op.name,
    }
}

fn hold_from_row(r: &sqlx::any::AnyRow) -> StoreResult<Hold> {
    Ok(Hold {
        id: HoldId(r.try_get("id")?),
        currency: currency("holds", "currency", r.try_get("currency")?)?,
        feature: feature("holds", "feature", opt(r, "feature")?)?,
        amount: amount("holds", "amount", r.try_get("amount")?)?,
        backing: backing("holds", opt(r, "backing")?)?,
        created_at: from_micros(r.try_get("created_at")?),
        expires_at: from_micros(r.try_get("expires_at")?),
        released: false,
        recalled: r.try_get::<i64, _>("recalled")? != 0,
    })
}

/// Which grants a hold's credit sits on, as stored: JSON, `[{"grant_id", "amount"}]`.
fn backing_json(backing: &[HoldBacking]) -> String {
    serde_json::to_string(backing).unwrap_or_else(|_| "[]".into())
}

/// A hold stored before holds were backed has none (the book backs it on load).
fn backing(table: &'static str, stored: Option<String>) -> StoreResult<Vec<HoldBacking>> {
    let Some(json) = stored else { return Ok(Vec::new()) };
    serde_json::from_str(&json).map_err(|_| StoreError::Corrupt { table, column: "backing", value: json })
}

/// Holds that were open at `at` (created by then, not yet expired or released), with what they
/// hold now.
pub async fn holds_open_at(
    conn: &mut sqlx::AnyConnection,
    customer_id: &str,
    at: DateTime<Utc>,
) -> StoreResult<Vec<Hold>> {
    let rows = sqlx::query(
        "SELECT id, currency, feature, amount, backing, created_at, expires_at, recalled FROM holds WHERE customer_id = $1 \
         AND created_at <= $2 AND expires_at > $2 AND (released_at IS NULL OR released_at > $2)",
    )
    .bind(customer_id)
    .bind(micros(at))
    .fetch_all(&mut *conn)
    .await?;
    rows.iter().map(hold_from_row).collect()
}
