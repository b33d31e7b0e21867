//! One call through the filter, as a state machine: identify → price → check → wait for the
//! ledger? → let through or answer → complete when its response is done. The adapter hands each
//! callback here with the engine and the worker; nothing in this module calls the host directly.

use credits::limits::MAX_SUBJECT_LEN;
use credits::money::Printed;
use credits::Amount;

use crate::config::{ConfigError, FilterConfig, ResponseHeaders};
use crate::decision::{self, Admitted, Verdict};
use crate::engine::{ContextId, Engine, LedgerAnswer, Metric, Rules, Token};
use crate::pricing::{self, Quote, UnitSource};
use crate::problem::Problem;
use crate::units::BodyReader;
use crate::waiting::Waiter;
use crate::worker::{Acted, CallRef, Wait, Worker};

/// What a request callback tells the engine.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Flow {
    Continue,
    /// Hold the call: it waits for the ledger, the request body, or was answered locally.
    Pause,
}

/// The request as the filter reads it (request headers are readable until the request goes on).
pub trait Request {
    fn header(&self, name: &str) -> Option<String>;
    /// The engine's id of the request (Kong's `kong_request_id`, nginx's `request_id`, Envoy's
    /// `x-request-id`), for problem answers.
    fn id(&self) -> Option<String>;
}

/// What a call read of its request headers before they went on, waiting for its body.
#[derive(Debug)]
struct EarlyHeaders {
    subject: String,
    request_id: Option<String>,
    /// The headers unit rules read, by name.
    units: Vec<(String, String)>,
}

/// A call let through: what it holds until its response completes.
#[derive(Debug)]
struct Admission {
    subject: String,
    quote: Quote,
    admitted: Admitted,
}

/// What the response says so far, for a call that reads units from its body.
#[derive(Debug)]
struct Response {
    status: Option<u16>,
    /// Units the response headers reported, per rule.
    from_headers: Vec<Option<Amount>>,
    reader: BodyReader,
}

#[derive(Debug, Default)]
enum Stage {
    #[default]
    New,
    AwaitingBody(EarlyHeaders),
    /// Waiting for the ledger: its waiter lives in the worker, where any callback can decide it.
    Waiting,
    Admitted(Admission),
    Reading(Admission, Response),
    /// Answered locally, completed, or not metered.
    Done,
}

/// One call's filter state.
#[derive(Debug)]
pub struct Call {
    pub id: ContextId,
    stage: Stage,
}

impl Call {
    pub fn new(id: ContextId) -> Call {
        Call { id, stage: Stage::New }
    }

    /// Request headers: identify the customer, then price and decide the call (or wait for its
    /// body when a rule estimates from it).
    pub fn on_request_headers(
        &mut self,
        worker: &mut Worker,
        engine: &mut dyn Engine,
        config: &Result<FilterConfig, ConfigError>,
        request: &dyn Request,
        end_of_stream: bool,
    ) -> Flow {
        let config = match config {
            Ok(c) => c,
            Err(e) => {
                worker.count(Metric::CallsMisconfigured, 1);
                engine.reply(self.id, &Problem::invalid_config(e).with_request_id(request.id()));
                self.stage = Stage::Done;
                return Flow::Pause;
            }
        };
        let Some(subject) = identify(config, request) else {
            worker.count(Metric::CallsUnidentified, 1);
            let s = &config.subject;
            let problem = Problem::unidentified(&s.header, &s.require_headers, s.missing_status);
            engine.reply(self.id, &problem.with_request_id(request.id()));
            self.stage = Stage::Done;
            return Flow::Pause;
        };
        if subject.len() > MAX_SUBJECT_LEN {
            // No customer can have it (the ledger refuses longer subject keys): answered here,
            // without a round trip.
            worker.count(Metric::CallsUnknownCustomer, 1);
            let shown: String = subject.chars().take(64).collect();
            let problem = Problem::unknown_customer(&format!("{shown}…"), config.subject.unknown_status);
            engine.reply(self.id, &problem.with_request_id(request.id()));
            self.stage = Stage::Done;
            return Flow::Pause;
        }
        if config.pricing.needs_request_body() && !end_of_stream && !bodiless(engine.rules(), request) {
            // Decided once the body is in. Neither engine delivers the body to a filter that
            // paused the headers (Envoy turns that pause into "stop all iteration"), so the
            // headers go on; Kong reads the whole body before it contacts the upstream, Envoy
            // resets the upstream request if the call is refused.
            let units = config
                .pricing
                .request_headers()
                .filter_map(|name| Some((name.to_owned(), request.header(name)?)))
                .collect();
            self.stage = Stage::AwaitingBody(EarlyHeaders { subject, request_id: request.id(), units });
            return Flow::Continue;
        }
        let quote = pricing::quote(&config.pricing, config.price, &|name| request.header(name), None);
        // The request id is read only for an answer or a wait: a call let through needs none.
        self.decide(worker, engine, config, subject, quote, &|| request.id())
    }

