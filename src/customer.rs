//! What a node knows about one customer in one currency and feature scope: the ledger's live
//! balance at the last refresh, and the node's usage not yet booked. Kept in shared data so all
//! workers of a node spend from one balance, and so unsent usage outlives a worker's instance.

use credits::sync::UsageRange;
use credits::{Amount, SettlementMode};

use crate::shared::Keyed;

/// Calls `from..to` sent to the ledger and not yet confirmed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Flight {
    pub from: u64,
    pub to: u64,
    pub amount: Amount,
    /// The worker that sent it, and when: another worker re-sends it only once it is stale.
    pub owner: u64,
    pub sent_ms: u64,
}

/// The node's lease for this customer: credit the ledger holds for the node alone.
#[derive(Clone, Debug, PartialEq, Eq, Default)]
pub struct Lease {
    /// Open at the ledger as far as the node knows.
    pub open: bool,
    /// The highest top-up request number sent.
    pub seq: u64,
    /// What the node may still spend from it.
    pub remaining: Amount,
    /// The node stops spending from the lease at this host time (before the ledger's expiry).
    pub spend_until_ms: u64,
    /// The revision of the answer `remaining` comes from.
    pub revision: i64,
    /// Answers to requests numbered below this are stale: the node released the lease since.
    pub floor_seq: u64,
}

/// Calls per minute of this customer on this node, measured over sync ticks.
#[derive(Clone, Debug, PartialEq, Eq, Default)]
pub struct RateMeter {
    pub window_start_ms: u64,
    pub window_start_call: u64,
    pub calls_per_min: u64,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Standing {
    /// Known to the ledger as this customer.
    Known { customer_id: String },
    /// The ledger has no customer with this subject.
    Unknown,
    /// Not yet heard from the ledger (calls let through while it was unreachable).
    Unconfirmed,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CustomerEntry {
    /// The shared-data key this entry belongs to (checked on every read).
    pub key: String,
    pub subject: String,
    pub standing: Standing,
    /// The ledger's live balance as of `revision`.
    pub live: Amount,
    pub revision: i64,
    /// Host time of the last answer from the ledger (0: never).
    pub refreshed_ms: u64,
    /// Spent by calls `unsent_from..next_call`, not yet sent.
    pub spent: Amount,
    pub next_call: u64,
    pub unsent_from: u64,
    pub flight: Option<Flight>,
    /// Spent while the ledger was unreachable and nothing usable was cached.
    pub offline_spent: Amount,
    pub last_used_ms: u64,
    pub lease: Lease,
    pub rate: RateMeter,
    pub holds: Holds,
}

/// What calls let through and not yet settled set aside (their estimates). A worker that goes
/// away mid-call never settles its hold, so holds stop counting `timeout` after the last one.
#[derive(Clone, Debug, PartialEq, Eq, Default)]
pub struct Holds {
    pub amount: Amount,
    pub count: u64,
    pub until_ms: u64,
}

/// What the next sync should send for an entry.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Outgoing {
    pub range: Option<UsageRange>,
}

impl CustomerEntry {
    pub fn new(key: &str, subject: &str, now_ms: u64) -> Self {
        CustomerEntry {
            key: key.to_owned(),
            subject: subject.to_owned(),
            standing: Standing::Unconfirmed,
            live: Amount::ZERO,
            revision: -1,
            refreshed_ms: 0,
            spent: Amount::ZERO,
            next_call: 0,
            unsent_from: 0,
            flight: None,
            offline_spent: Amount::ZERO,
            last_used_ms: now_ms,
            lease: Lease::default(),
            rate: RateMeter { window_start_ms: now_ms, ..RateMeter::default() },
            holds: Holds::default(),
        }
    }

    /// Forgets holds whose calls can no longer settle.
    pub fn expire_holds(&mut self, now_ms: u64) {
        if self.holds.count > 0 && now_ms >= self.holds.until_ms {
            self.holds = Holds::default();
        }
    }

