//! How the ledger serves one subject of a gateway sync: book the usage range once, capture it
//! against the lease it was spent from, then open, top up, renew or release the lease — all on
//! the customer's book, so the ledger and the protocol simulator run the same decisions. What
//! the ledger knows from its store (was this range booked before? who owns this lease?) comes in
//! as [`Facts`]; what it must store goes out in [`Served`].

use chrono::{DateTime, TimeDelta, Utc};

use crate::book::{Book, HoldId, Spend};
use crate::error::ModelError;
use crate::feature::{FeatureFilter, FeatureScope};
use crate::grant::{FundingMethod, Grant, GrantId, GrantSpec, Priority};
use crate::journal::Entry;
use crate::limits::{
    MAX_CALLS_PER_RANGE, MAX_CALL_NUMBER, MAX_LEASE_ID_LEN, MAX_LEASE_TTL_MS, MAX_ORIGIN_LEN, MAX_SUBJECT_LEN,
};
use crate::money::Amount;
use crate::sync::{LeaseAnswer, LeaseRequest, SubjectSync, UsageOutcome, UsageRange};

/// What the store knows about the subject's request.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Facts {
    /// The usage range's key was recorded before (a retry).
    pub usage_seen: bool,
    /// The lease id as stored, if it ever existed.
    pub lease: Option<LeaseFacts>,
    /// The id the credit a range gives back gets, if it gives some back (`UsageRange::refunded`).
    pub refund_id: Option<GrantId>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LeaseFacts {
    pub owned_by_this_customer: bool,
    pub closed: bool,
    /// The highest top-up request number applied.
    pub last_seq: i64,
}

/// What serving the subject did.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Served {
    pub usage: Option<UsageOutcome>,
    /// Record the usage range's key (it was booked now).
    pub record_usage: bool,
    /// Journal entries of the usage (and of its refund).
    pub entries: Vec<Entry>,
    /// The grant the range's refund was booked as (new: the store inserts it).
    pub refund: Option<Grant>,
    pub lease: Option<LeaseAnswer>,
    /// Store this as the lease's last applied request number.
    pub lease_seq: Option<i64>,
    pub lease_opened: bool,
    pub lease_released: bool,
    /// Leases of the customer that expired still holding credit (closed now).
    pub expired_unreported: usize,
    /// The live balance in the subject's currency and feature scope, after all of it.
    pub live: Amount,
}

/// Why a subject's request cannot be served (the rest of the batch still is).
pub fn invalid(s: &SubjectSync) -> Option<String> {
    if s.subject.is_empty() || s.subject.len() > MAX_SUBJECT_LEN {
        return Some(format!("subject must have 1..{MAX_SUBJECT_LEN} characters"));
    }
    s.usage.as_ref().and_then(invalid_usage).or_else(|| s.lease.as_ref().and_then(invalid_lease))
}

fn invalid_usage(r: &UsageRange) -> Option<String> {
    if r.from >= r.to {
        return Some(format!("usage range {}..{} is empty", r.from, r.to));
    }
    if r.to > MAX_CALL_NUMBER {
        return Some(format!("usage range must end at or below call {MAX_CALL_NUMBER}"));
    }
    if r.calls() > MAX_CALLS_PER_RANGE {
        return Some(format!("usage range holds more than {MAX_CALLS_PER_RANGE} calls"));
    }
    if r.amount.is_negative() {
        return Some("usage amount must not be negative".into());
    }
    if r.refunded.is_negative() {
        return Some("usage refunded must not be negative".into());
    }
    if let Err(e) = r.refunded.bounded() {
        return Some(format!("usage refunded {e}"));
    }
    if r.origin.as_ref().is_some_and(|o| o.is_empty() || o.len() > MAX_ORIGIN_LEN || o.contains('/')) {
        return Some(format!("usage origin must have 1..{MAX_ORIGIN_LEN} characters and no '/'"));
    }
    r.amount.bounded().err().map(|e| format!("usage {e}"))
}

