//! The tick's sync: one batched round trip per worker that sends the usage of every customer the
//! worker serves and refreshes their cached balances from the answer. Cold-miss balance reads use
//! the same request with a single subject and no usage.

use std::collections::HashSet;

use credits::limits::DEFAULT_MAX_BODY_BYTES;
use credits::sync::{
    LeaseRequest, SubjectAnswer, SubjectOutcome, SubjectSync, SyncRequest, SyncResponse, UsageOutcome,
    MAX_SUBJECTS_PER_SYNC,
};
use credits::Amount;

use crate::config::{FilterConfig, Strategy};
use crate::customer::{entry_key, CustomerEntry, LeaseAnswered, Standing};
use crate::lease;
use crate::pricing::Scope;
use crate::registry;
use crate::shared::{self, SharedData};
use crate::tracker::Tracker;

/// A sync on its way: what was asked and when, so the answer can be matched to it, and its
/// body (encoded once).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PendingSync {
    pub request: SyncRequest,
    pub sent_ms: u64,
    /// The sending worker's turn: the calls it lets through on a lease this sync's answer grants
    /// reach the ledger within it (`lease::reserve_ms`).
    pub turn_ms: u64,
    body: Vec<u8>,
}

impl PendingSync {
    pub fn new(request: SyncRequest, sent_ms: u64, turn_ms: u64) -> PendingSync {
        let body = serde_json::to_vec(&request).unwrap_or_default();
        PendingSync { request, sent_ms, turn_ms, body }
    }

    pub fn body(&self) -> &[u8] {
        &self.body
    }

    /// The customers it is about, a customer's scopes one after another.
    pub fn subjects(&self) -> impl Iterator<Item = &str> {
        self.request.subjects.iter().map(|s| s.subject.as_str())
    }

    /// The calls it reports.
    pub fn calls(&self) -> u64 {
        self.request.subjects.iter().filter_map(|s| s.usage.as_ref()).map(|u| u.calls()).sum()
    }
}

/// How much a tick may send: syncs (at most what the worker's turn needs), each of subjects and
/// bytes of JSON (the ledger refuses a body larger than its `--max-body-bytes`, 1 MiB by default,
/// with 413).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Budget {
    pub syncs: usize,
    pub subjects: usize,
    pub bytes: usize,
}

impl Default for Budget {
    fn default() -> Budget {
        Budget { syncs: MAX_SYNCS_PER_TICK, subjects: MAX_SUBJECTS_PER_SYNC, bytes: DEFAULT_MAX_BODY_BYTES }
    }
}

/// A sync's JSON body, built subject by subject within a budget (the same bytes serde writes
/// for a [`SyncRequest`]).
struct Body {
    bytes: Vec<u8>,
    subjects: Vec<SubjectSync>,
}

impl Body {
    fn new(node: &str) -> Body {
        let mut bytes = b"{\"node\":".to_vec();
        let _ = serde_json::to_writer(&mut bytes, node);
        bytes.extend_from_slice(b",\"subjects\":[");
        Body { bytes, subjects: Vec::new() }
    }

    /// Adds one customer's subjects if they fit `budget` (the first customer always goes), or
    /// gives them back. Written in place and taken back if they do not fit: no buffer per subject.
    fn add(&mut self, taken: Vec<SubjectSync>, budget: Budget) -> Result<(), Vec<SubjectSync>> {
        let start = self.bytes.len();
        for (i, s) in taken.iter().enumerate() {
            if i > 0 || !self.subjects.is_empty() {
                self.bytes.push(b',');
            }
            // A subject's sync is strings, amounts and numbers: it always serializes.
            let _ = serde_json::to_writer(&mut self.bytes, s);
        }
        let fits = self.subjects.len() + taken.len() <= budget.subjects && self.bytes.len() + 2 <= budget.bytes;
        if !fits && !self.subjects.is_empty() {
            self.bytes.truncate(start);
            return Err(taken);
        }
        self.subjects.extend(taken);
        Ok(())
    }

    fn finish(mut self, node: &str, sent_ms: u64, turn_ms: u64) -> Option<PendingSync> {
        if self.subjects.is_empty() {
            return None;
        }
        self.bytes.extend_from_slice(b"]}");
        let request = SyncRequest { node: node.to_owned(), subjects: self.subjects };
        Some(PendingSync { request, sent_ms, turn_ms, body: self.bytes })
    }
}

/// What applying an answer did, for metrics.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Applied {
    pub calls_confirmed: u64,
    pub calls_dropped: u64,
    /// Subjects the ledger has no customer for (their entries are deleted).
    pub unknown: Vec<String>,
    /// Subjects that still hold a lease or owe a report after it (to register).
    pub pending: Vec<String>,
    /// Shared-data writes that failed (contended).
    pub shared_failures: u64,
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

/// A read for one customer whose call cannot be decided from what the node holds: its balance in
/// every scope of the configuration, and under `lease` top-ups sized for the customer and enough
/// for the waiting calls, which need `needed` (per scope).
pub fn balance_read(
    store: &dyn SharedData,
    config: &FilterConfig,
    node: &str,
    subject: &str,
    needed: &[Amount],
    now_ms: u64,
    turn_ms: u64,
) -> PendingSync {
    let subjects = config
        .pricing
        .scopes
        .iter()
        .zip(needed)
        .map(|(scope, needed)| {
            let mut asked = subject_sync(config, scope, subject);
            if config.sync.strategy == Strategy::Lease {
                let key = entry_key(config, scope, subject);
                let lease = shared::update::<CustomerEntry, Option<LeaseRequest>>(store, &key, |entry| {
                    let mut e =
                        entry.unwrap_or_else(|| CustomerEntry::new(&key, subject, store.fresh_origin(), now_ms));
                    // A lease that runs dry between the customer's turns is topped up here: sized at
                    // the rate its calls came at since the last measure, to last until its turn.
                    e.measure_rate(now_ms, u64::from(config.sync.interval_ms));
                    let request = lease::request(&mut e, config, scope, now_ms, turn_ms, Some(*needed));
                    (Some(e), request)
                });
                asked.lease = lease.ok().flatten();
            }
            asked
        })
        .collect();
    PendingSync::new(SyncRequest { node: node.to_owned(), subjects }, now_ms, turn_ms)
}

/// This tick's syncs, and the customers that have something to report but are not in the node's
/// register yet (the caller registers them).
#[derive(Debug, Default)]
pub struct Prepared {
    /// At most [`Turn::syncs`] and the budget's, their customers disjoint.
    pub syncs: Vec<PendingSync>,
    pub unregistered: Vec<String>,
    /// Entries found gone or rebuilt since this worker's last tick found them.
    pub evicted: u64,
    /// Register writes that failed (contended).
    pub shared_failures: u64,
}

/// What one tick is about: the same for every customer it takes.
struct Tick<'a> {
    config: &'a FilterConfig,
    worker: u64,
    now_ms: u64,
    /// A customer's next turn in a sync is this far away: its lease must last that long.
    turn_ms: u64,
}

/// Most syncs a worker sends in one tick: 8,000 customers a tick, so with the defaults a worker
/// reaches up to 88,000 customers within [`turn_bound_ms`]; beyond that its turns grow longer.
pub const MAX_SYNCS_PER_TICK: usize = 8;

/// How a worker goes round its customers: how many syncs it sends a tick, and so how far apart
/// a customer's turns are (longer while the worker sends fewer because the ledger does not keep
/// up: `Worker::send_sync`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Turn {
    pub syncs: usize,
    pub ms: u64,
}

