//! The ledger as the simulator sees it: serve a sync, run the background job, restart, and show
//! the auditor its books. Two backends: the credit model alone (fast, for proptest's shrinking)
//! and the real ledger on SQLite.

use std::collections::BTreeMap;

use chrono::{DateTime, TimeDelta, Utc};
use credits::sync::{SyncRequest, SyncResponse};
use credits::{Amount, Book, GrantId};

/// A grant the scenario starts with, in calls' worth of credit and simulated milliseconds.
#[derive(Clone, Debug)]
pub struct GrantPlan {
    pub calls: u64,
    pub priority: i64,
    pub effective_ms: u64,
    /// Counted from `effective_ms`; `None`: never expires.
    pub expires_after_ms: Option<u64>,
}

/// What the auditor reads from the ledger.
pub struct Books {
    /// The customer's book as the ledger holds it.
    pub book: Book,
    /// Total of `consumed` movements (usage booked, covered or not).
    pub consumed: Amount,
    /// Total of credit given back for failed calls (ranges' `refunded`).
    pub refunded: Amount,
    /// Booked usage ranges per node.
    pub booked: BTreeMap<String, Vec<(u64, u64)>>,
    /// Violations of the journal's invariants (double entry, snapshots).
    pub problems: Vec<String>,
}

pub trait Ledger {
    /// Serves one sync at `now`; `None` when the ledger failed (the host sees an error status).
    fn serve(&mut self, request: &SyncRequest, now: DateTime<Utc>) -> Option<SyncResponse>;
    /// The background job: books expiries and fundings that fell due, closes expired leases.
    fn job(&mut self, now: DateTime<Utc>);
    /// Stops and starts again on the same store.
    fn restart(&mut self);
    /// The id of the scenario's grant `index`, if there is one.
    fn grant_id(&self, index: usize) -> Option<GrantId>;
    /// Voids a grant at `now`, as an operator does through the API.
    fn void(&mut self, grant: &GrantId, now: DateTime<Utc>);
    fn books(&mut self) -> Books;
}

/// Simulated milliseconds as an instant.
pub fn at(ms: u64) -> DateTime<Utc> {
    DateTime::<Utc>::UNIX_EPOCH + TimeDelta::milliseconds(i64::try_from(ms).unwrap())
}

/// The journal key of a usage range: `node/subject/from-to` → (node, from, to).
pub fn parse_range_key(key: &str) -> Option<(String, u64, u64)> {
    let (rest, range) = key.rsplit_once('/')?;
    let (node, _subject) = rest.split_once('/')?;
    let (from, to) = range.split_once('-')?;
    Some((node.to_owned(), from.parse().ok()?, to.parse().ok()?))
}

/// Milliseconds as an ISO-8601 duration (`PT2.500S`).
pub fn iso_ms(ms: u64) -> String {
    format!("PT{}.{:03}S", ms / 1000, ms % 1000)
}
