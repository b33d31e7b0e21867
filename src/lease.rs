//! The node's leases: their ids, how much credit each should hold, when the node stops spending
//! one, and what to ask the ledger about it on each sync.

use chrono::{DateTime, Utc};
use credits::limits::MAX_AMOUNT;
use credits::sync::{LeaseAnswer, LeaseRequest};
use credits::Amount;

use crate::config::FilterConfig;
use crate::customer::{push_origin_hex, CustomerEntry, Lease};
use crate::pricing::Scope;

/// The node's lease for a customer in a scope keeps one id for its entry's life (named by the
/// entry's origin, not by the node, whose id the engine can evict); the ledger re-opens it after
/// it was released. An entry rebuilt after an eviction opens a lease of its own, numbering its
/// requests from 1 again; its predecessor's lease lapses at its TTL.
pub fn id(e: &CustomerEntry) -> String {
    let mut id = String::with_capacity(16 + 1 + e.key.len());
    push_origin_hex(&mut id, e.origin);
    id.push('/');
    id.push_str(&e.key);
    id
}

/// How long before the ledger could expire a lease the node stops spending from it, on a worker
/// that reaches each customer every `turn_ms`: long enough for the calls it lets through until
/// then to reach the ledger — the customer's next turn (the next tick at the least,
/// [`longest_turn_ms`] at the most), then [`reserve_beyond_turn_ms`]. Counted from the tick
/// alone, a worker whose turns were longer booked the last stretch's calls after the credit
/// behind them expired (`sync::tests::credit_is_never_spent_after_it_expires_on_a_worker_whose_turns_are_long`).
/// A worker whose turns are longer than the bound (a ledger that does not keep up holds it to
/// fewer syncs) is no better than an unreachable ledger: its leases stay spendable, and the
/// calls of their last stretch may be booked after the credit behind them expired.
pub fn reserve_ms(config: &FilterConfig, turn_ms: u64) -> u64 {
    let turn_ms = turn_ms.clamp(u64::from(config.sync.interval_ms), longest_turn_ms(config));
    turn_ms + reserve_beyond_turn_ms(config)
}

/// The longest a customer's turns may be apart so that its lease is still usable when the next
/// turn's sync fails and goes again at the next tick
/// ([`FilterConfig::answered_despite_a_failure_ms`], F): a lease may be spent until `lease.ttl_ms`
/// less the reserve after its request left, and the reserve holds a turn, so turns T apart need
/// ttl − (T + the rest of the reserve) ≥ T + F (11.5 s with the defaults; never less than a
/// tick). Sent again only at the customer's next turn, a failed sync's customers needed
/// ttl − reserve ≥ 2T + timeout.
pub fn longest_turn_ms(config: &FilterConfig) -> u64 {
    let usable = config.lease.ttl_ms.saturating_sub(reserve_beyond_turn_ms(config));
    let bound = usable.saturating_sub(config.answered_despite_a_failure_ms()) / 2;
    bound.max(u64::from(config.sync.interval_ms))
}

/// What the reserve holds beyond the customer's turn: that turn's sync stuck behind an unanswered
/// one until its timeout, then failing and going again at the next tick
/// ([`FilterConfig::answered_despite_a_failure_ms`], F: a range is booked before the answer that
/// confirms it, and whichever of the failed request and its retry the ledger takes first books
/// it) — or a tenth of the TTL in place of F where that is longer, for the way to the ledger.
/// With the timeout and a tenth of the TTL alone, a failed sync's calls were booked after their
/// credit expired wherever the tick is long against that tenth
/// (`sync::tests::credit_is_never_spent_after_it_expires_when_a_sync_fails_and_goes_again`: 8 of
/// 100 customers below zero). The same 4 s as before with the defaults.
fn reserve_beyond_turn_ms(config: &FilterConfig) -> u64 {
    u64::from(config.ledger.timeout_ms) + config.answered_despite_a_failure_ms().max(config.lease.ttl_ms / 10)
}

