//! Holds: credit set aside for in-flight spending (gateway leases).
//!
//! A hold is backed by named grants: each of its credits sits on one grant ([`HoldBacking`]).
//! That makes its life exact: the holder may spend it until [`Book::spend_by`] — its TTL, or the
//! first expiry of the credit behind it if sooner; when a backing grant expires or is voided,
//! every hold loses its backing on it and keeps the rest (usage spent in time but reported late
//! is still covered by what is left). Usage captured against a hold is drawn in draw-down order
//! from its backing and the free credit alike. Other spending uses only credit no open hold backs.
//!
//! Backing is chosen for a long life: first credit that outlives the hold's TTL, in draw-down
//! order (so short-lived promotional credit is still used first when it lasts long enough), then
//! what expires sooner, latest expiry first — the hold's `spend_by` then comes early and the
//! holder renews onto other credit in time.

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use super::{Book, Spend, SpendOutcome};
use crate::error::{AmountOverflow, ModelError};
use crate::feature::FeatureKey;
use crate::grant::GrantId;
use crate::journal::Entry;
use crate::money::{Amount, Currency};

#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(transparent)]
pub struct HoldId(pub String);

/// Credit a hold sets aside on one grant.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct HoldBacking {
    pub grant_id: GrantId,
    pub amount: Amount,
}

/// Credit set aside for in-flight spending (a gateway lease). It lowers the live balance.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Hold {
    pub id: HoldId,
    pub currency: Currency,
    pub feature: Option<FeatureKey>,
    /// What is still held: the sum of `backing`.
    pub amount: Amount,
    /// Which grants the held credit sits on. Empty with a positive `amount` only in a hold
    /// stored before holds were backed: [`Book::from_parts`] backs it on load.
    pub backing: Vec<HoldBacking>,
    pub created_at: DateTime<Utc>,
    /// The hold closes at this instant (its TTL, renewed by each top-up or renewal); what it
    /// still holds then returns to the live balance.
    pub expires_at: DateTime<Utc>,
    pub released: bool,
    /// Someone else could not get all the credit they asked for while this hold was open (another
    /// lease of the customer was granted less than it wanted): its holder should give it back as
    /// soon as it has no use for it. Only closing the hold clears it.
    #[serde(default)]
    pub recalled: bool,
}

impl Hold {
    pub fn is_open_at(&self, at: DateTime<Utc>) -> bool {
        !self.released && self.amount.is_positive() && self.created_at <= at && at < self.expires_at
    }

    /// What it sets aside on `grant` at `at`.
    pub(super) fn backing_on(&self, grant: &GrantId, at: DateTime<Utc>) -> Amount {
        if !self.is_open_at(at) {
            return Amount::ZERO;
        }
        self.backing.iter().find(|b| &b.grant_id == grant).map_or(Amount::ZERO, |b| b.amount)
    }

    fn close(&mut self) -> Amount {
        let held = if self.released { Amount::ZERO } else { self.amount };
        self.released = true;
        self.amount = Amount::ZERO;
        self.backing.clear();
        held
    }

    /// Takes `amount` of the backing on `grant` away (consumed from it, or the grant voided).
    fn take_from(&mut self, grant: &GrantId, amount: Amount) -> Result<(), AmountOverflow> {
        if let Some(b) = self.backing.iter_mut().find(|b| &b.grant_id == grant) {
            let taken = amount.min(b.amount);
            b.amount = b.amount.try_sub(taken)?;
            self.amount = self.amount.try_sub(taken)?;
        }
        self.backing.retain(|b| b.amount.is_positive());
        Ok(())
    }

    fn backed_total(&self) -> Result<Amount, AmountOverflow> {
        Amount::try_sum(self.backing.iter().map(|b| b.amount))
    }
}

impl Book {
    pub fn holds(&self) -> &[Hold] {
        &self.holds
    }

