//! Property tests: random sequences of grants, charges, usage, holds, voids, expiries and time.

mod common;

use chrono::{DateTime, TimeDelta, Utc};
use common::*;
use credits::journal::{account_balances, check_postings};
use credits::*;
use proptest::prelude::*;

#[derive(Clone, Debug)]
enum Op {
    Grant { priority: i64, cents: u32, starts_in_hours: u32, lasts_hours: Option<u32>, features: u8 },
    Charge { cents: u32, feature: u8, then_invoice: bool },
    Usage { cents: u32, feature: u8 },
    Hold { cents: u32, feature: u8, lasts_hours: u32 },
    Capture { hold: usize, cents: u32, feature: u8 },
    Release { hold: usize },
    Void { grant: usize },
    Adjust { cents: i32 },
}

const FEATURES: [&str; 2] = ["input_tokens", "output_tokens"];

fn feature_of(choice: u8) -> Option<FeatureKey> {
    match choice % 3 {
        0 => None,
        n => Some(feature(FEATURES[usize::from(n - 1)])),
    }
}

fn filter_of(choice: u8) -> FeatureFilter {
    match choice % 4 {
        0 => FeatureFilter::unrestricted(),
        1 => FeatureFilter::only(vec![feature(FEATURES[0])]),
        2 => FeatureFilter::only(vec![feature(FEATURES[1])]),
        _ => FeatureFilter::only(vec![feature(FEATURES[0]), feature(FEATURES[1])]),
    }
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        3 => (1i64..4, 1u32..5000, 0u32..48, proptest::option::of(1u32..96), 0u8..4)
            .prop_map(|(priority, cents, starts_in_hours, lasts_hours, features)| Op::Grant { priority, cents, starts_in_hours, lasts_hours, features }),
        4 => (1u32..3000, 0u8..3, any::<bool>()).prop_map(|(cents, feature, then_invoice)| Op::Charge { cents, feature, then_invoice }),
        1 => (1u32..3000, 0u8..3).prop_map(|(cents, feature)| Op::Usage { cents, feature }),
        2 => (1u32..3000, 0u8..3, 1u32..24).prop_map(|(cents, feature, lasts_hours)| Op::Hold { cents, feature, lasts_hours }),
        2 => (0usize..8, 1u32..3000, 0u8..3).prop_map(|(hold, cents, feature)| Op::Capture { hold, cents, feature }),
        1 => (0usize..8).prop_map(|hold| Op::Release { hold }),
        1 => (0usize..8).prop_map(|grant| Op::Void { grant }),
        1 => (-2000i32..2000).prop_map(|cents| Op::Adjust { cents }),
    ]
}

/// `PROPTEST_CASES` if set (proptest reads it only where a test sets no count of its own).
fn cases(default: u32) -> u32 {
    std::env::var("PROPTEST_CASES").ok().and_then(|n| n.parse().ok()).unwrap_or(default)
}

fn cents(n: impl Into<i64>) -> Amount {
    Amount::new(rust_decimal::Decimal::new(n.into(), 2))
}

struct World {
    book: Book,
    journal: Vec<Entry>,
    grants: Vec<Grant>,
    holds: Vec<HoldId>,
    now: DateTime<Utc>,
    after_the_fact: bool,
    held: bool,
}

impl World {
    fn grant_features(&self, id: &GrantId) -> Option<&FeatureFilter> {
        self.grants.iter().find(|g| &g.id == id).map(|g| &g.features)
    }