/// The longest a customer's turns may be apart so that what the node holds for it is still
/// usable when the next turn's sync fails and goes again at the next tick
/// ([`FilterConfig::answered_despite_a_failure_ms`]): a lease ([`lease::longest_turn_ms`], 11.5 s
/// with the defaults), a cached balance for `sync.max_stale_ms` (57 s).
pub fn turn_bound_ms(config: &FilterConfig) -> u64 {
    match config.sync.strategy {
        Strategy::Lease => lease::longest_turn_ms(config),
        Strategy::Cached => {
            let stale = u64::from(config.sync.max_stale_ms);
            stale.saturating_sub(config.answered_despite_a_failure_ms()).max(u64::from(config.sync.interval_ms))
        }
    }
}

/// How a worker with `customers` to go round does so: one sync a tick while that reaches each
/// within [`turn_bound_ms`], otherwise as many more (up to [`MAX_SYNCS_PER_TICK`]) as that
/// takes. With one sync a tick, a worker with more customers than its leases outlast (24,000
/// with the defaults) let each lease lapse between turns, and its customers' calls waited for
/// reads. Never more than `budget.syncs`: while the ledger holds the worker to fewer, its turns
/// are that much longer, and the leases it asks for are sized for the turns it really has.
pub fn turn(config: &FilterConfig, customers: usize, budget: Budget) -> Turn {
    let per_sync = (budget.subjects / config.pricing.scopes.len().max(1)).max(1);
    let interval = u64::from(config.sync.interval_ms).max(1);
    let ticks_within = (turn_bound_ms(config) / interval).max(1) as usize;
    let needed = customers.div_ceil(per_sync.saturating_mul(ticks_within));
    let syncs = needed.min(budget.syncs).clamp(1, MAX_SYNCS_PER_TICK);
    let ticks = customers.div_ceil(per_sync.saturating_mul(syncs)).max(1) as u64;
    Turn { syncs, ms: interval.saturating_mul(ticks) }
}

/// This tick's syncs as they fill, customer by customer, and what it found on the way.
struct Filling<'a> {
    store: &'a dyn SharedData,
    tick: Tick<'a>,
    node: &'a str,
    budget: Budget,
    /// The most syncs this tick sends.
    syncs: usize,
    registered: &'a HashSet<&'a str>,
    prepared: Prepared,
    body: Body,
    forget: Vec<String>,
    found: Vec<(String, Vec<Option<u64>>, bool)>,
}

impl Filling<'_> {
    /// Takes what the tick sends about `subject`; `false` when the tick's syncs are full (what
    /// was taken then stays this worker's, sent on a later tick).
    fn take(&mut self, subject: &str) -> bool {
        let (taken, pending, kept, origins) = take_subject(self.store, &self.tick, subject);
        if let Some(origins) = origins {
            self.found.push((subject.to_owned(), origins, pending));
        }
        if let Err(taken) = self.body.add(taken, self.budget) {
            if self.prepared.syncs.len() + 1 >= self.syncs {
                return false;
            }
            let full = std::mem::replace(&mut self.body, Body::new(self.node));
            self.prepared.syncs.extend(full.finish(self.node, self.tick.now_ms, self.tick.turn_ms));
            // A new body takes its first customer whatever its size.
            let _ = self.body.add(taken, self.budget);
        }
        // Checked against the tick's snapshot: the register is a whole shard to read.
        if pending && !self.registered.contains(subject) {
            self.prepared.unregistered.push(subject.to_owned());
        }
        if !kept {
            self.forget.push(subject.to_owned());
        }
        true
    }
}

/// Builds this tick's syncs, each within `budget`: takes the usage ranges to send out of the
/// shared entries. Customers idle longer than `sync.idle_ms` with nothing left to send are
/// forgotten.
pub fn prepare(
    store: &dyn SharedData,
    tracker: &mut Tracker,
    config: &FilterConfig,
    (node, worker): (&str, u64),
    budget: Budget,
    now_ms: u64,
) -> Prepared {
    // Whatever any worker of the node left to report or renew is this worker's business too.
    let register = registry::all(store, config);
    let registered = register.to_set();
    for subject in &registered {
        tracker.touch_if_absent(subject, now_ms);
    }
    let turn = turn(config, tracker.len(), budget);
    let tick = Tick { config, worker, now_ms, turn_ms: turn.ms };
    let mut fill = Filling {
        store,
        tick,
        node,
        budget,
        syncs: turn.syncs,
        registered: &registered,
        prepared: Prepared::default(),
        body: Body::new(node),
        forget: Vec::new(),
        found: Vec::new(),
    };
    let again = tracker.take_again();
    let sent_again = again.iter().take_while(|subject| fill.take(subject)).count();
    tracker.not_sent_again(&again[sent_again..]);
    let mut taken_subjects = 0;
    if sent_again == again.len() {
        for subject in tracker.in_turn() {
            if !tracker.is_sent_again(subject) && !fill.take(subject) {
                break;
            }
            taken_subjects += 1;
        }
    }
    let Filling { mut prepared, body, forget, found, .. } = fill;
    prepared.syncs.extend(body.finish(node, now_ms, turn.ms));
    tracker.turn_took(taken_subjects);
    for (subject, origins, pending) in found {
        prepared.evicted += tracker.found(&subject, &origins, pending, now_ms);
    }
    // Forgotten customers' entries go too, so the zone holds the customers of the last
    // `sync.idle_ms` (and Kong need not evict); one that was used meanwhile stays.
    let idle_ms = u64::from(config.sync.idle_ms);
    for s in &forget {
        prepared.shared_failures += u64::from(!registry::remove(store, config, s));
        for scope in &config.pricing.scopes {
            let key = entry_key(config, scope, s);
            let removed = shared::remove_if::<CustomerEntry>(store, &key, |e| e.disposable(now_ms, idle_ms));
            prepared.shared_failures += u64::from(removed.is_err());
        }
    }
    tracker.forget(&forget.iter().map(String::as_str).collect());
    prepared
}

/// What the tick sends about one customer, in every scope; whether it still has something to
/// report; whether the worker keeps it (it is not idle, or its entry was contended); and each
/// scope's entry's origin as found (none: no entry; all `None` when one was contended).
fn take_subject(
    store: &dyn SharedData,
    tick: &Tick<'_>,
    subject: &str,
) -> (Vec<SubjectSync>, bool, bool, Option<Vec<Option<u64>>>) {
    let mut taken = Vec::new();
    let mut origins = Some(Vec::new());
    let (mut pending, mut kept) = (false, false);
    for scope in &tick.config.pricing.scopes {
        let key = entry_key(tick.config, scope, subject);
        let result =
            shared::update::<CustomerEntry, (Option<u64>, Option<(Option<SubjectSync>, bool)>)>(store, &key, |entry| {
                let origin = entry.as_ref().map(|e| e.origin);
                let (next, taken) = take_scope(entry, tick, scope, subject);
                (next, (origin, taken))
            });
        match result {
            Ok((origin, taken_here)) => {
                if let Some(o) = &mut origins {
                    o.push(origin);
                }
                if let Some((s, p)) = taken_here {
                    taken.extend(s);
                    pending |= p;
                    kept = true;
                }
            }
            Err(_) => {
                kept = true; // contended: next tick
                origins = None;
            }
        }
    }
    (taken, pending, kept, origins)
}

