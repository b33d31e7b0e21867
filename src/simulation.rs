//! A seeded simulation of the lease protocol, run by proptest: several nodes (each with its own
//! shared data under Envoy's or Kong's rules) with several workers, one ledger serving syncs with
//! the credits crate's gateway code, and a network that delays requests (within a tenth of the
//! lease TTL) and loses, duplicates, delays and reorders answers. Workers reset at random. An
//! auditor checks after every step that the calls let through never cost more than the balance,
//! and after a reliable drain that every call was booked exactly once and no credit is stranded.

use std::collections::{BTreeMap, HashMap, HashSet};

use chrono::{DateTime, TimeDelta, Utc};
use credits::gateway::{self, Facts, LeaseFacts};
use credits::sync::{SubjectAnswer, SubjectOutcome, SyncRequest, SyncResponse};
use credits::{
    Amount, Book, Currency, Entry, FeatureFilter, FundingMethod, Grant, GrantId, GrantSpec, HoldId, MovementKind,
    Priority,
};
use proptest::prelude::*;

use crate::config::FilterConfig;
use crate::decision::{call, LedgerAccess, Verdict};
use crate::shared::fake::{FakeShared, Rules};
use crate::sync::{self, PendingSync, Tracker};

const SUBJECT: &str = "alice";

fn trace(line: impl FnOnce() -> String) {
    if std::env::var_os("SIM_TRACE").is_some() {
        eprintln!("{}", line());
    }
}
const CALLS_PAID_FOR: u64 = 30;

fn config() -> FilterConfig {
    let json = r#"{"ledger": {"upstream": "ledger", "token": "t", "timeout_ms": 200}, "price": "0.01", "currency": "USD",
        "feature_key": "api_requests", "sync": {"strategy": "lease", "interval_ms": 100},
        "lease": {"min_calls": 3, "max_calls": 20, "ttl_ms": 1000, "idle_release_ms": 300}}"#;
    FilterConfig::parse(json.as_bytes()).unwrap()
}

fn at(ms: u64) -> DateTime<Utc> {
    DateTime::<Utc>::UNIX_EPOCH + TimeDelta::milliseconds(i64::try_from(ms).unwrap())
}

/// The ledger, on the credits crate's book and gateway code.
struct Ledger {
    book: Book,
    journal: Vec<Entry>,
    seen: HashSet<String>,
    last_seq: HashMap<String, i64>,
    revision: i64,
    /// Booked call ranges per node.
    booked: BTreeMap<String, Vec<(u64, u64)>>,
}

impl Ledger {
    fn new(balance: Amount) -> Ledger {
        let spec = GrantSpec {
            currency: Currency::parse("USD").unwrap(),
            amount: balance,
            funding_method: FundingMethod::None,
            purchase: None,
            priority: Priority::DEFAULT,
            effective_at: Some(at(0)),
            expires_after: None,
            features: FeatureFilter::unrestricted(),
        };
        let mut book = Book::new();
        let journal = book.add_grant(Grant::new(spec, GrantId("g".into()), at(0), 0).unwrap(), at(0)).unwrap();
        Ledger { book, journal, seen: HashSet::new(), last_seq: HashMap::new(), revision: 0, booked: BTreeMap::new() }
    }

    fn serve(&mut self, request: &SyncRequest, now_ms: u64) -> SyncResponse {
        let now = at(now_ms);
        let subjects = request
            .subjects
            .iter()
            .map(|s| {
                let outcome = if s.subject != SUBJECT {
                    SubjectOutcome::UnknownSubject
                } else if let Some(reason) = gateway::invalid(s) {
                    SubjectOutcome::Rejected { reason }
                } else {
                    let key = s.usage_key(&request.node);
                    let facts = Facts {
                        usage_seen: key.as_ref().is_some_and(|k| self.seen.contains(k)),
                        lease: s.lease.as_ref().and_then(|l| {
                            self.last_seq.get(&l.lease_id).map(|seq| LeaseFacts {
                                owned_by_this_customer: true,
                                closed: self.book.hold(&HoldId(l.lease_id.clone())).is_none_or(|h| h.released),
                                last_seq: *seq,
                            })
                        }),
                    };
                    let served = gateway::serve(&mut self.book, s, &facts, now);
                    if served.record_usage {
                        self.seen.insert(key.unwrap_or_default());
                        let r = s.usage.as_ref().unwrap();
                        self.booked.entry(request.node.clone()).or_default().push((r.from, r.to));
                    }
                    if let (Some(l), Some(seq)) = (&s.lease, served.lease_seq) {
                        self.last_seq.insert(l.lease_id.clone(), seq);
                    }
                    self.journal.extend(served.entries);
                    self.revision += 1;
                    SubjectOutcome::Ok {
                        customer_id: "c".into(),
                        usage: served.usage,
                        live: served.live,
                        revision: self.revision,
                        lease: served.lease,
                    }
                };
                SubjectAnswer { subject: s.subject.clone(), outcome }
            })
            .collect();
        SyncResponse { server_time: now, subjects }
    }

