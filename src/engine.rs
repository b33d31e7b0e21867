//! The proxy-wasm engine as the filter uses it: clock, shared data, ledger dispatches, local
//! replies, resuming a paused call, metrics. The adapter (`host`) implements it with proxy-wasm
//! host calls; native tests and the simulator implement it with [`fake::FakeEngine`], which
//! enforces each engine's rules, so the filter's logic runs the same everywhere.
//!
//! The two engines differ in ways the filter must respect (see `kong-config/README.md` for the
//! sources in ngx_wasm_module):
//! - **Envoy** answers a dispatch in the context that made it, and `set_effective_context` lets
//!   one callback resume or answer any other call of the worker.
//! - **ngx_wasm_module** (Kong's engine) ignores `set_effective_context`: a host call acts on the
//!   call whose callback is running, so a call can only be resumed or answered from its own
//!   callbacks. A trap there is worse than a lost call: a dispatch still pending when the instance
//!   traps crashes the worker when its answer arrives. So every rule below is one the filter must
//!   never break.

use crate::problem::Problem;
use crate::shared::SharedData;

/// A context (a call, or the root) as the engine numbers it.
pub type ContextId = u32;
/// A dispatched ledger request, as the engine numbers it.
pub type Token = u32;

/// Which engine's rules apply.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Rules {
    Envoy,
    /// ngx_wasm_module, in Kong or a bare nginx.
    Nginx,
}

impl Rules {
    /// Can a callback of one call resume or answer another call of the worker?
    pub fn acts_on_other_contexts(self) -> bool {
        self == Rules::Envoy
    }

    /// How much less than a dispatch's timeout the clock the filter reads may show when the
    /// engine fails the dispatch at that timeout. ngx_wasm_module times it on nginx's monotonic
    /// millisecond clock (`ngx_add_timer` on `ngx_current_msec`) while `get_current_time` reads
    /// the wall clock (`ngx_timeofday`), each cut to the millisecond at its own phase
    /// (`tests/kong_clock.rs` measures it on the real engine). Not asked under Envoy, where no
    /// read is cut short to its call's wait.
    pub fn timeout_early_ms(self) -> u64 {
        match self {
            Rules::Envoy => 0,
            Rules::Nginx => 1,
        }
    }

    /// May the root context dispatch from its answer to a dispatch (a tick's sync)? Envoy lets
    /// it; under ngx_wasm_module (3bed278) the nginx worker died (signal 11) at each tick whose
    /// sync's answer sent the next sync, measured on the real engine with 30,000 customers
    /// (bench/RESULTS.md §0y). A worker's syncs therefore all leave from the tick.
    pub fn root_dispatches_from_answers(self) -> bool {
        self == Rules::Envoy
    }
}

/// The callback the engine is running, which decides what host calls it allows.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Phase {
    Configure,
    Tick,
    RequestHeaders,
    RequestBody,
    ResponseHeaders,
    ResponseBody,
    /// The answer to a dispatch.
    CallResponse,
    Log,
}

impl Phase {
    /// ngx_wasm_module traps a dispatch from any other callback.
    pub fn may_dispatch(self) -> bool {
        matches!(self, Phase::Tick | Phase::RequestHeaders | Phase::RequestBody | Phase::CallResponse)
    }

    /// ngx_wasm_module (Kong 3.7+) allows a local response in request callbacks, dispatch answers
    /// and response headers (Envoy answers the effective context from any callback).
    pub fn may_reply(self) -> bool {
        matches!(self, Phase::RequestHeaders | Phase::RequestBody | Phase::CallResponse | Phase::ResponseHeaders)
    }
}

/// A request to the ledger (always `POST {base_path}/gateway/sync` with a JSON body).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LedgerCall<'a> {
    pub upstream: &'a str,
    pub headers: &'a [(String, String)],
    pub body: &'a [u8],
    pub timeout_ms: u32,
}

/// The engine refused to dispatch (an unknown cluster, a full circuit breaker).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DispatchRefused(pub String);

/// What the engine hands the filter when a dispatch completes: `status` is `None` when the
/// engine reports a failure (timeout, reset; Kong 3.9 passes no headers then).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct LedgerAnswer {
    pub status: Option<u16>,
    pub body: Option<Vec<u8>>,
}

