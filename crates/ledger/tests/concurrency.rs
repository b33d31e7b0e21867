//! Concurrent charges never over-consume: on SQLite, on PostgreSQL, and with two ledger
//! instances on one PostgreSQL database.

mod support;

use serde_json::json;
use support::{Backend, Ledger, TestDb};

/// 50 parallel `credit_only` charges of 1 against a balance of 30, spread over `ledgers`.
async fn fifty_charges_against_thirty(ledgers: &[&Ledger]) {
    let customer = ledgers[0].customer("racer").await;
    ledgers[0]
        .grant(&customer, json!({"name": "thirty", "funding_method": "none", "currency": "USD", "amount": "30"}))
        .await;
    let mut tasks = Vec::new();
    for i in 0..50 {
        let ledger = ledgers[i % ledgers.len()];
        let (http, url, customer) = (
            ledger.http.clone(),
            ledger.url(&format!("/v3/openmeter/customers/{customer}/credits/charges")),
            customer.clone(),
        );
        tasks.push(tokio::spawn(async move {
            let body = json!({"amount": "1", "currency": "USD", "settlement_mode": "credit_only", "key": format!("charge-{i}")});
            let resp = http.post(url).bearer_auth(support::TOKEN).json(&body).send().await.expect("request");
            let _ = customer;
            resp.status().as_u16()
        }));
    }
    let mut statuses = Vec::new();
    for t in tasks {
        statuses.push(t.await.expect("task"));
    }
    let accepted = statuses.iter().filter(|s| **s == 201).count();
    let refused = statuses.iter().filter(|s| **s == 402).count();
    assert_eq!((accepted, refused), (30, 20), "statuses: {statuses:?}");
    let (settled, live, _) = ledgers[0].balance(&customer, "").await;
    assert_eq!((settled.as_str(), live.as_str()), ("0", "0"));
    assert!(ledgers[0].check().await.is_empty(), "{:?}", ledgers[0].check().await);
}

async fn parallel_credit_only_charges_stop_exactly_at_the_balance(backend: Backend) {
    let db = TestDb::new(backend).await;
    let ledger = Ledger::start(&db).await;
    fifty_charges_against_thirty(&[&ledger]).await;
}

on_both_backends!(parallel_credit_only_charges_stop_exactly_at_the_balance);

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn two_instances_on_one_postgres_database_never_over_consume() {
    let db = TestDb::new(Backend::Postgres).await;
    let (a, b) = (Ledger::start(&db).await, Ledger::start(&db).await);
    fifty_charges_against_thirty(&[&a, &b]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn two_instances_book_each_expiry_exactly_once() {
    let db = TestDb::new(Backend::Postgres).await;
    let (a, b) = (Ledger::start(&db).await, Ledger::start(&db).await);
    let mut customers = Vec::new();
    for i in 0..20 {
        let c = a.customer(&format!("expiring-{i}")).await;
        a.grant(&c, json!({"name": "short", "funding_method": "none", "currency": "USD", "amount": "5", "expires_after": "PT1S"})).await;
        customers.push(c);
    }
    tokio::time::sleep(std::time::Duration::from_millis(1200)).await;
    // Both instances run the expiry job at the same time, several passes each.
    let (sa, sb) = (a.state.clone(), b.state.clone());
    let runs = (0..3)
        .flat_map(|_| [sa.clone(), sb.clone()])
        .map(|s| tokio::spawn(async move { ledger::expiry::pass(&s).await.expect("pass") }));
    let booked: usize = futures_total(runs.collect()).await;
    assert_eq!(booked, 20, "each of the 20 expiries booked once in total");
    for c in &customers {
        let (status, body) =
            a.get(&format!("/v3/openmeter/customers/{c}/credits/transactions?filter[type]=expired")).await;
        assert_eq!(status, 200);
        assert_eq!(body["data"].as_array().map(Vec::len), Some(1), "{body}");
    }
    assert!(a.check().await.is_empty());
}

async fn futures_total(handles: Vec<tokio::task::JoinHandle<usize>>) -> usize {
    let mut total = 0;
    for h in handles {
        total += h.await.expect("join");
    }
    total
}
