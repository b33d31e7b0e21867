//! The proxy-wasm adapter, the only code that calls the host: it implements [`Engine`] with
//! proxy-wasm host calls and hands every callback to the root's [`Worker`] or the request's
//! [`Call`]. It decides nothing. Every host call goes through `hostcalls` and its `Result`, so
//! nothing here can panic.

use std::cell::{Cell, OnceCell, RefCell};
use std::rc::Rc;
use std::time::{Duration, UNIX_EPOCH};

use proxy_wasm::hostcalls;
use proxy_wasm::traits::{Context, HttpContext, RootContext};
use proxy_wasm::types::{Action, BufferType, ContextType, LogLevel, MapType, MetricType};

use crate::call::{Call, Flow, Request};
use crate::config::{ConfigError, FilterConfig};
use crate::engine::{ContextId, DispatchRefused, Engine, LedgerAnswer, LedgerCall, Metric, Rules, Token};
use crate::problem::Problem;
use crate::shared::{CasMismatch, SharedData};
use crate::worker::Worker;

proxy_wasm::main! {{
    proxy_wasm::set_log_level(LogLevel::Info);
    std::panic::set_hook(Box::new(|info| {
        let _ = hostcalls::log(LogLevel::Critical, &format!("prepaid_credits panicked: {info}"));
    }));
    proxy_wasm::set_root_context(|id| -> Box<dyn RootContext> { Box::new(FilterRoot { id, ..FilterRoot::default() }) });
}}

/// The host's shared data, errors mapped to a lost compare-and-swap (retried, then counted).
struct HostShared;

impl SharedData for HostShared {
    fn get(&self, key: &str) -> (Option<Vec<u8>>, Option<u32>) {
        hostcalls::get_shared_data(key).unwrap_or((None, None))
    }

    fn set(&self, key: &str, value: &[u8], cas: Option<u32>) -> Result<(), CasMismatch> {
        hostcalls::set_shared_data(key, Some(value), cas).map_err(|_| CasMismatch)
    }

    fn delete(&self, key: &str, cas: Option<u32>) -> Result<(), CasMismatch> {
        hostcalls::set_shared_data(key, None, cas).map_err(|_| CasMismatch)
    }

    /// Before the first request tells the engine apart, a blind create (both engines insert).
    fn create_cas(&self) -> Option<u32> {
        match RULES.get() {
            Some(Rules::Envoy) => Some(crate::shared::ENVOY_CREATE_CAS),
            Some(Rules::Nginx) | None => None,
        }
    }

    fn fresh_origin(&self) -> u64 {
        crate::node::random_u64(0)
    }
}

thread_local! {
    /// The engine's rules, learnt from the first request (see [`detect_rules`]).
    static RULES: Cell<Option<Rules>> = const { Cell::new(None) };
    /// Metric ids, defined once per VM (`ledger_rtt_ms` last).
    static METRICS: OnceCell<Vec<u32>> = const { OnceCell::new() };
}

/// ngx_wasm_module serves any nginx variable as an `ngx.*` property; Envoy has no such
/// namespace. (Kong's own `ngx.kong_request_id` is not there in a bare nginx.) Read in a request
/// context: Kong ≤ 3.9 may crash on request-scoped properties read from a root context.
fn detect_rules() -> Rules {
    if let Some(rules) = RULES.get() {
        return rules;
    }
    let nginx = hostcalls::get_property(vec!["ngx", "nginx_version"]).ok().flatten().is_some();
    let rules = if nginx { Rules::Nginx } else { Rules::Envoy };
    RULES.set(Some(rules));
    rules
}

/// The id of metric `index` of [`Metric::ALL`] (`ledger_rtt_ms` after them), defining them all
/// on first use; 0 if the engine refused.
fn metric_id(index: usize) -> u32 {
    METRICS.with(|m| {
        let ids = m.get_or_init(|| {
            let mut ids: Vec<u32> = Metric::ALL
                .iter()
                .map(|m| hostcalls::define_metric(MetricType::Counter, m.name()).unwrap_or(0))
                .collect();
            ids.push(hostcalls::define_metric(MetricType::Histogram, "ledger_rtt_ms").unwrap_or(0));
            ids
        });
        ids.get(index).copied().unwrap_or(0)
    })
}

/// The engine as seen from the callback of context `running`.
struct Host {
    running: ContextId,
    /// ngx_wasm_module loses the body of a local response made in the callback of a failed
    /// dispatch (its buffer is recycled with the dispatch's socket: the client gets the body's
    /// length and no body, a broken response): such replies carry the problem's detail in an
    /// `x-credits-problem` header and no body.
    bodiless_replies: bool,
}

impl Host {
    fn new(running: ContextId) -> Host {
        Host { running, bodiless_replies: false }
    }
}

impl Engine for Host {
    fn rules(&self) -> Rules {
        RULES.get().unwrap_or(Rules::Envoy)
    }

    fn now_ms(&self) -> u64 {
        hostcalls::get_current_time()
            .ok()
            .and_then(|t| t.duration_since(UNIX_EPOCH).ok())
            .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
    }

    fn shared(&self) -> &dyn SharedData {
        &HostShared
    }