    /// Sets `amount` aside for a call until it settles.
    pub fn place_hold(&mut self, amount: Amount, now_ms: u64, timeout_ms: u64) {
        self.holds.amount += amount;
        self.holds.count += 1;
        self.holds.until_ms = self.holds.until_ms.max(now_ms + timeout_ms);
        self.last_used_ms = now_ms;
    }

    /// Ends a call's hold of `amount` (what it then costs is spent separately).
    pub fn release_hold(&mut self, amount: Amount) {
        self.holds.count = self.holds.count.saturating_sub(1);
        self.holds.amount =
            if self.holds.count == 0 { Amount::ZERO } else { (self.holds.amount - amount).max(Amount::ZERO) };
    }

    /// Does the node still owe the ledger a report or hold a lease of this customer?
    pub fn has_pending(&self) -> bool {
        self.unsent_calls() > 0 || self.flight.is_some() || self.lease.open || self.holds.count > 0
    }

    /// Can a call priced at `price` be paid from the lease now?
    pub fn lease_covers(&self, price: Amount, now_ms: u64) -> bool {
        self.lease.open && now_ms < self.lease.spend_until_ms && self.lease.remaining >= price
    }

    /// Updates the observed call rate once per `window_ms`.
    pub fn measure_rate(&mut self, now_ms: u64, window_ms: u64) {
        let elapsed = now_ms.saturating_sub(self.rate.window_start_ms);
        if elapsed >= window_ms && elapsed > 0 {
            let calls = self.next_call - self.rate.window_start_call;
            self.rate.calls_per_min = calls.saturating_mul(60_000) / elapsed;
            self.rate.window_start_ms = now_ms;
            self.rate.window_start_call = self.next_call;
        }
    }

    /// The ledger's answer about the lease, given when the request left (`sent_ms`). The node
    /// stops spending `reserve_ms` before the ledger could expire the lease, so that every call it
    /// lets through can still be reported in time (see `sync::lease_reserve_ms`).
    pub fn apply_lease(
        &mut self,
        answer: &credits::sync::LeaseAnswer,
        request_seq: u64,
        revision: i64,
        sent_ms: u64,
        ttl_ms: u64,
        reserve_ms: u64,
    ) {
        if revision <= self.lease.revision || request_seq < self.lease.floor_seq {
            return;
        }
        self.lease.revision = revision;
        if answer.closed {
            self.lease.open = false;
            self.lease.remaining = Amount::ZERO;
            return;
        }
        // The ledger's hold already reflects every range it confirmed; what this node spent and
        // has not had confirmed is still in it.
        // Calls still holding their estimate will spend from it too.
        let unconfirmed = self.spent + self.flight.as_ref().map_or(Amount::ZERO, |f| f.amount) + self.holds.amount;
        self.lease.open = true;
        self.lease.remaining = (answer.held - unconfirmed).max(Amount::ZERO);
        // Counted from when the request left: the ledger's TTL started no earlier.
        self.lease.spend_until_ms = (sent_ms + ttl_ms).saturating_sub(reserve_ms);
    }

    /// What can still be spent: the ledger's live balance minus everything not yet in it and
    /// what calls in progress hold.
    pub fn available(&self) -> Amount {
        self.live - self.spent - self.flight.as_ref().map_or(Amount::ZERO, |f| f.amount) - self.holds.amount
    }

    /// Has the ledger answered recently enough to trust `live`?
    pub fn is_fresh(&self, now_ms: u64, max_stale_ms: u64) -> bool {
        self.refreshed_ms > 0 && now_ms.saturating_sub(self.refreshed_ms) <= max_stale_ms
    }

    pub fn unsent_calls(&self) -> u64 {
        self.next_call - self.unsent_from
    }

    /// Records one call; returns its number (part of its idempotency key).
    pub fn spend(&mut self, price: Amount, now_ms: u64) -> u64 {
        let call = self.next_call;
        self.spent += price;
        self.next_call += 1;
        self.last_used_ms = now_ms;
        call
    }

