//! One worker's filter (a proxy-wasm VM: an Envoy worker thread, an nginx worker process): its
//! node's identity, the customers it keeps in sync, its calls that wait for the ledger, and its
//! counters. The root context's callbacks (configure, tick, the tick's answer) land here, and so do
//! the answers to the reads its waiting calls dispatched.

use credits::Amount;

use crate::config::FilterConfig;
use crate::decision::{self, Admitted, Hold, LedgerAccess, Verdict};
use crate::engine::{ContextId, DispatchRefused, Engine, LedgerAnswer, LedgerCall, Metric, Rules, Token};
use crate::node;
use crate::pricing::{self, Quote};
use crate::problem::Problem;
use crate::registry;
use crate::sync::{self, AnswerError, Budget, PendingSync};
use crate::tracker::Tracker;
use crate::unknown::UnknownSubjects;
use crate::waiting::{Plan, Read, Waiter, Waiting};

/// How a call that must wait for the ledger waits.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Wait {
    /// For a read: its answer comes to a callback of this worker.
    Read,
    /// No read could be dispatched: the calls were decided as if the ledger were unreachable.
    GaveUp,
}

/// The call a verdict is for.
#[derive(Clone, Copy)]
pub struct CallRef<'a> {
    pub context: ContextId,
    pub subject: &'a str,
    /// Read only when the call is answered (a call let through needs no request id).
    pub request_id: &'a dyn Fn() -> Option<String>,
}

/// What became of a call once decided.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Acted {
    LetThrough(Admitted),
    /// Answered in place of the upstream.
    Answered,
}

/// What deciding a waiting call came to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Decided {
    /// Resumed or answered.
    Done,
    /// The ledger has more credit than the top-up set aside (calls that waited for the same one
    /// took it): wait for another read.
    Again,
}

#[derive(Debug, Default)]
struct Counters([u64; Metric::ALL.len()]);

#[derive(Debug, Default)]
pub struct Worker {
    /// The node's id (shared by its workers, from shared data).
    pub node: String,
    /// This worker's id: the owner of the ranges it sends.
    pub id: u64,
    pub tracker: Tracker,
    pub waiting: Waiting,
    /// Subjects the ledger has no customer for.
    pub unknown: UnknownSubjects,
    /// Until when the ledger counts as unreachable (after a failed call).
    ledger_down_until_ms: u64,
    counters: Counters,
    /// The tick's syncs in flight: their tokens and what was sent.
    in_flight: Vec<(Token, PendingSync)>,
    /// Syncs the last tick sent.
    sent_last_tick: usize,
    /// A sync of the last tick failed or was answered late.
    congested: bool,
    /// The headers of every ledger request of this configuration.
    ledger_headers: Vec<(String, String)>,
    /// What a tick may send. Per sync: halved each time the ledger refuses a body as too large,
    /// grown back by each sync it takes. Syncs (a worker with more customers than one a tick
    /// reaches in time needs several: `sync::turn`): one more each tick while the ledger answers
    /// every sync of a tick within half its timeout, back to one when it does not — so a ledger
    /// that cannot keep up is sent no more than one a tick, as before.
    budget: Budget,
    /// Completions whose shared entry could not be written (other workers kept winning): the tick
    /// retries them, so a call let through is never left unrecorded.
    retries: Vec<Retry>,
    /// The host's time as this worker's callbacks last read it (0: not yet read).
    clock_ms: u64,
}

/// A call's completion in one scope, still to be recorded.
#[derive(Clone, Debug, PartialEq, Eq)]
struct Retry {
    subject: String,
    scope: usize,
    held: Option<Hold>,
    cost: Amount,
}

/// What became of a ledger answer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Absorbed {
    Applied,
    /// The ledger failed it (or the engine gave up on it at the ledger's timeout).
    Failed,
    /// No answer within a read's shortened timeout: nothing is known of the ledger.
    CutShort,
}

/// How long past `ledger.timeout_ms` a read (and a call waiting for one) is waited for before the
/// tick gives up on it.
const READ_SLACK_MS: u64 = 100;

/// At most this many completions wait for a retry; beyond it they are counted as dropped usage.
const MAX_RETRIES: usize = 10_000;

impl Worker {
    /// A worker of the node in `engine`'s shared data (created there by the first worker).
    pub fn start(engine: &dyn Engine, id: u64) -> Worker {
        let node = node::id(engine.shared(), id);
        Worker { node, id, ..Worker::default() }
    }

    /// A (new) configuration for this worker.
    pub fn reconfigure(&mut self, config: &FilterConfig) {
        self.ledger_headers = ledger_headers(config);
    }

    pub fn count(&mut self, metric: Metric, n: u64) {
        self.counters.0[metric as usize] += n;
    }