    fn apply(&mut self, op: &Op) -> Result<(), TestCaseError> {
        let before = self.book.clone();
        let entries = match op {
            Op::Grant { priority, cents: c, starts_in_hours, lasts_hours, features } => {
                let spec = GrantSpec {
                    currency: usd(),
                    amount: cents(*c),
                    funding_method: FundingMethod::None,
                    purchase: None,
                    priority: Priority::new(*priority).unwrap(),
                    effective_at: Some(self.now + TimeDelta::hours(i64::from(*starts_in_hours))),
                    expires_after: lasts_hours.map(|h| IsoDuration::parse(&format!("PT{h}H")).unwrap()),
                    features: filter_of(*features),
                };
                let g =
                    Grant::new(spec, GrantId(format!("g{}", self.grants.len())), self.now, self.grants.len() as i64)
                        .unwrap();
                self.grants.push(g.clone());
                self.book.add_grant(g, self.now).unwrap()
            }
            Op::Charge { cents: c, feature: f, then_invoice } => {
                let mode = if *then_invoice { SettlementMode::CreditThenInvoice } else { SettlementMode::CreditOnly };
                let spend = Spend { currency: usd(), amount: cents(*c), feature: feature_of(*f), mode };
                let available = self.book.clone().try_balances(self.now, None).unwrap();
                match self.book.charge(&spend, self.now) {
                    Ok(out) => {
                        self.check_order(&before, &spend, &out)?;
                        out.entries
                    }
                    Err(ChargeError::Model(e)) => return Err(TestCaseError::fail(format!("charge: {e}"))),
                    Err(ChargeError::NotCovered(refusal)) => {
                        prop_assert_eq!(mode, SettlementMode::CreditOnly);
                        prop_assert!(refusal.available < spend.amount);
                        prop_assert_eq!(&self.book, &before, "a refused charge changes nothing");
                        let _ = available;
                        Vec::new()
                    }
                }
            }
            Op::Usage { cents: c, feature: f } => {
                self.after_the_fact = true;
                let spend = Spend {
                    currency: usd(),
                    amount: cents(*c),
                    feature: feature_of(*f),
                    mode: SettlementMode::CreditOnly,
                };
                let out = self.book.book_usage(&spend, self.now).unwrap();
                let drawn: Amount = out.consumed.iter().map(|(_, a)| *a).sum();
                prop_assert_eq!(drawn + out.uncovered, spend.amount, "usage is booked in full");
                out.entries
            }
            Op::Hold { cents: c, feature: f, lasts_hours } => {
                self.held = true;
                let id = HoldId(format!("h{}", self.holds.len()));
                self.holds.push(id.clone());
                let expires = self.now + TimeDelta::hours(i64::from(*lasts_hours));
                let available = self.book.clone().available_after_advance(usd(), feature_of(*f).as_ref(), self.now);
                let (granted, entries) =
                    self.book.place_hold(id, usd(), feature_of(*f), cents(*c), expires, self.now).unwrap();
                prop_assert!(granted <= cents(*c) && granted <= available && !granted.is_negative());
                entries
            }
            Op::Capture { hold, cents: c, feature: f } => match self.holds.get(*hold).cloned() {
                Some(id) => {
                    self.after_the_fact = true;
                    let f = self.book.hold(&id).and_then(|h| h.feature.clone()).or(feature_of(*f));
                    let spend =
                        Spend { currency: usd(), amount: cents(*c), feature: f, mode: SettlementMode::CreditOnly };
                    self.book.capture(&id, &spend, self.now).unwrap().entries
                }
                None => Vec::new(),
            },
            Op::Release { hold } => {
                if let Some(id) = self.holds.get(*hold) {
                    self.book.release_hold(id).unwrap();
                }
                Vec::new()
            }
            Op::Void { grant } => match self.grants.get(*grant).map(|g| g.id.clone()) {
                Some(id) => self.book.void(&id, self.now).unwrap(),
                None => Vec::new(),
            },
            Op::Adjust { cents: c } => {
                if *c < 0 {
                    self.after_the_fact = true;
                }
                let grant = (*c > 0).then(|| {
                    let spec = GrantSpec {
                        currency: usd(),
                        amount: cents(*c),
                        funding_method: FundingMethod::None,
                        purchase: None,
                        priority: Priority::DEFAULT,
                        effective_at: Some(self.now),
                        expires_after: None,
                        features: FeatureFilter::unrestricted(),
                    };
                    Grant::new(spec, GrantId(format!("g{}", self.grants.len())), self.now, self.grants.len() as i64)
                        .unwrap()
                });
                if let Some(g) = &grant {
                    self.grants.push(g.clone());
                }
                self.book.adjust(usd(), cents(*c), grant, self.now).unwrap()
            }
        };
        self.check_eligibility(&before, &entries)?;
        self.journal.extend(entries);
        self.check_invariants()
    }