    /// Prepares what `worker` sends now: the range already in flight if it is this worker's or
    /// has gone stale, otherwise the unsent calls as a new range (and none while another
    /// worker's range is fresh).
    pub fn take_outgoing(
        &mut self,
        worker: u64,
        now_ms: u64,
        stale_after_ms: u64,
        mode: SettlementMode,
        lease_id: Option<&str>,
    ) -> Outgoing {
        if let Some(f) = &mut self.flight {
            let resend = f.owner == worker || now_ms.saturating_sub(f.sent_ms) > stale_after_ms;
            if !resend {
                return Outgoing { range: None };
            }
            f.owner = worker;
            f.sent_ms = now_ms;
            return Outgoing {
                range: Some(UsageRange {
                    from: f.from,
                    to: f.to,
                    amount: f.amount,
                    settlement_mode: mode,
                    lease_id: lease_id.map(str::to_owned),
                }),
            };
        }
        if self.next_call == self.unsent_from {
            return Outgoing { range: None };
        }
        let flight =
            Flight { from: self.unsent_from, to: self.next_call, amount: self.spent, owner: worker, sent_ms: now_ms };
        let range = UsageRange {
            from: flight.from,
            to: flight.to,
            amount: flight.amount,
            settlement_mode: mode,
            lease_id: lease_id.map(str::to_owned),
        };
        self.flight = Some(flight);
        self.spent = Amount::ZERO;
        self.unsent_from = self.next_call;
        Outgoing { range: Some(range) }
    }

    /// The ledger confirmed `range` (booked now or before): it is part of the live balance.
    pub fn confirm(&mut self, range: &UsageRange) {
        if self.flight.as_ref().is_some_and(|f| f.from == range.from && f.to == range.to) {
            self.flight = None;
        }
    }

    /// A balance answer; an answer older than what is known already is ignored.
    pub fn refresh(&mut self, customer_id: &str, live: Amount, revision: i64, now_ms: u64) {
        self.standing = Standing::Known { customer_id: customer_id.to_owned() };
        if revision > self.revision {
            self.live = live;
            self.revision = revision;
        }
        self.refreshed_ms = now_ms;
        self.offline_spent = Amount::ZERO;
    }

    /// The ledger knows no such customer: usage of it cannot be booked. Returns the calls dropped.
    pub fn mark_unknown(&mut self, now_ms: u64) -> u64 {
        let dropped = self.unsent_calls() + self.flight.as_ref().map_or(0, |f| f.to - f.from);
        self.standing = Standing::Unknown;
        self.refreshed_ms = now_ms;
        self.spent = Amount::ZERO;
        self.unsent_from = self.next_call;
        self.flight = None;
        dropped
    }

    /// The ledger refused a range: it will never be booked, so stop re-sending it.
    pub fn drop_flight(&mut self, range: &UsageRange) -> u64 {
        match &self.flight {
            Some(f) if f.from == range.from && f.to == range.to => {
                self.flight = None;
                range.calls()
            }
            _ => 0,
        }
    }
}

// The stored form: one line, `|`-separated, with the key last (it may contain `|`).
// v2|standing|customer_id|live|revision|refreshed|spent|next|unsent_from|flight|offline|last_used|lease|rate|holds|subject_len|subject key
impl Keyed for CustomerEntry {
    fn key(&self) -> &str {
        &self.key
    }