    fn consumed(&self) -> Amount {
        self.journal
            .iter()
            .filter_map(|e| match e {
                Entry::Movement(m) if m.kind == MovementKind::Consumed => Some(-m.amount),
                _ => None,
            })
            .sum()
    }
}

#[derive(Default)]
struct Worker {
    id: u64,
    tracker: Tracker,
    /// The tick's sync in flight: message id.
    in_flight: Option<u64>,
    /// Reads in flight: message id → calls waiting for it.
    reads: HashMap<u64, u32>,
    down_until: u64,
}

struct Node {
    id: String,
    store: FakeShared,
    skew_ms: u64,
    workers: Vec<Worker>,
    let_through: u64,
}

enum Kind {
    Tick,
    Read,
}

struct Message {
    id: u64,
    node: usize,
    worker: usize,
    worker_id: u64,
    kind: Kind,
    pending: PendingSync,
    /// When the request reaches the ledger, or when the answer reaches the node.
    due_ms: u64,
    answer: Option<SyncResponse>,
    /// When the host gives up on the call (the timeout).
    deadline_ms: u64,
}

#[derive(Clone, Debug)]
enum Action {
    /// A call arrives at a worker.
    Call { node: usize, worker: usize },
    /// One of the answers that have arrived is handed to its worker (answers are reordered).
    Deliver { pick: usize },
    /// Time passes: requests reach the ledger on time (within a tenth of the lease TTL), their
    /// answers are lost, duplicated or delayed as `fates` says, workers tick every interval, and
    /// the host fails calls whose answer did not come by the timeout.
    Advance { ms: u64, fates: u64 },
    /// A worker's instance is replaced: its in-VM state is gone, shared data stays.
    Reset { node: usize, worker: usize },
    /// The ledger's background job runs.
    LedgerJob,
}

fn action() -> impl Strategy<Value = Action> {
    prop_oneof![
        6 => (0usize..3, 0usize..2).prop_map(|(node, worker)| Action::Call { node, worker }),
        5 => any::<usize>().prop_map(|pick| Action::Deliver { pick }),
        4 => (1u64..150, any::<u64>()).prop_map(|(ms, fates)| Action::Advance { ms, fates }),
        1 => (0usize..3, 0usize..2).prop_map(|(node, worker)| Action::Reset { node, worker }),
        1 => Just(Action::LedgerJob),
    ]
}

struct Sim {
    config: FilterConfig,
    ledger: Ledger,
    nodes: Vec<Node>,
    messages: Vec<Message>,
    now: u64,
    next_id: u64,
    request_delay_ms: u64,
}

impl Sim {
    fn new(kong: bool) -> Sim {
        let config = config();
        let balance = config.price.times(CALLS_PAID_FOR).unwrap();
        let rules = if kong {
            Rules::Kong { hash: |k| k.bytes().fold(7u32, |h, b| h.wrapping_mul(31).wrapping_add(u32::from(b))) }
        } else {
            Rules::Envoy
        };
        let nodes = (0..3)
            .map(|n| Node {
                id: format!("node{n}"),
                store: FakeShared::new(rules),
                skew_ms: [0, 15, 30][n],
                workers: (0..2).map(|w| Worker { id: (n * 10 + w) as u64 + 1, ..Worker::default() }).collect(),
                let_through: 0,
            })
            .collect();
        let request_delay_ms = config.lease.ttl_ms / 10 - 1;
        Sim {
            config,
            ledger: Ledger::new(balance),
            nodes,
            messages: Vec::new(),
            now: 1_000,
            next_id: 1,
            request_delay_ms,
        }
    }

