#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // tests fail by panicking
//! The filter in a real Envoy, with the real ledger and a real upstream.

mod support;

use std::time::{Duration, Instant};

use serde_json::{json, Value};
use support::{filter_config, upstream, Envoy, Ledger, TempDir};

fn problem(body: &str) -> Value {
    serde_json::from_str(body).unwrap_or_else(|_| panic!("not a problem body: {body}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn one_dollar_at_ten_cents_buys_exactly_ten_calls() {
    let dir = TempDir::new("ten-calls");
    let ledger = Ledger::start(&dir.0).await;
    let alice = ledger.customer_with_credit("alice", "1.00").await;
    let bob = ledger.customer_with_credit("bob", "1.00").await;
    let (up, _u) = upstream().await;
    let envoy = Envoy::start(&dir.0, up, ledger.port, &filter_config(json!({}))).await;

    for i in 0..10 {
        let (status, headers, body) = envoy.call(Some("alice")).await;
        assert_eq!(status, 200, "call {i}: {body}\n{}", envoy.log_text());
        assert_eq!(headers.get("x-credits-cost").and_then(|v| v.to_str().ok()), Some("0.10"));
    }
    let (status, headers, body) = envoy.call(Some("alice")).await;
    assert_eq!(status, 402, "the 11th call: {body}");
    assert_eq!(headers.get("content-type").and_then(|v| v.to_str().ok()), Some("application/problem+json"));
    let p = problem(&body);
    assert_eq!(
        (p["customer"].as_str(), p["currency"].as_str(), p["price"].as_str(), p["available"].as_str()),
        (Some("alice"), Some("USD"), Some("0.10"), Some("0.00"))
    );

    // After a sync the ledger has booked all ten calls, and only those.
    ledger.wait_settled(&alice, "0.00").await;
    assert_eq!(ledger.consumed(&alice).await, rust_decimal::Decimal::new(100, 2));
    // Another customer is unaffected.
    let (status, _, _) = envoy.call(Some("bob")).await;
    assert_eq!(status, 200);
    ledger.wait_settled(&bob, "0.90").await;
    // No subject: refused.
    let (status, _, body) = envoy.call(None).await;
    assert_eq!(status, 401, "{body}");
    assert!(problem(&body)["detail"].as_str().unwrap_or_default().contains("x-consumer-username"));
    // A subject the ledger does not know: refused, its entry deleted from shared data (the
    // worker remembers it), and refused again without a failed shared-data write.
    let (status, _, _) = envoy.call(Some("mallory")).await;
    assert_eq!(status, 403);
    let (status, _, _) = envoy.call(Some("mallory")).await;
    assert_eq!(status, 403);
    if let Some(n) = envoy.counter_at_least("calls_allowed", 11).await {
        assert!(n >= 11, "{n}");
    }
    // Counted when the second refusal is handed over, after the answer that deleted the entry.
    if envoy.counter_at_least("calls_unknown_customer", 2).await.is_some() {
        assert_eq!(envoy.counter("shared_data_failures").await, Some(0), "deleting an entry failed under this engine");
    }
    ledger.check().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn ledger_down_deny_answers_503_within_the_timeout() {
    let dir = TempDir::new("deny");
    let mut ledger = Ledger::start(&dir.0).await;
    ledger.customer_with_credit("carol", "5.00").await;
    let (up, _u) = upstream().await;
    let envoy = Envoy::start(&dir.0, up, ledger.port, &filter_config(json!({"failure_mode": "deny"}))).await;
    ledger.stop().await;
    let started = Instant::now();
    let (status, headers, body) = envoy.call(Some("carol")).await;
    assert_eq!(status, 503, "{body}");
    assert!(started.elapsed() < Duration::from_millis(1500), "answered within the 1000 ms ledger timeout (+ slack)");
    match headers.get("x-credits-problem") {
        // ngx_wasm_module loses a body made where a ledger call failed: the problem is a header.
        Some(detail) => assert!(body.is_empty() && detail.to_str().unwrap().contains("cannot be reached")),
        None => assert_eq!(problem(&body)["status"], 503),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn ledger_down_allow_lets_calls_through_and_books_them_once_it_is_back() {
    let dir = TempDir::new("allow");
    let mut ledger = Ledger::start(&dir.0).await;
    let dave = ledger.customer_with_credit("dave", "5.00").await;
    let (up, _u) = upstream().await;
    let config =
        filter_config(json!({"failure_mode": "allow", "offline_allowance": "1.00", "sync": {"max_stale_ms": 100}}));
    let envoy = Envoy::start(&dir.0, up, ledger.port, &config).await;
    ledger.stop().await;
    for i in 0..5 {
        let (status, _, body) = envoy.call(Some("dave")).await;
        assert_eq!(status, 200, "offline call {i}: {body}");
    }
    // Retries while the ledger is away must not book twice once it returns.
    tokio::time::sleep(Duration::from_millis(600)).await;
    ledger.resume().await;
    ledger.wait_settled(&dave, "4.50").await;
    tokio::time::sleep(Duration::from_millis(600)).await;
    assert_eq!(ledger.settled(&dave).await, "4.50", "booked exactly once");
    ledger.check().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_invalid_config_answers_500_naming_the_field() {
    let dir = TempDir::new("invalid");
    let ledger = Ledger::start(&dir.0).await;
    let (up, _u) = upstream().await;
    let envoy = Envoy::start(&dir.0, up, ledger.port, &filter_config(json!({"price": "ten cents"}))).await;
    let (status, _, body) = envoy.call(Some("alice")).await;
    assert_eq!(status, 500, "{body}");
    assert_eq!(problem(&body)["field"], "price");
    // The worker stays up: the next call gets the same answer.
    assert_eq!(envoy.call(Some("alice")).await.0, 500);
}

/// Clients may send header values of any bytes. One that is not UTF-8 reads as absent: the
/// proxy-wasm SDK's string reader panics on it, and a panic traps the instance (Envoy then
/// answers 503 to every later call of the worker; Kong's worker loses its state).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_header_that_is_not_utf8_reads_as_absent_and_traps_nothing() {
    let dir = TempDir::new("not-utf8");
    let ledger = Ledger::start(&dir.0).await;
    let alice = ledger.customer_with_credit("alice", "1.00").await;
    let (up, _u) = upstream().await;
    let envoy = Envoy::start(&dir.0, up, ledger.port, &filter_config(json!({}))).await;
    let latin1 = reqwest::header::HeaderValue::from_bytes(b"caf\xe9").unwrap();
    for _ in 0..3 {
        let resp = reqwest::Client::new()
            .get(format!("http://127.0.0.1:{}/api/thing", envoy.port))
            .header("x-consumer-username", latin1.clone())
            .send()
            .await
            .expect("call through the gateway");
        let status = resp.status().as_u16();
        let body = resp.text().await.unwrap_or_default();
        assert_eq!(status, 401, "{body}\n{}", envoy.log_text());
        let (status, _, body) = envoy.call(Some("alice")).await;
        assert_eq!(status, 200, "the worker still serves: {body}\n{}", envoy.log_text());
    }
    ledger.wait_settled(&alice, "0.70").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_subject_without_the_authentication_header_is_refused() {
    let dir = TempDir::new("spoof");
    let ledger = Ledger::start(&dir.0).await;
    let hal = ledger.customer_with_credit("hal", "1.00").await;
    let (up, _u) = upstream().await;
    let config = filter_config(json!({"subject": {"require_headers": ["x-credential-identifier"]}}));
    let envoy = Envoy::start(&dir.0, up, ledger.port, &config).await;
    // A client naming a customer by itself (no authentication plugin vouched for it).
    let (status, _, body) = envoy.call_with(&[("x-consumer-username", "hal")]).await;
    assert_eq!(status, 401, "{body}");
    assert!(problem(&body)["detail"].as_str().unwrap_or_default().contains("x-credential-identifier"));
    // With the header an authentication plugin sets alongside the consumer, the call is metered.
    let (status, _, body) =
        envoy.call_with(&[("x-consumer-username", "hal"), ("x-credential-identifier", "key-7")]).await;
    assert_eq!(status, 200, "{body}");
    ledger.wait_settled(&hal, "0.90").await;
}
