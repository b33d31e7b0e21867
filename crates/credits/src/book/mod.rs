//! A customer's book: grants with what is left of them, uncovered usage, holds — and every
//! operation on them. Operations take the time from the caller and return the entries to persist.
//!
//! The ledger loads a book from its store, applies one operation inside a transaction and writes
//! the returned entries; the filter and the simulator run the very same code in memory.

mod holds;

use std::collections::BTreeSet;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use crate::error::AmountOverflow;
use crate::error::ModelError;
use crate::feature::{FeatureFilter, FeatureKey, FeatureScope};
use crate::grant::{Grant, GrantId};
use crate::journal::{overage_postings, postings_for, Entry, Movement, MovementKind};
use crate::money::{Amount, Currency};

pub use holds::{Hold, HoldBacking, HoldId};

/// A grant and what has happened to it so far.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct GrantState {
    pub grant: Grant,
    /// Its `funded` movement has been booked (it became effective).
    pub funded: bool,
    /// Consumed from it, including uncovered usage it covered later.
    pub used: Amount,
    /// Removed by its `expired` movement, if booked.
    pub expired: Amount,
    /// Its expiry has been processed (possibly with nothing left to expire).
    pub expiry_booked: bool,
    /// Removed by voiding.
    pub voided: Amount,
}

impl GrantState {
    pub fn new(grant: Grant) -> Self {
        GrantState {
            grant,
            funded: false,
            used: Amount::ZERO,
            expired: Amount::ZERO,
            expiry_booked: false,
            voided: Amount::ZERO,
        }
    }

    /// The unused credit of the grant.
    pub fn remaining(&self) -> Result<Amount, AmountOverflow> {
        self.grant.amount.try_sub(self.used)?.try_sub(self.expired)?.try_sub(self.voided)
    }

    /// What this grant currently adds to the settled balance.
    fn settled_contribution(&self) -> Result<Amount, AmountOverflow> {
        if self.funded {
            self.remaining()
        } else {
            Ok(Amount::ZERO)
        }
    }
}

/// Usage that was booked while no credit covered it: the balance is negative by this much until
/// eligible credit arrives.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Debt {
    pub currency: Currency,
    pub feature: Option<FeatureKey>,
    pub amount: Amount,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SettlementMode {
    /// Credit must cover the charge; an uncovered charge is refused.
    CreditOnly,
    /// Consume what credit there is; the remainder is overage to invoice.
    CreditThenInvoice,
}

impl SettlementMode {
    pub fn as_str(self) -> &'static str {
        match self {
            SettlementMode::CreditOnly => "credit_only",
            SettlementMode::CreditThenInvoice => "credit_then_invoice",
        }
    }
}

/// Spending of `amount` (> 0) in `currency` for `feature`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Spend {
    pub currency: Currency,
    pub amount: Amount,
    pub feature: Option<FeatureKey>,
    pub mode: SettlementMode,
}

/// What a charge or a usage booking did.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct SpendOutcome {
    /// Credit drawn, per grant, in draw-down order.
    pub consumed: Vec<(GrantId, Amount)>,
    /// Booked without credit under `credit_only` (leaves a negative balance).
    pub uncovered: Amount,
    /// Recorded for invoicing under `credit_then_invoice`.
    pub overage: Amount,
    pub entries: Vec<Entry>,
}

/// A `credit_only` charge that the available credit cannot cover; nothing was booked.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Refusal {
    pub requested: Amount,
    pub available: Amount,
}

/// Why a charge was not booked (nothing was).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ChargeError {
    /// Under `credit_only` the available credit does not cover it.
    NotCovered(Refusal),
    /// The booking is impossible (e.g. its amounts would overflow).
    Model(ModelError),
}

impl From<ModelError> for ChargeError {
    fn from(e: ModelError) -> Self {
        ChargeError::Model(e)
    }
}

impl From<AmountOverflow> for ChargeError {
    fn from(e: AmountOverflow) -> Self {
        ChargeError::Model(e.into())
    }
}