/// The filter's counters and histogram. Counters are kept in the worker and handed to the engine
/// once per tick as deltas: a call costs no metric host call.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Metric {
    CallsAllowed,
    CallsRefused,
    CallsUnidentified,
    CallsUnknownCustomer,
    CallsUnavailable,
    CallsMisconfigured,
    CallsAllowedOffline,
    CacheHits,
    CacheMisses,
    SyncBatches,
    SyncFailures,
    RecordsQueued,
    RecordsConfirmed,
    RecordsDropped,
    CallsUsageUnreported,
    /// Calls the engine resumed before the filter decided them (Kong 3.8 resumes a call whose
    /// dispatch failed): charged their cost, counted here.
    CallsResumedUndecided,
    SharedDataFailures,
    /// Entries a worker kept in sync that it found gone or rebuilt (the host evicted them): the
    /// calls they had not yet reported are lost.
    SharedEntriesEvicted,
}

impl Metric {
    pub const ALL: [Metric; 18] = [
        Metric::CallsAllowed,
        Metric::CallsRefused,
        Metric::CallsUnidentified,
        Metric::CallsUnknownCustomer,
        Metric::CallsUnavailable,
        Metric::CallsMisconfigured,
        Metric::CallsAllowedOffline,
        Metric::CacheHits,
        Metric::CacheMisses,
        Metric::SyncBatches,
        Metric::SyncFailures,
        Metric::RecordsQueued,
        Metric::RecordsConfirmed,
        Metric::RecordsDropped,
        Metric::CallsUsageUnreported,
        Metric::CallsResumedUndecided,
        Metric::SharedDataFailures,
        Metric::SharedEntriesEvicted,
    ];

    /// The name the engine exports (Envoy: `wasmcustom.<name>`; Kong: `pw:prepaid_credits:<name>`).
    pub fn name(self) -> &'static str {
        match self {
            Metric::CallsAllowed => "calls_allowed",
            Metric::CallsRefused => "calls_refused",
            Metric::CallsUnidentified => "calls_unidentified",
            Metric::CallsUnknownCustomer => "calls_unknown_customer",
            Metric::CallsUnavailable => "calls_unavailable",
            Metric::CallsMisconfigured => "calls_misconfigured",
            Metric::CallsAllowedOffline => "calls_allowed_offline",
            Metric::CacheHits => "cache_hits",
            Metric::CacheMisses => "cache_misses",
            Metric::SyncBatches => "sync_batches",
            Metric::SyncFailures => "sync_failures",
            Metric::RecordsQueued => "records_queued",
            Metric::RecordsConfirmed => "records_confirmed",
            Metric::RecordsDropped => "records_dropped",
            Metric::CallsUsageUnreported => "calls_usage_unreported",
            Metric::CallsResumedUndecided => "calls_resumed_undecided",
            Metric::SharedDataFailures => "shared_data_failures",
            Metric::SharedEntriesEvicted => "shared_entries_evicted",
        }
    }
}

/// What the filter asks of the engine. Every method acts now; none can fail in a way the filter
/// must handle beyond what its result says.
pub trait Engine {
    fn rules(&self) -> Rules;
    fn now_ms(&self) -> u64;
    fn shared(&self) -> &dyn SharedData;
    /// Sends a request to the ledger from the running context; its answer comes back to it.
    fn dispatch(&mut self, call: &LedgerCall<'_>) -> Result<Token, DispatchRefused>;
    /// Answers call `context` in place of the upstream (once per call).
    fn reply(&mut self, context: ContextId, problem: &Problem);
    /// Lets paused call `context` go on.
    fn resume(&mut self, context: ContextId);
    /// Adds to a counter.
    fn count(&mut self, metric: Metric, n: u64);
    /// Records a ledger round trip in the `ledger_rtt_ms` histogram.
    fn record_rtt(&mut self, ms: u64);
}

#[cfg(test)]
pub mod fake {
    //! An engine for native tests: shared data with either host's compare-and-swap rules, a
    //! manual clock, and every dispatch, reply and resume recorded. A host call that the engine
    //! would refuse or trap on (a dispatch from a response callback, a second local response, under
    //! ngx_wasm_module acting on another call than the running one) is recorded as a violation,
    //! and tests assert there are none.
    use std::cell::Cell;
    use std::collections::BTreeMap;
    use std::rc::Rc;

    use super::*;
    use crate::shared::fake::{FakeShared, Rules as SharedRules};

    #[derive(Clone, Debug, PartialEq, Eq)]
    pub struct Dispatched {
        pub token: Token,
        pub context: ContextId,
        pub body: Vec<u8>,
        pub timeout_ms: u32,
        /// The clock when it went out.
        pub sent_ms: u64,
    }

    impl Dispatched {
        /// What the filter's clock reads when the engine fails this dispatch at its timeout: as
        /// early as `Rules::timeout_early_ms` lets it.
        pub fn timed_out_at_ms(&self, rules: Rules) -> u64 {
            self.sent_ms + u64::from(self.timeout_ms) - rules.timeout_early_ms()
        }
    }

