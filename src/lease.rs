//! The node's leases: their ids, how much credit each should hold, when the node stops spending
//! one, and what to ask the ledger about it on each sync.

use chrono::{DateTime, Utc};
use credits::sync::{LeaseAnswer, LeaseRequest};
use credits::Amount;

use crate::config::FilterConfig;
use crate::customer::{entry_key, origin_hex, CustomerEntry, Lease};
use crate::pricing::Scope;

/// The node's lease for a customer in a scope keeps one id for its entry's life (named by the
/// entry's origin, not by the node, whose id the engine can evict); the ledger re-opens it after
/// it was released. An entry rebuilt after an eviction opens a lease of its own, numbering its
/// requests from 1 again; its predecessor's lease lapses at its TTL.
pub fn id(origin: u64, config: &FilterConfig, scope: &Scope, subject: &str) -> String {
    format!("{}/{}", origin_hex(origin), entry_key(config, scope, subject))
}

/// How long before the ledger could expire a lease the node stops spending from it: long enough
/// for the calls it lets through until then to reach the ledger — the next tick, a sync stuck
/// behind an unanswered one until its timeout, and a tenth of the TTL for the way there.
pub fn reserve_ms(config: &FilterConfig) -> u64 {
    u64::from(config.sync.interval_ms) + u64::from(config.ledger.timeout_ms) + config.lease.ttl_ms / 10
}

/// How long after its request left a lease may be spent from, before the reserve: its TTL, or
/// less when the ledger says the credit behind it expires sooner. Counted on the ledger's
/// clock (`expires_at` against the answer's `server_time`), so the node's clock skew does not
/// matter; an answer whose lease has already expired gives nothing to spend.
pub fn lasts_ms(answer: &LeaseAnswer, server_time: DateTime<Utc>, ttl_ms: u64) -> u64 {
    let left = answer.expires_at.signed_duration_since(server_time).num_milliseconds();
    u64::try_from(left).unwrap_or(0).min(ttl_ms)
}

/// The credit a lease should hold: enough at the observed rate for `lease.horizon_ms`, or until
/// the customer's next turn in a sync (`turn_ms` away) and its answer if that is later, within
/// the configured bounds (in typical calls of the scope).
pub fn target(config: &FilterConfig, scope: &Scope, calls_per_min: u64, turn_ms: u64) -> Amount {
    let l = &config.lease;
    let horizon = l.horizon_ms.max(turn_ms.saturating_add(u64::from(config.ledger.timeout_ms)));
    let calls = (calls_per_min.saturating_mul(horizon) / 60_000).clamp(l.min_calls, l.max_calls);
    scope.typical.times(calls).unwrap_or(scope.typical)
}

/// How long without calls before the node gives a lease back: `lease.idle_release_ms`, or only
/// `lease.horizon_ms` (what the lease was sized for) once the ledger recalled it because another
/// lease of the customer wants the credit; never after the entry itself is forgotten
/// (`sync.idle_ms`), so a lease is released before its entry goes.
pub fn idle_after_ms(lease: &Lease, config: &FilterConfig) -> u64 {
    let l = &config.lease;
    let idle = l.idle_release_ms.min(u64::from(config.sync.idle_ms));
    if lease.recalled {
        idle.min(l.horizon_ms)
    } else {
        idle
    }
}