    pub fn hold(&self, id: &HoldId) -> Option<&Hold> {
        self.holds.iter().find(|h| &h.id == id)
    }

    /// Recalls every hold in `currency` open at `now` but `except` (the one that asked): their
    /// holders are to give back what they do not use. Returns how many were newly recalled.
    pub fn recall_holds(&mut self, currency: Currency, except: Option<&HoldId>, now: DateTime<Utc>) -> usize {
        let recallable = |h: &Hold| h.currency == currency && Some(&h.id) != except && h.is_open_at(now) && !h.recalled;
        self.holds.iter_mut().filter(|h| recallable(h)).map(|h| h.recalled = true).count()
    }

    /// Sets credit aside: up to `requested`, less when less is available (down to zero), until
    /// `ttl_expiry`.
    pub fn place_hold(
        &mut self,
        id: HoldId,
        currency: Currency,
        feature: Option<FeatureKey>,
        requested: Amount,
        ttl_expiry: DateTime<Utc>,
        now: DateTime<Utc>,
    ) -> Result<(Amount, Vec<Entry>), ModelError> {
        // A released hold's id may be used again (a gateway re-opens its lease under one id).
        if self.hold(&id).is_some_and(|h| !h.released) {
            return Err(ModelError::DuplicateHold(id.0));
        }
        self.atomically(|book| {
            book.holds.retain(|h| h.id != id);
            let entries = book.advance_in(now)?;
            book.holds.push(Hold {
                id,
                currency,
                feature,
                amount: Amount::ZERO,
                backing: Vec::new(),
                created_at: now,
                expires_at: ttl_expiry,
                released: false,
                recalled: false,
            });
            let index = book.holds.len().saturating_sub(1);
            let granted = book.back_hold(index, requested.max(Amount::ZERO), ttl_expiry, now)?;
            Ok((granted, entries))
        })
    }

    /// Adds to an open hold what is available, up to `more`, and renews it until `ttl_expiry`:
    /// its backing is chosen again, so credit that expires soon gives way to longer-lived
    /// credit. Returns what was added.
    pub fn extend_hold(
        &mut self,
        id: &HoldId,
        more: Amount,
        ttl_expiry: DateTime<Utc>,
        now: DateTime<Utc>,
    ) -> Result<(Amount, Vec<Entry>), ModelError> {
        let index = self.holds.iter().position(|h| &h.id == id).ok_or_else(|| ModelError::UnknownHold(id.0.clone()))?;
        self.atomically(|book| {
            let entries = book.advance_in(now)?;
            let hold = &book.holds[index];
            if hold.released || now >= hold.expires_at {
                return Ok((Amount::ZERO, entries));
            }
            let before = hold.amount;
            let want = before.try_add(more.max(Amount::ZERO))?;
            let added = book.back_hold(index, want, ttl_expiry, now)?.try_sub(before)?;
            Ok((if more.is_positive() { added.max(Amount::ZERO) } else { Amount::ZERO }, entries))
        })
    }

    /// Chooses the backing of hold `index` anew for `want` (its own backing counts as free),
    /// sets its amount and renews it until at least `ttl_expiry`; returns what it now holds.
    fn back_hold(
        &mut self,
        index: usize,
        want: Amount,
        ttl_expiry: DateTime<Utc>,
        now: DateTime<Utc>,
    ) -> Result<Amount, AmountOverflow> {
        let (currency, feature) = (self.holds[index].currency, self.holds[index].feature.clone());
        self.holds[index].backing.clear();
        self.holds[index].amount = Amount::ZERO;
        let mut candidates: Vec<(usize, Amount)> = self
            .free_credit(currency, now)?
            .into_iter()
            .filter(|(i, f)| f.is_positive() && self.grants[*i].grant.admits(currency, feature.as_ref(), now))
            .collect();
        // Credit that outlives the TTL first (in draw-down order), then the latest expiry first.
        candidates.sort_by_key(|(i, _)| {
            let g = &self.grants[*i].grant;
            let short = g.expires_at.filter(|e| *e < ttl_expiry);
            (short.is_some(), std::cmp::Reverse(short), g.draw_down_key())
        });
        let mut left = want;
        for (i, free) in candidates {
            if left.is_zero() {
                break;
            }
            let take = left.min(free);
            self.holds[index].backing.push(HoldBacking { grant_id: self.grants[i].grant.id.clone(), amount: take });
            left = left.try_sub(take)?;
        }
        let hold = &mut self.holds[index];
        // The sum of its backing (written so, the amount keeps the scale it was asked in).
        hold.amount = want.try_sub(left)?;
        hold.expires_at = hold.expires_at.max(ttl_expiry);
        Ok(hold.amount)
    }