/// The balances of one currency.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct CurrencyBalance {
    pub currency: Currency,
    /// Booked at or before the time asked for.
    pub settled: Amount,
    /// Settled minus open holds: what can still be spent.
    pub live: Amount,
    /// Granted credit that becomes effective later.
    pub pending: Amount,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Book {
    grants: Vec<GrantState>,
    debts: Vec<Debt>,
    holds: Vec<Hold>,
    /// Everything due up to this instant has been booked.
    clock: DateTime<Utc>,
}

impl Default for Book {
    fn default() -> Self {
        Book::new()
    }
}

impl Book {
    pub fn new() -> Self {
        Book { grants: Vec::new(), debts: Vec::new(), holds: Vec::new(), clock: DateTime::<Utc>::MIN_UTC }
    }

    /// Rebuilds a book from stored state (grants in creation order, holds oldest first).
    pub fn from_parts(grants: Vec<GrantState>, debts: Vec<Debt>, holds: Vec<Hold>, clock: DateTime<Utc>) -> Self {
        let mut book = Book { grants, debts, holds, clock };
        // Stored amounts are within the ledger's bounds, so backing them cannot overflow; if it
        // did, the holds would stay unbacked and set nothing aside.
        let _ = book.back_unbacked_holds();
        book
    }

    /// The stored state [`Book::from_parts`] takes: grants, debts, holds and clock.
    pub fn into_parts(self) -> (Vec<GrantState>, Vec<Debt>, Vec<Hold>, DateTime<Utc>) {
        (self.grants, self.debts, self.holds, self.clock)
    }

    pub fn grants(&self) -> &[GrantState] {
        &self.grants
    }

    pub fn grant(&self, id: &GrantId) -> Option<&GrantState> {
        self.grants.iter().find(|g| &g.grant.id == id)
    }

    pub fn debts(&self) -> &[Debt] {
        &self.debts
    }

    pub fn clock(&self) -> DateTime<Utc> {
        self.clock
    }

    /// Runs `op` on a copy of the book and keeps the result only if it succeeds: a failed
    /// operation leaves the book as it was.
    fn atomically<T, E>(&mut self, op: impl FnOnce(&mut Book) -> Result<T, E>) -> Result<T, E> {
        let mut draft = self.clone();
        let out = op(&mut draft)?;
        debug_assert!(draft.holds_are_backed(draft.clock), "holds beyond their backing: {:?}", draft.holds);
        *self = draft;
        Ok(out)
    }

    /// Books everything that fell due up to `now`, in time order: expiries (booked at their
    /// `expires_at`), grants becoming effective, and uncovered usage taken over by new credit.
    /// On an error nothing is booked.
    pub fn try_advance(&mut self, now: DateTime<Utc>) -> Result<Vec<Entry>, ModelError> {
        self.atomically(|book| book.advance_in(now))
    }

    fn advance_in(&mut self, now: DateTime<Utc>) -> Result<Vec<Entry>, ModelError> {
        let mut entries = Vec::new();
        while let Some((at, index, is_expiry)) = self.next_due(now) {
            let at = at.max(self.clock);
            if is_expiry {
                self.book_expiry(index, at, &mut entries)?;
            } else {
                self.book_funding(index, at, &mut entries)?;
                self.cover_debts(at, &mut entries)?;
            }
            self.clock = at;
        }
        self.clock = self.clock.max(now);
        Ok(entries)
    }

    /// The earliest unprocessed event at or before `now`; expiries sort before fundings at the
    /// same instant (a grant is no longer eligible at its `expires_at`).
    fn next_due(&self, now: DateTime<Utc>) -> Option<(DateTime<Utc>, usize, bool)> {
        let expiries = self.grants.iter().enumerate().filter_map(|(i, g)| match g.grant.expires_at {
            Some(e) if g.funded && !g.expiry_booked && g.grant.voided_at.is_none() && e <= now => Some((e, 0u8, i)),
            _ => None,
        });
        let fundings = self.grants.iter().enumerate().filter_map(|(i, g)| {
            (!g.funded && g.grant.voided_at.is_none() && g.grant.effective_at <= now).then_some((
                g.grant.effective_at,
                1u8,
                i,
            ))
        });
        expiries.chain(fundings).min().map(|(at, kind, i)| (at, i, kind == 0))
    }

