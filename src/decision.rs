//! The decision for one call in one scope, from the node's shared state of its customer: let it
//! through holding its estimate, or refuse it; and, once its response is complete, complete it:
//! release the hold and record what it cost.

use credits::{Amount, SettlementMode};

use crate::config::{FailureMode, FilterConfig, Strategy};
use crate::customer::{entry_key, CustomerEntry, Standing};
use crate::pricing::{Charging, Scope};
use crate::shared::{self, SharedData};

/// What a call let through holds in one scope until it completes.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Hold {
    pub amount: Amount,
    /// The part taken from the node's lease (given back to it when the call completes).
    pub from_lease: Amount,
    /// Its usage cannot be recorded (the backlog was full under `allow`): completing records nothing.
    pub unrecorded: bool,
    /// The incarnation of the entry it is held in: an entry rebuilt since never had it.
    pub origin: u64,
    /// Charged at admission (`Charging::AtAdmission`): its usage is recorded already, and nothing
    /// is held for its completion to release.
    pub charged: bool,
    /// The number of the call a charge recorded (a refund finds it by it).
    pub call: u64,
}

/// A call let through: what it holds per scope, and what was left in the first scope after it
/// (unknown while the ledger is unreachable).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Admitted {
    pub held: Vec<Hold>,
    pub balance: Option<Amount>,
}

/// What happens to a call.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Verdict {
    /// Let through holding `held` (per scope); `balance` is what is left in the first scope
    /// (unknown while the ledger is unreachable).
    Allow { held: Vec<Hold>, balance: Option<Amount> },
    /// 402: credit in `scope` does not cover what the call `needed` there; nothing held.
    Refuse { scope: usize, needed: Amount, available: Amount },
    /// The ledger knows no customer with this subject.
    UnknownCustomer,
    /// The ledger cannot be asked and the failure mode says deny (503).
    Unavailable { reason: &'static str },
    /// Nothing usable is cached: wait for a balance read from the ledger.
    AskLedger,
}

/// What happens to a call in one scope.
#[derive(Clone, Debug, PartialEq, Eq)]
enum ScopeVerdict {
    Allow {
        held: Hold,
        balance: Option<Amount>,
    },
    Refuse {
        available: Amount,
    },
    /// Anything but a yes or a no on credit decides for the whole call.
    Call(Verdict),
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
    /// At completion: the call cost something that could not be recorded (it was let through on
    /// a full backlog, or the backlog filled while it ran). Counted once, here, where the cost is
    /// known: a call let through unrecorded that ends up costing nothing lost nothing.
    pub usage_dropped: bool,
    pub offline: bool,
    /// Other workers kept winning the compare-and-swap: nothing was recorded.
    pub contended: bool,
}

impl Effects {
    fn merge(&mut self, other: Effects) {
        self.cache_hit &= other.cache_hit;
        self.became_pending |= other.became_pending;
        self.usage_dropped |= other.usage_dropped;
        self.offline |= other.offline;
        self.contended |= other.contended;
    }
}

/// Decides whether a call of `subject` that needs `estimates` (per scope of the configuration)
/// goes through, and holds them (or charges them, as `charging` says) if it does. A call is let
/// through only if every scope covers it.
pub fn admit(
    store: &dyn SharedData,
    config: &FilterConfig,
    subject: &str,
    estimates: &[Amount],
    charging: Charging,
    now_ms: u64,
    access: LedgerAccess,
) -> (Verdict, Effects) {
    let scopes = &config.pricing.scopes;
    let mut held = Vec::with_capacity(scopes.len());
    let mut balance = None;
    let mut effects = Effects { cache_hit: true, ..Effects::default() };
    for (i, (scope, amount)) in scopes.iter().zip(estimates).enumerate() {
        let taking = Taking { amount: *amount, charging, now_ms };
        let (verdict, e) = hold_in_scope(store, config, scope, subject, taking, access);
        effects.merge(e);
        let refused = match verdict {
            ScopeVerdict::Allow { held: h, balance: b } => {
                if i == 0 {
                    balance = b;
                }
                held.push(h);
                continue;
            }
            ScopeVerdict::Refuse { available } => Verdict::Refuse { scope: i, needed: *amount, available },
            ScopeVerdict::Call(v) => v,
        };
        // Given back: the scopes before this one let it through.
        for (scope, h) in scopes.iter().zip(&held) {
            effects.contended |= !cancel(store, config, scope, subject, h);
        }
        return (refused, effects);
    }
    (Verdict::Allow { held, balance }, effects)
}

/// Completes a call that holds `held` at what it cost, `actual` (both per scope). A call that
/// holds nothing in a scope (the engine let it through before it was decided) is still charged.
/// Scopes whose entry could not be written are left out of `Completed::done`, for a retry.
pub fn complete(
    store: &dyn SharedData,
    config: &FilterConfig,
    subject: &str,
    held: &[Hold],
    actual: &[Amount],
    now_ms: u64,
) -> Completed {
    let mut out = Completed { done: vec![true; actual.len()], ..Completed::default() };
    for (i, (scope, a)) in config.pricing.scopes.iter().zip(actual).enumerate() {
        let Some(s) = complete_in_scope(store, config, scope, subject, held.get(i), *a, now_ms) else {
            out.done[i] = false;
            out.effects.contended = true;
            continue;
        };
        if i == 0 {
            out.balance = s.balance;
        }
        out.effects.became_pending |= s.effects.became_pending;
        out.effects.usage_dropped |= s.effects.usage_dropped;
    }
    out
}

