//! The customers one worker keeps in sync, and where its last sync stopped going round them.

use std::collections::BTreeMap;
use std::ops::Bound;

/// The customers one worker keeps in sync, with when each was last used here.
#[derive(Debug, Default)]
pub struct Tracker {
    pub(crate) subjects: BTreeMap<String, u64>,
    /// Where the last tick stopped: a sync holds at most `MAX_SUBJECTS_PER_SYNC` subjects, so a
    /// worker with more customers goes round them over several ticks instead of always syncing
    /// the first ones.
    pub(crate) resume_after: Option<String>,
}

impl Tracker {
    pub fn touch(&mut self, subject: &str, now_ms: u64) {
        match self.subjects.get_mut(subject) {
            Some(t) => *t = now_ms,
            None => {
                self.subjects.insert(subject.to_owned(), now_ms);
            }
        }
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
            self.subjects.insert(subject.to_owned(), now_ms);
        }
    }

    pub fn len(&self) -> usize {
        self.subjects.len()
    }

    pub fn is_empty(&self) -> bool {
        self.subjects.is_empty()
    }
}
