//! The books gateway syncs committed last, kept in memory with the revision they were committed
//! at, so that the next sync of the same customers need not read them again: reading a group's
//! books was a quarter of a gateway sync's time on SQLite (bench/RESULTS.md §0g). With each book
//! go the usage marks of the customer's streams it met, so that a stream's next range is checked
//! without looking its mark up.
//!
//! A kept book is used only if it is still the customer's book, which the lock the sync takes
//! anyway tells: every committed change to a customer's book moves its revision (every writer
//! locks the customer first, `db::lock_customer(s)`), so a lock that gives the kept revision plus
//! one finds the book as it was kept. Any other writer — a charge, a grant, the expiry pass,
//! another ledger instance on the same PostgreSQL — moves the revision, and the book is read
//! again. Nothing here needs to be told about other writes. A stream's mark is written only by a
//! sync of the customer its subject belongs to, under that customer's lock; a subject moves to
//! another customer only through updates of both, which move both revisions.

use std::collections::HashMap;
use std::sync::Mutex;

use credits::usage_mark::UsageMark;
use credits::Book;

/// The most books kept; beyond it the cache starts over (a ledger serving more customers than
/// this reads the books of those it meets less often, as it did before it kept any).
const MAX_BOOKS: usize = 50_000;

/// The most marks kept with one book: a customer's streams multiply with the nodes that serve it
/// and each node's restarts, so beyond this none are kept, and the next sync looks up (and keeps)
/// only those it meets.
const MAX_MARKS_PER_BOOK: usize = 256;

/// The most marks kept in all (about 100 bytes each); beyond it the cache starts over, as it does
/// beyond [`MAX_BOOKS`].
const MAX_MARKS: usize = 1_000_000;

/// The marks of a customer's streams as stored, by stream.
pub type Marks = HashMap<String, UsageMark>;

/// A customer's book and the marks of streams it met, as committed.
pub struct KeptBook {
    pub book: Book,
    pub marks: Marks,
}

#[derive(Default)]
pub struct BookCache {
    shelf: Mutex<Shelf>,
}

#[derive(Default)]
struct Shelf {
    books: HashMap<String, Kept>,
    /// The marks kept with all of `books`.
    marks: usize,
}

impl Shelf {
    fn take(&mut self, id: &str) -> Option<Kept> {
        let kept = self.books.remove(id)?;
        self.marks = self.marks.saturating_sub(kept.marks.len());
        Some(kept)
    }

    fn put(&mut self, id: &str, kept: Kept) {
        if self.books.len() >= MAX_BOOKS || self.marks.saturating_add(kept.marks.len()) > MAX_MARKS {
            self.books.clear();
            self.marks = 0;
        }
        self.take(id);
        self.marks = self.marks.saturating_add(kept.marks.len());
        self.books.insert(id.to_owned(), kept);
    }
}

struct Kept {
    revision: i64,
    book: Book,
    marks: Marks,
}

impl BookCache {
    fn lock(&self) -> std::sync::MutexGuard<'_, Shelf> {
        self.shelf.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Takes out the kept books (and marks) of `customers` that are still current at the
    /// `revisions` a lock just gave; returns them and the customers whose books must be read. A
    /// customer without a revision (none live) is in neither.
    pub fn take_current(
        &self,
        customers: &[String],
        revisions: &HashMap<String, i64>,
    ) -> (HashMap<String, KeptBook>, Vec<String>) {
        let mut kept = self.lock();
        let mut current = HashMap::with_capacity(customers.len());
        let mut to_read = Vec::new();
        for id in customers {
            let Some(&revision) = revisions.get(id) else { continue };
            match kept.take(id) {
                Some(k) if k.revision.checked_add(1) == Some(revision) => {
                    current.insert(id.clone(), KeptBook { book: k.book, marks: k.marks });
                }
                _ => to_read.push(id.clone()),
            }
        }
        (current, to_read)
    }

    /// Keeps books a transaction committed, each at the revision it wrote, with the marks of its
    /// customer's streams as stored (those kept with the book before, and those the transaction
    /// read or wrote).
    pub fn keep<'a>(&self, committed: impl IntoIterator<Item = (&'a str, i64, Book, Marks)>) {
        let mut kept = self.lock();
        for (id, revision, book, mut marks) in committed {
            let Some(book) = as_stored(book) else {
                kept.take(id);
                continue;
            };
            if marks.len() > MAX_MARKS_PER_BOOK {
                marks = Marks::new();
            }
            kept.put(id, Kept { revision, book, marks });
        }
    }

    /// Every kept book with its revision and marks, by customer (for checks against the store).
    pub fn entries(&self) -> Vec<(String, i64, Book, Marks)> {
        self.lock().books.iter().map(|(id, k)| (id.clone(), k.revision, k.book.clone(), k.marks.clone())).collect()
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

#[cfg(test)]
mod tests {
    use super::*;

    fn marks(prefix: &str, count: usize) -> Marks {
        (0..count).map(|i| (format!("{prefix}{i}"), UsageMark { booked_to: i as u64, keyed: false })).collect()
    }

    fn revisions(ids: &[String], revision: i64) -> HashMap<String, i64> {
        ids.iter().map(|id| (id.clone(), revision)).collect()
    }

    #[test]
    fn a_book_keeps_its_marks_up_to_its_share() {
        let cache = BookCache::default();
        let ids = vec!["c".to_owned()];
        cache.keep([("c", 1, Book::new(), marks("s", MAX_MARKS_PER_BOOK))]);
        let (mut current, to_read) = cache.take_current(&ids, &revisions(&ids, 2));
        assert!(to_read.is_empty());
        assert_eq!(current.remove("c").map(|k| k.marks), Some(marks("s", MAX_MARKS_PER_BOOK)));

        // Beyond its share the book is kept without marks: the next sync looks up those it meets.
        cache.keep([("c", 2, Book::new(), marks("s", MAX_MARKS_PER_BOOK + 1))]);
        let (mut current, _) = cache.take_current(&ids, &revisions(&ids, 3));
        assert_eq!(current.remove("c").map(|k| k.marks.len()), Some(0));
    }

    #[test]
    fn marks_beyond_the_cache_bound_start_it_over() {
        let cache = BookCache::default();
        let per_book = MAX_MARKS_PER_BOOK;
        let books = MAX_MARKS / per_book;
        let ids: Vec<String> = (0..=books).map(|i| format!("c{i}")).collect();
        cache.keep(ids.iter().take(books).map(|id| (id.as_str(), 1, Book::new(), marks(id, per_book))));
        assert_eq!(cache.lock().marks, books * per_book);
        assert_eq!(cache.entries().len(), books);
        // One more book's marks would pass the bound: the cache starts over with that book.
        let last = ids.last().expect("ids");
        cache.keep([(last.as_str(), 1, Book::new(), marks(last, per_book))]);
        assert_eq!(cache.entries().len(), 1);
        assert_eq!(cache.lock().marks, per_book);
        // A book taken out takes its marks with it.
        let (current, _) = cache.take_current(std::slice::from_ref(last), &revisions(&ids, 2));
        assert_eq!(current.len(), 1);
        assert_eq!(cache.lock().marks, 0);
    }
}