    /// Hands the counted metrics to the engine (once per tick, so calls make no metric host call).
    pub fn flush_counters(&mut self, engine: &mut dyn Engine) {
        for metric in Metric::ALL {
            let n = std::mem::take(&mut self.counters.0[metric as usize]);
            if n > 0 {
                engine.count(metric, n);
            }
        }
    }

    /// Reads the host's clock (a host call) and remembers it for [`Worker::recent_ms`].
    pub fn now_ms(&mut self, engine: &dyn Engine) -> u64 {
        let now_ms = engine.now_ms();
        self.clock_ms = self.clock_ms.max(now_ms);
        now_ms
    }

    /// The host's time as this worker last read it, without a host call: every call's admission
    /// and every tick read the clock, so it is behind by microseconds on a busy worker and by at
    /// most one `sync.interval_ms` on an idle one. Good enough for what a completion stamps (when
    /// a customer was last used, the freshness of the balance it shows), not for deciding a call.
    pub fn recent_ms(&mut self, engine: &dyn Engine) -> u64 {
        if self.clock_ms == 0 {
            self.now_ms(engine)
        } else {
            self.clock_ms
        }
    }

    pub fn access(&self, now_ms: u64) -> LedgerAccess {
        if now_ms >= self.ledger_down_until_ms {
            LedgerAccess::Reachable
        } else {
            LedgerAccess::Unreachable
        }
    }

    fn mark_ledger_down(&mut self, config: &FilterConfig, now_ms: u64) {
        self.ledger_down_until_ms = now_ms + u64::from(config.sync.interval_ms);
    }

    /// Registers customers that now have something to report, so every worker syncs them; a
    /// register write lost to contention is counted (a full register is not: see `registry::add`).
    pub fn register(&mut self, engine: &dyn Engine, config: &FilterConfig, subjects: &[&str]) {
        let contended = registry::add(engine.shared(), config, subjects);
        self.count(Metric::SharedDataFailures, contended as u64);
    }

    fn dispatch(
        &self,
        engine: &mut dyn Engine,
        config: &FilterConfig,
        pending: &PendingSync,
        timeout_ms: u32,
    ) -> Result<Token, DispatchRefused> {
        let body = pending.body();
        // ngx_wasm_module takes `http` by default and warns on every `:scheme` when built
        // without TLS; Envoy expects it.
        let nginx = engine.rules() == Rules::Nginx && !config.ledger.tls;
        let headers: Vec<(String, String)> =
            self.ledger_headers.iter().filter(|(name, _)| !(nginx && name == ":scheme")).cloned().collect();
        let call = LedgerCall { upstream: &config.ledger.upstream, headers: &headers, body, timeout_ms };
        engine.dispatch(&call)
    }

    /// Applies the ledger's answer to `pending`, or marks the ledger down if it failed, unless no
    /// answer came by `cut_to_ms`, a timeout shorter than the ledger's it was dispatched with (a
    /// read cut short to what is left of its call's wait): that says nothing about the ledger,
    /// and it ends the call's wait ([`Absorbed::CutShort`]), however the clock the filter reads
    /// shows it.
    fn absorb(
        &mut self,
        engine: &mut dyn Engine,
        config: &FilterConfig,
        pending: &PendingSync,
        answer: &LedgerAnswer,
        cut_to_ms: Option<u32>,
    ) -> Absorbed {
        let now_ms = self.now_ms(engine);
        engine.record_rtt(now_ms.saturating_sub(pending.sent_ms));
        match sync::parse_answer(pending, answer.status, answer.body.as_deref()) {
            Ok(response) => {
                let applied = sync::apply(engine.shared(), config, pending, &response, now_ms);
                let still_pending: Vec<&str> = applied.pending.iter().map(String::as_str).collect();
                self.register(engine, config, &still_pending);
                let most = Budget::default().subjects;
                self.budget.subjects = self.budget.subjects.saturating_mul(2).min(most);
                self.count(Metric::RecordsConfirmed, applied.calls_confirmed);
                self.count(Metric::RecordsDropped, applied.calls_dropped);
                self.count(Metric::SharedDataFailures, applied.shared_failures);
                for subject in &applied.unknown {
                    self.unknown.learn(subject, now_ms + u64::from(config.sync.unknown_ttl_ms));
                }
                self.ledger_down_until_ms = 0;
                Absorbed::Applied
            }
            Err(AnswerError::TooLarge) => {
                // Nothing of it was booked: its ranges go again, fewer subjects at a time.
                self.count(Metric::SyncFailures, 1);
                self.budget.subjects = (pending.request.subjects.len() / 2).max(1);
                log::warn!(
                    "prepaid_credits: the ledger refused a sync as too large; now {} subjects a sync",
                    self.budget.subjects
                );
                Absorbed::Failed
            }
            Err(AnswerError::Unavailable(message) | AnswerError::Malformed(message)) => {
                self.count(Metric::SyncFailures, 1);
                log::warn!("prepaid_credits: ledger sync failed: {message}");
                // Only the engine's own failure (no answer) at that timeout: an answer the ledger
                // gave (a 5xx, an unreadable body) is its failure whenever it arrives.
                let early_ms = engine.rules().timeout_early_ms();
                let cut_short = answer.status.is_none()
                    && cut_to_ms.is_some_and(|t| now_ms + early_ms >= pending.sent_ms.saturating_add(u64::from(t)));
                if cut_short {
                    return Absorbed::CutShort;
                }
                self.mark_ledger_down(config, now_ms);
                Absorbed::Failed
            }
        }
    }

