//! Calls of a worker that wait for the ledger: which read each waits for, which call owns that
//! read (the one whose callback dispatched it: engines answer a dispatch there), and when to give
//! up on it. Pure bookkeeping: it decides nothing about credit, and says what to do next as data.
//!
//! The rules (each has a test below):
//! - Under ngx_wasm_module a call can only be resumed or answered from its own callbacks, so every
//!   waiting call owns its own read. Under Envoy, calls of one customer share the read in flight.
//! - A read is answered once, in its owner's callback, matched by owner and token; an answer for a
//!   read this worker does not know (a late one, or one a replaced instance sent) changes nothing.
//! - A call that goes away stops waiting; if it owned a shared read, that read's answer will not
//!   come, so its other calls wait for the customer's next read, or are given up at its deadline.
//! - A read past its deadline is given up: its calls are decided without the ledger.

use std::collections::HashMap;

use credits::Amount;

use crate::decision::Admitted;
use crate::engine::{ContextId, Rules, Token};
use crate::pricing::Quote;
use crate::sync::PendingSync;

/// Reads one call may wait for. A burst outruns a top-up when calls that arrived meanwhile (or
/// another worker's) take it: the call waits for another, sized for every call still waiting, and
/// each makes progress, so a few are enough (three were not: at a cold node under 64 connections
/// a read's owner, decided last, was refused after three). The bound keeps a ledger that answers
/// at once without setting credit aside the node can use from being asked again and again until
/// the timeout.
pub const MAX_READS_PER_CALL: u32 = 8;

/// A call that waits, with what it needs to be decided from any callback.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Waiter {
    pub subject: String,
    pub quote: Quote,
    /// The request id, read before the request went on (the engine no longer lets the filter
    /// read request headers then).
    pub request_id: Option<String>,
    /// When the call began to wait: it waits for the ledger's timeout from then at most.
    pub since_ms: u64,
    /// Reads this call has waited for.
    pub reads: u32,
    /// Let through: taken back by the call's next callback.
    pub admitted: Option<Admitted>,
}

impl Waiter {
    pub fn new(subject: &str, quote: Quote, request_id: Option<String>, since_ms: u64) -> Waiter {
        Waiter { subject: subject.to_owned(), quote, request_id, since_ms, reads: 0, admitted: None }
    }

    /// May the call wait for another read at `now_ms`? For `timeout_ms` from when it began, and
    /// for at most [`MAX_READS_PER_CALL`] reads.
    pub fn may_wait(&self, timeout_ms: u64, now_ms: u64) -> bool {
        self.reads < MAX_READS_PER_CALL && now_ms < self.since_ms.saturating_add(timeout_ms)
    }

    /// The timeout of a read this call dispatches at `now_ms` (it may wait, see
    /// [`Waiter::may_wait`]): the ledger's. Under ngx_wasm_module, where only the call's own read
    /// can decide it (the tick cannot end its wait: [`Waiting::overdue`]), at most what is left of
    /// its wait, so that a read sent late in a chain does not keep it a whole timeout longer. Its
    /// first read (counted already) is not cut: the clock may have moved on a millisecond since
    /// the call began to wait, and a read cut short that fails at its timeout says nothing about
    /// the ledger, so a hung ledger would not be marked down.
    pub fn read_timeout_ms(&self, timeout_ms: u32, now_ms: u64, rules: Rules) -> u32 {
        if rules.acts_on_other_contexts() || self.reads <= 1 {
            return timeout_ms;
        }
        let left = self.since_ms.saturating_add(u64::from(timeout_ms)).saturating_sub(now_ms);
        // Never 0: the engine reads 0 as its own default timeout.
        u32::try_from(left).unwrap_or(timeout_ms).clamp(1, timeout_ms.max(1))
    }

    /// What the call must have set aside per scope.
    pub fn estimates(&self) -> &[Amount] {
        &self.quote.estimates
    }
}

/// A read of one customer's balance (and lease top-ups) in flight.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Read {
    pub subject: String,
    /// The call whose callback dispatched it; `None` once that call went away (the answer will
    /// not come).
    pub owner: Option<ContextId>,
    pub token: Token,
    pub pending: PendingSync,
    pub waiters: Vec<ContextId>,
    pub deadline_ms: u64,
    /// `Some(timeout)` when it was dispatched with less than the ledger's timeout of the day, cut
    /// short to what was left of its call's wait ([`Waiter::read_timeout_ms`]). Decided then: the
    /// worker outlives a reconfiguration that may change the timeout while the read is in flight.
    pub cut_to_ms: Option<u32>,
}

/// How a call that must wait gets its answer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Plan {
    /// A read of the customer is in flight and its owner will get the answer: wait for it.
    Join,
    /// Dispatch a read from the running callback, which then owns it.
    Dispatch,
}

