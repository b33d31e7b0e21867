//! The tick's sync: one batched round trip per worker that sends the usage of every customer the
//! worker serves and refreshes their cached balances from the answer. Cold-miss balance reads use
//! the same request with a single subject and no usage.

use std::collections::{BTreeMap, HashSet};
use std::ops::Bound;

use credits::sync::{
    LeaseRequest, SubjectOutcome, SubjectSync, SyncRequest, SyncResponse, UsageOutcome, MAX_SUBJECTS_PER_SYNC,
};
use credits::Amount;

use crate::config::{FilterConfig, Strategy};
use crate::customer::{CustomerEntry, Standing};
use crate::decision::entry_key;
use crate::pricing::Scope;
use crate::registry;
use crate::shared::{self, SharedData};

/// The customers one worker keeps in sync, with when each was last used here.
#[derive(Debug, Default)]
pub struct Tracker {
    subjects: BTreeMap<String, u64>,
    /// Where the last tick stopped: a sync holds at most `MAX_SUBJECTS_PER_SYNC` subjects, so a
    /// worker with more customers goes round them over several ticks instead of always syncing
    /// the first ones.
    resume_after: Option<String>,
}

impl Tracker {
    pub fn touch(&mut self, subject: &str, now_ms: u64) {
        match self.subjects.get_mut(subject) {
            Some(t) => *t = now_ms,
            None => {
                self.subjects.insert(subject.to_owned(), now_ms);
            }
        }
    }

    /// Every customer once, starting after the one the last tick stopped at.
    fn in_turn(&self) -> Vec<&String> {
        match &self.resume_after {
            Some(last) => {
                let after = self.subjects.range::<String, _>((Bound::Excluded(last), Bound::Unbounded));
                let until = self.subjects.range::<String, _>((Bound::Unbounded, Bound::Included(last)));
                after.chain(until).map(|(s, _)| s).collect()
            }
            None => self.subjects.keys().collect(),
        }
    }

    /// Starts keeping a customer in sync (an instance that lost its tracker picks it up again).
    pub fn touch_if_absent(&mut self, subject: &str, now_ms: u64) {
        if !self.subjects.contains_key(subject) {
            self.subjects.insert(subject.to_owned(), now_ms);
        }
    }

    pub fn len(&self) -> usize {
        self.subjects.len()
    }

    pub fn is_empty(&self) -> bool {
        self.subjects.is_empty()
    }
}

/// A sync on its way: what was asked and when, so the answer can be matched to it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PendingSync {
    pub request: SyncRequest,
    pub sent_ms: u64,
}

impl PendingSync {
    pub fn body(&self) -> Vec<u8> {
        serde_json::to_vec(&self.request).unwrap_or_default()
    }
}

/// What applying an answer did, for metrics.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Applied {
    pub calls_confirmed: u64,
    pub calls_dropped: u64,
    pub unknown_subjects: u64,
}

/// How long a range may be in flight before another worker re-sends it.
pub fn stale_after_ms(config: &FilterConfig) -> u64 {
    (2 * u64::from(config.ledger.timeout_ms)).max(3 * u64::from(config.sync.interval_ms))
}

fn subject_sync(config: &FilterConfig, scope: &Scope, subject: &str) -> SubjectSync {
    SubjectSync {
        subject: subject.to_owned(),
        currency: config.currency,
        feature_key: scope.feature.clone(),
        usage: None,
        lease: None,
    }
}

/// The scope of this configuration a subject's sync was about (none if it has no such scope).
fn scope_of<'c>(config: &'c FilterConfig, asked: &SubjectSync) -> Option<&'c Scope> {
    config.pricing.scopes.iter().find(|s| s.feature == asked.feature_key)
}

/// The node's lease for a customer in a scope keeps one id for the node's life; the ledger
/// re-opens it after it was released.
pub fn lease_id(node: &str, config: &FilterConfig, scope: &Scope, subject: &str) -> String {
    format!("{node}/{}", entry_key(config, scope, subject))
}