/// Decides a call in one scope and takes what `taking` says there if it goes through.
fn hold_in_scope(
    store: &dyn SharedData,
    config: &FilterConfig,
    scope: &Scope,
    subject: &str,
    taking: Taking,
    access: LedgerAccess,
) -> (ScopeVerdict, Effects) {
    let key = entry_key(config, scope, subject);
    let result = shared::update::<CustomerEntry, (ScopeVerdict, Effects)>(store, &key, |entry| {
        let was_pending = entry.as_ref().is_some_and(CustomerEntry::has_pending);
        let entry = entry.map(|mut e| {
            e.expire_holds(taking.now_ms);
            e
        });
        let fresh = || CustomerEntry::new(&key, subject, store.fresh_origin(), taking.now_ms);
        let (next, (mut verdict, mut effects)) = decide_entry(entry, &fresh, config, taking, access);
        if let (ScopeVerdict::Allow { held, .. }, Some(e)) = (&mut verdict, &next) {
            held.origin = e.origin;
        }
        effects.became_pending = !was_pending && next.as_ref().is_some_and(CustomerEntry::has_pending);
        (next, (verdict, effects))
    });
    match result {
        Ok(outcome) => outcome,
        // Nothing could be recorded, so nothing may be let through, whatever the failure mode.
        Err(_) => (
            ScopeVerdict::Call(Verdict::Unavailable { reason: "the gateway's shared state is contended" }),
            Effects { contended: true, ..Effects::default() },
        ),
    }
}

/// A call given back before it went upstream (another scope refused it): its hold is released
/// and nothing is spent. `false` if the entry could not be written (the hold then times out).
fn cancel(store: &dyn SharedData, config: &FilterConfig, scope: &Scope, subject: &str, held: &Hold) -> bool {
    let key = entry_key(config, scope, subject);
    // Only a call priced in one scope is charged at admission (`pricing::charging`).
    debug_assert!(!held.charged, "a charged call is never given back");
    if held.unrecorded {
        return true;
    }
    let result = shared::update::<CustomerEntry, ()>(store, &key, |entry| match entry {
        Some(mut e) if e.origin == held.origin => {
            e.release_hold(held.amount);
            e.lease.remaining += held.from_lease;
            (Some(e), ())
        }
        _ => (None, ()),
    });
    result.is_ok()
}

/// What completing a call did.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Completed {
    /// What is left after it, when known.
    pub balance: Option<Amount>,
    pub effects: Effects,
    /// Per scope: recorded (`false`: the entry could not be written; retry it).
    pub done: Vec<bool>,
}

/// What completing a call in one scope did.
pub struct ScopeCompleted {
    pub balance: Option<Amount>,
    pub effects: Effects,
}

/// Completes a call in one scope that held `held` at what it cost, `actual`: the hold goes, the
/// cost is recorded as one call to report (more than the hold included: it was let through).
/// `None` if the entry could not be written.
pub fn complete_in_scope(
    store: &dyn SharedData,
    config: &FilterConfig,
    scope: &Scope,
    subject: &str,
    held: Option<&Hold>,
    actual: Amount,
    now_ms: u64,
) -> Option<ScopeCompleted> {
    let key = entry_key(config, scope, subject);
    if let Some(charged) = held.filter(|h| h.charged) {
        return refund(store, &key, config, (subject, charged), actual, now_ms);
    }
    let unrecorded = held.is_some_and(|h| h.unrecorded);
    let result = shared::update::<CustomerEntry, ScopeCompleted>(store, &key, |entry| {
        let was_pending = entry.as_ref().is_some_and(CustomerEntry::has_pending);
        let mut e = entry.unwrap_or_else(|| CustomerEntry::new(&key, subject, store.fresh_origin(), now_ms));
        if let Some(h) = held.filter(|h| !h.unrecorded && h.origin == e.origin) {
            e.release_hold(h.amount);
            e.lease.remaining += h.from_lease;
        }
        // What the call held of a lease of an entry the host evicted while it ran stays in that
        // lease until its TTL gives it back (or its grant expires in it): booked through the entry
        // there is now, it would be paid a second time, out of the customer's other credit. Like
        // the evicted entry's unreported calls, it is lost to the provider and counted. (An entry
        // is deleted as idle only once its calls' holds timed out, `pricing.hold_timeout_ms`: a
        // call that outlives that is lost the same way.)
        let lost =
            held.filter(|h| !h.unrecorded && h.origin != e.origin).map_or(Amount::ZERO, |h| h.from_lease.min(actual));
        let actual = actual - lost.max(Amount::ZERO);
        let mut effects = Effects { usage_dropped: lost.is_positive(), ..Effects::default() };
        if actual.is_zero() {
            // Nothing to book.
        } else if unrecorded || e.backlog_full(config.sync.max_unsent_calls, actual) {
            effects.usage_dropped = true;
        } else {
            if config.sync.strategy == Strategy::Lease {
                let from_lease = match config.settlement_mode {
                    // Paid from the lease, beyond it if the call used more than it held.
                    SettlementMode::CreditOnly => actual,
                    SettlementMode::CreditThenInvoice => e.lease.remaining.min(actual).max(Amount::ZERO),
                };
                e.lease.remaining -= from_lease;
            }
            e.spend(actual, now_ms);
        }
        effects.became_pending = !was_pending && e.has_pending();
        let balance = balance_after(&e, config, now_ms);
        (Some(e), ScopeCompleted { balance, effects })
    });
    result.ok()
}

/// A call charged when it was let through completes at `actual`: what it was charged beyond that
/// goes back to its customer (`CustomerEntry::refund`). The entry it was charged in may be gone
/// by now: deleted as idle while the call ran (then everything it sent was booked, the call
/// too), or evicted by the host (then the call may have been lost with it, and is counted). The
/// credit goes back all the same, through the entry there is now, or a new one made to carry it:
/// a lost entry may cost the provider a call, never the customer.
fn refund(
    store: &dyn SharedData,
    key: &str,
    config: &FilterConfig,
    (subject, charged): (&str, &Hold),
    actual: Amount,
    now_ms: u64,
) -> Option<ScopeCompleted> {
    let back = charged.amount - actual;
    let result = shared::update::<CustomerEntry, ScopeCompleted>(store, key, |entry| {
        if !back.is_positive() {
            return (None, ScopeCompleted { balance: None, effects: Effects::default() });
        }
        let was_pending = entry.as_ref().is_some_and(CustomerEntry::has_pending);
        let mut e = entry.unwrap_or_else(|| {
            let mut e = CustomerEntry::new(key, subject, store.fresh_origin(), now_ms);
            // No call of its own: idle from the start, so it asks for no lease and goes once
            // the refund is booked.
            e.last_used_ms = 0;
            e
        });
        if e.origin == charged.origin {
            e.refund(Some(charged.call), back, charged.from_lease.min(back));
            e.last_used_ms = e.last_used_ms.max(now_ms);
        } else {
            e.refund(None, back, Amount::ZERO);
        }
        let effects = Effects { became_pending: !was_pending && e.has_pending(), ..Effects::default() };
        let balance = balance_after(&e, config, now_ms);
        (Some(e), ScopeCompleted { balance, effects })
    });
    result.ok()
}

