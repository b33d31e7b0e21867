//! The books gateway syncs committed last, kept in memory with the revision they were committed
//! at, so that the next sync of the same customers need not read them again: reading a group's
//! books was a quarter of a gateway sync's time on SQLite (bench/RESULTS.md §0g).
//!
//! A kept book is used only if it is still the customer's book, which the lock the sync takes
//! anyway tells: every committed change to a customer's book moves its revision (every writer
//! locks the customer first, `db::lock_customer(s)`), so a lock that gives the kept revision plus
//! one finds the book as it was kept. Any other writer — a charge, a grant, the expiry pass,
//! another ledger instance on the same PostgreSQL — moves the revision, and the book is read
//! again. Nothing here needs to be told about other writes.

use std::collections::HashMap;
use std::sync::Mutex;

use credits::Book;

/// The most books kept; beyond it the cache starts over (a ledger serving more customers than
/// this reads the books of those it meets less often, as it did before it kept any).
const MAX_BOOKS: usize = 50_000;

#[derive(Default)]
pub struct BookCache {
    books: Mutex<HashMap<String, Kept>>,
}

struct Kept {
    revision: i64,
    book: Book,
}

impl BookCache {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, Kept>> {
        self.books.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Takes out the kept books of `customers` that are still current at the `revisions` a lock
    /// just gave; returns them and the customers whose books must be read. A customer without a
    /// revision (none live) is in neither.
    pub fn take_current(
        &self,
        customers: &[String],
        revisions: &HashMap<String, i64>,
    ) -> (HashMap<String, Book>, Vec<String>) {
        let mut kept = self.lock();
        let mut current = HashMap::with_capacity(customers.len());
        let mut to_read = Vec::new();
        for id in customers {
            let Some(&revision) = revisions.get(id) else { continue };
            match kept.remove(id) {
                Some(k) if k.revision.checked_add(1) == Some(revision) => {
                    current.insert(id.clone(), k.book);
                }
                _ => to_read.push(id.clone()),
            }
        }
        (current, to_read)
    }

    /// Keeps books a transaction committed, each at the revision it wrote.
    pub fn keep<'a>(&self, committed: impl IntoIterator<Item = (&'a str, i64, Book)>) {
        let mut kept = self.lock();
        for (id, revision, book) in committed {
            if kept.len() >= MAX_BOOKS {
                kept.clear();
            }
            match as_stored(book) {
                Some(book) => kept.insert(id.to_owned(), Kept { revision, book }),
                None => kept.remove(id),
            };
        }
    }

    /// Every kept book with its revision, by customer (for checks against the store).
    pub fn entries(&self) -> Vec<(String, i64, Book)> {
        self.lock().iter().map(|(id, k)| (id.clone(), k.revision, k.book.clone())).collect()
    }
}

/// The book exactly as the store gives it back once saved (released holds are not read back,
/// open ones come in creation order), if that order is known here: two debts, or two holds
/// created at one instant, come in the database's text order (its collation), so such a book is
/// read again rather than kept.
fn as_stored(book: Book) -> Option<Book> {
    let (grants, debts, holds, clock) = book.into_parts();
    if debts.len() > 1 {
        return None;
    }
    let mut holds: Vec<_> = holds.into_iter().filter(|h| !h.released).collect();
    holds.sort_by_key(|h| h.created_at);
    if holds.windows(2).any(|pair| pair[0].created_at == pair[1].created_at) {
        return None;
    }
    Some(Book::from_parts(grants, debts, holds, clock))
}