    /// Nothing is drawn from an ineligible, expired, voided or not-yet-effective grant.
    fn check_eligibility(&self, before: &Book, entries: &[Entry]) -> Result<(), TestCaseError> {
        for e in entries {
            if let Entry::Movement(m) = e {
                if m.kind == MovementKind::Consumed {
                    if let Some(id) = &m.grant_id {
                        let g = self.book.grant(id).unwrap();
                        prop_assert!(
                            g.grant.features.admits(m.feature.as_ref()),
                            "drawn from a grant restricted to other features"
                        );
                        prop_assert!(g.grant.effective_at <= m.booked_at, "drawn before the grant was effective");
                        prop_assert!(g.grant.expires_at.is_none_or(|x| m.booked_at < x), "drawn from an expired grant");
                        prop_assert!(
                            before.grant(id).is_none_or(|b| b.grant.voided_at.is_none()),
                            "drawn from a voided grant"
                        );
                    }
                }
            }
        }
        Ok(())
    }

    /// Draw-down order: no grant that the order puts before a drawn one still has free credit.
    fn check_order(&self, before: &Book, spend: &Spend, out: &SpendOutcome) -> Result<(), TestCaseError> {
        let keys: Vec<_> =
            out.consumed.iter().map(|(id, _)| self.book.grant(id).unwrap().grant.draw_down_key()).collect();
        prop_assert!(keys.windows(2).all(|w| w[0] < w[1]), "consumed out of order");
        if self.held {
            return Ok(()); // with holds, credit can be eligible yet set aside
        }
        if let Some(last) = keys.last() {
            for g in self.book.grants() {
                let was_eligible = before.grant(&g.grant.id).is_some()
                    && g.funded
                    && g.grant.admits(spend.currency, spend.feature.as_ref(), self.book.clock());
                if was_eligible && g.grant.draw_down_key() < *last {
                    prop_assert!(g.remaining().unwrap().is_zero(), "grant {} skipped while it had credit", g.grant.id);
                }
            }
        }
        Ok(())
    }

