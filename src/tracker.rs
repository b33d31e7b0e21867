//! The customers one worker keeps in sync, where its last sync stopped going round them, whom a
//! failed sync left to send again, and what it last saw of their entries (to notice the host
//! evicting one).

use std::hash::RandomState;

use indexmap::IndexMap;
use rustc_hash::FxHashSet;

/// The customers one worker keeps in sync, in the order it first met them.
#[derive(Debug, Default)]
pub struct Tracker {
    /// Hashed, not a search tree: every call looks its customer up twice (let through, completed)
    /// and every tick each registered one, and with 10,000 customers a tree's string comparisons
    /// were a tenth of a call's Wasm time (`bench/abi.mjs`). SipHash with random keys, not Fx: the
    /// map grows with the subjects clients send, so none may choose colliding ones.
    subjects: IndexMap<String, Seen, RandomState>,
    /// Where the next tick starts going round them: a sync holds at most `MAX_SUBJECTS_PER_SYNC`
    /// subjects, so a worker with more customers goes round them over several ticks instead of
    /// always syncing the first ones.
    next: usize,
    /// Customers a failed sync held, in the order it held them: the next tick sends them first,
    /// so one failed sync costs them a tick, not a turn (`sync::turn_bound_ms` counts on it).
    again: Vec<String>,
    /// The customers the last tick sent again: a failed sync that held them leaves them to their
    /// turn, so a ledger that keeps failing a sync does not hold up everyone else's.
    sent_again: FxHashSet<String>,
}

/// What a worker knows of one customer's entries.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Seen {
    /// When this worker last served a call of the customer.
    pub at_ms: u64,
    /// Per scope, the origin of the entry as last seen here (0: not seen).
    origins: Vec<u64>,
    /// The last tick found usage to report or a lease in the entries …
    pending: bool,
    /// … at this instant.
    found_ms: u64,
}

impl Seen {
    /// Could an entry of this customer have held something not yet booked when it went away:
    /// pending at the last tick, or calls served here since?
    fn owed(&self) -> bool {
        self.pending || self.at_ms >= self.found_ms
    }

    /// Notes `origin` for scope `i`; `true` if it replaces another while something was owed.
    fn note(&mut self, i: usize, origin: Option<u64>, owed: bool) -> bool {
        if self.origins.len() <= i {
            self.origins.resize(i + 1, 0);
        }
        let before = std::mem::replace(&mut self.origins[i], origin.unwrap_or(0));
        before != 0 && origin != Some(before) && owed
    }
}

impl Tracker {
    pub fn touch(&mut self, subject: &str, now_ms: u64) {
        match self.subjects.get_mut(subject) {
            Some(t) => t.at_ms = now_ms,
            None => {
                self.subjects.insert(subject.to_owned(), Seen { at_ms: now_ms, ..Seen::default() });
            }
        }
    }

    /// A call of `subject` was let through, held in entries of `origins` (per scope, 0: none).
    /// Returns how many of them replaced an entry this worker had seen that still owed something:
    /// the host evicted it.
    pub fn served(&mut self, subject: &str, now_ms: u64, origins: impl Iterator<Item = u64>) -> u64 {
        let seen = match self.subjects.get_mut(subject) {
            Some(seen) => seen,
            None => self.subjects.entry(subject.to_owned()).or_default(),
        };
        // Owed before this call: pending at the last tick, or served since.
        let owed = seen.owed();
        seen.at_ms = now_ms;
        let mut evicted = 0;
        for (i, origin) in origins.enumerate().filter(|(_, o)| *o != 0) {
            evicted += u64::from(seen.note(i, Some(origin), owed));
        }
        evicted
    }

    /// What a tick found of `subject`'s entries (per scope; `None`: no entry) and whether they
    /// owe anything. Returns how many entries that owed something are gone or rebuilt.
    pub(crate) fn found(&mut self, subject: &str, origins: &[Option<u64>], pending: bool, now_ms: u64) -> u64 {
        let Some(seen) = self.subjects.get_mut(subject) else { return 0 };
        let owed = seen.owed();
        let evicted = origins.iter().enumerate().map(|(i, o)| u64::from(seen.note(i, *o, owed))).sum();
        seen.pending = pending;
        seen.found_ms = now_ms;
        evicted
    }

    /// Every customer once, starting where the last tick stopped.
    pub(crate) fn in_turn(&self) -> impl Iterator<Item = &String> {
        let start = if self.next < self.subjects.len() { self.next } else { 0 };
        let (until, after) = self.subjects.as_slice().split_at(start);
        after.keys().chain(until.keys())
    }

