#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // tests fail by panicking
//! Kong's real engine with a shared-memory zone far too small for the customers it serves: the
//! zone evicts (ngx_wasm_module's default `slru`), and the filter must survive it — no worker
//! crash, no trap, no customer billed for more calls than it was let through. The calls an evicted
//! entry had not reported are lost (the README says so; `shared_entries_evicted` counts them):
//! this test prints how many. Runs only with `E2E_GATEWAY=nginx` (`scripts/kong-engine-test`);
//! under Envoy, which never evicts, it says so and passes.

mod support;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use rust_decimal::Decimal;
use serde_json::json;
use support::{filter_config, nginx_fatal_lines, upstream, Engine, Gateway, Ledger, NginxShape, TempDir};

const CUSTOMERS: usize = 3_000;
const CALLS_EACH: usize = 3;
/// Clients calling at once, each taking every CLIENTS-th customer.
const CLIENTS: usize = 8;

async fn full_zone(strategy: &str) {
    if !matches!(Engine::from_env(), Engine::Nginx(_)) {
        eprintln!("skipped: a full shared-memory zone is Kong's engine's (run with E2E_GATEWAY=nginx)");
        return;
    }
    let dir = TempDir::new(&format!("kong-eviction-{strategy}"));
    let ledger = Arc::new(Ledger::start(&dir.0).await);
    let subjects: Vec<String> = (0..CUSTOMERS).map(|i| format!("evicted-customer-{i:05}")).collect();
    let mut ids = BTreeMap::new();
    for s in &subjects {
        ids.insert(s.clone(), ledger.customer_with_credit(s, "1.00").await);
    }
    let (up, _u) = upstream().await;
    let config = filter_config(json!({"price": "0.01", "sync": {"strategy": strategy, "interval_ms": 200}}));
    // kong.conf's zone name at 1 MiB, one worker: a few hundred customers fit, not 3,000.
    let shape = NginxShape { workers: 1, zone: "1m" };
    let gateway = Arc::new(Gateway::start_nginx(&dir.0, (up, ledger.port), &config, shape).await);

    let subjects = Arc::new(subjects);
    let mut clients = Vec::new();
    for c in 0..CLIENTS {
        let (gateway, subjects) = (Arc::clone(&gateway), Arc::clone(&subjects));
        clients.push(tokio::spawn(async move {
            let mut through = BTreeMap::new();
            for s in subjects.iter().skip(c).step_by(CLIENTS) {
                for _ in 0..CALLS_EACH {
                    let (status, _, body) = gateway.call(Some(s)).await;
                    match status {
                        200 => *through.entry(s.clone()).or_insert(0u64) += 1,
                        402 | 503 => {}
                        other => panic!("{s}: {other} {body}"),
                    }
                }
            }
            through
        }));
    }
    let mut through: BTreeMap<String, u64> = BTreeMap::new();
    for c in clients {
        through.extend(c.await.unwrap());
    }
    // Let the node report what it still holds, until the ledger's total stops moving.
    let total = |consumed: &BTreeMap<String, Decimal>| consumed.values().copied().sum::<Decimal>();
    let mut consumed = BTreeMap::new();
    let mut last = Decimal::NEGATIVE_ONE;
    for _ in 0..20 {
        tokio::time::sleep(Duration::from_millis(1500)).await;
        for (s, id) in &ids {
            consumed.insert(s.clone(), ledger.consumed(id).await);
        }
        if total(&consumed) == last {
            break;
        }
        last = total(&consumed);
    }

    let log = gateway.log_text();
    let fatal = nginx_fatal_lines(&log);
    assert!(fatal.is_empty(), "the engine crashed or trapped:\n{}", fatal.join("\n"));
    assert!(!log.contains("was locked by"), "a worker died holding the zone's lock");
    let price = Decimal::new(1, 2);
    let mut overbilled = Vec::new();
    for (s, spent) in &consumed {
        let let_through = Decimal::from(through.get(s).copied().unwrap_or(0));
        if *spent > let_through * price {
            overbilled.push(format!("{s}: billed {spent} for {let_through} calls"));
        }
    }
    assert!(overbilled.is_empty(), "billed beyond what was let through:\n{}", overbilled.join("\n"));
    let let_through: u64 = through.values().sum();
    let booked = total(&consumed) / price;
    eprintln!(
        "{strategy}: {let_through} calls let through, {booked} booked, {} lost to eviction",
        Decimal::from(let_through) - booked
    );
    assert!(let_through > 0);
    ledger.check().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_full_zone_under_cached_crashes_nothing_and_bills_no_call_twice() {
    full_zone("cached").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_full_zone_under_lease_crashes_nothing_and_bills_no_call_twice() {
    full_zone("lease").await;
}