    fn encode(&self) -> Vec<u8> {
        let (standing, customer_id) = match &self.standing {
            Standing::Known { customer_id } => ("k", customer_id.as_str()),
            Standing::Unknown => ("u", ""),
            Standing::Unconfirmed => ("n", ""),
        };
        let flight = match &self.flight {
            Some(f) => format!("{},{},{},{},{}", f.from, f.to, f.amount, f.owner, f.sent_ms),
            None => String::new(),
        };
        let lease = &self.lease;
        let lease = format!(
            "{},{},{},{},{},{}",
            u8::from(lease.open),
            lease.seq,
            lease.remaining,
            lease.spend_until_ms,
            lease.revision,
            lease.floor_seq
        );
        let rate = format!("{},{},{}", self.rate.window_start_ms, self.rate.window_start_call, self.rate.calls_per_min);
        let holds = format!("{},{},{}", self.holds.amount, self.holds.count, self.holds.until_ms);
        format!(
            "v2|{standing}|{customer_id}|{}|{}|{}|{}|{}|{}|{flight}|{}|{}|{lease}|{rate}|{holds}|{}|{}{}",
            self.live,
            self.revision,
            self.refreshed_ms,
            self.spent,
            self.next_call,
            self.unsent_from,
            self.offline_spent,
            self.last_used_ms,
            self.subject.len(),
            self.subject,
            self.key
        )
        .into_bytes()
    }