    fn node_time(&self, node: usize) -> u64 {
        self.now + self.nodes[node].skew_ms
    }

    fn access(&self, node: usize, worker: usize) -> LedgerAccess {
        if self.node_time(node) >= self.nodes[node].workers[worker].down_until {
            LedgerAccess::Reachable
        } else {
            LedgerAccess::Unreachable
        }
    }

    fn send(&mut self, node: usize, worker: usize, kind: Kind, pending: PendingSync, delay: u64) -> u64 {
        let id = self.next_id;
        self.next_id += 1;
        let worker_id = self.nodes[node].workers[worker].id;
        let deadline_ms = self.now + u64::from(self.config.ledger.timeout_ms);
        self.messages.push(Message {
            id,
            node,
            worker,
            worker_id,
            kind,
            pending,
            due_ms: self.now + delay,
            answer: None,
            deadline_ms,
        });
        id
    }

    fn settle_call(&mut self, node: usize, worker: usize, access: LedgerAccess) {
        let t = self.node_time(node);
        let (verdict, effects) = call(&self.nodes[node].store, &self.config, SUBJECT, self.config.price, t, access);
        if effects.became_pending {
            crate::registry::add(&self.nodes[node].store, &self.config, SUBJECT);
        }
        trace(|| format!("t={} waiting call node{node} w{worker} {access:?} -> {verdict:?}", self.now));
        if let Verdict::Allow { .. } = verdict {
            self.nodes[node].let_through += 1;
            self.nodes[node].workers[worker].tracker.touch(SUBJECT, t);
        }
    }

    fn call(&mut self, node: usize, worker: usize, delay: u64) {
        let t = self.node_time(node);
        let access = self.access(node, worker);
        let (verdict, effects) = call(&self.nodes[node].store, &self.config, SUBJECT, self.config.price, t, access);
        if effects.became_pending {
            crate::registry::add(&self.nodes[node].store, &self.config, SUBJECT);
        }
        trace(|| format!("t={} call node{node} w{worker} {access:?} -> {verdict:?}", self.now));
        match verdict {
            Verdict::Allow { .. } => {
                self.nodes[node].let_through += 1;
                self.nodes[node].workers[worker].tracker.touch(SUBJECT, t);
            }
            Verdict::AskLedger => {
                // Join the worker's read in flight, or start one.
                if let Some(waiting) = self.nodes[node].workers[worker].reads.values_mut().next() {
                    *waiting += 1;
                    return;
                }
                let pending = sync::balance_read(
                    &self.nodes[node].store,
                    &self.config,
                    &self.nodes[node].id,
                    SUBJECT,
                    &[self.config.price],
                    t,
                );
                let id = self.send(node, worker, Kind::Read, pending, delay);
                self.nodes[node].workers[worker].reads.insert(id, 1);
            }
            _ => {}
        }
    }

    fn tick(&mut self, node: usize, worker: usize, delay: u64) {
        if self.nodes[node].workers[worker].in_flight.is_some() {
            return;
        }
        let t = self.node_time(node);
        let n = &mut self.nodes[node];
        let w = &mut n.workers[worker];
        let prepared = sync::prepare(&n.store, &mut w.tracker, &self.config, &n.id, w.id, t);
        if let Some(pending) = prepared {
            let id = self.send(node, worker, Kind::Tick, pending, delay);
            self.nodes[node].workers[worker].in_flight = Some(id);
        }
    }