    /// The tick took the first `taken` customers of its turn: the next one starts after them
    /// (where this one did if it took none: customers it sent again filled it).
    pub(crate) fn turn_took(&mut self, taken: usize) {
        let start = if self.next < self.subjects.len() { self.next } else { 0 };
        self.next = (start + taken) % self.subjects.len().max(1);
    }

    /// A sync that held `subjects` failed: the next tick sends them again, unless this one
    /// already did.
    pub(crate) fn failed<'s>(&mut self, subjects: impl Iterator<Item = &'s str>) {
        for subject in subjects {
            // A customer's scopes follow one another in a sync.
            if self.again.last().map(String::as_str) != Some(subject) && !self.sent_again.contains(subject) {
                self.again.push(subject.to_owned());
            }
        }
    }

    /// The customers to send again this tick; they are left out of its turn (`in_turn`).
    pub(crate) fn take_again(&mut self) -> Vec<String> {
        let again = std::mem::take(&mut self.again);
        self.sent_again = again.iter().cloned().collect();
        again
    }

    /// Customers to send again that this tick had no room for: the next tick sends them.
    pub(crate) fn not_sent_again(&mut self, subjects: &[String]) {
        for subject in subjects {
            self.sent_again.remove(subject);
        }
        self.again.extend_from_slice(subjects);
    }

    /// Is `subject` sent again this tick (and so not in its turn)?
    pub(crate) fn is_sent_again(&self, subject: &str) -> bool {
        !self.sent_again.is_empty() && self.sent_again.contains(subject)
    }

    /// Stops keeping `gone` in sync, in one pass; the turn goes on where it was.
    pub(crate) fn forget(&mut self, gone: &FxHashSet<&str>) {
        if gone.is_empty() {
            return;
        }
        let (mut index, before, mut next) = (0, self.next, self.next);
        self.subjects.retain(|subject, _| {
            let keep = !gone.contains(subject.as_str());
            if !keep && index < before {
                next -= 1;
            }
            index += 1;
            keep
        });
        self.next = next;
    }

    /// Starts keeping a customer in sync (an instance that lost its tracker picks it up again).
    pub fn touch_if_absent(&mut self, subject: &str, now_ms: u64) {
        if !self.subjects.contains_key(subject) {
            self.subjects.insert(subject.to_owned(), Seen { at_ms: now_ms, ..Seen::default() });
        }
    }

    pub fn len(&self) -> usize {
        self.subjects.len()
    }

    pub fn is_empty(&self) -> bool {
        self.subjects.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn turn(t: &Tracker) -> Vec<&str> {
        t.in_turn().map(String::as_str).collect()
    }

    #[test]
    fn a_turn_goes_on_where_the_last_stopped_whoever_was_forgotten() {
        let mut t = Tracker::default();
        for s in ["a", "b", "c", "d", "e"] {
            t.touch(s, 1);
        }
        assert_eq!(turn(&t), ["a", "b", "c", "d", "e"], "in the order first met");
        t.turn_took(2);
        assert_eq!(turn(&t), ["c", "d", "e", "a", "b"]);
        // One forgotten before the turn's place, one after: the turn still starts at c.
        t.forget(&["a", "d"].into_iter().collect());
        assert_eq!(turn(&t), ["c", "e", "b"]);
        t.turn_took(2);
        assert_eq!(turn(&t), ["b", "c", "e"], "round the end to the start");
        // The one the turn starts at forgotten: the next one starts it.
        t.forget(&["b"].into_iter().collect());
        assert_eq!(turn(&t), ["c", "e"]);
        t.turn_took(1);
        t.turn_took(0);
        assert_eq!(turn(&t), ["e", "c"], "a tick that took nobody: the next starts where it did");
        t.forget(&["c", "e"].into_iter().collect());
        assert!(turn(&t).is_empty() && t.is_empty());
        t.turn_took(0);
    }

    #[test]
    fn an_entry_gone_or_rebuilt_while_it_owed_something_counts_as_evicted() {
        let mut t = Tracker::default();
        assert_eq!(t.served("alice", 10, [5].into_iter()), 0, "first seen");
        assert_eq!(t.found("alice", &[Some(5)], true, 20), 0);
        assert_eq!(t.found("alice", &[None], true, 30), 1, "gone while it had usage to report");
        assert_eq!(t.served("alice", 40, [6].into_iter()), 0, "rebuilt: first seen again");
        assert_eq!(t.found("alice", &[Some(6)], false, 50), 0);
        // Nothing owed and no call since: an idle entry deleted by another worker is no loss.
        assert_eq!(t.found("alice", &[None], false, 60), 0);
        assert_eq!(t.served("alice", 70, [7].into_iter()), 0);
        // A call since the last tick, then another incarnation: what that call spent may be lost.
        assert_eq!(t.served("alice", 80, [8].into_iter()), 1);
    }
}