    fn decode(bytes: &[u8]) -> Option<Self> {
        let text = std::str::from_utf8(bytes).ok()?;
        let mut parts = text.splitn(17, '|');
        if parts.next()? != "v2" {
            return None;
        }
        let standing = parts.next()?;
        let customer_id = parts.next()?;
        let standing = match standing {
            "k" => Standing::Known { customer_id: customer_id.to_owned() },
            "u" => Standing::Unknown,
            "n" => Standing::Unconfirmed,
            _ => return None,
        };
        let live = Amount::parse(parts.next()?).ok()?;
        let revision = parts.next()?.parse().ok()?;
        let refreshed_ms = parts.next()?.parse().ok()?;
        let spent = Amount::parse(parts.next()?).ok()?;
        let next_call = parts.next()?.parse().ok()?;
        let unsent_from = parts.next()?.parse().ok()?;
        let flight = match parts.next()? {
            "" => None,
            f => {
                let mut it = f.split(',');
                let flight = Flight {
                    from: it.next()?.parse().ok()?,
                    to: it.next()?.parse().ok()?,
                    amount: Amount::parse(it.next()?).ok()?,
                    owner: it.next()?.parse().ok()?,
                    sent_ms: it.next()?.parse().ok()?,
                };
                Some(flight)
            }
        };
        let offline_spent = Amount::parse(parts.next()?).ok()?;
        let last_used_ms = parts.next()?.parse().ok()?;
        let mut l = parts.next()?.split(',');
        let lease = Lease {
            open: l.next()? == "1",
            seq: l.next()?.parse().ok()?,
            remaining: Amount::parse(l.next()?).ok()?,
            spend_until_ms: l.next()?.parse().ok()?,
            revision: l.next()?.parse().ok()?,
            floor_seq: l.next()?.parse().ok()?,
        };
        let mut r = parts.next()?.split(',');
        let rate = RateMeter {
            window_start_ms: r.next()?.parse().ok()?,
            window_start_call: r.next()?.parse().ok()?,
            calls_per_min: r.next()?.parse().ok()?,
        };
        let mut h = parts.next()?.split(',');
        let holds = Holds {
            amount: Amount::parse(h.next()?).ok()?,
            count: h.next()?.parse().ok()?,
            until_ms: h.next()?.parse().ok()?,
        };
        let subject_len: usize = parts.next()?.parse().ok()?;
        let rest = parts.next()?;
        let subject = rest.get(..subject_len)?.to_owned();
        let key = rest.get(subject_len..)?.to_owned();
        if unsent_from > next_call {
            return None;
        }
        Some(CustomerEntry {
            key,
            subject,
            standing,
            live,
            revision,
            refreshed_ms,
            spent,
            next_call,
            unsent_from,
            flight,
            offline_spent,
            last_used_ms,
            lease,
            rate,
            holds,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn amt(s: &str) -> Amount {
        Amount::parse(s).unwrap()
    }

    #[test]
    fn round_trips_through_its_stored_form() {
        let mut e = CustomerEntry::new("prepaid_credits/c/USD/-/a|b", "a|b", 5);
        e.refresh("01J", amt("1.00"), 3, 10);
        e.spend(amt("0.10"), 11);
        e.take_outgoing(9, 12, 1000, SettlementMode::CreditOnly, None);
        e.spend(amt("0.10"), 13);
        let back = CustomerEntry::decode(&e.encode()).unwrap();
        assert_eq!(back, e);
        assert!(CustomerEntry::decode(b"v2|garbage").is_none());
        assert!(CustomerEntry::decode(b"v2|k|x|NaN|1|1|0|0|0||0|0|0,0,0,0,0,0|0,0,0|0,0,0|1|ak").is_none());
        let mut held = e.clone();
        held.place_hold(amt("0.25"), 20, 1000);
        assert_eq!(CustomerEntry::decode(&held.encode()).unwrap(), held);
    }

    #[test]
    fn available_subtracts_unsent_and_in_flight_usage_until_confirmed() {
        let mut e = CustomerEntry::new("k", "s", 0);
        e.refresh("c", amt("1.00"), 1, 1);
        e.spend(amt("0.30"), 2);
        assert_eq!(e.available(), amt("0.70"));
        let out = e.take_outgoing(1, 3, 1000, SettlementMode::CreditOnly, None);
        let range = out.range.unwrap();
        assert_eq!((range.from, range.to, range.amount), (0, 1, amt("0.30")));
        e.spend(amt("0.20"), 4);
        assert_eq!(e.available(), amt("0.50"));
        // The ledger booked the range: its live balance now includes it.
        e.confirm(&range);
        e.refresh("c", amt("0.70"), 2, 5);
        assert_eq!(e.available(), amt("0.50"));
    }

    #[test]
    fn a_range_is_resent_unchanged_until_confirmed() {
        let mut e = CustomerEntry::new("k", "s", 0);
        e.spend(amt("0.10"), 1);
        let first = e.take_outgoing(1, 2, 1000, SettlementMode::CreditOnly, None).range.unwrap();
        e.spend(amt("0.10"), 3);
        // Another worker may not take it while it is fresh ...
        assert_eq!(e.take_outgoing(2, 500, 1000, SettlementMode::CreditOnly, None).range, None);
        // ... the owner re-sends the same range ...
        assert_eq!(e.take_outgoing(1, 600, 1000, SettlementMode::CreditOnly, None).range, Some(first.clone()));
        // ... and so does anyone once it is stale.
        assert_eq!(e.take_outgoing(2, 5000, 1000, SettlementMode::CreditOnly, None).range, Some(first.clone()));
        e.confirm(&first);
        let second = e.take_outgoing(2, 5001, 1000, SettlementMode::CreditOnly, None).range.unwrap();
        assert_eq!((second.from, second.to), (1, 2));
    }

    #[test]
    fn holds_set_credit_aside_until_settled_or_timed_out() {
        let mut e = CustomerEntry::new("k", "s", 0);
        e.refresh("c", amt("1.00"), 1, 1);
        e.place_hold(amt("0.40"), 2, 100);
        e.place_hold(amt("0.30"), 3, 100);
        assert_eq!(e.available(), amt("0.30"));
        assert!(e.has_pending(), "an entry with calls in progress is kept");
        e.release_hold(amt("0.40"));
        e.spend(amt("0.55"), 4);
        assert_eq!(e.available(), amt("0.15"));
        // The other call's worker went away: its hold stops counting after the timeout.
        e.expire_holds(102);
        assert_eq!(e.available(), amt("0.15"));
        e.expire_holds(103);
        assert_eq!((e.available(), e.holds.count), (amt("0.45"), 0));
        // A late settlement of an expired hold does not go below zero.
        e.release_hold(amt("0.30"));
        assert_eq!(e.holds, Holds::default());
    }

    #[test]
    fn older_answers_do_not_overwrite_newer_ones() {
        let mut e = CustomerEntry::new("k", "s", 0);
        e.refresh("c", amt("5"), 7, 1);
        e.refresh("c", amt("9"), 6, 2);
        assert_eq!(e.live, amt("5"));
    }
}