    /// The tick: gives up on reads past their deadline, records completions that could not be,
    /// writes back the node's record if it was evicted, sends the worker's sync, hands over the
    /// counters.
    pub fn on_tick(&mut self, engine: &mut dyn Engine, config: &FilterConfig) {
        let now_ms = self.now_ms(engine);
        self.expire_reads(engine, config, now_ms);
        self.retry_completions(engine, config, now_ms);
        if node::keep(engine.shared(), &self.node).is_err() {
            self.count(Metric::SharedDataFailures, 1);
        }
        self.send_sync(engine, config, now_ms);
        self.flush_counters(engine);
    }

    /// Keeps the scopes of a completion that could not be written (`done[i]` false) for a retry.
    pub fn retry_completion(&mut self, subject: &str, held: &[Hold], cost: &[Amount], done: &[bool]) {
        self.count(Metric::SharedDataFailures, 1);
        for (scope, (cost, done)) in cost.iter().zip(done).enumerate() {
            if *done {
                continue;
            }
            if self.retries.len() >= MAX_RETRIES {
                self.count(Metric::RecordsDropped, 1);
                continue;
            }
            self.retries.push(Retry {
                subject: subject.to_owned(),
                scope,
                held: held.get(scope).copied(),
                cost: *cost,
            });
        }
    }

    fn retry_completions(&mut self, engine: &mut dyn Engine, config: &FilterConfig, now_ms: u64) {
        for retry in std::mem::take(&mut self.retries) {
            let Some(scope) = config.pricing.scopes.get(retry.scope) else { continue };
            let store = engine.shared();
            match decision::complete_in_scope(
                store,
                config,
                scope,
                &retry.subject,
                retry.held.as_ref(),
                retry.cost,
                now_ms,
            ) {
                Some(done) if done.effects.became_pending => self.register(engine, config, &[&retry.subject]),
                Some(_) => {}
                None => self.retries.push(retry),
            }
        }
    }

    fn send_sync(&mut self, engine: &mut dyn Engine, config: &FilterConfig, now_ms: u64) {
        if let Some((_, pending)) = self.in_flight.first() {
            // The engine answers every dispatch within its timeout; this only guards against a
            // lost callback. (A tick's syncs go out together.)
            if now_ms.saturating_sub(pending.sent_ms) <= 2 * u64::from(config.ledger.timeout_ms) {
                return;
            }
            for (_, lost) in std::mem::take(&mut self.in_flight) {
                self.tracker.failed(lost.subjects());
            }
            self.congested = true;
        }
        // One sync more than the last tick while the ledger kept up, one when it did not.
        let ramped = if self.congested { 1 } else { self.sent_last_tick + 1 };
        self.budget.syncs = ramped.min(sync::MAX_SYNCS_PER_TICK);
        self.congested = false;
        self.sent_last_tick = 0;
        let prepared =
            sync::prepare(engine.shared(), &mut self.tracker, config, (&self.node, self.id), self.budget, now_ms);
        let unregistered: Vec<&str> = prepared.unregistered.iter().map(String::as_str).collect();
        self.register(engine, config, &unregistered);
        self.count(Metric::SharedEntriesEvicted, prepared.evicted);
        self.count(Metric::SharedDataFailures, prepared.shared_failures);
        let mut syncs = prepared.syncs.into_iter();
        while let Some(pending) = syncs.next() {
            match self.dispatch(engine, config, &pending, config.ledger.timeout_ms) {
                Ok(token) => {
                    self.count(Metric::SyncBatches, 1);
                    self.count(Metric::RecordsQueued, pending.calls());
                    self.in_flight.push((token, pending));
                    self.sent_last_tick += 1;
                }
                Err(DispatchRefused(why)) => {
                    // The rest would be refused alike: their customers go again at the next tick.
                    self.count(Metric::SyncFailures, 1);
                    log::warn!("prepaid_credits: could not dispatch the sync to {:?}: {why}", config.ledger.upstream);
                    self.mark_ledger_down(config, now_ms);
                    for failed in std::iter::once(pending).chain(syncs) {
                        self.tracker.failed(failed.subjects());
                    }
                    break;
                }
            }
        }
    }

