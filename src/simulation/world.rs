//! The simulated world: gateway nodes (each with its own shared data under Envoy's or Kong's
//! rules and its own clock skew) with several workers, a network between them and the ledger,
//! and the auditor. Everything is driven by a [`Scenario`], so a scenario replays identically.

use std::collections::BTreeMap;

use credits::sync::SyncResponse;
use credits::{Amount, Book};
use proptest::prelude::*;

use std::rc::Rc;

use super::backend::{at, Books, GrantPlan, Ledger};
use super::filter::{Decided, Sent, SimWorker, Upstream};
use crate::config::FilterConfig;
use crate::customer::CustomerEntry;
use crate::engine::{Rules, Token};
use crate::registry;
use crate::shared::fake::{FakeShared, Rules as SharedRules, ORIGIN_BLOCK_BITS};
use crate::shared::Keyed;

pub const SUBJECT: &str = "alice";
pub const NODES: usize = 3;
pub const WORKERS: usize = 2;
/// Simulated time starts here (ms since the epoch); the scenario's grants are created then.
pub const START_MS: u64 = 1_000;

/// What a call that succeeds costs.
pub fn price() -> Amount {
    Amount::parse("0.01").unwrap()
}

fn trace(line: impl FnOnce() -> String) {
    if std::env::var_os("SIM_TRACE").is_some() {
        eprintln!("{}", line());
    }
}

/// The filter's configuration in the simulation, a call costing [`price`] unless it fails. At a
/// fixed price a call is charged when it is let through (`pricing::Charging::AtAdmission`) and
/// refunded if it fails; priced by its response (one unit it reports), it holds its estimate
/// until then.
pub fn config(priced_by_response: bool) -> FilterConfig {
    let pricing = if priced_by_response {
        // A call whose worker went away holds its estimate until `hold_timeout_ms`: within the
        // run's drain.
        r#""price": "0", "pricing": {"hold_timeout_ms": 1000, "units": [{"name": "calls", "unit_price": "0.01",
            "source": {"response_header": "x-calls"}, "estimate": {"units": "1"}}]}"#
    } else {
        r#""price": "0.01""#
    };
    let json = format!(
        r#"{{"ledger": {{"upstream": "ledger", "token": "t", "timeout_ms": 200}}, "currency": "USD",
        "feature_key": "api_requests", "sync": {{"strategy": "lease", "interval_ms": 100}},
        "lease": {{"min_calls": 3, "max_calls": 20, "ttl_ms": 1000, "idle_release_ms": 300}}, {pricing}}}"#
    );
    FilterConfig::parse(json.as_bytes()).unwrap()
}

#[derive(Clone, Debug)]
pub enum Action {
    /// A call arrives at a worker.
    Call { node: usize, worker: usize },
    /// One of the answers that have arrived is handed to its worker (answers are reordered).
    Deliver { pick: usize },
    /// Time passes: requests reach the ledger (within a tenth of the lease TTL, the filter's
    /// assumption) unless lost, some twice; answers are lost, duplicated or delayed as `fates`
    /// says; workers tick every interval; the host fails calls whose answer missed the timeout.
    Advance { ms: u64, fates: u64 },
    /// A worker's instance is replaced: its in-VM state is gone, shared data stays.
    Reset { node: usize, worker: usize },
    /// The ledger's background job runs (expiries, fundings, expired leases).
    LedgerJob,
    /// The ledger stops and starts again on the same store.
    LedgerRestart,
    /// An operator voids one of the scenario's grants.
    Void { grant: usize },
    /// The host evicts one of a node's shared values (Kong's zone is full): a customer's entry or
    /// the node's record. Not a register shard: every worker reads every shard on every tick,
    /// and ngx_wasm_module's slru moves a value read to the head of its queue and evicts from the
    /// entry's own size class first, so a shard (a page, read each tick) goes last of all.
    Evict { node: usize, pick: usize },
    /// The node dies (`kill -9`, or `kong reload`, which wipes shared data) and starts again:
    /// its workers and shared data are gone, requests it sent still reach the ledger. (Not in
    /// the random scenarios: [`super::steady`] kills nodes on a network that loses nothing.)
    Kill { node: usize },
}

