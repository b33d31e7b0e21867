//! `ANY /v3/gateway/authorize/…`: the per-call charge Envoy's `ext_authz` asks for (the design
//! the benchmarks compare the filter against): allow and charge, refuse with 401/402/403, book a
//! retried request id once, refuse malformed terms.

mod support;

use serde_json::json;
use support::{grant_body, Backend, Ledger, TestDb};

/// An authorization request as Envoy's ext_authz sends it for a call of `subject`.
async fn authorize(
    ledger: &Ledger,
    method: reqwest::Method,
    subject: Option<&str>,
    request_id: &str,
) -> support::Reply {
    let mut call = ledger
        .call(method, "/v3/gateway/authorize/api/v1/things?page=2")
        .header("x-credits-price", "0.40")
        .header("x-credits-currency", "USD")
        .header("x-credits-feature-key", "api_requests")
        .header("x-request-id", request_id);
    if let Some(s) = subject {
        call = call.header("x-consumer-username", s);
    }
    call.send().await
}

async fn each_call_is_charged_until_credit_runs_out(backend: Backend) {
    let db = TestDb::new(backend).await;
    let ledger = Ledger::start(&db).await;
    let c = ledger.customer("acme").await;
    ledger.grant(&c, grant_body("1.00", json!({}))).await;

    for (i, method) in [reqwest::Method::GET, reqwest::Method::POST].into_iter().enumerate() {
        let reply = authorize(&ledger, method, Some("acme-subject"), &format!("r{i}")).await;
        assert_eq!(reply.status, 200, "{}", reply.text);
    }
    assert_eq!(ledger.balance(&c, "").await.0, "0.20");
    let refused = authorize(&ledger, reqwest::Method::GET, Some("acme-subject"), "r2").await;
    refused.assert_problem(402, None);
    assert_eq!(refused.body["available"], "0.20", "{}", refused.text);
    assert_eq!(ledger.balance(&c, "").await.0, "0.20", "a refusal books nothing");
    let history = ledger.all_transactions(&c).await;
    assert_eq!(history[0]["name"], "Gateway call");
    assert_eq!(history[0]["feature_key"], "api_requests");
    ledger.assert_journal_sound().await;
}

async fn a_retried_request_id_books_once(backend: Backend) {
    let db = TestDb::new(backend).await;
    let ledger = Ledger::start(&db).await;
    let c = ledger.customer("acme").await;
    ledger.grant(&c, grant_body("10", json!({}))).await;
    for _ in 0..3 {
        let reply = authorize(&ledger, reqwest::Method::GET, Some("acme-subject"), "same-call").await;
        assert_eq!(reply.status, 200, "{}", reply.text);
    }
    assert_eq!(ledger.balance(&c, "").await.0, "9.60");
    assert_eq!(ledger.all_transactions(&c).await.len(), 2, "funded once, consumed once");
}

async fn calls_without_a_known_subject_are_refused(backend: Backend) {
    let db = TestDb::new(backend).await;
    let ledger = Ledger::start(&db).await;
    let missing = authorize(&ledger, reqwest::Method::GET, None, "r").await;
    missing.assert_problem(401, None);
    let unknown = authorize(&ledger, reqwest::Method::GET, Some("nobody"), "r").await;
    unknown.assert_problem(403, None);
    assert_eq!(unknown.body["subject"], "nobody");

    // The subject may come from another header.
    let c = ledger.customer("acme").await;
    ledger.grant(&c, grant_body("1", json!({}))).await;
    let reply = ledger
        .call(reqwest::Method::GET, "/v3/gateway/authorize")
        .header("x-credits-price", "0.25")
        .header("x-credits-currency", "USD")
        .header("x-credits-subject-header", "x-api-client")
        .header("x-api-client", "acme-subject")
        .send()
        .await;
    assert_eq!(reply.status, 200, "{}", reply.text);
    assert_eq!(ledger.balance(&c, "").await.0, "0.75");
}

async fn malformed_terms_are_bad_requests_and_the_token_is_required(backend: Backend) {
    let db = TestDb::new(backend).await;
    let ledger = Ledger::start(&db).await;
    let c = ledger.customer("acme").await;
    ledger.grant(&c, grant_body("1", json!({}))).await;
    let before = ledger.snapshot(&c).await;
    let cases = [
        (vec![("x-credits-currency", "USD")], "x-credits-price"),
        (vec![("x-credits-price", "1e3"), ("x-credits-currency", "USD")], "x-credits-price"),
        (vec![("x-credits-price", "0"), ("x-credits-currency", "USD")], "amount"),
        (vec![("x-credits-price", "0.10"), ("x-credits-currency", "usd")], "x-credits-currency"),
        (
            vec![("x-credits-price", "0.10"), ("x-credits-currency", "USD"), ("x-credits-settlement-mode", "free")],
            "x-credits-settlement-mode",
        ),
    ];
    for (headers, field) in cases {
        let mut call =
            ledger.call(reqwest::Method::GET, "/v3/gateway/authorize/x").header("x-consumer-username", "acme-subject");
        for (name, value) in &headers {
            call = call.header(name, value);
        }
        let reply = call.send().await;
        reply.assert_problem(400, Some(field));
    }
    let no_token = ledger
        .call_without_token(reqwest::Method::GET, "/v3/gateway/authorize/x")
        .header("x-credits-price", "0.10")
        .header("x-credits-currency", "USD")
        .header("x-consumer-username", "acme-subject")
        .send()
        .await;
    assert_eq!(no_token.status, 401, "{}", no_token.text);
    assert_eq!(ledger.snapshot(&c).await, before, "nothing booked");
}

on_both_backends!(
    each_call_is_charged_until_credit_runs_out,
    a_retried_request_id_books_once,
    calls_without_a_known_subject_are_refused,
    malformed_terms_are_bad_requests_and_the_token_is_required,
);