    /// Request body: a call that estimates from it is priced and decided once it is complete (or
    /// larger than `pricing.max_body_bytes`, which is not read: the default estimates apply).
    pub fn on_request_body(
        &mut self,
        worker: &mut Worker,
        engine: &mut dyn Engine,
        config: &FilterConfig,
        body_size: usize,
        end_of_stream: bool,
        read_body: &dyn Fn(usize) -> Option<Vec<u8>>,
    ) -> Flow {
        if !matches!(self.stage, Stage::AwaitingBody(_)) {
            return Flow::Continue;
        }
        let too_large = body_size > config.pricing.max_body_bytes;
        if !end_of_stream && !too_large {
            return Flow::Pause; // the engine buffers it until the end
        }
        let Stage::AwaitingBody(early) = std::mem::take(&mut self.stage) else { return Flow::Continue };
        let body = if too_large { None } else { read_body(body_size) };
        let header = |name: &str| early.units.iter().find(|(n, _)| n == name).map(|(_, v)| v.clone());
        let quote = pricing::quote(&config.pricing, config.price, &header, body.as_deref());
        self.decide(worker, engine, config, early.subject, quote, &|| early.request_id.clone())
    }

    /// Decides a priced call from what the node holds, or makes it wait for the ledger.
    fn decide(
        &mut self,
        worker: &mut Worker,
        engine: &mut dyn Engine,
        config: &FilterConfig,
        subject: String,
        quote: Quote,
        request_id: &dyn Fn() -> Option<String>,
    ) -> Flow {
        // One clock read for the whole call (each is a host call): its completion takes the
        // worker's recent time.
        let now_ms = worker.now_ms(engine);
        let access = worker.access(now_ms);
        let (verdict, hit) = worker.decide(engine, config, &subject, &quote, access, now_ms);
        // Each call counts once, when first decided: a hit if what the node holds decided it,
        // a miss if it waits for the ledger or was decided without it.
        worker.count(if hit { Metric::CacheHits } else { Metric::CacheMisses }, 1);
        if verdict != Verdict::AskLedger {
            let call = CallRef { context: self.id, subject: &subject, request_id };
            return match worker.act(engine, config, call, verdict, now_ms) {
                Acted::LetThrough(admitted) => {
                    self.stage = Stage::Admitted(Admission { subject, quote, admitted });
                    Flow::Continue
                }
                Acted::Answered => {
                    self.stage = Stage::Done;
                    Flow::Pause
                }
            };
        }
        worker.waiting.add(self.id, Waiter::new(&subject, quote, request_id(), now_ms));
        self.stage = Stage::Waiting;
        match worker.wait(engine, config, self.id, &[self.id], &subject) {
            Wait::Read => Flow::Pause,
            // Decided at once as if the ledger were unreachable: let through or answered.
            Wait::GaveUp => self.take_admission(worker),
        }
    }

    /// Does the call read units from its response body (so the adapter must hand it the chunks)?
    pub fn reads_response_body(&self) -> bool {
        matches!(self.stage, Stage::Reading(..))
    }

    /// A dispatch of this call was answered (or failed: `answer.status` is `None`).
    pub fn on_ledger_answer(
        &mut self,
        worker: &mut Worker,
        engine: &mut dyn Engine,
        config: &FilterConfig,
        token: Token,
        answer: &LedgerAnswer,
    ) {
        worker.on_read_answer(engine, config, self.id, token, answer);
    }

    /// A call that waited takes back what it holds once it was let through; `Continue` if so.
    fn take_admission(&mut self, worker: &mut Worker) -> Flow {
        if !matches!(self.stage, Stage::Waiting) {
            return if matches!(self.stage, Stage::Admitted(_)) { Flow::Continue } else { Flow::Pause };
        }
        match worker.take_admission(self.id) {
            Some((waiter, admitted)) => {
                self.stage = Stage::Admitted(Admission { subject: waiter.subject, quote: waiter.quote, admitted });
                Flow::Continue
            }
            None => Flow::Pause,
        }
    }

