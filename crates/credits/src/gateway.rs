//! How the ledger serves one subject of a gateway sync: book the usage range once, capture it
//! against the lease it was spent from, then open, top up, renew or release the lease — all on
//! the customer's book, so the ledger and the protocol simulator run the same decisions. What
//! the ledger knows from its store (was this range booked before? who owns this lease?) comes in
//! as [`Facts`]; what it must store goes out in [`Served`].

use chrono::{DateTime, TimeDelta, Utc};

use crate::book::{Book, HoldId, Spend};
use crate::feature::FeatureScope;
use crate::journal::Entry;
use crate::money::Amount;
use crate::sync::{LeaseAnswer, SubjectSync, UsageOutcome, MAX_CALLS_PER_RANGE};

/// What the store knows about the subject's request.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Facts {
    /// The usage range's key was recorded before (a retry).
    pub usage_seen: bool,
    /// The lease id as stored, if it ever existed.
    pub lease: Option<LeaseFacts>,
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
    /// Journal entries of the usage.
    pub entries: Vec<Entry>,
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
    if s.subject.is_empty() || s.subject.len() > 256 {
        return Some("subject must have 1..256 characters".into());
    }
    if let Some(r) = &s.usage {
        if r.from >= r.to {
            return Some(format!("usage range {}..{} is empty", r.from, r.to));
        }
        if r.calls() > MAX_CALLS_PER_RANGE {
            return Some(format!("usage range holds more than {MAX_CALLS_PER_RANGE} calls"));
        }
        if r.amount.is_negative() {
            return Some("usage amount must not be negative".into());
        }
    }
    if let Some(l) = &s.lease {
        if l.lease_id.is_empty() || l.lease_id.len() > 512 {
            return Some("lease_id must have 1..512 characters".into());
        }
        if l.want.is_negative() {
            return Some("a lease cannot want a negative amount".into());
        }
        if !(1..=3_600_000).contains(&l.ttl_ms) {
            return Some("lease ttl_ms must be between 1 and 3600000".into());
        }
        if i64::try_from(l.seq).is_err() {
            return Some("lease seq is too large".into());
        }
    }
    None
}

/// Serves one (valid) subject on its customer's book at `now`.
pub fn serve(book: &mut Book, s: &SubjectSync, facts: &Facts, now: DateTime<Utc>) -> Served {
    // What fell due first (expiries, grants becoming effective), so nothing below books it
    // unseen; then leases whose TTL passed.
    let mut served = Served { entries: book.advance(now), ..Served::default() };
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
                let outcome = match lease.and_then(|id| book.capture(&id, &spend, now).ok()) {
                    Some(outcome) => outcome,
                    None => book.book_usage(&spend, now),
                };
                served.entries.extend(outcome.entries);
            }
        }
    }
    if let Some(request) = &s.lease {
        serve_lease(book, s, request, facts.lease.as_ref(), now, &mut served);
    }
    let scope = s.feature_key.clone().map(FeatureScope::Eq);
    served.live = book
        .balances(now, scope.as_ref())
        .into_iter()
        .find(|b| b.currency == s.currency)
        .map(|b| b.live)
        .unwrap_or_default();
    served
}

fn serve_lease(
    book: &mut Book,
    s: &SubjectSync,
    request: &crate::sync::LeaseRequest,
    known: Option<&LeaseFacts>,
    now: DateTime<Utc>,
    served: &mut Served,
) {
    let id = HoldId(request.lease_id.clone());
    let expires_at = now + TimeDelta::milliseconds(i64::try_from(request.ttl_ms).unwrap_or(i64::MAX));
    let seq = i64::try_from(request.seq).unwrap_or(i64::MAX);
    let closed = LeaseAnswer {
        lease_id: request.lease_id.clone(),
        held: Amount::ZERO,
        granted: Amount::ZERO,
        expires_at: now,
        closed: true,
    };
    let open = known.is_some_and(|k| !k.closed) && book.hold(&id).is_some_and(|h| !h.released);
    match known {
        // Lease ids name node and subject, so this is a misbehaving gateway: grant nothing.
        Some(k) if !k.owned_by_this_customer => served.lease = Some(closed),
        Some(k) if open => {
            // A release numbered below a request already applied was overtaken (the node asked
            // again after releasing, and that arrived first): the lease stays as it is.
            if request.release && seq > k.last_seq {
                let _ = book.release_hold(&id);
                served.lease_released = true;
                served.lease_seq = Some(seq);
                served.lease = Some(closed);
                return;
            }
            // A request number already applied is a retry (or overtaken): it renews but adds nothing.
            let want = if seq > k.last_seq && !request.release { request.want } else { Amount::ZERO };
            let granted = book.extend_hold(&id, want, expires_at, now).map(|(g, _)| g).unwrap_or_default();
            let (held, expires_at) = book.hold(&id).map_or((Amount::ZERO, expires_at), |h| (h.amount, h.expires_at));
            served.lease_seq = (seq > k.last_seq).then_some(seq);
            served.lease =
                Some(LeaseAnswer { lease_id: request.lease_id.clone(), held, granted, expires_at, closed: false });
        }
        _ if request.release => served.lease = Some(closed),
        // New, or closed before (released or expired): open it, carved out of what is live.
        known => {
            let last_seq = known.map_or(-1, |k| k.last_seq);
            let want = if seq > last_seq { request.want } else { Amount::ZERO };
            let granted = book
                .place_hold(id, s.currency, s.feature_key.clone(), want, expires_at, now)
                .map(|(g, _)| g)
                .unwrap_or_default();
            served.lease_seq = Some(seq.max(last_seq));
            served.lease_opened = true;
            served.lease = Some(LeaseAnswer {
                lease_id: request.lease_id.clone(),
                held: granted,
                granted,
                expires_at,
                closed: false,
            });
        }
    }
}
