//! How the ledger knows which usage ranges it booked, so that a retried range books nothing.
//!
//! A node numbers the calls of each *stream* (its origin, or the node when the range names none;
//! the subject; the currency; the feature) from 0 and reports them in contiguous ranges, one in
//! flight at a time, re-sent unchanged until confirmed. So one number per stream says what was
//! booked: the *mark*, below which every call was booked exactly once. A range below the mark is a
//! retry, a range starting at it is new and moves it. A range apart from the mark (after a gap:
//! a range the ledger rejected and the node dropped; or overlapping it: a client numbering
//! differently) is known by its own key instead, as every range was before marks existed, and the
//! stream is marked `keyed` so that a range at its mark has its key checked too.
//!
//! One row per stream, updated in place, instead of one stored key per range: the ledger reads and
//! writes as many rows per sync as before, but they stay as many as the streams, not the ranges
//! ever booked.

use crate::sync::UsageRange;

/// What the ledger booked of one stream.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct UsageMark {
    /// Every call numbered below it was booked once.
    pub booked_to: u64,
    /// Some range at or above the mark may be booked and known only by its key.
    pub keyed: bool,
}

/// What a stream's mark says of a range.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Check {
    /// Below the mark: booked before (a retry).
    Booked,
    /// At the mark of a stream with no keyed range: not booked yet.
    New,
    /// Only the range's own key can say.
    ByKey,
}

impl UsageMark {
    pub fn check(&self, range: &UsageRange) -> Check {
        if range.to <= self.booked_to {
            Check::Booked
        } else if range.from == self.booked_to && !self.keyed {
            Check::New
        } else {
            Check::ByKey
        }
    }

    /// `range` is booked now (`check` did not say `Booked`): moves the mark if the range starts at
    /// it. `true` if the range lies apart from the mark and its key must be stored.
    pub fn book(&mut self, range: &UsageRange) -> bool {
        if range.from == self.booked_to {
            self.booked_to = range.to;
            false
        } else {
            self.keyed = true;
            true
        }
    }

    /// `range` was found booked by its key: the mark moves over it if it starts there.
    pub fn found(&mut self, range: &UsageRange) {
        if range.from == self.booked_to {
            self.booked_to = range.to;
        }
    }

    /// The mark of a stream whose ranges `from..to` were all booked by key (a ledger that kept
    /// keys only): the ranges that follow each other from 0 make the mark, and any other range
    /// leaves the stream keyed.
    pub fn of_keyed_ranges(mut ranges: Vec<(u64, u64)>) -> Self {
        ranges.sort_unstable();
        let mut mark = UsageMark::default();
        for (from, to) in ranges {
            if from == mark.booked_to {
                mark.booked_to = to;
            } else if to > mark.booked_to {
                mark.keyed = true;
            }
        }
        mark
    }
}

/// The stream and the calls of a range's key, as [`crate::sync::SubjectSync::usage_key`] writes it.
pub fn parse_key(key: &str) -> Option<(&str, u64, u64)> {
    let (stream, calls) = key.rsplit_once('/')?;
    let (from, to) = calls.split_once('-')?;
    Some((stream, from.parse().ok()?, to.parse().ok()?))
}

#[cfg(test)]
#[allow(clippy::arithmetic_side_effects)] // counting calls in tests, on small numbers
mod tests {
    use super::*;
    use crate::book::SettlementMode;
    use crate::money::{Amount, Currency};
    use crate::sync::SubjectSync;
    use proptest::prelude::*;

    fn range(from: u64, to: u64) -> UsageRange {
        UsageRange {
            from,
            to,
            amount: Amount::parse("0.10").unwrap(),
            settlement_mode: SettlementMode::CreditOnly,
            lease_id: None,
            origin: None,
            refunded: Amount::ZERO,
        }
    }

    /// A stream's ranges served in order, each as many times as it is retried: `(check, key to
    /// store)` for each, with the keys stored so far standing in for the ledger's table.
    fn serve(sent: &[(u64, u64)]) -> (UsageMark, Vec<u64>) {
        let (mut mark, mut keys, mut booked) = (UsageMark::default(), Vec::new(), vec![0u64; 64]);
        for &(from, to) in sent {
            let r = range(from, to);
            let seen = match mark.check(&r) {
                Check::Booked => true,
                Check::New => false,
                Check::ByKey => keys.contains(&(from, to)),
            };
            if seen {
                mark.found(&r);
            } else {
                if mark.book(&r) {
                    keys.push((from, to));
                }
                for call in from..to {
                    booked[call as usize] += 1;
                }
            }
        }
        (mark, booked)
    }