    /// The call reached its response still waiting for a request body no callback delivered. Not
    /// expected (`bodiless` decides a call without one at its headers), but if an engine does it,
    /// the call went upstream undecided: it is charged at its default estimates' price, and counted.
    fn undecided_without_body(&mut self, worker: &mut Worker, config: &FilterConfig) {
        if !matches!(self.stage, Stage::AwaitingBody(_)) {
            return;
        }
        if let Stage::AwaitingBody(early) = std::mem::take(&mut self.stage) {
            worker.count(Metric::CallsResumedUndecided, 1);
            let header = |name: &str| early.units.iter().find(|(n, _)| n == name).map(|(_, v)| v.clone());
            let quote = pricing::quote(&config.pricing, config.price, &header, None);
            let admitted = Admitted { held: Vec::new(), balance: None };
            self.stage = Stage::Admitted(Admission { subject: early.subject, quote, admitted });
        }
    }

    /// The call reached its response while the filter still had it waiting: the engine let it
    /// through undecided (Kong 3.8 resumes a call whose dispatch failed). It holds nothing but is
    /// charged all the same, and counted.
    fn resumed_undecided(&mut self, worker: &mut Worker) {
        if let Some(waiter) = worker.waiting.take(self.id) {
            worker.waiting.gone(self.id);
            worker.count(Metric::CallsResumedUndecided, 1);
            let admitted = Admitted { held: Vec::new(), balance: None };
            self.stage = Stage::Admitted(Admission { subject: waiter.subject, quote: waiter.quote, admitted });
        }
    }

    /// Response headers: the cost is known now unless units come from the body; the headers to
    /// add to the response (cost and balance) are returned.
    pub fn on_response_headers(
        &mut self,
        worker: &mut Worker,
        engine: &mut dyn Engine,
        config: &FilterConfig,
        response: &dyn Request,
        end_of_stream: bool,
    ) -> Option<Charged> {
        if matches!(self.stage, Stage::Waiting) && self.take_admission(worker) == Flow::Pause {
            self.resumed_undecided(worker);
        }
        self.undecided_without_body(worker, config);
        let Stage::Admitted(admission) = std::mem::take(&mut self.stage) else {
            self.stage = Stage::Done;
            return None;
        };
        let status = response.header(":status").and_then(|s| s.parse().ok());
        let from_headers = config
            .pricing
            .units
            .iter()
            .map(|u| match &u.source {
                UnitSource::ResponseHeader(name) => response.header(name).as_deref().and_then(pricing::count_from_text),
                _ => None,
            })
            .collect();
        let failed = status.is_none_or(|s: u16| s >= 400) && !config.pricing.charge_errors;
        if config.pricing.needs_response_body() && !end_of_stream && !failed {
            let content_type = response.header("content-type");
            let reader = BodyReader::new(&config.pricing, content_type.as_deref());
            self.stage = Stage::Reading(admission, Response { status, from_headers, reader });
            return None;
        }
        complete(worker, engine, config, admission, status, from_headers)
    }

    /// A chunk of the response body (a copy: the response is never held back).
    pub fn on_response_body(
        &mut self,
        worker: &mut Worker,
        engine: &mut dyn Engine,
        config: &FilterConfig,
        chunk: Option<&[u8]>,
        end_of_stream: bool,
    ) {
        let Stage::Reading(_, response) = &mut self.stage else { return };
        if let Some(chunk) = chunk {
            response.reader.feed(chunk);
        }
        if end_of_stream {
            self.complete_now(worker, engine, config);
        }
    }

    /// The call is over. One let through whose response did not complete (client gone, upstream
    /// reset) completes now: with no response status it is an error, charged per
    /// `pricing.charge_errors`. One still waiting no longer waits.
    pub fn on_log(&mut self, worker: &mut Worker, engine: &mut dyn Engine, config: &FilterConfig) {
        if matches!(self.stage, Stage::Waiting) {
            self.take_admission(worker);
        }
        self.complete_now(worker, engine, config);
        worker.waiting.gone(self.id);
        self.stage = Stage::Done;
    }