    fn book_expiry(&mut self, index: usize, at: DateTime<Utc>, entries: &mut Vec<Entry>) -> Result<(), ModelError> {
        let state = &self.grants[index];
        let remaining = state.remaining()?;
        let (currency, id) = (state.grant.currency, state.grant.id.clone());
        let booked_at = state.grant.expires_at.unwrap_or(at).max(self.clock);
        if remaining.is_positive() {
            entries.push(self.movement(
                MovementKind::Expired,
                remaining.negated(),
                currency,
                Some(id.clone()),
                None,
                booked_at,
            )?);
            self.grants[index].expired = remaining;
        }
        self.grants[index].expiry_booked = true;
        // Holds lose what they set aside on it and keep the rest.
        self.unback_grant(&id)?;
        Ok(())
    }

    fn book_funding(&mut self, index: usize, at: DateTime<Utc>, entries: &mut Vec<Entry>) -> Result<(), ModelError> {
        let state = &self.grants[index];
        let (currency, id, amount) = (state.grant.currency, state.grant.id.clone(), state.grant.amount);
        entries.push(self.movement(MovementKind::Funded, amount, currency, Some(id), None, at)?);
        self.grants[index].funded = true;
        Ok(())
    }

    /// Assigns outstanding uncovered usage to eligible credit, oldest debt first.
    fn cover_debts(&mut self, at: DateTime<Utc>, entries: &mut Vec<Entry>) -> Result<(), ModelError> {
        for d in 0..self.debts.len() {
            let (currency, feature) = (self.debts[d].currency, self.debts[d].feature.clone());
            for (index, take) in self.plan_draw(currency, feature.as_ref(), self.debts[d].amount, at)? {
                self.grants[index].used = self.grants[index].used.try_add(take)?;
                self.debts[d].amount = self.debts[d].amount.try_sub(take)?;
                entries.push(Entry::DebtCovered {
                    grant_id: self.grants[index].grant.id.clone(),
                    currency,
                    feature: feature.clone(),
                    amount: take,
                    at,
                });
            }
        }
        self.debts.retain(|d| d.amount.is_positive());
        Ok(())
    }

    /// Creates a movement with its postings and the currency's settled balance around it.
    fn movement(
        &self,
        kind: MovementKind,
        amount: Amount,
        currency: Currency,
        grant_id: Option<GrantId>,
        feature: Option<FeatureKey>,
        booked_at: DateTime<Utc>,
    ) -> Result<Entry, AmountOverflow> {
        let funding = grant_id.as_ref().and_then(|id| self.grant(id)).map(|g| g.grant.funding.method());
        let before = self.settled(currency, None)?;
        Ok(Entry::Movement(Movement {
            kind,
            amount,
            currency,
            grant_id,
            feature,
            balance_before: before,
            balance_after: before.try_add(amount)?,
            booked_at,
            postings: postings_for(kind, funding, currency, amount),
        }))
    }

    /// Adds a grant; it is funded at once if already effective (otherwise when `advance` reaches
    /// its `effective_at`), and covers outstanding uncovered usage first.
    pub fn add_grant(&mut self, grant: Grant, now: DateTime<Utc>) -> Result<Vec<Entry>, ModelError> {
        if self.grant(&grant.id).is_some() {
            return Err(ModelError::DuplicateGrant(grant.id.0));
        }
        self.atomically(|book| book.add_grant_in(grant, now))
    }

    fn add_grant_in(&mut self, grant: Grant, now: DateTime<Utc>) -> Result<Vec<Entry>, ModelError> {
        let mut entries = self.advance_in(now)?;
        self.grants.push(GrantState::new(grant));
        entries.extend(self.advance_in(now)?);
        Ok(entries)
    }

    /// Voids a grant: its unused remainder leaves the balance by a new movement.
    pub fn void(&mut self, id: &GrantId, now: DateTime<Utc>) -> Result<Vec<Entry>, ModelError> {
        self.atomically(|book| book.void_in(id, now))
    }