/// How long before the ledger could expire a lease the node stops spending from it: long enough
/// for the calls it lets through until then to reach the ledger — the next tick, a sync stuck
/// behind an unanswered one until its timeout, and a tenth of the TTL for the way there.
pub fn lease_reserve_ms(config: &FilterConfig) -> u64 {
    u64::from(config.sync.interval_ms) + u64::from(config.ledger.timeout_ms) + config.lease.ttl_ms / 10
}

/// The credit a lease should hold: enough at the observed rate for `lease.horizon_ms`, or until
/// the customer's next turn in a sync (`turn_ms` away) and its answer if that is later, within
/// the configured bounds (in typical calls of the scope).
pub fn lease_target(config: &FilterConfig, scope: &Scope, calls_per_min: u64, turn_ms: u64) -> Amount {
    let l = &config.lease;
    let horizon = l.horizon_ms.max(turn_ms.saturating_add(u64::from(config.ledger.timeout_ms)));
    let calls = (calls_per_min.saturating_mul(horizon) / 60_000).clamp(l.min_calls, l.max_calls);
    scope.typical.times(calls).unwrap_or(scope.typical)
}

/// What to ask about the lease now: a top-up below the low-water mark (or enough for a waiting
/// call that needs `for_call`), a release once idle with nothing left to report or settle,
/// otherwise a renewal of an open lease. The customer's next sync is `turn_ms` away.
#[allow(clippy::too_many_arguments)]
fn lease_request(
    e: &mut CustomerEntry,
    config: &FilterConfig,
    scope: &Scope,
    node: &str,
    subject: &str,
    now_ms: u64,
    turn_ms: u64,
    for_call: Option<Amount>,
) -> Option<LeaseRequest> {
    let l = &config.lease;
    let id = lease_id(node, config, scope, subject);
    let idle = now_ms.saturating_sub(e.last_used_ms) > l.idle_release_ms;
    if idle && for_call.is_none() {
        if e.lease.open && e.unsent_calls() == 0 && e.flight.is_none() && e.holds.count == 0 {
            // From now on nothing is spent from it: the ledger gives back whatever it still holds,
            // and answers to earlier requests (which knew the lease open) no longer count.
            e.lease.open = false;
            e.lease.remaining = Amount::ZERO;
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
    let target = lease_target(config, scope, e.rate.calls_per_min, turn_ms);
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

/// A read for one customer whose call cannot be decided from what the node holds: its balance in
/// every scope of the configuration, and under `lease` top-ups sized for the customer and enough
/// for the waiting call, which holds `holds` (per scope).
pub fn balance_read(
    store: &dyn SharedData,
    config: &FilterConfig,
    node: &str,
    subject: &str,
    holds: &[Amount],
    now_ms: u64,
) -> PendingSync {
    let subjects = config
        .pricing
        .scopes
        .iter()
        .zip(holds)
        .map(|(scope, needed)| {
            let mut asked = subject_sync(config, scope, subject);
            if config.sync.strategy == Strategy::Lease {
                let key = entry_key(config, scope, subject);
                let lease = shared::update::<CustomerEntry, Option<LeaseRequest>>(store, &key, |entry| {
                    let mut e = entry.unwrap_or_else(|| CustomerEntry::new(&key, subject, now_ms));
                    let interval = u64::from(config.sync.interval_ms);
                    let request = lease_request(&mut e, config, scope, node, subject, now_ms, interval, Some(*needed));
                    (Some(e), request)
                });
                asked.lease = lease.ok().flatten();
            }
            asked
        })
        .collect();
    PendingSync { request: SyncRequest { node: node.to_owned(), subjects }, sent_ms: now_ms }
}

/// Builds this tick's sync: takes the usage ranges to send out of the shared entries. Customers
/// idle longer than `sync.idle_ms` with nothing left to send are forgotten.
pub fn prepare(
    store: &dyn SharedData,
    tracker: &mut Tracker,
    config: &FilterConfig,
    node: &str,
    worker: u64,
    now_ms: u64,
) -> Option<PendingSync> {
    // Whatever any worker of the node left to report or renew is this worker's business too.
    let registered: HashSet<String> = registry::all(store, config).into_iter().collect();
    for subject in &registered {
        tracker.touch_if_absent(subject, now_ms);
    }
    let idle = u64::from(config.sync.idle_ms);
    let stale = stale_after_ms(config);
    let leased = config.sync.strategy == Strategy::Lease;
    let scopes = &config.pricing.scopes;
    let mut subjects = Vec::new();
    let mut forget = Vec::new();
    // A worker with more customers than one sync holds reaches each only every few ticks: its
    // leases must last that long.
    let per_sync = (MAX_SUBJECTS_PER_SYNC / scopes.len().max(1)).max(1);
    let turn_ms = u64::from(config.sync.interval_ms) * (tracker.len().div_ceil(per_sync).max(1) as u64);
    let mut last = None;
    for subject in tracker.in_turn() {
        if subjects.len() + scopes.len() > MAX_SUBJECTS_PER_SYNC {
            break; // the rest goes out on the next ticks, in turn
        }
        last = Some(subject);
        let mut kept = false;
        for scope in scopes {
            let key = entry_key(config, scope, subject);
            let lease_id = leased.then(|| lease_id(node, config, scope, subject));
            let taken =
                shared::update::<CustomerEntry, Option<(SubjectSync, bool)>>(store, &key, |entry| match entry {
                    None => (None, None),
                    Some(mut e) => {
                        e.expire_holds(now_ms);
                        e.measure_rate(now_ms, u64::from(config.sync.interval_ms));
                        let outgoing =
                            e.take_outgoing(worker, now_ms, stale, config.settlement_mode, lease_id.as_deref());
                        let lease = if leased {
                            lease_request(&mut e, config, scope, node, subject, now_ms, turn_ms, None)
                        } else {
                            None
                        };
                        let pending = e.has_pending();
                        if now_ms.saturating_sub(e.last_used_ms) > idle
                            && !pending
                            && outgoing.range.is_none()
                            && lease.is_none()
                        {
                            return (None, None);
                        }
                        let mut s = subject_sync(config, scope, subject);
                        s.usage = outgoing.range;
                        s.lease = lease;
                        (Some(e), Some((s, pending)))
                    }
                });
            match taken {
                Ok(Some((s, pending))) => {
                    // Checked against the tick's snapshot: `add` reads a whole shard.
                    if pending && !registered.contains(subject) {
                        registry::add(store, config, subject);
                    }
                    subjects.push(s);
                    kept = true;
                }
                Ok(None) => {}
                Err(_) => kept = true, // contended: next tick
            }
        }
        if !kept {
            forget.push(subject.clone());
        }
    }
    tracker.resume_after = last.cloned();
    for s in forget {
        registry::remove(store, config, &s);
        tracker.subjects.remove(&s);
    }
    (!subjects.is_empty())
        .then(|| PendingSync { request: SyncRequest { node: node.to_owned(), subjects }, sent_ms: now_ms })
}

/// Why an answer could not be used.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum AnswerError {
    /// No answer, or a status that says the ledger is down or overloaded.
    Unavailable(String),
    /// An answer that is not what the protocol promises.
    Malformed(String),
}

/// Interprets the ledger's HTTP answer to a sync. Anything but a 200 with a matching body is an
/// error, never a panic.
pub fn parse_answer(
    pending: &PendingSync,
    status: Option<u16>,
    body: Option<&[u8]>,
) -> Result<SyncResponse, AnswerError> {
    let status = status.ok_or_else(|| AnswerError::Unavailable("no response from the ledger".into()))?;
    if status >= 500 || status == 429 {
        return Err(AnswerError::Unavailable(format!("the ledger answered {status}")));
    }
    if status != 200 {
        return Err(AnswerError::Malformed(format!("the ledger answered {status}")));
    }
    let response: SyncResponse = serde_json::from_slice(body.unwrap_or_default())
        .map_err(|e| AnswerError::Malformed(format!("unreadable sync answer: {e}")))?;
    let matches = response.subjects.len() == pending.request.subjects.len()
        && response.subjects.iter().zip(&pending.request.subjects).all(|(a, q)| a.subject == q.subject);
    if !matches {
        return Err(AnswerError::Malformed("the sync answer does not match the request".into()));
    }
    Ok(response)
}

/// Applies a good answer to the shared entries.
pub fn apply(
    store: &dyn SharedData,
    config: &FilterConfig,
    pending: &PendingSync,
    response: &SyncResponse,
    now_ms: u64,
) -> Applied {
    let mut applied = Applied::default();
    for (asked, answer) in pending.request.subjects.iter().zip(&response.subjects) {
        let Some(scope) = scope_of(config, asked) else { continue };
        let key = entry_key(config, scope, &asked.subject);
        let result = shared::update::<CustomerEntry, Applied>(store, &key, |entry| {
            let mut e = entry.unwrap_or_else(|| CustomerEntry::new(&key, &asked.subject, now_ms));
            let mut a = Applied::default();
            match &answer.outcome {
                SubjectOutcome::Ok { customer_id, usage, live, revision, lease } => {
                    if let (Some(range), Some(UsageOutcome::Booked | UsageOutcome::Duplicate)) = (&asked.usage, usage) {
                        let was_in_flight = e.flight.as_ref().is_some_and(|f| f.from == range.from && f.to == range.to);
                        e.confirm(range);
                        a.calls_confirmed += if was_in_flight { range.calls() } else { 0 };
                    }
                    if let (Some(lease), Some(asked_lease)) = (lease, &asked.lease) {
                        let reserve = lease_reserve_ms(config);
                        e.apply_lease(lease, asked_lease.seq, *revision, pending.sent_ms, config.lease.ttl_ms, reserve);
                    }
                    e.refresh(customer_id, *live, *revision, now_ms);
                }
                SubjectOutcome::UnknownSubject => {
                    a.calls_dropped += e.mark_unknown(now_ms);
                    a.unknown_subjects += 1;
                }
                SubjectOutcome::Rejected { .. } => {
                    if let Some(range) = &asked.usage {
                        a.calls_dropped += e.drop_flight(range);
                    }
                }
            }
            (Some(e), a)
        });
        if let Ok(a) = result {
            applied.calls_confirmed += a.calls_confirmed;
            applied.calls_dropped += a.calls_dropped;
            applied.unknown_subjects += a.unknown_subjects;
        }
    }
    applied
}

/// Registers the customers of an applied answer that now hold a lease or owe a report.
pub fn register_pending(store: &dyn SharedData, config: &FilterConfig, pending: &PendingSync) {
    for asked in &pending.request.subjects {
        let Some(scope) = scope_of(config, asked) else { continue };
        let pending = shared::read::<CustomerEntry>(store, &entry_key(config, scope, &asked.subject))
            .is_some_and(|e| e.has_pending());
        if pending {
            registry::add(store, config, &asked.subject);
        }
    }
}

/// Whether an entry's customer is known to the ledger (for tests and logs).
pub fn is_known(store: &dyn SharedData, config: &FilterConfig, subject: &str) -> bool {
    config.pricing.scopes.iter().all(|scope| {
        shared::read::<CustomerEntry>(store, &entry_key(config, scope, subject))
            .is_some_and(|e| matches!(e.standing, Standing::Known { .. }))
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::decision::{call, LedgerAccess, Verdict};
    use crate::shared::fake::{FakeShared, Rules};
    use credits::sync::{SubjectAnswer, UsageRange};
    use credits::Amount;

    fn config() -> FilterConfig {
        let json = r#"{"ledger": {"upstream": "ledger", "token": "t"}, "price": "0.10", "currency": "USD", "sync": {"strategy": "cached"}}"#;
        FilterConfig::parse(json.as_bytes()).unwrap()
    }

    fn amt(s: &str) -> Amount {
        Amount::parse(s).unwrap()
    }

    fn ok(subject: &str, usage: Option<UsageOutcome>, live: &str, revision: i64) -> SubjectAnswer {
        SubjectAnswer {
            subject: subject.into(),
            outcome: SubjectOutcome::Ok { customer_id: "c".into(), usage, live: amt(live), revision, lease: None },
        }
    }

    fn answer(subjects: Vec<SubjectAnswer>) -> SyncResponse {
        SyncResponse { server_time: chrono::DateTime::UNIX_EPOCH, subjects }
    }

    /// A ledger that books ranges once per key and tracks one customer's balance.
    struct MiniLedger {
        balance: Amount,
        booked: std::collections::BTreeSet<String>,
        revision: i64,
    }

    impl MiniLedger {
        fn answer(&mut self, req: &SyncRequest) -> SyncResponse {
            let subjects = req
                .subjects
                .iter()
                .map(|s| {
                    let usage = s.usage.as_ref().map(|r: &UsageRange| {
                        if self.booked.insert(s.usage_key(&req.node).unwrap_or_default()) {
                            self.balance -= r.amount;
                            self.revision += 1;
                            UsageOutcome::Booked
                        } else {
                            UsageOutcome::Duplicate
                        }
                    });
                    ok(&s.subject, usage, &self.balance.to_string(), self.revision)
                })
                .collect();
            answer(subjects)
        }
    }

    #[test]
    fn cold_read_then_spend_then_sync_books_everything_exactly_once() {
        let store = FakeShared::new(Rules::Envoy);
        let c = config();
        let mut ledger = MiniLedger { balance: amt("1.00"), booked: Default::default(), revision: 1 };
        let mut tracker = Tracker::default();
        // Cold miss: read, apply.
        let read = balance_read(&store, &c, "node", "alice", &[c.price], 10);
        let resp = ledger.answer(&read.request);
        apply(&store, &c, &read, &resp, 10);
        tracker.touch("alice", 10);
        for i in 0..4 {
            assert!(matches!(
                call(&store, &c, "alice", amt("0.10"), 11 + i, LedgerAccess::Reachable).0,
                Verdict::Allow { .. }
            ));
        }
        // Tick: the range goes out; the answer is lost; the retry is a duplicate.
        let first = prepare(&store, &mut tracker, &c, "node", 1, 100).unwrap();
        let _lost = ledger.answer(&first.request);
        let retry = prepare(&store, &mut tracker, &c, "node", 1, 200).unwrap();
        assert_eq!(retry.request.subjects[0].usage, first.request.subjects[0].usage);
        let resp = ledger.answer(&retry.request);
        let applied = apply(&store, &c, &retry, &resp, 201);
        assert_eq!(applied.calls_confirmed, 4);
        assert_eq!(ledger.balance, amt("0.60"), "four calls booked once");
        let e = shared::read::<CustomerEntry>(&store, &entry_key(&c, &c.pricing.scopes[0], "alice")).unwrap();
        assert_eq!((e.available(), e.flight.is_none()), (amt("0.60"), true));
    }

    #[test]
    fn a_worker_with_more_customers_than_one_sync_holds_goes_round_them_in_turn() {
        let store = FakeShared::new(Rules::Envoy);
        let c = config();
        let mut tracker = Tracker::default();
        let everyone: Vec<String> = (0..2500).map(|i| format!("s{i:04}")).collect();
        for s in &everyone {
            let read = balance_read(&store, &c, "node", s, &[c.price], 10);
            apply(&store, &c, &read, &answer(vec![ok(s, None, "1", 1)]), 10);
            tracker.touch(s, 10);
            assert!(matches!(call(&store, &c, s, amt("0.10"), 11, LedgerAccess::Reachable).0, Verdict::Allow { .. }));
        }
        let mut reported = std::collections::BTreeSet::new();
        for tick in 0..3 {
            let pending = prepare(&store, &mut tracker, &c, "node", 1, 100 + tick).unwrap();
            assert!(pending.request.subjects.len() <= MAX_SUBJECTS_PER_SYNC);
            reported.extend(pending.request.subjects.iter().filter(|s| s.usage.is_some()).map(|s| s.subject.clone()));
        }
        let missed: Vec<&String> = everyone.iter().filter(|s| !reported.contains(*s)).collect();
        assert!(missed.is_empty(), "{} customers were never reported, e.g. {:?}", missed.len(), missed.first());
    }

    #[test]
    fn a_lease_lasts_until_the_customers_next_turn_in_a_sync() {
        let c = FilterConfig::parse(br#"{"ledger": {"upstream": "l", "token": "t", "timeout_ms": 500}, "price": "0.01", "currency": "USD", "lease": {"max_calls": 100000}}"#).unwrap();
        let scope = &c.pricing.scopes[0];
        // 600 calls a minute: the default horizon (2 × 1 s interval + 0.5 s timeout) is 25 calls …
        assert_eq!(lease_target(&c, scope, 600, 1_000), amt("0.25"));
        // … but a customer synced every 10 ticks needs 10.5 s of calls.
        assert_eq!(lease_target(&c, scope, 600, 10_000), amt("1.05"));
        // Bounded as configured.
        assert_eq!(lease_target(&c, scope, 1, 10_000), amt("0.10"), "lease.min_calls");
    }

    #[test]
    fn malformed_or_failed_answers_are_errors_not_panics() {
        let c = config();
        let pending = balance_read(&FakeShared::new(Rules::Envoy), &c, "n", "alice", &[c.price], 1);
        assert!(matches!(parse_answer(&pending, None, None), Err(AnswerError::Unavailable(_))));
        assert!(matches!(parse_answer(&pending, Some(503), None), Err(AnswerError::Unavailable(_))));
        assert!(matches!(parse_answer(&pending, Some(200), Some(b"{not json")), Err(AnswerError::Malformed(_))));
        assert!(matches!(parse_answer(&pending, Some(401), Some(b"{}")), Err(AnswerError::Malformed(_))));
        let wrong = serde_json::to_vec(&answer(vec![ok("bob", None, "1", 1)])).unwrap();
        assert!(matches!(parse_answer(&pending, Some(200), Some(&wrong)), Err(AnswerError::Malformed(_))));
        let right = serde_json::to_vec(&answer(vec![ok("alice", None, "1", 1)])).unwrap();
        assert!(parse_answer(&pending, Some(200), Some(&right)).is_ok());
    }

    #[test]
    fn idle_customers_without_usage_are_forgotten() {
        let store = FakeShared::new(Rules::Envoy);
        let c = config();
        let read = balance_read(&store, &c, "node", "alice", &[c.price], 10);
        apply(&store, &c, &read, &answer(vec![ok("alice", None, "1", 1)]), 1);
        let mut tracker = Tracker::default();
        tracker.touch("alice", 1);
        assert!(prepare(&store, &mut tracker, &c, "node", 1, 2).is_some());
        assert!(prepare(&store, &mut tracker, &c, "node", 1, 1 + u64::from(c.sync.idle_ms) + 1).is_none());
        assert!(tracker.is_empty());
    }

    #[test]
    fn usage_of_an_unknown_subject_is_dropped_and_counted() {
        let store = FakeShared::new(Rules::Envoy);
        let allow = FilterConfig::parse(br#"{"ledger": {"upstream": "l", "token": "t"}, "price": "0.10", "currency": "USD", "failure_mode": "allow", "sync": {"strategy": "cached"}}"#).unwrap();
        call(&store, &allow, "ghost", amt("0.10"), 1, LedgerAccess::Unreachable);
        let mut tracker = Tracker::default();
        tracker.touch("ghost", 1);
        let pending = prepare(&store, &mut tracker, &allow, "node", 1, 2).unwrap();
        let unknown = SubjectAnswer { subject: "ghost".into(), outcome: SubjectOutcome::UnknownSubject };
        let applied = apply(&store, &allow, &pending, &answer(vec![unknown]), 3);
        assert_eq!((applied.calls_dropped, applied.unknown_subjects), (1, 1));
        assert!(!is_known(&store, &allow, "ghost"));
    }
}