/// The sync of one customer in one scope, taken out of its entry (`None`: idle, forget it;
/// `Some((None, _))`: kept, nothing to send this turn), and whether it has something pending.
fn take_scope(
    entry: Option<CustomerEntry>,
    tick: &Tick<'_>,
    scope: &Scope,
    subject: &str,
) -> (Option<CustomerEntry>, Option<(Option<SubjectSync>, bool)>) {
    let Some(mut e) = entry else { return (None, None) };
    let config = tick.config;
    let leased = config.sync.strategy == Strategy::Lease;
    e.expire_holds(tick.now_ms);
    e.measure_rate(tick.now_ms, u64::from(config.sync.interval_ms));
    let lease_id = leased.then(|| lease::id(&e));
    let stale = stale_after_ms(config);
    let outgoing = e.take_outgoing(tick.worker, tick.now_ms, stale, config.settlement_mode, lease_id.as_deref());
    let lease = if leased { lease::request(&mut e, config, scope, tick.now_ms, tick.turn_ms, None) } else { None };
    let pending = e.has_pending();
    let idle = tick.now_ms.saturating_sub(e.last_used_ms) > u64::from(config.sync.idle_ms);
    if idle && !pending && outgoing.range.is_none() && lease.is_none() {
        return (None, None);
    }
    if outgoing.range.is_none()
        && lease.as_ref().is_some_and(|l| lease::renewal_can_wait(&e, l, config, tick.now_ms, tick.turn_ms))
    {
        // Another worker renewed it moments ago: nothing to send, but the customer is kept.
        return (Some(e), Some((None, pending)));
    }
    let mut s = subject_sync(config, scope, subject);
    s.usage = outgoing.range;
    s.lease = lease;
    (Some(e), Some((Some(s), pending)))
}

/// Why an answer could not be used.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum AnswerError {
    /// No answer, or a status that says the ledger is down or overloaded.
    Unavailable(String),
    /// An answer that is not what the protocol promises.
    Malformed(String),
    /// The ledger refused the body as too large (413): send fewer subjects per sync.
    TooLarge,
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
    if status == 413 {
        return Err(AnswerError::TooLarge);
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
    if let Some(amount) = response.subjects.iter().find_map(out_of_bounds) {
        return Err(AnswerError::Malformed(format!("the sync answer holds an impossible amount {amount}")));
    }
    Ok(response)
}

/// An amount of an answer that no ledger can have answered (beyond what the credit model sums,
/// `credits::limits::MAX_BALANCE`; a lease never holds less than nothing): the answer is not used.
fn out_of_bounds(answer: &SubjectAnswer) -> Option<Amount> {
    let SubjectOutcome::Ok { live, lease, .. } = &answer.outcome else { return None };
    if live.within_balance_bound().is_err() {
        return Some(*live);
    }
    lease.iter().flat_map(|l| [l.held, l.granted]).find(|a| a.within_balance_bound().is_err() || a.is_negative())
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
        if answer.outcome == SubjectOutcome::UnknownSubject {
            // Nothing of it can be booked, and the worker remembers the subject in its own memory.
            match shared::remove_if::<CustomerEntry>(store, &key, |_| true) {
                Ok(removed) => applied.calls_dropped += removed.map_or(0, |e| e.unbooked_calls()),
                Err(_) => applied.shared_failures += 1,
            }
            if applied.unknown.last() != Some(&asked.subject) {
                applied.unknown.push(asked.subject.clone());
            }
            continue;
        }
        let result = shared::update::<CustomerEntry, (Applied, bool)>(store, &key, |entry| {
            let mut e = entry.unwrap_or_else(|| CustomerEntry::new(&key, &asked.subject, store.fresh_origin(), now_ms));
            let mut a = Applied::default();
            // What was asked for another incarnation of the entry (one evicted since) is not
            // this one's: its range (`confirm` checks the origin) and its lease.
            let own_lease = lease::id(&e);
            match &answer.outcome {
                SubjectOutcome::Ok { usage, live, revision, lease, .. } => {
                    if let (Some(range), Some(UsageOutcome::Booked | UsageOutcome::Duplicate)) = (&asked.usage, usage) {
                        a.calls_confirmed += e.confirm(range);
                    }
                    if let (Some(lease), Some(asked_lease)) =
                        (lease, asked.lease.as_ref().filter(|l| l.lease_id == own_lease))
                    {
                        let answered = LeaseAnswered {
                            answer: lease,
                            asked: asked_lease,
                            revision: *revision,
                            sent_ms: pending.sent_ms,
                            lasts_ms: lease::lasts_ms(lease, response.server_time, config.lease.ttl_ms),
                        };
                        e.apply_lease(&answered, lease::reserve_ms(config, pending.turn_ms));
                    }
                    e.refresh(*live, *revision, now_ms);
                }
                SubjectOutcome::UnknownSubject => {} // handled above
                SubjectOutcome::Rejected { .. } => {
                    if let Some(range) = &asked.usage {
                        a.calls_dropped += e.drop_flight(range);
                    }
                }
            }
            let pending = e.has_pending();
            (Some(e), (a, pending))
        });
        if let Ok((a, pending)) = result {
            applied.calls_confirmed += a.calls_confirmed;
            applied.calls_dropped += a.calls_dropped;
            if pending && applied.pending.last() != Some(&asked.subject) {
                applied.pending.push(asked.subject.clone());
            }
        }
    }
    applied
}

