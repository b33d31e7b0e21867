//! The customers one worker keeps in sync, where its last sync stopped going round them, and
//! what it last saw of their entries (to notice the host evicting one).

use std::collections::BTreeMap;
use std::ops::Bound;

/// The customers one worker keeps in sync.
#[derive(Debug, Default)]
pub struct Tracker {
    pub(crate) subjects: BTreeMap<String, Seen>,
    /// Where the last tick stopped: a sync holds at most `MAX_SUBJECTS_PER_SYNC` subjects, so a
    /// worker with more customers goes round them over several ticks instead of always syncing
    /// the first ones.
    pub(crate) resume_after: Option<String>,
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

    /// Every customer once, starting after the one the last tick stopped at.
    pub(crate) fn in_turn(&self) -> Vec<&String> {
        match &self.resume_after {
            Some(last) => {
                let after = self.subjects.range::<String, _>((Bound::Excluded(last), Bound::Unbounded));
                let until = self.subjects.range::<String, _>((Bound::Unbounded, Bound::Included(last)));
                after.chain(until).map(|(s, _)| s).collect()
            }
            None => self.subjects.keys().collect(),
        }
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
