//! One simulated worker of a gateway node: the filter's own [`Worker`] and [`Call`]s, run through
//! a [`FakeEngine`] (which enforces the engine's rules) exactly as the proxy-wasm adapter runs
//! them. Every call the simulator makes into the filter is here.

use std::collections::BTreeMap;
use std::rc::Rc;

use credits::sync::{SyncRequest, SyncResponse};

use crate::call::{Call, Flow, Request};
use crate::config::{ConfigError, FilterConfig};
use crate::customer::{entry_key, CustomerEntry};
use crate::engine::fake::{Dispatched, FakeEngine};
use crate::engine::{ContextId, LedgerAnswer, Metric, Phase, Rules, Token};
use crate::shared::{self, fake::FakeShared};
use crate::worker::Worker;

/// The root context's id: the tick's dispatches come from it.
pub const ROOT: ContextId = 0;

/// A request naming `subject` (the simulator's calls carry nothing else).
struct Subject<'a>(&'a str);

impl Request for Subject<'_> {
    fn header(&self, name: &str) -> Option<String> {
        (name == "x-consumer-username").then(|| self.0.to_owned())
    }

    fn id(&self) -> Option<String> {
        None
    }
}

/// The upstream's response: its status, and the one unit a call priced by its response uses.
struct Response(u16);

impl Request for Response {
    fn header(&self, name: &str) -> Option<String> {
        match name {
            ":status" => Some(self.0.to_string()),
            "x-calls" => Some("1".to_owned()),
            _ => None,
        }
    }

    fn id(&self) -> Option<String> {
        None
    }
}

/// The simulator's configuration, which is valid.
fn valid(config: &Rc<Result<FilterConfig, ConfigError>>) -> &FilterConfig {
    match &**config {
        Ok(c) => c,
        Err(e) => unreachable!("the simulator's configuration is valid: {e}"),
    }
}

/// A request the worker sent: to route to the ledger, and its answer back to `context`.
#[derive(Clone, Debug)]
pub struct Sent {
    pub token: Token,
    pub context: ContextId,
    pub request: SyncRequest,
}

/// How the calls decided in one step went.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Decided {
    pub allowed: u64,
    pub refused: u64,
    pub unavailable: u64,
    pub unknown: u64,
    /// Of those let through, the ones the upstream answered with an error at once.
    pub failed: u64,
}

/// What the upstream answers a call let through: its status, and whether at once (within the
/// step that let it through) or only when the simulator next lets time pass.
pub type Upstream = dyn Fn(u64) -> (u16, bool);

pub struct SimWorker {
    pub worker: Worker,
    pub engine: FakeEngine,
    config: Rc<Result<FilterConfig, ConfigError>>,
    /// Calls that wait for the ledger.
    calls: BTreeMap<ContextId, Call>,
    /// Calls let through that wait for the upstream's response, with its status.
    upstream: Vec<(Call, u16)>,
    /// How the upstream answers call `n` of this instance (see [`Upstream`]).
    answers: Rc<Upstream>,
    next_context: ContextId,
    /// See [`SimWorker::dropped`].
    dropped: u64,
}

impl SimWorker {
    pub fn new(
        rules: Rules,
        store: Rc<FakeShared>,
        config: &FilterConfig,
        id: u64,
        now_ms: u64,
        answers: Rc<Upstream>,
    ) -> SimWorker {
        let mut engine = FakeEngine::with_store(rules, store);
        engine.now_ms = now_ms;
        engine.enter(ROOT, Phase::Configure);
        let mut worker = Worker::start(&engine, id);
        worker.reconfigure(config);
        let config = Rc::new(Ok(config.clone()));
        SimWorker {
            worker,
            engine,
            config,
            calls: BTreeMap::new(),
            upstream: Vec::new(),
            answers,
            next_context: 1,
            dropped: 0,
        }
    }

    fn config(&self) -> &FilterConfig {
        valid(&self.config)
    }

    /// A call of `subject` arrives; what was decided, and what was sent.
    pub fn call(&mut self, subject: &str, now_ms: u64) -> (Decided, Vec<Sent>) {
        let id = self.next_context;
        self.next_context += 1;
        self.engine.now_ms = now_ms;
        self.engine.enter(id, Phase::RequestHeaders);
        let mut call = Call::new(id);
        let config = Rc::clone(&self.config);
        let flow = call.on_request_headers(&mut self.worker, &mut self.engine, &config, &Subject(subject), true);
        if flow == Flow::Continue {
            let failed = self.go_upstream(call);
            return (Decided { allowed: 1, failed, ..Decided::default() }, self.sent());
        }
        self.calls.insert(id, call);
        self.outcomes()
    }

    /// The calls waiting for the upstream get their responses; how many failed.
    pub fn respond(&mut self, now_ms: u64) -> u64 {
        self.engine.now_ms = now_ms;
        let mut failed = 0;
        for (call, status) in std::mem::take(&mut self.upstream) {
            failed += u64::from(status >= 400);
            self.complete(call, status);
        }
        failed
    }

    /// What the worker dispatched since last asked (completions dispatch nothing; this is for
    /// the simulator's bookkeeping after [`SimWorker::respond`]).
    pub fn sent_since(&mut self) -> Vec<Sent> {
        self.sent()
    }