    #[test]
    fn ranges_in_order_move_the_mark_and_retries_book_nothing() {
        let (mark, booked) = serve(&[(0, 5), (0, 5), (5, 9), (5, 9), (0, 5), (9, 10)]);
        assert_eq!(mark, UsageMark { booked_to: 10, keyed: false });
        assert!(booked[..10].iter().all(|&n| n == 1));
    }

    #[test]
    fn a_gap_keys_the_stream_and_still_books_each_call_once() {
        // 5..9 was rejected and dropped by the node; 9..12 comes next, then retries of both sides.
        let (mark, booked) = serve(&[(0, 5), (9, 12), (9, 12), (12, 14), (0, 5), (12, 14)]);
        assert_eq!(mark, UsageMark { booked_to: 5, keyed: true });
        assert_eq!(&booked[..14], &[1, 1, 1, 1, 1, 0, 0, 0, 0, 1, 1, 1, 1, 1]);
    }

    #[test]
    fn a_keyed_range_at_the_mark_is_checked_by_its_key() {
        // 5..9 came before 0..5 (out of order): when the mark reaches 5, a retry of 5..9 is found
        // by its key, and the mark moves over it.
        let (mark, booked) = serve(&[(5, 9), (0, 5), (5, 9), (9, 11)]);
        assert_eq!(mark, UsageMark { booked_to: 11, keyed: true });
        assert!(booked[..11].iter().all(|&n| n == 1));
    }

    #[test]
    fn marks_from_keyed_ranges_cover_what_follows_from_zero() {
        assert_eq!(
            UsageMark::of_keyed_ranges(vec![(5, 9), (0, 5), (9, 10)]),
            UsageMark { booked_to: 10, keyed: false }
        );
        assert_eq!(UsageMark::of_keyed_ranges(vec![(0, 5), (7, 9)]), UsageMark { booked_to: 5, keyed: true });
        assert_eq!(UsageMark::of_keyed_ranges(vec![(3, 5)]), UsageMark { booked_to: 0, keyed: true });
        assert_eq!(UsageMark::of_keyed_ranges(vec![(0, 5), (2, 7)]), UsageMark { booked_to: 5, keyed: true });
    }

    proptest! {
        /// Whatever order and however often a stream's ranges arrive (some dropped), each call
        /// of each range that arrived is booked exactly once, and none that never arrived.
        #[test]
        fn every_call_that_arrived_is_booked_once(
            cuts in proptest::collection::btree_set(1u64..60, 1..12),
            order in proptest::collection::vec((0usize..12, any::<bool>()), 1..40),
        ) {
            let mut bounds = vec![0u64];
            bounds.extend(cuts);
            let ranges: Vec<(u64, u64)> = bounds.windows(2).map(|w| (w[0], w[1])).collect();
            let sent: Vec<(u64, u64)> = order
                .iter()
                .filter(|(_, keep)| *keep)
                .map(|(i, _)| ranges[i % ranges.len()])
                .collect();
            let (_, booked) = serve(&sent);
            for (from, to) in &ranges {
                let expect = u64::from(sent.contains(&(*from, *to)));
                for call in *from..*to {
                    prop_assert_eq!(booked[call as usize], expect, "call {} of {}..{}", call, from, to);
                }
            }
        }

        #[test]
        fn keys_parse_back_to_their_stream_and_calls(
            origin in "[a-z0-9]{1,16}",
            subject in "[ -~]{1,40}",
            from in 0u64..u64::MAX / 2,
            calls in 1u64..1000,
        ) {
            let mut s = SubjectSync {
                subject,
                currency: Currency::parse("USD").unwrap(),
                feature_key: None,
                usage: Some(range(from, from + calls)),
                lease: None,
            };
            s.usage.as_mut().unwrap().origin = Some(origin);
            let key = s.usage_key("node").unwrap();
            let stream = s.usage_stream("node").unwrap();
            prop_assert_eq!(parse_key(&key), Some((stream.as_str(), from, from + calls)));
        }
    }
}