    /// The answer to one of the tick's syncs (in the root context). One that failed, or came
    /// later than half the ledger's timeout, holds the next tick to one sync.
    pub fn on_sync_answer(
        &mut self,
        engine: &mut dyn Engine,
        config: &FilterConfig,
        token: Token,
        answer: &LedgerAnswer,
    ) {
        // Not one of this tick's (a replaced instance's): ignored.
        let Some(i) = self.in_flight.iter().position(|(sent, _)| *sent == token) else { return };
        let (_, pending) = self.in_flight.remove(i);
        let waited_ms = self.now_ms(engine).saturating_sub(pending.sent_ms);
        self.congested |= answer.status != Some(200) || waited_ms > u64::from(config.ledger.timeout_ms) / 2;
        if self.absorb(engine, config, &pending, answer, None) != Absorbed::Applied {
            self.tracker.failed(pending.subjects());
        }
    }

    /// Acts on a verdict for call `context` of `subject`.
    pub fn act(
        &mut self,
        engine: &mut dyn Engine,
        config: &FilterConfig,
        call: CallRef<'_>,
        verdict: Verdict,
        now_ms: u64,
    ) -> Acted {
        let CallRef { context, subject, request_id } = call;
        let problem = match verdict {
            Verdict::Allow { held, balance } => {
                self.count(Metric::CallsAllowed, 1);
                let evicted = self.tracker.served(subject, now_ms, held.iter().map(|h| h.origin));
                self.count(Metric::SharedEntriesEvicted, evicted);
                return Acted::LetThrough(Admitted { held, balance });
            }
            Verdict::Refuse { scope, needed, available } => {
                self.count(Metric::CallsRefused, 1);
                self.tracker.touch(subject, now_ms);
                let feature = config.pricing.scopes.get(scope).and_then(|s| s.feature.as_ref());
                Problem::payment_required(subject, config.currency, feature, needed, available)
            }
            Verdict::UnknownCustomer => {
                self.count(Metric::CallsUnknownCustomer, 1);
                Problem::unknown_customer(subject, config.subject.unknown_status)
            }
            // The subject is tracked, so that an entry a failed read wrote for it is deleted
            // once idle, like any other.
            Verdict::Unavailable { reason } => {
                self.count(Metric::CallsUnavailable, 1);
                self.tracker.touch(subject, now_ms);
                Problem::unavailable(reason)
            }
            // Only reached for a waiting call whose reads found nothing usable.
            Verdict::AskLedger => {
                self.count(Metric::CallsUnavailable, 1);
                self.tracker.touch(subject, now_ms);
                Problem::unavailable("the credit ledger did not answer")
            }
        };
        engine.reply(context, &problem.with_request_id(request_id()));
        Acted::Answered
    }

    /// Decides a call of `subject` quoted at `quote` with `access` at `now_ms`, registering its
    /// customer if it now has something to report; and whether what the node holds decided it.
    pub fn decide(
        &mut self,
        engine: &dyn Engine,
        config: &FilterConfig,
        subject: &str,
        quote: &Quote,
        access: LedgerAccess,
        now_ms: u64,
    ) -> (Verdict, bool) {
        // Most workers know no unknown subject: no lookup on the warm path then.
        if !self.unknown.is_empty() && self.unknown.refuses(subject, now_ms, access == LedgerAccess::Reachable) {
            return (Verdict::UnknownCustomer, true);
        }
        let charging = pricing::charging(&config.pricing, quote);
        let (verdict, effects) =
            decision::admit(engine.shared(), config, subject, &quote.estimates, charging, now_ms, access);
        if effects.became_pending {
            self.register(engine, config, &[subject]);
        }
        self.count(Metric::SharedDataFailures, u64::from(effects.contended));
        if effects.offline && matches!(verdict, Verdict::Allow { .. }) {
            self.count(Metric::CallsAllowedOffline, 1);
        }
        let hit = effects.cache_hit && verdict != Verdict::AskLedger;
        (verdict, hit)
    }