    fn check_invariants(&self) -> Result<(), TestCaseError> {
        // Postings sum to zero per currency.
        prop_assert!(check_postings(self.journal.iter().map(Entry::postings)).unwrap().is_empty());
        // The settled balance equals the sum of movements, in every scope, and the credit
        // account of the double entry equals it too.
        for scope in [
            None,
            Some(FeatureScope::Eq(feature(FEATURES[0]))),
            Some(FeatureScope::Neq(feature(FEATURES[0]))),
            Some(FeatureScope::Contains("put".into())),
        ] {
            let from_book = self
                .book
                .try_balances(self.book.clock(), scope.as_ref())
                .unwrap()
                .into_iter()
                .find(|b| b.currency == usd())
                .map(|b| b.settled)
                .unwrap_or_default();
            let from_journal = credits::history::settled_at(
                self.journal.iter(),
                |id| self.grant_features(id),
                usd(),
                self.book.clock(),
                scope.as_ref(),
            )
            .unwrap();
            prop_assert_eq!(from_book, from_journal, "scope {:?}", scope);
        }
        let credit_account = account_balances(self.journal.iter().flat_map(|e| e.postings().iter()))
            .unwrap()
            .get(&(Account::CustomerCredit, usd()))
            .copied()
            .unwrap_or_default();
        let movements: Amount = self
            .journal
            .iter()
            .filter_map(|e| match e {
                Entry::Movement(m) => Some(m.amount),
                _ => None,
            })
            .sum();
        prop_assert_eq!(credit_account, movements);
        for g in self.book.grants() {
            // No grant goes below zero.
            prop_assert!(!g.remaining().unwrap().is_negative(), "grant {} below zero", g.grant.id);
            // Expiry never removes consumed credit: what the grant paid for stays paid.
            let paid: Amount = self
                .journal
                .iter()
                .map(|e| match e {
                    Entry::Movement(m)
                        if m.grant_id.as_ref() == Some(&g.grant.id)
                            && matches!(m.kind, MovementKind::Consumed | MovementKind::Adjusted)
                            && m.amount.is_negative() =>
                    {
                        -m.amount
                    }
                    Entry::DebtCovered { grant_id, amount, .. } if grant_id == &g.grant.id => *amount,
                    _ => Amount::ZERO,
                })
                .sum();
            prop_assert_eq!(paid, g.used);
            let expired: Amount = self
                .journal
                .iter()
                .map(|e| match e {
                    Entry::Movement(m)
                        if m.grant_id.as_ref() == Some(&g.grant.id) && m.kind == MovementKind::Expired =>
                    {
                        -m.amount
                    }
                    _ => Amount::ZERO,
                })
                .sum();
            prop_assert_eq!(expired, g.expired);
            prop_assert!(g.used + g.expired + g.voided <= g.grant.amount);
        }
        // credit_only charges alone never take the balance below zero.
        if !self.after_the_fact {
            prop_assert!(self.book.debts().is_empty());
            prop_assert!(!settled(&self.book, self.book.clock()).is_negative());
        }
        Ok(())
    }
}

/// `journal` with each entry folded into the one before it where [`Entry::absorb`] merges them.
fn folded(journal: Vec<Entry>) -> Vec<Entry> {
    let mut out: Vec<Entry> = Vec::with_capacity(journal.len());
    for entry in journal {
        if !out.last_mut().is_some_and(|last| last.absorb(&entry)) {
            out.push(entry);
        }
    }
    out
}

trait AvailableAfterAdvance {
    fn available_after_advance(self, currency: Currency, feature: Option<&FeatureKey>, at: DateTime<Utc>) -> Amount;
}