    fn complete_now(&mut self, worker: &mut Worker, engine: &mut dyn Engine, config: &FilterConfig) {
        match std::mem::replace(&mut self.stage, Stage::Done) {
            Stage::Admitted(admission) => {
                let from_headers = vec![None; config.pricing.units.len()];
                complete(worker, engine, config, admission, None, from_headers);
            }
            Stage::Reading(admission, response) => {
                let mut observed = response.reader.finish();
                observed.resize(config.pricing.units.len(), None);
                for (seen, from_header) in observed.iter_mut().zip(&response.from_headers) {
                    if from_header.is_some() {
                        *seen = *from_header;
                    }
                }
                complete(worker, engine, config, admission, response.status, observed);
            }
            other => self.stage = other,
        }
    }
}

/// Does a request whose headers did not end the stream have no body all the same? Kong's engine
/// passes `end_of_stream = false` to every request's headers and calls `on_request_body` only for
/// a body that is not empty, so there a request that declares no body (no `transfer-encoding`, a
/// `content-length` absent or zero) is decided at its headers. Envoy says so at the headers.
fn bodiless(rules: Rules, request: &dyn Request) -> bool {
    rules == Rules::Nginx
        && request.header("transfer-encoding").is_none()
        && request.header("content-length").is_none_or(|n| n.trim() == "0")
}

/// The call's subject, if it names one (with every header `subject.require_headers` asks for).
fn identify(config: &FilterConfig, request: &dyn Request) -> Option<String> {
    let subject = request.header(&config.subject.header)?;
    let trimmed = subject.trim();
    let verified =
        config.subject.require_headers.iter().all(|h| request.header(h).is_some_and(|v| !v.trim().is_empty()));
    if trimmed.is_empty() || !verified {
        return None;
    }
    // The header's own string unless there was something to trim (a copy per call otherwise).
    Some(if trimmed.len() == subject.len() { subject } else { trimmed.to_owned() })
}

/// What a call completed at its response headers cost, and the balance after it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Charged {
    pub cost: Amount,
    pub balance: Option<Amount>,
}

impl Charged {
    /// The response headers `names` asks for, each value printed on the stack.
    pub fn headers<'n>(&self, names: &'n ResponseHeaders) -> impl Iterator<Item = (&'n str, Printed)> {
        let cost = names.cost.as_deref().map(|name| (name, self.cost.printed()));
        let balance = names.balance.as_deref().zip(self.balance).map(|(name, b)| (name, b.printed()));
        cost.into_iter().chain(balance)
    }
}

/// Completes a call at what its response reported (`observed`, per rule): what it cost and the
/// balance after it. A scope whose entry could not be written is retried by the worker's tick.
fn complete(
    worker: &mut Worker,
    engine: &mut dyn Engine,
    config: &FilterConfig,
    admission: Admission,
    status: Option<u16>,
    observed: Vec<Option<Amount>>,
) -> Option<Charged> {
    let Admission { subject, quote, admitted: Admitted { held, balance } } = admission;
    let unreported = quote.units.iter().zip(&observed).any(|((_, is_final), seen)| !is_final && seen.is_none());
    if unreported && status.is_some_and(|s| s < 400) && !config.pricing.units.is_empty() {
        worker.count(Metric::CallsUsageUnreported, 1);
    }
    let cost = pricing::cost(&config.pricing, config.price, &quote, status, &observed);
    let now_ms = worker.recent_ms(engine);
    worker.tracker.touch(&subject, now_ms);
    if !held.is_empty() && held.iter().zip(&cost).all(|(h, c)| h.charged && h.amount == *c) {
        // Charged when it was let through, at what it cost (`pricing::charging`): nothing to
        // write. One that cost less (an upstream error) is completed below: refunded.
        return Some(Charged { cost: cost.iter().copied().sum(), balance });
    }
    let completed = decision::complete(engine.shared(), config, &subject, &held, &cost, now_ms);
    if completed.effects.became_pending {
        worker.register(engine, config, &[&subject]);
    }
    worker.count(Metric::RecordsDropped, u64::from(completed.effects.usage_dropped));
    if completed.effects.contended {
        worker.retry_completion(&subject, &held, &cost, &completed.done);
    }
    Some(Charged { cost: cost.iter().copied().sum(), balance: completed.balance })
}

#[cfg(test)]
#[path = "call_tests.rs"]
mod tests;
