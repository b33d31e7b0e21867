//! The decision for one call, from the node's shared state of its customer.

use credits::{Amount, SettlementMode};

use crate::config::{FailureMode, FilterConfig, Strategy};
use crate::customer::{CustomerEntry, Standing};
use crate::shared::{self, SharedData};

/// What happens to a call.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Verdict {
    /// Let through; `balance` is what is left (unknown while the ledger is unreachable).
    Allow { cost: Amount, balance: Option<Amount> },
    /// 402: credit does not cover the price; nothing deducted.
    Refuse { available: Amount },
    /// The ledger knows no customer with this subject.
    UnknownCustomer,
    /// The ledger cannot be asked and the failure mode says deny (503).
    Unavailable { reason: &'static str },
    /// Nothing usable is cached: wait for a balance read from the ledger.
    AskLedger,
}

/// Whether this call may still wait for the ledger.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LedgerAccess {
    /// The ledger answers: a call with nothing usable waits for a read (or a lease top-up).
    Reachable,
    /// This call has waited for an answer already: decide on what is known now.
    Asked,
    /// The last attempt to reach the ledger failed: the failure mode decides.
    Unreachable,
}

/// Counted outcomes the adapter turns into metrics.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Effects {
    pub cache_hit: bool,
    /// The customer now has something to report (register it so every worker syncs it).
    pub became_pending: bool,
    /// The call was let through but its usage could not be recorded (backlog full).
    pub usage_dropped: bool,
    pub offline: bool,
}

/// The shared-data key of a customer's entry for this configuration's currency and feature.
pub fn entry_key(config: &FilterConfig, subject: &str) -> String {
    let feature = config.feature_key.as_ref().map_or("-", |f| f.as_str());
    format!("prepaid_credits/c/{}/{feature}/{subject}", config.currency)
}

/// Decides a call of `subject` priced at `price` and records it if it is let through.
pub fn decide(
    store: &dyn SharedData,
    config: &FilterConfig,
    subject: &str,
    price: Amount,
    now_ms: u64,
    access: LedgerAccess,
) -> (Verdict, Effects) {
    let key = entry_key(config, subject);
    let result = shared::update::<CustomerEntry, (Verdict, Effects)>(store, &key, |entry| {
        let was_pending = entry.as_ref().is_some_and(CustomerEntry::has_pending);
        let (next, (verdict, mut effects)) = decide_entry(entry, &key, subject, config, price, now_ms, access);
        effects.became_pending = !was_pending && next.as_ref().is_some_and(CustomerEntry::has_pending);
        (next, (verdict, effects))
    });
    match result {
        Ok(outcome) => outcome,
        // Nothing could be recorded, so nothing may be let through, whatever the failure mode.
        Err(_) => (Verdict::Unavailable { reason: "the gateway's shared state is contended" }, Effects::default()),
    }
}

fn decide_entry(
    entry: Option<CustomerEntry>,
    key: &str,
    subject: &str,
    config: &FilterConfig,
    price: Amount,
    now_ms: u64,
    access: LedgerAccess,
) -> (Option<CustomerEntry>, (Verdict, Effects)) {
    let max_stale = u64::from(config.sync.max_stale_ms);
    let hit = Effects { cache_hit: true, ..Effects::default() };
    match entry {
        Some(e) if e.standing == Standing::Unknown => {
            if now_ms.saturating_sub(e.refreshed_ms) <= u64::from(config.sync.unknown_ttl_ms)
                || access != LedgerAccess::Reachable
            {
                (None, (Verdict::UnknownCustomer, hit))
            } else {
                (None, (Verdict::AskLedger, Effects::default()))
            }
        }
        Some(e) if matches!(e.standing, Standing::Known { .. }) && config.sync.strategy == Strategy::Lease => {
            spend_from_lease(e, config, price, now_ms, access)
        }
        Some(mut e) if matches!(e.standing, Standing::Known { .. }) && e.is_fresh(now_ms, max_stale) => {
            if e.unsent_calls() >= config.sync.max_unsent_calls {
                return backlog_full(e, config, price, now_ms);
            }
            let available = e.available();
            if config.settlement_mode == SettlementMode::CreditOnly && available < price {
                return (None, (Verdict::Refuse { available }, hit));
            }
            e.spend(price, now_ms);
            let balance = Some(e.available());
            (Some(e), (Verdict::Allow { cost: price, balance }, hit))
        }
        _ if access == LedgerAccess::Reachable => (None, (Verdict::AskLedger, Effects::default())),
        other => offline(other.unwrap_or_else(|| CustomerEntry::new(key, subject, now_ms)), config, price, now_ms),
    }
}

