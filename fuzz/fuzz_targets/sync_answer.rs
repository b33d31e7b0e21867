#![no_main]
//! The filter's reading of ledger answers (`sync::parse_answer`, then `sync::apply` to the node's
//! shared state): whatever the ledger (or something posing as it) answers, the filter refuses it
//! or applies it without a panic, and the shared state stays readable afterwards.

use std::cell::RefCell;
use std::collections::HashMap;

use libfuzzer_sys::fuzz_target;
use prepaid_credits::config::FilterConfig;
use prepaid_credits::shared::{CasMismatch, SharedData};
use prepaid_credits::sync::{apply, balance_read, parse_answer, turn, Budget, PendingSync};

/// Shared data in memory: a blind set overwrites (Envoy's rule), a CAS must match, and a key is
/// created without one.
#[derive(Default)]
struct Memory(RefCell<HashMap<String, (Vec<u8>, u32)>>, RefCell<u64>);

impl SharedData for Memory {
    fn get(&self, key: &str) -> (Option<Vec<u8>>, Option<u32>) {
        match self.0.borrow().get(key) {
            Some((value, cas)) => (Some(value.clone()), Some(*cas)),
            None => (None, None),
        }
    }

    fn set(&self, key: &str, value: &[u8], cas: Option<u32>) -> Result<(), CasMismatch> {
        let mut map = self.0.borrow_mut();
        let current = map.get(key).map(|(_, c)| *c);
        if cas.is_some() && cas != current {
            return Err(CasMismatch);
        }
        map.insert(key.to_owned(), (value.to_vec(), current.unwrap_or(0).wrapping_add(1)));
        Ok(())
    }

    fn delete(&self, key: &str, cas: Option<u32>) -> Result<(), CasMismatch> {
        let mut map = self.0.borrow_mut();
        if cas != map.get(key).map(|(_, c)| *c) {
            return Err(CasMismatch);
        }
        map.remove(key);
        Ok(())
    }

    fn fresh_origin(&self) -> u64 {
        *self.1.borrow_mut() += 1;
        *self.1.borrow()
    }

    fn create_cas(&self) -> Option<u32> {
        None
    }
}

fn config(strategy: &str) -> Option<FilterConfig> {
    let json = serde_json::json!({"ledger": {"upstream": "ledger", "token": "t"}, "price": "0.10", "currency": "USD",
        "sync": {"strategy": strategy}});
    FilterConfig::parse(json.to_string().as_bytes()).ok()
}

/// A sync about alice with usage and a lease request, as a worker sends it.
fn pending() -> Option<PendingSync> {
    let request = serde_json::json!({"node": "node-1", "subjects": [
        {"subject": "alice", "currency": "USD",
         "usage": {"from": 0, "to": 3, "amount": "0.30", "settlement_mode": "credit_only"},
         "lease": {"lease_id": "node-1/alice", "seq": 1, "want": "1.00", "ttl_ms": 30000}},
        {"subject": "bob", "currency": "USD"}]});
    Some(PendingSync::new(serde_json::from_value(request).ok()?, 1_000, 1_000))
}

fuzz_target!(|data: &[u8]| {
    let (Some(pending), Some(lease), Some(cached)) = (pending(), config("lease"), config("cached")) else {
        panic!("the fixed request and configurations parse");
    };
    let status = data.first().map(|b| [200, 200, 200, 400, 401, 429, 500, 503][usize::from(b % 8)]);
    let body = data.get(1..);
    for config in [&lease, &cached] {
        let store = Memory::default();
        let turn_ms = turn(config, 1, Budget::default()).ms;
        // A cold read first, so that there is node state for the answer to change.
        let _ = balance_read(&store, config, "node-1", "alice", &[config.price], 900, turn_ms);
        if let Ok(response) = parse_answer(&pending, status, body) {
            assert_eq!(response.subjects.len(), pending.request.subjects.len(), "an accepted answer matches");
            apply(&store, config, &pending, &response, 1_100);
            // A duplicated answer changes nothing it must not; a later read still works.
            apply(&store, config, &pending, &response, 1_200);
            let _ = balance_read(&store, config, "node-1", "alice", &[config.price], 1_300, turn_ms);
        }
    }
});