    pub struct FakeEngine {
        pub rules: Rules,
        pub now_ms: u64,
        /// Clock reads so far (each a host call on a real engine).
        pub clock_reads: Cell<u64>,
        /// Milliseconds the clock moves on at each read (a real clock moves during a callback);
        /// what it moved so far is `drift_ms`, added to `now_ms`.
        pub ms_per_clock_read: u64,
        pub drift_ms: Cell<u64>,
        /// The node's shared data (several workers of one node share it).
        pub store: Rc<FakeShared>,
        /// The callback running now: which context, in which phase.
        pub running: (ContextId, Phase),
        pub dispatched: Vec<Dispatched>,
        pub replies: BTreeMap<ContextId, Problem>,
        pub resumed: BTreeMap<ContextId, u32>,
        pub metrics: BTreeMap<Metric, u64>,
        pub violations: Vec<String>,
        /// Makes the next dispatches fail as if the cluster were unknown.
        pub refuse_dispatches: bool,
        next_token: Token,
    }

    impl FakeEngine {
        pub fn new(rules: Rules) -> FakeEngine {
            let shared = match rules {
                Rules::Envoy => SharedRules::Envoy,
                // Hash-only keys, with collisions easy to force in tests.
                Rules::Nginx => SharedRules::Kong { hash: |k| (k.len() as u32) * 131 + u32::from(k.as_bytes()[0]) },
            };
            FakeEngine::with_store(rules, Rc::new(FakeShared::new(shared)))
        }

        pub fn with_store(rules: Rules, store: Rc<FakeShared>) -> FakeEngine {
            FakeEngine {
                rules,
                now_ms: 1_000_000,
                clock_reads: Cell::new(0),
                ms_per_clock_read: 0,
                drift_ms: Cell::new(0),
                store,
                running: (0, Phase::Configure),
                dispatched: Vec::new(),
                replies: BTreeMap::new(),
                resumed: BTreeMap::new(),
                metrics: BTreeMap::new(),
                violations: Vec::new(),
                refuse_dispatches: false,
                next_token: 1,
            }
        }

        /// Enters a callback of `context` in `phase`.
        pub fn enter(&mut self, context: ContextId, phase: Phase) {
            self.running = (context, phase);
        }

        pub fn metric(&self, metric: Metric) -> u64 {
            self.metrics.get(&metric).copied().unwrap_or(0)
        }

        fn acting_on(&mut self, what: &str, context: ContextId) {
            let (running, phase) = self.running;
            if context != running && !self.rules.acts_on_other_contexts() {
                self.violations.push(format!("{what} of call {context} from call {running}'s callback"));
            }
            if context == 0 {
                self.violations.push(format!("{what} of the root context"));
            }
            // Envoy answers the effective context from any callback.
            if what == "reply" && self.rules == Rules::Nginx && !phase.may_reply() {
                self.violations.push(format!("reply in {phase:?}"));
            }
        }
    }

    impl Engine for FakeEngine {
        fn rules(&self) -> Rules {
            self.rules
        }

        fn now_ms(&self) -> u64 {
            self.clock_reads.set(self.clock_reads.get() + 1);
            let now_ms = self.now_ms + self.drift_ms.get();
            self.drift_ms.set(self.drift_ms.get() + self.ms_per_clock_read);
            now_ms
        }

        fn shared(&self) -> &dyn SharedData {
            &*self.store
        }

        fn dispatch(&mut self, call: &LedgerCall<'_>) -> Result<Token, DispatchRefused> {
            let (context, phase) = self.running;
            if !phase.may_dispatch() {
                self.violations.push(format!("dispatch in {phase:?}"));
            }
            if context == 0 && phase == Phase::CallResponse && !self.rules.root_dispatches_from_answers() {
                self.violations.push("dispatch from the root context's answer to a dispatch".into());
            }
            if self.refuse_dispatches {
                return Err(DispatchRefused("unknown cluster".into()));
            }
            let token = self.next_token;
            self.next_token += 1;
            let sent_ms = self.now_ms + self.drift_ms.get();
            self.dispatched.push(Dispatched {
                token,
                context,
                body: call.body.to_vec(),
                timeout_ms: call.timeout_ms,
                sent_ms,
            });
            Ok(token)
        }

        fn reply(&mut self, context: ContextId, problem: &Problem) {
            self.acting_on("reply", context);
            if self.replies.insert(context, problem.clone()).is_some() {
                self.violations.push(format!("a second local response for call {context}"));
            }
        }

        fn resume(&mut self, context: ContextId) {
            self.acting_on("resume", context);
            *self.resumed.entry(context).or_default() += 1;
        }

        fn count(&mut self, metric: Metric, n: u64) {
            *self.metrics.entry(metric).or_default() += n;
        }

        fn record_rtt(&mut self, _ms: u64) {}
    }
}