/// Under `lease`, a call is paid only from credit the ledger holds for this node: never on a
/// guess. Without enough, it waits for a top-up; after one, what is held decides.
fn spend_from_lease(
    mut e: CustomerEntry,
    config: &FilterConfig,
    price: Amount,
    now_ms: u64,
    access: LedgerAccess,
) -> (Option<CustomerEntry>, (Verdict, Effects)) {
    let hit = Effects { cache_hit: true, ..Effects::default() };
    if e.unsent_calls() >= config.sync.max_unsent_calls {
        return backlog_full(e, config, price, now_ms);
    }
    let balance = |e: &CustomerEntry| Some(e.live + e.lease.remaining);
    if e.lease_covers(price, now_ms) {
        e.lease.remaining -= price;
        e.spend(price, now_ms);
        let balance = balance(&e);
        return (Some(e), (Verdict::Allow { cost: price, balance }, hit));
    }
    if config.settlement_mode == SettlementMode::CreditThenInvoice
        && e.is_fresh(now_ms, u64::from(config.sync.max_stale_ms))
    {
        // Never refused for lack of credit: usage beyond the lease is booked all the same.
        let from_lease = e.lease.remaining.min(price).max(Amount::ZERO);
        e.lease.remaining -= from_lease;
        e.spend(price, now_ms);
        let balance = balance(&e);
        return (Some(e), (Verdict::Allow { cost: price, balance }, hit));
    }
    match access {
        LedgerAccess::Reachable => (None, (Verdict::AskLedger, Effects::default())),
        LedgerAccess::Asked if e.is_fresh(now_ms, u64::from(config.sync.max_stale_ms)) => {
            let available =
                if e.lease.open && now_ms < e.lease.spend_until_ms { e.lease.remaining } else { Amount::ZERO };
            (None, (Verdict::Refuse { available: available + e.live.max(Amount::ZERO) }, hit))
        }
        _ => offline(e, config, price, now_ms),
    }
}

/// The ledger cannot be reached and nothing usable is cached: the failure mode decides.
fn offline(
    mut e: CustomerEntry,
    config: &FilterConfig,
    price: Amount,
    now_ms: u64,
) -> (Option<CustomerEntry>, (Verdict, Effects)) {
    let effects = Effects { offline: true, ..Effects::default() };
    if config.failure_mode == FailureMode::Deny {
        return (None, (Verdict::Unavailable { reason: "the credit ledger cannot be reached" }, effects));
    }
    if config.offline_allowance.is_some_and(|allowance| e.offline_spent + price > allowance) {
        return (None, (Verdict::Unavailable { reason: "the offline allowance of this customer is used up" }, effects));
    }
    if e.unsent_calls() >= config.sync.max_unsent_calls {
        return backlog_full(e, config, price, now_ms);
    }
    e.offline_spent += price;
    e.spend(price, now_ms);
    (Some(e), (Verdict::Allow { cost: price, balance: None }, effects))
}