/// Whether an entry's customer is known to the ledger (for tests and logs).
pub fn is_known(store: &dyn SharedData, config: &FilterConfig, subject: &str) -> bool {
    config.pricing.scopes.iter().all(|scope| {
        shared::read::<CustomerEntry>(store, &entry_key(config, scope, subject))
            .is_some_and(|e| matches!(e.standing, Standing::Known))
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
        let read = balance_read(&store, &c, "node", "alice", &[c.price], 10, 1000);
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
        let first = prepare(&store, &mut tracker, &c, ("node", 1), Budget::default(), 100).syncs.remove(0);
        let _lost = ledger.answer(&first.request);
        let retry = prepare(&store, &mut tracker, &c, ("node", 1), Budget::default(), 200).syncs.remove(0);
        assert_eq!(retry.request.subjects[0].usage, first.request.subjects[0].usage);
        let resp = ledger.answer(&retry.request);
        let applied = apply(&store, &c, &retry, &resp, 201);
        assert_eq!(applied.calls_confirmed, 4);
        assert!(applied.pending.is_empty(), "nothing left to report or renew: not registered again");
        assert_eq!(ledger.balance, amt("0.60"), "four calls booked once");
        let e = shared::read::<CustomerEntry>(&store, &entry_key(&c, &c.pricing.scopes[0], "alice")).unwrap();
        assert_eq!((e.available(), e.flight.is_none()), (amt("0.60"), true));
    }

    fn leased() -> FilterConfig {
        FilterConfig::parse(br#"{"ledger": {"upstream": "l", "token": "t"}, "price": "0.10", "currency": "USD"}"#)
            .unwrap()
    }

    #[test]
    fn a_worker_sends_as_many_syncs_a_tick_as_reach_every_customer_before_what_it_holds_lapses() {
        let c = leased();
        // A lease may be spent for 30 s less the reserve (the turn T, 1 s stuck behind an
        // unanswered sync and 3 s for a failed one going again) after its request left; and one
        // failed sync must not let it lapse: it fails at its 1-s timeout, its customers go again
        // at the next tick, answered within 1 s: 30 − (T + 4) ≥ T + 3, turns 11.5 s apart.
        assert_eq!(turn_bound_ms(&c), 11_500);
        let at = |customers| turn(&c, customers, Budget::default());
        assert_eq!(at(1), Turn { syncs: 1, ms: 1_000 });
        assert_eq!(at(10_000), Turn { syncs: 1, ms: 10_000 }, "gateway case c: one sync a tick");
        assert_eq!(at(11_000), Turn { syncs: 1, ms: 11_000 });
        assert_eq!(at(11_001), Turn { syncs: 2, ms: 6_000 });
        assert_eq!(at(88_000), Turn { syncs: MAX_SYNCS_PER_TICK, ms: 11_000 });
        assert_eq!(at(200_000), Turn { syncs: MAX_SYNCS_PER_TICK, ms: 25_000 }, "beyond the cap turns grow");
        // While the ledger holds the worker to fewer syncs a tick, its turns are longer: leases
        // are sized for them.
        let held = |syncs| turn(&c, 60_000, Budget { syncs, ..Budget::default() });
        assert_eq!(held(1), Turn { syncs: 1, ms: 60_000 });
        assert_eq!(held(3), Turn { syncs: 3, ms: 20_000 });
        assert_eq!(held(8), Turn { syncs: 6, ms: 10_000 }, "no more than the turn needs");
        let within = turn(&c, 40_000, Budget::default());
        assert_eq!(within, Turn { syncs: 4, ms: 10_000 }, "no more than the turn needs");
        assert_eq!(turn(&c, 500, Budget { syncs: 0, ..Budget::default() }), Turn { syncs: 1, ms: 1_000 });
        // A cached balance is usable for `sync.max_stale_ms` (60 s): turns 57 s apart.
        assert_eq!(turn_bound_ms(&config()), 57_000);
        assert_eq!(turn(&config(), 60_000, Budget::default()), Turn { syncs: 2, ms: 30_000 });
    }

    /// Leases on a tenth of the default scale: 100-ms ticks, a 100-ms timeout, a 3-s TTL.
    fn quick_ticks() -> FilterConfig {
        FilterConfig::parse(
            br#"{"ledger": {"upstream": "l", "token": "t", "timeout_ms": 100}, "price": "0.10", "currency": "USD",
                "sync": {"interval_ms": 100}, "lease": {"ttl_ms": 3000}}"#,
        )
        .unwrap()
    }

    /// One credit-model ledger per customer, each granted `calls` calls at 0.10, serving a sync
    /// subject by subject.
    struct Ledgers(std::collections::BTreeMap<String, crate::simulation::model_ledger::ModelLedger>);

    impl Ledgers {
        fn new(everyone: &[String], calls: u64) -> Ledgers {
            Ledgers::expiring(everyone, calls, |_| None)
        }

        /// Customer `i`'s grant expires `expires_after_ms(i)` after it began, if ever.
        fn expiring(everyone: &[String], calls: u64, expires_after_ms: impl Fn(usize) -> Option<u64>) -> Ledgers {
            use crate::simulation::backend::{at, GrantPlan};
            use crate::simulation::model_ledger::ModelLedger;
            let ledger = |(i, s): (usize, &String)| {
                let plan = [GrantPlan { calls, priority: 1, effective_ms: 0, expires_after_ms: expires_after_ms(i) }];
                (s.clone(), ModelLedger::new(s, amt("0.10"), &plan, at(0)))
            };
            Ledgers(everyone.iter().enumerate().map(ledger).collect())
        }

        fn serve(&mut self, sync: &PendingSync, now_ms: u64) -> SyncResponse {
            use crate::simulation::backend::{at, Ledger};
            let subjects = sync.request.subjects.iter().map(|s| {
                let one = SyncRequest { node: sync.request.node.clone(), subjects: vec![s.clone()] };
                let ledger = self.0.get_mut(&s.subject).unwrap();
                ledger.job(at(now_ms));
                ledger.serve(&one, at(now_ms)).unwrap().subjects.remove(0)
            });
            SyncResponse { server_time: at(now_ms), subjects: subjects.collect() }
        }
    }

    /// Many customers who call now and then, each with a lease: every call is decided from the
    /// lease, none waits for a read because its lease lapsed between the customer's turns. (With
    /// one sync a tick, this worker would reach each customer every 3 s: longer than a lease
    /// lasts.) The answer to one sync in seven is lost: its customers go again at the next tick,
    /// and their leases outlast that too.
    #[test]
    fn customers_a_worker_goes_round_keep_their_leases_between_turns() {
        let c = quick_ticks();
        // Ten customers a sync (a small budget stands for the 1,000 a real one holds).
        let budget = Budget { subjects: 10, ..Budget::default() };
        let everyone: Vec<String> = (0..300).map(|i| format!("s{i:03}")).collect();
        assert_eq!(turn(&c, everyone.len(), budget), Turn { syncs: 3, ms: 1_000 });
        let store = FakeShared::new(Rules::Envoy);
        let mut ledgers = Ledgers::new(&everyone, 1_000);
        let mut serve = |sync: &PendingSync, now_ms: u64| ledgers.serve(sync, now_ms);
        let mut tracker = Tracker::default();
        let (mut reads, mut calls, mut syncs, mut lost) = (0, 0, 0, 0);
        for now_ms in (0..20_000).step_by(50) {
            if now_ms % 100 == 0 {
                for sync in prepare(&store, &mut tracker, &c, ("node", 1), budget, now_ms).syncs {
                    syncs += 1;
                    let answer = serve(&sync, now_ms);
                    if syncs % 7 == 0 {
                        // What the worker does when the answer fails to come.
                        tracker.failed(sync.subjects());
                        lost += 1;
                    } else {
                        apply(&store, &c, &sync, &answer, now_ms + 1);
                    }
                }
                continue;
            }
            // Between ticks a fifth of the customers call: each one every 500 ms.
            for (i, s) in everyone.iter().enumerate().filter(|(i, _)| (now_ms / 100 + *i as u64) % 5 == 0) {
                tracker.touch(s, now_ms);
                calls += 1;
                match call(&store, &c, s, c.price, now_ms, LedgerAccess::Reachable).0 {
                    Verdict::Allow { .. } => {}
                    Verdict::AskLedger => {
                        // What the worker does: a read for this customer, answered at once.
                        let turn_ms = turn(&c, tracker.len(), budget).ms;
                        let read = balance_read(&store, &c, "node", s, &[c.price], now_ms, turn_ms);
                        let answer = serve(&read, now_ms);
                        apply(&store, &c, &read, &answer, now_ms);
                        // The first read of each customer is its cold start.
                        reads += u64::from(now_ms >= 1_000);
                        assert!(
                            matches!(
                                call(&store, &c, s, c.price, now_ms, LedgerAccess::Reachable).0,
                                Verdict::Allow { .. }
                            ),
                            "{s} at {now_ms}: {i}"
                        );
                    }
                    other => panic!("{s} at {now_ms}: {other:?}"),
                }
            }
        }
        assert_eq!(calls, 12_000, "each customer called every 500 ms for 20 s");
        assert!(lost > 80, "{lost} of {syncs} answers lost");
        assert_eq!(reads, 0, "calls that waited for a read after every customer's first, of {calls}");
    }

    /// A worker that reaches each customer only every few ticks still reports every call it let
    /// through on a lease before the credit behind that lease expires: no customer's usage is
    /// booked after its only grant expired (it would be uncovered: a balance below zero).
    #[test]
    fn credit_is_never_spent_after_it_expires_on_a_worker_whose_turns_are_long() {
        let c = quick_ticks();
        // Ten customers a sync (a small budget stands for the 1,000 a real one holds): each
        // customer's turn comes every second, within the bound (1,150 ms). The reserve holds it;
        // counted from the tick alone (500 ms), 120 of the 600 customers ended below zero.
        let budget = Budget { subjects: 10, ..Budget::default() };
        assert_eq!(turn(&c, 600, budget), Turn { syncs: 6, ms: 1_000 });
        assert_eq!((lease::reserve_ms(&c, 100), lease::reserve_ms(&c, 1_000)), (500, 1_400));
        assert_eq!(lease::reserve_ms(&c, 60_000), 1_150 + 400, "beyond the bound: as at the bound");
        let (refused, overdrawn) = spend_until_credit_expires(&c, 600, budget, None);
        assert!(refused > 0, "every grant expired while its customer called");
        assert!(overdrawn.is_empty(), "usage booked after its credit expired: {overdrawn:?}");
    }

    /// A sync that fails without reaching the ledger sends its customers again at the next tick:
    /// the reserve holds that too, so their calls are still booked before the credit behind their
    /// leases expires — also where the tick is long against a tenth of the TTL.
    #[test]
    fn credit_is_never_spent_after_it_expires_when_a_sync_fails_and_goes_again() {
        let c = FilterConfig::parse(
            br#"{"ledger": {"upstream": "l", "token": "t", "timeout_ms": 100}, "price": "0.10", "currency": "USD",
                "sync": {"interval_ms": 500}, "lease": {"ttl_ms": 2000}}"#,
        )
        .unwrap();
        let budget = Budget::default();
        assert_eq!(turn(&c, 100, budget), Turn { syncs: 1, ms: 500 });
        let (refused, overdrawn) = spend_until_credit_expires(&c, 100, budget, Some(3));
        assert!(refused > 0, "every grant expired while its customer called");
        assert!(overdrawn.is_empty(), "usage booked after its credit expired: {overdrawn:?}");
    }

    /// `customers` who call every 200 ms, each until its only grant expires (from 4 s on, each at
    /// its own moment of a second), on a worker that sends syncs of `budget` every
    /// `sync.interval_ms`; every `fail_every`-th sync fails without reaching the ledger and its
    /// customers go again at the next tick. Then everything left to report goes out. Returns how
    /// many calls were refused, and the customers whose usage was booked after their credit
    /// expired.
    fn spend_until_credit_expires(
        c: &FilterConfig,
        customers: usize,
        budget: Budget,
        fail_every: Option<u64>,
    ) -> (u64, Vec<String>) {
        use crate::simulation::backend::{at, Ledger};
        let interval_ms = u64::from(c.sync.interval_ms);
        let everyone: Vec<String> = (0..customers).map(|i| format!("s{i:03}")).collect();
        let store = FakeShared::new(Rules::Envoy);
        let mut ledgers = Ledgers::expiring(&everyone, 1_000, |i| Some(4_000 + (i as u64 * 37) % 1_000));
        let mut tracker = Tracker::default();
        let mut syncs = 0;
        // The ledger books what fell due (expiries), then the worker's tick.
        let mut tick = |ledgers: &mut Ledgers, tracker: &mut Tracker, now_ms: u64, failing: bool| {
            for ledger in ledgers.0.values_mut() {
                ledger.job(at(now_ms));
            }
            for sync in prepare(&store, tracker, c, ("node", 1), budget, now_ms).syncs {
                syncs += 1;
                if failing && fail_every.is_some_and(|n| syncs % n == 0) {
                    tracker.failed(sync.subjects());
                    continue;
                }
                let answer = ledgers.serve(&sync, now_ms);
                apply(&store, c, &sync, &answer, now_ms + 1);
            }
        };
        let mut refused = 0;
        for now_ms in (0..8_000).step_by(50) {
            if now_ms % interval_ms == 0 {
                tick(&mut ledgers, &mut tracker, now_ms, true);
                continue;
            }
            // Each customer calls every 200 ms.
            for (_, s) in everyone.iter().enumerate().filter(|(i, _)| (now_ms / 50 + *i as u64) % 4 == 0) {
                tracker.touch(s, now_ms);
                let verdict = match call(&store, c, s, c.price, now_ms, LedgerAccess::Reachable).0 {
                    Verdict::AskLedger => {
                        let turn_ms = turn(c, tracker.len(), budget).ms;
                        let read = balance_read(&store, c, "node", s, &[c.price], now_ms, turn_ms);
                        let answer = ledgers.serve(&read, now_ms);
                        apply(&store, c, &read, &answer, now_ms);
                        call(&store, c, s, c.price, now_ms, LedgerAccess::Asked).0
                    }
                    verdict => verdict,
                };
                match verdict {
                    // Asked again: it waits for another read (not made here).
                    Verdict::Allow { .. } | Verdict::AskLedger => {}
                    Verdict::Refuse { .. } => refused += 1,
                    other => panic!("{s} at {now_ms}: {other:?}"),
                }
            }
        }
        for now_ms in (8_000..12_000).step_by(usize::try_from(interval_ms).unwrap()) {
            tick(&mut ledgers, &mut tracker, now_ms, false);
        }
        let mut overdrawn = Vec::new();
        for (s, ledger) in &mut ledgers.0 {
            let books = ledger.books();
            assert!(books.problems.is_empty(), "{s}: {:?}", books.problems);
            let settled =
                books.book.try_balances(at(12_000), None).unwrap().first().map_or(Amount::ZERO, |b| b.settled);
            if settled.is_negative() {
                overdrawn.push(format!("{s}: {settled}"));
            }
        }
        (refused, overdrawn)
    }

    /// Four workers of one node go round the same 50 customers, each once a second, at their own
    /// phases, and the answer to one sync in five is lost. Each lease is renewed about once or
    /// twice a turn, not by every worker (four times); none lapses, so no call waits for a read.
    #[test]
    fn the_workers_of_a_node_do_not_each_renew_every_lease() {
        let c = leased();
        let everyone: Vec<String> = (0..50).map(|i| format!("s{i:02}")).collect();
        assert_eq!(turn(&c, everyone.len(), Budget::default()).ms, 1_000);
        let store = FakeShared::new(Rules::Envoy);
        let mut ledgers = Ledgers::new(&everyone, 10_000);
        let mut serve = |sync: &PendingSync, now_ms: u64| ledgers.serve(sync, now_ms);
        let phases = [0, 200, 450, 700];
        let mut trackers: Vec<Tracker> = phases.iter().map(|_| Tracker::default()).collect();
        let (mut renewals, mut reads, mut calls, mut syncs) = (0, 0, 0, 0);
        let end_ms = 120_000;
        for now_ms in (0..end_ms).step_by(50) {
            for (worker, phase) in phases.iter().enumerate() {
                if now_ms % 1_000 != *phase {
                    continue;
                }
                let tracker = &mut trackers[worker];
                let prepared = prepare(&store, tracker, &c, ("node", worker as u64), Budget::default(), now_ms);
                // What the worker does: the customers it met are the node's to renew.
                registry::add(&store, &c, &prepared.unregistered.iter().map(String::as_str).collect::<Vec<_>>());
                for sync in prepared.syncs {
                    syncs += 1;
                    let plain = |l: &LeaseRequest| l.want.is_zero() && !l.release;
                    renewals += sync.request.subjects.iter().filter(|s| s.lease.as_ref().is_some_and(plain)).count();
                    let answer = serve(&sync, now_ms);
                    if syncs % 5 != 0 {
                        apply(&store, &c, &sync, &answer, now_ms + 1);
                    }
                }
            }
            // Each customer calls every 2.5 s, through any worker.
            for (i, s) in everyone.iter().enumerate().filter(|(i, _)| (now_ms / 50 + *i as u64) % 50 == 0) {
                let worker = (i + now_ms as usize / 2_500) % phases.len();
                trackers[worker].touch(s, now_ms);
                calls += 1;
                match call(&store, &c, s, c.price, now_ms, LedgerAccess::Reachable).0 {
                    Verdict::Allow { .. } => {}
                    Verdict::AskLedger => {
                        let read = balance_read(&store, &c, "node", s, &[c.price], now_ms, 1_000);
                        let answer = serve(&read, now_ms);
                        apply(&store, &c, &read, &answer, now_ms);
                        reads += u64::from(now_ms >= 3_000);
                        let again = call(&store, &c, s, c.price, now_ms, LedgerAccess::Reachable).0;
                        assert!(matches!(again, Verdict::Allow { .. }), "{s} at {now_ms}");
                    }
                    other => panic!("{s} at {now_ms}: {other:?}"),
                }
            }
        }
        assert_eq!(calls, 2_400);
        assert_eq!(reads, 0, "calls that waited for a read after every customer's first");
        // 50 customers for 120 s: 6,000 turns of one worker. With every worker renewing, 3.9 a
        // customer a turn (23,462); now 1.65.
        let per_turn = renewals as f64 / (50.0 * 120.0);
        assert!((1.0..=2.0).contains(&per_turn), "{renewals} renewals: {per_turn} a customer a turn");
    }

    #[test]
    fn a_worker_with_more_customers_than_one_sync_holds_goes_round_them_in_turn() {
        let store = FakeShared::new(Rules::Envoy);
        let c = config();
        let mut tracker = Tracker::default();
        let everyone: Vec<String> = (0..2500).map(|i| format!("s{i:04}")).collect();
        for s in &everyone {
            let read = balance_read(&store, &c, "node", s, &[c.price], 10, 1000);
            apply(&store, &c, &read, &answer(vec![ok(s, None, "1", 1)]), 10);
            tracker.touch(s, 10);
            assert!(matches!(call(&store, &c, s, amt("0.10"), 11, LedgerAccess::Reachable).0, Verdict::Allow { .. }));
        }
        let mut reported = std::collections::BTreeSet::new();
        for tick in 0..3 {
            let pending = prepare(&store, &mut tracker, &c, ("node", 1), Budget::default(), 100 + tick).syncs.remove(0);
            assert!(pending.request.subjects.len() <= MAX_SUBJECTS_PER_SYNC);
            reported.extend(pending.request.subjects.iter().filter(|s| s.usage.is_some()).map(|s| s.subject.clone()));
        }
        let missed: Vec<&String> = everyone.iter().filter(|s| !reported.contains(*s)).collect();
        assert!(missed.is_empty(), "{} customers were never reported, e.g. {:?}", missed.len(), missed.first());
    }

    /// A customer first seen has no rate: its first lease holds `lease.min_calls`. When those run
    /// out before its turn in a sync (a worker with 8,000 customers reaches each every 8 ticks),
    /// the top-up is sized at the rate its calls came at, for the turn it will wait: one more
    /// read, not one every `min_calls` calls until its turn.
    #[test]
    fn a_lease_topped_up_between_turns_lasts_until_the_customers_turn() {
        let store = FakeShared::new(Rules::Envoy);
        let c =
            FilterConfig::parse(br#"{"ledger": {"upstream": "l", "token": "t"}, "price": "0.10", "currency": "USD"}"#)
                .unwrap();
        let scope = &c.pricing.scopes[0];
        let want = |read: &PendingSync| read.request.subjects[0].lease.as_ref().map(|l| l.want);
        let turn_ms = turn(&c, 8_000, Budget::default()).ms;
        assert_eq!(turn_ms, 8_000, "1,000 customers per sync, one sync per 1-s tick");
        let first = balance_read(&store, &c, "node", "alice", &[c.price], 0, turn_ms);
        assert_eq!(want(&first), Some(c.price.times(c.lease.min_calls).unwrap()), "no rate yet");
        // Its first ten calls came within four seconds: 150 a minute.
        let key = entry_key(&c, scope, "alice");
        shared::update::<CustomerEntry, ()>(&store, &key, |e| {
            let mut e = e.expect("the entry of the read");
            e.next_call = 10;
            (Some(e), ())
        })
        .unwrap();
        let top_up = balance_read(&store, &c, "node", "alice", &[c.price], 4_000, turn_ms);
        let sized = lease::sizing(&c, scope, 150, turn_ms);
        assert_eq!(want(&top_up), Some(sized.target));
        assert!(sized.low >= c.price.times(150 * 9 / 60).unwrap(), "its low-water mark covers the turn and the answer");
    }

    #[test]
    fn a_sync_fits_its_byte_budget_and_the_rest_goes_out_in_turn() {
        let store = FakeShared::new(Rules::Envoy);
        let c = config();
        let mut tracker = Tracker::default();
        // Subjects as long as the ledger allows: about 300 bytes each in a sync.
        let everyone: Vec<String> = (0..40).map(|i| format!("{i:03}{}", "x".repeat(250))).collect();
        for s in &everyone {
            let read = balance_read(&store, &c, "node", s, &[c.price], 10, 1000);
            apply(&store, &c, &read, &answer(vec![ok(s, None, "1", 1)]), 10);
            tracker.touch(s, 10);
            assert!(matches!(call(&store, &c, s, amt("0.10"), 11, LedgerAccess::Reachable).0, Verdict::Allow { .. }));
        }
        let budget = Budget { bytes: 4096, ..Budget::default() };
        let mut reported = std::collections::BTreeSet::new();
        for tick in 0..4 {
            let pending = prepare(&store, &mut tracker, &c, ("node", 1), budget, 100 + tick).syncs.remove(0);
            assert!(pending.body().len() <= 4096, "{} bytes", pending.body().len());
            // The body is the request, encoded once.
            assert_eq!(serde_json::from_slice::<SyncRequest>(pending.body()).unwrap(), pending.request);
            reported.extend(pending.request.subjects.iter().filter(|s| s.usage.is_some()).map(|s| s.subject.clone()));
        }
        assert_eq!(reported.len(), everyone.len(), "every customer reported within a few ticks");
    }

    #[test]
    fn a_body_the_ledger_refuses_as_too_large_is_an_error_of_its_own() {
        let c = config();
        let pending = balance_read(&FakeShared::new(Rules::Envoy), &c, "n", "alice", &[c.price], 1, 1000);
        assert_eq!(parse_answer(&pending, Some(413), Some(b"{}")), Err(AnswerError::TooLarge));
    }

    #[test]
    fn malformed_or_failed_answers_are_errors_not_panics() {
        let c = config();
        let pending = balance_read(&FakeShared::new(Rules::Envoy), &c, "n", "alice", &[c.price], 1, 1000);
        assert!(matches!(parse_answer(&pending, None, None), Err(AnswerError::Unavailable(_))));
        assert!(matches!(parse_answer(&pending, Some(503), None), Err(AnswerError::Unavailable(_))));
        assert!(matches!(parse_answer(&pending, Some(200), Some(b"{not json")), Err(AnswerError::Malformed(_))));
        assert!(matches!(parse_answer(&pending, Some(401), Some(b"{}")), Err(AnswerError::Malformed(_))));
        let wrong = serde_json::to_vec(&answer(vec![ok("bob", None, "1", 1)])).unwrap();
        assert!(matches!(parse_answer(&pending, Some(200), Some(&wrong)), Err(AnswerError::Malformed(_))));
        let right = serde_json::to_vec(&answer(vec![ok("alice", None, "1", 1)])).unwrap();
        assert!(parse_answer(&pending, Some(200), Some(&right)).is_ok());
        // An amount no ledger can answer (beyond the credit model's sum bound) is malformed, so
        // it can never overflow the node's arithmetic.
        let huge = serde_json::to_vec(&answer(vec![ok("alice", None, "79228162514264337593543950335", 1)])).unwrap();
        assert!(matches!(parse_answer(&pending, Some(200), Some(&huge)), Err(AnswerError::Malformed(_))));
    }

    #[test]
    fn an_entry_rebuilt_after_an_eviction_books_nothing_twice_and_is_counted() {
        let store = FakeShared::new(Rules::Kong { hash: |k| k.len() as u32 });
        let c = config();
        let key = entry_key(&c, &c.pricing.scopes[0], "alice");
        let mut ledger = MiniLedger { balance: amt("1.00"), booked: Default::default(), revision: 1 };
        let mut tracker = Tracker::default();
        let spend = |n: u64, at: u64| {
            let read = balance_read(&store, &c, "node", "alice", &[c.price], at, 1000);
            let known = ok("alice", None, "1.00", 1);
            apply(&store, &c, &read, &answer(vec![known]), at);
            for i in 0..n {
                assert!(matches!(
                    call(&store, &c, "alice", c.price, at + i, LedgerAccess::Reachable).0,
                    Verdict::Allow { .. }
                ));
            }
        };
        spend(3, 10);
        tracker.touch("alice", 10);
        let first = prepare(&store, &mut tracker, &c, ("node", 1), Budget::default(), 100);
        assert_eq!(first.evicted, 0);
        let first = first.syncs.into_iter().next().unwrap();
        // The host evicts the entry while its range is in flight; the rebuilt entry numbers its
        // calls from 0 again.
        store.remove(&key);
        spend(3, 110);
        let second = prepare(&store, &mut tracker, &c, ("node", 1), Budget::default(), 200);
        assert_eq!(second.evicted, 1, "the tick finds the entry rebuilt");
        let second = second.syncs.into_iter().next().unwrap();
        let (a, b) =
            (first.request.subjects[0].usage.clone().unwrap(), second.request.subjects[0].usage.clone().unwrap());
        assert_eq!((a.from, a.to), (b.from, b.to), "numbered alike");
        apply(&store, &c, &first, &ledger.answer(&first.request), 201);
        apply(&store, &c, &second, &ledger.answer(&second.request), 202);
        assert_eq!(ledger.balance, amt("0.40"), "both ranges booked: six calls");
        let e = shared::read::<CustomerEntry>(&store, &key).unwrap();
        assert!(e.flight.is_none(), "the rebuilt entry's own range confirmed");
    }

    #[test]
    fn idle_customers_without_usage_are_forgotten() {
        let store = FakeShared::new(Rules::Envoy);
        let c = config();
        let read = balance_read(&store, &c, "node", "alice", &[c.price], 10, 1000);
        apply(&store, &c, &read, &answer(vec![ok("alice", None, "1", 1)]), 1);
        let mut tracker = Tracker::default();
        tracker.touch("alice", 1);
        assert!(prepare(&store, &mut tracker, &c, ("node", 1), Budget::default(), 2).syncs.len() == 1);
        assert!(prepare(&store, &mut tracker, &c, ("node", 1), Budget::default(), 1 + u64::from(c.sync.idle_ms) + 1)
            .syncs
            .is_empty());
        assert!(tracker.is_empty());
        let key = entry_key(&c, &c.pricing.scopes[0], "alice");
        assert!(shared::read::<CustomerEntry>(&store, &key).is_none(), "the idle entry is deleted");
    }

    /// Lets a call of `price` through for alice, charged at admission; what it holds.
    fn charge(store: &FakeShared, c: &FilterConfig, price: &str, at: u64) -> Vec<crate::decision::Hold> {
        let charging = crate::pricing::Charging::AtAdmission;
        let (v, _) = crate::decision::admit(store, c, "alice", &[amt(price)], charging, at, LedgerAccess::Reachable);
        let Verdict::Allow { held, .. } = v else { panic!("{v:?}") };
        held
    }

    /// A charged call holds nothing, so its entry may be deleted as idle (everything booked) while
    /// it is still upstream; when it then fails, its charge still comes back, through an entry
    /// made to carry it, which asks for nothing else and goes once the refund is booked.
    #[test]
    fn a_refund_outlives_the_entry_deleted_as_idle_while_its_call_was_upstream() {
        let (store, c, mut t) = (FakeShared::new(Rules::Envoy), config(), Tracker::default());
        let read = balance_read(&store, &c, "node", "alice", &[c.price], 10, 1000);
        apply(&store, &c, &read, &answer(vec![ok("alice", None, "1.00", 1)]), 10);
        t.touch("alice", 10);
        let held = charge(&store, &c, "0.10", 11);
        let tick = prepare(&store, &mut t, &c, ("node", 1), Budget::default(), 100).syncs.remove(0);
        apply(&store, &c, &tick, &answer(vec![ok("alice", Some(UsageOutcome::Booked), "0.90", 2)]), 101);
        let later = 11 + u64::from(c.sync.idle_ms) + 1_000;
        assert!(later < 11 + c.pricing.hold_timeout_ms, "the call may still be upstream");
        assert!(prepare(&store, &mut t, &c, ("node", 1), Budget::default(), later).syncs.is_empty());
        let key = entry_key(&c, &c.pricing.scopes[0], "alice");
        assert!(shared::read::<CustomerEntry>(&store, &key).is_none(), "deleted as idle");
        let done = crate::decision::complete(&store, &c, "alice", &held, &[Amount::ZERO], later + 1);
        assert!(done.effects.became_pending, "registered, so that every worker sends it");
        t.touch("alice", later + 1);
        let tick = prepare(&store, &mut t, &c, ("node", 1), Budget::default(), later + 2).syncs.remove(0);
        let asked = &tick.request.subjects[0];
        let range = asked.usage.as_ref().unwrap();
        assert_eq!((range.amount, range.refunded, range.to - range.from), (amt("0"), amt("0.10"), 1));
        assert!(asked.lease.is_none(), "an entry made for a refund asks for no lease");
        apply(&store, &c, &tick, &answer(vec![ok("alice", Some(UsageOutcome::Booked), "1.00", 3)]), later + 3);
        assert!(prepare(&store, &mut t, &c, ("node", 1), Budget::default(), later + 4).syncs.is_empty());
        assert!(shared::read::<CustomerEntry>(&store, &key).is_none(), "gone once the refund is booked");
        // In an entry made since by another call, the refund nets into that entry's usage.
        let read = balance_read(&store, &c, "node", "alice", &[c.price], later + 5, 1000);
        apply(&store, &c, &read, &answer(vec![ok("alice", None, "1.00", 4)]), later + 5);
        let held = charge(&store, &c, "0.10", later + 6);
        let other = CustomerEntry { origin: held[0].origin + 1, ..shared::read(&store, &key).unwrap() };
        store.set(&key, &shared::Keyed::encode(&other), None).unwrap();
        crate::decision::complete(&store, &c, "alice", &held, &[Amount::ZERO], later + 7);
        let e = shared::read::<CustomerEntry>(&store, &key).unwrap();
        assert_eq!((e.spent, e.lease.remaining), (amt("0"), other.lease.remaining), "netted, no lease back");
    }

    /// Credit owed back counts in what a customer may spend only once `live` has it: a range in
    /// flight that gives credit back may have been booked, and the answer of another worker's
    /// sync carry it in `live` already.
    #[test]
    fn credit_owed_back_in_flight_is_not_counted_twice() {
        let (store, c) = (FakeShared::new(Rules::Envoy), config());
        let (mut t1, mut t2) = (Tracker::default(), Tracker::default());
        let read = balance_read(&store, &c, "node", "alice", &[c.price], 10, 1000);
        apply(&store, &c, &read, &answer(vec![ok("alice", None, "1.00", 1)]), 10);
        t1.touch("alice", 10);
        t2.touch("alice", 10);
        let held = charge(&store, &c, "0.10", 11);
        let tick = prepare(&store, &mut t1, &c, ("node", 1), Budget::default(), 100).syncs.remove(0);
        apply(&store, &c, &tick, &answer(vec![ok("alice", Some(UsageOutcome::Booked), "0.90", 2)]), 101);
        crate::decision::complete(&store, &c, "alice", &held, &[Amount::ZERO], 102);
        let w1 = prepare(&store, &mut t1, &c, ("node", 1), Budget::default(), 1_100).syncs.remove(0);
        assert_eq!(w1.request.subjects[0].usage.as_ref().unwrap().refunded, amt("0.10"));
        let w2 = prepare(&store, &mut t2, &c, ("node", 2), Budget::default(), 1_101).syncs.remove(0);
        // The ledger books w1's range (live 1.00), then answers w2, whose answer lands first.
        apply(&store, &c, &w2, &answer(vec![ok("alice", None, "1.00", 3)]), 1_102);
        let e = shared::read::<CustomerEntry>(&store, &entry_key(&c, &c.pricing.scopes[0], "alice")).unwrap();
        assert_eq!(e.available(), amt("1.00"));
        let (verdict, _) = call(&store, &c, "alice", amt("1.05"), 1_103, LedgerAccess::Reachable);
        assert!(matches!(verdict, Verdict::Refuse { .. }), "credit_only let through {verdict:?}");
    }

    /// A call charged from the lease that fails before it is sent gives the lease back only what
    /// its range will capture less: with credit owed back netted into that range, less than its
    /// price.
    #[test]
    fn a_refund_of_an_unsent_call_never_lifts_the_lease_above_the_ledgers_hold() {
        let store = FakeShared::new(Rules::Envoy);
        let c =
            FilterConfig::parse(br#"{"ledger": {"upstream": "l", "token": "t"}, "price": "0.10", "currency": "USD"}"#)
                .unwrap();
        assert_eq!(c.sync.strategy, Strategy::Lease);
        let (mut hold, mut revision, mut t) = (Amount::ZERO, 0, Tracker::default());
        // The ledger: captures `captured` from the node's lease and grants every top-up in full.
        let mut answer_to = |p: &PendingSync, usage: Option<UsageOutcome>, captured: &str| {
            hold -= amt(captured);
            let lease = p.request.subjects[0].lease.clone().map(|l| {
                hold += l.want;
                let expires_at = chrono::DateTime::UNIX_EPOCH + chrono::TimeDelta::hours(1);
                let (held, granted) = (hold, l.want);
                credits::sync::LeaseAnswer {
                    lease_id: l.lease_id,
                    held,
                    granted,
                    expires_at,
                    closed: false,
                    recalled: false,
                }
            });
            revision += 1;
            let outcome = SubjectOutcome::Ok { customer_id: "c".into(), usage, live: amt("5.00"), revision, lease };
            (answer(vec![SubjectAnswer { subject: "alice".into(), outcome }]), hold)
        };
        let read = balance_read(&store, &c, "node", "alice", &[c.price], 10, 1000);
        apply(&store, &c, &read, &answer_to(&read, None, "0").0, 10);
        t.touch("alice", 10);
        let call0 = charge(&store, &c, "0.20", 11);
        let tick = prepare(&store, &mut t, &c, ("node", 1), Budget::default(), 100).syncs.remove(0);
        apply(&store, &c, &tick, &answer_to(&tick, Some(UsageOutcome::Booked), "0.20").0, 101);
        crate::decision::complete(&store, &c, "alice", &call0, &[Amount::ZERO], 102); // booked, then failed
        let call1 = charge(&store, &c, "0.30", 103); // the unsent usage nets to 0.10
                                                     // A lease answer without a range (a read's top-up, or a tick behind another worker's range).
        let read = balance_read(&store, &c, "node", "alice", &[c.price], 104, 1000);
        let (a, hold) = answer_to(&read, None, "0");
        apply(&store, &c, &read, &a, 105);
        crate::decision::complete(&store, &c, "alice", &call1, &[Amount::ZERO], 106); // fails unsent
        let tick = prepare(&store, &mut t, &c, ("node", 1), Budget::default(), 1_100).syncs.remove(0);
        let range = tick.request.subjects[0].usage.clone().unwrap();
        assert_eq!((range.amount, range.refunded), (Amount::ZERO, amt("0.20")), "captures nothing");
        let e = shared::read::<CustomerEntry>(&store, &entry_key(&c, &c.pricing.scopes[0], "alice")).unwrap();
        assert!(e.lease.remaining <= hold, "the node may spend {} of a lease holding {hold}", e.lease.remaining);
    }

    /// An entry in shared data with amounts no ledger answered (corrupt, or from another version)
    /// is unreadable rather than summed: a sum beyond `Decimal` panics, and a panic traps.
    #[test]
    fn an_entry_with_amounts_beyond_any_balance_traps_no_call() {
        let store = FakeShared::new(Rules::Envoy);
        let c = config();
        let key = entry_key(&c, &c.pricing.scopes[0], "alice");
        let mut e = CustomerEntry::new(&key, "alice", 1, 10);
        (e.standing, e.refreshed_ms, e.revision) = (Standing::Known, 10, 1);
        e.live = Amount::new(rust_decimal::Decimal::MIN);
        e.spent = amt("1");
        e.next_call = 1;
        store.set(&key, &shared::Keyed::encode(&e), None).unwrap();
        let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            call(&store, &c, "alice", amt("0.10"), 11, LedgerAccess::Reachable)
        }));
        assert!(r.is_ok(), "a call on an entry read from shared data panicked (a trap)");
    }

    /// A lease top-up never asks for more than the ledger takes in one request (10^15): beyond
    /// it the ledger refuses the whole subject, and the usage range it rides with is dropped.
    #[test]
    fn a_lease_top_up_never_asks_beyond_what_the_ledger_takes() {
        let store = FakeShared::new(Rules::Envoy);
        let c = FilterConfig::parse(
            br#"{"ledger": {"upstream": "l", "token": "t"}, "price": "100000000000000", "currency": "USD", "lease": {"min_calls": 20}}"#,
        )
        .unwrap();
        let key = entry_key(&c, &c.pricing.scopes[0], "alice");
        let mut e = CustomerEntry::new(&key, "alice", 1, 10);
        (e.standing, e.refreshed_ms) = (Standing::Known, 10);
        e.spend(c.price, 10);
        store.set(&key, &shared::Keyed::encode(&e), None).unwrap();
        let mut tracker = Tracker::default();
        tracker.touch("alice", 10);
        let sync = prepare(&store, &mut tracker, &c, ("node", 1), Budget::default(), 100).syncs.remove(0);
        let s = &sync.request.subjects[0];
        assert!(s.usage.is_some() && s.lease.is_some());
        assert_eq!(credits::gateway::invalid(s), None, "the ledger takes the subject, usage and lease");
    }

    #[test]
    fn usage_of_an_unknown_subject_is_dropped_and_counted() {
        let store = FakeShared::new(Rules::Envoy);
        let allow = FilterConfig::parse(br#"{"ledger": {"upstream": "l", "token": "t"}, "price": "0.10", "currency": "USD", "failure_mode": "allow", "sync": {"strategy": "cached"}}"#).unwrap();
        call(&store, &allow, "ghost", amt("0.10"), 1, LedgerAccess::Unreachable);
        let mut tracker = Tracker::default();
        tracker.touch("ghost", 1);
        let pending = prepare(&store, &mut tracker, &allow, ("node", 1), Budget::default(), 2).syncs.remove(0);
        let unknown = SubjectAnswer { subject: "ghost".into(), outcome: SubjectOutcome::UnknownSubject };
        let applied = apply(&store, &allow, &pending, &answer(vec![unknown]), 3);
        assert_eq!((applied.calls_dropped, applied.unknown), (1, vec!["ghost".to_owned()]));
        assert!(!is_known(&store, &allow, "ghost"));
        let key = entry_key(&allow, &allow.pricing.scopes[0], "ghost");
        assert!(shared::read::<CustomerEntry>(&store, &key).is_none(), "no entry kept for an unknown subject");
    }
}
