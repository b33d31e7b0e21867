//! The filter's per-call work, natively, for `valgrind --tool=callgrind` (see `bench/profile.sh`):
//! the decision of `src/decision.rs` against an in-memory shared store, then what the adapter
//! formats for the response headers — the steady state of `bench/gateway.sh` cases b (one
//! customer on a warm lease) and c (many subjects). Also prints the encoded size of a customer's
//! shared-data entry.
//!
//! With a number of ticks, it runs the worker's tick instead (gateway case c's other cost): each
//! tick's sync built from the shared entries (`sync::prepare`, the register included) and the
//! ledger's answer read and applied (`sync::parse_answer`, `sync::apply`), with `calls` calls
//! between ticks (not measured) so every customer has usage to report.
//!
//!   decide-profile [calls, default 100000] [subjects, default 1] [ticks, default 0]
//!
//! It also prints the wall-clock time of what it measures (`call_ns` per call, `tick_us` per
//! tick): meaningless under valgrind, they are for `bench/v8.mjs`, which runs this binary built
//! for wasm32-wasip1 under V8.
//!
//! Not included: the host ABI crossings themselves (header read, shared-data get/set copies, metric
//! increments), which only run inside a proxy-wasm host.

use std::cell::RefCell;
use std::collections::HashMap;
use std::time::{Duration, Instant};

use credits::sync::{LeaseAnswer, LeaseRequest, SubjectAnswer, SubjectOutcome, SyncResponse, UsageOutcome};
use credits::Amount;
use prepaid_credits::config::FilterConfig;
use prepaid_credits::customer::{entry_key, CustomerEntry, LeaseAnswered};
use prepaid_credits::decision::{admit, LedgerAccess, Verdict};
use prepaid_credits::pricing::Charging;
use prepaid_credits::registry;
use prepaid_credits::shared::{self, CasMismatch, Keyed, SharedData};
use prepaid_credits::sync::{self, Budget, PendingSync};
use prepaid_credits::tracker::Tracker;

/// Shared data with Envoy's rules: a value and a CAS token per key, values copied in and out as
/// the host does. (`prepaid_credits::shared::fake` is test-only, so this binary has its own.)
#[derive(Default)]
struct Store {
    entries: RefCell<HashMap<String, (Vec<u8>, u32)>>,
    next_cas: RefCell<u32>,
}

impl SharedData for Store {
    fn fresh_origin(&self) -> u64 {
        1
    }

    fn create_cas(&self) -> Option<u32> {
        None
    }

    fn delete(&self, key: &str, _cas: Option<u32>) -> Result<(), CasMismatch> {
        self.entries.borrow_mut().remove(key);
        Ok(())
    }

    fn get(&self, key: &str) -> (Option<Vec<u8>>, Option<u32>) {
        match self.entries.borrow().get(key) {
            Some((v, cas)) => (Some(v.clone()), Some(*cas)),
            None => (None, None),
        }
    }

    fn set(&self, key: &str, value: &[u8], cas: Option<u32>) -> Result<(), CasMismatch> {
        let mut entries = self.entries.borrow_mut();
        if let (Some((_, stored)), Some(cas)) = (entries.get(key), cas) {
            if *stored != cas {
                return Err(CasMismatch);
            }
        }
        let mut next = self.next_cas.borrow_mut();
        *next += 1;
        entries.insert(key.to_owned(), (value.to_vec(), *next));
        Ok(())
    }
}

const CONFIG: &str = r#"{"ledger": {"upstream": "ledger", "token": "bench-token", "timeout_ms": 1000},
    "subject": {"header": "x-consumer-username"}, "price": "0.01", "currency": "USD",
    "feature_key": "api_requests", "settlement_mode": "credit_only"}"#;

