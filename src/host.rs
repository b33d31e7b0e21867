//! The proxy-wasm adapter: turns host callbacks into calls on the decision modules and their
//! answers back into host calls. Every host call goes through `hostcalls` and its `Result`, so
//! nothing here can panic; failures turn into the configured failure mode.

use std::cell::RefCell;
use std::collections::HashMap;
use std::hash::{BuildHasher, Hasher};
use std::rc::Rc;
use std::time::{Duration, UNIX_EPOCH};

use credits::Amount;
use proxy_wasm::hostcalls;
use proxy_wasm::traits::{Context, HttpContext, RootContext};
use proxy_wasm::types::{Action, BufferType, ContextType, LogLevel, MapType, MetricType};

use crate::config::FilterConfig;
use crate::decision::{admit, settle_call, Held, LedgerAccess, Verdict};
use crate::pricing::{self, Quote};
use crate::problem::Problem;
use crate::registry;
use crate::shared::{self, CasMismatch, Keyed, SharedData};
use crate::sync::{self, AnswerError, PendingSync, Tracker};
use crate::units;

proxy_wasm::main! {{
    proxy_wasm::set_log_level(LogLevel::Info);
    std::panic::set_hook(Box::new(|info| {
        let _ = hostcalls::log(LogLevel::Critical, &format!("prepaid_credits panicked: {info}"));
    }));
    proxy_wasm::set_root_context(|_| -> Box<dyn RootContext> { Box::new(FilterRoot::default()) });
}}

/// The host's shared data through `hostcalls`, errors mapped to a lost CAS race (retried).
struct HostShared;

impl SharedData for HostShared {
    fn get(&self, key: &str) -> (Option<Vec<u8>>, Option<u32>) {
        hostcalls::get_shared_data(key).unwrap_or((None, None))
    }

    fn set(&self, key: &str, value: &[u8], cas: Option<u32>) -> Result<(), CasMismatch> {
        hostcalls::set_shared_data(key, Some(value), cas).map_err(|_| CasMismatch)
    }
}