/// The node holds as many unsent calls of this customer as it may: `deny` refuses, `allow` lets
/// the call through without a usage record (counted).
fn backlog_full(
    e: CustomerEntry,
    config: &FilterConfig,
    price: Amount,
    now_ms: u64,
) -> (Option<CustomerEntry>, (Verdict, Effects)) {
    match config.failure_mode {
        FailureMode::Deny => (
            None,
            (
                Verdict::Unavailable { reason: "too much usage of this customer is waiting for the ledger" },
                Effects::default(),
            ),
        ),
        FailureMode::Allow => {
            let balance = e.is_fresh(now_ms, u64::from(config.sync.max_stale_ms)).then(|| e.available());
            (None, (Verdict::Allow { cost: price, balance }, Effects { usage_dropped: true, ..Effects::default() }))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::shared::fake::{FakeShared, Rules};

    /// A `cached` configuration unless `extra` sets `sync` itself.
    fn config(extra: &str) -> FilterConfig {
        let sync = if extra.contains("\"sync\"") { "" } else { r#", "sync": {"strategy": "cached"}"# };
        let json = format!(
            r#"{{"ledger": {{"upstream": "ledger", "token": "t"}}, "price": "0.10", "currency": "USD", "feature_key": "api_requests"{extra}{sync}}}"#
        );
        FilterConfig::parse(json.as_bytes()).unwrap()
    }

    fn amt(s: &str) -> Amount {
        Amount::parse(s).unwrap()
    }

    fn known(store: &FakeShared, c: &FilterConfig, subject: &str, live: &str, at: u64) {
        let key = entry_key(c, subject);
        shared::update::<CustomerEntry, ()>(store, &key, |e| {
            let mut e = e.unwrap_or_else(|| CustomerEntry::new(&key, subject, at));
            e.refresh("cust", amt(live), 1, at);
            (Some(e), ())
        })
        .unwrap();
    }

    #[test]
    fn a_cold_customer_waits_for_the_ledger() {
        let store = FakeShared::new(Rules::Envoy);
        let c = config("");
        assert_eq!(decide(&store, &c, "alice", amt("0.10"), 1, LedgerAccess::Reachable).0, Verdict::AskLedger);
    }

    #[test]
    fn one_dollar_at_ten_cents_lets_exactly_ten_calls_through() {
        let store = FakeShared::new(Rules::Envoy);
        let c = config("");
        known(&store, &c, "alice", "1.00", 1);
        let verdicts: Vec<Verdict> =
            (0..11).map(|i| decide(&store, &c, "alice", amt("0.10"), 2 + i, LedgerAccess::Reachable).0).collect();
        assert!(verdicts[..10].iter().all(|v| matches!(v, Verdict::Allow { .. })));
        assert_eq!(verdicts[9], Verdict::Allow { cost: amt("0.10"), balance: Some(amt("0.00")) });
        assert_eq!(verdicts[10], Verdict::Refuse { available: amt("0.00") });
    }

    #[test]
    fn credit_then_invoice_never_refuses_for_lack_of_credit() {
        let store = FakeShared::new(Rules::Kong { hash: |k| k.len() as u32 });
        let c = config(r#", "settlement_mode": "credit_then_invoice""#);
        known(&store, &c, "alice", "0.05", 1);
        assert!(matches!(
            decide(&store, &c, "alice", amt("0.10"), 2, LedgerAccess::Reachable).0,
            Verdict::Allow { .. }
        ));
    }

    #[test]
    fn stale_cache_asks_the_ledger_again() {
        let store = FakeShared::new(Rules::Envoy);
        let c = config(r#", "sync": {"strategy": "cached", "max_stale_ms": 1000}"#);
        known(&store, &c, "alice", "1.00", 1);
        assert_eq!(decide(&store, &c, "alice", amt("0.10"), 5000, LedgerAccess::Reachable).0, Verdict::AskLedger);
    }

    #[test]
    fn failure_modes_while_the_ledger_is_unreachable() {
        let store = FakeShared::new(Rules::Envoy);
        let deny = config("");
        assert!(matches!(
            decide(&store, &deny, "bob", amt("0.10"), 1, LedgerAccess::Unreachable).0,
            Verdict::Unavailable { .. }
        ));
        let allow = config(r#", "failure_mode": "allow", "offline_allowance": "0.25""#);
        let verdicts: Vec<Verdict> =
            (0..3).map(|i| decide(&store, &allow, "bob", amt("0.10"), 1 + i, LedgerAccess::Unreachable).0).collect();
        assert_eq!(verdicts[0], Verdict::Allow { cost: amt("0.10"), balance: None });
        assert_eq!(verdicts[1], Verdict::Allow { cost: amt("0.10"), balance: None });
        assert!(matches!(verdicts[2], Verdict::Unavailable { .. }), "the allowance bounds offline spend");
        // The calls let through are recorded for booking later.
        let e = shared::read::<CustomerEntry>(&store, &entry_key(&allow, "bob")).unwrap();
        assert_eq!((e.unsent_calls(), e.spent), (2, amt("0.20")));
    }

    #[test]
    fn unknown_customers_are_refused_until_the_answer_expires() {
        let store = FakeShared::new(Rules::Envoy);
        let c = config(r#", "sync": {"strategy": "cached", "unknown_ttl_ms": 100}"#);
        let key = entry_key(&c, "mallory");
        shared::update::<CustomerEntry, ()>(&store, &key, |_| {
            let mut e = CustomerEntry::new(&key, "mallory", 1);
            e.mark_unknown(1);
            (Some(e), ())
        })
        .unwrap();
        assert_eq!(decide(&store, &c, "mallory", amt("0.10"), 50, LedgerAccess::Reachable).0, Verdict::UnknownCustomer);
        assert_eq!(decide(&store, &c, "mallory", amt("0.10"), 500, LedgerAccess::Reachable).0, Verdict::AskLedger);
    }

    fn leased(store: &FakeShared, c: &FilterConfig, subject: &str, held: &str, at: u64) {
        let key = entry_key(c, subject);
        shared::update::<CustomerEntry, ()>(store, &key, |e| {
            let mut e = e.unwrap_or_else(|| CustomerEntry::new(&key, subject, at));
            e.refresh("cust", amt("0"), 1, at);
            let answer = credits::sync::LeaseAnswer {
                lease_id: "l".into(),
                held: amt(held),
                granted: amt(held),
                expires_at: chrono::DateTime::UNIX_EPOCH,
                closed: false,
            };
            e.apply_lease(&answer, 1, 1, at, c.lease.ttl_ms, crate::sync::lease_reserve_ms(c));
            (Some(e), ())
        })
        .unwrap();
    }

    #[test]
    fn a_lease_pays_for_calls_until_it_is_used_up_then_calls_wait_for_a_top_up() {
        let store = FakeShared::new(Rules::Kong { hash: |k| k.len() as u32 * 7 });
        let c = config(r#", "sync": {"strategy": "lease"}"#);
        assert_eq!(decide(&store, &c, "alice", amt("0.10"), 1, LedgerAccess::Reachable).0, Verdict::AskLedger);
        leased(&store, &c, "alice", "0.30", 1);
        for i in 0..3 {
            assert!(matches!(
                decide(&store, &c, "alice", amt("0.10"), 2 + i, LedgerAccess::Reachable).0,
                Verdict::Allow { .. }
            ));
        }
        // Not covered: wait for a top-up rather than guess ...
        assert_eq!(decide(&store, &c, "alice", amt("0.10"), 6, LedgerAccess::Reachable).0, Verdict::AskLedger);
        // ... and after it, what is held decides.
        assert_eq!(
            decide(&store, &c, "alice", amt("0.10"), 7, LedgerAccess::Asked).0,
            Verdict::Refuse { available: amt("0.00") }
        );
    }

    #[test]
    fn a_lease_is_not_spent_past_the_nodes_deadline() {
        let store = FakeShared::new(Rules::Envoy);
        let c = config(r#", "sync": {"strategy": "lease"}, "lease": {"ttl_ms": 10000}"#);
        leased(&store, &c, "alice", "5", 1000);
        // Sent at 1000, the ledger may expire it from 11000: the node stops at
        // 11000 − (1000 interval + 1000 timeout + 1000 tenth of the TTL) so its calls get reported.
        assert!(matches!(
            decide(&store, &c, "alice", amt("0.10"), 7999, LedgerAccess::Unreachable).0,
            Verdict::Allow { .. }
        ));
        assert!(matches!(
            decide(&store, &c, "alice", amt("0.10"), 8000, LedgerAccess::Unreachable).0,
            Verdict::Unavailable { .. }
        ));
    }

    #[test]
    fn a_full_backlog_follows_the_failure_mode() {
        let store = FakeShared::new(Rules::Envoy);
        let c = config(r#", "sync": {"strategy": "cached", "max_unsent_calls": 2}"#);
        known(&store, &c, "alice", "10", 1);
        decide(&store, &c, "alice", amt("0.10"), 2, LedgerAccess::Reachable);
        decide(&store, &c, "alice", amt("0.10"), 3, LedgerAccess::Reachable);
        assert!(matches!(
            decide(&store, &c, "alice", amt("0.10"), 4, LedgerAccess::Reachable).0,
            Verdict::Unavailable { .. }
        ));
        let allow = config(r#", "failure_mode": "allow", "sync": {"strategy": "cached", "max_unsent_calls": 2}"#);
        let (v, effects) = decide(&store, &allow, "alice", amt("0.10"), 5, LedgerAccess::Reachable);
        assert!(matches!(v, Verdict::Allow { .. }) && effects.usage_dropped);
    }
}
