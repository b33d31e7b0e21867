//! Double entry: every movement is a set of postings that sum to zero per currency.
//!
//! Accounts per customer and currency: the credit balance (what the customer can spend),
//! receivable (what the customer owes for bought credit) and accrued (usage beyond credit, to
//! invoice). Per business: the settlement boundary (credit entering or leaving the system),
//! earnings (credit consumed) and breakage (credit that expired unused).

use std::collections::BTreeMap;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use crate::error::AmountOverflow;
use crate::feature::FeatureKey;
use crate::grant::{FundingMethod, GrantId};
use crate::money::{Amount, Currency};

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Account {
    CustomerCredit,
    CustomerReceivable,
    CustomerAccrued,
    SettlementBoundary,
    Earnings,
    Breakage,
}

impl Account {
    pub fn as_str(self) -> &'static str {
        match self {
            Account::CustomerCredit => "customer_credit",
            Account::CustomerReceivable => "customer_receivable",
            Account::CustomerAccrued => "customer_accrued",
            Account::SettlementBoundary => "settlement_boundary",
            Account::Earnings => "earnings",
            Account::Breakage => "breakage",
        }
    }

    pub fn parse(text: &str) -> Option<Self> {
        [
            Account::CustomerCredit,
            Account::CustomerReceivable,
            Account::CustomerAccrued,
            Account::SettlementBoundary,
            Account::Earnings,
            Account::Breakage,
        ]
        .into_iter()
        .find(|a| a.as_str() == text)
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Posting {
    pub account: Account,
    pub currency: Currency,
    pub amount: Amount,
}

/// The kind of a movement on the customer's credit balance.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum MovementKind {
    Funded,
    Consumed,
    Expired,
    Voided,
    Adjusted,
}

impl MovementKind {
    pub fn as_str(self) -> &'static str {
        match self {
            MovementKind::Funded => "funded",
            MovementKind::Consumed => "consumed",
            MovementKind::Expired => "expired",
            MovementKind::Voided => "voided",
            MovementKind::Adjusted => "adjusted",
        }
    }

    pub fn parse(text: &str) -> Option<Self> {
        [Self::Funded, Self::Consumed, Self::Expired, Self::Voided, Self::Adjusted]
            .into_iter()
            .find(|k| k.as_str() == text)
    }
}

/// One immutable change of a customer's credit balance in one currency.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Movement {
    pub kind: MovementKind,
    /// Signed: positive adds credit.
    pub amount: Amount,
    pub currency: Currency,
    /// The grant drawn from or funded; `None` for usage that no credit covered.
    pub grant_id: Option<GrantId>,
    pub feature: Option<FeatureKey>,
    /// Settled balance of the currency just before and after this movement.
    pub balance_before: Amount,
    pub balance_after: Amount,
    pub booked_at: DateTime<Utc>,
    pub postings: Vec<Posting>,
}

/// What an operation on a book produced, to be persisted in order.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Entry {
    Movement(Movement),
    /// Usage that was booked while uncovered (a negative balance) is assigned to a grant once
    /// eligible credit exists. The balance already reflects the usage, so nothing is posted:
    /// the grant's unused remainder shrinks and can no longer expire.
    DebtCovered {
        grant_id: GrantId,
        currency: Currency,
        feature: Option<FeatureKey>,
        amount: Amount,
        at: DateTime<Utc>,
    },
    /// Usage beyond credit under `credit_then_invoice`: accrued for invoicing, no credit moves.
    Overage {
        currency: Currency,
        feature: Option<FeatureKey>,
        amount: Amount,
        at: DateTime<Utc>,
        postings: Vec<Posting>,
    },
}

impl Entry {
    pub fn postings(&self) -> &[Posting] {
        match self {
            Entry::Movement(m) => &m.postings,
            Entry::Overage { postings, .. } => postings,
            Entry::DebtCovered { .. } => &[],
        }
    }

    /// Folds `next`, booked right after `self`, into `self` when both record usage of one kind at
    /// the same instant: a `consumed` movement from the same grant (or none), feature and currency
    /// whose balance continues where `self`'s ends, or an overage of the same currency and
    /// feature. Their amounts and postings add up; the balance runs from `self`'s before to
    /// `next`'s after. Settled balances at any instant and every account's sum are those of the
    /// two entries. Returns false, changing nothing, for anything else (or an overflow).
    ///
    /// The ledger books the usage ranges of one customer that one transaction serves (several
    /// nodes' syncs of one group) as one entry per grant this way: a journal row per range would
    /// cost the journal, and its customer index, a write per range (bench/RESULTS.md §0k–§0l).
    pub fn absorb(&mut self, next: &Entry) -> bool {
        let merged = match (&*self, next) {
            (Entry::Movement(a), Entry::Movement(b)) => a.followed_by(b).map(Entry::Movement),
            (
                Entry::Overage { currency, feature, amount, at, postings },
                Entry::Overage { currency: c, feature: f, amount: more, at: t, postings: more_postings },
            ) if (currency, feature, at) == (c, f, t) => (|| {
                Some(Entry::Overage {
                    currency: *currency,
                    feature: feature.clone(),
                    amount: amount.checked_add(*more)?,
                    at: *at,
                    postings: sum_postings(postings, more_postings)?,
                })
            })(),
            _ => None,
        };
        merged.map(|entry| *self = entry).is_some()
    }
}

