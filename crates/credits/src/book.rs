//! A customer's book: grants with what is left of them, uncovered usage, holds — and every
//! operation on them. Operations take the time from the caller and return the entries to persist.
//!
//! The ledger loads a book from its store, applies one operation inside a transaction and writes
//! the returned entries; the filter and the simulator run the very same code in memory.

use std::collections::BTreeSet;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use crate::error::ModelError;
use crate::feature::{FeatureFilter, FeatureKey, FeatureScope};
use crate::grant::{Grant, GrantId};
use crate::journal::{overage_postings, postings_for, Entry, Movement, MovementKind};
use crate::money::{Amount, Currency};

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
    pub fn remaining(&self) -> Amount {
        self.grant.amount - self.used - self.expired - self.voided
    }

    /// What this grant currently adds to the settled balance.
    fn settled_contribution(&self) -> Amount {
        if self.funded {
            self.remaining()
        } else {
            Amount::ZERO
        }
    }

    fn can_pay(&self, currency: Currency, feature: Option<&FeatureKey>, at: DateTime<Utc>) -> bool {
        self.funded && self.remaining().is_positive() && self.grant.admits(currency, feature, at)
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

#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(transparent)]
pub struct HoldId(pub String);

/// Credit set aside for in-flight spending (a gateway lease). It lowers the live balance.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Hold {
    pub id: HoldId,
    pub currency: Currency,
    pub feature: Option<FeatureKey>,
    /// What is still held.
    pub amount: Amount,
    pub created_at: DateTime<Utc>,
    pub expires_at: DateTime<Utc>,
    pub released: bool,
}

impl Hold {
    pub fn is_open_at(&self, at: DateTime<Utc>) -> bool {
        !self.released && self.amount.is_positive() && self.created_at <= at && at < self.expires_at
    }
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