fn invalid_lease(l: &LeaseRequest) -> Option<String> {
    if l.lease_id.is_empty() || l.lease_id.len() > MAX_LEASE_ID_LEN {
        return Some(format!("lease_id must have 1..{MAX_LEASE_ID_LEN} characters"));
    }
    if l.want.is_negative() {
        return Some("a lease cannot want a negative amount".into());
    }
    if let Err(e) = l.want.bounded() {
        return Some(format!("lease want {e}"));
    }
    if !(1..=MAX_LEASE_TTL_MS).contains(&l.ttl_ms) {
        return Some(format!("lease ttl_ms must be between 1 and {MAX_LEASE_TTL_MS}"));
    }
    if i64::try_from(l.seq).is_err() {
        return Some("lease seq is too large".into());
    }
    None
}

/// Serves one (valid) subject on its customer's book at `now`. On an error (an amount that would
/// overflow) the book is left as it was and nothing is to be stored: the subject is rejected.
pub fn try_serve(book: &mut Book, s: &SubjectSync, facts: &Facts, now: DateTime<Utc>) -> Result<Served, ModelError> {
    let before = book.clone();
    serve_in(book, s, facts, now).inspect_err(|_| *book = before)
}

fn serve_in(book: &mut Book, s: &SubjectSync, facts: &Facts, now: DateTime<Utc>) -> Result<Served, ModelError> {
    // What fell due first (expiries, grants becoming effective), so nothing below books it
    // unseen; then leases whose TTL passed.
    let mut served = Served { entries: book.try_advance(now)?, ..Served::default() };
    served.expired_unreported = book.expire_holds(now).iter().filter(|(_, held)| held.is_positive()).count();
    if let Some(range) = &s.usage {
        if facts.usage_seen {
            served.usage = Some(UsageOutcome::Duplicate);
        } else {
            served.usage = Some(UsageOutcome::Booked);
            served.record_usage = true;
            if range.amount.is_positive() {
                let spend = Spend {
                    currency: s.currency,
                    amount: range.amount,
                    feature: s.feature_key.clone(),
                    mode: range.settlement_mode,
                };
                // Usage spent from a lease is captured against it; usage beyond it, or after it
                // closed, is booked all the same.
                let lease = range
                    .lease_id
                    .as_ref()
                    .map(|id| HoldId(id.clone()))
                    .filter(|id| book.hold(id).is_some_and(|h| !h.released));
                let outcome = match lease {
                    Some(id) => book.capture(&id, &spend, now)?,
                    None => book.book_usage(&spend, now)?,
                };
                served.entries.extend(outcome.entries);
            }
            if range.refunded.is_positive() {
                let id = facts.refund_id.clone().ok_or(ModelError::RefundWithoutId)?;
                let grant = refund_grant(s, range.refunded, id, now)?;
                served.entries.extend(book.adjust(s.currency, range.refunded, Some(grant.clone()), now)?);
                served.refund = Some(grant);
            }
        }
    }
    if let Some(request) = &s.lease {
        serve_lease(book, s, request, facts.lease.as_ref(), now, &mut served)?;
    }
    let scope = s.feature_key.clone().map(FeatureScope::Eq);
    served.live = book
        .try_balances(now, scope.as_ref())?
        .into_iter()
        .find(|b| b.currency == s.currency)
        .map(|b| b.live)
        .unwrap_or_default();
    Ok(served)
}

/// Credit given back for calls that were charged and then cost less: an adjustment in the
/// range's scope (restricted to its feature, if it has one), never expiring, drawn down like any
/// other credit of default priority. Credit of its own rather than usage undone: the grants that
/// paid for the calls may have expired or been voided since.
fn refund_grant(s: &SubjectSync, amount: Amount, id: GrantId, now: DateTime<Utc>) -> Result<Grant, ModelError> {
    let features = s.feature_key.clone().map_or_else(FeatureFilter::unrestricted, |f| FeatureFilter::only(vec![f]));
    let spec = GrantSpec {
        currency: s.currency,
        amount,
        funding_method: FundingMethod::None,
        purchase: None,
        priority: Priority::DEFAULT,
        effective_at: Some(now),
        expires_after: None,
        features,
    };
    Grant::new(spec, id, now, 0)
}

