//! One customer's write: lock the customer, load the book, let the credit model decide, write
//! back exactly what changed, commit. Every booking of the ledger goes through here.

use chrono::{DateTime, Utc};
use credits::{Book, Entry};

use super::problem::{ApiResult, Problem};
use crate::db::{lock_customer, Db, WriteTx};
use crate::metrics::Metrics;
use crate::store::books::{self, LoadedBook, Operation};

pub struct CustomerTx {
    pub w: WriteTx,
    pub customer_id: String,
    /// The database clock, never behind the book's own clock.
    pub now: DateTime<Utc>,
    pub loaded: LoadedBook,
    /// The customer's revision as of this transaction.
    pub revision: i64,
    saved: Book,
}

impl CustomerTx {
    /// Locks a live customer; 404 if there is none.
    pub async fn begin(db: &Db, customer_id: &str) -> ApiResult<CustomerTx> {
        let w = db.begin_write().await?;
        CustomerTx::lock(db, w, customer_id).await?.map_err(|_| Problem::not_found("customer", customer_id))
    }

    /// Locks a live customer within a write transaction that may go on with other customers (a
    /// gateway sync books all its subjects in one); hands the transaction back if there is no such
    /// customer. Callers that lock several customers lock them in id order.
    pub async fn lock(db: &Db, mut w: WriteTx, customer_id: &str) -> ApiResult<Result<CustomerTx, WriteTx>> {
        let Some(revision) = lock_customer(&mut w.tx, customer_id).await? else {
            return Ok(Err(w));
        };
        let db_now = db.now(&mut w.tx).await?;
        let loaded = books::load(&mut w.tx, customer_id).await?;
        let now = db_now.max(loaded.book.clock());
        let saved = loaded.book.clone();
        Ok(Ok(CustomerTx { w, customer_id: customer_id.to_owned(), now, loaded, revision, saved }))
    }

    /// Ends this customer's part of a transaction that goes on (uncommitted).
    pub fn into_write(self) -> WriteTx {
        self.w
    }

    pub fn book(&mut self) -> &mut Book {
        &mut self.loaded.book
    }

    /// Writes what the book changed since the last save, and `entries`, in this transaction.
    pub async fn save(
        &mut self,
        entries: &[Entry],
        op: &Operation<'_>,
        metrics: &Metrics,
    ) -> ApiResult<Vec<Option<String>>> {
        let ids = books::save(&mut self.w.tx, &self.customer_id, &self.saved, &self.loaded.book, entries, op, self.now)
            .await?;
        if !entries.is_empty() || self.saved != self.loaded.book {
            // The balance may have crossed a threshold: its event commits with this booking.
            let books = [(self.customer_id.as_str(), &self.loaded.book)];
            metrics
                .add("notification_events", crate::notify::on_bookings(&mut self.w.tx, &books, self.now).await? as u64);
        }
        self.saved = self.loaded.book.clone();
        metrics.count_entries(entries);
        Ok(ids)
    }

    /// Closes leases whose TTL has passed (they stopped counting against the live balance at
    /// that instant already); counts those that still held credit nobody reported.
    pub fn close_expired_leases(&mut self, metrics: &Metrics) {
        let now = self.now;
        let unreported = self.book().expire_holds(now).iter().filter(|(_, held)| held.is_positive()).count();
        metrics.add("leases_expired_unreported", unreported as u64);
    }

    pub async fn commit(self) -> ApiResult<()> {
        self.w.commit().await?;
        Ok(())
    }
}

/// Books whatever fell due for a customer (expiries, grants becoming effective) and closes leases
/// whose TTL passed. Returns the journal entries booked.
pub async fn settle_due(db: &Db, customer_id: &str, metrics: &Metrics) -> ApiResult<usize> {
    let mut ctx = CustomerTx::begin(db, customer_id).await?;
    let now = ctx.now;
    let entries = ctx.book().try_advance(now).map_err(|e| Problem::model("body", e))?;
    ctx.close_expired_leases(metrics);
    let labels = Default::default();
    ctx.save(&entries, &Operation::system("time", &labels), metrics).await?;
    ctx.commit().await?;
    Ok(entries.len())
}