impl AvailableAfterAdvance for Book {
    fn available_after_advance(
        mut self,
        currency: Currency,
        feature: Option<&FeatureKey>,
        at: DateTime<Utc>,
    ) -> Amount {
        self.try_advance(at).unwrap();
        self.available(currency, feature, at).unwrap()
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: cases(256), failure_persistence: None, ..ProptestConfig::default() })]

    /// Also with the journal's usage folded as the ledger books a transaction's ranges
    /// ([`Entry::absorb`]): every invariant holds of it too. (Operations often share an instant,
    /// so that there is usage to fold.)
    #[test]
    fn random_operations_keep_every_invariant(ops in proptest::collection::vec((op(), prop_oneof![Just(0u32), 0u32..30]), 1..40)) {
        let mut world = World { book: Book::new(), journal: Vec::new(), grants: Vec::new(), holds: Vec::new(), now: t(0), after_the_fact: false, held: false };
        for (op, hours) in &ops {
            world.now += TimeDelta::hours(i64::from(*hours));
            world.apply(op)?;
        }
        // Everything expires eventually; what remains afterwards is never-expiring credit only.
        world.now += TimeDelta::days(400);
        let entries = world.book.try_advance(world.now).unwrap();
        world.journal.extend(entries);
        world.check_invariants()?;
        let entries = world.journal.len();
        world.journal = folded(std::mem::take(&mut world.journal));
        prop_assert!(world.journal.len() <= entries);
        world.check_invariants()?;
    }

    /// Folding merges only what it may: two consumptions of one grant at one instant, the second
    /// continuing the first's balance, become one with their sums; anything else stays apart.
    #[test]
    fn absorb_merges_only_continued_usage(cents_a in 1u32..5000, cents_b in 1u32..5000, same_grant: bool, same_instant: bool, continued: bool) {
        let consumed = |grant: &str, amount: Amount, before: Amount, at: DateTime<Utc>| Entry::Movement(Movement {
            kind: MovementKind::Consumed,
            amount: amount.negated(),
            currency: usd(),
            grant_id: Some(GrantId(grant.into())),
            feature: None,
            balance_before: before,
            balance_after: before - amount,
            booked_at: at,
            postings: journal::postings_for(MovementKind::Consumed, None, usd(), amount.negated()),
        });
        let start = cents(100_000);
        let first = consumed("a", cents(cents_a), start, t(0));
        let second = consumed(
            if same_grant { "a" } else { "b" },
            cents(cents_b),
            if continued { start - cents(cents_a) } else { start },
            if same_instant { t(0) } else { t(1) },
        );
        let mut merged = first.clone();
        let absorbed = merged.absorb(&second);
        prop_assert_eq!(absorbed, same_grant && same_instant && continued);
        if absorbed {
            prop_assert_eq!(merged, consumed("a", cents(cents_a) + cents(cents_b), start, t(0)));
        } else {
            prop_assert_eq!(merged, first);
        }
    }

    #[test]
    fn credit_only_charges_never_overdraw(charges in proptest::collection::vec((1u32..2000, 0u8..3), 1..60), grants in proptest::collection::vec((1i64..4, 1u32..5000, 0u8..4), 1..6)) {
        let mut book = Book::new();
        for (i, (priority, c, f)) in grants.iter().enumerate() {
            let spec = GrantSpec { currency: usd(), amount: cents(*c), funding_method: FundingMethod::None, purchase: None, priority: Priority::new(*priority).unwrap(), effective_at: None, expires_after: None, features: filter_of(*f) };
            book.add_grant(Grant::new(spec, GrantId(format!("g{i}")), t(0), i as i64).unwrap(), t(0)).unwrap();
        }
        let total: Amount = grants.iter().map(|(_, c, _)| cents(*c)).sum();
        let mut spent = Amount::ZERO;
        for (c, f) in charges {
            let spend = Spend { currency: usd(), amount: cents(c), feature: feature_of(f), mode: SettlementMode::CreditOnly };
            if book.charge(&spend, t(1)).is_ok() {
                spent += spend.amount;
            }
            prop_assert!(!settled(&book, t(1)).is_negative());
        }
        prop_assert!(spent <= total);
        prop_assert_eq!(settled(&book, t(1)), total - spent);
    }
}

/// What a lease holder does: open or renew its hold, spend what the last answer left it before
/// the hold's `spend_by`, give it back — among other customers' charges and time passing.
#[derive(Clone, Debug)]
enum HolderOp {
    Grant { priority: i64, cents: u32, lasts_hours: Option<u32>, features: u8 },
    Charge { cents: u32, feature: u8 },
    Hold { holder: usize, cents: u32, lasts_hours: u32 },
    Spend { holder: usize, cents: u32 },
    Release { holder: usize },
    Wait { hours: u32 },
}

fn holder_op() -> impl Strategy<Value = HolderOp> {
    prop_oneof![
        2 => (1i64..4, 1u32..5000, proptest::option::of(1u32..48), 0u8..4)
            .prop_map(|(priority, cents, lasts_hours, features)| HolderOp::Grant { priority, cents, lasts_hours, features }),
        2 => (1u32..2000, 0u8..3).prop_map(|(cents, feature)| HolderOp::Charge { cents, feature }),
        3 => (0usize..3, 1u32..3000, 1u32..24).prop_map(|(holder, cents, lasts_hours)| HolderOp::Hold { holder, cents, lasts_hours }),
        4 => (0usize..3, 1u32..1500).prop_map(|(holder, cents)| HolderOp::Spend { holder, cents }),
        1 => (0usize..3).prop_map(|holder| HolderOp::Release { holder }),
        2 => (1u32..30).prop_map(|hours| HolderOp::Wait { hours }),
    ]
}