    /// The answer (or the failure) reaches the worker that asked, if it is still the same one.
    fn answer(&mut self, m: Message, response: Option<&SyncResponse>) {
        let worker = &self.nodes[m.node].workers[m.worker];
        let expected = match m.kind {
            Kind::Tick => worker.in_flight == Some(m.id),
            Kind::Read => worker.reads.contains_key(&m.id),
        };
        if worker.id != m.worker_id || !expected {
            return; // a reset worker or an answer after its timeout: the host drops it
        }
        let t = self.node_time(m.node);
        let body = response.map(|r| serde_json::to_vec(r).unwrap());
        let status = response.map(|_| 200);
        let ok = match sync::parse_answer(&m.pending, status, body.as_deref()) {
            Ok(resp) => {
                sync::apply(&self.nodes[m.node].store, &self.config, &m.pending, &resp, t);
                crate::sync::register_pending(&self.nodes[m.node].store, &self.config, &m.pending);
                trace(|| {
                    format!(
                        "t={} node{} applies #{}: entry {:?}",
                        self.now,
                        m.node,
                        m.id,
                        crate::shared::read::<crate::customer::CustomerEntry>(
                            &self.nodes[m.node].store,
                            &crate::decision::entry_key(&self.config, &self.config.pricing.scopes[0], SUBJECT)
                        )
                    )
                });
                true
            }
            Err(_) => false,
        };
        let w = &mut self.nodes[m.node].workers[m.worker];
        w.down_until = if ok { 0 } else { t + u64::from(self.config.sync.interval_ms) };
        match m.kind {
            Kind::Tick => w.in_flight = None,
            Kind::Read => {
                let waiting = w.reads.remove(&m.id).unwrap_or(0);
                w.tracker.touch(SUBJECT, t);
                let access = if ok { LedgerAccess::Asked } else { LedgerAccess::Unreachable };
                for _ in 0..waiting {
                    self.settle_call(m.node, m.worker, access);
                }
            }
        }
    }

    /// Requests due at the ledger are served; each answer's fate comes from `fates`.
    fn serve_requests(&mut self, fates: u64) {
        let due: Vec<usize> = (0..self.messages.len())
            .filter(|&i| self.messages[i].answer.is_none() && self.messages[i].due_ms <= self.now)
            .collect();
        for i in due.into_iter().rev() {
            let mut m = self.messages.swap_remove(i);
            let response = self.ledger.serve(&m.pending.request, self.now);
            trace(|| {
                format!(
                    "t={} ledger serves #{} from {} {:?}\n   -> {:?}\n   holds {:?}",
                    self.now,
                    m.id,
                    m.pending.request.node,
                    m.pending.request.subjects,
                    response.subjects,
                    self.ledger.book.holds()
                )
            });
            let fate = fates.rotate_left((m.id % 61) as u32) % 6;
            match fate {
                0 => {} // lost: the host reports a timeout at the deadline
                1 => {
                    // duplicated: the same answer arrives twice
                    let copy = Message {
                        id: m.id,
                        node: m.node,
                        worker: m.worker,
                        worker_id: m.worker_id,
                        kind: match m.kind {
                            Kind::Tick => Kind::Tick,
                            Kind::Read => Kind::Read,
                        },
                        pending: m.pending.clone(),
                        due_ms: self.now,
                        answer: Some(response.clone()),
                        deadline_ms: m.deadline_ms,
                    };
                    self.messages.push(copy);
                    m.answer = Some(response);
                    m.due_ms = self.now + fate;
                    self.messages.push(m);
                }
                _ => {
                    m.answer = Some(response);
                    m.due_ms = self.now + (fates >> 8) % 150;
                    self.messages.push(m);
                }
            }
        }
    }

    /// Hands one arrived answer to its worker.
    fn deliver(&mut self, pick: usize) {
        let due: Vec<usize> = (0..self.messages.len())
            .filter(|&i| self.messages[i].answer.is_some() && self.messages[i].due_ms <= self.now)
            .collect();
        if due.is_empty() {
            return;
        }
        let mut m = self.messages.swap_remove(due[pick % due.len()]);
        if let Some(response) = m.answer.take() {
            if self.now <= m.deadline_ms {
                self.answer(m, Some(&response));
            }
        }
    }

    /// Time passes one millisecond at a time.
    fn advance(&mut self, ms: u64, fates: u64) {
        for step in 0..ms {
            self.now += 1;
            self.serve_requests(fates.rotate_left((step % 64) as u32));
            let interval = u64::from(self.config.sync.interval_ms);
            for n in 0..self.nodes.len() {
                for w in 0..2 {
                    // Each worker ticks every interval, at its own phase.
                    if (self.node_time(n) + 37 * w as u64) % interval == 0 {
                        self.tick(n, w, (self.now + fates) % self.request_delay_ms);
                    }
                }
            }
            self.timeouts();
        }
    }