fn action() -> impl Strategy<Value = Action> {
    prop_oneof![
        24 => (0..NODES, 0..WORKERS).prop_map(|(node, worker)| Action::Call { node, worker }),
        20 => any::<usize>().prop_map(|pick| Action::Deliver { pick }),
        16 => (1u64..150, any::<u64>()).prop_map(|(ms, fates)| Action::Advance { ms, fates }),
        4 => (0..NODES, 0..WORKERS).prop_map(|(node, worker)| Action::Reset { node, worker }),
        4 => Just(Action::LedgerJob),
        4 => Just(Action::LedgerRestart),
        1 => (0usize..3).prop_map(|grant| Action::Void { grant }),
        1 => (0..NODES, any::<usize>()).prop_map(|(node, pick)| Action::Evict { node, pick }),
    ]
}

/// Everything a run depends on.
#[derive(Clone, Debug)]
pub struct Scenario {
    pub kong: bool,
    /// Each node's clock is ahead of the ledger's by this much.
    pub skews_ms: [u64; NODES],
    /// Decides which requests are lost or duplicated.
    pub noise: u64,
    pub grants: Vec<GrantPlan>,
    pub actions: Vec<Action>,
    /// Calls are priced by their response (see [`config`]).
    pub priced_by_response: bool,
    /// One call in four fails, and one in two is answered only when time next passes (after
    /// ticks that may send its usage); otherwise every call succeeds at once.
    pub faulty_upstream: bool,
}

/// Promotional credit consumed first that expires mid-run, (usually) credit that never expires,
/// and (sometimes) credit that becomes effective later. Without the never-expiring credit the
/// expiring grant is all there is until the later one: nothing covers what leases would spend
/// of it after its expiry.
fn grants() -> impl Strategy<Value = Vec<GrantPlan>> {
    (1u64..15, 300u64..5_000, prop_oneof![1 => Just(0u64), 3 => 5u64..25], 0u64..10, 500u64..5_000).prop_map(
        |(promo, promo_life_ms, main, later, later_ms)| {
            let mut plans = vec![GrantPlan {
                calls: promo,
                priority: 1,
                effective_ms: START_MS,
                expires_after_ms: Some(promo_life_ms),
            }];
            if main > 0 {
                plans.push(GrantPlan { calls: main, priority: 10, effective_ms: START_MS, expires_after_ms: None });
            }
            if later > 0 {
                plans.push(GrantPlan {
                    calls: later,
                    priority: 5,
                    effective_ms: START_MS + later_ms,
                    expires_after_ms: None,
                });
            }
            plans
        },
    )
}

pub fn scenario(max_actions: usize) -> impl Strategy<Value = Scenario> {
    (
        any::<bool>(),
        [0u64..50, 0u64..50, 0u64..50],
        any::<u64>(),
        grants(),
        proptest::collection::vec(action(), 1..max_actions),
        // Drawn last, so that each seed's world is what it was before this was drawn at all.
        any::<bool>(),
    )
        .prop_map(|(kong, skews_ms, noise, grants, actions, charged_at_admission)| Scenario {
            kong,
            skews_ms,
            noise,
            grants,
            actions,
            priced_by_response: !charged_at_admission,
            faulty_upstream: true,
        })
}