    /// Makes `waiters` (calls of `subject` in `waiting`) wait for a read that tops up enough for
    /// all of them, joining one in flight where the engine allows. `running` is the call whose
    /// callback runs: it owns a read it dispatches, so it must be one of `waiters`.
    pub fn wait(
        &mut self,
        engine: &mut dyn Engine,
        config: &FilterConfig,
        running: ContextId,
        waiters: &[ContextId],
        subject: &str,
    ) -> Wait {
        debug_assert!(waiters.contains(&running), "the owner of a read waits for it");
        let now_ms = self.now_ms(engine);
        for id in waiters {
            if let Some(w) = self.waiting.waiter_mut(*id) {
                w.reads += 1;
            }
        }
        if self.waiting.plan(subject, engine.rules()) == Plan::Join {
            self.waiting.join(subject, waiters);
            return Wait::Read;
        }
        // Enough for every call of the customer waiting here: under Kong each owns its own read,
        // and a top-up sized for one call is taken by the calls that arrive before its answer,
        // so a burst at a cold node left calls waiting read after read until they gave up.
        // Bound: with N calls of the customer waiting, each of (at most) N reads asks for N
        // calls, so a burst may set aside up to N² calls' worth in this node's lease. None of it
        // is lost: the next calls spend it, idle release or a recall gives it back, and the ledger
        // never leases more than the customer's live balance.
        let queue = waiters.len().max(self.waiting.calls_of(subject)) as u64;
        let needed: Vec<Amount> = self
            .waiting
            .waiter(running)
            .map_or_else(Vec::new, |w| w.estimates().iter().map(|e| e.times(queue).unwrap_or(*e)).collect());
        let turn_ms = sync::turn(config, self.tracker.len(), self.budget).ms;
        let pending = sync::balance_read(engine.shared(), config, &self.node, subject, &needed, now_ms, turn_ms);
        let timeout_ms = self
            .waiting
            .waiter(running)
            .map_or(config.ledger.timeout_ms, |w| w.read_timeout_ms(config.ledger.timeout_ms, now_ms, engine.rules()));
        match self.dispatch(engine, config, &pending, timeout_ms) {
            Ok(token) => {
                let deadline_ms = now_ms + u64::from(timeout_ms) + READ_SLACK_MS;
                let read = Read {
                    subject: subject.to_owned(),
                    owner: Some(running),
                    token,
                    pending,
                    waiters: waiters.to_vec(),
                    deadline_ms,
                    cut_to_ms: (timeout_ms < config.ledger.timeout_ms).then_some(timeout_ms),
                };
                self.waiting.dispatched(read, engine.rules());
                Wait::Read
            }
            Err(DispatchRefused(why)) => {
                log::warn!("prepaid_credits: could not dispatch a balance read to {:?}: {why}", config.ledger.upstream);
                self.count(Metric::SyncFailures, 1);
                self.mark_ledger_down(config, now_ms);
                self.give_up(engine, config, waiters);
                Wait::GaveUp
            }
        }
    }

    /// The answer to a read arrived in `running`'s callback: decides every call that waited for
    /// it; those the ledger has more credit for than was set aside wait for another read, which
    /// `running` owns (so it waits for it too).
    pub fn on_read_answer(
        &mut self,
        engine: &mut dyn Engine,
        config: &FilterConfig,
        running: ContextId,
        token: Token,
        answer: &LedgerAnswer,
    ) {
        let Some(read) = self.waiting.answered(running, token) else { return };
        let ran_out = self.absorb(engine, config, &read.pending, answer, read.cut_to_ms) == Absorbed::CutShort;
        // Another read would be `running`'s, so none goes out once its own wait is over (it is
        // decided last, and would otherwise wait on for the others).
        let now_ms = self.now_ms(engine);
        let timeout_ms = u64::from(config.ledger.timeout_ms);
        let more = !ran_out && self.waiting.waiter(running).is_some_and(|w| w.may_wait(timeout_ms, now_ms));
        let mut again = Vec::new();
        // The running call last: it owns the next read if another is needed.
        for &id in read.waiters.iter().filter(|id| **id != running) {
            if self.finish(engine, config, id, more) == Decided::Again {
                again.push(id);
            }
        }
        // Still waiting (not let through already, e.g. by the tick once its own wait was over).
        let running_waits = self.waiting.waiter(running).is_some_and(|w| w.admitted.is_none());
        if running_waits && (!again.is_empty() || self.finish(engine, config, running, more) == Decided::Again) {
            again.push(running);
            self.wait(engine, config, running, &again, &read.subject);
        } else if !again.is_empty() {
            // The running call was decided: nobody in a callback can own another read.
            self.give_up(engine, config, &again);
        }
    }

    /// Decides a waiting call on what is known now; `Again` if it should wait for another read
    /// (only if `more` reads may go out).
    fn finish(&mut self, engine: &mut dyn Engine, config: &FilterConfig, context: ContextId, more: bool) -> Decided {
        let now_ms = self.now_ms(engine);
        let asked = match self.access(now_ms) {
            LedgerAccess::Reachable => LedgerAccess::Asked,
            unreachable => unreachable,
        };
        let Some(waiter) = self.waiting.waiter(context).filter(|w| w.admitted.is_none()) else { return Decided::Done };
        let more = more && waiter.may_wait(u64::from(config.ledger.timeout_ms), now_ms);
        let (subject, quote) = (waiter.subject.clone(), waiter.quote.clone());
        let (verdict, _) = self.decide(engine, config, &subject, &quote, asked, now_ms);
        // A burst that outran the top-up waits for another (`waiting::MAX_READS_PER_CALL`); past
        // the timeout the ledger is too slow to set credit aside.
        if verdict == Verdict::AskLedger && more {
            return Decided::Again;
        }
        self.conclude(engine, config, context, verdict, now_ms);
        Decided::Done
    }

