#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // tests fail by panicking
//! Calls priced by what they used, in a real Envoy: an upstream that answers like an LLM API
//! (JSON and streamed), tokens in and out priced and restricted to their own features, checked
//! against the ledger's consumed movements per feature.

mod support;

use std::sync::atomic::Ordering;
use std::time::Duration;

use reqwest::header::HeaderMap;
use rust_decimal::Decimal;
use serde_json::{json, Value};
use support::llm::{llm, Llm};
use support::{filter_config, Envoy, Ledger, TempDir};

/// Input tokens at 0.00001 (estimated 100), output tokens at 0.00003 (estimated from
/// `max_tokens`, default 256), each in its own feature; no fixed price.
fn ai_config(strategy: &str) -> Value {
    let mut c = filter_config(json!({
        "sync": {"strategy": strategy},
        "pricing": {"units": [
            {"name": "input_tokens", "feature_key": "input_tokens", "unit_price": "0.00001",
             "source": {"response_json": "/usage/prompt_tokens"}, "estimate": {"units": "100"}},
            {"name": "output_tokens", "feature_key": "output_tokens", "unit_price": "0.00003",
             "source": {"response_json": "/usage/completion_tokens"},
             "estimate": {"request_json": "/max_tokens", "default_units": "256"}}
        ]}
    }));
    let o = c.as_object_mut().unwrap();
    o.remove("price");
    o.remove("feature_key");
    c
}

/// A customer with 1.00 USD for input tokens and `output` USD for output tokens.
async fn customer(ledger: &Ledger, subject: &str, output: &str) -> String {
    let c = ledger
        .post(
            "/v3/openmeter/customers",
            json!({"name": subject, "key": subject, "usage_attribution": {"subject_keys": [subject]}}),
        )
        .await;
    let id = c["id"].as_str().unwrap().to_owned();
    for (feature, amount) in [("input_tokens", "1.00"), ("output_tokens", output)] {
        ledger
            .post(
                &format!("/v3/openmeter/customers/{id}/credits/grants"),
                json!({"name": feature, "funding_method": "none", "currency": "USD", "amount": amount,
                       "filters": {"features": [feature]}}),
            )
            .await;
    }
    id
}

async fn consumed(ledger: &Ledger, customer: &str, feature: &str) -> Decimal {
    let t = ledger
        .get(&format!(
            "/v3/openmeter/customers/{customer}/credits/transactions?filter[type]=consumed&filter[feature_key][eq]={feature}&page[size]=1000"
        ))
        .await;
    t["data"].as_array().unwrap().iter().map(|i| -i["amount"].as_str().unwrap().parse::<Decimal>().unwrap()).sum()
}