/// Every call of the worker that waits, and every read in flight.
#[derive(Debug, Default)]
pub struct Waiting {
    calls: HashMap<ContextId, Waiter>,
    reads: Vec<Read>,
}

impl Waiting {
    /// `context` starts waiting (or waits again, keeping its count of reads).
    pub fn add(&mut self, context: ContextId, waiter: Waiter) {
        self.calls.insert(context, waiter);
    }

    pub fn waiter(&self, context: ContextId) -> Option<&Waiter> {
        self.calls.get(&context)
    }

    pub fn waiter_mut(&mut self, context: ContextId) -> Option<&mut Waiter> {
        self.calls.get_mut(&context)
    }

    /// How many calls of `subject` wait.
    pub fn calls_of(&self, subject: &str) -> usize {
        self.calls.values().filter(|w| w.subject == subject).count()
    }

    /// The call no longer waits (decided, or gone).
    pub fn take(&mut self, context: ContextId) -> Option<Waiter> {
        self.calls.remove(&context)
    }

    pub fn is_empty(&self) -> bool {
        self.calls.is_empty() && self.reads.is_empty()
    }

    /// How `subject`'s waiting calls get an answer under `rules`.
    pub fn plan(&self, subject: &str, rules: Rules) -> Plan {
        let shared =
            rules.acts_on_other_contexts() && self.reads.iter().any(|r| r.subject == subject && r.owner.is_some());
        if shared {
            Plan::Join
        } else {
            Plan::Dispatch
        }
    }

    /// `waiters` wait for the live read of `subject` (after [`Plan::Join`]).
    pub fn join(&mut self, subject: &str, waiters: &[ContextId]) {
        if let Some(read) = self.reads.iter_mut().find(|r| r.subject == subject && r.owner.is_some()) {
            read.waiters.extend_from_slice(waiters);
        }
    }

    /// A read was dispatched from `read.owner`'s callback. Under Envoy it also takes the calls
    /// that waited for a read of the customer whose owner went away (one more read for each of them).
    pub fn dispatched(&mut self, mut read: Read, rules: Rules) {
        debug_assert!(read.owner.is_some(), "a read is dispatched from a live call");
        if rules.acts_on_other_contexts() {
            let subject = read.subject.clone();
            let mut orphaned = Vec::new();
            self.reads.retain(|r| {
                let orphan = r.subject == subject && r.owner.is_none();
                if orphan {
                    orphaned.extend_from_slice(&r.waiters);
                }
                !orphan
            });
            for id in &orphaned {
                if let Some(w) = self.calls.get_mut(id) {
                    w.reads += 1;
                }
            }
            read.waiters.extend(orphaned);
        }
        self.reads.push(read);
    }

    /// The answer to `token` arrived in `owner`'s callback: the read it answers, if this worker
    /// still waits for it.
    pub fn answered(&mut self, owner: ContextId, token: Token) -> Option<Read> {
        let i = self.reads.iter().position(|r| r.owner == Some(owner) && r.token == token)?;
        Some(self.reads.swap_remove(i))
    }

    /// Reads whose deadline passed: given up.
    pub fn expired(&mut self, now_ms: u64) -> Vec<Read> {
        let (expired, live): (Vec<Read>, Vec<Read>) =
            std::mem::take(&mut self.reads).into_iter().partition(|r| now_ms > r.deadline_ms);
        self.reads = live;
        expired
    }

    /// Calls still waiting whose own wait (`timeout_ms` from when each began, plus `slack_ms`)
    /// is over at `now_ms`, whatever read they wait for (one dispatched late in their wait, or one
    /// they were carried over to from a read whose owner went away).
    pub fn overdue(&self, timeout_ms: u64, slack_ms: u64, now_ms: u64) -> Vec<ContextId> {
        let mut overdue: Vec<ContextId> = self
            .calls
            .iter()
            .filter(|(_, w)| w.admitted.is_none() && now_ms > w.since_ms.saturating_add(timeout_ms + slack_ms))
            .map(|(id, _)| *id)
            .collect();
        overdue.sort_unstable();
        overdue
    }

    /// Puts back a read `expired` gave up, to wait for its answer after all.
    pub fn keep(&mut self, read: Read) {
        self.reads.push(read);
    }

    /// `context` went away (its client left, or it was answered): it waits no more, and a read it
    /// owned will not be answered.
    pub fn gone(&mut self, context: ContextId) {
        self.calls.remove(&context);
        for read in &mut self.reads {
            read.waiters.retain(|w| *w != context);
            if read.owner == Some(context) {
                read.owner = None;
            }
        }
        self.reads.retain(|r| r.owner.is_some() || !r.waiters.is_empty());
    }