/// How long after its request left a lease may be spent from, before the reserve: its TTL, or
/// less when the ledger says the credit behind it expires sooner. Counted on the ledger's
/// clock (`expires_at` against the answer's `server_time`), so the node's clock skew does not
/// matter; an answer whose lease has already expired gives nothing to spend.
pub fn lasts_ms(answer: &LeaseAnswer, server_time: DateTime<Utc>, ttl_ms: u64) -> u64 {
    let left = answer.expires_at.signed_duration_since(server_time).num_milliseconds();
    u64::try_from(left).unwrap_or(0).min(ttl_ms)
}

/// Calls to expect within `ms` at `calls_per_min`, with room for chance: arrivals at random
/// (Poisson) exceed `m + 3√m` in about one window in a thousand.
fn calls_within(calls_per_min: u64, ms: u64) -> u64 {
    let m = calls_per_min.saturating_mul(ms).div_ceil(60_000);
    let root = m.isqrt() + u64::from(m.isqrt() * m.isqrt() < m);
    m.saturating_add(root.saturating_mul(3))
}

/// What a lease should hold, and below what it is topped up now.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Sizing {
    pub target: Amount,
    /// `lease.low_water_percent` of the target: at least what the customer's calls need until the
    /// answer to its next turn in a sync (`turn_ms` away), the node's next chance to top up.
    pub low: Amount,
}