/// A deterministic draw for message `id` (splitmix64).
fn roll(noise: u64, id: u64, salt: u64) -> u64 {
    let mut z = noise ^ id.wrapping_mul(0x9e37_79b9_7f4a_7c15) ^ salt.wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// What a run exercised, so a summary can show the faults really happened.
#[derive(Clone, Debug, Default)]
pub struct Stats {
    pub allowed: u64,
    pub refused: u64,
    pub unavailable: u64,
    pub requests_lost: u64,
    pub requests_duplicated: u64,
    pub answers_lost: u64,
    pub answers_duplicated: u64,
    pub host_timeouts: u64,
    pub worker_resets: u64,
    pub ledger_restarts: u64,
    pub ledger_jobs: u64,
    pub voids: u64,
    pub evictions: u64,
    /// Calls let through and never booked (their entry was evicted first).
    pub lost: u64,
    /// Calls let through that failed (refunded if they were charged), and the credit the ledger
    /// gave back for those whose charge it had booked.
    pub failed: u64,
    pub refunded: Amount,
    /// The most the auditor's allowance was needed (see [`Sim::audit`]).
    pub excess: Amount,
}

struct Node {
    id: String,
    store: Rc<FakeShared>,
    skew_ms: u64,
    workers: Vec<SimWorker>,
    let_through: u64,
    /// Of those, the ones the upstream answered with an error (they cost nothing).
    failed: u64,
    /// Of those, the ones still waiting for the upstream when their worker went away: they
    /// never complete (charged if charged when let through, free if they held their price).
    abandoned: u64,
    /// Calls whose refund a lost entry may have taken with it, or whose charge it took while
    /// their refund still goes back (through the entry there is then): those that had failed by
    /// then (owed in its net usage) and those waiting for the upstream.
    refunds_at_risk: u64,
    /// Calls numbered by the customer's entries that were evicted.
    recorded_before: u64,
    /// Calls the evicted entries had not had booked yet: at most this many are never booked.
    lost_bound: u64,
    /// Calls left unrecorded by worker instances since replaced ([`SimWorker::dropped`]).
    dropped_before: u64,
    /// When (simulated ms) each call was let through.
    admitted_at: Vec<u64>,
}

impl Node {
    /// The node loses the customer's entry `e` (evicted, or killed with it): of its calls, the
    /// ones not yet booked (unsent, or in a range not yet answered) may never be. Returns those.
    fn lose(&mut self, e: &CustomerEntry) -> u64 {
        let unreported = e.unsent_calls() + e.flight.as_ref().map_or(0, |f| f.to - f.from);
        self.recorded_before += e.next_call;
        self.lost_bound += unreported;
        self.refunds_at_risk += self.failed + self.workers.iter().map(SimWorker::upstream_calls).sum::<u64>();
        unreported
    }

    /// Calls whose usage went unrecorded because their lease's entry was evicted while they ran.
    fn dropped(&self) -> u64 {
        self.dropped_before + self.workers.iter().map(SimWorker::dropped).sum::<u64>()
    }

    /// Calls this node numbered, in every incarnation of the customer's entry.
    fn numbered(&self) -> u64 {
        self.recorded_before + self.workers[0].calls_recorded(SUBJECT)
    }

    /// Calls let through that cost their price: all but those that failed, and those that held
    /// their price and never completed.
    fn charged(&self, priced_by_response: bool) -> u64 {
        let free = if priced_by_response { self.abandoned } else { 0 };
        self.let_through - self.failed - free
    }
}

#[derive(Clone)]
struct Message {
    id: u64,
    node: usize,
    worker: usize,
    /// The worker instance that sent it (a reset worker is a new instance).
    worker_id: u64,
    sent: Sent,
    /// When the request reaches the ledger, or when the answer reaches the node.
    due_ms: u64,
    /// The request never reaches the ledger.
    lost: bool,
    answer: Option<SyncResponse>,
    /// When the host gives up on the call (the timeout).
    deadline_ms: u64,
}

pub struct Sim<L: Ledger> {
    pub config: FilterConfig,
    priced_by_response: bool,
    /// How the upstream answers calls (see [`Scenario::faulty_upstream`]).
    answers: Rc<Upstream>,
    rules: Rules,
    shared_rules: SharedRules,
    pub ledger: L,
    noise: u64,
    nodes: Vec<Node>,
    messages: Vec<Message>,
    pub now: u64,
    next_id: u64,
    request_delay_ms: u64,
    /// The network loses and duplicates nothing (the final drain).
    reliable: bool,
    /// The customer's book as of the last audit; `None`: the ledger changed since.
    book: Option<Book>,
    /// Credit the ledger gave back for failed calls, as of the last audit.
    refunded: Amount,
    /// Each expiring grant's instant (ms) and, once passed, the calls let through by then that
    /// the ledger had not booked (priced).
    expiries: Vec<(u64, Option<Amount>)>,
    /// For each void, what leases held of the voided grant at that instant.
    voided_held: Vec<Amount>,
    pub stats: Stats,
    /// Dispatches the engine still waits for, by (node, worker instance, token).
    outstanding: BTreeMap<Outstanding, Message>,
    /// Each node killed: (node, when in simulated ms, the calls it had not had booked then).
    pub kills: Vec<(usize, u64, u64)>,
}

type Outstanding = (usize, u64, Token);

fn key(m: &Message) -> Outstanding {
    (m.node, m.worker_id, m.sent.token)
}

impl<L: Ledger> Sim<L> {
    pub fn new(s: &Scenario, config: FilterConfig, ledger: impl FnOnce(&FilterConfig) -> L) -> Sim<L> {
        let (rules, shared_rules) = if s.kong {
            (
                Rules::Nginx,
                SharedRules::Kong {
                    hash: |k| k.bytes().fold(7u32, |h, b| h.wrapping_mul(31).wrapping_add(u32::from(b))),
                },
            )
        } else {
            (Rules::Envoy, SharedRules::Envoy)
        };
        let (noise, faulty) = (s.noise, s.faulty_upstream);
        // Drawn from the call (its worker instance and context), not from the scenario's draws,
        // so that each seed's actions are what they were before calls could fail.
        let answers: Rc<Upstream> = Rc::new(move |call| {
            let failed = faulty && roll(noise, call, 7) % 4 == 0;
            let at_once = !faulty || roll(noise, call, 8) % 2 == 0;
            (if failed { 503 } else { 200 }, at_once)
        });
        let nodes = (0..NODES)
            .map(|n| {
                let store = Rc::new(FakeShared::with_origins(shared_rules, (n as u64 + 1) << ORIGIN_BLOCK_BITS));
                let workers = (0..WORKERS)
                    .map(|w| {
                        let id = (n * 10 + w) as u64 + 1;
                        SimWorker::new(rules, Rc::clone(&store), &config, id, START_MS, Rc::clone(&answers))
                    })
                    .collect();
                Node {
                    id: String::new(),
                    store,
                    skew_ms: s.skews_ms[n],
                    workers,
                    let_through: 0,
                    failed: 0,
                    abandoned: 0,
                    refunds_at_risk: 0,
                    recorded_before: 0,
                    lost_bound: 0,
                    dropped_before: 0,
                    admitted_at: Vec::new(),
                }
            })
            .map(|mut node| {
                node.id = node.workers[0].worker.node.clone();
                node
            })
            .collect();
        let request_delay_ms = config.lease.ttl_ms / 10 - 1;
        let ledger = ledger(&config);
        Sim {
            config,
            priced_by_response: s.priced_by_response,
            answers,
            rules,
            shared_rules,
            ledger,
            noise: s.noise,
            nodes,
            messages: Vec::new(),
            now: START_MS,
            next_id: 1,
            request_delay_ms,
            reliable: false,
            book: None,
            refunded: Amount::ZERO,
            expiries: s.grants.iter().filter_map(|g| Some((g.effective_ms + g.expires_after_ms?, None))).collect(),
            stats: Stats::default(),
            voided_held: Vec::new(),
            outstanding: BTreeMap::new(),
            kills: Vec::new(),
        }
    }

    fn node_time(&self, node: usize) -> u64 {
        self.now + self.nodes[node].skew_ms
    }

    fn send(&mut self, node: usize, worker: usize, sent: Sent) {
        let id = self.next_id;
        self.next_id += 1;
        let fate = if self.reliable { 2 } else { roll(self.noise, id, 1) % 12 };
        let m = Message {
            id,
            node,
            worker,
            worker_id: self.nodes[node].workers[worker].worker.id,
            sent,
            due_ms: self.now + roll(self.noise, id, 2) % self.request_delay_ms,
            lost: fate == 0,
            answer: None,
            deadline_ms: self.now + u64::from(self.config.ledger.timeout_ms),
        };
        self.stats.requests_lost += u64::from(fate == 0);
        self.outstanding.insert(key(&m), m.clone());
        if fate == 1 {
            self.stats.requests_duplicated += 1;
            // Duplicated on the way: the ledger serves it twice; the host takes the first answer.
            let copy = Message { due_ms: self.now + roll(self.noise, id, 3) % self.request_delay_ms, ..m.clone() };
            self.messages.push(copy);
        }
        self.messages.push(m);
    }

    /// Records what a step of `worker` decided and routes what it sent.
    fn took(&mut self, node: usize, worker: usize, (decided, sent): (Decided, Vec<Sent>)) {
        self.nodes[node].let_through += decided.allowed;
        self.nodes[node].failed += decided.failed;
        let now = self.now;
        self.nodes[node].admitted_at.extend((0..decided.allowed).map(|_| now));
        self.stats.allowed += decided.allowed;
        self.stats.refused += decided.refused;
        self.stats.unavailable += decided.unavailable;
        for s in sent {
            self.send(node, worker, s);
        }
    }

    fn call(&mut self, node: usize, worker: usize) {
        let t = self.node_time(node);
        let step = self.nodes[node].workers[worker].call(SUBJECT, t);
        trace(|| format!("t={} call node{node} w{worker} -> {:?}", self.now, step.0));
        self.took(node, worker, step);
    }

    fn tick(&mut self, node: usize, worker: usize) {
        let t = self.node_time(node);
        let took = self.nodes[node].workers[worker].tick(t);
        self.took(node, worker, took);
    }

    /// The answer (or the failure) reaches the worker that asked, if it is still the same instance.
    fn answer(&mut self, m: &Message, response: Option<&SyncResponse>) {
        let t = self.node_time(m.node);
        let w = &mut self.nodes[m.node].workers[m.worker];
        if w.worker.id != m.worker_id {
            return; // a reset worker: its instance and its calls are gone
        }
        let step = w.answer(&m.sent, response, t);
        trace(|| {
            let entry = self.nodes[m.node].workers[m.worker].entry(SUBJECT);
            format!("t={} node{} gets #{} ({:?}): {:?}; {entry:?}", self.now, m.node, m.id, response.is_some(), step.0)
        });
        self.took(m.node, m.worker, step);
    }

    /// Requests due at the ledger are served; each answer's fate comes from `fates`.
    fn serve_requests(&mut self, fates: u64) {
        let due: Vec<usize> = (0..self.messages.len())
            .filter(|&i| {
                let m = &self.messages[i];
                m.answer.is_none() && !m.lost && m.due_ms <= self.now
            })
            .collect();
        for i in due.into_iter().rev() {
            let mut m = self.messages.swap_remove(i);
            self.book = None;
            let Some(response) = self.ledger.serve(&m.sent.request, at(self.now)) else {
                continue; // the ledger failed: the host reports it at the timeout
            };
            trace(|| format!("t={} ledger serves #{} {:?}\n   -> {:?}", self.now, m.id, m.sent.request, response));
            let fate = if self.reliable { 2 } else { fates.rotate_left((m.id % 61) as u32) % 6 };
            match fate {
                0 => self.stats.answers_lost += 1, // the host reports a timeout at the deadline
                1 => {
                    // duplicated: the same answer arrives twice
                    self.stats.answers_duplicated += 1;
                    let copy = Message { due_ms: self.now, answer: Some(response.clone()), ..m.clone() };
                    self.messages.push(copy);
                    m.answer = Some(response);
                    m.due_ms = self.now + 1;
                    self.messages.push(m);
                }
                _ => {
                    m.answer = Some(response);
                    m.due_ms = self.now + if self.reliable { 0 } else { (fates >> 8) % 150 };
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
        let m = self.messages.swap_remove(due[pick % due.len()]);
        // The engine hands over the first answer before the timeout; later copies are dropped.
        if self.outstanding.remove(&key(&m)).is_some() {
            self.answer(&m, m.answer.as_ref());
        }
    }

    /// Time passes one millisecond at a time.
    fn advance(&mut self, ms: u64, fates: u64) {
        for step in 0..ms {
            self.now += 1;
            self.note_expiries();
            self.serve_requests(fates.rotate_left((step % 64) as u32));
            let interval = u64::from(self.config.sync.interval_ms);
            for n in 0..NODES {
                for w in 0..WORKERS {
                    // Each worker ticks every interval, at its own phase.
                    if (self.node_time(n) + 37 * w as u64) % interval == 0 {
                        self.tick(n, w);
                    }
                }
            }
            self.timeouts();
        }
        // The upstream answers the calls still waiting for it.
        for n in 0..NODES {
            let t = self.node_time(n);
            for w in 0..WORKERS {
                let failed = self.nodes[n].workers[w].respond(t);
                self.nodes[n].failed += failed;
                let sent = self.nodes[n].workers[w].sent_since();
                self.took(n, w, (Decided::default(), sent));
            }
        }
    }

    /// Records, as a grant expires, the calls let through that the ledger has not booked yet
    /// (see [`Sim::allowance`]). Runs before this millisecond's requests reach the ledger, so
    /// the books are as of the instant.
    fn note_expiries(&mut self) {
        for i in 0..self.expiries.len() {
            let (ms, noted) = self.expiries[i];
            if noted.is_none() && ms <= self.now {
                let booked: u64 = self.ledger.books().booked.values().flatten().map(|(from, to)| to - from).sum();
                // Calls numbered to carry a refund (one per failed call at most) are booked too.
                let failed: u64 = self.nodes.iter().map(|n| n.failed).sum();
                let unreported = (self.let_through() + failed).saturating_sub(booked);
                self.expiries[i].1 = Some(price().times(unreported).unwrap());
            }
        }
    }

    /// Voids grant `index` of the scenario (if it has one), noting first what leases held of it.
    fn void(&mut self, index: usize) {
        let Some(id) = self.ledger.grant_id(index) else { return };
        let book = self.book.take().unwrap_or_else(|| self.ledger.books().book);
        if book.grant(&id).is_none_or(|g| g.grant.voided_at.is_some()) {
            return;
        }
        let now = at(self.now);
        let backing = book.holds().iter().filter(|h| h.is_open_at(now)).flat_map(|h| &h.backing);
        self.voided_held.push(backing.filter(|b| b.grant_id == id).map(|b| b.amount).sum());
        self.ledger.void(&id, now);
        self.stats.voids += 1;
    }

    /// Dispatches whose answer did not come by the timeout get the engine's failure.
    fn timeouts(&mut self) {
        let now = self.now;
        let due: Vec<(Outstanding, Message)> =
            self.outstanding.iter().filter(|(_, m)| now > m.deadline_ms).map(|(k, m)| (*k, m.clone())).collect();
        for (k, m) in due {
            self.outstanding.remove(&k);
            self.messages.retain(|other| key(other) != k);
            self.stats.host_timeouts += 1;
            self.answer(&m, None);
        }
    }

    pub fn step(&mut self, a: &Action) {
        match *a {
            Action::Call { node, worker } => self.call(node, worker),
            Action::Deliver { pick } => self.deliver(pick),
            Action::Advance { ms, fates } => self.advance(ms, fates),
            Action::Reset { node, worker } => {
                let t = self.node_time(node);
                let n = &mut self.nodes[node];
                let id = n.workers[worker].worker.id + 100;
                n.abandoned += n.workers[worker].upstream_calls();
                n.dropped_before += n.workers[worker].dropped();
                let answers = Rc::clone(&self.answers);
                n.workers[worker] = SimWorker::new(self.rules, Rc::clone(&n.store), &self.config, id, t, answers);
                self.stats.worker_resets += 1;
            }
            Action::LedgerJob => {
                self.ledger.job(at(self.now));
                self.stats.ledger_jobs += 1;
                self.book = None;
            }
            Action::Void { grant } => {
                self.void(grant);
                self.book = None;
            }
            Action::Evict { node, pick } => self.evict(node, pick),
            Action::Kill { node } => self.kill(node),
            Action::LedgerRestart => {
                self.ledger.restart();
                self.stats.ledger_restarts += 1;
                self.book = None;
            }
        }
    }

    /// The host evicts a value of `node`'s: the customer's entry (with what it had not had
    /// booked) or the node's record.
    fn evict(&mut self, node: usize, pick: usize) {
        let n = &mut self.nodes[node];
        let Some(bytes) = n.store.evict_nth(pick, |v| !v.starts_with(registry::MAGIC.as_bytes())) else { return };
        self.stats.evictions += 1;
        trace(|| {
            format!("t={} node{node} evicts {}", self.now, String::from_utf8_lossy(&bytes[..bytes.len().min(60)]))
        });
        if let Some(e) = CustomerEntry::decode(&bytes) {
            n.lose(&e);
            // Nor are the calls still running on credit its lease held (`decision::complete_in_scope`;
            // under `cached` nothing is held at the ledger, and they are booked).
            if self.config.sync.strategy == crate::config::Strategy::Lease {
                n.lost_bound += e.holds.count;
            }
            trace(|| format!("t={} node{node} evicts {e:?}", self.now));
        }
        self.book = None;
    }

    /// From now on the network loses, duplicates and delays nothing but requests (each reaches
    /// the ledger within the request delay); answers come back at once.
    pub fn reliable_network(&mut self) {
        self.reliable = true;
    }

    /// The longest a sync takes from its send to its answer on a reliable network.
    pub fn round_trip_ms(&self) -> u64 {
        self.request_delay_ms
    }

    /// Hands every answer that has arrived to its worker.
    pub fn deliver_arrived(&mut self) {
        while self.messages.iter().any(|m| m.answer.is_some() && m.due_ms <= self.now) {
            self.deliver(0);
        }
    }

    /// `node` dies and starts again with nothing: the customer's entry goes with what it had not
    /// had booked (as in an eviction), and the new incarnation numbers calls under new origins.
    fn kill(&mut self, node: usize) {
        let t = self.node_time(node);
        let incarnation = self.kills.iter().filter(|(n, _, _)| *n == node).count() as u64 + 1;
        let n = &mut self.nodes[node];
        let unreported = n.workers[0].entry(SUBJECT).map_or(0, |e| n.lose(&e));
        let first_origin = ((node as u64 + 1) << ORIGIN_BLOCK_BITS) + (incarnation << (ORIGIN_BLOCK_BITS / 2));
        n.store = Rc::new(FakeShared::with_origins(self.shared_rules, first_origin));
        for w in 0..WORKERS {
            let id = n.workers[w].worker.id + 1000;
            n.abandoned += n.workers[w].upstream_calls();
            n.dropped_before += n.workers[w].dropped();
            let answers = Rc::clone(&self.answers);
            n.workers[w] = SimWorker::new(self.rules, Rc::clone(&n.store), &self.config, id, t, answers);
        }
        n.id = n.workers[0].worker.node.clone();
        trace(|| format!("t={} node{node} killed with {unreported} calls unreported", self.now));
        self.kills.push((node, self.now, unreported));
        self.book = None;
    }

    /// A reliable network until everything is reported and every lease given back.
    pub fn drain(&mut self) {
        self.reliable_network();
        for _ in 0..200 {
            self.advance(10, 2);
            self.deliver_arrived();
        }
    }

    pub fn let_through(&self) -> u64 {
        self.nodes.iter().map(|n| n.let_through).sum()
    }

    /// When (simulated ms) each call `node` let through was let through, in order.
    pub fn admitted_at(&self, node: usize) -> &[u64] {
        &self.nodes[node].admitted_at
    }

    /// The auditor, after every step: never more let through than the credit there was, and
    /// what [`Sim::audit_records`] checks.
    pub fn audit(&mut self) -> Result<(), String> {
        self.audit_records()?;
        self.audit_credit()
    }

    /// Every call let through recorded in its node's shared state, the engine's rules kept, the
    /// journal sound, nothing booked that was not let through.
    pub fn audit_records(&mut self) -> Result<(), String> {
        for node in &self.nodes {
            let recorded = node.numbered();
            // Charged when let through, every call is numbered then, and a refund that no call
            // waiting to be sent can carry gets a number of its own. Holding its price, a call is
            // numbered when it completes, unless it failed (then it cost nothing).
            let numbered = if self.priced_by_response {
                let waiting: u64 = node.workers.iter().map(SimWorker::upstream_calls).sum();
                let unnumbered = node.failed + node.abandoned + waiting + node.dropped();
                recorded + unnumbered == node.let_through
            } else {
                recorded >= node.let_through && recorded <= node.let_through + node.failed
            };
            if !numbered {
                return Err(format!(
                    "{} recorded {recorded} calls, let {} through ({} failed, {} abandoned)",
                    node.id, node.let_through, node.failed, node.abandoned
                ));
            }
            if let Some(v) = node.workers.iter().find_map(|w| w.violations().first()) {
                return Err(format!("{}: the engine would refuse or trap: {v}", node.id));
            }
        }
        if self.book.is_none() {
            let books = self.ledger.books();
            if !books.problems.is_empty() {
                return Err(format!("journal check: {:?}", books.problems));
            }
            // Nodes report only calls they let through: booking more is booking some twice.
            let let_through = price().times(self.let_through()).unwrap();
            if books.consumed > let_through {
                return Err(format!("consumed {} with {let_through} let through", books.consumed));
            }
            self.book = Some(books.book);
            self.refunded = books.refunded;
        }
        Ok(())
    }

    /// Never more let through than the credit there was, but for the [`Sim::allowance`].
    fn audit_credit(&mut self) -> Result<(), String> {
        // Time alone lowers the credit (expiries), so this is checked whatever the step did.
        // Credit given back for failed calls is not more credit: those calls are not counted.
        let credit = self.book.as_ref().map_or(Amount::ZERO, |b| credit_until(b, self.now)) - self.refunded;
        let allowance = self.allowance();
        let charged: u64 = self.nodes.iter().map(|n| n.charged(self.priced_by_response)).sum();
        let spent = price().times(charged).unwrap();
        self.stats.excess = self.stats.excess.max(spent - credit);
        if spent > credit + allowance {
            return Err(format!(
                "let through {} calls, {charged} charged ({spent}), with credit {credit} (allowance {allowance})",
                self.let_through()
            ));
        }
        Ok(())
    }

    /// What the auditor allows beyond the credit, each an event the nodes cannot see coming:
    /// - an expiry: calls let through before the instant that had not reached the ledger by then
    ///   (the network kept them; leases stop spending a reserve before their credit expires, so
    ///   without faults nothing is in flight then), at most what expired;
    /// - a void: what leases held of the voided grant (nodes spend it until their next sync);
    /// - an eviction: the calls the evicted entry had not had booked (its unsent calls and the
    ///   range in flight), which the node never reports, so the ledger's credit never pays them,
    ///   and those still running on credit its lease held, which are never booked.
    ///
    /// A call let through from a lease after its credit expired is never allowed for.
    fn allowance(&self) -> Amount {
        let Some(book) = &self.book else { return Amount::ZERO };
        let mut view = book.clone();
        view.try_advance(at(self.now)).unwrap();
        let expiries: Amount = self
            .expiries
            .iter()
            .filter_map(|(ms, unreported)| {
                let expired = view.grants().iter().find(|g| g.grant.expires_at == Some(at(*ms)))?.expired;
                Some(expired.min((*unreported)?))
            })
            .sum();
        let lost: u64 = self.nodes.iter().map(|n| n.lost_bound).sum();
        expiries + self.voided_held.iter().copied().sum::<Amount>() + price().times(lost).unwrap()
    }

    /// After the drain: never more let through than the credit, each call booked exactly once,
    /// nothing left held.
    pub fn audit_drained(&mut self) -> Result<(), String> {
        self.audit_booked_once()?;
        self.audit_credit()
    }

    /// After the drain: each call booked exactly once (but what evictions lost), nothing left
    /// held, the settled balance the credit less what was booked (below zero if it must be).
    pub fn audit_booked_once(&mut self) -> Result<(), String> {
        self.book = None;
        self.audit_records()?;
        let books: Books = self.ledger.books();
        let (mut booked_calls, mut numbered_calls, mut charged, mut lost_bound) = (0, 0, 0, 0);
        let mut refunds_lost = Amount::ZERO;
        for (n, node) in self.nodes.iter().enumerate() {
            // Each incarnation of the node's entry numbers its calls from 0 under its origin.
            let mine =
                |origin: &String| u64::from_str_radix(origin, 16).is_ok_and(|o| o >> ORIGIN_BLOCK_BITS == n as u64 + 1);
            let mut booked = 0;
            for (origin, ranges) in books.booked.iter().filter(|(o, _)| mine(o)) {
                let mut ranges = ranges.clone();
                ranges.sort();
                let mut next = 0;
                for (from, to) in &ranges {
                    if *from != next {
                        return Err(format!("{} booked ranges {ranges:?} of {origin}", node.id));
                    }
                    next = *to;
                }
                booked += next;
            }
            let numbered = node.numbered();
            let lost = numbered.checked_sub(booked);
            if lost.is_none_or(|lost| lost > node.lost_bound) {
                return Err(format!(
                    "{} numbered {numbered} calls, booked {booked} (evictions lost at most {})",
                    node.id, node.lost_bound
                ));
            }
            booked_calls += booked;
            numbered_calls += numbered;
            charged += node.charged(self.priced_by_response);
            lost_bound += node.lost_bound;
            refunds_lost += price().times(node.refunds_at_risk).unwrap();
        }
        self.stats.lost = numbered_calls - booked_calls;
        self.stats.failed = self.nodes.iter().map(|n| n.failed).sum();
        self.stats.refunded = books.refunded;
        // The calls that cost their price paid it, each once: all but what evictions lost, and
        // beyond it only refunds an evicted entry took with it. Below it only refunds of calls
        // whose charge an evicted entry took with it: a refund goes back through the entry there
        // is then (`decision::refund`), so an eviction may cost the provider, never the customer.
        let paid = books.consumed - books.refunded;
        let (least, most) =
            (price().times(charged.saturating_sub(lost_bound)).unwrap(), price().times(charged).unwrap());
        if paid < least - refunds_lost || paid > most + refunds_lost {
            return Err(format!(
                "paid {paid} (consumed {}, refunded {}) for {charged} calls that cost their price \
                 (at least {least}, at most {most}, give or take {refunds_lost} of refunds at risk)",
                books.consumed, books.refunded
            ));
        }
        let b = books.book.try_balances(at(self.now), None).unwrap();
        let b = b.first().ok_or("no balance")?;
        if b.live != b.settled {
            return Err(format!("credit stranded: live {} settled {}", b.live, b.settled));
        }
        let credit = credit_until(&books.book, self.now);
        if b.settled != credit - books.consumed {
            return Err(format!("settled {} != credit {credit} - consumed {}", b.settled, books.consumed));
        }
        Ok(())
    }
}

/// Credit that could be spent by `now_ms`: what became effective, less what expired unused.
pub fn credit_until(book: &Book, now_ms: u64) -> Amount {
    let mut view = book.clone();
    view.try_advance(at(now_ms)).unwrap();
    view.grants().iter().filter(|g| g.funded).map(|g| g.grant.amount - g.expired - g.voided).sum()
}
