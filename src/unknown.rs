//! Subjects the ledger said it has no customer for, remembered by each worker in its own memory
//! for `sync.unknown_ttl_ms`: their calls are refused without a round trip, and a flood of
//! made-up subjects never reaches shared data, where it would push real customers' entries (and
//! their unreported usage) out of a full Kong zone.

use std::collections::{HashMap, VecDeque};

/// Subjects remembered per worker; beyond this the oldest is forgotten (its next call asks the
/// ledger again).
pub const MAX_UNKNOWN_SUBJECTS: usize = 1_000;

#[derive(Debug, Default)]
pub struct UnknownSubjects {
    /// Subject → until when it is taken as unknown.
    until_ms: HashMap<String, u64>,
    /// Subjects in the order they were learnt (a subject learnt again appears twice).
    order: VecDeque<String>,
}

impl UnknownSubjects {
    /// The ledger answered that `subject` is no customer of its.
    pub fn learn(&mut self, subject: &str, until_ms: u64) {
        if self.until_ms.insert(subject.to_owned(), until_ms).is_none() {
            self.order.push_back(subject.to_owned());
        }
        while self.until_ms.len() > MAX_UNKNOWN_SUBJECTS {
            if let Some(oldest) = self.order.pop_front() {
                self.until_ms.remove(&oldest);
            }
        }
    }

    /// Is `subject` to be refused as unknown now? After the TTL, only while the ledger cannot be
    /// asked again.
    pub fn refuses(&mut self, subject: &str, now_ms: u64, ledger_reachable: bool) -> bool {
        match self.until_ms.get(subject) {
            Some(&until) if now_ms < until || !ledger_reachable => true,
            Some(_) => {
                self.until_ms.remove(subject);
                self.order.retain(|s| s != subject);
                false
            }
            None => false,
        }
    }

    pub fn len(&self) -> usize {
        self.until_ms.len()
    }

    pub fn is_empty(&self) -> bool {
        self.until_ms.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unknown_subjects_are_refused_until_the_answer_expires() {
        let mut u = UnknownSubjects::default();
        u.learn("mallory", 100);
        assert!(u.refuses("mallory", 50, true));
        assert!(u.refuses("mallory", 500, false), "the ledger cannot be asked: still refused");
        assert!(!u.refuses("mallory", 500, true), "expired: ask again");
        assert!(u.is_empty());
    }

    #[test]
    fn a_flood_of_subjects_is_bounded() {
        let mut u = UnknownSubjects::default();
        for i in 0..3 * MAX_UNKNOWN_SUBJECTS {
            u.learn(&format!("made-up-{i}"), 1_000);
        }
        assert_eq!(u.len(), MAX_UNKNOWN_SUBJECTS);
        assert!(u.refuses(&format!("made-up-{}", 3 * MAX_UNKNOWN_SUBJECTS - 1), 1, true), "the newest kept");
        assert!(!u.refuses("made-up-0", 1, true), "the oldest forgotten");
    }
}
