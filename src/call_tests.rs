//! The waiting-call rules, each run through a fake engine under Envoy's and ngx_wasm_module's
//! rules against the credit model's ledger. A host call an engine would refuse or trap on fails
//! the test (see `engine::fake`).

use std::cell::Cell;
use std::collections::BTreeMap;
use std::rc::Rc;

use super::*;
use crate::decision::LedgerAccess;
use crate::engine::fake::FakeEngine;
use crate::engine::{Phase, Rules};
use crate::simulation::backend::{at, GrantPlan, Ledger};
use crate::simulation::model_ledger::ModelLedger;
use crate::waiting::MAX_READS_PER_CALL;

const SUBJECT: &str = "alice";

fn amt(text: &str) -> Amount {
    Amount::parse(text).unwrap()
}

struct Named(&'static str);

impl Request for Named {
    fn header(&self, name: &str) -> Option<String> {
        (name == "x-consumer-username").then(|| self.0.to_owned())
    }

    fn id(&self) -> Option<String> {
        Some("req-1".into())
    }
}

struct Status(u16);

impl Request for Status {
    fn header(&self, name: &str) -> Option<String> {
        (name == ":status").then(|| self.0.to_string())
    }

    fn id(&self) -> Option<String> {
        None
    }
}

/// One worker of a gateway, the ledger behind it, and its calls.
struct Gateway {
    engine: FakeEngine,
    worker: Worker,
    config: Rc<Result<FilterConfig, ConfigError>>,
    ledger: ModelLedger,
    calls: BTreeMap<ContextId, Call>,
    next: ContextId,
}

/// The response headers a completion sets, as the adapter sets them.
fn headers_of(charged: Option<Charged>, config: &FilterConfig) -> Vec<(String, String)> {
    let headers = charged.iter().flat_map(|c| c.headers(&config.response_headers));
    headers.map(|(name, value)| (name.to_owned(), value.as_str().to_owned())).collect()
}

/// Pricing that a call's response decides (units from a response header, estimated at one, 0.10
/// each): a call holds its estimate until it completes.
const PRICED_BY_RESPONSE: &str = r#", "price": "0", "pricing": {"units": [{"name": "n", "unit_price": "0.10",
    "source": {"response_header": "x-units"}, "estimate": {"units": "1"}}]}"#;

/// Leases of one call: a burst needs more than one top-up.
const LEASE_OF_ONE_CALL: &str = r#", "lease": {"min_calls": 1, "max_calls": 1}"#;

/// A configuration at 0.10 a call, the members of `extra` (`, "name": value…`) set over it.
fn config(extra: &str) -> FilterConfig {
    let mut json = serde_json::json!({"ledger": {"upstream": "ledger", "token": "t", "timeout_ms": 500}, "price": "0.10", "currency": "USD"});
    let extra: serde_json::Map<String, serde_json::Value> =
        serde_json::from_str(&format!("{{{}}}", extra.trim_start().trim_start_matches(','))).unwrap();
    json.as_object_mut().unwrap().extend(extra);
    FilterConfig::parse(json.to_string().as_bytes()).unwrap()
}

impl Gateway {
    /// A worker under `rules` whose customer has credit for `calls` calls of 0.10.
    fn new(rules: Rules, config: FilterConfig, calls: u64) -> Gateway {
        let mut engine = FakeEngine::new(rules);
        engine.enter(0, Phase::Configure);
        let mut worker = Worker::start(&engine, 7);
        worker.reconfigure(&config);
        let grants: Vec<GrantPlan> = (calls > 0)
            .then_some(GrantPlan { calls, priority: 1, effective_ms: 0, expires_after_ms: None })
            .into_iter()
            .collect();
        // Credit for `calls` calls at 0.10, whatever the configuration prices them at.
        let ledger = ModelLedger::new(SUBJECT, amt("0.10"), &grants, at(0));
        Gateway { engine, worker, config: Rc::new(Ok(config)), ledger, calls: BTreeMap::new(), next: 1 }
    }

    /// An Envoy worker whose customer (credit for 100 calls) has made one call: its lease is warm.
    /// Its calls are priced by their response, so each one's completion writes its usage.
    fn warm() -> Gateway {
        let mut g = Gateway::new(Rules::Envoy, config(PRICED_BY_RESPONSE), 100);
        let (first, _) = g.start();
        g.answer_all();
        g.finish(first, 200);
        g
    }

    /// A worker under `rules` with leases of one call (credit for 100) whose customer made one
    /// call: its lease is open and spent, so its next call waits for a top-up.
    fn spent_lease_of_one_call(rules: Rules) -> Gateway {
        Gateway::spent_lease_of_one_call_and(rules, "")
    }

    /// The same with `extra` configuration.
    fn spent_lease_of_one_call_and(rules: Rules, extra: &str) -> Gateway {
        let mut g = Gateway::new(rules, config(&format!("{LEASE_OF_ONE_CALL}{extra}")), 100);
        let (warm, _) = g.start();
        g.answer_all();
        g.finish(warm, 200);
        g
    }

    /// On a spent lease of one call (Kong's rules), call `a` waits; its first read (the whole
    /// timeout) is answered `after_ms` into its wait with nothing set aside, so `a` waits for a
    /// chained read: `a`, when it began to wait, and that read's token.
    fn chained_read(&mut self, after_ms: u64) -> (ContextId, u64, Token) {
        let began = self.engine.now_ms;
        let (a, flow) = self.start();
        assert_eq!(flow, Flow::Pause);
        let [(first, _)] = self.pending()[..] else { panic!("{:?}", self.pending()) };
        assert_eq!(self.engine.dispatched[0].timeout_ms, 500, "a first read: the whole timeout");
        self.engine.now_ms = began + after_ms;
        self.answer_stale(first);
        let [(second, _)] = self.pending()[..] else { panic!("{:?}", self.pending()) };
        (a, began, second)
    }

    fn cfg(&self) -> Rc<Result<FilterConfig, ConfigError>> {
        Rc::clone(&self.config)
    }

    /// A call's request headers.
    fn start(&mut self) -> (ContextId, Flow) {
        self.start_with(&Named(SUBJECT))
    }

    /// The request headers of a call that reads its headers from `request`.
    fn start_with(&mut self, request: &dyn Request) -> (ContextId, Flow) {
        let id = self.next;
        self.next += 1;
        self.engine.enter(id, Phase::RequestHeaders);
        let mut call = Call::new(id);
        let config = self.cfg();
        let flow = call.on_request_headers(&mut self.worker, &mut self.engine, &config, request, true);
        self.calls.insert(id, call);
        (id, flow)
    }

    /// The dispatches not answered yet, oldest first: (token, context).
    fn pending(&self) -> Vec<(Token, ContextId)> {
        self.engine.dispatched.iter().map(|d| (d.token, d.context)).collect()
    }

    /// Serves dispatch `token` at the ledger and hands its answer to the context that made it.
    fn answer(&mut self, token: Token) {
        let i = self.engine.dispatched.iter().position(|d| d.token == token).unwrap();
        let d = self.engine.dispatched.remove(i);
        let request = serde_json::from_slice(&d.body).unwrap();
        let response = self.ledger.serve(&request, at(self.engine.now_ms)).unwrap();
        let answer = LedgerAnswer { status: Some(200), body: Some(serde_json::to_vec(&response).unwrap()) };
        self.deliver(d.context, token, &answer);
    }

    /// Serves dispatch `token` at the ledger but hands its context an answer older than what the
    /// node knows (revision 0), which sets nothing aside: the node ignores it.
    fn answer_stale(&mut self, token: Token) {
        let i = self.engine.dispatched.iter().position(|d| d.token == token).unwrap();
        let d = self.engine.dispatched.remove(i);
        let request = serde_json::from_slice(&d.body).unwrap();
        let mut answer = serde_json::to_value(self.ledger.serve(&request, at(self.engine.now_ms)).unwrap()).unwrap();
        for subject in answer["subjects"].as_array_mut().unwrap() {
            subject["revision"] = 0.into();
        }
        let answer = LedgerAnswer { status: Some(200), body: Some(serde_json::to_vec(&answer).unwrap()) };
        self.deliver(d.context, token, &answer);
    }

    /// Serves every dispatch not answered yet.
    fn answer_all(&mut self) {
        for (token, _) in self.pending() {
            self.answer(token);
        }
    }

    /// `rounds` ticks a second apart, each sync answered: whatever the worker holds for the
    /// ledger reaches it.
    fn sync_rounds(&mut self, rounds: u32) {
        for _ in 0..rounds {
            self.engine.now_ms += 1_000;
            self.tick();
            self.answer_all();
        }
    }