    /// Usage captured against a hold: what the hold set aside guarantees it is covered, up to
    /// what it holds; it is paid in draw-down order from that credit and the free credit alike
    /// (set aside or not, it is the customer's credit). Usage beyond the hold is booked all the
    /// same, from free credit.
    pub fn capture(&mut self, id: &HoldId, spend: &Spend, now: DateTime<Utc>) -> Result<SpendOutcome, ModelError> {
        let index = self.holds.iter().position(|h| &h.id == id).ok_or_else(|| ModelError::UnknownHold(id.0.clone()))?;
        self.atomically(|book| {
            let from_hold = if book.holds[index].is_open_at(now) {
                book.holds[index].amount.min(spend.amount)
            } else {
                Amount::ZERO
            };
            book.spend(spend, now, Some((index, from_hold)))
        })
    }

    /// Which grants (by index) pay `spend` captured against hold `index`: free credit and the
    /// hold's own backing together, in draw-down order.
    pub(super) fn plan_capture(
        &self,
        index: usize,
        spend: &Spend,
        at: DateTime<Utc>,
    ) -> Result<Vec<(usize, Amount)>, AmountOverflow> {
        let mut pool = self.free_credit(spend.currency, at)?;
        if self.holds[index].is_open_at(at) {
            for b in &self.holds[index].backing {
                let Some(i) = self.grants.iter().position(|g| g.grant.id == b.grant_id) else { continue };
                match pool.iter_mut().find(|(j, _)| *j == i) {
                    Some((_, free)) => *free = free.try_add(b.amount)?,
                    None => pool.push((i, b.amount)),
                }
            }
        }
        pool.sort_by_key(|(i, _)| self.grants[*i].grant.draw_down_key());
        let mut left = spend.amount;
        let mut plan = Vec::new();
        for (i, credit) in pool {
            if left.is_zero() {
                break;
            }
            if self.grants[i].grant.admits(spend.currency, spend.feature.as_ref(), at) {
                let take = left.min(credit);
                plan.push((i, take));
                left = left.try_sub(take)?;
            }
        }
        Ok(plan)
    }

    /// After a capture booked: hold `index` holds `paid` less. Its backing keeps only what its
    /// grants still have beyond the other holds, and gives up its shortest-lived credit first
    /// (so its `spend_by` never comes earlier than before).
    pub(super) fn settle_capture(
        &mut self,
        index: usize,
        paid: Amount,
        at: DateTime<Utc>,
    ) -> Result<(), AmountOverflow> {
        let id = self.holds[index].id.clone();
        let mut kept = Vec::new();
        for b in &self.holds[index].backing {
            let Some(g) = self.grant(&b.grant_id) else { continue };
            let others = self.holds.iter().filter(|h| h.id != id).map(|h| h.backing_on(&b.grant_id, at));
            let room = g.remaining()?.try_sub(Amount::try_sum(others)?)?.max(Amount::ZERO);
            let expiry = g.grant.expires_at;
            kept.push((
                expiry.is_none(),
                expiry,
                HoldBacking { grant_id: b.grant_id.clone(), amount: b.amount.min(room) },
            ));
        }
        let target = self.holds[index].amount.try_sub(paid)?.max(Amount::ZERO);
        let mut excess = Amount::try_sum(kept.iter().map(|(_, _, b)| b.amount))?.try_sub(target)?;
        kept.sort_by_key(|(never, expiry, _)| (*never, *expiry));
        for (_, _, b) in &mut kept {
            let give_up = excess.max(Amount::ZERO).min(b.amount);
            b.amount = b.amount.try_sub(give_up)?;
            excess = excess.try_sub(give_up)?;
        }
        let hold = &mut self.holds[index];
        hold.backing = kept.into_iter().map(|(_, _, b)| b).filter(|b| b.amount.is_positive()).collect();
        // Never more than its backing (equal unless a grant could not keep what it backed).
        hold.amount = target.min(hold.backed_total()?);
        Ok(())
    }