    fn dispatch(&mut self, call: &LedgerCall<'_>) -> Result<Token, DispatchRefused> {
        let headers: Vec<(&str, &str)> = call.headers.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
        let timeout = Duration::from_millis(u64::from(call.timeout_ms));
        hostcalls::dispatch_http_call(call.upstream, headers, Some(call.body), vec![], timeout)
            .map_err(|status| DispatchRefused(format!("{status:?}")))
    }

    fn reply(&mut self, context: ContextId, problem: &Problem) {
        let bodiless = self.bodiless_replies;
        self.acting_on(context, || {
            let status = u32::from(problem.status);
            let _ = if bodiless {
                let detail = problem.body["detail"].as_str().unwrap_or_default();
                hostcalls::send_http_response(status, vec![("x-credits-problem", detail)], None)
            } else {
                let body = problem.body_bytes();
                hostcalls::send_http_response(status, vec![("content-type", "application/problem+json")], Some(&body))
            };
        });
    }

    fn resume(&mut self, context: ContextId) {
        self.acting_on(context, || {
            let _ = hostcalls::resume_http_request();
        });
    }

    fn count(&mut self, metric: Metric, n: u64) {
        let id = metric_id(metric as usize);
        if id != 0 {
            let _ = hostcalls::increment_metric(id, i64::try_from(n).unwrap_or(i64::MAX));
        }
    }

    fn record_rtt(&mut self, ms: u64) {
        let id = metric_id(Metric::ALL.len());
        if id != 0 {
            let _ = hostcalls::record_metric(id, ms);
        }
    }
}

impl Host {
    /// Runs `act` on call `context`: Envoy needs it made the effective context when it is not the
    /// running one (the worker never asks that of ngx_wasm_module, which ignores it).
    fn acting_on(&self, context: ContextId, act: impl FnOnce()) {
        let other = context != self.running;
        if other {
            let _ = hostcalls::set_effective_context(context);
        }
        act();
        if other {
            let _ = hostcalls::set_effective_context(self.running);
        }
    }
}

type Shared<T> = Rc<RefCell<T>>;
type Configured = Rc<Result<FilterConfig, ConfigError>>;

/// A root context: one per configuration in each worker, with its worker.
#[derive(Default)]
struct FilterRoot {
    id: ContextId,
    config: Option<Configured>,
    worker: Option<Shared<Worker>>,
    ticking: bool,
}

impl Context for FilterRoot {
    fn on_http_call_response(&mut self, token_id: u32, _num_headers: usize, body_size: usize, _num_trailers: usize) {
        let (Some(Ok(config)), Some(worker)) = (self.config.as_deref(), &self.worker) else { return };
        let answer = ledger_answer(body_size);
        worker.borrow_mut().on_sync_answer(&mut Host::new(self.id), config, token_id, &answer);
    }
}

impl RootContext for FilterRoot {
    fn on_vm_start(&mut self, _vm_configuration_size: usize) -> bool {
        metric_id(0);
        true
    }

    fn on_configure(&mut self, _plugin_configuration_size: usize) -> bool {
        let bytes =
            hostcalls::get_buffer(BufferType::PluginConfiguration, 0, usize::MAX).ok().flatten().unwrap_or_default();
        let parsed = FilterConfig::parse(&bytes);
        match &parsed {
            Ok(c) if c.ledger.upstream_is_host_name() => log::warn!(
                "prepaid_credits: ledger.upstream {:?} is a host name: under Kong it is resolved by nginx's \
                 resolver (not /etc/hosts) and the lookup is not covered by ledger.timeout_ms; prefer ip:port",
                c.ledger.upstream
            ),
            Ok(_) => {}
            // Never refuse the configuration (Kong would block its whole config update): every
            // call is answered with a 500 naming the field instead.
            Err(e) => log::error!("prepaid_credits: {e}; every call will be answered with 500"),
        }
        let worker = self.worker.get_or_insert_with(|| {
            let host = Host::new(self.id);
            Rc::new(RefCell::new(Worker::start(&host, crate::node::random_u64(host.now_ms()))))
        });
        if let Ok(config) = &parsed {
            worker.borrow_mut().reconfigure(config);
        }
        let interval = parsed.as_ref().map_or(1000, |c| c.sync.interval_ms);
        self.config = Some(Rc::new(parsed));
        // Kong traps on a second non-zero tick period: set it once per root context.
        if !self.ticking {
            self.ticking = hostcalls::set_tick_period(Duration::from_millis(u64::from(interval))).is_ok();
        }
        true
    }

    fn on_tick(&mut self) {
        let (Some(Ok(config)), Some(worker)) = (self.config.as_deref(), &self.worker) else { return };
        worker.borrow_mut().on_tick(&mut Host::new(self.id), config);
    }

    fn get_type(&self) -> Option<ContextType> {
        Some(ContextType::HttpContext)
    }

    fn create_http_context(&self, context_id: u32) -> Option<Box<dyn HttpContext>> {
        Some(Box::new(FilterCall {
            call: Call::new(context_id),
            config: self.config.clone(),
            worker: self.worker.clone(),
        }))
    }
}