/// What is left for the customer after a completion, as far as the node knows.
fn balance_after(e: &CustomerEntry, config: &FilterConfig, now_ms: u64) -> Option<Amount> {
    match config.sync.strategy {
        Strategy::Lease => e.lease.open.then(|| e.live + e.lease.remaining),
        Strategy::Cached => e.is_fresh(now_ms, u64::from(config.sync.max_stale_ms)).then(|| e.available()),
    }
}

/// What a call let through takes from its customer's entry in one scope.
#[derive(Clone, Copy)]
struct Taking {
    amount: Amount,
    charging: Charging,
    now_ms: u64,
}

impl Taking {
    /// Takes the amount from `e` (`from_lease` of it out of the node's lease, by the caller):
    /// held until the call completes, or spent now as one call to report.
    fn take(self, e: &mut CustomerEntry, config: &FilterConfig, from_lease: Amount) -> Hold {
        let charged = self.charging == Charging::AtAdmission;
        let mut call = 0;
        if !charged {
            e.place_hold(self.amount, self.now_ms, config.pricing.hold_timeout_ms);
        } else if self.amount.is_zero() {
            e.last_used_ms = e.last_used_ms.max(self.now_ms); // nothing to book
        } else {
            call = e.spend(self.amount, self.now_ms);
        }
        Hold { amount: self.amount, from_lease, charged, call, ..Hold::default() }
    }
}

fn decide_entry(
    entry: Option<CustomerEntry>,
    fresh: &dyn Fn() -> CustomerEntry,
    config: &FilterConfig,
    t: Taking,
    access: LedgerAccess,
) -> (Option<CustomerEntry>, (ScopeVerdict, Effects)) {
    let max_stale = u64::from(config.sync.max_stale_ms);
    let hit = Effects { cache_hit: true, ..Effects::default() };
    match entry {
        Some(e) if matches!(e.standing, Standing::Known) && config.sync.strategy == Strategy::Lease => {
            hold_from_lease(e, config, t, access)
        }
        Some(mut e) if matches!(e.standing, Standing::Known) && e.is_fresh(t.now_ms, max_stale) => {
            if e.backlog_full(config.sync.max_unsent_calls, t.amount) {
                return backlog_full(e, config, t.now_ms);
            }
            let available = e.available();
            if config.settlement_mode == SettlementMode::CreditOnly && available < t.amount {
                return (None, (ScopeVerdict::Refuse { available }, hit));
            }
            let held = t.take(&mut e, config, Amount::ZERO);
            let balance = Some(e.available());
            (Some(e), (ScopeVerdict::Allow { held, balance }, hit))
        }
        _ if access == LedgerAccess::Reachable => (None, (ScopeVerdict::Call(Verdict::AskLedger), Effects::default())),
        other => offline(other.unwrap_or_else(fresh), config, t),
    }
}

/// Under `lease`, a call is let through only on credit the ledger holds for this node: never on
/// a guess. Without enough, it waits for a top-up; after one, what is held decides.
fn hold_from_lease(
    mut e: CustomerEntry,
    config: &FilterConfig,
    t: Taking,
    access: LedgerAccess,
) -> (Option<CustomerEntry>, (ScopeVerdict, Effects)) {
    let hit = Effects { cache_hit: true, ..Effects::default() };
    let (amount, now_ms) = (t.amount, t.now_ms);
    if e.backlog_full(config.sync.max_unsent_calls, amount) {
        return backlog_full(e, config, now_ms);
    }
    let balance = |e: &CustomerEntry| Some(e.live + e.lease.remaining);
    // A call that holds nothing here (its units are estimated at zero) needs no lease.
    if amount.is_zero() || e.lease_covers(amount, now_ms) {
        e.lease.remaining -= amount;
        let held = t.take(&mut e, config, amount);
        let balance = balance(&e);
        return (Some(e), (ScopeVerdict::Allow { held, balance }, hit));
    }
    if config.settlement_mode == SettlementMode::CreditThenInvoice
        && e.is_fresh(now_ms, u64::from(config.sync.max_stale_ms))
    {
        // Never refused for lack of credit: usage beyond the lease is booked all the same.
        let from_lease = e.lease.remaining.min(amount).max(Amount::ZERO);
        e.lease.remaining -= from_lease;
        let held = t.take(&mut e, config, from_lease);
        let balance = balance(&e);
        return (Some(e), (ScopeVerdict::Allow { held, balance }, hit));
    }
    match access {
        LedgerAccess::Reachable => (None, (ScopeVerdict::Call(Verdict::AskLedger), Effects::default())),
        LedgerAccess::Asked if e.is_fresh(now_ms, u64::from(config.sync.max_stale_ms)) => {
            let leased = if e.lease.open && now_ms < e.lease.spend_until_ms { e.lease.remaining } else { Amount::ZERO };
            // Live credit the ledger would not lease (it expires too soon) pays for nothing here.
            let live = if e.lease.dry { Amount::ZERO } else { e.live.max(Amount::ZERO) };
            let available = leased.max(Amount::ZERO) + live;
            if available >= amount && live.is_positive() {
                // Covered by credit the ledger has not set aside for this node yet (calls that
                // waited for the same top-up took it): ask for another.
                return (None, (ScopeVerdict::Call(Verdict::AskLedger), Effects::default()));
            }
            (None, (ScopeVerdict::Refuse { available }, hit))
        }
        _ => offline(e, config, t),
    }
}

