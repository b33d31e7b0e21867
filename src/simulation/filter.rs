//! Every call the simulator makes into the filter, in one place: when the filter's API changes
//! (a pricing scope, a range key with currency and feature), only this adapter follows.

use credits::sync::{SyncRequest, SyncResponse};

use crate::config::FilterConfig;
use crate::customer::CustomerEntry;
use crate::decision::{self, LedgerAccess, Verdict};
use crate::shared::fake::FakeShared;
use crate::sync::{self, PendingSync, Tracker};
use crate::{registry, shared};

/// One gateway node's view: its configuration, its shared data and its name.
pub struct NodeFilter<'a> {
    pub config: &'a FilterConfig,
    pub store: &'a FakeShared,
    pub node: &'a str,
}

impl NodeFilter<'_> {
    /// Decides a call of `subject` at the configured price, settled at once at that price;
    /// registers the customer when it now has something to report (as the host adapter does).
    pub fn decide(&self, subject: &str, now_ms: u64, access: LedgerAccess) -> Verdict {
        let (verdict, effects) = decision::call(self.store, self.config, subject, self.config.price, now_ms, access);
        if effects.became_pending {
            registry::add(self.store, self.config, subject);
        }
        verdict
    }

    /// The cold-miss read (with a lease top-up) for a call that must wait.
    pub fn balance_read(&self, subject: &str, now_ms: u64) -> PendingSync {
        sync::balance_read(self.store, self.config, self.node, subject, &[self.config.price], now_ms)
    }

    /// The tick's batched sync of one worker, if it has anything to say.
    pub fn prepare(&self, tracker: &mut Tracker, worker: u64, now_ms: u64) -> Option<PendingSync> {
        sync::prepare(self.store, tracker, self.config, self.node, worker, now_ms)
    }

    /// Applies the ledger's answer (or the host's failure, `None`); `true` if it was usable.
    pub fn answer(&self, pending: &PendingSync, response: Option<&SyncResponse>, now_ms: u64) -> bool {
        let body = response.and_then(|r| serde_json::to_vec(r).ok());
        let status = response.map(|_| 200);
        match sync::parse_answer(pending, status, body.as_deref()) {
            Ok(resp) => {
                sync::apply(self.store, self.config, pending, &resp, now_ms);
                sync::register_pending(self.store, self.config, pending);
                true
            }
            Err(_) => false,
        }
    }

    /// The node's shared entry of a customer.
    pub fn entry(&self, subject: &str) -> Option<CustomerEntry> {
        let scope = &self.config.pricing.scopes[0];
        shared::read::<CustomerEntry>(self.store, &decision::entry_key(self.config, scope, subject))
    }

    /// Calls of `subject` this node numbered (let through and recorded).
    pub fn calls_recorded(&self, subject: &str) -> u64 {
        self.entry(subject).map_or(0, |e| e.next_call)
    }
}

/// A request the host gave up on: the worker gets the failure, nothing to match it to.
pub fn failed_request() -> PendingSync {
    PendingSync { request: SyncRequest { node: String::new(), subjects: Vec::new() }, sent_ms: 0 }
}