/// Gives `subject` an open lease holding `held`, as a sync answer would.
fn lease(store: &Store, config: &FilterConfig, subject: &str, held: Amount, now_ms: u64) -> Option<usize> {
    let key = entry_key(config, &config.pricing.scopes[0], subject);
    let answer = LeaseAnswer {
        lease_id: format!("node/{subject}"),
        held,
        granted: held,
        expires_at: Default::default(),
        closed: false,
        recalled: false,
    };
    shared::update::<CustomerEntry, usize>(store, &key, |e| {
        let mut e = e.unwrap_or_else(|| CustomerEntry::new(&key, subject, 1, now_ms));
        e.refresh(Amount::ZERO, 1, now_ms);
        // A day of TTL: the lease stays spendable for the whole run.
        let asked =
            LeaseRequest { lease_id: answer.lease_id.clone(), seq: 1, want: held, ttl_ms: 86_400_000, release: false };
        let answered =
            LeaseAnswered { answer: &answer, asked: &asked, revision: 2, sent_ms: now_ms, lasts_ms: 86_400_000 };
        e.apply_lease(&answered, 0);
        let size = e.encode().len();
        (Some(e), size)
    })
    .ok()
}

/// The measured part (`bench/profile.sh` collects only inside this function): `calls` calls
/// round-robin over `names`, 16 per millisecond, as the filter's defaults take them: each charged
/// its fixed price when it is let through (`Charging::AtAdmission`: one shared-data update), its
/// completion writing nothing (`call::complete`: it cost what it was charged), the worker's record
/// of who called touched. Returns the calls allowed and the header bytes.
#[inline(never)]
fn run_calls(
    store: &Store,
    tracker: &mut Tracker,
    config: &FilterConfig,
    names: &[String],
    calls: u64,
    start_ms: u64,
) -> (u64, usize) {
    let (mut allowed, mut header_bytes) = (0u64, 0usize);
    for i in 0..calls {
        let subject = &names[(i % names.len() as u64) as usize];
        let now = start_ms + i / 16;
        let (verdict, _effects) =
            admit(store, config, subject, &[config.price], Charging::AtAdmission, now, LedgerAccess::Reachable);
        if let Verdict::Allow { balance, .. } = verdict {
            allowed += 1;
            tracker.touch(subject, now);
            // The adapter's response headers: x-credits-cost and x-credits-balance, printed on
            // the stack (`Charged::headers`).
            header_bytes += config.price.printed().as_str().len() + balance.map_or(0, |b| b.printed().as_str().len());
        }
    }
    (allowed, header_bytes)
}

/// The measured half of a tick that sends (`bench/profile.sh` collects inside it): the syncs
/// built, and the customers it found unregistered registered, as `Worker::send_sync` does.
#[inline(never)]
fn tick_prepare(store: &Store, tracker: &mut Tracker, config: &FilterConfig, now_ms: u64) -> Vec<PendingSync> {
    let prepared = sync::prepare(store, tracker, config, ("node", 1), Budget::default(), now_ms);
    let unregistered: Vec<&str> = prepared.unregistered.iter().map(String::as_str).collect();
    registry::add(store, config, &unregistered);
    prepared.syncs
}

/// The measured half of a tick's answer: read, applied, the customers still owing registered, as
/// `Worker::absorb` does. Returns the calls the answer confirmed.
#[inline(never)]
fn tick_apply(store: &Store, config: &FilterConfig, pending: &PendingSync, body: &[u8], now_ms: u64) -> u64 {
    let Ok(response) = sync::parse_answer(pending, Some(200), Some(body)) else { return 0 };
    let applied = sync::apply(store, config, pending, &response, now_ms);
    let still_pending: Vec<&str> = applied.pending.iter().map(String::as_str).collect();
    registry::add(store, config, &still_pending);
    applied.calls_confirmed
}

/// What the ledger answers to `pending` (not measured): every range booked, every lease granted
/// what it asked for.
fn ledger_answer(pending: &PendingSync, now_ms: u64) -> Vec<u8> {
    let server_time = chrono::DateTime::from_timestamp_millis(now_ms as i64).unwrap_or_default();
    let subjects = pending
        .request
        .subjects
        .iter()
        .map(|s| SubjectAnswer {
            subject: s.subject.clone(),
            outcome: SubjectOutcome::Ok {
                customer_id: format!("c-{}", s.subject),
                usage: s.usage.as_ref().map(|_| UsageOutcome::Booked),
                live: Amount::parse("1000000").unwrap_or(Amount::ZERO),
                revision: now_ms as i64,
                lease: s.lease.as_ref().map(|l| LeaseAnswer {
                    lease_id: l.lease_id.clone(),
                    held: l.want,
                    granted: l.want,
                    expires_at: server_time + chrono::Duration::milliseconds(l.ttl_ms as i64),
                    closed: false,
                    recalled: false,
                }),
            },
        })
        .collect();
    serde_json::to_vec(&SyncResponse { server_time, subjects }).unwrap_or_default()
}

