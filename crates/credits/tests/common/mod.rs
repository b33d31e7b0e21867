//! Helpers shared by the credit model's test files.
#![allow(dead_code)]

use chrono::{DateTime, TimeZone, Utc};
use credits::*;

/// `T<n>`: day n of a fixed month, so the examples read like DESIGN.md's tables.
pub fn t(n: u32) -> DateTime<Utc> {
    Utc.with_ymd_and_hms(2026, 1, 1, 0, 0, 0).unwrap() + chrono::TimeDelta::days(i64::from(n))
}

pub fn usd() -> Currency {
    Currency::parse("USD").unwrap()
}

pub fn amt(text: &str) -> Amount {
    Amount::parse(text).unwrap()
}

pub fn feature(key: &str) -> FeatureKey {
    FeatureKey::parse(key).unwrap()
}

pub struct GrantBuilder {
    id: &'static str,
    amount: Amount,
    priority: i64,
    effective: DateTime<Utc>,
    expires_at: Option<DateTime<Utc>>,
    features: Vec<&'static str>,
    seq: i64,
}

pub fn grant(id: &'static str, priority: i64, expires_at: Option<DateTime<Utc>>, amount: &str) -> GrantBuilder {
    GrantBuilder { id, amount: amt(amount), priority, effective: t(0), expires_at, features: vec![], seq: 0 }
}

impl GrantBuilder {
    pub fn features(mut self, features: &[&'static str]) -> Self {
        self.features = features.to_vec();
        self
    }

    pub fn effective(mut self, at: DateTime<Utc>) -> Self {
        self.effective = at;
        self
    }

    pub fn seq(mut self, seq: i64) -> Self {
        self.seq = seq;
        self
    }

    pub fn build(self) -> Grant {
        let spec = GrantSpec {
            currency: usd(),
            amount: self.amount,
            funding_method: FundingMethod::None,
            purchase: None,
            priority: Priority::new(self.priority).unwrap(),
            effective_at: Some(self.effective),
            expires_after: None,
            features: FeatureFilter::only(self.features.iter().map(|f| feature(f)).collect()),
        };
        let mut g = Grant::new(spec, GrantId(self.id.to_owned()), t(0), self.seq).unwrap();
        g.expires_at = self.expires_at;
        g
    }
}

pub fn book_with(grants: Vec<Grant>) -> Book {
    let mut book = Book::new();
    for g in grants {
        book.add_grant(g, t(0)).unwrap();
    }
    book
}

pub fn spend(amount: &str, feature_key: Option<&str>, mode: SettlementMode) -> Spend {
    Spend { currency: usd(), amount: amt(amount), feature: feature_key.map(feature), mode }
}

pub fn consumed(outcome: &SpendOutcome) -> Vec<(String, Amount)> {
    outcome.consumed.iter().map(|(id, a)| (id.0.clone(), *a)).collect()
}

pub fn settled(book: &Book, at: DateTime<Utc>) -> Amount {
    book.try_balances(at, None)
        .unwrap()
        .into_iter()
        .find(|b| b.currency == usd())
        .map(|b| b.settled)
        .unwrap_or_default()
}