/// One holder's view of its hold, from the book's last answer.
#[derive(Clone, Default)]
struct Holder {
    open: bool,
    left: Amount,
    until: Option<DateTime<Utc>>,
}

proptest! {
    #![proptest_config(ProptestConfig { cases: cases(512), failure_persistence: None, ..ProptestConfig::default() })]

    /// A lease never outlives its credit: what a holder spends of what it was given, before the
    /// `spend_by` it was told, is always covered — whatever expires, whatever others charge.
    #[test]
    fn spending_within_a_hold_is_always_covered(ops in proptest::collection::vec(holder_op(), 1..60)) {
        let mut book = Book::new();
        let mut now = t(0);
        let mut holders = vec![Holder::default(); 3];
        let features = |holder: usize| feature_of(holder as u8);
        for (n, op) in ops.iter().enumerate() {
            match op {
                HolderOp::Grant { priority, cents: c, lasts_hours, features: f } => {
                    let spec = GrantSpec { currency: usd(), amount: cents(*c), funding_method: FundingMethod::None, purchase: None, priority: Priority::new(*priority).unwrap(), effective_at: None, expires_after: lasts_hours.map(|h| IsoDuration::parse(&format!("PT{h}H")).unwrap()), features: filter_of(*f) };
                    book.add_grant(Grant::new(spec, GrantId(format!("g{n}")), now, n as i64).unwrap(), now).unwrap();
                }
                HolderOp::Charge { cents: c, feature } => {
                    let spend = Spend { currency: usd(), amount: cents(*c), feature: feature_of(*feature), mode: SettlementMode::CreditOnly };
                    let _ = book.charge(&spend, now);
                }
                HolderOp::Hold { holder, cents: c, lasts_hours } => {
                    let id = HoldId(format!("h{holder}"));
                    let ttl = now + TimeDelta::hours(i64::from(*lasts_hours));
                    let open = book.hold(&id).is_some_and(|h| !h.released && now < h.expires_at);
                    if open {
                        book.extend_hold(&id, cents(*c), ttl, now).unwrap();
                    } else {
                        book.place_hold(id.clone(), usd(), features(*holder), cents(*c), ttl, now).unwrap();
                    }
                    let h = book.hold(&id).unwrap();
                    let until = book.spend_by(&id).unwrap();
                    prop_assert!(until <= h.expires_at && ttl <= h.expires_at, "spent beyond its TTL");
                    holders[*holder] = Holder { open: true, left: h.amount, until: Some(until) };
                }
                HolderOp::Spend { holder, cents: c } => {
                    let view = holders[*holder].clone();
                    let amount = cents(*c).min(view.left);
                    if view.open && amount.is_positive() && view.until.is_some_and(|u| now < u) {
                        let spend = Spend { currency: usd(), amount, feature: features(*holder), mode: SettlementMode::CreditOnly };
                        let out = book.capture(&HoldId(format!("h{holder}")), &spend, now).unwrap();
                        prop_assert_eq!(out.uncovered, Amount::ZERO, "spent within its hold, booked uncovered");
                        holders[*holder].left = view.left - amount;
                    }
                }
                HolderOp::Release { holder } => {
                    let _ = book.release_hold(&HoldId(format!("h{holder}")));
                    holders[*holder] = Holder::default();
                }
                HolderOp::Wait { hours } => {
                    now += TimeDelta::hours(i64::from(*hours));
                    book.try_advance(now).unwrap();
                    book.expire_holds(now);
                }
            }
            prop_assert!(book.debts().is_empty(), "uncovered usage after {op:?}");
        }
    }
}