    /// Calls that cannot wait for another read: decided as if the ledger were unreachable.
    fn give_up(&mut self, engine: &mut dyn Engine, config: &FilterConfig, waiters: &[ContextId]) {
        let now_ms = self.now_ms(engine);
        for &id in waiters {
            let Some(waiter) = self.waiting.waiter(id).filter(|w| w.admitted.is_none()) else { continue };
            let (subject, quote) = (waiter.subject.clone(), waiter.quote.clone());
            let (verdict, _) = self.decide(engine, config, &subject, &quote, LedgerAccess::Unreachable, now_ms);
            self.conclude(engine, config, id, verdict, now_ms);
        }
    }

    /// Acts on the verdict for waiting call `context`: resumed holding its share (kept in its
    /// waiter until its next callback takes it), or answered (and no longer waiting).
    fn conclude(
        &mut self,
        engine: &mut dyn Engine,
        config: &FilterConfig,
        context: ContextId,
        verdict: Verdict,
        now_ms: u64,
    ) {
        let Some(mut waiter) = self.waiting.take(context) else { return };
        let request_id = waiter.request_id.take();
        let call = CallRef { context, subject: &waiter.subject, request_id: &|| request_id.clone() };
        match self.act(engine, config, call, verdict, now_ms) {
            Acted::LetThrough(admitted) => {
                waiter.admitted = Some(admitted);
                self.waiting.add(context, waiter);
                engine.resume(context);
            }
            Acted::Answered => {}
        }
    }

    /// Reads whose answer did not come in time (e.g. the call that dispatched it went away):
    /// their calls are decided as if the ledger were unreachable.
    fn expire_reads(&mut self, engine: &mut dyn Engine, config: &FilterConfig, now_ms: u64) {
        for read in self.waiting.expired(now_ms) {
            // A read cut short to its call's wait may pass its deadline with the ledger well.
            if read.cut_to_ms.is_none() {
                self.mark_ledger_down(config, now_ms);
            }
            if engine.rules().acts_on_other_contexts() {
                for id in read.waiters {
                    self.finish(engine, config, id, false);
                }
            } else if read.owner.is_some() {
                // Under ngx_wasm_module a call can only be answered from its own callbacks, and
                // the engine always calls the read's owner back: with the answer, or failed at its
                // own timeouts, which count connect, send and read apart and so may come after
                // this deadline. The read stays until then, so that its answer still decides
                // the call (otherwise Kong resumes it undecided, past every check).
                self.waiting.keep(Read { deadline_ms: u64::MAX, ..read });
            }
        }
        // A read's deadline is counted from when it went out, a call's wait from when it began:
        // a call that waits for a read dispatched late in its wait (the next of a chain, or one
        // it was carried over to from a read whose owner went away) is decided once its own wait
        // is over. Under ngx_wasm_module only its own callback can decide it.
        if engine.rules().acts_on_other_contexts() {
            let timeout_ms = u64::from(config.ledger.timeout_ms);
            for id in self.waiting.overdue(timeout_ms, READ_SLACK_MS, now_ms) {
                self.finish(engine, config, id, false);
            }
        }
    }

    /// A waiting call's waiter, once it was let through: what it holds now.
    pub fn take_admission(&mut self, context: ContextId) -> Option<(Waiter, Admitted)> {
        self.waiting.waiter(context)?.admitted.as_ref()?;
        let mut waiter = self.waiting.take(context)?;
        let admitted = waiter.admitted.take()?;
        Some((waiter, admitted))
    }
}

/// The headers of every ledger request.
fn ledger_headers(config: &FilterConfig) -> Vec<(String, String)> {
    let l = &config.ledger;
    [
        (":method", "POST".to_owned()),
        (":path", l.sync_path.clone()),
        (":authority", l.authority.clone()),
        (":scheme", if l.tls { "https" } else { "http" }.to_owned()),
        ("content-type", "application/json".to_owned()),
        ("authorization", format!("Bearer {}", l.token)),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_owned(), v))
    .collect()
}

#[cfg(test)]
mod tests {
    use credits::sync::{SubjectAnswer, SubjectOutcome, SyncRequest, SyncResponse};

    use super::*;
    use crate::customer::{entry_key, CustomerEntry};
    use crate::engine::fake::{Dispatched, FakeEngine};
    use crate::engine::Phase;
    use crate::shared;
    use crate::shared::fake::{FakeShared, Rules as SharedRules};
    use std::rc::Rc;

