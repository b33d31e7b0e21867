//! Persistence of the ledger's records. Each module reads and writes one kind of record; the
//! credit decisions themselves come from the `credits` crate.

pub mod books;
pub mod channels;
pub mod customers;
pub mod events;
pub mod grants;
pub mod idempotency;
pub mod leases;
pub mod movements;
pub mod outbox;
pub mod rules;
pub mod usage;

use std::collections::BTreeMap;

use credits::{Amount, Currency, FeatureKey};

pub type Labels = BTreeMap<String, String>;

/// Stored text that no longer parses means the database was edited behind the ledger's back.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error(transparent)]
    Sql(#[from] sqlx::Error),
    #[error("corrupt stored value in {table}.{column}: {value:?}")]
    Corrupt { table: &'static str, column: &'static str, value: String },
}

pub type StoreResult<T> = Result<T, StoreError>;

pub fn amount(table: &'static str, column: &'static str, text: String) -> StoreResult<Amount> {
    Amount::parse(&text).map_err(|_| StoreError::Corrupt { table, column, value: text })
}

pub fn currency(table: &'static str, column: &'static str, text: String) -> StoreResult<Currency> {
    Currency::parse(&text).map_err(|_| StoreError::Corrupt { table, column, value: text })
}

pub fn feature(table: &'static str, column: &'static str, text: Option<String>) -> StoreResult<Option<FeatureKey>> {
    match text {
        None => Ok(None),
        Some(t) if t.is_empty() => Ok(None),
        Some(t) => FeatureKey::parse(&t).map(Some).map_err(|_| StoreError::Corrupt { table, column, value: t }),
    }
}

pub fn labels(table: &'static str, text: String) -> StoreResult<Labels> {
    serde_json::from_str(&text).map_err(|_| StoreError::Corrupt { table, column: "labels", value: text })
}

pub fn labels_json(labels: &Labels) -> String {
    serde_json::to_string(labels).unwrap_or_else(|_| "{}".to_owned())
}

pub fn new_id() -> String {
    ulid::Ulid::new().to_string()
}
