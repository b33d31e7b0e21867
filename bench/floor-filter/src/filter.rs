//! The filter itself.

use std::cell::RefCell;
use std::collections::HashMap;

use proxy_wasm::hostcalls;
use proxy_wasm::traits::{Context, HttpContext, RootContext};
use proxy_wasm::types::{Action, ContextType, LogLevel};

proxy_wasm::main! {{
    proxy_wasm::set_log_level(LogLevel::Warn);
    proxy_wasm::set_root_context(|_| -> Box<dyn RootContext> { Box::new(FloorRoot { shape: Shape::Floor }) });
}}

/// Which host calls a call makes (see the crate's doc).
#[derive(Clone, Copy, PartialEq, Eq)]
enum Shape {
    Floor,
    Prepaid,
    Local,
}

thread_local! {
    /// `local`: each customer's balance in the worker's own memory, in millionths.
    static BALANCES: RefCell<HashMap<String, u64>> = RefCell::default();
}

/// The real filter's entry length: the engine copies this much on every read and write.
const ENTRY_LEN: usize = 300;
/// Under the real filter's shared-data namespace (Kong's engine needs a `shm_kv` for it).
const KEY_PREFIX: &str = "prepaid_credits/floor/";
/// A new customer's balance and each call's price, in millionths.
const OPENING_BALANCE: u64 = 1_000_000_000_000_000;
const PRICE: u64 = 10_000;
/// Compare-and-swap attempts before a call is let through unrecorded (only other workers race).
const ATTEMPTS: usize = 4;

struct FloorRoot {
    shape: Shape,
}

impl Context for FloorRoot {}

impl RootContext for FloorRoot {
    fn on_configure(&mut self, _plugin_configuration_size: usize) -> bool {
        let config = self.get_plugin_configuration().unwrap_or_default();
        self.shape = match config.trim_ascii() {
            b"" | b"floor" => Shape::Floor,
            b"prepaid" => Shape::Prepaid,
            b"local" => Shape::Local,
            _ => {
                hostcalls::log(LogLevel::Error, "floor-filter: configuration must be floor, prepaid or local").ok();
                return false;
            }
        };
        true
    }

    fn create_http_context(&self, _context_id: u32) -> Option<Box<dyn HttpContext>> {
        Some(Box::new(FloorCall { shape: self.shape, key: None, balance: 0 }))
    }

    fn get_type(&self) -> Option<ContextType> {
        Some(ContextType::HttpContext)
    }
}

struct FloorCall {
    shape: Shape,
    /// The customer's entry key, once the subject header named one.
    key: Option<String>,
    balance: u64,
}

impl Context for FloorCall {}

/// Reads the entry under `key`, applies `change` to its balance and writes it back with
/// compare-and-swap: one read and one write, unless another worker wrote in between. The balance
/// after it (`None` if every attempt lost).
fn update(key: &str, change: impl Fn(u64) -> u64) -> Option<u64> {
    for _ in 0..ATTEMPTS {
        let (value, cas) = hostcalls::get_shared_data(key).unwrap_or((None, None));
        let mut entry = value.filter(|v| v.len() == ENTRY_LEN).unwrap_or_else(|| {
            let mut fresh = vec![b' '; ENTRY_LEN];
            fresh[..8].copy_from_slice(&OPENING_BALANCE.to_le_bytes());
            fresh
        });
        let mut balance = [0; 8];
        balance.copy_from_slice(&entry[..8]);
        let after = change(u64::from_le_bytes(balance));
        entry[..8].copy_from_slice(&after.to_le_bytes());
        if hostcalls::set_shared_data(key, Some(&entry), cas).is_ok() {
            return Some(after);
        }
    }
    None
}

/// `local`'s update: no host call.
fn local_update(key: &str, change: impl Fn(u64) -> u64) -> u64 {
    BALANCES.with(|b| {
        let mut balances = b.borrow_mut();
        let balance = match balances.get_mut(key) {
            Some(balance) => balance,
            None => balances.entry(key.to_owned()).or_insert(OPENING_BALANCE),
        };
        *balance = change(*balance);
        *balance
    })
}

impl HttpContext for FloorCall {
    fn on_http_request_headers(&mut self, _num_headers: usize, _end_of_stream: bool) -> Action {
        let Some(subject) = self.get_http_request_header("x-consumer-username") else { return Action::Continue };
        if self.shape == Shape::Prepaid {
            let _ = self.get_current_time();
        }
        let key = [KEY_PREFIX, &subject].concat();
        // Charged when let through: the price leaves the balance now.
        self.balance = match self.shape {
            Shape::Local => local_update(&key, |b| b.saturating_sub(PRICE)),
            Shape::Floor | Shape::Prepaid => update(&key, |b| b.saturating_sub(PRICE)).unwrap_or(self.balance),
        };
        self.key = Some(key);
        Action::Continue
    }

    fn on_http_response_headers(&mut self, _num_headers: usize, _end_of_stream: bool) -> Action {
        let Some(key) = self.key.take() else { return Action::Continue };
        let status = self.get_http_response_header(":status");
        let succeeded = status.is_some_and(|s| s.starts_with('2'));
        if !succeeded {
            // Charged at admission: only a call that failed writes again, to be refunded.
            let refund = |b: u64| b.saturating_add(PRICE);
            self.balance = match self.shape {
                Shape::Floor | Shape::Prepaid => update(&key, refund).unwrap_or(self.balance),
                Shape::Local => local_update(&key, refund),
            };
        }
        if self.shape == Shape::Prepaid {
            self.set_http_response_header("x-credits-cost", Some(if succeeded { "0.01" } else { "0" }));
        }
        let balance = format!("{}.{:06}", self.balance / 1_000_000, self.balance % 1_000_000);
        self.set_http_response_header("x-credits-balance", Some(&balance));
        Action::Continue
    }
}