    fn void_in(&mut self, id: &GrantId, now: DateTime<Utc>) -> Result<Vec<Entry>, ModelError> {
        let mut entries = self.advance_in(now)?;
        let index =
            self.grants.iter().position(|g| &g.grant.id == id).ok_or_else(|| ModelError::UnknownGrant(id.0.clone()))?;
        if self.grants[index].grant.voided_at.is_some() {
            return Ok(entries);
        }
        let state = &self.grants[index];
        let remaining = state.remaining()?;
        if state.funded && remaining.is_positive() && !state.expiry_booked {
            let currency = state.grant.currency;
            let at = now.max(self.clock);
            entries.push(self.movement(
                MovementKind::Voided,
                remaining.negated(),
                currency,
                Some(id.clone()),
                None,
                at,
            )?);
            self.grants[index].voided = remaining;
        }
        self.grants[index].grant.voided_at = Some(now);
        // What holds set aside on it is gone with it: they shrink to what still backs them.
        self.unback_grant(id)?;
        Ok(entries)
    }

    /// Credit that a new spend of `feature` could use now: unused credit of eligible grants
    /// that no open hold backs.
    pub fn available(
        &self,
        currency: Currency,
        feature: Option<&FeatureKey>,
        at: DateTime<Utc>,
    ) -> Result<Amount, AmountOverflow> {
        let free = self.free_credit(currency, at)?;
        Amount::try_sum(free.iter().filter(|(i, _)| self.grants[*i].grant.features.admits(feature)).map(|(_, f)| *f))
    }

    /// Eligible grants of `currency` at `at` in draw-down order, each with its unused credit
    /// that no open hold backs.
    fn free_credit(&self, currency: Currency, at: DateTime<Utc>) -> Result<Vec<(usize, Amount)>, AmountOverflow> {
        let mut free = Vec::new();
        for (i, g) in self.grants.iter().enumerate() {
            if g.funded && g.grant.currency == currency && g.grant.status_at(at) == crate::grant::GrantStatus::Active {
                let backed = Amount::try_sum(self.holds.iter().map(|h| h.backing_on(&g.grant.id, at)))?;
                let unbacked = g.remaining()?.try_sub(backed)?;
                if unbacked.is_positive() {
                    free.push((i, unbacked));
                }
            }
        }
        free.sort_by_key(|(i, _)| self.grants[*i].grant.draw_down_key());
        Ok(free)
    }

    /// How much of which grant's free credit (by index) pays `amount`, in draw-down order.
    fn plan_draw(
        &self,
        currency: Currency,
        feature: Option<&FeatureKey>,
        amount: Amount,
        at: DateTime<Utc>,
    ) -> Result<Vec<(usize, Amount)>, AmountOverflow> {
        let mut left = amount;
        let mut plan = Vec::new();
        for (i, f) in self.free_credit(currency, at)? {
            if left.is_zero() {
                break;
            }
            if self.grants[i].grant.admits(currency, feature, at) {
                let take = left.min(f);
                plan.push((i, take));
                left = left.try_sub(take)?;
            }
        }
        Ok(plan)
    }

    /// A charge decided now. `credit_only`: refused (nothing booked) unless the available credit
    /// covers it. `credit_then_invoice`: consumes what there is, the rest is overage.
    pub fn charge(&mut self, spend: &Spend, now: DateTime<Utc>) -> Result<SpendOutcome, ChargeError> {
        self.atomically(|book| {
            let due = book.advance_in(now)?;
            let available = book.available(spend.currency, spend.feature.as_ref(), now)?;
            if spend.mode == SettlementMode::CreditOnly && available < spend.amount {
                return Err(ChargeError::NotCovered(Refusal { requested: spend.amount, available }));
            }
            let mut outcome = book.spend(spend, now, None)?;
            let mut entries = due;
            entries.append(&mut outcome.entries);
            outcome.entries = entries;
            Ok(outcome)
        })
    }