/// What to ask about the lease now: a top-up below the low-water mark (or enough for a waiting
/// call that needs `for_call`), a release once idle with nothing left to report or settle,
/// otherwise a renewal of an open lease. The customer's next sync is `turn_ms` away.
pub fn request(
    e: &mut CustomerEntry,
    config: &FilterConfig,
    scope: &Scope,
    subject: &str,
    now_ms: u64,
    turn_ms: u64,
    for_call: Option<Amount>,
) -> Option<LeaseRequest> {
    let l = &config.lease;
    let id = id(e.origin, config, scope, subject);
    let idle = now_ms.saturating_sub(e.last_used_ms) > idle_after_ms(&e.lease, config);
    if idle && for_call.is_none() {
        if e.lease.open && e.unsent_calls() == 0 && e.flight.is_none() && e.holds.count == 0 {
            // From now on nothing is spent from it: the ledger gives back whatever it still holds,
            // and answers to earlier requests (which knew the lease open) no longer count.
            e.lease.open = false;
            e.lease.remaining = Amount::ZERO;
            e.lease.recalled = false;
            e.lease.seq += 1;
            e.lease.floor_seq = e.lease.seq;
            return Some(LeaseRequest {
                lease_id: id,
                seq: e.lease.seq,
                want: Amount::ZERO,
                ttl_ms: l.ttl_ms,
                release: true,
            });
        }
        if !e.lease.open {
            return None;
        }
    }
    let target = target(config, scope, e.rate.calls_per_min, turn_ms);
    let remaining = if e.lease.open && now_ms < e.lease.spend_until_ms { e.lease.remaining } else { Amount::ZERO };
    let low = target.percent(l.low_water_percent).unwrap_or(target);
    let want = if for_call.is_some() || remaining < low {
        (target - remaining).max(for_call.unwrap_or(scope.typical))
    } else {
        Amount::ZERO
    };
    if want.is_positive() {
        e.lease.seq += 1;
    } else if !e.lease.open {
        return None;
    }
    Some(LeaseRequest { lease_id: id, seq: e.lease.seq, want, ttl_ms: l.ttl_ms, release: false })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn amt(s: &str) -> Amount {
        Amount::parse(s).unwrap()
    }

    #[test]
    fn a_lease_lasts_until_the_customers_next_turn_in_a_sync() {
        let c = FilterConfig::parse(br#"{"ledger": {"upstream": "l", "token": "t", "timeout_ms": 500}, "price": "0.01", "currency": "USD", "lease": {"max_calls": 100000}}"#).unwrap();
        let scope = &c.pricing.scopes[0];
        // 600 calls a minute: the default horizon (2 × 1 s interval + 0.5 s timeout) is 25 calls …
        assert_eq!(target(&c, scope, 600, 1_000), amt("0.25"));
        // … but a customer synced every 10 ticks needs 10.5 s of calls.
        assert_eq!(target(&c, scope, 600, 10_000), amt("1.05"));
        // Bounded as configured.
        assert_eq!(target(&c, scope, 1, 10_000), amt("0.10"), "lease.min_calls");
    }

    #[test]
    fn an_idle_lease_is_kept_until_the_ledger_recalls_it_or_it_idles_for_idle_release_ms() {
        let c =
            FilterConfig::parse(br#"{"ledger": {"upstream": "l", "token": "t"}, "price": "0.01", "currency": "USD"}"#)
                .unwrap();
        let (scope, minute) = (&c.pricing.scopes[0], 60_000);
        let mut e = CustomerEntry::new("k", "s", 1, 0);
        e.lease = Lease { open: true, seq: 1, remaining: amt("0.10"), spend_until_ms: u64::MAX, ..Lease::default() };
        let ask = |e: &mut CustomerEntry, now_ms| request(e, &c, scope, "s", now_ms, 1_000, None).unwrap();
        // A customer who called a minute ago keeps its lease: renewed, nothing asked.
        let renewal = ask(&mut e, minute);
        assert_eq!((renewal.release, renewal.want, renewal.seq), (false, Amount::ZERO, 1));
        // Recalled: kept while it serves calls (within lease.horizon_ms), given back once idle.
        e.lease.recalled = true;
        e.last_used_ms = minute - c.lease.horizon_ms;
        assert!(!ask(&mut e, minute).release, "used within the horizon");
        let release = ask(&mut e, minute + 1);
        assert_eq!((release.release, release.seq, e.lease.open, e.lease.recalled), (true, 2, false, false));
        // Not recalled: given back after lease.idle_release_ms (5 minutes by default) without calls.
        let mut e = CustomerEntry::new("k", "s", 1, 0);
        e.lease = Lease { open: true, seq: 1, remaining: amt("0.10"), spend_until_ms: u64::MAX, ..Lease::default() };
        assert!(!ask(&mut e, c.lease.idle_release_ms).release);
        assert!(ask(&mut e, c.lease.idle_release_ms + 1).release);
    }

    #[test]
    fn the_longest_lease_id_fits_what_the_ledger_accepts() {
        let feature = "f".repeat(credits::limits::MAX_FEATURE_KEY_LEN);
        let json = format!(
            r#"{{"ledger": {{"upstream": "l", "token": "t"}}, "price": "1", "currency": "USD", "feature_key": "{feature}"}}"#
        );
        let c = FilterConfig::parse(json.as_bytes()).unwrap();
        let subject = "s".repeat(credits::limits::MAX_SUBJECT_LEN);
        let longest = id(u64::MAX, &c, &c.pricing.scopes[0], &subject);
        assert!(longest.len() <= credits::limits::MAX_LEASE_ID_LEN, "{} bytes", longest.len());
    }
}