    /// Calls whose answer did not come by the timeout get the host's failure.
    fn timeouts(&mut self) {
        let now = self.now;
        let waiting: Vec<(u64, usize, usize)> = self
            .nodes
            .iter()
            .enumerate()
            .flat_map(|(n, node)| {
                node.workers.iter().enumerate().flat_map(move |(w, wk)| {
                    wk.in_flight.iter().chain(wk.reads.keys()).map(move |id| (*id, n, w)).collect::<Vec<_>>()
                })
            })
            .collect();
        for (id, n, w) in waiting {
            let deadline = self.messages.iter().find(|m| m.id == id).map(|m| m.deadline_ms);
            let lost = deadline.is_none_or(|d| now > d);
            if lost {
                // The host synthesises a failure (Envoy: 504) once the timeout passes.
                self.messages.retain(|m| m.id != id);
                let worker_id = self.nodes[n].workers[w].id;
                let kind = if self.nodes[n].workers[w].in_flight == Some(id) { Kind::Tick } else { Kind::Read };
                let pending =
                    PendingSync { request: SyncRequest { node: String::new(), subjects: Vec::new() }, sent_ms: 0 };
                self.answer(
                    Message {
                        id,
                        node: n,
                        worker: w,
                        worker_id,
                        kind,
                        pending,
                        due_ms: now,
                        answer: None,
                        deadline_ms: 0,
                    },
                    None,
                );
            }
        }
    }

    fn step(&mut self, a: &Action) {
        match *a {
            Action::Call { node, worker } => self.call(node, worker, self.now % self.request_delay_ms),
            Action::Deliver { pick } => self.deliver(pick),
            Action::Advance { ms, fates } => self.advance(ms, fates),
            Action::Reset { node, worker } => {
                let w = &mut self.nodes[node].workers[worker];
                *w = Worker { id: w.id + 100, ..Worker::default() };
            }
            Action::LedgerJob => {
                let entries = self.ledger.book.advance(at(self.now));
                self.ledger.journal.extend(entries);
                self.ledger.book.expire_holds(at(self.now));
            }
        }
    }

    fn let_through(&self) -> u64 {
        self.nodes.iter().map(|n| n.let_through).sum()
    }

    fn audit(&self) -> Result<(), TestCaseError> {
        prop_assert!(
            self.let_through() <= CALLS_PAID_FOR,
            "let through {} calls for a balance of {CALLS_PAID_FOR}",
            self.let_through()
        );
        // Every call a node let through is recorded in its shared state (nothing lost to a reset
        // or a lost race).
        for node in &self.nodes {
            let key = crate::decision::entry_key(&self.config, &self.config.pricing.scopes[0], SUBJECT);
            let recorded =
                crate::shared::read::<crate::customer::CustomerEntry>(&node.store, &key).map_or(0, |e| e.next_call);
            prop_assert_eq!(
                recorded,
                node.let_through,
                "node {} recorded {} calls, let {} through",
                node.id,
                recorded,
                node.let_through
            );
        }
        Ok(())
    }

    /// A reliable network until everything is reported and every lease given back.
    fn drain(&mut self) {
        for _ in 0..200 {
            // Fate 2: answers arrive, in order.
            self.advance(10, 2);
            while self.messages.iter().any(|m| m.answer.is_some() && m.due_ms <= self.now) {
                self.deliver(0);
            }
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 64, failure_persistence: None, ..ProptestConfig::default() })]

    #[test]
    fn leases_never_let_through_more_than_the_balance_and_book_every_call_once(kong in any::<bool>(), actions in proptest::collection::vec(action(), 1..400)) {
        let mut sim = Sim::new(kong);
        for a in &actions {
            sim.step(a);
            sim.audit()?;
        }
        sim.drain();
        sim.audit()?;
        // Every call let through is booked, exactly once: each node's booked ranges tile 0..calls.
        for node in &sim.nodes {
            let mut ranges = sim.ledger.booked.get(&node.id).cloned().unwrap_or_default();
            ranges.sort();
            let mut next = 0;
            for (from, to) in &ranges {
                prop_assert_eq!(*from, next, "node {} booked ranges {:?}", node.id, ranges);
                next = *to;
            }
            prop_assert_eq!(next, node.let_through, "node {} let {} calls through, booked {}", node.id, node.let_through, next);
        }
        let price = sim.config.price;
        prop_assert_eq!(sim.ledger.consumed(), price.times(sim.let_through()).unwrap());
        // Nothing stranded: every lease was given back, so all that is left is live.
        let b = &sim.ledger.book.balances(at(sim.now), None)[0];
        prop_assert_eq!(b.live, b.settled);
        prop_assert_eq!(b.settled, price.times(CALLS_PAID_FOR - sim.let_through()).unwrap());
    }
}