async fn wait_consumed(ledger: &Ledger, customer: &str, feature: &str, expected: &str) {
    let expected: Decimal = expected.parse().unwrap();
    for _ in 0..200 {
        if consumed(ledger, customer, feature).await == expected {
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("{feature} consumed by {customer}: {} (expected {expected})", consumed(ledger, customer, feature).await);
}

async fn chat(envoy: &Envoy, subject: &str, request: Value, test_headers: &[(&str, &str)]) -> (u16, HeaderMap, String) {
    let mut req = reqwest::Client::new()
        .post(format!("http://127.0.0.1:{}/v1/chat/completions", envoy.port))
        .header("x-consumer-username", subject)
        .header("content-type", "application/json")
        .body(request.to_string());
    for (k, v) in test_headers {
        req = req.header(*k, *v);
    }
    let resp = req.send().await.expect("call through envoy");
    let status = resp.status().as_u16();
    let mut headers = HeaderMap::new();
    for (k, v) in resp.headers() {
        headers.insert(k.clone(), v.clone());
    }
    (status, headers, resp.text().await.unwrap_or_default())
}

fn messages(words: &str) -> Value {
    json!([{"role": "user", "content": words}])
}

async fn priced_by_usage(strategy: &str) {
    let dir = TempDir::new(&format!("ai-{strategy}"));
    let ledger = Ledger::start(&dir.0).await;
    let ann = customer(&ledger, "ann", "1.00").await;
    let (up, _) = llm().await;
    let envoy = Envoy::start(&dir.0, up, ledger.port, &ai_config(strategy)).await;

    // 1. JSON: 4 + 3 = 7 prompt tokens, 40 completion tokens.
    let (status, _, body) = chat(
        &envoy,
        "ann",
        json!({"messages": messages("three small words"), "max_tokens": 50}),
        &[("x-test-completion-tokens", "40")],
    )
    .await;
    assert_eq!(status, 200, "{body}\n{}", envoy.log_text());
    assert!(body.contains("chatcmpl-1"), "the response passes through whole: {body}");
    // 2. Streamed: 4 + 5 = 9 prompt tokens, 30 completion tokens, usage in the last event.
    let (status, headers, body) = chat(
        &envoy,
        "ann",
        json!({"messages": messages("one two three four five"), "max_tokens": 100, "stream": true}),
        &[("x-test-completion-tokens", "30")],
    )
    .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(headers.get("content-type").and_then(|v| v.to_str().ok()), Some("text/event-stream"));
    assert_eq!(body.matches("data: ").count(), 32, "every event reaches the client");
    assert!(body.ends_with("data: [DONE]\n\n"));
    // 3. The upstream fails: not charged (the default), though it reported usage.
    let (status, _, _) =
        chat(&envoy, "ann", json!({"messages": messages("x"), "max_tokens": 20}), &[("x-test-mode", "error")]).await;
    assert_eq!(status, 500);
    // 4. No usage reported: charged the estimate (100 input, max_tokens 60 output).
    let (status, _, _) =
        chat(&envoy, "ann", json!({"messages": messages("x"), "max_tokens": 60}), &[("x-test-mode", "no-usage")]).await;
    assert_eq!(status, 200);
    // 5. Unreadable usage in a stream: the estimate too (100 input, default 256 output).
    let (status, _, _) = chat(
        &envoy,
        "ann",
        json!({"messages": messages("x"), "stream": true}),
        &[("x-test-mode", "garbage"), ("x-test-completion-tokens", "3")],
    )
    .await;
    assert_eq!(status, 200);

    // Input: (7 + 9) × 0.00001 + 100 × 0.00001 + 100 × 0.00001 = 0.00216.
    wait_consumed(&ledger, &ann, "input_tokens", "0.00216").await;
    // Output: (40 + 30) × 0.00003 + 60 × 0.00003 + 256 × 0.00003 = 0.01158.
    wait_consumed(&ledger, &ann, "output_tokens", "0.01158").await;
    if let Some(n) = envoy.counter_at_least("calls_usage_unreported", 2).await {
        assert!(n >= 2, "{n}");
    }
    ledger.check().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn tokens_in_and_out_are_charged_per_feature_to_the_cent_with_leases() {
    priced_by_usage("lease").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn tokens_in_and_out_are_charged_per_feature_to_the_cent_with_a_cached_balance() {
    priced_by_usage("cached").await;
}

/// The filter reads a copy of each streamed chunk as it passes: the client has the first event
/// while the upstream still waits to send the rest (it waits for the client to say so).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_streamed_response_is_never_held_back() {
    let dir = TempDir::new("ai-stream");
    let ledger = Ledger::start(&dir.0).await;
    let cy = customer(&ledger, "cy", "1.00").await;
    let llm = Llm::start().await;
    let envoy = Envoy::start(&dir.0, llm.port, ledger.port, &ai_config("lease")).await;
    let mut response = reqwest::Client::new()
        .post(format!("http://127.0.0.1:{}/v1/chat/completions", envoy.port))
        .header("x-consumer-username", "cy")
        .header("x-test-mode", "gated")
        .header("x-test-completion-tokens", "5")
        .body(json!({"messages": messages("hold on"), "max_tokens": 10, "stream": true}).to_string())
        .send()
        .await
        .expect("call through envoy");
    assert_eq!(response.status(), 200, "{}", envoy.log_text());
    let mut body = Vec::new();
    while !body.ends_with(b"\n\n") {
        body.extend_from_slice(&response.chunk().await.expect("a chunk").expect("the first event"));
    }
    assert!(!llm.gate.finished.load(Ordering::SeqCst), "the first event came only after the upstream finished");
    llm.gate.open();
    while let Some(chunk) = response.chunk().await.expect("the rest") {
        body.extend_from_slice(&chunk);
    }
    let body = String::from_utf8(body).unwrap();
    assert_eq!(body.matches("data: ").count(), 7, "every event reaches the client: {body}");
    // Charged what the last event reported: 4 + 2 = 6 prompt tokens, 5 completion tokens.
    wait_consumed(&ledger, &cy, "input_tokens", "0.00006").await;
    wait_consumed(&ledger, &cy, "output_tokens", "0.00015").await;
    ledger.check().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_call_whose_estimate_is_not_covered_is_refused_and_costs_nothing() {
    let dir = TempDir::new("ai-refuse");
    let ledger = Ledger::start(&dir.0).await;
    // 0.01 of output credit: 333 tokens at 0.00003.
    let bo = customer(&ledger, "bo", "0.01").await;
    let (up, answered) = llm().await;
    let envoy = Envoy::start(&dir.0, up, ledger.port, &ai_config("lease")).await;

    let (status, _, body) = chat(&envoy, "bo", json!({"messages": messages("hi"), "max_tokens": 1000}), &[]).await;
    assert_eq!(status, 402, "{body}\n{}", envoy.log_text());
    let p: Value = serde_json::from_str(&body).unwrap();
    assert_eq!((p["feature"].as_str(), p["price"].as_str()), (Some("output_tokens"), Some("0.03000")));
    // A smaller request fits, and uses more than it estimated: charged all the same.
    let (status, _, body) = chat(
        &envoy,
        "bo",
        json!({"messages": messages("hi"), "max_tokens": 300}),
        &[("x-test-completion-tokens", "300")],
    )
    .await;
    assert_eq!(status, 200, "{body}");
    wait_consumed(&ledger, &bo, "output_tokens", "0.009").await;
    wait_consumed(&ledger, &bo, "input_tokens", "0.00005").await;
    // The refused call's body never reached the upstream, and only the other call was booked.
    assert_eq!(answered.load(Ordering::SeqCst), 1);
    ledger.check().await;
}
