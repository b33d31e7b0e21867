//! The ledger as the credit model alone: `credits::gateway::serve` over an in-memory book, with
//! the store's facts (seen usage keys, lease sequence numbers) kept in maps. No I/O, so the
//! proptest run can afford many cases and shrink a failure to a short one.

use std::collections::{BTreeMap, BTreeSet};

use chrono::{DateTime, Utc};
use credits::gateway::{self, Facts, LeaseFacts};
use credits::sync::{SubjectAnswer, SubjectOutcome, SyncRequest, SyncResponse};
use credits::{
    Account, Amount, Book, Currency, Entry, FeatureFilter, FundingMethod, Grant, GrantId, GrantSpec, HoldId,
    IsoDuration, MovementKind, Priority,
};

use super::backend::{at, iso_ms, parse_range_key, Books, GrantPlan, Ledger};

pub struct ModelLedger {
    subject: String,
    book: Book,
    journal: Vec<Entry>,
    seen: BTreeSet<String>,
    last_seq: BTreeMap<String, i64>,
    revision: i64,
}

impl ModelLedger {
    pub fn new(subject: &str, price: Amount, grants: &[GrantPlan], now: DateTime<Utc>) -> ModelLedger {
        let mut book = Book::new();
        let mut journal = Vec::new();
        for (seq, plan) in grants.iter().enumerate() {
            let spec = GrantSpec {
                currency: Currency::parse("USD").unwrap(),
                amount: price.times(plan.calls).unwrap(),
                funding_method: FundingMethod::None,
                purchase: None,
                priority: Priority::new(plan.priority).unwrap(),
                effective_at: Some(at(plan.effective_ms)),
                expires_after: plan.expires_after_ms.map(|ms| IsoDuration::parse(&iso_ms(ms)).unwrap()),
                features: FeatureFilter::unrestricted(),
            };
            let grant = Grant::new(spec, GrantId(format!("g{seq}")), now, seq as i64).unwrap();
            journal.extend(book.add_grant(grant, now).unwrap());
        }
        ModelLedger {
            subject: subject.to_owned(),
            book,
            journal,
            seen: BTreeSet::new(),
            last_seq: BTreeMap::new(),
            revision: 0,
        }
    }
}

impl Ledger for ModelLedger {
    fn serve(&mut self, request: &SyncRequest, now: DateTime<Utc>) -> Option<SyncResponse> {
        let subjects = request
            .subjects
            .iter()
            .map(|s| {
                let outcome = if s.subject != self.subject {
                    SubjectOutcome::UnknownSubject
                } else if let Some(reason) = gateway::invalid(s) {
                    SubjectOutcome::Rejected { reason }
                } else {
                    let key = s.usage_key(&request.node);
                    let facts = Facts {
                        usage_seen: key.as_ref().is_some_and(|k| self.seen.contains(k)),
                        lease: s.lease.as_ref().and_then(|l| {
                            self.last_seq.get(&l.lease_id).map(|seq| LeaseFacts {
                                owned_by_this_customer: true,
                                closed: self.book.hold(&HoldId(l.lease_id.clone())).is_none_or(|h| h.released),
                                last_seq: *seq,
                            })
                        }),
                        // Ids need only be unique in the model's one book.
                        refund_id: key.clone().map(|k| GrantId(format!("refund:{k}"))),
                    };
                    let served = gateway::try_serve(&mut self.book, s, &facts, now).unwrap();
                    if let (true, Some(key)) = (served.record_usage, key) {
                        self.seen.insert(key);
                    }
                    if let (Some(l), Some(seq)) = (&s.lease, served.lease_seq) {
                        self.last_seq.insert(l.lease_id.clone(), seq);
                    }
                    self.journal.extend(served.entries);
                    self.revision += 1;
                    SubjectOutcome::Ok {
                        customer_id: "c".into(),
                        usage: served.usage,
                        live: served.live,
                        revision: self.revision,
                        lease: served.lease,
                    }
                };
                SubjectAnswer { subject: s.subject.clone(), outcome }
            })
            .collect();
        Some(SyncResponse { server_time: now, subjects })
    }

    fn job(&mut self, now: DateTime<Utc>) {
        let entries = self.book.try_advance(now).unwrap();
        self.journal.extend(entries);
        self.book.expire_holds(now);
    }

    /// Memory is this ledger's store: a restart loses nothing.
    fn restart(&mut self) {}

    fn grant_id(&self, index: usize) -> Option<GrantId> {
        self.book.grants().get(index).map(|g| g.grant.id.clone())
    }

    fn void(&mut self, grant: &GrantId, now: DateTime<Utc>) {
        let entries = self.book.void(grant, now).unwrap();
        self.journal.extend(entries);
        self.revision += 1;
    }

    fn books(&mut self) -> Books {
        let mut booked: BTreeMap<String, Vec<(u64, u64)>> = BTreeMap::new();
        for (node, from, to) in self.seen.iter().filter_map(|k| parse_range_key(k)) {
            booked.entry(node).or_default().push((from, to));
        }
        let mut consumed = Amount::ZERO;
        let mut refunded = Amount::ZERO;
        let mut credit_account = Amount::ZERO;
        let mut problems = Vec::new();
        for (i, entry) in self.journal.iter().enumerate() {
            if let Entry::Movement(m) = entry {
                match m.kind {
                    MovementKind::Consumed => consumed -= m.amount,
                    // The one adjustment a sync books: credit given back.
                    MovementKind::Adjusted => refunded += m.amount,
                    _ => {}
                }
            }
            let sum: Amount = entry.postings().iter().map(|p| p.amount).sum();
            if !sum.is_zero() {
                problems.push(format!("entry {i}: postings sum to {sum}"));
            }
            credit_account += entry
                .postings()
                .iter()
                .filter(|p| p.account == Account::CustomerCredit)
                .map(|p| p.amount)
                .sum::<Amount>();
        }
        // The journal so far must equal the book's settled balance at its own clock.
        let settled =
            self.book.try_balances(self.book.clock(), None).unwrap().first().map_or(Amount::ZERO, |b| b.settled);
        if credit_account != settled {
            problems.push(format!("credit account {credit_account} != settled balance {settled}"));
        }
        Books { book: self.book.clone(), consumed, refunded, booked, problems }
    }
}