    /// The engine fails dispatch `token` at its timeout, the clock where the engine's rules put
    /// it then (`Dispatched::timed_out_at_ms`).
    fn time_out(&mut self, token: Token) {
        let d = self.engine.dispatched.iter().find(|d| d.token == token).unwrap();
        self.engine.now_ms = d.timed_out_at_ms(self.engine.rules) - self.engine.drift_ms.get();
        self.fail(token);
    }

    /// The engine reports that dispatch `token` failed (its timeout, a reset).
    fn fail(&mut self, token: Token) {
        let i = self.engine.dispatched.iter().position(|d| d.token == token).unwrap();
        let d = self.engine.dispatched.remove(i);
        self.deliver(d.context, token, &LedgerAnswer::default());
    }

    fn deliver(&mut self, context: ContextId, token: Token, answer: &LedgerAnswer) {
        self.engine.enter(context, Phase::CallResponse);
        let config = self.cfg();
        let config = config.as_ref().as_ref().unwrap();
        if context == 0 {
            self.worker.on_sync_answer(&mut self.engine, config, token, answer);
        } else if let Some(call) = self.calls.get_mut(&context) {
            call.on_ledger_answer(&mut self.worker, &mut self.engine, config, token, answer);
        }
    }

    /// The rest of call `id`'s life: an upstream answer (`status`) if it was let through, and its log.
    fn finish(&mut self, id: ContextId, status: u16) -> Vec<(String, String)> {
        let status = if self.engine.replies.contains_key(&id) { self.engine.replies[&id].status } else { status };
        self.finish_with(id, &Status(status), None)
    }

    /// The rest of call `id`'s life: `response`'s headers, then `body` in one piece if given, and
    /// its log. The headers its response headers got.
    fn finish_with(&mut self, id: ContextId, response: &dyn Request, body: Option<&[u8]>) -> Vec<(String, String)> {
        let config = self.cfg();
        let config = config.as_ref().as_ref().unwrap();
        let mut call = self.calls.remove(&id).unwrap();
        self.engine.enter(id, Phase::ResponseHeaders);
        let charged = call.on_response_headers(&mut self.worker, &mut self.engine, config, response, body.is_none());
        if body.is_some() {
            self.engine.enter(id, Phase::ResponseBody);
            call.on_response_body(&mut self.worker, &mut self.engine, config, body, true);
        }
        self.engine.enter(id, Phase::Log);
        call.on_log(&mut self.worker, &mut self.engine, config);
        headers_of(charged, config)
    }

    /// Call `id`'s client went away before its response: only its log callback runs.
    fn gone(&mut self, id: ContextId) {
        let config = self.cfg();
        let mut call = self.calls.remove(&id).unwrap();
        self.engine.enter(id, Phase::Log);
        call.on_log(&mut self.worker, &mut self.engine, config.as_ref().as_ref().unwrap());
    }

    fn tick(&mut self) {
        self.engine.enter(0, Phase::Tick);
        let config = self.cfg();
        self.worker.on_tick(&mut self.engine, config.as_ref().as_ref().unwrap());
    }

    fn status(&self, id: ContextId) -> Option<u16> {
        self.engine.replies.get(&id).map(|p| p.status)
    }

    fn resumed(&self, id: ContextId) -> u32 {
        self.engine.resumed.get(&id).copied().unwrap_or(0)
    }

    fn no_violations(&self) {
        assert!(self.engine.violations.is_empty(), "{:?}", self.engine.violations);
    }
}