    /// Usage that already happened (a served call): always booked. What credit does not cover is
    /// uncovered usage under `credit_only` (a negative balance, covered first by the next eligible
    /// credit) or overage under `credit_then_invoice`. On an error nothing is booked.
    pub fn book_usage(&mut self, spend: &Spend, now: DateTime<Utc>) -> Result<SpendOutcome, ModelError> {
        self.atomically(|book| book.spend(spend, now, None))
    }

    /// With `from_hold` (a hold's index and up to how much it pays), the spend is a capture:
    /// the hold's credit is drawn along with the free credit and the hold holds that much less.
    fn spend(
        &mut self,
        spend: &Spend,
        now: DateTime<Utc>,
        from_hold: Option<(usize, Amount)>,
    ) -> Result<SpendOutcome, ModelError> {
        let mut outcome = SpendOutcome { entries: self.advance_in(now)?, ..SpendOutcome::default() };
        let at = self.clock;
        let plan = match from_hold {
            Some((hold, _)) => self.plan_capture(hold, spend, at)?,
            None => self.plan_draw(spend.currency, spend.feature.as_ref(), spend.amount, at)?,
        };
        let mut left = spend.amount;
        for (index, take) in plan {
            let id = self.grants[index].grant.id.clone();
            let feature = spend.feature.clone();
            outcome.entries.push(self.movement(
                MovementKind::Consumed,
                take.negated(),
                spend.currency,
                Some(id.clone()),
                feature,
                at,
            )?);
            self.grants[index].used = self.grants[index].used.try_add(take)?;
            outcome.consumed.push((id, take));
            left = left.try_sub(take)?;
        }
        if let Some((hold, paid)) = from_hold {
            self.settle_capture(hold, paid, at)?;
        }
        if left.is_positive() {
            self.book_beyond_credit(spend, left, at, &mut outcome)?;
        }
        Ok(outcome)
    }

    /// What no credit covers: uncovered usage under `credit_only`, overage otherwise.
    fn book_beyond_credit(
        &mut self,
        spend: &Spend,
        left: Amount,
        at: DateTime<Utc>,
        outcome: &mut SpendOutcome,
    ) -> Result<(), AmountOverflow> {
        let (currency, feature) = (spend.currency, spend.feature.clone());
        match spend.mode {
            SettlementMode::CreditOnly => {
                outcome.entries.push(self.movement(
                    MovementKind::Consumed,
                    left.negated(),
                    currency,
                    None,
                    feature.clone(),
                    at,
                )?);
                self.add_debt(currency, feature, left)?;
                outcome.uncovered = left;
            }
            SettlementMode::CreditThenInvoice => {
                let postings = overage_postings(currency, left);
                outcome.entries.push(Entry::Overage { currency, feature, amount: left, at, postings });
                outcome.overage = left;
            }
        }
        Ok(())
    }

    fn add_debt(
        &mut self,
        currency: Currency,
        feature: Option<FeatureKey>,
        amount: Amount,
    ) -> Result<(), AmountOverflow> {
        match self.debts.iter_mut().find(|d| d.currency == currency && d.feature == feature) {
            Some(d) => d.amount = d.amount.try_add(amount)?,
            None => self.debts.push(Debt { currency, feature, amount }),
        }
        Ok(())
    }

    /// A manual correction. A positive one arrives as new unrestricted credit (`grant`, which
    /// the caller creates so it has identity); a negative one draws down like usage.
    pub fn adjust(
        &mut self,
        currency: Currency,
        amount: Amount,
        grant: Option<Grant>,
        now: DateTime<Utc>,
    ) -> Result<Vec<Entry>, ModelError> {
        if let Some(g) = grant.as_ref().filter(|g| self.grant(&g.id).is_some()) {
            return Err(ModelError::DuplicateGrant(g.id.0.clone()));
        }
        self.atomically(|book| book.adjust_in(currency, amount, grant, now))
    }