/// The ledger cannot be reached and nothing usable is cached: the failure mode decides.
fn offline(mut e: CustomerEntry, config: &FilterConfig, t: Taking) -> (Option<CustomerEntry>, (ScopeVerdict, Effects)) {
    let (amount, now_ms) = (t.amount, t.now_ms);
    let effects = Effects { offline: true, ..Effects::default() };
    if config.failure_mode == FailureMode::Deny {
        return (
            None,
            (ScopeVerdict::Call(Verdict::Unavailable { reason: "the credit ledger cannot be reached" }), effects),
        );
    }
    if config.offline_allowance.is_some_and(|allowance| e.offline_spent + amount > allowance) {
        return (
            None,
            (
                ScopeVerdict::Call(Verdict::Unavailable {
                    reason: "the offline allowance of this customer is used up",
                }),
                effects,
            ),
        );
    }
    if e.backlog_full(config.sync.max_unsent_calls, amount) {
        return backlog_full(e, config, now_ms);
    }
    // The allowance counts what calls take, charged or held (the cost may not be known yet).
    e.offline_spent += amount;
    let held = t.take(&mut e, config, Amount::ZERO);
    (Some(e), (ScopeVerdict::Allow { held, balance: None }, effects))
}

/// The node holds as many unsent calls of this customer as it may: `deny` refuses, `allow` lets
/// the call through without a usage record (counted).
fn backlog_full(
    e: CustomerEntry,
    config: &FilterConfig,
    now_ms: u64,
) -> (Option<CustomerEntry>, (ScopeVerdict, Effects)) {
    match config.failure_mode {
        FailureMode::Deny => (
            None,
            (
                ScopeVerdict::Call(Verdict::Unavailable {
                    reason: "too much usage of this customer is waiting for the ledger",
                }),
                Effects::default(),
            ),
        ),
        FailureMode::Allow => {
            let balance = e.is_fresh(now_ms, u64::from(config.sync.max_stale_ms)).then(|| e.available());
            let held = Hold { unrecorded: true, ..Hold::default() };
            (None, (ScopeVerdict::Allow { held, balance }, Effects::default()))
        }
    }
}