    /// Rebuilds a book from stored state (grants in creation order).
    pub fn from_parts(grants: Vec<GrantState>, debts: Vec<Debt>, holds: Vec<Hold>, clock: DateTime<Utc>) -> Self {
        Book { grants, debts, holds, clock }
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

    pub fn holds(&self) -> &[Hold] {
        &self.holds
    }

    pub fn hold(&self, id: &HoldId) -> Option<&Hold> {
        self.holds.iter().find(|h| &h.id == id)
    }

    pub fn clock(&self) -> DateTime<Utc> {
        self.clock
    }

    /// Books everything that fell due up to `now`, in time order: expiries (booked at their
    /// `expires_at`), grants becoming effective, and uncovered usage taken over by new credit.
    pub fn advance(&mut self, now: DateTime<Utc>) -> Vec<Entry> {
        let mut entries = Vec::new();
        while let Some((at, index, is_expiry)) = self.next_due(now) {
            let at = at.max(self.clock);
            if is_expiry {
                self.book_expiry(index, at, &mut entries);
            } else {
                self.book_funding(index, at, &mut entries);
                self.cover_debts(at, &mut entries);
            }
            self.clock = at;
        }
        self.clock = self.clock.max(now);
        entries
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

    fn book_expiry(&mut self, index: usize, at: DateTime<Utc>, entries: &mut Vec<Entry>) {
        let state = &self.grants[index];
        let remaining = state.remaining();
        let (currency, id) = (state.grant.currency, state.grant.id.clone());
        let booked_at = state.grant.expires_at.unwrap_or(at).max(self.clock);
        if remaining.is_positive() {
            entries.push(self.movement(MovementKind::Expired, -remaining, currency, Some(id), None, booked_at));
            self.grants[index].expired = remaining;
        }
        self.grants[index].expiry_booked = true;
    }

    fn book_funding(&mut self, index: usize, at: DateTime<Utc>, entries: &mut Vec<Entry>) {
        let state = &self.grants[index];
        let (currency, id, amount) = (state.grant.currency, state.grant.id.clone(), state.grant.amount);
        entries.push(self.movement(MovementKind::Funded, amount, currency, Some(id), None, at));
        self.grants[index].funded = true;
    }

    /// Assigns outstanding uncovered usage to eligible credit, oldest debt first.
    fn cover_debts(&mut self, at: DateTime<Utc>, entries: &mut Vec<Entry>) {
        for d in 0..self.debts.len() {
            let (currency, feature) = (self.debts[d].currency, self.debts[d].feature.clone());
            for (index, take) in self.plan_draw(currency, feature.as_ref(), self.debts[d].amount, at, None) {
                self.grants[index].used += take;
                self.debts[d].amount -= take;
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
    ) -> Entry {
        let funding = grant_id.as_ref().and_then(|id| self.grant(id)).map(|g| g.grant.funding.method());
        let before = self.settled(currency, None);
        Entry::Movement(Movement {
            kind,
            amount,
            currency,
            grant_id,
            feature,
            balance_before: before,
            balance_after: before + amount,
            booked_at,
            postings: postings_for(kind, funding, currency, amount),
        })
    }

    /// Adds a grant; it is funded at once if already effective (otherwise when `advance` reaches
    /// its `effective_at`), and covers outstanding uncovered usage first.
    pub fn add_grant(&mut self, grant: Grant, now: DateTime<Utc>) -> Result<Vec<Entry>, ModelError> {
        if self.grant(&grant.id).is_some() {
            return Err(ModelError::DuplicateGrant(grant.id.0));
        }
        let mut entries = self.advance(now);
        self.grants.push(GrantState::new(grant));
        entries.extend(self.advance(now));
        Ok(entries)
    }

    /// Voids a grant: its unused remainder leaves the balance by a new movement.
    pub fn void(&mut self, id: &GrantId, now: DateTime<Utc>) -> Result<Vec<Entry>, ModelError> {
        let mut entries = self.advance(now);
        let index =
            self.grants.iter().position(|g| &g.grant.id == id).ok_or_else(|| ModelError::UnknownGrant(id.0.clone()))?;
        if self.grants[index].grant.voided_at.is_some() {
            return Ok(entries);
        }
        let state = &self.grants[index];
        let remaining = state.remaining();
        if state.funded && remaining.is_positive() && !state.expiry_booked {
            let currency = state.grant.currency;
            entries.push(self.movement(
                MovementKind::Voided,
                -remaining,
                currency,
                Some(id.clone()),
                None,
                now.max(self.clock),
            ));
            self.grants[index].voided = remaining;
        }
        self.grants[index].grant.voided_at = Some(now);
        Ok(entries)
    }

    /// Credit that a new spend of `feature` could use now: unused credit of eligible grants
    /// minus what open holds have set aside.
    pub fn available(&self, currency: Currency, feature: Option<&FeatureKey>, at: DateTime<Utc>) -> Amount {
        let (free, unbacked) = self.free_credit(currency, at, None);
        let total: Amount =
            free.iter().filter(|(i, _)| self.grants[*i].grant.features.admits(feature)).map(|(_, f)| *f).sum();
        (total - unbacked).max(Amount::ZERO)
    }

    /// Eligible grants of `currency` at `at` in draw-down order with the credit not set aside by
    /// open holds (holds are placed greedily, oldest first, in draw-down order), and the part of
    /// holds that no credit backs any more. With `before_hold`, only the holds placed before that
    /// one count: what is left is, in order, the credit that hold sets aside and then the rest.
    fn free_credit(
        &self,
        currency: Currency,
        at: DateTime<Utc>,
        before_hold: Option<&HoldId>,
    ) -> (Vec<(usize, Amount)>, Amount) {
        let mut order: Vec<usize> = (0..self.grants.len())
            .filter(|&i| {
                let g = &self.grants[i];
                g.funded
                    && g.remaining().is_positive()
                    && g.grant.currency == currency
                    && g.grant.status_at(at) == crate::grant::GrantStatus::Active
            })
            .collect();
        order.sort_by_key(|&i| self.grants[i].grant.draw_down_key());
        let mut free: Vec<(usize, Amount)> = order.into_iter().map(|i| (i, self.grants[i].remaining())).collect();
        let mut unbacked = Amount::ZERO;
        let placed = self.holds.iter().take_while(|h| Some(&h.id) != before_hold);
        for hold in placed.filter(|h| h.currency == currency && h.is_open_at(at)) {
            let mut need = hold.amount;
            for (i, f) in free.iter_mut() {
                if need.is_zero() {
                    break;
                }
                if self.grants[*i].grant.features.admits(hold.feature.as_ref()) {
                    let take = need.min(*f);
                    *f -= take;
                    need -= take;
                }
            }
            unbacked += need;
        }
        (free, unbacked)
    }

    /// How much to take from which grant (by index) for `amount`, in draw-down order.
    fn plan_draw(
        &self,
        currency: Currency,
        feature: Option<&FeatureKey>,
        amount: Amount,
        at: DateTime<Utc>,
        before_hold: Option<&HoldId>,
    ) -> Vec<(usize, Amount)> {
        let (free, _) = self.free_credit(currency, at, before_hold);
        let mut left = amount;
        let mut plan = Vec::new();
        for (i, f) in free {
            if left.is_zero() {
                break;
            }
            if f.is_positive() && self.grants[i].can_pay(currency, feature, at) {
                let take = left.min(f);
                plan.push((i, take));
                left -= take;
            }
        }
        plan
    }

    /// A charge decided now. `credit_only`: refused (nothing booked) unless the available credit
    /// covers it. `credit_then_invoice`: consumes what there is, the rest is overage.
    pub fn charge(&mut self, spend: &Spend, now: DateTime<Utc>) -> Result<SpendOutcome, Refusal> {
        let mut probe = self.clone();
        let due = probe.advance(now);
        let available = probe.available(spend.currency, spend.feature.as_ref(), now);
        if spend.mode == SettlementMode::CreditOnly && available < spend.amount {
            return Err(Refusal { requested: spend.amount, available });
        }
        *self = probe;
        let mut outcome = self.book_usage(spend, now);
        let mut entries = due;
        entries.append(&mut outcome.entries);
        outcome.entries = entries;
        Ok(outcome)
    }

    /// Usage that already happened (a served call): always booked. What credit does not cover is
    /// uncovered usage under `credit_only` (a negative balance, covered first by the next eligible
    /// credit) or overage under `credit_then_invoice`.
    pub fn book_usage(&mut self, spend: &Spend, now: DateTime<Utc>) -> SpendOutcome {
        self.spend(spend, now, None)
    }

    /// With `from_hold`, up to that amount is drawn from the credit the hold set aside (it is no
    /// longer held), the rest from free credit.
    fn spend(&mut self, spend: &Spend, now: DateTime<Utc>, from_hold: Option<(&HoldId, Amount)>) -> SpendOutcome {
        let mut outcome = SpendOutcome { entries: self.advance(now), ..SpendOutcome::default() };
        let at = self.clock;
        let (currency, feature) = (spend.currency, spend.feature.as_ref());
        let plan = match from_hold.filter(|(_, held)| held.is_positive()) {
            None => self.plan_draw(currency, feature, spend.amount, at, None),
            Some((id, held)) => {
                let mut plan = self.plan_draw(currency, feature, held.min(spend.amount), at, Some(id));
                let mut rest = self.clone();
                for (index, take) in &plan {
                    rest.grants[*index].used += *take;
                }
                let left = spend.amount - plan.iter().map(|(_, take)| *take).sum::<Amount>();
                for (index, take) in rest.plan_draw(currency, feature, left, at, None) {
                    match plan.iter_mut().find(|(i, _)| *i == index) {
                        Some((_, t)) => *t += take,
                        None => plan.push((index, take)),
                    }
                }
                plan.sort_by_key(|(index, _)| self.grants[*index].grant.draw_down_key());
                plan
            }
        };
        let mut left = spend.amount;
        for (index, take) in plan {
            let id = self.grants[index].grant.id.clone();
            outcome.entries.push(self.movement(
                MovementKind::Consumed,
                -take,
                spend.currency,
                Some(id.clone()),
                spend.feature.clone(),
                at,
            ));
            self.grants[index].used += take;
            outcome.consumed.push((id, take));
            left -= take;
        }
        if left.is_positive() {
            match spend.mode {
                SettlementMode::CreditOnly => {
                    outcome.entries.push(self.movement(
                        MovementKind::Consumed,
                        -left,
                        spend.currency,
                        None,
                        spend.feature.clone(),
                        at,
                    ));
                    self.add_debt(spend.currency, spend.feature.clone(), left);
                    outcome.uncovered = left;
                }
                SettlementMode::CreditThenInvoice => {
                    outcome.entries.push(Entry::Overage {
                        currency: spend.currency,
                        feature: spend.feature.clone(),
                        amount: left,
                        at,
                        postings: overage_postings(spend.currency, left),
                    });
                    outcome.overage = left;
                }
            }
        }
        outcome
    }

    fn add_debt(&mut self, currency: Currency, feature: Option<FeatureKey>, amount: Amount) {
        match self.debts.iter_mut().find(|d| d.currency == currency && d.feature == feature) {
            Some(d) => d.amount += amount,
            None => self.debts.push(Debt { currency, feature, amount }),
        }
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
        let mut entries = self.advance(now);
        if amount.is_positive() {
            let grant = grant.ok_or_else(|| ModelError::NotPositive(amount.to_string()))?;
            let id = grant.id.clone();
            entries.extend(self.add_grant(grant, now)?.into_iter().map(|e| match e {
                Entry::Movement(mut m) if m.kind == MovementKind::Funded && m.grant_id.as_ref() == Some(&id) => {
                    m.kind = MovementKind::Adjusted;
                    Entry::Movement(m)
                }
                other => other,
            }));
        } else if amount.is_negative() {
            let spend = Spend { currency, amount: -amount, feature: None, mode: SettlementMode::CreditOnly };
            let outcome = self.book_usage(&spend, now);
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

    /// Sets credit aside: up to `requested`, less when less is available (down to zero).
    pub fn place_hold(
        &mut self,
        id: HoldId,
        currency: Currency,
        feature: Option<FeatureKey>,
        requested: Amount,
        expires_at: DateTime<Utc>,
        now: DateTime<Utc>,
    ) -> Result<(Amount, Vec<Entry>), ModelError> {
        // A released hold's id may be used again (a gateway re-opens its lease under one id).
        match self.hold(&id) {
            Some(h) if !h.released => return Err(ModelError::DuplicateHold(id.0)),
            Some(_) => self.holds.retain(|h| h.id != id),
            None => {}
        }
        let entries = self.advance(now);
        let granted = requested.max(Amount::ZERO).min(self.available(currency, feature.as_ref(), now));
        self.holds.push(Hold { id, currency, feature, amount: granted, created_at: now, expires_at, released: false });
        Ok((granted, entries))
    }

    /// Adds to an open hold what is available, up to `more`; returns what was added.
    pub fn extend_hold(
        &mut self,
        id: &HoldId,
        more: Amount,
        expires_at: DateTime<Utc>,
        now: DateTime<Utc>,
    ) -> Result<(Amount, Vec<Entry>), ModelError> {
        let entries = self.advance(now);
        let index = self.holds.iter().position(|h| &h.id == id).ok_or_else(|| ModelError::UnknownHold(id.0.clone()))?;
        let hold = &self.holds[index];
        if hold.released || now >= hold.expires_at {
            return Ok((Amount::ZERO, entries));
        }
        let added = more.max(Amount::ZERO).min(self.available(hold.currency, hold.feature.as_ref(), now));
        self.holds[index].amount += added;
        self.holds[index].expires_at = self.holds[index].expires_at.max(expires_at);
        Ok((added, entries))
    }

    /// Usage captured against a hold: the held credit is used first, usage beyond it is booked
    /// all the same (through the normal draw-down order).
    pub fn capture(&mut self, id: &HoldId, spend: &Spend, now: DateTime<Utc>) -> Result<SpendOutcome, ModelError> {
        let index = self.holds.iter().position(|h| &h.id == id).ok_or_else(|| ModelError::UnknownHold(id.0.clone()))?;
        let held = self.holds[index].amount;
        let from_hold = if self.holds[index].is_open_at(now) { held.min(spend.amount) } else { Amount::ZERO };
        self.holds[index].amount = held - from_hold;
        Ok(self.spend(spend, now, Some((id, from_hold))))
    }

    /// Closes holds whose TTL has passed by `now`; returns each with what it still held (credit
    /// that was set aside and never reported).
    pub fn expire_holds(&mut self, now: DateTime<Utc>) -> Vec<(HoldId, Amount)> {
        let mut expired = Vec::new();
        for hold in self.holds.iter_mut().filter(|h| !h.released && h.expires_at <= now) {
            expired.push((hold.id.clone(), hold.amount));
            hold.released = true;
            hold.amount = Amount::ZERO;
        }
        expired
    }

    /// Returns what a hold still sets aside to the live balance.
    pub fn release_hold(&mut self, id: &HoldId) -> Result<Amount, ModelError> {
        let hold = self.holds.iter_mut().find(|h| &h.id == id).ok_or_else(|| ModelError::UnknownHold(id.0.clone()))?;
        let released = if hold.released { Amount::ZERO } else { hold.amount };
        hold.released = true;
        hold.amount = Amount::ZERO;
        Ok(released)
    }

    /// The settled balance of a currency as booked so far, optionally in a feature's scope.
    fn settled(&self, currency: Currency, scope: Option<&FeatureScope>) -> Amount {
        let credit: Amount = self
            .grants
            .iter()
            .filter(|g| g.grant.currency == currency && in_scope(&g.grant.features, scope))
            .map(GrantState::settled_contribution)
            .sum();
        let debt: Amount = self
            .debts
            .iter()
            .filter(|d| d.currency == currency && debt_in_scope(d.feature.as_ref(), scope))
            .map(|d| d.amount)
            .sum();
        credit - debt
    }

    /// Balances per currency at `at` (≥ the book's clock; earlier instants need the journal, see
    /// [`crate::history`]). Expiries and grants that became effective by then are included even
    /// though nothing has booked them yet.
    pub fn balances(&self, at: DateTime<Utc>, scope: Option<&FeatureScope>) -> Vec<CurrencyBalance> {
        let mut view = self.clone();
        view.advance(at);
        let currencies: BTreeSet<Currency> = view
            .grants
            .iter()
            .map(|g| g.grant.currency)
            .chain(view.debts.iter().map(|d| d.currency))
            .chain(view.holds.iter().map(|h| h.currency))
            .collect();
        currencies
            .into_iter()
            .map(|currency| {
                let settled = view.settled(currency, scope);
                let pending = view
                    .grants
                    .iter()
                    .filter(|g| {
                        g.grant.currency == currency
                            && !g.funded
                            && g.grant.voided_at.is_none()
                            && in_scope(&g.grant.features, scope)
                    })
                    .map(|g| g.grant.amount)
                    .sum();
                CurrencyBalance { currency, settled, live: settled - view.held_in_scope(currency, scope, at), pending }
            })
            .collect()
    }

    /// Credit in `scope` set aside by open holds (plus held amounts no credit backs).
    fn held_in_scope(&self, currency: Currency, scope: Option<&FeatureScope>, at: DateTime<Utc>) -> Amount {
        let (free, unbacked) = self.free_credit(currency, at, None);
        let held: Amount = free
            .iter()
            .filter(|(i, _)| in_scope(&self.grants[*i].grant.features, scope))
            .map(|(i, f)| self.grants[*i].remaining() - *f)
            .sum();
        held + unbacked
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