#[test]
fn a_cold_call_waits_for_its_read_and_is_resumed_from_its_own_callback() {
    for rules in [Rules::Envoy, Rules::Nginx] {
        let mut g = Gateway::new(rules, config(r#", "sync": {"strategy": "cached"}"#), 10);
        let (id, flow) = g.start();
        assert_eq!(flow, Flow::Pause, "{rules:?}");
        let [(token, from)] = g.pending()[..] else { panic!("one read: {:?}", g.pending()) };
        assert_eq!(from, id, "dispatched from the call's own callback");
        g.answer(token);
        assert_eq!((g.resumed(id), g.status(id)), (1, None), "{rules:?}");
        let headers = g.finish(id, 200);
        assert!(headers.contains(&("x-credits-balance".into(), "0.90".into())), "{headers:?}");
        g.no_violations();
    }
}

#[test]
fn under_nginx_concurrent_cold_calls_each_read_for_themselves() {
    let mut g = Gateway::new(Rules::Nginx, config(r#", "sync": {"strategy": "cached"}"#), 10);
    let (a, _) = g.start();
    let (b, _) = g.start();
    let reads = g.pending();
    assert_eq!(reads.iter().map(|(_, c)| *c).collect::<Vec<_>>(), [a, b], "each call owns its read");
    // The second answer first: each resumes only its own call.
    g.answer(reads[1].0);
    assert_eq!((g.resumed(a), g.resumed(b)), (0, 1));
    g.answer(reads[0].0);
    assert_eq!((g.resumed(a), g.resumed(b)), (1, 1));
    g.no_violations();
}

/// Found on Kong's engine: 64 connections at a cold node, each call reading for itself with a
/// top-up sized for one call; the calls that arrived meanwhile took each top-up, and some calls
/// gave up after three reads (503) though the customer had ample credit.
#[test]
fn under_nginx_a_read_sets_aside_enough_for_every_call_of_the_customer_waiting() {
    let mut g = Gateway::new(Rules::Nginx, config(LEASE_OF_ONE_CALL), 100);
    let ids: Vec<ContextId> = (0..3).map(|_| g.start().0).collect();
    let wants: Vec<Amount> = g
        .engine
        .dispatched
        .iter()
        .map(|d| {
            let request: credits::sync::SyncRequest = serde_json::from_slice(&d.body).unwrap();
            request.subjects[0].lease.as_ref().unwrap().want
        })
        .collect();
    let price = g.config.as_ref().as_ref().unwrap().price;
    let calls = |n: u64| price.times(n).unwrap();
    assert_eq!(wants, [calls(1), calls(2), calls(3)], "each read asks for the calls waiting when it leaves");
    g.answer_all();
    for id in &ids {
        assert_eq!((g.resumed(*id), g.status(*id)), (1, None));
    }
    g.no_violations();
}

#[test]
fn under_envoy_concurrent_cold_calls_share_one_read() {
    let mut g = Gateway::new(Rules::Envoy, config(r#", "sync": {"strategy": "cached"}"#), 10);
    let (a, _) = g.start();
    let (b, _) = g.start();
    let (c, _) = g.start();
    let [(token, owner)] = g.pending()[..] else { panic!("one shared read: {:?}", g.pending()) };
    assert_eq!(owner, a);
    g.answer(token);
    assert_eq!([g.resumed(a), g.resumed(b), g.resumed(c)], [1, 1, 1]);
    g.no_violations();
}

#[test]
fn a_refused_call_is_answered_once_and_never_resumed() {
    for rules in [Rules::Envoy, Rules::Nginx] {
        let mut g = Gateway::new(rules, config(r#", "sync": {"strategy": "cached"}"#), 0);
        let (a, _) = g.start();
        let (b, _) = g.start();
        g.answer_all();
        for id in [a, b] {
            assert_eq!((g.status(id), g.resumed(id)), (Some(402), 0), "{rules:?}");
            g.finish(id, 402);
        }
        g.no_violations();
        assert!(g.worker.waiting.is_empty(), "nothing left waiting");
    }
}

#[test]
fn a_failed_read_decides_the_call_by_the_failure_mode() {
    for (rules, mode, status) in [(Rules::Nginx, "deny", Some(503)), (Rules::Envoy, "allow", None)] {
        let extra = format!(r#", "failure_mode": "{mode}", "sync": {{"strategy": "cached"}}"#);
        let mut g = Gateway::new(rules, config(&extra), 10);
        let (id, _) = g.start();
        let [(token, _)] = g.pending()[..] else { panic!() };
        g.fail(token);
        assert_eq!(g.status(id), status, "{mode}");
        assert_eq!(g.resumed(id), u32::from(status.is_none()));
        g.finish(id, 200);
        g.no_violations();
    }
}

#[test]
fn a_read_that_cannot_be_dispatched_decides_the_call_at_once() {
    let mut g = Gateway::new(Rules::Nginx, config(r#", "sync": {"strategy": "cached"}"#), 10);
    g.engine.refuse_dispatches = true;
    let (id, flow) = g.start();
    assert_eq!((flow, g.status(id)), (Flow::Pause, Some(503)));
    g.finish(id, 503);
    g.no_violations();
}

#[test]
fn a_burst_that_outruns_its_top_up_waits_for_another() {
    // Lease of at least 2 calls: three calls at once need more than the first top-up sets aside.
    let mut g = Gateway::new(Rules::Envoy, config(LEASE_OF_ONE_CALL), 100);
    let ids: Vec<ContextId> = (0..3).map(|_| g.start().0).collect();
    let mut reads = 0;
    while let Some((token, _)) = g.pending().first().copied() {
        g.answer(token);
        reads += 1;
        assert!(reads <= 3, "each read sets aside enough for the calls waiting when it left");
    }
    for id in &ids {
        assert_eq!((g.resumed(*id), g.status(*id)), (1, None), "the ledger had credit for every call");
    }
    g.no_violations();
}

/// A burst at a cold node: its customer's rate is measured once per `sync.interval_ms`, so until
/// the first window ended every top-up was sized for the calls waiting at that moment, and the
/// node asked the ledger every few milliseconds (seen at 64 connections: a read every ~10 ms per
/// worker for the first second). Top-ups are sized for the rate so far once that is the higher.
#[test]
fn a_burst_at_a_cold_node_is_topped_up_for_its_rate_before_the_first_window_ends() {
    for rules in [Rules::Envoy, Rules::Nginx] {
        let mut g = Gateway::new(rules, config(""), 100_000);
        let mut reads_after_100_ms = 0;
        // A call every millisecond for 300 ms (the window is 1,000); the ledger answers each
        // read 2 ms after it went out, and a call let through completes at once.
        for ms in 0..300 {
            let (id, flow) = g.start();
            if flow == Flow::Continue {
                g.finish(id, 200);
            }
            if ms % 2 == 1 {
                let reads: Vec<(Token, ContextId)> = g.pending();
                if ms > 100 {
                    reads_after_100_ms += reads.len();
                }
                for (token, _) in reads {
                    g.answer(token);
                }
                let resumed: Vec<ContextId> = g.calls.keys().copied().filter(|id| g.resumed(*id) == 1).collect();
                for id in resumed {
                    g.finish(id, 200);
                }
            }
            g.engine.now_ms += 1;
        }
        assert!(reads_after_100_ms <= 2, "{rules:?}: {reads_after_100_ms} reads in the burst's last 200 ms");
        g.no_violations();
    }
}

/// Found on Envoy under 64 connections at a cold node: calls that arrived while a read was in
/// flight joined it and took its top-up, the read's owner (decided last) waited again, and after
/// three reads it was refused with 503 though the ledger answered each read at once with credit
/// to spare. A call waits while the ledger answers within its timeout, however many reads.
#[test]
fn a_call_outrun_read_after_read_waits_while_the_ledger_answers_in_time() {
    for rules in [Rules::Envoy, Rules::Nginx] {
        let mut g = Gateway::new(rules, config(LEASE_OF_ONE_CALL), 1_000);
        let mut calls = vec![g.start()];
        let mut finished = Vec::new();
        for round in 0..8 {
            // Six calls arrive while the reads are in flight (none after the sixth round)...
            if round < 6 {
                calls.extend((0..6).map(|_| g.start()));
            }
            g.engine.now_ms += 10;
            g.answer_all();
            // ...and the calls let through go on and complete.
            for (id, flow) in &calls {
                let let_through = *flow == Flow::Continue || g.resumed(*id) == 1;
                if let_through && !finished.contains(id) {
                    g.finish(*id, 200);
                    finished.push(*id);
                }
            }
        }
        for (id, _) in &calls {
            assert!(finished.contains(id), "{rules:?}: call {id} of {calls:?}: {:?}", g.status(*id));
        }
        g.no_violations();
    }
}

/// A call the ledger does not set credit aside for within `ledger.timeout_ms` (500 here) of when
/// it began to wait is answered 503, however many reads it waited for.
#[test]
fn a_call_waits_for_credit_no_longer_than_the_ledgers_timeout() {
    let mut g = Gateway::new(Rules::Envoy, config(LEASE_OF_ONE_CALL), 100_000);
    let (first, _) = g.start();
    let mut waited = 0;
    let mut arriving = 4;
    while g.status(first).is_none() && g.resumed(first) == 0 {
        // Ever more calls arrive while each read is in flight: they are decided before the read's
        // owner, and take what it set aside.
        for _ in 0..arriving {
            g.start();
        }
        arriving *= 2;
        g.engine.now_ms += 100;
        waited += 100;
        g.answer_all();
        assert!(waited <= 600, "still waiting after {waited} ms");
    }
    assert_eq!((g.status(first), waited), (Some(503), 500), "answered once the ledger's timeout passed");
    g.no_violations();
}

/// A ledger that answers at once but never with a lease the node can use (here: answers older
/// than what the node knows, which it ignores) is not asked again and again while the clock
/// stands still: the call is refused after `MAX_READS_PER_CALL` reads.
#[test]
fn a_call_waits_for_a_bounded_number_of_reads_that_set_nothing_aside() {
    for rules in [Rules::Envoy, Rules::Nginx] {
        let mut g = Gateway::spent_lease_of_one_call(rules);
        let (id, flow) = g.start();
        assert_eq!(flow, Flow::Pause, "{rules:?}: the lease of one call is spent");
        let mut reads = 0;
        while let Some(&(token, _)) = g.pending().last() {
            reads += 1;
            assert!(reads <= MAX_READS_PER_CALL, "{rules:?}: still reading after {reads} reads");
            g.answer_stale(token);
        }
        assert_eq!((reads, g.status(id)), (MAX_READS_PER_CALL, Some(503)), "{rules:?}");
        g.no_violations();
    }
}

#[test]
fn when_the_owner_of_a_shared_read_goes_away_its_calls_are_decided_at_the_deadline() {
    let mut g = Gateway::new(Rules::Envoy, config(r#", "sync": {"strategy": "cached"}"#), 10);
    let (a, _) = g.start();
    let (b, _) = g.start();
    let [(token, owner)] = g.pending()[..] else { panic!() };
    assert_eq!(owner, a);
    g.gone(a); // its client went away: Envoy drops the answer
    g.engine.dispatched.retain(|d| d.token != token);
    g.engine.now_ms += 500 + 101;
    g.tick();
    assert_eq!(g.status(b), Some(503), "decided as if the ledger were unreachable (deny)");
    g.no_violations();
}

#[test]
fn an_answer_for_a_dispatch_the_worker_does_not_know_changes_nothing() {
    let mut g = Gateway::new(Rules::Nginx, config(r#", "sync": {"strategy": "cached"}"#), 10);
    let (id, _) = g.start();
    // A replaced instance's dispatch (another token) answered into this call's callback.
    g.deliver(id, 999, &LedgerAnswer { status: Some(200), body: Some(b"{}".to_vec()) });
    g.deliver(0, 998, &LedgerAnswer::default());
    assert_eq!((g.resumed(id), g.status(id)), (0, None), "still waiting for its own read");
    g.no_violations();
}

#[test]
fn a_call_the_engine_resumed_undecided_is_charged_and_counted() {
    let mut g = Gateway::new(Rules::Nginx, config(r#", "sync": {"strategy": "cached"}"#), 10);
    let (id, _) = g.start();
    // Kong 3.8 resumes a call whose dispatch failed without calling the filter back.
    g.engine.dispatched.clear();
    g.finish(id, 200);
    g.tick();
    assert_eq!(g.engine.metric(Metric::CallsResumedUndecided), 1);
    let entry = crate::simulation::filter::entry_of(&g.engine, g.config.as_ref().as_ref().unwrap(), SUBJECT);
    assert_eq!(entry.map(|e| e.next_call), Some(1), "its usage is recorded");
    g.no_violations();
}

#[test]
fn a_completion_that_loses_every_race_is_retried_by_the_tick() {
    // A call that holds its estimate records its usage at completion; a call charged when let
    // through and then failed gives its charge back at completion.
    for (pricing, status, after) in [(PRICED_BY_RESPONSE, 200, "0.10"), ("", 500, "0.00")] {
        let mut g = Gateway::new(Rules::Nginx, config(&format!(r#", "sync": {{"strategy": "cached"}}{pricing}"#)), 10);
        let (id, _) = g.start();
        let [(token, _)] = g.pending()[..] else { panic!() };
        g.answer(token);
        *g.engine.store.interfere.borrow_mut() = crate::shared::MAX_CAS_ATTEMPTS;
        g.finish(id, status);
        let config = g.cfg();
        let config = config.as_ref().as_ref().unwrap();
        // Unsent or in flight: the tick sends what it recorded.
        let spent = |g: &Gateway| {
            let e = crate::simulation::filter::entry_of(&g.engine, config, SUBJECT);
            e.map(|e| e.spent + e.flight.map_or(Amount::ZERO, |f| f.amount))
        };
        assert_ne!(spent(&g), Some(amt(after)), "not recorded yet ({pricing})");
        g.tick();
        assert_eq!(spent(&g), Some(amt(after)), "recorded by the retry ({pricing})");
        assert_eq!(g.engine.metric(Metric::SharedDataFailures), 1);
        g.no_violations();
    }
}

#[test]
fn a_warm_call_makes_no_dispatch_and_no_metric_host_call() {
    let mut g = Gateway::new(Rules::Envoy, config(r#", "sync": {"strategy": "cached"}"#), 10);
    let (first, _) = g.start();
    let [(token, _)] = g.pending()[..] else { panic!() };
    g.answer(token);
    g.finish(first, 200);
    let (id, flow) = g.start();
    assert_eq!((flow, g.pending().len()), (Flow::Continue, 0));
    g.finish(id, 200);
    assert!(g.engine.metrics.is_empty(), "counted in the worker until the tick");
    g.tick();
    assert_eq!((g.engine.metric(Metric::CallsAllowed), g.engine.metric(Metric::CacheHits)), (2, 1));
}

#[test]
fn an_invalid_configuration_answers_500_naming_the_field() {
    let mut g = Gateway::new(Rules::Nginx, config(""), 10);
    g.config = Rc::new(Err(crate::fields::error("price", "must not be negative")));
    let (id, flow) = g.start();
    assert_eq!((flow, g.status(id)), (Flow::Pause, Some(500)));
    assert_eq!(g.engine.replies[&id].body["field"], "price");
    g.no_violations();
}

/// A request naming `subject`.
struct Subject(String);

impl Request for Subject {
    fn header(&self, name: &str) -> Option<String> {
        (name == "x-consumer-username").then(|| self.0.clone())
    }

    fn id(&self) -> Option<String> {
        None
    }
}

#[test]
fn a_subject_longer_than_any_customer_can_have_is_refused_without_a_round_trip() {
    let mut g = Gateway::new(Rules::Nginx, config(r#", "sync": {"strategy": "cached"}"#), 10);
    let long = "x".repeat(credits::limits::MAX_SUBJECT_LEN + 1);
    g.engine.enter(1, Phase::RequestHeaders);
    let config = g.cfg();
    let flow = Call::new(1).on_request_headers(&mut g.worker, &mut g.engine, &config, &Subject(long), true);
    assert_eq!((flow, g.status(1), g.pending().len()), (Flow::Pause, Some(403), 0));
    g.no_violations();
}

#[test]
fn a_sync_the_ledger_refuses_as_too_large_goes_again_in_halves() {
    let extra = r#", "failure_mode": "allow", "sync": {"strategy": "cached"}"#;
    let mut g = Gateway::new(Rules::Envoy, config(extra), 10);
    g.engine.refuse_dispatches = true; // the ledger unreachable: calls recorded offline
    for (i, name) in ["a", "b", "c", "d"].into_iter().enumerate() {
        let id = 100 + i as u32;
        g.engine.enter(id, Phase::RequestHeaders);
        let config = g.cfg();
        let flow = Call::new(id).on_request_headers(&mut g.worker, &mut g.engine, &config, &Subject(name.into()), true);
        assert_eq!(flow, Flow::Continue);
    }
    g.engine.refuse_dispatches = false;
    let subjects = |g: &Gateway| -> usize {
        let body = &g.engine.dispatched.last().unwrap().body;
        serde_json::from_slice::<credits::sync::SyncRequest>(body).unwrap().subjects.len()
    };
    g.engine.now_ms += 2_000;
    g.tick();
    assert_eq!(subjects(&g), 4);
    let token = g.engine.dispatched.last().unwrap().token;
    g.deliver(0, token, &LedgerAnswer { status: Some(413), body: Some(b"{}".to_vec()) });
    g.engine.now_ms += 1_000;
    g.tick();
    assert_eq!(subjects(&g), 2, "half as many subjects");
    g.no_violations();
}

/// A request that counts what the filter reads of it (each read is a host call).
#[derive(Default)]
struct Counting {
    headers: Cell<u32>,
    ids: Cell<u32>,
}

impl Request for Counting {
    fn header(&self, name: &str) -> Option<String> {
        self.headers.set(self.headers.get() + 1);
        (name == "x-consumer-username").then(|| SUBJECT.to_owned())
    }

    fn id(&self) -> Option<String> {
        self.ids.set(self.ids.get() + 1);
        None
    }
}

/// Every host call crosses the Wasm boundary, which is the no-op filter's whole cost: a call
/// decided from a warm lease reads one request header, the clock once (at its request: its
/// completion takes the worker's recent time) and the customer's entry once (a get and a
/// compare-and-swap: charged as it is let through), and never its request id. A call whose
/// response decides its price reads and writes the entry once more, at completion.
#[test]
fn a_warm_call_makes_a_handful_of_host_calls() {
    for (pricing, at_completion) in [("", (0, 0, 0)), (PRICED_BY_RESPONSE, (0, 1, 1))] {
        warm_call_host_calls(pricing, at_completion);
    }
}

fn warm_call_host_calls(pricing: &str, at_completion: (u64, u64, u64)) {
    let mut g = Gateway::new(Rules::Envoy, config(pricing), 100);
    let (first, _) = g.start();
    g.answer_all();
    g.finish(first, 200);
    let host_calls = |g: &Gateway| (g.engine.clock_reads.get(), g.engine.store.gets.get(), g.engine.store.sets.get());
    let before = host_calls(&g);
    let (id, request) = (g.next, Counting::default());
    g.engine.enter(id, Phase::RequestHeaders);
    let mut call = Call::new(id);
    let config = g.cfg();
    assert_eq!(call.on_request_headers(&mut g.worker, &mut g.engine, &config, &request, true), Flow::Continue);
    let after_request = host_calls(&g);
    assert_eq!((request.headers.get(), request.ids.get()), (1, 0), "the subject only");
    assert_eq!(
        (after_request.0 - before.0, after_request.1 - before.1, after_request.2 - before.2),
        (1, 1, 1),
        "clock, get, compare-and-swap"
    );
    g.engine.enter(id, Phase::ResponseHeaders);
    let config = config.as_ref().as_ref().unwrap();
    let charged = call.on_response_headers(&mut g.worker, &mut g.engine, config, &Status(200), true);
    assert_eq!(headers_of(charged, config).len(), 2, "x-credits-cost and x-credits-balance");
    let after = host_calls(&g);
    let completion = (after.0 - after_request.0, after.1 - after_request.1, after.2 - after_request.2);
    assert_eq!(completion, at_completion, "{pricing}");
}

/// A call of a price its response can change only by making it free (a fixed price) is charged
/// when it is let through: its admission is a warm call's only shared-data update, and a
/// completion at that price reads and writes nothing. One that fails (an upstream error, no
/// response) gets its charge back: out of the calls not sent yet or, once they were sent, as
/// credit the next sync carries to the ledger. With `pricing.charge_errors` it keeps it. Either
/// way it shows the headers a call that held its price until its completion shows.
#[test]
fn a_call_of_a_known_price_is_charged_when_let_through_and_refunded_if_it_fails() {
    let host_calls = |g: &Gateway| (g.engine.store.gets.get(), g.engine.store.sets.get());
    let warm = |extra: &str| {
        let mut g = Gateway::new(Rules::Envoy, config(extra), 100);
        let (first, _) = g.start();
        g.answer_all();
        g.finish(first, 200);
        g
    };
    let entry = |g: &Gateway| {
        let config = g.cfg();
        crate::simulation::filter::entry_of(&g.engine, config.as_ref().as_ref().unwrap(), SUBJECT).unwrap()
    };
    let (mut held, mut charged) = (warm(PRICED_BY_RESPONSE), warm(""));
    for status in [200, 500, 200, 404] {
        let before = host_calls(&charged);
        let (id, flow) = charged.start();
        assert_eq!(flow, Flow::Continue);
        let admitted = host_calls(&charged);
        assert_eq!((admitted.0 - before.0, admitted.1 - before.1), (1, 1), "a get and a compare-and-swap");
        let headers = charged.finish(id, status);
        let completed = host_calls(&charged);
        let refund = u64::from(status != 200);
        assert_eq!((completed.0 - admitted.0, completed.1 - admitted.1), (refund, refund), "status {status}");
        let (other, _) = held.start();
        assert_eq!(headers, held.finish(other, status), "status {status}");
    }
    assert_eq!(entry(&charged).spent, amt("0.30"), "netted");

    // Let through before a sync, failed after it: its charge was booked, so it comes back with
    // the next sync. A call whose client went away before its response is refunded too.
    let (late, _) = charged.start();
    charged.sync_rounds(1);
    assert_eq!(entry(&charged).unsent_calls(), 0, "sent and booked");
    charged.finish(late, 502);
    assert_eq!(entry(&charged).spent, amt("-0.10"), "owed");
    let (gone, _) = charged.start();
    charged.gone(gone);
    charged.sync_rounds(2);
    assert_eq!(entry(&charged).spent, amt("0"));
    let books = charged.ledger.books();
    assert!(books.problems.is_empty(), "{:?}", books.problems);
    assert_eq!(books.consumed, amt("0.40"), "three calls that succeeded and the late one");
    let balance = books.book.try_balances(at(charged.engine.now_ms), None).unwrap()[0].settled;
    assert_eq!(balance, amt("9.70"), "the late one given back");
    charged.no_violations();

    // With `pricing.charge_errors` an error costs its price: its completion writes nothing.
    let mut errors_charged = warm(r#", "pricing": {"charge_errors": true}"#);
    let (id, _) = errors_charged.start();
    let admitted = host_calls(&errors_charged);
    let headers = errors_charged.finish(id, 500);
    assert_eq!(host_calls(&errors_charged), admitted, "no host call");
    assert_eq!(headers[0], ("x-credits-cost".to_owned(), "0.10".to_owned()), "{headers:?}");
    errors_charged.no_violations();
}

/// A completion reads no clock: it stamps the customer's last use with the time its worker last
/// read (a call's admission or a tick, so at most one tick behind), and a worker that read the
/// clock earlier than another never moves that last use back.
#[test]
fn a_completion_stamps_its_workers_recent_time() {
    let mut g = Gateway::warm();
    let last_used = |g: &Gateway| {
        let cfg = g.cfg();
        let cfg = cfg.as_ref().as_ref().unwrap();
        let key = crate::customer::entry_key(cfg, &cfg.pricing.scopes[0], SUBJECT);
        crate::shared::read::<crate::customer::CustomerEntry>(g.engine.shared(), &key).unwrap().last_used_ms
    };
    let (long, _) = g.start();
    let admitted = g.engine.now_ms;
    g.engine.now_ms += 3_000;
    g.tick();
    g.answer_all();
    g.engine.now_ms += 2_000;
    let reads = g.engine.clock_reads.get();
    g.finish(long, 200);
    assert_eq!(g.engine.clock_reads.get(), reads, "the completion read no clock");
    assert_eq!(last_used(&g), admitted + 3_000, "the tick's time, not the admission's");

    // Another worker of the node admits a call at +8 s, then this worker's call admitted at +6 s
    // completes with its older time.
    g.engine.now_ms += 1_000;
    let (mine, _) = g.start();
    let config = g.cfg();
    let mut other = Worker::start(&g.engine, 8);
    other.reconfigure(config.as_ref().as_ref().unwrap());
    g.engine.now_ms += 2_000;
    let theirs = g.next;
    g.next += 1;
    g.engine.enter(theirs, Phase::RequestHeaders);
    let mut call = Call::new(theirs);
    assert_eq!(call.on_request_headers(&mut other, &mut g.engine, &config, &Named(SUBJECT), true), Flow::Continue);
    assert_eq!(last_used(&g), admitted + 8_000);
    g.finish(mine, 200);
    assert_eq!(last_used(&g), admitted + 8_000, "never moved back");
    g.no_violations();
}

/// A response as the engine shows it: `:status` and the named headers.
struct Answered(Vec<(&'static str, &'static str)>);

impl Request for Answered {
    fn header(&self, name: &str) -> Option<String> {
        self.0.iter().find(|(k, _)| *k == name).map(|(_, v)| (*v).to_owned())
    }

    fn id(&self) -> Option<String> {
        None
    }
}

/// Units counted in a response header price the call when its headers arrive: the cost header
/// shows it at once, an unreadable or missing count charges the estimate, and the ledger books
/// exactly what the calls cost.
#[test]
fn units_counted_in_a_response_header_price_the_call_at_its_headers() {
    let rows = r#", "pricing": {"units": [{"name": "rows", "unit_price": "0.01", "source": {"response_header": "x-rows"}, "estimate": {"units": "5"}}]}"#;
    let mut g = Gateway::new(Rules::Envoy, config(rows), 100);
    let cases =
        [(Some("7"), "0.17"), (Some(" 12 "), "0.22"), (Some("-3"), "0.15"), (Some("lots"), "0.15"), (None, "0.15")];
    for (count, cost) in cases {
        let (id, _) = g.start();
        g.answer_all();
        let response = Answered([(":status", "200")].into_iter().chain(count.map(|c| ("x-rows", c))).collect());
        let headers = g.finish_with(id, &response, None);
        let shown = headers.iter().find(|(k, _)| k == "x-credits-cost").map(|(_, v)| v.as_str());
        assert_eq!(shown, Some(cost), "x-rows {count:?}");
    }
    g.sync_rounds(3);
    assert_eq!(g.ledger.books().consumed, Amount::parse("0.84").unwrap(), "0.17 + 0.22 + 3 × 0.15");
    g.no_violations();
}

/// `sync.max_unsent_calls` bounds what a node keeps for the ledger per customer. Beyond it, `deny`
/// answers 503 and `allow` lets the call through unrecorded, counted in `records_dropped`; the
/// calls recorded before are booked once the ledger takes them. Under both strategies.
#[test]
fn beyond_max_unsent_calls_the_failure_mode_decides_and_drops_are_counted() {
    for strategy in ["lease", "cached"] {
        for (mode, fourth) in [("allow", None), ("deny", Some(503))] {
            let extra =
                format!(r#", "failure_mode": "{mode}", "sync": {{"strategy": "{strategy}", "max_unsent_calls": 3}}"#);
            let mut g = Gateway::new(Rules::Envoy, config(&extra), 100);
            let mut statuses = Vec::new();
            for _ in 0..5 {
                let (id, _) = g.start();
                for (token, context) in g.pending() {
                    // Reads only: the sync that would report the calls waits for the tick.
                    assert_ne!(context, 0);
                    g.answer(token);
                }
                statuses.push(g.status(id));
                g.finish(id, 200);
            }
            let case = format!("{strategy}, {mode}");
            assert_eq!(statuses, [None, None, None, fourth, fourth], "{case}");
            g.tick();
            let dropped = if mode == "allow" { 2 } else { 0 };
            assert_eq!(g.engine.metric(Metric::RecordsDropped), dropped, "{case}");
            g.answer_all();
            g.sync_rounds(2);
            assert_eq!(g.ledger.books().consumed, Amount::parse("0.30").unwrap(), "{case}: the three recorded calls");
            g.no_violations();
        }
    }
}

/// A "no such customer" answer is remembered for `sync.unknown_ttl_ms`: the subject's calls are
/// refused with `subject.unknown_status` without a round trip until then, and ask again after.
/// `0` remembers nothing. Under both strategies and both engines' rules.
#[test]
fn a_no_such_customer_answer_is_remembered_for_unknown_ttl_ms() {
    for rules in [Rules::Envoy, Rules::Nginx] {
        for strategy in ["lease", "cached"] {
            for ttl_ms in [0, 5_000] {
                let extra = format!(
                    r#", "subject": {{"unknown_status": 404}}, "sync": {{"strategy": "{strategy}", "unknown_ttl_ms": {ttl_ms}}}"#
                );
                let mut g = Gateway::new(rules, config(&extra), 10);
                let case = format!("{rules:?}, {strategy}, ttl {ttl_ms}");
                // Each call of mallory: (reads dispatched, its status).
                let call = |g: &mut Gateway, after_ms: u64| {
                    g.engine.now_ms += after_ms;
                    let (id, flow) = g.start_with(&Subject("mallory".into()));
                    let reads = g.pending();
                    for (token, _) in &reads {
                        g.answer(*token);
                    }
                    assert_eq!(flow, Flow::Pause, "{case}");
                    (reads.len(), g.status(id))
                };
                assert_eq!(call(&mut g, 0), (1, Some(404)), "{case}: the ledger is asked");
                let cfg = g.cfg();
                let cfg = cfg.as_ref().as_ref().unwrap();
                let key = crate::customer::entry_key(cfg, &cfg.pricing.scopes[0], "mallory");
                let entry = crate::shared::read::<crate::customer::CustomerEntry>(g.engine.shared(), &key);
                assert!(entry.is_none(), "{case}: nothing of mallory is kept in shared data");
                let remembered = if ttl_ms > 0 { 0 } else { 1 };
                assert_eq!(call(&mut g, 4_999), (remembered, Some(404)), "{case}: within the TTL");
                assert_eq!(call(&mut g, 1), (1, Some(404)), "{case}: past the TTL, asked again");
                g.tick();
                assert_eq!(g.engine.metric(Metric::CallsUnknownCustomer), 3, "{case}");
                // A real customer of the same worker is served.
                let (id, _) = g.start();
                g.answer_all();
                assert_eq!(g.status(id), None, "{case}");
                g.no_violations();
            }
        }
    }
}

/// A call estimated from its request body is decided once the body is complete, from the body
/// while it fits `pricing.max_body_bytes`; a larger body is never read, and `default_units`
/// decides. Chunks before the end are buffered by the engine (the filter pauses them).
#[test]
fn a_request_body_beyond_max_body_bytes_is_not_read_and_the_default_estimate_decides() {
    let extra = r#", "sync": {"strategy": "cached"}, "pricing": {"max_body_bytes": 1024, "units": [
        {"name": "tokens", "unit_price": "0.01", "source": {"response_header": "x-tokens"},
         "estimate": {"request_json": "/max_tokens", "default_units": "20"}}]}"#;
    // A JSON body asking for `max_tokens`, padded to `size` bytes.
    let body = |max_tokens: u32, size: usize| {
        let head = format!(r#"{{"max_tokens": {max_tokens}, "pad": ""#);
        format!(r#"{head}{}"}}"#, "x".repeat(size - head.len() - 2)).into_bytes()
    };
    // (body, the sizes the engine reports chunk by chunk (the last at end of stream), the
    // status, the price a refusal names (0.10 a call plus the tokens), whether the body was read)
    let cases = [
        (body(500, 100), vec![100], Some(402), Some("5.10"), true),
        (body(500, 1100), vec![600, 1100], None, None, false),
        (body(50, 80), vec![40, 80], None, None, true),
        (body(500, 1024), vec![1024], Some(402), Some("5.10"), true),
    ];
    for rules in [Rules::Envoy, Rules::Nginx] {
        for (body, chunks, status, price, read) in &cases {
            let case = format!("{rules:?}, {} bytes", body.len());
            let mut g = Gateway::new(rules, config(extra), 10); // 1.00 of credit
            g.engine.enter(1, Phase::RequestHeaders);
            let config = g.cfg();
            let mut call = Call::new(1);
            let request = Answered(vec![("x-consumer-username", SUBJECT), ("transfer-encoding", "chunked")]);
            let flow = call.on_request_headers(&mut g.worker, &mut g.engine, &config, &request, false);
            assert_eq!(flow, Flow::Continue, "{case}: the headers go on, the body decides");
            let reads = Cell::new(0);
            let read_body = |n: usize| {
                reads.set(reads.get() + 1);
                Some(body[..n].to_vec())
            };
            let config = config.as_ref().as_ref().unwrap();
            let mut flows = Vec::new();
            for (i, size) in chunks.iter().enumerate() {
                g.engine.enter(1, Phase::RequestBody);
                let end = i + 1 == chunks.len();
                flows.push(call.on_request_body(&mut g.worker, &mut g.engine, config, *size, end, &read_body));
            }
            assert_eq!(flows[..flows.len() - 1], vec![Flow::Pause; flows.len() - 1], "{case}: buffered");
            assert_eq!(*flows.last().unwrap(), Flow::Pause, "{case}: waits for the cold read");
            g.calls.insert(1, call);
            g.answer_all();
            assert_eq!((g.status(1), reads.get() > 0), (*status, *read), "{case}");
            if let Some(price) = price {
                assert_eq!(g.engine.replies[&1].body["price"], *price, "{case}");
            } else {
                assert_eq!(g.resumed(1), 1, "{case}");
            }
            g.no_violations();
        }
    }
}

/// `response_headers` names the headers an allowed call gets; `null` leaves one out.
#[test]
fn response_headers_take_their_configured_names_and_null_leaves_one_out() {
    let cases = [
        (r#"{}"#, vec![("x-credits-balance", "0.90"), ("x-credits-cost", "0.10")]),
        (r#"{"balance": "x-left", "cost": null}"#, vec![("x-left", "0.90")]),
        (r#"{"balance": null, "cost": "x-spent"}"#, vec![("x-spent", "0.10")]),
        (r#"{"balance": null, "cost": null}"#, vec![]),
    ];
    for (headers, expected) in cases {
        let extra = format!(r#", "sync": {{"strategy": "cached"}}, "response_headers": {headers}"#);
        let mut g = Gateway::new(Rules::Envoy, config(&extra), 10);
        let (id, _) = g.start();
        g.answer_all();
        let mut set = g.finish(id, 200);
        set.sort();
        let expected: Vec<(String, String)> = expected.iter().map(|(n, v)| (n.to_string(), v.to_string())).collect();
        assert_eq!(set, expected, "{headers}");
        g.no_violations();
    }
}

/// `subject.header` names the customer (trimmed), `subject.require_headers` must come with it,
/// non-blank; anything less is answered with `subject.missing_status`, without a round trip.
#[test]
fn the_subject_comes_from_its_configured_header_and_needs_every_required_one() {
    let extra = r#", "sync": {"strategy": "cached"}, "subject": {"header": "x-api-customer",
        "require_headers": ["x-credential-identifier"], "missing_status": 400}"#;
    let mut g = Gateway::new(Rules::Nginx, config(extra), 10);
    let refused = [
        Answered(vec![("x-consumer-username", "alice")]),
        Answered(vec![("x-api-customer", "alice")]),
        Answered(vec![("x-api-customer", "alice"), ("x-credential-identifier", " ")]),
        Answered(vec![("x-api-customer", "  "), ("x-credential-identifier", "key-1")]),
    ];
    for request in &refused {
        let (id, flow) = g.start_with(request);
        assert_eq!((flow, g.status(id), g.pending().len()), (Flow::Pause, Some(400), 0), "{:?}", request.0);
        let detail = g.engine.replies[&id].body["detail"].as_str().unwrap_or_default().to_owned();
        assert!(detail.contains("x-api-customer, x-credential-identifier"), "{detail}");
    }
    let (id, _) = g.start_with(&Answered(vec![("x-api-customer", " alice "), ("x-credential-identifier", "key-1")]));
    g.answer_all();
    assert_eq!((g.status(id), g.resumed(id)), (None, 1));
    g.finish(id, 200);
    g.tick();
    assert_eq!(g.engine.metric(Metric::CallsUnidentified), 4);
    g.answer_all();
    assert_eq!(g.ledger.books().consumed, Amount::parse("0.10").unwrap(), "booked to alice");
    g.no_violations();
}

/// An upstream error costs nothing by default, whatever it reported; with
/// `pricing.charge_errors` it is charged like any other call, at the units its body reports.
#[test]
fn an_upstream_error_is_charged_only_with_charge_errors_and_then_at_its_reported_units() {
    let body = br#"{"usage": {"n": 7}}"#;
    for (charge_errors, status, consumed) in [(false, 500, "0"), (true, 500, "0.17"), (false, 200, "0.17")] {
        let extra = format!(
            r#", "pricing": {{"charge_errors": {charge_errors}, "units": [{{"name": "n", "unit_price": "0.01",
                "source": {{"response_json": "/usage/n"}}, "estimate": {{"units": "5"}}}}]}}"#
        );
        let mut g = Gateway::new(Rules::Envoy, config(&extra), 100);
        let (id, _) = g.start();
        g.answer_all();
        let response = Answered(vec![(":status", if status == 200 { "200" } else { "500" })]);
        g.finish_with(id, &response, Some(body));
        g.sync_rounds(2);
        let case = format!("charge_errors {charge_errors}, status {status}");
        assert_eq!(g.ledger.books().consumed, Amount::parse(consumed).unwrap(), "{case}");
        assert!(g.ledger.books().problems.is_empty(), "{case}: {:?}", g.ledger.books().problems);
        g.no_violations();
    }
}

/// Kong's engine applies `ledger.timeout_ms` to connect, send and read separately (and not to
/// name resolution): a read may be answered after the worker's deadline for it (timeout + 100 ms).
/// The tick in between drops the read; the answer then matches nothing and the call is neither
/// answered nor resumed by the filter (Kong then resumes it undecided: it goes upstream unchecked).
#[test]
fn under_nginx_an_answer_after_the_reads_deadline_still_decides_the_call() {
    for late in ["failed", "ok"] {
        let mut g = Gateway::new(Rules::Nginx, config(r#", "sync": {"strategy": "cached"}"#), 0); // no credit
        let (id, _) = g.start();
        let [(token, _)] = g.pending()[..] else { panic!() };
        g.engine.now_ms += 500 + 101; // past the read's deadline
        g.tick();
        g.engine.dispatched.retain(|d| d.context != 0); // the tick's own sync: not under test
        if late == "failed" {
            g.fail(token); // 503 expected (deny)
        } else {
            g.answer(token); // 402 expected (no credit)
        }
        assert!(g.status(id).is_some() || g.resumed(id) == 1, "{late}: call neither answered nor resumed");
        g.no_violations();
    }
}

/// Kong's engine passes `end_of_stream = false` to `on_request_headers` always, and calls
/// `on_request_body` only for a body that is not empty (ngx_wasm_module `ngx_wasm_ops.c`, content
/// phase: "received empty body"). A call priced from its request body that declares none (a GET,
/// `content-length: 0`) is decided at its headers; one that declares a body no callback delivers
/// reaches its response undecided, and is charged at its default estimate's price and counted.
#[test]
fn under_nginx_a_call_priced_from_its_body_that_has_none_is_checked_at_its_headers() {
    let extra = r#", "sync": {"strategy": "cached"}, "pricing": {"units": [
        {"name": "tokens", "unit_price": "0.01", "source": {"response_header": "x-tokens"},
         "estimate": {"request_json": "/max_tokens", "default_units": "20"}}]}"#;
    let bodiless = Answered(vec![("x-consumer-username", SUBJECT), ("content-length", "0")]);
    let declared = Answered(vec![("x-consumer-username", SUBJECT), ("content-length", "12")]);
    let undeclared = Answered(vec![("x-consumer-username", SUBJECT)]);
    for (request, refused) in [(undeclared, true), (bodiless, true), (declared, false)] {
        let mut g = Gateway::new(Rules::Nginx, config(extra), 0); // no credit at all
        g.engine.enter(1, Phase::RequestHeaders);
        let config = g.cfg();
        let mut call = Call::new(1);
        let flow = call.on_request_headers(&mut g.worker, &mut g.engine, &config, &request, false);
        g.calls.insert(1, call);
        g.answer_all();
        assert_eq!(g.status(1).is_some(), refused, "{:?}: {flow:?}", request.0);
        if !refused {
            g.finish_with(1, &Answered(vec![(":status", "200"), ("x-tokens", "7")]), None);
            let cfg = g.cfg();
            let entry = crate::simulation::filter::entry_of(&g.engine, cfg.as_ref().as_ref().unwrap(), SUBJECT);
            assert_eq!(entry.map(|e| e.next_call), Some(1), "charged");
            g.tick(); // counters go to the engine once per tick
            assert_eq!(g.engine.metric(Metric::CallsResumedUndecided), 1, "and counted");
        }
        g.no_violations();
    }
}

/// `unknown.rs`: "a flood of made-up subjects never reaches shared data". Under `lease`, every
/// cold read writes the subject's entry (`sync::balance_read`, for its top-up's number); when
/// the read fails the call is refused (deny) without the worker tracking the subject, so no tick
/// ever deletes the entry: one entry per subject stays in shared data for good (Envoy never
/// evicts; under Kong it pushes real customers' entries, and their unsent usage, out).
#[test]
fn an_entry_written_for_a_read_that_failed_is_deleted_once_idle() {
    for rules in [Rules::Envoy, Rules::Nginx] {
        let mut g = Gateway::new(rules, config(""), 10); // lease, deny
        let (id, _) = g.start_with(&Subject("made-up-1".into()));
        let [(token, _)] = g.pending()[..] else { panic!() };
        g.fail(token);
        assert_eq!(g.status(id), Some(503));
        g.finish(id, 503);
        for _ in 0..3 {
            g.engine.now_ms += 400_000; // past sync.idle_ms and lease.idle_release_ms
            g.tick();
            g.answer_all();
        }
        let cfg = g.cfg();
        let cfg = cfg.as_ref().as_ref().unwrap();
        let key = crate::customer::entry_key(cfg, &cfg.pricing.scopes[0], "made-up-1");
        let kept = crate::shared::read::<crate::customer::CustomerEntry>(g.engine.shared(), &key);
        assert!(kept.is_none(), "{rules:?}: the entry of a subject never served is still in shared data: {kept:?}");
        g.no_violations();
    }
}

/// The chain's later reads keep to the wait of when the call began: a call whose first read is
/// answered late in its wait (400 of 500 ms) and that waits again (a call that joined took the
/// top-up) is answered once `ledger.timeout_ms` (plus the reads' slack of 100 ms) passed since it
/// began to wait, not a whole timeout after its last read went out (README: 'a call waiting for
/// the ledger never waits longer').
#[test]
fn under_envoy_a_call_whose_chained_read_hangs_is_decided_within_its_own_wait() {
    let mut g = Gateway::spent_lease_of_one_call(Rules::Envoy);
    let began = g.engine.now_ms;
    let (a, flow) = g.start();
    assert_eq!(flow, Flow::Pause);
    let (b, _) = g.start(); // joins a's read, and is decided first: takes the top-up
    g.engine.now_ms = began + 400;
    g.answer_all();
    assert_eq!((g.resumed(b), g.resumed(a), g.status(a)), (1, 0, None), "a waits for another read");
    assert_eq!(g.pending().len(), 1, "a's second read is in flight");
    // The ledger answers no more: a is decided at the first tick past its own wait.
    g.engine.now_ms = began + 500 + 100 + 1;
    g.tick();
    assert_eq!((g.resumed(a), g.status(a)), (0, Some(503)), "a waited past ledger.timeout_ms");
    g.no_violations();
}

/// Under Kong's engine only a call's own read can decide it (the tick cannot end its wait, as it
/// does under Envoy), so a further top-up read sent late in the wait (at 400 of 500 ms) is given
/// what is left of the wait as its timeout, not a whole `ledger.timeout_ms` (README: 'a call
/// waiting for the ledger never waits longer'). Failing at that shorter timeout does not mark the
/// ledger down (the ledger answered the call's first read; this one was cut short), though the
/// filter's wall clock may show the engine's timeout a millisecond early (`timed_out_at_ms`: at
/// 499); failing before it (the ledger refused the connection) does, like any other failure.
#[test]
fn under_nginx_a_chained_read_is_given_what_is_left_of_the_calls_wait() {
    for (fails_at, ledger) in
        [(None, LedgerAccess::Reachable), (Some(500), LedgerAccess::Reachable), (Some(410), LedgerAccess::Unreachable)]
    {
        let mut g = Gateway::spent_lease_of_one_call(Rules::Nginx);
        let (a, began, second) = g.chained_read(400);
        assert_eq!(g.engine.dispatched[0].timeout_ms, 100, "what is left of a's wait");
        match fails_at {
            Some(ms) => {
                g.engine.now_ms = began + ms;
                g.fail(second);
            }
            None => {
                g.time_out(second);
                assert_eq!(g.engine.now_ms, began + 499, "the engine's timeout as the wall clock shows it");
            }
        }
        assert_eq!((g.resumed(a), g.status(a)), (0, Some(503)), "failed at {fails_at:?}: a is answered (deny)");
        assert!(g.pending().is_empty(), "failed at {fails_at:?}: no further read");
        let now_ms = g.engine.now_ms;
        assert_eq!(g.worker.access(now_ms), ledger, "failed at {fails_at:?}");
        g.no_violations();
    }
}

/// Only the engine's own failure at a cut-short read's timeout says nothing about the ledger: an
/// answer the ledger gave (a 503) is its failure whenever it arrives, and ngx_wasm_module counts
/// connect, send and read apart, so an answer may come after the read's timeout. Under
/// `failure_mode: allow` the call is decided on the offline allowance either way, not refused
/// because the ledger's 503 came a few milliseconds later.
#[test]
fn under_nginx_a_ledger_error_to_a_cut_short_read_marks_it_down_whenever_it_arrives() {
    for arrives_at in [410, 500, 520] {
        let mut g = Gateway::spent_lease_of_one_call_and(Rules::Nginx, r#", "failure_mode": "allow""#);
        let (a, began, second) = g.chained_read(400);
        assert_eq!(g.engine.dispatched[0].timeout_ms, 100, "cut short");
        g.engine.now_ms = began + arrives_at;
        g.engine.dispatched.clear();
        g.deliver(a, second, &LedgerAnswer { status: Some(503), body: Some(b"overloaded".to_vec()) });
        let now_ms = g.engine.now_ms;
        assert_eq!(g.worker.access(now_ms), LedgerAccess::Unreachable, "503 at {arrives_at}");
        assert_eq!((g.resumed(a), g.status(a)), (1, None), "503 at {arrives_at}: let through (allow)");
        g.no_violations();
    }
}

/// The worker outlives a reconfiguration (`FilterRoot::on_configure` keeps it): a read
/// dispatched with the whole `ledger.timeout_ms` of its day is not one cut short because the
/// timeout was raised while it was in flight. It fails at its own timeout, the ledger hung: the
/// ledger is down, under either engine.
#[test]
fn a_read_in_flight_when_the_timeout_is_raised_still_marks_the_ledger_down_when_it_fails() {
    for rules in [Rules::Envoy, Rules::Nginx] {
        let mut g = Gateway::spent_lease_of_one_call(rules);
        let began = g.engine.now_ms;
        let (a, flow) = g.start();
        assert_eq!(flow, Flow::Pause);
        let [(read, _)] = g.pending()[..] else { panic!("{:?}", g.pending()) };
        assert_eq!(g.engine.dispatched[0].timeout_ms, 500);
        let raised = config(
            r#", "ledger": {"upstream": "ledger", "token": "t", "timeout_ms": 1000}, "lease": {"min_calls": 1, "max_calls": 1}"#,
        );
        g.worker.reconfigure(&raised);
        g.config = Rc::new(Ok(raised));
        g.engine.now_ms = began + 500;
        g.fail(read);
        let now_ms = g.engine.now_ms;
        assert_eq!(g.worker.access(now_ms), LedgerAccess::Unreachable, "{rules:?}");
        assert_eq!(g.status(a), Some(503), "{rules:?}");
        g.no_violations();
    }
}

/// A call's first read is not a chained one: it goes out with the whole `ledger.timeout_ms`
/// even when the clock moved on between the call's admission and the dispatch (a real clock
/// moves during a callback), and failing at that timeout (the ledger hung) marks the ledger
/// down, so that the next calls are decided at once by `failure_mode`.
#[test]
fn under_nginx_a_first_read_dispatched_a_millisecond_into_the_wait_is_not_cut_short() {
    let mut g = Gateway::spent_lease_of_one_call(Rules::Nginx);
    g.engine.ms_per_clock_read = 1;
    let (a, flow) = g.start();
    g.engine.ms_per_clock_read = 0;
    g.engine.now_ms += g.engine.drift_ms.take();
    assert_eq!(flow, Flow::Pause);
    let [(read, _)] = g.pending()[..] else { panic!("{:?}", g.pending()) };
    let timeout_ms = g.engine.dispatched[0].timeout_ms;
    assert_eq!(timeout_ms, 500, "the first read: the whole timeout");
    g.engine.now_ms += u64::from(timeout_ms);
    g.fail(read);
    let now_ms = g.engine.now_ms;
    assert_eq!(g.worker.access(now_ms), LedgerAccess::Unreachable, "the ledger hung");
    assert_eq!(g.status(a), Some(503));
    g.no_violations();
}

/// Calls carried over from a read whose owner went away keep to their own wait too: the new
/// read of the customer, dispatched late in their wait, does not extend it.
#[test]
fn under_envoy_calls_carried_over_from_an_orphaned_read_are_decided_within_their_own_wait() {
    let mut g = Gateway::spent_lease_of_one_call(Rules::Envoy);
    let began = g.engine.now_ms;
    let (a, _) = g.start();
    let (b, _) = g.start(); // joins a's read
    let [(token, _)] = g.pending()[..] else { panic!("{:?}", g.pending()) };
    g.gone(a);
    g.engine.dispatched.retain(|d| d.token != token);
    g.engine.now_ms = began + 450;
    let (c, _) = g.start(); // dispatches a new read of the customer, and takes b
    assert_eq!(g.pending().len(), 1);
    g.engine.now_ms = began + 500 + 100 + 1;
    g.tick();
    assert_eq!((g.resumed(b), g.status(b)), (0, Some(503)), "b waited past ledger.timeout_ms");
    assert_eq!((g.resumed(c), g.status(c)), (0, None), "c waits on within its own wait");
    g.engine.now_ms = began + 450 + 500 + 100 + 1;
    g.tick();
    assert_eq!(g.status(c), Some(503));
    g.no_violations();
}

/// A call the tick let through once its own wait was over (here on credit another worker's read
/// set aside meanwhile) still owns its read: the read's late answer, in the call's own callback,
/// must not decide it again (resumed twice, holding twice).
#[test]
fn under_envoy_a_call_let_through_at_the_end_of_its_wait_is_not_decided_again_by_its_reads_answer() {
    let mut g = Gateway::spent_lease_of_one_call(Rules::Envoy);
    let began = g.engine.now_ms;
    let (a, flow) = g.start();
    assert_eq!(flow, Flow::Pause);
    let (c, _) = g.start(); // joins a's read, and takes its top-up
    g.engine.now_ms = began + 400;
    g.answer_all();
    assert_eq!((g.resumed(c), g.resumed(a)), (1, 0));
    g.finish(c, 200);
    let [(read_a, _)] = g.pending()[..] else { panic!("a's second read: {:?}", g.pending()) };
    // Another worker of the node reads the customer, and its lease top-up lands in shared data.
    let config = g.cfg();
    let config = config.as_ref().as_ref().unwrap();
    let mut other = Worker::start(&g.engine, 8);
    other.reconfigure(config);
    g.engine.enter(1000, Phase::RequestHeaders);
    let mut b = Call::new(1000);
    assert_eq!(b.on_request_headers(&mut other, &mut g.engine, &g.config.clone(), &Named(SUBJECT), true), Flow::Pause);
    let d = g.engine.dispatched.iter().position(|d| d.context == 1000).unwrap();
    let d = g.engine.dispatched.remove(d);
    let request = serde_json::from_slice(&d.body).unwrap();
    let response = g.ledger.serve(&request, at(g.engine.now_ms)).unwrap();
    let answer = LedgerAnswer { status: Some(200), body: Some(serde_json::to_vec(&response).unwrap()) };
    g.engine.enter(1000, Phase::CallResponse);
    b.on_ledger_answer(&mut other, &mut g.engine, config, d.token, &answer);
    assert_eq!(g.resumed(1000), 1);
    // Its call goes away unserved: what it held goes back to the node's lease.
    g.engine.enter(1000, Phase::Log);
    b.on_log(&mut other, &mut g.engine, config);
    // a's own wait is over: the tick decides it on what the node holds now.
    g.engine.now_ms = began + 500 + 100 + 1;
    g.tick();
    for (t, c) in g.pending() {
        if c == 0 {
            g.answer(t);
        }
    }
    assert_eq!((g.resumed(a), g.status(a)), (1, None), "let through on the node's lease");
    g.answer(read_a);
    assert_eq!((g.resumed(a), g.status(a)), (1, None), "decided once");
    g.finish(a, 200);
    g.no_violations();
}

/// A chained read cut to the last millisecond of its call's wait passes its deadline (the tick
/// gives it up) with the ledger well: that does not mark the ledger down (only the existing
/// tests of a read sent with the whole timeout covered `expire_reads`), the call is not decided
/// by the tick (Kong's rule), and its read's answer, or failure, decides it once, with no further
/// read.
#[test]
fn under_nginx_a_chained_read_cut_to_one_ms_past_its_deadline_marks_nothing_down_and_decides_once() {
    for late_answer_ok in [true, false] {
        let mut g = Gateway::spent_lease_of_one_call(Rules::Nginx);
        let (a, began, second) = g.chained_read(499);
        assert_eq!(g.engine.dispatched[0].timeout_ms, 1);
        g.engine.now_ms = began + 700;
        g.tick();
        assert_eq!((g.resumed(a), g.status(a)), (0, None), "only its own callback decides it");
        assert_eq!(g.worker.access(g.engine.now_ms), LedgerAccess::Reachable);
        g.engine.now_ms = began + 800;
        if late_answer_ok {
            g.answer(second)
        } else {
            g.fail(second)
        }
        let decided = g.resumed(a) + u32::from(g.status(a).is_some());
        assert_eq!(decided, 1, "{late_answer_ok}: decided once: {:?} {:?}", g.resumed(a), g.status(a));
        assert!(g.pending().iter().all(|(_, c)| *c == 0), "no further read: {:?}", g.pending());
        g.tick();
        g.no_violations();
    }
}