/// A call priced at `price` in the first scope: holds it and, if let through, completes at it.
#[cfg(test)]
pub(crate) fn call(
    store: &dyn SharedData,
    c: &FilterConfig,
    subject: &str,
    price: Amount,
    now: u64,
    access: LedgerAccess,
) -> (Verdict, Effects) {
    let (verdict, effects) = admit(store, c, subject, &[price], Charging::AtCompletion, now, access);
    if let Verdict::Allow { held, .. } = &verdict {
        complete(store, c, subject, held, &[price], now);
    }
    (verdict, effects)
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

    /// Let through holding `amount` in the entry of `origin`.
    fn allowed(amount: &str, balance: Option<&str>, origin: u64) -> Verdict {
        Verdict::Allow {
            held: vec![Hold { amount: amt(amount), origin, ..Hold::default() }],
            balance: balance.map(amt),
        }
    }

    /// The origin `known` gives entries.
    const KNOWN: u64 = 7;

    fn known(store: &FakeShared, c: &FilterConfig, subject: &str, live: &str, at: u64) {
        let key = entry_key(c, &c.pricing.scopes[0], subject);
        shared::update::<CustomerEntry, ()>(store, &key, |e| {
            let mut e = e.unwrap_or_else(|| CustomerEntry::new(&key, subject, KNOWN, at));
            e.refresh(amt(live), 1, at);
            (Some(e), ())
        })
        .unwrap();
    }

    #[test]
    fn a_cold_customer_waits_for_the_ledger() {
        let store = FakeShared::new(Rules::Envoy);
        let c = config("");
        assert_eq!(call(&store, &c, "alice", amt("0.10"), 1, LedgerAccess::Reachable).0, Verdict::AskLedger);
    }

    #[test]
    fn one_dollar_at_ten_cents_lets_exactly_ten_calls_through() {
        let store = FakeShared::new(Rules::Envoy);
        let c = config("");
        known(&store, &c, "alice", "1.00", 1);
        let verdicts: Vec<Verdict> =
            (0..11).map(|i| call(&store, &c, "alice", amt("0.10"), 2 + i, LedgerAccess::Reachable).0).collect();
        assert!(verdicts[..10].iter().all(|v| matches!(v, Verdict::Allow { .. })));
        assert_eq!(verdicts[9], allowed("0.10", Some("0.00"), KNOWN));
        assert_eq!(verdicts[10], Verdict::Refuse { scope: 0, needed: amt("0.10"), available: amt("0.00") });
    }

    #[test]
    fn credit_then_invoice_never_refuses_for_lack_of_credit() {
        let store = FakeShared::new(Rules::Kong { hash: |k| k.len() as u32 });
        let c = config(r#", "settlement_mode": "credit_then_invoice""#);
        known(&store, &c, "alice", "0.05", 1);
        assert!(matches!(call(&store, &c, "alice", amt("0.10"), 2, LedgerAccess::Reachable).0, Verdict::Allow { .. }));
    }

    #[test]
    fn stale_cache_asks_the_ledger_again() {
        let store = FakeShared::new(Rules::Envoy);
        let c = config(r#", "sync": {"strategy": "cached", "max_stale_ms": 1000}"#);
        known(&store, &c, "alice", "1.00", 1);
        assert_eq!(call(&store, &c, "alice", amt("0.10"), 5000, LedgerAccess::Reachable).0, Verdict::AskLedger);
    }

    #[test]
    fn failure_modes_while_the_ledger_is_unreachable() {
        let store = FakeShared::new(Rules::Envoy);
        let deny = config("");
        assert!(matches!(
            call(&store, &deny, "bob", amt("0.10"), 1, LedgerAccess::Unreachable).0,
            Verdict::Unavailable { .. }
        ));
        let allow = config(r#", "failure_mode": "allow", "offline_allowance": "0.25""#);
        let verdicts: Vec<Verdict> =
            (0..3).map(|i| call(&store, &allow, "bob", amt("0.10"), 1 + i, LedgerAccess::Unreachable).0).collect();
        // The entry is created now, with the store's first fresh origin.
        let origin =
            shared::read::<CustomerEntry>(&store, &entry_key(&allow, &allow.pricing.scopes[0], "bob")).unwrap().origin;
        assert_eq!(verdicts[0], allowed("0.10", None, origin));
        assert_eq!(verdicts[1], allowed("0.10", None, origin));
        assert!(matches!(verdicts[2], Verdict::Unavailable { .. }), "the allowance bounds offline spend");
        // The calls let through are recorded for booking later.
        let e = shared::read::<CustomerEntry>(&store, &entry_key(&allow, &allow.pricing.scopes[0], "bob")).unwrap();
        assert_eq!((e.unsent_calls(), e.spent), (2, amt("0.20")));
    }

    fn leased(store: &FakeShared, c: &FilterConfig, subject: &str, held: &str, at: u64) {
        let key = entry_key(c, &c.pricing.scopes[0], subject);
        shared::update::<CustomerEntry, ()>(store, &key, |e| {
            let mut e = e.unwrap_or_else(|| CustomerEntry::new(&key, subject, 7, at));
            e.refresh(amt("0"), 1, at);
            let answer = credits::sync::LeaseAnswer {
                lease_id: "l".into(),
                held: amt(held),
                granted: amt(held),
                expires_at: chrono::DateTime::UNIX_EPOCH,
                closed: false,
                recalled: false,
            };
            let asked = credits::sync::LeaseRequest {
                lease_id: "l".into(),
                seq: 1,
                want: amt(held),
                ttl_ms: c.lease.ttl_ms,
                release: false,
            };
            let answered = crate::customer::LeaseAnswered {
                answer: &answer,
                asked: &asked,
                revision: 1,
                sent_ms: at,
                lasts_ms: c.lease.ttl_ms,
            };
            e.apply_lease(&answered, crate::lease::reserve_ms(c, 0));
            (Some(e), ())
        })
        .unwrap();
    }

    #[test]
    fn a_lease_pays_for_calls_until_it_is_used_up_then_calls_wait_for_a_top_up() {
        let store = FakeShared::new(Rules::Kong { hash: |k| k.len() as u32 * 7 });
        let c = config(r#", "sync": {"strategy": "lease"}"#);
        assert_eq!(call(&store, &c, "alice", amt("0.10"), 1, LedgerAccess::Reachable).0, Verdict::AskLedger);
        leased(&store, &c, "alice", "0.30", 1);
        for i in 0..3 {
            assert!(matches!(
                call(&store, &c, "alice", amt("0.10"), 2 + i, LedgerAccess::Reachable).0,
                Verdict::Allow { .. }
            ));
        }
        // Not covered: wait for a top-up rather than guess ...
        assert_eq!(call(&store, &c, "alice", amt("0.10"), 6, LedgerAccess::Reachable).0, Verdict::AskLedger);
        // ... and after it, what is held decides — unless the ledger had more than it set aside
        // (calls that waited for the same top-up took it): then another top-up is asked for.
        let key = entry_key(&c, &c.pricing.scopes[0], "alice");
        shared::update::<CustomerEntry, ()>(&store, &key, |e| {
            let mut e = e.unwrap();
            e.live = amt("5.00");
            (Some(e), ())
        })
        .unwrap();
        assert_eq!(call(&store, &c, "alice", amt("0.10"), 7, LedgerAccess::Asked).0, Verdict::AskLedger);
        shared::update::<CustomerEntry, ()>(&store, &key, |e| {
            let mut e = e.unwrap();
            e.live = amt("0.00");
            (Some(e), ())
        })
        .unwrap();
        assert_eq!(
            call(&store, &c, "alice", amt("0.10"), 7, LedgerAccess::Asked).0,
            Verdict::Refuse { scope: 0, needed: amt("0.10"), available: amt("0.00") }
        );
    }

    /// `credit_then_invoice` under a lease: a call beyond the lease is let through on a fresh
    /// entry, takes what the lease has left and nothing more (the rest is overage, booked by the
    /// ledger), so the lease never goes negative and the balance shown never drops below zero.
    #[test]
    fn credit_then_invoice_spends_a_lease_down_to_zero_and_no_further() {
        let store = FakeShared::new(Rules::Envoy);
        let c = config(r#", "settlement_mode": "credit_then_invoice", "sync": {"strategy": "lease"}"#);
        leased(&store, &c, "alice", "0.15", 1);
        let key = entry_key(&c, &c.pricing.scopes[0], "alice");
        let lease_left = || shared::read::<CustomerEntry>(&store, &key).unwrap().lease.remaining;
        let (first, _) = call(&store, &c, "alice", amt("0.10"), 2, LedgerAccess::Reachable);
        assert_eq!(first, Verdict::Allow { held: vec![held_from_lease("0.10", "0.10")], balance: Some(amt("0.05")) });
        assert_eq!(lease_left(), amt("0.05"));
        // Beyond the lease: let through, holding the 0.05 left.
        let (second, _) =
            admit(&store, &c, "alice", &[amt("0.10")], Charging::AtCompletion, 3, LedgerAccess::Reachable);
        assert_eq!(second, Verdict::Allow { held: vec![held_from_lease("0.10", "0.05")], balance: Some(amt("0.00")) });
        let Verdict::Allow { held, .. } = second else { unreachable!() };
        complete(&store, &c, "alice", &held, &[amt("0.10")], 3);
        assert_eq!(lease_left(), amt("0.00"));
        let e = shared::read::<CustomerEntry>(&store, &key).unwrap();
        assert_eq!((e.unsent_calls(), e.spent), (2, amt("0.20")), "both calls are booked in full");
        // Past its freshness, a call beyond the lease asks the ledger rather than guess.
        let stale = 3 + u64::from(c.sync.max_stale_ms) + 1;
        assert_eq!(call(&store, &c, "alice", amt("0.10"), stale, LedgerAccess::Reachable).0, Verdict::AskLedger);
    }

    /// A call that ran on credit held in the lease of an entry the host evicted meanwhile is not
    /// booked through the entry made since: that lease keeps its credit until its TTL (and the
    /// grant behind it may expire there), so the customer would pay for the call twice. It is
    /// counted as dropped. Under `cached` the ledger held nothing for it: it is booked.
    #[test]
    fn a_call_running_on_an_evicted_entrys_lease_is_not_charged_again() {
        for (strategy, booked) in [("lease", 0), ("cached", 1)] {
            let c = config(&format!(r#", "sync": {{"strategy": "{strategy}"}}"#));
            let key = entry_key(&c, &c.pricing.scopes[0], "alice");
            let store = FakeShared::new(Rules::Envoy);
            leased(&store, &c, "alice", "0.30", 1);
            shared::update::<CustomerEntry, ()>(&store, &key, |e| {
                let mut e = e.unwrap();
                e.refresh(amt("1.00"), 2, 1);
                (Some(e), ())
            })
            .unwrap();
            let (v, _) = admit(&store, &c, "alice", &[amt("0.10")], Charging::AtCompletion, 2, LedgerAccess::Reachable);
            let Verdict::Allow { held, .. } = v else { panic!("{strategy}: {v:?}") };
            assert_eq!(held[0].from_lease.is_positive(), strategy == "lease");
            store.remove(&key);
            let done = complete(&store, &c, "alice", &held, &[amt("0.10")], 3);
            let e = shared::read::<CustomerEntry>(&store, &key).unwrap();
            assert_eq!((e.unsent_calls(), done.effects.usage_dropped), (booked, booked == 0), "{strategy}");
        }
    }

    /// Charged at admission (`Charging::AtAdmission`), a call leaves its customer's entry as a
    /// call that held its price and completed at it leaves it, and shows the same balance: on a
    /// lease, beyond one under `credit_then_invoice`, on a cached balance, and offline. One that
    /// then fails (costs nothing) is refunded to what a held call that failed leaves, but for its
    /// number: it stays in the range, costing nothing.
    #[test]
    fn a_call_charged_at_admission_leaves_the_entry_as_one_held_and_completed_at_its_price() {
        let leases = r#", "sync": {"strategy": "lease"}"#;
        let beyond = r#", "settlement_mode": "credit_then_invoice", "sync": {"strategy": "lease"}"#;
        let cached = r#", "sync": {"strategy": "cached"}"#;
        let offline = r#", "failure_mode": "allow", "sync": {"strategy": "cached"}"#;
        for (extra, access) in [
            (leases, LedgerAccess::Reachable),
            (beyond, LedgerAccess::Reachable),
            (cached, LedgerAccess::Reachable),
            (offline, LedgerAccess::Unreachable),
        ] {
            let c = config(extra);
            let key = entry_key(&c, &c.pricing.scopes[0], "alice");
            let run = |charging: Charging| {
                let store = FakeShared::new(Rules::Envoy);
                if c.sync.strategy == Strategy::Lease {
                    let held = if c.settlement_mode == SettlementMode::CreditThenInvoice { "0.15" } else { "0.30" };
                    leased(&store, &c, "alice", held, 1);
                } else if access == LedgerAccess::Reachable {
                    shared::update::<CustomerEntry, ()>(&store, &key, |_| {
                        let mut e = CustomerEntry::new(&key, "alice", 7, 1);
                        e.refresh(amt("1.00"), 1, 1);
                        (Some(e), ())
                    })
                    .unwrap();
                }
                // Three calls: under `credit_then_invoice` the second goes beyond the lease; the
                // third fails.
                let verdicts: Vec<Verdict> = (2..5)
                    .map(|at| {
                        let (v, _) = admit(&store, &c, "alice", &[amt("0.10")], charging, at, access);
                        let cost = if at == 4 { Amount::ZERO } else { amt("0.10") };
                        if let (true, Verdict::Allow { held, .. }) = (charging == Charging::AtCompletion || at == 4, &v)
                        {
                            complete(&store, &c, "alice", held, &[cost], at);
                        }
                        v
                    })
                    .collect();
                (verdicts, shared::read::<CustomerEntry>(&store, &key).unwrap())
            };
            let (held, after_held) = run(Charging::AtCompletion);
            let (charged, after_charged) = run(Charging::AtAdmission);
            // Each run's store numbers the entry it creates offline with an origin of its own.
            let alike = |v: &Verdict, charged: bool| match v.clone() {
                Verdict::Allow { held, balance } => {
                    assert!(held.iter().all(|h| h.charged == charged), "{extra}: {held:?}");
                    let held = held.into_iter().map(|h| Hold { charged: false, origin: 0, call: 0, ..h }).collect();
                    Verdict::Allow { held, balance }
                }
                other => panic!("{extra}: {other:?}"),
            };
            let charged: Vec<Verdict> = charged.iter().map(|v| alike(v, true)).collect();
            assert_eq!(charged, held.iter().map(|v| alike(v, false)).collect::<Vec<_>>(), "{extra}");
            assert_eq!(after_charged.holds, crate::customer::Holds::default(), "{extra}: nothing held");
            let (holds, origin, next_call) =
                (after_charged.holds.clone(), after_charged.origin, after_charged.next_call);
            assert_eq!(after_held.unsent_calls(), 2, "{extra}: a held call that failed is not numbered");
            assert_eq!(after_charged, CustomerEntry { holds, origin, next_call, ..after_held }, "{extra}");
            assert_eq!((after_charged.unsent_calls(), after_charged.spent), (3, amt("0.20")), "{extra}");
        }
    }

    fn held_from_lease(amount: &str, from_lease: &str) -> Hold {
        Hold { amount: amt(amount), from_lease: amt(from_lease), origin: 7, ..Hold::default() }
    }

    #[test]
    fn a_lease_whose_credit_expires_before_it_can_be_spent_refuses_instead_of_asking_again() {
        let store = FakeShared::new(Rules::Envoy);
        let c = config(r#", "sync": {"strategy": "lease"}, "lease": {"ttl_ms": 10000}"#);
        let key = entry_key(&c, &c.pricing.scopes[0], "alice");
        // The ledger leases 0.50 that expires in 2 s: within the node's reserve (3 s). What is
        // still live (0.40) is the same expiring credit, which the ledger would not lease either.
        shared::update::<CustomerEntry, ()>(&store, &key, |e| {
            let mut e = e.unwrap_or_else(|| CustomerEntry::new(&key, "alice", 7, 1000));
            e.refresh(amt("0.40"), 1, 1000);
            let answer = credits::sync::LeaseAnswer {
                lease_id: "l".into(),
                held: amt("0.50"),
                granted: amt("0.50"),
                expires_at: chrono::DateTime::UNIX_EPOCH,
                closed: false,
                recalled: false,
            };
            let asked = credits::sync::LeaseRequest {
                lease_id: "l".into(),
                seq: 1,
                want: amt("0.50"),
                ttl_ms: 10_000,
                release: false,
            };
            let answered = crate::customer::LeaseAnswered {
                answer: &answer,
                asked: &asked,
                revision: 2,
                sent_ms: 1000,
                lasts_ms: 2000,
            };
            e.apply_lease(&answered, crate::lease::reserve_ms(&c, 0));
            assert!(e.lease.dry);
            (Some(e), ())
        })
        .unwrap();
        assert_eq!(call(&store, &c, "alice", amt("0.10"), 1100, LedgerAccess::Reachable).0, Verdict::AskLedger);
        assert_eq!(
            call(&store, &c, "alice", amt("0.10"), 1100, LedgerAccess::Asked).0,
            Verdict::Refuse { scope: 0, needed: amt("0.10"), available: amt("0") }
        );
    }

    #[test]
    fn a_lease_is_not_spent_past_the_nodes_deadline() {
        let store = FakeShared::new(Rules::Envoy);
        let c = config(r#", "sync": {"strategy": "lease"}, "lease": {"ttl_ms": 10000}"#);
        leased(&store, &c, "alice", "5", 1000);
        // Sent at 1000, the ledger may expire it from 11000: the node stops at 11000 − (1000
        // interval + 1000 timeout + 3000 for a sync that fails and goes again, more than the
        // 1000 tenth of the TTL) so its calls get reported.
        assert!(matches!(
            call(&store, &c, "alice", amt("0.10"), 5999, LedgerAccess::Unreachable).0,
            Verdict::Allow { .. }
        ));
        assert!(matches!(
            call(&store, &c, "alice", amt("0.10"), 6000, LedgerAccess::Unreachable).0,
            Verdict::Unavailable { .. }
        ));
    }

    /// Input tokens (estimated 100 at 0.01) and output tokens (estimated 10 at 0.10), each in its
    /// own feature, under `cached`.
    fn tokens() -> FilterConfig {
        let json = r#"{"ledger": {"upstream": "ledger", "token": "t"}, "currency": "USD", "sync": {"strategy": "cached"},
            "pricing": {"units": [
                {"name": "in", "feature_key": "input_tokens", "unit_price": "0.01", "source": {"response_header": "x-in"}, "estimate": {"units": "100"}},
                {"name": "out", "feature_key": "output_tokens", "unit_price": "0.10", "source": {"response_header": "x-out"}, "estimate": {"units": "10"}}
            ]}}"#;
        FilterConfig::parse(json.as_bytes()).unwrap()
    }

    fn known_in(store: &FakeShared, c: &FilterConfig, scope: usize, subject: &str, live: &str) {
        let key = entry_key(c, &c.pricing.scopes[scope], subject);
        shared::update::<CustomerEntry, ()>(store, &key, |e| {
            let mut e = e.unwrap_or_else(|| CustomerEntry::new(&key, subject, 7, 1));
            e.refresh(amt(live), 1, 1);
            (Some(e), ())
        })
        .unwrap();
    }

    fn entry(store: &FakeShared, c: &FilterConfig, scope: usize, subject: &str) -> CustomerEntry {
        shared::read::<CustomerEntry>(store, &entry_key(c, &c.pricing.scopes[scope], subject)).unwrap()
    }

    #[test]
    fn a_call_is_let_through_only_if_every_feature_covers_its_estimate() {
        let store = FakeShared::new(Rules::Envoy);
        let c = tokens();
        known_in(&store, &c, 0, "ann", "5.00");
        known_in(&store, &c, 1, "ann", "0.50");
        let (v, _) =
            admit(&store, &c, "ann", &[amt("1.00"), amt("1.00")], Charging::AtCompletion, 2, LedgerAccess::Reachable);
        assert_eq!(v, Verdict::Refuse { scope: 1, needed: amt("1.00"), available: amt("0.50") });
        // The input tokens' hold was given back.
        assert_eq!(
            (entry(&store, &c, 0, "ann").available(), entry(&store, &c, 0, "ann").holds.count),
            (amt("5.00"), 0)
        );
        let (v, _) =
            admit(&store, &c, "ann", &[amt("1.00"), amt("0.40")], Charging::AtCompletion, 3, LedgerAccess::Reachable);
        let Verdict::Allow { held, balance } = v else { panic!("{v:?}") };
        assert_eq!(balance, Some(amt("4.00")));
        assert_eq!(entry(&store, &c, 1, "ann").available(), amt("0.10"));
        // It used 30 input tokens and 7 output tokens (more than the 4 it held for).
        let completed = complete(&store, &c, "ann", &held, &[amt("0.30"), amt("0.70")], 4);
        assert_eq!(completed.balance, Some(amt("4.70")));
        let (input, output) = (entry(&store, &c, 0, "ann"), entry(&store, &c, 1, "ann"));
        assert_eq!((input.available(), input.spent, input.holds.count), (amt("4.70"), amt("0.30"), 0));
        assert_eq!((output.available(), output.spent), (amt("-0.20"), amt("0.70")), "charged in full");
        // Its output credit is overdrawn now: even a call that holds nothing there is refused.
        let (v, _) =
            admit(&store, &c, "ann", &[amt("1.00"), amt("0")], Charging::AtCompletion, 5, LedgerAccess::Reachable);
        assert_eq!(v, Verdict::Refuse { scope: 1, needed: amt("0"), available: amt("-0.20") });
        // A call that costs nothing (an upstream error) leaves no usage behind.
        known_in(&store, &c, 0, "bo", "1.00");
        known_in(&store, &c, 1, "bo", "1.00");
        let (v, _) =
            admit(&store, &c, "bo", &[amt("1.00"), amt("0.40")], Charging::AtCompletion, 6, LedgerAccess::Reachable);
        let Verdict::Allow { held, .. } = v else { panic!("{v:?}") };
        complete(&store, &c, "bo", &held, &[amt("0"), amt("0")], 7);
        let (input, output) = (entry(&store, &c, 0, "bo"), entry(&store, &c, 1, "bo"));
        assert_eq!((input.unsent_calls(), input.available(), output.available()), (0, amt("1.00"), amt("1.00")));
    }

    #[test]
    fn a_lease_scope_that_holds_nothing_needs_no_lease() {
        let store = FakeShared::new(Rules::Envoy);
        let json = r#"{"ledger": {"upstream": "ledger", "token": "t"}, "currency": "USD",
            "pricing": {"units": [{"name": "rows", "unit_price": "0.01", "source": {"response_header": "x-rows"}}]}}"#;
        let c = FilterConfig::parse(json.as_bytes()).unwrap();
        assert_eq!(c.sync.strategy, Strategy::Lease);
        known_in(&store, &c, 0, "ann", "1.00");
        let (v, _) = admit(&store, &c, "ann", &[amt("0")], Charging::AtCompletion, 2, LedgerAccess::Reachable);
        let Verdict::Allow { held, .. } = v else { panic!("{v:?}") };
        complete(&store, &c, "ann", &held, &[amt("0.05")], 3);
        let e = entry(&store, &c, 0, "ann");
        assert_eq!((e.spent, e.unsent_calls()), (amt("0.05"), 1));
    }

    #[test]
    fn a_full_backlog_follows_the_failure_mode() {
        let store = FakeShared::new(Rules::Envoy);
        let c = config(r#", "sync": {"strategy": "cached", "max_unsent_calls": 2}"#);
        known(&store, &c, "alice", "10", 1);
        call(&store, &c, "alice", amt("0.10"), 2, LedgerAccess::Reachable);
        call(&store, &c, "alice", amt("0.10"), 3, LedgerAccess::Reachable);
        assert!(matches!(
            call(&store, &c, "alice", amt("0.10"), 4, LedgerAccess::Reachable).0,
            Verdict::Unavailable { .. }
        ));
        let allow = config(r#", "failure_mode": "allow", "sync": {"strategy": "cached", "max_unsent_calls": 2}"#);
        let (v, _) = admit(&store, &allow, "alice", &[amt("0.10")], Charging::AtCompletion, 5, LedgerAccess::Reachable);
        let Verdict::Allow { held, .. } = v else { panic!("{v:?}") };
        // The drop is counted where the cost is known, once.
        let done = complete(&store, &allow, "alice", &held, &[amt("0.10")], 5);
        assert!(done.effects.usage_dropped);
        let (v, _) = admit(&store, &allow, "alice", &[amt("0.10")], Charging::AtCompletion, 6, LedgerAccess::Reachable);
        let Verdict::Allow { held, .. } = v else { panic!("{v:?}") };
        assert!(!complete(&store, &allow, "alice", &held, &[Amount::ZERO], 6).effects.usage_dropped, "it cost nothing");
    }

    #[test]
    fn a_backlog_is_full_before_its_range_would_exceed_the_amount_bound() {
        let store = FakeShared::new(Rules::Envoy);
        let json = r#"{"ledger": {"upstream": "ledger", "token": "t"}, "price": "600000000000000", "currency": "USD",
            "sync": {"strategy": "cached"}}"#;
        let c = FilterConfig::parse(json.as_bytes()).unwrap();
        known(&store, &c, "alice", "10000000000000000", 1);
        let price = c.price;
        assert!(matches!(call(&store, &c, "alice", price, 2, LedgerAccess::Reachable).0, Verdict::Allow { .. }));
        // Two calls would make an unsent range of 1.2 × 10^15: the failure mode (deny) applies.
        assert!(matches!(call(&store, &c, "alice", price, 3, LedgerAccess::Reachable).0, Verdict::Unavailable { .. }));
    }

    /// A call priced after its response (README, "AI gateway") holds its estimate while in
    /// flight and is charged in full, whatever it used: a customer's overspend is bounded by the
    /// excess over their holds of the calls in flight at once.
    mod calls_priced_after_their_response {
        use super::*;
        use proptest::prelude::*;

        const CREDIT: &str = "10.00";
        const ESTIMATE: &str = "1.00";

        /// A call arrives (`true`), or the in-flight call `pick` completes having used `units`
        /// tenths (0 to 3 times its estimate).
        fn step() -> impl proptest::strategy::Strategy<Value = (bool, usize, u8)> {
            (any::<bool>(), any::<usize>(), 0u8..=30)
        }

        proptest! {
            #[test]
            fn overspend_stays_within_the_excess_of_the_calls_in_flight_at_once(
                steps in proptest::collection::vec(step(), 1..200),
            ) {
                let store = FakeShared::new(Rules::Envoy);
                let c = config("");
                known(&store, &c, "ann", CREDIT, 1);
                // (held, admitted at step) of calls in flight; (admitted, completed, excess) of calls done.
                let mut in_flight: Vec<(Vec<Hold>, usize)> = Vec::new();
                let mut done: Vec<(usize, usize, Amount)> = Vec::new();
                let mut spent = Amount::ZERO;
                let finish = |at: usize, (held, admitted): (Vec<Hold>, usize), units: u8| {
                    let used = amt("0.10").times(u64::from(units)).unwrap();
                    let completed = complete(&store, &c, "ann", &held, &[used], 2 + at as u64);
                    assert_eq!(completed.done, [true]);
                    (used, (admitted, at, (used - amt(ESTIMATE)).max(Amount::ZERO)))
                };
                let mut at = 0;
                for (arrives, pick, units) in steps {
                    at += 1;
                    if arrives || in_flight.is_empty() {
                        let (v, _) = admit(&store, &c, "ann", &[amt(ESTIMATE)], Charging::AtCompletion, 2 + at as u64, LedgerAccess::Reachable);
                        if let Verdict::Allow { held, .. } = v {
                            in_flight.push((held, at));
                        }
                    } else {
                        let (used, call) = finish(at, in_flight.swap_remove(pick % in_flight.len()), units);
                        spent += used;
                        done.push(call);
                    }
                }
                while let Some(call) = in_flight.pop() {
                    at += 1;
                    let (used, call) = finish(at, call, 30);
                    spent += used;
                    done.push(call);
                }
                let e = entry(&store, &c, 0, "ann");
                prop_assert_eq!(e.available(), amt(CREDIT) - spent, "every call charged what it used");
                let at_once = (0..=at)
                    .map(|t| done.iter().filter(|(from, to, _)| *from <= t && t < *to).map(|(_, _, x)| *x).sum::<Amount>())
                    .max()
                    .unwrap_or(Amount::ZERO);
                prop_assert!(spent - amt(CREDIT) <= at_once, "overspent {} with {} in flight at once", spent - amt(CREDIT), at_once);
            }
        }
    }
}