/// `ticks` ticks a second apart, each after `calls` calls round-robin over `names` (their usage
/// and the worker's record of who called are what the tick works on). Prints the subjects synced.
fn run_ticks(store: &Store, config: &FilterConfig, names: &[String], calls: u64, ticks: u64, start_ms: u64) {
    let mut tracker = Tracker::default();
    let (mut synced, mut confirmed, mut measured) = (0usize, 0u64, Duration::ZERO);
    for t in 0..ticks {
        let now = start_ms + (t + 1) * 1_000;
        for (i, subject) in (0..calls).map(|i| (i, &names[(i % names.len() as u64) as usize])) {
            let at = now - 1_000 + i * 1_000 / calls.max(1);
            if let (Verdict::Allow { .. }, _) =
                admit(store, config, subject, &[config.price], Charging::AtAdmission, at, LedgerAccess::Reachable)
            {
                tracker.touch(subject, at);
            }
        }
        let started = Instant::now();
        let syncs = tick_prepare(store, &mut tracker, config, now);
        measured += started.elapsed();
        for pending in syncs {
            synced += pending.request.subjects.len();
            let body = ledger_answer(&pending, now + 5);
            let started = Instant::now();
            confirmed += tick_apply(store, config, &pending, &body, now + 5);
            measured += started.elapsed();
        }
    }
    println!(
        "{{\"calls_between_ticks\": {calls}, \"subjects\": {}, \"ticks\": {ticks}, \"subjects_synced\": {synced}, \
         \"calls_confirmed\": {confirmed}, \"tick_us\": {:.0}}}",
        names.len(),
        measured.as_secs_f64() * 1e6 / ticks as f64
    );
}

fn main() {
    let mut args = std::env::args().skip(1);
    let calls: u64 = args.next().and_then(|a| a.parse().ok()).unwrap_or(100_000);
    let subjects: usize = args.next().and_then(|a| a.parse().ok()).unwrap_or(1).max(1);
    let ticks: u64 = args.next().and_then(|a| a.parse().ok()).unwrap_or(0);
    let Ok(config) = FilterConfig::parse(CONFIG.as_bytes()) else {
        eprintln!("the built-in configuration does not parse");
        std::process::exit(2);
    };
    let store = Store::default();
    let names: Vec<String> = (0..subjects).map(|i| format!("s{i}")).collect();
    let start_ms = 1_800_000_000_000;
    let held = Amount::parse("1000000").unwrap_or(Amount::ZERO);
    let mut entry_bytes = 0;
    for name in &names {
        entry_bytes = lease(&store, &config, name, held, start_ms).unwrap_or(0);
    }
    if ticks > 0 {
        run_ticks(&store, &config, &names, calls, ticks, start_ms);
        return;
    }
    let started = Instant::now();
    let (allowed, header_bytes) = run_calls(&store, &mut Tracker::default(), &config, &names, calls, start_ms);
    let call_ns = started.elapsed().as_secs_f64() * 1e9 / calls as f64;
    let key = entry_key(&config, &config.pricing.scopes[0], &names[0]);
    let after = shared::read::<CustomerEntry>(&store, &key).map_or(0, |e| e.encode().len());
    println!(
        "{{\"calls\": {calls}, \"subjects\": {subjects}, \"allowed\": {allowed}, \"header_bytes\": {header_bytes}, \
         \"entry_key_bytes\": {}, \"entry_bytes_fresh_lease\": {entry_bytes}, \"entry_bytes_after_run\": {after}, \"call_ns\": {call_ns:.0}}}",
        key.len()
    );
}