    /// The read `context` owns, if any (each call owns at most one at a time).
    pub fn read_of(&self, context: ContextId) -> Option<&Read> {
        self.reads.iter().find(|r| r.owner == Some(context))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use credits::sync::SyncRequest;

    fn waiter(subject: &str) -> Waiter {
        Waiter::new(subject, Quote { estimates: vec![Amount::from(1u64)], units: vec![] }, None, 0)
    }

    fn read(subject: &str, owner: ContextId, token: Token, waiters: &[ContextId]) -> Read {
        Read {
            subject: subject.into(),
            owner: Some(owner),
            token,
            pending: PendingSync::new(SyncRequest { node: "n".into(), subjects: vec![] }, 0, 0),
            waiters: waiters.to_vec(),
            deadline_ms: 100,
            cut_to_ms: None,
        }
    }

    #[test]
    fn under_nginx_a_read_is_given_no_more_than_what_is_left_of_its_calls_wait() {
        let mut w = waiter("ann");
        w.since_ms = 1_000;
        w.reads = 1;
        assert_eq!(w.read_timeout_ms(500, 1_001, Rules::Nginx), 500, "its first read: not cut");
        w.reads = 2;
        assert_eq!(w.read_timeout_ms(500, 1_000, Rules::Nginx), 500);
        assert_eq!(w.read_timeout_ms(500, 1_400, Rules::Nginx), 100);
        assert_eq!(w.read_timeout_ms(500, 1_499, Rules::Nginx), 1);
        assert_eq!(w.read_timeout_ms(500, 1_700, Rules::Nginx), 1, "never 0: the engine's default");
        // Under Envoy the tick ends a call's wait (`overdue`): its reads keep the ledger's timeout.
        assert_eq!(w.read_timeout_ms(500, 1_400, Rules::Envoy), 500);
    }

    #[test]
    fn under_nginx_every_waiting_call_reads_for_itself() {
        let mut w = Waiting::default();
        w.add(1, waiter("ann"));
        w.dispatched(read("ann", 1, 10, &[1]), Rules::Nginx);
        w.add(2, waiter("ann"));
        assert_eq!(w.plan("ann", Rules::Nginx), Plan::Dispatch, "never joins another call's read");
        assert_eq!(w.plan("ann", Rules::Envoy), Plan::Join);
    }

    #[test]
    fn under_envoy_calls_of_one_customer_share_the_read_in_flight() {
        let mut w = Waiting::default();
        w.dispatched(read("ann", 1, 10, &[1]), Rules::Envoy);
        assert_eq!(w.plan("bob", Rules::Envoy), Plan::Dispatch, "another customer reads for itself");
        w.join("ann", &[2, 3]);
        let answered = w.answered(1, 10).unwrap();
        assert_eq!(answered.waiters, [1, 2, 3]);
        assert!(w.answered(1, 10).is_none(), "answered once");
    }

    #[test]
    fn an_answer_is_matched_by_owner_and_token() {
        let mut w = Waiting::default();
        w.dispatched(read("ann", 1, 10, &[1]), Rules::Nginx);
        assert!(w.answered(2, 10).is_none(), "another call's callback");
        assert!(w.answered(1, 11).is_none(), "another dispatch (e.g. one a replaced instance sent)");
        assert!(w.answered(1, 10).is_some());
    }

    #[test]
    fn a_call_that_goes_away_no_longer_waits_and_its_read_is_orphaned() {
        let mut w = Waiting::default();
        w.add(1, waiter("ann"));
        w.add(2, waiter("ann"));
        w.dispatched(read("ann", 1, 10, &[1, 2]), Rules::Envoy);
        w.gone(1);
        assert!(w.waiter(1).is_none());
        assert_eq!(w.plan("ann", Rules::Envoy), Plan::Dispatch, "an orphaned read will not be answered");
        // The next read of the customer takes the orphaned read's calls, and counts for them
        // (`MAX_READS_PER_CALL`).
        let before = w.waiter(2).unwrap().reads;
        w.dispatched(read("ann", 3, 11, &[3]), Rules::Envoy);
        assert_eq!(w.waiter(2).unwrap().reads, before + 1);
        assert_eq!(w.answered(3, 11).unwrap().waiters, [3, 2]);
        assert!(w.is_empty() || w.waiter(2).is_some());
        w.gone(2);
        w.gone(3);
        assert!(w.is_empty(), "nothing is kept for calls that are gone");
    }

    #[test]
    fn reads_past_their_deadline_are_given_up() {
        let mut w = Waiting::default();
        w.dispatched(read("ann", 1, 10, &[1]), Rules::Nginx);
        assert!(w.expired(100).is_empty());
        let expired = w.expired(101);
        assert_eq!(expired.len(), 1);
        assert!(w.answered(1, 10).is_none(), "a late answer changes nothing");
    }
}