impl Movement {
    /// `self` and `next` as one movement, if `next` consumes from the same grant (or none),
    /// feature and currency at the same instant, continuing `self`'s balance.
    fn followed_by(&self, next: &Movement) -> Option<Movement> {
        let continues = self.kind == MovementKind::Consumed
            && next.kind == MovementKind::Consumed
            && (self.currency, &self.grant_id, &self.feature, self.booked_at)
                == (next.currency, &next.grant_id, &next.feature, next.booked_at)
            && self.balance_after == next.balance_before;
        continues.then_some(())?;
        Some(Movement {
            amount: self.amount.checked_add(next.amount)?,
            balance_after: next.balance_after,
            postings: sum_postings(&self.postings, &next.postings)?,
            ..self.clone()
        })
    }
}

/// Postings to the same accounts in the same order, added up pairwise; `None` if they differ in
/// shape or a sum overflows.
fn sum_postings(a: &[Posting], b: &[Posting]) -> Option<Vec<Posting>> {
    if a.len() != b.len() {
        return None;
    }
    a.iter()
        .zip(b)
        .map(|(p, q)| {
            ((p.account, p.currency) == (q.account, q.currency)).then_some(())?;
            Some(Posting { account: p.account, currency: p.currency, amount: p.amount.checked_add(q.amount)? })
        })
        .collect()
}

fn pair(currency: Currency, credit_side: (Account, Amount), other: Account) -> Vec<Posting> {
    vec![
        Posting { account: credit_side.0, currency, amount: credit_side.1 },
        Posting { account: other, currency, amount: credit_side.1.negated() },
    ]
}

/// The postings behind a movement of `amount` (signed, on the customer's credit balance).
pub fn postings_for(
    kind: MovementKind,
    funding: Option<FundingMethod>,
    currency: Currency,
    amount: Amount,
) -> Vec<Posting> {
    let counter = match kind {
        MovementKind::Funded => match funding {
            Some(FundingMethod::Invoice) | Some(FundingMethod::External) => Account::CustomerReceivable,
            _ => Account::SettlementBoundary,
        },
        MovementKind::Consumed => Account::Earnings,
        MovementKind::Expired => Account::Breakage,
        MovementKind::Voided | MovementKind::Adjusted => Account::SettlementBoundary,
    };
    pair(currency, (Account::CustomerCredit, amount), counter)
}

/// Postings of an overage: the customer owes it (accrued), the business earned it.
pub fn overage_postings(currency: Currency, amount: Amount) -> Vec<Posting> {
    pair(currency, (Account::CustomerAccrued, amount.negated()), Account::Earnings)
}

/// A violation found by [`check_postings`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Imbalance {
    pub index: usize,
    pub currency: Currency,
    pub sum: Amount,
}

/// Every entry's postings must sum to zero per currency.
pub fn check_postings<'a>(entries: impl IntoIterator<Item = &'a [Posting]>) -> Result<Vec<Imbalance>, AmountOverflow> {
    let mut out = Vec::new();
    for (index, postings) in entries.into_iter().enumerate() {
        let sums = sum_by(postings.iter().map(|p| (p.currency, p.amount)))?;
        out.extend(sums.into_iter().filter(|(_, s)| !s.is_zero()).map(|(currency, sum)| Imbalance {
            index,
            currency,
            sum,
        }));
    }
    Ok(out)
}

/// The balance of each (account, currency) over a set of postings.
pub fn account_balances<'a>(
    postings: impl IntoIterator<Item = &'a Posting>,
) -> Result<BTreeMap<(Account, Currency), Amount>, AmountOverflow> {
    sum_by(postings.into_iter().map(|p| ((p.account, p.currency), p.amount)))
}

/// The exact sum of the amounts of each key.
pub fn sum_by<K: Ord>(amounts: impl IntoIterator<Item = (K, Amount)>) -> Result<BTreeMap<K, Amount>, AmountOverflow> {
    let mut out: BTreeMap<K, Amount> = BTreeMap::new();
    for (key, amount) in amounts {
        let sum = out.entry(key).or_default();
        *sum = sum.try_add(amount)?;
    }
    Ok(out)
}