    /// A voided or expired grant backs nothing: every hold loses its backing on it.
    pub(super) fn unback_grant(&mut self, grant: &GrantId) -> Result<(), AmountOverflow> {
        for hold in &mut self.holds {
            let on_grant = hold.backing.iter().find(|b| &b.grant_id == grant).map(|b| b.amount);
            if let Some(amount) = on_grant {
                hold.take_from(grant, amount)?;
            }
        }
        Ok(())
    }

    /// Backs holds stored before holds had backing, oldest first, as if placed now.
    pub(super) fn back_unbacked_holds(&mut self) -> Result<(), AmountOverflow> {
        let at = self.clock;
        for index in 0..self.holds.len() {
            let hold = &self.holds[index];
            if hold.backing.is_empty() && !hold.released && hold.amount.is_positive() {
                let (want, ttl_expiry) = (hold.amount, hold.expires_at);
                self.back_hold(index, want, ttl_expiry, at)?;
            }
        }
        Ok(())
    }

    /// Closes holds whose `expires_at` has passed by `now`; returns each with what it still
    /// held (credit that was set aside and never reported).
    pub fn expire_holds(&mut self, now: DateTime<Utc>) -> Vec<(HoldId, Amount)> {
        let due = self.holds.iter_mut().filter(|h| !h.released && h.expires_at <= now);
        due.map(|hold| (hold.id.clone(), hold.close())).collect()
    }

    /// Returns what a hold still sets aside to the live balance.
    pub fn release_hold(&mut self, id: &HoldId) -> Result<Amount, ModelError> {
        let hold = self.holds.iter_mut().find(|h| &h.id == id).ok_or_else(|| ModelError::UnknownHold(id.0.clone()))?;
        Ok(hold.close())
    }

    /// Until when the holder may spend hold `id`: its TTL, or the first expiry of the credit
    /// behind it if that comes sooner.
    pub fn spend_by(&self, id: &HoldId) -> Option<DateTime<Utc>> {
        let hold = self.hold(id)?;
        let expiries = hold.backing.iter().filter_map(|b| self.grant(&b.grant_id)?.grant.expires_at);
        Some(expiries.fold(hold.expires_at, DateTime::min))
    }

    /// Every open hold is exactly its backing, on grants that can still pay, and no grant backs
    /// more than it has left.
    pub(super) fn holds_are_backed(&self, at: DateTime<Utc>) -> bool {
        let within_grants = self.grants.iter().all(|g| {
            let backed = Amount::try_sum(self.holds.iter().map(|h| h.backing_on(&g.grant.id, at)));
            matches!((backed, g.remaining()), (Ok(b), Ok(r)) if b <= r)
        });
        within_grants
            && self.holds.iter().filter(|h| h.is_open_at(at)).all(|h| {
                h.backed_total().is_ok_and(|t| t == h.amount)
                    && h.backing.iter().all(|b| {
                        self.grant(&b.grant_id).is_some_and(|g| g.grant.admits(h.currency, h.feature.as_ref(), at))
                    })
            })
    }
}