    /// Calls let through still waiting for the upstream.
    pub fn upstream_calls(&self) -> u64 {
        self.upstream.len() as u64
    }

    /// The tick of the worker's root context: what it decided of the calls whose reads it gave
    /// up on (`Worker::expire_reads`), and what it sent.
    pub fn tick(&mut self, now_ms: u64) -> (Decided, Vec<Sent>) {
        self.engine.now_ms = now_ms;
        self.engine.enter(ROOT, Phase::Tick);
        let config = Rc::clone(&self.config);
        if let Ok(config) = &*config {
            self.worker.on_tick(&mut self.engine, config);
        }
        self.outcomes()
    }

    /// The answer to `sent` (`None`: the engine reports a failure, e.g. its timeout).
    pub fn answer(&mut self, sent: &Sent, response: Option<&SyncResponse>, now_ms: u64) -> (Decided, Vec<Sent>) {
        self.engine.now_ms = now_ms;
        self.engine.enter(sent.context, Phase::CallResponse);
        let answer =
            LedgerAnswer { status: response.map(|_| 200), body: response.and_then(|r| serde_json::to_vec(r).ok()) };
        let config = Rc::clone(&self.config);
        let Ok(config) = &*config else { return (Decided::default(), Vec::new()) };
        if sent.context == ROOT {
            self.worker.on_sync_answer(&mut self.engine, config, sent.token, &answer);
            return (Decided::default(), self.sent());
        }
        // A call that went away gets no answer (engines drop it).
        if let Some(call) = self.calls.get_mut(&sent.context) {
            call.on_ledger_answer(&mut self.worker, &mut self.engine, config, sent.token, &answer);
        }
        self.outcomes()
    }

    /// Calls the engine was told to resume or answer: let through (then completed) or answered.
    fn outcomes(&mut self) -> (Decided, Vec<Sent>) {
        let mut decided = Decided::default();
        for (id, problem) in std::mem::take(&mut self.engine.replies) {
            match problem.status {
                402 => decided.refused += 1,
                403 => decided.unknown += 1,
                _ => decided.unavailable += 1,
            }
            if let Some(mut call) = self.calls.remove(&id) {
                let config = Rc::clone(&self.config);
                self.engine.enter(id, Phase::Log);
                call.on_log(&mut self.worker, &mut self.engine, valid(&config));
            }
        }
        for id in std::mem::take(&mut self.engine.resumed).into_keys() {
            if let Some(call) = self.calls.remove(&id) {
                decided.allowed += 1;
                decided.failed += self.go_upstream(call);
            }
        }
        (decided, self.sent())
    }

    /// A call let through: answered at once, or kept until the simulator lets time pass. `1` if
    /// it failed at once.
    fn go_upstream(&mut self, call: Call) -> u64 {
        let (status, at_once) = (self.answers)(self.worker.id << 32 | u64::from(call.id));
        if !at_once {
            self.upstream.push((call, status));
            return 0;
        }
        self.complete(call, status);
        u64::from(status >= 400)
    }

    /// The upstream answers `status` and the call completes at what that makes it cost.
    fn complete(&mut self, mut call: Call, status: u16) {
        let config = Rc::clone(&self.config);
        let config = valid(&config);
        // A completion counts `records_dropped` for its call alone (a sync's answer counts the
        // calls of ranges the ledger refused, numbered already): the difference is this call's.
        self.worker.flush_counters(&mut self.engine);
        let before = self.engine.metric(Metric::RecordsDropped);
        self.engine.enter(call.id, Phase::ResponseHeaders);
        call.on_response_headers(&mut self.worker, &mut self.engine, config, &Response(status), true);
        self.engine.enter(call.id, Phase::Log);
        call.on_log(&mut self.worker, &mut self.engine, config);
        self.worker.flush_counters(&mut self.engine);
        self.dropped += self.engine.metric(Metric::RecordsDropped) - before;
    }

    /// Calls of this worker instance whose usage went unrecorded: they ran on credit held in a
    /// lease of an entry the host evicted meanwhile (`decision::complete_in_scope`).
    pub fn dropped(&self) -> u64 {
        self.dropped
    }

    /// What the worker dispatched since last asked.
    fn sent(&mut self) -> Vec<Sent> {
        std::mem::take(&mut self.engine.dispatched)
            .into_iter()
            .filter_map(|Dispatched { token, context, body, .. }| {
                let request = serde_json::from_slice(&body).ok()?;
                Some(Sent { token, context, request })
            })
            .collect()
    }

    /// The node's shared entry of a customer.
    pub fn entry(&self, subject: &str) -> Option<CustomerEntry> {
        entry_of(&self.engine, self.config(), subject)
    }

    /// Calls of `subject` this node numbered (let through and recorded).
    pub fn calls_recorded(&self, subject: &str) -> u64 {
        self.entry(subject).map_or(0, |e| e.next_call)
    }

    /// Host calls the engine would have refused or trapped on.
    pub fn violations(&self) -> &[String] {
        &self.engine.violations
    }
}

/// A customer's shared entry in the first scope of `config`.
pub fn entry_of(engine: &FakeEngine, config: &FilterConfig, subject: &str) -> Option<CustomerEntry> {
    shared::read::<CustomerEntry>(&*engine.store, &entry_key(config, &config.pricing.scopes[0], subject))
}