    /// A ledger's answer to the sync in `body`: every subject known with `live` credit.
    fn answer_to(body: &[u8], live: &str, revision: i64) -> LedgerAnswer {
        let request: SyncRequest = serde_json::from_slice(body).unwrap();
        let subjects = request.subjects.iter().map(|s| SubjectAnswer {
            subject: s.subject.clone(),
            outcome: SubjectOutcome::Ok {
                customer_id: format!("c-{}", s.subject),
                usage: None,
                live: Amount::parse(live).unwrap(),
                revision,
                lease: None,
            },
        });
        let response = SyncResponse { server_time: chrono::DateTime::UNIX_EPOCH, subjects: subjects.collect() };
        LedgerAnswer { status: Some(200), body: Some(serde_json::to_vec(&response).unwrap()) }
    }

    fn subjects_of(body: &[u8]) -> Vec<String> {
        serde_json::from_slice::<SyncRequest>(body).unwrap().subjects.into_iter().map(|s| s.subject).collect()
    }

    /// A worker of a node whose `customers` the ledger knows, each with credit 1 (the fake Kong
    /// store's forced hash collisions left out: thousands of keys of one length and first letter
    /// would all collide in it).
    fn worker_with_customers(rules: Rules, config: &FilterConfig, customers: usize) -> (FakeEngine, Worker) {
        let mut engine = FakeEngine::with_store(rules, Rc::new(FakeShared::new(SharedRules::Envoy)));
        engine.enter(0, Phase::Configure);
        let mut worker = Worker::start(&engine, 1);
        worker.reconfigure(config);
        let now = engine.now_ms;
        for i in 0..customers {
            let subject = format!("s{i:05}");
            let read = sync::balance_read(engine.shared(), config, "n", &subject, &[config.price], now, 1_000);
            let response = serde_json::from_slice(&answer_to(read.body(), "1", 1).body.unwrap()).unwrap();
            sync::apply(engine.shared(), config, &read, &response, now);
            worker.tracker.touch(&subject, now);
        }
        (engine, worker)
    }

    /// The worker's tick `ms` later, and the syncs it dispatched.
    fn tick_after(ms: u64, engine: &mut FakeEngine, worker: &mut Worker, config: &FilterConfig) -> Vec<Dispatched> {
        engine.now_ms += ms;
        engine.enter(0, Phase::Tick);
        worker.on_tick(engine, config);
        std::mem::take(&mut engine.dispatched)
    }

    /// A worker with more customers than one sync a tick reaches within their leases' life (11,000
    /// with the defaults) sends two syncs a tick, both from the tick — once the ledger answered
    /// the last tick's in time: one more a tick from one, and back to one after an answer that
    /// failed or came late. Each answer is applied to its own customers.
    #[test]
    fn a_tick_sends_as_many_syncs_as_the_turn_needs_and_the_ledger_keeps_up_with() {
        for rules in [Rules::Envoy, Rules::Nginx] {
            let config = FilterConfig::parse(
                br#"{"ledger": {"upstream": "l", "token": "t"}, "price": "0.10", "currency": "USD"}"#,
            )
            .unwrap();
            let (mut engine, mut worker) = worker_with_customers(rules, &config, 11_001);
            let live = |engine: &FakeEngine, subject: &str| {
                let key = entry_key(&config, &config.pricing.scopes[0], subject);
                shared::read::<CustomerEntry>(engine.shared(), &key).unwrap().live
            };
            let tick_after = |ms, engine: &mut FakeEngine, worker: &mut Worker| tick_after(ms, engine, worker, &config);
            let answer = |engine: &mut FakeEngine, worker: &mut Worker, sent: &Dispatched, answer: LedgerAnswer| {
                engine.enter(0, Phase::CallResponse);
                worker.on_sync_answer(engine, &config, sent.token, &answer);
            };
            let first = tick_after(1_000, &mut engine, &mut worker);
            assert_eq!(first.len(), 1, "{rules:?}: one sync to begin with");
            answer(&mut engine, &mut worker, &first[0], answer_to(&first[0].body, "5", 2));
            assert_eq!(live(&engine, &subjects_of(&first[0].body)[0]), Amount::parse("5").unwrap());
            let second = tick_after(1_000, &mut engine, &mut worker);
            assert_eq!(second.len(), 2, "{rules:?}: the ledger kept up: two, all the turn needs");
            let (a, b) = (subjects_of(&second[0].body), subjects_of(&second[1].body));
            assert_eq!((a.len(), b.len()), (1_000, 1_000));
            assert!(a.iter().all(|s| !b.contains(s)), "no customer in both");
            // The second is answered first; the tick after sends nothing while the first is out.
            answer(&mut engine, &mut worker, &second[1], answer_to(&second[1].body, "6", 3));
            assert!(tick_after(100, &mut engine, &mut worker).is_empty(), "{rules:?}: a sync of the last tick is out");
            // An answer to a dispatch that is not one of the tick's changes nothing.
            let mut stray = second[0].clone();
            stray.token += 100;
            answer(&mut engine, &mut worker, &stray, answer_to(&second[0].body, "9", 9));
            answer(&mut engine, &mut worker, &second[0], answer_to(&second[0].body, "7", 3));
            assert_eq!(
                (live(&engine, &a[999]), live(&engine, &b[0])),
                (Amount::parse("7").unwrap(), Amount::parse("6").unwrap())
            );
            // One answer comes late (more than half the 1-s timeout): the next tick sends one.
            let third = tick_after(1_000, &mut engine, &mut worker);
            assert_eq!(third.len(), 2);
            answer(&mut engine, &mut worker, &third[0], answer_to(&third[0].body, "1", 4));
            engine.now_ms += 501;
            answer(&mut engine, &mut worker, &third[1], answer_to(&third[1].body, "1", 4));
            assert_eq!(
                tick_after(1_000, &mut engine, &mut worker).len(),
                1,
                "{rules:?}: back to one after a late answer"
            );
            assert_eq!(engine.metric(Metric::SyncBatches), 6);
            assert!(engine.violations.is_empty(), "{:?}", engine.violations);
        }
    }