fn now_ms() -> u64 {
    hostcalls::get_current_time()
        .ok()
        .and_then(|t| t.duration_since(UNIX_EPOCH).ok())
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

fn random_u64() -> u64 {
    // std's RandomState is seeded from the host's randomness (WASI random_get).
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u64(now_ms());
    h.finish()
}

/// The node's identity: created once by the first worker, shared by all.
struct NodeRecord {
    id: String,
}

const NODE_KEY: &str = "prepaid_credits/node";

impl Keyed for NodeRecord {
    fn key(&self) -> &str {
        NODE_KEY
    }
    fn encode(&self) -> Vec<u8> {
        format!("node1|{}|{NODE_KEY}", self.id).into_bytes()
    }
    fn decode(bytes: &[u8]) -> Option<Self> {
        let text = std::str::from_utf8(bytes).ok()?;
        let rest = text.strip_prefix("node1|")?;
        let (id, key) = rest.split_once('|')?;
        (key == NODE_KEY).then(|| NodeRecord { id: id.to_owned() })
    }
}

fn node_id() -> String {
    let fresh = format!("{:016x}", random_u64());
    shared::update::<NodeRecord, String>(&HostShared, NODE_KEY, |existing| match existing {
        Some(n) => (None, n.id),
        None => (Some(NodeRecord { id: fresh.clone() }), fresh.clone()),
    })
    .unwrap_or(fresh)
}

/// Metric ids, defined once per VM.
#[derive(Clone, Copy, Default)]
struct Metrics {
    allowed: u32,
    refused: u32,
    unidentified: u32,
    unknown_customer: u32,
    unavailable: u32,
    misconfigured: u32,
    cache_hits: u32,
    cache_misses: u32,
    offline_allowed: u32,
    sync_batches: u32,
    sync_failures: u32,
    records_queued: u32,
    records_confirmed: u32,
    records_dropped: u32,
    usage_unreported: u32,
    ledger_rtt_ms: u32,
}

impl Metrics {
    fn define() -> Metrics {
        let counter = |name: &str| hostcalls::define_metric(MetricType::Counter, name).unwrap_or(0);
        Metrics {
            allowed: counter("calls_allowed"),
            refused: counter("calls_refused"),
            unidentified: counter("calls_unidentified"),
            unknown_customer: counter("calls_unknown_customer"),
            unavailable: counter("calls_unavailable"),
            misconfigured: counter("calls_misconfigured"),
            cache_hits: counter("cache_hits"),
            cache_misses: counter("cache_misses"),
            offline_allowed: counter("calls_allowed_offline"),
            sync_batches: counter("sync_batches"),
            sync_failures: counter("sync_failures"),
            records_queued: counter("records_queued"),
            records_confirmed: counter("records_confirmed"),
            records_dropped: counter("records_dropped"),
            usage_unreported: counter("calls_usage_unreported"),
            ledger_rtt_ms: hostcalls::define_metric(MetricType::Histogram, "ledger_rtt_ms").unwrap_or(0),
        }
    }

    fn add(id: u32, n: u64) {
        if id != 0 && n > 0 {
            let _ = hostcalls::increment_metric(id, i64::try_from(n).unwrap_or(i64::MAX));
        }
    }
}

/// A cold-miss balance read in flight, and the calls waiting for it.
struct Read {
    pending: PendingSync,
    /// The call whose dispatch this is; `None` once it went away (its answer will not come).
    owner: Option<u32>,
    waiters: Vec<u32>,
    deadline_ms: u64,
}

/// A call of this worker that waits for the ledger, from its pricing until its response headers:
/// what it needs, and what it holds once let through. Kept here rather than in the call's context
/// because a read's answer decides every call waiting for it, from whichever context it arrives
/// in. (A call decided at once never comes here.)
struct Admission {
    subject: String,
    quote: Quote,
    /// The request id, read before the request headers went on (then the host no longer lets
    /// the filter read them).
    request_id: Option<String>,
    /// Reads of the ledger this call has waited for.
    reads: u32,
    /// What it holds, once let through.
    held: Option<Vec<Held>>,
}

/// Reads one call may wait for: a burst that outruns a top-up waits for one more, sized for every
/// call still waiting; beyond that the ledger is too slow to set credit aside.
const MAX_READS_PER_CALL: u32 = 3;

/// How a call that must wait for the ledger waits.
enum Wait {
    /// For a read of the worker's (joined or started).
    Shared,
    /// For its own read (under Kong), answered in its own context.
    Own(PendingSync),
    /// The read could not be dispatched: decide as if the ledger were unreachable.
    Failed,
}

/// Makes `waiters` wait for a read of their customer that tops up enough for all of them, joining
/// one in flight if there is one. `running` is the context whose callback runs now: a host
/// answers a dispatch in the context that made it, so it owns a read it starts — and must still
/// be waiting itself, or the answer could go away with it.
fn wait_for_read(config: &FilterConfig, running: u32, waiters: &[u32], subject: &str, now: u64) -> Wait {
    let kong = on_kong();
    let queue = waiters.len() as u64;
    let holds = with_worker(|w| {
        for id in waiters {
            if let Some(a) = w.calls.get_mut(id) {
                a.reads += 1;
            }
        }
        let a = w.calls.get(&running)?;
        Some(a.quote.holds.iter().map(|h| h.times(queue).unwrap_or(*h)).collect::<Vec<_>>())
    })
    .unwrap_or_default();
    let joined = !kong
        && with_worker(|w| match w.reads.get_mut(subject) {
            Some(read) if read.owner.is_some() => {
                read.waiters.extend_from_slice(waiters);
                true
            }
            _ => false,
        });
    if joined {
        return Wait::Shared;
    }
    let node = with_worker(|w| w.node.clone());
    let pending = sync::balance_read(&HostShared, config, &node, subject, &holds, now);
    match dispatch(config, &pending) {
        Ok(_token) if kong => Wait::Own(pending),
        Ok(_token) => {
            let deadline_ms = now + u64::from(config.ledger.timeout_ms) + 100;
            with_worker(|w| {
                // Calls left waiting by an owner that went away wait for this read instead.
                let mut all = w.reads.remove(subject).map(|r| r.waiters).unwrap_or_default();
                all.extend_from_slice(waiters);
                w.reads.insert(subject.to_owned(), Read { pending, owner: Some(running), waiters: all, deadline_ms })
            });
            Wait::Shared
        }
        Err(status) => {
            // Unknown cluster or a full circuit breaker: answer now, never hang.
            log::warn!(
                "prepaid_credits: could not dispatch a balance read to {:?}: {status:?}",
                config.ledger.upstream
            );
            Metrics::add(with_worker(|w| w.metrics.sync_failures), 1);
            mark_ledger_down(config, now);
            Wait::Failed
        }
    }
}

/// State of this worker VM shared by its root and request contexts.
#[derive(Default)]
struct Worker {
    node: String,
    id: u64,
    metrics: Metrics,
    tracker: Tracker,
    /// Reads by subject.
    reads: HashMap<String, Read>,
    /// Calls between their pricing and their response headers, by context id.
    calls: HashMap<u32, Admission>,
    /// Until when the ledger counts as unreachable (after a failed call).
    ledger_down_until_ms: u64,
    /// Kong's engine accepts `set_effective_context` but ignores it: there a call can only be
    /// resumed from its own callbacks, so each cold call waits for a read of its own.
    on_kong: Option<bool>,
}

thread_local! {
    static WORKER: RefCell<Worker> = RefCell::new(Worker::default());
}

fn with_worker<R>(f: impl FnOnce(&mut Worker) -> R) -> R {
    WORKER.with(|w| f(&mut w.borrow_mut()))
}

fn access(now: u64) -> LedgerAccess {
    if with_worker(|w| now >= w.ledger_down_until_ms) {
        LedgerAccess::Reachable
    } else {
        LedgerAccess::Unreachable
    }
}

fn mark_ledger_down(config: &FilterConfig, now: u64) {
    with_worker(|w| w.ledger_down_until_ms = now + u64::from(config.sync.interval_ms));
}

fn dispatch(config: &FilterConfig, pending: &PendingSync) -> Result<u32, proxy_wasm::types::Status> {
    let path = format!("{}/gateway/sync", config.ledger.base_path);
    let auth = format!("Bearer {}", config.ledger.token);
    let body = pending.body();
    hostcalls::dispatch_http_call(
        &config.ledger.upstream,
        vec![
            (":method", "POST"),
            (":path", &path),
            (":authority", &config.ledger.authority),
            (":scheme", if config.ledger.tls { "https" } else { "http" }),
            ("content-type", "application/json"),
            ("authorization", &auth),
        ],
        Some(&body),
        vec![],
        Duration::from_millis(u64::from(config.ledger.timeout_ms)),
    )
}

/// Reads the answer to a dispatch; `None` status when the host reports a failure.
fn call_answer(body_size: usize) -> (Option<u16>, Option<Vec<u8>>) {
    let status = hostcalls::get_map_value(MapType::HttpCallResponseHeaders, ":status")
        .ok()
        .flatten()
        .and_then(|s| s.parse().ok());
    let body = hostcalls::get_buffer(BufferType::HttpCallResponseBody, 0, body_size).ok().flatten();
    (status, body)
}

/// Handles a sync answer for this worker: applies it or marks the ledger down.
fn absorb(config: &FilterConfig, pending: &PendingSync, status: Option<u16>, body: Option<&[u8]>) -> bool {
    let now = now_ms();
    let metrics = with_worker(|w| w.metrics);
    if metrics.ledger_rtt_ms != 0 {
        let _ = hostcalls::record_metric(metrics.ledger_rtt_ms, now.saturating_sub(pending.sent_ms));
    }
    match sync::parse_answer(pending, status, body) {
        Ok(response) => {
            let applied = sync::apply(&HostShared, config, pending, &response, now);
            sync::register_pending(&HostShared, config, pending);
            Metrics::add(metrics.records_confirmed, applied.calls_confirmed);
            Metrics::add(metrics.records_dropped, applied.calls_dropped);
            with_worker(|w| w.ledger_down_until_ms = 0);
            true
        }
        Err(e) => {
            Metrics::add(metrics.sync_failures, 1);
            let message = match &e {
                AnswerError::Unavailable(m) | AnswerError::Malformed(m) => m.clone(),
            };
            log::warn!("prepaid_credits: ledger sync failed: {message}");
            mark_ledger_down(config, now);
            false
        }
    }
}

#[derive(Default)]
struct FilterRoot {
    config: Option<Rc<Result<FilterConfig, crate::config::ConfigError>>>,
    ticking: bool,
    /// The sync this root context has in flight: its token and what was sent.
    in_flight: Option<(u32, PendingSync)>,
}

impl Context for FilterRoot {
    fn on_http_call_response(&mut self, token_id: u32, _num_headers: usize, body_size: usize, _num_trailers: usize) {
        let Some((token, pending)) = self.in_flight.take() else { return };
        if token != token_id {
            self.in_flight = Some((token, pending));
            return;
        }
        if let Some(Ok(config)) = self.config.as_deref() {
            let (status, body) = call_answer(body_size);
            absorb(config, &pending, status, body.as_deref());
        }
    }
}

impl RootContext for FilterRoot {
    fn on_configure(&mut self, _plugin_configuration_size: usize) -> bool {
        let bytes =
            hostcalls::get_buffer(BufferType::PluginConfiguration, 0, usize::MAX).ok().flatten().unwrap_or_default();
        let parsed = FilterConfig::parse(&bytes);
        match &parsed {
            Ok(c) => {
                if c.ledger.upstream_is_host_name() {
                    log::warn!(
                        "prepaid_credits: ledger.upstream {:?} is a host name: under Kong it is resolved by nginx's \
                         resolver (not /etc/hosts) and the lookup is not covered by ledger.timeout_ms; prefer ip:port",
                        c.ledger.upstream
                    );
                }
            }
            // Never refuse the configuration (Kong would block its whole config update): every
            // call is answered with a 500 naming the field instead.
            Err(e) => log::error!("prepaid_credits: {e}; every call will be answered with 500"),
        }
        let interval = parsed.as_ref().map_or(1000, |c| c.sync.interval_ms);
        self.config = Some(Rc::new(parsed));
        with_worker(|w| {
            if w.node.is_empty() {
                w.node = node_id();
                w.id = random_u64();
                w.metrics = Metrics::define();
            }
        });
        // Kong traps on a second non-zero tick period: set it once per root context.
        if !self.ticking {
            self.ticking = hostcalls::set_tick_period(Duration::from_millis(u64::from(interval))).is_ok();
        }
        true
    }

    fn on_tick(&mut self) {
        let Some(config) = self.config.clone() else { return };
        let Ok(config) = config.as_ref() else { return };
        let now = now_ms();
        expire_waiting_reads(config, now);
        if let Some((_, pending)) = &self.in_flight {
            // The host always answers within the timeout; this only guards against a lost callback.
            if now.saturating_sub(pending.sent_ms) <= 2 * u64::from(config.ledger.timeout_ms) {
                return;
            }
            self.in_flight = None;
        }
        let (node, worker, metrics) = with_worker(|w| (w.node.clone(), w.id, w.metrics));
        let pending = with_worker(|w| sync::prepare(&HostShared, &mut w.tracker, config, &node, worker, now));
        let Some(pending) = pending else { return };
        let calls: u64 = pending.request.subjects.iter().filter_map(|s| s.usage.as_ref()).map(|u| u.calls()).sum();
        match dispatch(config, &pending) {
            Ok(token) => {
                Metrics::add(metrics.sync_batches, 1);
                Metrics::add(metrics.records_queued, calls);
                self.in_flight = Some((token, pending));
            }
            Err(status) => {
                Metrics::add(metrics.sync_failures, 1);
                log::warn!("prepaid_credits: could not dispatch the sync to {:?}: {status:?}", config.ledger.upstream);
                mark_ledger_down(config, now);
            }
        }
    }

    fn get_type(&self) -> Option<ContextType> {
        Some(ContextType::HttpContext)
    }

    fn create_http_context(&self, context_id: u32) -> Option<Box<dyn HttpContext>> {
        Some(Box::new(FilterCall {
            id: context_id,
            config: self.config.clone(),
            subject: None,
            own_read: None,
            awaiting_body: None,
            admitted: None,
            status: None,
            reported: Vec::new(),
            reader: None,
        }))
    }
}

/// Reads whose answer did not come in time (e.g. the dispatching call went away): their waiters
/// are decided as if the ledger were unreachable.
fn expire_waiting_reads(config: &FilterConfig, now: u64) {
    let expired: Vec<Vec<u32>> = with_worker(|w| {
        let subjects: Vec<String> =
            w.reads.iter().filter(|(_, r)| now > r.deadline_ms).map(|(s, _)| s.clone()).collect();
        subjects.into_iter().filter_map(|s| w.reads.remove(&s).map(|r| r.waiters)).collect()
    });
    for waiters in expired {
        mark_ledger_down(config, now);
        for waiter in waiters {
            // The ledger is down: nobody waits for another read.
            if hostcalls::set_effective_context(waiter).is_ok() {
                finish_waiting_call(config, waiter, now);
            }
        }
    }
}

/// What a call waiting for its request body read of the request headers before they went on
/// (the host does not let a filter read them afterwards).
struct EarlyHeaders {
    request_id: Option<String>,
    /// The headers unit rules read, by name.
    units: Vec<(String, String)>,
}

/// One call through the filter.
struct FilterCall {
    id: u32,
    config: Option<Rc<Result<FilterConfig, crate::config::ConfigError>>>,
    subject: Option<String>,
    /// This call's own read (under Kong), rather than one shared with other calls.
    own_read: Option<PendingSync>,
    /// Waiting for the request body to estimate the call from it.
    awaiting_body: Option<EarlyHeaders>,
    /// Let through: its subject, price and holds, until it settles.
    admitted: Option<(String, Quote, Vec<Held>)>,
    /// The upstream's status (or a later filter's local reply).
    status: Option<u16>,
    /// Units the response headers reported, per rule.
    reported: Vec<Option<Amount>>,
    /// Reads units from the response body as it passes.
    reader: Option<units::BodyReader>,
}

/// Whether this worker runs in Kong's engine (it has nginx's request properties).
fn on_kong() -> bool {
    if let Some(known) = with_worker(|w| w.on_kong) {
        return known;
    }
    let kong = hostcalls::get_property(vec!["ngx", "kong_request_id"]).ok().flatten().is_some();
    with_worker(|w| w.on_kong = Some(kong));
    kong
}

fn request_id() -> Option<String> {
    let kong = hostcalls::get_property(vec!["ngx", "kong_request_id"]).ok().flatten();
    let id =
        kong.or_else(|| hostcalls::get_map_value_bytes(MapType::HttpRequestHeaders, "x-request-id").ok().flatten());
    id.and_then(|b| String::from_utf8(b).ok())
}

fn header(map: MapType, name: &str) -> Option<String> {
    hostcalls::get_map_value(map, name).ok().flatten()
}

/// Answers the call in place of the upstream; `id` is its request id if it was read already.
fn reply(problem: Problem, id: Option<String>) {
    let problem = problem.with_request_id(id.or_else(request_id));
    let body = problem.body_bytes();
    let _ = hostcalls::send_http_response(
        u32::from(problem.status),
        vec![("content-type", "application/problem+json")],
        Some(&body),
    );
}

/// What became of a call once decided.
enum Acted {
    /// Let through, holding this per scope.
    LetThrough(Vec<Held>),
    /// Answered in place of the upstream.
    Answered,
}

/// Acts on a verdict for the current (effective) context; `request_id` is the call's if it was
/// read already.
fn act(config: &FilterConfig, subject: &str, request_id: Option<String>, verdict: Verdict, now: u64) -> Acted {
    let metrics = with_worker(|w| w.metrics);
    match verdict {
        Verdict::Allow { held, .. } => {
            Metrics::add(metrics.allowed, 1);
            with_worker(|w| w.tracker.touch(subject, now));
            return Acted::LetThrough(held);
        }
        Verdict::Refuse { scope, needed, available } => {
            Metrics::add(metrics.refused, 1);
            with_worker(|w| w.tracker.touch(subject, now));
            let feature = config.pricing.scopes.get(scope).and_then(|s| s.feature.as_ref());
            reply(Problem::payment_required(subject, config.currency, feature, needed, available), request_id);
        }
        Verdict::UnknownCustomer => {
            Metrics::add(metrics.unknown_customer, 1);
            reply(Problem::unknown_customer(subject, config.subject.unknown_status), request_id);
        }
        Verdict::Unavailable { reason } => {
            Metrics::add(metrics.unavailable, 1);
            reply(Problem::unavailable(reason), request_id);
        }
        Verdict::AskLedger => {
            // Only reached when re-deciding a waiter whose read found nothing usable.
            Metrics::add(metrics.unavailable, 1);
            reply(Problem::unavailable("the credit ledger did not answer"), request_id);
        }
    }
    Acted::Answered
}

/// Acts on a verdict for a call that waited (the effective context); it keeps its admission, with
/// what it holds, if it is let through. `Pause` means the call was answered.
fn act_on_waiter(config: &FilterConfig, context_id: u32, verdict: Verdict, now: u64) -> Action {
    let Some(mut admission) = with_worker(|w| w.calls.remove(&context_id)) else {
        // Never let through what nothing was held for (a live waiting call always has one).
        reply(Problem::unavailable("the call's pricing was lost"), None);
        return Action::Pause;
    };
    match act(config, &admission.subject, admission.request_id.take(), verdict, now) {
        Acted::LetThrough(held) => {
            admission.held = Some(held);
            with_worker(|w| w.calls.insert(context_id, admission));
            Action::Continue
        }
        Acted::Answered => Action::Pause,
    }
}

/// Decides a call of `subject` that needs `holds` with `access`; and whether it was decided from
/// what the node holds (a cache hit).
fn decide(config: &FilterConfig, subject: &str, holds: &[Amount], now: u64, access: LedgerAccess) -> (Verdict, bool) {
    let (verdict, effects) = admit(&HostShared, config, subject, holds, now, access);
    let metrics = with_worker(|w| w.metrics);
    if effects.became_pending {
        registry::add(&HostShared, config, subject);
    }
    if effects.usage_dropped {
        Metrics::add(metrics.records_dropped, 1);
    }
    if effects.offline && matches!(verdict, Verdict::Allow { .. }) {
        Metrics::add(metrics.offline_allowed, 1);
    }
    let hit = effects.cache_hit && verdict != Verdict::AskLedger;
    (verdict, hit)
}

/// Decides a call of this worker that waits (its admission is in `Worker::calls`) with `access`.
fn decide_call(config: &FilterConfig, context_id: u32, now: u64, access: LedgerAccess) -> Verdict {
    let Some((subject, holds)) =
        with_worker(|w| w.calls.get(&context_id).map(|a| (a.subject.clone(), a.quote.holds.clone())))
    else {
        return Verdict::Unavailable { reason: "the call's pricing was lost" };
    };
    decide(config, &subject, &holds, now, access).0
}

/// Decides a call that waited for a read (the effective context), and resumes it or answers it;
/// `true` if it must wait for another read instead (the ledger has more credit than the top-up
/// set aside: calls that waited for the same one took it).
fn finish_waiting_call(config: &FilterConfig, context_id: u32, now: u64) -> bool {
    // This call has had its answer (or its chance): decide on what is known now.
    let asked = match access(now) {
        LedgerAccess::Reachable => LedgerAccess::Asked,
        unreachable => unreachable,
    };
    let verdict = decide_call(config, context_id, now, asked);
    if verdict == Verdict::AskLedger
        && with_worker(|w| w.calls.get(&context_id).is_some_and(|a| a.reads < MAX_READS_PER_CALL))
    {
        return true;
    }
    if act_on_waiter(config, context_id, verdict, now) == Action::Continue {
        let _ = hostcalls::resume_http_request();
    }
    false
}

/// Calls that could not be let wait for another read: decided as if the ledger were unreachable.
fn give_up_waiting(config: &FilterConfig, waiters: &[u32], now: u64) {
    for &id in waiters {
        if hostcalls::set_effective_context(id).is_ok() {
            let verdict = decide_call(config, id, now, LedgerAccess::Unreachable);
            if act_on_waiter(config, id, verdict, now) == Action::Continue {
                let _ = hostcalls::resume_http_request();
            }
        }
    }
}

impl Context for FilterCall {
    fn on_http_call_response(&mut self, token_id: u32, _num_headers: usize, body_size: usize, _num_trailers: usize) {
        let (Some(config), Some(subject)) = (self.config.clone(), self.subject.clone()) else { return };
        let Ok(config) = config.as_ref() else { return };
        let _ = token_id;
        if let Some(pending) = self.own_read.take() {
            let (status, body) = call_answer(body_size);
            absorb(config, &pending, status, body.as_deref());
            let now = now_ms();
            if finish_waiting_call(config, self.id, now) {
                match wait_for_read(config, self.id, &[self.id], &subject, now) {
                    Wait::Own(pending) => self.own_read = Some(pending),
                    Wait::Shared => {}
                    Wait::Failed => give_up_waiting(config, &[self.id], now),
                }
            }
            return;
        }
        let Some(read) = with_worker(|w| match w.reads.get(&subject) {
            Some(r) if r.owner == Some(self.id) => w.reads.remove(&subject),
            _ => None,
        }) else {
            return;
        };
        let (status, body) = call_answer(body_size);
        absorb(config, &read.pending, status, body.as_deref());
        let now = now_ms();
        let mut again = Vec::new();
        for waiter in read.waiters.iter().copied().filter(|w| *w != self.id) {
            if hostcalls::set_effective_context(waiter).is_ok() && finish_waiting_call(config, waiter, now) {
                again.push(waiter);
            }
        }
        let _ = hostcalls::set_effective_context(self.id);
        // This call owns the next read, so it waits for it too: its answer comes back here.
        if !again.is_empty() || finish_waiting_call(config, self.id, now) {
            again.push(self.id);
            if let Wait::Failed = wait_for_read(config, self.id, &again, &subject, now) {
                give_up_waiting(config, &again, now);
            }
        }
    }
}

impl FilterCall {
    /// Prices the call and decides it; `request_header` reads request headers, `request_id` is
    /// the call's if read already.
    fn price_and_decide(
        &mut self,
        config: &FilterConfig,
        subject: &str,
        request_header: &dyn Fn(&str) -> Option<String>,
        request_id: Option<String>,
        body: Option<&[u8]>,
    ) -> Action {
        let quote = pricing::quote(&config.pricing, config.price, request_header, body);
        let now = now_ms();
        // Each call counts once, when first decided: a hit if what the node holds decided it, a
        // miss if it waits for the ledger or was decided without it.
        let (verdict, hit) = decide(config, subject, &quote.holds, now, access(now));
        let metrics = with_worker(|w| w.metrics);
        Metrics::add(if hit { metrics.cache_hits } else { metrics.cache_misses }, 1);
        if verdict != Verdict::AskLedger {
            return match act(config, subject, request_id, verdict, now) {
                Acted::LetThrough(held) => {
                    self.admitted = Some((subject.to_owned(), quote, held));
                    Action::Continue
                }
                Acted::Answered => Action::Pause,
            };
        }
        // Cold miss: wait for the read already in flight for this customer, or start one (under
        // Kong every call reads for itself: see `Worker::on_kong`).
        let admission = Admission { subject: subject.to_owned(), quote, request_id, reads: 0, held: None };
        with_worker(|w| w.calls.insert(self.id, admission));
        self.subject = Some(subject.to_owned());
        match wait_for_read(config, self.id, &[self.id], subject, now) {
            Wait::Shared => Action::Pause,
            Wait::Own(pending) => {
                self.own_read = Some(pending);
                Action::Pause
            }
            Wait::Failed => {
                let verdict = decide_call(config, self.id, now, LedgerAccess::Unreachable);
                act_on_waiter(config, self.id, verdict, now)
            }
        }
    }

    /// Takes the call's admission once it was let through.
    fn take_admission(&mut self) {
        if self.admitted.is_none() {
            let admission = with_worker(|w| w.calls.remove(&self.id));
            if let Some(Admission { subject, quote, held: Some(held), .. }) = admission {
                self.admitted = Some((subject, quote, held));
            }
        }
    }

    /// Settles a call that was let through at what its response reported; returns the cost and
    /// the balance after it.
    fn settle(&mut self, config: &FilterConfig) -> Option<(Amount, Option<Amount>)> {
        self.take_admission();
        let (subject, quote, held) = self.admitted.take()?;
        let mut observed = self.reader.take().map(units::BodyReader::finish).unwrap_or_default();
        observed.resize(config.pricing.units.len(), None);
        for (seen, from_header) in observed.iter_mut().zip(&self.reported) {
            if from_header.is_some() {
                *seen = *from_header;
            }
        }
        let unreported = config
            .pricing
            .units
            .iter()
            .zip(&quote.units)
            .zip(&observed)
            .any(|((_, (_, is_final)), seen)| !is_final && seen.is_none());
        let actual = pricing::settle(&config.pricing, config.price, &quote, self.status, &observed);
        let now = now_ms();
        let settled = settle_call(&HostShared, config, &subject, &held, &actual, now);
        let metrics = with_worker(|w| {
            w.tracker.touch(&subject, now);
            w.metrics
        });
        if unreported && self.status.is_some_and(|s| s < 400) {
            Metrics::add(metrics.usage_unreported, 1);
        }
        if settled.effects.became_pending {
            registry::add(&HostShared, config, &subject);
        }
        if settled.effects.usage_dropped {
            Metrics::add(metrics.records_dropped, 1);
        }
        Some((actual.iter().copied().sum(), settled.balance))
    }
}

impl HttpContext for FilterCall {
    fn on_http_request_headers(&mut self, _num_headers: usize, end_of_stream: bool) -> Action {
        let Some(config) = self.config.clone() else { return Action::Continue };
        let config = match config.as_ref() {
            Ok(c) => c,
            Err(e) => {
                Metrics::add(with_worker(|w| w.metrics.misconfigured), 1);
                reply(Problem::invalid_config(e), None);
                return Action::Pause;
            }
        };
        let subject = header(MapType::HttpRequestHeaders, &config.subject.header).unwrap_or_default();
        let subject = subject.trim();
        let unverified = config
            .subject
            .require_headers
            .iter()
            .any(|h| header(MapType::HttpRequestHeaders, h).is_none_or(|v| v.trim().is_empty()));
        if subject.is_empty() || unverified {
            Metrics::add(with_worker(|w| w.metrics.unidentified), 1);
            reply(
                Problem::unidentified(
                    &config.subject.header,
                    &config.subject.require_headers,
                    config.subject.missing_status,
                ),
                None,
            );
            return Action::Pause;
        }
        if config.pricing.needs_request_body() && !end_of_stream {
            // Decided once the body is in. Neither host delivers the body to a filter that paused
            // the headers (Envoy turns that pause into "stop all iteration"), so the headers go
            // on; Kong reads the whole body before it contacts the upstream, Envoy sends the
            // headers and resets the upstream request if the call is refused.
            self.subject = Some(subject.to_owned());
            let headers = config
                .pricing
                .request_headers()
                .filter_map(|name| Some((name.to_owned(), header(MapType::HttpRequestHeaders, name)?)))
                .collect();
            self.awaiting_body = Some(EarlyHeaders { request_id: request_id(), units: headers });
            return Action::Continue;
        }
        self.price_and_decide(config, subject, &|name| header(MapType::HttpRequestHeaders, name), None, None)
    }

    fn on_http_request_body(&mut self, body_size: usize, end_of_stream: bool) -> Action {
        if self.awaiting_body.is_none() {
            return Action::Continue;
        }
        let (Some(config), Some(subject)) = (self.config.clone(), self.subject.clone()) else {
            return Action::Continue;
        };
        let Ok(config) = config.as_ref() else { return Action::Continue };
        let too_large = body_size > config.pricing.max_body_bytes;
        if !end_of_stream && !too_large {
            return Action::Pause; // the host buffers it until the end
        }
        let Some(EarlyHeaders { request_id, units: headers }) = self.awaiting_body.take() else {
            return Action::Continue;
        };
        let request_header = |name: &str| headers.iter().find(|(n, _)| n.as_str() == name).map(|(_, v)| v.clone());
        // A body over the limit is not read: the rules' default estimates apply.
        let body = if too_large {
            None
        } else {
            hostcalls::get_buffer(BufferType::HttpRequestBody, 0, body_size).ok().flatten()
        };
        self.price_and_decide(config, &subject, &request_header, request_id, body.as_deref())
    }

    fn on_http_response_headers(&mut self, _num_headers: usize, end_of_stream: bool) -> Action {
        let Some(config) = self.config.clone() else { return Action::Continue };
        let Ok(config) = config.as_ref() else { return Action::Continue };
        self.take_admission();
        if self.admitted.is_none() {
            return Action::Continue;
        }
        self.status = header(MapType::HttpResponseHeaders, ":status").and_then(|s| s.parse().ok());
        self.reported = config
            .pricing
            .units
            .iter()
            .map(|u| match &u.source {
                pricing::UnitSource::ResponseHeader(name) => {
                    header(MapType::HttpResponseHeaders, name).as_deref().and_then(units::from_text)
                }
                _ => None,
            })
            .collect();
        let failed = self.status.is_none_or(|s| s >= 400) && !config.pricing.charge_errors;
        if config.pricing.needs_response_body() && !end_of_stream && !failed {
            let content_type = header(MapType::HttpResponseHeaders, "content-type");
            self.reader = Some(units::BodyReader::new(&config.pricing, content_type.as_deref()));
            return Action::Continue;
        }
        // The cost is known now: settle, and tell the client.
        if let Some((cost, balance)) = self.settle(config) {
            if let Some(name) = &config.response_headers.cost {
                let _ = hostcalls::set_map_value(MapType::HttpResponseHeaders, name, Some(&cost.to_string()));
            }
            if let (Some(name), Some(balance)) = (&config.response_headers.balance, balance) {
                let _ = hostcalls::set_map_value(MapType::HttpResponseHeaders, name, Some(&balance.to_string()));
            }
        }
        Action::Continue
    }

    fn on_http_response_body(&mut self, body_size: usize, end_of_stream: bool) -> Action {
        let Some(reader) = &mut self.reader else { return Action::Continue };
        // A copy of each chunk as it passes; the response is never held back.
        if body_size > 0 {
            if let Ok(Some(chunk)) = hostcalls::get_buffer(BufferType::HttpResponseBody, 0, body_size) {
                reader.feed(&chunk);
            }
        }
        if end_of_stream {
            if let Some(Ok(config)) = self.config.clone().as_deref() {
                self.settle(config);
            }
        }
        Action::Continue
    }

    fn on_log(&mut self) {
        // A call let through settles now if its response did not complete (client gone,
        // upstream reset): with no response status it is an error, charged per
        // `pricing.charge_errors`.
        if let Some(Ok(config)) = self.config.clone().as_deref() {
            self.settle(config);
        }
        // A call that went away while waiting no longer waits.
        with_worker(|w| {
            w.calls.remove(&self.id);
            if let Some(subject) = &self.subject {
                if let Some(read) = w.reads.get_mut(subject) {
                    read.waiters.retain(|id| *id != self.id);
                    if read.owner == Some(self.id) {
                        read.owner = None;
                    }
                    if read.waiters.is_empty() && read.owner.is_none() {
                        w.reads.remove(subject);
                    }
                }
            }
        });
    }
}