    fn adjust_in(
        &mut self,
        currency: Currency,
        amount: Amount,
        grant: Option<Grant>,
        now: DateTime<Utc>,
    ) -> Result<Vec<Entry>, ModelError> {
        let mut entries = self.advance_in(now)?;
        if amount.is_positive() {
            let grant = grant.ok_or_else(|| ModelError::NotPositive(amount.to_string()))?;
            let id = grant.id.clone();
            entries.extend(self.add_grant_in(grant, now)?.into_iter().map(|e| match e {
                Entry::Movement(mut m) if m.kind == MovementKind::Funded && m.grant_id.as_ref() == Some(&id) => {
                    m.kind = MovementKind::Adjusted;
                    Entry::Movement(m)
                }
                other => other,
            }));
        } else if amount.is_negative() {
            let spend = Spend { currency, amount: amount.negated(), feature: None, mode: SettlementMode::CreditOnly };
            let outcome = self.spend(&spend, now, None)?;
            entries.extend(outcome.entries.into_iter().map(|e| match e {
                Entry::Movement(mut m) if m.kind == MovementKind::Consumed => {
                    m.kind = MovementKind::Adjusted;
                    m.postings = postings_for(MovementKind::Adjusted, None, m.currency, m.amount);
                    Entry::Movement(m)
                }
                other => other,
            }));
        }
        Ok(entries)
    }

    /// The settled balance of a currency as booked so far, optionally in a feature's scope.
    fn settled(&self, currency: Currency, scope: Option<&FeatureScope>) -> Result<Amount, AmountOverflow> {
        let mut credit = Amount::ZERO;
        for g in self.grants.iter().filter(|g| g.grant.currency == currency && in_scope(&g.grant.features, scope)) {
            credit = credit.try_add(g.settled_contribution()?)?;
        }
        let debts = self.debts.iter().filter(|d| d.currency == currency && debt_in_scope(d.feature.as_ref(), scope));
        credit.try_sub(Amount::try_sum(debts.map(|d| d.amount))?)
    }

    /// Balances per currency at `at` (≥ the book's clock; earlier instants need the journal, see
    /// [`crate::history`]). Expiries and grants that became effective by then are included even
    /// though nothing has booked them yet.
    pub fn try_balances(
        &self,
        at: DateTime<Utc>,
        scope: Option<&FeatureScope>,
    ) -> Result<Vec<CurrencyBalance>, ModelError> {
        let mut view = self.clone();
        view.advance_in(at)?;
        let currencies: BTreeSet<Currency> = view
            .grants
            .iter()
            .map(|g| g.grant.currency)
            .chain(view.debts.iter().map(|d| d.currency))
            .chain(view.holds.iter().map(|h| h.currency))
            .collect();
        let mut out = Vec::with_capacity(currencies.len());
        for currency in currencies {
            let settled = view.settled(currency, scope)?;
            let pending = view.grants.iter().filter(|g| {
                g.grant.currency == currency
                    && !g.funded
                    && g.grant.voided_at.is_none()
                    && in_scope(&g.grant.features, scope)
            });
            let pending = Amount::try_sum(pending.map(|g| g.grant.amount))?;
            let live = settled.try_sub(view.held_in_scope(currency, scope, at)?)?;
            out.push(CurrencyBalance { currency, settled, live, pending });
        }
        Ok(out)
    }

    /// Credit in `scope` set aside by open holds.
    fn held_in_scope(
        &self,
        currency: Currency,
        scope: Option<&FeatureScope>,
        at: DateTime<Utc>,
    ) -> Result<Amount, AmountOverflow> {
        let mut held = Amount::ZERO;
        for g in self.grants.iter().filter(|g| g.grant.currency == currency && in_scope(&g.grant.features, scope)) {
            held = held.try_add(Amount::try_sum(self.holds.iter().map(|h| h.backing_on(&g.grant.id, at)))?)?;
        }
        Ok(held)
    }
}

/// Feature scope: unrestricted credit plus credit restricted to sets with a matching feature.
pub fn in_scope(features: &FeatureFilter, scope: Option<&FeatureScope>) -> bool {
    scope.is_none_or(|s| s.includes(features))
}

/// Uncovered usage counts in the scope of its own feature; usage without a feature counts in all.
pub fn debt_in_scope(feature: Option<&FeatureKey>, scope: Option<&FeatureScope>) -> bool {
    match (feature, scope) {
        (_, None) | (None, _) => true,
        (Some(f), Some(s)) => s.matches(f),
    }
}