    /// A sync that fails (an error status, a dispatch the engine refuses, an answer that never
    /// comes) costs its customers a tick, not a turn: the next tick sends them first. A sync of
    /// them that fails again leaves them to their turn, which goes on.
    #[test]
    fn a_failed_syncs_customers_go_again_at_the_next_tick() {
        let config =
            FilterConfig::parse(br#"{"ledger": {"upstream": "l", "token": "t"}, "price": "0.10", "currency": "USD"}"#)
                .unwrap();
        let (mut engine, mut worker) = worker_with_customers(Rules::Envoy, &config, 2_500);
        let range = |from: usize, to: usize| (from..to).map(|i| format!("s{i:05}")).collect::<Vec<_>>();
        let tick = |engine: &mut FakeEngine, worker: &mut Worker, status: Option<u16>| {
            let sent = tick_after(1_000, engine, worker, &config);
            assert_eq!(sent.len(), 1, "one sync a tick: 2,500 customers are within one sync's reach");
            let answer = match status {
                Some(200) => answer_to(&sent[0].body, "1", 2),
                status => LedgerAnswer { status, body: None },
            };
            engine.enter(0, Phase::CallResponse);
            worker.on_sync_answer(engine, &config, sent[0].token, &answer);
            subjects_of(&sent[0].body)
        };
        assert_eq!(tick(&mut engine, &mut worker, Some(503)), range(0, 1_000));
        assert_eq!(tick(&mut engine, &mut worker, None), range(0, 1_000), "again after a 503");
        assert_eq!(tick(&mut engine, &mut worker, Some(200)), range(1_000, 2_000), "twice failed: left to their turn");
        assert_eq!(tick(&mut engine, &mut worker, Some(200)), [range(2_000, 2_500), range(0, 500)].concat());
        // Refused at dispatch: again at the next tick, once the engine takes it.
        engine.refuse_dispatches = true;
        assert!(tick_after(1_000, &mut engine, &mut worker, &config).is_empty());
        engine.refuse_dispatches = false;
        assert_eq!(tick(&mut engine, &mut worker, Some(200)), range(500, 1_500));
        // An answer that never comes: the tick gives up on it after twice the timeout.
        let lost = tick_after(1_000, &mut engine, &mut worker, &config);
        assert_eq!(subjects_of(&lost[0].body), range(1_500, 2_500));
        for _ in 0..2 {
            assert!(tick_after(1_000, &mut engine, &mut worker, &config).is_empty(), "still waited for");
        }
        assert_eq!(tick(&mut engine, &mut worker, Some(200)), range(1_500, 2_500), "again, once given up on");
        assert_eq!(tick(&mut engine, &mut worker, Some(200)), range(0, 1_000), "and the turn goes on");
        assert_eq!(engine.metric(Metric::SyncFailures), 3);
    }

    /// ngx_wasm_module's worker died when the root context dispatched from its answer to a
    /// dispatch (`Rules::root_dispatches_from_answers`): the fake engine holds that against any code that does.
    #[test]
    fn under_ngx_wasm_module_the_root_context_never_dispatches_from_an_answer() {
        for (rules, allowed) in [(Rules::Envoy, true), (Rules::Nginx, false)] {
            let mut engine = FakeEngine::new(rules);
            engine.enter(0, Phase::CallResponse);
            let call = LedgerCall { upstream: "l", headers: &[], body: b"{}", timeout_ms: 1_000 };
            engine.dispatch(&call).unwrap();
            assert_eq!(engine.violations.is_empty(), allowed, "{rules:?}: {:?}", engine.violations);
            // A call's context may (a chained read).
            let mut engine = FakeEngine::new(rules);
            engine.enter(3, Phase::CallResponse);
            engine.dispatch(&call).unwrap();
            assert!(engine.violations.is_empty(), "{rules:?}: {:?}", engine.violations);
        }
    }
}