fn serve_lease(
    book: &mut Book,
    s: &SubjectSync,
    request: &LeaseRequest,
    known: Option<&LeaseFacts>,
    now: DateTime<Utc>,
    served: &mut Served,
) -> Result<(), ModelError> {
    let id = HoldId(request.lease_id.clone());
    let ttl = TimeDelta::milliseconds(i64::try_from(request.ttl_ms).unwrap_or(i64::MAX));
    let expires_at = now.checked_add_signed(ttl).unwrap_or(DateTime::<Utc>::MAX_UTC);
    let seq = i64::try_from(request.seq).unwrap_or(i64::MAX);
    let closed = LeaseAnswer {
        lease_id: request.lease_id.clone(),
        held: Amount::ZERO,
        granted: Amount::ZERO,
        expires_at: now,
        closed: true,
        recalled: false,
    };
    let open = known.is_some_and(|k| !k.closed) && book.hold(&id).is_some_and(|h| !h.released);
    match known {
        // Lease ids name an origin and the subject, so this is a misbehaving gateway: grant nothing.
        Some(k) if !k.owned_by_this_customer => served.lease = Some(closed),
        // A release numbered below a request already applied was overtaken (the node asked
        // again after releasing, and that arrived first): the lease stays as it is.
        Some(k) if open && request.release && seq > k.last_seq => {
            let _ = book.release_hold(&id);
            served.lease_released = true;
            served.lease_seq = Some(seq);
            served.lease = Some(closed);
        }
        Some(k) if open => {
            // A request number already applied is a retry (or overtaken): it renews but adds nothing.
            // A renewal (wanting nothing) applies no number: it repeats the node's latest one,
            // whose top-up may still be on its way here (Kong's workers each renew in their tick
            // while their calls send top-ups), and that top-up must still add.
            let want = if seq > k.last_seq && !request.release { request.want } else { Amount::ZERO };
            let granted = only_overflow(book.extend_hold(&id, want, expires_at, now))?.0;
            recall_if_short(book, s, &id, want, granted, now);
            let held = book.hold(&id).map_or(Amount::ZERO, |h| h.amount);
            let recalled = book.hold(&id).is_some_and(|h| h.recalled);
            // Earlier than the TTL when the credit behind the lease expires sooner.
            let expires_at = book.spend_by(&id).unwrap_or(expires_at);
            served.lease_seq = (seq > k.last_seq && want.is_positive()).then_some(seq);
            let lease_id = request.lease_id.clone();
            served.lease = Some(LeaseAnswer { lease_id, held, granted, expires_at, closed: false, recalled });
        }
        _ if request.release => served.lease = Some(closed),
        // A top-up or renewal the node sent before it released the lease, arriving after: the
        // lease stays closed (a request numbered past the release opens it again).
        Some(k) if seq <= k.last_seq => served.lease = Some(closed),
        // New, or closed before (released or expired): open it, carved out of what is live.
        known => {
            let last_seq = known.map_or(-1, |k| k.last_seq);
            let want = if seq > last_seq { request.want } else { Amount::ZERO };
            let placed = book.place_hold(id.clone(), s.currency, s.feature_key.clone(), want, expires_at, now);
            let granted = only_overflow(placed)?.0;
            recall_if_short(book, s, &id, want, granted, now);
            // Earlier than the TTL when the credit behind the lease expires sooner.
            let expires_at = book.spend_by(&id).unwrap_or(expires_at);
            served.lease_seq = Some(if want.is_positive() { seq.max(last_seq) } else { last_seq });
            served.lease_opened = true;
            served.lease = Some(LeaseAnswer {
                lease_id: request.lease_id.clone(),
                held: granted,
                granted,
                expires_at,
                closed: false,
                recalled: false,
            });
        }
    }
    Ok(())
}

/// A lease granted less than it wanted recalls the customer's other leases in the currency:
/// credit idle in one (another node's, or another feature scope's) then comes back to the live
/// balance within the holder's next syncs instead of sitting there until its TTL.
fn recall_if_short(book: &mut Book, s: &SubjectSync, id: &HoldId, want: Amount, granted: Amount, now: DateTime<Utc>) {
    if granted < want {
        book.recall_holds(s.currency, Some(id), now);
    }
}

/// A lease operation's result where only an overflow is an error: an unknown or duplicate hold
/// (a gateway's mistake about its own lease) grants nothing, as if nothing was available.
fn only_overflow<T: Default>(result: Result<T, ModelError>) -> Result<T, ModelError> {
    match result {
        Err(e @ ModelError::AmountOverflow(_)) => Err(e),
        other => Ok(other.unwrap_or_default()),
    }
}