/// One request through the filter.
struct FilterCall {
    call: Call,
    config: Option<Configured>,
    worker: Option<Shared<Worker>>,
}

impl FilterCall {
    /// Runs `f` with the call's configuration (a valid one) and worker.
    fn with<R>(&mut self, f: impl FnOnce(&mut Call, &mut Worker, &mut Host, &FilterConfig) -> R) -> Option<R> {
        let (Some(Ok(config)), Some(worker)) = (self.config.as_deref(), &self.worker) else { return None };
        let mut host = Host::new(self.call.id);
        Some(f(&mut self.call, &mut worker.borrow_mut(), &mut host, config))
    }
}

/// The request or response headers of the running call.
struct Headers(MapType);

impl Request for Headers {
    fn header(&self, name: &str) -> Option<String> {
        header_text(self.0, name)
    }

    fn id(&self) -> Option<String> {
        let nginx = || {
            let kong = hostcalls::get_property(vec!["ngx", "kong_request_id"]).ok().flatten();
            kong.or_else(|| hostcalls::get_property(vec!["ngx", "request_id"]).ok().flatten())
        };
        let id = match RULES.get() {
            Some(Rules::Nginx) => nginx(),
            _ => hostcalls::get_map_value_bytes(MapType::HttpRequestHeaders, "x-request-id").ok().flatten(),
        };
        id.and_then(|b| String::from_utf8(b).ok())
    }
}

/// A header's value as text; one that is not UTF-8 (clients may send any bytes) reads as absent.
/// Read as bytes: the SDK's string reader panics on such a value, and a panic traps the instance.
fn header_text(map: MapType, name: &str) -> Option<String> {
    let bytes = hostcalls::get_map_value_bytes(map, name).ok().flatten()?;
    String::from_utf8(bytes).ok()
}

fn flow(flow: Flow) -> Action {
    match flow {
        Flow::Continue => Action::Continue,
        Flow::Pause => Action::Pause,
    }
}

/// The answer to a dispatch, read in its callback (`status` is `None` when the engine reports a
/// failure).
fn ledger_answer(body_size: usize) -> LedgerAnswer {
    let status = header_text(MapType::HttpCallResponseHeaders, ":status").and_then(|s| s.parse().ok());
    let body = hostcalls::get_buffer(BufferType::HttpCallResponseBody, 0, body_size).ok().flatten();
    LedgerAnswer { status, body }
}

impl Context for FilterCall {
    fn on_http_call_response(&mut self, token_id: u32, _num_headers: usize, body_size: usize, _num_trailers: usize) {
        let answer = ledger_answer(body_size);
        let bodiless = answer.status.is_none() && RULES.get() == Some(Rules::Nginx);
        self.with(|call, worker, host, config| {
            host.bodiless_replies = bodiless;
            call.on_ledger_answer(worker, host, config, token_id, &answer)
        });
    }
}

impl HttpContext for FilterCall {
    fn on_http_request_headers(&mut self, _num_headers: usize, end_of_stream: bool) -> Action {
        detect_rules();
        let (Some(config), Some(worker)) = (self.config.clone(), self.worker.clone()) else { return Action::Continue };
        let mut host = Host::new(self.call.id);
        let request = Headers(MapType::HttpRequestHeaders);
        let decided =
            self.call.on_request_headers(&mut worker.borrow_mut(), &mut host, &config, &request, end_of_stream);
        flow(decided)
    }

    fn on_http_request_body(&mut self, body_size: usize, end_of_stream: bool) -> Action {
        let read = |size: usize| hostcalls::get_buffer(BufferType::HttpRequestBody, 0, size).ok().flatten();
        let decided = self.with(|call, worker, host, config| {
            call.on_request_body(worker, host, config, body_size, end_of_stream, &read)
        });
        flow(decided.unwrap_or(Flow::Continue))
    }

    fn on_http_response_headers(&mut self, _num_headers: usize, end_of_stream: bool) -> Action {
        let response = Headers(MapType::HttpResponseHeaders);
        let (Some(Ok(config)), Some(worker)) = (self.config.as_deref(), &self.worker) else { return Action::Continue };
        let mut host = Host::new(self.call.id);
        let charged =
            self.call.on_response_headers(&mut worker.borrow_mut(), &mut host, config, &response, end_of_stream);
        for (name, value) in charged.iter().flat_map(|c| c.headers(&config.response_headers)) {
            let _ = hostcalls::set_map_value(MapType::HttpResponseHeaders, name, Some(value.as_str()));
        }
        Action::Continue
    }

    fn on_http_response_body(&mut self, body_size: usize, end_of_stream: bool) -> Action {
        if !self.call.reads_response_body() {
            return Action::Continue;
        }
        let chunk = if body_size > 0 {
            hostcalls::get_buffer(BufferType::HttpResponseBody, 0, body_size).ok().flatten()
        } else {
            None
        };
        self.with(|call, worker, host, config| {
            call.on_response_body(worker, host, config, chunk.as_deref(), end_of_stream)
        });
        Action::Continue
    }

    fn on_log(&mut self) {
        self.with(|call, worker, host, config| call.on_log(worker, host, config));
    }
}