/// The credit a lease should hold (in typical calls of the scope, within the configured bounds):
/// enough at the observed rate for `lease.horizon_ms`, and enough that its low-water mark covers
/// the calls until the answer to the customer's next turn in a sync — so a customer whose lease
/// is above the mark at one turn does not run dry before the next.
pub fn sizing(config: &FilterConfig, scope: &Scope, calls_per_min: u64, turn_ms: u64) -> Sizing {
    let l = &config.lease;
    let until_next_answer = calls_within(calls_per_min, turn_ms.saturating_add(u64::from(config.ledger.timeout_ms)));
    let for_the_mark = until_next_answer.saturating_mul(100) / l.low_water_percent.max(1);
    let calls = for_the_mark.max(calls_within(calls_per_min, l.horizon_ms)).clamp(l.min_calls, l.max_calls);
    let target = scope.typical.times(calls).unwrap_or(scope.typical);
    Sizing { target, low: target.percent(l.low_water_percent).unwrap_or(target) }
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

/// A plain renewal (nothing to add, nothing to give back) that can wait for the next turn: the
/// lease was renewed less than half a turn ago, and without this renewal it still lasts until
/// the answer to the next turn should that turn's sync fail once (so one failed sync lets it
/// lapse no more than before).
/// Every worker of a node goes round every customer the node holds, so without this a node of W
/// workers renewed each lease W times a turn; now about once or twice (a renewal less than half a
/// turn old is skipped). A lease whose credit expires before its TTL has an earlier
/// `spend_until_ms` and is renewed.
pub fn renewal_can_wait(
    e: &CustomerEntry,
    asked: &LeaseRequest,
    config: &FilterConfig,
    now_ms: u64,
    turn_ms: u64,
) -> bool {
    let usable = config.lease.ttl_ms.saturating_sub(reserve_ms(config, turn_ms));
    let plain = asked.want.is_zero() && !asked.release && e.lease.open;
    // `spend_until_ms` is the last answered request's departure plus `usable` (or less).
    let renewed_lately = now_ms.saturating_add(usable).saturating_sub(turn_ms / 2);
    let outlasts_a_failed_turn = now_ms.saturating_add(turn_ms).saturating_add(config.answered_despite_a_failure_ms());
    plain && e.lease.spend_until_ms >= renewed_lately.max(outlasts_a_failed_turn)
}

/// What to ask about the lease now: a top-up below the low-water mark (or enough for a waiting
/// call that needs `for_call`), a release once idle with nothing left to report or settle,
/// otherwise a renewal of an open lease. The customer's next sync is `turn_ms` away.
pub fn request(
    e: &mut CustomerEntry,
    config: &FilterConfig,
    scope: &Scope,
    now_ms: u64,
    turn_ms: u64,
    for_call: Option<Amount>,
) -> Option<LeaseRequest> {
    let l = &config.lease;
    let id = id(e);
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
    let Sizing { target, low } = sizing(config, scope, e.sizing_rate(now_ms), turn_ms);
    let remaining = if e.lease.open && now_ms < e.lease.spend_until_ms { e.lease.remaining } else { Amount::ZERO };
    // At most what the ledger takes in one request: beyond it the ledger refuses the whole
    // subject, usage range included.
    let want = if for_call.is_some() || remaining < low {
        (target - remaining).max(for_call.unwrap_or(scope.typical)).min(Amount::new(MAX_AMOUNT))
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
    fn a_lease_lasts_until_the_answer_to_the_customers_next_turn_with_room_for_chance() {
        let c = FilterConfig::parse(
            br#"{"ledger": {"upstream": "l", "token": "t", "timeout_ms": 500}, "price": "0.01", "currency": "USD"}"#,
        )
        .unwrap();
        let scope = &c.pricing.scopes[0];
        // 600 calls a minute, synced every tick (1 s): 15 calls until the next answer (1.5 s),
        // 27 with room for chance (3 × ⌈√15⌉); the low-water mark (50 %) is there, the target
        // twice that.
        assert_eq!(sizing(&c, scope, 600, 1_000), Sizing { target: amt("0.54"), low: amt("0.27") });
        // A customer synced every 10 ticks: 105 calls until its next answer, 138 with room.
        assert_eq!(sizing(&c, scope, 600, 10_000), Sizing { target: amt("2.76"), low: amt("1.38") });
        // Bounded as configured.
        assert_eq!(sizing(&c, scope, 1, 10_000).target, amt("0.10"), "lease.min_calls");
        assert_eq!(sizing(&c, scope, 60_000_000, 1_000).target, amt("1000.00"), "lease.max_calls");
    }

    /// P(X > k) for X ~ Poisson(m), summed in log space (exact enough for m up to millions).
    fn poisson_tail(m: f64, k: u64) -> f64 {
        let (mut log_factorial, mut below) = (0.0_f64, 0.0_f64);
        for i in 0..=k {
            if i > 0 {
                log_factorial += (i as f64).ln();
            }
            below += (i as f64 * m.ln() - m - log_factorial).exp();
        }
        (1.0 - below).max(0.0)
    }

    /// Calls arriving at random at the rate the lease was sized for run a lease at its low-water
    /// mark dry before the answer to the customer's next turn less than once in a hundred turns.
    #[test]
    fn a_lease_above_its_low_water_mark_rarely_runs_dry_before_the_next_turn() {
        let c = FilterConfig::parse(br#"{"ledger": {"upstream": "l", "token": "t"}, "price": "1", "currency": "USD"}"#)
            .unwrap();
        let scope = &c.pricing.scopes[0];
        for (per_min, turn_ms) in [(48, 10_000), (600, 1_000), (6_000, 10_000), (600_000, 1_000)] {
            let low: u64 = sizing(&c, scope, per_min, turn_ms).low.to_string().parse().unwrap();
            let m = (per_min * (turn_ms + u64::from(c.ledger.timeout_ms))) as f64 / 60_000.0;
            let dry = poisson_tail(m, low);
            assert!(dry < 0.01, "{per_min}/min every {turn_ms} ms: mark {low} calls, {m} expected, dry {dry}");
        }
    }

    #[test]
    fn an_idle_lease_is_kept_until_the_ledger_recalls_it_or_it_idles_for_idle_release_ms() {
        let c =
            FilterConfig::parse(br#"{"ledger": {"upstream": "l", "token": "t"}, "price": "0.01", "currency": "USD"}"#)
                .unwrap();
        let (scope, minute) = (&c.pricing.scopes[0], 60_000);
        let mut e = CustomerEntry::new("k", "s", 1, 0);
        e.lease = Lease { open: true, seq: 1, remaining: amt("0.10"), spend_until_ms: u64::MAX, ..Lease::default() };
        let ask = |e: &mut CustomerEntry, now_ms| request(e, &c, scope, now_ms, 1_000, None).unwrap();
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

    /// `lease.horizon_ms` of calls at the observed rate (with room for chance) sets the target
    /// once it exceeds what the low-water mark needs; the mark is `low_water_percent` of it.
    #[test]
    fn the_target_holds_horizon_ms_of_calls_and_tops_up_at_low_water_percent() {
        let config = |lease: &str| {
            let json = format!(
                r#"{{"ledger": {{"upstream": "l", "token": "t"}}, "price": "0.01", "currency": "USD", "lease": {lease}}}"#
            );
            FilterConfig::parse(json.as_bytes()).unwrap()
        };
        let c = config(r#"{"min_calls": 1, "horizon_ms": 60000, "low_water_percent": 25}"#);
        // 600 calls a minute: 600 + 3 × ⌈√600⌉ = 675 calls within the horizon; the mark needs
        // (20 + 3 × 5) × 100 / 25 = 140 for the 2 s until the next answer (the turn, 1 s, and
        // `ledger.timeout_ms`, 1 s).
        let s = sizing(&c, &c.pricing.scopes[0], 600, 1_000);
        assert_eq!((s.target, s.low), (amt("6.75"), amt("1.6875")));
        // A short horizon: the mark decides.
        let c = config(r#"{"min_calls": 1, "horizon_ms": 1000, "low_water_percent": 25}"#);
        assert_eq!(sizing(&c, &c.pricing.scopes[0], 600, 1_000).target, amt("1.40"));
        // Within min_calls and max_calls.
        let c = config(r#"{"min_calls": 1, "max_calls": 500, "horizon_ms": 60000}"#);
        assert_eq!(sizing(&c, &c.pricing.scopes[0], 600, 1_000).target, amt("5.00"));
        let c = config(r#"{"min_calls": 1000, "horizon_ms": 60000}"#);
        assert_eq!(sizing(&c, &c.pricing.scopes[0], 600, 1_000).target, amt("10.00"));
    }

    /// A lease is given back before its entry is forgotten: `lease.idle_release_ms` longer than
    /// `sync.idle_ms` counts as `sync.idle_ms`.
    #[test]
    fn idle_release_never_outlasts_the_entry() {
        let json = br#"{"ledger": {"upstream": "l", "token": "t"}, "price": "0.01", "currency": "USD",
            "sync": {"idle_ms": 60000}, "lease": {"idle_release_ms": 600000}}"#;
        let c = FilterConfig::parse(json).unwrap();
        let open = Lease { open: true, ..Lease::default() };
        assert_eq!(idle_after_ms(&open, &c), 60_000);
        assert_eq!(idle_after_ms(&Lease { recalled: true, ..open }, &c), c.lease.horizon_ms);
    }

    #[test]
    fn the_longest_lease_id_fits_what_the_ledger_accepts() {
        let feature = "f".repeat(credits::limits::MAX_FEATURE_KEY_LEN);
        let json = format!(
            r#"{{"ledger": {{"upstream": "l", "token": "t"}}, "price": "1", "currency": "USD", "feature_key": "{feature}"}}"#
        );
        let c = FilterConfig::parse(json.as_bytes()).unwrap();
        let subject = "s".repeat(credits::limits::MAX_SUBJECT_LEN);
        let key = crate::customer::entry_key(&c, &c.pricing.scopes[0], &subject);
        let longest = id(&CustomerEntry::new(&key, &subject, u64::MAX, 0));
        assert!(longest.starts_with("ffffffffffffffff/prepaid_credits/c/USD/"), "{longest}");
        assert!(longest.len() <= credits::limits::MAX_LEASE_ID_LEN, "{} bytes", longest.len());
    }
}
